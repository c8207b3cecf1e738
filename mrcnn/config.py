"""Mask R-CNN configuration: the one source of truth for every knob.

Subclass `Config` and override the attributes you need, as with matterport's Mask_RCNN:

    class FashionConfig(Config):
        NAME = "fashion"
        NUM_CLASSES = 1 + 46

Attributes can also be overridden from strings, as a command line gives them:

    config.override(["IMAGE_MAX_DIM=512", "RPN_ANCHOR_SCALES=(16,32,64,128,256)"])

Unknown names and values of the wrong type are rejected with a `ConfigError` naming the
attribute. Derived attributes (BATCH_SIZE, IMAGE_SHAPE, IMAGE_META_SIZE) are recomputed after
every override.
"""

import ast
import logging

import numpy as np

from mrcnn.errors import MrcnnError
from mrcnn.image_meta import image_meta_size


class ConfigError(MrcnnError, ValueError):
    """A configuration value that is unknown, of the wrong type or out of range."""


# Attributes computed from the others; they cannot be overridden directly.
DERIVED_ATTRIBUTES = ("BATCH_SIZE", "IMAGE_SHAPE", "IMAGE_META_SIZE")

RESIZE_MODES = ("none", "square", "pad64", "crop")
LR_DECAYS = ("none", "step", "cosine")
# The attribute head's loss (NUM_ATTRIBUTES > 0): its name in LOSS_WEIGHTS and the logs.
ATTRIBUTE_LOSS = "mrcnn_attribute_loss"
DETECTION_SCORINGS = ("argmax", "per_class")
LOAD_ERROR_POLICIES = ("raise", "skip")
# WEIGHT_INIT's schemes (mrcnn.initializers).
WEIGHT_INIT_SCHEMES = ("keras", "torchvision")
# What evaluation during training measures (mrcnn.training.EvaluationCallback), and the names
# EVAL_KEEP_BEST takes: COCO AP and AP@0.5 of masks and boxes, the iMaterialist 2019 metric.
EVAL_METRICS = ("segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50", "competition")
# MIXED_PRECISION value -> Keras dtype policy (on a GPU; see resolve_precision_policy).
PRECISION_POLICIES = {False: "float32", True: "mixed_float16", "float16": "mixed_float16",
                      "bfloat16": "mixed_bfloat16"}
# /proc/cpuinfo flags of CPUs with bfloat16 arithmetic (AVX512_BF16, AMX).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

logger = logging.getLogger(__name__)
_precision_notes_told = set()


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU feature flags the kernel reports (the "flags" line of /proc/cpuinfo), as a
    set; empty where that file does not exist (not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[-1].split())
    except OSError:
        pass
    return set()


def gpu_available():
    """True if TensorFlow sees a GPU."""
    import tensorflow as tf
    return bool(tf.config.list_physical_devices("GPU"))


def resolve_precision_policy(mixed_precision, gpu=None, flags=None):
    """The Keras dtype policy of a MIXED_PRECISION value on this machine, and a note.

    True means float16, which is meant for GPUs with tensor cores; a CPU has no fast float16
    kernels (minutes per step). Without a GPU, True falls back to mixed_bfloat16 where the CPU
    has bfloat16 arithmetic (AVX512_BF16 or AMX) and to float32 otherwise. An explicit dtype
    ("float16", "bfloat16") and False are taken as they are. gpu: whether a GPU is present
    (default: ask TensorFlow); flags: the CPU's feature flags (default: cpu_flags()).
    Returns (policy, note): note is None, or one line saying what was chosen instead and why.
    """
    policy = PRECISION_POLICIES[mixed_precision]
    if mixed_precision is not True:
        return policy, None
    if gpu is None:
        gpu = gpu_available()
    if gpu:
        return policy, None
    flags = cpu_flags() if flags is None else set(flags)
    bf16 = sorted(set(BF16_CPU_FLAGS) & flags)
    if bf16:
        return "mixed_bfloat16", (
            "MIXED_PRECISION=%r: no GPU here and float16 has no fast CPU kernels; using "
            "mixed_bfloat16 (this CPU has %s)" % (mixed_precision, ", ".join(bf16)))
    return "float32", (
        "MIXED_PRECISION=%r: no GPU here, float16 has no fast CPU kernels and this CPU has no "
        "bfloat16 arithmetic (AVX512_BF16 / AMX); using float32" % (mixed_precision,))


