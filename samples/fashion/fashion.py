"""Mask R-CNN on iMaterialist (Fashion) 2019 at FGVC6: train, evaluate, detect, submit, export.

    python samples/fashion/fashion.py train                      # the embedded demo dataset
    python samples/fashion/fashion.py evaluate --weights last
    python samples/fashion/fashion.py detect --weights last --image photo.jpg
    python samples/fashion/fashion.py train --dataset /data/imaterialist --weights coco
    python samples/fashion/fashion.py submit --weights last --dataset /data/imaterialist \\
        --output submission.csv
    python samples/fashion/fashion.py export --weights last --output export/fashion

Without --dataset, train / evaluate / detect use a small demo dataset in iMaterialist's file
format, generated on first use (samples/fashion/demo_data/), with DemoConfig (CPU-sized).
With --dataset, FashionConfig (sized for one 11 GB RTX 2080 Ti). See README.md, section
"The fashion sample (iMaterialist 2019)".

Library use:

    from samples.fashion.fashion import FashionConfig, FashionDataset
"""

import argparse
import contextlib
import csv
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from mrcnn import utils  # noqa: E402
from mrcnn.config import Config, ConfigError  # noqa: E402
from samples.fashion import demo_data  # noqa: E402
from samples.fashion.dataset import (DatasetError, FashionDataset,  # noqa: E402,F401
                                     SizeMismatchError)

DEFAULT_LOGS = os.path.join(ROOT, "logs")


############################################################
#  Configurations
############################################################

class FashionConfig(Config):
    """iMaterialist (Fashion) 2019 on one 11 GB RTX 2080 Ti.

    Memory (estimated, not measured: no GPU here; see README): ResNet101-FPN, U-Net mask
    head, 200 training ROIs per image, 1024x1024 inputs. Weights + gradients + momentum are
    about 0.8 GB (64 M parameters, float32 variables even under mixed precision); the
    activations of one 1024 px image are about 4.5 GB in float32 and half that in float16.
    So: 2 images at 1024 px need ~10 GB in float32 (too tight for 11 GB with cuDNN
    workspaces) and ~5.5-6 GB with MIXED_PRECISION (the default here, tensor cores); at
    768 px the float32 figure drops to ~6 GB, at 512 px to ~3 GB.
    """
    NAME = "fashion"
    NUM_CLASSES = 1 + 46
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


