"""Issue 6, reliability: kill and resume, NaN through the CLI, the bad-input catalogue through
the loader, safe weight loading.

What other files already test is not repeated here: RLE errors (test_utils.test_rle_errors),
broken / 16-bit / RGBA images (test_utils), dataset errors, bad rows, duplicates, size
mismatches (test_fashion), loader skip mechanics on synthetic data (test_data), the NaN guard
and checkpoints in the library (test_model).
"""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image

from mrcnn import checkpoints as mrcnn_checkpoints
from mrcnn import utils
from mrcnn.config import Config
from samples.fashion import demo_data
from samples.fashion.dataset import DatasetError, FashionDataset

from test_data import collect_epoch
from test_fashion import _box, _write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = os.path.join(ROOT, "samples", "fashion", "fashion.py")

# FashionConfig (a folder without the demo stamp) shrunk to the cheapest network that trains:
# ResNet50 + FCN mask head at 64 px, one image per step.
KILL_CONFIG = [
    "BACKBONE=resnet50", "MIXED_PRECISION=False", "IMAGE_MIN_DIM=64", "IMAGE_MAX_DIM=64",
    "IMAGES_PER_GPU=1", "RPN_ANCHOR_SCALES=(4,8,16,32,64)", "RPN_TRAIN_ANCHORS_PER_IMAGE=32",
    "PRE_NMS_LIMIT=200", "POST_NMS_ROIS_TRAINING=32", "POST_NMS_ROIS_INFERENCE=16",
    "TRAIN_ROIS_PER_IMAGE=8", "MAX_GT_INSTANCES=4", "FPN_CLASSIF_FC_LAYERS_SIZE=32",
    "TOP_DOWN_PYRAMID_SIZE=32", "MINI_MASK_SHAPE=(14,14)", "STEPS_PER_EPOCH=2",
    "VALIDATION_STEPS=1", "LOADER_WORKERS=0",
]


def tiny_fashion_folder(root, n=6, extra_rows=(), extra_images=None):
    """An iMaterialist-format folder: n JPEGs (48-64 x 64) with two box masks each, plus
    extra_rows (ImageId, rle, H, W, ClassId) whose files extra_images {name: writer(path)}
    create. Returns the folder path."""
    folder = os.path.join(str(root), "data")
    os.makedirs(os.path.join(folder, "train"))
    os.makedirs(os.path.join(folder, "test"))
    with open(os.path.join(folder, "label_descriptions.json"), "w") as f:
        json.dump(demo_data.label_descriptions(), f)
    rows = []
    for i in range(n):
        name = "img%d.jpg" % i
        h, w = 48 + 8 * (i % 3), 64
        _write_image(os.path.join(folder, "train", name), h, w, seed=i)
        rows.append((name, utils.rle_encode(_box(h, w, 4, 4 + 3 * i, 30, 40)), h, w, str(i % 5)))
        rows.append((name, utils.rle_encode(_box(h, w, 24, 36, 46, 62)), h, w, "23"))
    for name, writer in (extra_images or {}).items():
        writer(os.path.join(folder, "train", name))
    with open(os.path.join(folder, "train.csv"), "w") as f:
        f.write("ImageId,EncodedPixels,Height,Width,ClassId\n")
        for r in list(rows) + list(extra_rows):
            f.write("%s,%s,%s,%s,%s\n" % r)
    return folder


def find_last(logs, name="fashion"):
    """MaskRCNN.find_last without building a model."""
    return mrcnn_checkpoints.find_last(logs, name)


def checkpoints(logs):
    return sorted(os.path.join(logs, d, f) for d in os.listdir(logs)
                  if os.path.isdir(os.path.join(logs, d))
                  for f in os.listdir(os.path.join(logs, d)) if f.endswith(".weights.h5"))


