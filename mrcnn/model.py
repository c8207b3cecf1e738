"""Mask R-CNN: the MaskRCNN class, and matterport's public names re-exported.

Experiments written for matterport's Mask_RCNN import from here:

    from mrcnn.model import MaskRCNN, build_unet_mask_graph, build_fpn_mask_graph, resnet_graph
    from mrcnn.model import load_image_gt, mold_image, log

The graph pieces live one concern per module (backbone, heads, layers, losses, data); this
module wires them into the two models (training and inference), and owns training, detection,
weight loading and log directories.

Conventions: boxes are (y1, x1, y2, x2), in pixels outside the graph and normalized inside;
masks are bool [H, W, N].
"""

import datetime
import json
import logging
import math
import os
import re

import h5py
import keras
import numpy as np
import tensorflow as tf
from keras import layers as KL
from keras.src.utils import naming

from mrcnn import utils
from mrcnn.backbone import (BatchNorm, build_backbone, conv_block, fpn_graph,  # noqa: F401
                            identity_block, resnet_graph)
from mrcnn.config import Config, ConfigError
from mrcnn.utils import compute_backbone_shapes  # noqa: F401
from mrcnn.data import (build_rpn_targets, compose_image_meta, compute_anchors,  # noqa: F401
                        load_image_gt, mold_image, parse_image_meta, unmold_image)
from mrcnn.heads import (MASK_HEADS, build_fpn_mask_graph, build_mask_head,  # noqa: F401
                         build_rpn_model, build_unet_mask_graph, fpn_classifier_graph,
                         rpn_graph)
from mrcnn.layers import (AnchorsLayer, DetectionLayer, DetectionTargetLayer,  # noqa: F401
                          ProposalLayer, PyramidROIAlign, apply_box_deltas_graph,
                          clip_boxes_graph, norm_boxes_graph, overlaps_graph,
                          parse_image_meta_graph, trim_zeros_graph)
from mrcnn.losses import (mrcnn_bbox_loss_graph, mrcnn_class_loss_graph,  # noqa: F401
                          mrcnn_mask_loss_graph, rpn_bbox_loss_graph, rpn_class_loss_graph,
                          smooth_l1_loss)

logger = logging.getLogger(__name__)

# The five losses, in the order the training model outputs them.
LOSS_NAMES = ("rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss", "mrcnn_bbox_loss",
              "mrcnn_mask_loss")

# Layer-name regexes of matterport's training stages.
LAYER_REGEX = {
    # All layers but the backbone.
    "heads": r"(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    # From a ResNet stage and up.
    "3+": r"(res3.*)|(bn3.*)|(res4.*)|(bn4.*)|(res5.*)|(bn5.*)|(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "4+": r"(res4.*)|(bn4.*)|(res5.*)|(bn5.*)|(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "5+": r"(res5.*)|(bn5.*)|(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "all": ".*",
}

CHECKPOINT_SUFFIX = ".weights.h5"


class WeightsError(ValueError):
    """A weights file that does not fit the model: missing layers or other shapes."""


def log(text, array=None):
    """Print a text and, optionally, the shape, range and dtype of a numpy array."""
    if array is not None:
        array = np.asarray(array)
        text = text.ljust(25)
        if array.size:
            text += "shape: {:20}  min: {:10.5f}  max: {:10.5f}  {}".format(
                str(array.shape), float(array.min()), float(array.max()), array.dtype)
        else:
            text += "shape: {:20}  min: {:10}  max: {:10}  {}".format(
                str(array.shape), "", "", array.dtype)
    print(text)


# ----------------------------------------------------------------------------- training model

class MaskRCNNTrainingModel(keras.Model):
    """The training graph as a functional model with its own train_step / test_step.

    Its last five outputs are the losses (LOSS_NAMES). train_step weights them by
    config.LOSS_WEIGHTS, adds L2 weight decay on every trainable non-BatchNorm weight (as
    matterport: WEIGHT_DECAY * sum(w^2) / size(w)), scales for the loss-scale optimizer of
    mixed precision and for the number of replicas of a distribution strategy, and logs each
    loss as an epoch mean.
    """

    def __init__(self, inputs, outputs, config, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.config = config
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in LOSS_NAMES}
        self.total_tracker = keras.metrics.Mean(name="loss")
        self.decay_variables = []

    @property
    def metrics(self):
        return [self.total_tracker] + list(self.loss_trackers.values())

    def select_decay_variables(self):
        """Fix the weights under L2 decay: trainable, and not BatchNorm's gamma or beta."""
        self.decay_variables = [v for v in self.trainable_variables
                                if not re.search(r"(gamma|beta)(:\d+)?$", v.path)]

    def _forward_losses(self, inputs, training):
        outputs = self(inputs, training=training)
        losses = [tf.cast(tf.reshape(t, []), tf.float32) for t in outputs[-len(LOSS_NAMES):]]
        weights = self.config.LOSS_WEIGHTS
        total = tf.add_n([loss * weights[name] for name, loss in zip(LOSS_NAMES, losses)])
        return losses, total

    def _weight_decay(self):
        if not self.decay_variables or not self.config.WEIGHT_DECAY:
            return tf.constant(0.0)
        terms = [tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) / tf.cast(tf.size(v), tf.float32)
                 for v in self.decay_variables]
        return self.config.WEIGHT_DECAY * tf.add_n(terms)

    def _update(self, losses, total):
        for name, loss in zip(LOSS_NAMES, losses):
            self.loss_trackers[name].update_state(loss)
        self.total_tracker.update_state(total)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            losses, total = self._forward_losses(inputs, training=True)
            total = total + self._weight_decay()
            # Gradients of all replicas are summed: divide so the step uses their mean.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(total / replicas)
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        return self._update(losses, total)

    def test_step(self, data):
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        losses, total = self._forward_losses(inputs, training=False)
        return self._update(losses, total + self._weight_decay())


