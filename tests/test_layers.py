"""Tests of mrcnn.layers: every graph op and layer against an independent numpy reference."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from mrcnn import layers as L
from mrcnn.config import Config

RNG_SEED = 1234


# ---------------------------------------------------------------------------- numpy references

def np_iou(a, b):
    """IoU of two boxes (y1, x1, y2, x2); 0 when either has no area (as TF's NMS does)."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    if area_a <= 0 or area_b <= 0:
        return 0.0
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    return inter / (area_a + area_b - inter)


def np_apply_deltas(box, delta):
    h, w = box[2] - box[0], box[3] - box[1]
    cy, cx = box[0] + h / 2, box[1] + w / 2
    cy, cx = cy + delta[0] * h, cx + delta[1] * w
    h, w = h * np.exp(delta[2]), w * np.exp(delta[3])
    return np.array([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2])


def np_refinement(box, gt):
    h, w = box[2] - box[0], box[3] - box[1]
    gh, gw = gt[2] - gt[0], gt[3] - gt[1]
    return np.array([((gt[0] + gh / 2) - (box[0] + h / 2)) / h,
                     ((gt[1] + gw / 2) - (box[1] + w / 2)) / w,
                     np.log(gh / h), np.log(gw / w)])


def np_greedy_nms(boxes, scores, threshold, max_out, classes=None):
    """Greedy NMS, brute force: indices in decreasing score order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        if len(kept) == max_out:
            break
        if all((classes is not None and classes[i] != classes[j])
               or np_iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


def np_crop_bilinear(image, box, size):
    """tf.image.crop_and_resize of one [H, W] image, written out (extrapolation value 0)."""
    H, W = image.shape
    out = np.zeros(size)
    y1, x1, y2, x2 = box
    for i in range(size[0]):
        y = (y1 * (H - 1) + i * (y2 - y1) * (H - 1) / (size[0] - 1)) if size[0] > 1 \
            else 0.5 * (y1 + y2) * (H - 1)
        for j in range(size[1]):
            x = (x1 * (W - 1) + j * (x2 - x1) * (W - 1) / (size[1] - 1)) if size[1] > 1 \
                else 0.5 * (x1 + x2) * (W - 1)
            if y < 0 or y > H - 1 or x < 0 or x > W - 1:
                continue
            t, left = int(np.floor(y)), int(np.floor(x))
            b, r = min(t + 1, H - 1), min(left + 1, W - 1)
            fy, fx = y - t, x - left
            top = image[t, left] + (image[t, r] - image[t, left]) * fx
            bottom = image[b, left] + (image[b, r] - image[b, left]) * fx
            out[i, j] = top + (bottom - top) * fy
    return out


def random_boxes(rng, n, min_size=0.05, max_size=0.5):
    y1 = rng.uniform(0, 1 - max_size, n)
    x1 = rng.uniform(0, 1 - max_size, n)
    h = rng.uniform(min_size, max_size, n)
    w = rng.uniform(min_size, max_size, n)
    return np.stack([y1, x1, y1 + h, x1 + w], axis=1).astype(np.float32)


def image_meta(image_shape, window, num_classes):
    """compose_image_meta's layout, written out: id, original shape, shape, window, scale, ids."""
    return np.array([0] + list(image_shape) + list(image_shape) + list(window) + [1.0]
                    + [1] * num_classes, dtype=np.float32)


def sorted_rows(a):
    a = np.asarray(a)
    return a[np.lexsort(a.T[::-1])]


# ---------------------------------------------------------------------------- graph helpers

def test_box_deltas_graph_matches_numpy():
    rng = np.random.default_rng(RNG_SEED)
    boxes = random_boxes(rng, 40)
    gt = random_boxes(rng, 40)
    deltas = rng.normal(0, 0.3, (40, 4)).astype(np.float32)

    applied = L.apply_box_deltas_graph(tf.constant(boxes), tf.constant(deltas)).numpy()
    expected = np.array([np_apply_deltas(b, d) for b, d in zip(boxes, deltas)])
    np.testing.assert_allclose(applied, expected, rtol=1e-5, atol=1e-6)

    refined = L.box_refinement_graph(tf.constant(boxes), tf.constant(gt)).numpy()
    expected = np.array([np_refinement(b, g) for b, g in zip(boxes, gt)])
    np.testing.assert_allclose(refined, expected, rtol=1e-4, atol=1e-5)

    # The two are inverses; batched shapes [2, 20, 4] work the same.
    back = L.apply_box_deltas_graph(tf.constant(boxes.reshape(2, 20, 4)),
                                    tf.constant(refined.reshape(2, 20, 4))).numpy()
    np.testing.assert_allclose(back.reshape(40, 4), gt, atol=1e-5)


def test_overlaps_graph_matches_brute_force():
    rng = np.random.default_rng(RNG_SEED + 1)
    b1 = np.concatenate([random_boxes(rng, 12), np.zeros((1, 4), np.float32)])
    b2 = np.concatenate([random_boxes(rng, 9), b1[:3], np.zeros((1, 4), np.float32)])
    got = L.overlaps_graph(tf.constant(b1), tf.constant(b2)).numpy()
    expected = np.array([[np_iou(a, b) for b in b2] for a in b1])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got[np.arange(3), 9 + np.arange(3)], 1.0, atol=1e-6)
    assert got[-1, -1] == 0.0  # two zero-area boxes: 0, not NaN


