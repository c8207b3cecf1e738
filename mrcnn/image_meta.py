"""The image-meta vector: what the network knows of each image besides its pixels.

One table, IMAGE_META_FIELDS, defines the layout; every reader and writer is derived from it:
compose_image_meta / parse_image_meta (numpy, matterport's names, re-exported by mrcnn.data
and mrcnn.model), parse_image_meta_graph (tensors, re-exported by mrcnn.layers),
compose_image_meta_graph (the exported SavedModel molds images in its graph) and
config.IMAGE_META_SIZE.
"""

import numpy as np

# (name, size, numpy dtype parse_image_meta returns), in order; size None: NUM_CLASSES.
IMAGE_META_FIELDS = (
    ("image_id", 1, np.int32),                 # the image's id in its Dataset
    ("original_image_shape", 3, np.int32),     # (H, W, C) before resizing
    ("image_shape", 3, np.int32),              # (H, W, C) after resizing and padding
    ("window", 4, np.int32),                   # (y1, x1, y2, x2) pixels of the image in it
    ("scale", 1, np.float32),                  # the factor the image was scaled by
    ("active_class_ids", None, np.int32),      # [NUM_CLASSES] 1 for the dataset's classes
)


def image_meta_size(num_classes):
    """The length of an image-meta vector: 1 + 3 + 3 + 4 + 1 + num_classes."""
    return sum(size or num_classes for _, size, _ in IMAGE_META_FIELDS)


def _slices():
    """{name: (slice of the vector, size)}; the last field runs to the end."""
    out, start = {}, 0
    for name, size, _ in IMAGE_META_FIELDS:
        out[name] = (slice(start, start + size if size else None), size)
        start += size or 0
    return out


_SLICES = _slices()


def _check_parts(parts, num_classes):
    for name, size, _ in IMAGE_META_FIELDS:
        want = size or num_classes
        if len(parts[name]) != want:
            raise ValueError("image meta %s has %d values, expected %d"
                             % (name, len(parts[name]), want))


def compose_image_meta(image_id, original_image_shape, image_shape, window, scale,
                       active_class_ids):
    """Pack the attributes of an image into one 1-D array (matterport's layout).

    image_id: int, the image's id in its Dataset.
    original_image_shape: (H, W, C) of the image before resizing.
    image_shape: (H, W, C) after resizing and padding.
    window: (y1, x1, y2, x2) pixels, the area of the resized image that holds the real image
        (the rest is padding); y2/x2 exclusive.
    scale: the factor the original image was scaled by.
    active_class_ids: [NUM_CLASSES], 1 for the classes of the image's dataset (source).
    Returns: float64 [1 + 3 + 3 + 4 + 1 + NUM_CLASSES] = [config.IMAGE_META_SIZE].
    """
    parts = {"image_id": [image_id], "original_image_shape": list(original_image_shape),
             "image_shape": list(image_shape), "window": list(window), "scale": [scale],
             "active_class_ids": list(active_class_ids)}
    _check_parts(parts, len(parts["active_class_ids"]))
    return np.array([v for name, _, _ in IMAGE_META_FIELDS for v in parts[name]],
                    dtype=np.float64)


def parse_image_meta(meta):
    """Unpack image_meta arrays (the inverse of compose_image_meta).

    meta: [IMAGE_META_SIZE] or [batch, IMAGE_META_SIZE].
    Returns a dict of numpy arrays with a leading batch axis if `meta` had one:
        image_id int32 [...], original_image_shape int32 [..., 3], image_shape int32 [..., 3],
        window int32 [..., 4], scale float32 [...], active_class_ids int32 [..., NUM_CLASSES].
    """
    meta = np.asarray(meta)
    out = {}
    for name, _, dtype in IMAGE_META_FIELDS:
        where, size = _SLICES[name]
        value = meta[..., where]
        out[name] = (value[..., 0] if size == 1 else value).astype(dtype)
    return out


def parse_image_meta_graph(meta):
    """Split image_meta [batch, IMAGE_META_SIZE] into its parts (see compose_image_meta).

    Returns a dict of float32 tensors: image_id [batch], original_image_shape [batch, 3],
    image_shape [batch, 3], window [batch, 4] (y1, x1, y2, x2 pixels), scale [batch],
    active_class_ids [batch, NUM_CLASSES].
    """
    import tensorflow as tf
    meta = tf.cast(meta, tf.float32)
    out = {}
    for name, _, _ in IMAGE_META_FIELDS:
        where, size = _SLICES[name]
        value = meta[:, where]
        out[name] = value[:, 0] if size == 1 else value
    return out


def compose_image_meta_graph(original_hw, molded_hw, window, scale, num_classes,
                             channels=3):
    """compose_image_meta in the graph, for image id 0 and no active classes (inference):
    original_hw, molded_hw [2], window [4], scale []: tensors. Returns float32
    [IMAGE_META_SIZE]."""
    import tensorflow as tf
    parts = {
        "image_id": tf.zeros([1], tf.float32),
        "original_image_shape": tf.concat([tf.cast(original_hw, tf.float32),
                                           [float(channels)]], axis=0),
        "image_shape": tf.concat([tf.cast(molded_hw, tf.float32), [float(channels)]], axis=0),
        "window": tf.cast(window, tf.float32),
        "scale": tf.reshape(tf.cast(scale, tf.float32), [1]),
        "active_class_ids": tf.zeros([num_classes], tf.float32),
    }
    return tf.concat([parts[name] for name, _, _ in IMAGE_META_FIELDS], axis=0)
