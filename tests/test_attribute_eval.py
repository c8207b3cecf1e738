"""mrcnn.attribute_eval: Fashionpedia's attribute-aware AP and per-attribute scores, on cases
worked by hand (the numbers in the comments)."""

import numpy as np
import pytest

from mrcnn import attribute_eval as ae
from mrcnn import evaluate


def square(h, w, y1, x1, y2, x2):
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


def det(masks, class_ids, scores, attributes):
    masks = np.stack(masks, -1) if masks else np.zeros((20, 20, 0), bool)
    rois = np.array([[*np.argwhere(m).min(0), *(np.argwhere(m).max(0) + 1)]
                     for m in np.moveaxis(masks, -1, 0)]).reshape(-1, 4)
    return {"rois": rois, "masks": masks, "class_ids": np.array(class_ids, np.int32),
            "scores": np.array(scores, np.float32),
            "attributes": [np.array(a, np.int32) for a in attributes]}


def gt_of(masks, class_ids, attributes):
    return (np.stack(masks, -1), np.array(class_ids, np.int32), [tuple(a) for a in attributes])


# ----------------------------------------------------------------------------- attribute F1

def test_attribute_f1_by_hand():
    # 10 ids, gt {1, 2}, predicted {1, 3}: TP 1, FP 1, FN 1, TN 7.
    # label 1: 2/(2+1+1) = 0.5; label 0: 14/(14+1+1) = 0.875; mean 0.6875.
    assert ae.attribute_f1({1, 2}, {1, 3}, 10) == pytest.approx(0.6875)
    assert ae.attribute_f1({1, 2}, {1, 3}, average="binary") == pytest.approx(0.5)
    # Both empty: only label 0, perfectly predicted.
    assert ae.attribute_f1((), (), 10) == 1.0
    assert ae.attribute_f1((), (), average="binary") == 1.0
    # gt {}, predicted {1}, 4 ids: label 1: 0; label 0: TN 3 -> 6/7; mean 3/7.
    assert ae.attribute_f1((), (1,), 4) == pytest.approx(3 / 7)
    # Exact sets: 1.
    assert ae.attribute_f1((0, 3), (3, 0), 4) == 1.0
    with pytest.raises(ValueError):
        ae.attribute_f1((12,), (), 10)
    with pytest.raises(ValueError):
        ae.attribute_f1((1,), (), None)


# ----------------------------------------------------------------------------- AP

def test_perfect_mask_partly_wrong_attributes():
    """IoU 1, attribute F1 0.6875: AP 1 by IoU; by IoU+F1 the 4 F1 thresholds 0.50-0.65
    of 10 pass: 0.4."""
    m = square(20, 20, 2, 2, 12, 12)
    gt = [gt_of([m], [1], [(1, 2)])]
    d = [det([m], [1], [0.9], [(1, 3)])]
    r = ae.evaluate_attributes(None, [0], d, num_attributes=10, gt=gt)
    assert r["categories_with_attributes"] == [1]
    assert r["iou"]["AP"] == pytest.approx(1.0)
    assert r["iou"]["AP_IOU50"] == pytest.approx(1.0)
    assert r["iou_f1"]["AP"] == pytest.approx(0.4)
    assert r["iou_f1"]["AP_F150"] == pytest.approx(1.0)
    assert r["iou_f1"]["AP_F175"] == pytest.approx(0.0)
    assert r["iou_f1"]["AP_IOU50_F150"] == pytest.approx(1.0)
    assert r["iou_f1"]["AP_IOU75_F175"] == pytest.approx(0.0)
    assert r["iou_f1"]["AP_IOU75"] == pytest.approx(0.4)
    assert r["f1"]["AP"] == pytest.approx(0.4)
    # With the positive-label F1 (0.5) only t_f1 0.50 passes.
    r = ae.evaluate_attributes(None, [0], d, num_attributes=10, gt=gt, average="binary")
    assert r["iou_f1"]["AP"] == pytest.approx(0.1)
    # Right attributes: 1 everywhere.
    d = [det([m], [1], [0.9], [(2, 1)])]
    r = ae.evaluate_attributes(None, [0], d, num_attributes=10, gt=gt)
    for key in ("iou_f1", "iou", "f1"):
        assert r[key]["AP"] == pytest.approx(1.0)