def test_clip_norm_denorm_trim_and_meta():
    boxes = tf.constant([[-0.1, 0.2, 0.5, 1.3], [0.3, -2.0, 0.4, -1.0]])
    np.testing.assert_allclose(L.clip_boxes_graph(boxes, tf.constant([0., 0., 1., 1.])).numpy(),
                               [[0., 0.2, 0.5, 1.], [0.3, 0., 0.4, 0.]])
    # A window per image [batch, 1, 4] against boxes [batch, N, 4].
    clipped = L.clip_boxes_graph(tf.stack([boxes, boxes]),
                                 tf.constant([[[0., 0., 1., 1.]], [[0.2, 0.1, 0.45, 0.9]]]))
    np.testing.assert_allclose(clipped[1].numpy(), [[0.2, 0.2, 0.45, 0.9], [0.3, 0.1, 0.4, 0.1]])

    pixels = np.array([[0, 0, 64, 128], [10, 20, 30, 40]], np.float32)
    normed = L.norm_boxes_graph(tf.constant(pixels), [65, 129]).numpy()
    expected = (pixels - [0, 0, 1, 1]) / np.array([64, 128, 64, 128])
    np.testing.assert_allclose(normed, expected, rtol=1e-6)
    from mrcnn import utils
    if hasattr(utils, "norm_boxes"):  # the numpy twin agrees
        np.testing.assert_allclose(normed, utils.norm_boxes(pixels, (65, 129)), rtol=1e-6)
    np.testing.assert_array_equal(L.denorm_boxes_graph(tf.constant(normed), [65, 129]).numpy(),
                                  pixels)
    # One shape per image.
    batched = L.norm_boxes_graph(tf.constant(pixels), tf.constant([[65., 129.], [33., 65.]]))
    np.testing.assert_allclose(batched[1].numpy(), (pixels[1] - [0, 0, 1, 1]) / [32, 64, 32, 64])

    trimmed, keep = L.trim_zeros_graph(tf.constant([[0, 0, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0.]]))
    np.testing.assert_array_equal(trimmed.numpy(), [[1, 2, 3, 4]])
    np.testing.assert_array_equal(keep.numpy(), [False, True, False])

    meta = np.stack([image_meta((64, 96, 3), (4, 8, 60, 88), 3),
                     image_meta((32, 32, 3), (0, 0, 32, 32), 3)])
    meta[0, 0], meta[0, 11], meta[0, 12:] = 7, 0.5, [1, 0, 1]
    m = L.parse_image_meta_graph(tf.constant(meta))
    np.testing.assert_array_equal(m["image_id"].numpy(), [7, 0])
    np.testing.assert_array_equal(m["image_shape"][0].numpy(), [64, 96, 3])
    np.testing.assert_array_equal(m["original_image_shape"][1].numpy(), [32, 32, 3])
    np.testing.assert_array_equal(m["window"][0].numpy(), [4, 8, 60, 88])
    np.testing.assert_array_equal(m["scale"].numpy(), [0.5, 1])
    np.testing.assert_array_equal(m["active_class_ids"][0].numpy(), [1, 0, 1])
    np.testing.assert_allclose(L.log2_graph(tf.constant([1., 8., 0.5])).numpy(), [0, 3, -1])


# ---------------------------------------------------------------------------- AnchorsLayer

def test_anchors_layer_tiles_to_batch_and_round_trips():
    anchors = random_boxes(np.random.default_rng(0), 50)
    layer = L.AnchorsLayer(anchors, name="anchors")
    out = layer(tf.zeros([2, 32, 32, 3])).numpy()
    assert out.shape == (2, 50, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], anchors)
    np.testing.assert_array_equal(out[1], anchors)
    assert not layer.weights  # a constant, not a weight

    inp = keras.Input([None, None, 3])
    model = keras.Model(inp, layer(inp))
    assert tuple(model.output.shape) == (None, 50, 4)
    restored = keras.models.model_from_json(model.to_json())
    np.testing.assert_array_equal(restored(np.zeros([3, 8, 8, 3], np.float32)).numpy()[2], anchors)
    np.testing.assert_array_equal(L.AnchorsLayer.from_config(layer.get_config()).anchors, anchors)
    # A plain nested list works too.
    assert L.AnchorsLayer(anchors.tolist()).anchors.shape == (50, 4)


# ---------------------------------------------------------------------------- ProposalLayer

def np_proposals(probs, deltas, anchors, std, pre_nms_limit, count, threshold):
    scores = probs[:, 1]
    order = np.argsort(-scores, kind="stable")[:pre_nms_limit]
    boxes = np.array([np_apply_deltas(anchors[i], deltas[i] * std) for i in order])
    boxes = np.clip(boxes, 0, 1)
    keep = np_greedy_nms(boxes, scores[order], threshold, count)
    out = np.zeros((count, 4))
    out[:len(keep)] = boxes[keep]
    return out


