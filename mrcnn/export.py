"""Export an inference MaskRCNN as a TensorFlow SavedModel for serving.

    from mrcnn.export import export_saved_model
    export_saved_model(model, "export/fashion", class_names=dataset.class_names)

    # Anywhere with TensorFlow (no mrcnn, no Keras code needed):
    served = tf.saved_model.load("export/fashion")
    out = served.signatures["serving_default"](image=tf.constant(image))   # image: uint8 [H, W, 3]
    out["boxes"], out["class_ids"], out["scores"], out["masks"], out["num_detections"]

The serving function takes ONE RGB uint8 image [H, W, 3] of any size and does in TensorFlow what
`MaskRCNN.detect([image])` does in numpy / OpenCV:

    mold_inputs         resize as utils.resize_image does for IMAGE_RESIZE_MODE ("square",
                        "pad64" or "none"), pad with zeros, subtract MEAN_PIXEL, image_meta
    anchors             constant for "square" (one molded size); computed in the graph for
                        "pad64" / "none", where the molded size follows the image
    keras_model         the inference graph (batch of one)
    unmold_detections   boxes from normalized molded coordinates to pixels of the input image
                        (rounded as utils.denorm_boxes), zero-area boxes dropped, each mask of
                        the detection's class resized to its box (bilinear when enlarging, area
                        average when shrinking, as utils.unmold_mask's OpenCV resize), >= 0.5,
                        pasted into an empty image

Outputs (N = detections kept, at most DETECTION_MAX_INSTANCES):
    boxes           int32   [N, 4]     (y1, x1, y2, x2) pixels of the input image, y2/x2
                                       exclusive (detect()'s "rois")
    class_ids       int32   [N]
    scores          float32 [N]
    masks           bool    [H, W, N]  at the input image's size (detect()'s layout)
    num_detections  int32   []         N
and with NUM_ATTRIBUTES > 0 (Attribute-Mask R-CNN):
    attribute_scores float32 [N, NUM_ATTRIBUTES]  detect()'s attribute_scores
    attributes      bool    [N, NUM_ATTRIBUTES]  attribute_scores >= DETECTION_ATTRIBUTE_THRESHOLD
                                       (detect()'s attributes, as a multi-hot: a serving
                                       output is one dense tensor)

Same numbers as detect(): the resize reproduces OpenCV's uint8 arithmetic bit for bit (its
fixed-point bilinear when enlarging, its float32 area weights or integer block sums when
shrinking; tested against cv2 on hundreds of size pairs), so the molded image, and with it
every detection, is the one detect() computes. Masks are pasted with float32 resampling
matrices; a mask pixel can differ only where the resized value is within float rounding of
the 0.5 threshold.

Next to the SavedModel, `config.json` records the configuration, the class names and the
output layout; a second signature, `metadata`, returns the class names and that JSON.
"""

import json
import os
import shutil

import numpy as np
import tensorflow as tf

from mrcnn.errors import MrcnnError
from mrcnn.image_meta import compose_image_meta_graph


__all__ = ["SUPPORTED_RESIZE_MODES", "ExportError", "export_saved_model", "make_serving_function",
           "resize_image_graph", "anchors_graph", "unmold_detections_graph",
           "paste_masks_graph", "resize_weights", "config_to_json"]

# IMAGE_RESIZE_MODE values the serving function reproduces. "crop" takes a random crop: a
# training-time augmentation, not something to serve.
SUPPORTED_RESIZE_MODES = ("square", "pad64", "none")

EXPORT_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"


class ExportError(MrcnnError, ValueError):
    """A model or configuration that cannot be exported (mode, resize mode, channels)."""


############################################################
#  Molding in the graph (utils.resize_image + data.mold_image + compose_image_meta)
############################################################