class DemoConfig(FashionConfig):
    """The demo on a 2-core CPU from random weights: `train` ends in < 10 minutes.

    Sized by step time (README, "The fashion sample"): ResNet50 at 128 px, one image per step
    (more steps beat bigger batches on a CPU), SGD at 0.002 (0.01 and above diverge from
    scratch), a slimmer FPN (128 channels) and box head (256), 24 training ROIs, and the U-Net
    mask head at 16x16 (MASK_POOL_SIZE 8) instead of 28x28, which costs a third.
    BatchNorm stays frozen (TRAIN_BN False, inherited), even from random weights: with the
    batch statistics of one 128 px image, inference (moving statistics) disagreed with
    training and segm AP@0.5 ranged 0.11-0.71 over five runs; frozen, three runs gave 0.67,
    0.85 and 0.87 (README, "The fashion sample").
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
    LEARNING_RATE = 0.002
    LOADER_WORKERS = 1


class InferenceMixin:
    GPU_COUNT = 1
    IMAGES_PER_GPU = 1


def make_config(demo, inference=False, head=None, overrides=(), strict=False):
    """The configuration for a command: DemoConfig or FashionConfig, --head, --set."""
    base = DemoConfig if demo else FashionConfig
    cls = type(base.__name__ + ("Inference" if inference else ""),
               ((InferenceMixin, base) if inference else (base,)), {})
    config = cls()
    if head:
        config.override({"MASK_HEAD": head})
    if strict:
        config.override({"ON_LOAD_ERROR": "raise"})
    if overrides:
        config.override(list(overrides))
    return config


############################################################
#  Datasets
############################################################

def is_demo_folder(folder):
    """True for a folder written by demo_data (it has the demo.json stamp)."""
    return bool(folder) and os.path.isfile(os.path.join(folder, "demo.json"))


def dataset_dir_or_demo(args):
    """(folder, demo): args.dataset, or the demo folder (generated on first use). A --dataset
    that is a demo folder counts as the demo (DemoConfig)."""
    if args.dataset:
        if not os.path.isdir(args.dataset):
            raise DatasetError("dataset folder not found: %s (expected the iMaterialist 2019 "
                               "download: train.csv, label_descriptions.json, train/, test/)"
                               % args.dataset)
        return args.dataset, is_demo_folder(args.dataset)
    return demo_data.ensure_demo_data(), True


def default_val_fraction(args, demo):
    if args.val_fraction is not None:
        return args.val_fraction
    return 0.25 if demo else 0.1


def load_split(args, subset, demo, folder, limit=None):
    ds = FashionDataset()
    ds.load_dataset(folder, subset=subset, val_fraction=default_val_fraction(args, demo),
                    seed=args.seed, limit=limit, annotations=getattr(args, "annotations", None))
    if getattr(args, "check_sizes", False):
        ds.check_image_sizes()
    ds.prepare()
    for reason, n in ds.skipped.items():
        print("%s: %d image(s) skipped (%s)" % (subset, n, reason))
    return ds


############################################################
#  Weights
############################################################

def check_weights_spec(spec):
    """Fail fast (before building a model) on a weights file that does not exist."""
    if spec and spec not in ("coco", "imagenet", "last", "none", "imagenet-if-cached") \
            and not os.path.isfile(spec):
        raise FileNotFoundError("weights file not found: %s (give coco, imagenet, last, none "
                                "or the path of a .weights.h5 / .h5 file)" % spec)


def build_model(mode, config, logs):
    from mrcnn.model import MaskRCNN
    return MaskRCNN(mode=mode, config=config, model_dir=logs)


def load_weights(model, spec, exclude=(), demo=False):
    """Load --weights into model: coco | imagenet | last | none | PATH. Returns a description."""
    from samples.fashion import weights as W
    from mrcnn.model import WeightsError  # noqa: F401
    if spec == "none":
        return "random initialisation"
    if spec == "coco":
        W.load_coco(model)
        return "COCO (matterport's mask_rcnn_coco.h5)"
    if spec == "imagenet":
        W.load_imagenet(model)
        return "ImageNet %s backbone" % model.config.BACKBONE
    if spec == "imagenet-if-cached":
        path = os.path.join(W.keras_models_dir(), W.IMAGENET_FILES[model.config.BACKBONE])
        if os.path.isfile(path):
            W.load_imagenet(model)
            return "ImageNet %s backbone" % model.config.BACKBONE
        print("Note: no ImageNet weights cached at %s; the demo starts from random weights "
              "(pass --weights imagenet to download them, or --weights none to silence this)."
              % path)
        return "random initialisation"
    if spec == "last":
        path = last_good_checkpoint(model)
    else:
        path = spec
        if not os.path.isfile(path):
            raise FileNotFoundError("weights file not found: %s (give coco, imagenet, last, none "
                                    "or the path of a .weights.h5 / .h5 file)" % path)
    by_name = bool(exclude) or not path.endswith(".weights.h5")
    model.load_weights(path, by_name=by_name, exclude=list(exclude) or None)
    return path


############################################################
#  Checkpoints and resuming
############################################################

CHECKPOINT_SUFFIX = ".weights.h5"
# The run's schedule, written into its log dir, so that `--weights last` resumes it.
RUN_RECORD = "fashion_run.json"


def checkpoint_is_readable(path):
    """True if `path` opens as HDF5 and holds Keras weights (no arrays are read)."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            return "layers" in f or "model_weights" in f or "layer_names" in f.attrs
    except (OSError, ValueError):
        return False


