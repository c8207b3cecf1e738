"""The accuracy benchmark's dataset: textured shapes, generated differently from the fashion demo.

The fashion demo (samples/fashion/demo_data.py) draws garment silhouettes on plain backgrounds.
This set is unlike it on purpose, so that a recipe tuned on the demo is not scored on its own
generator: three classes of objects of other geometry, "ellipse", "ring" (an annulus: a mask
with a hole) and "star" (a five-pointed star: thin concave points), each filled with a colour
plus a texture of its own (noise, stripes at a random angle, or a dot grid), on a background of
a colour gradient with noise and distractor lines that are not objects. Objects overlap: a
later object hides the part of an earlier one beneath it, and the masks are the visible parts.

Masks are derived from what is drawn: an object is rendered into its own boolean plane, the
planes of earlier objects lose the pixels it covers, and a placement that would hide more than
MAX_HIDDEN of an earlier object's visible pixels, or leave less than MIN_AREA of its own, is
drawn again elsewhere. `check_sample` verifies the result (disjoint masks, every mask at least
MIN_AREA pixels, each object's visible pixels carry its colour's texture, the image is uint8
RGB), and the dataset runs it on every image it makes.

    from accuracy_data import ShapesDataset
    train = ShapesDataset(count=400, seed=1)      # prepared mrcnn.utils.Dataset, in memory
"""

import math

import cv2
import numpy as np

from mrcnn import utils

CLASS_NAMES = ("ellipse", "ring", "star")
SIZE = 128
MIN_AREA = 40           # visible pixels an instance keeps at least
MAX_HIDDEN = 0.35       # the largest share of an earlier object's visible pixels a new one hides
MAX_OBJECTS = 3


def _texture(rng, shape, colour):
    """An RGB float image of `shape` (h, w): `colour` with one of three textures."""
    h, w = shape
    kind = rng.integers(3)
    base = np.empty((h, w, 3), np.float32)
    base[:] = colour
    if kind == 0:                                           # noise
        base += rng.normal(0, 18, (h, w, 1))
    elif kind == 1:                                         # stripes at a random angle
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(4, 10)
        yy, xx = np.mgrid[0:h, 0:w]
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        base *= (0.75 + 0.25 * (np.sin(2 * math.pi * phase) > 0))[..., None]
    else:                                                   # a dot grid
        step = int(rng.integers(4, 8))
        yy, xx = np.mgrid[0:h, 0:w]
        dots = ((yy % step) < 2) & ((xx % step) < 2)
        base[dots] *= 0.55
    return base


def _background(rng, size):
    """A colour gradient with noise and a few distractor lines (no instances)."""
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    t = np.linspace(0, 1, size, dtype=np.float32)
    if rng.random() < 0.5:
        t = t[:, None, None] * np.ones((1, size, 1), np.float32)
    else:
        t = t[None, :, None] * np.ones((size, 1, 1), np.float32)
    image = c0 * (1 - t) + c1 * t + rng.normal(0, 6, (size, size, 1))
    for _ in range(rng.integers(0, 3)):
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.line(image, p1, p2, colour, int(rng.integers(1, 3)))
    return image


def _shape_plane(rng, class_id, size):
    """The boolean plane of one object of class_id (1: ellipse, 2: ring, 3: star)."""
    plane = np.zeros((size, size), np.uint8)
    radius = rng.uniform(14, 38)
    cy, cx = (float(v) for v in rng.uniform(radius * 0.6, size - radius * 0.6, 2))
    center = (int(round(cx)), int(round(cy)))
    angle = float(rng.uniform(0, 180))
    if class_id in (1, 2):
        axes = (int(round(radius)), int(round(radius * rng.uniform(0.45, 1.0))))
        cv2.ellipse(plane, center, axes, angle, 0, 360, 1, -1)
        if class_id == 2:                                   # the hole
            inner = tuple(max(1, int(round(a * rng.uniform(0.4, 0.6)))) for a in axes)
            cv2.ellipse(plane, center, inner, angle, 0, 360, 0, -1)
    else:
        turn = math.radians(angle)
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * rng.uniform(0.38, 0.5)
            a = turn + k * math.pi / 5
            points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        cv2.fillPoly(plane, [np.round(np.array(points)).astype(np.int32)], 1)
    return plane.astype(bool)


