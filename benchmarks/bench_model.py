"""Model speed benchmark: seconds per inference and per training step, with peak memory,
of mrcnn's Mask R-CNN (both mask heads) side by side with torchvision's Mask R-CNN.

Cases (each in its own subprocess, so that peak memory of one case does not mix with another):

  inference  1024 x 1024 photo-like image, batch 1, 1000 proposals (POST_NMS_ROIS_INFERENCE),
             100 detections (DETECTION_MAX_INSTANCES, DETECTION_MIN_CONFIDENCE = 0 so that 100
             are kept; the kept count is printed). Ours: MaskRCNN.detect([image]) end to end
             (molding, graph, unmolding of 100 full-size masks); also the graph alone
             (keras_model.predict_on_batch). torchvision: model([image]) under inference_mode
             (its transform, the network, and pasting 100 masks into the image).
             R50 and R101 backbones; our "fcn" and "unet" mask heads.
  training   one SGD step (momentum 0.9, lr 0.001, gradient norm clip 5, weight decay 1e-4)
             on a fixed 512 x 512 batch of 1 image with 4 instances, R50, all layers trained.
             Ours: a DataGenerator batch of a small synthetic mrcnn.utils.Dataset, then
             keras_model.train_on_batch(inputs) after MaskRCNN.compile(lr, momentum).
             TRAIN_ROIS_PER_IMAGE = 512 (torchvision's box_batch_size_per_image),
             POST_NMS_ROIS_TRAINING = 2000 (torchvision's rpn_post_nms_top_n_train).
             ROI_POSITIVE_RATIO = 0.25 (its box_positive_fraction).
             torchvision: loss_dict = model(images, targets); sum; backward; clip; step.

Our config: NUM_CLASSES 81, IMAGES_PER_GPU 1, IMAGE_MIN_DIM = IMAGE_MAX_DIM = 1024 (512 for
training), IMAGE_RESIZE_MODE "square", BACKBONE and MASK_HEAD per case, other values the
defaults (TRAIN_BN False: frozen BatchNorm; PRE_NMS_LIMIT 6000).
torchvision: maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81,
min_size=max_size=1024 (512 for training), rpn_post_nms_top_n_test=1000,
box_detections_per_img=100, box_score_thresh=0); R101: resnet_fpn_backbone("resnet101",
weights=None) + MaskRCNN with the same options. Note: with weights_backbone=None torchvision
builds trainable BatchNorm2d layers for R50 (its pretrained-backbone default is frozen BN);
resnet_fpn_backbone uses FrozenBatchNorm2d. The "tv-train-r50-frozenbn" case (not in the
default list) trains R50 with FrozenBatchNorm2d, as our TRAIN_BN False.
Both sides use randomly initialised weights. Threads: TensorFlow's default (all cores),
torch.set_num_threads(2).

Timing: median (and min) of --runs timed runs after --warmup untimed ones. Memory: ru_maxrss
of the case's own process (model build + warm-up + runs), the RSS high-water mark.

Run from the repository root:
    /work/venv/bin/python benchmarks/bench_model.py                 # all default cases
    /work/venv/bin/python benchmarks/bench_model.py --runs 3 --cases ours-infer-r50-fcn tv-infer-r50
    /work/venv/bin/python benchmarks/bench_model.py --skip-peer     # without torchvision
    /work/venv/bin/python benchmarks/bench_model.py --profile       # per-stage times (ours and
                                                                    # torchvision), no table
torch / torchvision are optional (pip install torch==2.14.1 torchvision==0.29.1); without
them the peer cases are skipped with a message.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NUM_CLASSES = 81
INFER_SIZE = 1024
TRAIN_SIZE = 512
NUM_INSTANCES = 4
LEARNING_RATE = 0.001
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
CLIP_NORM = 5.0
TORCH_THREADS = 2

# name -> (side, kind, backbone, mask head)
CASES = {
    "tv-infer-r50": ("tv", "infer", "resnet50", "fcn"),
    "ours-infer-r50-fcn": ("ours", "infer", "resnet50", "fcn"),
    "ours-infer-r50-unet": ("ours", "infer", "resnet50", "unet"),
    "tv-infer-r101": ("tv", "infer", "resnet101", "fcn"),
    "ours-infer-r101-fcn": ("ours", "infer", "resnet101", "fcn"),
    "ours-infer-r101-unet": ("ours", "infer", "resnet101", "unet"),
    "tv-train-r50": ("tv", "train", "resnet50", "fcn"),
    "ours-train-r50-fcn": ("ours", "train", "resnet50", "fcn"),
    "ours-train-r50-unet": ("ours", "train", "resnet50", "unet"),
    "tv-train-r50-frozenbn": ("tv", "train", "resnet50", "fcn"),
    # The mask head on as many ROIs as a trained RPN gives it (the cap P =
    # int(TRAIN_ROIS_PER_IMAGE * ROI_POSITIVE_RATIO) = 128), not on the few positives that
    # random weights propose: the upper bound of our training step.
    "ours-train-r50-fcn-maxpos": ("ours", "train", "resnet50", "fcn"),
    "ours-train-r50-unet-maxpos": ("ours", "train", "resnet50", "unet"),
    # Not in the default list: MIXED_PRECISION = "bfloat16" (the mixed_bfloat16 policy; this
    # CPU has AVX512_BF16), against torchvision in float32.
    "ours-infer-r50-fcn-bf16": ("ours", "infer", "resnet50", "fcn"),
    "ours-train-r50-fcn-bf16": ("ours", "train", "resnet50", "fcn"),
    "ours-train-r50-unet-bf16": ("ours", "train", "resnet50", "unet"),
    "ours-infer-r50-unet-bf16": ("ours", "infer", "resnet50", "unet"),
    # Not in the default list: DETECTION_MIN_CONFIDENCE 0.99999 keeps no detection of the
    # random weights, so the mask head runs on 1 row instead of 100 (it runs on the kept
    # detections only): the time of an image without objects, the other end from 100.
    "ours-infer-r50-fcn-nodet": ("ours", "infer", "resnet50", "fcn"),
    "ours-infer-r50-unet-nodet": ("ours", "infer", "resnet50", "unet"),
}
# Config overrides of the cases whose names end so.
CASE_OVERRIDES = {"bf16": {"MIXED_PRECISION": "bfloat16"},
                  "nodet": {"DETECTION_MIN_CONFIDENCE": 0.99999}}
DEFAULT_CASES = [c for c in CASES if c != "tv-train-r50-frozenbn"
                 and not c.endswith(("bf16", "maxpos", "nodet"))]
# Goals: our time / torchvision's time at most this.
GOALS = {"infer": 0.6, "train": 0.8}
# Which torchvision case an "ours" case is compared with.
PEER_OF = {"infer": {"resnet50": "tv-infer-r50", "resnet101": "tv-infer-r101"},
           "train": {"resnet50": "tv-train-r50"}}


# ----------------------------------------------------------------------------- synthetic data

def photo_like_image(height, width, seed=0, num_objects=NUM_INSTANCES):
    """A photo-like uint8 RGB image (smooth lighting, textured background, blurred noise and
    a few filled objects), its instance masks [H, W, N] bool and class ids [N] (1..80)."""
    import cv2
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy /= height
    xx /= width
    image = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b = rng.uniform(-60, 60, 2)
        image[..., c] = rng.uniform(80, 170) + a * yy + b * xx
    # Low-frequency texture: coarse noise upsampled smoothly.
    coarse = rng.normal(0, 25, (height // 32, width // 32, 3)).astype(np.float32)
    image += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    masks = np.zeros((height, width, num_objects), bool)
    for i in range(num_objects):
        canvas = np.zeros((height, width), np.uint8)
        cy, cx = rng.uniform(0.2, 0.8, 2) * (height, width)
        ry, rx = rng.uniform(0.06, 0.2, 2) * (height, width)
        if i % 2:
            cv2.ellipse(canvas, (int(cx), int(cy)), (int(rx), int(ry)),
                        float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            cv2.rectangle(canvas, (int(cx - rx), int(cy - ry)), (int(cx + rx), int(cy + ry)), 1, -1)
        mask = canvas.astype(bool)
        # Objects in front hide those behind.
        masks[mask, :i] = False
        masks[..., i] = mask
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        shade = 0.75 + 0.5 * (yy[mask] - cy / height)[:, None]
        image[mask] = colour * shade
    image = cv2.GaussianBlur(image, (0, 0), 1.2)
    image += rng.normal(0, 6, image.shape).astype(np.float32)    # sensor noise
    class_ids = rng.integers(1, NUM_CLASSES, num_objects).astype(np.int32)
    keep = masks.reshape(-1, num_objects).any(axis=0)
    return np.clip(image, 0, 255).astype(np.uint8), masks[..., keep], class_ids[keep]


def machine_info():
    info = {"python": platform.python_version(), "platform": platform.platform()}
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = cpu
    info["cores"] = os.cpu_count()
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cores_usable"] = os.cpu_count()
    info["load"] = " ".join("%.2f" % v for v in os.getloadavg())
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return info


def peak_rss_mb():
    """High-water RSS of this process in MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_runs(fn, runs, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------- our side

def our_config(kind, backbone, head, **overrides):
    from mrcnn.config import Config

    size = INFER_SIZE if kind == "infer" else TRAIN_SIZE

    class BenchConfig(Config):
        NAME = "bench"
        NUM_CLASSES = 81
        GPU_COUNT = 1
        IMAGES_PER_GPU = 1
        IMAGE_RESIZE_MODE = "square"
        IMAGE_MIN_DIM = size
        IMAGE_MAX_DIM = size
        BACKBONE = backbone
        MASK_HEAD = head
        POST_NMS_ROIS_INFERENCE = 1000
        POST_NMS_ROIS_TRAINING = 2000
        DETECTION_MAX_INSTANCES = 100
        DETECTION_MIN_CONFIDENCE = 0.0
        TRAIN_ROIS_PER_IMAGE = 512
        ROI_POSITIVE_RATIO = 0.25       # torchvision's box_positive_fraction
        LEARNING_RATE = LEARNING_RATE
        LEARNING_MOMENTUM = MOMENTUM
        WEIGHT_DECAY = WEIGHT_DECAY
        GRADIENT_CLIP_NORM = CLIP_NORM
        LOADER_WORKERS = 0

    for name, value in overrides.items():
        setattr(BenchConfig, name, value)
    return BenchConfig()


def synthetic_dataset(size, count=2):
    """A small mrcnn.utils.Dataset of generated photo-like images with NUM_INSTANCES objects."""
    from mrcnn import utils

    class SyntheticDataset(utils.Dataset):
        def load(self, n):
            for i in range(1, NUM_CLASSES):
                self.add_class("synthetic", i, "class%d" % i)
            for i in range(n):
                self.add_image("synthetic", image_id=i, path=None, height=size, width=size)

        def _sample(self, image_id):
            return photo_like_image(size, size, seed=100 + image_id)

        def load_image(self, image_id):
            return self._sample(image_id)[0]

        def load_mask(self, image_id):
            _, masks, class_ids = self._sample(image_id)
            return masks, class_ids

        def image_reference(self, image_id):
            return "synthetic-%d" % image_id

    dataset = SyntheticDataset()
    dataset.load(count)
    dataset.prepare()
    return dataset


def our_training_batch(config):
    from mrcnn.data import DataGenerator
    generator = DataGenerator(synthetic_dataset(TRAIN_SIZE), config, shuffle=False, workers=0,
                              use_multiprocessing=False)
    (inputs,) = generator[0]
    return tuple(inputs)


def ours_infer(backbone, head, runs, warmup, overrides=None):
    import keras
    import tensorflow as tf
    from mrcnn.model import MaskRCNN
    config = our_config("infer", backbone, head, **(overrides or {}))
    image = photo_like_image(INFER_SIZE, INFER_SIZE, seed=1)[0]
    start = time.perf_counter()
    model = MaskRCNN("inference", config, tempfile.mkdtemp(prefix="bench_model_"))
    build = time.perf_counter() - start
    result = {}

    def detect():
        result["r"] = model.detect([image])[0]

    start = time.perf_counter()
    detect()
    first = time.perf_counter() - start
    times = time_runs(detect, runs, max(warmup - 1, 0))
    molded, metas, _ = model.mold_inputs([image])
    anchors = model.get_anchors(molded[0].shape)[None]
    graph_times = time_runs(lambda: model.keras_model.predict_on_batch([molded, metas, anchors]),
                            runs, 1)
    return {"times": times, "graph_times": graph_times, "build_s": build, "first_s": first,
            "detections": int(len(result["r"]["class_ids"])),
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
            "threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                        "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}}


