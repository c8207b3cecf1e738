"""Command-line conventions of the fashion sample (fashion.py).

* Arguments: the parser of the commands (`build_parser`).
* Start-up: TensorFlow's start-up noise (oneDNN notices, CUDA driver lines on a machine without
  a GPU, absl's pre-initialisation warning) is not shown unless --verbose (`quiet_tensorflow`).
* Progress: a progress bar on a terminal; in a log file (output redirected) plain lines, no
  carriage returns or colour escapes (`progress`, `training_callbacks`).
* Errors: an error the user can fix (any mrcnn.errors.MrcnnError) is one message plus its
  hint, not a traceback (`error_message`).
* Weights: --weights coco | imagenet | last | best | none | PATH (`weights_file`,
  `load_weights_spec`); `last` is the newest checkpoint of the runs under --logs, `best` the
  best checkpoint (train --keep-best) of the newest run that kept one (mrcnn.checkpoints).
* Evaluation during training: train's --eval-every, --eval-limit, --keep-best set the
  configuration's EVAL_* values (`apply_evaluation_options`; mrcnn.training.EvaluationCallback).
* Threshold tuning: tune's grid options (`tune_options`) and --tuned FILE of evaluate and submit
  (`tuned_option`; samples/fashion/tune.py, mrcnn.tuning).
"""

import argparse
import contextlib
import datetime
import functools
import os
import sys
import tempfile
import time

from mrcnn import checkpoints
from mrcnn.errors import MrcnnError

WEIGHT_SPECS = ("coco", "imagenet", "last", "best", "none", "imagenet-if-cached")
# The specs naming a checkpoint of a run under --logs.
RUN_SPECS = ("last", "best")
RANDOM = "random initialisation"


############################################################
#  Arguments
############################################################

