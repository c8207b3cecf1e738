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
        image, meta, class_ids, bbox, mask = data.load_image_gt(ds, config, image_id)
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
    image, _, ids, bbox, mini = data.load_image_gt(ds, config, 1)
    aug = A.Compose([A.RandomBrightnessContrast(0.3, 0.3, p=1.0),
                     A.HueSaturationValue(20, 30, 20, p=1.0), A.GaussianBlur(p=1.0)])
    image_a, _, ids_a, bbox_a, mini_a = data.load_image_gt(
        ds, config, 1, augmentation=aug, rng=np.random.default_rng(0))
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
    with pytest.raises(NotImplementedError):
        data.DataGenerator(ds, config, random_rois=200)


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
