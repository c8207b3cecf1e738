"""mrcnn.evaluate: COCO numbers equal pycocotools' own; the competition metric on hand-worked cases."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn import evaluate, utils


class MemoryDataset(utils.Dataset):
    """Images given as (masks, class_ids) in memory."""

    def __init__(self, items, num_classes=3):
        super().__init__()
        for c in range(1, num_classes + 1):
            self.add_class("mem", c, "class%d" % c)
        for i, (masks, class_ids) in enumerate(items):
            self.add_image("mem", image_id=i, path=None, height=masks.shape[0],
                           width=masks.shape[1], masks=masks, class_ids=class_ids)
        self.prepare()

    def load_mask(self, image_id):
        info = self.image_info[image_id]
        return info["masks"], np.asarray(info["class_ids"], np.int32)


def _box_mask(h, w, y1, x1, y2, x2):
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


def _random_scene(rng, h=96, w=128, n=4, classes=3):
    masks, class_ids = [], []
    for _ in range(n):
        y1, x1 = rng.integers(0, h - 20), rng.integers(0, w - 20)
        y2, x2 = y1 + rng.integers(8, min(60, h - y1)), x1 + rng.integers(8, min(70, w - x1))
        m = _box_mask(h, w, y1, x1, y2, x2)
        # Some holes so that masks are not boxes.
        m[y1 + 2:y1 + 5, x1 + 2:x1 + 5] = False
        masks.append(m)
        class_ids.append(int(rng.integers(1, classes + 1)))
    return np.stack(masks, -1), np.array(class_ids, np.int32)


def _predictions(rng, masks, class_ids):
    """Perturbed copies of the ground truth, some wrong classes, some false positives."""
    h, w, n = masks.shape
    out_masks, out_cls, out_scores = [], [], []
    for k in range(n):
        if rng.random() < 0.15:
            continue                                   # missed
        m = np.roll(masks[..., k], shift=(int(rng.integers(-4, 5)), int(rng.integers(-4, 5))),
                    axis=(0, 1))
        out_masks.append(m)
        out_cls.append(class_ids[k] if rng.random() < 0.85 else int(rng.integers(1, 4)))
        out_scores.append(float(rng.uniform(0.3, 1.0)))
    for _ in range(int(rng.integers(0, 3))):          # false positives
        y1, x1 = rng.integers(0, h - 20), rng.integers(0, w - 20)
        out_masks.append(_box_mask(h, w, y1, x1, y1 + 15, x1 + 18))
        out_cls.append(int(rng.integers(1, 4)))
        out_scores.append(float(rng.uniform(0.05, 0.8)))
    masks = np.stack(out_masks, -1) if out_masks else np.zeros((h, w, 0), bool)
    return {"masks": masks, "class_ids": np.array(out_cls, np.int32),
            "scores": np.array(out_scores, np.float32),
            "rois": utils.extract_bboxes(masks) if out_masks else np.zeros((0, 4), np.int32)}


def _pycocotools_reference(tmp_path, items, detections, iou_type):
    """COCOeval run from JSON files written here, independently of mrcnn.evaluate."""
    images, anns, results = [], [], []
    for i, ((masks, class_ids), det) in enumerate(zip(items, detections)):
        h, w = masks.shape[:2]
        images.append({"id": i, "height": h, "width": w, "file_name": "%d.jpg" % i})
        for k in range(masks.shape[-1]):
            rle = mask_utils.encode(np.asfortranarray(masks[..., k].astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(class_ids[k]),
                         "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                         "area": float(mask_utils.area(rle)),
                         "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})
        for k in range(det["masks"].shape[-1]):
            y1, x1, y2, x2 = det["rois"][k].tolist()
            entry = {"image_id": i, "category_id": int(det["class_ids"][k]),
                     "score": float(det["scores"][k])}
            if iou_type == "bbox":
                entry["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                rle = mask_utils.encode(np.asfortranarray(det["masks"][..., k].astype(np.uint8)))
                entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            results.append(entry)
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / ("dt_%s.json" % iou_type)
    gt_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": c, "name": "class%d" % c} for c in (1, 2, 3)]}))
    dt_path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(str(dt_path))
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_numbers_equal_pycocotools(tmp_path, seed, capsys):
    rng = np.random.default_rng(seed)
    items = [_random_scene(rng) for _ in range(6)]
    dataset = MemoryDataset(items)
    detections = [_predictions(rng, m, c) for m, c in items]
    stats = evaluate.evaluate_coco(dataset, dataset.image_ids, detections, verbose=True)
    printed = capsys.readouterr().out
    assert printed.count("Average Precision") == 12 and printed.count("Average Recall") == 12
    for iou_type in ("bbox", "segm"):
        reference = _pycocotools_reference(tmp_path, items, detections, iou_type)
        ours = np.array([stats[iou_type][name] for name in evaluate.STAT_NAMES])
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12)
    assert 0 < stats["segm"]["AP50"] <= 1


def test_coco_perfect_and_empty():
    rng = np.random.default_rng(3)
    items = [_random_scene(rng) for _ in range(3)]
    dataset = MemoryDataset(items)
    perfect = [{"masks": m, "class_ids": c, "scores": np.ones(len(c)),
                "rois": utils.extract_bboxes(m)} for m, c in items]
    stats = evaluate.evaluate_coco(dataset, dataset.image_ids, perfect, verbose=False)
    assert stats["segm"]["AP50"] == pytest.approx(1.0)
    assert stats["segm"]["AP"] == pytest.approx(1.0)
    empty = [{"masks": np.zeros(m.shape[:2] + (0,), bool), "class_ids": np.zeros(0, np.int32),
              "scores": np.zeros(0), "rois": np.zeros((0, 4))} for m, _ in items]
    stats = evaluate.evaluate_coco(dataset, dataset.image_ids, empty, verbose=False)
    assert stats["bbox"]["AP"] == 0.0 and stats["segm"]["AR100"] == 0.0


def test_mask_ious_match_pycocotools():
    rng = np.random.default_rng(5)
    a, _ = _random_scene(rng, n=5)
    b, _ = _random_scene(rng, n=3)
    ours = utils.compute_overlaps_masks(a, b)
    ra = mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))
    rb = mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))
    reference = mask_utils.iou(ra, rb, [0] * 3)
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    assert utils.compute_overlaps_masks(a, np.zeros(a.shape[:2] + (0,), bool)).shape == (5, 0)


# ----------------------------------------------------------------------------- competition metric

H, W = 20, 20


def _masks(*boxes):
    return np.stack([_box_mask(H, W, *b) for b in boxes], -1) if boxes \
        else np.zeros((H, W, 0), bool)


def _score(gt_boxes, gt_cls, pred_boxes, pred_cls, scores=None):
    return evaluate.competition_image_scores(_masks(*gt_boxes), gt_cls, _masks(*pred_boxes),
                                             pred_cls, scores)


def test_competition_perfect_match_scores_one():
    assert _score([(0, 0, 10, 10)], [1], [(0, 0, 10, 10)], [1]) == {1: 1.0}


def test_competition_iou_072_passes_half_the_thresholds():
    # ground truth 10x10 = 100 px; prediction 8x9 = 72 px inside it: IoU 0.72.
    # t = 0.50, 0.55, 0.60, 0.65, 0.70 -> TP (score 1); t = 0.75 ... 0.95 -> FP + FN (score 0).
    s = _score([(0, 0, 10, 10)], [1], [(0, 0, 8, 9)], [1])
    assert s == {1: pytest.approx(0.5)}


def test_competition_iou_exactly_half_is_no_match():
    # 10x10 gt, 10x5 prediction inside: IoU = 50/100 = 0.5, not above 0.5.
    assert _score([(0, 0, 10, 10)], [1], [(0, 0, 10, 5)], [1]) == {1: 0.0}


def test_competition_false_positive_and_negative():
    # One exact match and one extra prediction: TP 1, FP 1, FN 0 -> 1/2 at every t.
    assert _score([(0, 0, 10, 10)], [1], [(0, 0, 10, 10), (12, 12, 18, 18)], [1, 1]) == \
        {1: pytest.approx(0.5)}
    # Two ground truths, one found: TP 1, FN 1 -> 1/2.
    assert _score([(0, 0, 10, 10), (12, 12, 18, 18)], [1, 1], [(0, 0, 10, 10)], [1]) == \
        {1: pytest.approx(0.5)}


def test_competition_classes_are_scored_separately():
    # The right mask with the wrong class: class 1 has an FN, class 2 an FP: both 0.
    assert _score([(0, 0, 10, 10)], [1], [(0, 0, 10, 10)], [2]) == {1: 0.0, 2: 0.0}
    # Two classes, one right (1.0) one missed (0.0).
    s = _score([(0, 0, 10, 10), (12, 12, 18, 18)], [1, 2], [(0, 0, 10, 10)], [1])
    assert s == {1: 1.0, 2: 0.0}


def test_competition_greedy_matching_by_score():
    # Two predictions of the same gt: the higher-scored one matches, the other is an FP.
    # The low-score duplicate is exact, the high-score one has IoU 0.72:
    # t <= 0.70: TP 1 (high), FP 1 (exact dup can no longer match) -> 1/2;
    # t >= 0.75: high fails (FP), exact dup matches (TP) -> TP 1, FP 1 -> 1/2.
    s = _score([(0, 0, 10, 10)], [1], [(0, 0, 8, 9), (0, 0, 10, 10)], [1, 1], [0.9, 0.1])
    assert s == {1: pytest.approx(0.5)}


def test_competition_metric_means_over_image_class_pairs():
    items = [(_masks((0, 0, 10, 10)), np.array([1])),
             (_masks((0, 0, 10, 10), (12, 12, 18, 18)), np.array([1, 2]))]
    dataset = MemoryDataset(items)
    detections = [
        {"masks": _masks((0, 0, 10, 10)), "class_ids": np.array([1]), "scores": np.array([0.9])},
        {"masks": _masks((0, 0, 8, 9)), "class_ids": np.array([1]), "scores": np.array([0.9])},
    ]
    # pairs: (img0, c1) = 1.0, (img1, c1) = 0.5, (img1, c2) = 0.0 -> 0.5
    score, details = evaluate.competition_metric(dataset, dataset.image_ids, detections,
                                                 return_details=True)
    assert score == pytest.approx(0.5)
    assert details[1] == {1: pytest.approx(0.5), 2: 0.0}
    # No ground truth and no predictions: nothing to score.
    assert _score([], [], [], []) == {}
