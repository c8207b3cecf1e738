"""Issue 13, item 6: threshold tuning (mrcnn/tuning.py, `fashion.py tune`, `--tuned`).

The sweep picks the one perfect setting of hand-made detections; its scores equal
mrcnn.evaluate.competition_metric on the re-thresholded detections, setting by setting;
re-thresholding equals running the network with those settings at the collection's NMS
threshold; tuned-settings files round-trip; the command line tunes and evaluate / submit apply
the file.
"""

import json
import os

import numpy as np
import pytest

from mrcnn import evaluate, tuning, utils
from mrcnn.tuning import Collection, Grid, Setting

from synthetic import shapes_config, shapes_dataset


def _collection(detections, nms=0.95, min_confidence=0.0):
    return Collection(detections, list(range(len(detections))), min_confidence, nms, 100, 0.0)


def _brute_force(collection, gt, setting, non_overlap):
    """competition_metric of rethreshold's detections: the reference for sweep()."""
    detections = [tuning.rethreshold(d, setting, non_overlap=non_overlap,
                                     collection_nms=collection.nms_threshold)
                  for d in collection.detections]
    return evaluate.competition_metric(None, collection.image_ids, detections, gt=gt)


# ----------------------------------------------------------------------------- hand-made case

def _hand_made():
    """A 20 x 20 image with one ground-truth mask of class 1 (rows and columns 2..9) and four
    detections, by decreasing score:
      D class 2, 0.9: 2 x 2 at (15, 2), no ground truth of class 2 -> dropped only by a
        minimum area of 5 (80 drops A too);
      A class 1, 0.6: box (1, 1, 11, 11), soft mask 0.45 on the ground truth and 0.35 on the
        one-pixel ring around it -> exact at mask threshold 0.4 (0.3 adds the ring: IoU 0.64;
        0.5 leaves nothing);
      C class 1, 0.55: box (1, 1, 11, 12) all 0.8, box IoU 100/110 with A -> suppressed by NMS
        0.5, not by 0.95; dropped by score threshold 0.7, which drops A too;
      B class 1, 0.45: elsewhere -> dropped by score threshold 0.5, not 0.3.
    So only (score 0.5, NMS 0.5, mask 0.4, min area 5) scores 1."""
    gt = np.zeros((20, 20, 1), bool)
    gt[2:10, 2:10, 0] = True
    a = np.full((10, 10), 0.35, np.float32)
    a[1:9, 1:9] = 0.45
    det = {"rois": np.array([[15, 2, 17, 4], [1, 1, 11, 11], [1, 1, 11, 12], [12, 12, 18, 18]]),
           "class_ids": np.array([2, 1, 1, 1]), "scores": np.array([0.9, 0.6, 0.55, 0.45]),
           "soft_masks": [np.ones((2, 2), np.float32), a, np.full((10, 11), 0.8, np.float32),
                          np.ones((6, 6), np.float32)],
           "image_shape": (20, 20)}
    return _collection([det]), [(gt, np.array([1]))]


GRID = Grid(scores=(0.3, 0.5, 0.7), nms=(0.5, 0.95), masks=(0.3, 0.4, 0.5),
            min_areas=(0, 5, 80))


def test_sweep_picks_the_only_perfect_setting():
    collection, gt = _hand_made()
    result = tuning.sweep(collection, grid=GRID, gt=gt)
    assert result.best() == Setting(0.5, 0.5, 0.4, 5)
    rows = result.rows()
    assert rows[0][1] == 1.0 and rows[1][1] < 1.0
    assert rows[0][2] == 1.0                          # one detection kept
    # By hand: everything kept at mask 0.4: D scores 0 for class 2; class 1 has A (IoU 1),
    # C (what A leaves of it, IoU 0), B (IoU 0): TP 1, FP 2, FN 0 -> 1/3 at every IoU.
    assert result.metric_of(Setting(0.3, 0.95, 0.4, 0)) == pytest.approx((1 / 3 + 0) / 2)
    # Mask 0.3 adds A's ring: IoU 64/100 beats thresholds 0.50, 0.55, 0.60 only.
    assert result.metric_of(Setting(0.5, 0.5, 0.3, 5)) == pytest.approx(0.3)
    # Mask 0.5 empties A (dropped: not submitted): class 1 has no prediction.
    assert result.metric_of(Setting(0.5, 0.5, 0.5, 5)) == 0.0
    assert result.metric_of(Setting(0.5, 0.95, 0.4, 5)) == pytest.approx(0.5)   # C kept
    assert result.metric_of(Setting(0.7, 0.5, 0.4, 0)) == 0.0                   # A dropped
    assert result.metric_of(Setting(0.5, 0.5, 0.4, 80)) == 0.0                  # A too small


