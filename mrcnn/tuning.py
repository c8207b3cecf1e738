"""Threshold tuning: detect once with permissive settings, then re-threshold many times.

The detection score threshold (DETECTION_MIN_CONFIDENCE), the per-class NMS threshold
(DETECTION_NMS_THRESHOLD), the mask binarization threshold (DETECTION_MASK_THRESHOLD) and a
minimum mask area are swept on a validation set for the iMaterialist 2019 metric
(mrcnn.evaluate.competition_metric) without running the network once per setting:

    grid = tuning.Grid(scores=(0.3, 0.5, 0.7), nms=(0.3, 0.5), masks=(0.4, 0.5),
                       min_areas=(0, 64))
    config.override(grid.collection_overrides())    # lowest score, highest NMS threshold
    model = MaskRCNN("inference", config, logs); model.load_weights(...)
    collection = tuning.collect_detections(model, dataset, image_ids)    # the network, once
    result = tuning.sweep(collection, dataset, grid)                     # numpy only
    print(result.table(top=10)); best = result.best()                    # a Setting
    tuning.write_tuned("tuned.json", best, metric=result.metric_of(best))
    detections = [tuning.rethreshold(d, best) for d in collection.detections]

`collect_detections` keeps, per detection, its box, class, score and soft mask (the mask
head's probabilities for its class, [28, 28] or the configured MASK_SHAPE), plus the box the
detection layer ran NMS on. For each setting, `rethreshold` (one image) and `sweep` (all
settings, all images) then: keep scores >= the score threshold; redo per-class greedy NMS at
the setting's threshold (skipped at the collection's own threshold, which it already passed);
binarize the pasted masks at the mask threshold; drop masks with fewer pixels than the minimum
area; with `non_overlap` (the default of `sweep`, what a Kaggle submission must be) give each
pixel to the highest-scoring mask (`non_overlapping`) and drop the masks left empty; score.

Exactness. Filtering by score commutes with greedy NMS and with the top
DETECTION_MAX_INSTANCES cut, so at the collection's NMS threshold a setting's detections are
exactly those of the network run with that score threshold, and its masks exactly those of
`MaskRCNN.detect` with that DETECTION_MASK_THRESHOLD (tests/test_tuning.py checks both).
At a lower NMS threshold the result is an approximation of running the network with it:
greedy NMS at the lower threshold runs on what survived the higher one, and a detection the
higher threshold suppressed (by a box the lower one suppresses in turn) cannot come back; and
the network keeps at most DETECTION_MAX_INSTANCES after its own NMS, so with a stricter NMS it
would have had room for detections the permissive collection cut. Collect with
DETECTION_MAX_INSTANCES above what the setting keeps to make the second effect vanish.

Speed. Each image's soft masks are pasted once, as floats cropped to their boxes, and
binarized once per mask threshold; the settings of an image that keep the same detections are
scored once (`np.unique` over the kept sets); a mask's pixels left after the higher-scoring
masks take theirs, its area and its intersections with the ground truth of its class are
cached by the set of kept higher-scoring masks its box meets; and the score of an (image,
class) pair is cached by the masks it is computed from. Images are the outer loop (memory:
one image's masks at a time), settings the inner one.
"""

import collections
import itertools
import json
import time

import cv2
import numpy as np

from mrcnn import utils
from mrcnn.checkpoints import write_json_atomic
from mrcnn.errors import MrcnnError
from mrcnn.evaluate import COMPETITION_THRESHOLDS, competition_scores

__all__ = ["TuningError", "Setting", "Grid", "Collection", "detect_soft",
           "collect_detections", "paste_soft_mask", "non_overlapping", "drop_small_masks",
           "rethreshold", "sweep", "SweepResult", "write_tuned", "read_tuned"]

# The keys of a tuned-settings file's "settings" object.
SETTING_KEYS = ("DETECTION_MIN_CONFIDENCE", "DETECTION_NMS_THRESHOLD",
                "DETECTION_MASK_THRESHOLD", "MIN_MASK_AREA")


FILE_HINT = ("(a tuned-settings file is what `fashion.py tune` writes: a JSON object whose "
             "\"settings\" are %s)" % ", ".join(SETTING_KEYS))


