"""Mask R-CNN on iMaterialist (Fashion) 2019 at FGVC6: train, evaluate, detect, submit, tune,
export.

    python samples/fashion/fashion.py train                      # the embedded demo dataset
    python samples/fashion/fashion.py evaluate --weights last
    python samples/fashion/fashion.py detect --weights last --image photo.jpg
    python samples/fashion/fashion.py train --dataset /data/imaterialist --weights coco
    python samples/fashion/fashion.py submit --weights last --dataset /data/imaterialist \\
        --output submission.csv
    python samples/fashion/fashion.py export --weights last --output export/fashion
    python samples/fashion/fashion.py tune --weights last        # thresholds -> tuned.json
    python samples/fashion/fashion.py submit --weights last --dataset /data/imaterialist \\
        --tuned tuned.json
    python samples/fashion/fashion.py submit --weights last --dataset /data/imaterialist \\
        --attributes                # ClassIds "6_28_71" (a model with an attribute head)

Without --dataset, train / evaluate / detect / tune use a small demo dataset in iMaterialist's file
format, generated on first use (samples/fashion/demo_data/), with DemoConfig (CPU-sized).
With --dataset, FashionConfig (sized for one 11 GB RTX 2080 Ti). Each training run records its
configuration beside its checkpoints; evaluate / detect / submit / export build the model from
the configuration recorded with the checkpoint they load (then --head and --set), so
`--weights last` alone finds the newest run and its network. See docs/fashion.md.

The parts: configs.py (configurations, the run's recorded configuration), dataset.py,
demo_data.py, weights.py (COCO / ImageNet starting weights), submission.py (detection CSVs and
the Kaggle submission), tune.py (threshold tuning, --tuned), cli.py (start-up, progress, error
messages, --weights).

Library use:

    from samples.fashion.fashion import FashionConfig, FashionDataset
"""

import contextlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mrcnn.checkpoints import (best_checkpoint_path, checkpoint_attrs,  # noqa: E402
                               remove_partial_checkpoints, state_step, write_json_atomic)
from mrcnn.config import ConfigError  # noqa: E402
from samples.fashion import cli, configs, demo_data, submission, tune  # noqa: E402
from samples.fashion.cli import load_weights_spec  # noqa: E402
from samples.fashion.configs import (DemoConfig, FashionConfig,  # noqa: E402,F401
                                     InferenceMixin, make_config)
from samples.fashion.dataset import DatasetError, FashionDataset  # noqa: E402

DEFAULT_LOGS = os.path.join(ROOT, "logs")


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


def load_split(args, subset, demo, folder, limit=None):
    """The prepared FashionDataset of one split (train / val) of `folder`."""
    fraction = args.val_fraction if args.val_fraction is not None else (0.25 if demo else 0.1)
    ds = FashionDataset()
    ds.load_dataset(folder, subset=subset, val_fraction=fraction, seed=args.seed, limit=limit,
                    annotations=getattr(args, "annotations", None))
    if getattr(args, "check_sizes", False):
        ds.check_image_sizes()
    ds.prepare()
    for reason, n in ds.skipped.items():
        print("%s: %d image(s) skipped (%s)" % (subset, n, reason))
    return ds


def class_names(args):
    """["BG", category names...] of --dataset's label_descriptions.json, or of the demo."""
    from samples.fashion.dataset import class_names_from_labels, read_label_descriptions
    if args.dataset:
        categories, _, _ = read_label_descriptions(
            os.path.join(args.dataset, "label_descriptions.json"))
    else:
        categories = {i: {"name": n} for i, (n, _) in enumerate(demo_data.CATEGORIES)}
    return class_names_from_labels(categories)


def attribute_names(args):
    """{attribute id: name} of --annotations' `attributes` (Fashionpedia), --dataset's
    label_descriptions.json, or the demo's ({} when none of them has names)."""
    import json

    from samples.fashion.dataset import read_label_descriptions
    labels = os.path.join(args.dataset or "", "label_descriptions.json")
    if getattr(args, "annotations", None):
        with open(args.annotations) as f:
            attributes = {int(a["id"]): a for a in json.load(f).get("attributes", [])}
    elif args.dataset and os.path.isfile(labels):
        _, attributes, _ = read_label_descriptions(labels)
    elif args.dataset:
        attributes = {}
    else:
        attributes = {int(a["id"]): a for a in demo_data.label_descriptions()["attributes"]}
    return {int(i): a.get("name", str(i)) for i, a in attributes.items()}


