"""Per-class detection scoring (DETECTION_SCORING = "per_class") against a numpy reference,
and the mask threshold (DETECTION_MASK_THRESHOLD) in numpy, in the graph and in export."""

import numpy as np
import pytest
import tensorflow as tf

from synthetic import shapes_config

from mrcnn import export, layers, utils
from mrcnn.config import ConfigError

STD = np.array([0.1, 0.1, 0.2, 0.2], np.float32)


def numpy_per_class(rois, probs, deltas, window, min_conf, nms_threshold, max_instances):
    """Every (ROI, class >= 1) pair with score >= min_conf, refined by that class's deltas and
    clipped to the window; greedy NMS per class (utils.non_max_suppression); the
    max_instances best. Returns [K, 6] rows (y1, x1, y2, x2, class, score) by score."""
    boxes, classes, scores = [], [], []
    for i in range(len(rois)):
        for c in range(1, probs.shape[1]):
            if probs[i, c] < min_conf:
                continue
            b = utils.apply_box_deltas(rois[i:i + 1].astype(np.float64),
                                       (deltas[i, c] * STD)[None].astype(np.float64))[0]
            wy1, wx1, wy2, wx2 = window
            b = np.array([np.clip(b[0], wy1, wy2), np.clip(b[1], wx1, wx2),
                          np.clip(b[2], wy1, wy2), np.clip(b[3], wx1, wx2)])
            boxes.append(b)
            classes.append(c)
            scores.append(probs[i, c])
    boxes, classes, scores = np.array(boxes), np.array(classes), np.array(scores)
    rows = []
    for c in np.unique(classes):
        ix = np.flatnonzero(classes == c)
        kept = utils.non_max_suppression(boxes[ix], scores[ix], nms_threshold)
        for k in ix[kept]:
            rows.append(list(boxes[k]) + [c, scores[k]])
    rows = sorted(rows, key=lambda r: -r[5])[:max_instances]
    return np.array(rows, np.float32).reshape(-1, 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_scoring_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    n, c = 30, 5
    y1x1 = rng.uniform(0, 0.7, (n, 2))
    hw = rng.uniform(0.05, 0.3, (n, 2))
    rois = np.concatenate([y1x1, y1x1 + hw], axis=1).astype(np.float32)
    logits = rng.normal(0, 2, (n, c))
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    deltas = rng.normal(0, 1, (n, c, 4)).astype(np.float32)
    window = np.array([0.05, 0.0, 0.95, 1.0], np.float32)
    got = layers.refine_detections_graph(
        tf.constant(rois), tf.constant(probs), tf.constant(deltas), tf.constant(window),
        bbox_std_dev=STD, min_confidence=0.1, nms_threshold=0.4, max_instances=25,
        scoring="per_class", per_class_candidates=2000).numpy()
    want = numpy_per_class(rois, probs, deltas, window, 0.1, 0.4, 25)
    count = int((got[:, 4] > 0).sum())
    assert count == len(want)
    assert not got[count:].any()
    np.testing.assert_allclose(got[:count], want, rtol=1e-4, atol=1e-5)
    # One ROI may yield several classes, which argmax scoring never does.
    argmax = layers.refine_detections_graph(
        tf.constant(rois), tf.constant(probs), tf.constant(deltas), tf.constant(window),
        bbox_std_dev=STD, min_confidence=0.1, nms_threshold=0.4, max_instances=25,
        scoring="argmax").numpy()
    assert count >= int((argmax[:, 4] > 0).sum())


def test_per_class_candidates_bound_what_enters_nms():
    rng = np.random.default_rng(5)
    n, c = 40, 6
    rois = np.tile(np.array([[0.1, 0.1, 0.5, 0.5]], np.float32), (n, 1))
    probs = rng.dirichlet(np.ones(c), n).astype(np.float32)
    deltas = np.zeros((n, c, 4), np.float32)
    window = np.array([0, 0, 1, 1], np.float32)
    got = layers.refine_detections_graph(
        tf.constant(rois), tf.constant(probs), tf.constant(deltas), tf.constant(window),
        bbox_std_dev=STD, min_confidence=0.0, nms_threshold=0.99, max_instances=100,
        scoring="per_class", per_class_candidates=7).numpy()
    # Identical boxes, NMS at 0.99: one survivor per class among the 7 best pairs.
    best7 = np.sort(probs[:, 1:].ravel())[::-1][:7]
    kept = got[got[:, 4] > 0]
    assert set(kept[:, 5].round(6)) <= set(best7.round(6))
    assert len(kept) == len(set(kept[:, 4]))


def test_detection_layer_takes_scoring_from_config():
    config = shapes_config(DETECTION_SCORING="per_class", DETECTION_PER_CLASS_CANDIDATES=50)
    layer = layers.DetectionLayer(config)
    assert layer.detection_scoring == "per_class"
    assert layers.DetectionLayer.from_config(layer.get_config()).detection_per_class_candidates \
        == 50
    with pytest.raises(ConfigError, match="DETECTION_SCORING"):
        shapes_config(DETECTION_SCORING="softmax")
    with pytest.raises(ConfigError, match="DETECTION_MASK_THRESHOLD"):
        shapes_config(DETECTION_MASK_THRESHOLD=1.5)


def test_mask_threshold_numpy_and_graph_agree():
    rng = np.random.default_rng(3)
    masks = rng.uniform(0, 1, (4, 28, 28)).astype(np.float32)
    boxes = np.array([[3, 4, 40, 30], [10, 10, 20, 60], [0, 0, 64, 64], [50, 5, 63, 9]])
    for threshold in (0.3, 0.5, 0.8):
        ours = utils.unmold_masks(masks, boxes, (64, 64), threshold=threshold)
        graph = export.paste_masks_graph(tf.constant(masks), tf.constant(boxes, tf.int32),
                                         tf.constant([64, 64]), threshold).numpy()
        np.testing.assert_array_equal(np.transpose(graph, [1, 2, 0]), ours)
    # A lower threshold keeps a superset of the pixels.
    low = utils.unmold_masks(masks, boxes, (64, 64), threshold=0.3)
    high = utils.unmold_masks(masks, boxes, (64, 64), threshold=0.8)
    assert (low | high).sum() == low.sum() > high.sum()
