"""Mask R-CNN numpy / OpenCV helpers: boxes, IoU, NMS, anchors, resizing, masks, RLE, AP; Dataset.

The public functions keep matterport's names, signatures and return conventions, so code written
for `mrcnn.utils` of matterport's Mask_RCNN runs unchanged. Everything is vectorised numpy or
OpenCV (no per-pixel Python loops); TensorFlow is imported only by `batch_slice`, so the data
loader's worker processes can import this module cheaply.

Conventions (stated once for the whole package):

- boxes: `(y1, x1, y2, x2)`. In numpy code they are pixel coordinates with y2/x2 *exclusive*
  (a box of one pixel at (y, x) is `(y, x, y + 1, x + 1)`), so its area is `(y2-y1) * (x2-x1)`.
  Inside the graph they are normalized to [0, 1] with `norm_boxes` / `denorm_boxes`.
- instance masks: bool arrays `[H, W, N]`, one channel per instance.
- RLE strings (Kaggle / iMaterialist `EncodedPixels`): space-separated `start length` pairs;
  starts are 1-indexed; pixels are numbered top to bottom, then left to right (column-major).

Errors raised here (each message names the image / row and what is wrong):
    RLEError(ValueError)      a malformed RLE string
    MaskError(ValueError)     a mask or box that cannot be used (wrong shape, zero-area box)
    ImageLoadError(IOError)   an image file that is missing, empty, truncated or undecodable
    DownloadError(IOError)    a file that could not be downloaded (names it, its URL and where
                              to put it by hand)
"""

import io
import logging
import os
import random
import re
import sys
import urllib.request
import warnings

import cv2
import numpy as np

from mrcnn.errors import MrcnnError

__all__ = [
    "RLEError", "MaskError", "ImageLoadError", "DownloadError",
    "extract_bboxes", "compute_iou", "compute_overlaps", "compute_overlaps_masks",
    "non_max_suppression", "apply_box_deltas", "box_refinement", "box_refinement_graph",
    "resize", "resize_image", "resize_mask", "minimize_mask", "expand_mask", "unmold_mask",
    "generate_anchors", "generate_pyramid_anchors", "trim_zeros",
    "compute_matches", "compute_ap", "compute_ap_range", "compute_recall",
    "norm_boxes", "denorm_boxes", "batch_slice",
    "COCO_MODEL_URL", "download_trained_weights",
    "rle_encode", "rle_decode", "read_image", "Dataset", "log",
]

# matterport's released COCO weights (Mask R-CNN 2.0 release): ResNet101-FPN, 81 classes.
COCO_MODEL_URL = "https://github.com/matterport/Mask_RCNN/releases/download/v2.0/mask_rcnn_coco.h5"


############################################################
#  Errors
############################################################

class RLEError(MrcnnError, ValueError):
    """A run-length encoded mask string that is malformed (the message says where and why)."""


class MaskError(MrcnnError, ValueError):
    """A mask or box that cannot be used: wrong shape, zero-area box, mismatched sizes."""


class ImageLoadError(MrcnnError, IOError):
    """An image file that is missing, empty, truncated or cannot be decoded.

    Attributes: `path` (the file) and `image_id` (the dataset's image id, or None).
    """

    def __init__(self, message, path=None, image_id=None):
        super().__init__(message)
        self.path = path
        self.image_id = image_id

    def __str__(self):
        return self.args[0] if self.args else ""


class DownloadError(MrcnnError, IOError):
    """A file that could not be downloaded (offline, HTTP error, cut-off transfer).

    The message names the file, the URL and the path to put a copy at by hand; `hint` says
    the same in one line. Attributes: `url`, `path`.
    """

    def __init__(self, message, url=None, path=None, hint=None):
        super().__init__(message)
        self.url = url
        self.path = path
        self.hint = hint

    def __str__(self):
        return self.args[0] if self.args else ""


############################################################
#  Bounding boxes
############################################################