@pytest.mark.parametrize("non_overlap", [True, False])
def test_sweep_equals_the_metric_of_rethresholded_detections(non_overlap):
    collection, gt = _hand_made()
    result = tuning.sweep(collection, grid=GRID, gt=gt, non_overlap=non_overlap)
    for setting in GRID.settings():
        assert result.metric_of(setting) == pytest.approx(
            _brute_force(collection, gt, setting, non_overlap), abs=1e-12), setting


def _random_case(seed, n_images=5, size=48):
    """Random ground truth; per ground-truth mask zero to two jittered detections of its class
    (duplicates for NMS to remove), plus random false positives. Soft masks are pyramids:
    threshold t keeps the middle (1.2 - t) of the box a side."""
    rng = np.random.default_rng(seed)
    u = np.abs(np.linspace(-1, 1, 28))
    pyramid = np.clip(1.2 - np.maximum(u[:, None], u[None, :]), 0, 1).astype(np.float32)
    detections, gt = [], []
    for _ in range(n_images):
        g = int(rng.integers(0, 5))
        masks = np.zeros((size, size, g), bool)
        boxes = []
        gt_class_ids = rng.integers(1, 4, g)
        for k in range(g):
            y, x = rng.integers(0, size - 12, 2)
            h, w = rng.integers(8, 24, 2)
            masks[y:y + h, x:x + w, k] = True
            for _ in range(int(rng.integers(0, 3))):
                j = rng.integers(-3, 4, 4)
                boxes.append((y + j[0], x + j[1], y + h + j[2], x + w + j[3], gt_class_ids[k]))
        for _ in range(int(rng.integers(0, 4))):
            y, x = rng.integers(-6, size - 4, 2)
            h, w = rng.integers(2, 30, 2)
            boxes.append((y, x, y + h, x + w, rng.integers(1, 4)))
        gt.append((masks, gt_class_ids))
        boxes = np.array(boxes, int).reshape(-1, 5)
        n = len(boxes)
        soft = pyramid[None] ** rng.uniform(0.5, 2, (n, 1, 1))
        detections.append({"rois": boxes[:, :4], "class_ids": boxes[:, 4],
                           "scores": rng.uniform(0.05, 1, n).astype(np.float32),
                           "soft_masks": soft.astype(np.float32), "image_shape": (size, size)})
    return _collection(detections, nms=0.7), gt


@pytest.mark.parametrize("non_overlap", [True, False])
def test_sweep_equals_brute_force_on_random_detections(non_overlap):
    collection, gt = _random_case(seed=3)
    grid = Grid(scores=(0.1, 0.4, 0.6), nms=(0.2, 0.5, 0.7), masks=(0.3, 0.5, 0.7),
                min_areas=(0, 20, 60))
    result = tuning.sweep(collection, grid=grid, gt=gt, non_overlap=non_overlap)
    assert len(result.rows()) == len(grid) == 81
    values = set()
    for setting in grid.settings():
        expected = _brute_force(collection, gt, setting, non_overlap)
        values.add(round(expected, 9))
        assert result.metric_of(setting) == pytest.approx(expected, abs=1e-12), setting
    assert len(values) > 10                            # the settings do differ