def build_parser(default_logs):
    """The parser of fashion.py's commands (train, evaluate, detect, submit, tune, export); --logs
    defaults to default_logs. --head's choices are the registered mask heads
    (mrcnn.heads.MASK_HEADS); --set is repeatable."""
    from mrcnn.config import EVAL_METRICS
    from mrcnn.heads import MASK_HEADS
    parser = argparse.ArgumentParser(
        prog="fashion.py", description="Mask R-CNN (U-Net mask head) on iMaterialist (Fashion) "
        "2019. Without --dataset, a small generated demo dataset is used.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p, weights_required):
        p.add_argument("--dataset", metavar="DIR",
                       help="iMaterialist folder (train.csv, label_descriptions.json, train/, "
                            "test/); default: the demo dataset")
        p.add_argument("--annotations", metavar="JSON",
                       help="Fashionpedia COCO-style annotations instead of train.csv "
                            "(images in --dataset or next to the JSON)")
        if weights_required:
            p.add_argument("--weights", required=True, metavar="last|best|PATH",
                           help="'last' (newest checkpoint in --logs), 'best' (the best "
                                "checkpoint train --keep-best kept) or a weights file; the "
                                "configuration recorded with a checkpoint is used")
        p.add_argument("--logs", default=default_logs, metavar="DIR",
                       help="log and checkpoint folder (default: %(default)s)")
        p.add_argument("--head", choices=sorted(MASK_HEADS),
                       help="mask head (default: the config's, unet)")
        p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override configuration attributes, e.g. IMAGE_MAX_DIM=768 "
                            "(repeatable; wins over a recorded configuration)")
        p.add_argument("--exclude", default="", metavar="LAYERS",
                       help="comma-separated layer names not to load from the weights file")
        p.add_argument("--val-fraction", type=float, default=None,
                       help="validation share of train.csv's images (default 0.1; demo 0.25)")
        p.add_argument("--seed", type=int, default=42, help="seed of the train/val split")
        p.add_argument("--limit", type=int, default=None, metavar="N",
                       help="use at most N images per split")
        p.add_argument("--verbose", action="store_true",
                       help="show TensorFlow's start-up messages")

    p = sub.add_parser("train", help="train (staged: heads -> 4+ -> all)")
    common(p, weights_required=False)
    p.add_argument("--weights", default=None, metavar="coco|imagenet|last|best|none|PATH",
                   help="starting weights (default: coco; demo: ImageNet if cached, else none); "
                        "last / best resume their run")
    p.add_argument("--heads-epochs", type=int, default=None, help="epochs of the heads stage")
    p.add_argument("--heads-lr", type=float, default=None,
                   help="learning rate of the heads stage (default LEARNING_RATE)")
    p.add_argument("--stage4-epochs", type=int, default=None,
                   help="epochs training ResNet stage 4 and up (4+)")
    p.add_argument("--stage4-lr", type=float, default=None,
                   help="learning rate of the 4+ stage (default LEARNING_RATE)")
    p.add_argument("--all-epochs", type=int, default=None, help="epochs training all layers")
    p.add_argument("--all-lr", type=float, default=None,
                   help="learning rate of the all-layers stage (default LEARNING_RATE / 10)")
    p.add_argument("--no-augmentation", action="store_true",
                   help="train without mrcnn.data.default_augmentation()")
    p.add_argument("--strict", action="store_true",
                   help="stop on a bad image or row instead of counting and skipping it")
    p.add_argument("--check-sizes", action="store_true",
                   help="before training, read every image header and skip images whose size "
                        "disagrees with train.csv (otherwise checked when loaded)")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="every N epochs, COCO AP / AP@0.5 (masks, boxes) and the competition "
                        "metric on the first --eval-limit validation images: printed, in "
                        "TensorBoard (with an image of detections) and the history "
                        "(EVAL_EVERY_EPOCHS; default 0: off)")
    p.add_argument("--eval-limit", type=int, default=None, metavar="N",
                   help="evaluate on the first N validation images (EVAL_LIMIT; default 50, "
                        "0: all)")
    p.add_argument("--keep-best", choices=EVAL_METRICS, default=None, metavar="METRIC",
                   help="keep the checkpoint of the highest METRIC (%s) as the run's best, "
                        "for --weights best (EVAL_KEEP_BEST; needs --eval-every)"
                        % ", ".join(EVAL_METRICS))

    p = sub.add_parser("evaluate", help="COCO AP/AR (bbox, segm) and the competition metric "
                                        "on the validation split (and attribute-aware AP "
                                        "with an attribute head)")
    common(p, weights_required=True)
    tta_option(p)
    tuned_option(p)
    p.add_argument("--output", metavar="JSON", help="also write the numbers to this file")

    p = sub.add_parser("detect", help="draw detections on images and write their masks as RLE")
    common(p, weights_required=True)
    tta_option(p)
    p.add_argument("--image", required=True, metavar="PATH_OR_DIR")
    p.add_argument("--output", default="detections", metavar="DIR",
                   help="output folder (default: %(default)s)")

    p = sub.add_parser("submit", help="write a Kaggle submission for the test images")
    common(p, weights_required=True)
    tta_option(p)
    tuned_option(p)
    p.add_argument("--output", default="submission.csv", metavar="CSV")
    p.add_argument("--mask-size", type=int, default=512,
                   help="encode masks at this square size (default 512 as the 2019 solutions; "
                        "0 keeps each image's size)")
    p.add_argument("--attributes", action="store_true",
                   help="ClassIds with the predicted attributes, iMaterialist's "
                        "category_attr_attr (e.g. 6_28_71; needs a model with an attribute "
                        "head, NUM_ATTRIBUTES > 0)")

    p = sub.add_parser("tune", help="sweep the score, NMS and mask thresholds and a minimum "
                                    "mask area on the validation split for the competition "
                                    "metric (the network runs once); writes the --tuned file")
    common(p, weights_required=True)
    tune_options(p)

    p = sub.add_parser("export", help="write a TensorFlow SavedModel serving one image of any "
                                      "size (boxes, class ids, scores, masks)")
    common(p, weights_required=True)
    p.add_argument("--output", required=True, metavar="DIR",
                   help="SavedModel folder to create (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it already holds files")
    return parser


