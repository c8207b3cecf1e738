"""XLA (jit_compile) benchmark: does the Mask R-CNN step compile with XLA, and where it does,
is it faster than TensorFlow's default (oneDNN) kernels?

Cases (each in its own subprocess: peak memory and XLA caches do not mix):

  full-infer   the whole inference model (MaskRCNN "inference", R50, 1024 x 1024, 1000
               proposals, 100 detections) called inside tf.function(jit_compile=True).
  full-train   the whole training step (MaskRCNN "training", R50, 512 x 512, batch 1,
               TRAIN_ROIS_PER_IMAGE 512): its train_step in tf.function(jit_compile=True).
               Both are expected to fail to compile: proposals, ROI sampling and detection
               keep a data-dependent number of boxes (tf.where, NMS, random shuffle). The
               case prints the first error line, i.e. the op XLA refused.
  static-infer-{xla,tf}  the static-shape part of the network, which is most of its FLOPs:
               backbone + FPN + RPN head (input image -> P2..P6, rpn_class, rpn_bbox), R50,
               1024 x 1024, one forward pass, with and without jit_compile.
  static-train-{xla,tf}  the same part at 512 x 512, one SGD step (forward, backward, update)
               on a sum-of-squares loss of its outputs, with and without jit_compile.

Timing: median (and min) of --runs after --warmup untimed runs (the first call, which
includes XLA compilation, is reported separately as "first s"). Memory: ru_maxrss of the
case's process.

Run from the repository root:
    python benchmarks/bench_xla.py                  # all cases
    python benchmarks/bench_xla.py --runs 5 --cases static-infer-xla static-infer-tf
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_model import our_training_batch, time_runs  # noqa: E402

INFER_SIZE = 1024
TRAIN_SIZE = 512
CASES = ["full-infer", "full-train", "static-infer-tf", "static-infer-xla",
         "static-train-tf", "static-train-xla"]


def bench_config(size, **overrides):
    from mrcnn.config import Config

    class XlaBenchConfig(Config):
        NAME = "bench_xla"
        NUM_CLASSES = 81
        GPU_COUNT = 1
        IMAGES_PER_GPU = 1
        BACKBONE = "resnet50"
        IMAGE_RESIZE_MODE = "square"
        IMAGE_MIN_DIM = size
        IMAGE_MAX_DIM = size
        POST_NMS_ROIS_INFERENCE = 1000
        POST_NMS_ROIS_TRAINING = 2000
        TRAIN_ROIS_PER_IMAGE = 512
        DETECTION_MAX_INSTANCES = 100
        DETECTION_MIN_CONFIDENCE = 0.0
        LOADER_WORKERS = 0

    for name, value in overrides.items():
        setattr(XlaBenchConfig, name, value)
    return XlaBenchConfig()


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, runs, warmup):
    """(seconds of the first call, which includes compilation; seconds of each timed run)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    return first, time_runs(fn, runs, max(warmup - 1, 0))


def image_batch(size, seed=0):
    """A batch of one molded, photo-like image [1, size, size, 3] float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([120 + 80 * yy, 100 + 60 * xx, 90 + 50 * yy * xx], -1)
    image += rng.normal(0, 10, image.shape)
    return (image - np.array([123.7, 116.8, 103.9]))[None].astype(np.float32)


def static_part(config):
    """A keras.Model over the static-shape part of the network: image -> P2..P6, rpn_class,
    rpn_bbox (backbone, FPN, RPN head), built from an inference MaskRCNN's layers."""
    import keras
    from mrcnn.model import MaskRCNN
    model = MaskRCNN("inference", config, tempfile.mkdtemp(prefix="bench_xla_"))
    km = model.keras_model
    outputs = [km.get_layer(name).output
               for name in ("fpn_p2", "fpn_p3", "fpn_p4", "fpn_p5", "fpn_p6",
                            "rpn_class", "rpn_bbox")]
    return keras.Model(km.get_layer("input_image").output, outputs)


def case_static(kind, xla, runs, warmup):
    import tensorflow as tf
    size = INFER_SIZE if kind == "infer" else TRAIN_SIZE
    sub = static_part(bench_config(size))
    x = tf.constant(image_batch(size))
    if kind == "infer":
        fn = tf.function(lambda t: sub(t, training=False), jit_compile=xla)
        call = lambda: [o.numpy() for o in fn(x)]  # noqa: E731
    else:
        variables = sub.trainable_variables

        @tf.function(jit_compile=xla)
        def step(t):
            with tf.GradientTape() as tape:
                outputs = sub(t, training=True)
                loss = tf.add_n([tf.reduce_mean(tf.square(tf.cast(o, tf.float32)))
                                 for o in outputs])
            grads = tape.gradient(loss, variables)
            for v, g in zip(variables, grads):
                v.assign_sub(1e-4 * g)
            return loss
        call = lambda: float(step(x))  # noqa: E731
    first, times = timed(call, runs, warmup)
    return {"first_s": first, "times": times}


