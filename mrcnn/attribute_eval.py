"""Attribute-aware evaluation: Fashionpedia's AP over IoU and attribute-F1 thresholds, and
per-attribute precision / recall / F1 of matched detections.

Detections are what `MaskRCNN.detect` returns per image, with an attribute head
(config.NUM_ATTRIBUTES > 0): dicts with rois [N, 4], class_ids [N], scores [N],
masks [H, W, N] bool and attributes (one sequence of attribute ids per detection). The ground
truth is (masks [H, W, G], class_ids [G], attributes: one sequence of ids per instance), by
default from `dataset.load_mask` and `dataset.load_attributes`.

    result = evaluate_attributes(dataset, image_ids, detections, num_attributes=92)
    result["iou_f1"]["AP"], result["iou"]["AP"], result["f1"]["AP"]
    result["per_attribute"][28]["f1"], result["per_attribute_micro"]["f1"]
    print(format_report(result, attribute_names))

The definition follows the Fashionpedia paper and its evaluation API (fashionpedia-api's
FPEval), written here independently:

* Attribute F1 of a detection and a ground-truth instance ("binary_macro"): both attribute sets
  as multi-hot vectors over the num_attributes ids; the F1 of label 1 (2 TP / (2 TP + FP + FN)
  over the ids) and of label 0 (2 TN / (2 TN + FP + FN)) averaged over the labels present in
  either vector (scikit-learn's f1_score(average="macro") on the two vectors). Two empty sets
  give 1. `average="binary"` uses label 1 alone (the F1 of the two sets; empty and empty: 1).
* Matching, per image and class, for an IoU threshold t_iou and an F1 threshold t_f1: the
  detections (the `max_dets` highest-scoring of that class, highest first) take in turn the
  still unmatched ground truth with IoU >= t_iou and F1 >= t_f1; among several, the scan
  keeps a candidate when its IoU and its F1 are both at least those of the one kept so far
  (FPEval's rule; with t_f1 ignored, COCOeval's highest IoU). A threshold of -1 means
  "ignored" (every pair passes it).
* AP per class and threshold pair: COCO's 101-point interpolated precision over recall.
* Summaries (the mean of the per-class APs of classes with ground truth, over the thresholds):
  - "iou_f1": both constraints, t_iou and t_f1 in 0.50:0.05:0.95; a class without attributes
    (not in `categories_with_attributes`) counts once per t_iou, with F1 ignored;
    AP_IOU50 / AP_IOU75 fix t_iou, AP_F150 / AP_F175 fix t_f1, AP_IOU50_F150 etc. both.
  - "iou": F1 ignored (every class): the same number as COCOeval's AP with maxDets 100 and
    area "all" (pycocotools' segm AP for segm IoUs).
  - "f1": IoU ignored (a detection may match any ground truth of its class).
* Per attribute (`attribute_scores`): detections matched to ground truth by IoU alone
  (>= match_iou, 0.5 by default, the "iou" rule); over the matched pairs an attribute
  predicted and annotated is a TP, predicted only a FP, annotated only a FN; precision
  TP / (TP + FP), recall TP / (TP + FN), F1 2 TP / (2 TP + FP + FN), 0 when undefined.
  "micro" pools the counts of every attribute; "macro" averages the attributes listed (those
  with a TP, FP or FN).

Differences from FPEval: one area range ("all", no small / medium / large), no crowd regions,
and the classes with attributes are given (or taken from the ground truth) instead of
Fashionpedia's hard-coded list. With fashionpedia's own class list pass
`categories_with_attributes`.
"""

import numpy as np

from mrcnn import utils

__all__ = ["THRESHOLDS", "RECALL_THRESHOLDS", "attribute_f1", "f1_matrix", "match",
           "average_precision", "evaluate_attributes", "attribute_scores", "format_report"]

THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)     # t_iou and t_f1
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
IGNORED = -1.0
_MAX_THRESHOLD = 1 - 1e-10