def test_proposal_layer_matches_numpy_pipeline():
    rng = np.random.default_rng(RNG_SEED + 2)
    batch, num_anchors = 2, 300
    anchors = random_boxes(rng, num_anchors, 0.05, 0.4)
    logits = rng.normal(0, 2, (batch, num_anchors, 2))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    deltas = rng.normal(0, 1, (batch, num_anchors, 4)).astype(np.float32)
    std = np.array([0.1, 0.1, 0.2, 0.2], np.float32)

    layer = L.ProposalLayer(proposal_count=40, nms_threshold=0.5, pre_nms_limit=120,
                            rpn_bbox_std_dev=std)
    out = layer([probs, deltas, np.broadcast_to(anchors, (batch, num_anchors, 4))]).numpy()
    assert out.shape == (batch, 40, 4) and out.dtype == np.float32
    for b in range(batch):
        expected = np_proposals(probs[b], deltas[b], anchors, std, 120, 40, 0.5)
        np.testing.assert_allclose(out[b], expected, atol=1e-5)

    # Few anchors: fewer survivors than proposal_count -> zero padding; PRE_NMS_LIMIT > A ok.
    layer = L.ProposalLayer(proposal_count=40, nms_threshold=0.3, pre_nms_limit=1000)
    out = layer([probs[:, :20], deltas[:, :20],
                 np.broadcast_to(anchors[:20], (batch, 20, 4))]).numpy()
    for b in range(batch):
        expected = np_proposals(probs[b, :20], deltas[b, :20], anchors[:20],
                                layer.rpn_bbox_std_dev, 1000, 40, 0.3)
        np.testing.assert_allclose(out[b], expected, atol=1e-5)
        assert not out[b, 20:].any()


# ---------------------------------------------------------------------------- PyramidROIAlign

def square_box(size_px, image_px, offset_px=0.0):
    """A size x size pixel box, normalized as the graph sees it (side size / image side)."""
    s = size_px / image_px
    o = offset_px / image_px
    return [o, o, o + s, o + s]


def test_pyramid_levels_of_known_sizes():
    image_shape = tf.constant([1024., 1024., 3.])
    sizes = [8, 32, 100, 112, 160, 224, 300, 448, 600, 1024]
    # log2(size / 224): level 4 + round(...) clamped to [2, 5]
    expected = [2, 2, 3, 3, 4, 4, 4, 5, 5, 5]
    boxes = tf.constant([square_box(s, 1024) for s in sizes] + [[0, 0, 0, 0]])
    levels = L.roi_pyramid_levels(boxes, image_shape).numpy()
    np.testing.assert_array_equal(levels, expected + [2])  # zero padding -> P2
    np.testing.assert_array_equal(
        levels[:-1], np.clip(4 + np.round(np.log2(np.array(sizes) / 224)), 2, 5))
    # The pixel size counts: the same normalized box is 224 px on 1024 (P4), 112 px on 512 (P3).
    assert L.roi_pyramid_levels(tf.constant([square_box(112, 512)]),
                                tf.constant([512., 512., 3.])).numpy()[0] == 3
    assert L.roi_pyramid_levels(tf.constant([square_box(112, 512)]),
                                tf.constant([1024., 1024., 3.])).numpy()[0] == 4


def ramp_feature_maps(batch, image_px, channels, dtype=np.float32):
    """P2..P5 whose value at (b, y, x, c) is a known linear function of y, x (exact under
    bilinear interpolation)."""
    maps, coefs = [], []
    for level in range(2, 6):
        side = image_px // 2 ** level
        y, x = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
        per_image = []
        for b in range(batch):
            a_y, a_x, const = 0.5 + b + level, 0.25 * level, 100.0 * level + 10 * b
            per_image.append(np.stack([a_y * y + a_x * x + const + c for c in range(channels)],
                                      axis=-1))
            coefs.append(((level, b), (a_y, a_x, const)))
        maps.append(np.stack(per_image).astype(dtype))
    return maps, dict(coefs)


def expected_ramp_crop(box, level, b, coefs, image_px, pool, channels):
    a_y, a_x, const = coefs[(level, b)]
    side = image_px // 2 ** level
    y1, x1, y2, x2 = box
    ys = y1 * (side - 1) + np.arange(pool) * (y2 - y1) * (side - 1) / (pool - 1)
    xs = x1 * (side - 1) + np.arange(pool) * (x2 - x1) * (side - 1) / (pool - 1)
    base = a_y * ys[:, None] + a_x * xs[None, :] + const
    return np.stack([base + c for c in range(channels)], axis=-1)


