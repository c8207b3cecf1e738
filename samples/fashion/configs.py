"""Configurations of the fashion sample, and what a run records of its configuration.

    from samples.fashion.configs import FashionConfig, DemoConfig, make_config
    config = make_config(demo=False, inference=True, overrides=["IMAGE_MAX_DIM=768"])

FashionConfig is sized for iMaterialist 2019 on one 11 GB RTX 2080 Ti, DemoConfig for the
generated demo dataset on a 2-core CPU. A training run records the configuration it trained
with in its run folder (CONFIG_FILE, beside the checkpoints) and its staged schedule
(RUN_RECORD); evaluate / detect / submit / export build the model from the configuration
recorded with the checkpoint they load (`read_run_config`, `make_config(..., recorded=...)`),
so `--weights last` is enough, and `train --weights last` resumes the schedule.
"""

import collections
import json
import os
import sys
import time

import numpy as np

from mrcnn.checkpoints import write_json_atomic
from mrcnn.config import DERIVED_ATTRIBUTES, Config, ConfigError

# The configuration of a run, written into its run folder when training starts.
CONFIG_FILE = "config.json"
# The run's staged schedule, written beside it, so that `--weights last` resumes it.
RUN_RECORD = "fashion_run.json"


############################################################
#  Configurations
############################################################

class FashionConfig(Config):
    """iMaterialist (Fashion) 2019 on one 11 GB RTX 2080 Ti.

    Memory (estimated, not measured: no GPU here; see docs/fashion.md): ResNet101-FPN, U-Net
    mask head, 200 training ROIs per image, 1024x1024 inputs. Weights + gradients + momentum are
    about 0.8 GB (64 M parameters, float32 variables even under mixed precision); the
    activations of one 1024 px image are about 4.5 GB in float32 and half that in float16.
    So: 2 images at 1024 px need ~10 GB in float32 (too tight for 11 GB with cuDNN
    workspaces) and ~5.5-6 GB with MIXED_PRECISION (the default here, tensor cores); at
    768 px the float32 figure drops to ~6 GB, at 512 px to ~3 GB. Without a GPU, float16
    falls back to bfloat16 or float32 (Config.precision_policy).
    """
    NAME = "fashion"
    NUM_CLASSES = 1 + 46
    # Attribute-Mask R-CNN (mrcnn.config.Config.NUM_ATTRIBUTES): label_descriptions.json of
    # iMaterialist 2019 lists 92 attributes (ids 0-91), the ids of train.csv's ClassId
    # tails ("6_28_71"). --set NUM_ATTRIBUTES=0 trains matterport's heads only.
    NUM_ATTRIBUTES = 92
    LOSS_WEIGHTS = dict(Config.LOSS_WEIGHTS, mrcnn_attribute_loss=1.)
    BACKBONE = "resnet101"
    MASK_HEAD = "unet"
    GPU_COUNT = 1
    IMAGES_PER_GPU = 2
    MIXED_PRECISION = True
    IMAGE_RESIZE_MODE = "square"
    IMAGE_MIN_DIM = 1024
    IMAGE_MAX_DIM = 1024
    # ~41,000 training images / 2 per step: an "epoch" here is 1,000 steps (matterport style).
    STEPS_PER_EPOCH = 1000
    VALIDATION_STEPS = 50
    # Images hold up to ~70 masks; garments and small parts (buttons, rivets) both matter.
    MAX_GT_INSTANCES = 100
    DETECTION_MAX_INSTANCES = 100
    DETECTION_MIN_CONFIDENCE = 0.7
    TRAIN_ROIS_PER_IMAGE = 200
    # A bad row or image (issue 6 catalogue) is counted and replaced, not fatal (--strict).
    ON_LOAD_ERROR = "skip"
    LOADER_WORKERS = 4
    TRAIN_BN = False
    # Large-scale jitter in `train` (mrcnn.data.scale_jitter before default_augmentation):
    # (low, high) rescale factors, then crop / pad back to the training size; (): off (a
    # tuple either way, so that a run recorded by one configuration loads into the other).
    SCALE_JITTER = ()


