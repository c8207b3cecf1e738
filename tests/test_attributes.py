"""Attribute-Mask R-CNN (issue 15, items 1-4): NUM_ATTRIBUTES, the loader's multi-hot
attributes, the detection targets, the attribute head and loss, detect() and the export."""

import keras
import numpy as np
import pytest

from synthetic import ShapesConfig, ShapesDataset, shapes_config, write_legacy_h5

from mrcnn import data, layers, losses, training
from mrcnn.config import Config, ConfigError
from mrcnn.model import MaskRCNN

NUM_ATTRIBUTES = 5


class AttributeShapesConfig(ShapesConfig):
    NUM_ATTRIBUTES = NUM_ATTRIBUTES
    LOSS_WEIGHTS = dict(Config.LOSS_WEIGHTS, mrcnn_attribute_loss=1.)


class AttributeShapesDataset(ShapesDataset):
    """Shapes whose attributes follow from the shape: attribute k is on for instance i of
    image j when (class_id + k + i) % 3 == 0 (so instances differ, and ids reach 4)."""

    def load_attributes(self, image_id):
        _, class_ids = self.load_mask(image_id)
        return [tuple(k for k in range(NUM_ATTRIBUTES) if (c + k + i) % 3 == 0)
                for i, c in enumerate(class_ids)]


def attribute_dataset(count, seed=0):
    dataset = AttributeShapesDataset()
    dataset.load_shapes(count, seed=seed)
    dataset.prepare()
    return dataset


def attribute_config(**overrides):
    config = AttributeShapesConfig()
    return config.override(overrides) if overrides else config


def multi_hot(dataset, image_id):
    out = np.zeros((len(dataset.load_attributes(image_id)), NUM_ATTRIBUTES), bool)
    for i, ids in enumerate(dataset.load_attributes(image_id)):
        out[i, list(ids)] = True
    return out


# ----------------------------------------------------------------------------- config

def test_config_defaults_off_and_the_loss_weight_is_required_only_when_on():
    config = Config()
    assert config.NUM_ATTRIBUTES == 0 and config.DETECTION_ATTRIBUTE_THRESHOLD == 0.5
    assert "mrcnn_attribute_loss" not in config.LOSS_WEIGHTS
    assert training.loss_names(config) == training.LOSS_NAMES
    with pytest.raises(ConfigError, match="mrcnn_attribute_loss"):
        shapes_config(NUM_ATTRIBUTES=3)
    config = attribute_config()
    assert training.loss_names(config) == training.LOSS_NAMES + ("mrcnn_attribute_loss",)
    with pytest.raises(ConfigError, match="NUM_ATTRIBUTES"):
        attribute_config(NUM_ATTRIBUTES=-1)
    with pytest.raises(ConfigError, match="DETECTION_ATTRIBUTE_THRESHOLD"):
        attribute_config(DETECTION_ATTRIBUTE_THRESHOLD=1.0)


# ----------------------------------------------------------------------------- data

def test_load_image_gt_keeps_attributes_aligned_and_the_five_tuple_when_off():
    config = attribute_config()
    dataset = attribute_dataset(6, seed=3)
    for image_id in dataset.image_ids:
        plain = data.load_image_gt(dataset, config, image_id, use_mini_mask=True)
        assert len(plain) == 5
        *rest, attributes = data.load_image_gt(dataset, config, image_id, use_mini_mask=True,
                                               with_attributes=True)
        for a, b in zip(plain, rest):
            np.testing.assert_array_equal(a, b)
        expected = multi_hot(dataset, image_id)
        _, class_ids = dataset.load_mask(image_id)
        assert attributes.dtype == bool and attributes.shape == (len(rest[2]), NUM_ATTRIBUTES)
        # Instances kept in order: each kept one's attributes are its own.
        kept = [i for i in range(len(class_ids))
                if dataset.load_mask(image_id)[0][:, :, i].any()]
        np.testing.assert_array_equal(attributes, expected[kept])