# ----------------------------------------------------------------------------- attribute F1

def attribute_f1(gt_attributes, pred_attributes, num_attributes=None, average="binary_macro"):
    """Attribute F1 of two sets of attribute ids (see the module's docstring).

    average "binary_macro" (Fashionpedia's; needs num_attributes, the number of attribute ids)
    or "binary" (the positive label alone).
    """
    a = {int(x) for x in gt_attributes}
    b = {int(x) for x in pred_attributes}
    tp, fp, fn = len(a & b), len(b - a), len(a - b)
    f1_pos = 2.0 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else None
    if average == "binary":
        return 1.0 if f1_pos is None else f1_pos
    if average != "binary_macro":
        raise ValueError("average must be 'binary_macro' or 'binary', not %r" % (average,))
    if num_attributes is None:
        raise ValueError("attribute_f1: 'binary_macro' needs num_attributes")
    union = a | b
    if union and max(union) >= num_attributes or min(union, default=0) < 0:
        raise ValueError("attribute ids %s outside 0..%d (num_attributes %d)"
                         % (sorted(union), num_attributes - 1, num_attributes))
    tn = num_attributes - len(union)
    values = []
    if f1_pos is not None:                       # label 1 present
        values.append(f1_pos)
    if tn + fp + fn:                             # label 0 present (in either vector)
        values.append(2.0 * tn / (2 * tn + fp + fn))
    return float(np.mean(values))


def f1_matrix(pred_attributes, gt_attributes, num_attributes=None, average="binary_macro"):
    """[P, G] attribute F1 of every prediction and ground-truth instance."""
    out = np.zeros((len(pred_attributes), len(gt_attributes)))
    for i, p in enumerate(pred_attributes):
        for j, g in enumerate(gt_attributes):
            out[i, j] = attribute_f1(g, p, num_attributes, average)
    return out


# ----------------------------------------------------------------------------- matching and AP

def match(ious, f1s, t_iou, t_f1):
    """Matched flags [P] of predictions (sorted by descending score) for one image and class.

    ious, f1s: [P, G]. A threshold of -1 (IGNORED) lets every pair pass it. See the module's
    docstring for the rule.
    """
    p, g = ious.shape
    taken = np.zeros(g, bool)
    matched = np.zeros(p, bool)
    for d in range(p):
        best_iou, best_f1 = min(t_iou, _MAX_THRESHOLD), min(t_f1, _MAX_THRESHOLD)
        m = -1
        for j in range(g):
            if taken[j] or ious[d, j] < best_iou or f1s[d, j] < best_f1:
                continue
            best_iou, best_f1, m = ious[d, j], f1s[d, j], j
        if m >= 0:
            taken[m] = True
            matched[d] = True
    return matched


