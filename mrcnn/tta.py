"""Test-time augmentation (TTA): detect on flipped and rescaled copies of an image, merge.

    from mrcnn import tta
    r = tta.detect(model, [image], "flip,scales=0.8,1.0,1.2")[0]    # a dict as MaskRCNN.detect's
    r = tta.detect_image(model, image, tta.TTA(flip=True, merge="nms"))
    detections = evaluate.run_detections(model, dataset, image_ids, tta="flip")

Specification (`parse_tta`, the command line's `--tta`): comma-separated items,
    flip                 also run the horizontally flipped image (at every scale)
    scales=S1,S2,...     the scales (default 1); the numbers after `scales=` are its list
    merge=wbf|nms        how the copies' detections merge (default wbf)
    iou=T                the IoU above which two detections of one class match (default 0.55)
e.g. "flip", "flip,scales=0.8,1.0,1.2", "scales=0.8,1.2,merge=nms,iou=0.5"; "none" is no TTA.
The copies are every (scale, flip) pair: scales in the given order, each unflipped then flipped.

A copy at scale 1 is molded by MaskRCNN.mold_inputs, as plain detect() does. A copy at scale s
is the image resized by s times the scale the configuration's resize rules give it, so the
molded size changes (molding would undo a plain rescale): in "square" mode it is centred in
a square canvas of side ceil(IMAGE_MAX_DIM * s / 64) * 64 (at least the resized image); in
"pad64" and "none" modes each side is padded to a multiple of 64, centred. The network runs
on it with the anchors of its molded shape (copies of one molded shape, such as a scale's
flipped and unflipped copies, run as one batch); each copy's detections use the
configuration's settings (DETECTION_MIN_CONFIDENCE, DETECTION_NMS_THRESHOLD,
DETECTION_MAX_INSTANCES, DETECTION_SCORING). Its boxes map back to the image through the
window (undoing the scale) and then the mirror x -> width - x (undoing the flip); its mask
probabilities are pasted into its box in image space (the 28x28 sigmoid output resized as
utils.unmold_masks does, before the threshold) and mirrored back.

Merge (`merge_detections`): the detections of all copies, highest score first (ties: copy
order), each join the cluster of the same class whose box it overlaps most, if that IoU is
above `iou` and the cluster holds no detection of the same copy yet (a copy's own detections
passed its NMS already: they are distinct objects); otherwise it starts a cluster. A cluster
is one detection:
    wbf (weighted box fusion, Solovyev et al. 2019, the default): box = the score-weighted
        mean of its boxes (matched against as it grows), score = the mean score x
        (detections in it) / (copies);
    nms: box and score of its first (best) detection; the others are suppressed.
Either way its mask is the score-weighted mean of its detections' mask probabilities (0
outside a detection's box), then >= DETECTION_MASK_THRESHOLD; with an attribute head
(NUM_ATTRIBUTES > 0) its attribute_scores are the score-weighted mean of its detections' and
its attributes the ids scoring >= DETECTION_ATTRIBUTE_THRESHOLD, as in detect(). The
DETECTION_MAX_INSTANCES best clusters are kept, highest score first. Boxes are int32 pixels;
a copy's detections may reach beyond what plain detect returns, and a WBF score may fall below
DETECTION_MIN_CONFIDENCE (an object only some copies found): that threshold is not applied
again.

Why WBF by default: NMS keeps one copy's box and throws the others' away, so it corrects no
localization error and only adds the copies' extra detections; WBF averages the copies'
boxes, which is what the IoU 0.5-0.95 thresholds of COCO AP and of the iMaterialist metric
reward, and its score counts the copies that agree, which ranks an object seen by one copy
only below one that all copies see. The masks are averaged in both.

A TTA of one identity copy (`TTA()`, spec "scales=1") gives exactly what MaskRCNN.detect
gives.
"""

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from mrcnn import utils
from mrcnn.image_meta import compose_image_meta

