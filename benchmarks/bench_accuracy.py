"""Accuracy at a fixed CPU budget (issue 13): this project's Mask R-CNN, with matterport's
defaults and with the new recipe, each mask head, and torchvision's Mask R-CNN, all trained from
scratch for the same wall-clock time on the same images, then scored on the same validation
images with pycocotools (segm and bbox AP, AP@0.5) and the detection count against the object
count.

    python benchmarks/bench_accuracy.py --minutes 5 --runs 2            # every case, a table
    python benchmarks/bench_accuracy.py --case recipe-fcn --minutes 5   # one case, JSON line
    python benchmarks/bench_accuracy.py --case recipe-fcn --minutes 3 \
        --set PROPOSAL_APPEND_GT=False                                 # an ablation

Data: benchmarks/accuracy_data.py (textured ellipses, rings and stars on gradient backgrounds,
occluding each other; generated unlike the fashion demo): 400 training images (seed 1), 50
validation images (seed 2), 128 px.

Cases (the network is the same size on both sides; see SHARED):
  defaults-fcn   mrcnn with matterport's behaviour: constant learning rate 0.002, no
                 augmentation, argmax detection scoring, NMS 0.3, mask threshold 0.5; FCN head
  defaults-unet  the same with the U-Net mask head
  recipe-fcn     the new recipe: linear warm-up (50 steps from 0.001x) then cosine decay to 0 at
                 the end of the budget from 0.004, default_augmentation with scale jitter
                 0.8-1.25, per-class detection scoring with NMS 0.5, and what training from
                 scratch needs: the input divided by ImageNet's pixel standard deviation
                 (PIXEL_STD, as torchvision normalizes) and the ground-truth boxes among the
                 heads' training proposals (PROPOSAL_APPEND_GT, as torchvision does); FCN head
  recipe-unet    the same with the U-Net mask head
  torchvision    torchvision's MaskRCNN built to the same sizes (ResNet50-FPN with 128 FPN
                 channels, frozen BatchNorm, matterport's RPN with its 3x3 conv to 512 channels
                 (torchvision's RPNHead keeps the FPN's 128), 256-wide box MLP, 4x256 mask convs
                 on 8x8 RoIAlign to 16x16 masks, the same anchors and sampling counts), the
                 recipe's schedule, horizontal flips, its own per-class scoring (NMS 0.5,
                 score >= 0.05) and its own input normalization

The budget counts training only (model building and evaluation are outside it). The cosine
schedule needs the number of steps the budget holds: each case first times PILOT_STEPS steps
(not counted, the weights then reset to their initial values) and sets the horizon to the
budget divided by that step time; a deadline ends training at the budget in any case.
Each (case, run) is its own process, the runs interleaved (run 0 of every case, then run 1, in
a rotated order), so the machine's load falls on all. Seeds: run k initializes with seed k on
both sides; the data are the same in every run.

torch / torchvision are optional (pip install torch==2.14.1 torchvision==0.29.1); without them
the torchvision case is skipped. Both sides use 2 threads (TF's default here; torch set).
"""

import argparse
import copy
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)
from report import spread  # noqa: E402  (benchmarks/report.py)

CASES = ("defaults-fcn", "defaults-unet", "recipe-fcn", "recipe-unet", "torchvision")
TRAIN_IMAGES, VAL_IMAGES = 400, 50
PILOT_STEPS = 40
TORCH_THREADS = 2
RPN_CONV_CHANNELS = 512      # matterport's rpn_conv_shared (mrcnn.heads.rpn_graph)