def average_precision(scores, matched, num_gt):
    """COCO's 101-point interpolated AP of one class: detections of every image (scores [D],
    matched [D] bool, in the images' order, each image's sorted by score) and num_gt ground
    truth instances. None when num_gt is 0."""
    if num_gt == 0:
        return None
    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(np.asarray(matched, bool)[order]).astype(np.float64)
    fp = np.cumsum(~np.asarray(matched, bool)[order]).astype(np.float64)
    recall = tp / num_gt
    precision = tp / (tp + fp + np.spacing(1))
    for i in range(len(precision) - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
    q = np.zeros(len(RECALL_THRESHOLDS))
    inds = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    valid = inds < len(precision)
    q[valid] = precision[inds[valid]]
    return float(q.mean())


# ----------------------------------------------------------------------------- evaluation

def _ground_truth(dataset, image_id):
    if hasattr(dataset, "load_instances"):
        masks, class_ids, attributes = dataset.load_instances(image_id)
    else:
        masks, class_ids = dataset.load_mask(image_id)
        attributes = dataset.load_attributes(image_id)
    return masks, class_ids, attributes


def _ious(r, masks, iou_type):
    pred_masks = np.asarray(r["masks"], bool)
    masks = np.asarray(masks, bool)
    if iou_type == "segm":
        if masks.shape[-1] and pred_masks.shape[-1] and masks.shape[:2] != pred_masks.shape[:2]:
            raise ValueError("ground truth masks %s and predicted masks %s differ in size"
                             % (masks.shape[:2], pred_masks.shape[:2]))
        return utils.compute_overlaps_masks(pred_masks, masks)
    if iou_type == "bbox":
        rois = np.asarray(r["rois"], np.float64).reshape(-1, 4)
        boxes = utils.extract_bboxes(masks).astype(np.float64) if masks.shape[-1] else \
            np.zeros((0, 4))
        return utils.compute_overlaps(rois, boxes)
    raise ValueError("iou_type must be 'segm' or 'bbox', not %r" % (iou_type,))


def _pred_attributes(r, n):
    attributes = r.get("attributes")
    if attributes is None:
        return [()] * n
    attributes = list(attributes)
    if len(attributes) != n:
        raise ValueError("detections: %d attribute sets for %d detections"
                         % (len(attributes), n))
    return [tuple(int(a) for a in np.asarray(x).reshape(-1)) for x in attributes]


def evaluate_attributes(dataset, image_ids, detections, num_attributes=None, gt=None,
                        iou_type="segm", categories_with_attributes=None, match_iou=0.5,
                        max_dets=100, average="binary_macro"):
    """Attribute-aware AP (Fashionpedia) and per-attribute precision / recall / F1.

    dataset: with load_mask + load_attributes (or load_instances), unless `gt` gives a list of
    (masks, class_ids, attributes) per image. detections: one dict per image (module
    docstring). num_attributes: the number of attribute ids (default: len of
    dataset.attribute_info). categories_with_attributes: class ids whose AP uses the F1
    thresholds (default: the classes with an attribute in the ground truth of these images).

    Returns {"iou_f1": {...}, "iou": {...}, "f1": {...}} summaries (module docstring; 0.0 when
    no class has ground truth), "per_class": {class_id: ap [11, 11]} (axis 0 t_iou, axis 1
    t_f1, each THRESHOLDS then IGNORED; nan where undefined), "per_attribute",
    "per_attribute_micro", "per_attribute_macro" (attribute_scores) and "categories_with_
    attributes", "num_attributes", "images", "iou_type", "matched" (pairs at match_iou).
    """
    if num_attributes is None:
        info = getattr(dataset, "attribute_info", None)
        if not info:
            raise ValueError("evaluate_attributes: give num_attributes (the number of "
                             "attribute ids)")
        num_attributes = max(len(info), max(int(k) for k in info) + 1)
    images = []
    for k, (image_id, r) in enumerate(zip(image_ids, detections)):
        masks, class_ids, attributes = gt[k] if gt is not None else _ground_truth(dataset,
                                                                                   image_id)
        class_ids = np.asarray(class_ids).reshape(-1)
        attributes = [tuple(int(a) for a in x) for x in attributes]
        if len(attributes) != len(class_ids):
            raise ValueError("ground truth: %d attribute sets for %d instances"
                             % (len(attributes), len(class_ids)))
        pred_class_ids = np.asarray(r["class_ids"]).reshape(-1)
        pred_scores = np.asarray(r["scores"], np.float64).reshape(-1)
        images.append((class_ids, attributes, pred_class_ids, pred_scores,
                       _pred_attributes(r, len(pred_class_ids)), _ious(r, masks, iou_type)))
    if categories_with_attributes is None:
        categories_with_attributes = sorted({int(c) for cids, attrs, *_ in images
                                             for c, a in zip(cids, attrs) if a})
    with_attributes = {int(c) for c in categories_with_attributes}
    classes = sorted({int(c) for cids, *_ in images for c in cids})
    n_t = len(THRESHOLDS) + 1
    t_values = list(THRESHOLDS) + [IGNORED]
    per_class = {}
    for c in classes:
        f1_indices = range(n_t) if c in with_attributes else [n_t - 1]
        scores, matched, num_gt = [], {}, 0
        for cids, attrs, pcids, pscores, pattrs, ious in images:
            gi = np.flatnonzero(cids == c)
            pi = np.flatnonzero(pcids == c)
            pi = pi[np.argsort(-pscores[pi], kind="mergesort")][:max_dets]
            num_gt += len(gi)
            if not len(pi):
                continue
            sub_ious = ious[np.ix_(pi, gi)]
            if c in with_attributes:
                f1s = f1_matrix([pattrs[i] for i in pi], [attrs[j] for j in gi],
                                num_attributes, average)
            else:
                f1s = np.ones_like(sub_ious)
            scores.append(pscores[pi])
            for a in range(n_t):
                for b in f1_indices:
                    matched.setdefault((a, b), []).append(
                        match(sub_ious, f1s, t_values[a], t_values[b]))
        ap = np.full((n_t, n_t), np.nan)
        for a in range(n_t):
            for b in f1_indices:
                if num_gt == 0:
                    continue
                flags = np.concatenate(matched[(a, b)]) if scores else np.zeros(0, bool)
                ap[a, b] = average_precision(np.concatenate(scores) if scores else [],
                                             flags, num_gt)
        per_class[c] = ap
    result = {"iou_f1": _summaries(per_class, with_attributes, iou=True, f1=True),
              "iou": _summaries(per_class, with_attributes, iou=True, f1=False),
              "f1": _summaries(per_class, with_attributes, iou=False, f1=True),
              "per_class": per_class, "categories_with_attributes": sorted(with_attributes),
              "num_attributes": int(num_attributes), "images": len(images),
              "iou_type": iou_type}
    result.update(attribute_scores(images=images, match_iou=match_iou, max_dets=max_dets))
    return result


def _mean(per_class, with_attributes, iou_idx, f1_idx):
    """Mean of the APs at the iou indices x (f1 indices for classes with attributes, the
    ignored F1 for the others)."""
    values = []
    last = len(THRESHOLDS)
    for c, ap in per_class.items():
        f1s = f1_idx if c in with_attributes else [last]
        values.extend(ap[a, b] for a in iou_idx for b in f1s)
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else 0.0


def _summaries(per_class, with_attributes, iou=True, f1=True):
    n = len(THRESHOLDS)
    every = list(range(n))
    at = {50: [int(np.flatnonzero(THRESHOLDS == 0.5)[0])],
          75: [int(np.flatnonzero(THRESHOLDS == 0.75)[0])]}
    iou_all = every if iou else [n]
    f1_all = every if f1 else [n]
    # F1 ignored: every class at the ignored F1 index.
    w = with_attributes if f1 else set()
    out = {"AP": _mean(per_class, w, iou_all, f1_all)}
    if iou:
        for t in (50, 75):
            out["AP_IOU%d" % t] = _mean(per_class, w, at[t], f1_all)
    if f1:
        for t in (50, 75):
            out["AP_F1%d" % t] = _mean(per_class, w, iou_all, at[t])
    if iou and f1:
        for ti in (50, 75):
            for tf in (50, 75):
                out["AP_IOU%d_F1%d" % (ti, tf)] = _mean(per_class, w, at[ti], at[tf])
    return out


# ----------------------------------------------------------------------------- per attribute

def _counts_to_scores(tp, fp, fn):
    precision = tp / float(tp + fp) if tp + fp else 0.0
    recall = tp / float(tp + fn) if tp + fn else 0.0
    f1 = 2.0 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "tp": int(tp), "fp": int(fp), "fn": int(fn), "support": int(tp + fn)}


