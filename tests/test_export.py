"""mrcnn.export: a SavedModel serving one uint8 image of any size gives detect()'s detections.

The molding (resize, padding, anchors) is checked piece by piece against the numpy code it
replaces; the whole SavedModel is loaded in a fresh Python process (no mrcnn imported there)
and compared with MaskRCNN.detect with the same weights; the CLI writes one from a checkpoint.
"""

import json
import os
import subprocess
import sys
import types

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from synthetic import shapes_config, shapes_dataset

from mrcnn import export, utils
from mrcnn.data import compute_anchors
from mrcnn.model import MaskRCNN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = os.path.join(ROOT, "samples", "fashion", "fashion.py")
CLASS_NAMES = ["BG", "square", "circle", "triangle"]

# (height, width) of the served images, none square: shrunk by non-integer factors (OpenCV's
# float area weights), enlarged (its fixed-point bilinear), halved (its 2x2 block sums), and a
# 500 px one with large masks.
SIZES = [(100, 140), (150, 90), (60, 80), (256, 192), (500, 300)]

# Run in a fresh interpreter: TensorFlow only, no mrcnn on the path.
SERVE_SCRIPT = r"""
import sys
import numpy as np
import tensorflow as tf
assert "mrcnn" not in sys.modules
served = tf.saved_model.load(sys.argv[1])
serve = served.signatures["serving_default"]
spec = serve.structured_input_signature[1]["image"]
assert spec.shape.as_list() == [None, None, 3] and spec.dtype == tf.uint8, spec
images = np.load(sys.argv[2])
out = {}
for i in range(len(images.files)):
    for key, value in serve(image=tf.constant(images["image_%d" % i])).items():
        out["%s_%d" % (key, i)] = value.numpy()
direct = served.serve(tf.constant(images["image_0"]))      # the tf.function, as saved
assert np.array_equal(direct["masks"].numpy(), out["masks_0"])
meta = served.signatures["metadata"]()
out["class_names"] = np.array([n.decode() for n in meta["class_names"].numpy()])
np.savez(sys.argv[3], **out)
"""


def _run(args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable] + list(args), capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(ROOT))


def _shapes_image(index, height, width):
    image = shapes_dataset(3, seed=3).load_image(index % 3)
    return np.ascontiguousarray(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))


def assert_same_detections(got, expected, what):
    """got: the SavedModel's outputs; expected: detect()'s. The molded image is the same bit
    for bit, so everything agrees up to float rounding: scores to 1e-5, and at most two mask
    pixels per instance (resized mask values within rounding of the 0.5 threshold)."""
    n = len(expected["class_ids"])
    assert int(got["num_detections"]) == n, what
    np.testing.assert_array_equal(got["class_ids"], expected["class_ids"], err_msg=what)
    np.testing.assert_allclose(got["scores"], expected["scores"], rtol=0, atol=1e-5,
                               err_msg=what)
    np.testing.assert_array_equal(got["boxes"], expected["rois"], err_msg=what)
    assert got["boxes"].dtype == np.int32 and got["class_ids"].dtype == np.int32, what
    assert got["masks"].dtype == bool and got["masks"].shape == expected["masks"].shape, what
    differing = (got["masks"] != expected["masks"]).sum(axis=(0, 1))
    assert differing.max(initial=0) <= 2, (what, differing)


# ----------------------------------------------------------------------------- molding

@pytest.fixture(scope="module")
def molding():
    """resize_image_graph of each mode as one tf.function with a dynamic image size."""
    functions = {}
    for mode in export.SUPPORTED_RESIZE_MODES:
        config = shapes_config(IMAGE_RESIZE_MODE=mode)
        functions[mode] = (config, tf.function(
            lambda image, config=config: export.resize_image_graph(image, config),
            input_signature=[export.IMAGE_SPEC]))
    return functions


def test_resize_is_opencvs_bit_for_bit(molding):
    rng = np.random.default_rng(0)
    sizes = [(100, 140), (150, 90), (60, 80), (256, 192), (384, 256), (49 * 6, 49 * 4),
             (128, 96), (1, 3), (700, 1000), (33, 17)]
    for mode, (config, resize) in molding.items():
        for h, w in sizes:
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            expected, window, scale, _, _ = utils.resize_image(
                image, min_dim=config.IMAGE_MIN_DIM, max_dim=config.IMAGE_MAX_DIM,
                min_scale=config.IMAGE_MIN_SCALE, mode=mode)
            got, got_window, got_scale = resize(tf.constant(image))
            what = (mode, h, w)
            np.testing.assert_array_equal(got.numpy(), expected, err_msg=str(what))
            assert tuple(got_window.numpy()) == tuple(window), what
            assert float(got_scale) == scale, what
        assert resize.experimental_get_tracing_count() == 1, mode


def test_anchors_in_the_graph_are_compute_anchors():
    config = shapes_config(IMAGE_RESIZE_MODE="pad64", RPN_ANCHOR_STRIDE=2)
    for shape in [(128, 192), (256, 128), (64, 64)]:
        expected = utils.norm_boxes(compute_anchors(config, shape), shape)
        got = export.anchors_graph(config, tf.constant(shape)).numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7, err_msg=str(shape))