__all__ = ["TTA", "MERGES", "CopyDetections", "parse_tta", "as_tta", "detect", "detect_image",
           "mold_copy", "detect_copies", "unmold_copy", "map_boxes", "flip_boxes",
           "copy_mask_probs", "paste_probs", "unmold_soft_masks", "merge_detections"]

MERGES = ("wbf", "nms")
DEFAULT_MERGE = "wbf"
DEFAULT_IOU = 0.55


############################################################
#  Specification
############################################################

@dataclasses.dataclass(frozen=True)
class TTA:
    """What test-time augmentation runs: flip (horizontal), scales, merge ("wbf" | "nms") and
    the IoU threshold of the merge."""
    flip: bool = False
    scales: tuple = (1.0,)
    merge: str = DEFAULT_MERGE
    iou: float = DEFAULT_IOU

    def __post_init__(self):
        scales = tuple(float(s) for s in np.atleast_1d(self.scales))
        if not scales or any(not (math.isfinite(s) and s > 0) for s in scales):
            raise ValueError("TTA scales must be positive numbers, not %r" % (self.scales,))
        object.__setattr__(self, "scales", tuple(dict.fromkeys(scales)))   # no duplicates
        if self.merge not in MERGES:
            raise ValueError("TTA merge must be one of %s, not %r" % (", ".join(MERGES),
                                                                    self.merge))
        if not 0 <= float(self.iou) < 1:
            raise ValueError("TTA iou must be in [0, 1), not %r" % (self.iou,))

    @property
    def copies(self):
        """[(scale, flip), ...]: every scale, unflipped then (with flip) flipped."""
        flips = (False, True) if self.flip else (False,)
        return [(s, f) for s in self.scales for f in flips]

    def __str__(self):
        n = len(self.copies)
        return "%sscales %s (%d cop%s), merge %s (IoU > %g)" % (
            "flip, " if self.flip else "", "/".join("%g" % s for s in self.scales), n,
            "y" if n == 1 else "ies", self.merge, self.iou)


def parse_tta(spec):
    """A TTA from a specification string (see the module doc), or None for "none" / "" / None.
    Raises ValueError naming what is wrong."""
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return None
    flip, scales, merge, iou = False, None, DEFAULT_MERGE, DEFAULT_IOU
    key = None
    for item in (t.strip() for t in str(spec).split(",")):
        if not item:
            raise ValueError("TTA %r: empty item (two commas?)" % (spec,))
        name, eq, value = (s.strip() for s in item.partition("="))
        name = name.lower()
        if not eq and key == "scales" and _is_number(item):
            scales.append(float(item))
            continue
        key = None
        if not eq and name in ("flip", "hflip"):
            flip = True
        elif eq and name == "scales":
            if not _is_number(value):
                raise ValueError("TTA %r: scales=%r is not a number" % (spec, value))
            scales, key = [float(value)], "scales"
        elif eq and name == "merge":
            merge = value.lower()
        elif eq and name == "iou":
            if not _is_number(value):
                raise ValueError("TTA %r: iou=%r is not a number" % (spec, value))
            iou = float(value)
        else:
            raise ValueError("TTA %r: unknown item %r (known: flip, scales=S1,S2,..., "
                             "merge=wbf|nms, iou=T)" % (spec, item))
    return TTA(flip=flip, scales=tuple(scales or (1.0,)), merge=merge, iou=iou)


def as_tta(tta):
    """A TTA from a TTA or a specification string; None for no TTA."""
    if tta is None or isinstance(tta, TTA):
        return tta
    if isinstance(tta, str):
        return parse_tta(tta)
    raise TypeError("tta must be a mrcnn.tta.TTA or a specification string, not %r" % (tta,))


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


############################################################
#  Detection
############################################################