def test_pyramid_roi_align_crops_ramps_in_box_order():
    image_px, pool, channels = 512, 5, 2
    maps, coefs = ramp_feature_maps(2, image_px, channels)
    # Box sides in pixels: < 79 -> P2, < 158 -> P3, < 317 -> P4, else P5.
    sizes = [[20, 400, 150, 200, 60, 300], [480, 100, 20, 300, 250, 60]]
    boxes = np.array([[square_box(s, image_px, offset_px=3 + i) for i, s in enumerate(row)]
                      for row in sizes], np.float32)
    assert (boxes <= 1).all()
    meta = np.stack([image_meta((image_px, image_px, 3), (0, 0, image_px, image_px), 2)] * 2)
    layer = L.PyramidROIAlign([pool, pool], name="roi_align")
    out = layer([boxes, meta] + maps).numpy()
    assert out.shape == (2, 6, pool, pool, channels)
    levels = L.roi_pyramid_levels(tf.constant(boxes), [image_px, image_px]).numpy()
    assert set(levels.ravel()) == {2, 3, 4, 5}
    for b in range(2):
        for n in range(6):
            expected = expected_ramp_crop(boxes[b, n], levels[b, n], b, coefs, image_px, pool,
                                          channels)
            np.testing.assert_allclose(out[b, n], expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype, atol", [("float16", 0.3), ("bfloat16", 2.5)])
def test_pyramid_roi_align_dynamic_batch_and_low_precision(dtype, atol):
    """float16 and bfloat16 feature maps (mixed precision) give the float32 crops within the
    type's precision (values up to ~300: bfloat16 keeps 8 bits of mantissa) and keep their
    dtype (crop_and_resize has no bfloat16 kernel: the layer casts around it)."""
    image_px, pool, channels = 128, 3, 4
    maps, coefs = ramp_feature_maps(1, image_px, channels)
    boxes = np.array([[square_box(60, image_px, 2), square_box(10, image_px, 5)]], np.float32)
    meta = image_meta((image_px, image_px, 3), (0, 0, image_px, image_px), 2)[None]

    inputs = [keras.Input([None, 4]), keras.Input([meta.shape[1]])] + [
        keras.Input([None, None, channels], dtype=dtype) for _ in range(4)]
    layer = L.PyramidROIAlign((pool, pool), name="roi_align_mask")
    model = keras.Model(inputs, layer(inputs))
    assert tuple(model.output.shape) == (None, None, pool, pool, channels)
    assert model.output.dtype == dtype
    out = model([tf.constant(boxes), tf.constant(meta)] + [tf.cast(m, dtype) for m in maps])
    assert out.dtype == tf.as_dtype(dtype)
    reference = layer([boxes, meta] + maps).numpy()
    np.testing.assert_allclose(tf.cast(out, tf.float32).numpy(), reference, rtol=2e-3, atol=atol)
    assert reference.dtype == np.float32
    config = layer.get_config()
    assert config["pool_shape"] == [pool, pool]
    assert L.PyramidROIAlign.from_config(config).pool_shape == (pool, pool)


# ---------------------------------------------------------------------------- DetectionTargetLayer

def detection_target_case(use_mini_mask):
    """Three images: few positives, many positives, no ground truth. Normalized coords."""
    max_gt, full, mini = 5, 32, 16
    gt_boxes = np.zeros((3, max_gt, 4), np.float32)
    gt_class_ids = np.zeros((3, max_gt), np.int32)
    g1, g2, crowd = [0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.8], [0.05, 0.6, 0.35, 0.95]
    for b in range(2):
        gt_boxes[b, :3] = [g1, g2, crowd]
        gt_class_ids[b, :3] = [1, 2, -1]
    # Padding as the model's norm_boxes_graph makes it from zero pixel boxes.
    gt_boxes[:, 4] = [0, 0, -1 / 127, -1 / 127]

    mask_side = mini if use_mini_mask else full
    gt_masks = np.zeros((3, mask_side, mask_side, max_gt), bool)
    if use_mini_mask:
        gt_masks[:2, 3:11, 2:13, 0] = True           # inside the mini mask of g1
        gt_masks[:2, 0:16, 5:9, 1] = True            # a vertical bar in g2's mini mask
    else:
        gt_masks[:2, 4:12, 4:11, 0] = True           # roughly g1's area of the image
        gt_masks[:2, 17:28, 18:25, 1] = True         # roughly g2's

    rng = np.random.default_rng(RNG_SEED + 3)
    positives_a = np.array([[0.11, 0.1, 0.41, 0.39], [0.1, 0.12, 0.38, 0.4],
                            [0.52, 0.5, 0.9, 0.82]], np.float32)
    jitter = rng.uniform(-0.03, 0.03, (12, 4)).astype(np.float32)
    positives_b = np.array(g1, np.float32) + jitter
    negatives = np.concatenate([random_boxes(rng, 15, 0.05, 0.15) * [0.5, 0.4, 0.5, 0.4]
                                + [0.5, 0.0, 0.5, 0.0],        # lower left: away from all gt
                                [[0.45, 0.1, 0.6, 0.3]]]).astype(np.float32)
    on_crowd = np.array([[0.1, 0.7, 0.3, 0.9], [0.0, 0.55, 0.2, 0.75]], np.float32)
    n = 40
    proposals = np.zeros((3, n, 4), np.float32)
    for b, pos in enumerate([positives_a, positives_b, positives_a]):
        rows = np.concatenate([pos, negatives, on_crowd])
        proposals[b, :len(rows)] = rows[rng.permutation(len(rows))]
    return proposals, gt_class_ids, gt_boxes, gt_masks


def classify_np(proposal, gt_boxes, gt_class_ids):
    """Reference: 'pos' / 'neg' / 'excluded' / 'pad' and the assigned gt index."""
    if not proposal.any():
        return "pad", None
    valid = [i for i in range(len(gt_class_ids)) if gt_class_ids[i] != 0]
    inst = [i for i in valid if gt_class_ids[i] > 0]
    crowd = [i for i in valid if gt_class_ids[i] < 0]
    ious = [np_iou(proposal, gt_boxes[i]) for i in inst]
    if ious and max(ious) >= 0.5:
        return "pos", inst[int(np.argmax(ious))]
    if any(np_iou(proposal, gt_boxes[i]) >= 0.001 for i in crowd):
        return "excluded", None
    return "neg", None


@pytest.mark.parametrize("use_mini_mask", [True, False])
def test_detection_target_layer(use_mini_mask):
    tf.random.set_seed(RNG_SEED)
    proposals, gt_class_ids, gt_boxes, gt_masks = detection_target_case(use_mini_mask)
    T, ratio, std, mask_shape = 20, 0.25, np.array([0.1, 0.1, 0.2, 0.2]), [8, 8]
    layer = L.DetectionTargetLayer(train_rois_per_image=T, roi_positive_ratio=ratio,
                                   bbox_std_dev=std, mask_shape=mask_shape,
                                   use_mini_mask=use_mini_mask)
    rois, class_ids, deltas, masks = [x.numpy() for x in layer(
        [proposals, gt_class_ids, gt_boxes, gt_masks])]
    assert rois.shape == (3, T, 4) and class_ids.shape == (3, T) and class_ids.dtype == np.int32
    assert deltas.shape == (3, T, 4) and masks.shape == (3, T, 8, 8)

    for b, (n_pos, n_neg) in enumerate([(3, 9), (5, 15), (0, 0)]):
        kinds = {tuple(p): classify_np(p, gt_boxes[b], gt_class_ids[b]) for p in proposals[b]}
        all_pos = {k for k, v in kinds.items() if v[0] == "pos"}
        all_neg = {k for k, v in kinds.items() if v[0] == "neg"}
        # Counts: positives capped at int(T * ratio), negatives make them `ratio` of the rois.
        pos_rows, neg_rows = rois[b, :n_pos], rois[b, n_pos:n_pos + n_neg]
        assert {tuple(r) for r in pos_rows} <= all_pos and len({tuple(r) for r in pos_rows}) == n_pos
        assert {tuple(r) for r in neg_rows} <= all_neg and len({tuple(r) for r in neg_rows}) == n_neg
        if n_pos:
            assert n_pos / (n_pos + n_neg) == ratio
        if b == 0:
            assert len(all_pos) == 3  # all of them sampled
        # Zero padding after positives and negatives.
        assert not rois[b, n_pos + n_neg:].any()
        assert not class_ids[b, n_pos:].any() and not deltas[b, n_pos:].any()
        assert not masks[b, n_pos:].any()

        for i, roi in enumerate(pos_rows):
            g = kinds[tuple(roi)][1]
            assert class_ids[b, i] == gt_class_ids[b, g]
            np.testing.assert_allclose(deltas[b, i], np_refinement(roi, gt_boxes[b, g]) / std,
                                       rtol=1e-4, atol=1e-4)
            if use_mini_mask:
                gy1, gx1, gy2, gx2 = gt_boxes[b, g]
                gh, gw = gy2 - gy1, gx2 - gx1
                crop_box = [(roi[0] - gy1) / gh, (roi[1] - gx1) / gw,
                            (roi[2] - gy1) / gh, (roi[3] - gx1) / gw]
            else:
                crop_box = roi
            soft = np_crop_bilinear(gt_masks[b, :, :, g].astype(np.float64), crop_box, mask_shape)
            expected = np.round(soft)
            undecided = np.abs(soft - 0.5) < 1e-3
            np.testing.assert_array_equal(masks[b, i][~undecided], expected[~undecided])
            assert masks[b, i].any() and set(np.unique(masks[b, i])) <= {0.0, 1.0}


@pytest.mark.parametrize("use_mini_mask", [True, False])
def test_proposal_append_gt_gives_positives_before_the_rpn_does(use_mini_mask):
    """PROPOSAL_APPEND_GT: proposals away from every instance give no ROI at all (matterport);
    with the ground truth appended, each instance's own box is a positive with zero box
    targets and its whole mask as the target, and negatives fill the ratio."""
    _, gt_class_ids, gt_boxes, gt_masks = detection_target_case(use_mini_mask)
    rng = np.random.default_rng(RNG_SEED + 5)
    # Lower left, away from g1, g2 and the crowd box.
    far = (random_boxes(rng, 12, 0.05, 0.15) * [0.4, 0.4, 0.4, 0.4]
           + [0.55, 0.0, 0.55, 0.0]).astype(np.float32)
    proposals = np.zeros((3, 20, 4), np.float32)
    proposals[:, :12] = far
    T, ratio, std, mask_shape = 16, 0.25, np.array([0.1, 0.1, 0.2, 0.2]), [8, 8]
    inputs = [proposals, gt_class_ids, gt_boxes, gt_masks]

    def targets(append_gt):
        layer = L.DetectionTargetLayer(train_rois_per_image=T, roi_positive_ratio=ratio,
                                       bbox_std_dev=std, mask_shape=mask_shape,
                                       use_mini_mask=use_mini_mask, append_gt=append_gt)
        assert layer.get_config()["append_gt"] is append_gt
        return [x.numpy() for x in layer(inputs)]

    assert not any(t.any() for t in targets(False))
    # From the configuration, as the model builds it.
    assert L.DetectionTargetLayer(Config().override({"PROPOSAL_APPEND_GT": True})).append_gt
    assert not L.DetectionTargetLayer(Config()).append_gt
    rois, class_ids, deltas, masks = targets(True)
    for b in range(2):
        order = np.argsort(class_ids[b, :2])
        np.testing.assert_allclose(rois[b, :2][order], gt_boxes[b, :2], atol=1e-6)
        np.testing.assert_array_equal(class_ids[b, :2][order], [1, 2])
        np.testing.assert_allclose(deltas[b, :2], 0, atol=1e-5)
        negatives = {tuple(r) for r in rois[b, 2:8]}
        assert len(negatives) == 6 and negatives <= {tuple(r) for r in far}
        assert not rois[b, 8:].any() and not class_ids[b, 2:].any()
        for row, g in zip(order, range(2)):
            crop = [0, 0, 1, 1] if use_mini_mask else gt_boxes[b, g]
            soft = np_crop_bilinear(gt_masks[b, :, :, g].astype(np.float64), crop, mask_shape)
            decided = np.abs(soft - 0.5) >= 1e-3
            np.testing.assert_array_equal(masks[b, row][decided], np.round(soft)[decided])
    assert not rois[2].any()                          # no instance: still nothing


# ---------------------------------------------------------------------------- DetectionLayer

def np_refine_detections(rois, probs, deltas, window, std, min_conf, nms_thr, max_inst):
    class_ids = probs.argmax(axis=1)
    scores = probs[np.arange(len(probs)), class_ids]
    boxes = np.array([np_apply_deltas(r, deltas[i, class_ids[i]] * std)
                      for i, r in enumerate(rois)])
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], window[0], window[2])
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], window[1], window[3])
    cand = [i for i in range(len(rois)) if class_ids[i] > 0 and scores[i] >= min_conf]
    kept = []  # greedy NMS class by class
    for c in sorted(set(class_ids[cand])):
        idx = [i for i in cand if class_ids[i] == c]
        kept += [idx[k] for k in np_greedy_nms(boxes[idx], scores[idx], nms_thr, max_inst)]
    kept = sorted(kept, key=lambda i: -scores[i])[:max_inst]
    out = np.zeros((max_inst, 6))
    for row, i in enumerate(kept):
        out[row] = list(boxes[i]) + [class_ids[i], scores[i]]
    return out