def test_masks_are_pasted_as_unmold_mask():
    """Boxes smaller than the mask (area averaging), larger (bilinear), mixed, on and past the
    image border, and empty; a smooth blob so that many pixels sit near the threshold."""
    yy, xx = np.mgrid[0:28, 0:28]
    rng = np.random.default_rng(1)
    masks, boxes = [], []
    for box in [(10, 20, 24, 40), (5, 5, 17, 15), (0, 0, 90, 70), (40, 3, 85, 19),
                (-5, 50, 20, 80), (70, 60, 95, 75), (30, 30, 30, 45), (12, 12, 40, 40)]:
        cy, cx, sy, sx = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(4, 9), \
            rng.uniform(4, 9)
        masks.append(np.exp(-((yy - cy) / sy) ** 2 - ((xx - cx) / sx) ** 2).astype(np.float32))
        boxes.append(box)
    shape = (90, 70)
    got = export.paste_masks_graph(tf.constant(np.stack(masks)),
                                   tf.constant(boxes, tf.int32), tf.constant(shape)).numpy()
    assert got.shape == (len(boxes),) + shape and got.dtype == bool
    for mask, box, pasted in zip(masks, boxes, got):
        expected = utils.unmold_mask(mask, box, shape)
        assert (pasted != expected).sum() <= 1, (box, (pasted != expected).sum())
    empty = export.paste_masks_graph(tf.zeros([0, 28, 28]), tf.zeros([0, 4], tf.int32),
                                     tf.constant(shape))
    assert empty.shape == (0,) + shape


def test_what_cannot_be_exported_is_named(tmp_path):
    def stub(mode="inference", backbone=None, **overrides):
        config = shapes_config(**overrides)
        if backbone is not None:
            config.BACKBONE = backbone                    # set directly: override wants a str
        return types.SimpleNamespace(mode=mode, config=config, keras_model=None)
    with pytest.raises(export.ExportError, match="'crop'.*square, pad64, none"):
        export.make_serving_function(stub(IMAGE_RESIZE_MODE="crop"))
    with pytest.raises(export.ExportError, match="inference mode"):
        export.make_serving_function(stub(mode="training"))
    with pytest.raises(export.ExportError, match="callable BACKBONE"):
        export.make_serving_function(stub(IMAGE_RESIZE_MODE="pad64",
                                          backbone=lambda *args, **kwargs: None))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        export.export_saved_model(stub(), str(tmp_path / "out"))
    with pytest.raises(export.ExportError, match="class_names has 2 names but NUM_CLASSES is 4"):
        export.export_saved_model(stub(), str(tmp_path / "new"), class_names=["BG", "a"])


# ----------------------------------------------------------------------------- the SavedModel

