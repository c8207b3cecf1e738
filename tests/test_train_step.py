"""MaskRCNNTrainingModel.train_step's update against automatic differentiation of the total.

train_step adds the gradient of matterport's L2 weight decay (WEIGHT_DECAY * sum(w^2) /
size(w) over trainable weights except normalization gammas and betas) by its formula instead
of differentiating the term; the update must equal one SGD step on the gradient that
tf.GradientTape gives for losses + decay, written out here, clipped per weight to
GRADIENT_CLIP_NORM.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mrcnn.config import Config
from mrcnn.training import MaskRCNNTrainingModel, MomentumSGD, clip_by_norm, loss_names

RATE = 0.1


def _model(weight_decay, clip):
    """A tiny functional model with MaskRCNNTrainingModel's outputs: an output no loss uses
    (its Dense gets gradient from the decay only), then five (sum, count) pairs, then the
    five losses; a LayerNormalization brings a gamma and a beta (not decayed)."""
    class TinyConfig(Config):
        NAME = "tiny"
        WEIGHT_DECAY = weight_decay
        GRADIENT_CLIP_NORM = clip

    config = TinyConfig()
    x = keras.Input((4,), batch_size=1)
    h = keras.layers.LayerNormalization(name="norm")(keras.layers.Dense(3, name="a")(x))
    h = keras.layers.Dense(3, name="b")(h)
    unused = keras.layers.Dense(2, name="unused")(x)
    pairs, means = [], []
    for k in range(len(loss_names(config))):
        s = keras.ops.sum(keras.ops.square(h - float(k)), axis=-1, keepdims=True)   # [1, 1]
        pairs.append(keras.ops.concatenate([s, 2.0 * keras.ops.ones_like(s)], axis=-1))
        means.append(s[:, 0] / 2.0)
    keras.utils.set_random_seed(3)
    model = MaskRCNNTrainingModel(x, [unused] + pairs + means, config)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=RATE))
    model.select_decay_variables()
    return model, config


def _reference_gradients(model, config, inputs):
    """d(weighted losses + decay) / d(trainable weights) by tf.GradientTape, the decay term
    written out (sum(w^2) / size(w) for every weight that is not a gamma or a beta)."""
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        outputs = model(inputs, training=True)
        n = len(loss_names(config))
        losses = [o[0, 0] / o[0, 1] for o in outputs[1:1 + n]]
        total = tf.add_n([config.LOSS_WEIGHTS[name] * loss
                          for name, loss in zip(loss_names(config), losses)])
        decayed = [v for v in variables if not v.path.endswith(("gamma", "beta"))]
        decay = config.WEIGHT_DECAY * tf.add_n(
            [tf.reduce_sum(tf.square(v)) / float(np.prod(v.shape)) for v in decayed])
        total = total + decay
    grads = tape.gradient(total, variables)
    return [g if g is not None else tf.zeros_like(v) for g, v in zip(grads, variables)], \
        float(total), len(decayed)


@pytest.mark.parametrize("clip", [1e6, 0.05])
def test_the_update_is_sgd_on_the_differentiated_total(clip):
    model, config = _model(weight_decay=0.05, clip=clip)
    inputs = np.array([[0.5, -1.0, 2.0, 0.3]], np.float32)
    grads, total, n_decayed = _reference_gradients(model, config, inputs)
    assert n_decayed == 6 and len(model.trainable_variables) == 8   # 3 Dense x 2, gamma, beta
    before = [np.array(v) for v in model.trainable_variables]
    logs = model.train_on_batch(inputs, return_dict=True)
    clipped = [np.array(tf.clip_by_norm(g, clip)) for g in grads]
    if clip < 1:
        assert any(np.linalg.norm(np.array(g)) > clip for g in grads)   # the clip acts
    for v, w0, g in zip(model.trainable_variables, before, clipped):
        np.testing.assert_allclose(np.array(v), w0 - RATE * g, rtol=1e-5, atol=1e-7,
                                   err_msg=v.path)
    # The decay-only weights moved (towards 0), gamma and beta only by their loss gradient.
    unused = model.get_layer("unused").kernel
    assert np.all(np.abs(np.array(unused)) < np.abs(before[
        [v.path for v in model.trainable_variables].index(unused.path)]))
    assert logs["loss"] == pytest.approx(total, rel=1e-5)


def test_without_weight_decay_the_unused_weights_stay():
    model, config = _model(weight_decay=0.0, clip=5.0)
    inputs = np.array([[0.5, -1.0, 2.0, 0.3]], np.float32)
    unused = model.get_layer("unused").kernel
    before = np.array(unused)
    model.train_on_batch(inputs, return_dict=True)
    np.testing.assert_array_equal(np.array(unused), before)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_fused_momentum_sgd_is_keras_sgd(momentum):
    """MomentumSGD (TensorFlow's fused kernel) and keras.optimizers.SGD, from the same
    weights on the same gradients for three steps (inside tf.function, as in training, and
    eagerly), end with the same weights and momentums."""
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 4, 5), (5,), (7, 2)]
    start = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(3)]
    results = []
    for cls in (keras.optimizers.SGD, MomentumSGD):
        variables = [keras.Variable(w) for w in start]
        optimizer = cls(learning_rate=0.05, momentum=momentum)
        optimizer.build(variables)
        step = tf.function(lambda g: optimizer.apply(g, variables))
        for k, g in enumerate(grads):
            tensors = [tf.constant(x) for x in g]
            if k % 2 == 0:
                step(tensors)
            else:
                optimizer.apply(tensors, variables)
        results.append(([np.array(v) for v in variables],
                        [np.array(m) for m in getattr(optimizer, "momentums", [])]))
    (w_keras, m_keras), (w_fused, m_fused) = results
    assert not np.allclose(w_keras[0], start[0])
    for a, b in zip(w_keras + m_keras, w_fused + m_fused):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_clip_by_norm_is_tensorflows():
    rng = np.random.default_rng(1)
    for scale in (0.01, 1.0, 100.0):
        g = tf.constant(scale * rng.normal(size=(4, 6)).astype(np.float32))
        np.testing.assert_allclose(np.array(clip_by_norm(g, 5.0)),
                                   np.array(tf.clip_by_norm(g, 5.0)), rtol=1e-6)
    np.testing.assert_array_equal(np.array(clip_by_norm(tf.zeros((3,)), 5.0)), 0)