def extract_bboxes(mask):
    """Tight bounding boxes of instance masks.

    mask: [height, width, num_instances], bool or 0/1.
    Returns: int32 [num_instances, (y1, x1, y2, x2)], y2/x2 exclusive (one past the last pixel).
    An empty instance gets the box (0, 0, 0, 0).
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise MaskError("extract_bboxes expects masks [H, W, N], got shape %s" % (mask.shape,))
    h, w, n = mask.shape
    rows = np.any(mask, axis=1)             # [H, N]: instance i has a pixel in row y
    cols = np.any(mask, axis=0)             # [W, N]
    present = rows.any(axis=0)              # [N]
    y1 = np.argmax(rows, axis=0)
    y2 = h - np.argmax(rows[::-1], axis=0)
    x1 = np.argmax(cols, axis=0)
    x2 = w - np.argmax(cols[::-1], axis=0)
    boxes = np.stack([y1, x1, y2, x2], axis=1).astype(np.int32)
    boxes[~present] = 0
    return boxes.reshape(n, 4)


def _box_areas(boxes):
    boxes = np.asarray(boxes, dtype=np.float64)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def compute_iou(box, boxes, box_area, boxes_area):
    """IoU of one box with an array of boxes.

    box: [4] (y1, x1, y2, x2); boxes: [N, 4]; box_area: float, area of `box`;
    boxes_area: [N], areas of `boxes` (passed in so callers compute them once).
    Returns: float64 [N]. A pair with zero union gets IoU 0.
    """
    box = np.asarray(box, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    y1 = np.maximum(box[0], boxes[:, 0])
    y2 = np.minimum(box[2], boxes[:, 2])
    x1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[3], boxes[:, 3])
    intersection = np.maximum(y2 - y1, 0) * np.maximum(x2 - x1, 0)
    union = box_area + np.asarray(boxes_area, dtype=np.float64) - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def compute_overlaps(boxes1, boxes2):
    """IoU overlaps between two sets of boxes.

    boxes1: [N1, (y1, x1, y2, x2)]; boxes2: [N2, (y1, x1, y2, x2)].
    Returns: float32 [N1, N2] (computed in float32: IoU to about 1e-6). A pair with zero union
    gets 0. Work goes in cache-sized blocks of boxes1 rows, so anchors x GT boxes
    (262k x 100) takes about 0.1 s and little temporary memory.
    """
    b1 = np.asarray(boxes1, dtype=np.float32).reshape(-1, 4)
    b2 = np.asarray(boxes2, dtype=np.float32).reshape(-1, 4)
    n1, n2 = len(b1), len(b2)
    overlaps = np.zeros((n1, n2), dtype=np.float32)
    if n1 == 0 or n2 == 0:
        return overlaps
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    tiny = np.finfo(np.float32).tiny
    rows = max(1, (1 << 16) // n2)
    for s in range(0, n1, rows):
        c = b1[s:s + rows]
        inter = np.minimum(c[:, 2:3], b2[:, 2])                 # [rows, N2]
        inter -= np.maximum(c[:, 0:1], b2[:, 0])
        np.maximum(inter, 0, out=inter)                         # intersection height
        w = np.minimum(c[:, 3:4], b2[:, 3])
        w -= np.maximum(c[:, 1:2], b2[:, 1])
        np.maximum(w, 0, out=w)
        inter *= w                                              # intersection area
        union = area1[s:s + rows, None] + area2[None, :]
        union -= inter
        np.maximum(union, tiny, out=union)                      # 0 / tiny = 0 for empty pairs
        np.divide(inter, union, out=overlaps[s:s + rows])
    return overlaps


def compute_overlaps_masks(masks1, masks2):
    """IoU overlaps between two sets of masks, by one matrix product.

    masks1: [H, W, N1]; masks2: [H, W, N2] (bool or 0/1, same H and W).
    Returns: float32 [N1, N2] (float64 past 2**24 covered pixels). A pair of two empty masks
    gets IoU 0.
    """
    masks1 = np.asarray(masks1)
    masks2 = np.asarray(masks2)
    if masks1.ndim != 3 or masks2.ndim != 3:
        raise MaskError("compute_overlaps_masks expects masks [H, W, N], got shapes %s and %s"
                        % (masks1.shape, masks2.shape))
    n1, n2 = masks1.shape[-1], masks2.shape[-1]
    if n1 == 0 or n2 == 0:
        return np.zeros((n1, n2), dtype=np.float32)
    if masks1.shape[:2] != masks2.shape[:2]:
        raise MaskError("compute_overlaps_masks: mask sizes differ: %s vs %s"
                        % (masks1.shape[:2], masks2.shape[:2]))
    m1 = masks1.reshape(-1, n1) > 0
    m2 = masks2.reshape(-1, n2) > 0
    # Only pixels covered by some mask contribute: drop the rest before the float product.
    used = m1.any(axis=1) | m2.any(axis=1)
    # float32 counts pixels exactly up to 2**24; more pixels are counted in float64.
    dtype = np.float32 if used.sum() < 2 ** 24 else np.float64
    m1 = m1[used].astype(dtype)
    m2 = m2[used].astype(dtype)
    area1 = m1.sum(axis=0)
    area2 = m2.sum(axis=0)
    intersections = m1.T @ m2                                  # [N1, N2]
    union = area1[:, None] + area2[None, :] - intersections
    return np.divide(intersections, union, out=np.zeros_like(intersections), where=union > 0)


def non_max_suppression(boxes, scores, threshold):
    """Greedy non-maximum suppression.

    boxes: [N, (y1, x1, y2, x2)]; scores: [N]; threshold: a box is dropped when its IoU with an
    already kept, higher-scoring box is greater than `threshold`.
    Returns: int32 indices of the kept boxes, highest score first (ties: lower index first).
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores)
    if boxes.shape[0] == 0:
        return np.zeros((0,), dtype=np.int32)
    if boxes.dtype.kind != "f":
        boxes = boxes.astype(np.float32)
    area = _box_areas(boxes)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        iou = compute_iou(boxes[i], boxes[rest], area[i], area[rest])
        order = rest[iou <= threshold]
    return np.array(keep, dtype=np.int32)


def apply_box_deltas(boxes, deltas):
    """Apply refinements to boxes.

    boxes: [N, (y1, x1, y2, x2)]; deltas: [N, (dy, dx, log(dh), log(dw))] (unscaled by
    BBOX_STD_DEV). Returns: float [N, (y1, x1, y2, x2)].
    """
    boxes = np.asarray(boxes).astype(np.float32)
    deltas = np.asarray(deltas)
    height = boxes[:, 2] - boxes[:, 0]
    width = boxes[:, 3] - boxes[:, 1]
    center_y = boxes[:, 0] + 0.5 * height + deltas[:, 0] * height
    center_x = boxes[:, 1] + 0.5 * width + deltas[:, 1] * width
    height = height * np.exp(deltas[:, 2])
    width = width * np.exp(deltas[:, 3])
    y1 = center_y - 0.5 * height
    x1 = center_x - 0.5 * width
    return np.stack([y1, x1, y1 + height, x1 + width], axis=1)


def box_refinement(box, gt_box):
    """Refinement that turns `box` into `gt_box` (the inverse of apply_box_deltas).

    box, gt_box: [N, (y1, x1, y2, x2)] with positive heights and widths.
    Returns: float32 [N, (dy, dx, log(dh), log(dw))].
    """
    box = np.asarray(box).astype(np.float32)
    gt_box = np.asarray(gt_box).astype(np.float32)
    height = box[:, 2] - box[:, 0]
    width = box[:, 3] - box[:, 1]
    center_y = box[:, 0] + 0.5 * height
    center_x = box[:, 1] + 0.5 * width
    gt_height = gt_box[:, 2] - gt_box[:, 0]
    gt_width = gt_box[:, 3] - gt_box[:, 1]
    gt_center_y = gt_box[:, 0] + 0.5 * gt_height
    gt_center_x = gt_box[:, 1] + 0.5 * gt_width
    dy = (gt_center_y - center_y) / height
    dx = (gt_center_x - center_x) / width
    dh = np.log(gt_height / height)
    dw = np.log(gt_width / width)
    return np.stack([dy, dx, dh, dw], axis=1).astype(np.float32)


def box_refinement_graph(box, gt_box):
    """box_refinement in TensorFlow (matterport keeps it here; it lives in mrcnn.layers).

    box, gt_box: [..., (y1, x1, y2, x2)] tensors. Returns float32 [..., (dy, dx, log(dh),
    log(dw))]. Imports TensorFlow on first use.
    """
    from mrcnn.layers import box_refinement_graph as graph_fn
    return graph_fn(box, gt_box)


############################################################
#  Resizing (OpenCV)
############################################################

# dtypes cv2.resize interpolates natively (INTER_LINEAR / INTER_AREA).
_CV2_RESIZE_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