# What both sides share: input, anchors, sampling, head sizes, optimizer.
SHARED = dict(
    IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=128, IMAGES_PER_GPU=1, GPU_COUNT=1,
    BACKBONE="resnet50", TRAIN_BN=False, RPN_ANCHOR_SCALES=(8, 16, 32, 64, 128),
    RPN_TRAIN_ANCHORS_PER_IMAGE=64, PRE_NMS_LIMIT=1000, POST_NMS_ROIS_TRAINING=128,
    POST_NMS_ROIS_INFERENCE=100, TRAIN_ROIS_PER_IMAGE=24, ROI_POSITIVE_RATIO=0.33,
    TOP_DOWN_PYRAMID_SIZE=128, FPN_CLASSIF_FC_LAYERS_SIZE=256, MASK_POOL_SIZE=8,
    MASK_SHAPE=[16, 16], MAX_GT_INSTANCES=10, DETECTION_MAX_INSTANCES=20,
    DETECTION_MIN_CONFIDENCE=0.05, LEARNING_MOMENTUM=0.9, WEIGHT_DECAY=0.0001,
    GRADIENT_CLIP_NORM=5.0, VALIDATION_STEPS=1, CHECKPOINT_EVERY_STEPS=0, LOADER_WORKERS=1,
)
DEFAULTS = dict(LEARNING_RATE=0.002, DETECTION_NMS_THRESHOLD=0.3)
RECIPE = dict(LEARNING_RATE=0.004, LR_WARMUP_STEPS=50, LR_WARMUP_FACTOR=0.001,
              LR_DECAY="cosine", DETECTION_SCORING="per_class", DETECTION_NMS_THRESHOLD=0.5,
              PIXEL_STD=(58.4, 57.1, 57.4), PROPOSAL_APPEND_GT=True)
RECIPE_SCALE_RANGE = (0.8, 1.25)


