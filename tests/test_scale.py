"""Scaling out (issue 7): several replicas, several workers, mixed precision.

- Two replicas (the CPU split into two logical devices) train like one device with the doubled
  batch: same weights after three steps, within a stated tolerance.
- Two worker processes on localhost (MultiWorkerMirroredStrategy through TF_CONFIG) train
  through MaskRCNN.train() in step: identical weights, each on its own share of the data, the
  chief alone writing logs and checkpoints.
- MIXED_PRECISION="float16" trains with loss scaling: finite, falling losses.

The multi-device tests run in subprocesses: logical devices and TF_CONFIG must be set before
TensorFlow starts. Every subprocess has a timeout, so a hung collective fails the test.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from synthetic import shapes_config, shapes_dataset

from mrcnn import losses
from mrcnn.config import ConfigError
from mrcnn.data import DataGenerator
from mrcnn.model import LOSS_NAMES, MaskRCNN, cluster_from_tf_config, make_strategy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def run_python(script, timeout, env=None):
    """Run a Python script in a fresh interpreter; returns the CompletedProcess."""
    env = dict(os.environ if env is None else env, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout, env=env)


# ----------------------------------------------------------------------------- loss terms

def test_loss_terms_add_over_images_and_give_the_global_mean():
    """The (sum, count) pairs of two images add up to the pair of the batch, whose ratio is
    the batch loss; the mean of the two images' own losses is another number when their
    counts differ (what a per-replica mean would compute)."""
    rng = np.random.default_rng(0)
    ids = np.array([[2, 1, 3, 0, 0, 0], [1, 0, 0, 0, 0, 0]], np.int32)   # 3 and 1 positives
    masks = rng.random((2, 6, 4, 4)) > 0.5
    pred = rng.uniform(0.05, 0.95, (2, 6, 4, 4, 4)).astype(np.float32)
    match = rng.choice([-1, 0, 1], size=(2, 20, 1), p=[0.5, 0.3, 0.2]).astype(np.int32)
    logits = rng.normal(size=(2, 20, 2)).astype(np.float32)
    cases = [
        (losses.mrcnn_mask_loss_sum_count, losses.mrcnn_mask_loss_graph, (masks, ids, pred)),
        (losses.rpn_class_loss_sum_count, losses.rpn_class_loss_graph, (match, logits)),
    ]
    for sum_count, graph, args in cases:
        total, count = (float(t) for t in sum_count(*args))
        parts = [[float(t) for t in sum_count(*(a[i:i + 1] for a in args))] for i in range(2)]
        assert total == pytest.approx(parts[0][0] + parts[1][0], rel=1e-5)
        assert count == parts[0][1] + parts[1][1]
        assert float(graph(*args)) == pytest.approx(total / count, rel=1e-6)
    # Mask loss: 3 vs 1 positive ROIs, so the global mean differs from the mean of means.
    (s0, c0), (s1, c1) = [[float(t) for t in losses.mrcnn_mask_loss_sum_count(
        masks[i:i + 1], ids[i:i + 1], pred[i:i + 1])] for i in range(2)]
    assert c0 == 3 * 16 and c1 == 16
    assert abs((s0 + s1) / (c0 + c1) - (s0 / c0 + s1 / c1) / 2) > 1e-3
    # Nothing to average: 0, not NaN.
    assert float(losses.masked_mean(losses.mrcnn_mask_loss_sum_count(
        masks, np.zeros_like(ids), pred))) == 0.0


# ----------------------------------------------------------------------------- TF_CONFIG

def test_tf_config_selects_the_strategy(monkeypatch):
    one = {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}
    two = {"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker",
                                                                      "index": 0}}
    assert cluster_from_tf_config({}) == (1, None, None)
    assert cluster_from_tf_config({"TF_CONFIG": json.dumps(one)}) == (1, "worker", 0)
    assert cluster_from_tf_config({"TF_CONFIG": json.dumps(two)}) == (2, "worker", 0)
    with pytest.raises(ConfigError, match="TF_CONFIG is not valid JSON"):
        cluster_from_tf_config({"TF_CONFIG": "{cluster"})
    # One worker: TF_CONFIG is ignored (the default strategy for GPU_COUNT 1).
    monkeypatch.setenv("TF_CONFIG", json.dumps(one))
    assert not isinstance(make_strategy(shapes_config()), tf.distribute.MultiWorkerMirroredStrategy)
    # A parameter server is not a task MultiWorkerMirroredStrategy trains on.
    ps = dict(two, task={"type": "ps", "index": 0})
    monkeypatch.setenv("TF_CONFIG", json.dumps(ps))
    with pytest.raises(ConfigError, match="'ps'"):
        make_strategy(shapes_config())


# ----------------------------------------------------------------------------- mixed precision

@pytest.mark.slow
def test_mixed_precision_trains_with_loss_scaling(tmp_path):
    """MIXED_PRECISION="float16" (what True is on a GPU; explicit, so that it stays float16 on
    a CPU): float16 compute, float32 losses and weights, a LossScaleOptimizer.
    The float16 forward pass gives the float32 model's losses (same weights) within 2 %;
    16 SGD steps on one batch (fixed ROIs, so every loss is defined at every step) skip the
    first steps whose scaled gradients overflow, lower the loss scale, and then every loss
    falls. The global dtype policy is restored afterwards."""
    before = keras.mixed_precision.global_policy().name
    k = 8
    common = dict(IMAGE_MAX_DIM=64, IMAGE_MIN_DIM=64, IMAGES_PER_GPU=1, USE_RPN_ROIS=False,
                  POST_NMS_ROIS_TRAINING=k, TRAIN_ROIS_PER_IMAGE=16)
    (inputs,) = DataGenerator(shapes_dataset(1, size=64, seed=1), shapes_config(**common),
                              shuffle=False, workers=0, seed=0)[0]
    gt = inputs[5][0][inputs[4][0] > 0]
    rois = np.zeros((1, k, 4), np.int32)
    rois[0, :3] = gt[np.arange(3) % len(gt)]                           # positives (IoU 1)
    rois[0, 3:] = [[1, 1, 4, 4], [2, 5, 5, 8], [5, 1, 8, 3], [1, 9, 3, 12], [9, 9, 12, 12]]
    batch = list(inputs[:7]) + [rois]     # fixed ROIs instead of the loader's random ones
    try:
        keras.utils.set_random_seed(0)
        reference = MaskRCNN("training", shapes_config(**common), str(tmp_path))
        expected = [float(t) for t in reference.keras_model(batch, training=True)[-5:]]
        model = MaskRCNN("training", shapes_config(MIXED_PRECISION="float16", **common),
                         str(tmp_path))
        keras_model = model.keras_model
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
        assert keras_model.get_layer("fpn_p2").compute_dtype == "float16"
        for name in ("mrcnn_class", "mrcnn_bbox", "mrcnn_mask", "rpn_class"):
            assert keras_model.get_layer(name).output.dtype == "float32", name
        weights = {layer.name: layer.get_weights() for layer in reference.keras_model.layers}
        for layer in keras_model.layers:
            if layer.weights:
                layer.set_weights(weights[layer.name])
        outputs = keras_model(batch, training=True)[-5:]
        assert all(t.dtype == tf.float32 for t in outputs)
        np.testing.assert_allclose([float(t) for t in outputs], expected, rtol=0.02)

        model.set_trainable(".*", verbose=0)
        model.compile(0.005, 0.9)
        optimizer = keras_model.optimizer
        assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        history = []
        for _ in range(16):
            logs = keras_model.train_on_batch(batch, return_dict=True)
            keras_model.reset_metrics()
            history.append([float(logs[name]) for name in LOSS_NAMES])
        history = np.array(history)
        assert np.isfinite(history).all()
        assert all(v.dtype == "float32" for v in keras_model.weights)
        # Loss scaling at work: overflowing steps were skipped and the scale lowered.
        assert float(optimizer.dynamic_scale) < optimizer.initial_scale
        applied = int(optimizer.iterations)
        assert 8 <= applied < 16, applied
        for i, name in enumerate(LOSS_NAMES):
            first, last = history[0, i], history[-4:, i].mean()
            assert first > 0 and last < 0.7 * first, (name, history[:, i])
    finally:
        keras.mixed_precision.set_global_policy(before)
    assert keras.mixed_precision.global_policy().name == before


# ----------------------------------------------------------------------------- two replicas

REPLICAS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    tf.config.experimental.enable_op_determinism()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path[:0] = [{root!r}, {tests!r}]
    import keras
    from synthetic import shapes_config, shapes_dataset
    from mrcnn.data import DataGenerator
    from mrcnn.model import MaskRCNN, MaskRCNNTrainingModel

    STEPS, K = 3, 9
    common = dict(IMAGE_MAX_DIM=64, IMAGE_MIN_DIM=64, USE_RPN_ROIS=False, TRAIN_BN=False,
                  POST_NMS_ROIS_TRAINING=K, TRAIN_ROIS_PER_IMAGE=16, LEARNING_RATE=0.001)
    single = shapes_config(GPU_COUNT=1, IMAGES_PER_GPU=2, **common)
    double = shapes_config(GPU_COUNT=2, IMAGES_PER_GPU=1, **common)

    # Fixed batches of two images with given ROIs: image 0 gets 3 positive candidates
    # (copies of its GT boxes) and 6 negatives (2-5 px boxes in a corner), image 1 gets 5 and
    # 4. With TRAIN_ROIS_PER_IMAGE 16 and ROI_POSITIVE_RATIO 0.33, DetectionTargetLayer takes
    # every candidate (up to 5 positives, and up to int(P / 0.33) - P negatives), so its
    # shuffle only reorders them. The two images have different numbers of positive ROIs.
    gen = DataGenerator(shapes_dataset(2 * STEPS, size=64, seed=4), single, shuffle=False,
                        workers=0, seed=0)
    rng = np.random.default_rng(0)
    batches = []
    for s in range(STEPS):
        (inputs,) = gen[s]
        rois = np.zeros((2, K, 4), np.int32)
        for b, (p, n) in enumerate([(3, 6), (5, 4)]):
            gt = inputs[5][b][inputs[4][b] > 0]
            corner = rng.integers(1, 5, size=(n, 2))
            negatives = np.concatenate([corner, corner + rng.integers(2, 4, (n, 2))], 1)
            rois[b] = np.concatenate([gt[np.arange(p) % len(gt)], negatives])
        batches.append(tuple(inputs[:7]) + (rois,))   # its ROIs, not the loader's random ones

    class Fixed(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=0)
        @property
        def num_batches(self):
            return STEPS
        def __getitem__(self, i):
            return (batches[i],)

    # Record the batch size each replica's train_step receives.
    train_step = MaskRCNNTrainingModel.train_step
    def recording_train_step(self, data):
        tf.print("REPLICA_BATCH", tf.shape(data[0][0])[0], output_stream=sys.stdout)
        return train_step(self, data)
    MaskRCNNTrainingModel.train_step = recording_train_step

    def run(config, initial=None):
        keras.utils.set_random_seed(0)
        model = MaskRCNN("training", config, {logs!r})
        layers = [layer for layer in model.keras_model.layers if layer.weights]
        if initial is not None:
            for layer in layers:
                layer.set_weights(initial[layer.name])
        start = {{layer.name: layer.get_weights() for layer in layers}}
        model.set_trainable(".*", verbose=0)
        model.compile(config.LEARNING_RATE, config.LEARNING_MOMENTUM)
        steps = []
        record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: steps.append(
            [float(logs[k]) for k in sorted(logs)]))
        model.keras_model.fit(Fixed(), epochs=1, steps_per_epoch=STEPS, shuffle=False,
                              verbose=0, callbacks=[record])
        print("RUN_DONE", type(model.strategy).__name__, model.strategy.num_replicas_in_sync,
              flush=True)
        return start, {{layer.name: layer.get_weights() for layer in layers}}, steps

    w0, w1, logs1 = run(single)
    _, w2, logs2 = run(double, initial=w0)

    def max_diff(a, b):
        return max(float(np.abs(x - y).max()) for n in a for x, y in zip(a[n], b[n]))

    print("RESULT", json.dumps({{"update": max_diff(w1, w0), "diff": max_diff(w2, w1),
                               "logs_single": logs1, "logs_double": logs2}}))
""")