def _telling_random_weights(model, image):
    """Untrained weights whose detections are worth comparing.

    From a random start the RPN and box regressors push every box to a one-pixel sliver at
    the image border and one class takes every ROI with a score of 1.0. Zeroing both
    regressors makes the detections anchors of every size (through the proposals), and
    redrawing the class logits, normalised on this image's ROI features, spreads the scores
    (0.4-1) over all three classes. Masks come from the random mask head.
    """
    rpn_bbox = model.keras_model.get_layer("rpn_model").get_layer("rpn_bbox_pred")
    box_fc = model.keras_model.get_layer("mrcnn_bbox_fc")
    for layer in (rpn_bbox, box_fc):
        layer.set_weights([np.zeros_like(w) for w in layer.get_weights()])
    features = model.run_graph([image], [("features", "mrcnn_class_bn2")])["features"]
    features = np.maximum(features.reshape(-1, features.shape[-1]), 0)   # the ReLU after bn2
    logits_layer = model.keras_model.get_layer("mrcnn_class_logits")
    kernel = np.random.default_rng(0).normal(
        0, 1, logits_layer.get_weights()[0].shape).astype(np.float32)
    kernel /= (features @ kernel).std(axis=0)
    logits_layer.set_weights([kernel, -(features @ kernel).mean(axis=0)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """detect() on SIZES with telling weights, and the SavedModel of a fresh model that loaded
    the same weights file."""
    folder = tmp_path_factory.mktemp("export")
    keras.utils.set_random_seed(0)
    config = shapes_config()
    images = [_shapes_image(i, h, w) for i, (h, w) in enumerate(SIZES)]
    model = MaskRCNN("inference", config, str(folder))
    _telling_random_weights(model, images[0])
    weights = str(folder / "telling.weights.h5")
    model.save_weights(weights)
    expected = [model.detect([image])[0] for image in images]

    served = MaskRCNN("inference", config, str(folder))
    served.load_weights(weights)
    output = str(folder / "saved_model")
    export.export_saved_model(served, output, class_names=CLASS_NAMES, verbose=False)
    return types.SimpleNamespace(folder=folder, model=served, images=images,
                                 expected=expected, output=output)


def test_detections_are_telling(exported):
    """The comparison below would be vacuous with empty or degenerate detections."""
    counts = [len(r["class_ids"]) for r in exported.expected]
    assert min(counts) >= 5, counts
    assert {1, 2, 3} <= set(np.concatenate([r["class_ids"] for r in exported.expected]))
    scores = np.concatenate([r["scores"] for r in exported.expected])
    assert scores.min() < 0.9 and len(np.unique(scores)) == len(scores)
    sizes = np.concatenate([r["masks"].sum(axis=(0, 1)) for r in exported.expected])
    assert sizes.max() > 300 and np.median(sizes) > 10


def test_saved_model_in_a_fresh_process_gives_detects_detections(exported):
    images = str(exported.folder / "images.npz")
    np.savez(images, **{"image_%d" % i: im for i, im in enumerate(exported.images)})
    result = str(exported.folder / "served.npz")
    run = _run(["-c", SERVE_SCRIPT, exported.output, images, result])
    assert run.returncode == 0, run.stderr[-3000:]
    served = np.load(result)
    assert list(served["class_names"]) == CLASS_NAMES
    for i, (image, expected) in enumerate(zip(exported.images, exported.expected)):
        got = {k: served["%s_%d" % (k, i)] for k in
               ("boxes", "class_ids", "scores", "masks", "num_detections")}
        assert got["masks"].shape[:2] == image.shape[:2]
        assert_same_detections(got, expected, image.shape)

    info = json.load(open(os.path.join(exported.output, export.CONFIG_FILE)))
    assert info["class_names"] == CLASS_NAMES
    assert info["config"]["IMAGE_MAX_DIM"] == 128 and info["image_resize_mode"] == "square"
    assert set(info["outputs"]) == {"boxes", "class_ids", "scores", "masks", "num_detections"}


def test_pad64_serving_is_traced_once_and_matches_detect(exported):
    """IMAGE_RESIZE_MODE "pad64": the molded size follows the image, so the anchors are
    computed in the graph; one trace serves every size."""
    model = MaskRCNN("inference", shapes_config(IMAGE_RESIZE_MODE="pad64"),
                     str(exported.folder))
    model.load_weights(str(exported.folder / "telling.weights.h5"))
    serve = export.make_serving_function(model)
    for image in exported.images[:3]:                 # molded 128x192, 256x128, 128x192
        got = {k: v.numpy() for k, v in serve(tf.constant(image)).items()}
        assert_same_detections(got, model.detect([image])[0], ("pad64", image.shape))
    assert serve.experimental_get_tracing_count() == 1


# ----------------------------------------------------------------------------- command line

TINY = ["IMAGE_MIN_DIM=128", "IMAGE_MAX_DIM=128", "POST_NMS_ROIS_INFERENCE=32",
        "FPN_CLASSIF_FC_LAYERS_SIZE=64", "TOP_DOWN_PYRAMID_SIZE=64",
        "DETECTION_MIN_CONFIDENCE=0.0"]


def test_cli_export_from_the_last_checkpoint(tmp_path, capsys):
    """fashion.py export --weights last on the demo configuration (U-Net head, 16x16 masks):
    the SavedModel gives detect()'s detections; bad paths are one-line errors."""
    from samples.fashion import demo_data, fashion
    keras.utils.set_random_seed(1)
    logs = tmp_path / "logs"
    model = fashion.build_model(
        "inference", fashion.make_config(demo=True, inference=True, overrides=TINY), str(logs))
    run_dir = logs / "fashion_demo20240101T0000"
    run_dir.mkdir(parents=True)
    model.save_weights(str(run_dir / "mask_rcnn_fashion_demo_0003.weights.h5"))

    output = tmp_path / "exported"
    args = ["export", "--weights", "last", "--logs", str(logs), "--output", str(output)]
    assert fashion.main(args + ["--set"] + TINY) == 0
    out = capsys.readouterr().out
    assert "mask_rcnn_fashion_demo_0003.weights.h5" in out
    assert "SavedModel written to %s" % output in out
    info = json.load(open(output / export.CONFIG_FILE))
    assert info["class_names"] == ["BG"] + [name for name, _ in demo_data.CATEGORIES]
    assert info["mask_head"] == "unet"
    stored = sum(f.stat().st_size for f in (output / "variables").iterdir())
    weights = sum(np.asarray(w).nbytes for w in model.keras_model.weights)
    assert stored < 1.1 * weights, (stored, weights)                # each weight stored once

    served = tf.saved_model.load(str(output)).signatures["serving_default"]
    image = _shapes_image(0, 150, 110)
    got = {k: v.numpy() for k, v in served(image=tf.constant(image)).items()}
    assert_same_detections(got, model.detect([image])[0], "cli")

    assert fashion.main(args) == 1                                   # output not empty
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert fashion.main(["export", "--weights", str(tmp_path / "no.weights.h5"),
                         "--output", str(tmp_path / "x")]) == 1
    assert "weights file not found" in capsys.readouterr().err
    assert fashion.main(["export", "--weights", "last", "--output",
                         str(tmp_path / "no" / "such" / "dir")]) == 1
    assert "does not exist" in capsys.readouterr().err
