"""Evaluation: COCO-style AP/AR through pycocotools, and the iMaterialist 2019 metric.

Detections are what `MaskRCNN.detect` returns per image: dicts with
    rois [N, 4] (y1, x1, y2, x2) pixels, class_ids [N] int, scores [N] float, masks [H, W, N] bool.

    detections = run_detections(model, dataset, image_ids)
    stats = evaluate_coco(dataset, image_ids, detections)         # prints the 12 lines per type
    stats["segm"]["AP50"], stats["bbox"]["AP"]
    score = competition_metric(dataset, image_ids, detections)

COCO evaluation: the ground truth is built from `dataset.load_mask` (masks encoded with
pycocotools, boxes and areas from the masks); bbox results use the detection boxes, segm
results the masks (pycocotools computes their areas). COCOeval's default parameters are used,
so the 12 numbers are exactly pycocotools' (maxDets 1/10/100, COCO area ranges).

Competition metric (iMaterialist (Fashion) 2019): for every image and every class present in
the ground truth or the predictions of that image, and each IoU threshold t in 0.5:0.05:0.95,
predictions (highest score first) are matched greedily to the unmatched ground-truth mask of
that class with the highest IoU, a match needing IoU > t; the (image, class) score is the mean
over t of TP / (TP + FP + FN). The metric is the mean over all (image, class) pairs.
"""

import contextlib
import io
import time

import numpy as np

from mrcnn import utils

__all__ = ["STAT_NAMES", "COMPETITION_THRESHOLDS", "run_detections", "build_coco_gt",
           "build_coco_results", "evaluate_coco", "competition_scores",
           "competition_image_scores", "competition_metric"]

# Names of COCOeval.stats, in order (the 12 lines COCOeval.summarize prints).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

COMPETITION_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)


def _mask_utils():
    from pycocotools import mask as mask_utils
    return mask_utils


def _encode(masks):
    """COCO compressed RLEs of bool masks [H, W, N] (counts as str, JSON-friendly)."""
    mask_utils = _mask_utils()
    if masks.shape[-1] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


# ----------------------------------------------------------------------------- detections

def run_detections(model, dataset, image_ids, verbose=True, detect=None, tta=None):
    """model.detect on each image (one at a time). Returns a list of result dicts.

    detect: a function image -> result dict to use instead (e.g. a wrapper of model.detect).
    tta: test-time augmentation, a mrcnn.tta.TTA or a specification such as "flip" or
    "flip,scales=0.8,1.0,1.2" (see mrcnn.tta); not with `detect`.
    """
    if detect is not None and tta is not None:
        raise ValueError("run_detections: give detect or tta, not both")
    if tta is not None:
        from mrcnn import tta as tta_module
        spec = tta_module.as_tta(tta)
        detect = lambda image: tta_module.detect_image(model, image, spec)  # noqa: E731
    elif detect is None:
        detect = lambda image: model.detect([image], verbose=0)[0]  # noqa: E731
    detections = []
    start = time.time()
    iterator = image_ids
    if verbose:
        try:
            from tqdm import tqdm
            iterator = tqdm(image_ids, desc="detect", unit="image")
        except ImportError:
            pass
    for image_id in iterator:
        image = dataset.load_image(image_id)
        detections.append(detect(image))
    if verbose:
        print("Detection: %.2f s per image" % ((time.time() - start) / max(1, len(image_ids))))
    return detections


# ----------------------------------------------------------------------------- COCO

def build_coco_gt(dataset, image_ids, gt=None):
    """A pycocotools COCO object of the ground truth of `image_ids` (internal dataset ids).

    gt: optional list of (masks [H, W, N], class_ids [N]) per image, instead of load_mask.
    Category ids are the dataset's class ids (1..num_classes-1).
    """
    from pycocotools.coco import COCO
    mask_utils = _mask_utils()
    images, annotations = [], []
    for k, image_id in enumerate(image_ids):
        masks, class_ids = gt[k] if gt is not None else dataset.load_mask(image_id)
        masks = np.asarray(masks, bool)
        h, w = masks.shape[:2]
        if masks.shape[-1] == 0 or h == 0:
            info = dataset.image_info[image_id]
            h, w = info.get("height", h), info.get("width", w)
        images.append({"id": int(image_id), "height": int(h), "width": int(w)})
        rles = _encode(masks)
        if not rles:
            continue
        areas = mask_utils.area([dict(r, counts=r["counts"].encode()) for r in rles])
        boxes = mask_utils.toBbox([dict(r, counts=r["counts"].encode()) for r in rles])
        for rle, class_id, area, box in zip(rles, class_ids, areas, boxes):
            annotations.append({
                "id": len(annotations) + 1, "image_id": int(image_id),
                "category_id": int(class_id), "segmentation": rle, "area": float(area),
                "bbox": [float(v) for v in box], "iscrowd": 0})
    categories = [{"id": int(i), "name": dataset.class_names[i]}
                  for i in range(1, len(dataset.class_names))]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def build_coco_results(image_ids, detections, iou_type):
    """COCO result dicts of `detections` (one dict per image, in image_ids order).

    iou_type "bbox": boxes from `rois` as [x, y, width, height]; "segm": RLEs of `masks`.
    """
    results = []
    for image_id, r in zip(image_ids, detections):
        class_ids = np.asarray(r["class_ids"]).reshape(-1)
        scores = np.asarray(r["scores"], np.float64).reshape(-1)
        if iou_type == "bbox":
            rois = np.asarray(r["rois"], np.float64).reshape(-1, 4)
            for (y1, x1, y2, x2), c, s in zip(rois, class_ids, scores):
                results.append({"image_id": int(image_id), "category_id": int(c),
                                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                                "score": float(s)})
        elif iou_type == "segm":
            for rle, c, s in zip(_encode(np.asarray(r["masks"], bool)), class_ids, scores):
                results.append({"image_id": int(image_id), "category_id": int(c),
                                "segmentation": rle, "score": float(s)})
        else:
            raise ValueError("iou_type must be 'bbox' or 'segm', not %r" % (iou_type,))
    return results