def _scaled_size(h, w, scale):
    """Output (height, width) of an image of (h, w) scaled by `scale` (shared by image and mask
    resizing so their shapes always agree)."""
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def _cv2_resize(array, size, interpolation):
    """cv2.resize for any number of channels and any numeric/bool dtype.

    array: [H, W] or [H, W, C]; size: (out_h, out_w). Returns an array of the same dtype and
    number of dimensions. Channels are resized in chunks (OpenCV limits them; INTER_AREA to 4
    with non-integer factors); dtypes OpenCV cannot interpolate go through float32/float64.
    """
    out_h, out_w = int(size[0]), int(size[1])
    dtype = array.dtype
    if array.shape[:2] == (out_h, out_w):
        return array.copy()
    if array.ndim == 3 and array.shape[2] == 0:
        return np.zeros((out_h, out_w, 0), dtype=dtype)
    work = array
    if dtype == np.bool_:
        work = array.view(np.uint8) if array.flags.c_contiguous else array.astype(np.uint8)
    elif interpolation != cv2.INTER_NEAREST_EXACT and dtype.type not in _CV2_RESIZE_DTYPES:
        work = array.astype(np.float64 if dtype.itemsize >= 4 else np.float32)

    def run(a):
        r = cv2.resize(np.ascontiguousarray(a), (out_w, out_h), interpolation=interpolation)
        return r.reshape(out_h, out_w, -1)

    if work.ndim == 2:
        result = run(work)[:, :, 0]
    else:
        c = work.shape[2]
        step = 4 if interpolation == cv2.INTER_AREA else 256
        if c <= step:
            result = run(work)
        else:
            result = np.empty((out_h, out_w, c), dtype=work.dtype)
            for s in range(0, c, step):
                result[:, :, s:s + step] = run(work[:, :, s:s + step])
    if dtype == np.bool_:
        return result.astype(bool)
    if result.dtype != dtype:
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            result = np.clip(np.rint(result), info.min, info.max)
        result = result.astype(dtype)
    return result


def _interpolation(src_hw, dst_hw):
    """INTER_AREA when shrinking (no aliasing), INTER_LINEAR otherwise."""
    if dst_hw[0] <= src_hw[0] and dst_hw[1] <= src_hw[1]:
        return cv2.INTER_AREA
    return cv2.INTER_LINEAR


def resize(image, output_shape, order=1, mode="constant", cval=0, clip=True,
           preserve_range=False, anti_aliasing=False, anti_aliasing_sigma=None):
    """skimage.transform.resize with matterport's defaults (no anti-aliasing).

    image: [H, W] or [H, W, C]; output_shape: (out_h, out_w) (channels are kept).
    order: spline order (0 nearest, 1 bilinear). Like skimage, the result is float64 in
    [0, 1] for integer / bool input unless preserve_range=True (then the input's range).
    A bool image with order > 0 is interpolated as 0.0 / 1.0 floats (what the skimage of
    matterport's days did; newer skimage refuses bool input then).
    Returns the resized array. mrcnn's own resizing (resize_image, masks) uses OpenCV; this
    is for client code that calls matterport's utils.resize.
    """
    from skimage.transform import resize as sk_resize
    image = np.asarray(image)
    if image.dtype == np.bool_ and order != 0:
        image = image.astype(np.float32)
    return sk_resize(image, output_shape, order=order, mode=mode, cval=cval, clip=clip,
                     preserve_range=preserve_range, anti_aliasing=anti_aliasing,
                     anti_aliasing_sigma=anti_aliasing_sigma)


def resize_image(image, min_dim=None, max_dim=None, min_scale=None, mode="square", rng=None):
    """Resize an image keeping its aspect ratio (matterport's semantics, OpenCV resampling).

    image: [H, W, C] (or [H, W]) of any dtype; the output keeps the dtype.
    min_dim: scale up so the shorter side is at least this long.
    max_dim: in "square" mode, the longer side is at most this long (wins over min_dim).
    min_scale: scale up at least by this factor.
    mode:
        "none":   no resizing or padding; the image is returned as is.
        "square": scale, then pad with zeros to [max_dim, max_dim].
        "pad64":  scale, then pad with zeros so both sides are multiples of 64
                  (min_dim / min_scale scale up; max_dim is ignored).
        "crop":   scale (min_dim / min_scale), then take a random [min_dim, min_dim] crop.
    rng: optional `random.Random` or `np.random.Generator` for the crop position.

    Returns (image, window, scale, padding, crop):
        image:   the resized image, same dtype as the input.
        window:  (y1, x1, y2, x2) of the image inside the output (y2/x2 exclusive); the rest
                 is zero padding.
        scale:   the factor the image was scaled by.
        padding: [(top, bottom), (left, right), (0, 0)] added by np.pad.
        crop:    (y, x, h, w) of the crop in the scaled image, or None.

    Resampling: INTER_AREA when shrinking, INTER_LINEAR when enlarging. Scaled size is
    (round(H * scale), round(W * scale)), the same rounding resize_mask uses.
    """
    image = np.asarray(image)
    h, w = image.shape[:2]
    window = (0, 0, h, w)
    scale = 1
    padding = [(0, 0), (0, 0), (0, 0)]
    crop = None

    if mode == "none":
        return image, window, scale, padding, crop
    if mode not in ("square", "pad64", "crop"):
        raise ValueError("resize_image: mode must be none, square, pad64 or crop, not %r" % (mode,))

    if min_dim:
        scale = max(1, min_dim / min(h, w))
    if min_scale and scale < min_scale:
        scale = min_scale
    if max_dim and mode == "square":
        image_max = max(h, w)
        if round(image_max * scale) > max_dim:
            scale = max_dim / image_max

    if scale != 1:
        size = _scaled_size(h, w, scale)
        image = _cv2_resize(image, size, _interpolation((h, w), size))
    h, w = image.shape[:2]

    if mode == "square":
        if not max_dim or h > max_dim or w > max_dim:
            raise ValueError("resize_image: square mode needs max_dim >= the scaled image "
                             "(%d x %d), got max_dim=%r" % (h, w, max_dim))
        top = (max_dim - h) // 2
        left = (max_dim - w) // 2
        padding = [(top, max_dim - h - top), (left, max_dim - w - left), (0, 0)]
        image = np.pad(image, padding[:image.ndim], mode="constant", constant_values=0)
        window = (top, left, h + top, w + left)
    elif mode == "pad64":
        if min_dim is not None and min_dim % 64 != 0:
            raise ValueError("resize_image: pad64 mode needs min_dim to be a multiple of 64, "
                             "got %r" % (min_dim,))
        pad_h = (-h) % 64
        pad_w = (-w) % 64
        top, left = pad_h // 2, pad_w // 2
        padding = [(top, pad_h - top), (left, pad_w - left), (0, 0)]
        image = np.pad(image, padding[:image.ndim], mode="constant", constant_values=0)
        window = (top, left, h + top, w + left)
    else:  # crop
        if not min_dim or h < min_dim or w < min_dim:
            raise ValueError("resize_image: crop mode needs min_dim <= the scaled image "
                             "(%d x %d), got min_dim=%r" % (h, w, min_dim))
        if rng is None:
            y = random.randint(0, h - min_dim)
            x = random.randint(0, w - min_dim)
        elif isinstance(rng, np.random.Generator):
            y = int(rng.integers(0, h - min_dim + 1))
            x = int(rng.integers(0, w - min_dim + 1))
        else:
            y = rng.randint(0, h - min_dim)
            x = rng.randint(0, w - min_dim)
        crop = (y, x, min_dim, min_dim)
        image = image[y:y + min_dim, x:x + min_dim]
        window = (0, 0, min_dim, min_dim)
    return image, window, scale, padding, crop


