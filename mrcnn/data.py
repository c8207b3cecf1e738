"""Mask R-CNN input pipeline: image meta, ground truth, RPN targets, augmentation, the loader.

Everything here is numpy / OpenCV; no model code and no Keras layers are imported (Keras is
used only for `keras.utils.PyDataset`, the base class of the loader).

Conventions (the package's, see mrcnn.utils): boxes are (y1, x1, y2, x2) pixel coordinates
with y2/x2 exclusive; instance masks are bool [H, W, N]; images are RGB uint8 [H, W, 3].

Contents:
    compose_image_meta / parse_image_meta   the image_meta vector (matterport's layout)
    mold_image / unmold_image               mean-pixel normalization and its inverse
    load_image_gt                           one training sample: image, meta, classes, boxes, masks
    build_rpn_targets                       anchor labels and box deltas for the RPN losses
    generate_random_rois, build_detection_targets
                                            random ROIs and the heads' targets in numpy
                                            (training without the RPN, inspection)
    apply_augmentation, default_augmentation, MASK_AUGMENTERS
                                            albumentations (default) or imgaug augmenters
    compute_anchors                         the pixel anchors the loader uses
    DataGenerator                           keras.utils.PyDataset feeding MaskRCNN training
    data_generator                          matterport's Python generator of (inputs, outputs)
    SampleLoadError                         a sample that could not be loaded (names the image)
"""

import functools
import inspect
import json
import logging
import math
import mmap
import multiprocessing
import os
import random
import tempfile
import threading
import warnings
import weakref

import cv2
import keras
import numpy as np

from mrcnn import utils
from mrcnn.errors import MrcnnError
from mrcnn.image_meta import compose_image_meta, parse_image_meta  # noqa: F401

__all__ = [
    "compose_image_meta", "parse_image_meta", "mold_image", "unmold_image",
    "load_image_gt", "build_rpn_targets", "generate_random_rois", "build_detection_targets",
    "apply_augmentation", "default_augmentation", "MASK_AUGMENTERS", "compute_anchors",
    "DataGenerator", "data_generator", "SampleLoadError",
]

logger = logging.getLogger("mrcnn.data")


class SampleLoadError(MrcnnError, RuntimeError):
    """A training sample that could not be loaded; the message names the image and the cause."""


############################################################
#  Image meta and molding
############################################################

def mold_image(images, config):
    """Subtract the mean pixel: RGB uint8 images -> float32 network input.

    images: [..., H, W, 3] (any numeric dtype). Returns float32, same shape.
    """
    out = np.array(images, dtype=np.float32)   # a contiguous copy
    _subtract_mean(out, config.MEAN_PIXEL)
    return out


def _subtract_mean(out, mean_pixel):
    """out -= mean_pixel in place, for a C-contiguous float32 [..., W, C] array. The mean is
    tiled along a whole row so numpy's inner loop runs over W * C values, not C (4x faster)."""
    mean = np.asarray(mean_pixel, dtype=np.float32).reshape(-1)
    if out.ndim >= 2 and out.shape[-1] == mean.size and out.flags.c_contiguous and out.size:
        row = out.shape[-2] * out.shape[-1]
        out.reshape(-1, row)[...] -= np.tile(mean, out.shape[-2])
    else:
        out -= mean


def unmold_image(normalized_images, config):
    """Inverse of mold_image: add the mean pixel back, round, clip to [0, 255] -> uint8.

    (matterport truncates with astype(uint8); rounding makes mold -> unmold an exact round
    trip for uint8 images.)
    """
    images = np.asarray(normalized_images, dtype=np.float32) + \
        np.asarray(config.MEAN_PIXEL, np.float32)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


############################################################
#  Loading one sample
############################################################

def _describe(dataset, image_id):
    """A short string naming an image for error messages: id, source id, reference / path."""
    parts = ["image_id %s" % (image_id,)]
    try:
        info = dataset.image_info[image_id]
    except Exception:  # noqa: BLE001 - only for messages
        info = {}
    if info.get("source") is not None or info.get("id") is not None:
        parts.append("(%s %r)" % (info.get("source", "?"), info.get("id")))
    ref = None
    try:
        ref = dataset.image_reference(image_id)
    except Exception:  # noqa: BLE001
        pass
    if not ref:
        ref = info.get("path")
    if ref:
        parts.append("[%s]" % (ref,))
    return " ".join(parts)


@functools.lru_cache(maxsize=64)
def _accepts_max_dim(func):
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return "max_dim" in params


def _decode_max_dim(config):
    """The longest side the decoded image needs, or None when reduced-scale decoding cannot
    help. Only "square" mode ever shrinks (pad64 / crop / none scale by >= 1), and there the
    resized image's longer side is at most IMAGE_MAX_DIM."""
    if config.IMAGE_RESIZE_MODE == "square" and config.IMAGE_MAX_DIM:
        return int(config.IMAGE_MAX_DIM)
    return None