def _bytes_rles(results):
    out = []
    for r in results:
        r = dict(r)
        if "segmentation" in r and isinstance(r["segmentation"].get("counts"), str):
            r["segmentation"] = dict(r["segmentation"],
                                     counts=r["segmentation"]["counts"].encode("ascii"))
        out.append(r)
    return out


def evaluate_coco(dataset, image_ids, detections, iou_types=("bbox", "segm"), verbose=True,
                  coco_gt=None):
    """COCOeval on `detections` of `image_ids`.

    Returns {iou_type: {stat name: value}} with STAT_NAMES keys (COCOeval.stats); prints
    COCOeval's 12 summary lines per type when verbose. With no detections at all every
    stat is 0.0.
    """
    from pycocotools.cocoeval import COCOeval
    image_ids = [int(i) for i in image_ids]
    if coco_gt is None:
        coco_gt = build_coco_gt(dataset, image_ids)
    out = {}
    for iou_type in iou_types:
        results = build_coco_results(image_ids, detections, iou_type)
        if verbose:
            print("\nCOCO evaluation, %s (%d images, %d detections):"
                  % (iou_type, len(image_ids), len(results)))
        if not results:
            if verbose:
                print(" no detections: every AP and AR is 0")
            out[iou_type] = {name: 0.0 for name in STAT_NAMES}
            continue
        quiet = contextlib.redirect_stdout(io.StringIO())
        with quiet:
            coco_dt = coco_gt.loadRes(_bytes_rles(results))
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.imgIds = image_ids
            ev.evaluate()
            ev.accumulate()
        if verbose:
            ev.summarize()
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                ev.summarize()
        out[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    return out


# ----------------------------------------------------------------------------- competition metric

def competition_scores(ious, thresholds=COMPETITION_THRESHOLDS):
    """Mean over thresholds of TP / (TP + FP + FN) for one image and class.

    ious: [P, G] IoUs of the predictions (sorted by descending score) and ground truth.
    A prediction matches the unmatched ground truth of highest IoU, if that IoU > t.
    """
    p, g = ious.shape
    if p == 0 and g == 0:
        return None
    values = []
    for t in thresholds:
        matched = np.zeros(g, bool)
        tp = 0
        for i in range(p):
            candidates = np.where(matched, -1.0, ious[i])
            if g and candidates.max() > t:
                matched[int(candidates.argmax())] = True
                tp += 1
        values.append(tp / float(p + g - tp))       # TP + FP + FN = P + G - TP
    return float(np.mean(values))


def competition_image_scores(gt_masks, gt_class_ids, pred_masks, pred_class_ids,
                             pred_scores=None, thresholds=COMPETITION_THRESHOLDS):
    """{class_id: score} for one image: every class in its ground truth or predictions.

    Masks [H, W, N] bool (ground truth and predictions at the same size).
    """
    gt_class_ids = np.asarray(gt_class_ids).reshape(-1)
    pred_class_ids = np.asarray(pred_class_ids).reshape(-1)
    if pred_scores is None:
        pred_scores = np.ones(len(pred_class_ids))
    pred_scores = np.asarray(pred_scores, np.float64).reshape(-1)
    order = np.argsort(-pred_scores, kind="stable")
    pred_masks = np.asarray(pred_masks, bool)[..., order]
    pred_class_ids = pred_class_ids[order]
    gt_masks = np.asarray(gt_masks, bool)
    if gt_masks.shape[-1] and pred_masks.shape[-1] and gt_masks.shape[:2] != pred_masks.shape[:2]:
        raise ValueError("ground truth masks %s and predicted masks %s differ in size"
                         % (gt_masks.shape[:2], pred_masks.shape[:2]))
    ious = utils.compute_overlaps_masks(pred_masks, gt_masks)     # [P, G]
    out = {}
    for c in np.union1d(gt_class_ids, pred_class_ids):
        pi = np.flatnonzero(pred_class_ids == c)
        gi = np.flatnonzero(gt_class_ids == c)
        out[int(c)] = competition_scores(ious[np.ix_(pi, gi)], thresholds)
    return out


def competition_metric(dataset, image_ids, detections, gt=None, return_details=False):
    """The iMaterialist 2019 metric over images: mean of the (image, class) scores.

    gt: optional list of (masks, class_ids) per image instead of dataset.load_mask.
    Returns the score (0.0 when there is nothing to score), or (score, details) with details
    a list of {class_id: score} per image.
    """
    details = []
    for k, (image_id, r) in enumerate(zip(image_ids, detections)):
        masks, class_ids = gt[k] if gt is not None else dataset.load_mask(image_id)
        details.append(competition_image_scores(masks, class_ids, r["masks"], r["class_ids"],
                                                r.get("scores")))
    values = [v for d in details for v in d.values() if v is not None]
    score = float(np.mean(values)) if values else 0.0
    return (score, details) if return_details else score
