"""Graph ops and custom Keras layers of Mask R-CNN (TensorFlow ops inside Keras 3 layers).

    graph helpers      log2_graph, apply_box_deltas_graph, clip_boxes_graph, overlaps_graph,
                       box_refinement_graph, trim_zeros_graph, norm_boxes_graph,
                       denorm_boxes_graph, parse_image_meta_graph
    AnchorsLayer       the constant anchors, tiled to the batch
    ProposalLayer      RPN scores + deltas -> NMS'd proposals
    PyramidROIAlign    RoIAlign on the FPN level chosen by each box's size
    DetectionTargetLayer  training: sample ROIs, make class / box / mask targets
    DetectionLayer     inference: refine, filter and per-class NMS the final detections

Conventions: boxes are (y1, x1, y2, x2), normalized to [0, 1] (utils.norm_boxes:
(pixels - [0, 0, 1, 1]) / [h - 1, w - 1, h - 1, w - 1]); deltas are (dy, dx, log(dh), log(dw)).

Every layer runs its box math in float32 whatever the dtype policy (inputs are cast at the top
of `call`; Keras' input autocasting is switched off for these layers). PyramidROIAlign returns
the dtype of the feature maps (float16 under mixed precision); every other layer returns
float32 (int32 for class ids). All layers accept a dynamic batch size and return fixed padded
shapes ([batch, proposal_count, 4], [batch, TRAIN_ROIS_PER_IMAGE, ...],
[batch, DETECTION_MAX_INSTANCES, 6]), padding with zeros. Proposals, training targets and
detections are constants for what follows (tf.stop_gradient). The layers with NMS or tf.where
set `supports_jit = False` (Keras' jit_compile="auto" then leaves XLA off).
"""

import base64

import keras
import numpy as np
import tensorflow as tf
from keras import layers as KL

from mrcnn.config import Config
from mrcnn.image_meta import parse_image_meta_graph  # noqa: F401


############################################################
#  Graph helpers
############################################################

def log2_graph(x):
    """Base-2 logarithm (TF has no log2 op)."""
    return tf.math.log(x) / tf.math.log(2.0)


def apply_box_deltas_graph(boxes, deltas):
    """Apply deltas to boxes.

    boxes: [..., 4] (y1, x1, y2, x2)
    deltas: [..., 4] (dy, dx, log(dh), log(dw)), broadcastable to boxes
    Returns [..., 4] refined boxes.
    """
    height = boxes[..., 2] - boxes[..., 0]                            # [...]
    width = boxes[..., 3] - boxes[..., 1]                             # [...]
    center_y = boxes[..., 0] + 0.5 * height
    center_x = boxes[..., 1] + 0.5 * width
    center_y = center_y + deltas[..., 0] * height
    center_x = center_x + deltas[..., 1] * width
    height = height * tf.exp(deltas[..., 2])
    width = width * tf.exp(deltas[..., 3])
    y1 = center_y - 0.5 * height
    x1 = center_x - 0.5 * width
    return tf.stack([y1, x1, y1 + height, x1 + width], axis=-1,
                    name="apply_box_deltas_out")                       # [..., 4]


def clip_boxes_graph(boxes, window):
    """Clip boxes to a window.

    boxes: [..., 4] (y1, x1, y2, x2)
    window: [4] (wy1, wx1, wy2, wx2), or any shape [..., 4] that broadcasts against boxes
        (e.g. [batch, 1, 4] for boxes [batch, N, 4])
    Returns [..., 4] clipped boxes.
    """
    wy1, wx1, wy2, wx2 = tf.unstack(tf.cast(window, boxes.dtype), 4, axis=-1)
    y1 = tf.maximum(tf.minimum(boxes[..., 0], wy2), wy1)
    x1 = tf.maximum(tf.minimum(boxes[..., 1], wx2), wx1)
    y2 = tf.maximum(tf.minimum(boxes[..., 2], wy2), wy1)
    x2 = tf.maximum(tf.minimum(boxes[..., 3], wx2), wx1)
    return tf.stack([y1, x1, y2, x2], axis=-1, name="clipped_boxes")   # [..., 4]


def overlaps_graph(boxes1, boxes2):
    """IoU overlaps between two sets of boxes.

    boxes1: [N1, 4], boxes2: [N2, 4] (y1, x1, y2, x2)
    Returns [N1, N2]. A pair whose union is empty (two zero-area boxes) has IoU 0.
    """
    b1 = boxes1[:, None, :]                                           # [N1, 1, 4]
    b2 = boxes2[None, :, :]                                           # [1, N2, 4]
    y1 = tf.maximum(b1[..., 0], b2[..., 0])                           # [N1, N2]
    x1 = tf.maximum(b1[..., 1], b2[..., 1])
    y2 = tf.minimum(b1[..., 2], b2[..., 2])
    x2 = tf.minimum(b1[..., 3], b2[..., 3])
    intersection = tf.maximum(y2 - y1, 0.) * tf.maximum(x2 - x1, 0.)  # [N1, N2]
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])     # [N1, 1]
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])     # [1, N2]
    union = area1 + area2 - intersection                              # [N1, N2]
    return tf.math.divide_no_nan(intersection, union)                 # [N1, N2]


def box_refinement_graph(box, gt_box):
    """Deltas that turn `box` into `gt_box`.

    box, gt_box: [..., 4] (y1, x1, y2, x2)
    Returns [..., 4] (dy, dx, log(dh), log(dw)).
    """
    box = tf.cast(box, tf.float32)
    gt_box = tf.cast(gt_box, tf.float32)
    height = box[..., 2] - box[..., 0]
    width = box[..., 3] - box[..., 1]
    center_y = box[..., 0] + 0.5 * height
    center_x = box[..., 1] + 0.5 * width
    gt_height = gt_box[..., 2] - gt_box[..., 0]
    gt_width = gt_box[..., 3] - gt_box[..., 1]
    gt_center_y = gt_box[..., 0] + 0.5 * gt_height
    gt_center_x = gt_box[..., 1] + 0.5 * gt_width
    dy = (gt_center_y - center_y) / height
    dx = (gt_center_x - center_x) / width
    dh = tf.math.log(gt_height / height)
    dw = tf.math.log(gt_width / width)
    return tf.stack([dy, dx, dh, dw], axis=-1)                        # [..., 4]