def test_iou_and_f1_thresholds_combine():
    """IoU 72/100 = 0.72 passes 5 IoU thresholds (0.50-0.70), F1 0.6875 passes 4: both
    together 20 of the 100 pairs -> 0.2; IoU only 0.5; F1 only (IoU ignored) 0.4."""
    gt = [gt_of([square(20, 20, 0, 0, 10, 10)], [1], [(1, 2)])]
    d = [det([square(20, 20, 0, 0, 9, 8)], [1], [0.8], [(1, 3)])]
    r = ae.evaluate_attributes(None, [0], d, num_attributes=10, gt=gt)
    assert r["iou"]["AP"] == pytest.approx(0.5)
    assert r["iou_f1"]["AP"] == pytest.approx(0.2)
    assert r["f1"]["AP"] == pytest.approx(0.4)
    assert r["iou_f1"]["AP_IOU50"] == pytest.approx(0.4)
    assert r["iou_f1"]["AP_IOU75"] == pytest.approx(0.0)
    assert r["iou_f1"]["AP_F150"] == pytest.approx(0.5)


def test_class_without_attributes_ignores_f1_and_ranking_by_hand():
    """Class 2 has no attributes in the ground truth: its AP ignores F1. Class 1: scores 0.9
    (a false positive), 0.8 and 0.7 (true positives) on 2 instances: precision 0, 1/2, 2/3 at
    recall 0, 1/2, 1, interpolated 2/3 at every recall: AP 2/3."""
    a, b, c = square(30, 30, 0, 0, 10, 10), square(30, 30, 12, 12, 22, 22), \
        square(30, 30, 20, 0, 30, 8)
    gt = [gt_of([a, b, c], [1, 1, 2], [(4,), (4,), ()])]
    d = [det([square(30, 30, 24, 20, 30, 30), a, b, c], [1, 1, 1, 2], [0.9, 0.8, 0.7, 0.6],
             [(4,), (4,), (4,), (5, 6)])]
    r = ae.evaluate_attributes(None, [0], d, num_attributes=8, gt=gt)
    assert r["categories_with_attributes"] == [1]
    ap1 = r["per_class"][1]
    assert np.nanmax(ap1[:-1, :-1]) == pytest.approx(2 / 3)
    assert np.nanmin(ap1[:-1, :-1]) == pytest.approx(2 / 3)
    # Class 2: F1 of (5, 6) against () is low but ignored: AP 1; only the ignored-F1 column.
    ap2 = r["per_class"][2]
    assert ap2[:-1, -1] == pytest.approx(np.ones(10))
    assert np.isnan(ap2[:, :-1]).all()
    # IoU+F1 AP: 100 entries of 2/3 (class 1) and 10 entries of 1 (class 2).
    assert r["iou_f1"]["AP"] == pytest.approx((100 * 2 / 3 + 10) / 110)
    assert r["iou"]["AP"] == pytest.approx((2 / 3 + 1) / 2)
    # Forcing F1 on class 2 too: F1({}, {5, 6}) over 8 ids = (0 + 12/14) / 2 = 3/7 < 0.5.
    r = ae.evaluate_attributes(None, [0], d, num_attributes=8, gt=gt,
                               categories_with_attributes=[1, 2])
    assert np.nanmax(r["per_class"][2][:-1, :-1]) == 0.0