def ours_train(backbone, head, runs, warmup, overrides=None, max_positive=False):
    import keras
    import tensorflow as tf
    from mrcnn import model as modellib
    from mrcnn.model import MaskRCNN
    config = our_config("train", backbone, head, **(overrides or {}))
    if max_positive:
        modellib.mask_roi_count = lambda class_ids, config: modellib.positive_rois_per_image(
            config)
    inputs = our_training_batch(config)
    start = time.perf_counter()
    model = MaskRCNN("training", config, tempfile.mkdtemp(prefix="bench_model_"))
    model.set_trainable(".*", verbose=0)
    model.compile(LEARNING_RATE, MOMENTUM)
    build = time.perf_counter() - start
    logs = {}

    def step():
        logs["l"] = model.keras_model.train_on_batch(inputs, return_dict=True)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = time_runs(step, runs, max(warmup - 1, 0))
    # How many ROIs the mask head ran on (DetectionTargetLayer samples anew on each call).
    probe = keras.Model(model.keras_model.inputs, model.keras_model.get_layer("mask_rois").output)
    mask_rois = [int(probe(inputs, training=True).shape[1]) for _ in range(3)]
    return {"times": times, "build_s": build, "first_s": first, "mask_rois": mask_rois,
            "losses": {k: float(v) for k, v in logs["l"].items()},
            "gt_instances": int((inputs[4] > 0).sum()),
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__}}