def test_detection_layer_matches_numpy_reference():
    rng = np.random.default_rng(RNG_SEED + 4)
    batch, n, num_classes, max_inst = 2, 60, 4, 10
    # Clustered ROIs so that NMS has work to do.
    centers = random_boxes(rng, 6, 0.1, 0.4)
    rois = (centers[rng.integers(0, 6, (batch, n))]
            + rng.normal(0, 0.02, (batch, n, 4))).astype(np.float32)
    logits = rng.normal(0, 2.5, (batch, n, num_classes))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    probs[1, :, 0] = 0.9  # image 2: few foreground detections -> zero padding
    probs[1, :, 1:] = 0.1 / 3
    probs[1, :3] = [0.05, 0.9, 0.03, 0.02]
    deltas = rng.normal(0, 0.5, (batch, n, num_classes, 4)).astype(np.float32)
    std = np.array([0.1, 0.1, 0.2, 0.2])
    image_px = 128
    windows_px = [(8, 0, 120, 128), (0, 0, 128, 128)]
    meta = np.stack([image_meta((image_px, image_px, 3), w, num_classes) for w in windows_px])

    layer = L.DetectionLayer(bbox_std_dev=std, detection_min_confidence=0.4,
                             detection_nms_threshold=0.3, detection_max_instances=max_inst)
    out = layer([rois, probs, deltas, meta]).numpy()
    assert out.shape == (batch, max_inst, 6) and out.dtype == np.float32
    for b in range(batch):
        window = (np.array(windows_px[b]) - [0, 0, 1, 1]) / (image_px - 1)
        expected = np_refine_detections(rois[b], probs[b], deltas[b], window, std, 0.4, 0.3,
                                        max_inst)
        np.testing.assert_allclose(out[b], expected, atol=1e-5)
    assert (out[0, :, 5] > 0).all()          # the cap is reached in image 1
    assert (out[1, :3, 4] == 1).all() and not out[1, 3:].any()  # three, then zeros

    # float16 inputs (mixed precision heads) give float32 detections.
    out16 = layer([rois.astype(np.float16), probs.astype(np.float16),
                   deltas.astype(np.float16), meta])
    assert out16.dtype == tf.float32