class DemoConfig(FashionConfig):
    """The demo on a 2-core CPU from random weights: `train` ends in < 10 minutes.

    Sized by step time (docs/fashion.md): ResNet50 at 128 px, one image per step
    (more steps beat bigger batches on a CPU), SGD peaking at 0.004 after a warm-up (0.01
    and above diverged from scratch at a constant rate), a slimmer FPN (128 channels) and
    box head (256), 24 training ROIs, and the U-Net mask head at 16x16 (MASK_POOL_SIZE 8)
    instead of 28x28, which costs a third.
    BatchNorm stays frozen (TRAIN_BN False, inherited), even from random weights: with the
    batch statistics of one 128 px image, inference (moving statistics) disagreed with
    training and segm AP@0.5 ranged 0.11-0.71 over five runs; frozen, three runs gave 0.67,
    0.85 and 0.87 (docs/fashion.md).
    """
    NAME = "fashion_demo"
    BACKBONE = "resnet50"
    MIXED_PRECISION = False
    IMAGES_PER_GPU = 1
    IMAGE_MIN_DIM = 128
    IMAGE_MAX_DIM = 128
    RPN_ANCHOR_SCALES = (8, 16, 32, 64, 128)
    RPN_TRAIN_ANCHORS_PER_IMAGE = 64
    PRE_NMS_LIMIT = 1000
    POST_NMS_ROIS_TRAINING = 128
    POST_NMS_ROIS_INFERENCE = 100
    TRAIN_ROIS_PER_IMAGE = 24
    TOP_DOWN_PYRAMID_SIZE = 128
    FPN_CLASSIF_FC_LAYERS_SIZE = 256
    MASK_POOL_SIZE = 8
    MASK_SHAPE = [16, 16]
    MINI_MASK_SHAPE = (32, 32)
    MAX_GT_INSTANCES = 10
    DETECTION_MAX_INSTANCES = 20
    # COCO AP counts low-confidence detections too (they add recall at the tail).
    DETECTION_MIN_CONFIDENCE = 0.1
    STEPS_PER_EPOCH = 125
    VALIDATION_STEPS = 5
    LOADER_WORKERS = 1
    # The training recipe, chosen by benchmarks/bench_demo.py (docs/fashion.md, two runs
    # each against matterport's constant 0.002 without scale jitter): a linear warm-up over 50
    # steps to 0.004, then cosine decay to 0 at the end of the schedule (`train` sets
    # LR_TOTAL_STEPS to it: 5 epochs x 125 steps by default), and large-scale jitter 0.8-1.25.
    # segm AP 0.284 / 0.405 against 0.272 / 0.326, the competition metric 0.306 / 0.413
    # against 0.256 / 0.270. Detection stays matterport's argmax scoring: per-class scoring
    # added ~0.02 segm AP but its extra detections cost the competition metric 0.1-0.14.
    LEARNING_RATE = 0.004
    LR_WARMUP_STEPS = 50
    LR_DECAY = "cosine"
    LR_TOTAL_STEPS = 625
    SCALE_JITTER = (0.8, 1.25)
    # From random weights: the input divided by ImageNet's per-channel std (in 0-255 units)
    # and the ground-truth boxes among the proposals the heads train on (both off in Config:
    # matterport's graph, which its weights expect). bench_demo.py, two runs each side by side
    # with the recipe without them: segm AP 0.544 (0.521-0.567) against 0.350 (0.289-0.412),
    # the competition metric 0.545 (0.532-0.559) against 0.366 (0.317-0.416), about the same
    # training time (benchmarks/RESULTS.md, session 7). `train` turns PIXEL_STD off when it
    # starts from ImageNet, COCO or other weights no run of this project recorded
    # (train_config in fashion.py).
    PIXEL_STD = (58.4, 57.1, 57.4)
    PROPOSAL_APPEND_GT = True
    # Attributes at a score >= 0.3: micro F1 of the matched detections 0.37 / 0.39 against
    # 0.11 / 0.16 at 0.5 (the head of a 10-minute run is not confident; chosen on the same
    # validation images it is reported on).
    DETECTION_ATTRIBUTE_THRESHOLD = 0.3


class InferenceMixin:
    """Inference runs one image at a time on one device, whatever a run trained with."""
    GPU_COUNT = 1
    IMAGES_PER_GPU = 1


