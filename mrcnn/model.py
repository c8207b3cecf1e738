"""Mask R-CNN: the MaskRCNN class, and matterport's public names re-exported.

Experiments written for matterport's Mask_RCNN import from here:

    from mrcnn.model import MaskRCNN, build_unet_mask_graph, build_fpn_mask_graph, resnet_graph
    from mrcnn.model import load_image_gt, mold_image, log

The pieces live one concern per module: backbone, heads, layers, losses, data (the input
pipeline), training (the training model, its train_step and callbacks), distribute
(strategies and sharded input), weights (weights files), checkpoints (run folders and
checkpoint names). This module wires them into the two models (training and inference) and
holds MaskRCNN: build, train, detect, load_weights, log directories.

Conventions: boxes are (y1, x1, y2, x2), in pixels outside the graph and normalized inside;
masks are bool [H, W, N].
"""

import collections
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from keras import layers as KL

from mrcnn import checkpoints, utils
from mrcnn.allocator import tune_malloc
from mrcnn.backbone import (BatchNorm, build_backbone, conv_block, fpn_graph,  # noqa: F401
                            identity_block, resnet_graph)
from mrcnn.checkpoints import CHECKPOINT_SUFFIX, find_last  # noqa: F401
from mrcnn.config import Config, ConfigError
from mrcnn.data import (build_detection_targets, build_rpn_targets,  # noqa: F401
                        compose_image_meta, compute_anchors, data_generator,
                        generate_random_rois, load_image_gt, mold_image, parse_image_meta,
                        unmold_image)
from mrcnn.distribute import (check_workers_agree, cluster_from_tf_config,  # noqa: F401
                              make_strategy, worker_info, worker_input)
from mrcnn.heads import (MASK_HEADS, build_fpn_mask_graph, build_mask_head,  # noqa: F401
                         build_rpn_model, build_unet_mask_graph, fpn_classifier_graph,
                         rpn_graph)
from mrcnn.initializers import initialize_weights
from mrcnn.layers import (AnchorsLayer, DetectionLayer, DetectionTargetLayer,  # noqa: F401
                          ProposalLayer, PyramidROIAlign, apply_box_deltas_graph,
                          clip_boxes_graph, denorm_boxes_graph, detection_targets_graph,
                          log2_graph, norm_boxes_graph, overlaps_graph,
                          parse_image_meta_graph, refine_detections_graph, trim_zeros_graph)
from mrcnn.losses import (batch_pack_graph, masked_mean, mrcnn_attribute_loss_sum_count,  # noqa: F401
                          mrcnn_bbox_loss_graph,
                          mrcnn_bbox_loss_sum_count, mrcnn_class_loss_graph,
                          mrcnn_class_loss_sum_count, mrcnn_mask_loss_graph,
                          mrcnn_mask_loss_sum_count, rpn_bbox_loss_graph,
                          rpn_bbox_loss_sum_count, rpn_class_loss_graph,
                          rpn_class_loss_sum_count, smooth_l1_loss)
from mrcnn.training import (LAYER_REGEX, LOSS_NAMES, LOSS_TERM_NAMES, loss_names,  # noqa: F401
                            AtomicCheckpoint, LearningRateSchedule, MaskRCNNTrainingModel,
                            MomentumSGD, NaNGuard, TrainingDivergedError, TrainingStateCheckpoint,
                            largest_positive_count, mask_roi_count, merge_histories,
                            positive_rois_per_image)
from mrcnn.utils import compute_backbone_shapes, log  # noqa: F401
from mrcnn.weights import (WeightsError, native_layer_keys, read_weights_file,  # noqa: F401
                           save_weights_atomic)
from mrcnn import weights as weights_files

logger = logging.getLogger(__name__)