def test_vanished_instances_drop_their_attributes():
    class Occluded(AttributeShapesDataset):
        def load_mask(self, image_id):
            masks, class_ids = super().load_mask(image_id)
            # An extra, empty instance first: it vanishes.
            empty = np.zeros(masks.shape[:2] + (1,), bool)
            return np.concatenate([empty, masks], axis=2), np.r_[2, class_ids].astype(np.int32)

    dataset = Occluded()
    dataset.load_shapes(2, seed=4)
    dataset.prepare()
    config = attribute_config()
    flip = __import__("albumentations").HorizontalFlip(p=1.0)
    for augmentation in (None, flip):
        for mini in (False, True):
            out = data.load_image_gt(dataset, config, 0, augmentation=augmentation,
                                     use_mini_mask=mini, with_attributes=True)
            class_ids, attributes = out[2], out[5]
            expected = multi_hot(dataset, 0)[1:]
            assert len(class_ids) == len(expected)
            np.testing.assert_array_equal(attributes, expected)


def test_data_generator_adds_input_gt_attributes_truncated_to_max_gt():
    config = attribute_config(MAX_GT_INSTANCES=2)
    dataset = attribute_dataset(8, seed=5)
    generator = data.DataGenerator(dataset, config, shuffle=False, workers=0, seed=0,
                                   skip_empty=False)
    (inputs,) = generator[0]
    assert len(inputs) == 8
    gt = inputs[7]
    assert gt.dtype == bool and gt.shape == (1, 2, NUM_ATTRIBUTES)
    image_id = int(generator.epoch_plan(0)[0][0])
    expected = multi_hot(dataset, image_id)[:2]
    n = int((inputs[4][0] != 0).sum())
    np.testing.assert_array_equal(gt[0, :n], expected[:n])
    assert not gt[0, n:].any()
    # Off: matterport's seven inputs.
    (plain,) = data.DataGenerator(dataset, shapes_config(MAX_GT_INSTANCES=2), shuffle=False,
                                  workers=0, seed=0, skip_empty=False)[0]
    assert len(plain) == 7


# ----------------------------------------------------------------------------- targets

def iou(a, b):
    y1 = np.maximum(a[:, None, 0], b[None, :, 0])
    x1 = np.maximum(a[:, None, 1], b[None, :, 1])
    y2 = np.minimum(a[:, None, 2], b[None, :, 2])
    x2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.maximum(y2 - y1, 0) * np.maximum(x2 - x1, 0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None] - inter)


def test_detection_targets_give_positive_rois_their_instance_attributes():
    rng = np.random.default_rng(0)
    gt_boxes = np.array([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9], [0.1, 0.6, 0.3, 0.9],
                         [0, 0, 0, 0]], np.float32)
    gt_class_ids = np.array([1, 2, 3, 0], np.int32)
    gt_attributes = rng.random((4, 7)) < 0.5
    gt_attributes[3] = True       # padding: never used
    # Proposals: jittered GT boxes (positives) and random boxes (mostly negatives).
    jitter = np.repeat(gt_boxes[:3], 6, axis=0) + rng.normal(0, 0.02, (18, 4))
    # (y1, y2) and (x1, x2) sorted pairs -> (y1, x1, y2, x2)
    random = np.sort(rng.random((30, 2, 2)), axis=2).reshape(30, 4)[:, [0, 2, 1, 3]]
    proposals = np.concatenate([jitter, random]).astype(np.float32)
    proposals = np.clip(proposals, 0, 1)
    masks = np.ones((28, 28, 4), bool)
    layer = layers.DetectionTargetLayer(train_rois_per_image=32, roi_positive_ratio=0.33,
                                        mask_shape=[28, 28], use_mini_mask=True)
    out = layer([proposals[None], gt_class_ids[None], gt_boxes[None], masks[None],
                 gt_attributes[None]])
    assert len(out) == 5
    rois, class_ids, _, _, attributes = (np.asarray(t)[0] for t in out)
    assert attributes.shape == (32, 7)
    positive = class_ids > 0
    assert positive.sum() >= 5
    overlaps = iou(rois[positive], gt_boxes[:3])
    assert (overlaps.max(axis=1) >= 0.5).all()
    matched = overlaps.argmax(axis=1)
    np.testing.assert_array_equal(class_ids[positive], gt_class_ids[matched])
    np.testing.assert_array_equal(attributes[positive], gt_attributes[matched].astype(np.float32))
    assert not attributes[~positive].any()
    # Without the 5th input: the four targets, the same ROIs (sampling is a function of the
    # proposals and boxes).
    four = layer([proposals[None], gt_class_ids[None], gt_boxes[None], masks[None]])
    assert len(four) == 4
    np.testing.assert_array_equal(np.asarray(four[0])[0], rois)


# ----------------------------------------------------------------------------- loss

