"""Pretrained starting weights: matterport's COCO model and ImageNet ResNets.

* `coco`: matterport's published mask_rcnn_coco.h5 (Keras 2 HDF5, ResNet101-FPN, 81 classes),
  downloaded once with keras.utils.get_file into ~/.keras/models/ and loaded by layer name,
  without the class-specific layers (COCO_EXCLUDE) and without any layer whose shapes differ
  from the model's (another backbone depth, head width...), which are reported.
* `imagenet`: Keras Applications' ResNet50 / ResNet101 ImageNet weights mapped onto the
  backbone's matterport layer names by `imagenet_weight_map` (load_imagenet assigns them;
  imagenet_weights_file writes them once as a weights file that
  `MaskRCNN.load_weights(path, by_name=True)` takes: MaskRCNN.get_imagenet_weights).

Keras Applications' ResNet (v1) and matterport's backbone are the same network: a 7x7/2 conv,
BN, ReLU, 3x3/2 max-pool, then bottleneck blocks whose stride sits on the first 1x1 conv (and
on the 1x1 projection shortcut), every conv with a bias. Differences the mapping handles:

- names: conv1_conv -> conv1, conv1_bn -> bn_conv1, conv{s}_block{b}_{0,1,2,3}_{conv,bn} ->
  res{s}{letter}_branch{1,2a,2b,2c} / bn{s}{letter}_branch{...}, letter = 'a' + b - 1;
- input colour order: Keras Applications' ResNets were trained on BGR (caffe preprocessing),
  our images are RGB minus MEAN_PIXEL (the same means): conv1's input channels are reversed;
- BatchNorm epsilon: 1.001e-5 there, Keras' default 1e-3 here: gamma is rescaled by
  sqrt(var + eps_ours) / sqrt(var + eps_theirs), so the normalised outputs are identical.
- the stem max-pool: theirs pads one pixel each side and pools "valid", ours pools "same"
  (matterport). After a ReLU both give the same windows when conv1's output size is odd;
  for even sizes (every image size that is a multiple of 64) ours starts its windows one
  pixel later, a one-pixel shift of the pooling grid that fine-tuning absorbs.
"""

import os

import numpy as np

from mrcnn import utils

COCO_URL = utils.COCO_MODEL_URL
COCO_FILE = "mask_rcnn_coco.h5"
# Layers whose shapes depend on NUM_CLASSES: never loaded from COCO weights.
COCO_EXCLUDE = ["mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_bbox", "mrcnn_mask"]

IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
IMAGENET_FILES = {
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet101": "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
}


# Weights that cannot be downloaded (offline): the message says which file goes where.
WeightsUnavailable = utils.DownloadError