class Config:
    """Base configuration. Defaults are matterport's (sized for COCO on one 12 GB GPU)."""

    # Name of the configuration; used in log directory and checkpoint names.
    NAME = None

    # GPUs to train on. More than one trains under tf.distribute.MirroredStrategy.
    GPU_COUNT = 1

    # Images per GPU. A 12 GB GPU fits about two 1024x1024 images.
    IMAGES_PER_GPU = 2

    # Training steps per epoch and validation steps at the end of each epoch.
    STEPS_PER_EPOCH = 1000
    VALIDATION_STEPS = 50

    # "resnet50", "resnet101", or a callable graph(input_image, stage5, train_bn) -> [C1..C5].
    BACKBONE = "resnet101"

    # Only with a callable BACKBONE: callable(image_shape) -> [[h, w] per pyramid level].
    COMPUTE_BACKBONE_SHAPE = None

    # Strides of the FPN levels P2..P6.
    BACKBONE_STRIDES = [4, 8, 16, 32, 64]

    # Width of the fully connected layers of the box classifier head.
    FPN_CLASSIF_FC_LAYERS_SIZE = 1024

    # Channels of the FPN top-down layers.
    TOP_DOWN_PYRAMID_SIZE = 256

    # Number of classes, background included.
    NUM_CLASSES = 1

    # Anchor side lengths in pixels, one per pyramid level.
    RPN_ANCHOR_SCALES = (32, 64, 128, 256, 512)

    # Anchor width/height ratios at each location.
    RPN_ANCHOR_RATIOS = [0.5, 1, 2]

    # Anchor stride in feature-map cells (1: an anchor set per cell).
    RPN_ANCHOR_STRIDE = 1

    # NMS threshold for RPN proposals.
    RPN_NMS_THRESHOLD = 0.7

    # Anchors per image used to train the RPN.
    RPN_TRAIN_ANCHORS_PER_IMAGE = 256

    # ROIs kept after tf.nn.top_k and before NMS.
    PRE_NMS_LIMIT = 6000

    # ROIs kept after NMS, in training and in inference.
    POST_NMS_ROIS_TRAINING = 2000
    POST_NMS_ROIS_INFERENCE = 1000

    # Store instance masks at a low resolution (the box crop) to save memory.
    USE_MINI_MASK = True
    MINI_MASK_SHAPE = (56, 56)

    # Input resizing: "none", "square", "pad64" or "crop" (see utils.resize_image).
    IMAGE_RESIZE_MODE = "square"
    IMAGE_MIN_DIM = 800
    IMAGE_MAX_DIM = 1024
    # Minimum scale ratio (e.g. 2 upsizes by at least 2x, whatever IMAGE_MAX_DIM says).
    IMAGE_MIN_SCALE = 0
    # Colour channels per image: 3 for RGB.
    IMAGE_CHANNEL_COUNT = 3

    # Mean pixel (RGB) subtracted from images.
    MEAN_PIXEL = np.array([123.7, 116.8, 103.9])
    # Per-channel standard deviation (RGB) the network divides its mean-subtracted input by,
    # in the graph (layer "input_scale"), so mold_image, the loaders and exported models are
    # unchanged. None (matterport): no division; pretrained weights (COCO, ImageNet) expect
    # None. For training from scratch, e.g. (58.4, 57.1, 57.4) (ImageNet's, as torchvision's
    # normalization) keeps the first activations near 1 (benchmarks/RESULTS.md).
    PIXEL_STD = None

    # ROIs per image fed to the classifier and mask heads in training.
    TRAIN_ROIS_PER_IMAGE = 200

    # Fraction of positive ROIs among them.
    ROI_POSITIVE_RATIO = 0.33

    # Add the ground-truth boxes to the RPN's proposals before sampling the heads' training
    # ROIs (Detectron2's PROPOSAL_APPEND_GT, torchvision's default). False (matterport): the
    # heads only see positives once the RPN proposes boxes near the instances, which from
    # scratch takes hundreds of steps.
    PROPOSAL_APPEND_GT = False

    # RoIAlign output sizes of the classifier and mask heads.
    POOL_SIZE = 7
    MASK_POOL_SIZE = 14

    # Output size of the mask heads; changing it needs a change of the mask head too.
    MASK_SHAPE = [28, 28]

    # Maximum ground-truth instances per image.
    MAX_GT_INSTANCES = 100

    # Standard deviations of the box refinement targets (RPN and final detections).
    RPN_BBOX_STD_DEV = np.array([0.1, 0.1, 0.2, 0.2])
    BBOX_STD_DEV = np.array([0.1, 0.1, 0.2, 0.2])

    # Detections kept per image.
    DETECTION_MAX_INSTANCES = 100

    # Detections below this confidence are dropped.
    DETECTION_MIN_CONFIDENCE = 0.7

    # Per-class NMS threshold of the detection layer.
    DETECTION_NMS_THRESHOLD = 0.3

    # How ROIs become detections: "argmax" (matterport: each ROI its best class) or
    # "per_class" (Detectron2 / torchvision: each ROI a detection for every class whose score
    # passes DETECTION_MIN_CONFIDENCE, then per-class NMS and the DETECTION_MAX_INSTANCES
    # best). At most DETECTION_PER_CLASS_CANDIDATES (ROI, class) pairs, the best, enter NMS.
    DETECTION_SCORING = "argmax"
    DETECTION_PER_CLASS_CANDIDATES = 2000

    # Mask probabilities >= this are inside the mask (matterport's 0.5).
    DETECTION_MASK_THRESHOLD = 0.5

    # SGD with momentum. The paper uses 0.02; matterport lowered it to 0.001 for stability.
    LEARNING_RATE = 0.001
    LEARNING_MOMENTUM = 0.9

    # Learning-rate schedule (mrcnn.training.LearningRateSchedule), a function of the global
    # step (epoch x STEPS_PER_EPOCH + step), so it continues across staged train() calls and
    # resumed runs; each train() call's learning_rate is scaled by it. The defaults keep
    # matterport's constant rate. Warm-up: linear from LR_WARMUP_FACTOR x the rate to the rate
    # over the first LR_WARMUP_STEPS global steps. Decay: "none"; "step" (x LR_DECAY_FACTOR at
    # each global step in LR_DECAY_STEPS); "cosine" (to 0 at global step LR_TOTAL_STEPS).
    LR_WARMUP_STEPS = 0
    LR_WARMUP_FACTOR = 0.001
    LR_DECAY = "none"
    LR_DECAY_STEPS = ()
    LR_DECAY_FACTOR = 0.1
    LR_TOTAL_STEPS = 0

    # Training states (mrcnn.training_state: weights, optimizer, step, data position) are
    # written every CHECKPOINT_EVERY_STEPS global steps (0: at epoch ends only) and at every
    # epoch end; the CHECKPOINT_KEEP_STATES newest are kept. train() resumes from the newest
    # one in its run folder, exactly. 300 steps: about five minutes of the fashion
    # configuration on an RTX 2080 Ti (estimated ~1 s per step), so a kill costs at most that.
    CHECKPOINT_EVERY_STEPS = 300
    CHECKPOINT_KEEP_STATES = 2

    # L2 weight decay on every non-BatchNorm weight.
    WEIGHT_DECAY = 0.0001

    # Per-instance attributes (Fashionpedia's Attribute-Mask R-CNN): the number of attribute
    # ids (0 = off: matterport's graph, outputs, losses and weights). When on, the box head
    # has a sigmoid output "mrcnn_attribute_logits" [batch, rois, NUM_ATTRIBUTES] trained on
    # the positive ROIs (mrcnn_attribute_loss, which LOSS_WEIGHTS must then name), the dataset
    # gives load_attributes(image_id) -> one sequence of attribute ids per instance, and
    # detect() adds attribute_scores [N, NUM_ATTRIBUTES] and attributes (the ids whose score
    # is >= DETECTION_ATTRIBUTE_THRESHOLD) to its results.
    NUM_ATTRIBUTES = 0
    DETECTION_ATTRIBUTE_THRESHOLD = 0.5

    # Weights of the five losses in the total (plus "mrcnn_attribute_loss" when
    # NUM_ATTRIBUTES > 0).
    LOSS_WEIGHTS = {
        "rpn_class_loss": 1.,
        "rpn_bbox_loss": 1.,
        "mrcnn_class_loss": 1.,
        "mrcnn_bbox_loss": 1.,
        "mrcnn_mask_loss": 1.,
    }

    # Train the heads on RPN proposals (True) or on ROIs given as an input (False).
    USE_RPN_ROIS = True

    # Train (True) or freeze (False) BatchNorm layers. Small batches want False.
    TRAIN_BN = False

    # Gradient norm clipping.
    GRADIENT_CLIP_NORM = 5.0

    # Initial weights of the convolution and dense layers (mrcnn.initializers): "keras"
    # (matterport: each layer's Keras default, Glorot uniform) or "torchvision" (He normal
    # with fan-out, N(0, 0.01) for the RPN and class logits, ...: torchvision's starting point
    # from scratch; it did worse than "keras" in benchmarks/bench_accuracy.py).
    WEIGHT_INIT = "keras"

    # Mask head: "fcn" (the paper's four convs and a deconv) or "unet" (the seed's U-Net).
    MASK_HEAD = "fcn"

    # Mixed precision: False (float32); True: the fast kind for the device (mixed_float16
    # with loss scaling on a GPU, e.g. the tensor cores of an RTX 2080 Ti; without a GPU
    # mixed_bfloat16 on a CPU with AVX512_BF16 / AMX, else float32: see precision_policy);
    # "float16" or "bfloat16": that policy wherever it runs (bfloat16: no loss scaling; for
    # bf16 CPUs and Ampere or newer GPUs). Losses, softmax and box decoding stay float32.
    MIXED_PRECISION = False

    # Parallel input pipeline: worker processes (0 loads in the training process) and what to
    # do with a sample that fails to load: "raise" stops with an error naming the image,
    # "skip" counts it, replaces it by another sample and reports the count per epoch.
    LOADER_WORKERS = 2
    ON_LOAD_ERROR = "raise"

    # Keep large freed blocks in glibc's heap instead of unmapping them (mrcnn.allocator):
    # TensorFlow's CPU convolutions then stop page-faulting hundreds of MB a step (a 2-core
    # training step 369 -> 249 ms, benchmarks/bench_malloc.py). Applied once per process when
    # a MaskRCNN is built; no result changes; the process keeps its peak heap. False leaves
    # malloc as it is.
    TUNE_MALLOC = True

    # Evaluation during training (mrcnn.training.EvaluationCallback; 0 = off, matterport's
    # behaviour): every EVAL_EVERY_EPOCHS epochs, COCO AP of masks and boxes and the
    # iMaterialist metric on the first EVAL_LIMIT validation images (0: all), logged as
    # val_segm_AP, ... in history and TensorBoard. EVAL_KEEP_BEST: None, or one of
    # EVAL_METRICS: keep the checkpoint with its highest value as mask_rcnn_<name>_best.
    EVAL_EVERY_EPOCHS = 0
    EVAL_LIMIT = 50
    EVAL_KEEP_BEST = None

    def __init__(self):
        self._derive()

    def _derive(self):
        """Compute the derived attributes and check the values that have a fixed range."""
        self.BATCH_SIZE = self.IMAGES_PER_GPU * self.GPU_COUNT
        if self.IMAGE_RESIZE_MODE == "crop":
            self.IMAGE_SHAPE = np.array(
                [self.IMAGE_MIN_DIM, self.IMAGE_MIN_DIM, self.IMAGE_CHANNEL_COUNT])
        else:
            self.IMAGE_SHAPE = np.array(
                [self.IMAGE_MAX_DIM, self.IMAGE_MAX_DIM, self.IMAGE_CHANNEL_COUNT])
        # image_id (1) + original_image_shape (3) + image_shape (3) + window (4) + scale (1)
        # + active_class_ids (NUM_CLASSES): see mrcnn.image_meta.
        self.IMAGE_META_SIZE = image_meta_size(self.NUM_CLASSES)
        self._check()

    def _check(self):
        # The registries (imported here: they import Keras, and they import this module).
        from mrcnn.backbone import BACKBONES
        from mrcnn.heads import MASK_HEADS
        if self.MASK_HEAD not in MASK_HEADS:
            raise ConfigError("MASK_HEAD must be one of %s (mrcnn.heads.register_mask_head), "
                              "not %r" % (", ".join(sorted(MASK_HEADS)), self.MASK_HEAD))
        if self.IMAGE_RESIZE_MODE not in RESIZE_MODES:
            raise ConfigError("IMAGE_RESIZE_MODE must be one of %s, not %r"
                              % (", ".join(RESIZE_MODES), self.IMAGE_RESIZE_MODE))
        if not (isinstance(self.MIXED_PRECISION, bool)
                or self.MIXED_PRECISION in ("float16", "bfloat16")):
            raise ConfigError("MIXED_PRECISION must be False, True, 'float16' or 'bfloat16', "
                              "not %r" % (self.MIXED_PRECISION,))
        if self.ON_LOAD_ERROR not in LOAD_ERROR_POLICIES:
            raise ConfigError("ON_LOAD_ERROR must be one of %s, not %r"
                              % (", ".join(LOAD_ERROR_POLICIES), self.ON_LOAD_ERROR))
        if not callable(self.BACKBONE) and self.BACKBONE not in BACKBONES:
            raise ConfigError("BACKBONE must be one of %s (mrcnn.backbone.register_backbone) "
                              "or a callable, not %r"
                              % (", ".join(sorted(BACKBONES)), self.BACKBONE))
        if self.NUM_CLASSES < 1 or self.GPU_COUNT < 1 or self.IMAGES_PER_GPU < 1:
            raise ConfigError("NUM_CLASSES, GPU_COUNT and IMAGES_PER_GPU must be at least 1")
        if self.IMAGE_RESIZE_MODE in ("square", "pad64", "crop") and self.IMAGE_MAX_DIM % 64:
            raise ConfigError("IMAGE_MAX_DIM must be a multiple of 64 (it is %r): the FPN "
                              "halves the image six times" % self.IMAGE_MAX_DIM)
        if self.WEIGHT_INIT not in WEIGHT_INIT_SCHEMES:
            raise ConfigError("WEIGHT_INIT must be one of %s, not %r"
                              % (", ".join(WEIGHT_INIT_SCHEMES), self.WEIGHT_INIT))
        if self.PIXEL_STD is not None and (
                np.shape(self.PIXEL_STD) != (self.IMAGE_CHANNEL_COUNT,)
                or not np.all(np.asarray(self.PIXEL_STD, dtype=float) > 0)):
            raise ConfigError("PIXEL_STD must be None or %d positive numbers (one per "
                              "channel), not %r" % (self.IMAGE_CHANNEL_COUNT, self.PIXEL_STD))
        if self.DETECTION_SCORING not in DETECTION_SCORINGS:
            raise ConfigError("DETECTION_SCORING must be one of %s, not %r"
                              % (", ".join(DETECTION_SCORINGS), self.DETECTION_SCORING))
        if not 0 < self.DETECTION_MASK_THRESHOLD < 1:
            raise ConfigError("DETECTION_MASK_THRESHOLD must be in (0, 1), not %r"
                              % (self.DETECTION_MASK_THRESHOLD,))
        if self.LR_DECAY not in LR_DECAYS:
            raise ConfigError("LR_DECAY must be one of %s, not %r"
                              % (", ".join(LR_DECAYS), self.LR_DECAY))
        if self.LR_DECAY == "cosine" and not self.LR_TOTAL_STEPS > 0:
            raise ConfigError("LR_DECAY 'cosine' needs LR_TOTAL_STEPS: the global step at which "
                              "the rate reaches 0 (e.g. epochs x STEPS_PER_EPOCH)")
        if self.LR_WARMUP_STEPS < 0 or not 0 < self.LR_WARMUP_FACTOR <= 1:
            raise ConfigError("LR_WARMUP_STEPS must be >= 0 and LR_WARMUP_FACTOR in (0, 1]")
        if list(self.LR_DECAY_STEPS) != sorted(self.LR_DECAY_STEPS):
            raise ConfigError("LR_DECAY_STEPS must be increasing global steps, not %r"
                              % (self.LR_DECAY_STEPS,))
        if self.EVAL_EVERY_EPOCHS < 0 or self.EVAL_LIMIT < 0:
            raise ConfigError("EVAL_EVERY_EPOCHS and EVAL_LIMIT must be >= 0 (0: no evaluation "
                              "during training; all validation images)")
        if self.EVAL_KEEP_BEST is not None:
            if self.EVAL_KEEP_BEST not in EVAL_METRICS:
                raise ConfigError("EVAL_KEEP_BEST must be None or one of %s, not %r"
                                  % (", ".join(EVAL_METRICS), self.EVAL_KEEP_BEST))
            if not self.EVAL_EVERY_EPOCHS:
                raise ConfigError("EVAL_KEEP_BEST needs evaluation during training: set "
                                  "EVAL_EVERY_EPOCHS (e.g. 1)")
        if self.NUM_ATTRIBUTES < 0:
            raise ConfigError("NUM_ATTRIBUTES must be >= 0 (0: no attribute head), not %r"
                              % (self.NUM_ATTRIBUTES,))
        if not 0 < self.DETECTION_ATTRIBUTE_THRESHOLD < 1:
            raise ConfigError("DETECTION_ATTRIBUTE_THRESHOLD must be in (0, 1), not %r"
                              % (self.DETECTION_ATTRIBUTE_THRESHOLD,))
        missing = set(Config.LOSS_WEIGHTS) - set(self.LOSS_WEIGHTS)
        if self.NUM_ATTRIBUTES > 0 and ATTRIBUTE_LOSS not in self.LOSS_WEIGHTS:
            missing.add(ATTRIBUTE_LOSS)
        if missing:
            raise ConfigError("LOSS_WEIGHTS lacks %s%s" % (
                ", ".join(sorted(missing)),
                " (needed with NUM_ATTRIBUTES > 0)" if ATTRIBUTE_LOSS in missing else ""))

    # ------------------------------------------------------------------ inspection

    @property
    def precision_policy(self):
        """The Keras dtype policy of MIXED_PRECISION on this machine: "float32",
        "mixed_float16" or "mixed_bfloat16". True without a GPU falls back to bfloat16 or
        float32 (see resolve_precision_policy), which is logged once."""
        policy, note = resolve_precision_policy(self.MIXED_PRECISION)
        if note and note not in _precision_notes_told:
            _precision_notes_told.add(note)
            logger.warning(note)
        return policy

    def names(self):
        """The names of all public configuration attributes, derived ones included."""
        return sorted(a for a in dir(self) if a.isupper() and not a.startswith("_"))

    def to_dict(self):
        """All configuration values by name (numpy arrays as they are)."""
        return {a: getattr(self, a) for a in self.names()}

    def display(self):
        """Print every configuration value, one per line."""
        print("\nConfigurations:")
        for key, value in self.to_dict().items():
            print("{:30} {}".format(key, value))
        print("\n")

    # ------------------------------------------------------------------ overriding

    def override(self, assignments):
        """Set attributes from strings such as "IMAGE_MAX_DIM=512".

        assignments: an iterable of "NAME=VALUE" strings, or a dict {NAME: value}. Values in
        strings are Python literals (numbers, tuples, lists, dicts, True/False/None); a bare
        word is taken as a string for string attributes. Each value must have the type of the
        attribute's current value (an int is accepted for a float, a list for a tuple or array).
        Raises ConfigError naming the attribute on an unknown name or a wrong type.
        Returns self.
        """
        if isinstance(assignments, dict):
            items = list(assignments.items())
        else:
            items = []
            for text in assignments:
                if "=" not in text:
                    raise ConfigError("expected NAME=VALUE, got %r" % (text,))
                name, raw = text.split("=", 1)
                items.append((name.strip(), raw.strip()))
        values = [(name, self._coerce(name, value)) for name, value in items]
        previous = {name: getattr(self, name) for name, _ in values}
        for name, value in values:
            setattr(self, name, value)
        try:
            self._derive()
        except ConfigError:
            # Leave the configuration as it was: all assignments or none.
            for name, value in previous.items():
                setattr(self, name, value)
            self._derive()
            raise
        return self

    def _coerce(self, name, value):
        known = self.names()
        if name not in known:
            close = [k for k in known if name.upper() in k or k in name.upper()]
            hint = (" Did you mean %s?" % " or ".join(close[:3])) if close else ""
            raise ConfigError("unknown configuration attribute %r.%s" % (name, hint))
        if name in DERIVED_ATTRIBUTES:
            raise ConfigError("%s is derived from other attributes and cannot be set; "
                              "set %s instead" % (name, {
                                  "BATCH_SIZE": "IMAGES_PER_GPU and GPU_COUNT",
                                  "IMAGE_SHAPE": "IMAGE_MAX_DIM / IMAGE_MIN_DIM",
                                  "IMAGE_META_SIZE": "NUM_CLASSES"}[name]))
        current = getattr(self, name)
        if isinstance(value, str):
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                if isinstance(current, str) or current is None or name == "MIXED_PRECISION":
                    parsed = value
                else:
                    raise ConfigError("%s=%s: not a Python literal (expected %s)"
                                      % (name, value, type(current).__name__)) from None
            value = parsed
        if name == "MIXED_PRECISION":
            return value            # a bool or a string: checked by _check
        if value is None and getattr(Config, name, False) is None:
            return value            # an option that is off (None) by default can be set off
        return _check_type(name, current, value)


def _check_type(name, current, value):
    """Return `value` converted to the kind of `current`, or raise ConfigError."""
    def wrong(expected):
        return ConfigError("%s must be %s, got %r (%s)"
                           % (name, expected, value, type(value).__name__))

    if current is None or callable(current):
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise wrong("True or False")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise wrong("a string")
        return value
    if isinstance(current, np.ndarray):
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise wrong("a sequence of %d numbers" % current.size)
        array = np.asarray(value, dtype=current.dtype)
        if array.shape != current.shape:
            raise wrong("a sequence of %d numbers" % current.size)
        return array
    if isinstance(current, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise wrong("a list or tuple")
        return type(current)(value)
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise wrong("a dict")
        unknown = set(value) - set(current)
        if unknown:
            raise ConfigError("%s has no key(s) %s; known: %s"
                              % (name, ", ".join(sorted(map(str, unknown))),
                                 ", ".join(sorted(current))))
        merged = dict(current)
        merged.update(value)
        return merged
    return value