def resize_weights(src, dst, area):
    """Resampling matrix of one axis: [dst, src] float32 with out = W @ in along that axis.

    OpenCV's cv2.resize of a float image on that axis, up to float rounding (used for masks):
      area=False (INTER_LINEAR): sample at (i + 0.5) * src / dst - 0.5, linear between the two
        nearest source pixels, coordinates clamped to the first / last pixel;
      area=True (INTER_AREA, for shrinking): the mean of the source interval
        [i * src / dst, (i + 1) * src / dst), each pixel weighted by its overlap.
    src, dst: int32 scalar tensors (src >= 1, dst >= 1).
    """
    src_f = tf.cast(src, tf.float64)
    scale = src_f / tf.cast(dst, tf.float64)                         # source pixels per output
    i = tf.cast(tf.range(dst), tf.float64)[:, None]                  # [dst, 1]
    k = tf.cast(tf.range(src), tf.float64)[None, :]                  # [1, src]
    if area:
        start, end = i * scale, tf.minimum((i + 1) * scale, src_f)   # [dst, 1]
        overlap = tf.maximum(tf.minimum(k + 1, end) - tf.maximum(k, start), 0.0)
        weights = overlap / (end - start)
    else:
        pos = tf.clip_by_value((i + 0.5) * scale - 0.5, 0.0, src_f - 1)   # [dst, 1]
        weights = tf.maximum(1.0 - tf.abs(pos - k), 0.0)             # the two nearest pixels
    return tf.cast(weights, tf.float32)


def _scaled_size(h, w, scale):
    """utils._scaled_size: max(1, round(side * scale)) (round half to even, as Python)."""
    def side(s):
        return tf.maximum(1, tf.cast(tf.round(tf.cast(s, tf.float64) * scale), tf.int32))
    return side(h), side(w)


def _cv2_scale(src, dst):
    """OpenCV's source pixels per output pixel: 1 / (dst / src), in float64 as cv::resize."""
    return 1.0 / (tf.cast(dst, tf.float64) / tf.cast(src, tf.float64))


def _inexact_integer_factors(limit=1 << 14):
    """Integer factors k that cv::resize does not recognise as integers: its test is
    |1 / (1 / k) - k| < DBL_EPSILON in double precision, which fails for k = 49, 93, 98, ..."""
    eps = float(np.finfo(np.float64).eps)
    return np.array([k for k in range(1, limit) if abs(1.0 / (1.0 / k) - k) >= eps], np.int32)


INEXACT_INTEGER_FACTORS = _inexact_integer_factors()


def _integer_factor(src, dst):
    """(is_integer, k): whether cv::resize takes src -> dst as the integer factor k.
    Decided in integers (src % dst, and the table above), not with graph float math that
    Grappler may rearrange."""
    k = src // dst
    exact = tf.logical_and(tf.equal(src % dst, 0), k < (1 << 14))
    inexact = tf.reduce_any(tf.equal(k, INEXACT_INTEGER_FACTORS))
    return tf.logical_and(exact, tf.logical_not(inexact)), k


def _linear_taps(src, dst, clamp):
    """cv2.resize INTER_LINEAR coefficients of one axis, 8-bit fixed point (11 bits).

    Returns (i0, i1) int32 [dst] source pixels and (w0, w1) int32 [dst] weights summing to
    about 2048. OpenCV clamps the coordinate on the x axis (clamp=True) but only the row index
    on the y axis (the weights of border rows still mix one row with itself).
    """
    f = tf.cast((tf.cast(tf.range(dst), tf.float64) + 0.5) * _cv2_scale(src, dst) - 0.5,
                tf.float32)
    i0 = tf.floor(f)
    f = f - i0
    i0 = tf.cast(i0, tf.int32)
    if clamp:
        low, high = i0 < 0, i0 >= src - 1
        f = tf.where(tf.logical_or(low, high), tf.zeros_like(f), f)
        i0 = tf.where(low, 0, tf.where(high, src - 1, i0))
    w1 = tf.cast(tf.round(f * 2048.0), tf.int32)
    w0 = tf.cast(tf.round((1.0 - f) * 2048.0), tf.int32)
    i1 = tf.clip_by_value(i0 + 1, 0, src - 1)
    return tf.clip_by_value(i0, 0, src - 1), i1, w0, w1


