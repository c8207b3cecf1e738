"""Training: the training model and its train_step, the training callbacks, layer stages.

- MaskRCNNTrainingModel: the training graph as a keras.Model whose train_step reduces the
  losses' (sum, count) pairs over every replica, adds weight decay once and clips the
  global gradient (see its docstring).
- NaNGuard, AtomicCheckpoint: stop at a non-finite loss; checkpoint every epoch atomically.
- EvaluationCallback: COCO AP and the iMaterialist metric every N epochs on a fixed
  validation subset (history, TensorBoard, the best checkpoint); config.EVAL_*.
- LearningRateSchedule: warm-up and step / cosine decay as a function of the global step.
- LAYER_REGEX: matterport's training stages ("heads", "3+", "4+", "5+", "all").
- The training graph's row counts (mask_roi_count, largest_positive_count).

MaskRCNN.train (mrcnn.model) puts these together.
"""

import contextlib
import copy
import math
import os
import re
import sys
import tempfile
import time
import weakref

import keras
import numpy as np
import tensorflow as tf

from mrcnn import checkpoints
from mrcnn.config import ATTRIBUTE_LOSS, EVAL_METRICS
from mrcnn.distribute import is_multi_worker, worker_info
from mrcnn.errors import MrcnnError
from mrcnn.weights import match_layers, save_weights_atomic, weighted_layers

# The five losses, in the order the training model outputs them.
LOSS_NAMES = ("rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss", "mrcnn_bbox_loss",
              "mrcnn_mask_loss")
# Their (sum, count) pairs, output just before them (see mrcnn.losses).
LOSS_TERM_NAMES = tuple(name + "_terms" for name in LOSS_NAMES)


def loss_names(config):
    """The losses of config's training model, in output order: LOSS_NAMES, then
    "mrcnn_attribute_loss" when config.NUM_ATTRIBUTES > 0."""
    return LOSS_NAMES + ((ATTRIBUTE_LOSS,) if getattr(config, "NUM_ATTRIBUTES", 0) else ())


def loss_term_names(config):
    """The names of loss_names(config)'s (sum, count) outputs."""
    return tuple(name + "_terms" for name in loss_names(config))

