"""Tests of mrcnn.backbone, mrcnn.heads and mrcnn.losses (small inputs, CPU)."""

import re

import numpy as np
import pytest
import keras
import tensorflow as tf
from keras import layers as KL

from mrcnn import backbone, heads, losses
from mrcnn.config import Config

HEADS_REGEX = r"(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)"
NUM_CLASSES = 5
META_SIZE = 12 + NUM_CLASSES


def layer_names(model):
    return [layer.name for layer in model.layers]


def trainable_count(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


# ---------------------------------------------------------------------------- backbone

@pytest.fixture(scope="module")
def resnet50():
    image = KL.Input(shape=(128, 128, 3))
    outputs = backbone.resnet_graph(image, "resnet50", stage5=True, train_bn=False)
    return keras.Model(image, outputs[1:]), outputs


def blocks_per_stage(names):
    blocks = {}
    for name in names:
        m = re.fullmatch(r"res(\d)([a-z])_branch2a", name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(m.group(2))
    return {stage: "".join(sorted(b)) for stage, b in blocks.items()}


def test_resnet50_names_and_shapes(resnet50):
    model, outputs = resnet50
    names = layer_names(model)
    assert len(names) == len(set(names))
    for name in ("conv1", "bn_conv1", "res5c_branch2c", "bn5c_branch2c", "res5c_out"):
        assert name in names
    assert blocks_per_stage(names) == {2: "abc", 3: "abcd", 4: "abcdef", 5: "abc"}
    stage2 = sorted(n for n in names if re.match(r"(res|bn)2", n))
    expected = []
    for block in "abc":
        for branch in ("2a", "2b", "2c") + (("1",) if block == "a" else ()):
            expected += ["res2%s_branch%s" % (block, branch), "bn2%s_branch%s" % (block, branch)]
        expected.append("res2%s_out" % block)
    assert stage2 == sorted(expected)
    # C1..C5 at strides 4, 4, 8, 16, 32.
    assert [tuple(t.shape[1:]) for t in outputs] == [
        (32, 32, 64), (32, 32, 256), (16, 16, 512), (8, 8, 1024), (4, 4, 2048)]
    # Same architecture as keras.applications.ResNet50(include_top=False): 23,587,712 weights.
    assert model.count_params() == 23587712


def test_resnet101_stage4_and_no_stage5():
    image = KL.Input(shape=(64, 64, 3))
    C1, C2, C3, C4, C5 = backbone.resnet_graph(image, "resnet101", stage5=False)
    assert C5 is None
    names = layer_names(keras.Model(image, C4))
    assert blocks_per_stage(names) == {2: "abc", 3: "abcd", 4: "abcdefghijklmnopqrstuvw"}
    assert "res4w_branch2c" in names and "res4x_branch2a" not in names
    assert not any(n.startswith(("res5", "bn5")) for n in names)
    with pytest.raises(ValueError, match="resnet50"):
        backbone.resnet_graph(image, "resnet34")


def test_batchnorm_training_false_freezes_statistics():
    # Keras 3 functional models pass their own `training` to every layer; a BatchNorm placed
    # with training=False must stay frozen anyway (matterport's TRAIN_BN = False).
    x = np.random.RandomState(0).normal(5.0, 3.0, size=(16, 4)).astype("float32")
    x_in = KL.Input(shape=(4,))
    bn = backbone.BatchNorm(name="bn")
    model = keras.Model(x_in, bn(x_in, training=False))
    assert bn.frozen and bn.get_config()["frozen"] is True
    out_train = model(x, training=True).numpy()
    np.testing.assert_allclose(out_train, model(x, training=False).numpy(), rtol=1e-6)
    np.testing.assert_allclose(out_train, x / np.sqrt(1 + 1e-3), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.0)
    assert len(bn.trainable_weights) == 2   # gamma, beta stay trainable
    # training=True follows the model's mode: batch statistics in training, moving ones else.
    x_in2 = KL.Input(shape=(4,))
    bn2 = backbone.BatchNorm()
    model2 = keras.Model(x_in2, bn2(x_in2, training=True))
    assert not bn2.frozen
    np.testing.assert_allclose(model2(x, training=True).numpy().mean(0), 0.0, atol=1e-4)
    assert np.all(bn2.moving_mean.numpy() > 0)
    np.testing.assert_allclose(model2(x).numpy(), model2(x, training=False).numpy())
    # The same through the per-ROI wrapper of the heads.
    r_in = KL.Input(shape=(3, 4))
    td = heads.TimeDistributed(backbone.BatchNorm(), name="td_bn")
    model3 = keras.Model(r_in, td(r_in, training=False))
    xr = x.reshape(4, 4, 4)[:, :3]
    np.testing.assert_allclose(model3(xr, training=True).numpy(), xr / np.sqrt(1 + 1e-3),
                               rtol=1e-5)
    assert td.layer.frozen


def test_fpn_names_and_shapes(resnet50):
    _, (C1, C2, C3, C4, C5) = resnet50
    P = backbone.fpn_graph(C2, C3, C4, C5, 256)
    model = keras.Model(resnet50[0].inputs, P)
    names = set(layer_names(model))
    expected = {"fpn_c5p5", "fpn_c4p4", "fpn_c3p3", "fpn_c2p2",
                "fpn_p5upsampled", "fpn_p4upsampled", "fpn_p3upsampled",
                "fpn_p4add", "fpn_p3add", "fpn_p2add",
                "fpn_p2", "fpn_p3", "fpn_p4", "fpn_p5", "fpn_p6"}
    assert expected <= names
    assert [tuple(p.shape[1:]) for p in P] == [
        (32, 32, 256), (16, 16, 256), (8, 8, 256), (4, 4, 256), (2, 2, 256)]
    assert all(re.fullmatch(HEADS_REGEX, n) for n in expected)


def test_compute_backbone_shapes_and_callable_backbone():
    config = Config()
    np.testing.assert_array_equal(backbone.compute_backbone_shapes(config, (128, 96, 3)),
                                  [[32, 24], [16, 12], [8, 6], [4, 3], [2, 2]])
    calls = {}

    def tiny_backbone(input_image, stage5=True, train_bn=False):
        calls["args"] = (stage5, train_bn)
        x = input_image
        outs = [None]
        for i in range(4):
            x = KL.Conv2D(8, 3, strides=4 if i == 0 else 2, padding="same")(x)
            outs.append(x)
        return outs

    class CallableConfig(Config):
        BACKBONE = staticmethod(tiny_backbone)
        COMPUTE_BACKBONE_SHAPE = staticmethod(lambda shape: [[shape[0] // s, shape[1] // s]
                                                             for s in (4, 8, 16, 32, 64)])

    config = CallableConfig()
    assert backbone.compute_backbone_shapes(config, (128, 128, 3)).tolist()[0] == [32, 32]
    outs = backbone.build_backbone(KL.Input(shape=(128, 128, 3)), config)
    assert calls["args"] == (True, False)
    assert [tuple(t.shape[1:3]) for t in outs[1:]] == [(32, 32), (16, 16), (8, 8), (4, 4)]


# ---------------------------------------------------------------------------- heads

def head_inputs(depth=256):
    rois = KL.Input(shape=(None, 4), name="rois")
    meta = KL.Input(shape=(META_SIZE,), name="meta")
    maps = [KL.Input(shape=(s, s, depth), name="p%d" % (i + 2))
            for i, s in enumerate((32, 16, 8, 4))]
    return rois, meta, maps


def head_data(batch=2, num_rois=3, depth=256):
    rng = np.random.RandomState(1)
    y1x1 = rng.uniform(0, 0.5, size=(batch, num_rois, 2))
    rois = np.concatenate([y1x1, y1x1 + 0.4], -1).astype("float32")
    meta = np.zeros((batch, META_SIZE), "float32")
    meta[:, 4:7] = [128, 128, 3]   # image_shape
    meta[:, 7:11] = [0, 0, 128, 128]   # window
    meta[:, 11] = 1.0
    meta[:, 12:] = 1
    maps = [rng.normal(size=(batch, s, s, depth)).astype("float32") for s in (32, 16, 8, 4)]
    return [rois, meta] + maps


def conv(k, cin, cout):
    return k * k * cin * cout + cout


def bn(c):
    return 2 * c   # gamma, beta (moving mean / variance are not trainable)


@pytest.fixture(scope="module")
def unet_model():
    rois, meta, maps = head_inputs()
    out = heads.build_unet_mask_graph(rois, maps, meta, 14, NUM_CLASSES, train_bn=True)
    return keras.Model([rois, meta] + maps, out)


@pytest.fixture(scope="module")
def fcn_model():
    rois, meta, maps = head_inputs()
    out = heads.build_fpn_mask_graph(rois, maps, meta, 14, NUM_CLASSES, train_bn=True)
    return keras.Model([rois, meta] + maps, out)


@pytest.mark.parametrize("which", ["unet", "fcn"])
def test_mask_heads_output_shape(which, unet_model, fcn_model):
    model = {"unet": unet_model, "fcn": fcn_model}[which]
    assert tuple(model.output.shape[2:]) == (28, 28, NUM_CLASSES)
    out = model(head_data(batch=2, num_rois=3), training=False).numpy()
    assert out.shape == (2, 3, 28, 28, NUM_CLASSES)
    assert out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))
    assert model.layers[-1].name == "mrcnn_mask"


@pytest.mark.parametrize("which", ["unet", "fcn"])
def test_mask_heads_trainable_layers_match_heads_regex(which, unet_model, fcn_model):
    model = {"unet": unet_model, "fcn": fcn_model}[which]
    with_weights = [layer.name for layer in model.layers if layer.trainable_weights]
    assert len(with_weights) == {"unet": 2 * 9 + 1, "fcn": 2 * 4 + 2}[which]
    for name in with_weights:
        assert re.fullmatch(HEADS_REGEX, name), name
        assert name.startswith("mrcnn_mask")


def test_unet_trainable_parameters_by_hand(unet_model):
    K = NUM_CLASSES
    expected = (
        conv(3, 256, 256) + bn(256)      # down1 conv1 (seed layer11)
        + conv(3, 256, 256) + bn(256)    # down1 conv2 (layer12)
        + conv(3, 256, 256) + bn(256)    # bottleneck conv1 (layer21), 7x7
        + conv(3, 256, 512) + bn(512)    # bottleneck conv2 (layer22)
        + conv(3, 512, 256) + bn(256)    # bottleneck conv3 (layer23)
        + conv(3, 512, 256) + bn(256)    # up1 conv1 (layer31), input: upsampled 256 + skip 256
        + conv(3, 256, 128) + bn(128)    # up1 conv2 (layer32)
        + conv(3, 128, 256) + bn(256)    # up2 conv1 (layer41), 28x28
        + conv(3, 256, 256) + bn(256)    # up2 conv2 (layer42)
        + conv(1, 256, K)                # mrcnn_mask (layer43)
    )
    assert trainable_count(unet_model) == expected
    # BN moving statistics: 2 per channel of every BN, not trainable.
    non_trainable = int(sum(np.prod(w.shape) for w in unet_model.non_trainable_weights))
    assert non_trainable == 2 * (256 * 6 + 512 + 128 + 256 * 1)


def test_unet_layer_order_is_conv_relu_then_bn(unet_model):
    names = layer_names(unet_model)
    convs = [n for n in names if re.fullmatch(r"mrcnn_mask_unet_\w+_conv\d", n)]
    assert convs == [
        "mrcnn_mask_unet_down1_conv1", "mrcnn_mask_unet_down1_conv2",
        "mrcnn_mask_unet_bottleneck_conv1", "mrcnn_mask_unet_bottleneck_conv2",
        "mrcnn_mask_unet_bottleneck_conv3", "mrcnn_mask_unet_up1_conv1",
        "mrcnn_mask_unet_up1_conv2", "mrcnn_mask_unet_up2_conv1", "mrcnn_mask_unet_up2_conv2"]
    for name in convs:
        layer = unet_model.get_layer(name)
        assert isinstance(layer, keras.layers.TimeDistributed)
        assert layer.layer.activation.__name__ == "relu"
        assert names[names.index(name) + 1] == name.replace("_conv", "_bn")
        assert isinstance(unet_model.get_layer(name.replace("_conv", "_bn")).layer,
                          backbone.BatchNorm)
    with pytest.raises(ValueError, match="even"):
        rois, meta, maps = head_inputs()
        heads.build_unet_mask_graph(rois, maps, meta, 7, NUM_CLASSES)


def test_fcn_trainable_parameters_by_hand(fcn_model):
    K = NUM_CLASSES
    expected = (
        4 * (conv(3, 256, 256) + bn(256))   # mrcnn_mask_conv1..4 + mrcnn_mask_bn1..4
        + conv(2, 256, 256)                 # mrcnn_mask_deconv (2x2 transpose conv)
        + conv(1, 256, K)                   # mrcnn_mask
    )
    assert trainable_count(fcn_model) == expected
    names = layer_names(fcn_model)
    for name in ["mrcnn_mask_conv%d" % i for i in range(1, 5)] + \
            ["mrcnn_mask_bn%d" % i for i in range(1, 5)] + ["mrcnn_mask_deconv", "roi_align_mask"]:
        assert name in names


def test_classifier_head():
    rois, meta, maps = head_inputs()
    logits, probs, bbox = heads.fpn_classifier_graph(rois, maps, meta, 7, NUM_CLASSES,
                                                     train_bn=False, fc_layers_size=64)
    model = keras.Model([rois, meta] + maps, [logits, probs, bbox])
    names = layer_names(model)
    for name in ("roi_align_classifier", "mrcnn_class_conv1", "mrcnn_class_bn1",
                 "mrcnn_class_conv2", "mrcnn_class_bn2", "mrcnn_class_logits", "mrcnn_class",
                 "mrcnn_bbox_fc", "mrcnn_bbox"):
        assert name in names
    K, fc = NUM_CLASSES, 64
    assert trainable_count(model) == (conv(7, 256, fc) + bn(fc) + conv(1, fc, fc) + bn(fc)
                                      + (fc * K + K) + (fc * 4 * K + 4 * K))
    for layer in model.layers:
        if layer.trainable_weights:
            assert re.fullmatch(HEADS_REGEX, layer.name), layer.name
    out_logits, out_probs, out_bbox = [t.numpy() for t in model(head_data(num_rois=4))]
    assert out_logits.shape == (2, 4, K) and out_probs.shape == (2, 4, K)
    assert out_bbox.shape == (2, 4, K, 4)
    np.testing.assert_allclose(out_probs.sum(-1), 1.0, rtol=1e-5)


def test_time_distributed_folds_rois_into_batch():
    # A wrapped BatchNorm in training mode normalizes over all ROIs of the batch together.
    x = np.random.RandomState(2).normal(size=(2, 5, 3, 3, 4)).astype("float32")
    x += np.arange(5, dtype="float32")[None, :, None, None, None]  # ROI-dependent offset
    layer = heads.TimeDistributed(backbone.BatchNorm(epsilon=1e-6))
    y = layer(x, training=True).numpy()
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(0, 1, 2, 3)), 1.0, atol=1e-3)
    assert abs(y[:, 0].mean() - y[:, 4].mean()) > 1.0   # ROI slots are not normalized apart
    # Works with an unknown number of ROIs too.
    inp = KL.Input(shape=(None, 3, 3, 4))
    out = heads.TimeDistributed(KL.Conv2D(2, 3, padding="same"), name="td")(inp)
    assert tuple(out.shape[2:]) == (3, 3, 2)
    assert keras.Model(inp, out)(x).shape == (2, 5, 3, 3, 2)