def test_iou_only_equals_pycocotools_segm_ap():
    rng = np.random.default_rng(3)
    gts, dets = [], []
    for _ in range(4):
        masks, cids, attrs = [], [], []
        for _ in range(rng.integers(1, 5)):
            y, x = rng.integers(0, 30, 2)
            masks.append(square(48, 48, y, x, y + rng.integers(5, 18), x + rng.integers(5, 18)))
            cids.append(int(rng.integers(1, 4)))
            attrs.append(tuple(sorted(set(rng.integers(0, 6, rng.integers(0, 3)).tolist()))))
        gts.append(gt_of(masks, cids, attrs))
        pm, pc, ps, pa = [], [], [], []
        for k in range(len(masks) + 2):
            if k < len(masks) and rng.random() < 0.8:
                y, x = np.argwhere(masks[k]).min(0) + rng.integers(-2, 3, 2)
                y, x = max(0, y), max(0, x)
                pm.append(square(48, 48, y, x, y + 10, x + 9))
                pc.append(cids[k] if rng.random() < 0.9 else 3)
            else:
                y, x = rng.integers(0, 38, 2)
                pm.append(square(48, 48, y, x, y + 8, x + 8))
                pc.append(int(rng.integers(1, 4)))
            ps.append(float(rng.random()))
            pa.append(rng.integers(0, 6, rng.integers(0, 3)))
        dets.append(det(pm, pc, ps, pa))

    class DS:
        class_names = ["BG", "a", "b", "c"]
        image_info = {i: {"height": 48, "width": 48} for i in range(4)}

    coco = evaluate.evaluate_coco(DS(), [0, 1, 2, 3], dets, iou_types=("segm",), verbose=False,
                                  coco_gt=evaluate.build_coco_gt(
                                      DS(), [0, 1, 2, 3], gt=[g[:2] for g in gts]))
    r = ae.evaluate_attributes(None, [0, 1, 2, 3], dets, num_attributes=6, gt=gts)
    assert r["iou"]["AP"] == pytest.approx(coco["segm"]["AP"], abs=1e-9)
    assert r["iou"]["AP_IOU50"] == pytest.approx(coco["segm"]["AP50"], abs=1e-9)
    assert r["iou"]["AP_IOU75"] == pytest.approx(coco["segm"]["AP75"], abs=1e-9)
    # Adding the attribute constraint can only lower AP.
    assert r["iou_f1"]["AP"] <= r["iou"]["AP"] + 1e-12
    # The same on boxes.
    coco_b = evaluate.evaluate_coco(DS(), [0, 1, 2, 3], dets, iou_types=("bbox",),
                                    verbose=False, coco_gt=evaluate.build_coco_gt(
                                        DS(), [0, 1, 2, 3], gt=[g[:2] for g in gts]))
    rb = ae.evaluate_attributes(None, [0, 1, 2, 3], dets, num_attributes=6, gt=gts,
                                iou_type="bbox")
    assert rb["iou"]["AP"] == pytest.approx(coco_b["bbox"]["AP"], abs=1e-9)


def test_nothing_detected_and_dataset_interface():
    m = square(20, 20, 2, 2, 12, 12)

    class DS:
        attribute_info = {i: {"name": "attr %d" % i} for i in range(5)}

        def load_mask(self, image_id):
            return np.stack([m], -1), np.array([1], np.int32)

        def load_attributes(self, image_id):
            return [(3,)]

    r = ae.evaluate_attributes(DS(), [0], [det([], [], [], [])])
    assert r["num_attributes"] == 5
    assert r["iou_f1"]["AP"] == r["iou"]["AP"] == r["f1"]["AP"] == 0.0
    assert r["matched"] == 0 and r["per_attribute"] == {}
    r = ae.evaluate_attributes(DS(), [0], [det([m], [1], [0.5], [(3,)])])
    assert r["iou_f1"]["AP"] == pytest.approx(1.0)
    assert r["per_attribute"][3]["f1"] == 1.0
    text = "\n".join(ae.format_report(r, {3: "attr 3"}))
    assert "attr 3" in text and "IoU+F1" in text
    # No attributes key (a model without the head): empty predicted sets.
    d = det([m], [1], [0.5], [()])
    del d["attributes"]
    r = ae.evaluate_attributes(DS(), [0], [d])
    assert r["iou"]["AP"] == pytest.approx(1.0) and r["iou_f1"]["AP"] < 1.0