def test_attribute_loss_against_numpy_sigmoid_cross_entropy():
    rng = np.random.default_rng(1)
    targets = (rng.random((2, 6, 4)) < 0.4).astype(np.float32)
    logits = rng.normal(0, 2, (2, 6, 4)).astype(np.float32)
    class_ids = np.array([[1, 2, 3, 0, 0, 0], [2, 0, 0, 0, 0, 0]], np.int32)
    p = 1 / (1 + np.exp(-logits))
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    positive = class_ids > 0
    total, count = (float(v) for v in losses.mrcnn_attribute_loss_sum_count(
        targets, class_ids, logits))
    np.testing.assert_allclose(total, bce[positive].sum(), rtol=1e-5)
    assert count == positive.sum() * 4
    np.testing.assert_allclose(float(losses.mrcnn_attribute_loss_graph(
        targets, class_ids, logits)), bce[positive].mean(), rtol=1e-5)
    # No positive ROI: 0, not NaN.
    assert float(losses.mrcnn_attribute_loss_graph(targets, np.zeros_like(class_ids),
                                                   logits)) == 0.0


# ----------------------------------------------------------------------------- model

def test_off_leaves_the_models_outputs_and_layers_as_before(tmp_path):
    config = shapes_config()
    for mode in ("training", "inference"):
        model = MaskRCNN(mode, config, str(tmp_path)).keras_model
        names = [layer.name for layer in model.layers]
        assert not [n for n in names if "attribute" in n]
        assert [t.name for t in model.inputs if "attribute" in t.name] == []
    assert len(model.outputs) == 7
    training_model = MaskRCNN("training", config, str(tmp_path)).keras_model
    assert len(training_model.outputs) == 9 + 2 * 5
    assert len(training_model.inputs) == 7
    assert training_model.loss_names == training.LOSS_NAMES


def test_heads_training_trains_the_attribute_layer_and_logs_its_loss(tmp_path):
    keras.utils.set_random_seed(0)
    config = attribute_config(STEPS_PER_EPOCH=3, VALIDATION_STEPS=1, PRE_NMS_LIMIT=4000,
                              POST_NMS_ROIS_TRAINING=1000)
    model = MaskRCNN("training", config, str(tmp_path))
    km = model.keras_model
    assert len(km.outputs) == 10 + 2 * 6
    assert km.get_layer("mrcnn_attribute_logits").output.shape[-1] == NUM_ATTRIBUTES
    before = [np.array(w) for w in km.get_layer("mrcnn_attribute_logits").get_weights()]
    history = model.train(attribute_dataset(3, seed=1), attribute_dataset(1, seed=2),
                          learning_rate=0.002, epochs=1, layers="heads")
    loss = history.history["mrcnn_attribute_loss"][0]
    assert np.isfinite(loss) and loss > 0
    assert "val_mrcnn_attribute_loss" in history.history
    after = km.get_layer("mrcnn_attribute_logits").get_weights()
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))


def test_a_checkpoint_without_the_attribute_layer_loads(tmp_path, caplog):
    keras.utils.set_random_seed(1)
    plain = MaskRCNN("inference", shapes_config(), str(tmp_path))
    path = str(tmp_path / "mask_rcnn_coco.h5")
    write_legacy_h5(plain.keras_model, path)
    keras.utils.set_random_seed(2)
    model = MaskRCNN("inference", attribute_config(), str(tmp_path))
    initial = [np.array(w) for w in model.keras_model.get_layer(
        "mrcnn_attribute_logits").get_weights()]
    with caplog.at_level("WARNING"):
        model.load_weights(path, by_name=True)
    assert "mrcnn_attribute_logits" in caplog.text
    for a, b in zip(initial, model.keras_model.get_layer("mrcnn_attribute_logits").get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.keras_model.get_layer("mrcnn_bbox_fc").get_weights()[0],
                                  plain.keras_model.get_layer("mrcnn_bbox_fc").get_weights()[0])


@pytest.fixture(scope="module")
def inference_model(tmp_path_factory):
    keras.utils.set_random_seed(3)
    return MaskRCNN("inference", attribute_config(DETECTION_ATTRIBUTE_THRESHOLD=0.45),
                    str(tmp_path_factory.mktemp("logs")))