def attribute_scores(pairs=None, images=None, match_iou=0.5, max_dets=100):
    """Per-attribute precision / recall / F1 over matched (predicted, ground-truth) attribute
    sets: `pairs` a list of (pred ids, gt ids), or `images` as evaluate_attributes builds them
    (matched per image and class by IoU >= match_iou alone).

    Returns {"per_attribute": {id: {precision, recall, f1, tp, fp, fn, support}},
    "per_attribute_micro": {...}, "per_attribute_macro": {precision, recall, f1},
    "matched": number of pairs}.
    """
    if pairs is None:
        pairs = []
        for cids, attrs, pcids, pscores, pattrs, ious in images:
            for c in np.unique(pcids):
                gi = np.flatnonzero(cids == c)
                pi = np.flatnonzero(pcids == c)
                pi = pi[np.argsort(-pscores[pi], kind="mergesort")][:max_dets]
                sub = ious[np.ix_(pi, gi)]
                taken = np.zeros(len(gi), bool)
                for d in range(len(pi)):
                    best, m = min(match_iou, _MAX_THRESHOLD), -1
                    for j in range(len(gi)):
                        if not taken[j] and sub[d, j] >= best:
                            best, m = sub[d, j], j
                    if m >= 0:
                        taken[m] = True
                        pairs.append((pattrs[pi[d]], attrs[gi[m]]))
    counts = {}
    for pred, truth in pairs:
        p, g = {int(x) for x in pred}, {int(x) for x in truth}
        for a in p | g:
            c = counts.setdefault(a, [0, 0, 0])
            c[0 if a in p and a in g else 1 if a in p else 2] += 1
    per_attribute = {a: _counts_to_scores(*counts[a]) for a in sorted(counts)}
    total = np.sum([counts[a] for a in counts], axis=0) if counts else np.zeros(3, int)
    macro = {k: float(np.mean([s[k] for s in per_attribute.values()])) if per_attribute else 0.0
             for k in ("precision", "recall", "f1")}
    return {"per_attribute": per_attribute, "per_attribute_micro": _counts_to_scores(*total),
            "per_attribute_macro": macro, "matched": len(pairs)}