def test_grid_and_collection_are_checked():
    with pytest.raises(tuning.TuningError, match="mask thresholds: 1.0 is outside"):
        Grid(scores=(0.5,), nms=(0.3,), masks=(1.0,))
    with pytest.raises(tuning.TuningError, match="give at least one"):
        Grid(scores=(), nms=(0.3,), masks=(0.5,))
    collection, gt = _hand_made()
    with pytest.raises(tuning.TuningError, match="above the 0.95 the detections were collected"):
        tuning.sweep(collection, grid=Grid((0.5,), (0.99,), (0.5,)), gt=gt)
    low = _collection(collection.detections, min_confidence=0.4)
    with pytest.raises(tuning.TuningError, match="below the 0.4"):
        tuning.sweep(low, grid=Grid((0.3,), (0.5,), (0.5,)), gt=gt)
    assert Grid((0.1, 0.7), (0.3, 0.5), (0.5,)).collection_overrides() == {
        "DETECTION_MIN_CONFIDENCE": 0.1, "DETECTION_NMS_THRESHOLD": 0.5}


def test_pasted_soft_masks_threshold_like_unmold_masks():
    rng = np.random.default_rng(0)
    masks = rng.uniform(0, 1, (40, 28, 28)).astype(np.float32)
    y1, x1 = rng.integers(-20, 60, (2, 40))
    boxes = np.stack([y1, x1, y1 + rng.integers(1, 70, 40), x1 + rng.integers(1, 70, 40)], 1)
    boxes[0] = (3, 3, 31, 31)                          # the mask's own size: no resize
    boxes[1] = (5, 5, 5, 9)                            # no pixels
    for t in (0.2, 0.5, 0.77):
        expected = utils.unmold_masks(masks, boxes, (64, 80), threshold=t)
        for i in range(len(masks)):
            crop, (cy1, cx1, cy2, cx2) = tuning.paste_soft_mask(masks[i], boxes[i], (64, 80))
            got = np.zeros((64, 80), bool)
            got[cy1:cy2, cx1:cx2] = crop >= t
            np.testing.assert_array_equal(got, expected[..., i])


def test_tuned_file_round_trip(tmp_path):
    path = str(tmp_path / "tuned.json")
    setting = Setting(0.55, 0.4, 0.45, 64)
    tuning.write_tuned(path, setting, competition_metric=0.5, images=3)
    assert tuning.read_tuned(path) == setting
    data = json.load(open(path))
    assert data["settings"] == {"DETECTION_MIN_CONFIDENCE": 0.55, "DETECTION_NMS_THRESHOLD": 0.4,
                                "DETECTION_MASK_THRESHOLD": 0.45, "MIN_MASK_AREA": 64}
    assert data["competition_metric"] == 0.5 and "written" in data
    assert setting.config_overrides() == {k: v for k, v in data["settings"].items()
                                          if k != "MIN_MASK_AREA"}
    for bad, message in (("[1, 2]", "no \"settings\""), ("{", "is not JSON"),
                         ('{"settings": {"DETECTION_MIN_CONFIDENCE": 0.5}}', "no \"settings\""),
                         (json.dumps({"settings": dict(setting.as_dict(),
                                                       DETECTION_MASK_THRESHOLD=2)}),
                          "mask thresholds: 2.0 is outside")):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(tuning.TuningError, match=message) as e:
            tuning.read_tuned(str(tmp_path / "bad.json"))
        assert "fashion.py tune" in e.value.hint


def test_drop_small_masks_and_as_submitted():
    masks = np.zeros((10, 10, 3), bool)
    masks[0:4, 0:4, 0] = True                          # 16 px
    masks[2:5, 2:5, 1] = True                          # 9 px, 4 of them under mask 0
    masks[1:3, 1:3, 2] = True                          # 4 px, all under mask 0
    result = {"rois": np.zeros((3, 4), int), "class_ids": np.array([1, 2, 3]),
              "scores": np.array([0.9, 0.8, 0.7]), "masks": masks}
    assert tuning.drop_small_masks(result, 0) is result
    kept = tuning.drop_small_masks(result, 5)
    assert list(kept["class_ids"]) == [1, 2] and kept["masks"].shape == (10, 10, 2)
    submitted = tuning.as_submitted(result)
    assert list(submitted["class_ids"]) == [1, 2]      # the third was emptied
    assert submitted["masks"][..., 1].sum() == 5 and submitted["masks"].sum(-1).max() == 1


