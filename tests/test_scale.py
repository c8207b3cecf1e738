"""The model under mixed precision and under a MirroredStrategy (GPU_COUNT > 1).

Equivalence of multi-replica training with single-device training is issue 7's; here the
graph must build and run under both.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np

from synthetic import shapes_config, shapes_dataset

from mrcnn.data import DataGenerator
from mrcnn.model import LOSS_NAMES, MaskRCNN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mixed_precision_builds_float16_and_keeps_losses_float32(tmp_path):
    config = shapes_config(MIXED_PRECISION=True, MASK_HEAD="unet", IMAGE_MAX_DIM=64,
                           IMAGE_MIN_DIM=64)
    try:
        model = MaskRCNN("training", config, str(tmp_path))
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
        assert model.keras_model.get_layer("fpn_p2").compute_dtype == "float16"
        model.compile(0.001, 0.9)
        assert isinstance(model.keras_model.optimizer, keras.optimizers.LossScaleOptimizer)
        (inputs,) = DataGenerator(shapes_dataset(2, size=64), config, shuffle=False,
                                  workers=0, seed=0)[0]
        outputs = model.keras_model(inputs, training=True)
        losses = outputs[-len(LOSS_NAMES):]
        for name, loss in zip(LOSS_NAMES, losses):
            assert loss.dtype == "float32" and np.isfinite(float(loss)), name
        for name in ("mrcnn_class", "mrcnn_bbox", "mrcnn_mask", "rpn_class"):
            assert model.keras_model.get_layer(name).output.dtype == "float32", name
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_gpu_count_two_trains_under_mirrored_strategy(tmp_path):
    """Two logical CPU devices stand in for two GPUs (set before TensorFlow starts, so in a
    subprocess): the model builds under MirroredStrategy and a training step runs."""
    script = textwrap.dedent("""
        import sys, numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        sys.path[:0] = [{root!r}, {tests!r}]
        from synthetic import shapes_config, shapes_dataset
        from mrcnn.data import DataGenerator
        from mrcnn.model import MaskRCNN
        config = shapes_config(GPU_COUNT=2, IMAGE_MAX_DIM=64, IMAGE_MIN_DIM=64)
        model = MaskRCNN("training", config, {logs!r})
        assert isinstance(model.strategy, tf.distribute.MirroredStrategy)
        assert model.strategy.num_replicas_in_sync == 2
        model.set_trainable(".*", verbose=0)
        model.compile(0.001, 0.9)
        (inputs,) = DataGenerator(shapes_dataset(2, size=64), config, shuffle=False,
                                  workers=0, seed=0)[0]
        assert inputs[0].shape[0] == 2
        logs = model.keras_model.train_on_batch(inputs, return_dict=True)
        assert all(np.isfinite(v) for v in logs.values()), logs
        print("OK", sorted(logs))
    """).format(root=ROOT, tests=os.path.join(ROOT, "tests"), logs=str(tmp_path))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