# ----------------------------------------------------------------------------- per attribute

def test_per_attribute_precision_recall_f1_by_hand():
    """Pairs (pred, gt): ({1, 3}, {1, 2}) and ({1}, {1, 3}).
    1: TP 2 -> P 1, R 1, F1 1. 2: FN 1 -> 0, 0, 0. 3: FP 1, FN 1 -> 0, 0, 0.
    Micro: TP 2, FP 1, FN 2 -> P 2/3, R 1/2, F1 4/7. Macro F1 1/3."""
    s = ae.attribute_scores(pairs=[((1, 3), (1, 2)), ((1,), (1, 3))])
    p = s["per_attribute"]
    assert sorted(p) == [1, 2, 3]
    assert (p[1]["precision"], p[1]["recall"], p[1]["f1"], p[1]["support"]) == (1, 1, 1, 2)
    assert (p[2]["tp"], p[2]["fp"], p[2]["fn"], p[2]["f1"]) == (0, 0, 1, 0.0)
    assert (p[3]["tp"], p[3]["fp"], p[3]["fn"], p[3]["f1"]) == (0, 1, 1, 0.0)
    assert s["per_attribute_micro"]["precision"] == pytest.approx(2 / 3)
    assert s["per_attribute_micro"]["recall"] == pytest.approx(1 / 2)
    assert s["per_attribute_micro"]["f1"] == pytest.approx(4 / 7)
    assert s["per_attribute_macro"]["f1"] == pytest.approx(1 / 3)
    assert s["matched"] == 2


def test_per_attribute_uses_matched_detections_only():
    """Two gt of class 1; the 0.9 detection misses (IoU 0) and its attributes do not count;
    a detection of the wrong class does not match either."""
    a, b = square(30, 30, 0, 0, 10, 10), square(30, 30, 15, 15, 25, 25)
    gt = [gt_of([a, b], [1, 1], [(1, 2), (1,)])]
    d = [det([square(30, 30, 0, 20, 8, 28), a, b, b], [1, 1, 1, 2], [0.9, 0.8, 0.7, 0.95],
             [(5,), (1,), (1, 2), (6,)])]
    r = ae.evaluate_attributes(None, [0], d, num_attributes=8, gt=gt)
    assert r["matched"] == 2
    p = r["per_attribute"]
    assert sorted(p) == [1, 2]
    assert (p[1]["tp"], p[1]["fp"], p[1]["fn"]) == (2, 0, 0)
    assert (p[2]["tp"], p[2]["fp"], p[2]["fn"]) == (0, 1, 1)


# ----------------------------------------------------------------------------- fashion sample

def test_submission_class_ids_with_attributes_and_detection_rows():
    from samples.fashion import submission
    h, w = 40, 40
    masks = np.stack([square(h, w, 0, 0, 20, 20), square(h, w, 20, 20, 40, 40)], -1)
    result = {"masks": masks, "class_ids": np.array([7, 24]), "scores": np.array([0.9, 0.8]),
              "rois": np.array([[0, 0, 20, 20], [20, 20, 40, 40]]),
              "attributes": [np.array([71, 28]), np.array([], np.int32)]}
    rows = submission.submission_rows("x.jpg", result, mask_size=0, attributes=True)
    assert [r[2] for r in rows] == ["6_28_71", "23"]
    rows = submission.submission_rows("x.jpg", result, mask_size=0)
    assert [r[2] for r in rows] == ["6", "23"]
    no_attributes = {k: v for k, v in result.items() if k != "attributes"}
    rows = submission.submission_rows("x.jpg", no_attributes, mask_size=0, attributes=True)
    assert [r[2] for r in rows] == ["6", "23"]
    assert submission.class_id_string(7, (71, 28)) == "6_28_71"
    names = ["BG"] + ["c%d" % i for i in range(46)]
    rows = submission.detection_rows("x.jpg", result, names)
    assert submission.DETECTION_COLUMNS[-1] == "Attributes"
    assert [r[-1] for r in rows] == ["28_71", ""]
    captions = submission.detection_captions(result, names, {28: "stripes"})
    assert captions == ["c6 0.90\nstripes, 71", "c23 0.80"]
    bad = dict(result, attributes=[np.array([1])])
    with pytest.raises(ValueError):
        submission.submission_rows("x.jpg", bad, mask_size=0, attributes=True)