class TuningError(MrcnnError, ValueError):
    """A tuning grid or a tuned-settings file that cannot be used."""

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.hint = hint


############################################################
#  Settings and the grid
############################################################

class Setting(collections.namedtuple(
        "Setting", ["score_threshold", "nms_threshold", "mask_threshold", "min_mask_area"])):
    """One point of the sweep: score, NMS and mask thresholds and a minimum mask area
    (pixels of the original image)."""

    def config_overrides(self):
        """The configuration values of this setting (all but the minimum mask area, which is
        applied to results: drop_small_masks)."""
        return {"DETECTION_MIN_CONFIDENCE": float(self.score_threshold),
                "DETECTION_NMS_THRESHOLD": float(self.nms_threshold),
                "DETECTION_MASK_THRESHOLD": float(self.mask_threshold)}

    def as_dict(self):
        """{SETTING_KEYS: values}, the "settings" of a tuned-settings file."""
        return dict(self.config_overrides(), MIN_MASK_AREA=int(self.min_mask_area))

    def describe(self):
        return ("score >= %g, NMS %g, mask >= %g, min area %d px"
                % (self.score_threshold, self.nms_threshold, self.mask_threshold,
                   self.min_mask_area))


def _values(name, values, low, high, open_ends="", integer=False):
    """values sorted and deduplicated, each in [low, high] ("(" / ")" in open_ends: open)."""
    try:
        values = sorted(set(int(v) if integer else float(v) for v in values))
    except (TypeError, ValueError):
        raise TuningError("%s: expected numbers, got %r" % (name, values)) from None
    if not values:
        raise TuningError("%s: give at least one value" % name)
    for v in values:
        if v < low or ("(" in open_ends and v == low) or (high is not None and (
                v > high or (")" in open_ends and v == high))):
            raise TuningError("%s: %r is outside %s%g, %s%s" % (
                name, v, "(" if "(" in open_ends else "[", low,
                "inf" if high is None else "%g" % high, ")" if ")" in open_ends else "]"))
    return tuple(values)


class Grid(collections.namedtuple("Grid", ["scores", "nms", "masks", "min_areas"])):
    """The values swept: every combination of score thresholds, NMS thresholds, mask
    thresholds and minimum mask areas (each sorted, duplicates dropped)."""

    def __new__(cls, scores, nms, masks, min_areas=(0,)):
        return super().__new__(
            cls, _values("score thresholds", scores, 0.0, 1.0),
            _values("NMS thresholds", nms, 0.0, 1.0, open_ends="("),
            _values("mask thresholds", masks, 0.0, 1.0, open_ends="()"),
            _values("minimum mask areas", min_areas, 0, None, integer=True))

    @property
    def shape(self):
        return (len(self.scores), len(self.nms), len(self.masks), len(self.min_areas))

    def __len__(self):
        return int(np.prod(self.shape))

    def settings(self):
        """Every Setting, in grid order (score, then NMS, mask, area; each ascending)."""
        return [Setting(*v) for v in itertools.product(*self)]

    def collection_overrides(self):
        """The configuration to collect detections with: DETECTION_MIN_CONFIDENCE at the
        lowest score threshold, DETECTION_NMS_THRESHOLD at the highest NMS threshold."""
        return {"DETECTION_MIN_CONFIDENCE": float(self.scores[0]),
                "DETECTION_NMS_THRESHOLD": float(self.nms[-1])}


############################################################
#  Collecting detections with their soft masks
############################################################

class Collection(collections.namedtuple(
        "Collection", ["detections", "image_ids", "min_confidence", "nms_threshold",
                       "max_instances", "seconds"])):
    """Soft detections of a set of images and the settings they were collected with.

    detections: one dict per image (detect_soft); image_ids: the dataset's ids, in order;
    min_confidence, nms_threshold, max_instances: the detection layer's settings; seconds:
    the time the detection pass took.
    """

    def check(self, grid):
        """Raise TuningError when `grid` asks for detections the collection does not have."""
        if self.min_confidence is not None and grid.scores[0] < self.min_confidence:
            raise TuningError(
                "score threshold %g is below the %g the detections were collected with; "
                "collect with DETECTION_MIN_CONFIDENCE <= %g"
                % (grid.scores[0], self.min_confidence, grid.scores[0]))
        if self.nms_threshold is not None and grid.nms[-1] > self.nms_threshold:
            raise TuningError(
                "NMS threshold %g is above the %g the detections were collected with (what it "
                "would keep was suppressed already); collect with DETECTION_NMS_THRESHOLD >= %g"
                % (grid.nms[-1], self.nms_threshold, grid.nms[-1]))