def keras_models_dir():
    """Where keras.utils.get_file caches models: $KERAS_HOME/models or ~/.keras/models."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models")


# ----------------------------------------------------------------------------- COCO

def coco_weights_path():
    """Path of mask_rcnn_coco.h5 in keras_models_dir(), downloading it on first use
    (utils.download_trained_weights: atomic, with progress).

    Raises WeightsUnavailable (utils.DownloadError) saying where to put the file when the
    download fails.
    """
    cached = os.path.join(keras_models_dir(), COCO_FILE)
    if os.path.isfile(cached):
        return cached
    return utils.download_trained_weights(cached, verbose=1)


def load_coco(model, path=None, verbose=True):
    """Load mask_rcnn_coco.h5 into a MaskRCNN by name, skipping the class-specific layers
    (COCO_EXCLUDE) and leaving layers whose shapes differ in this configuration at their
    initial values (a warning lists them, and the layers the file has nothing for).
    Returns the number of layers loaded."""
    from mrcnn import weights as weights_files
    path = path or coco_weights_path()
    n = weights_files.load_weights(model.keras_model, path, by_name=True, exclude=COCO_EXCLUDE,
                                   skip_mismatched=True)
    if verbose:
        print("COCO weights: %d layers loaded from %s" % (n, path))
    # Starting from COCO is a new run, not a continuation: epoch 0 in a new log dir.
    model.set_log_dir()
    return n


# ----------------------------------------------------------------------------- ImageNet

def _block_letter(block):
    return chr(ord("a") + block - 1)


def keras_resnet_name_map(layer_names):
    """{Keras Applications ResNet layer name: matterport backbone layer name} for the layers
    with weights among `layer_names`."""
    branch = {"0": "1", "1": "2a", "2": "2b", "3": "2c"}
    out = {}
    for name in layer_names:
        if name == "conv1_conv":
            out[name] = "conv1"
        elif name == "conv1_bn":
            out[name] = "bn_conv1"
        else:
            parts = name.split("_")        # conv4_block12_2_bn
            if (len(parts) == 4 and parts[0].startswith("conv") and parts[1].startswith("block")
                    and parts[2] in branch and parts[3] in ("conv", "bn")):
                stage = parts[0][4:]
                letter = _block_letter(int(parts[1][5:]))
                prefix = "res" if parts[3] == "conv" else "bn"
                out[name] = "%s%s%s_branch%s" % (prefix, stage, letter, branch[parts[2]])
    return out


def imagenet_weight_map(app_model, our_epsilon=1e-3):
    """Map a Keras Applications ResNet50/101's weights onto matterport's backbone names.

    app_model: keras.applications.ResNet50 / ResNet101 (include_top=False is enough).
    our_epsilon: the BatchNorm epsilon of our backbone (Keras' default 1e-3).
    Returns {our layer name: [numpy arrays in our layer's weight order]}: conv layers
    [kernel, bias] (conv1's input channels reversed, BGR -> RGB), BatchNorms
    [gamma, beta, moving_mean, moving_variance] with gamma rescaled for the epsilon.
    """
    names = keras_resnet_name_map([layer.name for layer in app_model.layers])
    out = {}
    for layer in app_model.layers:
        if layer.name not in names:
            continue
        arrays = [np.asarray(w) for w in layer.get_weights()]
        if layer.name == "conv1_conv":
            arrays[0] = arrays[0][:, :, ::-1, :].copy()
        if layer.name.endswith("_bn"):
            gamma, beta, mean, var = arrays
            eps = float(layer.epsilon)
            gamma = gamma * np.sqrt(var + our_epsilon) / np.sqrt(var + eps)
            arrays = [gamma.astype(arrays[0].dtype), beta, mean, var]
        out[names[layer.name]] = arrays
    return out


def assign_backbone(keras_model, mapped):
    """Assign mapped arrays ({layer name: arrays}) to the layers of `keras_model` with those
    names (mrcnn.weights.match_layers: the same shape rules as any weights file).

    Raises ValueError naming the layers whose shapes differ, or when no name matches.
    Returns the number of layers assigned.
    """
    from mrcnn.weights import match_layers
    fitting, _, mismatched = match_layers(keras_model, mapped)
    if mismatched:
        raise ValueError("ImageNet weights do not fit %s (another backbone depth?)"
                         % "; ".join("%s: %s" % m for m in mismatched))
    if not fitting:
        raise ValueError("no backbone layer of the model matches the ImageNet ResNet's names")
    for layer, arrays in fitting:
        for v, a in zip(layer.weights, arrays):
            v.assign(a.astype(v.dtype))
    return len(fitting)


def imagenet_app(architecture, weights="imagenet"):
    """Keras Applications' ResNet50/101 without its top (downloads ImageNet weights once).

    Raises WeightsUnavailable saying where to put the file when the download fails.
    """
    import keras
    constructors = {"resnet50": keras.applications.ResNet50,
                    "resnet101": keras.applications.ResNet101}
    if architecture not in constructors:
        raise ValueError("ImageNet weights exist for resnet50 and resnet101, not %r"
                         % (architecture,))
    try:
        return constructors[architecture](include_top=False, weights=weights,
                                          input_shape=(None, None, 3))
    except Exception as e:  # noqa: BLE001 - download errors of many kinds
        if weights != "imagenet":
            raise
        target = os.path.join(keras_models_dir(), IMAGENET_FILES[architecture])
        url = IMAGENET_URL + IMAGENET_FILES[architecture]
        raise WeightsUnavailable(
            "could not get Keras Applications' %s ImageNet weights (%s: %s).\nOffline? Put %s "
            "(from %s) at %s." % (architecture, type(e).__name__, e,
                                  IMAGENET_FILES[architecture], url, target),
            url=url, path=target) from None


def load_imagenet(model, weights="imagenet", verbose=True):
    """Load ImageNet ResNet weights into the backbone of a MaskRCNN. Returns layers set.

    weights: "imagenet" (Keras Applications' download/cache) or the path of a weights file of
    a keras.applications ResNet of the config's depth."""
    architecture = model.config.BACKBONE
    app = imagenet_app(architecture, weights=weights)
    n = assign_backbone(model.keras_model, imagenet_weight_map(app))
    if verbose:
        print("Loaded ImageNet %s weights into %d backbone layers" % (architecture, n))
    return n


def imagenet_weights_file(architecture, weights="imagenet"):
    """The path of a weights file holding Keras Applications' ImageNet ResNet weights under
    the backbone's matterport layer names, written once (atomically) into
    keras_models_dir() as mrcnn_<architecture>_imagenet.h5 in Keras 2's HDF5 layout, so
    that `MaskRCNN.load_weights(path, by_name=True)` loads it like matterport's ImageNet file.
    Raises WeightsUnavailable offline when the Keras Applications file is not cached."""
    from mrcnn import checkpoints
    import h5py
    path = os.path.join(keras_models_dir(), "mrcnn_%s_imagenet.h5" % architecture)
    if os.path.isfile(path):
        return path
    mapped = imagenet_weight_map(imagenet_app(architecture, weights=weights))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with checkpoints.atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, arrays in mapped.items():
                group = f.create_group(name)
                keys = ["%s/%d" % (name, i) for i in range(len(arrays))]
                for key, array in zip(keys, arrays):
                    group.create_dataset(key, data=array)
                group.attrs["weight_names"] = [k.encode() for k in keys]
            f.attrs["layer_names"] = [n.encode() for n in mapped]
    return path


__all__ = ["COCO_URL", "COCO_FILE", "COCO_EXCLUDE", "IMAGENET_FILES", "WeightsUnavailable",
           "keras_models_dir", "coco_weights_path", "load_coco", "keras_resnet_name_map",
           "imagenet_weight_map", "assign_backbone", "imagenet_app", "load_imagenet",
           "imagenet_weights_file"]