# The configurations whose runs `--weights last` looks for when nothing says which.
CONFIGS = (FashionConfig, DemoConfig)



def make_config(demo, inference=False, head=None, overrides=(), strict=False, recorded=None):
    """The configuration of a command.

    demo: DemoConfig (True) or FashionConfig (False). recorded: a RecordedConfig (the values a
    run recorded, see read_run_config), applied over the class's values. Then, in this
    order: the inference settings (InferenceMixin: one image at a time) when `inference`,
    head (--head), strict (--strict: ON_LOAD_ERROR "raise") and overrides (--set: "NAME=VALUE"
    strings or a dict), so that what the command line says wins over what was recorded.
    """
    base = DemoConfig if demo else FashionConfig
    cls = type(base.__name__ + ("Inference" if inference else ""),
               ((InferenceMixin, base) if inference else (base,)), {})
    config = cls()
    if recorded is not None:
        recorded.apply(config)
        if inference:
            config.override({"GPU_COUNT": InferenceMixin.GPU_COUNT,
                             "IMAGES_PER_GPU": InferenceMixin.IMAGES_PER_GPU})
    if head:
        config.override({"MASK_HEAD": head})
    if strict:
        config.override({"ON_LOAD_ERROR": "raise"})
    if overrides:
        config.override(overrides if isinstance(overrides, dict) else list(overrides))
    return config


def is_overridden(overrides, name):
    """Whether the --set words `overrides` ("NAME=VALUE" strings) set attribute `name`."""
    return any(str(o).split("=", 1)[0].strip() == name for o in overrides)


def fit_input_scale(config, overrides=()):
    """Turn PIXEL_STD off (None) for starting weights trained on matterport's input, the image
    minus MEAN_PIXEL not divided by a std (ImageNet, COCO, a matterport-style file): divided,
    the first layer sees values ~58x smaller than it learned on. A PIXEL_STD given with --set
    (`overrides`) is kept. Returns the value turned off, or None when nothing changed."""
    if config.PIXEL_STD is None or is_overridden(overrides, "PIXEL_STD"):
        return None
    std = config.PIXEL_STD
    config.override({"PIXEL_STD": None})
    return std


def scale_jitter(config):
    """config.SCALE_JITTER as (low, high) floats, or None when off (empty); ConfigError if it
    is not two factors with 0 < low <= high."""
    value = getattr(config, "SCALE_JITTER", ())
    if value is None or len(value) == 0:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low = high = None
    if low is None or not 0 < low <= high:
        raise ConfigError("SCALE_JITTER must be () or (low, high) rescale factors with "
                          "0 < low <= high, not %r" % (value,))
    return low, high


############################################################
#  The configuration recorded in a run folder
############################################################

def config_values(config):
    """config.to_dict() as JSON values: arrays and tuples as lists. A callable (a BACKBONE
    function) cannot be recorded and is left out."""
    def plain(value):
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, np.generic):
            return value.item()
        return value
    return {name: plain(value) for name, value in config.to_dict().items()
            if not callable(value)}


def write_run_config(log_dir, config):
    """Record `config` in the run folder log_dir (CONFIG_FILE, written atomically).
    Returns the file's path."""
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, CONFIG_FILE)
    write_json_atomic(path, config_values(config))
    return path


class RecordedConfig(collections.namedtuple("RecordedConfig", ["path", "values"])):
    """The configuration a run recorded: the file's path and {NAME: value}."""

    @property
    def name(self):
        """The recorded NAME (a run folder's prefix, lower case), or None."""
        name = self.values.get("NAME")
        return name.lower() if isinstance(name, str) else None

    def apply(self, config):
        """Set the recorded values on `config` (derived attributes are recomputed; names this
        version does not know are skipped with a warning). Raises ConfigError naming the file
        when a value does not fit."""
        known = set(config.names())
        unknown = sorted(set(self.values) - known)
        if unknown:
            print("warning: %s records attributes this version does not know (ignored): %s"
                  % (self.path, ", ".join(unknown)), file=sys.stderr)
        values = {k: v for k, v in self.values.items()
                  if k in known and k not in DERIVED_ATTRIBUTES}
        try:
            config.override(values)
        except ConfigError as e:
            raise ConfigError("the configuration recorded in %s: %s" % (self.path, e)) from None
        return config


