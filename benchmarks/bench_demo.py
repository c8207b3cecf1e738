"""The quick-start demo, measured: `fashion.py train` on the demo data then `evaluate --weights
last`, several times, for one or more variants of the demo configuration (issue 13 item 8,
issue 15 item 6). Prints per run the training wall time, its peak RSS, segm / bbox AP and
AP@0.5, the competition metric and the attribute F1 (micro and macro over the matched
detections), then a table of medians and spreads per variant.

    python benchmarks/bench_demo.py --runs 2                     # DemoConfig as it is
    python benchmarks/bench_demo.py --runs 2 \\
        --variant 'recipe=' \\
        --variant 'matterport=LR_WARMUP_STEPS=0 LR_DECAY="none" ...'

A variant is NAME=SETTINGS, SETTINGS the `--set KEY=VALUE` words given to `train` (split on
spaces; empty: DemoConfig's own values). Each run is a fresh log folder; the runs of the
variants alternate (a, b, a, b), so the machine's load falls on all. evaluate uses the
configuration the run recorded, so the variant's detection settings apply there too.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE]

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)
from report import spread  # noqa: E402  (benchmarks/report.py)

FASHION = os.path.join(ROOT, "samples", "fashion", "fashion.py")
# Runs a command and prints the peak RSS (MB) of its process tree's largest member.
PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
        "print('peak_rss_mb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
        "file=sys.stderr); sys.exit(rc)")


def run_once(settings, logs, log_file):
    """(train seconds, peak MB, evaluate's JSON) of one train + evaluate in `logs`."""
    sets = ["--set"] + settings if settings else []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    with open(log_file, "w") as log:
        start = time.time()
        proc = subprocess.run([sys.executable, "-c", PEAK, sys.executable, FASHION, "train",
                               "--logs", logs] + sets, stdout=log, stderr=subprocess.PIPE,
                              text=True, env=env)
        seconds = time.time() - start
        log.write(proc.stderr)
        if proc.returncode:
            raise RuntimeError("train failed (see %s)" % log_file)
        peak = float(proc.stderr.strip().splitlines()[-1].split()[-1])
        out = os.path.join(logs, "evaluate.json")
        proc = subprocess.run([sys.executable, FASHION, "evaluate", "--weights", "last",
                               "--logs", logs, "--output", out], stdout=log,
                              stderr=subprocess.STDOUT, env=env)
        if proc.returncode:
            raise RuntimeError("evaluate failed (see %s)" % log_file)
    with open(out) as f:
        return seconds, peak, json.load(f)


def figures(seconds, peak, result):
    coco = result["coco"]
    row = {"train_min": seconds / 60, "peak_gb": peak / 1024,
           "segm_AP": coco["segm"]["AP"], "segm_AP50": coco["segm"]["AP50"],
           "bbox_AP": coco["bbox"]["AP"], "bbox_AP50": coco["bbox"]["AP50"],
           "competition": result["competition_metric"]}
    attributes = result.get("attributes")
    if attributes:
        row["attr_F1_micro"] = attributes["per_attribute_micro"]["f1"]
        row["attr_F1_macro"] = attributes["per_attribute_macro"]["f1"]
        row["attr_AP_iou_f1"] = attributes["iou_f1"]["AP"]
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=SETTINGS (repeatable; default: one variant, DemoConfig's values)")
    p.add_argument("--keep", help="keep the run folders under this directory")
    p.add_argument("--out", help="append each run's figures (JSON line) to this file")
    args = p.parse_args()
    variants = []
    for text in args.variant or ["demo="]:
        name, _, settings = text.partition("=")
        variants.append((name, shlex.split(settings)))
    base = args.keep or tempfile.mkdtemp(prefix="bench-demo-")
    print("CPU: %s, %d cores; %d run(s) of %s" % (cpu_model(), os.cpu_count(), args.runs,
                                                   ", ".join(n for n, _ in variants)), flush=True)
    rows = {name: [] for name, _ in variants}
    for run in range(args.runs):
        for name, settings in variants:
            logs = os.path.join(base, "%s-%d" % (name, run))
            os.makedirs(logs, exist_ok=True)
            row = figures(*run_once(settings, logs, os.path.join(logs, "output.txt")))
            row.update(variant=name, run=run, settings=settings)
            rows[name].append(row)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            print("%s run %d: %s" % (name, run, ", ".join(
                "%s %.3f" % (k, v) for k, v in row.items() if isinstance(v, float))), flush=True)
    keys = [k for k in rows[variants[0][0]][0] if isinstance(rows[variants[0][0]][0][k], float)]
    print("\n| variant | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for name, _ in variants:
        print("| %s | %s |" % (name, " | ".join(spread([r[k] for r in rows[name]])
                                                for k in keys)))
    print("(median (min-max) over %d run(s); run folders in %s)" % (args.runs, base))


if __name__ == "__main__":
    main()
