"""Large-scale jitter (data.scale_jitter): masks stay on their pixels, sizes stay fixed, the
scale really varies over the range, and the loader's seed makes it reproducible."""

import numpy as np
import pytest

from synthetic import shapes_config

from mrcnn import data, utils

RED = np.array([230, 20, 20], np.uint8)


class PaintedDataset(utils.Dataset):
    """One 128 px image: a grey background and two rectangles painted red, whose masks are
    exactly the red pixels."""

    def __init__(self):
        super().__init__()
        self.add_class("painted", 1, "box")
        self.add_image("painted", 0, None)
        self.prepare()

    def load_image(self, image_id):
        image = np.full((128, 128, 3), 120, np.uint8)
        image[20:60, 30:90] = RED
        image[80:120, 10:40] = RED
        return image

    def load_mask(self, image_id):
        mask = np.zeros((128, 128, 2), bool)
        mask[20:60, 30:90, 0] = True
        mask[80:120, 10:40, 1] = True
        return mask, np.array([1, 1], np.int32)


def load(seed, scale_range=(0.5, 2.0)):
    config = shapes_config()
    aug = data.scale_jitter(config.IMAGE_SHAPE, scale_range)
    return data.load_image_gt(PaintedDataset(), config, 0, augmentation=aug,
                              use_mini_mask=False, rng=np.random.default_rng(seed))


@pytest.mark.parametrize("seed", range(6))
def test_masks_stay_on_their_pixels(seed):
    image, meta, class_ids, bbox, mask = load(seed)
    assert image.shape == (128, 128, 3) and mask.shape[:2] == (128, 128)
    red = np.all(np.abs(image.astype(int) - RED) < 40, axis=-1)
    union = mask.any(axis=-1)
    if not union.any():
        return                                  # both boxes cropped away: allowed
    # Apart from a one-pixel band at the edges (interpolation), mask == red pixels.
    edges = np.zeros_like(union)
    for m in np.moveaxis(mask, -1, 0):
        grown = np.zeros_like(m)
        ys, xs = np.nonzero(m)
        grown[np.clip(ys[:, None] + np.arange(-1, 2), 0, 127).ravel(),
              np.clip(xs[:, None] + np.arange(-1, 2), 0, 127).ravel()] = True
        edges |= grown & ~m
        edges |= m & ~np.pad(m, 1)[2:, 1:-1] | m & ~np.pad(m, 1)[:-2, 1:-1] \
            | m & ~np.pad(m, 1)[1:-1, 2:] | m & ~np.pad(m, 1)[1:-1, :-2]
    inner = ~edges
    assert (union[inner] == red[inner]).mean() > 0.995
    # Boxes are the tight boxes of the masks.
    np.testing.assert_array_equal(bbox, utils.extract_bboxes(mask))


def test_the_scale_varies_over_the_range_and_the_seed_repeats_it():
    scales = []
    for seed in range(40):
        _, _, _, bbox, mask = load(seed)
        for y1, _, y2, _ in bbox:
            if 0 < y1 and y2 < 128:             # not cut by the crop vertically
                scales.append((y2 - y1) / 40.0)
                break
    scales = np.array(scales)
    # Both rectangles are 40 px tall: their height after jitter measures the scale.
    assert len(scales) > 20
    assert scales.min() >= 0.45 and scales.max() <= 2.05
    assert scales.min() < 0.7 and scales.max() > 1.5
    a = load(7)
    b = load(7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_default_augmentation_takes_the_jitter():
    config = shapes_config()
    aug = data.default_augmentation(scale_range=(0.8, 1.25), image_shape=config.IMAGE_SHAPE)
    image, _, _, _, mask = data.load_image_gt(PaintedDataset(), config, 0, augmentation=aug,
                                              rng=np.random.default_rng(0))
    assert image.shape == (128, 128, 3)
    with pytest.raises(ValueError, match="image_shape"):
        data.default_augmentation(scale_range=(0.5, 2.0))
    with pytest.raises(ValueError, match="scale_range"):
        data.scale_jitter((128, 128, 3), (2.0, 0.5))


def test_fashion_scale_jitter_setting():
    """FashionConfig.SCALE_JITTER (--set SCALE_JITTER=...) is what `train` gives
    default_augmentation; a malformed value is a ConfigError naming it."""
    from mrcnn.config import ConfigError
    from samples.fashion import configs
    assert configs.scale_jitter(configs.make_config(demo=False)) is None
    config = configs.make_config(demo=True, overrides=["SCALE_JITTER=(0.8, 1.25)"])
    assert configs.scale_jitter(config) == (0.8, 1.25)
    assert configs.scale_jitter(configs.make_config(demo=True, overrides=["SCALE_JITTER=()"])) \
        is None
    for bad in ["SCALE_JITTER=(1.25, 0.8)", "SCALE_JITTER=0.5", "SCALE_JITTER=(0, 1)",
                "SCALE_JITTER=(0.8,)"]:
        with pytest.raises(ConfigError, match="SCALE_JITTER"):
            configs.scale_jitter(configs.make_config(demo=True, overrides=[bad]))