# ----------------------------------------------------------------------------- report

def format_report(result, attribute_names=None, top=None):
    """Text lines of evaluate_attributes' result: the three AP summaries, then a table of the
    attributes (name, precision, recall, F1, support; `top` most frequent only if given)."""
    names = attribute_names or {}
    lines = ["Attribute-aware AP (Fashionpedia; %s IoU, %d images, %d attribute ids; F1 "
             "thresholds on classes %s):" % (result.get("iou_type", "segm"), result["images"],
                                  result["num_attributes"],
                                  result["categories_with_attributes"] or "none")]
    labels = {"iou_f1": "IoU+F1", "iou": "IoU only", "f1": "F1 only"}
    for key in ("iou_f1", "iou", "f1"):
        s = result[key]
        lines.append("  AP %-8s %.4f   %s" % (labels[key], s["AP"], "  ".join(
            "%s %.4f" % (k[3:], v) for k, v in s.items() if k != "AP")))
    micro, macro = result["per_attribute_micro"], result["per_attribute_macro"]
    lines.append("Attributes of matched detections (IoU >= match threshold; %d pairs): "
                 "micro P %.3f R %.3f F1 %.3f, macro P %.3f R %.3f F1 %.3f"
                 % (result["matched"], micro["precision"], micro["recall"], micro["f1"],
                    macro["precision"], macro["recall"], macro["f1"]))
    rows = sorted(result["per_attribute"].items(), key=lambda kv: (-kv[1]["support"], kv[0]))
    if top:
        rows = rows[:top]
    if rows:
        lines.append("  %-4s %-28s %9s %7s %7s %8s" % ("id", "attribute", "precision", "recall",
                                                       "F1", "support"))
    for a, s in rows:
        name = names.get(a, "") if isinstance(names, dict) else (
            names[a] if a < len(names) else "")
        lines.append("  %-4d %-28s %9.3f %7.3f %7.3f %8d"
                     % (a, str(name)[:28], s["precision"], s["recall"], s["f1"], s["support"]))
    return lines