def drop_small_masks(result, min_mask_area):
    """mrcnn.tuning.drop_small_masks (--tuned's minimum area), keeping a result's per-detection
    attributes (attributes, attribute_scores) aligned with the detections it keeps."""
    import numpy as np

    from mrcnn.tuning import drop_small_masks as drop
    if not min_mask_area:
        return result
    out = drop(result, min_mask_area)
    keep = np.flatnonzero(np.asarray(result["masks"], bool).sum(axis=(0, 1)) >= min_mask_area)
    if result.get("attributes") is not None:
        out["attributes"] = [result["attributes"][i] for i in keep]
    if result.get("attribute_scores") is not None:
        out["attribute_scores"] = np.asarray(result["attribute_scores"])[keep]
    return out


def num_attributes(config):
    """The model's number of attribute ids (config.NUM_ATTRIBUTES; 0 without an attribute
    head, or with a configuration from before the head)."""
    return int(getattr(config, "NUM_ATTRIBUTES", 0) or 0)


############################################################
#  Configuration, model and weights
############################################################

def build_model(mode, config, logs):
    from mrcnn.model import MaskRCNN
    return MaskRCNN(mode=mode, config=config, model_dir=logs)


def command_config(args, demo, weights, inference):
    """(config, checkpoint path or None, the RecordedConfig of the checkpoint's run or None)
    of a command loading `weights`.

    `--weights last` is the newest run of the configuration being trained, or for inference
    of the one --set NAME= or --dataset names, else of any configuration with runs under
    --logs. The configuration recorded with the checkpoint (its run folder's config.json) is
    used when there is one; otherwise DemoConfig or FashionConfig, by the run's NAME or by
    --dataset. Then the inference settings, --head, --strict and --set.
    """
    named = args.dataset or configs.is_overridden(args.set, "NAME")
    if inference and not named:
        names = [c.NAME for c in configs.CONFIGS] + sorted(configs.recorded_names(args.logs))
    else:
        names = [make_config(demo, overrides=args.set).NAME]
    path, name = cli.weights_file(weights, args.logs, names, states=not inference)
    recorded = configs.read_run_config(os.path.dirname(os.path.abspath(path))) if path else None
    run = recorded.name if recorded else name
    if run in (FashionConfig.NAME, DemoConfig.NAME):
        demo = run == DemoConfig.NAME
    if recorded:
        print("Configuration: %s (recorded with the checkpoint)" % recorded.path)
    config = make_config(demo, inference=inference, head=args.head, overrides=args.set,
                         strict=getattr(args, "strict", False), recorded=recorded)
    return config, path, recorded


def inference_setup(args):
    """The model of evaluate / detect / submit / export with its weights loaded (see
    command_config). Returns (model, description of the weights)."""
    demo = not args.dataset or is_demo_folder(args.dataset)
    config, path, _ = command_config(args, demo, args.weights, inference=True)
    model = build_model("inference", config, args.logs)
    return model, load_weights_spec(model, path or args.weights, exclude=args.exclude)


def detector(model, tta=None):
    """image -> the detections of one image (MaskRCNN.detect), with test-time augmentation
    when `tta` (a mrcnn.tta.TTA, --tta) is given; says which."""
    if tta is None:
        return lambda image: model.detect([image], verbose=0)[0]
    from mrcnn import tta as tta_module
    print("Test-time augmentation: %s" % tta)
    return lambda image: tta_module.detect_image(model, image, tta)


############################################################
#  Training
############################################################