def _resize_linear_cv2(pixels, out_h, out_w):
    """cv2.resize(uint8, INTER_LINEAR) bit for bit: horizontal pass in int32 (weights of
    2048), vertical pass as OpenCV's SIMD code, ((a >> 4) * w >> 16) per row, (sum + 2) >> 2.
    pixels: int32 [h, w, C] of 0..255. Returns int32 [out_h, out_w, C]."""
    h, w = tf.shape(pixels)[0], tf.shape(pixels)[1]
    x0, x1, a0, a1 = _linear_taps(w, out_w, clamp=True)
    rows = (tf.gather(pixels, x0, axis=1) * a0[None, :, None]
            + tf.gather(pixels, x1, axis=1) * a1[None, :, None])      # [h, out_w, C]
    y0, y1, b0, b1 = _linear_taps(h, out_h, clamp=False)
    top = tf.bitwise.right_shift(
        tf.bitwise.right_shift(tf.gather(rows, y0), 4) * b0[:, None, None], 16)
    bottom = tf.bitwise.right_shift(
        tf.bitwise.right_shift(tf.gather(rows, y1), 4) * b1[:, None, None], 16)
    return tf.clip_by_value(tf.bitwise.right_shift(top + bottom + 2, 2), 0, 255)


def _area_taps(src, dst):
    """cv2.resize INTER_AREA weights of one axis (OpenCV's computeResizeAreaTab): output i
    averages the source interval [i * s, (i + 1) * s), s = src / dst, each pixel weighted by
    its overlap (slivers under 1e-3 dropped). The pixels of an output are consecutive.
    Returns first int32 [dst], weights float32 [dst, T] (0 past each output's last pixel)."""
    scale = _cv2_scale(src, dst)
    srcf = tf.cast(src, tf.float64)
    start = tf.cast(tf.range(dst), tf.float64) * scale
    end = start + scale
    cell = tf.minimum(scale, srcf - start)
    first_full = tf.math.ceil(start)
    last = tf.minimum(tf.floor(end), srcf - 1)
    first_full = tf.minimum(first_full, last)
    head = (first_full - start) > 1e-3                               # a partial first pixel
    tail = (end - last) > 1e-3                                       # a partial last pixel
    first = first_full - tf.cast(head, tf.float64)
    count = tf.cast(head, tf.int32) + tf.cast(last - first_full, tf.int32) + tf.cast(tail,
                                                                                   tf.int32)
    taps = tf.maximum(tf.reduce_max(count), 1)
    t = tf.range(taps)[None, :]                                      # [1, T]
    full = tf.cast(1.0 / cell, tf.float32)[:, None]
    head_w = tf.cast((first_full - start) / cell, tf.float32)[:, None]
    tail_w = tf.cast(tf.minimum(tf.minimum(end - last, 1.0), cell) / cell, tf.float32)[:, None]
    weights = tf.broadcast_to(full, tf.stack([dst, taps]))
    weights = tf.where(tf.logical_and(tf.equal(t, count[:, None] - 1), tail[:, None]),
                       tail_w, weights)
    weights = tf.where(tf.logical_and(tf.equal(t, 0), head[:, None]), head_w, weights)
    weights = tf.where(t < count[:, None], weights, tf.zeros_like(weights))
    return tf.cast(first, tf.int32), weights


def _accumulate(values, first, weights, axis):
    """sum_t weights[:, t] * values[first + t] along `axis` (0 or 1), added in tap order in
    float32 (OpenCV's order, so the sums round as its own)."""
    size = tf.shape(values)[axis]
    shape = [-1, 1, 1] if axis == 0 else [1, -1, 1]

    def body(t, acc):
        index = tf.minimum(first + t, size - 1)
        term = tf.gather(values, index, axis=axis) * tf.reshape(weights[:, t], shape)
        return t + 1, acc + term

    out_shape = tf.tensor_scatter_nd_update(tf.shape(values), [[axis]], tf.shape(first))
    _, acc = tf.while_loop(lambda t, acc: t < tf.shape(weights)[1], body,
                           (tf.constant(0), tf.zeros(out_shape, tf.float32)))
    return acc