def test_drop_small_masks_keeps_attributes_aligned():
    from samples.fashion import fashion
    masks = np.stack([square(20, 20, 0, 0, 2, 2), square(20, 20, 5, 5, 15, 15)], -1)
    result = {"masks": masks, "class_ids": np.array([1, 2]), "scores": np.array([0.9, 0.8]),
              "rois": np.array([[0, 0, 2, 2], [5, 5, 15, 15]]),
              "attributes": [np.array([1]), np.array([2, 3])],
              "attribute_scores": np.array([[0.1, 0.9], [0.8, 0.2]])}
    out = fashion.drop_small_masks(result, 10)
    assert out["class_ids"].tolist() == [2]
    assert [a.tolist() for a in out["attributes"]] == [[2, 3]]
    assert out["attribute_scores"].tolist() == [[0.8, 0.2]]
    assert fashion.drop_small_masks(result, 0) is result


def test_demo_attributes_have_names_and_parse(tmp_path):
    from samples.fashion import demo_data
    from samples.fashion.dataset import FashionDataset
    folder = demo_data.ensure_demo_data(str(tmp_path / "demo"), n_train=8, n_test=1,
                                        verbose=False)
    ds = FashionDataset().load_dataset(folder, "all")
    ds.prepare()
    for a, name in demo_data.DEMO_ATTRIBUTES.items():
        assert ds.attribute_info[a]["name"] == name
    seen = set()
    for i in ds.image_ids:
        _, class_ids, attributes = ds.load_instances(i)
        for c, attrs in zip(class_ids, attributes):
            assert list(attrs) == sorted(attrs)
            assert set(attrs) <= set(demo_data.STYLE[int(c) - 1][2])
            seen.update(attrs)
    assert seen == set(demo_data.DEMO_ATTRIBUTES)


class _FakeConfig:
    def __init__(self, n):
        self.NUM_ATTRIBUTES = n


class _FakeModel:
    """model.detect returning hand-made detections, one per call, in order."""

    def __init__(self, results, n):
        self.results = list(results)
        self.config = _FakeConfig(n)

    def detect(self, images, verbose=0):
        return [self.results.pop(0)]


def _perfect(ds, image_id, attributes=None):
    masks, class_ids, attrs = ds.load_instances(image_id)
    boxes = np.array([[*np.argwhere(m).min(0), *(np.argwhere(m).max(0) + 1)]
                      for m in np.moveaxis(masks, -1, 0)]).reshape(-1, 4)
    return {"rois": boxes, "masks": masks, "class_ids": class_ids,
            "scores": np.linspace(0.9, 0.5, len(class_ids)),
            "attributes": [np.array(a if attributes is None else attributes, np.int32)
                           for a in attrs]}