def trim_zeros_graph(boxes, name="trim_zeros"):
    """Drop all-zero rows (padding) from boxes.

    boxes: [N, 4]
    Returns (boxes [M, 4], non_zeros [N] bool: which rows were kept).
    """
    non_zeros = tf.cast(tf.reduce_sum(tf.abs(boxes), axis=1), tf.bool)  # [N]
    boxes = tf.boolean_mask(boxes, non_zeros, name=name)                # [M, 4]
    return boxes, non_zeros


def norm_boxes_graph(boxes, shape):
    """Pixel boxes -> normalized boxes (matterport's convention: y2/x2 exclusive).

    boxes: [..., 4] pixel coordinates
    shape: [2] (height, width) of the image (a tensor or a sequence), or [..., 2] with one
        shape per leading index of boxes (e.g. [batch, 2] for boxes [batch, 4])
    Returns [..., 4] float32: (boxes - [0, 0, 1, 1]) / [h - 1, w - 1, h - 1, w - 1].
    """
    h, w = tf.unstack(tf.cast(shape, tf.float32), 2, axis=-1)
    scale = tf.stack([h, w, h, w], axis=-1) - 1.0                     # [4] or [..., 4]
    shift = tf.constant([0., 0., 1., 1.])
    return (tf.cast(boxes, tf.float32) - shift) / scale               # [..., 4]


def denorm_boxes_graph(boxes, shape):
    """Normalized boxes -> pixel boxes, the inverse of norm_boxes_graph.

    boxes: [..., 4] normalized
    shape: [2] (height, width), or [..., 2] as in norm_boxes_graph
    Returns [..., 4] int32 pixel coordinates.
    """
    h, w = tf.unstack(tf.cast(shape, tf.float32), 2, axis=-1)
    scale = tf.stack([h, w, h, w], axis=-1) - 1.0
    shift = tf.constant([0., 0., 1., 1.])
    return tf.cast(tf.round(tf.cast(boxes, tf.float32) * scale + shift), tf.int32)


def _map_over_batch(fn, elems, output_signature):
    """tf.map_fn of a per-image function over axis 0 of `elems` with fixed-shape outputs."""
    return tf.map_fn(fn, elems, fn_output_signature=output_signature)


def _pad_rows(x, rows):
    """Zero-pad (or cut) axis 0 of x to exactly `rows` rows (a Python int)."""
    x = x[:rows]
    padding = [[0, rows - tf.shape(x)[0]]] + [[0, 0]] * (x.shape.rank - 1)
    x = tf.pad(x, padding)
    return tf.ensure_shape(x, [rows] + x.shape[1:].as_list())


def _config_value(value, config, name):
    """An explicit value, else the config's attribute, else the Config default."""
    if value is not None:
        return value
    return getattr(config if config is not None else Config, name)