# ---------------------------------------------------------------------------- Keras integration

def test_layers_build_in_symbolic_models_and_configs_round_trip():

    class TinyConfig(Config):
        NAME = "tiny"
        NUM_CLASSES = 3
        IMAGE_MAX_DIM = 64
        IMAGE_MIN_DIM = 64
        TRAIN_ROIS_PER_IMAGE = 8
        MASK_SHAPE = [6, 6]
        MINI_MASK_SHAPE = (10, 10)
        PRE_NMS_LIMIT = 50
        DETECTION_MAX_INSTANCES = 5

    config = TinyConfig()
    meta_size = config.IMAGE_META_SIZE
    probs = keras.Input([None, 2])
    bbox = keras.Input([None, 4])
    anchors = keras.Input([None, 4])
    gt_ids = keras.Input([None], dtype="int32")
    gt_boxes = keras.Input([None, 4])
    gt_masks = keras.Input([10, 10, None], dtype="bool")
    meta = keras.Input([meta_size])
    mrcnn_class = keras.Input([None, 3])
    mrcnn_bbox = keras.Input([None, 3, 4])

    proposal = L.ProposalLayer(16, 0.7, config, name="ROI")
    rois = proposal([probs, bbox, anchors])
    assert tuple(rois.shape) == (None, 16, 4)
    targets_layer = L.DetectionTargetLayer(config, name="proposal_targets")
    targets = targets_layer([rois, gt_ids, gt_boxes, gt_masks])
    assert [tuple(t.shape) for t in targets] == [(None, 8, 4), (None, 8), (None, 8, 4),
                                                 (None, 8, 6, 6)]
    assert targets[1].dtype == "int32"
    detection_layer = L.DetectionLayer(config, name="mrcnn_detection")
    detections = detection_layer([rois, mrcnn_class, mrcnn_bbox, meta])
    assert tuple(detections.shape) == (None, 5, 6)
    model = keras.Model([probs, bbox, anchors, gt_ids, gt_boxes, gt_masks, meta, mrcnn_class,
                         mrcnn_bbox], [rois, *targets, detections])

    # Configs: the config object's values are stored explicitly; from_config rebuilds them.
    for layer in (proposal, targets_layer, detection_layer):
        config_dict = layer.get_config()
        clone = type(layer).from_config(config_dict)
        assert clone.get_config() == config_dict
    assert proposal.get_config()["pre_nms_limit"] == 50
    assert targets_layer.get_config()["mask_shape"] == [6, 6]
    assert detection_layer.get_config()["detection_max_instances"] == 5
    restored = keras.models.model_from_json(model.to_json())

    # Run both on one batch of 2: deterministic outputs agree.
    rng = np.random.default_rng(RNG_SEED + 5)
    a = 30
    anchor_boxes = np.broadcast_to(random_boxes(rng, a), (2, a, 4))
    p = rng.uniform(0, 1, (2, a, 1)).astype(np.float32)
    gt = np.zeros((2, 4, 4), np.float32)
    gt[:, 0] = [0.1, 0.1, 0.6, 0.6]
    masks = np.zeros((2, 10, 10, 4), bool)
    masks[:, 2:8, 2:8, 0] = True
    meta_np = np.stack([image_meta((64, 64, 3), (0, 0, 64, 64), 3)] * 2)
    feed = [np.concatenate([1 - p, p], -1), rng.normal(0, 0.5, (2, a, 4)).astype(np.float32),
            anchor_boxes, np.array([[1, 0, 0, 0]] * 2, np.int32), gt, masks, meta_np,
            rng.dirichlet([1, 1, 1], (2, 16)).astype(np.float32),
            rng.normal(0, 0.5, (2, 16, 3, 4)).astype(np.float32)]
    outs = model.predict(feed, verbose=0)
    outs_restored = restored.predict(feed, verbose=0)
    np.testing.assert_allclose(outs[0], outs_restored[0], atol=1e-6)   # rois
    np.testing.assert_allclose(outs[-1], outs_restored[-1], atol=1e-6)  # detections
    assert outs[1].shape == (2, 8, 4) and outs[4].shape == (2, 8, 6, 6)