# ----------------------------------------------------------------------------- torchvision

def tv_model(kind, backbone, frozen_bn=False):
    import torch
    import torchvision
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(0)
    size = INFER_SIZE if kind == "infer" else TRAIN_SIZE
    options = dict(num_classes=NUM_CLASSES, min_size=size, max_size=size,
                   rpn_post_nms_top_n_test=1000, box_detections_per_img=100,
                   box_score_thresh=0.0)
    if backbone == "resnet50" and not frozen_bn:
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **options)
    else:
        fpn = resnet_fpn_backbone(backbone_name=backbone, weights=None,
                                  trainable_layers=5 if kind == "train" else 3)
        model = MaskRCNN(fpn, **options)
    return model, torch, torchvision


def tv_infer(backbone, runs, warmup):
    model, torch, torchvision = tv_model("infer", backbone)
    model.eval()
    image = photo_like_image(INFER_SIZE, INFER_SIZE, seed=1)[0]
    tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)
    result = {}

    def infer():
        with torch.inference_mode():
            result["r"] = model([tensor])[0]

    start = time.perf_counter()
    infer()
    first = time.perf_counter() - start
    times = time_runs(infer, runs, max(warmup - 1, 0))
    return {"times": times, "first_s": first, "detections": int(len(result["r"]["labels"])),
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
            "threads": {"intra_op": torch.get_num_threads(),
                        "inter_op": torch.get_num_interop_threads()}}