def last_good_checkpoint(model):
    """model.find_last(), skipping (with a warning) checkpoints of that run that do not open.

    A kill never leaves such a file (checkpoints are written to a .tmp name and renamed), but
    a power loss or a full disk can; the previous epoch's checkpoint is used instead and its
    epoch is retrained.
    """
    try:
        path = model.find_last()
    except FileNotFoundError as e:
        raise FileNotFoundError("--weights last: %s" % e) from None
    folder = os.path.dirname(path)
    names = sorted(n for n in os.listdir(folder) if n.startswith("mask_rcnn")
                   and n.endswith(CHECKPOINT_SUFFIX) and ".tmp" not in n)
    for name in reversed(names):
        candidate = os.path.join(folder, name)
        if checkpoint_is_readable(candidate):
            return candidate
        print("warning: checkpoint %s is not a readable weights file (cut short by a power loss "
              "or a full disk?); using the one before it" % candidate, file=sys.stderr)
    raise FileNotFoundError("--weights last: no readable checkpoint in %s" % folder)


def remove_partial_checkpoints(log_dir):
    """Delete `*.tmp.weights.h5` files (a checkpoint whose write was killed) from a log dir.

    find_last() ignores them anyway; removing them at the start of a run keeps the folder
    clean. One training process per log dir is assumed. Returns the removed names.
    """
    removed = []
    if log_dir and os.path.isdir(log_dir):
        for name in sorted(os.listdir(log_dir)):
            if name.startswith("mask_rcnn") and name.endswith(".tmp" + CHECKPOINT_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(log_dir, name))
                    removed.append(name)
    return removed


