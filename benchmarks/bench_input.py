"""Input pipeline benchmark: samples/s of load_image_gt + build_rpn_targets, and of the loader.

An iMaterialist-like sample: a photo-like 2000 x 1500 (width x height) JPEG (smooth
gradients, noise and filled shapes, quality 90) with 8 instance masks stored as Kaggle RLE
strings, decoded lazily by a tiny Dataset subclass; molded to 1024 x 1024 ("square" mode),
56 x 56 mini masks, RPN targets for the 261,888 anchors of the default config.

Measured:
  1. one core: load_image_gt + build_rpn_targets (the process pinned to one CPU with
     os.sched_setaffinity, OMP / OpenBLAS / OpenCV threads = 1), median of several runs;
  2. for comparison, the straightforward path with the same helpers (full-size resize_mask,
     extract_bboxes, minimize_mask, IoUs against all anchors);
  3. the DataGenerator (keras PyDataset) with 1 and 2 worker processes, through the same
     enqueuer model.fit uses, batches of 2, the main process only consuming;
  4. peak memory: tracemalloc peak of one sample, ru_maxrss of the process and its workers.

Run from the repository root:
    /work/venv/bin/python benchmarks/bench_input.py            # full (about 2 minutes)
    /work/venv/bin/python benchmarks/bench_input.py --quick    # smoke run
"""

import os

# Before numpy / OpenCV load: one thread each, so "one core" means one core.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/machine.py)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mrcnn import data, utils  # noqa: E402
from mrcnn.config import Config  # noqa: E402

WIDTH, HEIGHT = 2000, 1500
NUM_INSTANCES = 8


class BenchConfig(Config):
    NAME = "bench"
    NUM_CLASSES = 1 + 46          # iMaterialist categories
    IMAGES_PER_GPU = 2
    IMAGE_MIN_DIM = 800
    IMAGE_MAX_DIM = 1024
    MINI_MASK_SHAPE = (56, 56)
    USE_MINI_MASK = True


class RLEDataset(utils.Dataset):
    """Images on disk, masks as RLE strings decoded only when load_mask is called."""

    def load(self, items):
        for i in range(1, 47):
            self.add_class("fashion", i, "class%d" % i)
        for k, (path, rles, class_ids) in enumerate(items):
            self.add_image("fashion", image_id="img%d.jpg" % k, path=path, height=HEIGHT,
                           width=WIDTH, rles=rles, class_ids=class_ids)

    def image_reference(self, image_id):
        return self.image_info[image_id]["path"]

    def load_mask_rle(self, image_id):
        """The optional fast path of mrcnn.data: masks resampled straight from the runs."""
        info = self.image_info[image_id]
        return info["rles"], np.array(info["class_ids"], np.int32), (info["height"],
                                                                     info["width"])

    def load_mask(self, image_id):
        info = self.image_info[image_id]
        h, w = info["height"], info["width"]
        mask = np.zeros((h, w, len(info["rles"])), dtype=bool)
        for i, rle in enumerate(info["rles"]):
            mask[:, :, i] = utils.rle_decode(rle, (h, w), image_id=info["id"])
        return mask, np.array(info["class_ids"], dtype=np.int32)