# Layer-name regexes of matterport's training stages.
LAYER_REGEX = {
    # All layers but the backbone.
    "heads": r"(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    # From a ResNet stage and up.
    "3+": r"(res3.*)|(bn3.*)|(res4.*)|(bn4.*)|(res5.*)|(bn5.*)|(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "4+": r"(res4.*)|(bn4.*)|(res5.*)|(bn5.*)|(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "5+": r"(res5.*)|(bn5.*)|(mrcnn\_.*)|(rpn\_.*)|(fpn\_.*)",
    "all": ".*",
}



# ----------------------------------------------------------------------------- training model

def _size(variable):
    """The number of elements of a variable (a Python float: its shape is static)."""
    return float(np.prod(variable.shape))


def clip_by_norm(gradient, clip):
    """gradient * clip / max(||gradient||, clip): tf.clip_by_norm's value, in two passes over
    the tensor instead of four (its norm by one L2Loss kernel)."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.clip_by_norm(gradient, clip)
    norm = tf.sqrt(2.0 * tf.nn.l2_loss(gradient))
    return gradient * (clip / tf.maximum(norm, clip))


class MaskRCNNTrainingModel(keras.Model):
    """The training graph as a functional model with its own train_step / test_step.

    Its last ten outputs are the (sum, count) pairs of the five losses (LOSS_TERM_NAMES, each
    float32 [2]) and then the losses themselves (LOSS_NAMES, float32 scalars, sum / count);
    twelve with the attribute loss (NUM_ATTRIBUTES > 0: loss_names(config), six of each).

    train_step computes the step of the global batch whatever the distribution strategy:
    - Losses: each is a masked mean over the global batch. Every replica divides its own
      sums by the counts all-reduced over all replicas (and workers), so the replicas'
      gradients add up to the gradient of the global-batch loss even when replicas hold
      different numbers of anchors or positive ROIs. The logged losses are the global ones.
    - The total weights them by config.LOSS_WEIGHTS and adds matterport's L2 weight decay
      (WEIGHT_DECAY * sum(w^2) / size(w) over trainable weights that are not BatchNorm's gamma
      or beta). Its gradient, 2 WEIGHT_DECAY w / size(w), is added to the all-reduced
      gradient directly (once, before the clip) rather than differentiated through the loss:
      the same update, without the backward pass of the term over every weight.
    - Gradients are all-reduced here, then clipped to GRADIENT_CLIP_NORM (per weight, as
      Keras' clipnorm): the clip applies to the global gradient. (Keras 3 optimizers clip each
      replica's gradient before their own all-reduce, which is another update; the optimizer
      is therefore built without clipnorm and receives gradient / replicas, which its own
      all-reduce sums back to the global gradient: one extra all-reduce per step, only when
      there is more than one replica.)
    - Mixed precision: the loss is scaled by the LossScaleOptimizer's scale and the clip norm
      with it; the optimizer unscales, and skips the step (lowering the scale) when the
      gradient is not finite, on every replica alike since all hold the same gradient.
    """

    def __init__(self, inputs, outputs, config, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.config = config
        self.loss_names = loss_names(config)
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in self.loss_names}
        self.total_tracker = keras.metrics.Mean(name="loss")
        self.decay_variables = []

    @property
    def metrics(self):
        return [self.total_tracker] + list(self.loss_trackers.values())

    def select_decay_variables(self):
        """Fix the weights under L2 decay: trainable, and not BatchNorm's gamma or beta."""
        self.decay_variables = [v for v in self.trainable_variables
                                if not re.search(r"(gamma|beta)(:\d+)?$", v.path)]

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras peeks at the first batch of fit() and averages it over the replicas
        # (strategy.reduce), which fails for MultiWorkerMirroredStrategy's values; it only
        # serves to build the model and the optimizer, which MaskRCNN.compile() has done.
        if self.built and self.optimizer is not None and self.optimizer.built:
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _global_losses(self, inputs, training):
        """Forward pass of this replica's images.

        Returns (local, losses): local [5] this replica's share of each global-batch loss
        (its sums divided by the global counts: the shares of all replicas add up to the
        losses), and losses [5] the global-batch losses (no gradient).
        """
        outputs = self(inputs, training=training)
        n = len(self.loss_names)
        terms = tf.stack([tf.reshape(tf.cast(t, tf.float32), [2])
                          for t in outputs[-2 * n:-n]])                   # [5, (sum, count)]
        global_terms = tf.stop_gradient(terms)
        if tf.distribute.get_strategy().num_replicas_in_sync > 1:
            global_terms = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, global_terms)
        counts = global_terms[:, 1]
        local = tf.math.divide_no_nan(terms[:, 0], counts)               # [5]
        losses = tf.math.divide_no_nan(global_terms[:, 0], counts)       # [5]
        return local, losses

    def _weighted(self, losses):
        """sum of LOSS_WEIGHTS[name] * losses[i]."""
        weights = tf.constant([float(self.config.LOSS_WEIGHTS[name])
                               for name in self.loss_names])
        return tf.reduce_sum(weights * losses)

    def _weight_decay(self):
        """matterport's L2 term: WEIGHT_DECAY * sum over decay_variables of sum(w^2) / size(w)."""
        if not self.decay_variables or not self.config.WEIGHT_DECAY:
            return tf.constant(0.0)
        # l2_loss(w) = sum(w^2) / 2 in one pass.
        terms = [tf.nn.l2_loss(tf.cast(v, tf.float32)) * (2.0 / _size(v))
                 for v in self.decay_variables]
        return self.config.WEIGHT_DECAY * tf.add_n(terms)

    def _with_decay_gradients(self, grads, variables, scale):
        """grads (a list aligned with variables, None where a variable has none) plus the
        gradient of _weight_decay() times `scale` (the loss scale): 2 WEIGHT_DECAY w / size(w)
        for each decay variable."""
        if not self.decay_variables or not self.config.WEIGHT_DECAY:
            return grads
        decayed = {id(v) for v in self.decay_variables}
        out = []
        for g, v in zip(grads, variables):
            if id(v) in decayed:
                step = (2.0 * self.config.WEIGHT_DECAY / _size(v)) * scale * tf.cast(v, tf.float32)
                g = step if g is None else g + tf.cast(step, g.dtype)
            out.append(g)
        return out

    def _loss_scale(self):
        """The factor optimizer.scale_loss multiplies by (1 without mixed precision)."""
        return tf.cast(self.optimizer.scale_loss(tf.constant(1.0)), tf.float32)

    def _logs(self, losses, total, learning_rate=None):
        for i, name in enumerate(self.loss_names):
            self.loss_trackers[name].update_state(losses[i])
        self.total_tracker.update_state(total)
        logs = {m.name: m.result() for m in self.metrics}
        if learning_rate is not None:
            logs["learning_rate"] = learning_rate
        if is_multi_worker(tf.distribute.get_strategy()):
            # Keras averages the logs of MultiWorkerMirroredStrategy replicas with
            # strategy.reduce(..., axis=0), which needs a dimension: give the (equal) values one.
            logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    def train_step(self, data):
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            local, losses = self._global_losses(inputs, training=True)
            # This replica's share of the global losses: summed over replicas, the losses.
            scaled = self.optimizer.scale_loss(self._weighted(local))
        grads = tape.gradient(scaled, variables)
        if replicas > 1:
            present = [i for i, g in enumerate(grads) if g is not None]
            reduced = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
            for i, g in zip(present, reduced):
                grads[i] = g
        loss_scale = self._loss_scale()
        grads = self._with_decay_gradients(grads, variables, loss_scale)
        decay = self._weight_decay()
        present = [i for i, g in enumerate(grads) if g is not None]
        reduced = [grads[i] for i in present]
        clip = self.config.GRADIENT_CLIP_NORM
        if clip:
            norm = clip * loss_scale
            reduced = [clip_by_norm(g, norm) for g in reduced]
        if replicas > 1:
            # The optimizer sums the replicas' gradients again: hand it 1 / replicas each.
            reduced = [g / replicas for g in reduced]
        for i, g in zip(present, reduced):
            grads[i] = g
        # The rate this step uses (a schedule's value at the optimizer's step, before apply).
        learning_rate = tf.cast(self.optimizer.learning_rate, tf.float32)
        self.optimizer.apply(grads, variables)
        return self._logs(losses, self._weighted(losses) + decay, learning_rate)

    def test_step(self, data):
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        _, losses = self._global_losses(inputs, training=False)
        return self._logs(losses, self._weighted(losses) + self._weight_decay())


