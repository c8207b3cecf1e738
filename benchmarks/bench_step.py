"""Training step time of two checkouts side by side: bench_accuracy's recipe-fcn network
(128 px, ResNet50, all layers, SGD with momentum, clip, L2 decay) in each tree's own code.

    git worktree add /tmp/before <commit>
    python benchmarks/bench_step.py --tree /tmp/before --tree . --runs 3

Each run is its own process: build the model of that tree, load 8 fixed batches, time
`keras_model.train_on_batch` over --steps steps after --warmup untimed ones, print the median
step. Runs alternate between the trees (a, b, a, b, ...), so the machine's load falls on both;
the table gives each tree's median of run medians, their range, and the per-pair difference.
"""

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)
from report import worker_result  # noqa: E402  (benchmarks/report.py)

# The worker builds the configuration from bench_accuracy's SHARED and RECIPE, which older
# checkouts have too, rather than from a helper only this one would have.
WORKER = """
import json, os, sys, tempfile, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
tree, steps, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path[:0] = [tree, os.path.join(tree, "benchmarks")]
import numpy as np, keras
import bench_accuracy as B
from mrcnn.config import Config
from mrcnn.data import DataGenerator
from mrcnn.model import MaskRCNN

class StepConfig(Config):
    NAME = "step"
    NUM_CLASSES = 4

config = StepConfig().override(dict(B.SHARED, **B.RECIPE, MASK_HEAD="fcn",
                                    STEPS_PER_EPOCH=steps, LR_TOTAL_STEPS=steps))
keras.utils.set_random_seed(0)
train, _ = B.datasets()
model = MaskRCNN("training", config, model_dir=tempfile.mkdtemp())
model.set_trainable(".*", verbose=0)
model.compile(config.LEARNING_RATE, config.LEARNING_MOMENTUM)
generator = DataGenerator(train, config, shuffle=False)
batches = [generator[i][0] for i in range(8)]
times = []
for i in range(warmup + steps):
    start = time.perf_counter()
    model.keras_model.train_on_batch(batches[i % len(batches)])
    times.append(time.perf_counter() - start)
print("RESULT", json.dumps({"median_ms": 1000 * float(np.median(times[warmup:]))}))
"""


def run(tree, steps, warmup):
    return worker_result(WORKER, [os.path.abspath(tree), steps, warmup],
                         "run in %s" % tree)["median_ms"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", action="append", required=True,
                   help="a checkout of this repository (give two)")
    p.add_argument("--runs", type=int, default=3, help="runs per tree (alternating)")
    p.add_argument("--steps", type=int, default=120, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (tracing)")
    args = p.parse_args()
    print("CPU: %s, %d cores" % (cpu_model(), os.cpu_count()), flush=True)
    results = {tree: [] for tree in args.tree}
    for k in range(args.runs):
        for tree in args.tree:
            results[tree].append(run(tree, args.steps, args.warmup))
            print("run %d %s: %.1f ms/step" % (k, tree, results[tree][-1]), flush=True)
    print("\n| tree | ms/step, median (range) of %d runs |" % args.runs)
    print("| --- | --- |")
    for tree, values in results.items():
        print("| %s | %.1f (%.1f-%.1f) |" % (tree, statistics.median(values), min(values),
                                             max(values)))
    if len(args.tree) == 2:
        a, b = (results[t] for t in args.tree)
        print("\nper pair, second tree against the first: %s"
              % ", ".join("%+.1f%%" % (100 * (y - x) / x) for x, y in zip(a, b)))


if __name__ == "__main__":
    main()
