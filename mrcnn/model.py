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
import shutil
import tempfile
import zlib

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
from mrcnn.losses import (masked_mean, mrcnn_bbox_loss_graph,  # noqa: F401
                          mrcnn_bbox_loss_sum_count, mrcnn_class_loss_graph,
                          mrcnn_class_loss_sum_count, mrcnn_mask_loss_graph,
                          mrcnn_mask_loss_sum_count, rpn_bbox_loss_graph,
                          rpn_bbox_loss_sum_count, rpn_class_loss_graph,
                          rpn_class_loss_sum_count, smooth_l1_loss)

logger = logging.getLogger(__name__)

# The five losses, in the order the training model outputs them.
LOSS_NAMES = ("rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss", "mrcnn_bbox_loss",
              "mrcnn_mask_loss")
# Their (sum, count) pairs, output just before them (see mrcnn.losses).
LOSS_TERM_NAMES = tuple(name + "_terms" for name in LOSS_NAMES)

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

    Its last ten outputs are the (sum, count) pairs of the five losses (LOSS_TERM_NAMES, each
    float32 [2]) and then the losses themselves (LOSS_NAMES, float32 scalars, sum / count).

    train_step computes the step of the global batch whatever the distribution strategy:
    - Losses: each is a masked mean over the global batch. Every replica divides its own
      sums by the counts all-reduced over all replicas (and workers), so the replicas'
      gradients add up to the gradient of the global-batch loss even when replicas hold
      different numbers of anchors or positive ROIs. The logged losses are the global ones.
    - The total weights them by config.LOSS_WEIGHTS and adds matterport's L2 weight decay
      (WEIGHT_DECAY * sum(w^2) / size(w) over trainable weights that are not BatchNorm's gamma
      or beta), counted once: each replica adds 1 / replicas of it.
    - Gradients are all-reduced here, then clipped to GRADIENT_CLIP_NORM (per weight, as
      Keras' clipnorm): the clip applies to the global gradient. (Keras 3 optimizers clip each
      replica's gradient before their own all-reduce, which is another update; the optimizer
      is therefore built without clipnorm and receives gradient / replicas, which its own
      all-reduce sums back to the global gradient: one extra all-reduce per step, only when
      there is more than one replica.)
    - Mixed precision: the loss is scaled by the LossScaleOptimizer's scale and the clip norm
      with it; the optimizer unscales, and skips the step (lowering the scale) when the
      gradient is not finite, on every replica alike since all hold the same gradient.
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

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras peeks at the first batch of fit() and averages it over the replicas
        # (strategy.reduce), which fails for MultiWorkerMirroredStrategy's values; it only
        # serves to build the model and the optimizer, which MaskRCNN.compile() has done.
        if self.built and self.optimizer is not None and self.optimizer.built:
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _global_losses(self, inputs, training):
        """Forward pass of this replica's images.

        Returns (local, losses): local [5] this replica's share of each global-batch loss
        (its sums divided by the global counts: the shares of all replicas add up to the
        losses), and losses [5] the global-batch losses (no gradient).
        """
        outputs = self(inputs, training=training)
        n = len(LOSS_NAMES)
        terms = tf.stack([tf.reshape(tf.cast(t, tf.float32), [2])
                          for t in outputs[-2 * n:-n]])                   # [5, (sum, count)]
        global_terms = tf.stop_gradient(terms)
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            global_terms = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, global_terms)
        counts = global_terms[:, 1]
        local = tf.math.divide_no_nan(terms[:, 0], counts)               # [5]
        losses = tf.math.divide_no_nan(global_terms[:, 0], counts)       # [5]
        return local, losses

    def _weighted(self, losses):
        """sum of LOSS_WEIGHTS[name] * losses[i]."""
        weights = tf.constant([float(self.config.LOSS_WEIGHTS[name]) for name in LOSS_NAMES])
        return tf.reduce_sum(weights * losses)

    def _weight_decay(self):
        if not self.decay_variables or not self.config.WEIGHT_DECAY:
            return tf.constant(0.0)
        terms = [tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) / tf.cast(tf.size(v), tf.float32)
                 for v in self.decay_variables]
        return self.config.WEIGHT_DECAY * tf.add_n(terms)

    def _loss_scale(self):
        """The factor optimizer.scale_loss multiplies by (1 without mixed precision)."""
        return tf.cast(self.optimizer.scale_loss(tf.constant(1.0)), tf.float32)

    def _logs(self, losses, total):
        for i, name in enumerate(LOSS_NAMES):
            self.loss_trackers[name].update_state(losses[i])
        self.total_tracker.update_state(total)
        logs = {m.name: m.result() for m in self.metrics}
        if _is_multi_worker(tf.distribute.get_strategy()):
            # Keras averages the logs of MultiWorkerMirroredStrategy replicas with
            # strategy.reduce(..., axis=0), which needs a dimension: give the (equal) values one.
            logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    def train_step(self, data):
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            local, losses = self._global_losses(inputs, training=True)
            decay = self._weight_decay()
            # This replica's share of the global total: summed over replicas, the total.
            share = self._weighted(local) + decay / replicas
            scaled = self.optimizer.scale_loss(share)
        grads = tape.gradient(scaled, variables)
        present = [i for i, g in enumerate(grads) if g is not None]
        reduced = [grads[i] for i in present]
        if replicas > 1:
            reduced = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, reduced)
        clip = self.config.GRADIENT_CLIP_NORM
        if clip:
            norm = clip * self._loss_scale()
            reduced = [tf.clip_by_norm(g, norm) for g in reduced]
        if replicas > 1:
            # The optimizer sums the replicas' gradients again: hand it 1 / replicas each.
            reduced = [g / replicas for g in reduced]
        for i, g in zip(present, reduced):
            grads[i] = g
        self.optimizer.apply(grads, variables)
        return self._logs(losses, self._weighted(losses) + decay)

    def test_step(self, data):
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        _, losses = self._global_losses(inputs, training=False)
        return self._logs(losses, self._weighted(losses) + self._weight_decay())


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
        keras.mixed_precision.set_global_policy(config.precision_policy)
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
            # the batch's images (1 <= n <= int(T * ROI_POSITIVE_RATIO)), not on all T — when
            # its BatchNorm is frozen (TRAIN_BN False), so that each ROI's mask does not
            # depend on the other ROIs and the result is the same. With TRAIN_BN the batch
            # statistics come from the ROIs, so all T run, as in matterport.
            # [batch, n or T, 28, 28, NUM_CLASSES]
            mask_rois = KL.Lambda(lambda t: t[0][:, :mask_roi_count(t[1], config)],
                                  name="mask_rois")([rois, target_class_ids])
            mrcnn_mask = build_mask_head(config, mask_rois, mrcnn_feature_maps,
                                         input_image_meta, train_bn=config.TRAIN_BN)
            output_rois = KL.Identity(name="output_rois")(rois)

            # Losses as (sum, count) pairs over the batch: float32 [2] each (what train_step
            # uses: see MaskRCNNTrainingModel), then the losses sum / count: float32 scalars
            # (the values of matterport's *_loss_graph functions). float32 layers: under
            # mixed precision their inputs are not cast down to float16 (a sum of mask
            # cross-entropies passes float16's 65504 at a few hundred ROIs).
            def loss_terms(name, fn):
                return KL.Lambda(lambda t: tf.stack(fn(*t)), name=name + "_terms",
                                 dtype="float32")

            terms = [
                loss_terms("rpn_class_loss", rpn_class_loss_sum_count)(
                    [input_rpn_match, rpn_class_logits]),
                loss_terms("rpn_bbox_loss", lambda *t: rpn_bbox_loss_sum_count(config, *t))(
                    [input_rpn_bbox, input_rpn_match, rpn_bbox]),
                loss_terms("mrcnn_class_loss", mrcnn_class_loss_sum_count)(
                    [target_class_ids, mrcnn_class_logits, active_class_ids]),
                loss_terms("mrcnn_bbox_loss", mrcnn_bbox_loss_sum_count)(
                    [target_bbox, target_class_ids, mrcnn_bbox]),
                # The mask head ran on the first n ROIs only: targets cut to n.
                loss_terms("mrcnn_mask_loss", lambda masks, ids, pred: mrcnn_mask_loss_sum_count(
                    masks[:, :tf.shape(pred)[1]], ids[:, :tf.shape(pred)[1]], pred))(
                    [target_mask, target_class_ids, mrcnn_mask]),
            ]                                                               # 5 x [2]
            losses = [KL.Lambda(lambda t: masked_mean(tf.unstack(t)), name=name,
                                dtype="float32")(pair)
                      for name, pair in zip(LOSS_NAMES, terms)]             # 5 x []

            inputs = [input_image, input_image_meta, input_rpn_match, input_rpn_bbox,
                      input_gt_class_ids, input_gt_boxes, input_gt_masks]
            if not config.USE_RPN_ROIS:
                inputs.append(input_rois)
            outputs = [rpn_class_logits, rpn_class, rpn_bbox, mrcnn_class_logits, mrcnn_class,
                       mrcnn_bbox, mrcnn_mask, rpn_rois, output_rois] + terms + losses
            return MaskRCNNTrainingModel(inputs, outputs, config, name="mask_rcnn")

        # Inference: heads on the proposals, then detections and masks of the detections.
        mrcnn_class_logits, mrcnn_class, mrcnn_bbox = fpn_classifier_graph(
            rpn_rois, mrcnn_feature_maps, input_image_meta, config.POOL_SIZE, config.NUM_CLASSES,
            train_bn=config.TRAIN_BN, fc_layers_size=config.FPN_CLASSIF_FC_LAYERS_SIZE)
        # [batch, DETECTION_MAX_INSTANCES, (y1, x1, y2, x2, class_id, score)] normalized
        detections = DetectionLayer(config, name="mrcnn_detection")(
            [rpn_rois, mrcnn_class, mrcnn_bbox, input_image_meta])
        # The mask head runs on the real detections only: DetectionLayer puts them first and
        # zero-pads the rest, so it takes the first n rows, n the batch's largest detection
        # count (at least 1), and its output "mrcnn_mask" [batch, n, 28, 28, NUM_CLASSES] is
        # zero-padded back to DETECTION_MAX_INSTANCES rows. (Matterport runs it on all rows;
        # at inference each ROI's mask depends on that ROI alone, so the masks are the same.)
        detection_boxes = KL.Lambda(lambda t: t[:, :largest_positive_count(t[..., 4]), :4],
                                    name="detection_boxes")(detections)
        mrcnn_mask = build_mask_head(config, detection_boxes, mrcnn_feature_maps,
                                     input_image_meta, train_bn=config.TRAIN_BN)
        # [batch, DETECTION_MAX_INSTANCES, 28, 28, NUM_CLASSES]
        mrcnn_mask = KL.Lambda(
            lambda t: tf.pad(t, [[0, 0], [0, config.DETECTION_MAX_INSTANCES - tf.shape(t)[1]],
                                 [0, 0], [0, 0], [0, 0]]),
            output_shape=(config.DETECTION_MAX_INSTANCES,) + tuple(mrcnn_mask.shape[2:]),
            dtype="float32", name="detection_masks")(mrcnn_mask)
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

        full_masks = utils.unmold_masks(masks, boxes, original_image_shape)
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
        """SGD with momentum; the losses come from the graph. Gradients are clipped to
        config.GRADIENT_CLIP_NORM (per weight) by the training step, after the all-reduce of
        a distribution strategy (see MaskRCNNTrainingModel); under the mixed_float16 policy
        Keras wraps the optimizer in a LossScaleOptimizer. The optimizer's variables are made
        here, for the weights trainable now (call set_trainable first)."""
        with self.strategy.scope():
            optimizer = keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
            self.keras_model.compile(optimizer=optimizer)
            self.keras_model.select_decay_variables()
            self.keras_model.optimizer.build(self.keras_model.trainable_variables)

    def train(self, train_dataset, val_dataset, learning_rate, epochs, layers,
              augmentation=None, custom_callbacks=None, no_augmentation_sources=None, seed=0):
        """Train from self.epoch up to `epochs` (the epoch to reach, as matterport).

        layers: "heads", "3+", "4+", "5+", "all" or a regex of layer names to train.
        augmentation: an albumentations transform (see mrcnn.data.default_augmentation) or an
        imgaug augmenter. custom_callbacks: more Keras callbacks. no_augmentation_sources:
        accepted for matterport compatibility; must be empty. seed: the data order and the
        random parts of each sample (the same seed and epoch give the same batches).
        Writes TensorBoard logs and one checkpoint per epoch into self.log_dir (under a
        MultiWorkerMirroredStrategy, the chief only; every worker must hold the same weights
        when train() starts, or all raise ConfigError).
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
        # same order. Several workers (MultiWorkerMirroredStrategy) share one stream: worker
        # i of n takes its batches i, i + n, i + 2n, ... (the same seed everywhere), so a
        # pass over the data is split between them and no image is loaded twice.
        workers, worker_index, chief = worker_info(self.strategy)
        if workers > 1:
            self._check_workers_agree()
        if self.config.TRAIN_BN and self.strategy.num_replicas_in_sync > 1:
            logger.warning("TRAIN_BN=True with %d replicas: BatchNorm layers normalize with the "
                           "statistics of each replica's %d image(s), not of the global batch "
                           "(no synchronized BatchNorm)", self.strategy.num_replicas_in_sync,
                           self.config.IMAGES_PER_GPU)
        train_generator = DataGenerator(train_dataset, self.config, shuffle=True,
                                        augmentation=augmentation, seed=seed, stream=True,
                                        start=self.epoch * self.config.STEPS_PER_EPOCH * workers)
        val_generator = DataGenerator(val_dataset, self.config, shuffle=True, seed=seed,
                                      stream=True)
        feeds = []
        train_data, val_data = train_generator, val_generator
        if workers > 1:
            train_data = self._worker_input(train_generator, feeds)
            val_data = self._worker_input(val_generator, feeds)

        # Only the chief writes the run's log dir. The other workers save their checkpoints
        # too (all take part in every step), into a temporary dir removed at the end, and
        # write no TensorBoard logs.
        scratch = None
        checkpoint_path = self.checkpoint_path
        if chief:
            os.makedirs(self.log_dir, exist_ok=True)
        else:
            scratch = tempfile.mkdtemp(prefix="mrcnn-worker%d-" % worker_index)
            checkpoint_path = os.path.join(scratch, os.path.basename(self.checkpoint_path))
        guard = NaNGuard(self.config.STEPS_PER_EPOCH)
        callbacks = [guard, AtomicCheckpoint(checkpoint_path, guard=guard, attrs={
            "mrcnn_mask_head": self.config.MASK_HEAD,
            "mrcnn_backbone": str(self.config.BACKBONE),
            "mrcnn_num_classes": self.config.NUM_CLASSES})]
        if chief:
            callbacks.insert(0, keras.callbacks.TensorBoard(
                log_dir=self.log_dir, histogram_freq=0, write_graph=False))
        callbacks += list(custom_callbacks or [])

        log("\nStarting at epoch {}. LR={}\n".format(self.epoch, learning_rate))
        log("Checkpoint Path: {}".format(checkpoint_path))
        if self.strategy.num_replicas_in_sync > 1:
            log("Replicas: {} ({} worker(s)), global batch {}".format(
                self.strategy.num_replicas_in_sync, workers,
                self.config.IMAGES_PER_GPU * self.strategy.num_replicas_in_sync))
        self.set_trainable(layer_regex, verbose=1 if chief else 0)
        self.compile(learning_rate, self.config.LEARNING_MOMENTUM)

        steps = self.config.STEPS_PER_EPOCH
        try:
            history = self.keras_model.fit(
                train_data,
                initial_epoch=self.epoch,
                epochs=epochs,
                steps_per_epoch=steps,
                callbacks=callbacks,
                validation_data=val_data,
                validation_steps=self.config.VALIDATION_STEPS,
                shuffle=False,
                verbose=1 if chief else 2,
            )
        finally:
            for feed in feeds:
                feed.on_epoch_end()      # stops its loader processes
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        if guard.failure:
            self._raise_diverged(guard.failure)
        self.epoch = max(self.epoch, epochs)
        return history

    def _check_workers_agree(self):
        """Raise ConfigError on every worker unless all workers hold the same weights.

        MultiWorkerMirroredStrategy makes the chief's initial values everyone's, but weights
        loaded afterwards (load_weights) are each worker's own: workers that loaded different
        files would all-reduce their updates yet keep training different models.
        """
        crc = 0
        for w in self.keras_model.get_weights():
            crc = zlib.crc32(np.ascontiguousarray(w).tobytes(), crc)
        mine = tf.constant([crc], tf.int64)
        every = self.strategy.gather(self.strategy.run(lambda: tf.identity(mine)), axis=0)
        every = sorted(set(int(v) for v in np.asarray(every)))
        if len(every) > 1:
            raise ConfigError("the workers hold different weights (%d distinct versions): load "
                              "the same weights file on every worker" % len(every))

    def _worker_input(self, generator, feeds):
        """A DataGenerator stream as this worker's share of a multi-worker input.

        Keras' own distribution of a PyDataset treats each batch as the global batch and cuts
        it between the replicas of all workers (every worker loading all of it); here each
        worker loads only its own batches (input pipeline i of n takes batches i, i + n, ...)
        of IMAGES_PER_GPU x GPU_COUNT images, split between its local replicas, through Keras'
        loader (its worker processes included). The Keras adapters are appended to `feeds`:
        call their on_epoch_end() to stop their loaders.
        """
        from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
        per_replica = self.config.IMAGES_PER_GPU

        def dataset_fn(context):
            feed = PyDatasetAdapter(_ShardedStream(generator, context.input_pipeline_id,
                                                   context.num_input_pipelines))
            feeds.append(feed)
            dataset = feed.get_tf_dataset()
            if self.config.GPU_COUNT > 1:
                dataset = dataset.unbatch().batch(per_replica, drop_remainder=True)
            return dataset

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def _raise_diverged(self, failure):
        done = sorted(f for f in (os.listdir(self.log_dir) if os.path.isdir(self.log_dir) else [])
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
    """How many leading sampled ROIs the training mask head runs on: with TRAIN_BN, all of
    them (its BatchNorm statistics depend on the ROIs); otherwise the largest number of
    positive ROIs (class id > 0) of an image in the batch, at least 1 (the head never gets an
    empty batch) and at most positive_rois_per_image(config)."""
    if config.TRAIN_BN:
        return tf.shape(target_class_ids)[1]
    return largest_positive_count(target_class_ids, cap=positive_rois_per_image(config))


def largest_positive_count(class_ids, cap=None):
    """The largest number of rows with a class id > 0 of an image in class_ids [batch, rows]
    (the sampled ROIs in training, the detections at inference: both put those rows first),
    at least 1 (a mask head never gets an empty batch) and at most `cap` when given."""
    counts = tf.reduce_sum(tf.cast(class_ids > 0, tf.int32), axis=1)
    count = tf.maximum(tf.reduce_max(counts), 1)
    return count if cap is None else tf.minimum(count, cap)


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


class _ShardedStream(keras.utils.PyDataset):
    """Batches index, index + count, index + 2 count, ... of an endless PyDataset (a
    DataGenerator with stream=True), with the same loader settings."""

    def __init__(self, stream, index, count):
        super().__init__(workers=stream.workers, use_multiprocessing=stream.use_multiprocessing,
                         max_queue_size=stream.max_queue_size)
        self.stream, self.index, self.count = stream, int(index), int(count)

    @property
    def num_batches(self):
        return None

    def __getitem__(self, i):
        return self.stream[int(i) * self.count + self.index]

    def on_epoch_end(self):
        self.stream.on_epoch_end()


def cluster_from_tf_config(environ=None):
    """The cluster of the TF_CONFIG environment variable: (workers, task_type, task_index),
    workers counting the "chief" and "worker" tasks; (1, None, None) without TF_CONFIG."""
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "")
    if not text.strip():
        return 1, None, None
    try:
        tf_config = json.loads(text)
    except ValueError as e:
        raise ConfigError("TF_CONFIG is not valid JSON (%s): %r" % (e, text[:200])) from None
    cluster = tf_config.get("cluster", {})
    task = tf_config.get("task", {})
    workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    return workers, task.get("type"), task.get("index")


_MULTI_WORKER_STRATEGIES = {}


def _is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def worker_info(strategy):
    """(workers, worker index, is chief) of a strategy: (1, 0, True) but for a
    MultiWorkerMirroredStrategy. The chief is the "chief" task, or worker 0 when the cluster
    has none (TensorFlow's rule); it alone writes logs and checkpoints."""
    if not _is_multi_worker(strategy):
        return 1, 0, True
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    has_chief = bool(spec.get("chief"))
    workers = len(spec.get("chief", [])) + len(spec.get("worker", []))
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)
    index = 0 if task_type == "chief" else task_id + int(has_chief)
    return workers, index, chief