def make_photo(seed):
    """A photo-like RGB image and NUM_INSTANCES instance masks (bool [H, W])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    image = np.stack([128 + 70 * np.sin(yy / 310.0 + phase[0]),
                      118 + 60 * np.cos(xx / 240.0 + phase[1]),
                      100 + 50 * np.sin((xx + yy) / 420.0 + phase[2])], axis=-1)
    masks = []
    for i in range(NUM_INSTANCES):
        canvas = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
        cy, cx = int(rng.integers(200, HEIGHT - 200)), int(rng.integers(200, WIDTH - 200))
        ry, rx = int(rng.integers(40, 420)), int(rng.integers(40, 420))
        if i % 3 == 0:
            cv2.ellipse(canvas, (cx, cy), (rx, ry), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        elif i % 3 == 1:
            pts = np.stack([cx + rng.integers(-rx, rx, 7), cy + rng.integers(-ry, ry, 7)], 1)
            cv2.fillPoly(canvas, [cv2.convexHull(pts.astype(np.int32))], 1)
        else:
            cv2.rectangle(canvas, (cx - rx, cy - ry), (cx + rx, cy + ry), 1, -1)
        on = canvas.astype(bool)
        image[on] = image[on] * 0.4 + rng.uniform(0, 255, 3) * 0.6
        masks.append(on)
    image += rng.normal(0, 8, image.shape).astype(np.float32)
    image = cv2.GaussianBlur(image, (3, 3), 0)
    return np.clip(image, 0, 255).astype(np.uint8), masks


def build_dataset(folder, count=4):
    items = []
    for k in range(count):
        image, masks = make_photo(k)
        path = os.path.join(folder, "img%d.jpg" % k)
        cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        rles = [utils.rle_encode(m) for m in masks]
        items.append((path, rles, [1 + (3 * k + i) % 46 for i in range(NUM_INSTANCES)]))
    dataset = RLEDataset()
    dataset.load(items)
    dataset.prepare()
    return dataset


def naive_sample(dataset, config, image_id, anchors, rng):
    """The straightforward path with the same helpers: full decode, full-size mask resize,
    extract_bboxes, minimize_mask, IoUs against every anchor (the reference the fast path
    is measured against; not matterport's code)."""
    image = dataset.load_image(image_id)
    mask, class_ids = dataset.load_mask(image_id)
    image, window, scale, padding, crop = utils.resize_image(
        image, min_dim=config.IMAGE_MIN_DIM, max_dim=config.IMAGE_MAX_DIM,
        min_scale=config.IMAGE_MIN_SCALE, mode=config.IMAGE_RESIZE_MODE)
    mask = utils.resize_mask(mask, scale, padding, crop)
    keep = mask.any(axis=(0, 1))
    mask, class_ids = mask[:, :, keep], class_ids[keep]
    bbox = utils.extract_bboxes(mask)
    mask = utils.minimize_mask(bbox, mask, config.MINI_MASK_SHAPE)
    overlaps = utils.compute_overlaps(anchors, bbox)
    argmax = overlaps.argmax(axis=1)
    best = overlaps[np.arange(len(anchors)), argmax]
    match = np.zeros(len(anchors), np.int32)
    match[best < 0.3] = -1
    match[np.argwhere(overlaps == overlaps.max(axis=0))[:, 0]] = 1
    match[best >= 0.7] = 1
    return image, mask, match


def time_runs(fn, n, runs):
    """Median wall-clock samples/s over `runs` runs of n samples, the runs' rates, and the
    median rate by this process's CPU time (what the rate would be on a core of its own: less
    sensitive to other processes sharing the machine)."""
    rates, cpu_rates = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            fn(i)
        rates.append(n / (time.perf_counter() - t0))
        cpu_rates.append(n / max(time.process_time() - c0, 1e-9))
    return statistics.median(rates), rates, statistics.median(cpu_rates)


def loader_rate(dataset, config, workers, batches):
    """Samples/s of DataGenerator through keras' PyDatasetAdapter (what fit() uses)."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    # Enough images for `batches` batches: repeat the few files.
    ids = np.resize(dataset.image_ids, batches * config.BATCH_SIZE)
    big = RLEDataset()
    big.class_info = dataset.class_info
    big.image_info = [dict(dataset.image_info[i]) for i in ids]
    big.prepare()
    gen = data.DataGenerator(big, config, shuffle=True, seed=0, workers=workers,
                             use_multiprocessing=True, max_queue_size=4)
    adapter = PyDatasetAdapter(gen, shuffle=False)
    cpu0 = _cpu_times()
    adapter.on_epoch_begin()
    seen = 0
    t0 = None
    for k, (inputs,) in enumerate(adapter.get_numpy_iterator()):
        if k == 0:
            t0 = time.perf_counter()   # pool start-up and the first batch excluded
            continue
        seen += len(inputs[0])
    elapsed = time.perf_counter() - t0
    adapter.on_epoch_end()
    from keras.src.trainers.data_adapters import py_dataset_adapter
    for pool in list(py_dataset_adapter._DATA_POOLS):   # reap the workers: count their CPU
        pool.join()
    cpu1 = _cpu_times()
    total = batches * config.BATCH_SIZE
    # CPU ms per sample in the main process and in the workers (whole epoch, start-up included).
    cpu = ((cpu1[0] - cpu0[0]) / total * 1000, (cpu1[1] - cpu0[1]) / total * 1000)
    return seen / elapsed, cpu


def _cpu_times():
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime




def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--samples", type=int, default=24, help="samples per timed run")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--batches", type=int, default=30, help="loader batches per measurement")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.runs, args.batches = 4, 2, 4

    all_cpus = os.sched_getaffinity(0)
    print("machine: %s, %d cores (%d usable), load average %s"
          % (cpu_model(), os.cpu_count(), len(all_cpus),
             " ".join("%.2f" % v for v in os.getloadavg())))
    print("python %s, numpy %s, opencv %s" % (platform.python_version(), np.__version__,
                                              cv2.__version__))

    folder = tempfile.mkdtemp(prefix="mrcnn-bench-")
    try:
        run(args, folder, all_cpus)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args, folder, all_cpus):
    config = BenchConfig()
    dataset = build_dataset(folder)
    sizes = [os.path.getsize(dataset.image_info[i]["path"]) for i in dataset.image_ids]
    anchors = data.compute_anchors(config)
    print("sample: %dx%d JPEG q90 (%.0f KB), %d RLE masks -> %s, mini masks %s, %d anchors"
          % (WIDTH, HEIGHT, np.mean(sizes) / 1024, NUM_INSTANCES,
             "x".join(map(str, config.IMAGE_SHAPE)), config.MINI_MASK_SHAPE, len(anchors)))

    # 1. One core.
    os.sched_setaffinity(0, {min(all_cpus)})
    cv2.setNumThreads(1)
    ids = dataset.image_ids
    rng = np.random.default_rng(0)

    def fast(i):
        image_id = ids[i % len(ids)]
        image, meta, class_ids, boxes, masks = data.load_image_gt(
            dataset, config, image_id, use_mini_mask=config.USE_MINI_MASK)
        data.build_rpn_targets(image.shape, anchors, class_ids, boxes, config, rng=rng)

    fast(0)   # warm-up (anchor index, imports)
    rate, rates, cpu_rate = time_runs(fast, args.samples, args.runs)
    print("one core, load_image_gt + build_rpn_targets: %.1f samples/s (runs: %s); by CPU "
          "time %.1f samples/s" % (rate, ", ".join("%.1f" % r for r in rates), cpu_rate))

    stages = {}
    t = time.perf_counter()
    for i in range(args.samples):
        data._load_image(dataset, config, ids[i % len(ids)])
    stages["decode"] = (time.perf_counter() - t) / args.samples
    t = time.perf_counter()
    for i in range(args.samples):
        dataset.load_mask(ids[i % len(ids)])
    stages["full-size RLE decode by load_mask (not on the fast path)"] = \
        (time.perf_counter() - t) / args.samples
    gts = [data.load_image_gt(dataset, config, i, use_mini_mask=config.USE_MINI_MASK)
           for i in ids]
    t = time.perf_counter()
    for i in range(args.samples):
        g = gts[i % len(gts)]
        data.build_rpn_targets(g[0].shape, anchors, g[2], g[3], config, rng=rng)
    stages["rpn targets"] = (time.perf_counter() - t) / args.samples
    print("  per sample: " + ", ".join("%s %.1f ms" % (k, v * 1000) for k, v in stages.items()))

    augmentation = data.default_augmentation()

    def augmented(i):
        image_id = ids[i % len(ids)]
        image, meta, class_ids, boxes, masks = data.load_image_gt(
            dataset, config, image_id, augmentation=augmentation,
            use_mini_mask=config.USE_MINI_MASK, rng=rng)
        data.build_rpn_targets(image.shape, anchors, class_ids, boxes, config, rng=rng)

    aug_rate, _, aug_cpu = time_runs(augmented, args.samples, max(1, args.runs // 2))
    print("one core, the same with default_augmentation(): %.1f samples/s; by CPU time %.1f"
          % (aug_rate, aug_cpu))

    naive_rate, _, naive_cpu = time_runs(
        lambda i: naive_sample(dataset, config, ids[i % len(ids)], anchors, rng),
        max(2, args.samples // 3), max(1, args.runs // 2))
    print("one core, straightforward path (same helpers, full-size masks, all anchors): "
          "%.1f samples/s; by CPU time %.1f" % (naive_rate, naive_cpu))

    # Peak Python-level memory of one sample.
    tracemalloc.start()
    fast(1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print("tracemalloc peak of one sample: %.0f MB" % (peak / 2 ** 20))

    # 3. The loader, all cores.
    os.sched_setaffinity(0, all_cpus)
    cv2.setNumThreads(1)
    loader = {}
    for workers in (1, 2):
        loader[workers], cpu = loader_rate(dataset, config, workers, args.batches)
        print("DataGenerator, %d worker process(es), batch %d: %.1f samples/s "
              "(CPU per sample: workers %.0f ms, main process %.0f ms)"
              % (workers, config.BATCH_SIZE, loader[workers], cpu[1], cpu[0]))
    print("speed-up 2 workers / 1 worker: %.2fx" % (loader[2] / loader[1]))
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("peak RSS: main process %.0f MB (TensorFlow / Keras imported), largest worker %.0f MB"
          % (self_rss, child_rss))
    print("load average at the end: %s" % " ".join("%.2f" % v for v in os.getloadavg()))


if __name__ == "__main__":
    main()