def train_config(args, demo):
    """(config, checkpoint path or None, weights spec) of `train`: command_config of --weights
    (default: ImageNet when cached for the demo, COCO otherwise), "imagenet-if-cached"
    resolved, PIXEL_STD turned off for starting weights that no run of this project recorded
    a configuration with (ImageNet, COCO, a matterport-style file: trained on input not
    divided by a std), then --eval-every, --eval-limit and --keep-best."""
    weights = args.weights or ("imagenet-if-cached" if demo else "coco")
    config, path, recorded = command_config(args, demo, weights, inference=False)
    weights = cli.resolve_weights_spec(weights, config.BACKBONE)
    if weights != "none" and not recorded:
        std = configs.fit_input_scale(config, args.set)
        if std is not None:
            print("Note: PIXEL_STD %s off (None): the starting weights expect the input not "
                  "divided by a std (--set PIXEL_STD=... keeps it)" % (tuple(std),))
    cli.apply_evaluation_options(config, args)
    return config, path, weights


def cmd_train(args):
    folder, demo = dataset_dir_or_demo(args)
    epochs = configs.stage_epochs(demo, (args.heads_epochs, args.stage4_epochs, args.all_epochs))
    rates = (args.heads_lr, args.stage4_lr, args.all_lr)
    config, path, weights = train_config(args, demo)
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
    source = load_weights_spec(model, path or weights, exclude=args.exclude)
    pretrained = weights != "none" and source != cli.RANDOM
    print("Starting weights: %s" % source)
    # Resuming a run: its checkpoint (or, killed in its first epoch, its training state) set
    # model.epoch and log_dir; train() continues from the newest training state.
    resuming = model.epoch > 0 or state_step(path or "") is not None
    record = configs.read_run_record(model.log_dir) if resuming else {}
    if resuming:
        # Continue its count and its schedule; the first stage trains what it trained (all
        # layers from random weights).
        print("Resuming %s after epoch %d" % (model.log_dir, model.epoch))
        if record:
            pretrained = record["pretrained"]
        for name in remove_partial_checkpoints(model.log_dir):
            print("Removed %s (a checkpoint whose write was interrupted)" % name)
    augmentation = None
    if not args.no_augmentation:
        from mrcnn.data import default_augmentation
        augmentation = default_augmentation(configs.scale_jitter(config), config.IMAGE_SHAPE)
    explicit = any(v is not None for v in (args.heads_epochs, args.stage4_epochs,
                                           args.all_epochs) + rates)
    if record and not explicit:
        stages = record["stages"]
        print("Schedule of the run: %s" % ", ".join(
            "%s to epoch %d (lr %g)" % s for s in stages))
    else:
        stages = configs.schedule(config, pretrained, epochs, rates)
    if not stages:
        raise ConfigError("every stage has 0 epochs: nothing to train")
    horizon = configs.fit_cosine_horizon(config, stages, args.set)
    if horizon:
        print("Cosine learning-rate decay to 0 at global step %d (the end of the schedule)"
              % horizon)
    configs.write_run_record(model.log_dir, stages, pretrained, source if model.epoch == 0
                             else record.get("weights", source))
    configs.write_run_config(model.log_dir, config)
    start = time.time()
    for layers, epochs, rate in stages:
        if model.epoch >= epochs:
            print("Stage %s already done (checkpoint at epoch %d)" % (layers, model.epoch))
            continue
        print("\n=== Stage: train %s up to epoch %d, learning rate %g ===" % (layers, epochs, rate))
        model.train(train_ds, val_ds, learning_rate=rate, epochs=epochs, layers=layers,
                    augmentation=augmentation, custom_callbacks=cli.training_callbacks())
    try:
        last = os.path.abspath(model.find_last())
    except FileNotFoundError:
        last = "none written"
    print("\nTraining finished in %.1f minutes." % ((time.time() - start) / 60))
    print("Logs (TensorBoard):  %s" % os.path.abspath(model.log_dir))
    print("Last checkpoint:     %s" % last)
    best = best_checkpoint_path(model.log_dir, config.NAME)
    if config.EVAL_KEEP_BEST and os.path.isfile(best):
        kept = checkpoint_attrs(best)
        print("Best checkpoint:     %s (%s %.4f after epoch %d; --weights best)"
              % (os.path.abspath(best), kept.get("best_metric"), kept.get("best_value", 0),
                 kept.get("epoch", 0)))
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
#  Evaluate, detect, submit, export
############################################################