def test_mixed_precision_dtypes_gradients_and_jit_flags():
    rng = np.random.default_rng(RNG_SEED + 6)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        proposal = L.ProposalLayer(8, 0.7, pre_nms_limit=20)
        align = L.PyramidROIAlign([3, 3])
        anchors = random_boxes(rng, 30)[None]
        probs = tf.constant(rng.dirichlet([1, 1], (1, 30)), tf.float16)
        deltas = tf.constant(rng.normal(0, 0.5, (1, 30, 4)), tf.float16)
        with tf.GradientTape() as tape:
            tape.watch(deltas)
            rois = proposal([probs, deltas, anchors])
            loss = tf.reduce_sum(rois)
        assert rois.dtype == tf.float32
        assert tape.gradient(loss, deltas) is None  # proposals are constants downstream
        maps = [tf.constant(rng.normal(size=(1, s, s, 2)), tf.float16) for s in (16, 8, 4, 2)]
        meta = image_meta((64, 64, 3), (0, 0, 64, 64), 2)[None]
        pooled = align([tf.cast(rois, tf.float16), meta] + maps)
        assert pooled.dtype == tf.float16 and pooled.shape == (1, 8, 3, 3, 2)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    # Layers with NMS / tf.where keep Keras' jit_compile="auto" from choosing XLA.
    assert not proposal.supports_jit and not align.supports_jit
    assert not L.DetectionLayer().supports_jit and not L.DetectionTargetLayer().supports_jit
    assert L.AnchorsLayer(anchors[0]).supports_jit


