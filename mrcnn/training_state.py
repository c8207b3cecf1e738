"""Training states: everything a run needs to continue exactly where it stopped.

A training state is one HDF5 file in the run folder (name: checkpoints.state_path) holding
    model/      every variable of the training model, trainable or not (BatchNorm moving
                statistics included), in keras_model.weights order;
    optimizer/  every optimizer variable (SGD momentum slots, the loss-scale state under
                mixed precision, ...) in optimizer.variables order;
and, as a JSON attribute, where the run stood: the global step (batches done), the epoch
and the step inside it, the data order's seed, the training stage (layers, learning rate,
target epoch) and the learning-rate schedule's step (the global step: see
training.LearningRateSchedule). Written atomically (checkpoints.atomic_path): a file that
exists is complete; a kill during the write leaves the previous state intact.

The per-epoch weights files (mask_rcnn_<name>_NNNN.weights.h5) stay as they are, for loading
by name; a state is for resuming the same architecture and stage, and is checked for that.
"""

import json
import os

import h5py
import numpy as np

from mrcnn import checkpoints
from mrcnn.errors import MrcnnError

STATE_FORMAT = 1


class TrainingStateError(MrcnnError, ValueError):
    """A training state that cannot be resumed here (unreadable, or another model)."""


def _store(group, variables):
    for i, v in enumerate(variables):
        group.create_dataset(str(i), data=np.asarray(v))
    group.attrs["names"] = json.dumps([v.path for v in variables])


def write_training_state(path, keras_model, optimizer, position):
    """Write a training state atomically. position: JSON-able dict (global_step, epoch,
    step_in_epoch, seed, stage, ...). Returns the file size in bytes."""
    with checkpoints.atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            _store(f.create_group("model"), keras_model.weights)
            _store(f.create_group("optimizer"), optimizer.variables)
            f.attrs["mrcnn_state"] = json.dumps(dict(position, format=STATE_FORMAT))
    return os.path.getsize(path)


def read_position(path):
    """The position a state records (its JSON attribute), or None when the file is not a
    complete, readable state."""
    try:
        with h5py.File(path, "r") as f:
            if "model" not in f or "optimizer" not in f:
                return None
            return json.loads(f.attrs["mrcnn_state"])
    except (OSError, KeyError, ValueError):
        return None


def _load(group, variables, what, path):
    names = json.loads(group.attrs["names"])
    if len(names) != len(variables):
        raise TrainingStateError(
            "%s holds %d %s variables, this model %d: it was written by another architecture "
            "or training stage" % (path, len(names), what, len(variables)))
    arrays = [np.asarray(group[str(i)]) for i in range(len(variables))]
    for name, v, a in zip(names, variables, arrays):
        if tuple(a.shape) != tuple(v.shape):
            raise TrainingStateError("%s: %s variable %s has shape %s, this model's %s has %s"
                                     % (path, what, name, a.shape, v.path, tuple(v.shape)))
    return arrays


def read_model_arrays(path, keras_model):
    """The model variables of a state, checked against keras_model (count and shapes)."""
    with h5py.File(path, "r") as f:
        return _load(f["model"], keras_model.weights, "model", path)


def read_optimizer_arrays(path, optimizer):
    """The optimizer variables of a state, checked against a built optimizer."""
    with h5py.File(path, "r") as f:
        return _load(f["optimizer"], optimizer.variables, "optimizer", path)


def assign(variables, arrays):
    for v, a in zip(variables, arrays):
        v.assign(a.astype(v.dtype))