def test_detect_returns_attribute_scores_of_each_detections_roi(inference_model):
    model = inference_model
    km = model.keras_model
    assert len(km.outputs) == 8
    assert tuple(km.outputs[0].shape[1:]) == (model.config.DETECTION_MAX_INSTANCES, 6)
    assert tuple(km.outputs[7].shape[1:]) == (model.config.DETECTION_MAX_INSTANCES,
                                              NUM_ATTRIBUTES)
    image = attribute_dataset(1, seed=5).load_image(0)
    (result,) = model.detect([image])
    n = len(result["class_ids"])
    assert n > 0
    scores = result["attribute_scores"]
    assert scores.shape == (n, NUM_ATTRIBUTES) and scores.dtype == np.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    assert len(result["attributes"]) == n
    for row, ids in zip(scores, result["attributes"]):
        np.testing.assert_array_equal(ids, np.flatnonzero(row >= 0.45))
    # Each detection's scores are the sigmoid of its ROI's logits: recompute per ROI.
    molded, metas, _ = model.mold_inputs([image])
    anchors = model._batch_anchors(molded[0].shape, 1)
    probe = keras.Model(km.inputs, [km.get_layer("ROI").output,
                                    km.get_layer("mrcnn_attribute").output,
                                    km.get_layer("mrcnn_class").output, km.outputs[0],
                                    km.outputs[7]])
    rois, roi_attributes, probs, detections, detection_attributes = (
        np.asarray(t)[0] for t in probe.predict_on_batch([molded, metas, anchors]))
    d = int((detections[:, 4] > 0).sum())
    for row in range(d):
        # The detection's ROI: the one whose best class and score it has (argmax scoring).
        candidates = np.flatnonzero(np.isclose(probs.max(axis=1), detections[row, 5])
                                    & (probs.argmax(axis=1) == detections[row, 4]))
        assert any(np.allclose(roi_attributes[c], detection_attributes[row]) for c in candidates)
    assert not detection_attributes[d:].any()


def test_refine_detections_carries_the_rows_of_the_rois_in_both_scorings():
    rois = np.array([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.8, 0.8], [0.1, 0.6, 0.3, 0.9]],
                    np.float32)
    probs = np.array([[0.1, 0.8, 0.1], [0.2, 0.1, 0.7], [0.05, 0.5, 0.45]], np.float32)
    deltas = np.zeros((3, 3, 4), np.float32)
    attributes = np.array([[1, 0], [0, 1], [0.5, 0.25]], np.float32)
    window = np.array([0, 0, 1, 1], np.float32)
    for scoring in ("argmax", "per_class"):
        detections, rows = (np.asarray(t) for t in layers.refine_detections_graph(
            rois, probs, deltas, window, bbox_std_dev=[1, 1, 1, 1], min_confidence=0.3,
            nms_threshold=0.3, max_instances=6, scoring=scoring,
            per_class_candidates=100, attributes=attributes))
        d = int((detections[:, 4] > 0).sum())
        assert d == (3 if scoring == "argmax" else 4)
        for det, row in zip(detections[:d], rows[:d]):
            roi = np.flatnonzero(np.all(np.isclose(rois, det[:4]), axis=1))[0]
            np.testing.assert_array_equal(row, attributes[roi])
        assert not rows[d:].any()


def test_export_returns_the_attributes_as_detect_does(inference_model, tmp_path):
    import json

    import tensorflow as tf

    from mrcnn.export import export_saved_model
    model = inference_model
    image = attribute_dataset(1, seed=5).load_image(0)
    expected = model.detect([image])[0]
    path = export_saved_model(model, str(tmp_path / "export"), verbose=False)
    served = tf.saved_model.load(path)
    out = {k: np.asarray(v) for k, v in
           served.signatures["serving_default"](image=tf.constant(image)).items()}
    n = len(expected["class_ids"])
    np.testing.assert_array_equal(out["class_ids"], expected["class_ids"])
    assert out["attribute_scores"].shape == (n, NUM_ATTRIBUTES)
    np.testing.assert_allclose(out["attribute_scores"], expected["attribute_scores"],
                               rtol=1e-5, atol=1e-6)
    assert out["attributes"].dtype == bool
    for row, ids in zip(out["attributes"], expected["attributes"]):
        np.testing.assert_array_equal(np.flatnonzero(row), ids)
    with open(tmp_path / "export" / "config.json") as f:
        info = json.load(f)
    assert info["num_attributes"] == NUM_ATTRIBUTES
    assert {"attribute_scores", "attributes"} <= set(info["outputs"])