def read_run_record(log_dir):
    """The schedule recorded by the run in log_dir ({} if none or unreadable)."""
    path = os.path.join(log_dir, RUN_RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        record["stages"] = [(str(l), int(e), float(r)) for l, e, r in record["stages"]]
        record["pretrained"] = bool(record["pretrained"])
        return record
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        print("warning: ignoring %s (%s)" % (path, e), file=sys.stderr)
        return {}


def write_run_record(log_dir, stages, pretrained, weights):
    os.makedirs(log_dir, exist_ok=True)
    write_atomic_json(os.path.join(log_dir, RUN_RECORD), {
        "stages": [list(s) for s in stages], "pretrained": bool(pretrained),
        "weights": weights, "written": time.strftime("%Y-%m-%dT%H:%M:%S")})


############################################################
#  Training
############################################################

STAGES = (("heads", "heads"), ("4+", "4+"), ("all", "all"))


def schedule(args, config, pretrained):
    """[(layers, epochs to reach, learning rate)] of the staged schedule.

    matterport's recipe: the heads first (backbone frozen), then ResNet stage 4 and up, then
    everything with a lower learning rate. Starting from random weights there is nothing to
    freeze: the heads stage trains all layers.
    """
    lr = config.LEARNING_RATE
    stages = [
        ("heads" if pretrained else "all", args.heads_epochs,
         args.heads_lr if args.heads_lr is not None else lr),
        ("4+", args.stage4_epochs, args.stage4_lr if args.stage4_lr is not None else lr),
        ("all", args.all_epochs, args.all_lr if args.all_lr is not None else lr / 10),
    ]
    out, reached = [], 0
    for layers, epochs, rate in stages:
        if epochs and epochs > 0:
            reached += epochs
            out.append((layers, reached, rate))
    return out


def cmd_train(args):
    folder, demo = dataset_dir_or_demo(args)
    config = make_config(demo, head=args.head, overrides=args.set, strict=args.strict)
    train_ds = load_split(args, "train", demo, folder, limit=args.limit)
    val_ds = load_split(args, "val", demo, folder, limit=args.limit)
    if train_ds.num_images == 0 or val_ds.num_images == 0:
        raise DatasetError("the train/val split left %d training and %d validation images; "
                           "change --val-fraction" % (train_ds.num_images, val_ds.num_images))
    print("Dataset: %s%s — %d training / %d validation images, %d classes"
          % (folder, " (demo)" if demo else "", train_ds.num_images, val_ds.num_images,
             train_ds.num_classes - 1))
    config.display()
    model = build_model("training", config, args.logs)
    weights = args.weights or ("imagenet-if-cached" if demo else "coco")
    source = load_weights(model, weights, exclude=args.exclude, demo=demo)
    pretrained = weights not in ("none",) and source != "random initialisation"
    print("Starting weights: %s" % source)
    record = read_run_record(model.log_dir) if model.epoch > 0 else {}
    if model.epoch > 0:
        # Resuming a run (its checkpoint set model.epoch and log_dir): continue its count and
        # its schedule; the first stage trains what it trained (all layers from random weights).
        print("Resuming %s after epoch %d" % (model.log_dir, model.epoch))
        if record:
            pretrained = record["pretrained"]
        for name in remove_partial_checkpoints(model.log_dir):
            print("Removed %s (a checkpoint whose write was interrupted)" % name)
    augmentation = None
    if not args.no_augmentation:
        from mrcnn.data import default_augmentation
        augmentation = default_augmentation()
    if record and not getattr(args, "schedule_explicit", False):
        stages = record["stages"]
        print("Schedule of the run: %s" % ", ".join(
            "%s to epoch %d (lr %g)" % s for s in stages))
    else:
        stages = schedule(args, config, pretrained)
    if not stages:
        raise ConfigError("every stage has 0 epochs: nothing to train")
    write_run_record(model.log_dir, stages, pretrained, source if model.epoch == 0
                     else record.get("weights", source))
    start = time.time()
    for layers, epochs, rate in stages:
        if model.epoch >= epochs:
            print("Stage %s already done (checkpoint at epoch %d)" % (layers, model.epoch))
            continue
        print("\n=== Stage: train %s up to epoch %d, learning rate %g ===" % (layers, epochs, rate))
        model.train(train_ds, val_ds, learning_rate=rate, epochs=epochs, layers=layers,
                    augmentation=augmentation)
    minutes = (time.time() - start) / 60
    try:
        last = model.find_last()
    except FileNotFoundError:
        last = None
    print("\nTraining finished in %.1f minutes." % minutes)
    print("Logs (TensorBoard):  %s" % os.path.abspath(model.log_dir))
    print("Last checkpoint:     %s" % (os.path.abspath(last) if last else "none written"))
    data_arg = "" if demo else " --dataset %s" % folder
    logs_arg = "" if os.path.abspath(args.logs) == os.path.abspath(DEFAULT_LOGS) \
        else " --logs %s" % args.logs
    print("Next:\n  python samples/fashion/fashion.py evaluate --weights last%s%s"
          % (data_arg, logs_arg))
    print("  python samples/fashion/fashion.py detect --weights last%s --image %s"
          % (logs_arg, os.path.join(folder, "test")))
    if not demo:
        print("  python samples/fashion/fashion.py submit --weights last --dataset %s%s "
              "--output submission.csv" % (folder, logs_arg))
    print("  tensorboard --logdir %s" % os.path.abspath(args.logs))
    return 0


############################################################
#  Evaluation
############################################################

def cmd_evaluate(args):
    from mrcnn import evaluate
    folder, demo = dataset_dir_or_demo(args)
    config = make_config(demo, inference=True, head=args.head, overrides=args.set)
    val_ds = load_split(args, "val", demo, folder, limit=args.limit)
    if val_ds.num_images == 0:
        raise DatasetError("no validation images (check --val-fraction)")
    model = build_model("inference", config, args.logs)
    source = load_weights(model, args.weights, exclude=args.exclude)
    print("Evaluating %s on %d validation images of %s%s"
          % (source, val_ds.num_images, folder, " (demo)" if demo else ""))
    image_ids = list(val_ds.image_ids)
    detections = evaluate.run_detections(model, val_ds, image_ids)
    stats = evaluate.evaluate_coco(val_ds, image_ids, detections)
    score = evaluate.competition_metric(val_ds, image_ids, detections)
    print("\niMaterialist 2019 metric (mean over IoU 0.50:0.95 of TP/(TP+FP+FN), per image and "
          "class): %.4f" % score)
    print("segm AP@0.5: %.3f   segm AP: %.3f   bbox AP: %.3f"
          % (stats["segm"]["AP50"], stats["segm"]["AP"], stats["bbox"]["AP"]))
    if args.output:
        write_atomic_json(args.output, {"weights": source, "images": len(image_ids),
                                        "coco": stats, "competition_metric": score})
        print("Wrote %s" % args.output)
    return 0


def write_atomic_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


############################################################
#  Detection output and submission
############################################################

def non_overlapping(masks, scores):
    """Give each pixel to the highest-scoring mask covering it. masks [H, W, N] bool."""
    masks = np.asarray(masks, bool).copy()
    if masks.shape[-1] == 0:
        return masks
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    taken = np.zeros(masks.shape[:2], bool)
    for k in order:
        masks[..., k] &= ~taken
        taken |= masks[..., k]
    return masks


def resize_masks(masks, size):
    """Resize bool masks [H, W, N] to size x size (bilinear, >= 0.5); size 0 keeps them."""
    if not size or masks.shape[-1] == 0:
        if size and masks.shape[-1] == 0:
            return np.zeros((size, size, 0), bool)
        return masks
    import cv2
    out = np.zeros((size, size, masks.shape[-1]), bool)
    for k in range(masks.shape[-1]):
        out[..., k] = cv2.resize(masks[..., k].astype(np.float32), (size, size),
                                 interpolation=cv2.INTER_LINEAR) >= 0.5
    return out


def submission_rows(image_name, result, mask_size=512):
    """Rows (ImageId, EncodedPixels, ClassId) of one image's detections.

    Masks are resized to mask_size x mask_size (0: the image's size), then made
    non-overlapping (each pixel goes to the highest-scoring mask) and RLE-encoded; masks left
    empty are dropped. ClassId is the iMaterialist category (class id - 1). An image without
    detections gets one row with empty EncodedPixels and ClassId, so that it is listed.
    """
    masks = resize_masks(np.asarray(result["masks"], bool), mask_size)
    masks = non_overlapping(masks, result["scores"])
    rows = []
    for k, class_id in enumerate(np.asarray(result["class_ids"]).reshape(-1)):
        if masks[..., k].any():
            rows.append((image_name, utils.rle_encode(masks[..., k]), str(int(class_id) - 1)))
    if not rows:
        rows.append((image_name, "", ""))
    return rows


def cmd_submit(args):
    if not args.dataset:
        raise DatasetError("submit needs --dataset (the iMaterialist folder with test/)")
    folder, demo = dataset_dir_or_demo(args)
    config = make_config(demo, inference=True, head=args.head, overrides=args.set)
    test_ds = FashionDataset().load_dataset(folder, subset="test", limit=args.limit)
    test_ds.prepare()
    if test_ds.num_images == 0:
        raise DatasetError("no images in %s" % os.path.join(folder, "test"))
    model = build_model("inference", config, args.logs)
    source = load_weights(model, args.weights, exclude=args.exclude)
    print("Submission for %d test images with %s, masks at %s"
          % (test_ds.num_images, source,
             "%dx%d" % (args.mask_size, args.mask_size) if args.mask_size else "image size"))
    tmp = args.output + ".tmp"
    n_rows = 0
    iterator = _progress(test_ds.image_ids, "submit")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "EncodedPixels", "ClassId"])
        for image_id in iterator:
            name = test_ds.image_info[image_id]["id"]
            try:
                image = test_ds.load_image(image_id)
            except utils.ImageLoadError as e:
                print("warning: %s; listed without detections" % e, file=sys.stderr)
                writer.writerow([name, "", ""])
                continue
            result = model.detect([image], verbose=0)[0]
            rows = submission_rows(name, result, args.mask_size)
            writer.writerows(rows)
            n_rows += len(rows)
    os.replace(tmp, args.output)
    print("Wrote %s: %d rows for %d images" % (args.output, n_rows, test_ds.num_images))
    return 0


