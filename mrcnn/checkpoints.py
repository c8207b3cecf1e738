"""Run folders, checkpoint names and atomic writes: the one definition every user shares.

A training run writes into `<model_dir>/<name><YYYYmmddTHHMM>/` (name: the config's NAME,
lower case; the time the run started). Its checkpoints are

    mask_rcnn_<name>_<NNNN>.weights.h5     the weights after epoch NNNN (counted from 1)
    mask_rcnn_<name>_<NNNN>.h5             the same, written by matterport's Keras 2 code
    mask_rcnn_<name>_best.weights.h5       the best so far by a metric of evaluation during
                                           training (mrcnn.training.EvaluationCallback)
    training_state_<NNNNNNNNN>.h5          the training state after global step NNNNNNNNN
                                           (mrcnn.training_state: weights, optimizer, position),
                                           every CHECKPOINT_EVERY_STEPS and at each epoch end

and a file being written carries PARTIAL_MARK before its suffix
(`mask_rcnn_<name>_0003.tmp.weights.h5`): it is renamed into place once complete, so a file
without the mark is never half-written by us, and every lister here ignores marked files.

Each of our checkpoints records, as HDF5 attributes, the epoch and the architecture it was
trained with (CHECKPOINT_ATTRS); `checkpoint_attrs` reads them without reading any array. The
best checkpoint has no epoch in its name: list_checkpoints / find_last never return it; it
records its epoch, and the metric and value it was kept for (`best_checkpoint_path`,
`find_best`).

`atomic_path` / `atomic_open` are the one atomic-write helper: checkpoints, run records,
submission and detection CSVs and export configs are all written through them (the data and
the rename are fsynced, so a kill or a power loss leaves either the old file or the new one).
"""

import contextlib
import datetime
import os
import re

CHECKPOINT_SUFFIX = ".weights.h5"
LEGACY_SUFFIX = ".h5"
PARTIAL_MARK = ".tmp"
CHECKPOINT_PREFIX = "mask_rcnn_"
STATE_PREFIX = "training_state_"

# HDF5 attribute names of a checkpoint -> the keys checkpoint_attrs returns.
CHECKPOINT_ATTRS = {
    "mrcnn_epoch": "epoch",
    "mrcnn_mask_head": "mask_head",
    "mrcnn_backbone": "backbone",
    "mrcnn_num_classes": "num_classes",
    # The best checkpoint only: the metric it is the best of (config.EVAL_METRICS), its value.
    "mrcnn_best_metric": "best_metric",
    "mrcnn_best_value": "best_value",
}
# The tag of the best checkpoint's name, in place of the epoch.
BEST_TAG = "best"

_RUN_STAMP = "%Y%m%dT%H%M"
# .../<name><YYYYmmddTHHMM>/mask_rcnn_<name>_<NNNN>.weights.h5 (or .h5): groups 1-5 the
# run's start time, 6 the epoch.
_CHECKPOINT_PATH = re.compile(
    r".*[/\\][\w-]+(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})[/\\]"
    + re.escape(CHECKPOINT_PREFIX) + r"[\w-]+?(\d{4})\.(weights\.)?h5$")
# .../<name><YYYYmmddTHHMM>/mask_rcnn_<name>_best.weights.h5: groups 1-5 the run's start.
_BEST_PATH = re.compile(
    r".*[/\\][\w-]+(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})[/\\]" + re.escape(CHECKPOINT_PREFIX)
    + r"[\w-]+_" + BEST_TAG + re.escape(CHECKPOINT_SUFFIX) + "$")
# A complete checkpoint file name (no partial mark): group 1 the epoch.
_STATE_FILE = re.compile(re.escape(STATE_PREFIX) + r"(\d{9})" + re.escape(LEGACY_SUFFIX))
_CHECKPOINT_FILE = re.compile(re.escape(CHECKPOINT_PREFIX) + r"[\w-]*?(\d{4})\.(?:weights\.)?h5")


# ----------------------------------------------------------------------------- names

def run_name(name):
    """The run-folder prefix of a config NAME: lower case, "mask_rcnn" when empty."""
    return (name or "mask_rcnn").lower()


def run_dir(model_dir, name, started=None):
    """The folder of a run of `name` started at `started` (a datetime; default now)."""
    started = started or datetime.datetime.now()
    return os.path.join(model_dir, run_name(name) + started.strftime(_RUN_STAMP))


def checkpoint_template(log_dir, name):
    """The path template of a run's checkpoints, with an `{epoch:04d}` field."""
    return os.path.join(log_dir, "%s%s_{epoch:04d}%s" % (CHECKPOINT_PREFIX, run_name(name),
                                                         CHECKPOINT_SUFFIX))