class _GraphLayer(KL.Layer):
    """Base of the layers here: no input autocasting (each casts what it needs itself).

    Layers with data-dependent shapes inside (NMS, tf.where) set `supports_jit = False`, so
    that Keras' jit_compile="auto" does not try XLA on a model that contains them.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)


############################################################
#  Anchors
############################################################

def _encode_array(array):
    array = np.ascontiguousarray(array, dtype=np.float32)
    return {"shape": list(array.shape),
            "float32_base64": base64.b64encode(array.tobytes()).decode("ascii")}


def _decode_array(value):
    if isinstance(value, dict) and "float32_base64" in value:
        raw = base64.b64decode(value["float32_base64"])
        return np.frombuffer(raw, dtype=np.float32).reshape(value["shape"]).copy()
    return np.asarray(value, dtype=np.float32)


@keras.saving.register_keras_serializable(package="mrcnn")
class AnchorsLayer(_GraphLayer):
    """The anchors of the training image size as a layer output.

    anchors: [A, 4] normalized anchors (numpy array or nested list), e.g.
        utils.norm_boxes(utils.generate_pyramid_anchors(...), image_shape).
    Input: input_image [batch, H, W, C] (only its batch size is used).
    Output: [batch, A, 4] float32, the anchors repeated for each image.

    The anchors are a constant of the graph, not a weight: weight files do not carry them.
    get_config stores them compactly (float32 bytes, base64).
    """

    def __init__(self, anchors, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.anchors = _decode_array(anchors)                         # [A, 4]
        if self.anchors.ndim != 2 or self.anchors.shape[1] != 4:
            raise ValueError("AnchorsLayer: anchors must have shape [A, 4], got %s"
                             % (self.anchors.shape,))

    def call(self, input_image):
        batch = tf.shape(input_image)[0]
        anchors = tf.constant(self.anchors, dtype=tf.float32)         # [A, 4]
        return tf.tile(anchors[None], [batch, 1, 1])                  # [batch, A, 4]

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + self.anchors.shape

    def get_config(self):
        config = super().get_config()
        config["anchors"] = _encode_array(self.anchors)
        return config


############################################################
#  Proposal Layer
############################################################

@keras.saving.register_keras_serializable(package="mrcnn")
class ProposalLayer(_GraphLayer):
    """RPN scores and deltas -> proposals (matterport's ProposalLayer).

    Keeps the PRE_NMS_LIMIT anchors with the highest foreground score, applies their deltas
    (scaled by RPN_BBOX_STD_DEV), clips to [0, 1], runs NMS and keeps `proposal_count`.

    Inputs:
        rpn_probs: [batch, A, 2] (background, foreground) probabilities
        rpn_bbox: [batch, A, 4] (dy, dx, log(dh), log(dw)) deltas
        anchors: [batch, A, 4] normalized anchors
    Output: [batch, proposal_count, 4] normalized (y1, x1, y2, x2) float32, ordered by
        decreasing score, zero-padded.
    With return_intermediates (for inspection: MaskRCNN.ancestor resolves matterport's
    "ROI/pre_nms_anchors:0"-style names to them), a list: the proposals, then
        pre_nms_anchors [batch, k, 4] the top-k anchors by score (k = PRE_NMS_LIMIT),
        refined_anchors [batch, k, 4] with their deltas applied,
        refined_anchors_clipped [batch, k, 4] clipped to [0, 1],
        rpn_non_max_suppression [batch, proposal_count] int32 indices into those k kept by
            NMS, -1 padded.

    config: supplies PRE_NMS_LIMIT and RPN_BBOX_STD_DEV unless given explicitly.
    """

    INTERMEDIATES = ("pre_nms_anchors", "refined_anchors", "refined_anchors_clipped",
                     "rpn_non_max_suppression")

    def __init__(self, proposal_count, nms_threshold, config=None, pre_nms_limit=None,
                 rpn_bbox_std_dev=None, return_intermediates=False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.supports_jit = False  # NMS / tf.where: data-dependent shapes
        self.return_intermediates = bool(return_intermediates)
        self.proposal_count = int(proposal_count)
        self.nms_threshold = float(nms_threshold)
        self.pre_nms_limit = int(_config_value(pre_nms_limit, config, "PRE_NMS_LIMIT"))
        self.rpn_bbox_std_dev = [float(v) for v in np.reshape(
            _config_value(rpn_bbox_std_dev, config, "RPN_BBOX_STD_DEV"), [4])]

    def call(self, inputs):
        rpn_probs, rpn_bbox, anchors = [tf.cast(x, tf.float32) for x in inputs[:3]]
        scores = rpn_probs[:, :, 1]                                   # [batch, A]
        deltas = rpn_bbox * tf.constant(self.rpn_bbox_std_dev)        # [batch, A, 4]

        # Top anchors by score: [batch, k]
        num_anchors = anchors.shape[1]
        if num_anchors is not None:
            k = min(self.pre_nms_limit, num_anchors)
        else:
            k = tf.minimum(self.pre_nms_limit, tf.shape(anchors)[1])
        scores, ix = tf.nn.top_k(scores, k, sorted=True, name="top_anchors")
        deltas = tf.gather(deltas, ix, batch_dims=1)                  # [batch, k, 4]
        pre_nms_anchors = tf.gather(anchors, ix, batch_dims=1)        # [batch, k, 4]

        # Refine and clip to the image: [batch, k, 4]
        refined = apply_box_deltas_graph(pre_nms_anchors, deltas)
        boxes = clip_boxes_graph(refined, tf.constant([0., 0., 1., 1.]))

        # NMS per image: indices [batch, proposal_count] (-1 padded) into the k boxes.
        def nms(args):
            image_boxes, image_scores = args                          # [k, 4], [k]
            keep = tf.image.non_max_suppression(
                image_boxes, image_scores, self.proposal_count, self.nms_threshold,
                name="rpn_non_max_suppression")                       # [<= proposal_count]
            return tf.pad(keep, [[0, self.proposal_count - tf.shape(keep)[0]]],
                          constant_values=-1)

        keep = _map_over_batch(nms, (boxes, scores),
                               tf.TensorSpec([self.proposal_count], tf.int32))
        # [batch, proposal_count, 4], zero-padded where keep is -1.
        proposals = tf.gather(boxes, tf.maximum(keep, 0), batch_dims=1)
        proposals = tf.where((keep >= 0)[..., None], proposals, 0.0)
        # Proposals are constants for the heads and their targets (no gradient into the RPN
        # through them, as in the paper's approximate joint training).
        proposals = tf.stop_gradient(proposals)                       # [batch, count, 4]
        if self.return_intermediates:
            return [proposals, pre_nms_anchors, refined, boxes, keep]
        return proposals

    def compute_output_shape(self, input_shape):
        proposals = (input_shape[0][0], self.proposal_count, 4)
        if not self.return_intermediates:
            return proposals
        k = input_shape[2][1]
        k = None if k is None else min(self.pre_nms_limit, k)
        batch = input_shape[0][0]
        return [proposals, (batch, k, 4), (batch, k, 4), (batch, k, 4),
                (batch, self.proposal_count)]

    def compute_output_spec(self, inputs):
        shapes = self.compute_output_shape([tuple(x.shape) for x in inputs[:3]])
        if not self.return_intermediates:
            return keras.KerasTensor(shapes, dtype="float32")
        return [keras.KerasTensor(shape, dtype="int32" if i == 4 else "float32")
                for i, shape in enumerate(shapes)]

    def get_config(self):
        config = super().get_config()
        config.update(proposal_count=self.proposal_count, nms_threshold=self.nms_threshold,
                      pre_nms_limit=self.pre_nms_limit,
                      rpn_bbox_std_dev=list(self.rpn_bbox_std_dev),
                      return_intermediates=self.return_intermediates)
        return config


############################################################
#  ROIAlign Layer
############################################################

def roi_pyramid_levels(boxes, image_shape):
    """FPN level (2..5) of each box, as in the FPN paper (equation 1).

    boxes: [..., 4] normalized
    image_shape: [2] or [3] (height, width, ...) of the image in pixels
    Returns [...] int32: min(5, max(2, 4 + round(log2(sqrt(h * w) / (224 / sqrt(image_area)))))).
    Zero-area boxes (padding) go to level 2.
    """
    boxes = tf.cast(boxes, tf.float32)
    image_shape = tf.cast(image_shape, tf.float32)
    image_area = image_shape[0] * image_shape[1]
    h = boxes[..., 2] - boxes[..., 0]
    w = boxes[..., 3] - boxes[..., 1]
    roi_level = log2_graph(tf.sqrt(tf.maximum(h * w, 0.)) / (224.0 / tf.sqrt(image_area)))
    # Clamp in float (log2(0) = -inf) before the cast to int.
    roi_level = tf.clip_by_value(4.0 + tf.round(roi_level), 2.0, 5.0)
    return tf.cast(roi_level, tf.int32)


@keras.saving.register_keras_serializable(package="mrcnn")
class PyramidROIAlign(_GraphLayer):
    """RoIAlign on several levels of the feature pyramid.

    pool_shape: (pool_height, pool_width) of the output, e.g. [7, 7].

    Inputs:
        boxes: [batch, num_boxes, 4] normalized (y1, x1, y2, x2); zero padding allowed
        image_meta: [batch, IMAGE_META_SIZE] (its image_shape gives the image area)
        P2, P3, P4, P5: [batch, height, width, channels] feature maps, one per level
    Output: [batch, num_boxes, pool_height, pool_width, channels] in the dtype of the feature
        maps (float16 under mixed precision), in the order of the boxes.

    Each box is cropped (tf.image.crop_and_resize, bilinear) from the level chosen by its
    size: a 224x224 box on a 1024x1024 image goes to P4 (see roi_pyramid_levels).
    """

    def __init__(self, pool_shape, **kwargs):
        super().__init__(**kwargs)
        self.supports_jit = False  # NMS / tf.where: data-dependent shapes
        self.pool_shape = tuple(int(s) for s in pool_shape)

    def call(self, inputs):
        boxes = tf.cast(inputs[0], tf.float32)                        # [batch, N, 4]
        image_meta = inputs[1]                                        # [batch, META]
        feature_maps = inputs[2:]                                     # [batch, h, w, C] each
        feature_dtype = feature_maps[0].dtype

        # Level of each box: [batch, N]
        image_shape = parse_image_meta_graph(image_meta)["image_shape"][0]
        roi_level = roi_pyramid_levels(boxes, image_shape)

        pooled = []
        box_to_level = []
        for i, level in enumerate(range(2, 6)):
            ix = tf.where(tf.equal(roi_level, level))                 # [K, 2] (image, box)
            level_boxes = tf.gather_nd(boxes, ix)                     # [K, 4]
            box_indices = tf.cast(ix[:, 0], tf.int32)                 # [K]
            box_to_level.append(ix)
            # No gradient flows into the boxes (they are proposals / detections).
            level_boxes = tf.stop_gradient(level_boxes)
            box_indices = tf.stop_gradient(box_indices)
            level_map = feature_maps[i]
            if level_map.dtype == tf.bfloat16:     # crop_and_resize has no bfloat16 kernel
                level_map = tf.cast(level_map, tf.float32)
            crops = tf.image.crop_and_resize(
                level_map, level_boxes, box_indices, self.pool_shape,
                method="bilinear")                                    # [K, ph, pw, C] float32
            pooled.append(tf.cast(crops, feature_dtype))

        pooled = tf.concat(pooled, axis=0)                            # [batch * N, ph, pw, C]
        box_to_level = tf.concat(box_to_level, axis=0)                # [batch * N, 2]

        # Back to the order of the boxes: sort by image * N + box.
        num_boxes = tf.shape(boxes, out_type=tf.int64)[1]
        sort_key = box_to_level[:, 0] * num_boxes + box_to_level[:, 1]  # [batch * N]
        order = tf.argsort(sort_key)
        pooled = tf.gather(pooled, order)                             # [batch * N, ph, pw, C]

        channels = feature_maps[0].shape[-1]
        if channels is None:
            channels = tf.shape(feature_maps[0])[-1]
        shape = [tf.shape(boxes)[0], tf.shape(boxes)[1],
                 self.pool_shape[0], self.pool_shape[1], channels]
        return tf.reshape(pooled, tf.stack(shape))                    # [batch, N, ph, pw, C]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0][:2]) + self.pool_shape + (input_shape[2][-1],)

    def compute_output_spec(self, inputs):
        shape = self.compute_output_shape([tuple(x.shape) for x in inputs])
        return keras.KerasTensor(shape, dtype=inputs[2].dtype)

    def get_config(self):
        config = super().get_config()
        config["pool_shape"] = list(self.pool_shape)
        return config


############################################################
#  Detection Target Layer
############################################################

def sampling_seed(*tensors):
    """A seed [2] int64 for stateless random ops that is a function of the tensors' bits.

    ROI sampling draws from it instead of a stateful generator: in training the proposals
    change at every step (the weights do), so the draws vary from step to step and image to
    image, yet the same inputs always give the same draws: a run resumed from a training
    state samples exactly what the uninterrupted run did, with no generator state to save.
    """
    bits = tf.concat([tf.reshape(tf.bitcast(tf.cast(t, tf.float32), tf.int32), [-1])
                      for t in tensors], axis=0)
    bits = tf.cast(bits, tf.int64) + (1 << 31)                       # [K] in [0, 2^32)
    position = tf.range(tf.size(bits, out_type=tf.int64), dtype=tf.int64) % 65521 + 1
    prime = 2147483647
    return tf.stack([tf.reduce_sum((bits % prime) * position) % prime,
                     tf.reduce_sum(bits % prime) % prime])


def _stateless_shuffle(values, seed):
    """values [N] in a random order drawn from seed [2] (stateless)."""
    keys = tf.random.stateless_uniform(tf.shape(values), seed=seed)
    return tf.gather(values, tf.argsort(keys))


def detection_targets_graph(proposals, gt_class_ids, gt_boxes, gt_masks, config=None, *,
                            train_rois_per_image=None, roi_positive_ratio=None,
                            bbox_std_dev=None, mask_shape=None, use_mini_mask=None,
                            gt_attributes=None, append_gt=None):
    """Sample ROIs of one image and make their targets (matterport's semantics and signature:
    the settings come from `config`, TRAIN_ROIS_PER_IMAGE, ROI_POSITIVE_RATIO, BBOX_STD_DEV,
    MASK_SHAPE, USE_MINI_MASK and PROPOSAL_APPEND_GT, unless given explicitly by keyword).

    proposals: [N, 4] normalized, may be zero-padded
    gt_class_ids: [MAX_GT] int; 0 is padding, negative ids are crowd boxes
    gt_boxes: [MAX_GT, 4] normalized
    gt_masks: [height, width, MAX_GT] (mini masks or full-image masks)
    gt_attributes: optional [MAX_GT, NUM_ATTRIBUTES] multi-hot (Attribute-Mask R-CNN)

    Positive ROIs have IoU >= 0.5 with a non-crowd GT box; negative ROIs have IoU < 0.5 with
    every one and do not touch a crowd box (IoU < 0.001). At most
    int(T * roi_positive_ratio) positives are sampled at random, then negatives so that
    positives make up roi_positive_ratio of the sampled ROIs. With no positive there are no
    negatives either (as in matterport). append_gt (PROPOSAL_APPEND_GT; False in matterport):
    the instances' boxes join the proposals first (Detectron2, torchvision), so the heads get
    positives, with zero box targets, before the RPN proposes any.

    Returns (T = train_rois_per_image, positives first, then negatives, then zero padding):
        rois [T, 4], class_ids [T] int32, deltas [T, 4] (already divided by bbox_std_dev),
        masks [T, mask_h, mask_w] float32 in {0, 1},
        and with gt_attributes, attributes [T, NUM_ATTRIBUTES] float32: the multi-hot
        attributes of each positive ROI's instance (the one whose class and box it gets),
        zeros for negatives and padding.
    """
    train_rois_per_image = int(_config_value(train_rois_per_image, config,
                                             "TRAIN_ROIS_PER_IMAGE"))
    roi_positive_ratio = float(_config_value(roi_positive_ratio, config, "ROI_POSITIVE_RATIO"))
    bbox_std_dev = _config_value(bbox_std_dev, config, "BBOX_STD_DEV")
    mask_shape = list(_config_value(mask_shape, config, "MASK_SHAPE"))
    use_mini_mask = bool(_config_value(use_mini_mask, config, "USE_MINI_MASK"))
    append_gt = bool(_config_value(append_gt, config, "PROPOSAL_APPEND_GT"))
    T = train_rois_per_image
    seed = sampling_seed(proposals, gt_boxes)                         # [2]

    # Drop padding.
    proposals, _ = trim_zeros_graph(proposals, name="trim_proposals")  # [N', 4]
    valid = tf.logical_and(tf.cast(tf.reduce_sum(tf.abs(gt_boxes), axis=1), tf.bool),
                           tf.not_equal(gt_class_ids, 0))             # [MAX_GT]
    gt_boxes = tf.boolean_mask(gt_boxes, valid)                       # [G', 4]
    gt_class_ids = tf.boolean_mask(gt_class_ids, valid)               # [G']
    gt_masks = tf.gather(gt_masks, tf.where(valid)[:, 0], axis=2)     # [h, w, G']
    if gt_attributes is not None:
        gt_attributes = tf.boolean_mask(tf.cast(gt_attributes, tf.float32), valid)  # [G', A]

    # Crowd boxes (negative class ids) vs. instances.
    crowd_ix = tf.where(gt_class_ids < 0)[:, 0]
    non_crowd_ix = tf.where(gt_class_ids > 0)[:, 0]
    crowd_boxes = tf.gather(gt_boxes, crowd_ix)                       # [C, 4]
    gt_class_ids = tf.gather(gt_class_ids, non_crowd_ix)              # [G]
    gt_boxes = tf.gather(gt_boxes, non_crowd_ix)                      # [G, 4]
    gt_masks = tf.gather(gt_masks, non_crowd_ix, axis=2)              # [h, w, G]
    if gt_attributes is not None:
        gt_attributes = tf.gather(gt_attributes, non_crowd_ix)        # [G, A]
    if append_gt:
        proposals = tf.concat([proposals, gt_boxes], axis=0)          # [N' + G, 4]

    # IoU with the instances, plus a constant -1 column so that the max / argmax are defined
    # with no instance at all (it never wins for a positive ROI).
    overlaps = overlaps_graph(proposals, gt_boxes)                    # [N', G]
    overlaps = tf.pad(overlaps, [[0, 0], [0, 1]], constant_values=-1.)  # [N', G + 1]
    roi_iou_max = tf.reduce_max(overlaps, axis=1)                     # [N']
    crowd_overlaps = overlaps_graph(proposals, crowd_boxes)           # [N', C]
    crowd_iou_max = tf.reduce_max(
        tf.pad(crowd_overlaps, [[0, 0], [0, 1]]), axis=1)             # [N']
    no_crowd_bool = crowd_iou_max < 0.001                             # [N']

    positive_indices = tf.where(roi_iou_max >= 0.5)[:, 0]             # [P']
    negative_indices = tf.where(tf.logical_and(roi_iou_max < 0.5, no_crowd_bool))[:, 0]

    # Subsample: positives up to the ratio, negatives to complete it.
    positive_count = int(T * roi_positive_ratio)
    positive_indices = _stateless_shuffle(positive_indices, seed)[:positive_count]  # [P]
    positive_count = tf.shape(positive_indices)[0]
    r = 1.0 / roi_positive_ratio
    negative_count = tf.cast(r * tf.cast(positive_count, tf.float32), tf.int32) - positive_count
    negative_indices = _stateless_shuffle(negative_indices, seed + 1)[:negative_count]  # [Ng]
    positive_rois = tf.gather(proposals, positive_indices)            # [P, 4]
    negative_rois = tf.gather(proposals, negative_indices)            # [Ng, 4]

    # Each positive ROI to the instance it overlaps most.
    positive_overlaps = tf.gather(overlaps, positive_indices)         # [P, G + 1]
    roi_gt_box_assignment = tf.argmax(positive_overlaps, axis=1, output_type=tf.int32)  # [P]
    roi_gt_boxes = tf.gather(gt_boxes, roi_gt_box_assignment)         # [P, 4]
    roi_gt_class_ids = tf.cast(tf.gather(gt_class_ids, roi_gt_box_assignment), tf.int32)  # [P]

    # Box targets: [P, 4]
    deltas = box_refinement_graph(positive_rois, roi_gt_boxes)
    deltas = deltas / tf.constant(bbox_std_dev, tf.float32)

    # Mask targets: crop each positive ROI out of its instance's mask.
    masks = tf.cast(tf.transpose(gt_masks, [2, 0, 1])[..., None], tf.float32)  # [G, h, w, 1]
    boxes = positive_rois                                             # [P, 4]
    if use_mini_mask:
        # A mini mask covers its GT box: ROI coordinates relative to the GT box.
        y1, x1, y2, x2 = tf.unstack(positive_rois, 4, axis=1)
        gt_y1, gt_x1, gt_y2, gt_x2 = tf.unstack(roi_gt_boxes, 4, axis=1)
        gt_h = gt_y2 - gt_y1
        gt_w = gt_x2 - gt_x1
        boxes = tf.stack([(y1 - gt_y1) / gt_h, (x1 - gt_x1) / gt_w,
                          (y2 - gt_y1) / gt_h, (x2 - gt_x1) / gt_w], axis=1)  # [P, 4]
    masks = tf.image.crop_and_resize(masks, boxes, roi_gt_box_assignment,
                                     list(mask_shape))                # [P, mh, mw, 1]
    masks = tf.round(masks[..., 0])                                   # [P, mh, mw]

    # Positives, negatives, zero padding: T rows each.
    rois = _pad_rows(tf.concat([positive_rois, negative_rois], axis=0), T)  # [T, 4]
    roi_gt_class_ids = _pad_rows(roi_gt_class_ids, T)                 # [T]
    deltas = _pad_rows(deltas, T)                                     # [T, 4]
    masks = _pad_rows(masks, T)                                       # [T, mh, mw]
    if gt_attributes is None:
        return rois, roi_gt_class_ids, deltas, masks
    attributes = _pad_rows(tf.gather(gt_attributes, roi_gt_box_assignment), T)  # [T, A]
    return rois, roi_gt_class_ids, deltas, masks, attributes


@keras.saving.register_keras_serializable(package="mrcnn")
class DetectionTargetLayer(_GraphLayer):
    """Training: subsample proposals and make class, box and mask targets for them.

    Inputs:
        proposals: [batch, N, 4] normalized, zero-padded
        gt_class_ids: [batch, MAX_GT_INSTANCES] int (0 padding, < 0 crowd)
        gt_boxes: [batch, MAX_GT_INSTANCES, 4] normalized
        gt_masks: [batch, height, width, MAX_GT_INSTANCES] bool (MINI_MASK_SHAPE if
            USE_MINI_MASK, else the image size)
        gt_attributes (optional 5th input, NUM_ATTRIBUTES > 0): [batch, MAX_GT_INSTANCES,
            NUM_ATTRIBUTES] multi-hot
    Outputs (T = TRAIN_ROIS_PER_IMAGE; per image positives first, then negatives, then zeros):
        rois: [batch, T, 4] float32 normalized
        target_class_ids: [batch, T] int32
        target_bbox: [batch, T, 4] float32 (dy, dx, log(dh), log(dw)) / BBOX_STD_DEV
        target_mask: [batch, T, MASK_SHAPE[0], MASK_SHAPE[1]] float32 in {0, 1}
        target_attributes (with the 5th input only): [batch, T, NUM_ATTRIBUTES] float32, the
            attributes of each positive ROI's instance, zeros elsewhere

    Sampling is random but a function of the inputs (see sampling_seed): the same proposals
    and instances give the same ROIs, so a resumed run samples what the interrupted one would
    have. See detection_targets_graph.
    config: supplies TRAIN_ROIS_PER_IMAGE, ROI_POSITIVE_RATIO, BBOX_STD_DEV, MASK_SHAPE,
        USE_MINI_MASK and PROPOSAL_APPEND_GT unless given explicitly.
    """

    def __init__(self, config=None, train_rois_per_image=None, roi_positive_ratio=None,
                 bbox_std_dev=None, mask_shape=None, use_mini_mask=None, append_gt=None,
                 **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.supports_jit = False  # NMS / tf.where: data-dependent shapes
        self.train_rois_per_image = int(
            _config_value(train_rois_per_image, config, "TRAIN_ROIS_PER_IMAGE"))
        self.roi_positive_ratio = float(
            _config_value(roi_positive_ratio, config, "ROI_POSITIVE_RATIO"))
        self.bbox_std_dev = [float(v) for v in np.reshape(
            _config_value(bbox_std_dev, config, "BBOX_STD_DEV"), [4])]
        self.mask_shape = [int(s) for s in _config_value(mask_shape, config, "MASK_SHAPE")]
        self.use_mini_mask = bool(_config_value(use_mini_mask, config, "USE_MINI_MASK"))
        self.append_gt = bool(_config_value(append_gt, config, "PROPOSAL_APPEND_GT"))

    def call(self, inputs):
        proposals = tf.cast(inputs[0], tf.float32)                    # [batch, N, 4]
        gt_class_ids = tf.cast(inputs[1], tf.int32)                   # [batch, MAX_GT]
        gt_boxes = tf.cast(inputs[2], tf.float32)                     # [batch, MAX_GT, 4]
        gt_masks = tf.cast(inputs[3], tf.float32)                     # [batch, h, w, MAX_GT]
        T = self.train_rois_per_image
        elems = (proposals, gt_class_ids, gt_boxes, gt_masks)
        signature = (tf.TensorSpec([T, 4], tf.float32), tf.TensorSpec([T], tf.int32),
                     tf.TensorSpec([T, 4], tf.float32),
                     tf.TensorSpec([T] + self.mask_shape, tf.float32))
        with_attributes = len(inputs) > 4
        if with_attributes:
            gt_attributes = tf.cast(inputs[4], tf.float32)            # [batch, MAX_GT, A]
            elems += (gt_attributes,)
            signature += (tf.TensorSpec([T, inputs[4].shape[-1]], tf.float32),)

        def targets(args):
            return detection_targets_graph(
                *args[:4], train_rois_per_image=T, roi_positive_ratio=self.roi_positive_ratio,
                bbox_std_dev=self.bbox_std_dev, mask_shape=self.mask_shape,
                use_mini_mask=self.use_mini_mask, append_gt=self.append_gt,
                gt_attributes=args[4] if with_attributes else None)

        outputs = _map_over_batch(targets, elems, signature)
        # Targets are constants: [batch, T, 4], [batch, T], [batch, T, 4], [batch, T, mh, mw]
        # (and [batch, T, A])
        return tuple(tf.stop_gradient(t) for t in outputs)

    def compute_output_shape(self, input_shape):
        batch, T = input_shape[0][0], self.train_rois_per_image
        shapes = ((batch, T, 4), (batch, T), (batch, T, 4), (batch, T) + tuple(self.mask_shape))
        if len(input_shape) > 4:
            shapes += ((batch, T, input_shape[4][-1]),)
        return shapes

    def compute_output_spec(self, inputs):
        shapes = self.compute_output_shape([tuple(x.shape) for x in inputs])
        dtypes = ("float32", "int32", "float32", "float32", "float32")
        return tuple(keras.KerasTensor(s, dtype=d) for s, d in zip(shapes, dtypes))

    def compute_mask(self, inputs, mask=None):
        return [None] * (5 if len(inputs) > 4 else 4)

    def get_config(self):
        config = super().get_config()
        config.update(train_rois_per_image=self.train_rois_per_image,
                      roi_positive_ratio=self.roi_positive_ratio,
                      bbox_std_dev=list(self.bbox_std_dev), mask_shape=list(self.mask_shape),
                      use_mini_mask=self.use_mini_mask, append_gt=self.append_gt)
        return config


############################################################
#  Detection Layer
############################################################

def refine_detections_graph(rois, probs, deltas, window, config=None, *, bbox_std_dev=None,
                            min_confidence=None, nms_threshold=None, max_instances=None,
                            scoring=None, per_class_candidates=None, attributes=None):
    """Final detections of one image (matterport's semantics and signature: the settings come
    from `config`, BBOX_STD_DEV, DETECTION_MIN_CONFIDENCE, DETECTION_NMS_THRESHOLD and
    DETECTION_MAX_INSTANCES, DETECTION_SCORING and DETECTION_PER_CLASS_CANDIDATES, unless
    given explicitly by keyword).

    rois: [N, 4] normalized proposals
    probs: [N, NUM_CLASSES] class probabilities
    deltas: [N, NUM_CLASSES, 4] class-specific (dy, dx, log(dh), log(dw)) / BBOX_STD_DEV
    window: [4] normalized (y1, x1, y2, x2) of the image inside the padded input

    scoring "argmax" (matterport): each ROI takes its best class and that class's deltas;
    "per_class" (Detectron2 / torchvision): each (ROI, foreground class) pair is a candidate
    with that class's score and deltas (the per_class_candidates best enter NMS). Boxes are
    clipped to the window; background and scores < min_confidence are dropped; greedy NMS
    runs per class (IoU of boxes of different classes counts as 0) and the max_instances best
    survivors are kept.
    attributes: optional [N, NUM_ATTRIBUTES] per-ROI values (attribute probabilities)
    Returns [max_instances, 6] (y1, x1, y2, x2, class_id, score) float32, by decreasing
    score, zero-padded; with `attributes`, also [max_instances, NUM_ATTRIBUTES]: the row of
    the ROI each detection came from (zeros for padding).
    """
    bbox_std_dev = _config_value(bbox_std_dev, config, "BBOX_STD_DEV")
    min_confidence = float(_config_value(min_confidence, config, "DETECTION_MIN_CONFIDENCE"))
    nms_threshold = float(_config_value(nms_threshold, config, "DETECTION_NMS_THRESHOLD"))
    max_instances = int(_config_value(max_instances, config, "DETECTION_MAX_INSTANCES"))
    scoring = str(_config_value(scoring, config, "DETECTION_SCORING"))
    per_class_candidates = int(_config_value(per_class_candidates, config,
                                             "DETECTION_PER_CLASS_CANDIDATES"))
    if scoring == "per_class":
        # Every (ROI, foreground class) pair: [N * (C - 1)], refined by its class's deltas.
        num_classes = tf.shape(probs)[1]
        pair_class_ids = tf.tile(tf.range(1, num_classes)[None, :], [tf.shape(probs)[0], 1])
        pair_class_ids = tf.reshape(pair_class_ids, [-1])                # [N * (C - 1)]
        pair_scores = tf.reshape(probs[:, 1:], [-1])                     # [N * (C - 1)]
        pair_deltas = tf.reshape(deltas[:, 1:], [-1, 4])                 # [N * (C - 1), 4]
        pair_rois = tf.reshape(tf.repeat(rois, num_classes - 1, axis=0), [-1, 4])
        refined_rois = clip_boxes_graph(apply_box_deltas_graph(
            pair_rois, pair_deltas * tf.constant(bbox_std_dev, tf.float32)), window)
        keep = tf.where(pair_scores >= min_confidence)[:, 0]              # [K]
        # The best per_class_candidates pairs only (bounds the [K, K] NMS overlaps).
        top = tf.math.top_k(tf.gather(pair_scores, keep),
                            tf.minimum(tf.shape(keep)[0], per_class_candidates)).indices
        keep = tf.gather(keep, top)
        pre_nms_roi_ix = tf.cast(keep, tf.int32) // (num_classes - 1)      # [K]
        pre_nms_class_ids = tf.gather(pair_class_ids, keep)              # [K]
        pre_nms_scores = tf.gather(pair_scores, keep)                    # [K]
        pre_nms_rois = tf.gather(refined_rois, keep)                     # [K, 4]
    else:
        # Best class of each ROI: [N]
        class_ids = tf.argmax(probs, axis=1, output_type=tf.int32)
        class_scores = tf.gather(probs, class_ids, batch_dims=1)          # [N]
        deltas_specific = tf.gather(deltas, class_ids, batch_dims=1)      # [N, 4]
        refined_rois = apply_box_deltas_graph(
            rois, deltas_specific * tf.constant(bbox_std_dev, tf.float32))  # [N, 4]
        refined_rois = clip_boxes_graph(refined_rois, window)             # [N, 4]

        # Drop background and low scores: [K]
        keep = tf.where(tf.logical_and(class_ids > 0, class_scores >= min_confidence))[:, 0]
        pre_nms_roi_ix = tf.cast(keep, tf.int32)                          # [K]
        pre_nms_class_ids = tf.gather(class_ids, keep)                    # [K]
        pre_nms_scores = tf.gather(class_scores, keep)                    # [K]
        pre_nms_rois = tf.gather(refined_rois, keep)                      # [K, 4]

    # Per-class NMS in one pass: boxes of different classes never suppress each other.
    same_class = tf.equal(pre_nms_class_ids[:, None], pre_nms_class_ids[None, :])  # [K, K]
    overlaps = tf.where(same_class, overlaps_graph(pre_nms_rois, pre_nms_rois), 0.)  # [K, K]
    nms_keep = tf.image.non_max_suppression_overlaps(
        overlaps, pre_nms_scores, max_output_size=max_instances,
        overlap_threshold=nms_threshold)                              # [<= max_instances]

    detections = tf.concat([
        tf.gather(pre_nms_rois, nms_keep),                            # [D, 4]
        tf.cast(tf.gather(pre_nms_class_ids, nms_keep), tf.float32)[:, None],  # [D, 1]
        tf.gather(pre_nms_scores, nms_keep)[:, None],                 # [D, 1]
    ], axis=1)                                                        # [D, 6]
    detections = _pad_rows(detections, max_instances)                 # [max_instances, 6]
    if attributes is None:
        return detections
    roi_ix = tf.gather(pre_nms_roi_ix, nms_keep)                      # [D]
    detection_attributes = tf.gather(tf.cast(attributes, tf.float32), roi_ix)  # [D, A]
    return detections, _pad_rows(detection_attributes, max_instances)


@keras.saving.register_keras_serializable(package="mrcnn")
class DetectionLayer(_GraphLayer):
    """Inference: classified, refined proposals -> final detections.

    Inputs:
        rois: [batch, N, 4] normalized proposals
        mrcnn_class: [batch, N, NUM_CLASSES] probabilities
        mrcnn_bbox: [batch, N, NUM_CLASSES, 4] deltas
        image_meta: [batch, IMAGE_META_SIZE] (window and image_shape are used)
        mrcnn_attribute (optional 5th input, NUM_ATTRIBUTES > 0): [batch, N, NUM_ATTRIBUTES]
            attribute probabilities of the ROIs
    Output: [batch, DETECTION_MAX_INSTANCES, 6] float32 (y1, x1, y2, x2 normalized, class_id,
        score), by decreasing score, zero-padded. See refine_detections_graph.
        With the 5th input, a pair: that and [batch, DETECTION_MAX_INSTANCES, NUM_ATTRIBUTES]
        float32, each detection's ROI's attribute row (zeros for padding).

    config: supplies BBOX_STD_DEV, DETECTION_MIN_CONFIDENCE, DETECTION_NMS_THRESHOLD,
        DETECTION_MAX_INSTANCES, DETECTION_SCORING and DETECTION_PER_CLASS_CANDIDATES unless
        given explicitly.
    """

    def __init__(self, config=None, bbox_std_dev=None, detection_min_confidence=None,
                 detection_nms_threshold=None, detection_max_instances=None,
                 detection_scoring=None, detection_per_class_candidates=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.supports_jit = False  # NMS / tf.where: data-dependent shapes
        self.bbox_std_dev = [float(v) for v in np.reshape(
            _config_value(bbox_std_dev, config, "BBOX_STD_DEV"), [4])]
        self.detection_min_confidence = float(
            _config_value(detection_min_confidence, config, "DETECTION_MIN_CONFIDENCE"))
        self.detection_nms_threshold = float(
            _config_value(detection_nms_threshold, config, "DETECTION_NMS_THRESHOLD"))
        self.detection_max_instances = int(
            _config_value(detection_max_instances, config, "DETECTION_MAX_INSTANCES"))
        self.detection_scoring = str(
            _config_value(detection_scoring, config, "DETECTION_SCORING"))
        self.detection_per_class_candidates = int(_config_value(
            detection_per_class_candidates, config, "DETECTION_PER_CLASS_CANDIDATES"))

    def call(self, inputs):
        rois = tf.cast(inputs[0], tf.float32)                         # [batch, N, 4]
        mrcnn_class = tf.cast(inputs[1], tf.float32)                  # [batch, N, classes]
        mrcnn_bbox = tf.cast(inputs[2], tf.float32)                   # [batch, N, classes, 4]
        m = parse_image_meta_graph(inputs[3])
        # Window of each image, normalized by its own image shape: [batch, 4]
        window = norm_boxes_graph(m["window"], m["image_shape"][:, :2])
        max_instances = self.detection_max_instances

        def refine(args):
            return refine_detections_graph(
                *args, bbox_std_dev=self.bbox_std_dev,
                min_confidence=self.detection_min_confidence,
                nms_threshold=self.detection_nms_threshold, max_instances=max_instances,
                scoring=self.detection_scoring,
                per_class_candidates=self.detection_per_class_candidates,
                attributes=args[4] if len(args) > 4 else None)

        elems = (rois, mrcnn_class, mrcnn_bbox, window)
        signature = tf.TensorSpec([max_instances, 6], tf.float32)
        if len(inputs) > 4:
            elems += (tf.cast(inputs[4], tf.float32),)                # [batch, N, A]
            signature = (signature,
                         tf.TensorSpec([max_instances, inputs[4].shape[-1]], tf.float32))
            outputs = _map_over_batch(refine, elems, signature)
            # [batch, max, 6], [batch, max, A]
            return tuple(tf.stop_gradient(t) for t in outputs)
        detections = _map_over_batch(refine, elems, signature)
        return tf.stop_gradient(detections)                           # [batch, max, 6]

    def compute_output_shape(self, input_shape):
        shape = (input_shape[0][0], self.detection_max_instances, 6)
        if len(input_shape) > 4:
            return shape, (input_shape[0][0], self.detection_max_instances, input_shape[4][-1])
        return shape

    def compute_mask(self, inputs, mask=None):
        return [None, None] if len(inputs) > 4 else None

    def get_config(self):
        config = super().get_config()
        config.update(bbox_std_dev=list(self.bbox_std_dev),
                      detection_min_confidence=self.detection_min_confidence,
                      detection_nms_threshold=self.detection_nms_threshold,
                      detection_max_instances=self.detection_max_instances,
                      detection_scoring=self.detection_scoring,
                      detection_per_class_candidates=self.detection_per_class_candidates)
        return config
