"""Training step with and without `TUNE_MALLOC` (mrcnn.allocator): `MaskRCNN.train` as a
user runs it (Keras fit on the DataGenerator, loader worker, callbacks, scale jitter) on
bench_accuracy's recipe-fcn network (128 px, ResNet50, all layers).

    python benchmarks/bench_malloc.py --runs 3 --steps 120

Each run is its own process (the setting is per process), the two settings alternating
(on, off, on, off, ...) so the machine's load falls on both. Per run: the median and mean
step time over the later half of the steps (the loader's queue drained, tracing long past),
the process's CPU seconds per step over the same steps, its minor page faults per step, and
its peak RSS. The table gives each setting's median (range) over the runs.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)
from report import spread, worker_result  # noqa: E402  (benchmarks/report.py)

WORKER = """
import json, os, resource, sys, tempfile, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
root, steps, tune = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "on"
sys.path[:0] = [root, os.path.join(root, "benchmarks")]
import numpy as np, keras
import bench_accuracy as B
from mrcnn.config import Config
from mrcnn.data import default_augmentation
from mrcnn.model import MaskRCNN

class StepConfig(Config):
    NAME = "malloc"
    NUM_CLASSES = 4
    TUNE_MALLOC = tune

config = StepConfig().override(dict(B.SHARED, **B.RECIPE, MASK_HEAD="fcn",
                                    STEPS_PER_EPOCH=steps, LR_TOTAL_STEPS=steps))
keras.utils.set_random_seed(0)
train, val = B.datasets()
model = MaskRCNN("training", config, model_dir=tempfile.mkdtemp())
marks = []

def mark(batch, logs):
    marks.append((time.perf_counter(), time.process_time(),
                  resource.getrusage(resource.RUSAGE_SELF).ru_minflt))

clock = keras.callbacks.LambdaCallback(on_train_batch_end=mark)
model.train(train, val, config.LEARNING_RATE, epochs=1, layers="all",
            augmentation=default_augmentation(B.RECIPE_SCALE_RANGE, config.IMAGE_SHAPE),
            custom_callbacks=[clock], seed=0)
late = marks[steps // 2:]
wall = np.diff([m[0] for m in late])
n = len(late) - 1
print("RESULT", json.dumps({
    "median_ms": 1000 * float(np.median(wall)), "mean_ms": 1000 * float(wall.mean()),
    "cpu_s_per_step": (late[-1][1] - late[0][1]) / n,
    "faults_per_step": (late[-1][2] - late[0][2]) / n,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(root, steps, setting):
    return worker_result(WORKER, [root, steps, setting], "run with TUNE_MALLOC %s" % setting)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs per setting (alternating)")
    p.add_argument("--steps", type=int, default=120, help="training steps per run")
    args = p.parse_args()
    root = os.path.dirname(HERE)
    print("CPU: %s, %d cores" % (cpu_model(), os.cpu_count()), flush=True)
    results = {"on": [], "off": []}
    for k in range(args.runs):
        for setting in results:
            r = run(root, args.steps, setting)
            results[setting].append(r)
            print("run %d TUNE_MALLOC %s: %s" % (k, setting, json.dumps(r)), flush=True)
    keys = ("median_ms", "mean_ms", "cpu_s_per_step", "faults_per_step", "peak_rss_mb")
    print("\n| TUNE_MALLOC | step ms (median) | step ms (mean) | CPU s / step | page faults / "
          "step | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for setting, rows in results.items():
        print("| %s | %s |" % (setting, " | ".join(spread([r[k] for r in rows]) for k in keys)))
    on, off = (results[s] for s in ("on", "off"))
    print("\nper pair, on against off (median step): %s" % ", ".join(
        "%+.1f%%" % (100 * (a["median_ms"] - b["median_ms"]) / b["median_ms"])
        for a, b in zip(on, off)))


if __name__ == "__main__":
    main()