def _resize_area_cv2(pixels, out_h, out_w):
    """cv2.resize(uint8, INTER_AREA) when shrinking, as OpenCV computes it: integer factors on
    both axes take its block-sum path (2x2: (sum + 2) >> 2; otherwise sum * (1 / area) rounded
    to nearest even), other sizes its float32 overlap weights, rounded to nearest even.
    pixels: int32 [h, w, C]. Returns int32 [out_h, out_w, C]."""
    h, w = tf.shape(pixels)[0], tf.shape(pixels)[1]
    integer_y, fy = _integer_factor(h, out_h)
    integer_x, fx = _integer_factor(w, out_w)

    def blocks():
        channels = tf.shape(pixels)[2]
        crop = pixels[:out_h * fy, :out_w * fx]
        sums = tf.reduce_sum(tf.reshape(crop, tf.stack([out_h, fy, out_w, fx, channels])),
                             axis=[1, 3])
        area = fy * fx
        halves = tf.bitwise.right_shift(sums + 2, 2)
        inverse = 1.0 / tf.cast(area, tf.float32)
        other = tf.cast(tf.round(tf.cast(sums, tf.float32) * inverse), tf.int32)
        return tf.where(tf.logical_and(tf.equal(fy, 2), tf.equal(fx, 2)), halves, other)

    def weighted():
        first_x, weights_x = _area_taps(w, out_w)
        first_y, weights_y = _area_taps(h, out_h)
        rows = _accumulate(tf.cast(pixels, tf.float32), first_x, weights_x, axis=1)
        out = _accumulate(rows, first_y, weights_y, axis=0)
        return tf.cast(tf.round(out), tf.int32)

    return tf.clip_by_value(tf.cond(tf.logical_and(integer_y, integer_x), blocks, weighted),
                            0, 255)