def detect(model, images, tta, verbose=0):
    """MaskRCNN.detect with test-time augmentation: one result dict per image (rois [N, 4]
    int32 pixels, class_ids [N], scores [N], masks [H, W, N] bool), images of any number and
    size (each runs on its own). tta: a TTA or a specification string."""
    if model.mode != "inference":
        raise RuntimeError("detect() needs a model built in inference mode "
                           "(MaskRCNN(mode='inference', ...))")
    spec = as_tta(tta) or TTA()
    if verbose:
        utils.log("Processing %d images with test-time augmentation: %s" % (len(images), spec))
    return [detect_image(model, image, spec) for image in images]


def detect_image(model, image, tta):
    """The merged detections of one image [H, W, 3] (a dict as MaskRCNN.detect's)."""
    spec = as_tta(tta) or TTA()
    config = model.config
    copies = detect_copies(model, image, spec.copies)
    return merge_detections(copies, image.shape, method=spec.merge, iou_threshold=spec.iou,
                            max_instances=config.DETECTION_MAX_INSTANCES,
                            mask_threshold=config.DETECTION_MASK_THRESHOLD,
                            attribute_threshold=config.DETECTION_ATTRIBUTE_THRESHOLD)


def _ceil64(x):
    return int(math.ceil(x / 64.0 - 1e-9)) * 64


def mold_copy(model, image, scale=1.0, flip=False):
    """One copy of `image` as the network takes it: (molded [h, w, C] float32, image_meta
    [IMAGE_META_SIZE], window (y1, x1, y2, x2) of the copy's image in it).

    Scale 1: MaskRCNN.mold_inputs of the (flipped) image. Otherwise the image is resized by
    `scale` times the scale of the configuration's resize rules (utils.resize_image) and padded
    as the module doc says; the image_meta records that scale and the original shape."""
    from mrcnn.data import mold_image
    config = model.config
    image = np.asarray(image)
    if flip:
        image = np.ascontiguousarray(image[:, ::-1])
    if scale == 1:
        molded, metas, windows = model.mold_inputs([image])
        return molded[0], metas[0], tuple(int(v) for v in windows[0])
    mode = config.IMAGE_RESIZE_MODE
    if mode == "crop":
        raise ValueError("TTA scales other than 1 need IMAGE_RESIZE_MODE square, pad64 or none "
                         "(crop is for training)")
    h, w = image.shape[:2]
    base = 1.0
    if mode != "none":
        _, _, base, _, _ = utils.resize_image(image, min_dim=config.IMAGE_MIN_DIM,
                                              min_scale=config.IMAGE_MIN_SCALE,
                                              max_dim=config.IMAGE_MAX_DIM, mode=mode)
    total = base * scale
    sh, sw = utils._scaled_size(h, w, total)
    resized = utils._cv2_resize(image, (sh, sw), utils._interpolation((h, w), (sh, sw)))
    if mode == "square":
        ch = cw = _ceil64(max(config.IMAGE_MAX_DIM * scale, sh, sw))
    else:
        ch, cw = _ceil64(sh), _ceil64(sw)
    top, left = (ch - sh) // 2, (cw - sw) // 2
    canvas = np.zeros((ch, cw) + image.shape[2:], dtype=image.dtype)
    canvas[top:top + sh, left:left + sw] = resized
    window = (top, left, top + sh, left + sw)
    molded = mold_image(canvas, config)
    meta = compose_image_meta(0, image.shape, molded.shape, window, total,
                              np.zeros([config.NUM_CLASSES], dtype=np.int32))
    return molded, np.asarray(meta, np.float32), window


class CopyDetections(NamedTuple):
    """One copy's detections, boxes in the original image's pixels (flip undone). The masks
    stay the mask head's small outputs until the merge pastes them (copy_mask_probs), so that
    a copy holds no image-sized arrays."""
    rois: np.ndarray        # [n, (y1, x1, y2, x2)] int32
    class_ids: np.ndarray   # [n] int32
    scores: np.ndarray      # [n] float32
    masks: np.ndarray       # [n, h, w] float32: each detection's class's mask probabilities
    flipped: bool = False   # the masks are of the flipped image (pasted there, mirrored back)
    attribute_scores: np.ndarray = None     # [n, NUM_ATTRIBUTES] float32, with the head