# ----------------------------------------------------------------------------- optimizer

@keras.saving.register_keras_serializable(package="mrcnn")
class MomentumSGD(keras.optimizers.SGD):
    """keras.optimizers.SGD whose momentum update is TensorFlow's fused kernel.

    The same update as SGD's (m = momentum m - rate g; w = w + m) and the same variables (so
    training states and Keras' own SGD load into each other), in one pass over each weight
    (ResourceApplyKerasMomentum) instead of five element-wise operations. Nesterov or no
    momentum: SGD's own update.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.momentum == 0 or self.nesterov or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        m = self.momentums[self._get_variable_index(variable)]
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(m),
            lr=tf.cast(learning_rate, variable.dtype), grad=tf.cast(gradient, variable.dtype),
            momentum=tf.cast(self.momentum, variable.dtype))


def _handle(variable):
    """The resource handle of a Keras or TensorFlow variable."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


# ----------------------------------------------------------------------------- schedule

@keras.saving.register_keras_serializable(package="mrcnn")
class LearningRateSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """base_rate x factor(global step): linear warm-up, then step or cosine decay.

    The optimizer counts its own steps from 0 at every train() call (each compiles a new
    one); the global step is start_step (the epoch train() starts from x STEPS_PER_EPOCH)
    plus that count, so staged train() calls and resumed runs continue one schedule.
    factor(g) = warm-up (g < warmup_steps: warmup_factor + (1 - warmup_factor) g /
    warmup_steps, else 1) x decay ("none": 1; "step": decay_factor ** (number of
    decay_steps <= g); "cosine": (1 + cos(pi min(g, total_steps) / total_steps)) / 2).
    """

    def __init__(self, base_rate, start_step=0, warmup_steps=0, warmup_factor=0.001,
                 decay="none", decay_steps=(), decay_factor=0.1, total_steps=0):
        self.base_rate = float(base_rate)
        self.start_step = int(start_step)
        self.warmup_steps = int(warmup_steps)
        self.warmup_factor = float(warmup_factor)
        self.decay = str(decay)
        self.decay_steps = [int(s) for s in decay_steps]
        self.decay_factor = float(decay_factor)
        self.total_steps = int(total_steps)

    @classmethod
    def from_training_config(cls, config, base_rate, start_step):
        """The schedule of a Config's LR_* settings for one train() call."""
        return cls(base_rate, start_step, warmup_steps=config.LR_WARMUP_STEPS,
                   warmup_factor=config.LR_WARMUP_FACTOR, decay=config.LR_DECAY,
                   decay_steps=config.LR_DECAY_STEPS, decay_factor=config.LR_DECAY_FACTOR,
                   total_steps=config.LR_TOTAL_STEPS)

    def factor(self, global_step):
        """The multiplier of base_rate at a global step (float32 tensor)."""
        g = tf.cast(global_step, tf.float32)
        f = tf.constant(1.0)
        if self.warmup_steps > 0:
            ramp = self.warmup_factor + (1.0 - self.warmup_factor) * g / self.warmup_steps
            f = tf.where(g < self.warmup_steps, ramp, 1.0)
        if self.decay == "step" and self.decay_steps:
            passed = tf.reduce_sum(tf.cast(g >= tf.constant(self.decay_steps, tf.float32),
                                           tf.float32))
            f = f * tf.pow(self.decay_factor, passed)
        elif self.decay == "cosine":
            progress = tf.minimum(g, float(self.total_steps)) / float(self.total_steps)
            f = f * 0.5 * (1.0 + tf.cos(math.pi * progress))
        return f

    def __call__(self, step):
        return self.base_rate * self.factor(self.start_step + tf.cast(step, tf.int64))

    def get_config(self):
        return {"base_rate": self.base_rate, "start_step": self.start_step,
                "warmup_steps": self.warmup_steps, "warmup_factor": self.warmup_factor,
                "decay": self.decay, "decay_steps": list(self.decay_steps),
                "decay_factor": self.decay_factor, "total_steps": self.total_steps}