def _load_image(dataset, config, image_id):
    """Load an image, at reduced scale when the dataset allows it.

    Returns (image RGB uint8 [h, w, 3], (orig_h, orig_w)): the decoded image may be smaller
    than the original (its masks keep the original size).

    Reduced-scale decoding is used when (a) the dataset's load_image accepts a `max_dim`
    keyword (it may return an image or (image, (orig_h, orig_w))), or (b) the dataset uses
    the base class's load_image and the image has a path (utils.read_image decodes JPEGs at
    1/2, 1/4 or 1/8 scale when the file is at least that much larger than needed).
    """
    max_dim = _decode_max_dim(config)
    load = dataset.load_image
    func = getattr(load, "__func__", load)
    if max_dim and _accepts_max_dim(func):
        out = load(image_id, max_dim=max_dim)
    elif max_dim and func is utils.Dataset.load_image and \
            dataset.image_info[image_id].get("path") is not None:
        path = dataset.image_info[image_id]["path"]
        try:
            out = utils.read_image(path, max_dim=max_dim)
        except utils.ImageLoadError as e:
            raise utils.ImageLoadError("%s: %s" % (_describe(dataset, image_id), e),
                                       path=path, image_id=image_id) from None
    else:
        out = load(image_id)
    if isinstance(out, tuple) and len(out) == 2:
        image, orig_hw = out
        orig_hw = (int(orig_hw[0]), int(orig_hw[1]))
    else:
        image, orig_hw = out, None
    if image is None:
        raise utils.ImageLoadError("%s: load_image returned None" % _describe(dataset, image_id),
                                   image_id=image_id)
    image = np.asarray(image)
    if image.ndim == 2:
        image = cv2.cvtColor(_as_uint8(image), cv2.COLOR_GRAY2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise utils.ImageLoadError("%s: expected an RGB image [H, W, 3], got shape %s"
                                   % (_describe(dataset, image_id), image.shape),
                                   image_id=image_id)
    image = _as_uint8(image)
    if orig_hw is None:
        orig_hw = image.shape[:2]
    return image, orig_hw


def _as_uint8(image):
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    return np.clip(image, 0, 255).astype(np.uint8)


def _load_mask(dataset, image_id, orig_hw):
    """dataset.load_mask with checks. Returns (mask bool-ish [H, W, N], class_ids int32 [N])."""
    mask, class_ids = dataset.load_mask(image_id)
    mask = np.asarray(mask)
    class_ids = np.asarray(class_ids).reshape(-1).astype(np.int32)
    if mask.ndim == 2:
        mask = mask[:, :, None]
    if mask.ndim != 3:
        raise utils.MaskError("%s: load_mask returned masks of shape %s, expected [H, W, N]"
                              % (_describe(dataset, image_id), mask.shape))
    n = mask.shape[2]
    if n != len(class_ids):
        raise utils.MaskError("%s: load_mask returned %d masks but %d class ids"
                              % (_describe(dataset, image_id), n, len(class_ids)))
    if n and tuple(mask.shape[:2]) != tuple(orig_hw):
        raise utils.MaskError("%s: mask size %dx%d differs from the image size %dx%d"
                              % (_describe(dataset, image_id), mask.shape[0], mask.shape[1],
                                 orig_hw[0], orig_hw[1]))
    if mask.dtype != np.bool_:
        mask = mask != 0
    return mask, class_ids


class _Geometry:
    """Where original pixels land in the output (resized, padded or cropped) image.

    The resized image (before padding / cropping) has rh x rw pixels; its visible part is
    rows [vy, vy + vh) and columns [vx, vx + vw), placed at (oy, ox) in the output.
    src_y[k] / src_x[k] are the original row / column sampled for visible row / column k:
    nearest neighbour at pixel centres, floor((k + 0.5) * H / rh).
    """

    def __init__(self, orig_hw, out_shape, window, crop, decoded_hw, scale_decoded):
        oh, ow = orig_hw
        if crop is not None:
            rh = max(1, int(round(decoded_hw[0] * scale_decoded)))
            rw = max(1, int(round(decoded_hw[1] * scale_decoded)))
            vy, vx, vh, vw = crop
            oy, ox = 0, 0
        else:
            rh, rw = window[2] - window[0], window[3] - window[1]
            vy, vx, vh, vw = 0, 0, rh, rw
            oy, ox = window[0], window[1]
        self.out_hw = tuple(out_shape[:2])
        self.offset = (int(oy), int(ox))
        ys = np.arange(vy, vy + vh, dtype=np.float64)
        xs = np.arange(vx, vx + vw, dtype=np.float64)
        self.src_y = np.minimum(((ys + 0.5) * (oh / rh)).astype(np.int64), oh - 1)
        self.src_x = np.minimum(((xs + 0.5) * (ow / rw)).astype(np.int64), ow - 1)
        self.scale = rh / oh   # the overall factor from the original image


def _rows_any(mask):
    """mask.any(axis=1) for bool [H, W, N], ~10x faster: OR-fold the W axis in halves, so
    every step runs over long contiguous blocks. Returns bool [H, N]."""
    x = mask
    while x.shape[1] > 1:
        w = x.shape[1]
        half = w // 2
        y = x[:, :half] | x[:, half:2 * half]
        if w % 2:
            y[:, 0] |= x[:, w - 1]
        x = y
    return x[:, 0] if x.shape[1] == 1 else np.zeros((x.shape[0], x.shape[2]), dtype=bool)


def _instance_crops(mask, geometry):
    """Resample each instance mask into the output geometry, touching only its box.

    mask: bool [H, W, N] at the original size. Returns a list with, per instance, None
    (the instance vanished) or (box (y1, x1, y2, x2) in output pixels, bool crop
    [y2 - y1, x2 - x1]); the crop equals the nearest-resampled full mask cut at its tight box.
    """
    n = mask.shape[2]
    if n == 0:
        return []
    rows_any = _rows_any(mask)    # [H, N]
    cols_any = mask.any(axis=0)   # [W, N]
    src_y, src_x = geometry.src_y, geometry.src_x
    oy, ox = geometry.offset
    out = []
    for i in range(n):
        ry = np.flatnonzero(rows_any[src_y, i])
        rx = np.flatnonzero(cols_any[src_x, i])
        if ry.size == 0 or rx.size == 0:
            out.append(None)
            continue
        y1, y2, x1, x2 = ry[0], ry[-1] + 1, rx[0], rx[-1] + 1
        # Rows / columns that hold pixels in the original may still miss the sampled grid.
        crop = mask[src_y[y1:y2, None], src_x[None, x1:x2], i]
        r = np.flatnonzero(crop.any(axis=1))
        if r.size == 0:
            out.append(None)
            continue
        c = np.flatnonzero(crop.any(axis=0))
        crop = crop[r[0]:r[-1] + 1, c[0]:c[-1] + 1]
        box = (oy + y1 + r[0], ox + x1 + c[0], oy + y1 + r[-1] + 1, ox + x1 + c[-1] + 1)
        out.append((box, crop))
    return out


def _rle_runs(rle, shape, name):
    """Runs of a Kaggle RLE string as 0-indexed [start, end) column-major pixel numbers.

    Malformed strings are handed to utils.rle_decode, which raises RLEError saying why.
    Returns (starts int64 [R], ends int64 [R]).
    """
    size = int(shape[0]) * int(shape[1])
    if isinstance(rle, str):
        tokens = rle.split()
        if not tokens:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(tokens) % 2 == 0:
            try:
                values = np.array(tokens, dtype=np.int64)
            except (ValueError, OverflowError):
                values = None
            if values is not None:
                starts = values[0::2] - 1
                ends = starts + values[1::2]
                if (starts.min() >= 0 and values[1::2].min() >= 1 and ends.max() <= size
                        and not np.any(starts[1:] < ends[:-1])):
                    return starts, ends
    utils.rle_decode(rle, shape, image_id=name)   # raises RLEError with the reason
    raise utils.RLEError("RLE of %s: not a valid RLE string" % name)


def _rle_crop(starts, ends, orig_hw, geometry):
    """Resample one RLE mask straight into the output geometry, without a full-size mask.

    Each run is split into column pieces (column x, rows [y0, y1)); a piece covers the output
    rows j with y0 <= src_y[j] < y1 of the output columns k with src_x[k] == x: a rectangle.
    The union of the rectangles is exactly the nearest-resampled mask (the same pixels as
    _instance_crops of the decoded mask). Returns None or (box, bool crop) like it.
    """
    if starts.size == 0:
        return None
    h = int(orig_hw[0])
    x0 = starts // h
    x1 = (ends - 1) // h
    pieces = x1 - x0 + 1
    if np.any(pieces > 1):
        run = np.repeat(np.arange(len(starts)), pieces)
        step = np.arange(len(run)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        col = x0[run] + step
        y0 = np.where(step == 0, starts[run] - x0[run] * h, 0)
        y1 = np.where(col == x1[run], ends[run] - x1[run] * h, h)
    else:
        col, y0, y1 = x0, starts - x0 * h, ends - x0 * h
    src_y, src_x = geometry.src_y, geometry.src_x
    j0 = np.searchsorted(src_y, y0, side="left")
    j1 = np.searchsorted(src_y, y1, side="left")
    k0 = np.searchsorted(src_x, col, side="left")
    k1 = np.searchsorted(src_x, col, side="right")
    ok = (j1 > j0) & (k1 > k0)
    if not np.any(ok):
        return None
    j0, j1, k0, k1 = j0[ok], j1[ok], k0[ok], k1[ok]
    by1, by2, bx1, bx2 = int(j0.min()), int(j1.max()), int(k0.min()), int(k1.max())
    bh, bw = by2 - by1, bx2 - bx1
    ncols = k1 - k0
    if np.any(ncols > 1):   # enlarging: one original column feeds several output columns
        rect = np.repeat(np.arange(len(k0)), ncols)
        k = k0[rect] + np.arange(len(rect)) - np.repeat(np.cumsum(ncols) - ncols, ncols)
        j0, j1 = j0[rect], j1[rect]
    else:
        k = k0
    # +1 where a rectangle starts, -1 where it ends, per column; a cumulative sum down the
    # rows fills them. Start (and end) positions are unique: the pieces of one original
    # column are disjoint and each output column samples one original column.
    edges = np.zeros(((bh + 1) * bw,), dtype=np.int8)
    c = k - bx1
    edges[(j0 - by1) * bw + c] += 1
    edges[(j1 - by1) * bw + c] -= 1
    crop = np.cumsum(edges.reshape(bh + 1, bw)[:bh], axis=0, dtype=np.int8) > 0
    oy, ox = geometry.offset
    return (oy + by1, ox + bx1, oy + by2, ox + bx2), crop


def _load_instances(dataset, image_id, orig_hw, geometry):
    """Instance crops in the output geometry (see _instance_crops) and class ids int32 [N].

    Uses dataset.load_mask_rle(image_id) when the dataset has it and it returns
    (rles: list of N RLE strings, class_ids [N], (height, width)) — masks are then resampled
    straight from the runs, never decoded at full size; returning None falls back to
    load_mask (e.g. for images whose RLE needs special handling).
    """
    loader = getattr(dataset, "load_mask_rle", None)
    out = loader(image_id) if callable(loader) else None
    if out is None:
        mask, class_ids = _load_mask(dataset, image_id, orig_hw)
        return _instance_crops(mask, geometry), class_ids
    rles, class_ids, shape = out
    class_ids = np.asarray(class_ids).reshape(-1).astype(np.int32)
    if len(rles) != len(class_ids):
        raise utils.MaskError("%s: load_mask_rle returned %d masks but %d class ids"
                              % (_describe(dataset, image_id), len(rles), len(class_ids)))
    shape = (int(shape[0]), int(shape[1]))
    if len(rles) and shape != tuple(orig_hw):
        raise utils.MaskError("%s: mask size %dx%d differs from the image size %dx%d"
                              % (_describe(dataset, image_id), shape[0], shape[1],
                                 orig_hw[0], orig_hw[1]))
    name = _describe(dataset, image_id)
    crops = []
    for i, rle in enumerate(rles):
        starts, ends = _rle_runs(rle, shape, "%s, mask %d" % (name, i))
        crops.append(_rle_crop(starts, ends, shape, geometry))
    return crops, class_ids


def _mini_mask(crop, mini_shape):
    """Resize one box crop (bool [h, w]) to mini_shape: INTER_AREA when shrinking, bilinear
    when enlarging, kept where >= 0.5 (utils.minimize_mask's rule)."""
    mh, mw = int(mini_shape[0]), int(mini_shape[1])
    src = crop.view(np.uint8) * np.uint8(255) if crop.flags.c_contiguous else \
        crop.astype(np.uint8) * np.uint8(255)
    interp = cv2.INTER_AREA if (mh <= crop.shape[0] and mw <= crop.shape[1]) \
        else cv2.INTER_LINEAR
    return cv2.resize(src, (mw, mh), interpolation=interp) >= 128


def _coin(rng):
    """A fair coin: True or False, from rng (np.random Generator / RandomState) or from
    Python's `random` when rng is None (matterport's legacy flip)."""
    if rng is None:
        return random.randint(0, 1) == 1
    if isinstance(rng, np.random.Generator):
        return bool(rng.integers(2))
    return bool(rng.randint(2))


def _flip_left_right(image, window, crops):
    """Mirror an image [H, W, 3], its window (y1, x1, y2, x2) and its instance crops (see
    _instance_crops) left-right. Returns (image, window, crops)."""
    w = image.shape[1]
    image = np.ascontiguousarray(image[:, ::-1])
    y1, x1, y2, x2 = window
    window = (y1, w - x2, y2, w - x1)
    flipped = []
    for item in crops:
        if item is None:
            flipped.append(None)
            continue
        (by1, bx1, by2, bx2), crop = item
        flipped.append(((by1, w - bx2, by2, w - bx1), np.ascontiguousarray(crop[:, ::-1])))
    return image, window, flipped


def _full_masks(crops, out_hw):
    """Paste instance crops into full output-size masks: bool [H, W, N]."""
    full = np.zeros((out_hw[0], out_hw[1], len(crops)), dtype=bool)
    for i, item in enumerate(crops):
        if item is not None:
            (y1, x1, y2, x2), crop = item
            full[y1:y2, x1:x2, i] = crop
    return full


def load_attributes_multi_hot(dataset, image_id, num_instances, num_attributes):
    """The instances' attributes as multi-hot bool [num_instances, num_attributes].

    dataset.load_attributes(image_id) gives one sequence of attribute ids per instance of
    load_mask (e.g. a list of tuples, as samples/fashion's FashionDataset); a dataset without
    load_attributes gives instances without attributes (all False). Raises utils.MaskError
    on a count that differs from the masks' or an id outside [0, num_attributes).
    """
    multi_hot = np.zeros((num_instances, num_attributes), dtype=bool)
    loader = getattr(dataset, "load_attributes", None)
    if not callable(loader):
        return multi_hot
    attributes = loader(image_id)
    if len(attributes) != num_instances:
        raise utils.MaskError("%s: load_attributes returned %d instances but the masks %d"
                              % (_describe(dataset, image_id), len(attributes), num_instances))
    for i, ids in enumerate(attributes):
        ids = np.asarray(list(ids), dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= num_attributes):
            raise utils.MaskError("%s: instance %d has attribute ids %s outside [0, %d) "
                                  "(NUM_ATTRIBUTES)" % (_describe(dataset, image_id), i,
                                                        ids.tolist(), num_attributes))
        multi_hot[i, ids] = True
    return multi_hot


def load_image_gt(dataset, config, image_id, augment=False, augmentation=None,
                  use_mini_mask=False, rng=None, with_attributes=False):
    """Load and resize an image and its ground truth (matterport's load_image_gt).

    dataset: a utils.Dataset (prepared). config: a Config. image_id: internal image id.
    augment: deprecated (as in matterport): True flips the image and its masks left-right
        with probability 0.5, and warns (FutureWarning). Use `augmentation` instead.
    augmentation: None, an albumentations transform (e.g. default_augmentation()) or an imgaug
        augmenter (see apply_augmentation). Applied after resizing (and after the `augment`
        flip), as in matterport.
    use_mini_mask: False (matterport's default): masks of the resized image's size; True:
        mini masks of config.MINI_MASK_SHAPE. The loader passes config.USE_MINI_MASK.
    with_attributes: True adds a sixth value, the instances' attributes bool [N,
        config.NUM_ATTRIBUTES] multi-hot (load_attributes_multi_hot), aligned with the other
        values (the same instances dropped). The loader passes it when NUM_ATTRIBUTES > 0.
    rng: optional np.random.Generator for the random parts (crop position, `augment` flip,
        augmentation seed); the loader passes one derived from (seed, epoch, image) for
        reproducibility. Without it they draw from Python's `random` (crop, flip) as
        matterport does.

    Returns:
        image: uint8 [H, W, 3], resized and padded per IMAGE_RESIZE_MODE (config.IMAGE_SHAPE
            in "square" mode).
        image_meta: float64 [IMAGE_META_SIZE] (compose_image_meta); original_image_shape is
            the size of the stored image and scale the factor from it, even when the image
            was decoded at reduced scale. A flip (`augment`) mirrors the window too.
        class_ids: int32 [N] (negative ids mark crowd boxes, as the dataset gives them).
        bbox: int32 [N, (y1, x1, y2, x2)] tight boxes of the masks (y2/x2 exclusive).
        mask: bool [H, W, N] (use_mini_mask False) or bool [MINI_MASK_SHAPE[0],
            MINI_MASK_SHAPE[1], N] mini masks, each box crop resized (use_mini_mask True).
    Instances whose masks vanish after resizing / augmentation are dropped.

    Raises utils.ImageLoadError (unreadable image) or utils.MaskError (masks of the wrong
    size or count), naming the image.

    Masks are resampled by nearest neighbour at pixel centres (resize_mask shrinks by area
    majority instead: the two differ only along boundaries).

    Speed: the image is decoded at reduced scale when possible (see _load_image) and resized
    with OpenCV; without augmentation each mask is resampled only inside its box and the
    mini mask is resized from that crop, so no full-size resized mask is ever built. A
    dataset with RLE annotations can also offer `load_mask_rle(image_id)` -> (list of N RLE
    strings, class_ids [N], (height, width)) (or None to use load_mask): the masks are then
    resampled straight from the runs, never decoded at full size (see _load_instances).
    """
    image, orig_hw = _load_image(dataset, config, image_id)
    decoded_hw = image.shape[:2]
    image, window, scale, _padding, crop = utils.resize_image(
        image, min_dim=config.IMAGE_MIN_DIM, min_scale=config.IMAGE_MIN_SCALE,
        max_dim=config.IMAGE_MAX_DIM, mode=config.IMAGE_RESIZE_MODE, rng=rng)
    geometry = _Geometry(orig_hw, image.shape, window, crop, decoded_hw, scale)
    crops, class_ids = _load_instances(dataset, image_id, orig_hw, geometry)
    attributes = None
    if with_attributes:
        attributes = load_attributes_multi_hot(dataset, image_id, len(class_ids),
                                               int(config.NUM_ATTRIBUTES))

    if augment:
        warnings.warn("load_image_gt: augment=True (a random left-right flip) is deprecated, "
                      "as in matterport; pass augmentation= instead (e.g. albumentations' "
                      "HorizontalFlip(p=0.5))", FutureWarning, stacklevel=2)
        if _coin(rng):
            image, window, crops = _flip_left_right(image, window, crops)

    if augmentation is None:
        keep = [i for i, c in enumerate(crops) if c is not None]
        class_ids = class_ids[keep]
        if attributes is not None:
            attributes = attributes[keep]
        crops = [crops[i] for i in keep]
        bbox = np.array([c[0] for c in crops], dtype=np.int32).reshape(-1, 4)
        if use_mini_mask:
            mini = np.zeros(tuple(config.MINI_MASK_SHAPE) + (len(crops),), dtype=bool)
            for i, (_, c) in enumerate(crops):
                mini[:, :, i] = _mini_mask(c, config.MINI_MASK_SHAPE)
            mask = mini
        else:
            mask = _full_masks(crops, image.shape[:2])
    else:
        # One 2-D mask per instance (vanished ones stay empty), augmented with the image.
        out_hw = image.shape[:2]
        planes = []
        for item in crops:
            plane = np.zeros(out_hw, dtype=np.uint8)
            if item is not None:
                (y1, x1, y2, x2), crop = item
                plane[y1:y2, x1:x2] = crop
            planes.append(plane)
        del crops
        image, planes = _augment(augmentation, image, planes, out_hw, rng=rng)
        boxes = [_tight_box(p) for p in planes]
        keep = [i for i, b in enumerate(boxes) if b is not None]
        class_ids = class_ids[keep]
        if attributes is not None:
            attributes = attributes[keep]
        bbox = np.array([boxes[i] for i in keep], dtype=np.int32).reshape(-1, 4)
        if use_mini_mask:
            mask = np.zeros(tuple(config.MINI_MASK_SHAPE) + (len(keep),), dtype=bool)
            for k, i in enumerate(keep):
                y1, x1, y2, x2 = boxes[i]
                mask[:, :, k] = _mini_mask(planes[i][y1:y2, x1:x2] != 0,
                                           config.MINI_MASK_SHAPE)
        else:
            mask = np.zeros(out_hw + (len(keep),), dtype=bool)
            for k, i in enumerate(keep):
                mask[:, :, k] = planes[i] != 0

    active_class_ids = np.zeros([dataset.num_classes], dtype=np.int32)
    source = dataset.image_info[image_id]["source"]
    active_class_ids[dataset.source_class_ids[source]] = 1
    image_meta = compose_image_meta(image_id, (orig_hw[0], orig_hw[1], 3), image.shape,
                                    window, geometry.scale, active_class_ids)
    if with_attributes:
        return image, image_meta, class_ids.astype(np.int32), bbox, mask, attributes
    return image, image_meta, class_ids.astype(np.int32), bbox, mask


############################################################
#  Augmentation
############################################################

# imgaug augmenters that may be applied to masks (matterport's list): geometric ones only.
MASK_AUGMENTERS = ["Sequential", "SomeOf", "OneOf", "Sometimes", "Fliplr", "Flipud",
                   "CropAndPad", "Affine", "PiecewiseAffine"]


def _imgaug_mask_hook(images, augmenter, parents, default):
    """imgaug activator: only MASK_AUGMENTERS act on masks."""
    return augmenter.__class__.__name__ in MASK_AUGMENTERS


class _HooksImages:
    """Stand-in for imgaug.HooksImages (same attributes) when imgaug is not importable."""

    def __init__(self, activator=None, propagator=None, preprocessor=None, postprocessor=None):
        self.activator = activator
        self.propagator = propagator
        self.preprocessor = preprocessor
        self.postprocessor = postprocessor

    def is_activated(self, images, augmenter, parents, default):
        if self.activator is None:
            return default
        return self.activator(images, augmenter, parents, default)

    def is_propagating(self, images, augmenter, parents, default):
        if self.propagator is None:
            return default
        return self.propagator(images, augmenter, parents, default)

    def preprocess(self, images, augmenter, parents):
        return images if self.preprocessor is None else \
            self.preprocessor(images, augmenter, parents)

    def postprocess(self, images, augmenter, parents):
        return images if self.postprocessor is None else \
            self.postprocessor(images, augmenter, parents)


def _imgaug_hooks():
    try:
        import imgaug  # noqa: F401 - optional; does not import under numpy 2
        return imgaug.HooksImages(activator=_imgaug_mask_hook)
    except Exception:  # noqa: BLE001 - ImportError or imgaug's numpy-2 AttributeError
        return _HooksImages(activator=_imgaug_mask_hook)


def _is_imgaug(augmentation):
    return hasattr(augmentation, "to_deterministic") and hasattr(augmentation, "augment_image")


_AUG_LOCK = threading.Lock()


def apply_augmentation(augmentation, image, masks, rng=None):
    """Augment an image and its instance masks consistently.

    augmentation:
        - an albumentations transform (Compose or a single transform): called as
          augmentation(image=image, masks=[N masks]); masks go through albumentations'
          mask targets, so only geometric (dual) transforms move them (nearest-neighbour)
          and photometric ones (brightness, hue, blur...) leave them untouched.
        - an imgaug augmenter (matterport's interface): det = augmentation.to_deterministic();
          the image goes through det.augment_image, the masks through det.augment_image with
          hooks that enable only MASK_AUGMENTERS.
    image: uint8 [H, W, 3]; masks: bool [H, W, N].
    rng: optional np.random.Generator; with albumentations its next integer seeds the
        transform (Compose.set_random_seed), making the result reproducible.
    Returns (image uint8 [H, W, 3], masks bool [H, W, N]); the shapes must not change
    (a shape-changing transform raises ValueError: the loader needs a fixed image size).
    """
    masks = np.asarray(masks)
    planes = [np.ascontiguousarray(masks[:, :, i]) for i in range(masks.shape[2])]
    image, planes = _augment(augmentation, image, planes, masks.shape[:2], rng)
    out = np.stack(planes, axis=-1) if planes else np.zeros(masks.shape, dtype=bool)
    return image, out != 0


def _augment(augmentation, image, planes, mask_hw, rng=None):
    """apply_augmentation on a list of N 2-D masks (bool or uint8 [H, W]); returns (image,
    list of N 2-D masks, nonzero = on). Lists avoid the slow strided [H, W, N] reductions."""
    image_shape = image.shape
    n = len(planes)
    if _is_imgaug(augmentation):
        det = augmentation.to_deterministic()
        image = det.augment_image(image)
        if n:
            stacked = np.stack([p.view(np.uint8) if p.dtype == np.bool_ else p.astype(np.uint8)
                                for p in planes], axis=-1)
            stacked = np.asarray(det.augment_image(stacked, hooks=_imgaug_hooks()))
            if stacked.ndim == 2:
                stacked = stacked[:, :, None]
            if stacked.shape != tuple(mask_hw) + (n,):
                raise ValueError("augmentation changed the mask shape from %s to %s; use "
                                 "shape-preserving transforms (the loader needs fixed sizes)"
                                 % (tuple(mask_hw) + (n,), stacked.shape))
            planes = [stacked[:, :, i] for i in range(n)]
    elif callable(augmentation):
        kwargs = {"image": image}
        if n:
            kwargs["masks"] = [p.view(np.uint8) if p.dtype == np.bool_ else p for p in planes]
        with _AUG_LOCK:   # set_random_seed + call must not interleave across threads
            if rng is not None and hasattr(augmentation, "set_random_seed"):
                augmentation.set_random_seed(int(rng.integers(1 << 31)))
            result = augmentation(**kwargs)
        image = result["image"]
        if n:
            out = result["masks"]
            planes = [np.asarray(out[i]) for i in range(n)]
            for p in planes:
                if p.shape != tuple(mask_hw):
                    raise ValueError("augmentation changed the mask shape from %s to %s; use "
                                     "shape-preserving transforms (the loader needs fixed sizes)"
                                     % (tuple(mask_hw), p.shape))
    else:
        raise TypeError("augmentation must be an albumentations transform or an imgaug "
                        "augmenter, got %r" % (augmentation,))
    if image.shape != image_shape:
        raise ValueError("augmentation changed the image shape from %s to %s; use "
                         "shape-preserving transforms (the loader needs fixed sizes)"
                         % (image_shape, image.shape))
    return np.ascontiguousarray(image, dtype=np.uint8), planes


def _tight_box(plane):
    """(y1, x1, y2, x2) of the nonzero pixels of a 2-D mask, or None if it is empty."""
    rows = np.flatnonzero(plane.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(plane.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def scale_jitter(image_shape, scale_range=(0.5, 2.0)):
    """Large-scale jitter (Ghiasi et al., "Simple Copy-Paste", 2021) as an albumentations
    pipeline for images of image_shape (the training size, config.IMAGE_SHAPE): rescale by a
    factor drawn uniformly from scale_range (area averaging when shrinking, bilinear when
    growing; masks nearest-neighbour), then crop a random image_shape window out of it, or pad
    it with zeros at a random position when it is smaller. Masks move with the pixels;
    instances that leave the crop are dropped by the loader.
    """
    import albumentations as A
    low, high = (float(v) for v in scale_range)
    if not 0 < low <= high:
        raise ValueError("scale_range must be (low, high) with 0 < low <= high, not %r"
                         % (scale_range,))
    height, width = int(image_shape[0]), int(image_shape[1])
    return A.Compose([
        A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, area_for_downscale="image",
                      p=1.0),
        A.RandomCrop(height, width, pad_if_needed=True, pad_position="random",
                     border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),
    ])


def default_augmentation(scale_range=None, image_shape=None):
    """A sensible albumentations pipeline for instance segmentation.

    Geometric (applied to image and masks, rigid / affine only): horizontal flip (p=0.5);
    small affine (scale 0.9-1.1, translate +-5%, rotate +-5 degrees; p=0.5; zero fill,
    nearest-neighbour masks). Photometric (image only): brightness/contrast +-0.2 (p=0.5),
    hue +-10 / saturation +-15 / value +-10 (p=0.3). Nothing deforms masks non-rigidly.
    scale_range: also large-scale jitter first (scale_jitter(image_shape, scale_range));
    image_shape is then the training size (config.IMAGE_SHAPE).
    """
    import albumentations as A
    jitter = []
    if scale_range is not None:
        if image_shape is None:
            raise ValueError("scale_range needs image_shape (the training size)")
        jitter = [scale_jitter(image_shape, scale_range)]
    return A.Compose(jitter + [
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-5, 5),
                 interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=15, val_shift_limit=10,
                             p=0.3),
    ])


############################################################
#  RPN targets
############################################################

class _AnchorIndex:
    """Finds the anchors that intersect a box without scanning all of them.

    Anchors are grouped by size (height, width). A group laid out on a regular grid (what
    utils.generate_anchors produces: rows of equal y1, columns of equal x1) is stored as a
    [rows, cols] index array, so the anchors meeting a box are one rectangle found by two
    binary searches per axis. Other groups fall back to a scan sorted by y1. The result is
    always a superset of the anchors with a positive intersection, so IoUs computed on it
    equal the full computation.
    """

    def __init__(self, anchors):
        a = np.asarray(anchors, dtype=np.float64)
        self.n = len(a)
        self.grids = []      # (index [R, C], row_y1 [R], row_y2max [R], col_x1 [C], col_x2 [C])
        self.scans = []      # (index [M] sorted by y1, y1, y2, x1, x2, height max)
        if self.n == 0:
            return
        sizes = np.round(np.stack([a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]], axis=1), 6)
        _, inverse = np.unique(sizes, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        groups = np.split(order, bounds)
        if len(groups) > 512:
            self.scans.append(self._scan(a, np.arange(self.n)))
            return
        for idx in groups:
            grid = self._grid(a, idx)
            if grid is None:
                self.scans.append(self._scan(a, idx))
            else:
                self.grids.append(grid)

    @staticmethod
    def _scan(a, idx):
        idx = idx[np.argsort(a[idx, 0], kind="stable")]
        g = a[idx]
        return idx, g[:, 0], g[:, 2], g[:, 1], g[:, 3], float(np.max(g[:, 2] - g[:, 0]))

    @staticmethod
    def _grid(a, idx):
        g = a[idx]
        order = np.lexsort((g[:, 1], g[:, 0]))
        idx, g = idx[order], g[order]
        ys = np.unique(g[:, 0])
        xs = np.unique(g[:, 1])
        if len(ys) * len(xs) != len(idx):
            return None
        index = idx.reshape(len(ys), len(xs))
        gy1 = a[index, 0]
        gx1 = a[index, 1]
        if not (np.all(gy1 == ys[:, None]) and np.all(gx1 == xs[None, :])):
            return None
        y2 = a[index, 2]
        x2 = a[index, 3]
        # Per row / column bounds of y2 / x2 (equal in practice; min/max keep it exact).
        row_y2 = y2.max(axis=1)
        col_x2 = x2.max(axis=0)
        if np.any(np.diff(row_y2) < 0) or np.any(np.diff(col_x2) < 0):
            return None
        areas = (y2 - gy1) * (x2 - gx1)
        return index, ys, row_y2, xs, col_x2, float(areas.min()), float(areas.max())

    def candidate_groups(self, box):
        """Anchors that may intersect `box` (y1, x1, y2, x2), by group, as a list of
        (iou_bound, indices): a superset of the anchors with a positive intersection
        (y1 < box.y2, y2 > box.y1, same for x), and an upper bound of their IoU with the box
        from the areas alone (min(a, b) / max(a, b); 1.0 for the fallback scan)."""
        by1, bx1, by2, bx2 = (float(v) for v in box)
        box_area = max(by2 - by1, 0.0) * max(bx2 - bx1, 0.0)
        parts = []
        for index, ys, row_y2, xs, col_x2, amin, amax in self.grids:
            r0 = np.searchsorted(row_y2, by1, side="right")    # first row with y2 > by1
            r1 = np.searchsorted(ys, by2, side="left")         # rows with y1 < by2
            if r1 <= r0:
                continue
            c0 = np.searchsorted(col_x2, bx1, side="right")
            c1 = np.searchsorted(xs, bx2, side="left")
            if c1 <= c0:
                continue
            denominator = max(amin, box_area)
            bound = min(amax, box_area) / denominator if denominator > 0 else 0.0
            parts.append((bound, index[r0:r1, c0:c1].ravel()))
        for idx, y1, y2, x1, x2, hmax in self.scans:
            lo = np.searchsorted(y1, by1 - hmax - 1.0, side="left")
            hi = np.searchsorted(y1, by2, side="left")
            if hi <= lo:
                continue
            sl = slice(lo, hi)
            keep = (y2[sl] > by1) & (x1[sl] < bx2) & (x2[sl] > bx1)
            parts.append((1.0, idx[sl][keep]))
        return parts

    def candidates(self, box):
        """All candidate indices of candidate_groups(box), concatenated."""
        parts = [idx for _, idx in self.candidate_groups(box)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


_ANCHOR_INDEXES = {}
_ANCHOR_INDEX_LOCK = threading.Lock()


def _anchor_index(anchors):
    """The _AnchorIndex of an anchors array, built once per array (kept while it lives)."""
    key = id(anchors)
    with _ANCHOR_INDEX_LOCK:
        entry = _ANCHOR_INDEXES.get(key)
        if entry is not None and entry[0]() is anchors and entry[2] == anchors.shape:
            return entry[1]
    index = _AnchorIndex(anchors)
    try:
        ref = weakref.ref(anchors)
    except TypeError:
        return index
    with _ANCHOR_INDEX_LOCK:
        for k in [k for k, v in _ANCHOR_INDEXES.items() if v[0]() is None]:
            del _ANCHOR_INDEXES[k]
        _ANCHOR_INDEXES[key] = (ref, index, anchors.shape)
    return index


def build_rpn_targets(image_shape, anchors, gt_class_ids, gt_boxes, config, rng=None):
    """RPN training targets: which anchors are positive / negative and their box deltas.

    image_shape: [H, W, C] (unused, kept for matterport's signature).
    anchors: float [A, (y1, x1, y2, x2)] pixel anchors (compute_anchors).
    gt_class_ids: int [N]; negative ids are crowd boxes (never positive; anchors overlapping
        them are not made negative). gt_boxes: [N, (y1, x1, y2, x2)] pixels.
    config: uses RPN_TRAIN_ANCHORS_PER_IMAGE and RPN_BBOX_STD_DEV.
    rng: np.random.Generator / RandomState for the subsampling (default: np.random).

    Returns:
        rpn_match: int32 [A]; 1 positive, -1 negative, 0 neutral.
        rpn_bbox: float32 [RPN_TRAIN_ANCHORS_PER_IMAGE, (dy, dx, log(dh), log(dw))] deltas of
            the positive anchors (in anchor order) divided by RPN_BBOX_STD_DEV; zero-padded.

    Matterport's rules: IoU < 0.3 with every GT box (and < 0.001 with every crowd box) ->
    negative; IoU >= 0.7 -> positive; the anchor(s) with the highest IoU for each GT box
    (ties included) -> positive; then at most half of RPN_TRAIN_ANCHORS_PER_IMAGE positives
    and the rest negatives, uniform random subsets (drawn as the kept anchors). One
    difference: a GT box that overlaps no anchor at all gets no "best anchor" (matterport
    would mark every non-overlapping anchor positive); with no non-crowd GT box every anchor
    away from crowds is negative.

    IoUs are computed only against anchors that can intersect a box (_AnchorIndex); the
    result equals the full [A, N] computation.
    """
    anchors = np.asarray(anchors)
    num_anchors = anchors.shape[0]
    gt_class_ids = np.asarray(gt_class_ids).reshape(-1)
    gt_boxes = np.asarray(gt_boxes).reshape(-1, 4)
    train_anchors = config.RPN_TRAIN_ANCHORS_PER_IMAGE
    rpn_match = np.zeros([num_anchors], dtype=np.int32)
    rpn_bbox = np.zeros((train_anchors, 4), dtype=np.float32)
    choice = (rng if rng is not None else np.random).choice
    index = _anchor_index(anchors)

    crowd = gt_class_ids < 0
    crowd_boxes = gt_boxes[crowd]
    gt_boxes = gt_boxes[~crowd]

    # Anchors near crowds (IoU >= 0.001 with one) are never negative.
    near_crowd = np.zeros(num_anchors, dtype=bool)
    for box in crowd_boxes:
        idx = index.candidates(box)
        if idx.size:
            iou = utils.compute_overlaps(anchors[idx], box[None])[:, 0]
            near_crowd[idx[iou >= 0.001]] = True

    # Best IoU of each anchor over the GT boxes, where it can matter. Groups of anchors are
    # visited by decreasing IoU bound (area ratio); a group whose bound is below 0.3 and below
    # the best IoU found so far for this box can change nothing: its anchors stay negative or
    # neutral by their other boxes exactly as with their true IoU (< 0.3), and cannot be this
    # box's best anchor. (Margins of 1e-4 cover float32 rounding of the IoUs.)
    best = np.zeros(num_anchors, dtype=np.float32)
    gt_best_anchors = []
    for box in gt_boxes:
        top = 0.0
        tops = []
        for bound, idx in sorted(index.candidate_groups(box), key=lambda p: -p[0]):
            if bound < 0.3 - 1e-4 and bound < top - 1e-4:
                break
            if idx.size == 0:
                continue
            iou = utils.compute_overlaps(anchors[idx], box[None])[:, 0]
            best[idx] = np.maximum(best[idx], iou)
            m = float(iou.max())
            tops.append((m, idx, iou))
            top = max(top, m)
        if top > 0:
            gt_best_anchors.extend(idx[iou == top] for m, idx, iou in tops if m == top)

    rpn_match[(best < 0.3) & ~near_crowd] = -1
    if gt_best_anchors:
        rpn_match[np.concatenate(gt_best_anchors)] = 1
    rpn_match[best >= 0.7] = 1

    # Balance: at most half positives, the rest negatives. A uniform random subset is kept
    # (matterport draws the ones to drop: the same distribution, but drawing the few kept
    # among ~260,000 negatives is much cheaper).
    ids = np.flatnonzero(rpn_match == 1)
    keep = train_anchors // 2
    if len(ids) > keep:
        rpn_match[ids] = 0
        rpn_match[choice(ids, keep, replace=False)] = 1
    ids = np.flatnonzero(rpn_match == -1)
    keep = train_anchors - int(np.sum(rpn_match == 1))
    if len(ids) > keep:
        rpn_match[ids] = 0
        rpn_match[choice(ids, keep, replace=False)] = -1

    ids = np.flatnonzero(rpn_match == 1)
    if ids.size:
        # The GT box of each positive anchor: np.argmax over the full IoUs (the first best).
        best_gt = np.argmax(utils.compute_overlaps(anchors[ids], gt_boxes), axis=1)
        deltas = utils.box_refinement(anchors[ids], gt_boxes[best_gt])
        deltas /= np.asarray(config.RPN_BBOX_STD_DEV, dtype=np.float32)
        rpn_bbox[:len(ids)] = deltas[:train_anchors]
    return rpn_match, rpn_bbox


############################################################
#  Random ROIs and detection targets (training the heads without the RPN, inspection)
############################################################

def _integers(rng, low, high, size):
    """Uniform integers in [low, high) from rng (Generator / RandomState) or np.random."""
    if rng is None:
        return np.random.randint(low, high, size)
    if isinstance(rng, np.random.Generator):
        return rng.integers(low, high, size)
    return rng.randint(low, high, size)


def _random_spans(rng, low, high, count):
    """`count` random (start, end) pairs with low <= start < end < high: two distinct
    integers drawn uniformly from [low, high), sorted (pairs of equal values are drawn
    again). Returns int64 [count, 2]."""
    out = np.zeros((count, 2), dtype=np.int64)
    filled = 0
    while filled < count:
        need = count - filled
        pairs = _integers(rng, low, high, (2 * need + 8, 2))
        pairs = pairs[pairs[:, 0] != pairs[:, 1]][:need]
        out[filled:filled + len(pairs)] = np.sort(pairs, axis=1)
        filled += len(pairs)
    return out


def _span_range(low, high, limit):
    """[low, high) clipped to [0, limit) and widened to at least two values (so that two
    distinct coordinates exist)."""
    low, high = max(int(low), 0), min(int(high), int(limit))
    if high - low < 2:
        low = max(0, min(low, int(limit) - 2))
        high = low + 2
    return low, high


def generate_random_rois(image_shape, count, gt_class_ids, gt_boxes, rng=None):
    """Random ROIs like the proposals of an RPN (matterport's generate_random_rois).

    image_shape: [H, W, ...] of the (resized) image. count: number of ROIs.
    gt_class_ids: [N] class ids (unused, kept for matterport's signature).
    gt_boxes: [N, (y1, x1, y2, x2)] pixel boxes.
    rng: optional np.random.Generator / RandomState (default: np.random).

    int(0.9 * count / N) ROIs per GT box have their corners drawn uniformly from the box
    grown by its own height / width on each side (clipped to the image), so many overlap
    it; the rest (at least 10%) lie anywhere in the image. Each ROI has y1 < y2 and x1 < x2
    with coordinates in [0, H - 1] x [0, W - 1]: every ROI has a positive area and lies
    inside the image. With no GT box all ROIs are anywhere in the image.

    Returns: int32 [count, (y1, x1, y2, x2)] in pixels, the ROIs of GT box 0 first, then
    those of box 1, ..., then the image-wide ones.
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    if height < 2 or width < 2:
        raise ValueError("generate_random_rois: the image (%d x %d) needs at least 2 pixels "
                         "per side" % (height, width))
    count = int(count)
    gt_boxes = np.asarray(gt_boxes).reshape(-1, 4)
    rois = np.zeros((count, 4), dtype=np.int32)
    per_box = int(0.9 * count / len(gt_boxes)) if len(gt_boxes) else 0
    for i, (y1, x1, y2, x2) in enumerate(gt_boxes.astype(np.int64)):
        h, w = y2 - y1, x2 - x1
        ys = _random_spans(rng, *_span_range(y1 - h, y2 + h, height), per_box)
        xs = _random_spans(rng, *_span_range(x1 - w, x2 + w, width), per_box)
        rois[i * per_box:(i + 1) * per_box] = np.stack(
            [ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1]], axis=1)
    rest = count - per_box * len(gt_boxes)
    if rest > 0:
        ys = _random_spans(rng, 0, height, rest)
        xs = _random_spans(rng, 0, width, rest)
        rois[count - rest:] = np.stack([ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1]], axis=1)
    return rois


def _roi_mask_target(source, offset, roi, mask_shape):
    """The mask target of one ROI: the part of `source` (bool [h, w], placed at `offset`
    (y, x) in image pixels) under the ROI (y1, x1, y2, x2), zero outside the source,
    resized to mask_shape (area averaging when shrinking, bilinear when enlarging) and
    thresholded at 0.5. Returns float32 [mask_h, mask_w] of 0 / 1."""
    y1, x1, y2, x2 = (int(v) for v in roi)
    rh, rw = max(y2 - y1, 1), max(x2 - x1, 1)
    canvas = np.zeros((rh, rw), dtype=np.float32)
    oy, ox = offset
    sh, sw = source.shape
    # The overlap of the ROI with the source, in ROI coordinates.
    cy1, cx1 = max(y1, oy), max(x1, ox)
    cy2, cx2 = min(y1 + rh, oy + sh), min(x1 + rw, ox + sw)
    if cy2 > cy1 and cx2 > cx1:
        canvas[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1] = source[cy1 - oy:cy2 - oy,
                                                              cx1 - ox:cx2 - ox]
    mh, mw = int(mask_shape[0]), int(mask_shape[1])
    interp = cv2.INTER_AREA if (mh <= rh and mw <= rw) else cv2.INTER_LINEAR
    resized = cv2.resize(canvas, (mw, mh), interpolation=interp)
    return (resized >= 0.5).astype(np.float32)


def build_detection_targets(rpn_rois, gt_class_ids, gt_boxes, gt_masks, config, rng=None):
    """Targets of the classifier and mask heads for given ROIs, in numpy (matterport's
    build_detection_targets: for inspection and for checking DetectionTargetLayer; training
    builds them in the graph).

    rpn_rois: [R, (y1, x1, y2, x2)] pixel ROIs (e.g. generate_random_rois).
    gt_class_ids: [N] int; 0 (padding) and negative ids (crowd boxes) are ignored.
    gt_boxes: [N, (y1, x1, y2, x2)] pixel boxes.
    gt_masks: bool [h, w, N]: mini masks ([MINI_MASK_SHAPE..., N], each covering its GT box)
        when config.USE_MINI_MASK, else masks of the image's size (as matterport decides).
    config: uses TRAIN_ROIS_PER_IMAGE, ROI_POSITIVE_RATIO, NUM_CLASSES, BBOX_STD_DEV,
        MASK_SHAPE, USE_MINI_MASK.
    rng: optional np.random.Generator / RandomState for the subsampling (default np.random).

    An ROI is positive when its IoU with some GT box is >= 0.5 (DetectionTargetLayer's rule;
    matterport's numpy version used > 0.5) and is then assigned the GT box it overlaps most;
    the others are negative. T = TRAIN_ROIS_PER_IMAGE ROIs are kept: at most
    int(T * ROI_POSITIVE_RATIO) positives (a random subset), then negatives (a random
    subset); if that leaves fewer than T, kept negatives (or positives when there is no
    negative) are repeated at random to fill T, as in matterport.

    Returns (positives first, then negatives, then repeats):
        rois: [T, (y1, x1, y2, x2)] the kept ROIs (dtype of rpn_rois).
        class_ids: int32 [T], the GT class of each positive ROI, 0 for negatives.
        bboxes: float32 [T, NUM_CLASSES, (dy, dx, log(dh), log(dw))]: for a positive ROI, at
            its class, utils.box_refinement(roi, gt_box) / BBOX_STD_DEV; zero elsewhere.
        masks: float32 [T, MASK_SHAPE[0], MASK_SHAPE[1], NUM_CLASSES]: for a positive ROI, at
            its class, its GT mask (the mini mask pasted into its GT box, or the full mask)
            cropped to the ROI, resized to MASK_SHAPE and thresholded at 0.5 (the 0 / 1
            targets DetectionTargetLayer makes; matterport kept the resized values); zero
            elsewhere.
    Raises ValueError if there is no ROI.
    """
    rpn_rois = np.asarray(rpn_rois).reshape(-1, 4)
    if len(rpn_rois) == 0:
        raise ValueError("build_detection_targets: no ROIs given")
    gt_class_ids = np.asarray(gt_class_ids).reshape(-1).astype(np.int32)
    gt_boxes = np.asarray(gt_boxes).reshape(-1, 4)
    gt_masks = np.asarray(gt_masks)
    if gt_masks.ndim != 3 or gt_masks.shape[2] != len(gt_class_ids):
        raise utils.MaskError("build_detection_targets: gt_masks must be [h, w, %d], got %s"
                              % (len(gt_class_ids), gt_masks.shape))
    instances = np.flatnonzero(gt_class_ids > 0)
    gt_class_ids, gt_boxes = gt_class_ids[instances], gt_boxes[instances].astype(np.int64)
    gt_masks = gt_masks[:, :, instances]

    T = int(config.TRAIN_ROIS_PER_IMAGE)
    choice = (rng if rng is not None else np.random).choice
    if len(gt_boxes):
        overlaps = utils.compute_overlaps(rpn_rois, gt_boxes)               # [R, G]
        assigned = np.argmax(overlaps, axis=1)                              # [R]
        best = overlaps[np.arange(len(rpn_rois)), assigned]
    else:
        assigned = np.zeros(len(rpn_rois), dtype=np.int64)
        best = np.zeros(len(rpn_rois), dtype=np.float32)
    fg = np.flatnonzero(best >= 0.5)
    bg = np.flatnonzero(best < 0.5)
    fg_count = int(T * config.ROI_POSITIVE_RATIO)
    if len(fg) > fg_count:
        fg = choice(fg, fg_count, replace=False)
    if len(bg) > T - len(fg):
        bg = choice(bg, T - len(fg), replace=False)
    keep = np.concatenate([fg, bg]).astype(np.int64)
    if len(keep) < T:
        pool = bg if len(bg) else fg
        keep = np.concatenate([keep, choice(pool, T - len(keep), replace=True)])
    positive = np.zeros(T, dtype=bool)
    positive[:len(fg)] = True

    rois = rpn_rois[keep]
    roi_gt = assigned[keep]
    class_ids = np.where(positive, gt_class_ids[roi_gt] if len(gt_boxes) else 0,
                         0).astype(np.int32)
    num_classes = int(config.NUM_CLASSES)
    mask_shape = tuple(int(v) for v in config.MASK_SHAPE)
    bboxes = np.zeros((T, num_classes, 4), dtype=np.float32)
    masks = np.zeros((T,) + mask_shape + (num_classes,), dtype=np.float32)
    pos = np.flatnonzero(positive)
    if pos.size:
        deltas = utils.box_refinement(rois[pos], gt_boxes[roi_gt[pos]])
        bboxes[pos, class_ids[pos]] = deltas / np.asarray(config.BBOX_STD_DEV, np.float32)
    # Each GT mask in image pixels, made once: (bool source, (y, x) offset).
    sources = {}
    for i in pos:
        g = int(roi_gt[i])
        if g not in sources:
            if config.USE_MINI_MASK:
                y1, x1, y2, x2 = gt_boxes[g]
                sources[g] = (utils.expand_mask(np.array([[0, 0, y2 - y1, x2 - x1]]),
                                                gt_masks[:, :, g:g + 1],
                                                (y2 - y1, x2 - x1))[:, :, 0], (y1, x1))
            else:
                sources[g] = (gt_masks[:, :, g] != 0, (0, 0))
        source, offset = sources[g]
        masks[i, :, :, class_ids[i]] = _roi_mask_target(source, offset, rois[i], mask_shape)
    return rois, class_ids, bboxes, masks


############################################################
#  Anchors
############################################################

def compute_anchors(config, image_shape=None):
    """Pixel anchors of every pyramid level: float64 [A, (y1, x1, y2, x2)] (A = 261,888 for
    the default 1024x1024 config). The graph uses the same anchors normalized."""
    shapes = utils.compute_backbone_shapes(config, image_shape)
    return utils.generate_pyramid_anchors(config.RPN_ANCHOR_SCALES, config.RPN_ANCHOR_RATIOS,
                                          shapes, config.BACKBONE_STRIDES,
                                          config.RPN_ANCHOR_STRIDE)


############################################################
#  The loader
############################################################

def _attach_shared(name, shape, dtype):
    """Unpickling side of _SharedArray: an ndarray over the block, which is unlinked at once
    (its memory goes away with the array). On Linux the block is mapped directly (no copy);
    elsewhere it is copied out."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    path = os.path.join("/dev/shm", name.lstrip("/"))
    if os.path.exists(path):
        fd = os.open(path, os.O_RDWR)
        try:
            block = mmap.mmap(fd, max(1, count * dtype.itemsize))
        finally:
            os.close(fd)
        os.unlink(path)
        return np.frombuffer(block, dtype=dtype, count=count).reshape(shape)
    from multiprocessing import shared_memory
    shm = shared_memory.SharedMemory(name=name)
    try:
        view = np.ndarray(shape, dtype=np.dtype(dtype), buffer=shm.buf)
        array = view.copy()
        del view
    finally:
        shm.close()
        shm.unlink()
    return array


class _SharedArray:
    """A worker's output array in POSIX shared memory. It pickles to its name only and
    unpickles (in the training process) into an ordinary ndarray: a memcpy instead of
    pushing ~13 MB per image through the result pipe of the worker pool."""

    def __init__(self, shape, dtype):
        from multiprocessing import shared_memory
        self.shape, self.dtype = tuple(int(v) for v in shape), np.dtype(dtype)
        nbytes = max(1, int(np.prod(self.shape)) * self.dtype.itemsize)
        # Registered with multiprocessing's resource tracker until it is pickled, so a worker
        # killed mid-batch leaks nothing past the tracker's exit.
        self.shm = shared_memory.SharedMemory(create=True, size=nbytes)
        # A new block is zero-filled by the OS.
        self.array = np.ndarray(self.shape, dtype=self.dtype, buffer=self.shm.buf)

    def __reduce__(self):
        from multiprocessing import resource_tracker
        name = self.shm.name
        self.array = None
        self.shm.close()
        try:   # the training process unlinks the block when it unpickles it
            resource_tracker.unregister(self.shm._name, "shared_memory")
        except Exception:  # noqa: BLE001 - bookkeeping only
            pass
        return _attach_shared, (name, self.shape, self.dtype.str)


def _remove_if_owner(path, pid):
    if os.getpid() == pid:
        try:
            os.remove(path)
        except OSError:
            pass


class DataGenerator(keras.utils.PyDataset):
    """Batches for MaskRCNN training: a keras.utils.PyDataset (parallel, index-based).

    generator = DataGenerator(dataset, config, shuffle=True, augmentation=None, seed=0)
    model.fit(generator, ...)   # workers / processes come from the generator

    __getitem__(index) returns a 1-tuple (inputs,) with inputs, in matterport's order:
        batch_images        float32 [B, H, W, 3]  molded (mean pixel subtracted)
        batch_image_meta    float32 [B, IMAGE_META_SIZE]
        batch_rpn_match     int32   [B, A, 1]
        batch_rpn_bbox      float32 [B, RPN_TRAIN_ANCHORS_PER_IMAGE, 4]
        batch_gt_class_ids  int32   [B, MAX_GT_INSTANCES]
        batch_gt_boxes      int32   [B, MAX_GT_INSTANCES, 4]  pixel boxes
        batch_gt_masks      bool    [B, h, w, MAX_GT_INSTANCES]  (h, w) = MINI_MASK_SHAPE
                            with USE_MINI_MASK, else IMAGE_SHAPE[:2]
    then, when config.NUM_ATTRIBUTES > 0 (the training model's input_gt_attributes):
        batch_gt_attributes bool    [B, MAX_GT_INSTANCES, NUM_ATTRIBUTES]  multi-hot, aligned
                            with the instances (dataset.load_attributes; see load_image_gt)
    then, when there are random ROIs (random_rois > 0, or config.USE_RPN_ROIS False):
        batch_rois          int32   [B, R, (y1, x1, y2, x2)]  pixel ROIs (generate_random_rois;
                            R = random_rois, default POST_NMS_ROIS_TRAINING): the training
                            model's `input_roi` when USE_RPN_ROIS is False
    and, with detection_targets (and random ROIs), matterport's extra input and outputs
    (build_detection_targets): __getitem__ returns (inputs, outputs) with inputs ending in
        batch_target_rois   int32   [B, TRAIN_ROIS_PER_IMAGE, 4]
    and outputs
        class_ids           int32   [B, TRAIN_ROIS_PER_IMAGE, 1]
        bbox                float32 [B, TRAIN_ROIS_PER_IMAGE, NUM_CLASSES, 4]
        mask                float32 [B, TRAIN_ROIS_PER_IMAGE, MASK_SHAPE..., NUM_CLASSES]
    (B = batch_size, default config.BATCH_SIZE; unused instance slots are zero.)

    Epochs: len(generator) = ceil(N / B) batches. Batch i of epoch e holds positions
    [i*B, (i+1)*B) of the epoch's permutation, a pure function of (seed, epoch) (identity
    when shuffle=False), so any worker computes any batch independently: no sample is
    duplicated or lost between workers. With pad_last_batch=True (default; the model's graph
    wants a fixed batch size) a short last batch is filled with the first images of the same
    epoch's permutation, so those N_pad = len * B - N images appear twice and every other image
    exactly once; pad_last_batch=False yields a smaller last batch and every image exactly
    once. epoch_plan(epoch) lists the planned image ids per batch. on_epoch_end() advances the
    epoch (set_epoch() sets it, e.g. when resuming). The random parts of a sample (crop,
    augmentation, RPN subsampling) are seeded from (seed, epoch, batch, slot), so a run is
    reproducible whatever the number of workers.

    Samples: load_image_gt + build_rpn_targets. Instances beyond MAX_GT_INSTANCES: the first
    MAX_GT_INSTANCES are kept (matterport keeps a random subset). Images without any
    non-crowd instance are skipped and replaced, as matterport's generator does (counted,
    kind "no_instances"; skip_empty=False keeps them).

    Load errors (config.ON_LOAD_ERROR, or on_load_error):
        "raise": SampleLoadError naming the image id, its reference and the cause.
        "skip":  the sample is replaced by another image of the dataset (drawn at random from
                 the seeded RNG), the event is recorded (kind "error") and training goes on.
        After max_attempts failed replacements in one slot a SampleLoadError is raised, so a
        dataset of broken images fails loudly instead of hanging. Skips are recorded in a
        small log file shared by all workers (threads or processes): see `skipped`,
        skip_counts() and skip_summary().

    Stream mode (stream=True, what MaskRCNN.train uses): Keras sees an endless dataset and
    batch index i is batch i % len of pass (i + start) // len, so a training "epoch" of
    STEPS_PER_EPOCH steps (matterport's meaning) may end mid-pass while every pass still holds
    each image exactly once (padding aside); start = epochs done * STEPS_PER_EPOCH continues
    the same order when training resumes.

    Parallelism: workers (default config.LOADER_WORKERS) worker processes when
    use_multiprocessing (default True when workers > 0; False gives threads); workers=0 loads
    in the training process. Keras recreates the worker pool every epoch from the generator's
    current state (forked, so nothing is pickled on Linux). A worker returns the two big
    arrays (images, rpn_match) in POSIX shared memory: only a name goes through the pool's
    pipe and the training process maps the block (no copy on Linux) and unlinks it when it
    unpickles it.
    With fit(): Keras' own `shuffle=True` (fit's default) only reorders the batches of an
    epoch (not reproducibly); the content of each batch is still this plan. A
    steps_per_epoch below len(generator) trains on the first batches of each epoch's
    permutation.
    Matterport's options: augment (its deprecated random flip, see load_image_gt);
    no_augmentation_sources (a list of dataset sources whose images get no augmentation);
    random_rois (None: POST_NMS_ROIS_TRAINING ROIs per image when config.USE_RPN_ROIS is
    False, none otherwise; a number: that many) and detection_targets (see above). The
    random parts of the ROIs and targets are seeded like the rest of the sample.
    """

    def __init__(self, dataset, config, shuffle=True, augmentation=None, random_rois=None,
                 detection_targets=False, seed=None, workers=None, use_multiprocessing=None,
                 max_queue_size=10, pad_last_batch=True, skip_empty=True, on_load_error=None,
                 max_attempts=20, stream=False, start=0, augment=False,
                 no_augmentation_sources=None, batch_size=None):
        if random_rois is None:
            random_rois = 0 if config.USE_RPN_ROIS else config.POST_NMS_ROIS_TRAINING
        self.random_rois = int(random_rois)
        if self.random_rois < 0:
            raise ValueError("random_rois must be >= 0, not %r" % (random_rois,))
        self.detection_targets = bool(detection_targets) and self.random_rois > 0
        self.augment = bool(augment)
        self.no_augmentation_sources = set(no_augmentation_sources or ())
        workers = config.LOADER_WORKERS if workers is None else int(workers)
        if use_multiprocessing is None:
            use_multiprocessing = workers > 0
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing,
                         max_queue_size=max_queue_size)
        self.dataset = dataset
        self.config = config
        self.shuffle = bool(shuffle)
        self.augmentation = augmentation
        self.pad_last_batch = bool(pad_last_batch)
        self.skip_empty = bool(skip_empty)
        self.on_load_error = on_load_error or config.ON_LOAD_ERROR
        if self.on_load_error not in ("raise", "skip"):
            raise ValueError("on_load_error must be 'raise' or 'skip', not %r"
                             % (self.on_load_error,))
        self.max_attempts = int(max_attempts)
        self.image_ids = np.asarray(dataset.image_ids)
        if len(self.image_ids) == 0:
            raise ValueError("DataGenerator: the dataset has no images (did you call "
                             "dataset.prepare()?)")
        self.batch_size = int(config.BATCH_SIZE if batch_size is None else batch_size)
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1, not %r" % (batch_size,))
        self.seed = int(np.random.SeedSequence().entropy % (1 << 63)) if seed is None \
            else int(seed)
        self.epoch = 0
        self.stream = bool(stream)
        self.start = int(start)
        self._reported_skips = 0
        self.anchors = compute_anchors(config)
        _anchor_index(self.anchors)   # built once here, inherited by forked workers
        self._perm_cache = {}
        self._owner_pid = os.getpid()
        if use_multiprocessing and workers > 0:
            # One resource tracker, started before the workers fork, serves them all.
            from multiprocessing import resource_tracker
            resource_tracker.ensure_running()
        fd, self._skip_log = tempfile.mkstemp(prefix="mrcnn-skips-", suffix=".jsonl")
        os.close(fd)
        self._finalizer = weakref.finalize(self, _remove_if_owner, self._skip_log,
                                           self._owner_pid)

    # ------------------------------------------------------------ epoch plan

    def __len__(self):
        return int(math.ceil(len(self.image_ids) / self.batch_size))

    @property
    def num_batches(self):
        """Batches per pass for Keras; None (endless) in stream mode."""
        return None if self.stream else len(self)

    def locate(self, index):
        """(pass, batch) of a Keras batch index: in stream mode index runs on across passes
        (from `start`), otherwise it is a batch of the current epoch."""
        if self.stream:
            return divmod(int(index) + self.start, len(self))
        if index < 0 or index >= len(self):
            raise IndexError("batch index %d out of range [0, %d)" % (index, len(self)))
        return self.epoch, int(index)

    def set_epoch(self, epoch):
        """Set the epoch whose permutation the next batches come from."""
        self.epoch = int(epoch)

    def on_epoch_end(self):
        """Advance to the next epoch (Keras calls this after the workers stopped) and log the
        skips of the finished epoch."""
        if self.stream:
            # Passes are encoded in the batch index: report the skips seen so far.
            total = self.skip_counts()["total"]
            if total > self._reported_skips:
                logger.warning("%s", self.skip_summary())
                self._reported_skips = total
            return
        counts = self.skip_counts(epoch=self.epoch)
        if counts["total"]:
            logger.warning("epoch %d: %s", self.epoch, self.skip_summary(epoch=self.epoch))
        self.epoch += 1

    def permutation(self, epoch):
        """Positions (into dataset.image_ids) in the order epoch `epoch` visits them."""
        perm = self._perm_cache.get(epoch)
        if perm is None:
            n = len(self.image_ids)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, int(epoch)]).permutation(n)
            else:
                perm = np.arange(n)
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            self._perm_cache[epoch] = perm
        return perm

    def _batch_positions(self, index, epoch):
        perm = self.permutation(epoch)
        b = self.batch_size
        positions = perm[index * b:(index + 1) * b]
        if self.pad_last_batch and len(positions) < b:
            positions = np.concatenate([positions, np.resize(perm, b - len(positions))])
        return positions

    def epoch_plan(self, epoch=None):
        """The image ids each batch of `epoch` (default: the current one) is planned to hold
        (before any skip replacement): a list of int arrays, one per batch."""
        epoch = self.epoch if epoch is None else epoch
        return [self.image_ids[self._batch_positions(i, epoch)] for i in range(len(self))]

    # ------------------------------------------------------------ skips

    def _record(self, **record):
        line = (json.dumps(record, default=str) + "\n").encode("utf-8")
        try:
            fd = os.open(self._skip_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:   # never let bookkeeping break training
            logger.warning("could not record a skipped sample: %s", e)

    @property
    def skipped(self):
        """Skip events of all epochs so far (all workers), deduplicated, as dicts with keys
        epoch, batch, slot, image_id, reference, kind ("error" / "no_instances"), reason."""
        try:
            with open(self._skip_log, "r", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        seen, out = set(), []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            key = (rec.get("epoch"), rec.get("batch"), rec.get("slot"), rec.get("attempt"),
                   rec.get("image_id"), rec.get("kind"))
            if key not in seen:
                seen.add(key)
                out.append(rec)
        return out

    def skip_counts(self, epoch=None):
        """{"error": n, "no_instances": m, "total": n + m} for one epoch or all (None)."""
        counts = {"error": 0, "no_instances": 0}
        for rec in self.skipped:
            if epoch is None or rec.get("epoch") == epoch:
                counts[rec.get("kind", "error")] = counts.get(rec.get("kind", "error"), 0) + 1
        counts["total"] = counts["error"] + counts["no_instances"]
        return counts

    def skip_summary(self, epoch=None):
        """A one-paragraph human-readable summary of the skipped samples."""
        recs = [r for r in self.skipped if epoch is None or r.get("epoch") == epoch]
        c = self.skip_counts(epoch)
        text = "%d sample(s) skipped: %d load error(s), %d without instances" % (
            c["total"], c["error"], c["no_instances"])
        errors = [r for r in recs if r.get("kind") == "error"]
        if errors:
            shown = "; ".join("%s: %s" % (r.get("reference"), r.get("reason"))
                              for r in errors[:5])
            text += ". Errors: " + shown + (" ..." if len(errors) > 5 else "")
        return text

    # ------------------------------------------------------------ samples

    def _sample_rng(self, epoch, index, slot, attempt):
        return np.random.default_rng([self.seed, int(epoch), int(index), int(slot),
                                      int(attempt)])

    def load_sample(self, image_id, rng=None):
        """One sample: (image uint8, image_meta, class_ids, boxes, masks, rpn_match,
        rpn_bbox, rois, targets, attributes) — load_image_gt (masks as config.USE_MINI_MASK says) +
        build_rpn_targets, instances capped at MAX_GT_INSTANCES (the first ones); rois:
        generate_random_rois int32 [random_rois, 4] or None; targets: build_detection_targets'
        (rois, class_ids, bboxes, masks) or None; attributes: bool [N, NUM_ATTRIBUTES]
        multi-hot, or None when NUM_ATTRIBUTES is 0."""
        config = self.config
        augmentation = self.augmentation
        if self.no_augmentation_sources and \
                self.dataset.image_info[image_id]["source"] in self.no_augmentation_sources:
            augmentation = None
        sample = load_image_gt(
            self.dataset, config, image_id, augment=self.augment, augmentation=augmentation,
            use_mini_mask=config.USE_MINI_MASK, rng=rng,
            with_attributes=bool(config.NUM_ATTRIBUTES))
        image, meta, class_ids, boxes, masks = sample[:5]
        attributes = sample[5] if len(sample) > 5 else None
        limit = config.MAX_GT_INSTANCES
        if len(class_ids) > limit:
            class_ids, boxes, masks = class_ids[:limit], boxes[:limit], masks[:, :, :limit]
            if attributes is not None:
                attributes = attributes[:limit]
        rpn_match, rpn_bbox = build_rpn_targets(image.shape, self.anchors, class_ids, boxes,
                                                config, rng=rng)
        rois = targets = None
        if self.random_rois:
            rois = generate_random_rois(image.shape, self.random_rois, class_ids, boxes,
                                        rng=rng)
            if self.detection_targets:
                targets = build_detection_targets(rois, class_ids, boxes, masks, config,
                                                  rng=rng)
        return (image, meta, class_ids, boxes, masks, rpn_match, rpn_bbox, rois, targets,
                attributes)

    def _load_slot(self, image_id, epoch, index, slot):
        """Load the sample of one batch slot, replacing it on skips (see the class doc)."""
        candidate = image_id
        last = None
        for attempt in range(self.max_attempts + 1):
            rng = self._sample_rng(epoch, index, slot, attempt)
            ref = None
            try:
                sample = self.load_sample(candidate, rng=rng)
            except Exception as e:  # noqa: BLE001 - reported with the image's name
                ref = _describe(self.dataset, candidate)
                reason = "%s: %s" % (type(e).__name__, e)
                if self.on_load_error == "raise":
                    raise SampleLoadError("could not load %s (epoch %d, batch %d): %s"
                                          % (ref, epoch, index, reason)) from e
                kind = "error"
            else:
                class_ids = sample[2]
                if not self.skip_empty or np.any(class_ids > 0):
                    return sample
                ref = _describe(self.dataset, candidate)
                kind, reason = "no_instances", "no non-crowd instance"
            last = "%s: %s" % (ref, reason)
            self._record(epoch=int(epoch), batch=int(index), slot=int(slot),
                         attempt=int(attempt), image_id=int(candidate), reference=ref,
                         kind=kind, reason=reason)
            candidate = self.image_ids[int(rng.integers(len(self.image_ids)))]
        raise SampleLoadError(
            "epoch %d, batch %d, slot %d: %d consecutive samples could not be used (load "
            "errors or no instances); last: %s" % (epoch, index, slot, self.max_attempts + 1,
                                                   last))

    def __getitem__(self, index):
        epoch, index = self.locate(index)
        # Note: never call cv2.setNumThreads() here: in a forked worker of a process whose
        # OpenCV thread pool has run, it deadlocks (OpenCV resets its pool after fork itself).
        config = self.config
        positions = self._batch_positions(index, epoch)
        b = len(positions)
        h, w = int(config.IMAGE_SHAPE[0]), int(config.IMAGE_SHAPE[1])
        max_gt = config.MAX_GT_INSTANCES
        mask_hw = tuple(config.MINI_MASK_SHAPE) if config.USE_MINI_MASK else (h, w)
        # In a Keras worker process the two big arrays live in shared memory (_SharedArray):
        # the result goes back pickled, and pickling passes only the block's name.
        shared = (self.use_multiprocessing and os.getpid() != self._owner_pid
                  and multiprocessing.current_process().name.startswith("Keras_worker"))
        if shared:
            shared_images = _SharedArray((b, h, w, 3), np.float32)
            shared_match = _SharedArray((b, len(self.anchors), 1), np.int32)
            batch_images, batch_rpn_match = shared_images.array, shared_match.array
        else:
            batch_images = np.zeros((b, h, w, 3), dtype=np.float32)
            batch_rpn_match = np.zeros((b, len(self.anchors), 1), dtype=np.int32)
        batch_image_meta = np.zeros((b, config.IMAGE_META_SIZE), dtype=np.float32)
        batch_rpn_bbox = np.zeros((b, config.RPN_TRAIN_ANCHORS_PER_IMAGE, 4), dtype=np.float32)
        batch_gt_class_ids = np.zeros((b, max_gt), dtype=np.int32)
        batch_gt_boxes = np.zeros((b, max_gt, 4), dtype=np.int32)
        batch_gt_masks = np.zeros((b, mask_hw[0], mask_hw[1], max_gt), dtype=bool)
        extra = self._extra_arrays(b)
        try:
            self._fill_batch(index, epoch, positions, batch_images, batch_image_meta,
                             batch_rpn_match, batch_rpn_bbox, batch_gt_class_ids,
                             batch_gt_boxes, batch_gt_masks, extra)
        except BaseException:
            if shared:   # nobody will unpickle the blocks: free them here
                del batch_images, batch_rpn_match
                for block in (shared_images, shared_match):
                    block.array = None
                    block.shm.close()
                    block.shm.unlink()
            raise
        if shared:
            del batch_images, batch_rpn_match   # the buffers are released when pickled
            batch_images, batch_rpn_match = shared_images, shared_match
        inputs = (batch_images, batch_image_meta, batch_rpn_match, batch_rpn_bbox,
                  batch_gt_class_ids, batch_gt_boxes, batch_gt_masks)
        if "gt_attributes" in extra:
            inputs += (extra["gt_attributes"],)
        if "rois" in extra:
            inputs += (extra["rois"],)
        if "target_rois" in extra:
            inputs += (extra["target_rois"],)
            outputs = (extra["target_class_ids"][..., np.newaxis], extra["target_bbox"],
                       extra["target_mask"])
            return inputs, outputs
        return (inputs,)

    def _extra_arrays(self, b):
        """The batch arrays of the random ROIs and detection targets (empty dict without)."""
        config = self.config
        extra = {}
        if config.NUM_ATTRIBUTES:
            extra["gt_attributes"] = np.zeros(
                (b, config.MAX_GT_INSTANCES, int(config.NUM_ATTRIBUTES)), dtype=bool)
        if self.random_rois:
            extra["rois"] = np.zeros((b, self.random_rois, 4), dtype=np.int32)
        if self.detection_targets:
            t, c = int(config.TRAIN_ROIS_PER_IMAGE), int(config.NUM_CLASSES)
            mh, mw = (int(v) for v in config.MASK_SHAPE)
            extra["target_rois"] = np.zeros((b, t, 4), dtype=np.int32)
            extra["target_class_ids"] = np.zeros((b, t), dtype=np.int32)
            extra["target_bbox"] = np.zeros((b, t, c, 4), dtype=np.float32)
            extra["target_mask"] = np.zeros((b, t, mh, mw, c), dtype=np.float32)
        return extra

    def _fill_batch(self, index, epoch, positions, batch_images, batch_image_meta,
                    batch_rpn_match, batch_rpn_bbox, batch_gt_class_ids, batch_gt_boxes,
                    batch_gt_masks, extra=None):
        config = self.config
        extra = {} if extra is None else extra
        h, w = batch_images.shape[1:3]
        for slot, pos in enumerate(positions):
            (image, meta, class_ids, boxes, masks, rpn_match, rpn_bbox, rois,
             targets, attributes) = self._load_slot(self.image_ids[pos], epoch, index, slot)
            if image.shape[:2] != (h, w):
                raise SampleLoadError(
                    "%s: resized image is %dx%d but the batch needs %dx%d (IMAGE_RESIZE_MODE "
                    "%r gives varying sizes; use 'square' or 'crop' for training)"
                    % (_describe(self.dataset, int(meta[0])), image.shape[0], image.shape[1],
                       h, w, config.IMAGE_RESIZE_MODE))
            batch_images[slot] = image
            _subtract_mean(batch_images[slot], config.MEAN_PIXEL)
            batch_image_meta[slot] = meta
            batch_rpn_match[slot, :, 0] = rpn_match
            batch_rpn_bbox[slot] = rpn_bbox
            n = len(class_ids)
            batch_gt_class_ids[slot, :n] = class_ids
            batch_gt_boxes[slot, :n] = boxes
            batch_gt_masks[slot, :, :, :n] = masks
            if attributes is not None:
                extra["gt_attributes"][slot, :n] = attributes
            if rois is not None:
                extra["rois"][slot] = rois
            if targets is not None:
                for key, array in zip(("target_rois", "target_class_ids", "target_bbox",
                                       "target_mask"), targets):
                    extra[key][slot] = array

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_finalizer"] = None   # the owner process removes the log file
        return state


def data_generator(dataset, config, shuffle=True, augment=False, augmentation=None,
                   random_rois=0, batch_size=1, detection_targets=False,
                   no_augmentation_sources=None, seed=None):
    """matterport's data_generator: an endless Python generator of (inputs, outputs) batches.

    dataset, config: a prepared utils.Dataset and a Config.
    shuffle: a new random order for every pass over the dataset.
    augment: deprecated random left-right flip (see load_image_gt); augmentation: an
        albumentations transform or imgaug augmenter; no_augmentation_sources: sources
        (dataset names) whose images are not augmented.
    random_rois: if > 0, that many random ROIs per image (generate_random_rois) are added
        to the inputs; detection_targets: with random_rois, also the heads' targets of
        those ROIs (build_detection_targets).
    batch_size: images per batch (matterport's default 1, not config.BATCH_SIZE).
    seed: optional int making the order and every random part reproducible (an extra over
        matterport, whose generator draws from np.random).

    Each next() returns two lists, as in matterport:
        inputs: [images float32 [B, H, W, 3] (molded), image_meta [B, IMAGE_META_SIZE],
            rpn_match int32 [B, anchors, 1], rpn_bbox [B, RPN_TRAIN_ANCHORS_PER_IMAGE, 4],
            gt_class_ids int32 [B, MAX_GT_INSTANCES], gt_boxes int32 [B, MAX_GT_INSTANCES, 4],
            gt_masks bool [B, h, w, MAX_GT_INSTANCES] (MINI_MASK_SHAPE with USE_MINI_MASK,
            else the image size)], then rpn_rois int32 [B, random_rois, 4] if random_rois,
            then rois int32 [B, TRAIN_ROIS_PER_IMAGE, 4] if also detection_targets.
        outputs: [] or, with random_rois and detection_targets, [class_ids int32 [B, T, 1],
            bbox deltas float32 [B, T, NUM_CLASSES, 4], masks float32
            [B, T, MASK_SHAPE..., NUM_CLASSES]] (T = TRAIN_ROIS_PER_IMAGE).

    It is built on DataGenerator (in-process, stream mode): every pass holds each image once
    (the last batch of a pass is completed with the pass's first images), images without
    instances are skipped, and a sample that cannot be loaded raises SampleLoadError naming
    it (config.ON_LOAD_ERROR "skip" replaces it instead; matterport logged it and went on,
    giving up after 5 errors). Instances beyond MAX_GT_INSTANCES: the first are kept.
    """
    loader = DataGenerator(dataset, config, shuffle=shuffle, augmentation=augmentation,
                           random_rois=random_rois, detection_targets=detection_targets,
                           seed=seed, workers=0, use_multiprocessing=False, stream=True,
                           augment=augment, no_augmentation_sources=no_augmentation_sources,
                           batch_size=batch_size)
    index = 0
    while True:
        batch = loader[index]
        index += 1
        inputs = list(batch[0])
        outputs = list(batch[1]) if len(batch) > 1 else []
        yield inputs, outputs