def tv_train(backbone, runs, warmup, frozen_bn=False):
    model, torch, torchvision = tv_model("train", backbone, frozen_bn=frozen_bn)
    model.train()
    image, masks, class_ids = photo_like_image(TRAIN_SIZE, TRAIN_SIZE, seed=100)
    from mrcnn import utils
    boxes = utils.extract_bboxes(masks)                       # y1, x1, y2, x2 (exclusive)
    images = [torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)]
    targets = [{"boxes": torch.from_numpy(boxes[:, [1, 0, 3, 2]].astype(np.float32)),
                "labels": torch.from_numpy(class_ids.astype(np.int64)),
                "masks": torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1))
                                          .astype(np.uint8))}]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LEARNING_RATE, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY)
    logs = {"mask_rois": []}
    # How many (positive) ROIs its mask head runs on: the boxes given to its mask RoIAlign.
    model.roi_heads.mask_roi_pool.register_forward_pre_hook(
        lambda module, args: logs["mask_rois"].append(sum(len(b) for b in args[1])))

    def step():
        optimizer.zero_grad()
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        optimizer.step()
        logs["l"] = {k: float(v) for k, v in loss_dict.items()}

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = time_runs(step, runs, max(warmup - 1, 0))
    return {"times": times, "first_s": first, "losses": logs["l"],
            "mask_rois": logs["mask_rois"][-3:], "gt_instances": int(len(class_ids)),
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__}}


