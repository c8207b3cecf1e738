"""Weights files: reading them (legacy Keras 2 `.h5` by layer name, Keras 3 `.weights.h5`),
writing them atomically with their layer-name map, and loading them into a model by name.

Conventions: a Keras 3 weights file keys layers by class and position (conv2d_12); files we
write carry an attribute `mrcnn_layer_names` mapping those keys to the layers' real names, so
they load by name into a model of another shape, as matterport's Keras 2 files do. Only
arrays are read: nothing in a file is executed.
"""

import json
import logging
import os
import re

import h5py
import numpy as np

from mrcnn import checkpoints
from mrcnn.errors import MrcnnError

logger = logging.getLogger(__name__)


class WeightsError(MrcnnError, ValueError):
    """A weights file that does not fit the model: missing layers or other shapes."""

    hint = ("Start from other weights (--weights none / coco / imagenet) or skip the layers "
            "with --exclude NAME,NAME.")


def save_weights_atomic(keras_model, path, attrs=None):
    """keras_model.save_weights(path), written under a partial name and renamed into place
    (mrcnn.checkpoints.atomic_path: a kill or power loss leaves the old file or the new one).

    The file is Keras 3's `.weights.h5`, plus an attribute `mrcnn_layer_names` that maps its
    layer keys (Keras names them by class: conv2d_12, ...) to the layers' real names, so it can
    be loaded by name into a model of another shape (by_name=True, exclude=...), and `attrs`
    (for checkpoints: see checkpoints.CHECKPOINT_ATTRS).
    """
    if not path.endswith(checkpoints.CHECKPOINT_SUFFIX):
        raise ValueError("weights files end with %s: %s" % (checkpoints.CHECKPOINT_SUFFIX, path))
    with checkpoints.atomic_path(path) as tmp:
        keras_model.save_weights(tmp)
        names = {key: layer.name for key, layer in native_layer_keys(keras_model).items()}
        with h5py.File(tmp, "a") as f:
            f.attrs["mrcnn_layer_names"] = json.dumps(names)
            for key, value in (attrs or {}).items():
                f.attrs[key] = value


def _snake_case(name):
    """A class name as Keras 3 keys it in a weights file: Conv2DTranspose -> conv2d_transpose.
    (Keras' own helper is private; tests/test_weights.py checks this against a saved file.)"""
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def native_layer_keys(keras_model):
    """{key: layer} for the top-level layers as Keras 3 names them in a `.weights.h5` file:
    the snake-case class name, numbered in the order of keras_model.layers."""
    used, keys = {}, {}
    for layer in keras_model.layers:
        key = _snake_case(layer.__class__.__name__)
        if key in used:
            used[key] += 1
            key = "%s_%d" % (key, used[key])
        else:
            used[key] = 0
        keys[key] = layer
    return keys


# ----------------------------------------------------------------------------- weights files

def read_weights_file(filepath, keras_model=None):
    """Read a weights file into {layer name: [numpy arrays in the layer's weight order]}.

    Reads legacy Keras 2 HDF5 files such as matterport's mask_rcnn_coco.h5 (`layer_names` and
    `weight_names` attributes, possibly under a `model_weights` group) and Keras 3
    `.weights.h5` files (layers/<key>/.../vars/<i>). Keras 3 keys layers by class and position,
    not by name: files written by save_weights_atomic carry the key -> name map; for other
    files the keys of `keras_model` are used, which is right only for the same architecture.
    Only arrays are read: nothing in the file is executed.
    """
    if not os.path.isfile(filepath):
        raise FileNotFoundError("weights file not found: %s" % filepath)
    try:
        f = h5py.File(filepath, "r")
    except OSError as e:
        raise WeightsError("%s is not a readable HDF5 weights file (%s)" % (filepath, e)) from None
    with f:
        if "layer_names" in f.attrs or "model_weights" in f:
            group = f["model_weights"] if "model_weights" in f else f
            return _read_legacy_group(group)
        if "layers" in f:
            if "mrcnn_layer_names" in f.attrs:
                names = json.loads(f.attrs["mrcnn_layer_names"])
            elif keras_model is not None:
                names = {key: layer.name for key, layer in native_layer_keys(keras_model).items()}
            else:
                raise WeightsError("%s is a Keras 3 weights file without layer names; pass the "
                                   "model it belongs to" % filepath)
            return {names.get(key, key): _read_native_vars(f["layers"][key]) for key in f["layers"]}
    raise WeightsError("%s holds no Keras weights (neither a Keras 3 .weights.h5 nor a "
                       "Keras 2 HDF5 file)" % filepath)


def _decode(name):
    return name.decode("utf8") if isinstance(name, bytes) else str(name)


def _read_legacy_group(group):
    weights = {}
    for layer_name in group.attrs["layer_names"]:
        layer_name = _decode(layer_name)
        g = group[layer_name]
        names = [_decode(n) for n in g.attrs.get("weight_names", [])]
        weights[layer_name] = [np.asarray(g[n]) for n in names]
    return weights