def make_strategy(config):
    """The tf.distribute strategy for this process.

    - TF_CONFIG naming more than one worker ("chief" and "worker" tasks): a
      MultiWorkerMirroredStrategy over all of them (one per process, made once and reused;
      TF_CONFIG must be set before). Each worker trains on all its visible GPUs, which must
      be GPU_COUNT of them (one CPU replica on a machine without a GPU: GPU_COUNT = 1).
    - Otherwise, GPU_COUNT > 1: a MirroredStrategy over that many GPUs (or logical devices);
      one: the default strategy.
    The global batch is IMAGES_PER_GPU x the number of replicas in sync.
    """
    workers, task_type, _ = cluster_from_tf_config()
    if workers > 1:
        if task_type not in ("chief", "worker"):
            raise ConfigError("TF_CONFIG: this task is a %r; MultiWorkerMirroredStrategy "
                              "trains on 'chief' and 'worker' tasks only" % (task_type,))
        key = os.environ["TF_CONFIG"]
        strategy = _MULTI_WORKER_STRATEGIES.get(key)
        if strategy is None:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
            _MULTI_WORKER_STRATEGIES[key] = strategy
        local = strategy.num_replicas_in_sync // workers
        if local != config.GPU_COUNT:
            raise ConfigError(
                "GPU_COUNT=%d but this worker trains on %d device(s) (MultiWorkerMirroredStrategy "
                "uses every visible GPU, or one CPU without a GPU): set GPU_COUNT=%d or "
                "CUDA_VISIBLE_DEVICES" % (config.GPU_COUNT, local, local))
        return strategy
    if config.GPU_COUNT <= 1:
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU")
    if len(devices) < config.GPU_COUNT:
        devices = tf.config.list_logical_devices("CPU")
    if len(devices) < config.GPU_COUNT:
        raise ConfigError("GPU_COUNT=%d but only %d devices are visible"
                          % (config.GPU_COUNT, len(devices)))
    return tf.distribute.MirroredStrategy([d.name for d in devices[:config.GPU_COUNT]])