# ----------------------------------------------------------------------------- callbacks

class TrainingDivergedError(MrcnnError, RuntimeError):
    """A loss became NaN or infinite; the message names the step and the last good checkpoint."""

    hint = ("Resume with: fashion.py train --weights last and a lower --heads-lr / "
            "--stage4-lr / --all-lr (plus your other options).")


class NaNGuard(keras.callbacks.Callback):
    """Stop training at the first step whose loss is NaN or infinite.

    Records where (`failure`: epoch and step counted from 1, the non-finite losses) and stops
    the fit; the checkpoint of that epoch is then not written (see AtomicCheckpoint), so the
    last checkpoint on disk stays the last good one.
    """

    def __init__(self, steps_per_epoch):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.failure = None
        self._epoch = 0
        # Steps of the first epoch done before this fit (a run resumed inside an epoch).
        self.first_epoch, self.offset = None, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if "loss" not in logs or math.isfinite(float(logs["loss"])) or self.failure:
            return
        step = batch + 1 + (self.offset if self._epoch == self.first_epoch else 0)
        self.failure = {
            "epoch": self._epoch + 1, "step": step,
            "global_step": self._epoch * self.steps_per_epoch + step,
            "losses": sorted(k for k, v in logs.items() if not math.isfinite(float(v))),
        }
        self.model.stop_training = True


class AtomicCheckpoint(keras.callbacks.Callback):
    """Save the weights at the end of every epoch, atomically.

    The file is written under a partial name in the same folder and renamed into place
    (mrcnn.checkpoints.atomic_path), so a crash during the write never leaves a truncated
    checkpoint where find_last() looks. `path_template` has an `{epoch:04d}` field; epochs
    are counted from 1, as in the file names of matterport (the file of epoch 3 is the state
    after three epochs). Each file records its epoch and `architecture` ({"mask_head",
    "backbone", "num_classes"}) as HDF5 attributes (checkpoints.CHECKPOINT_ATTRS). Nothing is
    saved after `guard` (a NaNGuard) has seen a non-finite loss.
    """

    def __init__(self, path_template, guard=None, architecture=None):
        super().__init__()
        self.path_template = path_template
        self.guard = guard
        self.architecture = dict(architecture or {})

    def on_epoch_end(self, epoch, logs=None):
        if self.guard is not None and self.guard.failure:
            return
        path = self.path_template.format(epoch=epoch + 1)
        save_weights_atomic(self.model, path, attrs=checkpoints.checkpoint_attributes(
            epoch=epoch + 1, **self.architecture))



