"""Tests of mrcnn.data: image meta, molding, load_image_gt, RPN targets, augmentation, loader."""

import contextlib
import os
import signal

import cv2
import numpy as np
import pytest

from mrcnn import data, utils
from mrcnn.config import Config

from synthetic import shapes_config, shapes_dataset


# ---------------------------------------------------------------- helpers

@contextlib.contextmanager
def time_limit(seconds):
    """Fail (instead of hanging) if the block takes longer than `seconds`."""
    def handler(signum, frame):
        raise TimeoutError("timed out after %d s" % seconds)
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class SmallConfig(Config):
    NAME = "small"
    NUM_CLASSES = 1 + 3
    IMAGES_PER_GPU = 2
    IMAGE_MIN_DIM = 128
    IMAGE_MAX_DIM = 128
    RPN_ANCHOR_SCALES = (8, 16, 32, 64, 128)
    RPN_TRAIN_ANCHORS_PER_IMAGE = 64
    MAX_GT_INSTANCES = 5
    MINI_MASK_SHAPE = (28, 28)
    LOADER_WORKERS = 0


class EllipseDataset(utils.Dataset):
    """Images of given (h, w) with 1-4 filled ellipses; masks exact; optional RLE access."""

    def load(self, sizes, seed=0, with_rle=False):
        for i in range(3):
            self.add_class("ell", i + 1, "c%d" % i)
        rng = np.random.default_rng(seed)
        for k, (h, w) in enumerate(sizes):
            shapes = []
            for _ in range(int(rng.integers(1, 5))):
                cy, cx = int(rng.integers(h // 5, h - h // 5)), int(rng.integers(w // 5, w - w // 5))
                ay, ax = int(rng.integers(3, max(4, h // 4))), int(rng.integers(3, max(4, w // 4)))
                shapes.append((cy, cx, ay, ax, int(rng.integers(1, 4))))
            self.add_image("ell", image_id=k, path=None, height=h, width=w, shapes=shapes)
        self.with_rle = with_rle

    def load_image(self, image_id):
        info = self.image_info[image_id]
        yy, xx = np.mgrid[0:info["height"], 0:info["width"]]
        image = np.stack([(yy * 3) % 256, (xx * 5) % 256, (yy + xx) % 256], -1).astype(np.uint8)
        mask, class_ids = EllipseDataset.load_mask(self, image_id)
        for i in range(mask.shape[2]):
            image[mask[:, :, i]] = (255, 40 * class_ids[i], 0)
        return image

    def load_mask(self, image_id):
        info = self.image_info[image_id]
        h, w = info["height"], info["width"]
        masks = np.zeros((h, w, len(info["shapes"])), dtype=bool)
        for i, (cy, cx, ay, ax, _) in enumerate(info["shapes"]):
            canvas = np.zeros((h, w), np.uint8)
            cv2.ellipse(canvas, (cx, cy), (ax, ay), 0, 0, 360, 1, -1)
            masks[:, :, i] = canvas > 0
        return masks, np.array([s[4] for s in info["shapes"]], dtype=np.int32)

    def load_mask_rle(self, image_id):
        if not self.with_rle:
            return None
        mask, class_ids = self.load_mask(image_id)
        info = self.image_info[image_id]
        rles = [utils.rle_encode(mask[:, :, i]) for i in range(mask.shape[2])]
        return rles, class_ids, (info["height"], info["width"])


def ellipse_dataset(sizes, seed=0, with_rle=False):
    ds = EllipseDataset()
    ds.load(sizes, seed=seed, with_rle=with_rle)
    ds.prepare()
    return ds


def iou(a, b):
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 1.0


def shm_blocks():
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")} \
        if os.path.isdir("/dev/shm") else set()


def collect_epoch(generator, timeout=40, keep=None):
    """Run one epoch through keras' PyDatasetAdapter (what model.fit uses) and return the
    batches' image ids (from image_meta)."""
    from keras.src.trainers.data_adapters import py_dataset_adapter
    adapter = py_dataset_adapter.PyDatasetAdapter(generator, shuffle=False)
    ids = []
    try:
        with time_limit(timeout):
            adapter.on_epoch_begin()
            for (inputs,) in adapter.get_numpy_iterator():
                ids.append(inputs[1][:, 0].astype(int).tolist())
                if keep is not None:
                    keep.append(inputs)
            adapter.on_epoch_end()
    except TimeoutError:
        # Stop without draining (a hung worker would block the drain) and kill the pools.
        if adapter.enqueuer is not None:
            adapter.enqueuer.stop(drain_queue_and_join=False)
        for pool in list(py_dataset_adapter._DATA_POOLS):
            pool.terminate()
        raise
    except BaseException:
        adapter.on_epoch_end()   # keras already stopped the enqueuer, draining it
        raise
    return ids


# ---------------------------------------------------------------- meta and molding

def test_image_meta_round_trip():
    active = np.array([1, 1, 0, 1])
    meta = data.compose_image_meta(7, (480, 640, 3), (1024, 1024, 3), (128, 0, 896, 1024),
                                   1.6, active)
    assert meta.shape == (SmallConfig().IMAGE_META_SIZE,)
    parsed = data.parse_image_meta(meta)
    assert parsed["image_id"] == 7
    assert parsed["original_image_shape"].tolist() == [480, 640, 3]
    assert parsed["image_shape"].tolist() == [1024, 1024, 3]
    assert parsed["window"].tolist() == [128, 0, 896, 1024]
    assert parsed["scale"] == pytest.approx(1.6)
    assert parsed["active_class_ids"].tolist() == active.tolist()
    batch = data.parse_image_meta(np.stack([meta, meta]).astype(np.float32))
    assert batch["window"].shape == (2, 4) and batch["image_id"].tolist() == [7, 7]


def test_mold_unmold_round_trip():
    config = SmallConfig()
    image = np.random.default_rng(0).integers(0, 256, (2, 9, 7, 3)).astype(np.uint8)
    molded = data.mold_image(image, config)
    assert molded.dtype == np.float32
    np.testing.assert_allclose(molded[0, 0, 0], image[0, 0, 0] - config.MEAN_PIXEL, atol=1e-4)
    np.testing.assert_array_equal(data.unmold_image(molded, config), image)


# ---------------------------------------------------------------- load_image_gt

@pytest.mark.parametrize("size", [(150, 200), (60, 90)])   # shrink / enlarge (+ padding)
def test_load_image_gt_shapes_boxes_and_mini_masks(size):
    config = SmallConfig()
    ds = ellipse_dataset([size] * 3, seed=1)
    for image_id in ds.image_ids:
        image, meta, class_ids, bbox, mask = data.load_image_gt(ds, config, image_id,
                                                                use_mini_mask=True)
        assert image.shape == (128, 128, 3) and image.dtype == np.uint8
        assert meta.shape == (config.IMAGE_META_SIZE,)
        parsed = data.parse_image_meta(meta)
        assert parsed["original_image_shape"].tolist() == [size[0], size[1], 3]
        assert parsed["active_class_ids"].tolist() == [1, 1, 1, 1]
        n = len(class_ids)
        assert bbox.shape == (n, 4) and bbox.dtype == np.int32 and class_ids.dtype == np.int32
        assert mask.shape == (28, 28, n) and mask.dtype == bool

        # Reference: full-size resize with utils, boxes from the masks.
        ref_image = ds.load_image(image_id)
        ref_mask, ref_ids = ds.load_mask(image_id)
        _, window, scale, padding, crop = utils.resize_image(
            ref_image, min_dim=128, max_dim=128, mode="square")
        assert tuple(parsed["window"]) == tuple(window)
        ref_mask = utils.resize_mask(ref_mask, scale, padding, crop)
        keep = ref_mask.any(axis=(0, 1))
        ref_mask, ref_ids = ref_mask[:, :, keep], ref_ids[keep]
        np.testing.assert_array_equal(class_ids, ref_ids)
        assert np.abs(bbox - utils.extract_bboxes(ref_mask)).max() <= 1

        # The full masks (no mini masks): boxes are exactly the masks' tight boxes.
        _, _, _, bbox_full, full = data.load_image_gt(ds, config, image_id,
                                                      use_mini_mask=False)
        np.testing.assert_array_equal(bbox_full, bbox)
        np.testing.assert_array_equal(utils.extract_bboxes(full), bbox)
        # Mini masks expand back close to the resized masks.
        expanded = utils.expand_mask(bbox, mask, image.shape)
        for i in range(n):
            assert iou(full[:, :, i], ref_mask[:, :, i]) > 0.8
            assert iou(expanded[:, :, i], full[:, :, i]) > 0.8


def test_rle_fast_path_equals_load_mask_path():
    config = SmallConfig()
    sizes = [(150, 200), (60, 90), (128, 128), (301, 97)]
    plain = ellipse_dataset(sizes, seed=3)
    rle = ellipse_dataset(sizes, seed=3, with_rle=True)
    for mini in (True, False):
        for image_id in plain.image_ids:
            a = data.load_image_gt(plain, config, image_id, use_mini_mask=mini)
            b = data.load_image_gt(rle, config, image_id, use_mini_mask=mini)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)


def test_pad64_and_crop_modes():
    ds = ellipse_dataset([(150, 200)] * 2, seed=2)
    config = SmallConfig().override({"IMAGE_RESIZE_MODE": "pad64"})
    image, meta, _, bbox, mask = data.load_image_gt(ds, config, 0, use_mini_mask=False)
    assert image.shape[0] % 64 == 0 and image.shape[1] % 64 == 0
    np.testing.assert_array_equal(utils.extract_bboxes(mask), bbox)
    config = SmallConfig().override({"IMAGE_RESIZE_MODE": "crop", "IMAGE_MIN_DIM": 64})
    image, meta, _, bbox, mask = data.load_image_gt(ds, config, 1, use_mini_mask=False,
                                                    rng=np.random.default_rng(0))
    assert image.shape == (64, 64, 3)
    np.testing.assert_array_equal(utils.extract_bboxes(mask), bbox)


def test_load_image_gt_has_matterports_defaults_full_size_masks():
    """load_image_gt(dataset, config, image_id) gives full-size masks, as matterport's does,
    whatever config.USE_MINI_MASK says; the loader asks for mini masks explicitly."""
    config = SmallConfig()
    assert config.USE_MINI_MASK
    ds = ellipse_dataset([(150, 200)] * 2, seed=13)
    image, meta, ids, bbox, mask = data.load_image_gt(ds, config, 0)
    assert mask.shape == (128, 128, len(ids)) and mask.dtype == bool
    np.testing.assert_array_equal(utils.extract_bboxes(mask), bbox)
    explicit = data.load_image_gt(ds, config, 0, augment=False, augmentation=None,
                                  use_mini_mask=False)
    for x, y in zip(explicit, (image, meta, ids, bbox, mask)):
        np.testing.assert_array_equal(x, y)
    gen = data.DataGenerator(ds, config.override({"IMAGES_PER_GPU": 1}), shuffle=False,
                             seed=0, workers=0)
    (inputs,) = gen[0]
    assert inputs[6].shape == (1, 28, 28, config.MAX_GT_INSTANCES)
    _, _, _, _, mini = data.load_image_gt(ds, config, 0, use_mini_mask=True)
    np.testing.assert_array_equal(inputs[6][0, :, :, :len(ids)], mini)


def test_augment_is_matterports_deprecated_random_flip():
    config = SmallConfig()
    ds = ellipse_dataset([(100, 150)] * 2, seed=14)        # padded: the window moves too
    image, meta, ids, bbox, full = data.load_image_gt(ds, config, 0)
    _, _, _, _, mini = data.load_image_gt(ds, config, 0, use_mini_mask=True)
    window = data.parse_image_meta(meta)["window"]
    outcomes = set()
    for seed in range(12):
        with pytest.warns(FutureWarning, match="augment=True .*deprecated"):
            out = data.load_image_gt(ds, config, 0, augment=True,
                                     rng=np.random.default_rng(seed))
        image_f, meta_f, ids_f, bbox_f, full_f = out
        np.testing.assert_array_equal(ids_f, ids)
        window_f = data.parse_image_meta(meta_f)["window"]
        if np.array_equal(image_f, image):
            outcomes.add("kept")
            np.testing.assert_array_equal(full_f, full)
            np.testing.assert_array_equal(bbox_f, bbox)
            np.testing.assert_array_equal(window_f, window)
        else:
            outcomes.add("flipped")
            np.testing.assert_array_equal(image_f, image[:, ::-1])
            np.testing.assert_array_equal(full_f, full[:, ::-1])
            np.testing.assert_array_equal(bbox_f[:, [0, 2]], bbox[:, [0, 2]])
            np.testing.assert_array_equal(bbox_f[:, [1, 3]], 128 - bbox[:, [3, 1]])
            assert window_f.tolist() == [window[0], 128 - window[3], window[2],
                                         128 - window[1]]
            with pytest.warns(FutureWarning):
                mini_f = data.load_image_gt(ds, config, 0, augment=True, use_mini_mask=True,
                                            rng=np.random.default_rng(seed))[4]
            np.testing.assert_array_equal(mini_f, mini[:, ::-1])
    assert outcomes == {"kept", "flipped"}


def test_mask_size_mismatch_raises_mask_error_naming_the_image():
    class Bad(EllipseDataset):
        def load_mask(self, image_id):
            mask, ids = super().load_mask(image_id)
            return mask[:-3], ids
    ds = Bad()
    ds.load([(100, 120)], seed=0)
    ds.prepare()
    with pytest.raises(utils.MaskError, match=r"image_id 0.*mask size 97x120 differs.*100x120"):
        data.load_image_gt(ds, SmallConfig(), 0)


def test_missing_image_file_names_the_file(tmp_path):
    class FileDataset(utils.Dataset):
        def load_mask(self, image_id):
            return np.zeros((10, 10, 1), bool), np.array([1], np.int32)
    ds = FileDataset()
    ds.add_class("f", 1, "thing")
    missing = str(tmp_path / "nowhere.jpg")
    ds.add_image("f", image_id="nowhere", path=missing)
    ds.prepare()
    with pytest.raises(utils.ImageLoadError, match="nowhere.jpg"):
        data.load_image_gt(ds, SmallConfig(), 0)


def test_reduced_scale_decode_keeps_original_geometry(tmp_path):
    # A 700x520 JPEG for a 128 px target is decoded at 1/4 scale by the base loader.
    class FileDataset(utils.Dataset):
        def load_mask(self, image_id):
            mask = np.zeros((700, 520, 1), bool)
            mask[100:400, 50:300] = True
            return mask, np.array([1], np.int32)
    path = str(tmp_path / "img.jpg")
    cv2.imwrite(path, np.full((700, 520, 3), 128, np.uint8))
    ds = FileDataset()
    ds.add_class("f", 1, "thing")
    ds.add_image("f", image_id="img", path=path)
    ds.prepare()
    assert utils.read_image(path, max_dim=128)[0].shape[0] < 700
    image, meta, _, bbox, _ = data.load_image_gt(ds, SmallConfig(), 0)
    parsed = data.parse_image_meta(meta)
    assert parsed["original_image_shape"].tolist() == [700, 520, 3]
    assert parsed["scale"] == pytest.approx(128 / 700, rel=0.01)
    s, top, left = 128 / 700, parsed["window"][0], parsed["window"][1]
    expected = [100 * s + top, 50 * s + left, 400 * s + top, 300 * s + left]
    assert np.abs(bbox[0] - expected).max() <= 1.5


# ---------------------------------------------------------------- RPN targets

def rpn_targets_brute_force(anchors, gt_class_ids, gt_boxes, config, rng):
    """The straightforward computation: IoUs of every anchor with every box."""
    rpn_match = np.zeros([anchors.shape[0]], dtype=np.int32)
    rpn_bbox = np.zeros((config.RPN_TRAIN_ANCHORS_PER_IMAGE, 4), dtype=np.float32)
    crowd = gt_class_ids < 0
    if crowd.any():
        no_crowd = utils.compute_overlaps(anchors, gt_boxes[crowd]).max(axis=1) < 0.001
    else:
        no_crowd = np.ones(len(anchors), bool)
    gt_boxes = gt_boxes[~crowd]
    overlaps = utils.compute_overlaps(anchors, gt_boxes)
    if gt_boxes.shape[0]:
        argmax = overlaps.argmax(axis=1)
        best = overlaps[np.arange(len(anchors)), argmax]
    else:
        argmax = np.zeros(len(anchors), int)
        best = np.zeros(len(anchors), np.float32)
    rpn_match[(best < 0.3) & no_crowd] = -1
    for j in range(gt_boxes.shape[0]):
        top = overlaps[:, j].max()
        if top > 0:
            rpn_match[overlaps[:, j] == top] = 1
    rpn_match[best >= 0.7] = 1
    # Uniform random subsets, drawn as the anchors kept (matterport draws those dropped).
    ids = np.where(rpn_match == 1)[0]
    keep = config.RPN_TRAIN_ANCHORS_PER_IMAGE // 2
    if len(ids) > keep:
        kept = rng.choice(ids, keep, replace=False)
        rpn_match[ids] = 0
        rpn_match[kept] = 1
    ids = np.where(rpn_match == -1)[0]
    keep = config.RPN_TRAIN_ANCHORS_PER_IMAGE - np.sum(rpn_match == 1)
    if len(ids) > keep:
        kept = rng.choice(ids, keep, replace=False)
        rpn_match[ids] = 0
        rpn_match[kept] = -1
    for k, i in enumerate(np.where(rpn_match == 1)[0]):
        gt = gt_boxes[argmax[i]].astype(np.float64)
        a = anchors[i]
        gh, gw = gt[2] - gt[0], gt[3] - gt[1]
        ah, aw = a[2] - a[0], a[3] - a[1]
        rpn_bbox[k] = np.array([(gt[0] + 0.5 * gh - a[0] - 0.5 * ah) / ah,
                                (gt[1] + 0.5 * gw - a[1] - 0.5 * aw) / aw,
                                np.log(gh / ah), np.log(gw / aw)]) / config.RPN_BBOX_STD_DEV
    return rpn_match, rpn_bbox


def random_boxes(rng, n, size):
    y1 = rng.integers(0, size - 8, n)
    x1 = rng.integers(0, size - 8, n)
    h = rng.integers(2, size // 2, n)
    w = rng.integers(2, size // 2, n)
    return np.stack([y1, x1, np.minimum(y1 + h, size), np.minimum(x1 + w, size)], 1)


@pytest.mark.parametrize("case", range(8))
def test_build_rpn_targets_equals_brute_force(case):
    config = SmallConfig()
    if case == 7:   # a large anchor set (RPN_TRAIN_ANCHORS_PER_IMAGE 256, 256 px)
        config = SmallConfig().override({"IMAGE_MAX_DIM": 256, "IMAGE_MIN_DIM": 256,
                                         "RPN_TRAIN_ANCHORS_PER_IMAGE": 256})
    anchors = data.compute_anchors(config)
    size = int(config.IMAGE_SHAPE[0])
    rng = np.random.default_rng(case)
    n = [1, 3, 8, 20, 5, 2, 0, 12][case]
    boxes = random_boxes(rng, n, size)
    class_ids = rng.integers(1, 4, n).astype(np.int32)
    if case in (4, 5):   # crowd boxes
        class_ids[0] = -class_ids[0]
    if case == 6:
        boxes = np.zeros((0, 4), np.int32)
    if case == 3:        # duplicate boxes: ties for the best anchor
        boxes[1] = boxes[0]
    match, bbox = data.build_rpn_targets((size, size, 3), anchors, class_ids, boxes, config,
                                         rng=np.random.default_rng(100 + case))
    ref_match, ref_bbox = rpn_targets_brute_force(anchors, class_ids, boxes, config,
                                                  np.random.default_rng(100 + case))
    assert match.dtype == np.int32 and match.shape == (len(anchors),)
    assert bbox.shape == (config.RPN_TRAIN_ANCHORS_PER_IMAGE, 4)
    np.testing.assert_array_equal(match, ref_match)
    np.testing.assert_allclose(bbox, ref_bbox, rtol=1e-5, atol=1e-5)
    assert (match == 1).sum() <= config.RPN_TRAIN_ANCHORS_PER_IMAGE // 2
    assert (match != 0).sum() <= config.RPN_TRAIN_ANCHORS_PER_IMAGE


def test_build_rpn_targets_arbitrary_anchors_use_the_fallback_scan():
    config = SmallConfig()
    rng = np.random.default_rng(5)
    centers = rng.uniform(0, 128, (3000, 2))
    sizes = rng.uniform(4, 60, (3000, 2))
    anchors = np.concatenate([centers - sizes / 2, centers + sizes / 2], 1)
    boxes = random_boxes(rng, 6, 128)
    class_ids = np.array([1, 2, -1, 3, 1, 2], np.int32)
    match, bbox = data.build_rpn_targets((128, 128, 3), anchors, class_ids, boxes, config,
                                         rng=np.random.default_rng(1))
    ref_match, ref_bbox = rpn_targets_brute_force(anchors, class_ids, boxes, config,
                                                  np.random.default_rng(1))
    np.testing.assert_array_equal(match, ref_match)
    np.testing.assert_allclose(bbox, ref_bbox, rtol=1e-5, atol=1e-5)


def test_anchor_count_of_the_default_config():
    assert len(data.compute_anchors(Config())) == 261888
    assert utils.compute_backbone_shapes(Config()).tolist() == \
        [[256, 256], [128, 128], [64, 64], [32, 32], [16, 16]]


# ---------------------------------------------------------------- augmentation

def test_horizontal_flip_keeps_masks_aligned():
    import albumentations as A
    config = SmallConfig()
    ds = ellipse_dataset([(128, 128)] * 2, seed=4)
    image, _, ids, bbox, full = data.load_image_gt(ds, config, 0, use_mini_mask=False)
    flip = A.Compose([A.HorizontalFlip(p=1.0)])
    image_f, _, ids_f, bbox_f, full_f = data.load_image_gt(ds, config, 0, augmentation=flip,
                                                           use_mini_mask=False)
    np.testing.assert_array_equal(image_f, image[:, ::-1])
    np.testing.assert_array_equal(full_f, full[:, ::-1])
    np.testing.assert_array_equal(ids_f, ids)
    np.testing.assert_array_equal(bbox_f[:, [0, 2]], bbox[:, [0, 2]])
    np.testing.assert_array_equal(bbox_f[:, [1, 3]], 128 - bbox[:, [3, 1]])


def test_photometric_transforms_leave_masks_identical():
    import albumentations as A
    config = SmallConfig()
    ds = ellipse_dataset([(100, 140)] * 2, seed=5)
    image, _, ids, bbox, mini = data.load_image_gt(ds, config, 1, use_mini_mask=True)
    aug = A.Compose([A.RandomBrightnessContrast(0.3, 0.3, p=1.0),
                     A.HueSaturationValue(20, 30, 20, p=1.0), A.GaussianBlur(p=1.0)])
    image_a, _, ids_a, bbox_a, mini_a = data.load_image_gt(
        ds, config, 1, augmentation=aug, use_mini_mask=True, rng=np.random.default_rng(0))
    assert not np.array_equal(image_a, image)
    np.testing.assert_array_equal(mini_a, mini)
    np.testing.assert_array_equal(bbox_a, bbox)
    np.testing.assert_array_equal(ids_a, ids)


def test_default_augmentation_is_reproducible_and_aligned():
    config = SmallConfig()
    ds = ellipse_dataset([(128, 128)] * 2, seed=6)
    aug = data.default_augmentation()
    runs = [data.load_image_gt(ds, config, 0, augmentation=aug, use_mini_mask=False,
                               rng=np.random.default_rng(s)) for s in (1, 1, 2, 3, 4)]
    for x, y in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(x, y)
    for image, _, ids, bbox, full in runs:
        np.testing.assert_array_equal(utils.extract_bboxes(full), bbox)
        assert set(np.unique(full)) <= {False, True}
    # The instance pixels keep their red colour (the mask moved with the image).
    image, _, _, _, full = runs[0]
    inside = full.any(axis=2)
    assert image[inside][:, 0].mean() > image[~inside][:, 0].mean()


class FakeAugmenter:
    """Implements the part of imgaug's interface load_image_gt uses."""

    def __init__(self, name, fn, children=()):
        self.__class__ = type(name, (FakeAugmenter,), {})
        self.fn, self.children = fn, list(children)

    def to_deterministic(self):
        return self

    def augment_image(self, image, hooks=None, parents=()):
        if hooks is not None and not hooks.is_activated(image, self, list(parents), True):
            return image
        image = self.fn(image) if self.fn else image
        for child in self.children:
            image = child.augment_image(image, hooks=hooks, parents=list(parents) + [self])
        return image


def test_imgaug_interface_with_a_fake_augmenter():
    config = SmallConfig()
    ds = ellipse_dataset([(128, 128)] * 2, seed=7)
    image, _, ids, bbox, full = data.load_image_gt(ds, config, 0, use_mini_mask=False)
    aug = FakeAugmenter("Sequential", None, [
        FakeAugmenter("Fliplr", lambda im: im[:, ::-1].copy()),
        FakeAugmenter("Add", lambda im: np.clip(im.astype(int) + 7, 0, 255).astype(im.dtype)),
    ])
    image_a, _, ids_a, bbox_a, full_a = data.load_image_gt(ds, config, 0, augmentation=aug,
                                                           use_mini_mask=False)
    expected = np.clip(image[:, ::-1].astype(int) + 7, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(image_a, expected)
    np.testing.assert_array_equal(full_a, full[:, ::-1])   # flipped, not "Add"-ed
    np.testing.assert_array_equal(ids_a, ids)


def test_shape_changing_augmentation_is_rejected():
    import albumentations as A
    ds = ellipse_dataset([(128, 128)], seed=8)
    with pytest.raises(ValueError, match="changed the (image|mask) shape"):
        data.load_image_gt(ds, SmallConfig(), 0, augmentation=A.Compose([A.Resize(64, 64)]))


# ---------------------------------------------------------------- the loader

def test_generator_batch_layout():
    config = shapes_config()
    ds = shapes_dataset(3)
    gen = data.DataGenerator(ds, config, shuffle=False, seed=0, workers=0)
    (inputs,) = gen[0]
    images, meta, rpn_match, rpn_bbox, class_ids, boxes, masks = inputs
    b, a = config.BATCH_SIZE, len(gen.anchors)
    assert images.shape == (b, 128, 128, 3) and images.dtype == np.float32
    assert meta.shape == (b, config.IMAGE_META_SIZE) and meta.dtype == np.float32
    assert rpn_match.shape == (b, a, 1) and rpn_match.dtype == np.int32
    assert rpn_bbox.shape == (b, config.RPN_TRAIN_ANCHORS_PER_IMAGE, 4)
    assert rpn_bbox.dtype == np.float32
    assert class_ids.shape == (b, config.MAX_GT_INSTANCES) and class_ids.dtype == np.int32
    assert boxes.shape == (b, config.MAX_GT_INSTANCES, 4) and boxes.dtype == np.int32
    assert masks.shape == (b, 28, 28, config.MAX_GT_INSTANCES) and masks.dtype == bool
    assert len(gen) == 3
    # No ROI input while the RPN makes the proposals (USE_RPN_ROIS, the default).
    assert gen.random_rois == 0 and len(inputs) == 7


def test_instances_beyond_max_gt_keep_the_first():
    config = SmallConfig().override({"MAX_GT_INSTANCES": 2, "IMAGES_PER_GPU": 1})
    ds = ellipse_dataset([(128, 128)] * 6, seed=9)
    gen = data.DataGenerator(ds, config, shuffle=False, seed=0, workers=0)
    for i in range(len(gen)):
        _, _, ids, boxes, _ = data.load_image_gt(ds, config, i)
        (inputs,) = gen[i]
        n = min(len(ids), 2)
        np.testing.assert_array_equal(inputs[4][0, :n], ids[:n])
        np.testing.assert_array_equal(inputs[5][0, :n], boxes[:n])


@pytest.mark.parametrize("pad", [False, True])
def test_every_image_exactly_once_per_epoch_with_two_workers(pad):
    config = SmallConfig().override({"IMAGES_PER_GPU": 3})
    ds = ellipse_dataset([(96, 128)] * 13, seed=10)
    gen = data.DataGenerator(ds, config, shuffle=True, seed=3, workers=2,
                             use_multiprocessing=True, pad_last_batch=pad)
    assert len(gen) == 5
    batches = collect_epoch(gen)
    ids = [i for batch in batches for i in batch]
    plan = [i for batch in gen.epoch_plan(0) for i in batch.tolist()]
    assert ids == plan
    if pad:
        assert all(len(b) == 3 for b in batches) and len(ids) == 15
        counts = np.bincount(ids, minlength=13)
        first = gen.permutation(0)[:2]
        assert counts[first].tolist() == [2, 2] and counts.sum() == 15
        assert set(ids) == set(range(13))
    else:
        assert sorted(ids) == list(range(13))


def test_order_reproducible_from_seed_and_changes_across_epochs():
    config = SmallConfig().override({"IMAGES_PER_GPU": 2})
    ds = ellipse_dataset([(64, 64)] * 10, seed=11)
    a = data.DataGenerator(ds, config, shuffle=True, seed=5, workers=2)
    b = data.DataGenerator(ds, config, shuffle=True, seed=5, workers=0)
    before = shm_blocks()
    batches = []
    epoch0 = collect_epoch(a, keep=batches)
    assert epoch0 == [x.tolist() for x in b.epoch_plan(0)]
    # Worker batches (sent through shared memory) equal in-process ones, and no block leaks.
    assert shm_blocks() <= before
    for k in (0, 4):
        for x, y in zip(batches[k], b[k][0]):
            assert type(x) is np.ndarray and x.dtype == y.dtype
            np.testing.assert_array_equal(x, y)
    epoch1 = collect_epoch(a)
    assert a.epoch == 2 and epoch1 != epoch0
    assert sorted(sum(epoch1, [])) == list(range(10))
    # The whole batch content is reproducible: same seed, same epoch -> same arrays.
    b.set_epoch(1)
    c = data.DataGenerator(ds, config, shuffle=True, seed=5, workers=0)
    c.set_epoch(1)
    for x, y in zip(b[2][0], c[2][0]):
        np.testing.assert_array_equal(x, y)
    d = data.DataGenerator(ds, config, shuffle=True, seed=6, workers=0)
    assert [x.tolist() for x in d.epoch_plan(0)] != epoch0
    e = data.DataGenerator(ds, config, shuffle=False, seed=6, workers=0)
    assert sum([x.tolist() for x in e.epoch_plan(3)], []) == list(range(10))


class FlakyDataset(EllipseDataset):
    """Image 3 cannot be read; image 5 has no instances."""

    def load_image(self, image_id):
        if image_id == 3:
            raise utils.ImageLoadError("image file not found: /data/img3.jpg",
                                       path="/data/img3.jpg")
        return super().load_image(image_id)

    def load_mask(self, image_id):
        mask, ids = super().load_mask(image_id)
        if image_id == 5:
            return mask[:, :, :0], ids[:0]
        return mask, ids

    def image_reference(self, image_id):
        return "/data/img%d.jpg" % image_id


def flaky_dataset():
    ds = FlakyDataset()
    ds.load([(64, 80)] * 8, seed=12)
    ds.prepare()
    return ds


@pytest.mark.parametrize("workers", [0, 2])
def test_failing_sample_raises_a_clear_error(workers):
    config = SmallConfig().override({"ON_LOAD_ERROR": "raise", "IMAGES_PER_GPU": 2})
    gen = data.DataGenerator(flaky_dataset(), config, shuffle=False, seed=0, workers=workers)
    with pytest.raises(data.SampleLoadError, match=r"image_id 3 .*img3\.jpg.*ImageLoadError"):
        if workers:
            collect_epoch(gen)
        else:
            for i in range(len(gen)):
                gen[i]


def test_failing_sample_is_skipped_and_counted_across_workers():
    config = SmallConfig().override({"ON_LOAD_ERROR": "skip", "IMAGES_PER_GPU": 2})
    gen = data.DataGenerator(flaky_dataset(), config, shuffle=True, seed=1, workers=2)
    batches = collect_epoch(gen)
    assert len(batches) == 4 and all(len(b) == 2 for b in batches)
    ids = sum(batches, [])
    assert 3 not in ids and 5 not in ids
    counts = gen.skip_counts(epoch=0)
    assert counts["error"] == 1 and counts["no_instances"] == 1
    kinds = {r["image_id"]: r["kind"] for r in gen.skipped}
    assert kinds == {3: "error", 5: "no_instances"}
    assert "img3.jpg" in gen.skip_summary()


def test_a_dataset_of_broken_images_fails_instead_of_hanging():
    class Broken(EllipseDataset):
        def load_image(self, image_id):
            raise OSError("disk on fire")
    ds = Broken()
    ds.load([(64, 64)] * 4)
    ds.prepare()
    config = SmallConfig().override({"ON_LOAD_ERROR": "skip"})
    gen = data.DataGenerator(ds, config, seed=0, workers=0, max_attempts=5)
    with time_limit(20), pytest.raises(data.SampleLoadError, match="6 consecutive"):
        gen[0]


def test_stream_mode_runs_exact_passes_across_keras_epochs():
    """Stream mode: indices run on across passes; each pass is a permutation; start resumes."""
    from synthetic import shapes_config, shapes_dataset
    from mrcnn.data import DataGenerator
    config = shapes_config(IMAGES_PER_GPU=2)
    dataset = shapes_dataset(5, seed=3)
    gen = DataGenerator(dataset, config, shuffle=True, seed=7, workers=0, stream=True,
                        pad_last_batch=False)
    assert gen.num_batches is None and len(gen) == 3
    seen = [gen.locate(i) for i in range(7)]
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    for p in range(3):
        ids = np.concatenate([gen.epoch_plan(p)[b] for b in range(3)])
        assert sorted(ids) == sorted(dataset.image_ids)
    # Keras' epoch ends do not move the stream.
    gen.on_epoch_end()
    assert gen.locate(4) == (1, 1)
    resumed = DataGenerator(dataset, config, shuffle=True, seed=7, workers=0, stream=True,
                            start=4, pad_last_batch=False)
    a, b = resumed[0][0], gen[4][0]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- random ROIs, detection targets

def box_iou(a, b):
    """IoU of two (y1, x1, y2, x2) boxes, by hand."""
    ih = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.mark.parametrize("rng", ["generator", "random_state", "global"])
def test_generate_random_rois_inside_the_image_and_around_the_boxes(rng):
    shape = (96, 160, 3)
    boxes = np.array([[10, 20, 40, 60], [50, 100, 90, 150], [0, 0, 5, 5]], np.int32)
    generator = {"generator": np.random.default_rng(0),
                 "random_state": np.random.RandomState(0), "global": None}[rng]
    np.random.seed(0)                        # rng=None draws from np.random, as matterport
    rois = data.generate_random_rois(shape, 1000, np.array([1, 2, 3]), boxes, rng=generator)
    assert rois.shape == (1000, 4) and rois.dtype == np.int32
    y1, x1, y2, x2 = rois.T
    # Every ROI has a positive area and lies inside the image.
    assert (y1 < y2).all() and (x1 < x2).all()
    assert y1.min() >= 0 and x1.min() >= 0 and y2.max() <= 95 and x2.max() <= 159
    # int(0.9 * 1000 / 3) = 300 per box, inside the box grown by its size (clipped), ...
    per_box = 300
    for i, (by1, bx1, by2, bx2) in enumerate(boxes):
        h, w = by2 - by1, bx2 - bx1
        r = rois[i * per_box:(i + 1) * per_box]
        assert (r[:, 0] >= max(by1 - h, 0)).all() and (r[:, 2] < min(by2 + h, 96)).all()
        assert (r[:, 1] >= max(bx1 - w, 0)).all() and (r[:, 3] < min(bx2 + w, 160)).all()
        # ... so many of them overlap the box (far more than of the image-wide ones).
        overlaps = np.array([box_iou(roi, (by1, bx1, by2, bx2)) for roi in r])
        wide = np.array([box_iou(roi, (by1, bx1, by2, bx2)) for roi in rois[900:]])
        assert (overlaps > 0).mean() > 0.4 and (overlaps > 0).mean() > (wide > 0).mean()
        assert (overlaps >= 0.5).any()
    # The other 100 anywhere: they spread over the whole image.
    rest = rois[3 * per_box:]
    assert len(rest) == 100
    assert rest[:, 0].min() < 20 and rest[:, 2].max() > 75
    assert rest[:, 1].min() < 30 and rest[:, 3].max() > 130


def test_generate_random_rois_without_boxes_and_reproducibility():
    rois = data.generate_random_rois((64, 64, 3), 50, np.zeros(0), np.zeros((0, 4)),
                                     rng=np.random.default_rng(1))
    assert rois.shape == (50, 4) and (rois[:, 2] > rois[:, 0]).all()
    again = data.generate_random_rois((64, 64, 3), 50, np.zeros(0), np.zeros((0, 4)),
                                      rng=np.random.default_rng(1))
    np.testing.assert_array_equal(rois, again)
    with pytest.raises(ValueError, match="at least 2 pixels"):
        data.generate_random_rois((1, 64, 3), 5, [1], [[0, 0, 1, 4]])


def reference_mask_target(full_mask, roi, mask_shape):
    """The ROI's crop of a full-image mask, resized with skimage (bilinear), >= 0.5."""
    from skimage.transform import resize as sk_resize
    y1, x1, y2, x2 = roi
    crop = full_mask[y1:y2, x1:x2].astype(np.float64)
    return sk_resize(crop, mask_shape, order=1, mode="edge", anti_aliasing=False) >= 0.5


@pytest.mark.parametrize("mini", [False, True])
def test_build_detection_targets_against_numpy_references(mini):
    config = shapes_config(USE_MINI_MASK=mini, TRAIN_ROIS_PER_IMAGE=32)
    ds = shapes_dataset(4, seed=5)
    T, C = 32, config.NUM_CLASSES
    checked_masks = 0
    for image_id in ds.image_ids:
        image, _, gt_ids, gt_boxes, masks = data.load_image_gt(ds, config, image_id,
                                                               use_mini_mask=mini)
        _, _, _, _, full = data.load_image_gt(ds, config, image_id, use_mini_mask=False)
        rois = data.generate_random_rois(image.shape, 300, gt_ids, gt_boxes,
                                         rng=np.random.default_rng(image_id))
        out_rois, class_ids, bboxes, target_masks = data.build_detection_targets(
            rois, gt_ids, gt_boxes, masks, config, rng=np.random.default_rng(7))
        assert out_rois.shape == (T, 4) and out_rois.dtype == np.int32
        assert class_ids.shape == (T,) and class_ids.dtype == np.int32
        assert bboxes.shape == (T, C, 4) and bboxes.dtype == np.float32
        assert target_masks.shape == (T, 28, 28, C) and target_masks.dtype == np.float32
        # Every kept ROI is one of the given ROIs.
        given = {tuple(r) for r in rois.tolist()}
        assert all(tuple(r) in given for r in out_rois.tolist())
        positives = np.flatnonzero(class_ids > 0)
        assert 0 < len(positives) <= int(T * config.ROI_POSITIVE_RATIO)
        assert (positives == np.arange(len(positives))).all()          # positives first
        for i in range(T):
            roi = out_rois[i]
            ious = [box_iou(roi, g) for g in gt_boxes]
            if class_ids[i] == 0:
                assert max(ious) < 0.5
                assert not bboxes[i].any() and not target_masks[i].any()
                continue
            j = int(np.argmax(ious))
            assert ious[j] >= 0.5 and class_ids[i] == gt_ids[j]
            # Deltas: box_refinement / BBOX_STD_DEV at the ROI's class only.
            expected = utils.box_refinement(roi[None], gt_boxes[j][None])[0] / \
                config.BBOX_STD_DEV
            np.testing.assert_allclose(bboxes[i, class_ids[i]], expected, rtol=1e-5,
                                       atol=1e-5)
            others = np.delete(np.arange(C), class_ids[i])
            assert not bboxes[i, others].any() and not target_masks[i][..., others].any()
            # Mask: the GT mask cropped to the ROI and resized (here from the full-size
            # mask; mini masks lose a little detail on the way).
            ours = target_masks[i, :, :, class_ids[i]]
            assert set(np.unique(ours)) <= {0.0, 1.0}
            ref = reference_mask_target(full[:, :, j], roi, (28, 28))
            if ref.sum() > 20:
                assert iou(ours > 0.5, ref) > (0.8 if mini else 0.9)
                checked_masks += 1
    assert checked_masks >= 10


def test_build_detection_targets_fills_with_repeated_negatives():
    config = shapes_config(TRAIN_ROIS_PER_IMAGE=16)
    gt_boxes = np.array([[10, 10, 50, 50]], np.int32)
    masks = np.zeros((128, 128, 1), bool)
    masks[10:50, 10:50] = True
    rois = np.array([[10, 10, 50, 50], [12, 12, 50, 50], [80, 80, 100, 100],
                     [60, 0, 70, 20]], np.int32)
    out_rois, class_ids, bboxes, target_masks = data.build_detection_targets(
        rois, np.array([2]), gt_boxes, masks, config.override({"USE_MINI_MASK": False}),
        rng=np.random.default_rng(0))
    assert class_ids[:2].tolist() == [2, 2] and (class_ids[2:] == 0).all()
    assert {tuple(r) for r in out_rois[2:].tolist()} == {(80, 80, 100, 100), (60, 0, 70, 20)}
    np.testing.assert_allclose(bboxes[0, 2], 0, atol=1e-6)           # the GT box itself
    assert target_masks[0, :, :, 2].all()                             # fully inside
    with pytest.raises(ValueError, match="no ROIs"):
        data.build_detection_targets(np.zeros((0, 4)), np.array([2]), gt_boxes, masks, config)


# ---------------------------------------------------------------- matterport's data_generator

def test_data_generator_yields_matterports_inputs_and_outputs():
    from mrcnn import model as modellib
    assert modellib.data_generator is data.data_generator
    config = shapes_config()
    ds = shapes_dataset(3, seed=6)
    g = modellib.data_generator(ds, config, shuffle=True, random_rois=200, batch_size=2,
                                detection_targets=True, seed=0)
    seen = []
    for _ in range(3):
        inputs, outputs = next(g)
        assert isinstance(inputs, list) and isinstance(outputs, list)
        (images, meta, rpn_match, rpn_bbox, gt_class_ids, gt_boxes, gt_masks, rpn_rois,
         rois) = inputs
        mrcnn_class_ids, mrcnn_bbox, mrcnn_mask = outputs
        T, C = config.TRAIN_ROIS_PER_IMAGE, config.NUM_CLASSES
        assert images.shape == (2, 128, 128, 3) and images.dtype == np.float32
        assert rpn_match.shape[0] == 2 and rpn_match.shape[2] == 1
        assert gt_masks.shape == (2, 28, 28, config.MAX_GT_INSTANCES)
        assert rpn_rois.shape == (2, 200, 4) and rpn_rois.dtype == np.int32
        assert rois.shape == (2, T, 4) and rois.dtype == np.int32
        assert mrcnn_class_ids.shape == (2, T, 1) and mrcnn_class_ids.dtype == np.int32
        assert mrcnn_bbox.shape == (2, T, C, 4) and mrcnn_mask.shape == (2, T, 28, 28, C)
        for b in range(2):
            image_id = int(meta[b, 0])
            seen.append(image_id)
            # The image and its ground truth are load_image_gt's (molded).
            image, _, ids, boxes, _ = data.load_image_gt(ds, config, image_id)
            np.testing.assert_allclose(data.unmold_image(images[b], config), image, atol=1)
            np.testing.assert_array_equal(gt_class_ids[b, :len(ids)], ids)
            np.testing.assert_array_equal(gt_boxes[b, :len(ids)], boxes)
            # The sampled ROIs come from the random ROIs; positives carry targets.
            assert {tuple(r) for r in rois[b].tolist()} <= {tuple(r) for r in
                                                            rpn_rois[b].tolist()}
            pos = np.flatnonzero(mrcnn_class_ids[b, :, 0] > 0)
            assert len(pos) > 0
            classes = mrcnn_class_ids[b, pos, 0]
            assert set(classes) <= set(ids)
            # (A positive ROI may cover only an occluded part of its shape: an empty mask.)
            assert np.mean([mrcnn_mask[b, i, :, :, c].any() for i, c in zip(pos, classes)]) \
                > 0.5
    # Passes over the dataset: every image once per pass (the last batch padded).
    assert sorted(seen[:3]) == [0, 1, 2]
    # Without random_rois: the 7 training inputs and no outputs, as in matterport.
    inputs, outputs = next(data.data_generator(ds, config, seed=1))
    assert len(inputs) == 7 and outputs == [] and inputs[0].shape[0] == 1


def test_no_augmentation_sources_and_augment_reach_the_samples():
    import albumentations as A

    class TwoSources(EllipseDataset):
        def load(self, sizes, seed=0):
            super().load(sizes, seed=seed)
            self.image_info[1]["source"] = "plain"
            self.add_class("plain", 1, "p")

    ds = TwoSources()
    ds.load([(128, 128)] * 2, seed=15)
    ds.prepare()
    config = SmallConfig().override({"IMAGES_PER_GPU": 1})
    flip = A.Compose([A.HorizontalFlip(p=1.0)])
    gen = data.DataGenerator(ds, config, augmentation=flip, no_augmentation_sources=["plain"],
                             seed=0, workers=0)
    for image_id, flipped in ((0, True), (1, False)):
        sample = gen.load_sample(image_id, rng=np.random.default_rng(0))
        plain = data.load_image_gt(ds, config, image_id)[0]
        np.testing.assert_array_equal(sample[0], plain[:, ::-1] if flipped else plain)
    with pytest.warns(FutureWarning):
        data.DataGenerator(ds, config, augment=True, seed=0, workers=0).load_sample(
            0, rng=np.random.default_rng(0))


def test_loader_supplies_random_rois_when_use_rpn_rois_is_false():
    config = shapes_config(USE_RPN_ROIS=False, IMAGES_PER_GPU=2)
    ds = shapes_dataset(4, seed=7)
    gen = data.DataGenerator(ds, config, shuffle=False, seed=0, workers=0)
    assert gen.random_rois == config.POST_NMS_ROIS_TRAINING
    (inputs,) = gen[1]
    assert len(inputs) == 8
    rois = inputs[7]
    assert rois.shape == (2, config.POST_NMS_ROIS_TRAINING, 4) and rois.dtype == np.int32
    assert (rois[..., 2] > rois[..., 0]).all() and rois.max() < 128
    # Reproducible like the rest of the batch.
    again = data.DataGenerator(ds, config, shuffle=False, seed=0, workers=0)[1][0][7]
    np.testing.assert_array_equal(rois, again)


def test_training_without_rpn_rois_runs_and_losses_are_finite(tmp_path):
    """USE_RPN_ROIS=False: the heads train on the loader's random ROIs (matterport's option;
    its own train() never fed them)."""
    import keras
    from mrcnn.model import LOSS_NAMES, MaskRCNN
    keras.utils.set_random_seed(0)
    config = shapes_config(USE_RPN_ROIS=False, STEPS_PER_EPOCH=2, VALIDATION_STEPS=1)
    model = MaskRCNN("training", config, str(tmp_path))
    assert [t.name for t in model.keras_model.inputs][-1].startswith("input_roi")
    history = model.train(shapes_dataset(4, seed=8), shapes_dataset(2, seed=9),
                          learning_rate=0.001, epochs=1, layers="heads")
    for name in LOSS_NAMES + ("loss",):
        assert len(history.history[name]) == 1 and np.isfinite(history.history[name]).all()
    assert history.history["mrcnn_class_loss"][0] > 0