def test_empty_inputs_give_zero_padding():
    # No proposals at all (all padding) and no ground truth.
    layer = L.DetectionTargetLayer(train_rois_per_image=6, roi_positive_ratio=0.5,
                                   mask_shape=[4, 4], use_mini_mask=True)
    outs = layer([np.zeros((2, 10, 4)), np.zeros((2, 3), np.int32), np.zeros((2, 3, 4)),
                  np.zeros((2, 8, 8, 3), bool)])
    assert [tuple(o.shape) for o in outs] == [(2, 6, 4), (2, 6), (2, 6, 4), (2, 6, 4, 4)]
    assert not any(o.numpy().any() for o in outs)
    # Everything background: no detections.
    probs = np.zeros((1, 5, 3), np.float32)
    probs[..., 0] = 1
    det = L.DetectionLayer(detection_max_instances=4)(
        [random_boxes(np.random.default_rng(0), 5)[None], probs, np.zeros((1, 5, 3, 4)),
         image_meta((32, 32, 3), (0, 0, 32, 32), 3)[None]])
    assert det.shape == (1, 4, 6) and not det.numpy().any()
    # No boxes to pool.
    maps = [np.ones((1, s, s, 2), np.float32) for s in (8, 4, 2, 1)]
    pooled = L.PyramidROIAlign([2, 2])([np.zeros((1, 0, 4), np.float32),
                                        image_meta((32, 32, 3), (0, 0, 32, 32), 1)[None]] + maps)
    assert pooled.shape == (1, 0, 2, 2, 2)


def test_roi_sampling_is_a_function_of_the_inputs_and_uniform_over_them():
    """Stateless sampling (layers.sampling_seed): the same inputs give the same ROIs (a resumed
    run samples what the interrupted one would have), while inputs that differ (at every
    training step the proposals move) draw a fresh subset: over many slightly shifted
    proposal sets each negative candidate is picked about equally often."""
    rng = np.random.default_rng(0)
    gt_boxes = np.zeros((4, 4), np.float32)
    gt_boxes[0] = [0.1, 0.1, 0.3, 0.3]
    gt_class_ids = np.array([1, 0, 0, 0], np.int32)
    gt_masks = np.ones((8, 8, 4), np.float32)
    n = 60
    base = np.concatenate([rng.uniform(0.5, 0.6, (n, 2)), rng.uniform(0.7, 0.9, (n, 2))],
                          axis=1).astype(np.float32)        # negatives: far from the box
    base[:3] = gt_boxes[0] + [0, 0, 0.01, 0.01]             # 3 positives

    def sample(proposals):
        rois, class_ids, _, _ = L.detection_targets_graph(
            tf.constant(proposals), tf.constant(gt_class_ids), tf.constant(gt_boxes),
            tf.constant(gt_masks), train_rois_per_image=12, roi_positive_ratio=0.25,
            bbox_std_dev=np.array([0.1, 0.1, 0.2, 0.2]), mask_shape=[4, 4],
            use_mini_mask=True)
        return rois.numpy()

    a, b = sample(base), sample(base)
    np.testing.assert_array_equal(a, b)
    counts = np.zeros(n)
    for k in range(150):
        shifted = base + np.float32(1e-6 * (k + 1))
        picked = sample(shifted)[3:]                        # the 9 negatives
        picked = picked[np.any(picked != 0, axis=1)]
        for row in picked:
            counts[int(np.argmin(np.abs(shifted - row).sum(axis=1)))] += 1
    negatives = counts[3:]
    # 9 of 57 per draw: expected 150 * 9 / 57 = 23.7 picks per candidate (sd ~4.5).
    assert negatives.sum() == 150 * 9
    assert negatives.min() > 7 and negatives.max() < 45, negatives
