"""The fashion sample: demo data, FashionDataset parsing, errors, submission, weights, CLI end to end."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_utils

from mrcnn import utils
from samples.fashion import demo_data
from samples.fashion.dataset import (TRANSPOSED_IMAGE_IDS, CsvIndex, DatasetError,
                                     FashionDataset, SizeMismatchError)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = os.path.join(ROOT, "samples", "fashion", "fashion.py")


# ----------------------------------------------------------------------------- helpers

def _write_image(path, h, w, seed=0):
    image = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(path), image)


def _make_folder(tmp_path, rows, images, labels=None):
    """A tiny iMaterialist folder. rows: (ImageId, rle, H, W, ClassId); images: {id: (h, w)}."""
    folder = tmp_path / "data"
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    for i, (name, (h, w)) in enumerate(images.items()):
        _write_image(folder / "train" / name, h, w, seed=i)
    with open(folder / "label_descriptions.json", "w") as f:
        json.dump(labels or demo_data.label_descriptions(), f)
    with open(folder / "train.csv", "w") as f:
        f.write("ImageId,EncodedPixels,Height,Width,ClassId\n")
        for r in rows:
            f.write("%s,%s,%d,%d,%s\n" % r)
    return str(folder)


def _box(h, w, y1, x1, y2, x2):
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo_data.ensure_demo_data(str(tmp_path_factory.mktemp("demo") / "demo"),
                                      n_train=12, n_test=3, verbose=False)


# ----------------------------------------------------------------------------- demo data

def test_demo_data_is_deterministic_and_in_imaterialist_format(tmp_path, demo_dir):
    other = demo_data.ensure_demo_data(str(tmp_path / "again"), n_train=12, n_test=3,
                                       verbose=False)
    for name in ("train.csv", "label_descriptions.json", "sample_submission.csv"):
        assert open(os.path.join(demo_dir, name), "rb").read() == \
            open(os.path.join(other, name), "rb").read()
    df = pd.read_csv(os.path.join(demo_dir, "train.csv"))
    assert list(df.columns) == ["ImageId", "EncodedPixels", "Height", "Width", "ClassId"]
    assert df.ImageId.nunique() == 12
    assert df.ClassId.astype(str).str.contains("_").any()          # some with attributes
    labels = json.load(open(os.path.join(demo_dir, "label_descriptions.json")))
    assert len(labels["categories"]) == 46 and len(labels["attributes"]) == 92
    assert labels["categories"][23]["name"] == "shoe"
    assert "demo" in labels["info"]["version"]
    for _, row in df.head(10).iterrows():     # masks decode inside the image, image has that size
        image = cv2.imread(os.path.join(demo_dir, "train", row.ImageId))
        assert image.shape[:2] == (row.Height, row.Width)
        assert utils.rle_decode(row.EncodedPixels, (row.Height, row.Width)).sum() > 0
    assert len(os.listdir(os.path.join(demo_dir, "test"))) == 3


# ----------------------------------------------------------------------------- dataset parsing

def test_class_ids_names_attributes_and_masks(demo_dir):
    ds = FashionDataset().load_dataset(demo_dir, "all")
    ds.prepare()
    assert ds.num_classes == 47 and ds.class_names[0] == "BG"
    assert ds.class_names[24] == "shoe" and ds.class_names[11] == "dress"
    df = pd.read_csv(os.path.join(demo_dir, "train.csv"), dtype={"ClassId": str})
    for i in ds.image_ids:
        info = ds.image_info[i]
        rows = df[df.ImageId == info["id"]]
        masks, class_ids = ds.load_mask(i)
        attributes = ds.load_attributes(i)
        assert masks.dtype == bool and masks.shape == (info["height"], info["width"], len(rows))
        expected_cls = [int(c.split("_")[0]) + 1 for c in rows.ClassId]
        expected_attr = [tuple(int(a) for a in c.split("_")[1:]) for c in rows.ClassId]
        assert class_ids.tolist() == expected_cls == info["class_ids"].tolist()
        assert attributes == expected_attr == info["attributes"]
        for k, rle in enumerate(rows.EncodedPixels):
            # pycocotools as the independent decoder: Kaggle starts are 1-indexed, column-major.
            pairs = np.array(rle.split(), int).reshape(-1, 2)
            counts, pos = [], 0
            for start, length in pairs:
                counts += [start - 1 - pos, length]
                pos = start - 1 + length
            counts.append(info["height"] * info["width"] - pos)
            ref = mask_utils.decode(mask_utils.frPyObjects(
                {"counts": counts, "size": [info["height"], info["width"]]},
                info["height"], info["width"]))
            assert np.array_equal(masks[..., k], ref.astype(bool))


def test_split_is_deterministic_and_disjoint(demo_dir):
    def ids(subset, seed=7, fraction=0.25):
        return {info["id"] for info in
                FashionDataset().load_dataset(demo_dir, subset, val_fraction=fraction,
                                              seed=seed).image_info}
    train, val = ids("train"), ids("val")
    assert len(val) == 3 and len(train) == 9 and not train & val
    assert ids("val") == val and ids("val", seed=8) != val or len(val) == 0
    assert len(ids("test")) == 3


def test_csv_index_handles_column_order_crlf_blank_lines_and_quotes(tmp_path):
    rows = [("a.jpg", "1 3 10 2", 4, 5, "6_28_71"), ("b.jpg", "", 4, 5, "1"),
            ("a.jpg", "5 1", 4, 5, "23")]
    variants = {
        "plain": "ImageId,EncodedPixels,Height,Width,ClassId\n" + "".join(
            "%s,%s,%d,%d,%s\n" % r for r in rows),
        "crlf_blank_noeol": "ImageId,EncodedPixels,Height,Width,ClassId\r\n\r\n" + "\r\n".join(
            "%s,%s,%d,%d,%s" % r for r in rows),
        "reordered": "ClassId,Height,ImageId,Width,EncodedPixels\n" + "".join(
            "%s,%d,%s,%d,%s\n" % (r[4], r[2], r[0], r[3], r[1]) for r in rows),
        "quoted": "ImageId,EncodedPixels,Height,Width,ClassId\n" + "".join(
            '"%s","%s",%d,%d,"%s"\n' % r for r in rows),
    }
    for name, text in variants.items():
        path = tmp_path / (name + ".csv")
        path.write_bytes(text.encode())
        index = CsvIndex(str(path))
        assert list(index.image_ids) == ["a.jpg", "b.jpg", "a.jpg"], name
        assert list(index.class_strings) == ["6_28_71", "1", "23"], name
        assert index.heights.tolist() == [4, 4, 4] and index.widths.tolist() == [5, 5, 5]
        assert index.read_rles([0, 1, 2]) == ["1 3 10 2", "", "5 1"], name


def test_wrong_size_image_ids_are_transposed_and_flipped(tmp_path):
    name = sorted(TRANSPOSED_IMAGE_IDS)[0]
    h_file, w_file = 12, 7
    truth = _box(h_file, w_file, 1, 2, 5, 6)
    truth[8:11, 0:3] = True
    # The CSV swaps Height and Width: its mask decoded at (Height, Width) = (w_file, h_file)
    # gives `truth` after .T[::-1, :].
    stored = np.ascontiguousarray(truth[::-1, :].T)
    assert np.array_equal(stored.T[::-1, :], truth)
    folder = _make_folder(tmp_path, [(name, utils.rle_encode(stored), w_file, h_file, "6")],
                          {name: (h_file, w_file)})
    ds = FashionDataset().load_dataset(folder, "all")
    ds.prepare()
    masks, class_ids = ds.load_mask(0)
    assert masks.shape == (h_file, w_file, 1) and np.array_equal(masks[..., 0], truth)
    assert class_ids.tolist() == [7]


def test_other_size_disagreements_are_reported_and_skipped(tmp_path):
    rle = utils.rle_encode(_box(10, 8, 1, 1, 4, 4))
    folder = _make_folder(tmp_path, [("good.jpg", rle, 10, 8, "1"), ("bad.jpg", rle, 10, 8, "1"),
                                     ("mixed.jpg", rle, 10, 8, "1"),
                                     ("mixed.jpg", rle, 11, 8, "2")],
                          {"good.jpg": (10, 8), "bad.jpg": (20, 16), "mixed.jpg": (10, 8)})
    ds = FashionDataset().load_dataset(folder, "all")
    assert ds.skipped == {"rows of one image disagree on Height/Width": 1}
    ds.prepare()
    bad = [i for i in ds.image_ids if ds.image_info[i]["id"] == "bad.jpg"][0]
    with pytest.raises(SizeMismatchError, match="bad.jpg.*Height 10, Width 8.*20x16"):
        ds.load_mask(bad)
    counts = ds.check_image_sizes(verbose=False)
    ds.prepare()
    assert counts == {"size disagrees with train.csv": 1}
    assert [info["id"] for info in ds.image_info] == ["good.jpg"]


def test_duplicates_and_empty_masks_are_dropped(tmp_path):
    rle = utils.rle_encode(_box(10, 8, 1, 1, 4, 4))
    folder = _make_folder(tmp_path, [("a.jpg", rle, 10, 8, "1"), ("a.jpg", rle, 10, 8, "1"),
                                     ("a.jpg", "", 10, 8, "2"), ("a.jpg", rle, 10, 8, "3_5")],
                          {"a.jpg": (10, 8)})
    ds = FashionDataset().load_dataset(folder, "all")
    ds.prepare()
    masks, class_ids = ds.load_mask(0)
    assert class_ids.tolist() == [2, 4] and masks.shape == (10, 8, 2)
    assert ds.load_attributes(0) == [(), (5,)]


def test_fashionpedia_json(tmp_path):
    h, w = 30, 20
    square = _box(h, w, 2, 2, 12, 10)
    rle = mask_utils.encode(np.asfortranarray(square.astype(np.uint8)))
    labels = demo_data.label_descriptions()
    data = {
        "info": {"description": "fashionpedia-like"},
        "categories": labels["categories"], "attributes": labels["attributes"],
        "images": [{"id": 5, "file_name": "p.jpg", "height": h, "width": w}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 10, "attribute_ids": [3, 17],
             "segmentation": [[15.0, 15.0, 19.0, 15.0, 19.0, 25.0, 15.0, 25.0]], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 23, "attribute_ids": [],
             "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}, "iscrowd": 0},
            {"id": 3, "image_id": 5, "category_id": 0,
             "segmentation": mask_utils.frPyObjects(
                 {"size": [h, w], "counts": [0, 5, h * w - 5]}, h, w) and
             {"size": [h, w], "counts": [0, 5, h * w - 5]}, "iscrowd": 0},
        ]}
    path = tmp_path / "instances_attributes_train2020.json"
    path.write_text(json.dumps(data))
    _write_image(tmp_path / "p.jpg", h, w)
    ds = FashionDataset().load_dataset(None, "all", annotations=str(path))
    ds.prepare()
    masks, class_ids = ds.load_mask(0)
    assert class_ids.tolist() == [11, 24, 1]
    assert ds.load_attributes(0) == [(3, 17), (), ()]
    assert masks[20, 17, 0] and not masks[5, 5, 0]
    assert np.array_equal(masks[..., 1], square)
    assert masks[..., 2].sum() == 5 and masks[0:5, 0, 2].all()


# ----------------------------------------------------------------------------- errors

def test_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        FashionDataset().load_dataset(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="label_descriptions.json not found"):
        FashionDataset().load_dataset(str(empty))
    (empty / "label_descriptions.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        FashionDataset().load_dataset(str(empty))
    (empty / "label_descriptions.json").write_text(json.dumps({"categories": [{"x": 1}]}))
    with pytest.raises(DatasetError, match="malformed"):
        FashionDataset().load_dataset(str(empty))
    (empty / "label_descriptions.json").write_text(json.dumps(demo_data.label_descriptions()))
    with pytest.raises(DatasetError, match="train.csv not found"):
        FashionDataset().load_dataset(str(empty))


@pytest.mark.parametrize("row, message", [
    (("a.jpg", "1 2", 4, 4, "77"), r"line 3: ClassId '77' has category 77, which is not in "
                                   r"label_descriptions.json"),
    (("a.jpg", "1 2", 4, 4, "x_1"), r"line 3: ClassId 'x_1' is not a category id"),
    (("../etc/passwd", "1 2", 4, 4, "1"), r"line 3: ImageId '../etc/passwd' is not a plain"),
    (("sub/a.jpg", "1 2", 4, 4, "1"), r"line 3: ImageId 'sub/a.jpg' is not a plain"),
    (("a.jpg", "1 2", "x", 4, "1"), r"line 3: Height must be a positive integer"),
])
def test_bad_rows_are_rejected_naming_the_line(tmp_path, row, message):
    rows = [("a.jpg", "1 2", 4, 4, "1"), row]
    folder = tmp_path / "data"
    (folder / "train").mkdir(parents=True)
    (folder / "label_descriptions.json").write_text(json.dumps(demo_data.label_descriptions()))
    (folder / "train.csv").write_text("ImageId,EncodedPixels,Height,Width,ClassId\n" + "".join(
        "%s,%s,%s,%s,%s\n" % r for r in rows))
    with pytest.raises(DatasetError, match=message):
        FashionDataset().load_dataset(str(folder), "all")


def test_missing_image_and_bad_rle(tmp_path):
    folder = _make_folder(tmp_path, [("a.jpg", "1 2", 4, 4, "1"), ("gone.jpg", "1 2", 4, 4, "1"),
                                     ("b.jpg", "1 2 3", 4, 4, "1")],
                          {"a.jpg": (4, 4), "b.jpg": (4, 4)})
    ds = FashionDataset().load_dataset(folder, "all")
    ds.prepare()
    by_name = {info["id"]: i for i, info in enumerate(ds.image_info)}
    with pytest.raises(utils.ImageLoadError, match="gone.jpg"):
        ds.load_mask(by_name["gone.jpg"])
    with pytest.raises(utils.RLEError, match="b.jpg.*train.csv line 4.*odd"):
        ds.load_mask(by_name["b.jpg"])


# ----------------------------------------------------------------------------- submission

def test_submission_rows_are_non_overlapping_resized_and_listed():
    from samples.fashion.submission import submission_rows
    h, w = 60, 40
    masks = np.stack([_box(h, w, 0, 0, 40, 30), _box(h, w, 20, 10, 60, 40),
                      np.zeros((h, w), bool)], -1)
    result = {"masks": masks, "class_ids": np.array([2, 24, 5]),
              "scores": np.array([0.6, 0.9, 0.8]), "rois": utils.extract_bboxes(masks)}
    for size in (512, 0, 32):
        rows = submission_rows("x.jpg", result, mask_size=size)
        shape = (size, size) if size else (h, w)
        decoded = [utils.rle_decode(r[1], shape) for r in rows]
        assert [r[2] for r in rows] == ["1", "23"]          # category = class id - 1
        assert all(d.any() for d in decoded)                  # one row per non-empty mask
        assert not (decoded[0] & decoded[1]).any()            # no overlaps
        # The higher-scored mask (class 24) keeps the shared pixels.
        assert decoded[1].sum() > decoded[0].sum() * 0.9
    empty = {"masks": np.zeros((h, w, 0), bool), "class_ids": np.zeros(0, int),
             "scores": np.zeros(0), "rois": np.zeros((0, 4))}
    assert submission_rows("y.jpg", empty) == [("y.jpg", "", "")]


# ----------------------------------------------------------------------------- weights

def test_imagenet_weight_map_gives_identical_backbone_outputs():
    import keras
    from mrcnn.backbone import resnet_graph
    from samples.fashion.weights import assign_backbone, imagenet_weight_map
    app = keras.applications.ResNet101(weights=None, include_top=False,
                                       input_shape=(None, None, 3))
    rng = np.random.default_rng(0)
    for layer in app.layers:        # random BN statistics, so that the epsilon fold matters
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.1, b.shape),
                               rng.normal(0, 0.1, m.shape), rng.uniform(0.5, 2, v.shape)])
    inp = keras.Input((None, None, 3))
    ours = keras.Model(inp, resnet_graph(inp, "resnet101", stage5=True, train_bn=False)[1:])
    assert assign_backbone(ours, imagenet_weight_map(app)) == 208
    theirs = keras.Model(app.input, [app.get_layer(n).output for n in (
        "conv2_block3_out", "conv3_block4_out", "conv4_block23_out", "conv5_block3_out")])
    # 130 px: conv1's output is odd, where both stem max-pools use the same windows.
    x = rng.normal(0, 50, (1, 130, 130, 3)).astype("float32")
    for a, b in zip(ours.predict(x, verbose=0), theirs.predict(x[..., ::-1], verbose=0)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


TINY = ["IMAGE_MIN_DIM=128", "IMAGE_MAX_DIM=128", "IMAGES_PER_GPU=1",
        "RPN_ANCHOR_SCALES=(8,16,32,64,128)", "STEPS_PER_EPOCH=2", "VALIDATION_STEPS=1",
        "TRAIN_ROIS_PER_IMAGE=16", "POST_NMS_ROIS_TRAINING=64", "POST_NMS_ROIS_INFERENCE=32",
        "FPN_CLASSIF_FC_LAYERS_SIZE=64", "TOP_DOWN_PYRAMID_SIZE=64", "MINI_MASK_SHAPE=(28,28)",
        "DETECTION_MIN_CONFIDENCE=0.0", "LOADER_WORKERS=0"]


@pytest.fixture(scope="module")
def tiny_inference_model(tmp_path_factory):
    from samples.fashion.configs import make_config
    from samples.fashion.fashion import build_model
    config = make_config(demo=True, inference=True, overrides=TINY)
    return build_model("inference", config, str(tmp_path_factory.mktemp("logs")))


def test_coco_weights_load_by_name_without_class_layers(tmp_path, tiny_inference_model,
                                                         monkeypatch):
    import h5py
    import keras
    from samples.fashion import weights as W
    model = tiny_inference_model
    rng = np.random.default_rng(1)
    # A legacy Keras 2 HDF5 file like mask_rcnn_coco.h5: every layer of the model, the
    # class-specific ones with 81 classes, one layer of another shape, one unknown layer.
    path = tmp_path / "models" / W.COCO_FILE
    path.parent.mkdir()
    expected = {}
    with h5py.File(path, "w") as f:
        names = []
        for layer in model.keras_model.layers:
            if not layer.weights or isinstance(layer, keras.Model):
                continue
            g = f.create_group(layer.name)
            weight_names = []
            arrays = []
            for k, v in enumerate(layer.weights):
                shape = tuple(v.shape)
                if layer.name in ("mrcnn_class_logits", "mrcnn_bbox") or (
                        layer.name == "fpn_c5p5" and k == 0):
                    shape = shape[:-1] + (shape[-1] + 3,)
                a = rng.normal(0, 1, shape).astype("float32")
                g.create_dataset("%s/w%d" % (layer.name, k), data=a)
                weight_names.append(("%s/w%d" % (layer.name, k)).encode())
                arrays.append(a)
            g.attrs["weight_names"] = weight_names
            names.append(layer.name.encode())
            expected[layer.name] = arrays
        f.create_group("res4w_branch2a").attrs["weight_names"] = []
        names.append(b"res4w_branch2a")
        f.attrs["layer_names"] = names
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert W.coco_weights_path() == str(path)
    before = {n: [np.array(v) for v in model.keras_model.get_layer(n).weights]
              for n in ("mrcnn_class_logits", "fpn_c5p5")}
    W.load_coco(model, verbose=False)
    np.testing.assert_array_equal(np.array(model.keras_model.get_layer("conv1").weights[0]),
                                  expected["conv1"][0])
    for name, arrays in before.items():       # excluded / mismatched: unchanged
        np.testing.assert_array_equal(np.array(model.keras_model.get_layer(name).weights[0]),
                                      arrays[0])


def test_imagenet_weights_from_a_file(tmp_path, tiny_inference_model):
    import keras
    from samples.fashion import weights as W
    app = keras.applications.ResNet50(weights=None, include_top=False,
                                      input_shape=(None, None, 3))
    path = str(tmp_path / "resnet50.weights.h5")
    app.save_weights(path)
    assert W.load_imagenet(tiny_inference_model, weights=path, verbose=False) == 106
    np.testing.assert_allclose(
        np.array(tiny_inference_model.keras_model.get_layer("res5c_branch2c").weights[0]),
        app.get_layer("conv5_block3_3_conv").get_weights()[0])


def test_offline_messages_say_which_file_goes_where(monkeypatch, tmp_path):
    from mrcnn import utils
    from samples.fashion import weights as W
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(utils, "_fetch", offline)
    with pytest.raises(W.WeightsUnavailable, match="mask_rcnn_coco.h5.*put it at .*models"):
        W.coco_weights_path()
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


# ----------------------------------------------------------------------------- command line

def _cli(*args, timeout=120):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, FASHION] + list(args), capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    bad = _make_folder(tmp_path, [("a.jpg", "1 2", 4, 4, "99")], {"a.jpg": (4, 4)})
    cases = [
        (["train", "--dataset", str(tmp_path / "missing")], "dataset folder not found"),
        (["train", "--dataset", bad], "line 2: ClassId '99' has category 99"),
        (["evaluate", "--weights", str(tmp_path / "w.h5")], "weights file not found"),
        (["train", "--dataset", bad, "--set", "NO_SUCH=1"], "unknown configuration attribute"),
    ]
    for argv, message in cases:
        out = _cli(*argv)
        assert out.returncode != 0, argv
        assert message in out.stderr, (argv, out.stderr)
        assert "Traceback" not in out.stderr, argv
    (tmp_path / "data" / "label_descriptions.json").unlink()
    out = _cli("train", "--dataset", bad)
    assert "label_descriptions.json not found" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, capsys):
    """train a few steps -> evaluate -> detect -> submit on a tiny generated dataset."""
    from samples.fashion import fashion
    data = demo_data.ensure_demo_data(str(tmp_path / "demo"), n_train=6, n_test=2,
                                      sizes=((128, 96), (128, 128)), verbose=False)
    logs = str(tmp_path / "logs")
    common = ["--dataset", data, "--logs", logs, "--set"] + TINY
    assert fashion.main(["train", "--weights", "none", "--all-epochs", "1",
                         "--no-augmentation", "--val-fraction", "0.34"] + common) == 0
    out = capsys.readouterr().out
    assert "Last checkpoint:" in out and "evaluate --weights last" in out
    checkpoints = [f for d in os.listdir(logs) for f in os.listdir(os.path.join(logs, d))
                   if f.endswith(".weights.h5")]
    assert checkpoints

    result = str(tmp_path / "eval.json")
    assert fashion.main(["evaluate", "--weights", "last", "--val-fraction", "0.34",
                         "--output", result] + common) == 0
    stats = json.load(open(result))
    assert set(stats["coco"]) == {"bbox", "segm"} and len(stats["coco"]["segm"]) == 12
    assert 0 <= stats["competition_metric"] <= 1
    assert capsys.readouterr().out.count("Average Precision") == 12

    det = str(tmp_path / "det")
    test_dir = os.path.join(data, "test")
    assert fashion.main(["detect", "--weights", "last", "--image", test_dir,
                         "--output", det] + common) == 0
    pngs = [f for f in os.listdir(det) if f.endswith(".png")]
    assert len(pngs) == 2
    rows = pd.read_csv(os.path.join(det, "detections.csv"), keep_default_na=False)
    for _, r in rows.iterrows():
        assert utils.rle_decode(r.EncodedPixels, (r.Height, r.Width)).any()

    sub = str(tmp_path / "submission.csv")
    assert fashion.main(["submit", "--weights", "last", "--output", sub, "--mask-size", "64"]
                        + common) == 0
    df = pd.read_csv(sub, keep_default_na=False, dtype=str)
    assert list(df.columns) == ["ImageId", "EncodedPixels", "ClassId"]
    assert set(df.ImageId) == set(os.listdir(test_dir))         # every test image listed
    for image_id, group in df.groupby("ImageId"):
        masks = [utils.rle_decode(r, (64, 64)) for r in group.EncodedPixels if r]
        assert all(m.any() for m in masks)                      # one row per (non-empty) mask
        if masks:
            assert np.stack(masks).sum(0).max() <= 1            # no overlaps