def tta_spec(text):
    """argparse type of --tta: a mrcnn.tta.TTA, or None for "none"."""
    from mrcnn import tta
    try:
        return tta.parse_tta(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def tta_option(p):
    """--tta SPEC (evaluate, detect, submit): test-time augmentation (mrcnn.tta)."""
    p.add_argument("--tta", type=tta_spec, default=None, metavar="SPEC",
                   help="test-time augmentation: 'flip', 'flip,scales=0.8,1.0,1.2', "
                        "'...,merge=nms' (default merge wbf: weighted box fusion), "
                        "'...,iou=0.55'; the copies' detections are merged and their masks "
                        "averaged (docs/tta.md)")


def tuned_option(p):
    """--tuned FILE (evaluate, submit): the thresholds `tune` chose (samples/fashion/tune.py)."""
    p.add_argument("--tuned", metavar="JSON",
                   help="the file `tune` wrote: its DETECTION_MIN_CONFIDENCE, "
                        "DETECTION_NMS_THRESHOLD and DETECTION_MASK_THRESHOLD override the "
                        "configuration's (an explicit --set still wins) and masks below its "
                        "minimum area are dropped")


def number_list(kind):
    """argparse type: comma-separated numbers of `kind` (float or int)."""
    def parse(text):
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError("expected comma-separated %s numbers, got %r"
                                             % ("whole" if kind is int else "decimal",
                                                text)) from None
    return parse


# The grid `tune` sweeps by default: 9 x 3 x 4 x 4 = 432 settings.
TUNE_SCORES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
TUNE_NMS = (0.3, 0.4, 0.5)
TUNE_MASKS = (0.3, 0.4, 0.5, 0.6)
TUNE_MIN_AREAS = (0, 25, 100, 400)


def tune_options(p):
    """The options of `tune`: the grid, the table, the output."""
    def values(v):
        return ",".join("%g" % x for x in v)
    p.add_argument("--scores", type=number_list(float), default=TUNE_SCORES, metavar="LIST",
                   help="score thresholds (DETECTION_MIN_CONFIDENCE; default %s)"
                        % values(TUNE_SCORES))
    p.add_argument("--nms", type=number_list(float), default=TUNE_NMS, metavar="LIST",
                   help="per-class NMS thresholds (DETECTION_NMS_THRESHOLD; default %s)"
                        % values(TUNE_NMS))
    p.add_argument("--mask-thresholds", type=number_list(float), default=TUNE_MASKS,
                   metavar="LIST", help="mask binarization thresholds "
                                        "(DETECTION_MASK_THRESHOLD; default %s)"
                                        % values(TUNE_MASKS))
    p.add_argument("--min-areas", type=number_list(int), default=TUNE_MIN_AREAS,
                   metavar="LIST", help="minimum mask areas, pixels of the original image "
                                        "(default %s)" % values(TUNE_MIN_AREAS))
    p.add_argument("--coco-top", type=int, default=3, metavar="N",
                   help="also compute segm AP (COCO) of the N best settings (default "
                        "%(default)s; 0: none)")
    p.add_argument("--show", type=int, default=20, metavar="N",
                   help="print the N best settings (default %(default)s; 0: all)")
    p.add_argument("--output", default="tuned.json", metavar="JSON",
                   help="the tuned-settings file for evaluate / submit --tuned (default "
                        "%(default)s)")


############################################################
#  Start-up
############################################################

# Lines TensorFlow writes to stderr at start-up, before its log level applies: the
# information they carry is not actionable here.
TF_NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)
# ... and on a machine without an NVIDIA device (with one they report a driver problem).
NO_GPU_NOISE = (
    "Could not find cuda drivers on your machine",
    "failed call to cuInit",
)