def read_run_config(log_dir):
    """The configuration recorded in the run folder log_dir (a RecordedConfig), or None when
    it has none (a run of an older version, a weights file outside a run folder).
    Raises ConfigError naming the file when it is not a JSON object."""
    path = os.path.join(log_dir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError("cannot read the run's configuration %s (%s); fix or delete the file"
                          % (path, e)) from None
    if not isinstance(values, dict):
        raise ConfigError("%s is not a configuration (expected a JSON object of NAME: value)"
                          % path)
    return RecordedConfig(path, values)


def recorded_names(model_dir):
    """The config NAMEs recorded by the run folders directly under model_dir (lower case)."""
    names = set()
    if os.path.isdir(model_dir):
        for entry in sorted(os.listdir(model_dir)):
            folder = os.path.join(model_dir, entry)
            if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
                try:
                    recorded = read_run_config(folder)
                except ConfigError:
                    continue
                if recorded.name:
                    names.add(recorded.name)
    return names


############################################################
#  The training schedule
############################################################

TRAIN_DEFAULTS = {  # (demo, real): epochs of the stages heads, 4+, all
    # Demo: one stage; from random weights the first stage trains all layers at LEARNING_RATE.
    True: (5, 0, 0),
    False: (2, 4, 6),
}


def stage_epochs(demo, given=(None, None, None)):
    """The epochs of the stages heads, 4+, all: `given` (None counts as 0) when any of them
    is given, else TRAIN_DEFAULTS[demo]."""
    if any(e is not None for e in given):
        return tuple(e or 0 for e in given)
    return TRAIN_DEFAULTS[bool(demo)]


def schedule(config, pretrained, epochs, rates=(None, None, None)):
    """[(layers, epochs to reach, learning rate)] of the staged schedule.

    matterport's recipe: the heads first (backbone frozen), then ResNet stage 4 and up, then
    everything with a lower learning rate. Starting from random weights there is nothing to
    freeze: the heads stage trains all layers. epochs: of the stages heads, 4+, all (0 skips
    one); rates: their learning rates (None: LEARNING_RATE, LEARNING_RATE, LEARNING_RATE / 10).
    """
    lr = config.LEARNING_RATE
    defaults = (lr, lr, lr / 10)
    layers = ("heads" if pretrained else "all", "4+", "all")
    out, reached = [], 0
    for name, n, rate, default in zip(layers, epochs, rates, defaults):
        if n and n > 0:
            reached += n
            out.append((name, reached, rate if rate is not None else default))
    return out


def fit_cosine_horizon(config, stages, overrides=()):
    """With LR_DECAY "cosine", decay to 0 at the end of the schedule: LR_TOTAL_STEPS = the
    last stage's epoch x STEPS_PER_EPOCH, so that `--all-epochs 8` stretches the curve
    instead of training the extra epochs at a rate of 0. A LR_TOTAL_STEPS given with --set
    (`overrides`) is kept. Returns the horizon set, or None when nothing changed."""
    if config.LR_DECAY != "cosine" or not stages:
        return None
    if is_overridden(overrides, "LR_TOTAL_STEPS"):
        return None
    total = stages[-1][1] * config.STEPS_PER_EPOCH
    if total == config.LR_TOTAL_STEPS:
        return None
    config.override({"LR_TOTAL_STEPS": total})
    return total


def read_run_record(log_dir):
    """The schedule recorded by the run in log_dir: {"stages": [(layers, epoch, rate)],
    "pretrained", "weights"}; {} if none or unreadable (with a warning naming the file)."""
    path = os.path.join(log_dir, RUN_RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        record["stages"] = [(str(n), int(e), float(r)) for n, e, r in record["stages"]]
        record["pretrained"] = bool(record["pretrained"])
        return record
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        print("warning: ignoring %s (%s)" % (path, e), file=sys.stderr)
        return {}


def write_run_record(log_dir, stages, pretrained, weights):
    """Record the run's schedule in log_dir (RUN_RECORD, atomically)."""
    os.makedirs(log_dir, exist_ok=True)
    write_json_atomic(os.path.join(log_dir, RUN_RECORD), {
        "stages": [list(s) for s in stages], "pretrained": bool(pretrained),
        "weights": weights, "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