# ----------------------------------------------------------------------------- profiling

# Stage of a graph op, from the Keras layer names in its name scope (first match wins).
STAGE_PATTERNS = [
    (r".*_loss$", "losses"),
    (r"^(conv1|bn_conv1|res\d.*|bn\d.*|zero_padding2d|max_pooling2d)$", "backbone ResNet"),
    (r"^fpn_.*", "FPN"),
    (r"^(rpn_.*|rpn_model)$", "RPN head"),
    (r"^anchors$", "anchors"),
    (r"^ROI$", "ProposalLayer (top-k, NMS)"),
    (r"^proposal_targets$", "DetectionTargetLayer"),
    (r"^roi_align_classifier$", "RoIAlign classifier"),
    (r"^(mrcnn_class.*|mrcnn_bbox.*|pool_squeeze)$", "classifier head"),
    (r"^(mrcnn_detection|detection_boxes)$", "DetectionLayer (NMS)"),
    (r"^roi_align_mask$", "RoIAlign mask"),
    (r"^mrcnn_mask.*$", "mask head"),
]
STAGE_ORDER = ["backbone ResNet", "FPN", "RPN head", "anchors", "ProposalLayer (top-k, NMS)",
               "DetectionTargetLayer", "RoIAlign classifier", "classifier head",
               "DetectionLayer (NMS)", "RoIAlign mask", "mask head", "losses", "other"]


def op_stage(op_name):
    """(stage, backward?) of a TF op name such as
    'gradient_tape/mask_rcnn_1/res2a_branch2a_1/convolution/Conv2DBackpropFilter'."""
    import re
    parts = op_name.split(":")[0].split("/")
    backward = parts[0] == "gradient_tape"
    if not backward and re.search(r"(?i)sgd|optimizer|clip|assignvariable|assignadd|"
                                  r"assignsub", op_name) and "mask_rcnn" not in parts[0]:
        return "optimizer update", False
    for part in parts[1:]:
        layer = re.sub(r"_\d+$", "", part)
        for pattern, stage in STAGE_PATTERNS:
            if re.match(pattern, layer):
                return stage, backward
    return "other", backward


def traced_op_times(fn, runs, logdir):
    """Run fn() `runs` times under tf.profiler; return ({op name: seconds per run} summed over
    the executor threads, seconds per run of the python thread's top-level events)."""
    import glob
    import shutil
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    shutil.rmtree(logdir, ignore_errors=True)
    tf.profiler.experimental.start(logdir)
    for _ in range(runs):
        fn()
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    ops = {}
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and "/" in name:
                    ops[name] = ops.get(name, 0.0) + event.duration_ps * 1e-12 / runs
    return ops