@contextlib.contextmanager
def filtered_stderr(noise):
    """Capture file descriptor 2 (C++ code writes there directly) for the block, then write
    back every captured line that does not contain one of the strings in `noise`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            kept = [line for line in text.splitlines(True)
                    if not any(n in line for n in noise)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def quiet_tensorflow(verbose=False):
    """Import TensorFlow without its start-up noise, unless `verbose`.

    Call it before anything imports TensorFlow (its first import prints the noise, and fixes
    its C++ log level): sets TF_CPP_MIN_LOG_LEVEL (unless set already) to 3 on a machine
    without an NVIDIA device (its errors there are CPU-kernel notices) and to 2 (errors only)
    with one, absl's verbosity to ERROR, then imports TensorFlow and asks for its GPUs with
    stderr filtered (TF_NOISE, and NO_GPU_NOISE without an NVIDIA device). Returns True if
    TensorFlow was imported here.
    """
    if verbose:
        return False
    gpu_device = any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/dxg"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if gpu_device else "3")
    if "tensorflow" in sys.modules:
        return False
    with filtered_stderr(TF_NOISE + (() if gpu_device else NO_GPU_NOISE)):
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
        import tensorflow as tf
        import keras  # noqa: F401 - its own libraries print the same notices
        tf.config.list_physical_devices("GPU")
    return True


############################################################
#  Progress
############################################################

def is_terminal(stream):
    """True if `stream` is an interactive terminal (not a file or a pipe)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress(items, desc, unit="image", interval=60.0, stream=None):
    """Iterate over `items` showing progress on `stream` (default stderr): a tqdm bar on a
    terminal; otherwise (a log file) one plain line after the first item, then at most every
    `interval` seconds, and after the last."""
    stream = stream or sys.stderr
    if is_terminal(stream):
        try:
            from tqdm import tqdm
            return tqdm(items, desc=desc, unit=unit, file=stream)
        except ImportError:
            pass
    return _progress_lines(list(items), desc, unit, interval, stream)


def _progress_lines(items, desc, unit, interval, stream):
    start = last = time.monotonic()
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if i == 1 or i == len(items) or now - last >= interval:
            last = now
            print("%s: %d/%d %ss, %s, %.2f s per %s"
                  % (desc, i, len(items), unit, _duration(now - start), (now - start) / i, unit),
                  file=stream, flush=True)