class TrainingStateCheckpoint(keras.callbacks.Callback):
    """Write the training state (mrcnn.training_state) every `every_steps` global steps and at
    every epoch end (after the epoch's weights file), and keep the `keep` newest.

    position: what train() records besides the counters (seed, stage); global_step: the
    global step this fit starts at. Nothing is written after `guard` (a NaNGuard) has seen a
    non-finite loss, so the newest state is always from before a divergence. `log_dir`: the
    run folder (None: write nothing, e.g. on a worker that is not the chief).
    """

    def __init__(self, log_dir, steps_per_epoch, every_steps, keep, global_step, position,
                 guard=None):
        super().__init__()
        self.log_dir = log_dir
        self.steps_per_epoch = int(steps_per_epoch)
        self.every_steps = int(every_steps or 0)
        self.keep = int(keep)
        self.global_step = int(global_step)
        self.position = dict(position)
        self.guard = guard
        self.written = []            # (global step, seconds, bytes) of each write

    def _write(self):
        if self.log_dir is None or (self.guard is not None and self.guard.failure):
            return
        import time
        from mrcnn import training_state
        start = time.perf_counter()
        epoch, in_epoch = divmod(self.global_step, self.steps_per_epoch)
        path = checkpoints.state_path(self.log_dir, self.global_step)
        try:
            size = training_state.write_training_state(
                path, self.model, self.model.optimizer, dict(
                    self.position, global_step=self.global_step, epoch=epoch,
                    step_in_epoch=in_epoch, steps_per_epoch=self.steps_per_epoch))
        except OSError as e:
            states = checkpoints.list_states(self.log_dir)
            raise training_state.TrainingStateError(
                "could not write the training state %s (%s: %s; a full disk?). Training "
                "stopped; %s. Free space, then resume with --weights last (train() after "
                "set_log_dir)." % (path, type(e).__name__, e,
                                   "the previous state %s is intact" % states[-1] if states
                                   else "no earlier state exists")) from e
        self.written.append((self.global_step, time.perf_counter() - start, size))
        checkpoints.prune_states(self.log_dir, self.keep)

    def on_train_batch_end(self, batch, logs=None):
        self.global_step += 1
        at_epoch_end = self.global_step % self.steps_per_epoch == 0
        if self.every_steps and self.global_step % self.every_steps == 0 and not at_epoch_end:
            self._write()

    def on_epoch_end(self, epoch, logs=None):
        self._write()


def merge_histories(history, part):
    """One keras History of consecutive fit() calls (a resumed epoch, then the others)."""
    if history is None:
        return part
    for key, values in part.history.items():
        history.history.setdefault(key, []).extend(values)
    history.epoch.extend(part.epoch)
    return history


def positive_rois_per_image(config):
    """The most positive ROIs DetectionTargetLayer samples per image (they come first)."""
    return max(1, int(config.TRAIN_ROIS_PER_IMAGE * config.ROI_POSITIVE_RATIO))


def mask_roi_count(target_class_ids, config):
    """How many leading sampled ROIs the training mask head runs on: with TRAIN_BN, all of
    them (its BatchNorm statistics depend on the ROIs); otherwise the largest number of
    positive ROIs (class id > 0) of an image in the batch, at least 1 (the head never gets an
    empty batch) and at most positive_rois_per_image(config)."""
    if config.TRAIN_BN:
        return tf.shape(target_class_ids)[1]
    return largest_positive_count(target_class_ids, cap=positive_rois_per_image(config))


def largest_positive_count(class_ids, cap=None):
    """The largest number of rows with a class id > 0 of an image in class_ids [batch, rows]
    (the sampled ROIs in training, the detections at inference: both put those rows first),
    at least 1 (a mask head never gets an empty batch) and at most `cap` when given."""
    counts = tf.reduce_sum(tf.cast(class_ids > 0, tf.int32), axis=1)
    count = tf.maximum(tf.reduce_max(counts), 1)
    return count if cap is None else tf.minimum(count, cap)


# ----------------------------------------------------------------------------- evaluation

# History / log keys of the metrics: "val_" + a name of EVAL_METRICS (val_segm_AP, ...).
EVAL_LOG_PREFIX = "val_"
# The run's log-dir sub-folder of the evaluation's TensorBoard scalars and images.
EVAL_TENSORBOARD_DIR = "evaluation"
# The TensorBoard image tag of the drawn detections.
EVAL_IMAGE_TAG = "val_detections"
# Inference models evaluating a training MaskRCNN: {training model: (config key, model)}.
_INFERENCE_TWINS = weakref.WeakKeyDictionary()


def evaluation_metrics(dataset, image_ids, detections, coco_gt=None):
    """{name: value} of config.EVAL_METRICS for `detections` of `image_ids`: COCO AP and
    AP@0.5 of the masks (segm_AP, segm_AP50) and boxes (bbox_AP, bbox_AP50), pycocotools'
    numbers (-1 when the images hold no ground truth), and the iMaterialist 2019 metric
    (competition); see mrcnn.evaluate. coco_gt: the images' ground truth, when built already."""
    from mrcnn import evaluate
    stats = evaluate.evaluate_coco(dataset, image_ids, detections, verbose=False,
                                   coco_gt=coco_gt)
    return {"segm_AP": stats["segm"]["AP"], "segm_AP50": stats["segm"]["AP50"],
            "bbox_AP": stats["bbox"]["AP"], "bbox_AP50": stats["bbox"]["AP50"],
            "competition": evaluate.competition_metric(dataset, image_ids, detections)}


