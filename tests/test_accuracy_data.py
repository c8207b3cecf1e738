"""benchmarks/accuracy_data.py, the accuracy benchmark's dataset: its masks are what is drawn,
and check_sample rejects samples that break its rules."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import accuracy_data  # noqa: E402


def test_masks_are_the_visible_drawn_pixels():
    dataset = accuracy_data.ShapesDataset(count=12, seed=3)
    assert dataset.class_names == ["BG", "ellipse", "ring", "star"]
    seen = set()
    for image_id in dataset.image_ids:
        image = dataset.load_image(image_id)
        masks, class_ids = dataset.load_mask(image_id)
        assert image.shape == (128, 128, 3) and masks.shape[:2] == (128, 128)
        assert 1 <= len(class_ids) <= accuracy_data.MAX_OBJECTS
        assert masks.sum(axis=2).max() <= 1                      # occlusion: disjoint
        assert masks.reshape(-1, masks.shape[2]).sum(0).min() >= accuracy_data.MIN_AREA
        seen.update(class_ids.tolist())
    assert seen == {1, 2, 3}
    # The same seed gives the same images.
    again = accuracy_data.ShapesDataset(count=2, seed=3)
    np.testing.assert_array_equal(again.load_image(1), dataset.load_image(1))


def test_a_ring_has_a_hole():
    rng = np.random.default_rng(0)
    plane = accuracy_data._shape_plane(rng, 2, 128)
    ys, xs = np.nonzero(plane)
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    assert not plane[cy, cx]            # the centre of an annulus is outside its mask


def test_check_sample_rejects_broken_samples():
    sample = accuracy_data.make_sample(np.random.default_rng(5))
    accuracy_data.check_sample(*sample)
    image, masks, class_ids, colours = sample
    overlapping = np.concatenate([masks, masks[..., :1]], axis=2)
    with pytest.raises(ValueError, match="overlap"):
        accuracy_data.check_sample(image, overlapping, np.append(class_ids, 1),
                                   np.concatenate([colours, colours[:1]]))
    with pytest.raises(ValueError, match="colour"):
        accuracy_data.check_sample(image, masks, class_ids, 255 - colours + 40)
    tiny = np.zeros_like(masks[..., :1])
    tiny[0, :3] = True
    with pytest.raises(ValueError, match="pixels"):
        accuracy_data.check_sample(image, tiny, class_ids[:1], colours[:1])