def lr_factor(step, total, warmup=RECIPE["LR_WARMUP_STEPS"],
              warmup_factor=RECIPE["LR_WARMUP_FACTOR"]):
    """The recipe's multiplier at a step (mrcnn.training.LearningRateSchedule's formula), for
    torchvision's LambdaLR."""
    f = warmup_factor + (1 - warmup_factor) * step / warmup if step < warmup else 1.0
    return f * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def budget_steps(times, minutes):
    """(steps, seconds per step): how many steps a budget of `minutes` holds, from a pilot's
    clock readings `times` (training start, then the end of each step): the budget less the
    first step (tracing, which the timed run pays again), at the mean time of the later half."""
    first = times[1] - times[0]
    # The later half: the loader's queue, filled while the first step traced, is drained by
    # then, so the steps pay for their loading as the timed run's do.
    late = times[len(times) // 2:]
    step_s = (late[-1] - late[0]) / (len(late) - 1)
    print("pilot: first step %.1f s, steps %s" % (first, " ".join(
        "%.2f" % (b - a) for a, b in zip(times[1:], times[2:]))), file=sys.stderr)
    return max(int((minutes * 60 - first) / step_s), RECIPE["LR_WARMUP_STEPS"] + 1), step_s


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def datasets():
    from accuracy_data import ShapesDataset
    return ShapesDataset(TRAIN_IMAGES, seed=1), ShapesDataset(VAL_IMAGES, seed=2)


def score(val, detections):
    """The figures of detections on the validation set (mrcnn.training.evaluation_metrics)."""
    from mrcnn.training import evaluation_metrics
    ids = list(val.image_ids)
    metrics = evaluation_metrics(val, ids, detections)
    metrics["detections"] = int(sum(len(r["class_ids"]) for r in detections))
    metrics["objects"] = val.object_count()
    return metrics


# ----------------------------------------------------------------------------- ours

def ours(case, minutes, seed, model_dir, overrides=()):
    import keras
    from mrcnn.config import Config
    from mrcnn.data import default_augmentation
    from mrcnn.evaluate import run_detections
    from mrcnn.model import MaskRCNN
    from mrcnn.training import copy_weights, inference_twin

    recipe = case.startswith("recipe")
    values = dict(SHARED, **(RECIPE if recipe else DEFAULTS),
                  MASK_HEAD="unet" if case.endswith("unet") else "fcn",
                  STEPS_PER_EPOCH=PILOT_STEPS, LR_TOTAL_STEPS=PILOT_STEPS)

    class BenchConfig(Config):
        NAME = "accuracy"
        NUM_CLASSES = 4

    config = BenchConfig().override(values).override(list(overrides))
    keras.utils.set_random_seed(seed)
    train, val = datasets()
    model = MaskRCNN("training", config, model_dir=model_dir)
    augmentation = (default_augmentation(RECIPE_SCALE_RANGE, config.IMAGE_SHAPE) if recipe
                    else None)
    # Each variable's initial value (get_weights' order follows trainability, which train()
    # changes).
    initial = [(v, v.numpy()) for v in model.keras_model.weights]

    # Pilot: the step time after the first (tracing) steps.
    times = []
    clock = keras.callbacks.LambdaCallback(
        on_train_begin=lambda logs: times.append(time.perf_counter()),
        on_train_batch_end=lambda batch, logs: times.append(time.perf_counter()))
    model.train(train, val, config.LEARNING_RATE, epochs=1, layers="all",
                augmentation=augmentation, custom_callbacks=[clock], seed=seed)
    horizon, step_s = budget_steps(times, minutes)

    for variable, value in initial:
        variable.assign(value)
    model.config.override({"STEPS_PER_EPOCH": horizon, "LR_TOTAL_STEPS": horizon})
    model.set_log_dir()
    model.epoch = 0
    budget = minutes * 60
    done = []
    deadline = {}

    class Deadline(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            deadline["start"] = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            done.append(batch)
            if time.perf_counter() - deadline["start"] >= budget:
                self.model.stop_training = True

    start = time.perf_counter()
    model.train(train, val, config.LEARNING_RATE, epochs=1, layers="all",
                augmentation=augmentation, custom_callbacks=[Deadline()], seed=seed)
    train_s = time.perf_counter() - start

    twin = inference_twin(model)
    copy_weights(model.keras_model, twin.keras_model)
    detections = run_detections(twin, val, list(val.image_ids), verbose=False)
    out = score(val, detections)
    out.update(case=case, seed=seed, steps=len(done), horizon=horizon, pilot_step_s=step_s,
               train_s=train_s, peak_rss_mb=peak_rss_mb())
    return out


# ----------------------------------------------------------------------------- torchvision

def tv_model(seed):
    import torch
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(seed)

    class RPNHead(torch.nn.Module):
        """matterport's RPN in torchvision's RPN-head interface: per level a shared 3x3 conv
        to `width` channels with ReLU, then 1x1 convs to the objectness logits and box deltas,
        drawn from N(0, 0.01) as torchvision's own head."""

        def __init__(self, channels, width, anchors):
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, width, 3, padding=1)
            self.cls_logits = torch.nn.Conv2d(width, anchors, 1)
            self.bbox_pred = torch.nn.Conv2d(width, 4 * anchors, 1)
            for conv in (self.conv, self.cls_logits, self.bbox_pred):
                torch.nn.init.normal_(conv.weight, std=0.01)
                torch.nn.init.zeros_(conv.bias)

        def forward(self, features):
            shared = [torch.relu(self.conv(f)) for f in features]
            return ([self.cls_logits(t) for t in shared], [self.bbox_pred(t) for t in shared])

    s = SHARED
    fpn = s["TOP_DOWN_PYRAMID_SIZE"]
    resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = BackboneWithFPN(resnet, {"layer1": "0", "layer2": "1", "layer3": "2",
                                        "layer4": "3"},
                               [256, 512, 1024, 2048], fpn, extra_blocks=LastLevelMaxPool())
    levels = ["0", "1", "2", "3"]
    anchors = AnchorGenerator(tuple((a,) for a in s["RPN_ANCHOR_SCALES"]),
                              ((0.5, 1.0, 2.0),) * len(s["RPN_ANCHOR_SCALES"]))
    classes = 4
    model = MaskRCNN(
        backbone, num_classes=None, min_size=s["IMAGE_MIN_DIM"], max_size=s["IMAGE_MAX_DIM"],
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn, RPN_CONV_CHANNELS, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=s["PRE_NMS_LIMIT"],
        rpn_pre_nms_top_n_test=s["PRE_NMS_LIMIT"],
        rpn_post_nms_top_n_train=s["POST_NMS_ROIS_TRAINING"],
        rpn_post_nms_top_n_test=s["POST_NMS_ROIS_INFERENCE"],
        rpn_batch_size_per_image=s["RPN_TRAIN_ANCHORS_PER_IMAGE"],
        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
        box_head=TwoMLPHead(fpn * 49, s["FPN_CLASSIF_FC_LAYERS_SIZE"]),
        box_predictor=FastRCNNPredictor(s["FPN_CLASSIF_FC_LAYERS_SIZE"], classes),
        box_batch_size_per_image=s["TRAIN_ROIS_PER_IMAGE"],
        box_positive_fraction=s["ROI_POSITIVE_RATIO"],
        box_detections_per_img=s["DETECTION_MAX_INSTANCES"],
        box_score_thresh=s["DETECTION_MIN_CONFIDENCE"], box_nms_thresh=0.5,
        mask_roi_pool=MultiScaleRoIAlign(levels, s["MASK_POOL_SIZE"], 2),
        mask_head=MaskRCNNHeads(fpn, [256, 256, 256, 256], 1),
        mask_predictor=MaskRCNNPredictor(256, 256, classes))
    return model, torch


def tv_sample(torch, dataset, image_id, rng):
    """One training sample as torchvision takes it (horizontal flip with p 0.5)."""
    from mrcnn import utils
    image = dataset.load_image(image_id)
    masks, class_ids = dataset.load_mask(image_id)
    if rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, ::-1]
    boxes = utils.extract_bboxes(masks)[:, [1, 0, 3, 2]].astype("float32")
    return (torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(255.0),
            {"boxes": torch.from_numpy(boxes),
             "labels": torch.from_numpy(class_ids.astype("int64")),
             "masks": torch.from_numpy(masks.transpose(2, 0, 1).astype("uint8"))})