def detect_copies(model, image, copies):
    """Run the network on each (scale, flip) copy of `image`: a CopyDetections per copy."""
    molded = [mold_copy(model, image, s, f) for s, f in copies]
    groups = {}
    for i, (m, _, _) in enumerate(molded):
        groups.setdefault(m.shape, []).append(i)
    out = [None] * len(copies)
    for shape, members in groups.items():
        anchors = model.get_anchors(shape)
        batch = [np.stack([molded[i][0] for i in members]),
                 np.stack([molded[i][1] for i in members]),
                 np.broadcast_to(anchors, (len(members),) + anchors.shape)]
        outputs = model.keras_model.predict_on_batch(batch)
        detections, masks = np.asarray(outputs[0]), np.asarray(outputs[3])
        # With the attribute head, an eighth output: detection_attributes.
        attributes = np.asarray(outputs[7]) if len(outputs) > 7 else None
        for j, i in enumerate(members):
            out[i] = unmold_copy(detections[j], masks[j], image.shape, shape, molded[i][2],
                                 flip=copies[i][1],
                                 attribute_scores=None if attributes is None else attributes[j])
    return out


def map_boxes(boxes, image_shape, molded_shape, window, flip=False):
    """Normalized boxes of a copy's molded image -> int32 pixel boxes of the original image.

    boxes [n, (y1, x1, y2, x2)] normalized to molded_shape (the network's output); window
    (y1, x1, y2, x2): the copy's image in the molded image, in pixels; image_shape: the
    original image's. The window undoes the copy's scale and padding (as
    MaskRCNN.unmold_detections does); flip then mirrors x back (flip_boxes)."""
    window = utils.norm_boxes(np.asarray(window), molded_shape[:2])
    wy1, wx1, wy2, wx2 = window
    shift = np.array([wy1, wx1, wy1, wx1])
    scale = np.array([wy2 - wy1, wx2 - wx1, wy2 - wy1, wx2 - wx1])
    boxes = np.divide(np.asarray(boxes, np.float32).reshape(-1, 4) - shift, scale)
    boxes = utils.denorm_boxes(boxes, image_shape[:2])
    return flip_boxes(boxes, image_shape[1]) if flip else boxes


def flip_boxes(boxes, width):
    """Mirror pixel boxes (x2 exclusive) of an image `width` wide: x -> width - x."""
    boxes = np.array(boxes, copy=True)
    boxes[:, [1, 3]] = width - boxes[:, [3, 1]]
    return boxes


def unmold_copy(detections, mrcnn_mask, image_shape, molded_shape, window, flip=False,
                attribute_scores=None):
    """A copy's network output -> CopyDetections in the original image.

    detections [N, (y1, x1, y2, x2, class_id, score)] normalized, zero-padded; mrcnn_mask
    [N, h, w, NUM_CLASSES]; attribute_scores: optional [N, NUM_ATTRIBUTES]. As
    MaskRCNN.unmold_detections, with the boxes' flip undone and the masks kept as the head's
    probabilities (see copy_mask_probs)."""
    detections = np.asarray(detections, dtype=np.float32)
    zero_ix = np.where(detections[:, 4] == 0)[0]
    n = zero_ix[0] if zero_ix.shape[0] > 0 else detections.shape[0]
    class_ids = detections[:n, 4].astype(np.int32)
    scores = detections[:n, 5]
    small = np.asarray(mrcnn_mask)[np.arange(n), :, :, class_ids]
    boxes = map_boxes(detections[:n, :4], image_shape, molded_shape, window, flip=flip)
    keep = np.where((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) > 0)[0]
    if attribute_scores is not None:
        attribute_scores = np.asarray(attribute_scores, np.float32)[:n][keep]
    return CopyDetections(boxes[keep].astype(np.int32), class_ids[keep],
                          scores[keep].astype(np.float32),
                          np.asarray(small[keep], np.float32), bool(flip), attribute_scores)


