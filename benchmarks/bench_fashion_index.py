"""Benchmark: indexing a full-size iMaterialist train.csv with FashionDataset.load_dataset.

    python benchmarks/bench_fashion_index.py [--runs-per-mask 150] [--keep]

Generates (once, cached in $TMPDIR/mrcnn_bench_fashion/) a train.csv of the real size: 45,625
images and 333,415 rows, image sizes from 296 to 8,688 px, ~3.5% of ClassIds with attributes,
EncodedPixels of valid runs (on average --runs-per-mask runs, i.e. about 15 bytes per run),
plus label_descriptions.json and an empty train/ folder. Then, in a fresh process (so that
the generator's memory does not count), it times `load_dataset(subset="all")` + `prepare()`
and reports the peak resident memory of that process (ru_maxrss), and the time to read back
the RLE strings of 1,000 random images (what load_mask does before decoding).
Goal (issue 4): under 20 s and under 2 GB peak.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

N_IMAGES = 45625
N_ROWS = 333415


def _rle_pool(rng, h, w, count, runs):
    """`count` valid RLE strings for an h x w mask, with about `runs` runs each."""
    out = []
    size = h * w
    for _ in range(count):
        n = max(1, int(rng.poisson(runs)))
        cols = np.sort(rng.choice(w, size=min(n, w), replace=False))
        y1 = rng.integers(0, h // 2, size=cols.size)
        length = rng.integers(1, h // 2, size=cols.size)
        starts = cols * h + y1 + 1
        ok = starts + length - 1 <= size
        pairs = np.stack([starts[ok], length[ok]], 1).ravel()
        out.append(" ".join(map(str, pairs.tolist())))
    return out


def generate(folder, runs_per_mask, seed=0):
    from samples.fashion import demo_data
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "train"), exist_ok=True)
    with open(os.path.join(folder, "label_descriptions.json"), "w") as f:
        json.dump(demo_data.label_descriptions(), f)
    # 60 image sizes between 296 and 8,688 px tall, 25 RLE strings each.
    heights = np.unique(np.round(np.exp(rng.uniform(np.log(296), np.log(8688), 60))).astype(int))
    sizes = [(int(h), int(max(200, h * rng.uniform(0.55, 1.0)))) for h in heights]
    pools = [_rle_pool(rng, h, w, 25, runs_per_mask) for h, w in sizes]
    per_image = rng.multinomial(N_ROWS - N_IMAGES, np.ones(N_IMAGES) / N_IMAGES) + 1
    image_ids = ["%032x.jpg" % v for v in rng.integers(0, 2 ** 62, N_IMAGES)]
    image_ids[0] = "f4d6e71fbffc3e891e5009fef2c8bf6b.jpg"
    image_ids[1] = "2ab8c02ce17612733ddee218b4ce1fd1.jpg"
    size_of = rng.integers(0, len(sizes), N_IMAGES)
    path = os.path.join(folder, "train.csv")
    with open(path + ".tmp", "w") as f:
        f.write("ImageId,EncodedPixels,Height,Width,ClassId\n")
        lines = []
        for i in range(N_IMAGES):
            s = size_of[i]
            h, w = sizes[s]
            for _ in range(per_image[i]):
                cat = int(rng.integers(0, 46))
                cls = str(cat)
                if rng.random() < 0.035:
                    cls += "_%d_%d" % tuple(sorted(rng.choice(92, 2, replace=False)))
                lines.append("%s,%s,%d,%d,%s\n" % (image_ids[i], pools[s][rng.integers(25)],
                                                   h, w, cls))
            if len(lines) > 20000:
                f.write("".join(lines))
                lines = []
        f.write("".join(lines))
    os.replace(path + ".tmp", path)
    return path


def measure(folder):
    """Run in a fresh process: index, prepare, read back RLEs; print JSON."""
    from samples.fashion.dataset import FashionDataset
    t0 = time.perf_counter()
    ds = FashionDataset().load_dataset(folder, subset="all")
    ds.prepare()
    t_index = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    picks = rng.choice(ds.num_images, 1000, replace=False)
    t0 = time.perf_counter()
    n = 0
    for i in picks:
        n += len(ds._csv.read_rles(ds._rows(int(i))))
    t_read = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: KiB
    print(json.dumps({"images": ds.num_images, "rows": len(ds._csv), "index_s": t_index,
                      "peak_rss_bytes": peak, "read_rles_1000_images_s": t_read,
                      "rows_read": n}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs-per-mask", type=int, default=150)
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(),
                                                         "mrcnn_bench_fashion"))
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.folder)
        return
    csv = os.path.join(args.folder, "train.csv")
    stamp = os.path.join(args.folder, "params.json")
    params = {"runs_per_mask": args.runs_per_mask, "version": 1}
    if not (os.path.isfile(csv) and os.path.isfile(stamp)
            and json.load(open(stamp)) == params):
        t0 = time.perf_counter()
        print("generating %s ..." % csv, flush=True)
        generate(args.folder, args.runs_per_mask)
        with open(stamp, "w") as f:
            json.dump(params, f)
        print("generated in %.1f s" % (time.perf_counter() - t0))
    size = os.path.getsize(csv)
    out = subprocess.run([sys.executable, __file__, "--measure", "--folder", args.folder],
                         check=True, capture_output=True, text=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print("train.csv: %.2f GB, %d rows, %d images" % (size / 1e9, result["rows"],
                                                      result["images"]))
    print("index + prepare: %.2f s (goal < 20 s)" % result["index_s"])
    print("peak RSS of the indexing process: %.2f GB (goal < 2 GB)"
          % (result["peak_rss_bytes"] / 1e9))
    print("read back the RLEs of 1,000 random images (%d rows): %.3f s"
          % (result["rows_read"], result["read_rles_1000_images_s"]))


if __name__ == "__main__":
    main()