def make_sample(rng, size=SIZE, max_objects=MAX_OBJECTS):
    """(image uint8 [size, size, 3], masks bool [size, size, N], class_ids int32 [N], colours
    [N, 3]) of one generated image with 1..max_objects instances."""
    image = _background(rng, size)
    planes, class_ids, colours = [], [], []
    wanted = int(rng.integers(1, max_objects + 1))
    tries = 0
    while len(planes) < wanted and tries < 50 * wanted:
        tries += 1
        class_id = int(rng.integers(1, len(CLASS_NAMES) + 1))
        plane = _shape_plane(rng, class_id, size)
        if plane.sum() < MIN_AREA:
            continue
        if any((p & plane).sum() > MAX_HIDDEN * p.sum() or (p & ~plane).sum() < MIN_AREA
               for p in planes):
            continue
        colour = rng.uniform(20, 235, 3)
        image[plane] = _texture(rng, (size, size), colour)[plane]
        planes = [p & ~plane for p in planes]
        planes.append(plane)
        class_ids.append(class_id)
        colours.append(colour)
    image = np.clip(image, 0, 255).astype(np.uint8)
    masks = np.stack(planes, axis=-1) if planes else np.zeros((size, size, 0), bool)
    return image, masks, np.array(class_ids, np.int32), np.array(colours, np.float32)


def check_sample(image, masks, class_ids, colours):
    """Raise ValueError if a generated sample breaks the set's rules (see the module doc)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError("image must be uint8 RGB, is %s %s" % (image.dtype, image.shape))
    if masks.shape[:2] != image.shape[:2] or masks.shape[2] != len(class_ids):
        raise ValueError("masks %s do not fit image %s / %d class ids"
                         % (masks.shape, image.shape, len(class_ids)))
    if masks.shape[2] and masks.sum(axis=2).max() > 1:
        raise ValueError("masks overlap")
    for i in range(masks.shape[2]):
        plane = masks[..., i]
        if plane.sum() < MIN_AREA:
            raise ValueError("instance %d has %d pixels (< %d)" % (i, plane.sum(), MIN_AREA))
        # Textures darken a colour by at most half and add noise: the visible pixels' mean
        # lies between half the colour and the colour plus the noise.
        mean = image[plane].astype(np.float32).mean(axis=0)
        if np.any(mean < 0.45 * colours[i] - 12) or np.any(mean > colours[i] + 12):
            raise ValueError("instance %d: mean colour %s is not its colour %s"
                             % (i, mean.round(), colours[i].round()))
        if not 1 <= class_ids[i] <= len(CLASS_NAMES):
            raise ValueError("instance %d: class id %d" % (i, class_ids[i]))


class ShapesDataset(utils.Dataset):
    """`count` generated images (seeded: the same seed gives the same images), held in memory,
    prepared. Every sample passes check_sample."""

    def __init__(self, count, seed, size=SIZE):
        super().__init__()
        for i, name in enumerate(CLASS_NAMES, start=1):
            self.add_class("shapes", i, name)
        self._samples = []
        for i in range(count):
            sample = make_sample(np.random.default_rng([seed, i]), size)
            check_sample(*sample)
            self._samples.append(sample[:3])
            self.add_image("shapes", image_id=i, path=None, width=size, height=size)
        self.prepare()

    def load_image(self, image_id):
        return self._samples[image_id][0]

    def load_mask(self, image_id):
        _, masks, class_ids = self._samples[image_id]
        return masks.copy(), class_ids.copy()

    def object_count(self):
        """The number of instances over all images."""
        return int(sum(len(s[2]) for s in self._samples))