# ----------------------------------------------------------------------------- callbacks

class TrainingDivergedError(RuntimeError):
    """A loss became NaN or infinite; the message names the step and the last good checkpoint."""


class NaNGuard(keras.callbacks.Callback):
    """Stop training at the first step whose loss is NaN or infinite.

    Records where (`failure`: epoch and step counted from 1, the non-finite losses) and stops
    the fit; the checkpoint of that epoch is then not written (see AtomicCheckpoint), so the
    last checkpoint on disk stays the last good one.
    """

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.failure = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if "loss" not in logs or math.isfinite(float(logs["loss"])) or self.failure:
            return
        self.failure = {
            "epoch": self._epoch + 1, "step": batch + 1,
            "global_step": self._epoch * self.steps_per_epoch + batch + 1,
            "losses": sorted(k for k, v in logs.items() if not math.isfinite(float(v))),
        }
        self.model.stop_training = True


class AtomicCheckpoint(keras.callbacks.Callback):
    """Save the weights at the end of every epoch, atomically.

    The file is written under a temporary name in the same folder and renamed into place, so
    a crash during the write never leaves a truncated checkpoint where find_last() looks.
    `path_template` has an `{epoch:04d}` field; epochs are counted from 1, as in the file names
    of matterport (the file of epoch 3 is the state after three epochs). Each file carries
    HDF5 attributes: `attrs` (train() stores mrcnn_mask_head, mrcnn_backbone,
    mrcnn_num_classes) and mrcnn_epoch. Nothing is saved after `guard` (a NaNGuard) has seen
    a non-finite loss.
    """

    def __init__(self, path_template, guard=None, attrs=None):
        super().__init__()
        self.path_template = path_template
        self.guard = guard
        self.attrs = dict(attrs or {})

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.failure:
            return
        path = self.path_template.format(epoch=epoch + 1)
        save_weights_atomic(self.model, path, attrs=dict(self.attrs, mrcnn_epoch=epoch + 1))


def save_weights_atomic(keras_model, path, attrs=None):
    """keras_model.save_weights(path) through a temporary file and an atomic rename.

    The file is Keras 3's `.weights.h5`, plus an attribute `mrcnn_layer_names` that maps its
    layer keys (Keras names them by class: conv2d_12, ...) to the layers' real names, so it can
    be loaded by name into a model of another shape (by_name=True, exclude=...).
    """
    if not path.endswith(CHECKPOINT_SUFFIX):
        raise ValueError("weights files end with %s: %s" % (CHECKPOINT_SUFFIX, path))
    tmp = path[:-len(CHECKPOINT_SUFFIX)] + ".tmp" + CHECKPOINT_SUFFIX
    keras_model.save_weights(tmp)
    names = {key: layer.name for key, layer in native_layer_keys(keras_model).items()}
    with h5py.File(tmp, "a") as f:
        f.attrs["mrcnn_layer_names"] = json.dumps(names)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    # On disk before the rename, and the rename on disk after it: survives a power loss too.
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def native_layer_keys(keras_model):
    """{key: layer} for the top-level layers as Keras 3 names them in a `.weights.h5` file:
    the snake-case class name, numbered in the order of keras_model.layers."""
    used, keys = {}, {}
    for layer in keras_model.layers:
        key = naming.to_snake_case(layer.__class__.__name__)
        if key in used:
            used[key] += 1
            key = "%s_%d" % (key, used[key])
        else:
            used[key] = 0
        keys[key] = layer
    return keys


# ----------------------------------------------------------------------------- weights files

def read_weights_file(filepath, keras_model=None):
    """Read a weights file into {layer name: [numpy arrays in the layer's weight order]}.

    Reads legacy Keras 2 HDF5 files such as matterport's mask_rcnn_coco.h5 (`layer_names` and
    `weight_names` attributes, possibly under a `model_weights` group) and Keras 3
    `.weights.h5` files (layers/<key>/.../vars/<i>). Keras 3 keys layers by class and position,
    not by name: files written by save_weights_atomic carry the key -> name map; for other
    files the keys of `keras_model` are used, which is right only for the same architecture.
    Only arrays are read: nothing in the file is executed.
    """
    if not os.path.isfile(filepath):
        raise FileNotFoundError("weights file not found: %s" % filepath)
    try:
        f = h5py.File(filepath, "r")
    except OSError as e:
        raise WeightsError("%s is not a readable HDF5 weights file (%s)" % (filepath, e)) from None
    with f:
        if "layer_names" in f.attrs or "model_weights" in f:
            group = f["model_weights"] if "model_weights" in f else f
            return _read_legacy_group(group)
        if "layers" in f:
            if "mrcnn_layer_names" in f.attrs:
                names = json.loads(f.attrs["mrcnn_layer_names"])
            elif keras_model is not None:
                names = {key: layer.name for key, layer in native_layer_keys(keras_model).items()}
            else:
                raise WeightsError("%s is a Keras 3 weights file without layer names; pass the "
                                   "model it belongs to" % filepath)
            return {names.get(key, key): _read_native_vars(f["layers"][key]) for key in f["layers"]}
    raise WeightsError("%s holds no Keras weights (neither a Keras 3 .weights.h5 nor a "
                       "Keras 2 HDF5 file)" % filepath)


def _decode(name):
    return name.decode("utf8") if isinstance(name, bytes) else str(name)