def case_full(kind, runs, warmup):
    import tensorflow as tf
    from mrcnn.model import MaskRCNN
    try:
        if kind == "infer":
            config = bench_config(INFER_SIZE)
            model = MaskRCNN("inference", config, tempfile.mkdtemp(prefix="bench_xla_"))
            anchors = model.get_anchors(config.IMAGE_SHAPE)[None]
            meta = np.zeros((1, config.IMAGE_META_SIZE), np.float32)
            meta[0, 1:4] = meta[0, 4:7] = config.IMAGE_SHAPE
            meta[0, 9:11] = INFER_SIZE
            meta[0, 11] = 1.0
            meta[0, 12:] = 1
            fn = tf.function(lambda *t: model.keras_model(list(t), training=False),
                             jit_compile=True)
            inputs = [tf.constant(image_batch(INFER_SIZE)), tf.constant(meta),
                      tf.constant(anchors)]
            call = lambda: fn(*inputs)  # noqa: E731
        else:
            import keras
            config = bench_config(TRAIN_SIZE)
            inputs = our_training_batch(config)
            model = MaskRCNN("training", config, tempfile.mkdtemp(prefix="bench_xla_"))
            model.set_trainable(".*", verbose=0)
            # Keras' compile(jit_compile=True) quietly falls back to no XLA when a layer has
            # supports_jit False: force it with a jit-compiled tf.function of train_step.
            model.keras_model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9))
            model.keras_model.optimizer.build(model.keras_model.trainable_variables)
            fn = tf.function(lambda *t: model.keras_model.train_step((t,)), jit_compile=True)
            inputs = [tf.constant(t) for t in inputs]
            call = lambda: fn(*inputs)  # noqa: E731
        first, times = timed(call, runs, warmup)
        return {"first_s": first, "times": times}
    except Exception as e:  # noqa: BLE001 - the failure is the measurement
        lines = [line for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "XLA" in line or "compil" in line.lower()),
                      lines[0] if lines else type(e).__name__)
        return {"failed": "%s: %s" % (type(e).__name__, reason.strip()[:300])}


def run_worker(case, runs, warmup):
    if case.startswith("full-"):
        result = case_full(case.split("-")[1], runs, warmup)
    else:
        _, kind, backend = case.split("-")
        result = case_static(kind, backend == "xla", runs, warmup)
    result.update(case=case, peak_rss_mb=peak_rss_mb())
    if "times" in result:
        result.update(median_s=statistics.median(result["times"]), min_s=min(result["times"]))
    return result


def spawn(case, args):
    command = [sys.executable, os.path.abspath(__file__), "--worker", case,
               "--runs", str(args.runs), "--warmup", str(args.warmup)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT, os.path.join(ROOT, "benchmarks"), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "failed": "no result within %d s (timeout)" % args.timeout}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
    return {"case": case, "failed": "exit code %s: %s" % (proc.returncode, tail)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (>= 1)")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args.worker, args.runs, args.warmup)))
        return

    import tensorflow as tf
    print("Machine: %s, %d cores; %s" % (platform.processor() or platform.machine(),
                                         os.cpu_count(), platform.platform()))
    print("Python %s; tensorflow %s" % (platform.python_version(), tf.__version__))
    print("Load average before: %s" % " ".join("%.2f" % v for v in os.getloadavg()))
    print("Runs: median of %d after %d warm-up; each case in its own process\n"
          % (args.runs, args.warmup))
    results = []
    for case in args.cases:
        print("running %s ..." % case, flush=True)
        results.append(spawn(case, args))
    print("\n%-18s %8s %8s %8s %9s  %s" % ("case", "median s", "min s", "first s",
                                           "peak MiB", "notes"))
    print("-" * 70)
    by_case = {r["case"]: r for r in results}
    for r in results:
        if "failed" in r:
            print("%-18s does not compile / failed: %s" % (r["case"], r["failed"]))
            continue
        note = ""
        if r["case"].endswith("-xla"):
            peer = by_case.get(r["case"][:-4] + "-tf")
            if peer and "median_s" in peer:
                note = "%.2fx the time without XLA" % (r["median_s"] / peer["median_s"])
        print("%-18s %8.3f %8.3f %8.1f %9.0f  %s" % (r["case"], r["median_s"], r["min_s"],
                                                    r["first_s"], r["peak_rss_mb"], note))
    print("\nLoad average after: %s" % " ".join("%.2f" % v for v in os.getloadavg()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
