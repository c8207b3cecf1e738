"""Tests of mrcnn.utils against independent references.

References: pycocotools (RLE, mask and box IoU), brute-force Python loops (NMS, anchors, boxes),
hand-worked examples (RLE, AP), and round trips between inverse functions. No expected value
here was produced by running the code under test.
"""

import math

import cv2
import numpy as np
import pycocotools.mask as coco_mask
import pytest
from PIL import Image

from mrcnn import utils
from mrcnn.utils import ImageLoadError, MaskError, RLEError

# pycocotools 2.0.11 warns about numpy 2's copy keyword on every decode.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------- helpers (independent refs)

def kaggle_to_coco_counts(rle, height, width):
    """Kaggle 'start length' (1-indexed, column-major) -> COCO uncompressed counts
    (alternating 0-run / 1-run lengths, column-major, starting with a 0-run)."""
    values = [int(t) for t in rle.split()]
    counts, pos = [], 0                      # pos: 0-indexed pixel after the last run
    for start, length in zip(values[0::2], values[1::2]):
        counts += [start - 1 - pos, length]
        pos = start - 1 + length
    counts.append(height * width - pos)
    return counts


def coco_decode_kaggle(rle, height, width):
    """Decode a Kaggle RLE string with pycocotools."""
    obj = coco_mask.frPyObjects(
        {"counts": kaggle_to_coco_counts(rle, height, width), "size": [height, width]},
        height, width)
    return coco_mask.decode(obj).astype(bool)


def coco_encode(masks):
    """[H, W, N] bool -> list of pycocotools RLEs."""
    return coco_mask.encode(np.asfortranarray(masks.astype(np.uint8)))


