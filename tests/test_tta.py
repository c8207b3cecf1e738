"""Test-time augmentation (issue 13, item 5): mrcnn.tta, evaluate.run_detections(tta=),
MaskRCNN.detect(tta=) and the fashion command line's --tta.

A TTA of one identity copy is plain detect, bit for bit; a scale-s copy is plain detect of a
model whose IMAGE_MAX_DIM is s times larger; a flipped copy is plain detect of the flipped
image, mirrored back; flip TTA on a mirror-symmetric image gives mirror-symmetric results;
box mapping and the two merges against hand-worked numbers.
"""

import json
import os

import keras
import numpy as np
import pytest

from mrcnn import evaluate, tta, utils
from mrcnn.model import MaskRCNN
from samples.fashion import demo_data, fashion

from synthetic import shapes_config, shapes_dataset
from test_reliability import KILL_CONFIG


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained shapes model (DETECTION_MIN_CONFIDENCE 0: it detects), seeded."""
    keras.utils.set_random_seed(0)
    return MaskRCNN("inference", shapes_config(DETECTION_MAX_INSTANCES=20),
                    str(tmp_path_factory.mktemp("logs")))


@pytest.fixture(scope="module")
def images():
    dataset = shapes_dataset(3)
    return [dataset.load_image(i) for i in dataset.image_ids]


def assert_same(a, b):
    assert set(a) == set(b) == {"rois", "class_ids", "scores", "masks"}
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------- specification

def test_parse_tta():
    assert tta.parse_tta("flip") == tta.TTA(flip=True)
    spec = tta.parse_tta("flip,scales=0.8,1.0,1.2")
    assert spec == tta.TTA(flip=True, scales=(0.8, 1.0, 1.2), merge="wbf", iou=0.55)
    assert spec.copies == [(0.8, False), (0.8, True), (1.0, False), (1.0, True),
                           (1.2, False), (1.2, True)]
    assert str(spec) == "flip, scales 0.8/1/1.2 (6 copies), merge wbf (IoU > 0.55)"
    assert tta.parse_tta(" scales = 0.5 , 2 , merge=NMS , iou=0.4 ") == tta.TTA(
        scales=(0.5, 2.0), merge="nms", iou=0.4)
    assert tta.parse_tta("scales=1").copies == [(1.0, False)]
    assert tta.parse_tta("flip,scales=1,1").scales == (1.0,)
    for none in (None, "", "none", "None"):
        assert tta.parse_tta(none) is None
    assert tta.as_tta("flip") == tta.TTA(flip=True) and tta.as_tta(None) is None
    for bad, message in [("flop", "unknown item 'flop'"), ("flip,,", "empty item"),
                         ("scales=big", "not a number"), ("scales=0,1", "positive"),
                         ("merge=mean", "merge must be one of wbf, nms"),
                         ("iou=1", r"iou must be in \[0, 1\)"), ("0.8", "unknown item")]:
        with pytest.raises(ValueError, match=message):
            tta.parse_tta(bad)
    with pytest.raises(TypeError):
        tta.as_tta(0.5)


# ----------------------------------------------------------------------------- against plain detect

def test_one_identity_copy_is_plain_detect(model, images):
    for image in images:
        plain = model.detect([image])[0]
        assert len(plain["scores"]) > 0
        for spec in (tta.TTA(), "scales=1", tta.TTA(merge="nms")):
            assert_same(tta.detect_image(model, image, spec), plain)
        assert_same(model.detect([image], tta="scales=1")[0], plain)
    dataset = shapes_dataset(2)
    ids = list(dataset.image_ids)
    plain = evaluate.run_detections(model, dataset, ids, verbose=False)
    for a, b in zip(evaluate.run_detections(model, dataset, ids, verbose=False,
                                            tta="scales=1"), plain):
        assert_same(a, b)
    with pytest.raises(ValueError, match="detect or tta"):
        evaluate.run_detections(model, dataset, ids, detect=lambda i: None, tta="flip")


def test_flipped_copy_is_plain_detect_of_the_flipped_image_mirrored(model, images):
    image = images[0]
    plain = model.detect([np.ascontiguousarray(image[:, ::-1])])[0]
    copy, = tta.detect_copies(model, image, [(1.0, True)])
    np.testing.assert_array_equal(copy.rois, tta.flip_boxes(plain["rois"], image.shape[1]))
    np.testing.assert_array_equal(copy.scores, plain["scores"])
    merged = tta.merge_detections([copy], image.shape, max_instances=100)
    np.testing.assert_array_equal(merged["masks"], plain["masks"][:, ::-1])


@pytest.mark.parametrize("scale", [0.5, 1.5])
def test_scaled_copy_is_plain_detect_at_a_scaled_image_size(model, images, scale):
    """A copy at scale s of a 128 px image is molded as MaskRCNN.mold_inputs molds it under
    IMAGE_MAX_DIM 128 s (64 and 192 px), and its detections are what the network gives on
    that input, unmolded by MaskRCNN.unmold_detections."""
    side = int(128 * scale)
    scaled = type("Stub", (), {"config": shapes_config(IMAGE_MIN_DIM=side,
                                                       IMAGE_MAX_DIM=side)})()
    spec = tta.TTA(scales=(scale,))
    for image in images[:2]:
        molded, metas, windows = MaskRCNN.mold_inputs(scaled, [image])
        copy = tta.mold_copy(model, image, scale)
        np.testing.assert_array_equal(copy[0], molded[0])
        np.testing.assert_array_equal(copy[1], metas[0])
        assert copy[2] == tuple(windows[0]) and molded.shape[1:3] == (side, side)
        anchors = model.get_anchors(molded[0].shape)[None]
        out = model.keras_model.predict_on_batch([molded, metas, anchors])
        rois, class_ids, scores, masks = model.unmold_detections(
            np.asarray(out[0][0]), np.asarray(out[3][0]), image.shape, molded[0].shape,
            windows[0])
        assert_same(tta.detect_image(model, image, spec), {
            "rois": rois, "class_ids": class_ids, "scores": scores, "masks": masks})


def test_flip_tta_of_a_symmetric_image_is_symmetric(model, images):
    """The left half of a shapes image and its mirror: the network sees the same image in
    both copies, so the WBF-merged detections mirror onto themselves (boxes, classes, scores
    and masks). A low merge IoU makes some mirror pairs fuse. (NMS keeps the first copy's
    box of a tie, so it is symmetric in its masks only where a pair fused.)"""
    fused = 0
    for image in images:
        sym = np.concatenate([image[:, :64], image[:, :64][:, ::-1]], axis=1)
        copies = tta.detect_copies(model, sym, tta.TTA(flip=True).copies)
        np.testing.assert_array_equal(copies[0].scores, copies[1].scores)
        n_in = sum(len(c.scores) for c in copies)
        for iou in (0.55, 0.1):
            r = tta.merge_detections(copies, sym.shape, method="wbf", iou_threshold=iou,
                                     max_instances=100)
            mirrored = tta.flip_boxes(r["rois"], sym.shape[1])
            for i in range(len(r["scores"])):
                assert [j for j in range(len(r["scores"]))
                        if (r["rois"][j] == mirrored[i]).all()
                        and r["class_ids"][j] == r["class_ids"][i]
                        and r["scores"][j] == r["scores"][i]
                        and (r["masks"][:, :, j] == r["masks"][:, ::-1, i]).all()], (iou, i)
            if iou == 0.1:
                fused += n_in - len(r["scores"])
        # Through detect(): the config's DETECTION_MAX_INSTANCES cut may split a mirror pair
        # of equal scores, but all is symmetric above the last score kept.
        r = model.detect([sym], tta="flip")[0]
        assert len(r["scores"]) <= model.config.DETECTION_MAX_INSTANCES
        above = r["scores"] > r["scores"].min()
        mirrored = {tuple(b) for b in tta.flip_boxes(r["rois"][above], sym.shape[1])}
        assert mirrored == {tuple(b) for b in r["rois"][above]}
    assert fused > 0


# ----------------------------------------------------------------------------- box mapping and molding

def test_box_mapping_of_a_flipped_rescaled_copy_by_hand():
    """A 96 x 128 image at scale 1.5 in a 192 x 192 canvas, window (24, 0, 168, 192): a box
    (54, 60, 114, 120) of the canvas is (54 - 24, 60, 114 - 24, 120) / 1.5 = (20, 40, 60, 80)
    of the image, and (20, 128 - 80, 60, 128 - 40) after undoing a flip."""
    image_shape, molded_shape, window = (96, 128, 3), (192, 192, 3), (24, 0, 168, 192)
    canvas_box = np.array([[54, 60, 114, 120], [24, 0, 168, 192]])
    normalized = utils.norm_boxes(canvas_box, molded_shape[:2])
    expected = np.array([[20, 40, 60, 80], [0, 0, 96, 128]])
    np.testing.assert_array_equal(
        tta.map_boxes(normalized, image_shape, molded_shape, window), expected)
    np.testing.assert_array_equal(
        tta.map_boxes(normalized, image_shape, molded_shape, window, flip=True),
        [[20, 48, 60, 88], [0, 0, 96, 128]])
    # Any box: (box - window offset) / scale, within a pixel (the normalized coordinates'
    # (h - 1) convention), and the mirror exactly.
    rng = np.random.default_rng(0)
    y = np.sort(rng.integers(24, 169, size=(50, 2)), axis=1)
    x = np.sort(rng.integers(0, 193, size=(50, 2)), axis=1)
    boxes = np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], axis=1)
    by_hand = (boxes - np.array([24, 0, 24, 0])) / 1.5
    mapped = tta.map_boxes(utils.norm_boxes(boxes, (192, 192)), image_shape, molded_shape,
                           window)
    assert np.abs(mapped - by_hand).max() <= 1.0
    flipped = tta.map_boxes(utils.norm_boxes(boxes, (192, 192)), image_shape, molded_shape,
                            window, flip=True)
    np.testing.assert_array_equal(flipped[:, [0, 2]], mapped[:, [0, 2]])
    np.testing.assert_array_equal(flipped[:, [1, 3]], 128 - mapped[:, [3, 1]])


@pytest.mark.parametrize("mode, scale, canvas, window", [
    ("square", 1.5, (192, 192), (24, 0, 168, 192)),
    ("square", 0.8, (128, 128), (25, 13, 102, 115)),     # 96 x 128 * 0.8 = 77 x 102
    ("pad64", 1.5, (192, 192), (24, 0, 168, 192)),
    ("pad64", 0.5, (64, 64), (8, 0, 56, 64)),
    ("none", 0.5, (64, 64), (8, 0, 56, 64)),
])
def test_mold_copy_sizes_and_content(model, mode, scale, canvas, window):
    """The molded size changes with the scale: the image resized by scale x the resize rules'
    scale (1 here), centred in a canvas of multiples of 64; the flip mirrors the image."""
    config = shapes_config(IMAGE_RESIZE_MODE=mode, IMAGE_MIN_DIM=64 if mode == "pad64" else 128)
    stub = type("Stub", (), {"config": config})()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(96, 128, 3)).astype(np.uint8)
    for flip in (False, True):
        molded, meta, got_window = tta.mold_copy(stub, image, scale, flip)
        assert molded.shape[:2] == canvas and got_window == window
        y1, x1, y2, x2 = window
        source = image[:, ::-1] if flip else image
        resized = utils._cv2_resize(np.ascontiguousarray(source), (y2 - y1, x2 - x1),
                                    utils._interpolation((96, 128), (y2 - y1, x2 - x1)))
        inside = molded[y1:y2, x1:x2] + config.MEAN_PIXEL
        np.testing.assert_allclose(inside, resized, atol=1e-3)
        assert np.allclose(molded[:y1] + config.MEAN_PIXEL, 0, atol=1e-3)
        from mrcnn.data import parse_image_meta
        parsed = parse_image_meta(meta[None])
        np.testing.assert_array_equal(parsed["original_image_shape"][0], image.shape)
        np.testing.assert_array_equal(parsed["window"][0], window)
        assert parsed["scale"][0] == pytest.approx(scale)
    crop = shapes_config(IMAGE_RESIZE_MODE="crop", IMAGE_MIN_DIM=64)
    with pytest.raises(ValueError, match="crop is for training"):
        tta.mold_copy(type("Stub", (), {"config": crop})(), image, 0.5)


def test_soft_masks_thresholded_are_unmold_masks():
    rng = np.random.default_rng(2)
    masks = rng.random((12, 28, 28)).astype(np.float32)
    boxes = np.array([[-10, -5, 30, 40], [50, 60, 100, 140], [3, 4, 5, 6], [0, 0, 80, 120],
                      [70, 100, 90, 125], [10, 10, 10, 20], [40, 130, 60, 150],
                      [5, 5, 75, 9], [20, 30, 21, 31], [0, 0, 1, 120], [60, 0, 80, 1],
                      [33, 44, 66, 88]])
    soft = tta.unmold_soft_masks(masks, boxes, (80, 120, 3))
    assert soft.dtype == np.float32 and soft.shape == (80, 120, 12)
    for threshold in (0.3, 0.5, 0.7):
        np.testing.assert_array_equal(soft >= threshold,
                                      utils.unmold_masks(masks, boxes, (80, 120), threshold))
    region, probs = tta.paste_probs(masks[0], (100, 100, 120, 130), (80, 120))
    assert region == (0, 0, 0, 0) and probs.shape == (0, 0)


# ----------------------------------------------------------------------------- merge, by hand

HW = (20, 30, 3)


def _copy(dets):
    """CopyDetections from (box, class_id, score, probability) rows: the mask probability is
    constant (a constant 4 x 4 head output, resized into the box)."""
    rois = np.array([d[0] for d in dets], np.int32).reshape(-1, 4)
    masks = np.array([np.full((4, 4), d[3], np.float32) for d in dets]).reshape(-1, 4, 4)
    return tta.CopyDetections(rois, np.array([d[1] for d in dets], np.int32),
                              np.array([d[2] for d in dets], np.float32), masks)


def _box_mask(y1, x1, y2, x2):
    m = np.zeros(HW[:2], bool)
    m[y1:y2, x1:x2] = True
    return m


A = ((0, 0, 10, 10), 1, 0.9, 0.8)
B = ((0, 2, 10, 12), 1, 0.6, 0.4)        # IoU with A: 80 / 120 = 0.667


def test_merge_fuses_boxes_scores_and_masks_by_hand():
    """WBF: box (0.9 A + 0.6 B) / 1.5 = (0, 0.8, 10, 10.8) -> (0, 1, 10, 11); score mean x
    2 of 2 copies = 0.75 (x 2 of 3 = 0.5 with a third copy that found nothing). NMS: A's box
    and score. Masks (both): (0.9 x 0.8 + 0.6 x 0.4) / 1.5 = 0.64 where both boxes are, 0.48
    in A alone, 0.16 in B alone: >= 0.5 is columns 2-9; >= 0.45 columns 0-9."""
    copies = [_copy([A]), _copy([B])]
    r = tta.merge_detections(copies, HW, "wbf")
    np.testing.assert_array_equal(r["rois"], [[0, 1, 10, 11]])
    np.testing.assert_allclose(r["scores"], [0.75])
    np.testing.assert_array_equal(r["class_ids"], [1])
    np.testing.assert_array_equal(r["masks"][:, :, 0], _box_mask(0, 2, 10, 10))
    r = tta.merge_detections(copies + [_copy([])], HW, "wbf", mask_threshold=0.45)
    np.testing.assert_allclose(r["scores"], [0.5])
    np.testing.assert_array_equal(r["masks"][:, :, 0], _box_mask(0, 0, 10, 10))
    r = tta.merge_detections(copies, HW, "nms")
    np.testing.assert_array_equal(r["rois"], [[0, 0, 10, 10]])
    np.testing.assert_allclose(r["scores"], [0.9])
    np.testing.assert_array_equal(r["masks"][:, :, 0], _box_mask(0, 2, 10, 10))
    assert r["rois"].dtype == np.int32 and r["scores"].dtype == np.float32
    assert r["masks"].dtype == bool and r["masks"].shape == (20, 30, 1)


def test_merge_averages_attribute_scores_by_hand():
    """Attribute scores of a cluster: (0.9 x A's + 0.6 x B's) / 1.5 = (0.56, 0.48, 0.48);
    the attributes are the ids >= the threshold. Without attribute scores, no such keys."""
    copies = [_copy([A])._replace(attribute_scores=np.array([[0.8, 0.2, 0.6]], np.float32)),
              _copy([B])._replace(attribute_scores=np.array([[0.2, 0.9, 0.3]], np.float32))]
    for method in ("wbf", "nms"):
        r = tta.merge_detections(copies, HW, method)
        np.testing.assert_allclose(r["attribute_scores"], [[0.56, 0.48, 0.48]], rtol=1e-6)
        assert r["attribute_scores"].dtype == np.float32
        assert [a.tolist() for a in r["attributes"]] == [[0]]
    r = tta.merge_detections(copies, HW, attribute_threshold=0.45)
    assert [a.tolist() for a in r["attributes"]] == [[0, 1, 2]]
    assert "attributes" not in tta.merge_detections([_copy([A]), _copy([B])], HW)


def test_one_identity_copy_is_plain_detect_with_attributes(tmp_path, images):
    """With the attribute head, TTA's results carry detect()'s attribute_scores and
    attributes: equal for one identity copy; a flip TTA gives one score row per detection."""
    keras.utils.set_random_seed(0)
    from test_attributes import NUM_ATTRIBUTES, attribute_config
    config = attribute_config(DETECTION_MAX_INSTANCES=20, DETECTION_ATTRIBUTE_THRESHOLD=0.5)
    model = MaskRCNN("inference", config, str(tmp_path))
    image = images[0]
    plain = model.detect([image])[0]
    assert len(plain["scores"]) > 0
    r = tta.detect_image(model, image, "scales=1")
    np.testing.assert_array_equal(r["attribute_scores"], plain["attribute_scores"])
    assert [a.tolist() for a in r["attributes"]] == [a.tolist() for a in plain["attributes"]]
    np.testing.assert_array_equal(r["masks"], plain["masks"])
    r = tta.detect_image(model, image, "flip")
    assert r["attribute_scores"].shape == (len(r["scores"]), NUM_ATTRIBUTES)
    assert [a.tolist() for a in r["attributes"]] == [
        np.flatnonzero(row >= 0.5).tolist() for row in r["attribute_scores"]]


def test_merge_matches_only_above_the_threshold_across_copies_within_a_class():
    """Below the IoU threshold, across classes, or within one copy nothing merges: WBF
    scores are then x 1/2 (one of two copies), NMS keeps them; each mask is its own."""
    for iou, other in [(0.7, _copy([B])), (0.55, _copy([B[:1] + (2,) + B[2:]]))]:
        r = tta.merge_detections([_copy([A]), other], HW, "wbf", iou_threshold=iou)
        np.testing.assert_allclose(r["scores"], [0.45, 0.3])
        np.testing.assert_array_equal(r["rois"], [A[0], B[0]])
        np.testing.assert_array_equal(r["masks"][:, :, 0], _box_mask(0, 0, 10, 10))
        assert not r["masks"][:, :, 1].any()                   # 0.4 < 0.5
        r = tta.merge_detections([_copy([A]), other], HW, "nms", iou_threshold=iou)
        np.testing.assert_allclose(r["scores"], [0.9, 0.6])
    r = tta.merge_detections([_copy([A, B])], HW, "wbf")      # one copy: no merge
    np.testing.assert_allclose(r["scores"], [0.9, 0.6])
    # IoU exactly at the threshold does not match (> as utils.non_max_suppression).
    half = ((0, 0, 10, 20), 1, 0.5, 0.9)                       # IoU with A: 100 / 200
    assert len(tta.merge_detections([_copy([A]), _copy([half])], HW, "nms",
                                    iou_threshold=0.5)["scores"]) == 2
    assert len(tta.merge_detections([_copy([A]), _copy([half])], HW, "nms",
                                    iou_threshold=0.49)["scores"]) == 1


def test_wbf_matches_the_fused_box_nms_the_kept_one():
    """C (0, 3, 10, 13) overlaps A by 70 / 130 = 0.54 < 0.55 but the fusion of A and B at
    equal scores, (0, 1, 10, 11), by 80 / 120 = 0.67: WBF fuses all three, box
    (0.9 A + 0.9 B + 0.3 C) / 2.1 = (0, 1.29, 10, 11.29) -> (0, 1, 10, 11), score
    (0.9 + 0.9 + 0.3) / 3 = 0.7; NMS keeps A (B suppressed) and C."""
    b = (B[0], 1, 0.9, 0.8)
    c = ((0, 3, 10, 13), 1, 0.3, 0.8)
    copies = [_copy([A]), _copy([b]), _copy([c])]
    r = tta.merge_detections(copies, HW, "wbf")
    np.testing.assert_array_equal(r["rois"], [[0, 1, 10, 11]])
    np.testing.assert_allclose(r["scores"], [0.7])
    r = tta.merge_detections(copies, HW, "nms")
    np.testing.assert_array_equal(r["rois"], [A[0], c[0]])
    np.testing.assert_allclose(r["scores"], [0.9, 0.3])


def test_merge_keeps_the_best_max_instances_and_handles_nothing():
    far = ((12, 15, 20, 30), 2, 0.95, 0.9)
    copies = [_copy([far, A]), _copy([B])]
    r = tta.merge_detections(copies, HW, "nms", max_instances=1)
    np.testing.assert_array_equal(r["rois"], [far[0]])
    np.testing.assert_array_equal(r["class_ids"], [2])
    assert r["masks"].shape == (20, 30, 1)
    for method in tta.MERGES:
        r = tta.merge_detections([_copy([]), _copy([])], HW, method)
        assert r["rois"].shape == (0, 4) and r["scores"].shape == (0,)
        assert r["class_ids"].shape == (0,) and r["masks"].shape == (20, 30, 0)
    with pytest.raises(ValueError, match="merge must be"):
        tta.merge_detections(copies, HW, "mean")


# ----------------------------------------------------------------------------- command line

def test_cli_tta_option_parses_and_rejects_bad_specs(capsys):
    parser = fashion.build_parser()
    for argv in (["evaluate", "--weights", "none"], ["submit", "--weights", "none"],
                 ["detect", "--weights", "none", "--image", "x.jpg"]):
        assert parser.parse_args(argv).tta is None
        args = parser.parse_args(argv + ["--tta", "flip,scales=0.8,1.0,1.2"])
        assert args.tta == tta.TTA(flip=True, scales=(0.8, 1.0, 1.2))
        assert parser.parse_args(argv + ["--tta", "none"]).tta is None
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--weights", "none", "--tta", "flop"])
    assert "argument --tta: TTA 'flop': unknown item 'flop'" in capsys.readouterr().err


def test_cli_evaluate_and_detect_with_tta_flip(tmp_path, capsys, monkeypatch):
    """evaluate --tta flip and detect --tta flip,... on a small demo folder, random weights
    at 64 px."""
    demo = demo_data.ensure_demo_data(str(tmp_path / "demo"), n_train=4, n_test=1,
                                      sizes=((96, 64),), verbose=False)
    monkeypatch.setattr(demo_data, "ensure_demo_data", lambda *a, **k: demo)
    common = ["--weights", "none", "--logs", str(tmp_path / "logs"), "--set"] + KILL_CONFIG + [
        "DETECTION_MIN_CONFIDENCE=0"]
    result = tmp_path / "eval.json"
    assert fashion.main(["evaluate", "--tta", "flip", "--limit", "4", "--output", str(result)]
                        + common) == 0
    out = capsys.readouterr().out
    assert "Test-time augmentation: flip, scales 1 (2 copies), merge wbf (IoU > 0.55)" in out
    stats = json.load(open(result))
    assert stats["tta"] == "flip, scales 1 (2 copies), merge wbf (IoU > 0.55)"
    assert set(stats["coco"]) == {"bbox", "segm"} and 0 <= stats["competition_metric"] <= 1

    det = tmp_path / "det"
    image = os.path.join(demo, "test", os.listdir(os.path.join(demo, "test"))[0])
    assert fashion.main(["detect", "--tta", "flip,scales=0.5,1,merge=nms", "--image", image,
                         "--output", str(det)] + common) == 0
    assert "merge nms" in capsys.readouterr().out
    assert (det / "detections.csv").is_file()