def _progress(items, desc):
    try:
        from tqdm import tqdm
        return tqdm(items, desc=desc, unit="image")
    except ImportError:
        return items


def _image_paths(path):
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path)
                       if n.lower().endswith((".jpg", ".jpeg", ".png", ".bmp")))
        return [os.path.join(path, n) for n in names]
    if not os.path.isfile(path):
        raise FileNotFoundError("image not found: %s" % path)
    return [path]


def draw_detections(image, result, class_names, path):
    """Write the image with masks, boxes, class names and scores drawn (PNG/JPEG by suffix)."""
    try:
        from mrcnn import visualize
        display = visualize.display_instances
    except ImportError:
        display = None
    if display is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        h, w = image.shape[:2]
        fig, ax = plt.subplots(1, figsize=(max(4, w / 100), max(4, h / 100)))
        display(image, result["rois"], result["masks"], result["class_ids"], class_names,
                result["scores"], ax=ax)
        fig.savefig(path, bbox_inches="tight", dpi=100)
        plt.close(fig)
        return path
    import cv2
    canvas = image.copy()
    rng = np.random.default_rng(0)
    for k in range(result["masks"].shape[-1]):
        colour = rng.integers(60, 255, 3)
        m = result["masks"][..., k]
        canvas[m] = (0.5 * canvas[m] + 0.5 * colour).astype(np.uint8)
        y1, x1, y2, x2 = [int(v) for v in result["rois"][k]]
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour.tolist(), 1)
        label = "%s %.2f" % (class_names[result["class_ids"][k]], result["scores"][k])
        cv2.putText(canvas, label, (x1, max(10, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    colour.tolist(), 1)
    cv2.imwrite(path, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    return path


def cmd_detect(args):
    from samples.fashion.dataset import read_label_descriptions, class_names_from_labels
    if args.dataset:
        categories, _, _ = read_label_descriptions(
            os.path.join(args.dataset, "label_descriptions.json"))
        class_names = class_names_from_labels(categories)
    else:
        categories = {i: {"name": n} for i, (n, _) in enumerate(demo_data.CATEGORIES)}
        class_names = class_names_from_labels(categories)
    demo = not args.dataset or is_demo_folder(args.dataset)
    paths = _image_paths(args.image)
    config = make_config(demo, inference=True, head=args.head, overrides=args.set)
    model = build_model("inference", config, args.logs)
    source = load_weights(model, args.weights, exclude=args.exclude)
    os.makedirs(args.output, exist_ok=True)
    csv_path = os.path.join(args.output, "detections.csv")
    print("Detecting with %s on %d image(s); results in %s" % (source, len(paths), args.output))
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "EncodedPixels", "Height", "Width", "ClassId", "ClassName",
                         "Score", "y1", "x1", "y2", "x2"])
        for path in _progress(paths, "detect"):
            image, _ = utils.read_image(path)
            result = model.detect([image], verbose=0)[0]
            name = os.path.basename(path)
            out_png = os.path.join(args.output, os.path.splitext(name)[0] + "_detections.png")
            draw_detections(image, result, class_names, out_png)
            h, w = image.shape[:2]
            for k, class_id in enumerate(result["class_ids"]):
                if not result["masks"][..., k].any():
                    continue   # a box whose mask is empty at this size: no RLE to write
                writer.writerow([name, utils.rle_encode(result["masks"][..., k]), h, w,
                                 int(class_id) - 1, class_names[class_id],
                                 "%.4f" % result["scores"][k]] +
                                [int(v) for v in result["rois"][k]])
            print("%s: %d instance(s) -> %s" % (name, len(result["class_ids"]), out_png))
    os.replace(csv_path + ".tmp", csv_path)
    print("Masks as RLE: %s" % csv_path)
    return 0


############################################################
#  Export (SavedModel for serving)
############################################################

def cmd_export(args):
    """Write a TensorFlow SavedModel: one uint8 image [H, W, 3] of any size in; boxes,
    class_ids, scores, masks [H, W, N] and num_detections out (see mrcnn/export.py)."""
    from mrcnn import export
    from samples.fashion.dataset import read_label_descriptions, class_names_from_labels
    output = args.output
    if os.path.isfile(output):
        raise export.ExportError("--output %s is a file; give a folder for the SavedModel"
                                 % output)
    if os.path.isdir(output) and os.listdir(output) and not args.overwrite:
        raise export.ExportError("--output %s exists and is not empty; choose a new folder or "
                                 "pass --overwrite to replace it" % output)
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise export.ExportError("--output %s: folder %s does not exist" % (output, parent))
    if args.dataset:
        categories, _, _ = read_label_descriptions(
            os.path.join(args.dataset, "label_descriptions.json"))
    else:
        categories = {i: {"name": n} for i, (n, _) in enumerate(demo_data.CATEGORIES)}
    class_names = class_names_from_labels(categories)
    demo = not args.dataset or is_demo_folder(args.dataset)
    config = make_config(demo, inference=True, head=args.head, overrides=args.set)
    model = build_model("inference", config, args.logs)
    source = load_weights(model, args.weights, exclude=args.exclude)
    if source == "random initialisation":
        print("warning: exporting random weights (--weights none)", file=sys.stderr)
    print("Exporting %s: %s, %s mask head, %d classes, IMAGE_RESIZE_MODE %s "
          "(IMAGE_MIN_DIM %d, IMAGE_MAX_DIM %d), DETECTION_MIN_CONFIDENCE %g" % (
              source, config.BACKBONE, config.MASK_HEAD, config.NUM_CLASSES,
              config.IMAGE_RESIZE_MODE, config.IMAGE_MIN_DIM, config.IMAGE_MAX_DIM,
              config.DETECTION_MIN_CONFIDENCE))
    start = time.time()
    export.export_saved_model(model, output, class_names=class_names,
                              overwrite=args.overwrite, verbose=False)
    print("SavedModel written to %s in %.0f s (config.json beside it: class names and "
          "configuration)" % (output, time.time() - start))
    print("Serve it (TensorFlow only):\n"
          "  model = tf.saved_model.load(%r)\n"
          "  out = model.signatures['serving_default'](image=tf.constant(rgb_uint8_image))\n"
          "  out['boxes'] [N, 4] int32 (y1, x1, y2, x2), out['class_ids'] [N], out['scores'] [N], "
          "out['masks'] [H, W, N] bool" % output)
    return 0


############################################################
#  Command line
############################################################

def build_parser():
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
            p.add_argument("--weights", required=True, metavar="last|PATH",
                           help="'last' (newest checkpoint in --logs) or a weights file")
        p.add_argument("--logs", default=DEFAULT_LOGS, metavar="DIR",
                       help="log and checkpoint folder (default: %(default)s)")
        p.add_argument("--head", choices=("unet", "fcn"),
                       help="mask head (default: the config's, unet)")
        p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override configuration attributes, e.g. IMAGE_MAX_DIM=768")
        p.add_argument("--exclude", default="", metavar="LAYERS",
                       help="comma-separated layer names not to load from the weights file")
        p.add_argument("--val-fraction", type=float, default=None,
                       help="validation share of train.csv's images (default 0.1; demo 0.25)")
        p.add_argument("--seed", type=int, default=42, help="seed of the train/val split")
        p.add_argument("--limit", type=int, default=None, metavar="N",
                       help="use at most N images per split")

    p = sub.add_parser("train", help="train (staged: heads -> 4+ -> all)")
    common(p, weights_required=False)
    p.add_argument("--weights", default=None, metavar="coco|imagenet|last|none|PATH",
                   help="starting weights (default: coco; demo: ImageNet if cached, else none)")
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
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="COCO AP/AR (bbox, segm) and the competition metric "
                                        "on the validation split")
    common(p, weights_required=True)
    p.add_argument("--output", metavar="JSON", help="also write the numbers to this file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("detect", help="draw detections on images and write their masks as RLE")
    common(p, weights_required=True)
    p.add_argument("--image", required=True, metavar="PATH_OR_DIR")
    p.add_argument("--output", default="detections", metavar="DIR",
                   help="output folder (default: %(default)s)")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("submit", help="write a Kaggle submission for the test images")
    common(p, weights_required=True)
    p.add_argument("--output", default="submission.csv", metavar="CSV")
    p.add_argument("--mask-size", type=int, default=512,
                   help="encode masks at this square size (default 512 as the 2019 solutions; "
                        "0 keeps each image's size)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("export", help="write a TensorFlow SavedModel serving one image of any "
                                      "size (boxes, class ids, scores, masks)")
    common(p, weights_required=True)
    p.add_argument("--output", required=True, metavar="DIR",
                   help="SavedModel folder to create (new or empty)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it already holds files")
    p.set_defaults(func=cmd_export)
    return parser


def error_message(e):
    """The message for an error a user can fix, or None for a bug (shown as a traceback)."""
    if isinstance(e, (DatasetError, ConfigError)):
        return str(e)
    if isinstance(e, (utils.ImageLoadError, utils.RLEError, utils.MaskError)):
        return ("%s\n(during training such samples are counted and skipped unless --strict)"
                % e)
    data_module = sys.modules.get("mrcnn.data")
    if data_module is not None and isinstance(e, data_module.SampleLoadError):
        return ("%s\n(--strict stops at the first bad sample; without it bad samples are "
                "counted, skipped and summarised at the end of each epoch)" % e)
    model_module = sys.modules.get("mrcnn.model")
    if model_module is not None and isinstance(e, getattr(model_module, "TrainingDivergedError",
                                                          ())):
        return ("%s\nResume with: fashion.py train --weights last and a lower --heads-lr / "
                "--stage4-lr / --all-lr (plus your other options)." % e)
    if model_module is not None and isinstance(e, getattr(model_module, "WeightsError", ())):
        return ("%s\nStart from other weights (--weights none / coco / imagenet) or skip the "
                "layers with --exclude NAME,NAME." % e)
    export_module = sys.modules.get("mrcnn.export")
    if export_module is not None and isinstance(e, export_module.ExportError):
        return str(e)
    weights_module = sys.modules.get("samples.fashion.weights")
    if weights_module is not None and isinstance(e, weights_module.WeightsUnavailable):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return "%s: %s" % (e.strerror, e.filename) if e.strerror else str(e)
    return None


TRAIN_DEFAULTS = {  # (demo, real): epochs of heads, 4+, all
    # Demo: one stage; from random weights the first stage trains all layers at LEARNING_RATE.
    True: (5, 0, 0),
    False: (2, 4, 6),
}


def _fill_train_defaults(args):
    demo = not args.dataset or is_demo_folder(args.dataset)
    heads, stage4, all_ = TRAIN_DEFAULTS[demo]
    explicit = (args.heads_epochs, args.stage4_epochs, args.all_epochs)
    args.schedule_explicit = any(v is not None for v in explicit + (
        args.heads_lr, args.stage4_lr, args.all_lr))
    if any(e is not None for e in explicit):
        heads, stage4, all_ = [e or 0 for e in explicit]
    args.heads_epochs, args.stage4_epochs, args.all_epochs = heads, stage4, all_


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    args.exclude = [n.strip() for n in args.exclude.split(",") if n.strip()]
    if args.command == "train":
        _fill_train_defaults(args)
    try:
        check_weights_spec(args.weights)
    except FileNotFoundError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - known errors become messages, others propagate
        message = error_message(e)
        if message is None:
            raise
        print("error: %s" % message, file=sys.stderr)
    return 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
