"""Issue 13, item 4: evaluation during training (mrcnn.training.EvaluationCallback).

COCO AP / AP@0.5 and the competition metric every N epochs on a fixed validation subset, in
`history`, the output and TensorBoard (scalars and an image of detections); the best
checkpoint (mask_rcnn_<name>_best.weights.h5: kept when the metric improves, loadable, never
found by find_last); config.EVAL_* and fashion.py train --eval-every / --eval-limit /
--keep-best, then --weights best.
"""

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import tensorflow as tf

from synthetic import shapes_config, shapes_dataset

from mrcnn import checkpoints, training
from mrcnn.config import EVAL_METRICS, ConfigError
from mrcnn.model import MaskRCNN
from mrcnn.training import EvaluationCallback
from mrcnn.weights import read_weights_file
from samples.fashion import cli, fashion

from test_reliability import KILL_CONFIG, tiny_fashion_folder

VAL_KEYS = ["val_" + name for name in EVAL_METRICS]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _events(folder):
    """{tag: [(step, value)]} of the TensorBoard event files in folder (values: numpy)."""
    found = {}
    for name in sorted(os.listdir(folder)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append(
                    (event.step, tf.make_ndarray(value.tensor)))
    return found


def _fake_metrics(monkeypatch, values, name="segm_AP"):
    """Make evaluation_metrics return `values` of `name` in turn (the others 0.0)."""
    sequence = iter(values)

    def fake(dataset, image_ids, detections, coco_gt=None):
        assert len(detections) == len(image_ids)
        return dict({m: 0.0 for m in EVAL_METRICS}, **{name: next(sequence)})

    monkeypatch.setattr(training, "evaluation_metrics", fake)


# ----------------------------------------------------------------------------- configuration

def test_config_values_are_checked():
    config = shapes_config()
    assert (config.EVAL_EVERY_EPOCHS, config.EVAL_LIMIT, config.EVAL_KEEP_BEST) == (0, 50, None)
    config.override(["EVAL_EVERY_EPOCHS=2", "EVAL_KEEP_BEST=competition", "EVAL_LIMIT=0"])
    assert (config.EVAL_EVERY_EPOCHS, config.EVAL_KEEP_BEST) == (2, "competition")
    with pytest.raises(ConfigError, match="EVAL_KEEP_BEST must be None or one of"):
        shapes_config(EVAL_EVERY_EPOCHS=1, EVAL_KEEP_BEST="mask_AP")
    with pytest.raises(ConfigError, match="needs evaluation during training"):
        shapes_config(EVAL_KEEP_BEST="segm_AP")
    with pytest.raises(ConfigError, match=">= 0"):
        shapes_config(EVAL_EVERY_EPOCHS=-1)
    # The callback: explicit arguments win over the configuration; they are checked too.
    fake = types.SimpleNamespace(config=shapes_config(EVAL_LIMIT=2))
    callback = EvaluationCallback(fake, shapes_dataset(3))
    assert (callback.every, callback.image_ids, callback.keep_best) == (1, [0, 1], None)
    with pytest.raises(ValueError, match="keep_best must be one of"):
        EvaluationCallback(fake, shapes_dataset(3), keep_best="AP")
    assert training.evaluation_callbacks(fake, shapes_dataset(3)) == []


# ----------------------------------------------------------------------------- checkpoint names

def test_best_checkpoint_is_not_an_epoch_checkpoint(tmp_path):
    old, new = tmp_path / "shapes20260101T0000", tmp_path / "shapes20260201T0000"
    for folder in (old, new):
        folder.mkdir()
        for epoch in (1, 2):
            open(checkpoints.checkpoint_path(str(folder), "shapes", epoch), "w").close()
    best = checkpoints.best_checkpoint_path(str(old), "shapes")
    assert os.path.basename(best) == "mask_rcnn_shapes_best.weights.h5"
    import h5py
    with h5py.File(best, "w") as f:
        f.create_group("layers")
        f.attrs.update(checkpoints.checkpoint_attributes(epoch=1, best_metric="segm_AP",
                                                         best_value=0.5))
    assert checkpoints.checkpoint_epoch(best) is None and checkpoints.is_best_checkpoint(best)
    assert checkpoints.list_checkpoints(str(old)) == [
        checkpoints.checkpoint_path(str(old), "shapes", e) for e in (1, 2)]
    assert best not in checkpoints.all_checkpoints(str(tmp_path), "shapes")
    assert checkpoints.find_last(str(tmp_path), "shapes") == checkpoints.checkpoint_path(
        str(new), "shapes", 2)
    # find_best: the newest run that kept one; the epoch comes from its attributes.
    assert checkpoints.find_best(str(tmp_path), "shapes") == best
    assert checkpoints.parse_checkpoint_path(best)[1] == 1
    assert checkpoints.checkpoint_attrs(best) == {"epoch": 1, "best_metric": "segm_AP",
                                                  "best_value": 0.5}
    with pytest.raises(FileNotFoundError, match="no best checkpoint of 'other'"):
        checkpoints.find_best(str(tmp_path), "other")
    # A partial write of the best file is a partial file like the others.
    partial = checkpoints.partial_path(best)
    open(partial, "w").close()
    assert checkpoints.remove_partial_checkpoints(str(old)) == [os.path.basename(partial)]
    # --weights best on the command line.
    cli.check_weights_spec("best")
    assert cli.weights_file("best", str(tmp_path), ["shapes", "fashion"]) == (best, "shapes")
    with pytest.raises(FileNotFoundError, match="--weights best: no best checkpoint.*"
                                                "--keep-best"):
        cli.weights_file("best", str(tmp_path), ["fashion"])


# ----------------------------------------------------------------------------- the callback

def test_chief_only_evaluates_and_writes(tmp_path, monkeypatch):
    """Under a MultiWorkerMirroredStrategy the other workers do nothing; the chief logs,
    prints and writes TensorBoard (detections stubbed: no model here)."""
    val = shapes_dataset(2)
    fake = types.SimpleNamespace(config=shapes_config(), strategy=tf.distribute.get_strategy(),
                                 log_dir=str(tmp_path))
    callback = EvaluationCallback(fake, val, every=2, images=2)
    empty = {"rois": np.zeros((0, 4)), "class_ids": np.zeros(0, int), "scores": np.zeros(0),
             "masks": np.zeros((128, 128, 0), bool)}
    monkeypatch.setattr(callback, "evaluate",
                        lambda: ({m: 0.5 for m in EVAL_METRICS}, [empty, empty]))
    monkeypatch.setattr(training, "worker_info", lambda strategy: (2, 1, False))
    logs = {"loss": 1.0}
    callback.on_epoch_end(1, logs)
    assert logs == {"loss": 1.0} and not os.listdir(tmp_path)
    monkeypatch.setattr(training, "worker_info", lambda strategy: (2, 0, True))
    callback.on_epoch_end(0, logs)                        # not an evaluation epoch
    assert logs == {"loss": 1.0}
    callback.on_epoch_end(1, logs)
    callback.on_train_end()
    assert logs == dict({"loss": 1.0}, **{k: 0.5 for k in VAL_KEYS})
    assert callback.evaluations == [dict({m: 0.5 for m in EVAL_METRICS}, epoch=2)]
    events = _events(str(tmp_path / training.EVAL_TENSORBOARD_DIR))
    assert set(events) == set(VAL_KEYS) | {training.EVAL_IMAGE_TAG}
    # A non-finite loss (NaNGuard stops the run): nothing is evaluated.
    logs = {"loss": float("nan")}
    callback.on_epoch_end(3, logs)
    assert list(logs) == ["loss"]


def test_config_evaluates_every_n_epochs_into_history_tensorboard_and_output(tmp_path, capsys):
    """EVAL_EVERY_EPOCHS=2 over 3 epochs: MaskRCNN.train adds the callback itself; the
    metrics of the real evaluation are in history at epoch 2 only, printed once, and in
    TensorBoard at Keras' epoch index 1 with an image of the detections."""
    config = shapes_config(STEPS_PER_EPOCH=1, VALIDATION_STEPS=1, EVAL_EVERY_EPOCHS=2,
                           EVAL_LIMIT=2)
    model = MaskRCNN("training", config, str(tmp_path))
    history = model.train(shapes_dataset(3), shapes_dataset(3, seed=1), learning_rate=0.001,
                          epochs=3, layers="heads")
    assert len(history.history["loss"]) == 3
    for key in VAL_KEYS:
        assert len(history.history[key]) == 1, key
        assert -1 <= history.history[key][0] <= 1, key
    out = capsys.readouterr().out
    assert out.count("Evaluation after epoch") == 1
    assert "Evaluation after epoch 2 (2 validation images" in out and "val_segm_AP: " in out
    events = _events(os.path.join(model.log_dir, training.EVAL_TENSORBOARD_DIR))
    assert set(events) == set(VAL_KEYS) | {training.EVAL_IMAGE_TAG}
    for key in VAL_KEYS:
        assert [(step, float(v)) for step, v in events[key]] == [
            (1, pytest.approx(history.history[key][0]))]
    [(step, image)] = events[training.EVAL_IMAGE_TAG]
    # An image summary: width, height, then one PNG per image (two: the limit).
    assert step == 1 and len(image) == 2 + 2 and image[2].startswith(b"\x89PNG")
    assert int(image[0]) == int(image[1]) == 128
    # The inference model made no run folder; no best checkpoint without EVAL_KEEP_BEST.
    assert os.listdir(tmp_path) == [os.path.basename(model.log_dir)]
    assert not os.path.exists(checkpoints.best_checkpoint_path(model.log_dir, "shapes"))


def test_best_checkpoint_is_kept_when_the_metric_improves(tmp_path, monkeypatch, capsys):
    """segm_AP 0.1, 0.3, 0.2: the best is the state after epoch 2, not overwritten at 3; it
    records epoch, metric and value, loads into both modes, resumes its run, and a new
    callback of a resumed run starts from the value it records."""
    _fake_metrics(monkeypatch, [0.1, 0.3, 0.2, 0.25])
    config = shapes_config(STEPS_PER_EPOCH=1, VALIDATION_STEPS=1)
    train, val = shapes_dataset(3), shapes_dataset(2, seed=1)
    model = MaskRCNN("training", config, str(tmp_path))
    callback = EvaluationCallback(model, val, every=1, limit=1, keep_best="segm_AP", images=1)
    history = model.train(train, val, learning_rate=0.01, epochs=3, layers="heads",
                          custom_callbacks=[callback])
    assert history.history["val_segm_AP"] == [0.1, 0.3, 0.2]
    out = capsys.readouterr().out
    assert out.count("best segm_AP, kept in mask_rcnn_shapes_best.weights.h5") == 2
    assert "best segm_AP 0.3000 (epoch 2)" in out

    best = checkpoints.best_checkpoint_path(model.log_dir, "shapes")
    recorded = checkpoints.checkpoint_attrs(best)
    assert recorded["epoch"] == 2 and recorded["best_metric"] == "segm_AP"
    assert recorded["best_value"] == pytest.approx(0.3)
    assert (recorded["mask_head"], recorded["num_classes"]) == ("fcn", 4)
    stored = read_weights_file(best)
    second = read_weights_file(checkpoints.checkpoint_path(model.log_dir, "shapes", 2))
    third = read_weights_file(checkpoints.checkpoint_path(model.log_dir, "shapes", 3))
    assert set(stored) == set(second)
    for name in stored:
        for a, b in zip(stored[name], second[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)
    assert any(not np.array_equal(a, b) for name in stored
               for a, b in zip(stored[name], third[name]))
    # Ignored by find_last and list_checkpoints; found by find_best.
    assert model.find_last() == checkpoints.checkpoint_path(model.log_dir, "shapes", 3)
    assert [checkpoints.checkpoint_epoch(p) for p in checkpoints.list_checkpoints(
        model.log_dir)] == [1, 2, 3]
    assert checkpoints.find_best(str(tmp_path), "shapes") == best

    # Loads in inference mode (the callback's inference model) ...
    twin = training.inference_twin(model)
    assert twin.config.BATCH_SIZE == 1 and twin.load_weights(best) > 0
    # ... and in training mode, continuing its run after epoch 2.
    model.load_weights(best)
    assert model.epoch == 2 and model.log_dir == os.path.dirname(best)
    again = EvaluationCallback(model, val, every=1, limit=1, keep_best="segm_AP", images=0)
    history = model.train(train, val, learning_rate=0.01, epochs=3, layers="heads",
                          custom_callbacks=[again])
    assert history.history["val_segm_AP"] == [0.25]
    assert again.best == {"path": best, "value": pytest.approx(0.3), "epoch": 2}
    assert checkpoints.checkpoint_attrs(best)["epoch"] == 2


WORKER_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    out, index = sys.argv[1], int(sys.argv[2])
    from synthetic import shapes_config, shapes_dataset
    from mrcnn.distribute import is_multi_worker
    from mrcnn.model import MaskRCNN
    config = shapes_config(STEPS_PER_EPOCH=2, VALIDATION_STEPS=1, LOADER_WORKERS=0,
                           EVAL_EVERY_EPOCHS=1, EVAL_LIMIT=2, EVAL_KEEP_BEST="competition")
    model = MaskRCNN("training", config, os.path.join(out, "logs%d" % index))
    print("MULTI_WORKER", is_multi_worker(model.strategy), flush=True)
    history = model.train(shapes_dataset(4), shapes_dataset(2, seed=1), learning_rate=0.001,
                          epochs=2, layers="heads")
    print("HISTORY", json.dumps(sorted(history.history)))
    print("TF_CONFIG_KEPT", "TF_CONFIG" in os.environ)
""")


@pytest.mark.slow
def test_two_workers_only_the_chief_evaluates(tmp_path):
    """Two processes, TF_CONFIG naming both (MultiWorkerMirroredStrategy): both finish (the
    chief's inference model is built outside the cluster's strategy: nothing waits on the
    other worker); only the chief's history has the metrics, only it printed them and wrote
    the evaluation logs and the best checkpoint."""
    with open(tmp_path / "worker.py", "w") as f:
        f.write(WORKER_SCRIPT.format(root=ROOT, tests=TESTS))
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(("localhost", 0))
    cluster = {"worker": ["localhost:%d" % s.getsockname()[1] for s in sockets]}
    for s in sockets:
        s.close()
    procs, outputs = [], []
    for i in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": i}}))
        outputs.append(open(tmp_path / ("out%d.txt" % i), "w+"))
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"),
                                       str(tmp_path), str(i)], env=env, stdout=outputs[i],
                                      stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = []
    for f in outputs:
        f.seek(0)
        logs.append(f.read())
        f.close()
    for i, p in enumerate(procs):
        assert p.returncode == 0, "worker %d:\n%s" % (i, logs[i][-4000:])
        assert "MULTI_WORKER True" in logs[i]
        assert "TF_CONFIG_KEPT True" in logs[i]
    keys = [json.loads(line.split(" ", 1)[1]) for log in logs for line in log.splitlines()
            if line.startswith("HISTORY ")]
    assert set(VAL_KEYS) <= set(keys[0]) and not set(VAL_KEYS) & set(keys[1])
    assert logs[0].count("Evaluation after epoch") == 2 and "Evaluation" not in logs[1]
    (run,) = os.listdir(tmp_path / "logs0")
    files = os.listdir(tmp_path / "logs0" / run)
    assert training.EVAL_TENSORBOARD_DIR in files and "mask_rcnn_shapes_best.weights.h5" in files
    assert not os.path.exists(tmp_path / "logs1")


# ----------------------------------------------------------------------------- command line

@pytest.mark.slow
def test_cli_train_keeps_the_best_and_evaluate_loads_it(tmp_path):
    """fashion.py train --eval-every 1 --eval-limit 2 --keep-best segm_AP, then evaluate
    --weights best and train --weights best (resumes the best's run after its epoch)."""
    data = tiny_fashion_folder(tmp_path)
    logs = str(tmp_path / "logs")
    common = ["--dataset", data, "--logs", logs, "--val-fraction", "0.34"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = fashion.main(["train", "--weights", "none", "--all-epochs", "2", "--head", "fcn",
                           "--no-augmentation", "--eval-every", "1", "--eval-limit", "2",
                           "--keep-best", "segm_AP"] + common + ["--set"] + KILL_CONFIG)
    text = out.getvalue()
    assert rc == 0, text[-3000:]
    assert text.count("Evaluation after epoch") == 2, text[-3000:]
    assert "Evaluation after epoch 1 (2 validation images" in text
    assert "\r" not in text and "\x1b" not in text
    assert re.search(r"^2/2 - .*val_loss.*val_segm_AP: ", text, re.M)   # Keras' epoch line
    best = checkpoints.find_best(logs, "fashion")
    run = os.path.dirname(best)
    assert "Best checkpoint:     %s (segm_AP " % best in text
    recorded = checkpoints.checkpoint_attrs(best)
    assert recorded["best_metric"] == "segm_AP" and recorded["epoch"] in (1, 2)
    values = json.load(open(os.path.join(run, "config.json")))
    assert (values["EVAL_EVERY_EPOCHS"], values["EVAL_LIMIT"], values["EVAL_KEEP_BEST"]) == (
        1, 2, "segm_AP")
    assert os.path.isdir(os.path.join(run, training.EVAL_TENSORBOARD_DIR))
    assert checkpoints.find_last(logs, "fashion") == checkpoints.checkpoint_path(
        run, "fashion", 2)

    result = str(tmp_path / "eval.json")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = fashion.main(["evaluate", "--weights", "best", "--output", result] + common)
    assert rc == 0, out.getvalue()[-3000:]
    assert "recorded with the checkpoint" in out.getvalue()
    assert json.load(open(result))["weights"] == best

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = fashion.main(["train", "--weights", "best"] + common + ["--set"] + KILL_CONFIG)
    assert rc == 0, out.getvalue()[-3000:]
    assert "Resuming %s after epoch %d" % (run, recorded["epoch"]) in out.getvalue()


def test_cli_keep_best_needs_eval_every(tmp_path, capsys):
    data = tiny_fashion_folder(tmp_path)
    args = fashion.build_parser().parse_args(["train", "--keep-best", "bbox_AP50"])
    config = fashion.make_config(True)
    with pytest.raises(ConfigError, match="--keep-best needs .* --eval-every"):
        cli.apply_evaluation_options(config, args)
    assert fashion.main(["train", "--dataset", data, "--logs", str(tmp_path / "logs"),
                         "--keep-best", "segm_AP", "--weights", "none"]) == 1
    assert "--keep-best needs evaluation during training" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fashion.build_parser().parse_args(["train", "--keep-best", "mask_AP"])