def ours_profile(kind, backbone, head, runs, overrides=None):
    """Where the time of our graph goes: per-op times from a tf.profiler trace of `runs`
    predictions (inference) or training steps, summed per stage (by layer name), plus the
    numpy molding / unmolding of detect()."""
    from mrcnn.model import MaskRCNN
    config = our_config(kind, backbone, head, **(overrides or {}))
    model = MaskRCNN("inference" if kind == "infer" else "training", config,
                     tempfile.mkdtemp(prefix="bench_model_"))
    km = model.keras_model
    extra = []
    if kind == "infer":
        image = photo_like_image(INFER_SIZE, INFER_SIZE, seed=1)[0]
        molded, metas, windows = model.mold_inputs([image])
        anchors = model.get_anchors(molded[0].shape)[None]
        inputs = [molded, metas, anchors]

        def run():
            return km.predict_on_batch(inputs)
        outputs = run()
        run()
        mold = statistics.median(time_runs(lambda: model.mold_inputs([image]), runs, 1))
        unmold = statistics.median(time_runs(lambda: model.unmold_detections(
            outputs[0][0], outputs[3][0], image.shape, molded[0].shape, windows[0]), runs, 1))
        extra = [("numpy: mold_inputs", mold), ("numpy: unmold_detections (100 masks)", unmold)]
    else:
        inputs = tuple(our_training_batch(config))
        model.set_trainable(".*", verbose=0)
        model.compile(LEARNING_RATE, MOMENTUM)

        def run():
            return km.train_on_batch(inputs)
        run()
        run()
    wall = statistics.median(time_runs(run, runs, 0))
    ops = traced_op_times(run, runs, tempfile.mkdtemp(prefix="bench_trace_"))
    stages, top_ops = {}, {}
    for name, seconds in ops.items():
        stage, backward = op_stage(name)
        key = stage + (" [backward]" if backward else "")
        stages[key] = stages.get(key, 0.0) + seconds
        op_type = name.rsplit(":", 1)[-1]
        top_key = (key, op_type)
        top_ops[top_key] = top_ops.get(top_key, 0.0) + seconds
    order = {name: i for i, name in enumerate(STAGE_ORDER + ["optimizer update"])}
    rows = sorted(stages.items(), key=lambda kv: (kv[0].endswith("[backward]"),
                                                  order.get(kv[0].split(" [")[0], 99)))
    op_total = sum(stages.values())
    return {"stages": [[name, seconds] for name, seconds in rows], "op_total_s": op_total,
            "graph_wall_s": wall, "extra": extra,
            "top_ops": [[k[0], k[1], v] for k, v in sorted(top_ops.items(), key=lambda kv: -kv[1])[:15]]}


def tv_profile(kind, backbone, runs):
    """torchvision per-module times through forward hooks (inference only)."""
    model, torch, _ = tv_model(kind, backbone)
    model.eval()
    modules = {"transform (normalize, resize)": model.transform,
               "backbone ResNet": model.backbone.body,
               "FPN": model.backbone.fpn,
               "RPN (head, anchors, proposals)": model.rpn,
               "RoIAlign classifier (MultiScaleRoIAlign)": model.roi_heads.box_roi_pool,
               "classifier head (TwoMLPHead + predictor)": None,
               "RoIAlign mask": model.roi_heads.mask_roi_pool,
               "mask head + predictor": None}
    acc = {}

    def hook(name, module):
        def pre(*_):
            acc.setdefault(name, []).append(-time.perf_counter())

        def post(*_):
            acc[name][-1] += time.perf_counter()
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for name, module in modules.items():
        if module is not None:
            hook(name, module)
    hook("classifier head (TwoMLPHead + predictor)", model.roi_heads.box_head)
    hook("classifier head (TwoMLPHead + predictor)#2", model.roi_heads.box_predictor)
    hook("mask head + predictor", model.roi_heads.mask_head)
    hook("mask head + predictor#2", model.roi_heads.mask_predictor)
    hook("roi_heads (all)", model.roi_heads)
    image = photo_like_image(INFER_SIZE, INFER_SIZE, seed=1)[0]
    tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255.0)
    totals = []
    with torch.inference_mode():
        model([tensor])
        acc.clear()
        for _ in range(runs):
            start = time.perf_counter()
            model([tensor])
            totals.append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in acc.items()}
    for name in list(med):
        if name.endswith("#2"):
            med[name[:-2]] += med.pop(name)
    total = statistics.median(totals)
    m = lambda name: med.get(name, 0.0)  # noqa: E731
    heads = ["RoIAlign classifier (MultiScaleRoIAlign)", "classifier head (TwoMLPHead + predictor)",
             "RoIAlign mask", "mask head + predictor"]
    rows = [(name, m(name), None) for name in ["transform (normalize, resize)", "backbone ResNet",
                                                 "FPN", "RPN (head, anchors, proposals)"]]
    rows += [(name, m(name), None) for name in heads[:2]]
    rows.append(("roi_heads rest (box decode, per-class NMS)",
                 m("roi_heads (all)") - sum(m(h) for h in heads), None))
    rows += [(name, m(name), None) for name in heads[2:]]
    rows.append(("postprocess: paste 100 masks into the image",
                 total - sum(m(n) for n in ["transform (normalize, resize)", "backbone ResNet",
                                            "FPN", "RPN (head, anchors, proposals)",
                                            "roi_heads (all)"]), None))
    return {"stages": [[name, seconds] for name, seconds, _ in rows], "wall_s": total}