def copy_mask_probs(copy, i, image_hw):
    """(region, probs) of detection i of a CopyDetections in the original image (paste_probs):
    a flipped copy's mask is pasted at its box in the flipped image, then mirrored back, so
    that it is exactly the mirror of what the flipped image gives."""
    box = copy.rois[i]
    if not copy.flipped:
        return paste_probs(copy.masks[i], box, image_hw)
    width = int(image_hw[1])
    region, probs = paste_probs(copy.masks[i], flip_boxes(box[None], width)[0], image_hw)
    if probs.size == 0:
        return region, probs
    y1, x1, y2, x2 = region
    return (y1, width - x2, y2, width - x1), probs[:, ::-1]


############################################################
#  Soft masks
############################################################

def paste_probs(mask, box, image_hw):
    """The mask head's probabilities of one detection in image space, before the threshold.

    mask [h, w] float in [0, 1]; box (y1, x1, y2, x2) pixels; image_hw (H, W). The mask is
    resized to the box as utils.unmold_mask resizes it, then clipped to the image. Returns
    (region, probs): region (y1, x1, y2, x2) the clipped box (all 0 when nothing is left) and
    probs float32 [y2 - y1, x2 - x1]; `probs >= threshold` pasted at `region` is
    utils.unmold_mask(mask, box, image_hw, threshold)."""
    y1, x1, y2, x2 = (int(v) for v in box[:4])
    bh, bw = y2 - y1, x2 - x1
    cy1, cx1 = max(y1, 0), max(x1, 0)
    cy2, cx2 = min(y2, int(image_hw[0])), min(x2, int(image_hw[1]))
    if bh <= 0 or bw <= 0 or cy2 <= cy1 or cx2 <= cx1:
        return (0, 0, 0, 0), np.zeros((0, 0), np.float32)
    small = np.asarray(mask, dtype=np.float32)
    m = utils._cv2_resize(small, (bh, bw), utils._interpolation(small.shape, (bh, bw)))
    return (cy1, cx1, cy2, cx2), m[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]


def unmold_soft_masks(masks, boxes, image_shape):
    """utils.unmold_masks without the threshold: float32 [H, W, N] mask probabilities (0
    outside each box). masks [N, h, w]; boxes [N, (y1, x1, y2, x2)] pixels."""
    height, width = int(image_shape[0]), int(image_shape[1])
    full = np.zeros((height, width, len(masks)), dtype=np.float32)
    for i, (mask, box) in enumerate(zip(masks, boxes)):
        (y1, x1, y2, x2), probs = paste_probs(mask, box, (height, width))
        full[y1:y2, x1:x2, i] = probs
    return full


############################################################
#  Merge
############################################################