def inference_config(config):
    """A copy of a training configuration with the inference settings: one image at a time
    on one device (GPU_COUNT = IMAGES_PER_GPU = 1)."""
    return copy.deepcopy(config).override({"GPU_COUNT": 1, "IMAGES_PER_GPU": 1})


@contextlib.contextmanager
def _single_process():
    """Hide TF_CONFIG for the block: a model built in it uses the default strategy, not the
    MultiWorkerMirroredStrategy of the cluster (whose variables the other workers would have
    to create too)."""
    saved = os.environ.pop("TF_CONFIG", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TF_CONFIG"] = saved


def inference_twin(model):
    """The inference MaskRCNN evaluating the training MaskRCNN `model`: built on first use
    (and again if model.config changes) with inference_config(model.config), on one device of
    this process, with a model_dir of its own that it never writes (no run folder appears).
    Its weights are whatever copy_weights last put there."""
    from mrcnn.model import MaskRCNN
    key = repr(sorted(model.config.to_dict().items()))
    cached = _INFERENCE_TWINS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    with _single_process():
        twin = MaskRCNN("inference", inference_config(model.config),
                        model_dir=os.path.join(tempfile.gettempdir(), "mrcnn-evaluation"))
    _INFERENCE_TWINS[model] = (key, twin)
    return twin


def copy_weights(source, target):
    """Assign every weighted layer of the Keras model `target` the weights of the layer of
    the same name in `source` (the training model's layers into the inference model's, as a
    checkpoint loads by name). Raises RuntimeError if a layer of `target` has no counterpart
    of the same shapes. Returns the number of layers copied."""
    stored = {layer.name: layer.get_weights() for layer in weighted_layers(source)}
    fitting, missing, mismatched = match_layers(target, stored)
    if missing or mismatched:
        raise RuntimeError("the inference model's layers do not match the training model's: "
                           "missing %s, other shapes %s" % (missing, mismatched))
    for layer, arrays in fitting:
        for variable, array in zip(layer.weights, arrays):
            variable.assign(array)
    return len(fitting)


def draw_detections(image, result, class_names, max_side=512):
    """An RGB uint8 picture of MaskRCNN.detect's `result` on `image`: masks blended in their
    class's colour, boxes and "class score" captions, shrunk so that its longer side is at
    most max_side pixels."""
    import cv2
    from mrcnn import visualize
    picture = np.asarray(image, np.float32)
    if picture.ndim == 2:
        picture = np.stack([picture] * 3, axis=-1)
    picture = picture[..., :3].copy()
    colours = visualize.random_colors(max(len(class_names), 1), seed=0)
    class_ids = np.asarray(result["class_ids"]).reshape(-1)
    masks = np.asarray(result["masks"])
    for i, class_id in enumerate(class_ids):
        visualize.apply_mask(picture, masks[:, :, i], colours[int(class_id) % len(colours)],
                             alpha=0.4)
    picture = np.clip(picture, 0, 255).astype(np.uint8)
    h, w = picture.shape[:2]
    scale = min(1.0, max_side / float(max(h, w)))
    if scale < 1:
        picture = cv2.resize(picture, (max(1, round(w * scale)), max(1, round(h * scale))),
                             interpolation=cv2.INTER_AREA)
    rois = np.asarray(result["rois"], np.float64).reshape(-1, 4) * scale
    scores = np.asarray(result["scores"]).reshape(-1)
    for box, class_id, score in zip(rois.round().astype(int), class_ids, scores):
        colour = tuple(int(255 * c) for c in colours[int(class_id) % len(colours)])
        visualize.draw_box(picture, np.maximum(box, 0), colour)
        name = class_names[int(class_id)] if int(class_id) < len(class_names) else str(class_id)
        cv2.putText(picture, "%s %.2f" % (name, score), (int(box[1]) + 3, int(box[0]) + 12),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    return picture


def _same_size(pictures):
    """The pictures padded with black at the bottom and right to the largest height and
    width: one [count, H, W, 3] uint8 batch."""
    h = max(p.shape[0] for p in pictures)
    w = max(p.shape[1] for p in pictures)
    batch = np.zeros((len(pictures), h, w, 3), np.uint8)
    for k, p in enumerate(pictures):
        batch[k, :p.shape[0], :p.shape[1]] = p
    return batch


class EvaluationCallback(keras.callbacks.Callback):
    """Evaluate the model being trained every `every` epochs on a fixed validation subset.

        model.train(train_dataset, val_dataset, ..., custom_callbacks=[
            EvaluationCallback(model, val_dataset, every=1, limit=50, keep_best="segm_AP")])

    (or set config.EVAL_EVERY_EPOCHS: MaskRCNN.train then adds one by itself.)

    model: the training MaskRCNN; dataset: the validation Dataset. After epochs every,
    2 x every, ... (counted from 1 over the whole run, so a resumed run keeps the rhythm) it
    copies the training model's weights by layer name into an inference MaskRCNN of the same
    configuration (inference_twin: built once; one image at a time), detects the first
    `limit` images of `dataset` (in the order of dataset.image_ids; 0: all) and computes
    evaluation_metrics: segm_AP, segm_AP50, bbox_AP, bbox_AP50, competition. They go to
    - the epoch's logs as val_segm_AP, ... (`history`, the progress bar's epoch line, and any
      callback after this one, e.g. EarlyStopping(monitor="val_segm_AP", mode="max"));
    - one printed line per evaluation (verbose);
    - TensorBoard scalars of the same names in <log_dir>/evaluation, with an image
      (EVAL_IMAGE_TAG) of the detections on the first `images` images of the subset; the step
      is Keras' epoch index, as in its epoch_loss (the state after epoch step + 1);
    - keep_best (a name of EVAL_METRICS): the checkpoint with the highest value so far is
      kept as mask_rcnn_<name>_best.weights.h5 in the run folder
      (checkpoints.best_checkpoint_path), written atomically, recording its epoch, the metric
      and the value (checkpoints.CHECKPOINT_ATTRS). A value replaces the best only if it is
      higher; a run that resumes starts from the value its best checkpoint records.
    every, limit, keep_best default to config.EVAL_EVERY_EPOCHS (or 1), EVAL_LIMIT and
    EVAL_KEEP_BEST (keep_best=False: none). Under a MultiWorkerMirroredStrategy only the
    chief evaluates and writes. Nothing is evaluated after an epoch whose loss is not finite.
    `evaluations` lists the results: {"epoch": counted from 1, name: value, ...}.
    """

    def __init__(self, model, dataset, every=None, limit=None, keep_best=None, images=3,
                 verbose=True):
        super().__init__()
        config = model.config
        self.maskrcnn = model
        self.dataset = dataset
        self.every = int(every if every is not None else (config.EVAL_EVERY_EPOCHS or 1))
        self.limit = int(limit if limit is not None else config.EVAL_LIMIT)
        self.keep_best = (config.EVAL_KEEP_BEST if keep_best is None else keep_best) or None
        if self.every < 1 or self.limit < 0:
            raise ValueError("EvaluationCallback: every must be >= 1 and limit >= 0 (0: all "
                             "images), not %r and %r" % (every, limit))
        if self.keep_best is not None and self.keep_best not in EVAL_METRICS:
            raise ValueError("EvaluationCallback: keep_best must be one of %s, not %r"
                             % (", ".join(EVAL_METRICS), self.keep_best))
        ids = [int(i) for i in dataset.image_ids]
        self.image_ids = ids[:self.limit] if self.limit else ids
        if not self.image_ids:
            raise ValueError("EvaluationCallback: the validation dataset has no images")
        self.images = max(0, int(images))
        self.verbose = verbose
        self.best = None            # {"path", "value", "epoch"} of the best checkpoint
        self.evaluations = []
        self._coco_gt = None
        self._writer = None
        self._writer_dir = None

    # ------------------------------------------------------------------ Keras hooks

    def on_train_begin(self, logs=None):
        if self.keep_best and self._is_chief():
            self._read_best()

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every or not self._is_chief():
            return
        if logs and "loss" in logs and not math.isfinite(float(logs["loss"])):
            return                  # NaNGuard stops the run: nothing to evaluate
        start = time.time()
        metrics, detections = self.evaluate()
        if logs is not None:
            logs.update({EVAL_LOG_PREFIX + k: v for k, v in metrics.items()})
        kept = self._keep(epoch + 1, metrics)
        self._summaries(epoch, metrics, detections)
        self.evaluations.append(dict(metrics, epoch=epoch + 1))
        if self.verbose:
            self._report(epoch + 1, metrics, kept, time.time() - start)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = self._writer_dir = None

    # ------------------------------------------------------------------ evaluation

    def evaluate(self):
        """(metrics, detections) of the training model's current weights on the subset."""
        from mrcnn import evaluate
        twin = inference_twin(self.maskrcnn)
        copy_weights(self.maskrcnn.keras_model, twin.keras_model)
        detections = evaluate.run_detections(twin, self.dataset, self.image_ids, verbose=False)
        if self._coco_gt is None:
            self._coco_gt = evaluate.build_coco_gt(self.dataset, self.image_ids)
        metrics = evaluation_metrics(self.dataset, self.image_ids, detections,
                                     coco_gt=self._coco_gt)
        return {k: float(v) for k, v in metrics.items()}, detections

    def _is_chief(self):
        return worker_info(self.maskrcnn.strategy)[2]

    # ------------------------------------------------------------------ best checkpoint

    def best_path(self):
        """The best checkpoint's path in the current run folder."""
        return checkpoints.best_checkpoint_path(self.maskrcnn.log_dir, self.maskrcnn.config.NAME)

    def _read_best(self):
        """Start from what the run's best checkpoint records, when it is of this metric."""
        path = self.best_path()
        if self.best is not None and self.best["path"] == path:
            return
        self.best = None
        recorded = checkpoints.checkpoint_attrs(path) if os.path.isfile(path) else {}
        if recorded.get("best_metric") == self.keep_best and "best_value" in recorded:
            self.best = {"path": path, "value": float(recorded["best_value"]),
                         "epoch": int(recorded.get("epoch", 0))}
        elif recorded and self.verbose:
            print("Note: %s is the best by %s; the best by %s will replace it"
                  % (path, recorded.get("best_metric"), self.keep_best), flush=True)

    def _keep(self, epoch, metrics):
        """Write the best checkpoint if metrics[keep_best] beats it. Returns True if written."""
        if not self.keep_best:
            return False
        value = metrics.get(self.keep_best)
        path = self.best_path()
        if self.best is not None and self.best["path"] != path:
            self._read_best()               # another run folder since the last evaluation
        if value is None or not math.isfinite(value) or (
                self.best is not None and value <= self.best["value"]):
            return False
        attrs = checkpoints.checkpoint_attributes(
            epoch=epoch, best_metric=self.keep_best, best_value=float(value),
            **self.maskrcnn.architecture())
        save_weights_atomic(self.maskrcnn.keras_model, path, attrs=attrs)
        self.best = {"path": path, "value": float(value), "epoch": epoch}
        return True

    # ------------------------------------------------------------------ output

    def _summaries(self, epoch, metrics, detections):
        folder = os.path.join(self.maskrcnn.log_dir, EVAL_TENSORBOARD_DIR)
        if self._writer_dir != folder:
            self.on_train_end()
            self._writer = tf.summary.create_file_writer(folder)
            self._writer_dir = folder
        with self._writer.as_default():
            for name, value in metrics.items():
                tf.summary.scalar(EVAL_LOG_PREFIX + name, value, step=epoch)
            count = min(self.images, len(self.image_ids))
            if count:
                names = self.dataset.class_names
                pictures = [draw_detections(self.dataset.load_image(image_id), r, names)
                            for image_id, r in zip(self.image_ids[:count], detections)]
                tf.summary.image(EVAL_IMAGE_TAG, _same_size(pictures), step=epoch,
                                 max_outputs=count,
                                 description="detections after epoch %d on the first %d "
                                             "validation images" % (epoch + 1, count))
        self._writer.flush()

    def _report(self, epoch, metrics, kept, seconds):
        line = "Evaluation after epoch %d (%d validation images, %.1f s): %s" % (
            epoch, len(self.image_ids), seconds,
            " - ".join("%s%s: %.4f" % (EVAL_LOG_PREFIX, k, v) for k, v in metrics.items()))
        if kept:
            line += "; best %s, kept in %s" % (self.keep_best, os.path.basename(self.best["path"]))
        elif self.best is not None:
            line += "; best %s %.4f (epoch %d)" % (self.keep_best, self.best["value"],
                                                   self.best["epoch"])
        # On a terminal Keras' progress bar has not ended its line yet.
        start = "\n" if _is_terminal(sys.stdout) else ""
        print(start + line, flush=True)


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def evaluation_callbacks(model, val_dataset, custom_callbacks=()):
    """What MaskRCNN.train adds for config.EVAL_EVERY_EPOCHS: [EvaluationCallback(model,
    val_dataset)] with the config's EVAL_* settings, or [] when it is 0 or custom_callbacks
    holds an EvaluationCallback already."""
    if not model.config.EVAL_EVERY_EPOCHS or any(
            isinstance(c, EvaluationCallback) for c in custom_callbacks or ()):
        return []
    return [EvaluationCallback(model, val_dataset)]