# ----------------------------------------------------------------------------- worker

def run_worker(case, runs, warmup, profile, inter_op=None):
    side, kind, backbone, head = CASES[case]
    if side == "ours" and profile and inter_op is None:
        # One op at a time, so that per-op times add up to the wall clock (no overlap).
        inter_op = 1
    if side == "ours" and inter_op is not None:
        import tensorflow as tf
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    if side == "tv":
        try:
            import torch  # noqa: F401
            import torchvision  # noqa: F401
        except ImportError as e:
            return {"case": case, "skipped": "torch/torchvision not installed (%s)" % e}
    overrides = CASE_OVERRIDES.get(case.rsplit("-", 1)[-1])
    if profile:
        rows = (ours_profile(kind, backbone, head, runs, overrides) if side == "ours"
                else tv_profile(kind, backbone, runs))
        return {"case": case, "profile": rows, "peak_rss_mb": peak_rss_mb(),
                "inter_op": inter_op}
    if side == "ours":
        if kind == "infer":
            result = ours_infer(backbone, head, runs, warmup, overrides)
        else:
            result = ours_train(backbone, head, runs, warmup, overrides,
                                max_positive=case.endswith("maxpos"))
    elif kind == "infer":
        result = tv_infer(backbone, runs, warmup)
    else:
        result = tv_train(backbone, runs, warmup, frozen_bn=case.endswith("frozenbn"))
    result.update(case=case, peak_rss_mb=peak_rss_mb(), median_s=statistics.median(result["times"]),
                  min_s=min(result["times"]))
    if "graph_times" in result:
        result["graph_median_s"] = statistics.median(result["graph_times"])
    return result