def test_rpn_model():
    rpn = heads.build_rpn_model(anchor_stride=1, anchors_per_location=3, depth=32)
    assert rpn.name == "rpn_model"
    assert rpn.inputs[0].name == "input_rpn_feature_map"
    names = layer_names(rpn)
    for name in ("rpn_conv_shared", "rpn_class_raw", "rpn_bbox_pred", "rpn_class_xxx"):
        assert name in names
    assert rpn.get_layer("rpn_conv_shared").kernel.shape == (3, 3, 32, 512)
    assert rpn.get_layer("rpn_class_raw").kernel.shape == (1, 1, 512, 6)
    assert rpn.get_layer("rpn_bbox_pred").kernel.shape == (1, 1, 512, 12)
    # The weight order of matterport's "rpn_model" group in mask_rcnn_coco.h5.
    assert [w.path for w in rpn.weights] == [
        "%s/%s" % (layer, kind) for layer in ("rpn_conv_shared", "rpn_class_raw", "rpn_bbox_pred")
        for kind in ("kernel", "bias")]
    # Shared across pyramid levels: one nested layer in an outer model.
    p2 = KL.Input(shape=(8, 8, 32))
    p3 = KL.Input(shape=(4, 4, 32))
    outs = [rpn(p) for p in (p2, p3)]
    outer = keras.Model([p2, p3], [o for level in outs for o in level])
    assert [layer.name for layer in outer.layers if isinstance(layer, keras.Model)] == ["rpn_model"]
    rng = np.random.RandomState(0)
    res = outer([rng.normal(size=(2, 8, 8, 32)).astype("float32"),
                 rng.normal(size=(2, 4, 4, 32)).astype("float32")])
    logits, probs, bbox = [r.numpy() for r in res[:3]]
    assert logits.shape == (2, 8 * 8 * 3, 2) and probs.shape == (2, 192, 2)
    assert bbox.shape == (2, 192, 4) and res[3].shape == (2, 48, 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


def test_heads_output_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        rois, meta, maps = head_inputs(depth=16)
        config = Config()
        config.NUM_CLASSES = NUM_CLASSES
        for head in ("fcn", "unet"):
            config.MASK_HEAD = head
            out = heads.build_mask_head(config, rois, maps, meta, train_bn=False)
            assert out.dtype == "float32" and tuple(out.shape[2:]) == (28, 28, NUM_CLASSES)
        outs = heads.fpn_classifier_graph(rois, maps, meta, 7, NUM_CLASSES, fc_layers_size=16)
        assert [t.dtype for t in outs] == ["float32"] * 3
        rpn = heads.build_rpn_model(1, 3, 16)
        assert [t.dtype for t in rpn.outputs] == ["float32"] * 3
        model = keras.Model([rois, meta] + maps, out)
        assert model(head_data(batch=1, num_rois=2, depth=16)).dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_build_mask_head_registry():
    assert set(heads.MASK_HEADS) == {"fcn", "unet"}
    assert heads.MASK_HEADS["unet"] is heads.build_unet_mask_graph
    config = Config()
    config.MASK_SHAPE = [56, 56]
    rois, meta, maps = head_inputs(depth=8)
    with pytest.raises(ValueError, match="MASK_SHAPE"):
        heads.build_mask_head(config, rois, maps, meta, train_bn=False)


# ---------------------------------------------------------------------------- losses

def np_smooth_l1(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d ** 2, d - 0.5)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def scalar(t):
    t = t.numpy() if hasattr(t, "numpy") else t
    assert np.shape(t) == () and np.asarray(t).dtype == np.float32
    assert np.isfinite(t)
    return float(t)


def test_smooth_l1():
    a = np.array([[0.0, 0.5, -2.0, 3.0]], "float32")
    b = np.array([[0.2, -0.5, 0.0, 3.0]], "float32")
    np.testing.assert_allclose(losses.smooth_l1_loss(a, b).numpy(), np_smooth_l1(a, b),
                               rtol=1e-6)
    np.testing.assert_allclose(np_smooth_l1(a, b), [[0.02, 0.5, 1.5, 0.0]], rtol=1e-6)


def test_rpn_class_loss_ignores_neutral_anchors():
    rng = np.random.RandomState(3)
    match = rng.choice([-1, 0, 1], size=(2, 30, 1)).astype("int32")
    logits = rng.normal(size=(2, 30, 2)).astype("float32")
    m = match[..., 0]
    ce = -np.take_along_axis(np_log_softmax(logits), (m == 1).astype(int)[..., None], -1)[..., 0]
    expected = ce[m != 0].mean()
    assert scalar(losses.rpn_class_loss_graph(match, logits)) == pytest.approx(expected, 1e-5)
    # Changing neutral anchors' logits changes nothing.
    logits2 = logits.copy()
    logits2[m == 0] = 100.0
    assert scalar(losses.rpn_class_loss_graph(match, logits2)) == pytest.approx(expected, 1e-5)
    assert scalar(losses.rpn_class_loss_graph(np.zeros_like(match), logits)) == 0.0
    # float16 logits are accepted and computed in float32.
    scalar(losses.rpn_class_loss_graph(match, tf.cast(logits, tf.float16)))


def test_rpn_bbox_loss_positive_anchors_only():
    config = Config()
    rng = np.random.RandomState(4)
    match = rng.choice([-1, 0, 1], size=(2, 40, 1), p=[0.4, 0.3, 0.3]).astype("int32")
    rpn_bbox = rng.normal(size=(2, 40, 4)).astype("float32")
    target = np.zeros((2, 20, 4), "float32")
    terms = []
    for b in range(2):
        pos = np.where(match[b, :, 0] == 1)[0]
        target[b, :len(pos)] = rng.normal(size=(len(pos), 4))
        terms.append(np_smooth_l1(target[b, :len(pos)], rpn_bbox[b, pos]))
    expected = np.concatenate(terms).mean()
    got = scalar(losses.rpn_bbox_loss_graph(config, target, match, rpn_bbox))
    assert got == pytest.approx(expected, rel=1e-5)
    no_pos = np.where(match == 1, -1, match)
    assert scalar(losses.rpn_bbox_loss_graph(config, target, no_pos, rpn_bbox)) == 0.0


def test_mrcnn_class_loss_masks_inactive_classes():
    rng = np.random.RandomState(5)
    B, T, C = 2, 6, NUM_CLASSES
    target = rng.randint(0, C, size=(B, T)).astype("int32")
    logits = rng.normal(size=(B, T, C)).astype("float32")
    active = np.ones((B, C), "float32")
    active[:, 3] = 0
    active[1, 4] = 0
    ce = -np.take_along_axis(np_log_softmax(logits), target[..., None], -1)[..., 0]
    pred = logits.argmax(-1)
    weight = np.take_along_axis(active, pred, -1)
    expected = (ce * weight).sum() / weight.sum()
    got = scalar(losses.mrcnn_class_loss_graph(target, logits, active))
    assert got == pytest.approx(expected, rel=1e-5)
    assert got != pytest.approx(ce.mean(), rel=1e-3)
    assert scalar(losses.mrcnn_class_loss_graph(target, logits, np.zeros_like(active))) == 0.0


def test_mrcnn_bbox_loss_positive_rois_own_class():
    rng = np.random.RandomState(6)
    B, T, C = 2, 5, NUM_CLASSES
    target_ids = np.array([[1, 0, 3, 0, 0], [4, 2, 0, 0, 0]], "int32")
    target_bbox = rng.normal(size=(B, T, 4)).astype("float32")
    pred = rng.normal(size=(B, T, C, 4)).astype("float32")
    terms = [np_smooth_l1(target_bbox[b, t], pred[b, t, target_ids[b, t]])
             for b in range(B) for t in range(T) if target_ids[b, t] > 0]
    expected = np.mean(terms)
    got = scalar(losses.mrcnn_bbox_loss_graph(target_bbox, target_ids, pred))
    assert got == pytest.approx(expected, rel=1e-5)
    assert scalar(losses.mrcnn_bbox_loss_graph(target_bbox, np.zeros_like(target_ids),
                                               pred)) == 0.0


def test_mrcnn_mask_loss_positive_rois_own_class():
    rng = np.random.RandomState(7)
    B, T, C, S = 2, 4, NUM_CLASSES, 6
    target_ids = np.array([[2, 0, 1, 0], [0, 4, 0, 0]], "int32")
    target_masks = rng.rand(B, T, S, S) > 0.5
    pred = rng.uniform(0.01, 0.99, size=(B, T, S, S, C)).astype("float32")
    terms = []
    for b in range(B):
        for t in range(T):
            if target_ids[b, t] > 0:
                p = pred[b, t, :, :, target_ids[b, t]]
                y = target_masks[b, t]
                terms.append(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
    expected = np.mean(terms)
    got = scalar(losses.mrcnn_mask_loss_graph(target_masks, target_ids, pred))
    assert got == pytest.approx(expected, rel=1e-5)
    # Empty positives: 0, not NaN; saturated predictions stay finite.
    assert scalar(losses.mrcnn_mask_loss_graph(target_masks, np.zeros_like(target_ids),
                                               pred)) == 0.0
    scalar(losses.mrcnn_mask_loss_graph(target_masks, target_ids, np.round(pred)))


def test_losses_have_finite_gradients_when_empty():
    logits = tf.Variable(np.zeros((1, 4, 2), "float32"))
    pred_masks = tf.Variable(np.full((1, 3, 4, 4, NUM_CLASSES), 0.5, "float32"))
    with tf.GradientTape() as tape:
        total = (losses.rpn_class_loss_graph(np.zeros((1, 4, 1), "int32"), logits)
                 + losses.mrcnn_mask_loss_graph(np.zeros((1, 3, 4, 4)), np.zeros((1, 3), "int32"),
                                                pred_masks))
    grads = tape.gradient(total, [logits, pred_masks])
    assert float(total) == 0.0
    assert all(np.all(np.isfinite(tf.convert_to_tensor(g).numpy())) for g in grads)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # Keras' loader
def test_per_roi_layers_save_and_load(tmp_path):
    # heads.TimeDistributed and a frozen BatchNorm survive a .keras round trip.
    x_in = KL.Input(shape=(None, 6, 6, 8))
    x = heads.TimeDistributed(KL.Conv2D(4, 3, padding="same"), name="mrcnn_a")(x_in)
    x = heads.TimeDistributed(backbone.BatchNorm(), name="mrcnn_bn")(x, training=False)
    model = keras.Model(x_in, x)
    model.get_layer("mrcnn_bn").layer.moving_mean.assign([0.5, -1.0, 2.0, 0.0])
    data = np.random.RandomState(8).normal(size=(2, 3, 6, 6, 8)).astype("float32")
    expected = model(data, training=True).numpy()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.get_layer("mrcnn_bn"), heads.TimeDistributed)
    assert loaded.get_layer("mrcnn_bn").layer.frozen
    np.testing.assert_allclose(loaded(data, training=True).numpy(), expected, atol=1e-6)