def torchvision_case(minutes, seed):
    import numpy as np
    model, torch = tv_model(seed)
    train, val = datasets()
    params = [p for p in model.parameters() if p.requires_grad]
    rng = np.random.default_rng(seed)
    order = []

    def next_id():
        if not order:
            order.extend(rng.permutation(len(train.image_ids)).tolist())
        return order.pop()

    def make_optimizer(total):
        optimizer = torch.optim.SGD(params, lr=RECIPE["LEARNING_RATE"],
                                    momentum=SHARED["LEARNING_MOMENTUM"],
                                    weight_decay=SHARED["WEIGHT_DECAY"])
        return optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, total))

    def step(optimizer, scheduler):
        image, target = tv_sample(torch, train, next_id(), rng)
        loss = sum(model([image], [target]).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, SHARED["GRADIENT_CLIP_NORM"])
        optimizer.step()
        scheduler.step()

    model.train()
    initial = copy.deepcopy(model.state_dict())
    optimizer, scheduler = make_optimizer(PILOT_STEPS)
    times = [time.perf_counter()]
    for _ in range(PILOT_STEPS):
        step(optimizer, scheduler)
        times.append(time.perf_counter())
    horizon, step_s = budget_steps(times, minutes)
    budget = minutes * 60
    model.load_state_dict(initial)
    optimizer, scheduler = make_optimizer(horizon)
    start = time.perf_counter()
    steps = 0
    while steps < horizon and time.perf_counter() - start < budget:
        step(optimizer, scheduler)
        steps += 1
    train_s = time.perf_counter() - start

    model.eval()
    detections = []
    with torch.inference_mode():
        for image_id in val.image_ids:
            image = torch.from_numpy(val.load_image(image_id)).permute(2, 0, 1).float() / 255
            r = model([image])[0]
            boxes = r["boxes"].numpy()[:, [1, 0, 3, 2]]
            masks = (r["masks"].numpy()[:, 0] > 0.5).transpose(1, 2, 0)
            detections.append({"rois": np.round(boxes).astype(np.int32),
                               "class_ids": r["labels"].numpy().astype(np.int32),
                               "scores": r["scores"].numpy().astype(np.float32),
                               "masks": masks})
    out = score(val, detections)
    out.update(case="torchvision", seed=seed, steps=steps, horizon=horizon,
               pilot_step_s=step_s, train_s=train_s, peak_rss_mb=peak_rss_mb())
    return out