def test_fashion_evaluate_and_submit_with_attributes(tmp_path, monkeypatch, capsys):
    import json
    import pandas as pd
    from samples.fashion import demo_data, fashion
    folder = demo_data.ensure_demo_data(str(tmp_path / "demo"), n_train=8, n_test=2,
                                        verbose=False)
    args = ["--dataset", folder, "--weights", "none", "--val-fraction", "0.5"]
    val = fashion.load_split(fashion.build_parser().parse_args(["evaluate"] + args), "val",
                             True, folder)
    results = [_perfect(val, i) for i in val.image_ids]
    monkeypatch.setattr(fashion, "inference_setup",
                        lambda a: (_FakeModel(results, 92), "fake"))
    out_json = str(tmp_path / "eval.json")
    assert fashion.main(["evaluate", "--output", out_json] + args) == 0
    text = capsys.readouterr().out
    assert "Attribute-aware AP" in text and "hem band" in text
    stats = json.load(open(out_json))
    assert stats["attributes"]["iou_f1"]["AP"] == pytest.approx(1.0)
    assert stats["attributes"]["per_attribute_micro"]["f1"] == pytest.approx(1.0)

    # Without an attribute head: no attribute metrics.
    results = [_perfect(val, i) for i in val.image_ids]
    monkeypatch.setattr(fashion, "inference_setup", lambda a: (_FakeModel(results, 0), "fake"))
    assert fashion.main(["evaluate", "--output", out_json] + args) == 0
    assert "Attribute-aware AP" not in capsys.readouterr().out
    assert json.load(open(out_json))["attributes"] is None

    h, w = 64, 64
    shoe = {"rois": np.array([[0, 0, 10, 10]]), "masks": square(h, w, 0, 0, 10, 10)[..., None],
            "class_ids": np.array([24]), "scores": np.array([0.9]),
            "attributes": [np.array([2, 0])]}
    sub = str(tmp_path / "sub.csv")
    for n, expected in ((92, "23_0_2"), (0, "23")):
        monkeypatch.setattr(fashion, "inference_setup",
                            lambda a, n=n: (_FakeModel([shoe, shoe], n), "fake"))
        assert fashion.main(["submit", "--attributes", "--output", sub, "--mask-size", "0",
                             "--dataset", folder, "--weights", "none"]) == 0
        df = pd.read_csv(sub, keep_default_na=False, dtype=str)
        assert set(df.ClassId) == {expected}
    assert "no attribute head" in capsys.readouterr().err


def test_attribute_names_of_the_demo_and_a_dataset(tmp_path):
    import argparse
    import json
    from samples.fashion import demo_data, fashion
    args = argparse.Namespace(dataset=None, annotations=None)
    assert fashion.attribute_names(args)[0] == "hem band"
    labels = demo_data.label_descriptions()
    labels["attributes"] = [{"id": 7, "name": "floral"}]
    (tmp_path / "label_descriptions.json").write_text(json.dumps(labels))
    assert fashion.attribute_names(argparse.Namespace(dataset=str(tmp_path),
                                                      annotations=None)) == {7: "floral"}
    assert fashion.attribute_names(argparse.Namespace(dataset=str(tmp_path / "none"),
                                                      annotations=None)) == {}


def test_fashion_detect_draws_and_writes_attributes(tmp_path, monkeypatch):
    import pandas as pd
    from samples.fashion import demo_data, fashion
    folder = demo_data.ensure_demo_data(str(tmp_path / "demo"), n_train=4, n_test=2,
                                        verbose=False)

    class Model:
        config = _FakeConfig(92)

        def detect(self, images, verbose=0):
            h, w = images[0].shape[:2]
            return [{"rois": np.array([[10, 10, 60, 50]]),
                     "masks": square(h, w, 10, 10, 60, 50)[..., None],
                     "class_ids": np.array([11]), "scores": np.array([0.8]),
                     "attributes": [np.array([2, 0])]}]

    monkeypatch.setattr(fashion, "inference_setup", lambda a: (Model(), "fake"))
    out = tmp_path / "det"
    assert fashion.main(["detect", "--weights", "none", "--image", str(tmp_path / "demo" / "test"),
                         "--output", str(out)]) == 0
    df = pd.read_csv(out / "detections.csv", keep_default_na=False, dtype=str)
    assert list(df.Attributes) == ["0_2", "0_2"] and set(df.ClassName) == {"dress"}
    assert len(list(out.glob("*_detections.png"))) == 2
    del folder


def test_fashion_evaluate_attributes_without_attributes_in_detections(capsys):
    from samples.fashion import fashion
    d = det([square(20, 20, 0, 0, 5, 5)], [1], [0.9], [()])
    del d["attributes"]
    assert fashion.evaluate_attributes(None, [0], [d], _FakeConfig(92)) is None
    assert "carry no attributes" in capsys.readouterr().err
