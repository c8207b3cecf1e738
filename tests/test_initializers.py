"""WEIGHT_INIT (mrcnn.initializers) and PIXEL_STD: the drawn weights against the formulas
written out here by hand, and the input scale against dividing the input in numpy."""

import keras
import numpy as np
import pytest

from synthetic import shapes_config, shapes_dataset

from mrcnn.config import ConfigError
from mrcnn.initializers import initialize_weights
from mrcnn.model import MaskRCNN


def kernel_layer(keras_model, name):
    """The layer owning the kernel of `name` (the RPN's inside its sub-model, a wrapped one
    inside its TimeDistributed)."""
    for layer in keras_model.layers:
        if isinstance(layer, keras.Model):
            for inner in layer.layers:
                if inner.name == name:
                    return inner
        if layer.name == name:
            return getattr(layer, "layer", layer)
    raise KeyError(name)


def kernel(keras_model, name):
    return np.array(kernel_layer(keras_model, name).kernel)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same graph with matterport's initialization and with torchvision's."""
    keras.utils.set_random_seed(3)
    directory = str(tmp_path_factory.mktemp("init"))
    return (MaskRCNN("training", shapes_config(), directory),
            MaskRCNN("training", shapes_config(WEIGHT_INIT="torchvision"), directory))


def test_keras_scheme_leaves_the_model_as_built(models):
    model = models[0]
    before = [np.array(w) for w in model.keras_model.weights]
    assert initialize_weights(model.keras_model, "keras") == 0
    for a, w in zip(before, model.keras_model.weights):
        np.testing.assert_array_equal(a, np.array(w))
    # Matterport's Glorot uniform: bound sqrt(6 / (fan_in + fan_out)).
    w = kernel(model.keras_model, "res3a_branch2b")
    fan_in, fan_out = 9 * w.shape[2], 9 * w.shape[3]
    assert np.abs(w).max() <= np.sqrt(6 / (fan_in + fan_out)) + 1e-7


@pytest.mark.parametrize("name, expected_std", [
    # He normal with fan-out: sqrt(2 / (kh * kw * out_channels)).
    ("res3a_branch2b", lambda w: np.sqrt(2 / (w.shape[0] * w.shape[1] * w.shape[3]))),
    ("res4a_branch2c", lambda w: np.sqrt(2 / w.shape[3])),
    ("conv1", lambda w: np.sqrt(2 / (49 * w.shape[3]))),
    ("mrcnn_mask_conv1", lambda w: np.sqrt(2 / (9 * w.shape[3]))),
    # Fixed normals.
    ("rpn_conv_shared", lambda w: 0.01),
    ("rpn_class_raw", lambda w: 0.01),
    ("rpn_bbox_pred", lambda w: 0.01),
    ("mrcnn_class_logits", lambda w: 0.01),
    ("mrcnn_bbox_fc", lambda w: 0.001),
    # Uniform of variance 1 / fan_in: sqrt(1 / fan_in).
    ("fpn_c5p5", lambda w: np.sqrt(1 / w.shape[2])),
    ("fpn_p2", lambda w: np.sqrt(1 / (9 * w.shape[2]))),
    ("mrcnn_class_conv1", lambda w: np.sqrt(1 / (w.shape[0] * w.shape[1] * w.shape[2]))),
])
def test_torchvision_scheme_draws_each_layer_from_its_distribution(models, name,
                                                                   expected_std):
    layer = kernel_layer(models[1].keras_model, name)
    w = np.array(layer.kernel)
    std = expected_std(w)
    # Five standard errors: of the mean std / sqrt(n), of the sample std ~std / sqrt(2n).
    assert abs(w.mean()) < 5 * std / np.sqrt(w.size)
    assert w.std() == pytest.approx(std, rel=5 / np.sqrt(2 * w.size))
    if name.startswith(("fpn_", "mrcnn_class_conv")):
        assert np.abs(w).max() <= np.sqrt(3) * std * (1 + 1e-6)   # uniform: bounded
    if layer.bias is not None:
        np.testing.assert_array_equal(np.array(layer.bias), 0)


def test_torchvision_scheme_keeps_batchnorm_and_is_seeded(models):
    km = models[1].keras_model
    bn = km.get_layer("bn3a_branch2b")
    np.testing.assert_array_equal(np.array(bn.gamma), 1)
    np.testing.assert_array_equal(np.array(bn.moving_variance), 1)
    a = MaskRCNN("training", shapes_config(), models[0].model_dir).keras_model
    b = MaskRCNN("training", shapes_config(), models[0].model_dir).keras_model
    initialize_weights(a, "torchvision", seed=7)
    initialize_weights(b, "torchvision", seed=7)
    for name in ("res2a_branch2a", "rpn_class_raw", "mrcnn_mask"):
        np.testing.assert_array_equal(kernel(a, name), kernel(b, name))
    initialize_weights(b, "torchvision", seed=8)
    assert not np.array_equal(kernel(a, "res2a_branch2a"), kernel(b, "res2a_branch2a"))


def test_weight_init_and_pixel_std_are_checked():
    with pytest.raises(ConfigError, match="WEIGHT_INIT"):
        shapes_config(WEIGHT_INIT="xavier")
    with pytest.raises(ConfigError, match="PIXEL_STD"):
        shapes_config(PIXEL_STD=(58.0, 57.0))
    with pytest.raises(ConfigError, match="PIXEL_STD"):
        shapes_config(PIXEL_STD=(58.0, 0.0, 57.0))
    with pytest.raises(ValueError, match="WEIGHT_INIT"):
        initialize_weights(keras.Sequential([keras.layers.Dense(2)]), "he")


def test_pixel_std_divides_the_input_in_the_graph(tmp_path):
    """A model with PIXEL_STD = s on an image equals the same weights without it on the
    molded image divided by s: detect() (mold_image, the loader) is unchanged."""
    std = (58.4, 57.1, 57.4)
    plain = MaskRCNN("inference", shapes_config(), str(tmp_path))
    scaled = MaskRCNN("inference", shapes_config(PIXEL_STD=std), str(tmp_path))
    scaled.keras_model.set_weights(plain.keras_model.get_weights())
    image = shapes_dataset(1).load_image(0)
    molded, metas, windows = scaled.mold_inputs([image])
    anchors = scaled.get_anchors(molded[0].shape)[np.newaxis]
    probe = "res2c_out"
    a = keras.Model(scaled.keras_model.inputs,
                    scaled.keras_model.get_layer(probe).output)([molded, metas, anchors])
    b = keras.Model(plain.keras_model.inputs,
                    plain.keras_model.get_layer(probe).output)(
        [molded / np.asarray(std, np.float32), metas, anchors])
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)
    assert scaled.keras_model.get_layer("input_scale") is not None