@pytest.mark.slow
def test_two_replicas_train_like_one_device_with_the_doubled_batch(tmp_path):
    """GPU_COUNT=2 (two logical CPU devices, MirroredStrategy, one image per replica) and
    GPU_COUNT=1 with IMAGES_PER_GPU=2, from the same weights on the same three batches, end
    with the same weights.

    Losses are masked means over the global batch and the two images have different numbers
    of positive ROIs (3 and 5): averaging each replica's own images and dividing by the
    replica count would weight them otherwise (that variant, tried once, ends 7e-2 of the
    largest weight update away from the single device; a test of its own cannot reach it).
    Gradients are clipped (GRADIENT_CLIP_NORM 5) after the all-reduce, as on one device.

    Tolerance: max |w_2replicas - w_1device| <= 1e-3 x max |w_1device - w_initial|. With
    tf.config.experimental.enable_op_determinism() the single device repeats itself to
    ~1e-7; the replicas differ only in float32 summation order (per-replica sums added
    across replicas, convolutions on batches of 1 instead of 2): measured 1e-6 against
    updates of 1.8e-2 (5.7e-5 of the update). Without op determinism two single-device runs
    already differ by ~1e-5 (CPU kernels reduce in thread order).
    """
    script = REPLICAS_SCRIPT.format(root=ROOT, tests=TESTS, logs=str(tmp_path))
    result = run_python(script, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    runs = [line.split()[1:] for line in lines if line.startswith("RUN_DONE")]
    assert runs[1] == ["MirroredStrategy", "2"], runs
    # Keras' fit cuts each global batch between the replicas: 2 images on one device, one
    # per replica (3 steps x 2 replicas); the first run's three steps see both images.
    sizes = [int(line.split()[1]) for line in lines if line.startswith("REPLICA_BATCH")]
    assert sizes == [2] * 3 + [1] * 6, sizes
    (report,) = [json.loads(line[len("RESULT "):]) for line in lines
                 if line.startswith("RESULT ")]
    assert report["update"] > 1e-3, report["update"]           # the weights did change
    assert report["diff"] <= 1e-3 * report["update"], report
    # The logged losses are the global batch's: the same on both sides at every step.
    np.testing.assert_allclose(report["logs_double"], report["logs_single"], rtol=1e-4)


# ----------------------------------------------------------------------------- two workers

WORKER_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    out, index = sys.argv[1], int(sys.argv[2])
    import numpy as np
    import keras
    from synthetic import shapes_config, shapes_dataset
    from mrcnn import data as datalib
    from mrcnn.config import ConfigError
    from mrcnn.model import MaskRCNN

    # Record which stream batches this worker loads (in its loader process too).
    getitem = datalib.DataGenerator.__getitem__
    def recording_getitem(self, i):
        with open(os.path.join(out, "batches%d.txt" % index), "a") as f:
            f.write("%s %d\\n" % (self.dataset.tag, int(i)))
        return getitem(self, i)
    datalib.DataGenerator.__getitem__ = recording_getitem

    config = shapes_config(IMAGE_MAX_DIM=64, IMAGE_MIN_DIM=64, STEPS_PER_EPOCH=2,
                           VALIDATION_STEPS=1, LOADER_WORKERS=1)
    train, val = shapes_dataset(6, size=64, seed=1), shapes_dataset(2, size=64, seed=2)
    train.tag, val.tag = "train", "val"
    keras.utils.set_random_seed(index)        # different seeds: the chief's weights win
    model = MaskRCNN("training", config, os.path.join(out, "logs%d" % index))
    layers = [layer for layer in model.keras_model.layers if layer.weights]
    np.savez(os.path.join(out, "before%d.npz" % index),
             *[w for layer in layers for w in layer.get_weights()])
    history = model.train(train, val, learning_rate=0.01, epochs=2, layers="all")
    np.savez(os.path.join(out, "after%d.npz" % index),
             *[w for layer in layers for w in layer.get_weights()])
    print("HISTORY", json.dumps(history.history), flush=True)
    # Worker 1 alone changes a weight (as if it had loaded another file): both refuse to go on.
    if index == 1:
        last = layers[-1].get_weights()
        layers[-1].set_weights([last[0] + 1.0] + last[1:])
    try:
        model.train(train, val, learning_rate=0.01, epochs=3, layers="all")
        print("AGREE trained on", flush=True)
    except ConfigError as e:
        print("AGREE_ERROR", e, flush=True)
""")


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_train_in_step_through_tf_config(tmp_path):
    """Two processes on localhost, TF_CONFIG naming both as workers (worker 0 the chief), run
    MaskRCNN.train() for 2 epochs of 2 steps with one loader process each: both exit 0 within
    the timeout and end with identical weights, which moved from the (broadcast) start.
    Worker i loaded only its own batches of the shared stream (i, i + 2, ...); the chief
    wrote the checkpoints and TensorBoard logs, the other worker nothing (its temporary
    checkpoint dir is gone). When one worker then changes its weights, both refuse to train
    on (ConfigError) instead of training diverging models."""
    script = os.path.join(str(tmp_path), "worker.py")
    with open(script, "w") as f:
        f.write(WORKER_SCRIPT.format(root=ROOT, tests=TESTS))
    cluster = {"worker": ["localhost:%d" % p for p in free_ports(2)]}
    procs, outputs = [], []
    for i in range(2):
        scratch = os.path.join(str(tmp_path), "tmp%d" % i)
        os.makedirs(scratch)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=scratch, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": i}}))
        outputs.append(open(os.path.join(str(tmp_path), "out%d.txt" % i), "w+"))
        procs.append(subprocess.Popen([sys.executable, script, str(tmp_path), str(i)],
                                      env=env, stdout=outputs[i], stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=420)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = []
    for f in outputs:
        f.seek(0)
        logs.append(f.read())
        f.close()
    for i, p in enumerate(procs):
        assert p.returncode == 0, "worker %d:\n%s" % (i, logs[i][-4000:])

    def arrays(name):
        with np.load(os.path.join(str(tmp_path), name)) as f:
            return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]

    before = [arrays("before%d.npz" % i) for i in range(2)]
    after = [arrays("after%d.npz" % i) for i in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(*before))      # the chief's start
    assert all(np.array_equal(a, b) for a, b in zip(*after))       # all-reduced steps
    assert max(float(np.abs(a - b).max()) for a, b in zip(after[0], before[0])) > 1e-3
    histories = [json.loads(line.split(" ", 1)[1]) for log in logs
                 for line in log.splitlines() if line.startswith("HISTORY ")]
    assert len(histories) == 2 and histories[0] == histories[1]    # global-batch losses
    for log in logs:
        assert "AGREE_ERROR the workers hold different weights" in log, log[-2000:]
    assert all(np.isfinite(v).all() for v in histories[0].values())
    # Sharding: worker i loads batches i, i + 2, ... of the same seeded stream.
    for i in range(2):
        with open(os.path.join(str(tmp_path), "batches%d.txt" % i)) as f:
            seen = [line.split() for line in f]
        train = [int(b) for tag, b in seen if tag == "train"]
        assert len(train) >= 2 and all(b % 2 == i for b in train), (i, seen)
    # Only the chief writes the run's dir: 2 checkpoints, its training states and TensorBoard
    # logs.
    (run_dir,) = os.listdir(os.path.join(str(tmp_path), "logs0"))
    files = sorted(os.listdir(os.path.join(str(tmp_path), "logs0", run_dir)))
    files = [f for f in files if not f.startswith("training_state_")]
    assert files == ["mask_rcnn_shapes_0001.weights.h5", "mask_rcnn_shapes_0002.weights.h5",
                     "train", "validation"], files
    assert not os.path.exists(os.path.join(str(tmp_path), "logs1"))
    assert not [d for d in os.listdir(os.path.join(str(tmp_path), "tmp1"))
                if d.startswith("mrcnn-worker")]