def detect_soft(model, images):
    """MaskRCNN.detect, keeping soft masks: one dict per image with
        rois [N, 4] int32 pixels, class_ids [N] int32, scores [N] float32 (as detect's),
        soft_masks [N, h, w] float32: the mask head's probabilities for each detection's class,
        nms_boxes [N, 4] float32: the boxes the detection layer ran NMS on (normalized, in the
            molded image),
        image_shape (H, W),
    sorted by decreasing score (ties: the network's order). `images`: exactly BATCH_SIZE.
    """
    if model.mode != "inference":
        raise RuntimeError("detect_soft() needs a model built in inference mode")
    if len(images) != model.config.BATCH_SIZE:
        raise ValueError("detect_soft() takes exactly BATCH_SIZE=%d images (got %d)"
                         % (model.config.BATCH_SIZE, len(images)))
    molded, metas, windows = model.mold_inputs(images)
    anchors = model.get_anchors(molded[0].shape)
    anchors = np.broadcast_to(anchors, (len(images),) + anchors.shape)
    outputs = model.keras_model.predict_on_batch([molded, metas, anchors])
    detections, mrcnn_mask = np.asarray(outputs[0]), np.asarray(outputs[3])
    return [_unmold_soft(detections[i], mrcnn_mask[i], image.shape, molded[i].shape, windows[i])
            for i, image in enumerate(images)]


def _unmold_soft(detections, mrcnn_mask, original_shape, molded_shape, window):
    """MaskRCNN.unmold_detections without binarizing the masks (see detect_soft)."""
    detections = np.asarray(detections, np.float32)
    zero = np.flatnonzero(detections[:, 4] == 0)         # class 0 marks the padding
    n = int(zero[0]) if len(zero) else len(detections)
    nms_boxes = detections[:n, :4]
    class_ids = detections[:n, 4].astype(np.int32)
    scores = detections[:n, 5]
    masks = np.asarray(mrcnn_mask[np.arange(n), :, :, class_ids], np.float32)
    wy1, wx1, wy2, wx2 = utils.norm_boxes(window, molded_shape[:2])
    shift = np.array([wy1, wx1, wy1, wx1])
    scale = np.array([wy2 - wy1, wx2 - wx1, wy2 - wy1, wx2 - wx1])
    boxes = utils.denorm_boxes(np.divide(nms_boxes - shift, scale), original_shape[:2])
    keep = np.flatnonzero((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) > 0)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return {"rois": boxes[keep].astype(np.int32), "class_ids": class_ids[keep],
            "scores": scores[keep].astype(np.float32), "soft_masks": masks[keep],
            "nms_boxes": nms_boxes[keep],
            "image_shape": (int(original_shape[0]), int(original_shape[1]))}


def collect_detections(model, dataset, image_ids, progress=iter):
    """detect_soft on each image of `image_ids` (BATCH_SIZE at a time). Returns a Collection
    recording the model's DETECTION_MIN_CONFIDENCE, DETECTION_NMS_THRESHOLD and
    DETECTION_MAX_INSTANCES. progress: wraps the image ids (e.g. a progress bar)."""
    image_ids = list(image_ids)
    batch = model.config.BATCH_SIZE
    detections = []
    start = time.perf_counter()
    pending = []
    for image_id in progress(image_ids):
        pending.append(dataset.load_image(image_id))
        if len(pending) == batch:
            detections += detect_soft(model, pending)
            pending = []
    if pending:
        n = len(pending)
        detections += detect_soft(model, pending + [pending[-1]] * (batch - n))[:n]
    config = model.config
    return Collection(detections, image_ids, float(config.DETECTION_MIN_CONFIDENCE),
                      float(config.DETECTION_NMS_THRESHOLD), int(config.DETECTION_MAX_INSTANCES),
                      time.perf_counter() - start)