# ----------------------------------------------------------------------------- driver

def run_case(case, minutes, seed, overrides=()):
    if case == "torchvision":
        return torchvision_case(minutes, seed)
    model_dir = tempfile.mkdtemp(prefix="bench-accuracy-")
    try:
        return ours(case, minutes, seed, model_dir, overrides)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)    # checkpoints and states: ~1 GB


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=CASES, help="run one case in this process (JSON line)")
    p.add_argument("--cases", default=",".join(CASES),
                   help="comma-separated cases of the table (default: all)")
    p.add_argument("--minutes", type=float, default=15.0, help="training budget per run")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="append each run's JSON line to this file")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a configuration value of this project's cases (repeat), "
                        "for ablations, e.g. --set WEIGHT_INIT=keras")
    args = p.parse_args()
    if args.case:
        print(json.dumps(dict(run_case(args.case, args.minutes, args.seed, args.set),
                              overrides=args.set)))
        return

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error("unknown case(s) %s; known: %s" % (", ".join(unknown), ", ".join(CASES)))
    if "torchvision" in cases:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            print("torchvision is not installed: skipping its case", file=sys.stderr)
            cases.remove("torchvision")
    print("CPU: %s, %d cores; budget %.1f min per run, %d run(s) per case"
          % (cpu_model(), os.cpu_count(), args.minutes, args.runs), flush=True)
    results = {c: [] for c in cases}
    for run in range(args.runs):
        shift = run % len(cases)
        for case in cases[shift:] + cases[:shift]:
            cmd = [sys.executable, os.path.abspath(__file__), "--case", case,
                   "--minutes", str(args.minutes), "--seed", str(args.seed + run)]
            cmd += [a for value in args.set for a in ("--set", value)]
            start = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print("%s run %d failed:\n%s" % (case, run, proc.stderr[-3000:]),
                      file=sys.stderr)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["wall_s"] = time.time() - start
            results[case].append(result)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
            print("%-14s run %d: segm AP %.3f AP50 %.3f, bbox AP %.3f AP50 %.3f, %d steps "
                  "in %.0f s, %d detections / %d objects, peak %.0f MB"
                  % (case, run, result["segm_AP"], result["segm_AP50"], result["bbox_AP"],
                     result["bbox_AP50"], result["steps"], result["train_s"],
                     result["detections"], result["objects"], result["peak_rss_mb"]),
                  flush=True)

    print("\n| case | segm AP | segm AP@0.5 | bbox AP | bbox AP@0.5 | competition | steps | "
          "detections / objects |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in cases:
        rs = results[case]
        if not rs:
            continue
        print("| %s | %s | %s | %s | %s | %s | %s | %s / %d |" % (
            case, *(spread([r[k] for r in rs]) for k in
                    ("segm_AP", "segm_AP50", "bbox_AP", "bbox_AP50", "competition")),
            "-".join(str(r["steps"]) for r in rs), "-".join(str(r["detections"]) for r in rs),
            rs[0]["objects"]))
    print("(median (min-max) over %d run(s); steps and detections per run)" % args.runs)


if __name__ == "__main__":
    main()