def spawn(case, args):
    command = [sys.executable, os.path.abspath(__file__), "--worker", case,
               "--runs", str(args.runs), "--warmup", str(args.warmup)]
    if args.profile:
        command.append("--profile")
    if args.inter_op is not None:
        command += ["--inter-op", str(args.inter_op)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = wall
            return result
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    return {"case": case, "error": "exit code %s\n%s" % (proc.returncode, tail)}


# ----------------------------------------------------------------------------- report

def print_table(results):
    """The results table; "vs tv" is our median over torchvision's median (and, in brackets,
    min over min: less sensitive to other processes sharing the CPU)."""
    by_case = {r["case"]: r for r in results}
    header = ("%-24s %8s %8s %8s %9s %13s %5s %7s  %s"
              % ("case", "median s", "min s", "graph s", "peak MiB", "vs tv (min)", "goal",
                 "first s", "notes"))
    print(header)
    print("-" * len(header))
    for r in results:
        case = r["case"]
        if "error" in r or "skipped" in r:
            print("%-24s %s" % (case, ("SKIPPED: " + r["skipped"]) if "skipped" in r
                                else "ERROR: " + r["error"].splitlines()[0]))
            continue
        side, kind, backbone, _ = CASES[case]
        ratio, goal = "", ""
        if side == "ours":
            peer = by_case.get(PEER_OF[kind].get(backbone))
            goal = "%.1fx" % GOALS[kind]
            if peer and "median_s" in peer:
                ratio = "%.2fx (%.2fx)" % (r["median_s"] / peer["median_s"],
                                           r["min_s"] / peer["min_s"])
        notes = []
        if "detections" in r:
            notes.append("%d dets" % r["detections"])
        if "losses" in r:
            total = r["losses"].get("loss", sum(r["losses"].values()))
            notes.append("loss %.3g" % total)
        if "mask_rois" in r:
            notes.append("mask ROIs %s" % "/".join(str(n) for n in r["mask_rois"]))
        print("%-24s %8.2f %8.2f %8s %9.0f %13s %5s %7.1f  %s"
              % (case, r["median_s"], r["min_s"],
                 "%.2f" % r["graph_median_s"] if "graph_median_s" in r else "",
                 r["peak_rss_mb"], ratio, goal, r["first_s"], ", ".join(notes)))
    print("\nper-run seconds:")
    for r in results:
        if "times" in r:
            print("  %-24s %s" % (r["case"], " ".join("%.2f" % t for t in r["times"])))


def print_profile(result):
    print("\n%s  (peak RSS %.0f MiB%s)" % (result["case"], result["peak_rss_mb"],
                                           ", TF inter-op threads %s" % result["inter_op"]
                                           if result.get("inter_op") else ""))
    prof = result["profile"]
    if "op_total_s" in prof:
        wall, total = prof["graph_wall_s"], prof["op_total_s"]
        print("  graph %.3f s per run (wall, median); traced op time %.3f s per run (summed over "
              "threads; shares below are of it)" % (wall, total))
    else:
        wall = total = prof["wall_s"]
        print("  %.3f s per run (wall, median; module forward hooks)" % wall)
    for name, seconds in prof["stages"]:
        print("  %-46s %8.3f s %5.1f%%" % (name, seconds, 100.0 * seconds / total))
    for name, seconds in prof.get("extra", []):
        print("  %-46s %8.3f s  (outside the graph)" % (name, seconds))
    if prof.get("top_ops"):
        print("  top op types:")
        for stage, op_type, seconds in prof["top_ops"]:
            print("    %-44s %-28s %7.3f s" % (stage, op_type, seconds))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (>= 1)")
    parser.add_argument("--cases", nargs="+", default=None, choices=list(CASES),
                        help="cases to run (default: all but tv-train-r50-frozenbn)")
    parser.add_argument("--skip-peer", action="store_true", help="skip torchvision")
    parser.add_argument("--profile", action="store_true",
                        help="per-stage times instead of the table (default cases: "
                             "ours-infer-r50-fcn, ours-train-r50-fcn, tv-infer-r50)")
    parser.add_argument("--json", help="also write all results to this JSON file")
    parser.add_argument("--inter-op", type=int, default=None,
                        help="TensorFlow inter-op threads for our cases (default: TF's; 1 "
                             "with --profile so that op times do not overlap)")
    parser.add_argument("--table", metavar="JSON",
                        help="only print the table of a --json file written before")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.table:
        with open(args.table) as f:
            saved = json.load(f)
        machine = saved["machine"]
        print("Machine: %s, %s cores; load average before: %s\n"
              % (machine["cpu"], machine["cores"], machine["load"]))
        print_table(saved["results"])
        return

    if args.worker:
        result = run_worker(args.worker, args.runs, max(args.warmup, 1), args.profile,
                            args.inter_op)
        print("RESULT " + json.dumps(result))
        return

    cases = args.cases or (["ours-infer-r50-fcn", "ours-train-r50-fcn", "tv-infer-r50"]
                           if args.profile else DEFAULT_CASES)
    if args.skip_peer:
        cases = [c for c in cases if CASES[c][0] != "tv"]
    info = machine_info()
    import importlib.metadata as md
    versions = []
    for package in ("tensorflow", "keras", "numpy", "torch", "torchvision"):
        try:
            versions.append("%s %s" % (package, md.version(package)))
        except md.PackageNotFoundError:
            versions.append("%s absent" % package)
    print("Machine: %s, %s cores (%s usable), %s GB RAM; %s" % (
        info["cpu"], info["cores"], info["cores_usable"], info.get("memory_gb", "?"),
        info["platform"]))
    print("Python %s; %s" % (info["python"], ", ".join(versions)))
    print("Load average before: %s; threads: TensorFlow default, torch %d"
          % (info["load"], TORCH_THREADS))
    print("Runs: median of %d after %d warm-up; each case in its own process\n"
          % (args.runs, args.warmup))

    results = []
    for case in cases:
        print("running %s ..." % case, file=sys.stderr, flush=True)
        result = spawn(case, args)
        results.append(result)
        if args.profile and "profile" in result:
            print_profile(result)
        elif args.profile:
            print("\n%s: %s" % (case, result.get("skipped") or result.get("error")))
    if not args.profile:
        print_table(results)
        threads = [r.get("threads") for r in results if r.get("threads")]
        if threads:
            print("\nthreads (intra/inter op; TF 0 = default, i.e. all cores): %s"
                  % "; ".join("%s %s/%s" % (r["case"], r["threads"]["intra_op"],
                                             r["threads"]["inter_op"])
                              for r in results if r.get("threads")))
    print("\nLoad average after: %s" % " ".join("%.2f" % v for v in os.getloadavg()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