def _duration(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def training_callbacks(stream=None, interval=60.0):
    """Callbacks for MaskRCNN.train(custom_callbacks=...): on a terminal none (Keras' own
    progress bar); otherwise [a PlainProgress], which replaces Keras' bar (it rewrites its line
    with carriage returns and colour escapes even into a file) by plain lines."""
    stream = stream or sys.stdout
    if is_terminal(stream):
        return []
    return [plain_progress_class()(interval=interval, stream=stream)]


@functools.lru_cache(maxsize=None)
def plain_progress_class():
    """PlainProgress: a keras.callbacks.ProgbarLogger printing plain lines (made on first use,
    so that Keras is imported only then). Per epoch Keras' own summary line (as with
    fit(verbose=2)); within an epoch one line after the first step and then at most every
    `interval` seconds: epoch, step, elapsed time, time per step, running mean losses."""
    import keras

    class PlainProgress(keras.callbacks.ProgbarLogger):
        def __init__(self, interval=60.0, stream=None):
            super().__init__()
            self.interval = interval
            self.stream = stream or sys.stdout
            self._epoch = 0
            self._start = self._last = time.monotonic()

        def set_params(self, params):
            # fit(verbose=1) draws a bar; 2 prints one summary line per epoch.
            super().set_params(dict(params, verbose=2 if params.get("verbose") else 0))

        def on_epoch_begin(self, epoch, logs=None):
            super().on_epoch_begin(epoch, logs)
            self._epoch = epoch
            self._start = self._last = time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            super().on_train_batch_end(batch, logs)
            now, step = time.monotonic(), batch + 1
            if not self.verbose or step == self.target or (
                    step > 1 and now - self._last < self.interval):
                return
            self._last = now
            losses = " - ".join("%s: %.4g" % (k, float(v)) for k, v in (logs or {}).items()
                                if _is_number(v))
            print("epoch %d, step %d/%s - %s, %.2f s/step%s"
                  % (self._epoch + 1, step, self.target or "?", _duration(now - self._start),
                     (now - self._start) / step, " - " + losses if losses else ""),
                  file=self.stream, flush=True)

    return PlainProgress


def _is_number(value):
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


############################################################
#  Errors
############################################################

# Extra lines for errors of library classes that carry no `hint` of their own: what the
# fashion command line offers for them.
SAMPLE_HINT = "(during training such samples are counted and skipped unless --strict)"
STRICT_HINT = ("(--strict stops at the first bad sample; without it bad samples are counted, "
               "skipped and summarised at the end of each epoch)")


def error_message(e):
    """The message for an error a user can fix, or None for a bug (shown as a traceback).

    Any MrcnnError: its message, then its `hint` (what to do) when it has one. A missing file
    (FileNotFoundError): the message naming it."""
    if isinstance(e, MrcnnError):
        hint = getattr(e, "hint", None) or _cli_hint(e)
        return "%s\n%s" % (e, hint) if hint else str(e)
    if isinstance(e, FileNotFoundError):
        return "%s: %s" % (e.strerror, e.filename) if e.strerror else str(e)
    return None


def _cli_hint(e):
    from mrcnn.utils import ImageLoadError, MaskError, RLEError
    if isinstance(e, (ImageLoadError, RLEError, MaskError)):
        return SAMPLE_HINT
    from mrcnn.data import SampleLoadError
    if isinstance(e, SampleLoadError):
        return STRICT_HINT
    return None


############################################################
#  Weights
############################################################

def check_weights_spec(spec):
    """Fail fast (before building a model) on a weights file that does not exist."""
    if spec and spec not in WEIGHT_SPECS and not os.path.isfile(spec):
        raise FileNotFoundError("weights file not found: %s (give coco, imagenet, last, best, "
                                "none or the path of a %s / %s file)"
                                % (spec, checkpoints.CHECKPOINT_SUFFIX, checkpoints.LEGACY_SUFFIX))


def _warn(message):
    print("warning: %s" % message, file=sys.stderr)


def newest_run(model_dir, names, best=False, states=False):
    """The config NAME (of `names`) whose newest run under model_dir has a checkpoint (with
    `best`: a best checkpoint; with `states`, a training state counts too: a run killed in
    its first epoch) and started last (ties: the newer file). Raises FileNotFoundError saying
    where it looked."""
    found = []
    for name in sorted(set(names)):
        try:
            path = (checkpoints.find_best if best else checkpoints.find_last)(model_dir, name)
        except FileNotFoundError:
            if not states:
                continue
            try:
                path = checkpoints.find_last_state(model_dir, name)
            except FileNotFoundError:
                continue
        started = (checkpoints.parse_checkpoint_path(path) or (datetime.datetime.min,))[0]
        found.append((started, os.path.getmtime(path), name))
    if not found:
        runs = " or ".join(repr(checkpoints.run_name(n)) for n in sorted(set(names)))
        if best:
            raise FileNotFoundError(
                "--weights best: no best checkpoint of %s in %s: train with --eval-every N "
                "--keep-best METRIC, or give a weights file" % (runs, os.path.abspath(model_dir)))
        raise FileNotFoundError(
            "--weights last: no checkpoint of %s in %s: train first, or give a weights file"
            % (runs, os.path.abspath(model_dir)))
    return max(found)[2]


def weights_file(spec, model_dir, names, states=False):
    """(path, name) of --weights `spec`: for `last` the newest readable checkpoint of the
    newest run of any of `names` (config NAMEs) under model_dir, and that NAME; for `best` the
    best checkpoint of the newest run of any of `names` that kept one, and that NAME; for a
    path the path and None; for coco / imagenet / none (None, None)."""
    if not spec or spec in WEIGHT_SPECS and spec not in RUN_SPECS:
        return None, None
    if spec not in RUN_SPECS:
        check_weights_spec(spec)
        return spec, None
    if spec == "best":
        name = newest_run(model_dir, names, best=True)
        return checkpoints.find_best(model_dir, name), name
    name = newest_run(model_dir, names, states=states)
    try:
        return checkpoints.last_good_checkpoint(model_dir, name, warn=_warn), name
    except FileNotFoundError:
        if not states:
            raise
        # No epoch finished: train resumes from the run's newest training state.
        return checkpoints.find_last_state(model_dir, name), name


def resolve_weights_spec(spec, backbone):
    """"imagenet-if-cached" -> "imagenet" when Keras Applications' ImageNet file of `backbone`
    is cached, else "none" (saying so); any other spec unchanged."""
    from samples.fashion import weights as W
    if spec != "imagenet-if-cached":
        return spec
    path = os.path.join(W.keras_models_dir(), W.IMAGENET_FILES[backbone])
    if os.path.isfile(path):
        return "imagenet"
    print("Note: no ImageNet weights cached at %s; the demo starts from random weights "
          "(pass --weights imagenet to download them, or --weights none to silence this)."
          % path)
    return "none"


def load_weights_spec(model, spec, exclude=()):
    """Load --weights into a MaskRCNN: coco | imagenet | imagenet-if-cached | last | best |
    none | PATH. Returns a description of what was loaded (RANDOM for none)."""
    from samples.fashion import weights as W
    spec = resolve_weights_spec(spec, model.config.BACKBONE)
    if spec == "none":
        return RANDOM
    if spec == "coco":
        W.load_coco(model)
        return "COCO (matterport's mask_rcnn_coco.h5)"
    if spec == "imagenet":
        W.load_imagenet(model)
        return "ImageNet %s backbone" % model.config.BACKBONE
    path = spec
    if spec in RUN_SPECS:
        path, _ = weights_file(spec, model.model_dir, [model.config.NAME],
                               states=model.mode == "training")
    if checkpoints.state_step(path) is not None:
        # A training state: train() restores weights, momentum and position from it.
        model.set_log_dir(path)
        return "training state %s" % path
    check_weights_spec(path)
    by_name = bool(exclude) or not path.endswith(checkpoints.CHECKPOINT_SUFFIX)
    model.load_weights(path, by_name=by_name, exclude=list(exclude) or None)
    return path


############################################################
#  Evaluation during training
############################################################

# train's options -> the configuration attributes they set.
EVALUATION_OPTIONS = {"eval_every": "EVAL_EVERY_EPOCHS", "eval_limit": "EVAL_LIMIT",
                      "keep_best": "EVAL_KEEP_BEST"}


def apply_evaluation_options(config, args):
    """Set the EVAL_* values of train's --eval-every, --eval-limit and --keep-best (those
    given; they win over --set and the recorded configuration) on `config`. Returns config."""
    from mrcnn.config import ConfigError
    values = {key: getattr(args, option) for option, key in EVALUATION_OPTIONS.items()
              if getattr(args, option, None) is not None}
    if values.get("EVAL_KEEP_BEST") and not values.get("EVAL_EVERY_EPOCHS",
                                                       config.EVAL_EVERY_EPOCHS):
        raise ConfigError("--keep-best needs evaluation during training: add --eval-every N "
                          "(e.g. 1)")
    if values:
        config.override(values)
    return config