def random_boxes(rng, n, size=100, min_side=1):
    y1 = rng.integers(0, size - min_side, n)
    x1 = rng.integers(0, size - min_side, n)
    y2 = np.minimum(y1 + rng.integers(min_side, size // 2, n), size)
    x2 = np.minimum(x1 + rng.integers(min_side, size // 2, n), size)
    return np.stack([y1, x1, y2, x2], axis=1)


def to_xywh(boxes):
    b = np.asarray(boxes, dtype=np.float64)
    return np.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], axis=1)


def random_blob_masks(rng, h, w, n):
    """n random ellipse masks [h, w, n]."""
    yy, xx = np.mgrid[0:h, 0:w]
    masks = np.zeros((h, w, n), dtype=bool)
    for i in range(n):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
        masks[:, :, i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return masks


def mask_iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 1.0


# ---------------------------------------------------------------- RLE

def test_rle_hand_worked_3x3():
    # Pixels are numbered down the columns: column 0 is pixels 1, 2, 3; column 1 is 4, 5, 6.
    expected = np.zeros((3, 3), bool)
    expected[0:2, 0] = True                      # "1 2": first two pixels of column 0
    np.testing.assert_array_equal(utils.rle_decode("1 2", (3, 3)), expected)
    assert utils.rle_encode(expected) == "1 2"

    expected = np.zeros((3, 3), bool)
    expected[:, 1] = True                        # "4 3": all of column 1
    expected[1, 2] = True                        # "8 1": middle pixel of column 2
    np.testing.assert_array_equal(utils.rle_decode("4 3 8 1", (3, 3)), expected)
    assert utils.rle_encode(expected) == "4 3 8 1"

    # Non-square: 2 rows x 3 columns; pixel 6 (the last) is row 1, column 2.
    expected = np.zeros((2, 3), bool)
    expected[1, 2] = True
    np.testing.assert_array_equal(utils.rle_decode("6 1", (2, 3)), expected)
    assert utils.rle_encode(expected) == "6 1"


def test_rle_empty_and_full():
    for text in ("", "   ", "\n"):
        m = utils.rle_decode(text, (4, 5))
        assert m.shape == (4, 5) and m.dtype == bool and not m.any()
    assert utils.rle_encode(np.zeros((4, 5), bool)) == ""
    assert utils.rle_encode(np.ones((4, 5), bool)) == "1 20"
    assert utils.rle_decode("1 20", (4, 5)).all()


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (13, 17), (64, 48)])
def test_rle_round_trip_matches_pycocotools(shape):
    rng = np.random.default_rng(sum(shape))
    h, w = shape
    cases = [rng.random(shape) > p for p in (0.2, 0.5, 0.9)]
    corner = np.zeros(shape, bool)
    corner[0, 0] = corner[-1, -1] = True         # first and last pixel
    cases += [corner, np.zeros(shape, bool), np.ones(shape, bool)]
    for m in cases:
        text = utils.rle_encode(m)
        # Our string, converted independently to COCO counts, decodes (by pycocotools) to m.
        np.testing.assert_array_equal(coco_decode_kaggle(text, h, w), m)
        # pycocotools' own round trip and ours agree, and so do the areas.
        ref = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
        np.testing.assert_array_equal(utils.rle_decode(text, shape),
                                      coco_mask.decode(ref).astype(bool))
        lengths = [int(t) for t in text.split()[1::2]]
        assert sum(lengths) == int(coco_mask.area(ref))


def test_rle_decode_random_strings_against_pycocotools():
    rng = np.random.default_rng(0)
    h, w = 37, 23
    for _ in range(20):
        # Random sorted, disjoint (possibly touching) runs written directly as a string.
        pos, pairs = 0, []
        while True:
            gap = int(rng.integers(0, 30))
            length = int(rng.integers(1, 40))
            if pos + gap + length > h * w:
                break
            pairs += [pos + gap + 1, length]
            pos += gap + length
        text = " ".join(map(str, pairs))
        np.testing.assert_array_equal(utils.rle_decode(text, (h, w)),
                                      coco_decode_kaggle(text, h, w))


def test_rle_touching_runs_accepted():
    np.testing.assert_array_equal(utils.rle_decode("1 2 3 1", (3, 3)),
                                  utils.rle_decode("1 3", (3, 3)))


def test_rle_decode_output_is_c_contiguous_bool():
    m = utils.rle_decode("2 3", (4, 6))
    assert m.dtype == bool and m.flags.c_contiguous and m.shape == (4, 6)


@pytest.mark.parametrize("text, words", [
    ("1 2 3", "odd number"),
    ("1 a", "non-integer"),
    ("1 2.5", "non-integer"),
    ("0 2", "start"),
    ("-3 2", "start"),
    ("1 0", "length"),
    ("1 -2", "length"),
    ("8 3", "past the end"),
    ("10 1", "past the end"),
    ("5 2 1 1", "unsorted"),
    ("1 3 2 2", "overlapping"),
    ("1 3 3 1", "overlapping"),                # pixel 3 in both runs
])
def test_rle_errors(text, words):
    with pytest.raises(RLEError) as info:
        utils.rle_decode(text, (3, 3), image_id="abc123.jpg")
    message = str(info.value)
    assert "abc123.jpg" in message and words in message
    assert isinstance(info.value, ValueError)


def test_rle_errors_where_and_type():
    with pytest.raises(RLEError, match="train.csv row 17"):
        utils.rle_decode("1", (3, 3), where="train.csv row 17")
    with pytest.raises(RLEError, match="string"):
        utils.rle_decode(float("nan"), (3, 3))
    with pytest.raises(MaskError):
        utils.rle_encode(np.zeros((2, 2, 2), bool))


# ---------------------------------------------------------------- boxes and IoU

def test_extract_bboxes_against_loop():
    rng = np.random.default_rng(1)
    masks = random_blob_masks(rng, 40, 50, 6)
    masks[:, :, 5] = False                                     # an empty instance
    boxes = utils.extract_bboxes(masks)
    assert boxes.dtype == np.int32 and boxes.shape == (6, 4)
    for i in range(6):
        ys, xs = np.where(masks[:, :, i])
        if len(ys):
            assert tuple(boxes[i]) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
        else:
            assert tuple(boxes[i]) == (0, 0, 0, 0)


def test_compute_overlaps_against_pycocotools():
    rng = np.random.default_rng(2)
    b1, b2 = random_boxes(rng, 30), random_boxes(rng, 12)
    ours = utils.compute_overlaps(b1, b2)
    ref = coco_mask.iou(to_xywh(b1), to_xywh(b2), [0] * len(b2))
    assert ours.shape == (30, 12) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # compute_iou gives the same rows.
    areas = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    for i in range(5):
        a = (b1[i, 2] - b1[i, 0]) * (b1[i, 3] - b1[i, 1])
        np.testing.assert_allclose(utils.compute_iou(b1[i], b2, a, areas), ref[i], atol=1e-9)
    assert utils.compute_overlaps(np.zeros((0, 4)), b2).shape == (0, 12)


def test_compute_overlaps_chunked_large_first_set():
    rng = np.random.default_rng(3)
    b1, b2 = random_boxes(rng, 5000, size=500), random_boxes(rng, 700, size=500)
    ours = utils.compute_overlaps(b1, b2)                  # several blocks of b1 rows
    ref = coco_mask.iou(to_xywh(b1), to_xywh(b2), [0] * len(b2))
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # Degenerate boxes (zero area) give 0, not nan.
    flat = np.array([[5, 5, 5, 9], [0, 0, 0, 0]])
    np.testing.assert_array_equal(utils.compute_overlaps(flat, flat), np.zeros((2, 2)))


def test_compute_overlaps_masks_against_pycocotools():
    rng = np.random.default_rng(4)
    m1 = random_blob_masks(rng, 48, 64, 7)
    m2 = random_blob_masks(rng, 48, 64, 5)
    m2[:, :, 4] = False                                        # an empty mask
    ours = utils.compute_overlaps_masks(m1, m2)
    ref = coco_mask.iou(coco_encode(m1), coco_encode(m2), [0] * 5)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert utils.compute_overlaps_masks(m1, m2[:, :, :0]).shape == (7, 0)
    with pytest.raises(MaskError):
        utils.compute_overlaps_masks(m1, m2[:10])


def brute_force_nms(boxes, scores, threshold):
    def iou(a, b):
        ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ih * iw
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        if all(iou(boxes[i], boxes[k]) <= threshold for k in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.7])
def test_non_max_suppression_against_brute_force(threshold):
    rng = np.random.default_rng(int(threshold * 10))
    boxes = random_boxes(rng, 120, size=120, min_side=3).astype(np.float32)
    scores = rng.permutation(120) / 120.0                      # distinct scores
    keep = utils.non_max_suppression(boxes, scores, threshold)
    assert keep.dtype == np.int32
    assert keep.tolist() == brute_force_nms(boxes.tolist(), scores.tolist(), threshold)