def _read_legacy_group(group):
    weights = {}
    for layer_name in group.attrs["layer_names"]:
        layer_name = _decode(layer_name)
        g = group[layer_name]
        names = [_decode(n) for n in g.attrs.get("weight_names", [])]
        weights[layer_name] = [np.asarray(g[n]) for n in names]
    return weights


def _read_native_vars(group):
    """Arrays of one layer of a Keras 3 weights file, in the order the layer owns them."""
    arrays = []
    if "vars" in group:
        v = group["vars"]
        arrays.extend(np.asarray(v[k]) for k in sorted(v, key=int))
    for key in group:
        if key == "vars":
            continue
        if key == "layers":
            for name in group["layers"]:
                arrays.extend(_read_native_vars(group["layers"][name]))
        elif isinstance(group[key], h5py.Group):
            arrays.extend(_read_native_vars(group[key]))
    return arrays


def _weighted_layers(keras_model):
    """Top-level layers that own weights (a nested model such as rpn_model counts as one)."""
    return [layer for layer in keras_model.layers if layer.weights]


# ----------------------------------------------------------------------------- MaskRCNN

class MaskRCNN:
    """Mask R-CNN with matterport's interface; the Keras model is in `keras_model`."""

    def __init__(self, mode, config, model_dir):
        """mode: "training" or "inference"; config: a Config; model_dir: where training logs
        and checkpoints go (a sub-folder per run)."""
        if mode not in ("training", "inference"):
            raise ValueError("mode must be 'training' or 'inference', not %r" % (mode,))
        if not isinstance(config, Config):
            raise TypeError("config must be an mrcnn.config.Config")
        self.mode = mode
        self.config = config
        self.model_dir = model_dir
        self.epoch = 0
        self._anchor_cache = {}
        self.strategy = make_strategy(config)
        keras.mixed_precision.set_global_policy(
            "mixed_float16" if config.MIXED_PRECISION else "float32")
        self.set_log_dir()
        with self.strategy.scope():
            self.keras_model = self.build(mode=mode, config=config)

    # ------------------------------------------------------------------ graph

    def build(self, mode, config):
        """Build the Mask R-CNN graph of `mode`; returns the Keras model."""
        h, w = config.IMAGE_SHAPE[:2]
        if config.IMAGE_RESIZE_MODE != "none" and (h % 64 or w % 64):
            raise ConfigError("image size must be divisible by 64 six times; use sizes such as "
                              "256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 1024 (got %s)"
                              % (config.IMAGE_SHAPE[:2],))

        input_image = KL.Input(shape=[None, None, config.IMAGE_CHANNEL_COUNT], name="input_image")
        input_image_meta = KL.Input(shape=[config.IMAGE_META_SIZE], name="input_image_meta")
        if mode == "training":
            # RPN targets.
            input_rpn_match = KL.Input(shape=[None, 1], name="input_rpn_match", dtype="int32")
            input_rpn_bbox = KL.Input(shape=[None, 4], name="input_rpn_bbox", dtype="float32")
            # Ground truth: class ids, boxes in pixels, masks (mini masks or full size).
            input_gt_class_ids = KL.Input(shape=[None], name="input_gt_class_ids", dtype="int32")
            input_gt_boxes = KL.Input(shape=[None, 4], name="input_gt_boxes", dtype="float32")
            gt_boxes = KL.Lambda(lambda t: norm_boxes_graph(t[0], tf.shape(t[1])[1:3]),
                                 name="norm_gt_boxes")([input_gt_boxes, input_image])
            mask_shape = (list(config.MINI_MASK_SHAPE) if config.USE_MINI_MASK
                          else [int(h), int(w)])
            input_gt_masks = KL.Input(shape=mask_shape + [None], name="input_gt_masks", dtype="bool")
        else:
            input_anchors = KL.Input(shape=[None, 4], name="input_anchors")

        # Backbone: C2..C5 [batch, h/4 .. h/32, w/4 .. w/32, channels].
        _, C2, C3, C4, C5 = build_backbone(input_image, config, stage5=True)
        # FPN: P2..P6 [batch, h/4 .. h/64, w/4 .. w/64, TOP_DOWN_PYRAMID_SIZE].
        P2, P3, P4, P5, P6 = fpn_graph(C2, C3, C4, C5, config.TOP_DOWN_PYRAMID_SIZE)
        rpn_feature_maps = [P2, P3, P4, P5, P6]
        mrcnn_feature_maps = [P2, P3, P4, P5]

        if mode == "training":
            # Anchors of the training image size: [batch, anchors, 4] normalized.
            anchors = AnchorsLayer(self.get_anchors(config.IMAGE_SHAPE), name="anchors")(input_image)
        else:
            anchors = input_anchors

        # RPN, shared across the pyramid levels.
        rpn = build_rpn_model(config.RPN_ANCHOR_STRIDE, len(config.RPN_ANCHOR_RATIOS),
                              config.TOP_DOWN_PYRAMID_SIZE)
        level_outputs = [rpn([p]) for p in rpn_feature_maps]
        # [batch, anchors, 2], [batch, anchors, 2], [batch, anchors, 4], float32 (box math)
        rpn_class_logits, rpn_class, rpn_bbox = [
            KL.Concatenate(axis=1, name=name, dtype="float32")(
                [level[i] for level in level_outputs])
            for i, name in enumerate(["rpn_class_logits", "rpn_class", "rpn_bbox"])]

        # Proposals: [batch, proposal_count, 4] normalized, zero-padded.
        proposal_count = (config.POST_NMS_ROIS_TRAINING if mode == "training"
                          else config.POST_NMS_ROIS_INFERENCE)
        rpn_rois = ProposalLayer(proposal_count=proposal_count,
                                 nms_threshold=config.RPN_NMS_THRESHOLD,
                                 config=config, name="ROI")([rpn_class, rpn_bbox, anchors])

        if mode == "training":
            active_class_ids = KL.Lambda(
                lambda t: parse_image_meta_graph(t)["active_class_ids"],
                name="active_class_ids")(input_image_meta)
            if config.USE_RPN_ROIS:
                target_rois = rpn_rois
            else:
                # ROIs given as an input, in pixels: [batch, POST_NMS_ROIS_TRAINING, 4].
                input_rois = KL.Input(shape=[config.POST_NMS_ROIS_TRAINING, 4],
                                      name="input_roi", dtype="int32")
                target_rois = KL.Lambda(
                    lambda t: norm_boxes_graph(tf.cast(t[0], tf.float32), tf.shape(t[1])[1:3]),
                    name="input_roi_norm")([input_rois, input_image])

            # Sample ROIs and make their targets: rois [batch, TRAIN_ROIS_PER_IMAGE, 4],
            # class ids [batch, T], deltas [batch, T, 4], masks [batch, T, 28, 28].
            rois, target_class_ids, target_bbox, target_mask = DetectionTargetLayer(
                config, name="proposal_targets")(
                    [target_rois, input_gt_class_ids, gt_boxes, input_gt_masks])

            # Heads: [batch, T, NUM_CLASSES], [batch, T, NUM_CLASSES], [batch, T, NUM_CLASSES, 4]
            mrcnn_class_logits, mrcnn_class, mrcnn_bbox = fpn_classifier_graph(
                rois, mrcnn_feature_maps, input_image_meta, config.POOL_SIZE, config.NUM_CLASSES,
                train_bn=config.TRAIN_BN, fc_layers_size=config.FPN_CLASSIF_FC_LAYERS_SIZE)
            # The mask loss counts positive ROIs only, and DetectionTargetLayer puts them
            # first: the mask head runs on the first n rows, n the largest positive count of
            # the batch's images (1 <= n <= int(T * ROI_POSITIVE_RATIO)), not on all T.
            # [batch, n, 28, 28, NUM_CLASSES]
            mask_rois = KL.Lambda(lambda t: t[0][:, :mask_roi_count(t[1], config)],
                                  name="mask_rois")([rois, target_class_ids])
            mrcnn_mask = build_mask_head(config, mask_rois, mrcnn_feature_maps,
                                         input_image_meta, train_bn=config.TRAIN_BN)
            output_rois = KL.Identity(name="output_rois")(rois)

            # Losses: float32 scalars.
            rpn_class_loss = KL.Lambda(lambda t: rpn_class_loss_graph(*t), name="rpn_class_loss")(
                [input_rpn_match, rpn_class_logits])
            rpn_bbox_loss = KL.Lambda(lambda t: rpn_bbox_loss_graph(config, *t),
                                      name="rpn_bbox_loss")(
                [input_rpn_bbox, input_rpn_match, rpn_bbox])
            class_loss = KL.Lambda(lambda t: mrcnn_class_loss_graph(*t), name="mrcnn_class_loss")(
                [target_class_ids, mrcnn_class_logits, active_class_ids])
            bbox_loss = KL.Lambda(lambda t: mrcnn_bbox_loss_graph(*t), name="mrcnn_bbox_loss")(
                [target_bbox, target_class_ids, mrcnn_bbox])
            mask_loss = KL.Lambda(
                lambda t: mrcnn_mask_loss_graph(t[0][:, :tf.shape(t[2])[1]],
                                                t[1][:, :tf.shape(t[2])[1]], t[2]),
                name="mrcnn_mask_loss")([target_mask, target_class_ids, mrcnn_mask])

            inputs = [input_image, input_image_meta, input_rpn_match, input_rpn_bbox,
                      input_gt_class_ids, input_gt_boxes, input_gt_masks]
            if not config.USE_RPN_ROIS:
                inputs.append(input_rois)
            outputs = [rpn_class_logits, rpn_class, rpn_bbox, mrcnn_class_logits, mrcnn_class,
                       mrcnn_bbox, mrcnn_mask, rpn_rois, output_rois,
                       rpn_class_loss, rpn_bbox_loss, class_loss, bbox_loss, mask_loss]
            return MaskRCNNTrainingModel(inputs, outputs, config, name="mask_rcnn")

        # Inference: heads on the proposals, then detections and masks of the detections.
        mrcnn_class_logits, mrcnn_class, mrcnn_bbox = fpn_classifier_graph(
            rpn_rois, mrcnn_feature_maps, input_image_meta, config.POOL_SIZE, config.NUM_CLASSES,
            train_bn=config.TRAIN_BN, fc_layers_size=config.FPN_CLASSIF_FC_LAYERS_SIZE)
        # [batch, DETECTION_MAX_INSTANCES, (y1, x1, y2, x2, class_id, score)] normalized
        detections = DetectionLayer(config, name="mrcnn_detection")(
            [rpn_rois, mrcnn_class, mrcnn_bbox, input_image_meta])
        detection_boxes = KL.Lambda(lambda t: t[..., :4], name="detection_boxes")(detections)
        # [batch, DETECTION_MAX_INSTANCES, 28, 28, NUM_CLASSES]
        mrcnn_mask = build_mask_head(config, detection_boxes, mrcnn_feature_maps,
                                     input_image_meta, train_bn=config.TRAIN_BN)
        return keras.Model([input_image, input_image_meta, input_anchors],
                           [detections, mrcnn_class, mrcnn_bbox, mrcnn_mask,
                            rpn_rois, rpn_class, rpn_bbox], name="mask_rcnn")

    # ------------------------------------------------------------------ anchors and inputs

    def get_anchors(self, image_shape):
        """Anchors of an image shape, normalized: [anchors, 4] float32, cached."""
        key = tuple(int(s) for s in image_shape[:2])
        if key not in self._anchor_cache:
            # Kept in pixels too, as matterport's notebooks read model.anchors.
            self.anchors = compute_anchors(self.config, image_shape)
            self._anchor_cache[key] = utils.norm_boxes(self.anchors, key).astype(np.float32)
        return self._anchor_cache[key]

    def _batch_anchors(self, image_shape, batch_size):
        """get_anchors(image_shape) repeated for a batch: [batch, anchors, 4]."""
        anchors = self.get_anchors(image_shape)
        return np.broadcast_to(anchors, (batch_size,) + anchors.shape)

    def mold_inputs(self, images):
        """Resize and normalize images as the network expects them.

        images: list of [H, W, 3] arrays (sizes may differ).
        Returns molded_images [N, h, w, 3] float32, image_metas [N, IMAGE_META_SIZE],
        windows [N, (y1, x1, y2, x2)] of the image inside the molded image, in pixels.
        """
        molded_images, image_metas, windows = [], [], []
        for image in images:
            molded, window, scale, _, _ = utils.resize_image(
                image, min_dim=self.config.IMAGE_MIN_DIM, min_scale=self.config.IMAGE_MIN_SCALE,
                max_dim=self.config.IMAGE_MAX_DIM, mode=self.config.IMAGE_RESIZE_MODE)
            molded = mold_image(molded, self.config)
            meta = compose_image_meta(0, image.shape, molded.shape, window, scale,
                                      np.zeros([self.config.NUM_CLASSES], dtype=np.int32))
            molded_images.append(molded)
            windows.append(window)
            image_metas.append(meta)
        return (np.stack(molded_images).astype(np.float32), np.stack(image_metas).astype(np.float32),
                np.stack(windows))

    def unmold_detections(self, detections, mrcnn_mask, original_image_shape, image_shape,
                          window):
        """Turn one image's padded network output into image-space detections.

        detections: [N, (y1, x1, y2, x2, class_id, score)] normalized, zero-padded.
        mrcnn_mask: [N, 28, 28, NUM_CLASSES]. original_image_shape: [H, W, C] before resizing;
        image_shape: the molded shape; window: [y1, x1, y2, x2] pixels of the image in it.
        Returns boxes [n, 4] int32 pixels of the original image, class_ids [n], scores [n],
        masks [H, W, n] bool.
        """
        detections = np.asarray(detections, dtype=np.float32)
        # Detections are zero-padded at the end: class_id 0 marks the padding.
        zero_ix = np.where(detections[:, 4] == 0)[0]
        n = zero_ix[0] if zero_ix.shape[0] > 0 else detections.shape[0]
        boxes = detections[:n, :4]
        class_ids = detections[:n, 4].astype(np.int32)
        scores = detections[:n, 5]
        masks = mrcnn_mask[np.arange(n), :, :, class_ids]

        # Normalized coordinates of the molded image -> pixels of the original image.
        window = utils.norm_boxes(window, image_shape[:2])
        wy1, wx1, wy2, wx2 = window
        shift = np.array([wy1, wx1, wy1, wx1])
        scale = np.array([wy2 - wy1, wx2 - wx1, wy2 - wy1, wx2 - wx1])
        boxes = np.divide(boxes - shift, scale)
        boxes = utils.denorm_boxes(boxes, original_image_shape[:2])

        # Drop boxes of zero area (possible after clipping to the window).
        keep = np.where((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) > 0)[0]
        boxes, class_ids, scores, masks = boxes[keep], class_ids[keep], scores[keep], masks[keep]

        full_masks = [utils.unmold_mask(masks[i], boxes[i], original_image_shape)
                      for i in range(len(keep))]
        full_masks = (np.stack(full_masks, axis=-1) if full_masks
                      else np.zeros(tuple(original_image_shape[:2]) + (0,), dtype=bool))
        return boxes.astype(np.int32), class_ids, scores.astype(np.float32), full_masks

    # ------------------------------------------------------------------ inference

    def detect(self, images, verbose=0):
        """Detect instances in a list of images (exactly BATCH_SIZE of them, as matterport).

        Returns one dict per image: rois [N, (y1, x1, y2, x2)] pixels, class_ids [N],
        scores [N], masks [H, W, N] bool.
        """
        self._check_inference("detect")
        if len(images) != self.config.BATCH_SIZE:
            raise ValueError("detect() takes exactly BATCH_SIZE=%d images (got %d); set "
                             "IMAGES_PER_GPU or pass that many" % (self.config.BATCH_SIZE, len(images)))
        if verbose:
            log("Processing {} images".format(len(images)))
            for image in images:
                log("image", image)
        molded_images, image_metas, windows = self.mold_inputs(images)
        shape = molded_images[0].shape
        if any(m.shape != shape for m in molded_images):
            raise ValueError("after resizing, all images of a batch must have one size; use "
                             "IMAGE_RESIZE_MODE 'square' or detect one image at a time")
        anchors = self._batch_anchors(shape, len(images))
        if verbose:
            log("molded_images", molded_images)
            log("image_metas", image_metas)
            log("anchors", anchors)
        detections, _, _, mrcnn_mask, _, _, _ = self._predict([molded_images, image_metas, anchors])
        results = []
        for i, image in enumerate(images):
            rois, class_ids, scores, masks = self.unmold_detections(
                detections[i], mrcnn_mask[i], image.shape, molded_images[i].shape, windows[i])
            results.append({"rois": rois, "class_ids": class_ids, "scores": scores, "masks": masks})
        return results

    def detect_molded(self, molded_images, image_metas, verbose=0):
        """Detect on images already molded (load_image_gt output); boxes and masks are in the
        original image's coordinates as recorded in image_metas."""
        self._check_inference("detect_molded")
        if len(molded_images) != self.config.BATCH_SIZE:
            raise ValueError("detect_molded() takes exactly BATCH_SIZE=%d images"
                             % self.config.BATCH_SIZE)
        molded_images = np.asarray(molded_images, dtype=np.float32)
        image_metas = np.asarray(image_metas, dtype=np.float32)
        shape = molded_images[0].shape
        anchors = self._batch_anchors(shape, len(molded_images))
        if verbose:
            log("Processing {} images".format(len(molded_images)))
            log("anchors", anchors)
        detections, _, _, mrcnn_mask, _, _, _ = self._predict([molded_images, image_metas, anchors])
        results = []
        for i in range(len(molded_images)):
            meta = parse_image_meta(image_metas[i:i + 1])
            original_shape = meta["original_image_shape"][0]
            window = meta["window"][0]
            rois, class_ids, scores, masks = self.unmold_detections(
                detections[i], mrcnn_mask[i], original_shape, shape, window)
            results.append({"rois": rois, "class_ids": class_ids, "scores": scores, "masks": masks})
        return results

    def _predict(self, inputs):
        outputs = self.keras_model.predict_on_batch(inputs)
        return [np.asarray(o) for o in outputs]

    def _check_inference(self, what):
        if self.mode != "inference":
            raise RuntimeError("%s() needs a model built in inference mode "
                               "(MaskRCNN(mode='inference', ...))" % what)

    # ------------------------------------------------------------------ inspection

    def ancestor(self, tensor, name, checked=None):
        """The output of the layer named `name` (a regex, fully matched) that `tensor` depends
        on, searched backwards through the Keras graph; None when there is none.

        matterport searched TF1 op names; here names are layer names, e.g.
        model.ancestor(model.keras_model.get_layer("mrcnn_detection").output, "ROI").
        """
        checked = set() if checked is None else checked
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            return None
        operation, node_index, _ = history
        if re.fullmatch(name, operation.name):
            return tensor
        for parent in operation._inbound_nodes[node_index].input_tensors:
            if id(parent) in checked:
                continue
            checked.add(id(parent))
            found = self.ancestor(parent, name, checked)
            if found is not None:
                return found
        return None

    def find_trainable_layer(self, layer):
        """The layer holding the weights: the inner layer of a TimeDistributed wrapper."""
        if isinstance(layer, KL.TimeDistributed):
            return self.find_trainable_layer(layer.layer)
        return layer

    def get_trainable_layers(self):
        """Layers that own weights (TimeDistributed unwrapped)."""
        found = []
        for layer in self.keras_model.layers:
            layer = self.find_trainable_layer(layer)
            if layer.get_weights():
                found.append(layer)
        return found

    def run_graph(self, images, outputs, image_metas=None):
        """Run the model on images and return named intermediate tensors.

        outputs: list of (name, layer_name_or_tensor) pairs, e.g.
            [("proposals", "ROI"), ("detections", "mrcnn_detection")];
            a layer name fetches that layer's output in the model's graph (matterport passed
            layer.output tensors, which also works). Returns an ordered dict name -> numpy.
        """
        import collections
        tensors = []
        for _, what in outputs:
            if isinstance(what, str):
                what = self.keras_model.get_layer(what).output
            tensors.append(what)
        sub_model = keras.Model(self.keras_model.inputs, tensors)

        molded_images, metas, _ = self.mold_inputs(images)
        if image_metas is not None:
            metas = np.asarray(image_metas, dtype=np.float32)
        if self.mode == "training":
            raise RuntimeError("run_graph() runs the inference model; build it with "
                               "mode='inference'")
        anchors = self._batch_anchors(molded_images[0].shape, len(images))
        values = sub_model.predict_on_batch([molded_images, metas, anchors])
        if len(tensors) == 1:
            values = [values]
        result = collections.OrderedDict()
        for (name, _), value in zip(outputs, values):
            result[name] = np.asarray(value)
            log(name, result[name])
        return result

    # ------------------------------------------------------------------ weights

    def load_weights(self, filepath, by_name=False, exclude=None):
        """Load weights from a Keras 3 `.weights.h5` file or a legacy Keras 2 `.h5` file.

        by_name: match layers by name (matterport's way to start from COCO weights); layers
        absent from the file keep their values. Without it every layer that has weights must
        be in the file. exclude: layer names to skip (implies by_name), e.g. the class-specific
        layers ["mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_bbox", "mrcnn_mask"] when
        NUM_CLASSES differs. A layer whose shapes differ raises WeightsError naming the layer
        and suggesting `exclude`. Reads arrays only (no code from the file is run). Updates
        the log dir so that training continues the checkpoint's epoch count.
        """
        exclude = list(exclude or [])
        if exclude:
            by_name = True
        stored = read_weights_file(filepath, self.keras_model)
        layers = [layer for layer in _weighted_layers(self.keras_model)
                  if layer.name not in exclude]
        missing, mismatched, pending = [], [], []
        for layer in layers:
            if layer.name not in stored:
                missing.append(layer.name)
                continue
            arrays = stored[layer.name]
            variables = layer.weights
            if any(a.dtype.kind not in "biuf" for a in arrays):
                mismatched.append("%r: file holds non-numeric data %s" % (
                    layer.name, [str(a.dtype) for a in arrays]))
                continue
            if len(arrays) != len(variables) or any(
                    tuple(a.shape) != tuple(v.shape) for a, v in zip(arrays, variables)):
                mismatched.append("%r: file %s, model %s" % (
                    layer.name, [tuple(a.shape) for a in arrays],
                    [tuple(v.shape) for v in variables]))
                continue
            pending.append((variables, arrays))
        if mismatched:
            names = [m.split(":")[0].strip("'") for m in mismatched]
            raise WeightsError(
                "%s does not fit %d layer(s) of the model: %s. The file was made for another "
                "architecture or NUM_CLASSES; skip those layers with exclude=%r (or start from "
                "--weights none)" % (os.path.basename(filepath), len(mismatched),
                                     "; ".join(mismatched), names))
        if missing and not by_name:
            raise WeightsError(
                "%s has no weights for %d layer(s) of the model (%s%s). Load with by_name=True "
                "to keep their current values" % (os.path.basename(filepath), len(missing),
                                                  ", ".join(missing[:5]),
                                                  ", ..." if len(missing) > 5 else ""))
        if not pending:
            raise WeightsError("%s shares no layer names with the model: not a Mask R-CNN "
                               "weights file?" % filepath)
        for variables, arrays in pending:
            for v, a in zip(variables, arrays):
                v.assign(a.astype(v.dtype))
        logger.info("loaded %d layers from %s (%d not in the file, %d excluded)",
                    len(pending), filepath, len(missing), len(exclude))
        self.set_log_dir(filepath)
        return len(pending)

    def save_weights(self, filepath):
        """Save all weights to a Keras 3 `.weights.h5` file (atomically)."""
        save_weights_atomic(self.keras_model, filepath)

    def get_imagenet_weights(self):
        """Matterport downloaded a Keras 2 ResNet50 file; here ImageNet weights come from Keras
        Applications, mapped onto the backbone's names (see samples/fashion)."""
        raise NotImplementedError("use `fashion.py train --weights imagenet`, which maps Keras "
                                  "Applications' ResNet weights onto this backbone")

    # ------------------------------------------------------------------ logs and checkpoints

    def set_log_dir(self, model_path=None):
        """Set the run's log dir and epoch counter.

        Without model_path a new dir model_dir/<name><YYYYmmddTHHMM> starts at epoch 0. With
        the path of one of our checkpoints (.../<name><date>/mask_rcnn_<name>_<epoch>.weights.h5)
        training continues in that dir from that epoch.
        """
        self.epoch = 0
        now = datetime.datetime.now()
        if model_path:
            m = re.match(r".*[/\\][\w-]+(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})[/\\]"
                         r"mask\_rcnn\_[\w-]+?(\d{4})\.(weights\.)?h5$", model_path)
            if m:
                now = datetime.datetime(*map(int, m.groups()[:5]))
                # The file of epoch N holds the state after N epochs: continue with N + 1.
                self.epoch = int(m.group(6))
        name = (self.config.NAME or "mask_rcnn").lower()
        self.log_dir = os.path.join(self.model_dir, "{}{:%Y%m%dT%H%M}".format(name, now))
        self.checkpoint_path = os.path.join(
            self.log_dir, "mask_rcnn_{}_{{epoch:04d}}{}".format(name, CHECKPOINT_SUFFIX))

    def find_last(self):
        """Path of the last checkpoint of the newest run of this config's NAME (see the
        module-level find_last)."""
        return find_last(self.model_dir, self.config.NAME)

    # ------------------------------------------------------------------ training

    def set_trainable(self, layer_regex, keras_model=None, indent=0, verbose=1):
        """Make layers whose names fully match layer_regex trainable, freeze the others.

        Recurses into nested models (rpn_model); a TimeDistributed wrapper is judged by its own
        name. Returns the names of the trainable layers.
        """
        if verbose > 0 and keras_model is None:
            log("Selecting layers to train")
        keras_model = keras_model or self.keras_model
        trainable_names = []
        for layer in keras_model.layers:
            if isinstance(layer, keras.Model):
                if verbose > 0:
                    print("{}In model: {}".format(" " * indent, layer.name))
                trainable_names += self.set_trainable(layer_regex, keras_model=layer,
                                                      indent=indent + 4, verbose=verbose)
                continue
            if not layer.weights:
                continue
            trainable = bool(re.fullmatch(layer_regex, layer.name))
            layer.trainable = trainable
            if trainable:
                trainable_names.append(layer.name)
                if verbose > 0:
                    print("{}{:20}   ({})".format(" " * indent, layer.name,
                                                  layer.__class__.__name__))
        return trainable_names

    def compile(self, learning_rate, momentum):
        """SGD with momentum and gradient norm clipping; the losses come from the graph."""
        with self.strategy.scope():
            optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum,
                                             clipnorm=self.config.GRADIENT_CLIP_NORM)
            self.keras_model.compile(optimizer=optimizer)
            self.keras_model.select_decay_variables()

    def train(self, train_dataset, val_dataset, learning_rate, epochs, layers,
              augmentation=None, custom_callbacks=None, no_augmentation_sources=None, seed=0):
        """Train from self.epoch up to `epochs` (the epoch to reach, as matterport).

        layers: "heads", "3+", "4+", "5+", "all" or a regex of layer names to train.
        augmentation: an albumentations transform (see mrcnn.data.default_augmentation) or an
        imgaug augmenter. custom_callbacks: more Keras callbacks. no_augmentation_sources:
        accepted for matterport compatibility; must be empty. seed: the data order and the
        random parts of each sample (the same seed and epoch give the same batches).
        Writes TensorBoard logs and one checkpoint per epoch into self.log_dir.
        """
        from mrcnn.data import DataGenerator
        if self.mode != "training":
            raise RuntimeError("train() needs a model built in training mode")
        if not self.config.USE_RPN_ROIS:
            raise ConfigError("USE_RPN_ROIS=False builds a graph fed with ROIs, but the loader "
                              "does not generate random ROIs; train with USE_RPN_ROIS=True")
        if no_augmentation_sources:
            raise NotImplementedError("no_augmentation_sources is not supported; give the "
                                      "augmentation only to datasets that want it")
        layer_regex = LAYER_REGEX.get(layers, layers)

        # Endless streams of exact passes over the data (see DataGenerator): an epoch is
        # STEPS_PER_EPOCH steps whatever the dataset size, and a resumed run continues the
        # same order.
        train_generator = DataGenerator(train_dataset, self.config, shuffle=True,
                                        augmentation=augmentation, seed=seed, stream=True,
                                        start=self.epoch * self.config.STEPS_PER_EPOCH)
        val_generator = DataGenerator(val_dataset, self.config, shuffle=True, seed=seed,
                                      stream=True)

        os.makedirs(self.log_dir, exist_ok=True)
        guard = NaNGuard(self.config.STEPS_PER_EPOCH)
        callbacks = [
            keras.callbacks.TensorBoard(log_dir=self.log_dir, histogram_freq=0,
                                        write_graph=False),
            guard,
            AtomicCheckpoint(self.checkpoint_path, guard=guard, attrs={
                "mrcnn_mask_head": self.config.MASK_HEAD,
                "mrcnn_backbone": str(self.config.BACKBONE),
                "mrcnn_num_classes": self.config.NUM_CLASSES}),
        ]
        callbacks += list(custom_callbacks or [])

        log("\nStarting at epoch {}. LR={}\n".format(self.epoch, learning_rate))
        log("Checkpoint Path: {}".format(self.checkpoint_path))
        self.set_trainable(layer_regex)
        self.compile(learning_rate, self.config.LEARNING_MOMENTUM)

        steps = self.config.STEPS_PER_EPOCH
        history = self.keras_model.fit(
            train_generator,
            initial_epoch=self.epoch,
            epochs=epochs,
            steps_per_epoch=steps,
            callbacks=callbacks,
            validation_data=val_generator,
            validation_steps=self.config.VALIDATION_STEPS,
            shuffle=False,
            verbose=1,
        )
        if guard.failure:
            self._raise_diverged(guard.failure)
        self.epoch = max(self.epoch, epochs)
        return history

    def _raise_diverged(self, failure):
        done = sorted(f for f in os.listdir(self.log_dir)
                      if f.startswith("mask_rcnn") and f.endswith(CHECKPOINT_SUFFIX)
                      and ".tmp" not in f)
        last = os.path.join(self.log_dir, done[-1]) if done else None
        raise TrainingDivergedError(
            "training stopped: %s became NaN or infinite at epoch %d, step %d (step %d of the "
            "run). The last good checkpoint is %s. Resume from it with a lower learning rate "
            "(or check the data of that step)."
            % (", ".join(failure["losses"]), failure["epoch"], failure["step"],
               failure["global_step"], last or "none (no epoch finished)"))