def resize_mask(mask, scale, padding, crop=None):
    """Resize masks by the scale and padding (or crop) that resize_image returned.

    mask: [H, W, N] (or [H, W]) bool or 0/1 of the original image size.
    Returns masks of the resized image's size, same dtype. Shrinking averages the pixels each
    output pixel covers (INTER_AREA) and keeps pixels at least half covered; enlarging is
    nearest-neighbour (pixel-centre aligned, INTER_NEAREST_EXACT).
    """
    mask = np.asarray(mask)
    h, w = mask.shape[:2]
    if scale != 1:
        size = _scaled_size(h, w, scale)
        if size[0] <= h and size[1] <= w and mask.dtype.kind in "bui":
            # Area average of 0/1 values, rounded: keeps pixels at least half covered.
            ones = (mask != 0).view(np.uint8)
            mask = _cv2_resize(ones, size, cv2.INTER_AREA).astype(mask.dtype)
        else:
            mask = _cv2_resize(mask, size, cv2.INTER_NEAREST_EXACT)
    if crop is not None:
        y, x, ch, cw = crop
        mask = mask[y:y + ch, x:x + cw]
    else:
        mask = np.pad(mask, list(padding)[:mask.ndim], mode="constant", constant_values=0)
    return mask


def minimize_mask(bbox, mask, mini_shape):
    """Crop each mask to its box and resize it to `mini_shape` (matterport's mini masks).

    bbox: [N, (y1, x1, y2, x2)] pixel boxes; mask: [H, W, N]; mini_shape: (h, w).
    Returns: bool [h, w, N]. Raises MaskError for a box of zero area.
    """
    mask = np.asarray(mask)
    n = mask.shape[-1]
    mini_mask = np.zeros(tuple(mini_shape) + (n,), dtype=bool)
    for i in range(n):
        y1, x1, y2, x2 = [int(v) for v in bbox[i][:4]]
        m = mask[y1:y2, x1:x2, i]
        if m.size == 0:
            raise MaskError("minimize_mask: instance %d has a box of zero area %s"
                            % (i, (y1, x1, y2, x2)))
        m = (m != 0).astype(np.float32)
        m = _cv2_resize(m, mini_shape, _interpolation(m.shape, mini_shape))
        mini_mask[:, :, i] = m >= 0.5
    return mini_mask


def expand_mask(bbox, mini_mask, image_shape):
    """Paste mini masks back into full-size masks (the inverse of minimize_mask).

    bbox: [N, (y1, x1, y2, x2)]; mini_mask: [h, w, N]; image_shape: (H, W, ...).
    Returns: bool [H, W, N]. Boxes are clipped to the image; an empty box leaves its mask empty.
    """
    mini_mask = np.asarray(mini_mask)
    height, width = int(image_shape[0]), int(image_shape[1])
    n = mini_mask.shape[-1]
    mask = np.zeros((height, width, n), dtype=bool)
    for i in range(n):
        y1, x1, y2, x2 = [int(v) for v in bbox[i][:4]]
        mask[:, :, i] = _paste(mini_mask[:, :, i].astype(np.float32), (y1, x1, y2, x2),
                               (height, width), 0.5)
    return mask


def _paste(small, box, image_hw, threshold, out=None):
    """Resize `small` to the box, threshold it, and place it in an empty [H, W] bool image
    (or in `out`, an all-False [H, W] bool view to write into, which is returned)."""
    y1, x1, y2, x2 = box
    full = np.zeros(image_hw, dtype=bool) if out is None else out
    bh, bw = y2 - y1, x2 - x1
    if bh <= 0 or bw <= 0:
        return full
    m = _cv2_resize(small, (bh, bw), _interpolation(small.shape, (bh, bw))) >= threshold
    # Clip to the image (a box may stick out of it).
    cy1, cx1 = max(y1, 0), max(x1, 0)
    cy2, cx2 = min(y2, image_hw[0]), min(x2, image_hw[1])
    if cy2 > cy1 and cx2 > cx1:
        full[cy1:cy2, cx1:cx2] = m[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]
    return full


def unmold_mask(mask, bbox, image_shape, threshold=0.5):
    """Turn a mask predicted by the mask head into a full-image mask.

    mask: [h, w] float in [0, 1] (e.g. 28x28 sigmoid output); bbox: (y1, x1, y2, x2) pixels;
    image_shape: (H, W, ...). Returns: bool [H, W], True where the resized mask >= threshold
    (config.DETECTION_MASK_THRESHOLD; matterport's 0.5).
    """
    y1, x1, y2, x2 = [int(v) for v in bbox[:4]]
    return _paste(np.asarray(mask, dtype=np.float32), (y1, x1, y2, x2),
                  (int(image_shape[0]), int(image_shape[1])), threshold)