def cmd_evaluate(args):
    from mrcnn import evaluate, tuning
    tuned = tune.apply_tuned(args)
    folder, demo = dataset_dir_or_demo(args)
    val_ds = load_split(args, "val", demo, folder, limit=args.limit)
    if val_ds.num_images == 0:
        raise DatasetError("no validation images (check --val-fraction)")
    model, source = inference_setup(args)
    print("Evaluating %s on %d validation images of %s%s"
          % (source, val_ds.num_images, folder, " (demo)" if demo else ""))
    image_ids = list(val_ds.image_ids)
    start = time.time()
    detections = evaluate.run_detections(model, val_ds, cli.progress(image_ids, "detect"),
                                         verbose=False, detect=detector(model, args.tta))
    print("Detection: %.2f s per image" % ((time.time() - start) / max(1, len(image_ids))))
    if tuned:
        # --tuned: its minimum mask area; the competition metric of the submitted masks.
        detections = [drop_small_masks(r, tuned.min_mask_area) for r in detections]
    stats = evaluate.evaluate_coco(val_ds, image_ids, detections)
    score = evaluate.competition_metric(
        val_ds, image_ids, [tuning.as_submitted(r) for r in detections] if tuned else detections)
    print("\niMaterialist 2019 metric (mean over IoU 0.50:0.95 of TP/(TP+FP+FN), per image and "
          "class%s): %.4f" % (", masks as submitted: non-overlapping" if tuned else "", score))
    print("segm AP@0.5: %.3f   segm AP: %.3f   bbox AP: %.3f"
          % (stats["segm"]["AP50"], stats["segm"]["AP"], stats["bbox"]["AP"]))
    attributes = None
    if num_attributes(model.config):
        attributes = evaluate_attributes(val_ds, image_ids, detections, model.config)
    if args.output:
        write_json_atomic(args.output, {"weights": source, "images": len(image_ids),
                                        "tta": str(args.tta) if args.tta else None,
                                        "tuned": {"file": args.tuned,
                                                  "settings": tuned.as_dict()} if tuned else None,
                                        "coco": stats, "competition_metric": score,
                                        "attributes": attributes})
        print("Wrote %s" % args.output)
    return 0


def evaluate_attributes(dataset, image_ids, detections, config):
    """Print the attribute-aware metrics (mrcnn.attribute_eval: Fashionpedia's AP over IoU and
    attribute-F1 thresholds, per-attribute precision / recall / F1) of a model with an
    attribute head; return them JSON-ready (without the per-class arrays)."""
    from mrcnn import attribute_eval
    if detections and not any(r.get("attributes") is not None for r in detections):
        print("warning: the detections carry no attributes: no attribute metrics",
              file=sys.stderr)
        return None
    info = getattr(dataset, "attribute_info", {}) or {}
    n = max([num_attributes(config)] + [int(i) + 1 for i in info])
    result = attribute_eval.evaluate_attributes(dataset, image_ids, detections, num_attributes=n)
    names = {int(i): a.get("name", str(i)) for i, a in info.items()}
    print("\n" + "\n".join(attribute_eval.format_report(result, names, top=30)))
    keep = ("iou_f1", "iou", "f1", "per_attribute_micro", "per_attribute_macro",
            "categories_with_attributes", "num_attributes", "matched", "iou_type")
    out = {k: result[k] for k in keep}
    out["per_attribute"] = {str(a): s for a, s in result["per_attribute"].items()}
    return out


def cmd_detect(args):
    names = class_names(args)
    paths = submission.image_paths(args.image)
    model, source = inference_setup(args)
    print("Detecting with %s on %d image(s); results in %s" % (source, len(paths), args.output))
    attr_names = attribute_names(args) if num_attributes(model.config) else None
    csv_path = submission.write_detections(args.output, paths, detector(model, args.tta), names,
                                           progress=lambda p: cli.progress(p, "detect"),
                                           attribute_names=attr_names)
    print("Masks as RLE: %s" % csv_path)
    return 0


