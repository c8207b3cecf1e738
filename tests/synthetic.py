"""Generated data for the tests: a shapes dataset and small configs.

ShapesDataset draws squares, circles and triangles of fixed colours per class on a noisy
background, deterministically from a seed, and returns exact instance masks, so a small Mask
R-CNN learns it in a few dozen CPU steps.
"""

import cv2
import numpy as np

from mrcnn import utils
from mrcnn.config import Config

SHAPES = ("square", "circle", "triangle")
COLOURS = {"square": (220, 40, 40), "circle": (40, 200, 40), "triangle": (40, 60, 230)}


class ShapesConfig(Config):
    """A CPU-sized configuration: resnet50, 128 px, few ROIs."""
    NAME = "shapes"
    BACKBONE = "resnet50"
    GPU_COUNT = 1
    IMAGES_PER_GPU = 1
    NUM_CLASSES = 1 + len(SHAPES)
    IMAGE_RESIZE_MODE = "square"
    IMAGE_MIN_DIM = 128
    IMAGE_MAX_DIM = 128
    RPN_ANCHOR_SCALES = (8, 16, 32, 64, 128)
    RPN_TRAIN_ANCHORS_PER_IMAGE = 64
    PRE_NMS_LIMIT = 1000
    POST_NMS_ROIS_TRAINING = 100
    POST_NMS_ROIS_INFERENCE = 50
    TRAIN_ROIS_PER_IMAGE = 16
    MAX_GT_INSTANCES = 6
    DETECTION_MAX_INSTANCES = 10
    DETECTION_MIN_CONFIDENCE = 0.0
    FPN_CLASSIF_FC_LAYERS_SIZE = 64
    TOP_DOWN_PYRAMID_SIZE = 64
    MINI_MASK_SHAPE = (28, 28)
    STEPS_PER_EPOCH = 4
    VALIDATION_STEPS = 1
    LEARNING_RATE = 0.01
    LOADER_WORKERS = 0


class ShapesDataset(utils.Dataset):
    """`count` images of `size` px with one to three shapes each."""

    def load_shapes(self, count, size=128, seed=0):
        for i, name in enumerate(SHAPES):
            self.add_class("shapes", i + 1, name)
        rng = np.random.default_rng(seed)
        for image_id in range(count):
            shapes = []
            for _ in range(int(rng.integers(1, 4))):
                name = SHAPES[int(rng.integers(len(SHAPES)))]
                half = int(rng.integers(size // 8, size // 4))
                cy, cx = (int(v) for v in rng.integers(half, size - half, size=2))
                shapes.append((name, cy, cx, half))
            self.add_image("shapes", image_id=image_id, path=None, width=size, height=size,
                           shapes=shapes, noise_seed=int(rng.integers(1 << 30)))

    def load_image(self, image_id):
        info = self.image_info[image_id]
        rng = np.random.default_rng(info["noise_seed"])
        image = rng.integers(90, 140, size=(info["height"], info["width"], 3)).astype(np.uint8)
        masks, _ = self.load_mask(image_id)
        for i, (name, *_) in enumerate(info["shapes"]):
            image[masks[:, :, i]] = COLOURS[name]
        return image

    def load_mask(self, image_id):
        info = self.image_info[image_id]
        h, w = info["height"], info["width"]
        shapes = info["shapes"]
        masks = np.zeros((h, w, len(shapes)), dtype=np.uint8)
        for i, (name, cy, cx, half) in enumerate(shapes):
            canvas = np.zeros((h, w), dtype=np.uint8)
            if name == "square":
                cv2.rectangle(canvas, (cx - half, cy - half), (cx + half, cy + half), 1, -1)
            elif name == "circle":
                cv2.circle(canvas, (cx, cy), half, 1, -1)
            else:
                points = np.array([[cx, cy - half], [cx - half, cy + half], [cx + half, cy + half]],
                                  dtype=np.int32)
                cv2.fillPoly(canvas, [points], 1)
            masks[:, :, i] = canvas
        # Later shapes occlude earlier ones.
        for i in range(len(shapes) - 2, -1, -1):
            masks[:, :, i] &= 1 - np.any(masks[:, :, i + 1:], axis=-1).astype(np.uint8)
        class_ids = np.array([SHAPES.index(s[0]) + 1 for s in shapes], dtype=np.int32)
        return masks.astype(bool), class_ids


def shapes_dataset(count, size=128, seed=0):
    dataset = ShapesDataset()
    dataset.load_shapes(count, size=size, seed=seed)
    dataset.prepare()
    return dataset


def shapes_config(**overrides):
    config = ShapesConfig()
    return config.override(overrides) if overrides else config


def write_legacy_h5(keras_model, path):
    """Write keras_model's weights as Keras 2's save_weights did (matterport's checkpoints and
    mask_rcnn_coco.h5): attrs layer_names, one group per layer with attrs weight_names."""
    import h5py
    with h5py.File(path, "w") as f:
        names = []
        for layer in keras_model.layers:
            if not layer.weights:
                continue
            g = f.create_group(layer.name)
            weight_names = []
            for i, w in enumerate(layer.weights):
                key = "%s/w%d:0" % (layer.name, i)
                g.create_dataset(key, data=np.asarray(w))
                weight_names.append(key.encode())
            g.attrs["weight_names"] = weight_names
            names.append(layer.name.encode())
        f.attrs["layer_names"] = names