# ----------------------------------------------------------------------------- the network

@pytest.fixture(scope="module")
def shapes_models(tmp_path_factory):
    """A random-weights shapes model collecting with DETECTION_MIN_CONFIDENCE 0, and one with
    the same weights and a score threshold at the median collected score."""
    import keras
    from mrcnn.model import MaskRCNN
    keras.utils.set_random_seed(1)
    logs = str(tmp_path_factory.mktemp("logs"))
    dataset = shapes_dataset(3, seed=5)
    permissive = MaskRCNN("inference", shapes_config(DETECTION_MIN_CONFIDENCE=0.0), logs)
    collection = tuning.collect_detections(permissive, dataset, dataset.image_ids)
    scores = np.sort(np.concatenate([d["scores"] for d in collection.detections]))
    median = float(scores[len(scores) // 2])      # a score: ">=" keeps it
    strict = MaskRCNN("inference", shapes_config(DETECTION_MIN_CONFIDENCE=median), logs)
    strict.keras_model.set_weights(permissive.keras_model.get_weights())
    return dataset, collection, {0.0: permissive, median: strict}


def test_rethresholding_equals_running_the_model(shapes_models):
    dataset, collection, models = shapes_models
    assert collection.nms_threshold == 0.3 and collection.min_confidence == 0.0
    counts = [len(d["scores"]) for d in collection.detections]
    assert sum(counts) > 5, counts                     # something to compare
    for score, model in models.items():
        for mask in (0.3, 0.5, 0.7):
            model.config.DETECTION_MASK_THRESHOLD = mask    # read by unmold_detections
            setting = Setting(score, collection.nms_threshold, mask, 0)
            for k, image_id in enumerate(dataset.image_ids):
                expected = model.detect([dataset.load_image(image_id)])[0]
                got = tuning.rethreshold(collection.detections[k], setting,
                                         collection_nms=collection.nms_threshold)
                for key in ("rois", "class_ids", "scores", "masks"):
                    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
            model.config.DETECTION_MASK_THRESHOLD = 0.5


def test_lower_nms_on_the_collection_is_per_class_numpy_nms(shapes_models):
    dataset, collection, _ = shapes_models
    for det in collection.detections:
        got = tuning.rethreshold(det, Setting(0.0, 0.1, 0.5, 0), collection_nms=0.3)
        keep = []
        for c in np.unique(det["class_ids"]):
            ix = np.flatnonzero(det["class_ids"] == c)
            keep += list(ix[utils.non_max_suppression(det["nms_boxes"][ix],
                                                      det["scores"][ix], 0.1)])
        np.testing.assert_array_equal(got["rois"], det["rois"][sorted(keep)])


def test_sweep_on_collected_detections(shapes_models):
    dataset, collection, _ = shapes_models
    grid = Grid(scores=(0.0, 0.3), nms=(0.1, 0.3), masks=(0.4, 0.6), min_areas=(0, 50))
    result = tuning.sweep(collection, dataset, grid)
    gt = [dataset.load_mask(i) for i in dataset.image_ids]
    for setting in grid.settings():
        assert result.metric_of(setting) == pytest.approx(
            _brute_force(collection, gt, setting, True), abs=1e-12)
    assert result.images == 3 and result.seconds > 0
    assert "competition" in result.table(top=3) and len(result.table(top=3).splitlines()) == 4


# ----------------------------------------------------------------------------- command line

def test_tune_then_evaluate_and_submit_with_the_tuned_file(tmp_path, capsys, monkeypatch):
    from samples.fashion import demo_data, fashion
    from test_reliability import KILL_CONFIG
    data = demo_data.ensure_demo_data(str(tmp_path / "demo"), n_train=6, n_test=2,
                                      sizes=((96, 64), (64, 64)), verbose=False)
    common = ["--dataset", data, "--logs", str(tmp_path / "logs"), "--weights", "none",
              "--val-fraction", "0.5", "--limit", "3", "--set"] + KILL_CONFIG
    tuned = str(tmp_path / "tuned.json")
    assert fashion.main(["tune", "--scores", "0,0.02,0.04", "--nms", "0.5",
                         "--mask-thresholds", "0.4,0.6", "--min-areas", "0,30",
                         "--coco-top", "2", "--output", tuned] + common) == 0
    out = capsys.readouterr().out
    assert "12 settings" in out and "Detection pass:" in out and "sweep of 12 settings" in out
    assert "segm AP" in out and "rank" in out
    saved = json.load(open(tuned))
    setting = tuning.read_tuned(tuned)
    assert len(saved["table"]) == 12 and saved["images"] == 3
    assert saved["collected_with"]["DETECTION_MIN_CONFIDENCE"] == 0.0
    assert saved["competition_metric"] == saved["table"][0]["competition_metric"]
    assert "segm_AP" in saved["table"][0] and "segm_AP" in saved["table"][1]

    # evaluate --tuned: the network run with the tuned thresholds scores what the sweep did
    # (NMS at the collection's threshold: exact).
    result = str(tmp_path / "eval.json")
    assert fashion.main(["evaluate", "--tuned", tuned, "--output", result] + common) == 0
    out = capsys.readouterr().out
    assert "Tuned settings from %s" % tuned in out and setting.describe() in out
    stats = json.load(open(result))
    assert stats["competition_metric"] == pytest.approx(saved["competition_metric"], abs=1e-9)
    assert stats["tuned"]["settings"] == setting.as_dict()
    assert stats["coco"]["segm"]["AP"] == pytest.approx(saved["table"][0]["segm_AP"], abs=1e-9)

    # --tuned values join the configuration; an explicit --set still wins.
    args = fashion.build_parser().parse_args(
        ["submit", "--tuned", tuned, "--set", "DETECTION_NMS_THRESHOLD=0.2"] + common)
    from samples.fashion import tune
    assert tune.apply_tuned(args) == setting
    config, _, _ = fashion.command_config(args, True, "none", inference=True)
    assert (config.DETECTION_MIN_CONFIDENCE, config.DETECTION_MASK_THRESHOLD,
            config.DETECTION_NMS_THRESHOLD) == (setting.score_threshold,
                                                setting.mask_threshold, 0.2)

    # submit --tuned: a minimum area larger than any mask leaves every image without rows.
    big = str(tmp_path / "big.json")
    tuning.write_tuned(big, setting._replace(min_mask_area=10 ** 6))
    sub = str(tmp_path / "sub.csv")
    assert fashion.main(["submit", "--tuned", big, "--output", sub, "--mask-size", "0"]
                        + common) == 0
    lines = open(sub).read().splitlines()
    assert len(lines) == 3 and all(line.endswith(",,") for line in lines[1:])
    sub0 = str(tmp_path / "sub0.csv")
    tuning.write_tuned(big, setting._replace(score_threshold=0.0, min_mask_area=0))
    assert fashion.main(["submit", "--tuned", big, "--output", sub0, "--mask-size", "0"]
                        + common) == 0
    assert len(open(sub0).read().splitlines()) > 3    # the same detections, with masks
    assert os.path.isfile(sub0)


def test_cli_errors_name_the_option_or_file(tmp_path, capsys):
    """Before any model is built: a grid value out of range, a missing --output folder, a
    file that is not a tuned-settings file, a missing one."""
    from samples.fashion import fashion
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    cases = [
        (["tune", "--weights", "none", "--mask-thresholds", "0.5,1.5"],
         "mask thresholds: 1.5 is outside (0, 1)"),
        (["tune", "--weights", "none", "--output", str(tmp_path / "no" / "t.json")],
         "folder %s does not exist" % (tmp_path / "no")),
        (["evaluate", "--weights", "none", "--tuned", str(bad)], "fashion.py tune` writes"),
        (["submit", "--weights", "none", "--dataset", str(tmp_path), "--tuned",
          str(tmp_path / "missing.json")], "missing.json"),
    ]
    for argv, message in cases:
        assert fashion.main(argv) == 1, argv
        assert message in capsys.readouterr().err, argv
