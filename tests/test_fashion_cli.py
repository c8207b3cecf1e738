"""Issue 11: the fashion command line's conventions and the configuration a run records.

Repeated --set, --head from the mask-head registry, the configuration recorded in a run folder
used by evaluate / detect / export with `--weights last` alone (and --set winning over it),
error messages with hints, readable progress in a log file, quiet start-up, and every user of
checkpoint names going through mrcnn.checkpoints.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import types

import h5py
import numpy as np
import pytest

from mrcnn import checkpoints
from mrcnn.errors import MrcnnError
from samples.fashion import cli, configs, demo_data, fashion

from test_reliability import KILL_CONFIG, tiny_fashion_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = os.path.join(ROOT, "samples", "fashion", "fashion.py")
COMMANDS = ("train", "evaluate", "detect", "submit", "export", "tune")


def _parse(*argv):
    return fashion.build_parser().parse_args(list(argv))


def _command_argv(command):
    """The required arguments of each command."""
    return {"train": [], "evaluate": ["--weights", "none"],
            "detect": ["--weights", "none", "--image", "x.jpg"],
            "submit": ["--weights", "none"],
            "export": ["--weights", "none", "--output", "out"],
            "tune": ["--weights", "none"]}[command]


def _readable_checkpoint(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_group("layers")
    return str(path)


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("command", COMMANDS)
def test_repeated_set_applies_every_assignment(command):
    args = _parse(command, *_command_argv(command), "--set", "IMAGE_MAX_DIM=256",
                  "--set", "IMAGE_MIN_DIM=256", "DETECTION_MIN_CONFIDENCE=0.5")
    assert args.set == ["IMAGE_MAX_DIM=256", "IMAGE_MIN_DIM=256", "DETECTION_MIN_CONFIDENCE=0.5"]
    config = configs.make_config(demo=True, overrides=args.set)
    assert (config.IMAGE_MAX_DIM, config.IMAGE_MIN_DIM, config.DETECTION_MIN_CONFIDENCE) == (
        256, 256, 0.5)
    assert _parse(command, *_command_argv(command)).set == []     # no shared default list


def test_head_choices_are_the_mask_head_registry(monkeypatch, capsys):
    from mrcnn.heads import MASK_HEADS
    monkeypatch.setitem(MASK_HEADS, "test_head", MASK_HEADS["fcn"])
    parser = fashion.build_parser()
    subparsers = [a for a in parser._actions if isinstance(a.choices, dict)][0].choices
    assert sorted(subparsers) == sorted(COMMANDS)
    for command, sub in subparsers.items():
        head = [a for a in sub._actions if "--head" in a.option_strings][0]
        assert list(head.choices) == sorted(MASK_HEADS), command
        assert parser.parse_args([command, *_command_argv(command), "--head",
                                  "test_head"]).head == "test_head"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--head", "nosuch"])
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the recorded configuration

def test_recorded_configuration_round_trip(tmp_path, capsys):
    """What a run records rebuilds the same configuration (then inference settings, --head
    and --set on top); unknown names are skipped with a warning, bad files named."""
    for demo in (True, False):
        config = configs.make_config(demo, head="fcn", overrides=["IMAGES_PER_GPU=3",
                                                                  "IMAGE_MAX_DIM=512"])
        run = tmp_path / ("demo" if demo else "real")
        path = configs.write_run_config(str(run), config)
        assert os.path.basename(path) == configs.CONFIG_FILE
        recorded = configs.read_run_config(str(run))
        assert recorded.name == config.NAME
        # Rebuilt from the other class: the recorded values decide, not the class.
        again = configs.make_config(not demo, recorded=recorded)
        assert configs.config_values(again) == configs.config_values(config)
        inference = configs.make_config(not demo, inference=True, recorded=recorded,
                                        head="unet", overrides=["DETECTION_MIN_CONFIDENCE=0.2"])
        assert (inference.IMAGES_PER_GPU, inference.GPU_COUNT, inference.BATCH_SIZE) == (1, 1, 1)
        assert (inference.MASK_HEAD, inference.DETECTION_MIN_CONFIDENCE) == ("unet", 0.2)
        assert inference.IMAGE_MAX_DIM == 512 and inference.NAME == config.NAME
        np.testing.assert_array_equal(inference.MEAN_PIXEL, config.MEAN_PIXEL)
    assert configs.read_run_config(str(tmp_path / "none")) is None

    values = json.load(open(tmp_path / "real" / configs.CONFIG_FILE))
    values["SOME_FUTURE_KNOB"] = 1
    (tmp_path / "real" / configs.CONFIG_FILE).write_text(json.dumps(values))
    configs.make_config(False, recorded=configs.read_run_config(str(tmp_path / "real")))
    assert "SOME_FUTURE_KNOB" in capsys.readouterr().err
    values["IMAGE_MAX_DIM"] = "big"
    (tmp_path / "real" / configs.CONFIG_FILE).write_text(json.dumps(values))
    with pytest.raises(configs.ConfigError, match=r"recorded in .*real.config\.json: IMAGE_MAX"):
        configs.make_config(False, recorded=configs.read_run_config(str(tmp_path / "real")))
    (tmp_path / "real" / configs.CONFIG_FILE).write_text("{not json")
    with pytest.raises(configs.ConfigError, match=r"real.config\.json.*fix or delete"):
        configs.read_run_config(str(tmp_path / "real"))


def test_weights_last_is_the_newest_run_of_any_configuration(tmp_path):
    logs = str(tmp_path)
    real = _readable_checkpoint(checkpoints.checkpoint_path(
        checkpoints.run_dir(logs, "fashion", _stamp(2024, 5)), "fashion", 3))
    assert cli.weights_file("last", logs, ["fashion", "fashion_demo"]) == (real, "fashion")
    demo = _readable_checkpoint(checkpoints.checkpoint_path(
        checkpoints.run_dir(logs, "fashion_demo", _stamp(2024, 6)), "fashion_demo", 1))
    assert cli.weights_file("last", logs, ["fashion", "fashion_demo"]) == (demo, "fashion_demo")
    assert cli.weights_file("last", logs, ["fashion"]) == (real, "fashion")
    assert cli.weights_file("none", logs, ["fashion"]) == (None, None)
    assert cli.weights_file(real, logs, ["other"]) == (real, None)
    with pytest.raises(FileNotFoundError, match="no checkpoint of 'other' or 'x' in"):
        cli.weights_file("last", logs, ["x", "other"])
    # A run recorded under another NAME (--set NAME=...) is a candidate too.
    other = checkpoints.run_dir(logs, "mine", _stamp(2024, 7))
    configs.write_run_config(other, configs.make_config(False, overrides=["NAME=mine"]))
    assert configs.recorded_names(logs) == {"mine"}
    path = _readable_checkpoint(checkpoints.checkpoint_path(other, "mine", 2))
    args = _parse("export", "--weights", "last", "--logs", logs, "--output", "x")
    config, found, _ = fashion.command_config(args, True, "last", inference=True)
    assert found == path and config.NAME == "mine" and config.BACKBONE == "resnet101"


def _stamp(year, month):
    import datetime
    return datetime.datetime(year, month, 1, 12, 0)


def test_train_turns_the_input_std_off_for_weights_trained_without_it(tmp_path, monkeypatch,
                                                                      capsys):
    """DemoConfig divides the input by PIXEL_STD (from random weights); ImageNet, COCO or a
    matterport-style file expect it undivided, so `train` turns it off for them, unless --set
    gives it; a run of this project keeps what it recorded."""
    from samples.fashion import weights as W
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    logs = ["--logs", str(tmp_path / "logs")]
    demo_std = configs.DemoConfig.PIXEL_STD
    assert demo_std is not None

    def train_config(*argv, demo=True):
        return fashion.train_config(_parse("train", *(logs + list(argv))), demo)

    config, path, weights = train_config()      # nothing cached: from random weights
    assert (weights, path) == ("none", None) and config.PIXEL_STD == demo_std
    assert "no ImageNet weights cached" in capsys.readouterr().out
    assert train_config("--weights", "none")[0].PIXEL_STD == demo_std
    models = tmp_path / "keras" / "models"
    models.mkdir(parents=True)
    (models / W.IMAGENET_FILES["resnet50"]).write_bytes(b"")
    config, _, weights = train_config()         # the demo's default: ImageNet, now cached
    assert weights == "imagenet" and config.PIXEL_STD is None
    assert "PIXEL_STD (58.4, 57.1, 57.4) off" in capsys.readouterr().out
    assert train_config("--weights", "coco")[0].PIXEL_STD is None
    foreign = tmp_path / "matterport_style.h5"  # no run folder: not trained by this project
    foreign.write_bytes(b"")
    assert train_config("--weights", str(foreign))[0].PIXEL_STD is None
    kept = train_config("--weights", "coco", "--set", "PIXEL_STD=(50, 60, 70)")[0]
    assert kept.PIXEL_STD == (50, 60, 70)
    # A checkpoint of a run recorded with PIXEL_STD: the recorded value stays.
    run = tmp_path / "logs" / "fashion_demo20261202T1200"
    run.mkdir(parents=True)
    configs.write_run_config(str(run), configs.make_config(True))
    checkpoint = run / ("mask_rcnn_fashion_demo_0001" + checkpoints.CHECKPOINT_SUFFIX)
    checkpoint.write_bytes(b"")
    config, path, weights = train_config("--weights", str(checkpoint))
    assert path == str(checkpoint) and config.PIXEL_STD == demo_std
    # The real-data configuration has none to turn off.
    assert train_config("--weights", "coco", demo=False)[0].PIXEL_STD is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """fashion.py train on a dataset folder (FashionConfig shrunk by KILL_CONFIG, FCN head):
    one epoch of two steps, its output captured as in a log file (not a terminal)."""
    root = tmp_path_factory.mktemp("trained")
    data = tiny_fashion_folder(root)
    logs = str(root / "logs")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = fashion.main(["train", "--dataset", data, "--logs", logs, "--weights", "none",
                           "--all-epochs", "1", "--head", "fcn", "--no-augmentation",
                           "--val-fraction", "0.34", "--set"] + KILL_CONFIG)
    assert rc == 0, out.getvalue()[-3000:]
    return types.SimpleNamespace(root=root, data=data, logs=logs, output=out.getvalue())


def test_training_records_its_configuration_and_logs_plain_progress(trained):
    last = checkpoints.find_last(trained.logs, "fashion")
    recorded = configs.read_run_config(os.path.dirname(last))
    expected = configs.make_config(False, head="fcn", overrides=KILL_CONFIG)
    assert recorded.values == json.loads(json.dumps(configs.config_values(expected)))
    assert os.path.isfile(os.path.join(os.path.dirname(last), configs.RUN_RECORD))
    # Output to a file: no carriage returns, no colour escapes; a line per epoch and steps.
    assert "\r" not in trained.output and "\x1b" not in trained.output
    assert re.search(r"^epoch 1, step 1/2 - .* s/step - .*loss: ", trained.output, re.M)
    assert re.search(r"^2/2 - \d+s - .*val_loss", trained.output, re.M)


def test_export_detect_evaluate_use_the_recorded_configuration_without_dataset(
        trained, tmp_path, capsys, monkeypatch):
    """The reproduction of issue 11: after training on a dataset folder, `export --weights
    last` without --dataset assumed DemoConfig ("no checkpoint of 'fashion_demo'")."""
    last = checkpoints.find_last(trained.logs, "fashion")
    output = tmp_path / "exported"
    assert fashion.main(["export", "--weights", "last", "--logs", trained.logs,
                         "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "recorded with the checkpoint" in out and last in out
    assert "resnet50, fcn mask head, 47 classes" in out and "IMAGE_MAX_DIM 64" in out
    assert json.load(open(output / "config.json"))["mask_head"] == "fcn"

    det = tmp_path / "det"
    assert fashion.main(["detect", "--weights", "last", "--logs", trained.logs, "--image",
                         os.path.join(trained.data, "train", "img0.jpg"),
                         "--output", str(det)]) == 0
    assert (det / "detections.csv").is_file() and (det / "img0_detections.png").is_file()

    demo = demo_data.ensure_demo_data(str(tmp_path / "demo"), n_train=6, n_test=1,
                                      sizes=((96, 64),), verbose=False)
    monkeypatch.setattr(demo_data, "ensure_demo_data", lambda *a, **k: demo)
    result = tmp_path / "eval.json"
    assert fashion.main(["evaluate", "--weights", "last", "--logs", trained.logs,
                         "--limit", "4", "--output", str(result)]) == 0
    stats = json.load(open(result))
    assert stats["weights"] == last and set(stats["coco"]) == {"bbox", "segm"}


def test_set_overrides_the_recorded_configuration(trained):
    args = _parse("export", "--weights", "last", "--logs", trained.logs, "--output", "x")
    config, path, _ = fashion.command_config(args, True, "last", inference=True)
    assert path == checkpoints.find_last(trained.logs, "fashion")
    assert (config.NAME, config.BACKBONE, config.MASK_HEAD) == ("fashion", "resnet50", "fcn")
    assert (config.IMAGE_MAX_DIM, config.TOP_DOWN_PYRAMID_SIZE, config.DETECTION_MIN_CONFIDENCE,
            config.BATCH_SIZE) == (64, 32, 0.7, 1)
    args = _parse("export", "--weights", "last", "--logs", trained.logs, "--output", "x",
                  "--head", "unet", "--set", "DETECTION_MIN_CONFIDENCE=0.25",
                  "--set", "IMAGE_MIN_DIM=128", "IMAGE_MAX_DIM=128")
    config, _, _ = fashion.command_config(args, True, "last", inference=True)
    assert (config.MASK_HEAD, config.DETECTION_MIN_CONFIDENCE, config.IMAGE_MAX_DIM) == (
        "unet", 0.25, 128)
    assert config.TOP_DOWN_PYRAMID_SIZE == 32                   # still the recorded value


def test_checkpoint_names_come_from_mrcnn_checkpoints_only(trained):
    """No file of samples/ or notebooks/ spells a checkpoint name, suffix or partial mark:
    they all use mrcnn.checkpoints. The checkpoint a training wrote is what
    checkpoints.find_last, fashion.py's --weights last and the notebooks' find_last find."""
    patterns = [r"mask_rcnn_(?!coco)", r"\.weights\.h5", r"\.tmp\b", r"\\d\{8\}T\\d\{4\}"]
    offenders = []
    for folder in ("samples", "notebooks"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".py", ".ipynb")):
                    path = os.path.join(base, name)
                    text = open(path, encoding="utf-8").read()
                    offenders += ["%s: %s" % (os.path.relpath(path, ROOT), p)
                                  for p in patterns if re.search(p, text)]
    assert not offenders, offenders

    sys.path.insert(0, os.path.join(ROOT, "notebooks"))
    try:
        import notebook_setup as nb
    finally:
        sys.path.remove(os.path.join(ROOT, "notebooks"))
    written = [p for p in checkpoints.all_checkpoints(trained.logs, "fashion")]
    assert len(written) == 1
    config = configs.make_config(False)
    assert checkpoints.find_last(trained.logs, "fashion") == written[0]
    assert cli.weights_file("last", trained.logs, ["fashion", "fashion_demo"]) == (
        written[0], "fashion")
    assert nb.find_last(config, trained.logs) == written[0]
    assert nb.checkpoints(config, trained.logs) == written
    # The mask head as the checkpoint records it; the layer-name guess only without it.
    assert checkpoints.checkpoint_attrs(written[0])["mask_head"] == "fcn"
    assert nb.checkpoint_mask_head(written[0]) == "fcn"
    assert nb.find_last(configs.make_config(True), trained.logs) is None


def test_notebook_mask_head_falls_back_to_layer_names(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "notebooks"))
    try:
        import notebook_setup as nb
    finally:
        sys.path.remove(os.path.join(ROOT, "notebooks"))
    for head, layer in (("unet", "mrcnn_mask_unet_conv1"), ("fcn", "mrcnn_mask_conv1")):
        path = tmp_path / (head + ".h5")                 # a Keras 2 file: no attributes
        with h5py.File(path, "w") as f:
            f.attrs["layer_names"] = [layer.encode(), b"conv1"]
        assert checkpoints.checkpoint_attrs(str(path)) == {}
        assert nb.checkpoint_mask_head(str(path)) == head


# ----------------------------------------------------------------------------- errors

class _FixableError(MrcnnError, ValueError):
    hint = "Fix row 3 of train.csv, then run again."


def test_error_message_is_the_message_and_the_hint(monkeypatch, capsys, tmp_path):
    from mrcnn.model import TrainingDivergedError, WeightsError
    assert cli.error_message(_FixableError("train.csv line 3: bad ClassId")) == (
        "train.csv line 3: bad ClassId\nFix row 3 of train.csv, then run again.")
    assert cli.error_message(configs.ConfigError("unknown attribute")) == "unknown attribute"
    assert "--exclude" in cli.error_message(WeightsError("w.h5 does not fit"))
    assert "fashion.py train --weights last" in cli.error_message(TrainingDivergedError("NaN"))
    from mrcnn.utils import ImageLoadError
    assert "--strict" in cli.error_message(ImageLoadError("a.jpg: truncated"))
    assert cli.error_message(RuntimeError("a bug")) is None

    def fail(args):
        raise _FixableError("train.csv line 3: bad ClassId")
    monkeypatch.setitem(fashion.COMMANDS, "export", fail)
    argv = ["export", "--weights", "none", "--output", str(tmp_path / "x")]
    assert fashion.main(argv) == 1
    err = capsys.readouterr().err
    assert err == "error: train.csv line 3: bad ClassId\nFix row 3 of train.csv, then run again.\n"

    def bug(args):
        raise RuntimeError("a bug")
    monkeypatch.setitem(fashion.COMMANDS, "export", bug)
    with pytest.raises(RuntimeError, match="a bug"):               # a traceback, not a message
        fashion.main(argv)


# ----------------------------------------------------------------------------- output

def test_progress_in_a_log_file_is_plain_lines():
    out = io.StringIO()
    assert list(cli.progress(range(5), "submit", interval=3600, stream=out)) == list(range(5))
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["submit: 1/5 images", "submit: 5/5 images"]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    assert cli.training_callbacks(stream=Terminal()) == []


def test_keras_progress_in_a_log_file_has_no_escapes(capsys):
    import keras
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((8, 3), "float32"), np.zeros((8, 1), "float32")
    callbacks = cli.training_callbacks(stream=sys.stdout, interval=0)
    model.fit(x, y, batch_size=2, epochs=2, verbose=1, callbacks=callbacks)
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out and "\b" not in out
    assert re.findall(r"^epoch (\d), step (\d)/4", out, re.M) == [
        ("1", "1"), ("1", "2"), ("1", "3"), ("2", "1"), ("2", "2"), ("2", "3")]
    assert len(re.findall(r"^4/4 - \d+s - .*loss: ", out, re.M)) == 2


def test_filtered_stderr_drops_only_the_noise(capfd):
    with cli.filtered_stderr(("noisy notice",)):
        os.write(2, b"I0000 port.cc:153] a noisy notice\nE0000 a real error\n")
    assert capfd.readouterr().err == "E0000 a real error\n"


def test_start_up_is_quiet_unless_verbose():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    quiet = subprocess.run([sys.executable, FASHION, "export", "--help"], capture_output=True,
                           text=True, timeout=120, env=env)
    assert quiet.returncode == 0 and "--verbose" in quiet.stdout
    for noise in cli.TF_NOISE + cli.NO_GPU_NOISE + ("cuda_platform", "cudart_stub"):
        assert noise not in quiet.stderr, quiet.stderr
