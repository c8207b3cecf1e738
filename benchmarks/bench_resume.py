"""What a kill costs: the size and write time of a training state, and the overhead of writing
one every CHECKPOINT_EVERY_STEPS steps (issue 14).

    python benchmarks/bench_resume.py [--runs 3] [--configs fashion demo]

For each configuration: builds its training model (all layers trainable, optimizer built, as
in the last stage), writes a training state --runs times into a temporary folder and reports
the median write time, its spread and the file size; for the demo configuration it also
times training steps (median over 8 steps after 2 warm-up steps) to give the overhead of its
interval and the worst-case work lost to a SIGKILL (interval x step time + one write). The
fashion configuration (ResNet101 + U-Net, 1024 px) is not trained here (no GPU): its overhead
is given for an assumed RTX 2080 Ti step time (--gpu-step-seconds, default 1.0 s, an estimate
stated as such). Prints the CPU model and peak RSS.
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")




def make_config(name):
    from samples.fashion.configs import DemoConfig, FashionConfig
    cls = {"fashion": FashionConfig, "demo": DemoConfig}[name]
    config = cls()
    config.override({"MIXED_PRECISION": False})     # float32 variables either way
    return config


def build(config, logs):
    from mrcnn.model import MaskRCNN
    model = MaskRCNN("training", config, logs)
    model.set_trainable(".*", verbose=0)
    model.compile(config.LEARNING_RATE, config.LEARNING_MOMENTUM)
    return model


def time_writes(model, folder, runs):
    from mrcnn import checkpoints, training_state
    times, size = [], 0
    for i in range(runs):
        path = checkpoints.state_path(folder, i + 1)
        start = time.perf_counter()
        size = training_state.write_training_state(
            path, model.keras_model, model.keras_model.optimizer,
            {"global_step": i + 1, "epoch": 0, "step_in_epoch": i + 1, "seed": 0,
             "stage": {"layers": ".*", "epochs": 1, "learning_rate": 0.001}})
        times.append(time.perf_counter() - start)
        os.remove(path)
    return times, size


def time_steps(model, config, steps=8, warmup=2):
    from mrcnn.data import DataGenerator
    from samples.fashion import demo_data
    from samples.fashion.dataset import FashionDataset
    ds = FashionDataset()
    ds.load_dataset(demo_data.ensure_demo_data(), subset="train", val_fraction=0.25)
    ds.prepare()
    gen = DataGenerator(ds, config, shuffle=True, workers=0, seed=0)
    batches = [gen[i] for i in range(steps + warmup)]
    times = []
    for i, (inputs,) in enumerate(batches):
        start = time.perf_counter()
        model.keras_model.train_on_batch(inputs)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=["fashion", "demo"])
    parser.add_argument("--gpu-step-seconds", type=float, default=1.0)
    args = parser.parse_args()
    print("CPU: %s, %d cores" % (cpu_model(), os.cpu_count()))
    for name in args.configs:
        config = make_config(name)
        with tempfile.TemporaryDirectory() as folder:
            model = build(config, folder)
            params = sum(int(v.numpy().size) for v in model.keras_model.weights)
            slots = sum(int(v.numpy().size) for v in model.keras_model.optimizer.variables)
            times, size = time_writes(model, folder, args.runs)
            write = statistics.median(times)
            every = config.CHECKPOINT_EVERY_STEPS
            print("%s (%s, %s head, %d px): %.1f M model values, %.1f M optimizer values; "
                  "state %.0f MB, write %.2f s median (%.2f-%.2f, %d runs); "
                  "CHECKPOINT_EVERY_STEPS %d" % (
                      name, config.BACKBONE, config.MASK_HEAD, config.IMAGE_MAX_DIM,
                      params / 1e6, slots / 1e6, size / 2**20, write, min(times), max(times),
                      len(times), every))
            if name == "demo":
                steps = time_steps(model, config)
                step = statistics.median(steps)
                interval = every or config.STEPS_PER_EPOCH
                interval = min(interval, config.STEPS_PER_EPOCH)
                print("  measured step %.2f s median (%.2f-%.2f, %d steps): a state every %d "
                      "steps costs %.2f%% of the step time; a SIGKILL loses at most %.0f s "
                      "(%d steps + one write)" % (
                          step, min(steps), max(steps), len(steps), interval,
                          100 * write / (interval * step), interval * step + write, interval))
            else:
                gpu = args.gpu_step_seconds
                print("  assumed RTX 2080 Ti step %.1f s (an estimate, not measured here): a "
                      "state every %d steps costs %.2f%% (with this CPU's write time; the "
                      "GPU machine's disk decides), a SIGKILL loses at most %.0f s" % (
                          gpu, every, 100 * write / (every * gpu), every * gpu + write))
        del model
    print("peak RSS %.1f GB" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))


if __name__ == "__main__":
    main()
