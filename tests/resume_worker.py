"""A tiny training run for tests/test_resume.py, in its own process so that it can be killed.

    python resume_worker.py LOGS MODE OUT [KEY=VALUE ...]

MODE: "full" (train 2 epochs of 4 steps), "kill:N" (SIGKILL after global step N),
"killwrite:N" (SIGKILL while the training state of global step N is being renamed into
place, i.e. after its data is written) or "resume" (set_log_dir to the newest training state
under LOGS, then train() to the same end). KEY=VALUE: config overrides (Python literals).
Writes the final weights to OUT (.npz). Op determinism is on and the seeds are fixed.
"""

import ast
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from synthetic import shapes_config, shapes_dataset  # noqa: E402

from mrcnn import checkpoints  # noqa: E402
from mrcnn.model import MaskRCNN  # noqa: E402


class KillAfter(keras.callbacks.Callback):
    """SIGKILL this process after `step` training steps (after the callbacks before it, so
    after a training state due at that step is written)."""

    def __init__(self, step):
        super().__init__()
        self.step, self.done = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        if self.done == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_during_state_write(step):
    """SIGKILL when the state of global `step` is renamed into place (its partial file is
    complete; the rename never happens)."""
    target = os.path.basename(checkpoints.state_path("", step))
    replace = os.replace

    def killing_replace(src, dst):
        if os.path.basename(dst) == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst)

    os.replace = killing_replace


def main(logs, mode, out, *overrides):
    if "--cpus=2" in overrides:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        overrides = [o for o in overrides if o != "--cpus=2"]
    tf.config.experimental.enable_op_determinism()
    if os.environ.get("MRCNN_ONE_THREAD"):
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    settings = dict(STEPS_PER_EPOCH=4, CHECKPOINT_EVERY_STEPS=2, VALIDATION_STEPS=1)
    settings.update((k, ast.literal_eval(v)) for k, v in (o.split("=", 1) for o in overrides))
    config = shapes_config(**settings)
    keras.utils.set_random_seed(0)
    model = MaskRCNN("training", config, logs)
    callbacks = []
    if mode == "resume":
        model.set_log_dir(checkpoints.find_last_state(logs, config.NAME))
    elif mode.startswith("kill:"):
        callbacks.append(KillAfter(int(mode.split(":")[1])))
    elif mode.startswith("killwrite:"):
        kill_during_state_write(int(mode.split(":")[1]))
    train = shapes_dataset(6, size=config.IMAGE_MAX_DIM, seed=1)
    val = shapes_dataset(2, size=config.IMAGE_MAX_DIM, seed=2)
    model.train(train, val, learning_rate=0.01, epochs=2, layers="all",
                custom_callbacks=callbacks)
    np.savez(out, *model.keras_model.get_weights())


if __name__ == "__main__":
    main(*sys.argv[1:])