def checkpoint_path(log_dir, name, epoch):
    """The path of the checkpoint of `epoch` (counted from 1) in a run folder."""
    return checkpoint_template(log_dir, name).format(epoch=int(epoch))


def best_checkpoint_path(log_dir, name):
    """The path of the best checkpoint of a run folder, mask_rcnn_<name>_best.weights.h5
    (written by mrcnn.training.EvaluationCallback with keep_best)."""
    return os.path.join(log_dir, "%s%s_%s%s" % (CHECKPOINT_PREFIX, run_name(name), BEST_TAG,
                                                 CHECKPOINT_SUFFIX))


def is_best_checkpoint(filename):
    """True for the name of a (complete) best checkpoint."""
    base = os.path.basename(filename)
    return base.startswith(CHECKPOINT_PREFIX) and base.endswith(
        "_" + BEST_TAG + CHECKPOINT_SUFFIX)


def parse_checkpoint_path(path):
    """(run start datetime, epoch) of a checkpoint path inside a run folder (ours or
    matterport's .h5), or None for any other path. For a best checkpoint the epoch is the one
    it records (None when it records none or cannot be read)."""
    m = _CHECKPOINT_PATH.match(str(path))
    if m:
        return datetime.datetime(*map(int, m.groups()[:5])), int(m.group(6))
    m = _BEST_PATH.match(str(path))
    epoch = checkpoint_attrs(path).get("epoch") if m else None
    if epoch is None:
        return None
    return datetime.datetime(*map(int, m.groups()[:5])), int(epoch)


def checkpoint_epoch(filename):
    """The epoch of a complete checkpoint file name (ours or matterport's), or None for a
    partial file or any other name."""
    m = _CHECKPOINT_FILE.fullmatch(os.path.basename(filename))
    return int(m.group(1)) if m else None


def partial_path(path):
    """The name a file is written under before it is renamed to `path`: the partial mark
    before `.weights.h5` (Keras insists on that suffix), else appended."""
    if path.endswith(CHECKPOINT_SUFFIX):
        return path[:-len(CHECKPOINT_SUFFIX)] + PARTIAL_MARK + CHECKPOINT_SUFFIX
    return path + PARTIAL_MARK


def is_partial(filename):
    """True for the name of a checkpoint or training state whose write did not finish."""
    base = os.path.basename(filename)
    return base.startswith((CHECKPOINT_PREFIX, STATE_PREFIX)) and (
        base.endswith(PARTIAL_MARK + CHECKPOINT_SUFFIX) or base.endswith(PARTIAL_MARK))


# ----------------------------------------------------------------------------- training states

def state_path(log_dir, global_step):
    """The path of the training state after `global_step` steps of a run (see
    mrcnn.training_state): training_state_<NNNNNNNNN>.h5 in its run folder."""
    return os.path.join(log_dir, "%s%09d%s" % (STATE_PREFIX, int(global_step), LEGACY_SUFFIX))


def state_step(filename):
    """The global step of a complete training state's file name, or None."""
    m = _STATE_FILE.fullmatch(os.path.basename(filename))
    return int(m.group(1)) if m else None


def list_states(log_dir):
    """The complete (not partial) training states of a run folder, oldest step first."""
    if not log_dir or not os.path.isdir(log_dir):
        return []
    found = sorted((state_step(f), f) for f in os.listdir(log_dir) if state_step(f) is not None)
    return [os.path.join(log_dir, f) for _, f in found]


def find_last_state(model_dir, name):
    """The newest training state of the newest run of `name` that has one; FileNotFoundError
    when no run has one."""
    for folder in reversed(run_dirs(model_dir, name)):
        states = list_states(folder)
        if states:
            return states[-1]
    raise FileNotFoundError("no training state of %r in %s" % (run_name(name),
                                                              os.path.abspath(model_dir)))


def prune_states(log_dir, keep):
    """Delete all but the `keep` newest training states of a run folder. Returns the
    removed paths."""
    states = list_states(log_dir)
    removed = states[:-keep] if keep > 0 else []
    for path in removed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    return removed


# ----------------------------------------------------------------------------- listing

def run_dirs(model_dir, name):
    """The run folders of `name` in model_dir, oldest first. Folder names must be exactly
    <name><YYYYmmddTHHMM>: runs of "fashion" do not include runs of "fashion_demo"."""
    pattern = re.compile(re.escape(run_name(name)) + r"\d{8}T\d{4}")
    if not os.path.isdir(model_dir):
        return []
    return [os.path.join(model_dir, d) for d in sorted(os.listdir(model_dir))
            if pattern.fullmatch(d) and os.path.isdir(os.path.join(model_dir, d))]