############################################################
#  Masks
############################################################

def _resize(mask, height, width):
    """utils.unmold_mask's resize: INTER_AREA when shrinking, INTER_LINEAR otherwise."""
    if mask.shape == (height, width):
        return mask.copy()
    shrink = height <= mask.shape[0] and width <= mask.shape[1]
    return cv2.resize(np.ascontiguousarray(mask), (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def paste_soft_mask(mask, box, image_hw):
    """A soft mask resized to its box as float32, cropped to the image.

    Returns (crop [h, w] float32, (y1, x1, y2, x2) of the crop in the image); thresholding the
    crop at t gives the pixels utils.unmold_mask(mask, box, image_hw, threshold=t) sets.
    """
    y1, x1, y2, x2 = (int(v) for v in box[:4])
    h, w = int(image_hw[0]), int(image_hw[1])
    cy1, cx1, cy2, cx2 = max(y1, 0), max(x1, 0), min(y2, h), min(x2, w)
    if y2 <= y1 or x2 <= x1 or cy2 <= cy1 or cx2 <= cx1:
        return np.zeros((0, 0), np.float32), (0, 0, 0, 0)
    full = _resize(np.asarray(mask, np.float32), y2 - y1, x2 - x1)
    return full[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1], (cy1, cx1, cy2, cx2)


def non_overlapping(masks, scores):
    """Give each pixel to the highest-scoring mask covering it (ties: the earlier mask).
    masks [H, W, N] bool; returns a new array."""
    masks = np.asarray(masks, bool).copy()
    if masks.shape[-1] == 0:
        return masks
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    taken = np.zeros(masks.shape[:2], bool)
    for k in order:
        masks[..., k] &= ~taken
        taken |= masks[..., k]
    return masks


def _select(result, keep):
    out = dict(result)
    for key in ("rois", "class_ids", "scores"):
        out[key] = np.asarray(result[key])[keep]
    out["masks"] = np.asarray(result["masks"])[..., keep]
    return out


def drop_small_masks(result, min_mask_area):
    """A detect() result without the detections whose mask has fewer than min_mask_area
    pixels (0 or None: the result itself)."""
    if not min_mask_area:
        return result
    areas = np.asarray(result["masks"], bool).sum(axis=(0, 1))
    return _select(result, np.flatnonzero(areas >= min_mask_area))


def as_submitted(result):
    """A detect() result with the masks a submission has: non-overlapping (each pixel to the
    highest-scoring mask), the masks left empty dropped."""
    result = dict(result, masks=non_overlapping(result["masks"], result["scores"]))
    masks = result["masks"]
    return _select(result, np.flatnonzero(masks.any(axis=(0, 1))))


############################################################
#  Re-thresholding one image
############################################################

def _nms_keep(det, threshold, collection_nms):
    """bool [N]: what per-class greedy NMS at `threshold` keeps of det (all when threshold is
    the collection's: the detections passed that NMS already)."""
    n = len(det["scores"])
    if collection_nms is not None and threshold >= collection_nms:
        return np.ones(n, bool)
    boxes = np.asarray(det.get("nms_boxes", det["rois"]), np.float32)
    scores, class_ids = np.asarray(det["scores"]), np.asarray(det["class_ids"])
    keep = np.zeros(n, bool)
    for c in np.unique(class_ids):
        ix = np.flatnonzero(class_ids == c)
        keep[ix[utils.non_max_suppression(boxes[ix], scores[ix], threshold)]] = True
    return keep


def rethreshold(det, setting, non_overlap=False, collection_nms=None):
    """The detect()-style result of one image's soft detections at `setting`: rois,
    class_ids, scores, masks [H, W, N] bool.

    collection_nms: the NMS threshold the detections were collected with (NMS at it or above
    is skipped); None always redoes NMS. non_overlap: as_submitted (each pixel to the
    highest-scoring mask, emptied masks dropped) after the minimum-area filter.
    """
    scores = np.asarray(det["scores"])
    keep = (scores >= np.float32(setting.score_threshold)) & _nms_keep(det, setting.nms_threshold,
                                                            collection_nms)
    ix = np.flatnonzero(keep)
    h, w = det["image_shape"]
    masks = np.zeros((h, w, len(ix)), bool)
    for k, i in enumerate(ix):
        crop, (y1, x1, y2, x2) = paste_soft_mask(det["soft_masks"][i], det["rois"][i], (h, w))
        masks[y1:y2, x1:x2, k] = crop >= setting.mask_threshold
    result = {"rois": np.asarray(det["rois"])[ix], "class_ids": np.asarray(det["class_ids"])[ix],
              "scores": scores[ix], "masks": masks}
    result = drop_small_masks(result, setting.min_mask_area)
    return as_submitted(result) if non_overlap else result


############################################################
#  The sweep
############################################################

def _by_score(det):
    """det with its detections by decreasing score (ties: their order), as collected."""
    order = np.argsort(-np.asarray(det["scores"]), kind="stable")
    if np.array_equal(order, np.arange(len(order))):
        return det
    out = dict(det)
    for key in ("rois", "class_ids", "scores", "soft_masks", "nms_boxes"):
        if key in det:
            out[key] = np.asarray(det[key])[order]
    return out


class _Image:
    """One image's soft detections pasted once, and the caches of its sweep."""

    def __init__(self, det, gt_masks, gt_class_ids, mask_thresholds, non_overlap, thresholds):
        h, w = det["image_shape"]
        gt_masks = np.asarray(gt_masks, bool)
        if gt_masks.shape[-1] and gt_masks.shape[:2] != (h, w):
            raise ValueError("ground truth masks %s and detections %s differ in size"
                             % (gt_masks.shape[:2], (h, w)))
        self.non_overlap, self.thresholds = non_overlap, thresholds
        self.class_ids = np.asarray(det["class_ids"]).reshape(-1)
        self.gt_class_ids = np.asarray(gt_class_ids).reshape(-1)
        self.gt_areas = gt_masks.sum(axis=(0, 1))
        self.gt_of_class = {int(c): np.flatnonzero(self.gt_class_ids == c)
                            for c in np.unique(self.gt_class_ids)}
        self.regions = []
        soft = []
        for mask, box in zip(det["soft_masks"], det["rois"]):
            crop, region = paste_soft_mask(mask, box, (h, w))
            soft.append(crop)
            self.regions.append(region)
        # Binarized once per mask threshold: bins[j][i] bool crop, areas[j] [N].
        self.bins = [[s >= m for s in soft] for m in mask_thresholds]
        self.areas = np.array([[int(b.sum()) for b in bins] for bins in self.bins],
                              np.int64).reshape(len(mask_thresholds), len(soft))
        # The ground truth of each detection's class, cropped to its region: [h * w, G_c]
        # float32 (counts by matrix product), made when first needed.
        self.gt_masks = gt_masks
        self.gt_crops = [None] * len(self.regions)
        r = np.array(self.regions, np.int64).reshape(-1, 4)
        meets = ((np.minimum(r[:, None, 2], r[None, :, 2]) > np.maximum(r[:, None, 0],
                                                                       r[None, :, 0]))
                 & (np.minimum(r[:, None, 3], r[None, :, 3]) > np.maximum(r[:, None, 1],
                                                                         r[None, :, 1])))
        # Sets of detections as int bit masks (bit q: detection q): per detection, the
        # higher-scoring ones whose region meets its own.
        self.above = [sum(1 << q for q in np.flatnonzero(meets[i, :i]).tolist())
                      for i in range(len(r))]
        self._masks = {}
        self._scores = {}

    def mask(self, j, i, above):
        """(area, intersections [G_c] with the ground truth of its class) of detection i at
        mask threshold j, less the pixels of the detections in `above` (a bit mask)."""
        key = (j, i, above)
        if key not in self._masks:
            m = self.bins[j][i]
            if above:
                m = m.copy()
                y1, x1, y2, x2 = self.regions[i]
                for q in range(above.bit_length()):
                    if not above >> q & 1:
                        continue
                    qy1, qx1, qy2, qx2 = self.regions[q]
                    oy1, ox1, oy2, ox2 = max(y1, qy1), max(x1, qx1), min(y2, qy2), min(x2, qx2)
                    m[oy1 - y1:oy2 - y1, ox1 - x1:ox2 - x1] &= \
                        ~self.bins[j][q][oy1 - qy1:oy2 - qy1, ox1 - qx1:ox2 - qx1]
            area = int(np.count_nonzero(m))
            gt = self._gt_crop(i)
            inter = (m.reshape(-1).astype(np.float32) @ gt).astype(np.int64) if gt.shape[-1] \
                else np.zeros(0, int)
            self._masks[key] = (area, inter)
        return self._masks[key]

    def _gt_crop(self, i):
        if self.gt_crops[i] is None:
            y1, x1, y2, x2 = self.regions[i]
            g = self.gt_of_class.get(int(self.class_ids[i]), np.zeros(0, int))
            crop = self.gt_masks[y1:y2, x1:x2][..., g]
            self.gt_crops[i] = crop.reshape(crop.shape[0] * crop.shape[1], len(g)).astype(
                np.float32)
        return self.gt_crops[i]

    def score(self, j, kept):
        """(sum of the (image, class) scores, their count, detections scored) of the kept
        detections (indices, decreasing score) at mask threshold j."""
        by_class = collections.defaultdict(list)
        kept_bits = sum(1 << i for i in kept.tolist())
        n = 0
        for i in kept.tolist():
            # What the kept higher-scoring masks whose regions meet this one take first.
            above = kept_bits & self.above[i] if self.non_overlap else 0
            area, inter = self.mask(j, i, above)
            if self.non_overlap and area == 0:
                continue                       # emptied by higher-scoring masks: not submitted
            by_class[int(self.class_ids[i])].append((i, above))
            n += 1
        total, count = 0.0, 0
        for c in set(by_class) | set(self.gt_of_class):
            preds = tuple(by_class.get(c, ()))
            key = (j, c, preds)
            if key not in self._scores:
                self._scores[key] = self._class_score(j, c, preds)
            total += self._scores[key]
            count += 1
        return total, count, n

    def _class_score(self, j, c, preds):
        g = self.gt_of_class.get(c, np.zeros(0, int))
        ious = np.zeros((len(preds), len(g)), np.float32)
        for row, (i, above) in enumerate(preds):
            area, inter = self.mask(j, i, above)
            union = area + self.gt_areas[g] - inter
            # As utils.compute_overlaps_masks: float32 counts, 0 where the union is empty.
            ious[row] = np.divide(inter.astype(np.float32), union.astype(np.float32),
                                  out=np.zeros(len(g), np.float32), where=union > 0)
        return competition_scores(ious, self.thresholds)


def sweep(collection, dataset=None, grid=None, gt=None, non_overlap=True, progress=iter,
          thresholds=COMPETITION_THRESHOLDS):
    """Score every setting of `grid` on the collection's images with the competition metric.

    The ground truth comes from dataset.load_mask(image_id) for collection.image_ids, or from
    gt: a list of (masks [H, W, G] bool, class_ids [G]) per image. non_overlap: score the masks
    a submission has (each pixel to the highest-scoring mask, emptied masks dropped); False
    scores them as detect() returns them. progress: wraps the image indices (the outer loop).
    Returns a SweepResult.
    """
    if grid is None:
        raise TypeError("sweep() needs a grid")
    collection.check(grid)
    shape = grid.shape
    n_scores, n_nms, n_masks, n_areas = shape
    totals = np.zeros(shape)
    counts = np.zeros(shape)
    kept_counts = np.zeros(shape)
    scores_grid = np.asarray(grid.scores, np.float32)     # compared as the network does
    areas_grid = np.asarray(grid.min_areas)
    start = time.perf_counter()
    for k in progress(range(len(collection.detections))):
        det = _by_score(collection.detections[k])
        masks, class_ids = gt[k] if gt is not None else dataset.load_mask(
            collection.image_ids[k])
        image = _Image(det, masks, class_ids, grid.masks, non_overlap, thresholds)
        d = len(det["scores"])
        score_ok = np.asarray(det["scores"])[None, :] >= scores_grid[:, None]      # [S, D]
        nms_ok = np.stack([_nms_keep(det, t, collection.nms_threshold) for t in grid.nms]) \
            if d else np.zeros((n_nms, 0), bool)                                  # [T, D]
        for j in range(n_masks):
            area_ok = image.areas[j][None, :] >= areas_grid[:, None]               # [A, D]
            kept = (score_ok[:, None, None, :] & nms_ok[None, :, None, :]
                    & area_ok[None, None, :, :]).reshape(n_scores * n_nms * n_areas, d)
            if d:
                # The settings that keep the same detections are scored once.
                unique, inverse = np.unique(np.packbits(kept, axis=1), axis=0,
                                            return_inverse=True)
                sets = [np.flatnonzero(np.unpackbits(u, count=d)) for u in unique]
            else:
                sets, inverse = [np.zeros(0, int)], np.zeros(len(kept), int)
            values = np.array([image.score(j, s) for s in sets], np.float64).reshape(-1, 3)
            inverse = np.asarray(inverse).reshape(-1)
            for target, column in ((totals, 0), (counts, 1), (kept_counts, 2)):
                target[:, :, j, :] += values[inverse, column].reshape(n_scores, n_nms, n_areas)
    metric = np.divide(totals, counts, out=np.zeros(shape), where=counts > 0)
    n_images = max(1, len(collection.detections))
    return SweepResult(grid, metric, kept_counts / n_images, len(collection.detections),
                       time.perf_counter() - start)


class SweepResult:
    """The sweep's scores: metric and mean detections per image, arrays of grid.shape
    (score, NMS, mask, area), for `images` images in `seconds`."""

    def __init__(self, grid, metric, detections, images, seconds):
        self.grid, self.metric, self.detections = grid, metric, detections
        self.images, self.seconds = images, seconds

    def _index(self, setting):
        return tuple(axis.index(v) for axis, v in zip(self.grid, setting))

    def metric_of(self, setting):
        return float(self.metric[self._index(setting)])

    def rows(self):
        """[(Setting, metric, mean detections per image)] by decreasing metric (ties: grid
        order, lower thresholds and areas first)."""
        settings = self.grid.settings()
        metric, dets = self.metric.reshape(-1), self.detections.reshape(-1)
        order = np.argsort(-metric, kind="stable")
        return [(settings[i], float(metric[i]), float(dets[i])) for i in order]

    def best(self):
        """The Setting of the highest metric (ties: the first in grid order)."""
        return self.rows()[0][0]

    def table(self, top=None, extra=None):
        """The rows as text, best first (`top` of them; None: all). extra: {Setting: text}
        appended to those settings' lines (e.g. their segm AP)."""
        lines = ["%4s  %6s  %5s  %6s  %8s  %12s  %10s" % (
            "rank", "score", "NMS", "mask", "min area", "competition", "dets/image")]
        for rank, (s, m, n) in enumerate(self.rows()[:top], 1):
            line = "%4d  %6.3g  %5.3g  %6.3g  %8d  %12.4f  %10.1f" % (
                rank, s.score_threshold, s.nms_threshold, s.mask_threshold, s.min_mask_area,
                m, n)
            if extra and s in extra:
                line += "  " + extra[s]
            lines.append(line)
        return "\n".join(lines)


############################################################
#  Tuned-settings files
############################################################

def write_tuned(path, setting, **info):
    """Write a tuned-settings file (JSON, atomically): {"settings": setting.as_dict(), ...info}.
    Returns the path."""
    data = {"settings": setting.as_dict()}
    data.update(info)
    data.setdefault("written", time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json_atomic(path, data)
    return path


def read_tuned(path):
    """The Setting of a tuned-settings file. Raises TuningError naming the file when it is not
    one (FileNotFoundError when it does not exist)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise TuningError("%s is not JSON (%s)" % (path, e), FILE_HINT) from None
    settings = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(settings, dict) or set(SETTING_KEYS) - set(settings):
        raise TuningError("%s: no \"settings\" with %s" % (path, ", ".join(SETTING_KEYS)),
                          FILE_HINT)
    try:
        grid = Grid(*([settings[k]] for k in SETTING_KEYS))
    except TuningError as e:
        raise TuningError("%s: %s" % (path, e), FILE_HINT) from None
    return grid.settings()[0]