def cmd_submit(args):
    if not args.dataset:
        raise DatasetError("submit needs --dataset (the iMaterialist folder with test/)")
    tuned = tune.apply_tuned(args)
    folder, _ = dataset_dir_or_demo(args)
    test_ds = FashionDataset().load_dataset(folder, subset="test", limit=args.limit)
    test_ds.prepare()
    if test_ds.num_images == 0:
        raise DatasetError("no images in %s" % os.path.join(folder, "test"))
    model, source = inference_setup(args)
    print("Submission for %d test images with %s, masks at %s"
          % (test_ds.num_images, source,
             "%dx%d" % (args.mask_size, args.mask_size) if args.mask_size else "image size"))
    with_attributes = bool(getattr(args, "attributes", False))
    if with_attributes and not num_attributes(model.config):
        print("warning: --attributes: the model has no attribute head (NUM_ATTRIBUTES 0); "
              "ClassIds are categories only", file=sys.stderr)
        with_attributes = False
    elif with_attributes:
        print("ClassIds with attributes (category_attr_attr)")
    detect = detector(model, args.tta)
    if tuned and tuned.min_mask_area:
        detect = lambda image, d=detect: drop_small_masks(d(image), tuned.min_mask_area)  # noqa: E731
    n_rows = submission.write_submission(args.output, test_ds, detect, args.mask_size,
                                         progress=lambda ids: cli.progress(ids, "submit"),
                                         attributes=with_attributes)
    print("Wrote %s: %d rows for %d images" % (args.output, n_rows, test_ds.num_images))
    return 0


def cmd_export(args):
    """Write a TensorFlow SavedModel: one uint8 image [H, W, 3] of any size in; boxes,
    class_ids, scores, masks [H, W, N] and num_detections out (see mrcnn/export.py)."""
    from mrcnn import export
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
    names = class_names(args)
    model, source = inference_setup(args)
    config = model.config
    if source == cli.RANDOM:
        print("warning: exporting random weights (--weights none)", file=sys.stderr)
    print("Exporting %s: %s, %s mask head, %d classes, IMAGE_RESIZE_MODE %s "
          "(IMAGE_MIN_DIM %d, IMAGE_MAX_DIM %d), DETECTION_MIN_CONFIDENCE %g" % (
              source, config.BACKBONE, config.MASK_HEAD, config.NUM_CLASSES,
              config.IMAGE_RESIZE_MODE, config.IMAGE_MIN_DIM, config.IMAGE_MAX_DIM,
              config.DETECTION_MIN_CONFIDENCE))
    start = time.time()
    export.export_saved_model(model, output, class_names=names, overwrite=args.overwrite,
                              verbose=False)
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

def cmd_tune(args):
    """Tune the score, NMS and mask thresholds and a minimum mask area on the validation split
    (samples/fashion/tune.py, mrcnn.tuning); write the file evaluate / submit --tuned take."""
    grid = tune.grid_of(args)
    tune.output_path(args.output)
    folder, demo = dataset_dir_or_demo(args)
    val_ds = load_split(args, "val", demo, folder, limit=args.limit)
    if val_ds.num_images == 0:
        raise DatasetError("no validation images (check --val-fraction)")
    args.set = list(args.set) + tune.collection_sets(grid)     # detect once, permissively
    model, source = inference_setup(args)
    logs_arg = "" if os.path.abspath(args.logs) == os.path.abspath(DEFAULT_LOGS) \
        else " --logs %s" % args.logs
    return tune.run(args, grid, model, source, val_ds, folder + (" (demo)" if demo else ""),
                    logs_arg)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "detect": cmd_detect,
            "submit": cmd_submit, "tune": cmd_tune, "export": cmd_export}


def build_parser():
    """The command line's parser (cli.build_parser) with this script's default --logs."""
    return cli.build_parser(DEFAULT_LOGS)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cli.quiet_tensorflow(verbose="--verbose" in argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    args.exclude = [n.strip() for n in args.exclude.split(",") if n.strip()]
    try:
        cli.check_weights_spec(args.weights)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - known errors become messages, others propagate
        message = cli.error_message(e)
        if message is None:
            raise
        print("error: %s" % message, file=sys.stderr)
    return 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