def list_checkpoints(log_dir):
    """The complete checkpoints of one run folder, by epoch (oldest first); at equal epochs
    our .weights.h5 comes after matterport's .h5."""
    if not log_dir or not os.path.isdir(log_dir):
        return []
    found = [(checkpoint_epoch(f), f.endswith(CHECKPOINT_SUFFIX), f)
             for f in os.listdir(log_dir)]
    return [os.path.join(log_dir, f) for epoch, _, f in sorted(x for x in found
                                                                 if x[0] is not None)]


def all_checkpoints(model_dir, name):
    """Every complete checkpoint of `name` under model_dir, newest run and epoch first."""
    found = []
    for folder in reversed(run_dirs(model_dir, name)):
        found += list(reversed(list_checkpoints(folder)))
    return found


def find_last(model_dir, name):
    """Path of the last checkpoint of the newest run of `name` (a config's NAME) under
    model_dir. Partial files are ignored; a run folder without checkpoints is passed over.
    Raises FileNotFoundError saying where it looked."""
    for folder in reversed(run_dirs(model_dir, name)):
        checkpoints = list_checkpoints(folder)
        if checkpoints:
            return checkpoints[-1]
    raise FileNotFoundError("no checkpoint of %r in %s: train first, or give a weights file"
                            % (run_name(name), os.path.abspath(model_dir)))


def find_best(model_dir, name):
    """Path of the best checkpoint of the newest run of `name` under model_dir that kept one
    (best_checkpoint_path). Raises FileNotFoundError saying where it looked."""
    for folder in reversed(run_dirs(model_dir, name)):
        path = best_checkpoint_path(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError("no best checkpoint of %r in %s: train with evaluation keeping "
                            "the best (EVAL_KEEP_BEST, fashion.py train --eval-every N "
                            "--keep-best METRIC), or give a weights file"
                            % (run_name(name), os.path.abspath(model_dir)))


def is_readable(path):
    """True if `path` opens as HDF5 and holds Keras weights (no arrays are read)."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            return "layers" in f or "model_weights" in f or "layer_names" in f.attrs
    except (OSError, ValueError):
        return False


def last_good_checkpoint(model_dir, name, warn=None):
    """find_last(model_dir, name), passing over checkpoints of that run that do not open.

    A kill never leaves such a file (they are written under a partial name and renamed), but
    a power loss or a full disk can: `warn(message)` is told, and the epoch before is used.
    """
    last = find_last(model_dir, name)
    for candidate in reversed(list_checkpoints(os.path.dirname(last))):
        if is_readable(candidate):
            return candidate
        if warn is not None:
            warn("checkpoint %s is not a readable weights file (cut short by a power loss or "
                 "a full disk?); using the one before it" % candidate)
    raise FileNotFoundError("no readable checkpoint in %s" % os.path.dirname(last))


def remove_partial_checkpoints(log_dir):
    """Delete checkpoints whose write was killed (partial names) from a run folder; one
    training process per run folder is assumed. Returns the removed names."""
    removed = []
    if log_dir and os.path.isdir(log_dir):
        for name in sorted(os.listdir(log_dir)):
            if is_partial(name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(log_dir, name))
                    removed.append(name)
    return removed


def checkpoint_attributes(**values):
    """The HDF5 attributes recording `values` (keys of CHECKPOINT_ATTRS' values: epoch,
    mask_head, backbone, num_classes; best_metric, best_value) in a checkpoint: the inverse
    of checkpoint_attrs."""
    names = {key: attr for attr, key in CHECKPOINT_ATTRS.items()}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError("checkpoints do not record %s (only %s)"
                         % (", ".join(unknown), ", ".join(sorted(names))))
    return {names[key]: value for key, value in values.items()}


def checkpoint_attrs(path):
    """What a checkpoint records of itself: {"epoch", "mask_head", "backbone",
    "num_classes"}, and for a best checkpoint {"best_metric", "best_value"} (keys it does not
    record are absent; {} for a matterport .h5 or an unreadable file). Reads attributes
    only."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            stored = dict(f.attrs)
    except (OSError, ValueError):
        return {}
    out = {}
    for attr, key in CHECKPOINT_ATTRS.items():
        if attr in stored:
            value = stored[attr]
            value = value.decode("utf8") if isinstance(value, bytes) else value
            out[key] = value.item() if hasattr(value, "item") else value
    return out


# ----------------------------------------------------------------------------- atomic writes

def _fsync_dir(folder):
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield the partial name to write `path` under; on success it is fsynced and renamed
    into place (and the rename fsynced), on an exception removed. The previous `path`, if
    any, stays intact until the rename."""
    tmp = partial_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """open(path, mode) through atomic_path: readers see the old file or the whole new one."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def write_json_atomic(path, data, indent=1):
    """json.dump(data) to path atomically."""
    import json
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent)
