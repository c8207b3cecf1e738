"""The cost of the attribute head (issue 15): training step time and peak memory of the demo
configuration with NUM_ATTRIBUTES=0 (matterport's heads) and with NUM_ATTRIBUTES=92.

    python benchmarks/bench_attributes.py [--rounds 2] [--steps 10]

Each (setting, round) runs in its own process, the settings alternating (0, 92, 0, 92, ...),
so both see the same machine load and each peak RSS is its own. A process builds the demo's
training model (all layers trainable), loads the same batches of the demo data, and times
train_on_batch (median over --steps steps after 3 warm-up steps). Prints per setting the
median of the rounds' medians, the spread of all steps, the weight count and the peak RSS,
and the CPU model.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")




def measure(num_attributes, steps, warmup=3):
    """One process's measurement: a dict of step times, weight count and peak RSS."""
    from mrcnn.config import Config
    from mrcnn.data import DataGenerator
    from mrcnn.model import MaskRCNN
    from samples.fashion import demo_data
    from samples.fashion.configs import DemoConfig
    from samples.fashion.dataset import FashionDataset

    config = DemoConfig()
    config.override({"NUM_ATTRIBUTES": num_attributes})
    assert set(Config.LOSS_WEIGHTS) <= set(config.LOSS_WEIGHTS)
    ds = FashionDataset()
    ds.load_dataset(demo_data.ensure_demo_data(), subset="train", val_fraction=0.25)
    ds.prepare()
    with tempfile.TemporaryDirectory() as logs:
        model = MaskRCNN("training", config, logs)
        model.set_trainable(".*", verbose=0)
        model.compile(config.LEARNING_RATE, config.LEARNING_MOMENTUM)
        gen = DataGenerator(ds, config, shuffle=True, workers=0, seed=0)
        batches = [gen[i] for i in range(steps + warmup)]
        times = []
        for i, (inputs,) in enumerate(batches):
            start = time.perf_counter()
            model.keras_model.train_on_batch(inputs)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        weights = sum(int(v.numpy().size) for v in model.keras_model.trainable_weights)
    return {"times": times, "weights": weights,
            "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.steps)))
        return
    print("CPU: %s, %d cores" % (cpu_model(), os.cpu_count()))
    results = {0: [], 92: []}
    for _ in range(args.rounds):
        for setting in (0, 92):
            out = subprocess.run([sys.executable, __file__, "--child", str(setting),
                                  "--steps", str(args.steps)], capture_output=True, text=True,
                                 check=True).stdout
            results[setting].append(json.loads(out.strip().splitlines()[-1]))
    base = None
    for setting, runs in results.items():
        medians = [statistics.median(r["times"]) for r in runs]
        all_times = [t for r in runs for t in r["times"]]
        step = statistics.median(medians)
        base = step if base is None else base
        print("NUM_ATTRIBUTES=%d: step %.3f s median of %d rounds (%s; all steps %.3f-%.3f), "
              "%.3fx; %d trainable weights; peak RSS %s GB" % (
                  setting, step, len(runs), ", ".join("%.3f" % m for m in medians),
                  min(all_times), max(all_times), step / base, runs[0]["weights"],
                  ", ".join("%.2f" % r["rss_gb"] for r in runs)))


if __name__ == "__main__":
    main()