def run_until(argv, log_path, stop, timeout):
    """Run fashion.py with argv; SIGKILL it as soon as stop() is true (polled every 2 ms).
    Returns (killed, returncode, output)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, FASHION] + argv, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        killed = False
        try:
            while proc.poll() is None:
                if stop is not None and stop():
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    pytest.fail("fashion.py %s did not finish in %d s:\n%s"
                                % (" ".join(argv[:3]), timeout, open(log_path).read()[-3000:]))
                time.sleep(0.002)
        finally:
            if proc.poll() is None and not killed:
                proc.kill()
        proc.wait()
    return killed, proc.returncode, open(log_path).read()


# ----------------------------------------------------------------------------- kill and resume

def test_partial_checkpoint_is_never_picked(tmp_path, capsys):
    """A .tmp file (a write that was killed) and a newer unreadable file are not resumed from,
    by mrcnn.checkpoints nor by fashion.py's --weights last (which goes through it)."""
    from samples.fashion import cli
    run = tmp_path / "fashion20260101T0000"
    run.mkdir()
    good = run / "mask_rcnn_fashion_0001.weights.h5"
    with h5py.File(good, "w") as f:
        f.create_group("layers")
    (run / "mask_rcnn_fashion_0002.tmp.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)
    assert find_last(str(tmp_path)) == str(good)
    # A file cut short by something else than a kill (power loss, full disk): skipped, warned.
    (run / "mask_rcnn_fashion_0003.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    warnings = []
    assert mrcnn_checkpoints.last_good_checkpoint(str(tmp_path), "fashion",
                                                  warn=warnings.append) == str(good)
    assert len(warnings) == 1 and "mask_rcnn_fashion_0003.weights.h5" in warnings[0]
    assert cli.weights_file("last", str(tmp_path), ["fashion", "fashion_demo"]) == (
        str(good), "fashion")
    assert "not a readable weights file" in capsys.readouterr().err
    assert mrcnn_checkpoints.remove_partial_checkpoints(str(run)) == [
        "mask_rcnn_fashion_0002.tmp.weights.h5"]


@pytest.mark.slow
def test_kill_resume_and_divergence_through_the_cli(tmp_path):
    """fashion.py train SIGKILLed during a checkpoint write, then after a checkpoint, resumed
    with --weights last each time (epoch count and staged schedule continue, at most the
    running epoch is lost); the last resume diverges (huge learning rate) and stops with a
    message naming the step and the intact last checkpoint."""
    data = tiny_fashion_folder(tmp_path)
    logs = str(tmp_path / "logs")
    # From random weights: stage 1 trains all layers to epoch 2, stage 2 all layers to epoch 3.
    base = ["train", "--dataset", data, "--logs", logs, "--no-augmentation", "--head", "fcn",
            "--val-fraction", "0.34"]
    schedule = ["--heads-epochs", "2", "--all-epochs", "1"]

    def exists(suffix):
        return lambda: any(p.endswith(suffix) for p in checkpoints(logs)) \
            if os.path.isdir(logs) else False

    # 1. Killed while writing the checkpoint of epoch 2 (its .tmp file exists).
    killed, _, out = run_until(base + ["--weights", "none"] + schedule + ["--set"] + KILL_CONFIG,
                               str(tmp_path / "run1.log"), exists("_0002.tmp.weights.h5"),
                               timeout=900)
    assert killed, out[-3000:]
    names = [os.path.basename(p) for p in checkpoints(logs)]
    assert names == ["mask_rcnn_fashion_0001.weights.h5",
                     "mask_rcnn_fashion_0002.tmp.weights.h5"], names
    run_dir = os.path.dirname(checkpoints(logs)[0])
    assert find_last(logs).endswith("_0001.weights.h5")
    record = json.load(open(os.path.join(run_dir, "fashion_run.json")))
    assert record["pretrained"] is False and [s[:2] for s in record["stages"]] == [
        ["all", 2], ["all", 3]]

    # 2. Resumed (the recorded schedule: stage 1 trains all layers, as the killed run did);
    # killed as soon as the checkpoint of epoch 2 is in place.
    killed, _, out = run_until(base + ["--weights", "last", "--set"] + KILL_CONFIG,
                               str(tmp_path / "run2.log"), exists("_0002.weights.h5"),
                               timeout=900)
    assert killed, out[-3000:]
    assert "Resuming %s after epoch 1" % run_dir in out
    assert "Removed mask_rcnn_fashion_0002.tmp.weights.h5" in out
    assert "=== Stage: train all up to epoch 2" in out and "Starting at epoch 1" in out
    assert "train heads" not in out
    names = [os.path.basename(p) for p in checkpoints(logs)]
    assert names[:2] == ["mask_rcnn_fashion_0001.weights.h5", "mask_rcnn_fashion_0002.weights.h5"]
    assert all(".tmp" not in n for n in names), names   # killed before writing epoch 3

    # 3. Resumed at epoch 2 in stage 2, with a learning rate that makes the loss non-finite:
    # a message (no traceback) naming the step and the last good checkpoint, which stays.
    killed, rc, out = run_until(base + ["--weights", "last"] + schedule +
                                ["--all-lr", "1e30", "--set"] + KILL_CONFIG,
                                str(tmp_path / "run3.log"), None, timeout=900)
    assert rc == 1, out[-3000:]
    assert "Stage all already done (checkpoint at epoch 2)" in out
    assert "=== Stage: train all up to epoch 3, learning rate 1e+30" in out
    assert "Starting at epoch 2" in out
    assert "Traceback" not in out, out[-3000:]
    assert "error: training stopped:" in out and "at epoch 3, step" in out
    assert "The last good checkpoint is %s" % os.path.join(
        run_dir, "mask_rcnn_fashion_0002.weights.h5") in out
    assert "--weights last" in out
    names = [os.path.basename(p) for p in checkpoints(logs)]
    assert names == ["mask_rcnn_fashion_0001.weights.h5", "mask_rcnn_fashion_0002.weights.h5"]
    assert all(mrcnn_checkpoints.is_readable(p) for p in checkpoints(logs))


# ----------------------------------------------------------------------------- bad inputs

class CatalogueConfig(Config):
    NAME = "catalogue"
    NUM_CLASSES = 1 + 46
    IMAGES_PER_GPU = 2
    IMAGE_MIN_DIM = 64
    IMAGE_MAX_DIM = 64
    RPN_ANCHOR_SCALES = (4, 8, 16, 32, 64)
    RPN_TRAIN_ANCHORS_PER_IMAGE = 32
    MAX_GT_INSTANCES = 4
    MINI_MASK_SHAPE = (14, 14)
    LOADER_WORKERS = 2
    ON_LOAD_ERROR = "skip"


def _jpeg_bytes(h, w, seed=0):
    image = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def _writer(data=None, h=48, w=64, pil_mode=None, depth16=False):
    """A function writing one test image file to a path."""
    def write(path):
        if data is not None:
            with open(path, "wb") as f:
                f.write(data)
        elif pil_mode:
            shape = (h, w, 4) if pil_mode == "RGBA" else (h, w)
            Image.fromarray(np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8),
                            mode=pil_mode).save(path)
        elif depth16:
            cv2.imwrite(path, np.random.default_rng(2).integers(0, 65535, (h, w, 3),
                                                                dtype=np.uint16))
        else:
            _write_image(path, h, w, seed=3)
    return write


BOX = utils.rle_encode(_box(48, 64, 5, 5, 40, 50))
# name -> (file writer, RLE, (Height, Width) in train.csv, words of the skip reason)
BAD_SAMPLES = {
    "truncated.jpg": (_writer(_jpeg_bytes(48, 64)[:300]), BOX, (48, 64), "truncated"),
    "zero.jpg": (_writer(b""), BOX, (48, 64), "empty (0 bytes)"),
    "small.jpg": (_writer(h=12, w=16), BOX, (48, 64), "SizeMismatchError"),
    "large.jpg": (_writer(h=480, w=640), BOX, (48, 64), "SizeMismatchError"),
    "odd.jpg": (_writer(), "1 2 3", (48, 64), "odd number"),
    "negative.jpg": (_writer(), "-3 2", (48, 64), "start"),
    "word.jpg": (_writer(), "1 x7", (48, 64), "non-integer"),
    "past.jpg": (_writer(), "3000 100", (48, 64), "past the end"),
    "overlap.jpg": (_writer(), "1 10 5 3", (48, 64), "overlapping"),
}
GOOD_SAMPLES = {
    "gray.png": (_writer(pil_mode="L"), BOX, (48, 64)),
    "rgba.png": (_writer(pil_mode="RGBA"), BOX, (48, 64)),
    "deep.png": (_writer(depth16=True), BOX, (48, 64)),
}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    rows, images = [], {}
    for name, (write, rle, (h, w), *_) in {**BAD_SAMPLES, **GOOD_SAMPLES}.items():
        images[name] = write
        rows.append((name, rle, h, w, "1"))
    images["nomask.jpg"] = _writer()
    rows.append(("nomask.jpg", "", 48, 64, "1"))                 # only an empty EncodedPixels
    images["many.jpg"] = _writer()
    for k in range(6):                                            # > MAX_GT_INSTANCES
        rows.append(("many.jpg", utils.rle_encode(_box(48, 64, 2 + 7 * k, 2, 8 + 7 * k, 60)),
                     48, 64, str(k)))
    folder = tiny_fashion_folder(tmp_path_factory.mktemp("catalogue"), n=4, extra_rows=rows,
                                 extra_images=images)
    ds = FashionDataset().load_dataset(folder, "all")
    ds.prepare()
    return ds


def test_bad_samples_are_skipped_and_counted_by_worker_processes(catalogue, caplog):
    from mrcnn import data
    ds = catalogue
    by_name = {info["id"]: i for i, info in enumerate(ds.image_info)}
    gen = data.DataGenerator(ds, CatalogueConfig(), shuffle=False, seed=0, workers=2,
                             use_multiprocessing=True)
    with caplog.at_level("WARNING", logger="mrcnn.data"):
        batches = collect_epoch(gen, timeout=120)
    loaded = set(sum(batches, []))
    bad = {by_name[n] for n in BAD_SAMPLES}
    assert loaded.isdisjoint(bad | {by_name["nomask.jpg"]})
    # Every good image, PNG gray / RGBA / 16-bit and > MAX_GT_INSTANCES included, was used.
    assert loaded >= set(by_name.values()) - bad - {by_name["nomask.jpg"]}
    records = gen.skipped
    errors = {r["image_id"]: r["reason"] for r in records if r["kind"] == "error"}
    assert set(errors) == bad
    for name, (_, _, _, words) in BAD_SAMPLES.items():
        assert words in errors[by_name[name]], (name, errors[by_name[name]])
        assert name in errors[by_name[name]]                    # the message names the image
    assert {r["image_id"] for r in records if r["kind"] == "no_instances"} == \
        {by_name["nomask.jpg"]}
    counts = gen.skip_counts(epoch=0)
    assert counts["error"] >= len(BAD_SAMPLES) and counts["no_instances"] >= 1
    # The end-of-epoch summary (what a training run prints).
    assert "epoch 0: %d sample(s) skipped" % counts["total"] in caplog.text


def test_strict_mode_fails_on_the_first_bad_sample_without_hanging(catalogue):
    from mrcnn import data
    from samples.fashion import cli, configs
    config = CatalogueConfig().override({"ON_LOAD_ERROR": "raise"})
    gen = data.DataGenerator(catalogue, config, shuffle=False, seed=0, workers=2,
                             use_multiprocessing=True)
    with pytest.raises(data.SampleLoadError, match=r"could not load .*train"):
        collect_epoch(gen, timeout=120)
    # --strict is what selects "raise" in the CLI, whose message says how to skip instead.
    assert configs.make_config(demo=False, strict=True).ON_LOAD_ERROR == "raise"
    assert configs.make_config(demo=False).ON_LOAD_ERROR == "skip"
    message = cli.error_message(data.SampleLoadError("could not load image 3"))
    assert "could not load image 3" in message and "--strict" in message


def _bright_box_image(h, w, box, fill=230):
    image = np.full((h, w, 3), 20, np.uint8)
    y1, x1, y2, x2 = box
    image[y1:y2, x1:x2] = fill
    return image


def test_formats_and_exif_orientation_keep_masks_aligned(tmp_path):
    """PNG gray / RGBA / 16-bit and an EXIF-rotated JPEG: the image is read in stored pixel
    order (EXIF orientation ignored), which is the order of train.csv's Height/Width and RLE,
    so masks stay on the pixels they annotate (also through the reduced-scale decode)."""
    from mrcnn import data
    h, w, box = 128, 160, (20, 30, 90, 70)          # not square, not symmetric
    image = _bright_box_image(h, w, box)
    folder = tmp_path / "fmt"
    (folder / "train").mkdir(parents=True)
    Image.fromarray(image[..., 0], mode="L").save(folder / "train" / "gray.png")
    Image.fromarray(np.dstack([image, np.full((h, w), 128, np.uint8)]), mode="RGBA").save(
        folder / "train" / "rgba.png")
    cv2.imwrite(str(folder / "train" / "deep.png"), image.astype(np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6                                # "rotate 90 CW to display"
    Image.fromarray(image).save(folder / "train" / "exif.jpg", exif=exif, quality=95)
    with Image.open(folder / "train" / "exif.jpg") as im:     # viewers would show it rotated
        from PIL import ImageOps
        assert ImageOps.exif_transpose(im).size == (h, w)     # (width, height) = (128, 160)
    (folder / "label_descriptions.json").write_text(json.dumps(demo_data.label_descriptions()))
    rle = utils.rle_encode(_box(h, w, *box))
    names = ["gray.png", "rgba.png", "deep.png", "exif.jpg"]
    (folder / "train.csv").write_text("ImageId,EncodedPixels,Height,Width,ClassId\n" + "".join(
        "%s,%s,%d,%d,4\n" % (n, rle, h, w) for n in names))
    ds = FashionDataset().load_dataset(str(folder), "all")
    ds.prepare()
    for max_dim in (128, 64):                        # 64: decoded at 1/2 scale
        config = CatalogueConfig().override({"IMAGE_MIN_DIM": max_dim, "IMAGE_MAX_DIM": max_dim,
                                             "USE_MINI_MASK": False})
        for i, info in enumerate(ds.image_info):
            img, meta, class_ids, boxes, masks = data.load_image_gt(ds, config, i)
            assert class_ids.tolist() == [5] and masks.shape[-1] == 1, info["id"]
            gray = img.mean(axis=2)
            inside = gray[masks[..., 0]]
            # The bright box is exactly under the mask (borders blur a little when scaled).
            assert np.median(inside) > 200 and np.mean(inside > 128) > 0.95, info["id"]
            window = data.parse_image_meta(meta[None])["window"][0].astype(int)
            y1, x1, y2, x2 = window
            border = np.mean(gray[y1:y2, x1:x2][~masks[y1:y2, x1:x2, 0]] > 128)
            assert border < 0.05, (info["id"], border)
            assert tuple(meta[1:3].astype(int)) == (h, w), info["id"]


@pytest.mark.parametrize("image_id", ["a\\b.jpg", "..", "x/../../etc/passwd", "/etc/passwd",
                                      "~root.jpg"])
def test_image_ids_that_could_leave_the_folder_are_rejected(tmp_path, image_id):
    folder = tiny_fashion_folder(tmp_path, n=1, extra_rows=[(image_id, "1 2", 48, 64, "1")])
    with pytest.raises(DatasetError, match="not a plain file name"):
        FashionDataset().load_dataset(folder, "all")


def test_fashionpedia_file_names_that_could_leave_the_folder_are_rejected(tmp_path):
    labels = demo_data.label_descriptions()
    path = tmp_path / "fp.json"
    path.write_text(json.dumps({
        "categories": labels["categories"], "attributes": labels["attributes"],
        "images": [{"id": 1, "file_name": "../outside.jpg", "height": 4, "width": 4}],
        "annotations": []}))
    with pytest.raises(DatasetError, match="not a plain file name"):
        FashionDataset().load_dataset(None, "all", annotations=str(path))


# ----------------------------------------------------------------------------- weights files

def test_weights_of_another_architecture_or_holding_a_pickle_are_refused(tmp_path, capsys):
    """A weights file with a layer of another shape (another architecture) and a layer whose
    "weights" are a pickled object: refused with one message naming both, and the pickle is
    never unpickled (h5py reads it as opaque bytes; unpickling it would create `marker`)."""
    from mrcnn.model import read_weights_file
    from samples.fashion import fashion
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    path = str(tmp_path / "other.h5")
    with h5py.File(path, "w") as f:
        layers = {"conv1": np.zeros((3, 3, 3, 32), np.float32),          # ResNet's is 7x7x3x64
                  "res2a_branch2a": np.void(pickle.dumps(Payload()))}
        for name, value in layers.items():
            g = f.create_group(name)
            g.create_dataset("%s/kernel:0" % name, data=value)
            g.attrs["weight_names"] = [("%s/kernel:0" % name).encode()]
        f.attrs["layer_names"] = [n.encode() for n in layers]
    stored = read_weights_file(path)
    assert stored["res2a_branch2a"][0].dtype.kind == "V" and not marker.exists()

    data = tiny_fashion_folder(tmp_path, n=3)
    inference = [s for s in KILL_CONFIG if not s.startswith(("STEPS", "VALIDATION"))]
    rc = fashion.main(["evaluate", "--dataset", data, "--weights", path, "--logs",
                       str(tmp_path / "logs"), "--head", "fcn", "--val-fraction", "0.34",
                       "--set"] + inference)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "other.h5 does not fit 2 layer(s)" in err and "'conv1'" in err \
        and "'res2a_branch2a'" in err and "--exclude" in err
    assert not marker.exists()


def test_no_code_runs_when_loading_weights():
    """The loading code reads arrays with h5py only: no pickle, no keras.models.load_model
    (whose safe_mode would matter), no numpy allow_pickle."""
    import re
    sources = [os.path.join(ROOT, p) for p in (
        "mrcnn/model.py", "mrcnn/weights.py", "mrcnn/pretrained.py", "mrcnn/checkpoints.py",
        "mrcnn/utils.py", "mrcnn/data.py", "samples/fashion/weights.py",
        "samples/fashion/fashion.py", "samples/fashion/cli.py", "samples/fashion/configs.py",
        "samples/fashion/dataset.py")]
    for path in sources:
        code = "\n".join(line.split("#")[0] for line in open(path, encoding="utf-8"))
        for pattern in (r"\bimport pickle\b", r"\bpickle\.load", r"load_model\(",
                        r"allow_pickle\s*=\s*True", r"safe_mode\s*=\s*False", r"\bnp\.load\(",
                        r"\beval\(", r"\bexec\("):
            assert not re.search(pattern, code), (path, pattern)


def test_a_failed_state_write_stops_training_and_keeps_the_previous_state(tmp_path,
                                                                           monkeypatch):
    """A training state that cannot be written (disk full) stops training with a message
    naming the file and the intact previous state; no partial file is left."""
    import errno

    from synthetic import shapes_config, shapes_dataset

    from mrcnn import checkpoints, training_state
    from mrcnn.model import MaskRCNN
    config = shapes_config(STEPS_PER_EPOCH=4, CHECKPOINT_EVERY_STEPS=2, VALIDATION_STEPS=1)
    model = MaskRCNN("training", config, str(tmp_path))
    real = training_state._store
    calls = []

    def fill_disk(group, variables):
        # The second state's data: the disk is full halfway through its partial file.
        calls.append(group.name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(group, variables)

    monkeypatch.setattr(training_state, "_store", fill_disk)
    with pytest.raises(training_state.TrainingStateError) as info:
        model.train(shapes_dataset(4, seed=1), shapes_dataset(2, seed=2), learning_rate=0.01,
                    epochs=2, layers="heads")
    message = str(info.value)
    assert "training_state_000000004.h5" in message and "No space left" in message
    states = checkpoints.list_states(model.log_dir)
    assert [checkpoints.state_step(s) for s in states] == [2]
    assert "the previous state %s is intact" % states[0] in message
    assert training_state.read_position(states[0])["global_step"] == 2
    assert not [f for f in os.listdir(model.log_dir) if checkpoints.is_partial(f)]
