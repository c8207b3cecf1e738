"""Benchmark: the cost of test-time augmentation (mrcnn.tta) per image on the CPU.

    python benchmarks/bench_tta.py [--images 8] [--runs 3] [--weights PATH]

The fashion demo's inference configuration (DemoConfig: ResNet50, 128 px, U-Net mask head at
16 x 16, DETECTION_MAX_INSTANCES 20) on demo images (generated in a temporary folder), random
weights unless --weights (an untrained model detects the full 20 per copy: the merge's worst
case). Each setting first runs once over the images (graph tracing for each molded shape), then
--runs times, the settings taking turns; prints the median seconds per image (wall clock, and
the process's CPU time, less sensitive to other work on the machine) with every run, the
merge's share, and the CPU model, thread count and load average. Settings: plain MaskRCNN.detect, "flip" (2
copies, one batch of 2), "flip,scales=0.8,1.0,1.2" (6 copies: molded 128, 128 and 192 px).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = [("plain", None), ("flip", "flip"), ("flip + 3 scales", "flip,scales=0.8,1.0,1.2")]




def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--weights", default=None, help="a checkpoint of the demo config")
    args = parser.parse_args()

    from samples.fashion import cli
    cli.quiet_tensorflow()
    import tensorflow as tf
    from mrcnn import tta
    from mrcnn.model import MaskRCNN
    from samples.fashion import demo_data
    from samples.fashion.configs import make_config
    from samples.fashion.dataset import FashionDataset

    folder = demo_data.ensure_demo_data(os.path.join(tempfile.mkdtemp(), "demo"),
                                        n_train=args.images, n_test=1, verbose=False)
    ds = FashionDataset()
    ds.load_dataset(folder, subset="all", limit=args.images)
    ds.prepare()
    images = [ds.load_image(i) for i in ds.image_ids][:args.images]
    config = make_config(demo=True, inference=True)
    model = MaskRCNN("inference", config, tempfile.mkdtemp())
    if args.weights:
        model.load_weights(args.weights)

    # Time spent merging, measured inside detect_image.
    merge_time = [0.0]
    merge = tta.merge_detections

    def timed_merge(*a, **k):
        t = time.perf_counter()
        out = merge(*a, **k)
        merge_time[0] += time.perf_counter() - t
        return out
    tta.merge_detections = timed_merge

    def run(spec):
        count = 0
        start, cpu = time.perf_counter(), time.process_time()
        for image in images:
            r = model.detect([image], tta=spec)[0]
            count += len(r["scores"])
        n = len(images)
        return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n, count / n

    print("CPU: %s, %d cores, TensorFlow %s (intra-op threads %d), load average %s"
          % (cpu_model(), os.cpu_count(), tf.__version__,
             tf.config.threading.get_intra_op_parallelism_threads(),
             "/".join("%.1f" % v for v in os.getloadavg())))
    print("%d demo images (%s), DemoConfig inference, %s weights"
          % (len(images), ", ".join(sorted({"%dx%d" % im.shape[:2] for im in images})),
             args.weights or "random"))
    for _, spec in SETTINGS:
        run(spec)                                   # traces each molded shape once
    # The settings take turns in each run, so that a change of the machine's load hits all.
    wall, cpu, merges, found = ({name: [] for name, _ in SETTINGS} for _ in range(4))
    for _ in range(args.runs):
        for name, spec in SETTINGS:
            merge_time[0] = 0.0
            t, c, per_image = run(spec)
            wall[name].append(t)
            cpu[name].append(c)
            merges[name].append(merge_time[0] / len(images))
            found[name] = per_image
    plain = float(np.median(wall["plain"]))
    plain_cpu = float(np.median(cpu["plain"]))
    for name, spec in SETTINGS:
        copies = len(tta.as_tta(spec).copies) if spec else 1
        t, c = float(np.median(wall[name])), float(np.median(cpu[name]))
        print("%-16s %d cop%-3s %.3f s per image (runs %s; %.2fx plain), CPU time %.3f s "
              "(%.2fx), merge %.1f ms, %.1f detections"
              % (name, copies, "y" if copies == 1 else "ies", t,
                 " ".join("%.3f" % v for v in wall[name]), t / plain, c, c / plain_cpu,
                 1000 * np.median(merges[name]), found[name]))
    print("load average after: %s" % "/".join("%.1f" % v for v in os.getloadavg()))


if __name__ == "__main__":
    main()