def _resize_uint8(image, size_h, size_w):
    """utils._cv2_resize of a uint8 image [h, w, 3] in TensorFlow, bit for bit with OpenCV:
    INTER_AREA when shrinking (both sides not larger), INTER_LINEAR otherwise, the same size
    copied. Returns float32 [size_h, size_w, 3] of whole grey levels."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    pixels = tf.cast(image, tf.int32)
    shrink = tf.logical_and(size_h <= h, size_w <= w)
    same = tf.logical_and(tf.equal(size_h, h), tf.equal(size_w, w))
    resized = tf.cond(
        same, lambda: pixels,
        lambda: tf.cond(shrink, lambda: _resize_area_cv2(pixels, size_h, size_w),
                        lambda: _resize_linear_cv2(pixels, size_h, size_w)))
    return tf.cast(resized, tf.float32)


def resize_image_graph(image, config):
    """utils.resize_image in TensorFlow for config.IMAGE_RESIZE_MODE.

    image: uint8 [H, W, 3]. Returns (resized float32 [h, w, 3] of whole grey levels, window
    int32 [4] (y1, x1, y2, x2) of the image inside it, scale float64 scalar).
    """
    mode = config.IMAGE_RESIZE_MODE
    if mode not in SUPPORTED_RESIZE_MODES:
        raise ExportError("IMAGE_RESIZE_MODE %r cannot be exported (supported: %s)"
                          % (mode, ", ".join(SUPPORTED_RESIZE_MODES)))
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    if mode == "none":
        return tf.cast(image, tf.float32), tf.stack([0, 0, h, w]), tf.constant(1.0, tf.float64)

    hf, wf = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
    scale = tf.constant(1.0, tf.float64)
    if config.IMAGE_MIN_DIM:
        scale = tf.maximum(scale, config.IMAGE_MIN_DIM / tf.minimum(hf, wf))
    if config.IMAGE_MIN_SCALE:
        scale = tf.maximum(scale, tf.constant(float(config.IMAGE_MIN_SCALE), tf.float64))
    if mode == "square":
        max_dim = int(config.IMAGE_MAX_DIM)
        image_max = tf.maximum(hf, wf)
        scale = tf.where(tf.round(image_max * scale) > max_dim, max_dim / image_max, scale)
    new_h, new_w = _scaled_size(h, w, scale)
    new_h = tf.where(tf.equal(scale, 1.0), h, new_h)
    new_w = tf.where(tf.equal(scale, 1.0), w, new_w)
    resized = _resize_uint8(image, new_h, new_w)

    if mode == "square":
        pad_h, pad_w = max_dim - new_h, max_dim - new_w
    else:  # pad64
        pad_h, pad_w = tf.math.floormod(-new_h, 64), tf.math.floormod(-new_w, 64)
    top, left = pad_h // 2, pad_w // 2
    resized = tf.pad(resized, [[top, pad_h - top], [left, pad_w - left], [0, 0]])
    window = tf.stack([top, left, top + new_h, left + new_w])
    return resized, window, scale


def anchors_graph(config, image_hw):
    """data.compute_anchors(config, image_shape) normalized (utils.norm_boxes), in the graph.

    image_hw: int32 [2] molded (height, width). Returns float32 [A, 4]. Needs a named
    BACKBONE (feature maps of ceil(side / stride)); a callable backbone's shapes are unknown.
    """
    if callable(config.BACKBONE):
        raise ExportError("anchors of a callable BACKBONE cannot be computed in the graph; "
                          "export it with IMAGE_RESIZE_MODE 'square' (one molded size, "
                          "constant anchors)")
    h, w = tf.cast(image_hw[0], tf.float64), tf.cast(image_hw[1], tf.float64)
    ratios = np.asarray(config.RPN_ANCHOR_RATIOS, np.float64)
    levels = []
    for scale, stride in zip(config.RPN_ANCHOR_SCALES, config.BACKBONE_STRIDES):
        # Ratios outer, scales inner (one scale per level), as utils.generate_anchors.
        heights = tf.constant(scale / np.sqrt(ratios))                      # [K]
        widths = tf.constant(scale * np.sqrt(ratios))                       # [K]
        feature_h = tf.cast(tf.math.ceil(h / stride), tf.int32)
        feature_w = tf.cast(tf.math.ceil(w / stride), tf.int32)
        ys = tf.cast(tf.range(0, feature_h, config.RPN_ANCHOR_STRIDE), tf.float64) * stride
        xs = tf.cast(tf.range(0, feature_w, config.RPN_ANCHOR_STRIDE), tf.float64) * stride
        cy, cx = tf.meshgrid(ys, xs, indexing="ij")                          # [Y, X]
        cy = tf.reshape(cy, [-1, 1])                                         # [P, 1]
        cx = tf.reshape(cx, [-1, 1])
        boxes = tf.stack([cy - 0.5 * heights, cx - 0.5 * widths,
                          cy + 0.5 * heights, cx + 0.5 * widths], axis=-1)   # [P, K, 4]
        levels.append(tf.reshape(boxes, [-1, 4]))
    anchors = tf.concat(levels, axis=0)                                      # [A, 4] pixels
    scale = tf.stack([h - 1, w - 1, h - 1, w - 1])
    shift = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float64)
    return tf.cast((anchors - shift) / scale, tf.float32)


############################################################
#  Unmolding in the graph (MaskRCNN.unmold_detections + utils.unmold_mask)
############################################################

def paste_masks_graph(masks, boxes, image_hw, threshold=0.5):
    """utils.unmold_mask for N masks at once: resize each mask to its box, >= threshold
    (config.DETECTION_MASK_THRESHOLD), paste.

    masks: float32 [N, mh, mw] in [0, 1]; boxes: int32 [N, 4] (y1, x1, y2, x2) pixels (may
    reach outside the image); image_hw: int32 [2]. Returns bool [N, H, W].

    As utils._paste (OpenCV): area averaging when the box is at most the mask's size on both
    axes, bilinear (half-pixel centres, clamped) otherwise. Each mask goes through two small
    resampling matrices (Ry [H, mh] and Rx [W, mw], zero outside the box), one mask at a time,
    so memory stays at one float image.
    """
    height, width = image_hw[0], image_hw[1]
    mh, mw = tf.shape(masks)[1], tf.shape(masks)[2]

    def axis_weights(start, end, size, src, area):
        # [size, src]: rows of the box resampled from the mask, zero rows outside the box.
        length = tf.maximum(end - start, 1)
        local = resize_weights(src, length, area)                    # [length, src]
        rows = tf.range(size) - start                                # box-local row of a pixel
        inside = tf.logical_and(rows >= 0, rows < end - start)
        picked = tf.gather(local, tf.clip_by_value(rows, 0, length - 1))
        return tf.where(inside[:, None], picked, tf.zeros_like(picked))

    def paste_one(args):
        mask, box = args
        y1, x1, y2, x2 = box[0], box[1], box[2], box[3]
        area = tf.logical_and(y2 - y1 <= mh, x2 - x1 <= mw)

        def pasted(is_area):
            ry = axis_weights(y1, y2, height, mh, is_area)               # [H, mh]
            rx = axis_weights(x1, x2, width, mw, is_area)                # [W, mw]
            return tf.matmul(tf.matmul(ry, mask), rx, transpose_b=True)  # [H, W]

        full = tf.cond(area, lambda: pasted(True), lambda: pasted(False))
        empty = tf.logical_or(y2 <= y1, x2 <= x1)
        return tf.logical_and(full >= threshold, tf.logical_not(empty))

    count = tf.shape(masks)[0]

    def paste_all():
        pasted = tf.map_fn(paste_one, (tf.cast(masks, tf.float32), tf.cast(boxes, tf.int32)),
                           fn_output_signature=tf.TensorSpec([None, None], tf.bool))
        return tf.reshape(pasted, tf.stack([count, height, width]))

    # map_fn over no element cannot stack [0, H, W] (its element shape is unknown).
    return tf.cond(count > 0, paste_all, lambda: tf.zeros(tf.stack([0, height, width]), tf.bool))


def unmold_detections_graph(detections, mrcnn_mask, original_hw, molded_hw, window,
                            mask_threshold=0.5, attribute_scores=None):
    """MaskRCNN.unmold_detections in TensorFlow, for one image.

    detections: [D, (y1, x1, y2, x2, class_id, score)] normalized, zero-padded;
    mrcnn_mask: [D, mh, mw, NUM_CLASSES]; original_hw, molded_hw: int32 [2]; window: int32 [4]
    pixels of the image in the molded image; mask_threshold: DETECTION_MASK_THRESHOLD.
    attribute_scores: optional [D, NUM_ATTRIBUTES] of the detections.
    Returns boxes int32 [N, 4] pixels of the original image, class_ids int32 [N], scores
    float32 [N], masks bool [H, W, N]; with attribute_scores, a fifth value: the kept
    detections' attribute_scores float32 [N, NUM_ATTRIBUTES].
    """
    detections = tf.cast(detections, tf.float32)
    # The first row with class id 0 starts the padding.
    padding = tf.cast(tf.where(tf.equal(detections[:, 4], 0.0))[:, 0], tf.int32)
    n = tf.reduce_min(tf.concat([padding, tf.shape(detections)[:1]], axis=0))
    boxes = detections[:n, :4]
    class_ids = tf.cast(detections[:n, 4], tf.int32)
    scores = detections[:n, 5]
    masks = tf.gather(mrcnn_mask[:n], class_ids, axis=3, batch_dims=1)   # [n, mh, mw]

    # Normalized molded coordinates -> pixels of the original image (float32 window math, then
    # denorm_boxes' float64 product and round half to even, as the numpy code).
    mh, mw = tf.cast(molded_hw[0], tf.float64), tf.cast(molded_hw[1], tf.float64)
    window_n = tf.cast((tf.cast(window, tf.float64) - [0.0, 0.0, 1.0, 1.0])
                       / tf.stack([mh - 1, mw - 1, mh - 1, mw - 1]), tf.float32)
    wy1, wx1, wy2, wx2 = window_n[0], window_n[1], window_n[2], window_n[3]
    boxes = (boxes - tf.stack([wy1, wx1, wy1, wx1])) / tf.stack(
        [wy2 - wy1, wx2 - wx1, wy2 - wy1, wx2 - wx1])
    oh, ow = tf.cast(original_hw[0], tf.float64), tf.cast(original_hw[1], tf.float64)
    boxes = tf.cast(tf.round(tf.cast(boxes, tf.float64) * tf.stack([oh - 1, ow - 1, oh - 1, ow - 1])
                             + [0.0, 0.0, 1.0, 1.0]), tf.int32)

    # Drop boxes of zero area (possible after clipping to the window).
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = tf.where(area > 0)[:, 0]
    boxes, class_ids, scores, masks = [tf.gather(t, keep)
                                       for t in (boxes, class_ids, scores, masks)]
    full_masks = paste_masks_graph(masks, boxes, original_hw, mask_threshold)  # [N, H, W]
    result = (boxes, class_ids, scores, tf.transpose(full_masks, [1, 2, 0]))
    if attribute_scores is None:
        return result
    return result + (tf.gather(tf.cast(attribute_scores, tf.float32)[:n], keep),)


############################################################
#  The serving function and the export
############################################################

IMAGE_SPEC = tf.TensorSpec([None, None, 3], tf.uint8, name="image")


def _check_exportable(model):
    config = model.config
    if getattr(model, "mode", "inference") != "inference":
        raise ExportError("export needs a model built in inference mode "
                          "(MaskRCNN(mode='inference', ...)), not %r" % model.mode)
    if config.IMAGE_RESIZE_MODE not in SUPPORTED_RESIZE_MODES:
        raise ExportError("IMAGE_RESIZE_MODE %r cannot be exported (supported: %s); set "
                          "IMAGE_RESIZE_MODE in the inference config"
                          % (config.IMAGE_RESIZE_MODE, ", ".join(SUPPORTED_RESIZE_MODES)))
    if int(config.IMAGE_CHANNEL_COUNT) != 3:
        raise ExportError("export serves RGB images: IMAGE_CHANNEL_COUNT must be 3, not %r"
                          % config.IMAGE_CHANNEL_COUNT)
    if config.IMAGE_RESIZE_MODE == "pad64" and config.IMAGE_MIN_DIM \
            and config.IMAGE_MIN_DIM % 64:
        raise ExportError("pad64 mode needs IMAGE_MIN_DIM to be a multiple of 64, got %r"
                          % config.IMAGE_MIN_DIM)
    if config.IMAGE_RESIZE_MODE != "square" and callable(config.BACKBONE):
        anchors_graph(config, tf.constant([64, 64]))                 # raises ExportError


def make_serving_function(model):
    """The serving function of an inference MaskRCNN: a tf.function of one uint8 image
    [H, W, 3] (any size, one trace for all sizes) returning the dict of outputs described in
    the module docstring. Raises ExportError for a model it cannot serve."""
    _check_exportable(model)
    config = model.config
    keras_model = model.keras_model
    mean_pixel = tf.constant(np.asarray(config.MEAN_PIXEL, np.float32).reshape(3))
    square_anchors = None
    if config.IMAGE_RESIZE_MODE == "square":
        # One molded size, so one set of anchors: the very array detect() feeds.
        square_anchors = np.asarray(model.get_anchors(config.IMAGE_SHAPE), np.float32)

    def serve(image):
        original_hw = tf.shape(image)[:2]
        molded, window, scale = resize_image_graph(image, config)   # [h, w, 3], [4], []
        molded_hw = tf.shape(molded)[:2]
        if config.IMAGE_RESIZE_MODE == "none":
            tf.debugging.assert_equal(
                tf.math.floormod(molded_hw, 64), 0,
                message="IMAGE_RESIZE_MODE 'none' needs image sides divisible by 64")
        molded = molded - mean_pixel                                  # data.mold_image
        meta = compose_image_meta_graph(original_hw, molded_hw, window, scale,
                                         int(config.NUM_CLASSES))
        if square_anchors is not None:
            anchors = tf.constant(square_anchors)                     # [A, 4]
        else:
            anchors = anchors_graph(config, molded_hw)
        outputs = keras_model([molded[None], meta[None], anchors[None]], training=False)
        detections, mrcnn_mask = outputs[0][0], outputs[3][0]       # [D, 6], [D, mh, mw, C]
        with_attributes = bool(config.NUM_ATTRIBUTES)
        unmolded = unmold_detections_graph(
            detections, mrcnn_mask, original_hw, molded_hw, window,
            mask_threshold=float(config.DETECTION_MASK_THRESHOLD),
            attribute_scores=outputs[7][0] if with_attributes else None)  # [D, A]
        boxes, class_ids, scores, masks = unmolded[:4]
        result = {"boxes": boxes, "class_ids": class_ids, "scores": scores, "masks": masks,
                  "num_detections": tf.shape(class_ids)[0]}
        if with_attributes:
            result["attribute_scores"] = unmolded[4]                  # [N, A]
            result["attributes"] = unmolded[4] >= float(config.DETECTION_ATTRIBUTE_THRESHOLD)
        return result

    return tf.function(serve, input_signature=[IMAGE_SPEC])


def config_to_json(config):
    """The configuration as JSON-friendly values (arrays as lists, callables by name)."""
    def plain(value):
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if callable(value):
            return getattr(value, "__qualname__", repr(value))
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return repr(value)
    return {name: plain(value) for name, value in config.to_dict().items()}


def export_saved_model(model, output_dir, class_names=None, overwrite=False, verbose=True):
    """Write a SavedModel of `model` (an inference MaskRCNN with its weights loaded).

    output_dir: a new or empty folder (or any folder with overwrite=True, which replaces it).
    class_names: names by class id (index 0 "BG"); default "BG", "class_1", ...
    Writes the SavedModel and config.json. Signatures: "serving_default", image uint8
    [H, W, 3] -> boxes, class_ids, scores, masks, num_detections (also the loaded object's
    `serve(image)`); "metadata", () -> class_names, config_json. Returns output_dir.
    Raises ExportError for a model it cannot serve, FileExistsError for a non-empty folder.
    """
    config = model.config
    num_classes = int(config.NUM_CLASSES)
    if class_names is None:
        class_names = ["BG"] + ["class_%d" % i for i in range(1, num_classes)]
    class_names = [str(n) for n in class_names]
    if len(class_names) != num_classes:
        raise ExportError("class_names has %d names but NUM_CLASSES is %d"
                          % (len(class_names), num_classes))
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise FileExistsError("export output is a file, not a folder: %s" % output_dir)
        if os.listdir(output_dir):
            if not overwrite:
                raise FileExistsError("export folder is not empty: %s (choose a new folder "
                                      "or overwrite it)" % output_dir)
            shutil.rmtree(output_dir)

    serve = make_serving_function(model)                              # checks the model
    serving = serve.get_concrete_function()                           # one trace, any size
    info = {
        "format": "mrcnn SavedModel",
        "format_version": EXPORT_FORMAT_VERSION,
        "input": {"name": "image", "dtype": "uint8", "shape": [None, None, 3],
                  "note": "one RGB image of any size"},
        "outputs": {
            "boxes": "int32 [N, 4] (y1, x1, y2, x2) pixels of the input image, y2/x2 exclusive",
            "class_ids": "int32 [N], index into class_names",
            "scores": "float32 [N]",
            "masks": "bool [H, W, N] at the input image's size",
            "num_detections": "int32 [] N",
        },
        "num_attributes": int(config.NUM_ATTRIBUTES),
        "class_names": class_names,
        "mask_head": config.MASK_HEAD,
        "backbone": config_to_json(config)["BACKBONE"],
        "image_resize_mode": config.IMAGE_RESIZE_MODE,
        "config": config_to_json(config),
    }
    if config.NUM_ATTRIBUTES:
        info["outputs"]["attribute_scores"] = (
            "float32 [N, NUM_ATTRIBUTES] sigmoid probability of each attribute id")
        info["outputs"]["attributes"] = (
            "bool [N, NUM_ATTRIBUTES] attribute_scores >= %g (DETECTION_ATTRIBUTE_THRESHOLD)"
            % config.DETECTION_ATTRIBUTE_THRESHOLD)
    info_json = json.dumps(info, indent=1)

    def metadata():
        return {"class_names": tf.constant(class_names), "config_json": tf.constant(info_json)}

    metadata = tf.function(metadata, input_signature=[])
    # A plain tf.Module holding exactly the variables the serving graph reads. (Keras'
    # ExportArchive stores every weight twice, as the Keras variable and as the tf.Variable
    # under it: twice the size on disk.)
    module = tf.Module()
    module.serve = serve
    module.metadata = metadata
    module.model_variables = list(serving.variables)
    tmp = output_dir.rstrip("/\\") + ".tmp-export"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    tf.saved_model.save(module, tmp, signatures={
        "serving_default": serving, "metadata": metadata.get_concrete_function()})
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(info_json)
    if os.path.isdir(output_dir):
        os.rmdir(output_dir)                                          # empty (checked above)
    os.replace(tmp, output_dir)
    if verbose:
        print("SavedModel written to %s (signatures: serving_default, metadata; "
              "input image uint8 [H, W, 3]; outputs boxes, class_ids, scores, masks [H, W, N], "
              "num_detections)" % output_dir)
    return output_dir
