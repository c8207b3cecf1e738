"""Training: the training model and its train_step, the training callbacks, layer stages.

- MaskRCNNTrainingModel: the training graph as a keras.Model whose train_step reduces the
  losses' (sum, count) pairs over every replica, adds weight decay once and clips the
  global gradient (see its docstring).
- NaNGuard, AtomicCheckpoint: stop at a non-finite loss; checkpoint every epoch atomically.
- LearningRateSchedule: warm-up and step / cosine decay as a function of the global step.
- LAYER_REGEX: matterport's training stages ("heads", "3+", "4+", "5+", "all").
- The training graph's row counts (mask_roi_count, largest_positive_count).

MaskRCNN.train (mrcnn.model) puts these together.
"""

import math
import re

import keras
import tensorflow as tf

from mrcnn import checkpoints
from mrcnn.distribute import is_multi_worker
from mrcnn.errors import MrcnnError
from mrcnn.weights import save_weights_atomic

# The five losses, in the order the training model outputs them.
LOSS_NAMES = ("rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss", "mrcnn_bbox_loss",
              "mrcnn_mask_loss")
# Their (sum, count) pairs, output just before them (see mrcnn.losses).
LOSS_TERM_NAMES = tuple(name + "_terms" for name in LOSS_NAMES)

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

class MaskRCNNTrainingModel(keras.Model):
    """The training graph as a functional model with its own train_step / test_step.

    Its last ten outputs are the (sum, count) pairs of the five losses (LOSS_TERM_NAMES, each
    float32 [2]) and then the losses themselves (LOSS_NAMES, float32 scalars, sum / count).

    train_step computes the step of the global batch whatever the distribution strategy:
    - Losses: each is a masked mean over the global batch. Every replica divides its own
      sums by the counts all-reduced over all replicas (and workers), so the replicas'
      gradients add up to the gradient of the global-batch loss even when replicas hold
      different numbers of anchors or positive ROIs. The logged losses are the global ones.
    - The total weights them by config.LOSS_WEIGHTS and adds matterport's L2 weight decay
      (WEIGHT_DECAY * sum(w^2) / size(w) over trainable weights that are not BatchNorm's gamma
      or beta), counted once: each replica adds 1 / replicas of it.
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
        self.loss_trackers = {name: keras.metrics.Mean(name=name) for name in LOSS_NAMES}
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
        n = len(LOSS_NAMES)
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
        weights = tf.constant([float(self.config.LOSS_WEIGHTS[name]) for name in LOSS_NAMES])
        return tf.reduce_sum(weights * losses)

    def _weight_decay(self):
        if not self.decay_variables or not self.config.WEIGHT_DECAY:
            return tf.constant(0.0)
        terms = [tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) / tf.cast(tf.size(v), tf.float32)
                 for v in self.decay_variables]
        return self.config.WEIGHT_DECAY * tf.add_n(terms)

    def _loss_scale(self):
        """The factor optimizer.scale_loss multiplies by (1 without mixed precision)."""
        return tf.cast(self.optimizer.scale_loss(tf.constant(1.0)), tf.float32)

    def _logs(self, losses, total, learning_rate=None):
        for i, name in enumerate(LOSS_NAMES):
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
            decay = self._weight_decay()
            # This replica's share of the global total: summed over replicas, the total.
            share = self._weighted(local) + decay / replicas
            scaled = self.optimizer.scale_loss(share)
        grads = tape.gradient(scaled, variables)
        present = [i for i, g in enumerate(grads) if g is not None]
        reduced = [grads[i] for i in present]
        if replicas > 1:
            reduced = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, reduced)
        clip = self.config.GRADIENT_CLIP_NORM
        if clip:
            norm = clip * self._loss_scale()
            reduced = [tf.clip_by_norm(g, norm) for g in reduced]
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

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if "loss" not in logs or math.isfinite(float(logs["loss"])) or self.failure:
            return
        self.failure = {
            "epoch": self._epoch + 1, "step": batch + 1,
            "global_step": self._epoch * self.steps_per_epoch + batch + 1,
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