def unmold_masks(masks, boxes, image_shape, threshold=0.5):
    """unmold_mask for N masks at once, written into one array (no per-mask image and no
    stacking: at 1024 x 1024 with 100 detections that copy cost about a second).

    masks: [N, h, w] float in [0, 1]; boxes: [N, (y1, x1, y2, x2)] pixels; image_shape:
    (H, W, ...); threshold: as unmold_mask's. Returns bool [H, W, N].
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    full = np.zeros((height, width, len(masks)), dtype=bool)
    for i, (mask, box) in enumerate(zip(masks, boxes)):
        _paste(np.asarray(mask, dtype=np.float32), tuple(int(v) for v in box[:4]),
               (height, width), threshold, out=full[:, :, i])
    return full


############################################################
#  Anchors
############################################################

def generate_anchors(scales, ratios, shape, feature_stride, anchor_stride):
    """Anchors of one feature map.

    scales: 1-D array of anchor sizes in pixels (e.g. [32, 64, 128]).
    ratios: 1-D array of width/height ratios (e.g. [0.5, 1, 2]).
    shape: [height, width] of the feature map.
    feature_stride: stride of the feature map in image pixels.
    anchor_stride: an anchor set every `anchor_stride` feature-map cells.

    Returns: float [num_anchors, (y1, x1, y2, x2)] in image pixels. Order: positions row by row
    (y, then x), and at each position ratios outer, scales inner — the order of the RPN
    outputs [H, W, anchors_per_location].
    """
    scales, ratios = np.meshgrid(np.array(scales), np.array(ratios))
    scales = scales.flatten()
    ratios = ratios.flatten()
    heights = scales / np.sqrt(ratios)           # [K]
    widths = scales * np.sqrt(ratios)            # [K]
    ys = np.arange(0, shape[0], anchor_stride) * feature_stride
    xs = np.arange(0, shape[1], anchor_stride) * feature_stride
    cy, cx = np.meshgrid(ys, xs, indexing="ij")  # [Y, X]
    centers = np.stack([cy.ravel(), cx.ravel()], axis=1)[:, None, :]   # [P, 1, 2]
    sizes = np.stack([heights, widths], axis=1)[None, :, :]           # [1, K, 2]
    centers, sizes = np.broadcast_arrays(centers, sizes)
    centers = centers.reshape(-1, 2)
    sizes = sizes.reshape(-1, 2)
    return np.concatenate([centers - 0.5 * sizes, centers + 0.5 * sizes], axis=1)


def generate_pyramid_anchors(scales, ratios, feature_shapes, feature_strides, anchor_stride):
    """Anchors of every pyramid level, concatenated (level by level, one scale per level).

    scales: one anchor size per level; ratios: shared by all levels; feature_shapes:
    [levels, (height, width)]; feature_strides: one stride per level.
    Returns: float [total_anchors, (y1, x1, y2, x2)] in image pixels.
    """
    anchors = [generate_anchors(scales[i], ratios, feature_shapes[i], feature_strides[i],
                                anchor_stride) for i in range(len(scales))]
    return np.concatenate(anchors, axis=0)


############################################################
#  Evaluation (matterport's VOC-style AP)
############################################################


def compute_backbone_shapes(config, image_shape=None):
    """[h, w] of each pyramid level (one row per config.BACKBONE_STRIDES) for an image shape
    (default config.IMAGE_SHAPE): ceil(side / stride). With a callable BACKBONE,
    config.COMPUTE_BACKBONE_SHAPE(image_shape) decides when it is set.
    Returns an int numpy array [num_levels, 2].
    """
    if image_shape is None:
        image_shape = config.IMAGE_SHAPE
    if callable(config.BACKBONE) and config.COMPUTE_BACKBONE_SHAPE is not None:
        return np.asarray(config.COMPUTE_BACKBONE_SHAPE(image_shape))
    # A named backbone (config checks it is registered) has strides BACKBONE_STRIDES.
    return np.array([[int(np.ceil(image_shape[0] / stride)),
                      int(np.ceil(image_shape[1] / stride))]
                     for stride in config.BACKBONE_STRIDES])


def trim_zeros(x):
    """Drop the all-zero rows (padding) of a 2-D array [N, ...]."""
    x = np.asarray(x)
    assert x.ndim == 2, "trim_zeros expects a 2-D array, got shape %s" % (x.shape,)
    return x[~np.all(x == 0, axis=1)]


def compute_matches(gt_boxes, gt_class_ids, gt_masks,
                    pred_boxes, pred_class_ids, pred_scores, pred_masks,
                    iou_threshold=0.5, score_threshold=0.0):
    """Match predictions to ground truth (greedy, highest score first, by mask IoU).

    gt_boxes [G, 4], gt_class_ids [G], gt_masks [H, W, G]; pred_boxes [P, 4],
    pred_class_ids [P], pred_scores [P], pred_masks [H, W, P]. All-zero boxes (padding) are
    trimmed first. A prediction matches the unmatched GT of the same class with the highest
    IoU >= iou_threshold; GT candidates with IoU < score_threshold are skipped (matterport's
    naming).

    Returns (gt_match, pred_match, overlaps):
        gt_match: [G] index of the matched prediction (in score order) or -1.
        pred_match: [P] index of the matched GT, or -1; predictions sorted by score, descending.
        overlaps: [P, G] mask IoUs, predictions in score order.
    """
    gt_boxes = trim_zeros(np.asarray(gt_boxes).reshape(-1, 4))
    gt_masks = np.asarray(gt_masks)[..., :gt_boxes.shape[0]]
    pred_boxes = trim_zeros(np.asarray(pred_boxes).reshape(-1, 4))
    pred_scores = np.asarray(pred_scores)[:pred_boxes.shape[0]]
    order = np.argsort(-pred_scores, kind="stable")
    pred_boxes = pred_boxes[order]
    pred_class_ids = np.asarray(pred_class_ids)[order]
    pred_scores = pred_scores[order]
    pred_masks = np.asarray(pred_masks)[..., order]
    gt_class_ids = np.asarray(gt_class_ids)

    overlaps = compute_overlaps_masks(pred_masks, gt_masks)
    pred_match = -1 * np.ones([pred_boxes.shape[0]])
    gt_match = -1 * np.ones([gt_boxes.shape[0]])
    for i in range(len(pred_boxes)):
        candidates = np.argsort(-overlaps[i], kind="stable")
        low = np.where(overlaps[i, candidates] < score_threshold)[0]
        if low.size > 0:
            candidates = candidates[:low[0]]
        for j in candidates:
            if gt_match[j] > -1:
                continue
            if overlaps[i, j] < iou_threshold:
                break
            if pred_class_ids[i] == gt_class_ids[j]:
                gt_match[j] = i
                pred_match[i] = j
                break
    return gt_match, pred_match, overlaps


def compute_ap(gt_boxes, gt_class_ids, gt_masks,
               pred_boxes, pred_class_ids, pred_scores, pred_masks,
               iou_threshold=0.5):
    """Average precision at one IoU threshold (matterport / VOC 2010+ all-point interpolation).

    Arguments as compute_matches. Returns (mAP, precisions, recalls, overlaps):
        mAP: float, area under the interpolated precision-recall curve.
        precisions, recalls: the curve with sentinels, [P + 2] each
            (precisions made monotonically decreasing).
        overlaps: [P, G] mask IoUs.
    With no ground truth the AP is undefined and returned as nan.
    """
    gt_match, pred_match, overlaps = compute_matches(
        gt_boxes, gt_class_ids, gt_masks, pred_boxes, pred_class_ids, pred_scores, pred_masks,
        iou_threshold)
    hits = np.cumsum(pred_match > -1)
    precisions = hits / (np.arange(len(pred_match)) + 1)
    recalls = hits.astype(np.float32) / max(len(gt_match), 1)   # all 0 when there is no GT
    precisions = np.concatenate([[0], precisions, [0]])
    recalls = np.concatenate([[0], recalls, [1]])
    # Interpolate: precision at recall r is the best precision at any recall >= r.
    precisions = np.maximum.accumulate(precisions[::-1])[::-1]
    if len(gt_match) == 0:
        return float("nan"), precisions, recalls, overlaps
    steps = np.where(recalls[:-1] != recalls[1:])[0] + 1
    mAP = float(np.sum((recalls[steps] - recalls[steps - 1]) * precisions[steps]))
    return mAP, precisions, recalls, overlaps


def compute_ap_range(gt_box, gt_class_id, gt_mask,
                     pred_box, pred_class_id, pred_score, pred_mask,
                     iou_thresholds=None, verbose=1):
    """Mean of compute_ap over IoU thresholds (default 0.5:0.05:0.95). Returns a float."""
    if iou_thresholds is None:
        iou_thresholds = np.arange(0.5, 1.0, 0.05)
    aps = []
    for t in iou_thresholds:
        ap, _, _, _ = compute_ap(gt_box, gt_class_id, gt_mask,
                                 pred_box, pred_class_id, pred_score, pred_mask,
                                 iou_threshold=t)
        if verbose:
            print("AP @{:.2f}:\t {:.3f}".format(t, ap))
        aps.append(ap)
    ap = float(np.array(aps).mean())
    if verbose:
        print("AP @{:.2f}-{:.2f}:\t {:.3f}".format(iou_thresholds[0], iou_thresholds[-1], ap))
    return ap


def compute_recall(pred_boxes, gt_boxes, iou):
    """Recall of boxes at an IoU threshold.

    pred_boxes: [N, (y1, x1, y2, x2)]; gt_boxes: [G, (y1, x1, y2, x2)]; iou: threshold.
    Returns (recall, positive_ids): the fraction of GT boxes that are the best match of some
    prediction with IoU >= iou, and the indices of those predictions.
    """
    overlaps = compute_overlaps(pred_boxes, gt_boxes)
    gt_count = np.asarray(gt_boxes).reshape(-1, 4).shape[0]
    if overlaps.shape[0] == 0 or gt_count == 0:
        return (0.0 if gt_count else float("nan")), np.zeros((0,), dtype=np.int64)
    iou_max = np.max(overlaps, axis=1)
    iou_argmax = np.argmax(overlaps, axis=1)
    positive_ids = np.where(iou_max >= iou)[0]
    matched_gt_boxes = iou_argmax[positive_ids]
    recall = len(set(matched_gt_boxes.tolist())) / gt_count
    return recall, positive_ids


############################################################
#  Normalized coordinates and TF batching
############################################################

def norm_boxes(boxes, shape):
    """Pixel boxes -> normalized boxes.

    boxes: [..., (y1, x1, y2, x2)] pixels (y2/x2 exclusive); shape: (height, width).
    Returns float32 [..., 4]: (y1, x1, y2 - 1, x2 - 1) / (h - 1, w - 1, h - 1, w - 1), so the
    image spans [0, 1] with (0, 0, 1, 1) the whole image.
    """
    h, w = shape[0], shape[1]
    scale = np.array([h - 1, w - 1, h - 1, w - 1])
    shift = np.array([0, 0, 1, 1])
    return np.divide(np.asarray(boxes) - shift, scale).astype(np.float32)


def denorm_boxes(boxes, shape):
    """Normalized boxes -> int32 pixel boxes (the inverse of norm_boxes, rounded)."""
    h, w = shape[0], shape[1]
    scale = np.array([h - 1, w - 1, h - 1, w - 1])
    shift = np.array([0, 0, 1, 1])
    return np.around(np.multiply(np.asarray(boxes), scale) + shift).astype(np.int32)


def batch_slice(inputs, graph_fn, batch_size, names=None):
    """Run `graph_fn` on each item of a batch and stack the results (TensorFlow).

    inputs: a tensor or a list of tensors, each with the batch on axis 0.
    graph_fn: called with one slice of each input; returns a tensor or a list/tuple of them.
    batch_size: number of slices (a Python int).
    names: optional names of the stacked outputs.
    Returns one stacked tensor, or a list of them when graph_fn returns several.
    """
    import tensorflow as tf

    if not isinstance(inputs, list):
        inputs = [inputs]
    outputs = []
    for i in range(batch_size):
        output_slice = graph_fn(*[x[i] for x in inputs])
        if not isinstance(output_slice, (tuple, list)):
            output_slice = [output_slice]
        outputs.append(output_slice)
    outputs = list(zip(*outputs))
    if names is None:
        names = [None] * len(outputs)
    result = [tf.stack(o, axis=0, name=n) for o, n in zip(outputs, names)]
    if len(result) == 1:
        result = result[0]
    return result


############################################################
#  Pretrained weights
############################################################

def _fetch(url, timeout):
    """Open `url` for reading (urllib: http(s):// and file:// URLs). Returns the response."""
    return urllib.request.urlopen(url, timeout=timeout)


def _copy_with_progress(response, out, verbose, chunk=1 << 20):
    """Copy a response into a file, printing MB done (and % when the size is announced).
    Returns (bytes written, announced size or None)."""
    total = response.headers.get("Content-Length") if getattr(response, "headers", None) \
        else None
    total = int(total) if total and str(total).isdigit() else None
    done, shown = 0, -1
    while True:
        block = response.read(chunk)
        if not block:
            break
        out.write(block)
        done += len(block)
        if verbose:
            if total:
                percent = int(100 * done / total)
                if percent != shown:
                    shown = percent
                    sys.stdout.write("\r  %.1f / %.1f MB (%d%%)" % (done / 1e6, total / 1e6,
                                                                   percent))
                    sys.stdout.flush()
            else:
                sys.stdout.write("\r  %.1f MB" % (done / 1e6))
                sys.stdout.flush()
    if verbose:
        sys.stdout.write("\n")
    return done, total


def download_trained_weights(coco_model_path, verbose=1, url=None, timeout=20):
    """Download matterport's COCO-trained weights (mask_rcnn_coco.h5) to `coco_model_path`.

    coco_model_path: the file to write; its folder is created if needed.
    verbose: 0 silent; 1 prints where the file goes and a progress line.
    url: the file to fetch, default COCO_MODEL_URL (looked up at call time).
    timeout: seconds allowed for connecting and for each read. Offline the call fails at
        once instead of hanging.
    The data goes to a partial file (coco_model_path + ".tmp", mrcnn.checkpoints'
    partial name) that is renamed into place only once complete (and as long as the server
    announced), so coco_model_path never holds a truncated download and a failed one
    leaves nothing behind. Returns coco_model_path.
    Raises DownloadError naming the file, the URL and where to put a copy fetched elsewhere.
    """
    import http.client
    from mrcnn.checkpoints import atomic_path

    url = COCO_MODEL_URL if url is None else url
    path = os.fspath(coco_model_path)
    name = os.path.basename(path) or path
    if verbose > 0:
        print("Downloading pretrained model to %s ..." % path)
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with atomic_path(path) as partial:
            with _fetch(url, timeout) as response, open(partial, "wb") as out:
                done, total = _copy_with_progress(response, out, verbose)
            if total is not None and done != total:
                raise OSError("transfer cut off after %d of %d bytes" % (done, total))
            if done == 0:
                raise OSError("the server sent an empty file")
    except (OSError, ValueError, http.client.HTTPException) as e:
        where = os.path.abspath(path)
        hint = "download %s on a machine with internet access and copy it to %s" % (url, where)
        raise DownloadError(
            "could not download %s from %s (%s: %s). Offline? Download it elsewhere and put "
            "it at %s." % (name, url, type(e).__name__, e, where),
            url=url, path=where, hint=hint) from None
    if verbose > 0:
        print("... done downloading pretrained model!")
    return path


############################################################
#  Run-length encoding (Kaggle / iMaterialist)
############################################################

def rle_encode(mask):
    """Encode a mask as a Kaggle RLE string.

    mask: [H, W] bool (or anything, nonzero = on).
    Returns "start length start length ...": starts 1-indexed, pixels numbered column-major
    (top to bottom, then left to right). An empty mask gives "".
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise MaskError("rle_encode expects one mask [H, W], got shape %s" % (mask.shape,))
    pixels = np.zeros(mask.size + 2, dtype=np.int8)
    pixels[1:-1] = (mask != 0).ravel(order="F")
    # Positions (1-indexed pixel numbers) where the value changes: run starts and run ends.
    changes = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    changes[1::2] -= changes[0::2]
    return " ".join(map(str, changes.tolist()))


_RLE_CHARS = re.compile(r"[0-9\s-]*")
_RLE_TOKEN = re.compile(r"-?[0-9]+")


def _rle_context(image_id, where):
    parts = []
    if image_id is not None:
        parts.append("image %s" % (image_id,))
    if where:
        parts.append(str(where))
    return ("RLE of %s: " % ", ".join(parts)) if parts else "RLE: "


def rle_decode(rle, shape, image_id=None, where=None):
    """Decode a Kaggle RLE string into a mask.

    rle: "start length start length ..." (starts 1-indexed, column-major pixel numbers);
         "" (or only whitespace) is an empty mask.
    shape: (height, width) of the mask.
    image_id, where: optional, named in error messages (e.g. image_id="abc.jpg",
         where="train.csv row 17").
    Returns: bool [height, width] (C-contiguous).
    Raises RLEError for a non-string, an odd number of tokens, non-integer tokens, a start < 1,
    a length < 1, a run past height * width, or runs that are unsorted or overlap (touching
    runs are accepted). A malformed string never yields a mask.
    """
    ctx = _rle_context(image_id, where)
    try:
        height, width = int(shape[0]), int(shape[1])
    except (TypeError, ValueError, IndexError):
        raise RLEError("%sshape must be (height, width), got %r" % (ctx, shape)) from None
    if height < 1 or width < 1:
        raise RLEError("%sshape must be positive, got %r" % (ctx, tuple(shape)))
    if not isinstance(rle, str):
        raise RLEError("%sexpected a string, got %r (%s)" % (ctx, rle, type(rle).__name__))
    tokens = rle.split()
    size = height * width
    if not tokens:
        return np.zeros((height, width), dtype=bool)
    if len(tokens) % 2:
        raise RLEError("%sodd number of tokens (%d): 'start length' pairs expected"
                       % (ctx, len(tokens)))
    values = None
    if _RLE_CHARS.fullmatch(rle):
        try:
            values = np.array(tokens, dtype=np.int64)
        except (ValueError, OverflowError):
            pass
    if values is None:
        bad = next((t for t in tokens if not _RLE_TOKEN.fullmatch(t) or len(t) > 18), tokens[0])
        raise RLEError("%snon-integer token %r" % (ctx, bad)) from None
    starts, lengths = values[0::2], values[1::2]

    def fail(what, idx):
        k = int(idx)
        raise RLEError("%s%s at pair %d ('%d %d')" % (ctx, what, k, starts[k], lengths[k]))

    bad = np.flatnonzero(starts < 1)
    if bad.size:
        fail("start below 1 (starts are 1-indexed)", bad[0])
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        fail("length below 1", bad[0])
    ends = starts + lengths - 1                       # last pixel of each run, 1-indexed
    bad = np.flatnonzero(ends > size)
    if bad.size:
        raise RLEError("%srun past the end of the %dx%d mask (%d pixels) at pair %d ('%d %d')"
                       % (ctx, height, width, size, bad[0], starts[bad[0]], lengths[bad[0]]))
    bad = np.flatnonzero(starts[1:] <= ends[:-1])
    if bad.size:
        k = int(bad[0]) + 1
        what = "unsorted runs" if starts[k] < starts[k - 1] else "overlapping runs"
        fail("%s (previous run ends at %d)" % (what, ends[k - 1]), k)
    # +1 at each run start, -1 after each run end; the running sum is the mask (runs disjoint).
    edges = np.zeros(size + 1, dtype=np.int8)
    edges[starts - 1] = 1
    edges[ends] -= 1   # an end may coincide with the next start (touching runs): 1 - 1 = 0
    flat = np.cumsum(edges[:-1], dtype=np.int8).astype(bool)
    return np.ascontiguousarray(flat.reshape(width, height).T)


############################################################
#  Image reading (OpenCV)
############################################################

_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                  (2, cv2.IMREAD_REDUCED_COLOR_2))


def _header_size(data):
    """(height, width) from the image header without decoding pixels, or None."""
    try:
        from PIL import Image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # DecompressionBombWarning on huge images
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        return int(h), int(w)
    except Exception:  # noqa: BLE001 - unknown to PIL: decode fully instead
        return None


def _jpeg_truncated(data):
    """True for a JPEG whose last scan is not followed by an end-of-image marker.

    Entropy-coded data never contains FF D9 / FF DA (0xFF bytes are stuffed), so a complete
    file has an EOI after its last start-of-scan; trailing bytes after the EOI are allowed.
    """
    if not data.startswith(b"\xff\xd8"):
        return False
    return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda") or data.rfind(b"\xff\xda") < 0


def read_image(path, max_dim=None):
    """Read an image file as RGB uint8, optionally decoding at reduced scale.

    path: the file. max_dim: if given and the longer side of the stored image is at least
    2x / 4x / 8x max_dim, decode at 1/2, 1/4 or 1/8 scale (cv2.IMREAD_REDUCED_COLOR_*; JPEG
    scales in the decoder, so it is several times faster). The decoded longer side stays
    >= max_dim, so a later resize to max_dim only shrinks. The reduced size is
    ceil(H / f) x ceil(W / f) for JPEG and floor(H / f) x floor(W / f) for other formats
    (OpenCV's behaviour): use the returned original size, not a factor, to rescale masks.

    Pixels are in stored order: EXIF orientation is ignored (IMREAD_IGNORE_ORIENTATION), as
    PIL / skimage (matterport's reader) do, so masks annotated on the stored pixels line up.
    Grayscale becomes 3 channels, alpha is dropped, 16-bit becomes 8-bit.

    Returns (image [h, w, 3] uint8 RGB, (original_height, original_width)).
    Raises ImageLoadError naming the path for a missing, empty, truncated or undecodable file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageLoadError("image file not found: %s" % path, path=path) from None
    except OSError as e:
        raise ImageLoadError("cannot read image file %s: %s" % (path, e), path=path) from None
    if not data:
        raise ImageLoadError("image file is empty (0 bytes): %s" % path, path=path)
    if _jpeg_truncated(data):
        raise ImageLoadError("image file is truncated (JPEG without end-of-image marker): %s"
                             % path, path=path)
    flags = cv2.IMREAD_COLOR
    original = None
    if max_dim:
        original = _header_size(data)
        if original is not None:
            longer = max(original)
            for factor, flag in _REDUCED_FLAGS:
                if longer >= factor * max_dim:
                    flags = flag
                    break
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        image = cv2.imdecode(buf, flags | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as e:
        raise ImageLoadError("cannot decode image file %s: %s" % (path, str(e).strip()),
                             path=path) from None
    if image is None and flags != cv2.IMREAD_COLOR:
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        original = None
    if image is None:
        raise ImageLoadError("cannot decode image file (corrupt, truncated or unsupported "
                             "format): %s" % path, path=path)
    if original is None:
        original = image.shape[:2]
    if image.dtype != np.uint8:
        # IMREAD_COLOR already gives 8 bits; keep a guard for other decoders.
        image = (image >> 8).astype(np.uint8) if image.dtype == np.uint16 \
            else np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    else:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image, (int(original[0]), int(original[1]))


############################################################
#  Dataset
############################################################

class Dataset:
    """Base class of datasets (matterport's API).

    Subclass it, call add_class / add_image while loading your annotations, then prepare():

        class ShapesDataset(Dataset):
            def load_shapes(self, count, height, width):
                self.add_class("shapes", 1, "square")
                ...
                self.add_image("shapes", image_id=i, path=None, width=width, height=height)
            def load_mask(self, image_id):
                ...
                return mask, class_ids        # bool [H, W, N], int32 [N]

    Class ids: each source (dataset) has its own ids; prepare() assigns internal ids
    0..num_classes-1 (0 is the background "BG") and builds maps between the two.
    Image ids: internal ids are 0..num_images-1 in the order of add_image.
    """

    def __init__(self, class_map=None):
        self._image_ids = []
        self.image_info = []
        # Background is always the first class.
        self.class_info = [{"source": "", "id": 0, "name": "BG"}]
        self.source_class_ids = {}

    def add_class(self, source, class_id, class_name):
        """Register class `class_id` of `source` (a dataset name without dots) under the
        name `class_name`. A (source, class_id) pair already registered is left as it is."""
        assert "." not in source, "Source name cannot contain a dot"
        for info in self.class_info:
            if info["source"] == source and info["id"] == class_id:
                return  # already registered
        self.class_info.append({"source": source, "id": class_id, "name": class_name})

    def add_image(self, source, image_id, path, **kwargs):
        """Register an image; extra keyword arguments are stored in its image_info dict."""
        image_info = {"id": image_id, "source": source, "path": path}
        image_info.update(kwargs)
        self.image_info.append(image_info)

    def image_reference(self, image_id):
        """A string naming the image for debugging (a URL, a file name...). Override it."""
        return ""

    def prepare(self, class_map=None):
        """Build the internal ids and maps. Call it after adding all classes and images."""
        def clean_name(name):
            """The first comma-separated part of a name ("person, people" -> "person")."""
            return ",".join(name.split(",")[:1])

        self.num_classes = len(self.class_info)
        self.class_ids = np.arange(self.num_classes)
        self.class_names = [clean_name(c["name"]) for c in self.class_info]
        self.num_images = len(self.image_info)
        self._image_ids = np.arange(self.num_images)

        self.class_from_source_map = {"{}.{}".format(info["source"], info["id"]): cid
                                      for info, cid in zip(self.class_info, self.class_ids)}
        self.image_from_source_map = {"{}.{}".format(info["source"], info["id"]): iid
                                      for info, iid in zip(self.image_info, self._image_ids)}

        # Sources in order of first appearance; background (class 0) belongs to every source.
        self.sources = list(dict.fromkeys(c["source"] for c in self.class_info))
        self.source_class_ids = {}
        for source in self.sources:
            self.source_class_ids[source] = [
                i for i, info in enumerate(self.class_info) if i == 0 or info["source"] == source]

    def map_source_class_id(self, source_class_id):
        """Internal class id of a "source.class_id" string, e.g. "coco.12" -> 23."""
        return self.class_from_source_map[source_class_id]

    def get_source_class_id(self, class_id, source):
        """The source's own id of internal class `class_id`."""
        info = self.class_info[class_id]
        assert info["source"] == source, \
            "class %d belongs to source %r, not %r" % (class_id, info["source"], source)
        return info["id"]

    @property
    def image_ids(self):
        return self._image_ids

    def source_image_link(self, image_id):
        """The path or URL of the image."""
        return self.image_info[image_id]["path"]

    def load_image(self, image_id):
        """Load image `image_id` as RGB uint8 [H, W, 3].

        Reads with OpenCV (see read_image): grayscale -> 3 channels, alpha dropped, 16-bit ->
        8-bit, EXIF orientation ignored. Raises ImageLoadError naming the image and its path.
        """
        info = self.image_info[image_id]
        path = info["path"]
        name = "image %s (id %r of source %r)" % (image_id, info.get("id"), info.get("source"))
        if path is None:
            raise ImageLoadError("%s has no path; override load_image for generated images"
                                 % name, path=None, image_id=image_id)
        try:
            image, _ = read_image(path)
        except ImageLoadError as e:
            raise ImageLoadError("%s: %s" % (name, e), path=path, image_id=image_id) from None
        return image

    def load_mask(self, image_id):
        """Instance masks of an image: (bool [H, W, N], int32 class ids [N]).

        Override it for your dataset; the base class returns no instances (an empty
        [0, 0, 0] mask array and no class ids), as matterport's does.
        """
        logging.warning("You are using the default load_mask(), maybe you need to define "
                        "your own one.")
        mask = np.empty([0, 0, 0], dtype=bool)
        class_ids = np.empty([0], np.int32)
        return mask, class_ids


def log(text, array=None):
    """Print a text and, optionally, the shape, range and dtype of a numpy array
    (matterport's mrcnn.model.log, which re-exports it)."""
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