def positive_rois_per_image(config):
    """The most positive ROIs DetectionTargetLayer samples per image (they come first)."""
    return max(1, int(config.TRAIN_ROIS_PER_IMAGE * config.ROI_POSITIVE_RATIO))


def mask_roi_count(target_class_ids, config):
    """How many leading sampled ROIs the training mask head needs: the largest number of
    positive ROIs (class id > 0) of an image in the batch, at least 1 (so that BatchNorm in
    the head never sees an empty batch) and at most positive_rois_per_image(config)."""
    counts = tf.reduce_sum(tf.cast(target_class_ids > 0, tf.int32), axis=1)
    return tf.clip_by_value(tf.reduce_max(counts), 1, positive_rois_per_image(config))


def find_last(model_dir, name):
    """Path of the last checkpoint of the newest run named `name` (a config's NAME) under
    model_dir, without building a model. Runs are the folders <name><YYYYmmddTHHMM>;
    temporary (.tmp) files are ignored. Raises FileNotFoundError saying where it looked.
    """
    name = (name or "mask_rcnn").lower()
    run_dir = re.compile(re.escape(name) + r"\d{8}T\d{4}")
    dir_names = sorted(d for d in (os.listdir(model_dir) if os.path.isdir(model_dir) else [])
                       if run_dir.fullmatch(d) and os.path.isdir(os.path.join(model_dir, d)))
    for dir_name in reversed(dir_names):
        dir_path = os.path.join(model_dir, dir_name)
        checkpoints = sorted(f for f in os.listdir(dir_path)
                             if f.startswith("mask_rcnn") and f.endswith(CHECKPOINT_SUFFIX)
                             and ".tmp" not in f)
        if checkpoints:
            return os.path.join(dir_path, checkpoints[-1])
    raise FileNotFoundError("no checkpoint of %r in %s: train first, or give a weights file"
                            % (name, os.path.abspath(model_dir)))


def make_strategy(config):
    """The tf.distribute strategy for config.GPU_COUNT: MirroredStrategy over that many GPUs
    (or logical devices), the default strategy for one."""
    if config.GPU_COUNT <= 1:
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU")
    if len(devices) < config.GPU_COUNT:
        devices = tf.config.list_logical_devices("CPU")
    if len(devices) < config.GPU_COUNT:
        raise ConfigError("GPU_COUNT=%d but only %d devices are visible"
                          % (config.GPU_COUNT, len(devices)))
    return tf.distribute.MirroredStrategy([d.name for d in devices[:config.GPU_COUNT]])