def merge_detections(copies, image_shape, method=DEFAULT_MERGE, iou_threshold=DEFAULT_IOU,
                     max_instances=100, mask_threshold=0.5, attribute_threshold=0.5):
    """Merge the CopyDetections of an image's copies into one result dict (rois [N, 4] int32,
    class_ids [N] int32, scores [N] float32, masks [H, W, N] bool), as the module doc says:
    clusters of one class and at most one detection per copy, IoU > iou_threshold; "wbf"
    fuses boxes and scores, "nms" keeps the best; masks are score-weighted means of mask
    probabilities, >= mask_threshold; the max_instances best are kept. Copies with
    attribute_scores add attribute_scores [N, NUM_ATTRIBUTES] (score-weighted means) and
    attributes (ids >= attribute_threshold), as MaskRCNN.detect."""
    if method not in MERGES:
        raise ValueError("merge must be one of %s, not %r" % (", ".join(MERGES), method))
    n_copies = len(copies)
    items = [(k, i) for k, c in enumerate(copies) for i in range(len(c.scores))]
    scores = np.array([copies[k].scores[i] for k, i in items], np.float64)
    order = np.argsort(-scores, kind="stable")

    clusters = []   # dicts: class_id, members [(k, i)], copies {k}, box (what matches), area
    for j in order:
        k, i = items[j]
        c = copies[k]
        box = c.rois[i].astype(np.float64)
        class_id = int(c.class_ids[i])
        candidates = [cl for cl in clusters
                      if cl["class_id"] == class_id and k not in cl["copies"]]
        best = None
        if candidates:
            boxes = np.array([cl["box"] for cl in candidates])
            area = (box[2] - box[0]) * (box[3] - box[1])
            ious = utils.compute_iou(box, boxes, area, utils._box_areas(boxes))
            if ious.max() > iou_threshold:
                best = candidates[int(np.argmax(ious))]
        if best is None:
            clusters.append({"class_id": class_id, "members": [(k, i)], "copies": {k},
                             "box": box})
            continue
        best["members"].append((k, i))
        best["copies"].add(k)
        if method == "wbf":
            best["box"] = _weighted_box(copies, best["members"])

    height, width = int(image_shape[0]), int(image_shape[1])
    results = []
    for cl in clusters:
        members = cl["members"]
        member_scores = np.array([copies[k].scores[i] for k, i in members], np.float64)
        if method == "wbf":
            box = np.around(_weighted_box(copies, members))
            score = member_scores.mean() * len(members) / n_copies
        else:
            box = cl["box"]
            score = member_scores[0]
        results.append((score, box, cl["class_id"], members))
    keep = np.argsort(-np.array([r[0] for r in results], np.float64), kind="stable")
    keep = keep[:max_instances]

    masks = np.zeros((height, width, len(keep)), dtype=bool)
    for n, r in enumerate(keep):
        _fused_mask(copies, results[r][3], mask_threshold, masks[:, :, n])
    merged = {"rois": np.array([results[r][1] for r in keep], np.int32).reshape(-1, 4),
              "class_ids": np.array([results[r][2] for r in keep], np.int32),
              "scores": np.array([results[r][0] for r in keep], np.float32),
              "masks": masks}
    if copies and copies[0].attribute_scores is not None:
        width_a = copies[0].attribute_scores.shape[1]
        attribute_scores = np.zeros((len(keep), width_a), np.float32)
        for n, r in enumerate(keep):
            members = results[r][3]
            stacked = np.array([copies[k].attribute_scores[i] for k, i in members], np.float64)
            attribute_scores[n] = (_weights(copies, members)[:, None] * stacked).sum(axis=0)
        merged["attribute_scores"] = attribute_scores
        merged["attributes"] = [np.flatnonzero(row >= attribute_threshold).astype(np.int32)
                                for row in attribute_scores]
    return merged


def _weights(copies, members):
    """Score weights of a cluster's members, summing to 1 (a single member: exactly 1)."""
    s = np.array([copies[k].scores[i] for k, i in members], np.float64)
    total = s.sum()
    return s / total if total > 0 else np.full(len(s), 1.0 / len(s))


def _weighted_box(copies, members):
    w = _weights(copies, members)
    boxes = np.array([copies[k].rois[i] for k, i in members], np.float64)
    return (w[:, None] * boxes).sum(axis=0)


def _fused_mask(copies, members, threshold, out):
    """Write the cluster's mask (score-weighted mean of its members' probabilities, then
    >= threshold) into `out`, an all-False bool [H, W] view."""
    pasted = [copy_mask_probs(copies[k], i, out.shape) for k, i in members]
    used = [r for r, p in pasted if p.size]
    if not used:
        return
    y1, x1 = min(r[0] for r in used), min(r[1] for r in used)
    y2, x2 = max(r[2] for r in used), max(r[3] for r in used)
    acc = np.zeros((y2 - y1, x2 - x1), np.float32)
    for (r, probs), w in zip(pasted, _weights(copies, members)):
        if probs.size:
            acc[r[0] - y1:r[2] - y1, r[1] - x1:r[3] - x1] += np.float32(w) * probs
    out[y1:y2, x1:x2] = acc >= threshold