class Trunk(NamedTuple):
    """What MaskRCNN.build_trunk returns: the graph both modes share."""
    rpn_feature_maps: list       # P2..P6 [batch, h/4 .. h/64, w/4 .. w/64, TOP_DOWN_PYRAMID_SIZE]
    mrcnn_feature_maps: list     # P2..P5, what the heads pool from
    rpn_class_logits: object     # [batch, anchors, 2]
    rpn_class: object            # [batch, anchors, 2]
    rpn_bbox: object             # [batch, anchors, 4] deltas
    rpn_rois: object             # [batch, proposals, 4] normalized, zero-padded


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
        if config.TUNE_MALLOC:
            tune_malloc()
        self.strategy = make_strategy(config)
        keras.mixed_precision.set_global_policy(config.precision_policy)
        self.set_log_dir()
        with self.strategy.scope():
            self.keras_model = self.build(mode=mode, config=config)
            initialize_weights(self.keras_model, config.WEIGHT_INIT)

    # ------------------------------------------------------------------ graph

    def build(self, mode, config):
        """Build the Mask R-CNN graph of `mode`; returns the Keras model.

        Three builders: the shared trunk (backbone, FPN, RPN, proposals), then the training
        outputs (targets, heads, losses) or the inference outputs (heads, detections, masks).
        """
        h, w = config.IMAGE_SHAPE[:2]
        if config.IMAGE_RESIZE_MODE != "none" and (h % 64 or w % 64):
            raise ConfigError("image size must be divisible by 64 six times; use sizes such as "
                              "256, 320, 384, 448, 512, 576, 640, 704, 768, 832, 1024 (got %s)"
                              % (config.IMAGE_SHAPE[:2],))

        # === Inputs ===
        input_image = KL.Input(shape=[None, None, config.IMAGE_CHANNEL_COUNT], name="input_image")
        input_image_meta = KL.Input(shape=[config.IMAGE_META_SIZE], name="input_image_meta")
        if mode == "training":
            # Anchors of the training image size: [batch, anchors, 4] normalized.
            anchors = AnchorsLayer(self.get_anchors(config.IMAGE_SHAPE), name="anchors")(input_image)
            trunk = self.build_trunk(config, input_image, anchors, config.POST_NMS_ROIS_TRAINING)
            return self.build_training_outputs(config, input_image, input_image_meta, trunk)
        input_anchors = KL.Input(shape=[None, 4], name="input_anchors")
        trunk = self.build_trunk(config, input_image, input_anchors, config.POST_NMS_ROIS_INFERENCE)
        return self.build_inference_outputs(config, input_image, input_image_meta, input_anchors,
                                            trunk)

    @staticmethod
    def build_trunk(config, input_image, anchors, proposal_count):
        """Backbone, FPN, RPN and proposals: the part both modes share.

        input_image [batch, h, w, channels]; anchors [batch, anchors, 4] normalized.
        Returns a Trunk: the feature maps of the RPN (P2..P6) and of the heads (P2..P5),
        the RPN's outputs and the proposals rpn_rois [batch, proposal_count, 4] normalized.
        """
        # === Backbone and FPN ===
        if config.PIXEL_STD is not None:
            # The mean-subtracted input divided by its standard deviation, per channel.
            input_image = KL.Rescaling(1.0 / np.asarray(config.PIXEL_STD, np.float32),
                                       name="input_scale")(input_image)
        # C2..C5 [batch, h/4 .. h/32, w/4 .. w/32, channels].
        _, C2, C3, C4, C5 = build_backbone(input_image, config, stage5=True)
        # P2..P6 [batch, h/4 .. h/64, w/4 .. w/64, TOP_DOWN_PYRAMID_SIZE].
        P2, P3, P4, P5, P6 = fpn_graph(C2, C3, C4, C5, config.TOP_DOWN_PYRAMID_SIZE)

        # === RPN, shared across the pyramid levels ===
        rpn = build_rpn_model(config.RPN_ANCHOR_STRIDE, len(config.RPN_ANCHOR_RATIOS),
                              config.TOP_DOWN_PYRAMID_SIZE)
        level_outputs = [rpn([p]) for p in (P2, P3, P4, P5, P6)]
        # [batch, anchors, 2], [batch, anchors, 2], [batch, anchors, 4], float32 (box math)
        rpn_class_logits, rpn_class, rpn_bbox = [
            KL.Concatenate(axis=1, name=name, dtype="float32")(
                [level[i] for level in level_outputs])
            for i, name in enumerate(["rpn_class_logits", "rpn_class", "rpn_bbox"])]

        # === Proposals ===
        # [batch, proposal_count, 4] normalized, zero-padded.
        rpn_rois = ProposalLayer(proposal_count=proposal_count,
                                 nms_threshold=config.RPN_NMS_THRESHOLD,
                                 config=config, name="ROI")([rpn_class, rpn_bbox, anchors])
        return Trunk([P2, P3, P4, P5, P6], [P2, P3, P4, P5], rpn_class_logits, rpn_class,
                     rpn_bbox, rpn_rois)

    @staticmethod
    def build_training_outputs(config, input_image, input_image_meta, trunk):
        """The training model on top of the trunk: ground-truth inputs, ROI sampling and
        targets, the heads on the sampled ROIs, and the five losses. Returns a
        MaskRCNNTrainingModel (its outputs end with the losses' (sum, count) pairs and the
        losses: see mrcnn.training)."""
        h, w = config.IMAGE_SHAPE[:2]
        # === Inputs: RPN targets and ground truth ===
        input_rpn_match = KL.Input(shape=[None, 1], name="input_rpn_match", dtype="int32")
        input_rpn_bbox = KL.Input(shape=[None, 4], name="input_rpn_bbox", dtype="float32")
        # Class ids, boxes in pixels, masks (mini masks or full size).
        input_gt_class_ids = KL.Input(shape=[None], name="input_gt_class_ids", dtype="int32")
        input_gt_boxes = KL.Input(shape=[None, 4], name="input_gt_boxes", dtype="float32")
        gt_boxes = KL.Lambda(lambda t: norm_boxes_graph(t[0], tf.shape(t[1])[1:3]),
                             name="norm_gt_boxes")([input_gt_boxes, input_image])
        mask_shape = (list(config.MINI_MASK_SHAPE) if config.USE_MINI_MASK
                      else [int(h), int(w)])
        input_gt_masks = KL.Input(shape=mask_shape + [None], name="input_gt_masks", dtype="bool")
        num_attributes = int(config.NUM_ATTRIBUTES)
        if num_attributes:
            # Multi-hot attributes of the instances: [batch, MAX_GT_INSTANCES, NUM_ATTRIBUTES]
            input_gt_attributes = KL.Input(shape=[None, num_attributes],
                                           name="input_gt_attributes", dtype="bool")
        active_class_ids = KL.Lambda(
            lambda t: parse_image_meta_graph(t)["active_class_ids"],
            name="active_class_ids")(input_image_meta)
        if config.USE_RPN_ROIS:
            target_rois = trunk.rpn_rois
        else:
            # ROIs given as an input, in pixels: [batch, POST_NMS_ROIS_TRAINING, 4].
            input_rois = KL.Input(shape=[config.POST_NMS_ROIS_TRAINING, 4],
                                  name="input_roi", dtype="int32")
            target_rois = KL.Lambda(
                lambda t: norm_boxes_graph(tf.cast(t[0], tf.float32), tf.shape(t[1])[1:3]),
                name="input_roi_norm")([input_rois, input_image])

        # === ROI sampling and targets ===
        # rois [batch, TRAIN_ROIS_PER_IMAGE, 4], class ids [batch, T], deltas [batch, T, 4],
        # masks [batch, T, 28, 28].
        # With attributes, also target_attributes [batch, T, NUM_ATTRIBUTES] (positives'
        # instances' multi-hot attributes, zeros elsewhere).
        target_inputs = [target_rois, input_gt_class_ids, gt_boxes, input_gt_masks]
        if num_attributes:
            target_inputs.append(input_gt_attributes)
        targets = DetectionTargetLayer(config, name="proposal_targets")(target_inputs)
        rois, target_class_ids, target_bbox, target_mask = targets[:4]

        # === Heads ===
        # [batch, T, NUM_CLASSES], [batch, T, NUM_CLASSES], [batch, T, NUM_CLASSES, 4]
        # (and mrcnn_attribute_logits [batch, T, NUM_ATTRIBUTES])
        head = fpn_classifier_graph(
            rois, trunk.mrcnn_feature_maps, input_image_meta, config.POOL_SIZE,
            config.NUM_CLASSES, train_bn=config.TRAIN_BN,
            fc_layers_size=config.FPN_CLASSIF_FC_LAYERS_SIZE, num_attributes=num_attributes)
        mrcnn_class_logits, mrcnn_class, mrcnn_bbox = head[:3]
        # The mask loss counts positive ROIs only, and DetectionTargetLayer puts them
        # first: the mask head runs on the first n rows, n the largest positive count of
        # the batch's images (1 <= n <= int(T * ROI_POSITIVE_RATIO)), not on all T — when
        # its BatchNorm is frozen (TRAIN_BN False), so that each ROI's mask does not
        # depend on the other ROIs and the result is the same. With TRAIN_BN the batch
        # statistics come from the ROIs, so all T run, as in matterport.
        # [batch, n or T, 28, 28, NUM_CLASSES]
        mask_rois = KL.Lambda(lambda t: t[0][:, :mask_roi_count(t[1], config)],
                              name="mask_rois")([rois, target_class_ids])
        mrcnn_mask = build_mask_head(config, mask_rois, trunk.mrcnn_feature_maps,
                                     input_image_meta, train_bn=config.TRAIN_BN)
        output_rois = KL.Identity(name="output_rois")(rois)

        # === Losses ===
        # (sum, count) pairs over the batch: float32 [2] each (what train_step uses: see
        # MaskRCNNTrainingModel), then the losses sum / count: float32 scalars (the values
        # of matterport's *_loss_graph functions). float32 layers: under mixed precision
        # their inputs are not cast down to float16 (a sum of mask cross-entropies passes
        # float16's 65504 at a few hundred ROIs).
        def loss_terms(name, fn):
            return KL.Lambda(lambda t: tf.stack(fn(*t)), name=name + "_terms", dtype="float32")

        terms = [
            loss_terms("rpn_class_loss", rpn_class_loss_sum_count)(
                [input_rpn_match, trunk.rpn_class_logits]),
            loss_terms("rpn_bbox_loss", lambda *t: rpn_bbox_loss_sum_count(config, *t))(
                [input_rpn_bbox, input_rpn_match, trunk.rpn_bbox]),
            loss_terms("mrcnn_class_loss", mrcnn_class_loss_sum_count)(
                [target_class_ids, mrcnn_class_logits, active_class_ids]),
            loss_terms("mrcnn_bbox_loss", mrcnn_bbox_loss_sum_count)(
                [target_bbox, target_class_ids, mrcnn_bbox]),
            # The mask head ran on the first n ROIs only: targets cut to n.
            loss_terms("mrcnn_mask_loss", lambda masks, ids, pred: mrcnn_mask_loss_sum_count(
                masks[:, :tf.shape(pred)[1]], ids[:, :tf.shape(pred)[1]], pred))(
                [target_mask, target_class_ids, mrcnn_mask]),
        ]                                                                   # 5 x [2]
        if num_attributes:
            # Sum over (positive ROI, attribute) pairs / their count.
            terms.append(loss_terms("mrcnn_attribute_loss", mrcnn_attribute_loss_sum_count)(
                [targets[4], target_class_ids, head[3]]))                   # 6 x [2]
        losses = [KL.Lambda(lambda t: masked_mean(tf.unstack(t)), name=name,
                            dtype="float32")(pair)
                  for name, pair in zip(loss_names(config), terms)]         # 5 (6) x []

        # === Model ===
        inputs = [input_image, input_image_meta, input_rpn_match, input_rpn_bbox,
                  input_gt_class_ids, input_gt_boxes, input_gt_masks]
        if num_attributes:
            inputs.append(input_gt_attributes)
        if not config.USE_RPN_ROIS:
            inputs.append(input_rois)
        outputs = [trunk.rpn_class_logits, trunk.rpn_class, trunk.rpn_bbox, mrcnn_class_logits,
                   mrcnn_class, mrcnn_bbox, mrcnn_mask, trunk.rpn_rois, output_rois]
        if num_attributes:
            outputs.append(head[3])
        return MaskRCNNTrainingModel(inputs, outputs + terms + losses, config, name="mask_rcnn")

    @staticmethod
    def build_inference_outputs(config, input_image, input_image_meta, input_anchors, trunk):
        """The inference model on top of the trunk: the heads on the proposals, detections,
        and the mask head on the detections. Outputs are matterport's: detections,
        mrcnn_class, mrcnn_bbox, mrcnn_mask, rpn_rois, rpn_class, rpn_bbox; with
        NUM_ATTRIBUTES > 0 an eighth, detection_attributes [batch, DETECTION_MAX_INSTANCES,
        NUM_ATTRIBUTES]: the sigmoid attribute probabilities of each detection's ROI."""
        num_attributes = int(config.NUM_ATTRIBUTES)
        # === Heads on the proposals ===
        head = fpn_classifier_graph(
            trunk.rpn_rois, trunk.mrcnn_feature_maps, input_image_meta, config.POOL_SIZE,
            config.NUM_CLASSES, train_bn=config.TRAIN_BN,
            fc_layers_size=config.FPN_CLASSIF_FC_LAYERS_SIZE, num_attributes=num_attributes)
        mrcnn_class_logits, mrcnn_class, mrcnn_bbox = head[:3]

        # === Detections ===
        # [batch, DETECTION_MAX_INSTANCES, (y1, x1, y2, x2, class_id, score)] normalized
        detection_inputs = [trunk.rpn_rois, mrcnn_class, mrcnn_bbox, input_image_meta]
        if num_attributes:
            # [batch, proposals, NUM_ATTRIBUTES] probabilities, carried to the detections.
            detection_inputs.append(KL.Activation("sigmoid", dtype="float32",
                                                  name="mrcnn_attribute")(head[3]))
            detections, detection_attributes = DetectionLayer(
                config, name="mrcnn_detection")(detection_inputs)
            detection_attributes = KL.Identity(name="detection_attributes")(
                detection_attributes)
        else:
            detections = DetectionLayer(config, name="mrcnn_detection")(detection_inputs)

        # === Masks of the detections ===
        # The mask head runs on the real detections only: DetectionLayer puts them first and
        # zero-pads the rest, so it takes the first n rows, n the batch's largest detection
        # count (at least 1), and its output "mrcnn_mask" [batch, n, 28, 28, NUM_CLASSES] is
        # zero-padded back to DETECTION_MAX_INSTANCES rows. (Matterport runs it on all rows;
        # at inference each ROI's mask depends on that ROI alone, so the masks are the same.)
        detection_boxes = KL.Lambda(lambda t: t[:, :largest_positive_count(t[..., 4]), :4],
                                    name="detection_boxes")(detections)
        mrcnn_mask = build_mask_head(config, detection_boxes, trunk.mrcnn_feature_maps,
                                     input_image_meta, train_bn=config.TRAIN_BN)
        # [batch, DETECTION_MAX_INSTANCES, 28, 28, NUM_CLASSES]
        mrcnn_mask = KL.Lambda(
            lambda t: tf.pad(t, [[0, 0], [0, config.DETECTION_MAX_INSTANCES - tf.shape(t)[1]],
                                 [0, 0], [0, 0], [0, 0]]),
            output_shape=(config.DETECTION_MAX_INSTANCES,) + tuple(mrcnn_mask.shape[2:]),
            dtype="float32", name="detection_masks")(mrcnn_mask)

        # === Model ===
        outputs = [detections, mrcnn_class, mrcnn_bbox, mrcnn_mask, trunk.rpn_rois,
                   trunk.rpn_class, trunk.rpn_bbox]
        if num_attributes:
            outputs.append(detection_attributes)
        return keras.Model([input_image, input_image_meta, input_anchors], outputs,
                           name="mask_rcnn")

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
                          window, attribute_scores=None):
        """Turn one image's padded network output into image-space detections.

        detections: [N, (y1, x1, y2, x2, class_id, score)] normalized, zero-padded.
        mrcnn_mask: [N, 28, 28, NUM_CLASSES]. original_image_shape: [H, W, C] before resizing;
        image_shape: the molded shape; window: [y1, x1, y2, x2] pixels of the image in it.
        attribute_scores: optional [N, NUM_ATTRIBUTES] probabilities of the detections.
        Returns boxes [n, 4] int32 pixels of the original image, class_ids [n], scores [n],
        masks [H, W, n] bool; with attribute_scores, a fifth value: the kept detections'
        attribute_scores [n, NUM_ATTRIBUTES] float32.
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

        full_masks = utils.unmold_masks(masks, boxes, original_image_shape,
                                        threshold=self.config.DETECTION_MASK_THRESHOLD)
        result = (boxes.astype(np.int32), class_ids, scores.astype(np.float32), full_masks)
        if attribute_scores is None:
            return result
        attribute_scores = np.asarray(attribute_scores, dtype=np.float32)[:n][keep]
        return result + (attribute_scores,)

    def _result(self, unmolded):
        """detect()'s dict of one image from unmold_detections' values."""
        rois, class_ids, scores, masks = unmolded[:4]
        result = {"rois": rois, "class_ids": class_ids, "scores": scores, "masks": masks}
        if len(unmolded) > 4:
            attribute_scores = unmolded[4]
            result["attribute_scores"] = attribute_scores
            result["attributes"] = [
                np.flatnonzero(row >= self.config.DETECTION_ATTRIBUTE_THRESHOLD).astype(np.int32)
                for row in attribute_scores]
        return result

    # ------------------------------------------------------------------ inference

    def detect(self, images, verbose=0, tta=None):
        """Detect instances in a list of images (exactly BATCH_SIZE of them, as matterport).

        Returns one dict per image: rois [N, (y1, x1, y2, x2)] pixels, class_ids [N],
        scores [N], masks [H, W, N] bool; with NUM_ATTRIBUTES > 0 also attribute_scores
        [N, NUM_ATTRIBUTES] float32 (sigmoid probabilities of each detection's ROI) and
        attributes (a list of N int32 arrays: the attribute ids scoring >=
        DETECTION_ATTRIBUTE_THRESHOLD). tta: test-time augmentation, a mrcnn.tta.TTA or a
        specification such as "flip,scales=0.8,1.0,1.2" (mrcnn.tta.detect); None: matterport's.
        """
        self._check_inference("detect")
        if len(images) != self.config.BATCH_SIZE:
            raise ValueError("detect() takes exactly BATCH_SIZE=%d images (got %d); set "
                             "IMAGES_PER_GPU or pass that many" % (self.config.BATCH_SIZE, len(images)))
        if tta is not None:
            from mrcnn import tta as tta_module
            return tta_module.detect(self, images, tta, verbose=verbose)
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
        outputs = self._predict([molded_images, image_metas, anchors])
        detections, mrcnn_mask = outputs[0], outputs[3]
        attributes = outputs[7] if len(outputs) > 7 else None
        results = []
        for i, image in enumerate(images):
            results.append(self._result(self.unmold_detections(
                detections[i], mrcnn_mask[i], image.shape, molded_images[i].shape, windows[i],
                attribute_scores=None if attributes is None else attributes[i])))
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
        outputs = self._predict([molded_images, image_metas, anchors])
        detections, mrcnn_mask = outputs[0], outputs[3]
        attributes = outputs[7] if len(outputs) > 7 else None
        results = []
        for i in range(len(molded_images)):
            meta = parse_image_meta(image_metas[i:i + 1])
            original_shape = meta["original_image_shape"][0]
            window = meta["window"][0]
            results.append(self._result(self.unmold_detections(
                detections[i], mrcnn_mask[i], original_shape, shape, window,
                attribute_scores=None if attributes is None else attributes[i])))
        return results

    def _predict(self, inputs):
        outputs = self.keras_model.predict_on_batch(inputs)
        return [np.asarray(o) for o in outputs]

    def _check_inference(self, what):
        if self.mode != "inference":
            raise RuntimeError("%s() needs a model built in inference mode "
                               "(MaskRCNN(mode='inference', ...))" % what)

    # ------------------------------------------------------------------ inspection

    # matterport's TF1 op names of the ProposalLayer's steps (inspect_model notebooks):
    # "ROI/pre_nms_anchors:0", "ROI/refined_anchors:0", "ROI/refined_anchors_clipped:0",
    # "ROI/rpn_non_max_suppression:0" (and ".../NonMaxSuppressionV2:0"-style variants).
    _ROI_STEP = re.compile(r"ROI/(%s)(/[\w/]*)?(:0)?" % "|".join(ProposalLayer.INTERMEDIATES))

    def ancestor(self, tensor, name, checked=None):
        """The output of the layer named `name` (a regex, fully matched) that `tensor` depends
        on, searched backwards through the Keras graph; None when that layer is not upstream.

        matterport searched TF1 op names; here names are layer names, e.g.
        model.ancestor(model.keras_model.get_layer("mrcnn_detection").output, "ROI"), and
        matterport's names of the proposal steps ("ROI/pre_nms_anchors:0",
        "ROI/refined_anchors:0", "ROI/refined_anchors_clipped:0",
        "ROI/rpn_non_max_suppression:0") resolve to the ProposalLayer's intermediate
        outputs (see ProposalLayer: return_intermediates), which run_graph can fetch.
        A name that matches no layer of the model and no such step raises ValueError listing
        the names that can.
        """
        step = self._ROI_STEP.fullmatch(name)
        if step:
            return self._proposal_steps()[step.group(1)]
        if not any(re.fullmatch(name, layer.name) for layer in self.keras_model.layers):
            raise ValueError(
                "ancestor(): %r names no layer of this model (names are Keras layer names, "
                "e.g. 'ROI', 'mrcnn_detection', 'rpn_class', 'res4a_out', or a regex of them) "
                "nor a proposal step (%s)" % (name, ", ".join(
                    "ROI/%s:0" % n for n in ProposalLayer.INTERMEDIATES)))
        return self._find_upstream(tensor, name, set() if checked is None else checked)

    @staticmethod
    def _find_upstream(tensor, name, checked):
        # Private Keras API: KerasTensor._keras_history and Operation._inbound_nodes (Keras 3
        # has no public walk of a functional graph; tests/test_layout.py guards both).
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
            found = MaskRCNN._find_upstream(parent, name, checked)
            if found is not None:
                return found
        return None

    def _proposal_steps(self):
        """{step name: KerasTensor} of the ProposalLayer's intermediate outputs, made once by
        a copy of the "ROI" layer (it has no weights) with return_intermediates, applied to
        the same inputs in the same graph."""
        if getattr(self, "_proposal_step_tensors", None) is None:
            roi = self.keras_model.get_layer("ROI")
            inputs = roi._inbound_nodes[0].input_tensors      # private: see _find_upstream
            settings = dict(roi.get_config(), return_intermediates=True, name="ROI_steps")
            outputs = ProposalLayer.from_config(settings)(list(inputs))
            self._proposal_step_tensors = dict(zip(ProposalLayer.INTERMEDIATES, outputs[1:]))
        return self._proposal_step_tensors

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
        """Run the model on images and return named intermediate tensors (matterport's
        contract).

        images: a list (or batch) of images. Without image_metas they are molded here
        (mold_inputs); with image_metas [batch, IMAGE_META_SIZE] they must be molded
        already (load_image_gt's image after mold_image), as in matterport.
        outputs: list of (name, tensor_or_layer_name) pairs, e.g.
            [("proposals", "ROI"), ("detections", model.keras_model.get_layer(
             "mrcnn_detection").output), ("refined", model.ancestor(pillar,
             "ROI/refined_anchors:0"))]; a layer name fetches that layer's output.
        The sub-model of a list of outputs is built once and reused.
        Returns an ordered dict name -> numpy array.
        """
        if self.mode == "training":
            raise RuntimeError("run_graph() runs the inference model; build it with "
                               "mode='inference'")
        tensors = []
        for name, what in outputs:
            if isinstance(what, str):
                what = self.keras_model.get_layer(what).output
                if isinstance(what, (list, tuple)):
                    # A layer of several outputs (mrcnn_detection with the attribute head:
                    # detections, their attribute scores) gives its first, matterport's.
                    what = what[0]
            if what is None:
                raise ValueError("run_graph(): output %r is None (an ancestor() that found "
                                 "nothing upstream?)" % (name,))
            tensors.append(what)
        key = tuple(id(t) for t in tensors)
        cache = self.__dict__.setdefault("_run_graph_models", {})
        if key not in cache:
            cache[key] = (keras.Model(self.keras_model.inputs, tensors), tensors)
        sub_model = cache[key][0]

        if image_metas is None:
            molded_images, metas, _ = self.mold_inputs(images)
        else:
            molded_images = np.asarray(images, dtype=np.float32)
            metas = np.asarray(image_metas, dtype=np.float32)
        anchors = self._batch_anchors(molded_images[0].shape, len(molded_images))
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
        absent from the file keep their values, and a warning lists them (no silent partial
        load). Without it every layer that has weights must be in the file. exclude: layer
        names to skip (implies by_name), e.g. the class-specific layers
        ["mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_bbox", "mrcnn_mask"] when NUM_CLASSES
        differs. A layer whose shapes differ raises WeightsError naming the layer and
        suggesting `exclude`. A checkpoint that records another mask head, backbone or class
        count than this model's is reported first. Reads arrays only (no code from the file
        is run). Updates the log dir so that training continues the checkpoint's epoch count.
        Returns the number of layers loaded.
        """
        n = weights_files.load_weights(self.keras_model, filepath, by_name=by_name,
                                       exclude=exclude, expected=self.architecture())
        self.set_log_dir(filepath)
        return n

    def architecture(self):
        """What a checkpoint records of the model it belongs to (checkpoints.CHECKPOINT_ATTRS)."""
        return {"mask_head": self.config.MASK_HEAD, "backbone": str(self.config.BACKBONE),
                "num_classes": self.config.NUM_CLASSES}

    def save_weights(self, filepath):
        """Save all weights to a Keras 3 `.weights.h5` file (atomically)."""
        save_weights_atomic(self.keras_model, filepath)

    def get_imagenet_weights(self):
        """The path of ImageNet weights for this model's backbone (config.BACKBONE:
        resnet50 or resnet101), for `load_weights(path, by_name=True)` as in matterport.
        Keras Applications' ResNet weights (downloaded once by Keras) are mapped onto the
        backbone's layer names and cached (mrcnn.pretrained.imagenet_weights_file); offline
        without them, WeightsUnavailable says which file goes where."""
        from mrcnn import pretrained
        return pretrained.imagenet_weights_file(self.config.BACKBONE)

    # ------------------------------------------------------------------ logs and checkpoints

    def set_log_dir(self, model_path=None):
        """Set the run's log dir and epoch counter.

        Without model_path a new dir model_dir/<name><YYYYmmddTHHMM> starts at epoch 0. With
        the path of a checkpoint inside a run dir (ours, .weights.h5, or matterport's, .h5:
        .../<name><date>/mask_rcnn_<name>_<epoch>...) training continues in that dir from
        that epoch; with a training state (.../training_state_<step>.h5) train() resumes that
        run from its newest training state.
        """
        self.epoch = 0
        # What train() may resume from (see _resume_point): a given training state, the
        # run's newest state when model_path is the run's newest checkpoint, else nothing.
        self._resume_from = None
        started = None
        parsed = checkpoints.parse_checkpoint_path(model_path) if model_path else None
        step = checkpoints.state_step(model_path) if model_path else None
        if parsed:
            # The file of epoch N holds the state after N epochs: continue with N + 1.
            started, self.epoch = parsed
            run = checkpoints.list_checkpoints(os.path.dirname(os.path.abspath(model_path)))
            if run and os.path.samefile(run[-1], model_path):
                self._resume_from = "newest"
        elif step is not None:
            self.log_dir = os.path.dirname(os.path.abspath(model_path))
            self.epoch = step // self.config.STEPS_PER_EPOCH
            self.checkpoint_path = checkpoints.checkpoint_template(self.log_dir,
                                                                   self.config.NAME)
            self._resume_from = os.path.abspath(model_path)
            return
        self.log_dir = checkpoints.run_dir(self.model_dir, self.config.NAME, started)
        self.checkpoint_path = checkpoints.checkpoint_template(self.log_dir, self.config.NAME)

    def find_last(self):
        """Path of the last checkpoint of the newest run of this config's NAME (see
        mrcnn.checkpoints.find_last)."""
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

    def compile(self, learning_rate, momentum, start_step=None):
        """SGD with momentum; the losses come from the graph. The rate follows the config's
        LR_* schedule (training.LearningRateSchedule) when one is set. Gradients are clipped to
        config.GRADIENT_CLIP_NORM (per weight) by the training step, after the all-reduce of
        a distribution strategy (see MaskRCNNTrainingModel); under the mixed_float16 policy
        Keras wraps the optimizer in a LossScaleOptimizer. The optimizer's variables are made
        here, for the weights trainable now (call set_trainable first). start_step: the global
        step training starts from (default: the start of self.epoch)."""
        config = self.config
        if start_step is None:
            start_step = self.epoch * config.STEPS_PER_EPOCH
        if config.LR_WARMUP_STEPS or config.LR_DECAY != "none":
            # A function of the global step: continues across staged calls and resumes.
            learning_rate = LearningRateSchedule.from_training_config(
                config, learning_rate, start_step=start_step)
        with self.strategy.scope():
            optimizer = MomentumSGD(learning_rate=learning_rate, momentum=momentum)
            self.keras_model.compile(optimizer=optimizer)
            self.keras_model.select_decay_variables()
            self.keras_model.optimizer.build(self.keras_model.trainable_variables)

    def train(self, train_dataset, val_dataset, learning_rate, epochs, layers,
              augmentation=None, custom_callbacks=None, no_augmentation_sources=None, seed=0):
        """Train from self.epoch up to `epochs` (the epoch to reach, as matterport).

        layers: "heads", "3+", "4+", "5+", "all" or a regex of layer names to train.
        augmentation: an albumentations transform (see mrcnn.data.default_augmentation) or an
        imgaug augmenter. custom_callbacks: more Keras callbacks. no_augmentation_sources:
        dataset sources whose images are not augmented. seed: the data order and the
        random parts of each sample (the same seed and epoch give the same batches).
        Writes TensorBoard logs and one checkpoint per epoch into self.log_dir (under a
        MultiWorkerMirroredStrategy, the chief only; every worker must hold the same weights
        when train() starts, or all raise ConfigError).
        """
        from mrcnn.data import DataGenerator
        from mrcnn.training import evaluation_callbacks
        if self.mode != "training":
            raise RuntimeError("train() needs a model built in training mode")
        layer_regex = LAYER_REGEX.get(layers, layers)

        # Endless streams of exact passes over the data (see DataGenerator): an epoch is
        # STEPS_PER_EPOCH steps whatever the dataset size, and a resumed run continues the
        # same order. Several workers (MultiWorkerMirroredStrategy) share one stream: worker
        # i of n takes its batches i, i + n, i + 2n, ... (the same seed everywhere), so a
        # pass over the data is split between them and no image is loaded twice.
        workers, worker_index, chief = worker_info(self.strategy)
        if workers > 1:
            check_workers_agree(self.strategy, self.keras_model)
        if self.config.TRAIN_BN and self.strategy.num_replicas_in_sync > 1:
            logger.warning("TRAIN_BN=True with %d replicas: BatchNorm layers normalize with the "
                           "statistics of each replica's %d image(s), not of the global batch "
                           "(no synchronized BatchNorm)", self.strategy.num_replicas_in_sync,
                           self.config.IMAGES_PER_GPU)
        steps = self.config.STEPS_PER_EPOCH
        # A training state of this run (written every CHECKPOINT_EVERY_STEPS steps and at
        # each epoch end) newer than the loaded weights: resume it exactly (weights, momentum,
        # step, data position), possibly inside an epoch.
        resume_path, resume = self._resume_point(layer_regex, epochs, workers)
        start_step = resume["global_step"] if resume else self.epoch * steps

        def train_stream(first_step):
            generator = DataGenerator(train_dataset, self.config, shuffle=True,
                                      augmentation=augmentation, seed=seed, stream=True,
                                      no_augmentation_sources=no_augmentation_sources,
                                      start=first_step * workers)
            if workers > 1:
                return worker_input(self.strategy, generator, self.config, feeds)
            return generator

        feeds = []
        val_data = DataGenerator(val_dataset, self.config, shuffle=True, seed=seed, stream=True)
        if workers > 1:
            val_data = worker_input(self.strategy, val_data, self.config, feeds)

        # Only the chief writes the run's log dir. The other workers save their checkpoints
        # too (all take part in every step), into a temporary dir removed at the end, and
        # write no TensorBoard logs and no training states.
        scratch = None
        checkpoint_path = self.checkpoint_path
        if chief:
            os.makedirs(self.log_dir, exist_ok=True)
        else:
            scratch = tempfile.mkdtemp(prefix="mrcnn-worker%d-" % worker_index)
            checkpoint_path = os.path.join(scratch, os.path.basename(self.checkpoint_path))
        guard = NaNGuard(steps)
        states = TrainingStateCheckpoint(
            self.log_dir if chief else None, steps, self.config.CHECKPOINT_EVERY_STEPS,
            self.config.CHECKPOINT_KEEP_STATES, start_step, guard=guard, position={
                "seed": int(seed), "stage": {"layers": layer_regex, "epochs": int(epochs),
                                             "learning_rate": float(learning_rate)}})
        callbacks = [guard, AtomicCheckpoint(checkpoint_path, guard=guard,
                                             architecture=self.architecture()), states]
        if chief:
            # Losses and the learning rate every 100 steps (or every epoch, if shorter) too.
            callbacks.insert(0, keras.callbacks.TensorBoard(
                log_dir=self.log_dir, histogram_freq=0, write_graph=False,
                update_freq=min(100, steps)))
        # config.EVAL_EVERY_EPOCHS: evaluation on the validation subset (mrcnn.training).
        callbacks += evaluation_callbacks(self, val_dataset, custom_callbacks)
        callbacks += list(custom_callbacks or [])

        log("\nStarting at epoch {}. LR={}\n".format(self.epoch, learning_rate))
        log("Checkpoint Path: {}".format(checkpoint_path))
        if self.strategy.num_replicas_in_sync > 1:
            log("Replicas: {} ({} worker(s)), global batch {}".format(
                self.strategy.num_replicas_in_sync, workers,
                self.config.IMAGES_PER_GPU * self.strategy.num_replicas_in_sync))
        self.set_trainable(layer_regex, verbose=1 if chief else 0)
        self.compile(learning_rate, self.config.LEARNING_MOMENTUM, start_step=start_step)
        if resume:
            self._restore_training_state(resume_path)
            log("Resuming from {} (epoch {}, step {} of {})".format(
                resume_path, resume["epoch"] + 1, resume["step_in_epoch"], steps))

        # A resumed run may start inside an epoch: that epoch's remaining steps are one fit,
        # the following epochs another (Keras counts whole epochs).
        first_epoch, done = divmod(start_step, steps)
        segments = []
        if done:
            segments.append((first_epoch, first_epoch + 1, steps - done, start_step))
            first_epoch += 1
        if first_epoch < epochs:
            segments.append((first_epoch, epochs, steps, first_epoch * steps))
        history = None
        try:
            for initial_epoch, last_epoch, epoch_steps, first_step in segments:
                guard.first_epoch, guard.offset = initial_epoch, steps - epoch_steps
                part = self.keras_model.fit(
                    train_stream(first_step),
                    initial_epoch=initial_epoch,
                    epochs=last_epoch,
                    steps_per_epoch=epoch_steps,
                    callbacks=callbacks,
                    validation_data=val_data,
                    validation_steps=self.config.VALIDATION_STEPS,
                    shuffle=False,
                    # A progress bar on a terminal; one line per epoch in a log file (Keras'
                    # bar would write carriage returns and escapes into it).
                    verbose=1 if chief and sys.stdout.isatty() else 2,
                )
                history = merge_histories(history, part)
                if guard.failure:
                    break
        finally:
            for feed in feeds:
                feed.on_epoch_end()      # stops its loader processes
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        if guard.failure:
            self._raise_diverged(guard.failure)
        self.epoch = max(self.epoch, epochs)
        self._resume_from = None
        self.training_state_writes = list(states.written)
        return history

    def _resume_point(self, layer_regex, epochs, workers):
        """(path, position) of the training state train() resumes from, or (None, None).

        After set_log_dir(state) (load_weights of a training state's run, or a path given by
        hand): that state. After set_log_dir(checkpoint) with the run's newest epoch
        checkpoint (`--weights last`): the run's newest readable state that is of the same
        stage (layers and target epoch), before `epochs`, and not older than the epoch before
        the checkpoint —
        also when it is older than the checkpoint (killed while writing the epoch's state:
        the steps after it are retrained, exactly). An older checkpoint, a best checkpoint or
        consecutive train() calls of one process never resume from a state (each starts a
        fresh optimizer, as in matterport). An unreadable state is passed over, with a warning.
        """
        from mrcnn import training_state
        if self._resume_from is None:
            return None, None
        steps = self.config.STEPS_PER_EPOCH
        if self._resume_from == "newest":
            candidates = list(reversed(checkpoints.list_states(self.log_dir)))
            oldest = (self.epoch - 1) * steps
        else:
            candidates, oldest = [self._resume_from], 0
        for path in candidates:
            position = training_state.read_position(path)
            if position is None:
                logger.warning("training state %s is not readable (cut short?); trying the one "
                               "before it", path)
                continue
            step = int(position.get("global_step", -1))
            stage = position.get("stage", {})
            if step < oldest:
                break
            if (step >= epochs * steps or position.get("steps_per_epoch") != steps
                    or stage.get("layers") != layer_regex or stage.get("epochs") != epochs):
                logger.info("training state %s is of another stage; not resumed", path)
                continue
            if workers > 1:
                logger.warning("training state %s: resuming from a training state is not "
                               "supported with several workers; continuing from the weights",
                               path)
                return None, None
            return path, position
        return None, None

    def _restore_training_state(self, path):
        """Load a training state's model and optimizer variables (after compile()) but the
        learning rate, which is this train() call's; the optimizer's own step count restarts
        at 0 (the schedule adds the state's global step: compile(start_step=...))."""
        from mrcnn import training_state
        km = self.keras_model
        model_arrays = training_state.read_model_arrays(path, km)
        optimizer_arrays = training_state.read_optimizer_arrays(path, km.optimizer)
        training_state.assign(km.weights, model_arrays)
        # The learning rate is this call's (a resume may lower it after a divergence).
        restored = [(v, a) for v, a in zip(km.optimizer.variables, optimizer_arrays)
                    if not v.path.endswith("learning_rate")]
        training_state.assign([v for v, _ in restored], [a for _, a in restored])
        km.optimizer.iterations.assign(0)

    def _raise_diverged(self, failure):
        done = checkpoints.list_checkpoints(self.log_dir)
        last = done[-1] if done else None
        states = checkpoints.list_states(self.log_dir)
        state = ("; the last good training state is %s (step %d, written before the "
                 "divergence: resuming continues from it)"
                 % (states[-1], checkpoints.state_step(states[-1])) if states else "")
        raise TrainingDivergedError(
            "training stopped: %s became NaN or infinite at epoch %d, step %d (step %d of the "
            "run). The last good checkpoint is %s%s. Resume with a lower learning rate (or "
            "check the data of that step)."
            % (", ".join(failure["losses"]), failure["epoch"], failure["step"],
               failure["global_step"], last or "none (no epoch finished)", state))




