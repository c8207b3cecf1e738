"""fashion.py tune: thresholds tuned on the validation split for the competition metric, and
the --tuned FILE that evaluate and submit take.

    python samples/fashion/fashion.py tune --weights last [--scores 0.05,0.1,...]
        [--nms 0.3,0.4,0.5] [--mask-thresholds 0.3,...] [--min-areas 0,25,...] [--output JSON]
    python samples/fashion/fashion.py evaluate --weights last --tuned tuned.json
    python samples/fashion/fashion.py submit --weights last --dataset DIR --tuned tuned.json

The network runs once per validation image (DETECTION_MIN_CONFIDENCE at the lowest score
threshold, DETECTION_NMS_THRESHOLD at the highest NMS threshold); every setting is then scored
from the detections kept with their soft masks (mrcnn.tuning), on the masks a submission has
(non-overlapping). See docs/fashion.md, "Tuning the thresholds".
"""

import os
import time

from mrcnn import evaluate, tuning
from samples.fashion import cli


def grid_of(args):
    """The tuning.Grid of --scores, --nms, --mask-thresholds, --min-areas."""
    return tuning.Grid(args.scores, args.nms, args.mask_thresholds, args.min_areas)


def collection_sets(grid):
    """--set assignments that make the network collect what `grid` needs."""
    return ["%s=%r" % kv for kv in grid.collection_overrides().items()]


def apply_tuned(args):
    """--tuned FILE: its thresholds go before --set (so that an explicit --set still wins);
    prints them. Returns the tuning.Setting, or None without --tuned."""
    path = getattr(args, "tuned", None)
    if not path:
        return None
    setting = tuning.read_tuned(path)
    args.set = ["%s=%r" % kv for kv in setting.config_overrides().items()] + list(args.set)
    print("Tuned settings from %s: %s" % (path, setting.describe()))
    return setting


def _edges(grid, best):
    """Notes for a best value at the end of its swept range (the optimum may lie beyond)."""
    notes = []
    for name, option, values, value in (
            ("score threshold", "--scores", grid.scores, best.score_threshold),
            ("NMS threshold", "--nms", grid.nms, best.nms_threshold),
            ("mask threshold", "--mask-thresholds", grid.masks, best.mask_threshold),
            ("minimum mask area", "--min-areas", grid.min_areas, best.min_mask_area)):
        if len(values) > 1 and value in (values[0], values[-1]) and value != 0:
            notes.append("the best %s, %g, is the %s value swept (widen %s?)"
                         % (name, value, "lowest" if value == values[0] else "highest", option))
    return notes


def run(args, grid, model, source, val_ds, where, logs_arg=""):
    """The tune command once the model (built with collection_sets(grid)) is loaded: collect,
    sweep, segm AP of the best --coco-top settings, the table, the tuned-settings file.
    where: the dataset, as printed; logs_arg: " --logs DIR" for the next commands, if any."""
    config = model.config
    image_ids = list(val_ds.image_ids)
    print("Tuning %s on %d validation images of %s: %d settings (%d score x %d NMS x %d mask "
          "thresholds x %d minimum areas)" % (source, len(image_ids), where, len(grid),
                                             *grid.shape))
    print("Detecting once with DETECTION_MIN_CONFIDENCE %g, DETECTION_NMS_THRESHOLD %g, "
          "DETECTION_MAX_INSTANCES %d" % (config.DETECTION_MIN_CONFIDENCE,
                                          config.DETECTION_NMS_THRESHOLD,
                                          config.DETECTION_MAX_INSTANCES))
    collection = tuning.collect_detections(model, val_ds, image_ids,
                                           progress=lambda ids: cli.progress(ids, "detect"))
    full = sum(len(d["scores"]) >= collection.max_instances for d in collection.detections)
    if full and grid.nms[0] < collection.nms_threshold:
        print("Note: %d of %d images reached DETECTION_MAX_INSTANCES (%d): at the lower NMS "
              "thresholds they may lack detections the network would have kept (raise it with "
              "--set DETECTION_MAX_INSTANCES=N)" % (full, len(image_ids),
                                                    collection.max_instances))
    result = tuning.sweep(collection, val_ds, grid,
                          progress=lambda ks: cli.progress(ks, "sweep %d settings" % len(grid)))
    rows = result.rows()

    start = time.perf_counter()
    segm = {}
    if args.coco_top:
        coco_gt = evaluate.build_coco_gt(val_ds, image_ids)
        for setting, _, _ in rows[:args.coco_top]:
            detections = [tuning.rethreshold(d, setting, collection_nms=collection.nms_threshold)
                          for d in collection.detections]
            segm[setting] = evaluate.evaluate_coco(val_ds, image_ids, detections, ("segm",),
                                                   verbose=False, coco_gt=coco_gt)["segm"]
    coco_seconds = time.perf_counter() - start

    print("\nCompetition metric (masks as submitted: non-overlapping), best first:")
    print(result.table(top=args.show or None, extra={
        s: "segm AP %.3f  AP@0.5 %.3f" % (v["AP"], v["AP50"]) for s, v in segm.items()}))
    n = len(image_ids)
    print("\nDetection pass: %.1f s (%.2f s per image); sweep of %d settings: %.1f s "
          "(%.3f s per image)%s" % (
              collection.seconds, collection.seconds / max(1, n), len(grid), result.seconds,
              result.seconds / max(1, n),
              "; segm AP of the top %d: %.1f s" % (len(segm), coco_seconds) if segm else ""))
    best, metric, _ = rows[0]
    print("Best: %s -> competition metric %.4f%s" % (
        best.describe(), metric,
        ", segm AP %.3f" % segm[best]["AP"] if best in segm else ""))
    for note in _edges(grid, best):
        print("Note: %s" % note)

    table = []
    for setting, value, dets in rows:
        row = dict(setting.as_dict(), competition_metric=value, detections_per_image=dets)
        if setting in segm:
            row.update(segm_AP=segm[setting]["AP"], segm_AP50=segm[setting]["AP50"])
        table.append(row)
    tuning.write_tuned(
        args.output, best, competition_metric=metric,
        segm_AP=segm[best]["AP"] if best in segm else None, weights=source, images=n,
        objective="competition metric on non-overlapping masks (as submitted)",
        collected_with={"DETECTION_MIN_CONFIDENCE": collection.min_confidence,
                        "DETECTION_NMS_THRESHOLD": collection.nms_threshold,
                        "DETECTION_MAX_INSTANCES": collection.max_instances},
        grid={"scores": grid.scores, "nms": grid.nms, "masks": grid.masks,
              "min_areas": grid.min_areas},
        seconds={"detection": collection.seconds, "sweep": result.seconds,
                 "coco": coco_seconds},
        table=table)
    print("Wrote %s" % args.output)
    weights = " --weights %s%s" % (args.weights, logs_arg)
    data = " --dataset %s" % args.dataset if args.dataset else ""
    print("Next:\n  python samples/fashion/fashion.py evaluate%s%s --tuned %s"
          % (weights, data, args.output))
    print("  python samples/fashion/fashion.py submit%s --dataset %s --tuned %s"
          % (weights, args.dataset or "DIR", args.output))
    return 0


def output_path(path):
    """--output of tune: fail before the detection pass when its folder does not exist."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError("--output %s: folder %s does not exist" % (path, folder))
    return path