def test_non_max_suppression_keeps_iou_equal_to_threshold():
    # IoU = 100 / 200 = 0.5 exactly: suppressed only when IoU > threshold (matterport).
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 20]])
    assert utils.non_max_suppression(boxes, np.array([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert utils.non_max_suppression(boxes, np.array([0.8, 0.9]), 0.49).tolist() == [1]
    assert utils.non_max_suppression(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)


def test_box_refinement_inverts_apply_box_deltas():
    rng = np.random.default_rng(5)
    a = random_boxes(rng, 50, size=300, min_side=2).astype(np.float32)
    b = random_boxes(rng, 50, size=300, min_side=2).astype(np.float32)
    deltas = utils.box_refinement(a, b)
    assert deltas.shape == (50, 4) and deltas.dtype == np.float32
    np.testing.assert_allclose(utils.apply_box_deltas(a, deltas), b, atol=1e-3)
    # Zero deltas leave boxes unchanged; dh = log 2 doubles the height about the centre.
    np.testing.assert_allclose(utils.apply_box_deltas(a, np.zeros((50, 4))), a, atol=1e-4)
    grown = utils.apply_box_deltas(np.array([[10., 20., 30., 60.]]),
                                   np.array([[0., 0., math.log(2), 0.]]))
    np.testing.assert_allclose(grown, [[0., 20., 40., 60.]], atol=1e-5)


def test_norm_denorm_round_trip():
    rng = np.random.default_rng(6)
    shape = (480, 640)
    boxes = random_boxes(rng, 40, size=480, min_side=2)
    normed = utils.norm_boxes(boxes, shape)
    assert normed.dtype == np.float32
    np.testing.assert_array_equal(utils.denorm_boxes(normed, shape), boxes)
    # The whole image is (0, 0, 1, 1).
    np.testing.assert_allclose(utils.norm_boxes(np.array([[0, 0, 480, 640]]), shape),
                               [[0, 0, 1, 1]])


def test_trim_zeros():
    x = np.array([[1, 2, 3, 4], [0, 0, 0, 0], [0, 5, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(utils.trim_zeros(x), x[[0, 2]])


# ---------------------------------------------------------------- anchors

def brute_force_anchors(scales, ratios, shape, feature_stride, anchor_stride):
    anchors = []
    for y in range(0, shape[0], anchor_stride):
        for x in range(0, shape[1], anchor_stride):
            cy, cx = y * feature_stride, x * feature_stride
            for r in ratios:                     # ratios outer, scales inner
                for s in np.atleast_1d(scales):
                    h, w = s / math.sqrt(r), s * math.sqrt(r)
                    anchors.append([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2])
    return np.array(anchors)


@pytest.mark.parametrize("anchor_stride", [1, 2])
def test_generate_anchors_against_loop(anchor_stride):
    args = ([32, 64], [0.5, 1, 2], [5, 7], 16, anchor_stride)
    ours = utils.generate_anchors(*args)
    np.testing.assert_allclose(ours, brute_force_anchors(*args), atol=1e-9)


def test_generate_pyramid_anchors_against_loop():
    scales = (32, 64, 128)
    shapes = np.array([[8, 8], [4, 4], [2, 2]])
    strides = [4, 8, 16]
    ours = utils.generate_pyramid_anchors(scales, [0.5, 1, 2], shapes, strides, 1)
    ref = np.concatenate([brute_force_anchors(scales[i], [0.5, 1, 2], shapes[i], strides[i], 1)
                          for i in range(3)])
    assert ours.shape == ((64 + 16 + 4) * 3, 4)
    np.testing.assert_allclose(ours, ref, atol=1e-9)


# ---------------------------------------------------------------- resizing

def test_resize_image_square_hand_worked():
    image = np.full((300, 500, 3), 200, np.uint8)
    out, window, scale, padding, crop = utils.resize_image(
        image, min_dim=256, max_dim=384, mode="square")
    # min_dim gives scale 1 (300 >= 256); the longer side 500 > 384 caps it: 384 / 500.
    assert scale == pytest.approx(384 / 500)
    # Scaled size: round(300 * 0.768) = 230 x 384; vertical padding (384 - 230) / 2 = 77 each.
    assert out.shape == (384, 384, 3) and out.dtype == np.uint8
    assert window == (77, 0, 307, 384)
    assert padding == [(77, 77), (0, 0), (0, 0)]
    assert crop is None
    y1, x1, y2, x2 = window
    assert (out[y1:y2, x1:x2] == 200).all()
    outside = np.ones(out.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert (out[outside] == 0).all()
    # Odd padding: 301 rows -> round(301 * 0.768) = 231; 384 - 231 = 153 = 76 above + 77 below.
    out, window, _, padding, _ = utils.resize_image(
        np.ones((301, 500, 3), np.uint8), min_dim=256, max_dim=384, mode="square")
    assert window == (76, 0, 307, 384) and padding[0] == (76, 77)


def test_resize_image_square_upscale_and_min_scale():
    image = np.full((50, 100, 3), 7, np.uint8)
    out, window, scale, padding, _ = utils.resize_image(image, min_dim=100, max_dim=256)
    assert scale == 2 and window == (78, 28, 178, 228) and out.shape == (256, 256, 3)
    _, _, scale, _, _ = utils.resize_image(image, min_dim=60, max_dim=256, min_scale=1.5)
    assert scale == 1.5
    # max_dim wins over min_scale.
    _, _, scale, _, _ = utils.resize_image(image, min_dim=60, max_dim=128, min_scale=3)
    assert scale == pytest.approx(1.28)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int32])
@pytest.mark.parametrize("mode", ["none", "square", "pad64", "crop"])
def test_resize_image_modes_shapes_and_dtype(mode, dtype):
    rng = np.random.default_rng(7)
    h, w = 90, 150
    image = (rng.random((h, w, 3)) * 200 + 10).astype(dtype)
    out, window, scale, padding, crop = utils.resize_image(
        image, min_dim=128, max_dim=192, mode=mode, rng=np.random.default_rng(0))
    assert out.dtype == image.dtype
    y1, x1, y2, x2 = window
    if mode == "none":
        assert out is image or np.array_equal(out, image)
        assert window == (0, 0, h, w) and scale == 1 and crop is None
        return
    if mode == "crop":
        assert out.shape == (128, 128, 3) and window == (0, 0, 128, 128)
        cy, cx, ch, cw = crop
        assert (ch, cw) == (128, 128)
        sh, sw = round(h * scale), round(w * scale)
        assert 0 <= cy <= sh - 128 and 0 <= cx <= sw - 128
        return
    sh, sw = round(h * scale), round(w * scale)
    assert (y2 - y1, x2 - x1) == (sh, sw)
    (pt, pb), (pl, pr), _ = padding
    assert (pt, pl) == (y1, x1) and pt + sh + pb == out.shape[0] and pl + sw + pr == out.shape[1]
    if mode == "square":
        assert out.shape == (192, 192, 3)
        assert scale == pytest.approx(192 / 150)
    else:
        assert out.shape[0] % 64 == 0 and out.shape[1] % 64 == 0
        assert out.shape[0] - sh < 64 and out.shape[1] - sw < 64
        assert scale == pytest.approx(128 / 90)
    inside = out[y1:y2, x1:x2]
    assert inside.min() >= 9                      # resampled values stay in range
    assert out[:y1].sum() == 0 and out[y2:].sum() == 0
    assert out[:, :x1].sum() == 0 and out[:, x2:].sum() == 0


def test_resize_image_crop_is_a_window_of_the_scaled_image():
    # A coordinate-coded image: after the crop, pixel values tell where they came from.
    h, w = 100, 160
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([yy, xx, np.zeros_like(yy)], axis=2).astype(np.float32)
    out, _, scale, _, crop = utils.resize_image(image, min_dim=100, mode="crop",
                                                rng=np.random.default_rng(3))
    assert scale == 1
    y, x, ch, cw = crop
    np.testing.assert_array_equal(out, image[y:y + ch, x:x + cw])


def test_resize_image_bad_mode():
    with pytest.raises(ValueError):
        utils.resize_image(np.zeros((10, 10, 3), np.uint8), mode="stretch")


@pytest.mark.parametrize("mode", ["square", "pad64", "crop"])
def test_resize_mask_follows_resize_image(mode):
    # The image is a painted version of the masks: both must land on the same pixels.
    rng = np.random.default_rng(8)
    h, w = 120, 200
    masks = random_blob_masks(rng, h, w, 6)
    for i in range(6):
        image = np.where(masks[:, :, i:i + 1], 255, 0).astype(np.uint8).repeat(3, axis=2)
        out, window, scale, padding, crop = utils.resize_image(
            image, min_dim=128, max_dim=128, mode=mode, rng=np.random.default_rng(i))
        resized = utils.resize_mask(masks, scale, padding, crop)
        assert resized.shape == out.shape[:2] + (6,) and resized.dtype == bool
        if out[..., 0].max() >= 128 or resized[:, :, i].any():
            assert mask_iou(resized[:, :, i], out[..., 0] >= 128) > 0.9


def test_resize_mask_many_instances_match_single():
    rng = np.random.default_rng(9)
    masks = random_blob_masks(rng, 100, 90, 11)
    for scale in (0.37, 1.0, 2.3):
        together = utils.resize_mask(masks, scale, [(1, 2), (3, 4), (0, 0)])
        for i in range(11):
            alone = utils.resize_mask(masks[:, :, i:i + 1], scale, [(1, 2), (3, 4), (0, 0)])
            np.testing.assert_array_equal(together[:, :, i], alone[:, :, 0])
    empty = utils.resize_mask(np.zeros((100, 90, 0), bool), 0.5, [(0, 0)] * 3)
    assert empty.shape == (50, 45, 0)


def test_minimize_expand_round_trip():
    rng = np.random.default_rng(10)
    masks = random_blob_masks(rng, 200, 240, 5)
    boxes = utils.extract_bboxes(masks)
    mini = utils.minimize_mask(boxes, masks, (56, 56))
    assert mini.shape == (56, 56, 5) and mini.dtype == bool
    full = utils.expand_mask(boxes, mini, (200, 240, 3))
    assert full.shape == masks.shape and full.dtype == bool
    for i in range(5):
        assert mask_iou(full[:, :, i], masks[:, :, i]) > 0.9
        # Everything lies inside the box.
        y1, x1, y2, x2 = boxes[i]
        assert full[:y1, :, i].sum() == 0 and full[y2:, :, i].sum() == 0
    with pytest.raises(MaskError):
        utils.minimize_mask(np.array([[5, 5, 5, 9]]), masks[:, :, :1], (56, 56))


def test_unmold_mask():
    full = utils.unmold_mask(np.ones((28, 28), np.float32), (10, 20, 50, 70), (100, 120, 3))
    expected = np.zeros((100, 120), bool)
    expected[10:50, 20:70] = True
    np.testing.assert_array_equal(full, expected)
    # Left half above the threshold, right half below.
    soft = np.zeros((28, 28), np.float32)
    soft[:, :14] = 0.9
    soft[:, 14:] = 0.1
    full = utils.unmold_mask(soft, (0, 0, 40, 40), (40, 40))
    assert full[:, :18].all() and not full[:, 22:].any()


def test_unmold_masks_equals_unmold_mask_per_box():
    """Boxes inside, across the border of and outside the image, overlapping, zero-sized."""
    rng = np.random.default_rng(0)
    masks = rng.random((12, 28, 28)).astype(np.float32)
    corners = rng.integers(-30, 110, size=(12, 2))
    boxes = np.concatenate([corners, corners + rng.integers(0, 60, size=(12, 2))], axis=1)
    boxes[0] = (5, 5, 5, 40)                                  # zero height
    full = utils.unmold_masks(masks, boxes, (100, 120, 3))
    assert full.shape == (100, 120, 12) and full.dtype == bool
    for i in range(12):
        np.testing.assert_array_equal(full[:, :, i], utils.unmold_mask(masks[i], boxes[i],
                                                                       (100, 120)))
    assert full[:, :, 1:].any() and not full[:, :, 0].any()
    assert utils.unmold_masks(masks[:0], boxes[:0], (100, 120)).shape == (100, 120, 0)


# ---------------------------------------------------------------- AP / matching

def square_mask(shape, y, x, size):
    m = np.zeros(shape, bool)
    m[y:y + size, x:x + size] = True
    return m


def stack(*masks):
    return np.stack(masks, axis=2)


def test_compute_ap_hand_worked():
    shape = (40, 40)
    gt_masks = stack(square_mask(shape, 0, 0, 10), square_mask(shape, 20, 20, 10))
    gt_boxes = utils.extract_bboxes(gt_masks)
    gt_class_ids = np.array([1, 1])
    # Predictions, given out of score order on purpose:
    #   p0 score 0.7 -> exactly GT 1 (TP); p1 score 0.9 -> exactly GT 0 (TP);
    #   p2 score 0.8 -> an empty area (FP).
    pred_masks = stack(square_mask(shape, 20, 20, 10), square_mask(shape, 0, 0, 10),
                       square_mask(shape, 0, 30, 10))
    pred_boxes = utils.extract_bboxes(pred_masks)
    pred_class_ids = np.array([1, 1, 1])
    pred_scores = np.array([0.7, 0.9, 0.8])
    # In score order: TP, FP, TP. Precision 1/1, 1/2, 2/3; recall 1/2, 1/2, 2/2.
    # Interpolated precision is 1 up to recall 1/2 and 2/3 from 1/2 to 1:
    # AP = 0.5 * 1 + 0.5 * 2/3 = 5/6.
    ap, precisions, recalls, overlaps = utils.compute_ap(
        gt_boxes, gt_class_ids, gt_masks, pred_boxes, pred_class_ids, pred_scores, pred_masks)
    assert ap == pytest.approx(5 / 6)
    np.testing.assert_allclose(recalls, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(precisions, [1, 1, 2 / 3, 2 / 3, 0])
    assert overlaps.shape == (3, 2)

    gt_match, pred_match, _ = utils.compute_matches(
        gt_boxes, gt_class_ids, gt_masks, pred_boxes, pred_class_ids, pred_scores, pred_masks)
    # Score order is p1 (GT 0), p2 (none), p0 (GT 1).
    np.testing.assert_array_equal(pred_match, [0, -1, 1])
    np.testing.assert_array_equal(gt_match, [0, 2])


def test_compute_matches_class_and_duplicates():
    shape = (30, 30)
    gt_masks = stack(square_mask(shape, 0, 0, 10))
    gt_boxes = utils.extract_bboxes(gt_masks)
    # p0 (0.9): right place, wrong class -> FP. p1 (0.8): match. p2 (0.7): duplicate -> FP.
    pred_masks = stack(*[square_mask(shape, 0, 0, 10)] * 3)
    pred_boxes = utils.extract_bboxes(pred_masks)
    gt_match, pred_match, _ = utils.compute_matches(
        gt_boxes, np.array([2]), gt_masks, pred_boxes, np.array([3, 2, 2]),
        np.array([0.9, 0.8, 0.7]), pred_masks)
    np.testing.assert_array_equal(pred_match, [-1, 0, -1])
    np.testing.assert_array_equal(gt_match, [1])
    # Precision 0, 1/2, 1/3; recall 0, 1, 1 -> AP = 1 * 1/2.
    ap, _, _, _ = utils.compute_ap(gt_boxes, np.array([2]), gt_masks, pred_boxes,
                                   np.array([3, 2, 2]), np.array([0.9, 0.8, 0.7]), pred_masks)
    assert ap == pytest.approx(0.5)


def test_compute_ap_without_gt_or_predictions():
    shape = (20, 20)
    masks = stack(square_mask(shape, 0, 0, 10))
    boxes = utils.extract_bboxes(masks)
    none_masks = np.zeros(shape + (0,), bool)
    # No predictions: recall stays 0, AP 0.
    ap, _, _, _ = utils.compute_ap(boxes, np.array([1]), masks, np.zeros((0, 4)),
                                   np.zeros(0), np.zeros(0), none_masks)
    assert ap == 0
    # No ground truth: AP undefined (nan), no warning.
    ap, _, _, _ = utils.compute_ap(np.zeros((0, 4)), np.zeros(0), none_masks, boxes,
                                   np.array([1]), np.array([0.9]), masks)
    assert math.isnan(ap)


def test_compute_matches_trims_zero_padding():
    shape = (30, 30)
    gt_masks = stack(square_mask(shape, 0, 0, 10), np.zeros(shape, bool))
    gt_boxes = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])        # second row is padding
    pred_masks = stack(square_mask(shape, 0, 0, 10))
    gt_match, pred_match, overlaps = utils.compute_matches(
        gt_boxes, np.array([1, 0]), gt_masks, np.array([[0, 0, 10, 10]]), np.array([1]),
        np.array([0.5]), pred_masks)
    assert gt_match.shape == (1,) and overlaps.shape == (1, 1)


def test_compute_ap_range_hand_worked(capsys):
    shape = (20, 20)
    gt_masks = stack(square_mask(shape, 0, 0, 10))              # 100 pixels
    pred = np.zeros(shape, bool)
    pred[0:9, 0:8] = True                                       # 72 pixels inside: IoU 0.72
    pred_masks = stack(pred)
    args = (utils.extract_bboxes(gt_masks), np.array([1]), gt_masks,
            utils.extract_bboxes(pred_masks), np.array([1]), np.array([0.9]), pred_masks)
    # Matched (AP 1) at 0.50, 0.55, 0.60, 0.65, 0.70; missed (AP 0) at 0.75 ... 0.95: mean 0.5.
    assert utils.compute_ap_range(*args, verbose=0) == pytest.approx(0.5)
    assert utils.compute_ap_range(*args, iou_thresholds=[0.5, 0.8], verbose=1) == \
        pytest.approx(0.5)
    assert "AP @0.50-0.80" in capsys.readouterr().out


def test_compute_recall_hand_worked():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]])
    pred = np.array([[0, 0, 10, 10],          # IoU 1 with GT 0
                     [0, 0, 10, 5],           # IoU 0.5 with GT 0
                     [20, 20, 30, 25],        # IoU 0.5 with GT 1
                     [70, 70, 80, 80]])       # nothing
    recall, positive_ids = utils.compute_recall(pred, gt, 0.5)
    assert recall == pytest.approx(2 / 3)
    np.testing.assert_array_equal(positive_ids, [0, 1, 2])
    recall, positive_ids = utils.compute_recall(pred, gt, 0.6)
    assert recall == pytest.approx(1 / 3)
    np.testing.assert_array_equal(positive_ids, [0])


# ---------------------------------------------------------------- batch_slice (TF)

def test_batch_slice():
    tf = pytest.importorskip("tensorflow")
    x = tf.constant(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    y = tf.constant([[1.0], [2.0]])
    single = utils.batch_slice(x, lambda a: tf.reduce_sum(a, axis=0), 2)
    np.testing.assert_allclose(single.numpy(), np.arange(24).reshape(2, 3, 4).sum(axis=1))
    pair = utils.batch_slice([x, y], lambda a, b: (a * b, tf.reduce_max(a)), 2)
    assert isinstance(pair, list) and len(pair) == 2
    np.testing.assert_allclose(pair[0].numpy(), x.numpy() * np.array([1, 2])[:, None, None])
    np.testing.assert_allclose(pair[1].numpy(), [11, 23])


# ---------------------------------------------------------------- Dataset and image reading

def make_dataset(paths):
    ds = utils.Dataset()
    ds.add_class("shop", 1, "shirt")
    ds.add_class("shop", 2, "pants, trousers")
    ds.add_class("shop", 1, "shirt again")                     # duplicate: ignored
    ds.add_class("coco", 7, "person")
    for i, p in enumerate(paths):
        ds.add_image("shop", image_id="img%d" % i, path=str(p), height=10, width=12)
    ds.prepare()
    return ds


def test_dataset_classes_and_images():
    ds = make_dataset(["a.jpg", "b.jpg"])
    assert ds.num_classes == 4
    assert ds.class_names == ["BG", "shirt", "pants", "person"]
    np.testing.assert_array_equal(ds.image_ids, [0, 1])
    assert ds.num_images == 2
    assert ds.map_source_class_id("shop.2") == 2
    assert ds.map_source_class_id("coco.7") == 3
    assert ds.class_from_source_map["shop.1"] == 1
    assert ds.get_source_class_id(3, "coco") == 7
    with pytest.raises(AssertionError):
        ds.get_source_class_id(3, "shop")
    assert ds.source_class_ids == {"": [0], "shop": [0, 1, 2], "coco": [0, 3]}
    assert ds.image_from_source_map["shop.img1"] == 1
    assert ds.source_image_link(1) == "b.jpg"
    assert ds.image_info[0]["height"] == 10 and ds.image_info[0]["width"] == 12
    assert ds.image_reference(0) == ""
    with pytest.raises(AssertionError):
        ds.add_class("bad.source", 1, "x")
    mask, class_ids = ds.load_mask(0)
    assert mask.shape == (0, 0, 0) and class_ids.shape == (0,) and class_ids.dtype == np.int32


def test_add_class_takes_matterports_class_name_keyword():
    ds = utils.Dataset()
    ds.add_class(source="shop", class_id=1, class_name="shirt")
    ds.add_class("shop", 2, class_name="pants")
    ds.prepare()
    assert ds.class_names == ["BG", "shirt", "pants"]
    assert ds.class_info[1] == {"source": "shop", "id": 1, "name": "shirt"}


def test_load_image_rgb_order_grayscale_rgba_16bit(tmp_path):
    rng = np.random.default_rng(11)
    rgb = (rng.random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")                       # written by PIL
    gray = (rng.random((20, 30)) * 255).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgba = (rng.random((20, 30, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    values = (rng.random((20, 30)) * 255).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), values * 257)                  # 16-bit gray
    color16 = (rng.random((20, 30, 3)) * 255).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), color16[..., ::-1] * 257)      # 16-bit BGR file

    ds = make_dataset([tmp_path / n for n in ("rgb.png", "gray.png", "rgba.png", "g16.png",
                                              "c16.png")])
    images = [ds.load_image(i) for i in ds.image_ids]
    for im in images:
        assert im.shape == (20, 30, 3) and im.dtype == np.uint8
    np.testing.assert_array_equal(images[0], rgb)
    np.testing.assert_array_equal(images[1], np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(images[2], rgba[:, :, :3])
    np.testing.assert_array_equal(images[3], np.repeat(values[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(images[4], color16)


def test_load_image_errors_name_image_and_path(tmp_path):
    good = np.zeros((40, 40, 3), np.uint8)
    good[::2] = 255
    ok, data = cv2.imencode(".jpg", good)
    assert ok
    data = data.tobytes()
    (tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "headonly.jpg").write_bytes(data[:len(data) - 2])          # no EOI marker
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all")
    names = ["missing.jpg", "truncated.jpg", "headonly.jpg", "empty.jpg", "garbage.jpg"]
    ds = make_dataset([tmp_path / n for n in names])
    for image_id, name in enumerate(names):
        with pytest.raises(ImageLoadError) as info:
            ds.load_image(image_id)
        message = str(info.value)
        assert str(tmp_path / name) in message, message
        assert "img%d" % image_id in message, message
        assert info.value.path == str(tmp_path / name)
        assert info.value.image_id == image_id
        assert isinstance(info.value, IOError)
    with pytest.raises(ImageLoadError, match="empty"):
        utils.read_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageLoadError, match="not found"):
        utils.read_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageLoadError, match="truncated"):
        utils.read_image(tmp_path / "headonly.jpg")


def test_errors_survive_pickling():
    # The loader's worker processes send exceptions to the parent by pickle.
    import pickle
    error = pickle.loads(pickle.dumps(ImageLoadError("image 3: bad file", path="/a.jpg",
                                                     image_id=3)))
    assert str(error) == "image 3: bad file" and error.path == "/a.jpg" and error.image_id == 3
    assert str(pickle.loads(pickle.dumps(RLEError("RLE of image x: odd")))) == \
        "RLE of image x: odd"


def test_read_image_jpeg_with_trailing_bytes(tmp_path):
    image = np.full((16, 16, 3), 100, np.uint8)
    ok, data = cv2.imencode(".jpg", image)
    (tmp_path / "trailing.jpg").write_bytes(data.tobytes() + b"\x00" * 10)
    out, size = utils.read_image(tmp_path / "trailing.jpg")
    assert size == (16, 16) and np.abs(out.astype(int) - 100).max() <= 2


@pytest.mark.parametrize("max_dim, expected_shape", [
    (None, (600, 800)), (500, (600, 800)), (400, (300, 400)), (200, (150, 200)),
    (100, (75, 100)), (90, (75, 100)),
])
def test_read_image_reduced_decode(tmp_path, max_dim, expected_shape):
    # A smooth gradient, so the reduced decode can be compared with a plain area downscale.
    yy, xx = np.mgrid[0:600, 0:800]
    rgb = np.stack([yy * 255 // 599, xx * 255 // 799, (yy + xx) * 255 // 1398], axis=2)
    rgb = rgb.astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=95)
    image, original = utils.read_image(tmp_path / "big.jpg", max_dim=max_dim)
    assert original == (600, 800)
    assert image.shape == expected_shape + (3,) and image.dtype == np.uint8
    reference = cv2.resize(rgb, expected_shape[::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(image.astype(int) - reference.astype(int)).mean() < 3


# ---------------------------------------------------------------- matterport's resize wrappers

def test_resize_is_skimage_resize_with_matterports_defaults():
    from skimage.transform import resize as sk_resize
    rng = np.random.default_rng(3)
    image = (rng.random((20, 30, 3)) * 255).astype(np.uint8)
    out = utils.resize(image, (11, 17))
    ref = sk_resize(image, (11, 17), order=1, mode="constant", cval=0, clip=True,
                    preserve_range=False, anti_aliasing=False)
    assert out.shape == (11, 17, 3) and out.dtype == np.float64 and out.max() <= 1.0
    np.testing.assert_array_equal(out, ref)
    kept = utils.resize(image, (40, 60), order=0, preserve_range=True)
    assert kept.max() > 1 and set(np.unique(kept)) <= set(np.unique(image).astype(float))
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    np.testing.assert_array_equal(np.round(utils.resize(mask, (16, 16))).astype(bool),
                                  np.kron(mask, np.ones((2, 2), bool)))


def test_box_refinement_graph_equals_the_numpy_version():
    pytest.importorskip("tensorflow")
    rng = np.random.default_rng(4)
    a = rng.uniform(0, 50, (6, 2))
    box = np.concatenate([a, a + rng.uniform(2, 30, (6, 2))], 1)
    b = rng.uniform(0, 50, (6, 2))
    gt = np.concatenate([b, b + rng.uniform(2, 30, (6, 2))], 1)
    graph = np.asarray(utils.box_refinement_graph(box, gt))
    np.testing.assert_allclose(graph, utils.box_refinement(box, gt), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- download_trained_weights

def test_download_trained_weights_writes_the_file_atomically(tmp_path, capsys):
    source = tmp_path / "release" / "mask_rcnn_coco.h5"
    source.parent.mkdir()
    payload = np.random.default_rng(5).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8)
    source.write_bytes(payload.tobytes())
    target = tmp_path / "logs" / "mask_rcnn_coco.h5"           # folder created on the way
    path = utils.download_trained_weights(str(target), url=source.as_uri())
    assert path == str(target) and target.read_bytes() == payload.tobytes()
    assert sorted(p.name for p in target.parent.iterdir()) == ["mask_rcnn_coco.h5"]
    out = capsys.readouterr().out
    assert str(target) in out and "100%" in out
    # matterport's call: the URL constant, the path, verbose=0 prints nothing.
    assert utils.COCO_MODEL_URL == \
        "https://github.com/matterport/Mask_RCNN/releases/download/v2.0/mask_rcnn_coco.h5"
    seen = []

    class Response:
        headers = {"Content-Length": "5"}

        def __init__(self):
            self.chunks = [b"abc", b"de"]

        def read(self, n):
            return self.chunks.pop(0) if self.chunks else b""

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fetch(url, timeout):
        seen.append((url, timeout))
        return Response()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils, "_fetch", fetch)
        utils.download_trained_weights(str(tmp_path / "coco.h5"), verbose=0)
    assert seen[0][0] == utils.COCO_MODEL_URL and seen[0][1] <= 30
    assert (tmp_path / "coco.h5").read_bytes() == b"abcde"
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("failure", ["offline", "cut off", "missing file"])
def test_download_trained_weights_fails_clearly_and_leaves_nothing(tmp_path, monkeypatch,
                                                                   failure):
    import urllib.error
    from mrcnn.errors import MrcnnError

    class Cut:
        headers = {"Content-Length": str(10 << 20)}

        def __init__(self):
            self.sent = False

        def read(self, n):
            if self.sent:
                return b""
            self.sent = True
            return b"x" * 1000

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    url = utils.COCO_MODEL_URL
    if failure == "offline":
        def fetch(url, timeout):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        monkeypatch.setattr(utils, "_fetch", fetch)
    elif failure == "cut off":
        monkeypatch.setattr(utils, "_fetch", lambda url, timeout: Cut())
    else:
        url = (tmp_path / "nowhere.h5").as_uri()
    target = tmp_path / "w" / "mask_rcnn_coco.h5"
    with pytest.raises(utils.DownloadError) as info:
        utils.download_trained_weights(str(target), verbose=0, url=url)
    error = info.value
    assert isinstance(error, MrcnnError) and isinstance(error, IOError)
    message = str(error)
    assert "mask_rcnn_coco.h5" in message and url in message and str(target) in message
    assert error.path == str(target) and error.url == url and str(target) in error.hint
    if failure == "cut off":
        assert "1000 of %d bytes" % (10 << 20) in message
    assert list(target.parent.iterdir()) == []                 # no partial file left


def test_download_trained_weights_unreachable_server_fails_at_once(tmp_path):
    """A server that does not answer (a closed local port: no network needed) fails at once
    with the clear error; nothing is written."""
    import socket
    import time
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]                           # closed when the block ends
    url = "http://127.0.0.1:%d/mask_rcnn_coco.h5" % port
    start = time.monotonic()
    with pytest.raises(utils.DownloadError, match="mask_rcnn_coco.h5.*127.0.0.1"):
        utils.download_trained_weights(str(tmp_path / "mask_rcnn_coco.h5"), verbose=0,
                                       url=url, timeout=5)
    assert time.monotonic() - start < 6
    assert list(tmp_path.iterdir()) == []
