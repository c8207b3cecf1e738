"""Exact resume (issue 14): a run killed with SIGKILL at any step, or while a training state
is being written, and resumed from its newest training state ends with the same weights as
the run that was not interrupted — bit for bit (op determinism on; ROI sampling is stateless,
the data stream restarts at the state's position, momentum and the loss scale are restored).

Each run is a separate process (tests/resume_worker.py): 2 epochs of 4 steps, a training
state every 2 steps and at each epoch end, single-threaded (op determinism alone does not make
multi-threaded CPU training bit-reproducible: see run()).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from mrcnn import checkpoints, training_state

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "resume_worker.py")


def worker_env():
    # One thread per op pool: TensorFlow's CPU kernels are then bit-reproducible run to run
    # (with two threads, two uninterrupted runs already differ by up to ~1e-2 after 8 steps).
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
                MRCNN_ONE_THREAD="1")


def worker_command(logs, mode, out, overrides):
    return [sys.executable, WORKER, str(logs), mode, str(out)] + list(overrides)


def run(logs, mode, out, *overrides, expect_kill=False):
    proc = subprocess.run(worker_command(logs, mode, out, overrides), env=worker_env(),
                          capture_output=True, text=True, timeout=600)
    if expect_kill:
        assert proc.returncode == -9, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def assert_identical(a, b):
    a, b = weights(a), weights(b)
    assert len(a) == len(b)
    worst = max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b))
    assert worst == 0.0, "weights differ by up to %g" % worst


# 64 px images: the resume logic does not depend on the size, and the runs are 3x shorter.
SMALL = ("IMAGE_MAX_DIM=64", "IMAGE_MIN_DIM=64")
VARIANTS = {
    "float32": SMALL,
    # MirroredStrategy over two logical CPU devices: 2 replicas x 1 image.
    "mirrored": ("--cpus=2", "GPU_COUNT=2") + SMALL,
    # float16 compute with a LossScaleOptimizer: the loss-scale state is part of the state.
    "float16": ("MIXED_PRECISION='float16'",) + SMALL,
}


def start(logs, mode, out, *overrides):
    """run() in the background: the Popen of the worker (its output in files beside `out`)."""
    with open(str(out) + ".log", "w") as log:
        return subprocess.Popen(worker_command(logs, mode, out, overrides), env=worker_env(),
                                stdout=log, stderr=log)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """variant -> the weights (.npz) of its uninterrupted run. The three runs start together
    in the background at first use (each is single-threaded: they use the cores the tests'
    own runs leave idle) and are waited for when their weights are needed."""
    runs = {}
    for variant, overrides in VARIANTS.items():
        folder = tmp_path_factory.mktemp("full_" + variant)
        out = folder / "weights.npz"
        runs[variant] = (start(folder / "logs", "full", out, *overrides), out)

    def get(variant):
        proc, out = runs[variant]
        assert proc.wait(timeout=900) == 0, open(str(out) + ".log").read()[-3000:]
        return out
    yield get
    for proc, _ in runs.values():
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("variant,interruption", [
    ("float32", "kill:3"),          # inside epoch 1, resumed from the state of step 2
    ("float32", "killwrite:4"),     # during the write of the epoch-end state (step 4)
    ("mirrored", "kill:5"),         # inside epoch 2, resumed from the epoch-end state
    ("float16", "kill:3"),
])
def test_a_killed_run_resumes_to_the_same_weights(variant, interruption, tmp_path,
                                                  uninterrupted):
    logs = tmp_path / "logs"
    run(logs, interruption, tmp_path / "killed.npz", *VARIANTS[variant], expect_kill=True)
    run_dir = checkpoints.run_dirs(str(logs), "shapes")[-1]
    states = checkpoints.list_states(run_dir)
    step = int(interruption.split(":")[1])
    if interruption.startswith("killwrite"):
        # The state being written is only a partial file; the one before it is intact.
        assert [checkpoints.state_step(s) for s in states] == [step - 2]
        assert os.path.exists(checkpoints.partial_path(checkpoints.state_path(run_dir, step)))
    else:
        assert checkpoints.state_step(states[-1]) == step - step % 2
    position = training_state.read_position(states[-1])
    assert position["global_step"] == checkpoints.state_step(states[-1])
    assert position["stage"]["layers"] == ".*" and position["seed"] == 0
    proc = run(logs, "resume", tmp_path / "resumed.npz", *VARIANTS[variant])
    assert "Resuming from %s" % states[-1] in proc.stdout
    assert_identical(tmp_path / "resumed.npz", uninterrupted(variant))