def _read_native_vars(group):
    """Arrays of one layer of a Keras 3 weights file, in the order the layer owns them."""
    arrays = []
    if "vars" in group:
        v = group["vars"]
        arrays.extend(np.asarray(v[k]) for k in sorted(v, key=int))
    for key in group:
        if key == "vars":
            continue
        if key == "layers":
            for name in group["layers"]:
                arrays.extend(_read_native_vars(group["layers"][name]))
        elif isinstance(group[key], h5py.Group):
            arrays.extend(_read_native_vars(group[key]))
    return arrays


def weighted_layers(keras_model):
    """Top-level layers that own weights (a nested model such as rpn_model counts as one)."""
    return [layer for layer in keras_model.layers if layer.weights]


# ----------------------------------------------------------------------------- loading

def match_layers(keras_model, stored, exclude=()):
    """Compare a model's weighted layers with the arrays read from a file.

    Returns (fitting, missing, mismatched): fitting [(layer, arrays)] whose arrays have the
    layer's shapes; missing, the names of layers absent from `stored`; mismatched, one
    description per layer whose arrays differ in count, shape or are not numeric.
    Layers named in `exclude` are in none of the three.
    """
    fitting, missing, mismatched = [], [], []
    for layer in weighted_layers(keras_model):
        if layer.name in exclude:
            continue
        if layer.name not in stored:
            missing.append(layer.name)
            continue
        arrays, variables = stored[layer.name], layer.weights
        if any(a.dtype.kind not in "biuf" for a in arrays):
            mismatched.append((layer.name, "file holds non-numeric data %s"
                               % [str(a.dtype) for a in arrays]))
        elif len(arrays) != len(variables) or any(
                tuple(a.shape) != tuple(v.shape) for a, v in zip(arrays, variables)):
            mismatched.append((layer.name, "file %s, model %s" % (
                [tuple(a.shape) for a in arrays], [tuple(v.shape) for v in variables])))
        else:
            fitting.append((layer, arrays))
    return fitting, missing, mismatched


def architecture_differences(filepath, expected):
    """What a checkpoint records of its architecture that differs from `expected`
    ({"mask_head", "backbone", "num_classes"}: the model's), as "key: file X, model Y"
    strings; [] when it records nothing (matterport's files) or agrees."""
    recorded = checkpoints.checkpoint_attrs(filepath)
    return ["%s: file %s, model %s" % (key, recorded[key], value)
            for key, value in sorted((expected or {}).items())
            if key in recorded and str(recorded[key]) != str(value)]


def load_weights(keras_model, filepath, by_name=False, exclude=None, skip_mismatched=False,
                 expected=None):
    """Load a weights file into keras_model; see MaskRCNN.load_weights for the rules.

    skip_mismatched: leave layers whose shapes differ at their values (with a warning)
    instead of raising WeightsError (how COCO weights start a model of another
    configuration). expected: the model's {"mask_head", "backbone", "num_classes"}; a file
    recording other values is reported first. Warns (logging) which of the model's weighted
    layers got nothing from the file. Returns the number of layers loaded.
    """
    exclude = list(exclude or [])
    by_name = by_name or bool(exclude)
    name = os.path.basename(filepath)
    stored = read_weights_file(filepath, keras_model)
    differences = architecture_differences(filepath, expected)
    if differences:
        logger.warning("%s was trained with another architecture than this model (%s): layers "
                       "of the same name but other roles may load, others will not",
                       name, "; ".join(differences))
    fitting, missing, mismatched = match_layers(keras_model, stored, exclude)
    if mismatched and not skip_mismatched:
        raise WeightsError(
            "%s does not fit %d layer(s) of the model: %s. The file was made for another "
            "architecture or NUM_CLASSES; skip those layers with exclude=%r (or start from "
            "--weights none)" % (name, len(mismatched),
                                 "; ".join("%r: %s" % m for m in mismatched),
                                 [n for n, _ in mismatched]))
    if missing and not by_name:
        raise WeightsError(
            "%s has no weights for %d layer(s) of the model (%s%s). Load with by_name=True "
            "to keep their current values" % (name, len(missing), ", ".join(missing[:5]),
                                              ", ..." if len(missing) > 5 else ""))
    if not fitting:
        raise WeightsError("%s shares no layer names with the model: not a Mask R-CNN "
                           "weights file?" % filepath)
    for layer, arrays in fitting:
        for v, a in zip(layer.weights, arrays):
            v.assign(a.astype(v.dtype))
    kept = missing + [n for n, _ in mismatched]
    if kept:
        logger.warning("%s: %d of the model's weighted layers got nothing from the file and "
                       "keep their current (e.g. random) values: %s", name, len(kept),
                       ", ".join(kept))
    logger.info("loaded %d layers from %s (%d excluded)", len(fitting), filepath, len(exclude))
    return len(fitting)

