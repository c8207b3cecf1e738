"""The learning-rate schedule: values at given global steps (worked by hand), and one
schedule across matterport's staged train() calls and across a resumed run."""

import keras
import numpy as np
import pytest

from synthetic import shapes_config, shapes_dataset

from mrcnn.config import ConfigError
from mrcnn.model import MaskRCNN
from mrcnn.training import LearningRateSchedule


def rates(schedule, steps):
    return [float(schedule(s)) for s in steps]


def test_warmup_then_step_decay_by_hand():
    # base 0.02; warm-up over 10 steps from 0.1 x; x0.1 at global steps 30 and 50.
    s = LearningRateSchedule(0.02, warmup_steps=10, warmup_factor=0.1, decay="step",
                             decay_steps=(30, 50), decay_factor=0.1)
    np.testing.assert_allclose(
        rates(s, [0, 5, 9, 10, 29, 30, 49, 50, 1000]),
        [0.002, 0.02 * (0.1 + 0.9 * 0.5), 0.02 * (0.1 + 0.9 * 0.9), 0.02, 0.02, 0.002, 0.002,
         0.0002, 0.0002], rtol=1e-5)


def test_cosine_decay_by_hand_and_start_step():
    s = LearningRateSchedule(0.01, decay="cosine", total_steps=100)
    np.testing.assert_allclose(rates(s, [0, 25, 50, 100, 150]),
                               [0.01, 0.01 * (1 + np.sqrt(0.5)) / 2, 0.005, 0.0, 0.0],
                               rtol=1e-5, atol=1e-9)
    # A call that starts at global step 50 (epoch 5 x 10 steps) continues the same curve.
    later = LearningRateSchedule(0.01, start_step=50, decay="cosine", total_steps=100)
    np.testing.assert_allclose(rates(later, [0, 50]), rates(s, [50, 100]), rtol=1e-6,
                               atol=1e-9)
    restored = LearningRateSchedule(**later.get_config())
    assert rates(restored, [7]) == rates(later, [7])


def test_config_checks_the_schedule():
    with pytest.raises(ConfigError, match="LR_TOTAL_STEPS"):
        shapes_config(LR_DECAY="cosine")
    with pytest.raises(ConfigError, match="LR_DECAY must be one of"):
        shapes_config(LR_DECAY="linear")


class RateRecorder(keras.callbacks.Callback):
    """The rate each step uses, and the loss tracker's count after each step."""

    def __init__(self):
        super().__init__()
        self.rates, self.counts = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(self.model.optimizer.learning_rate))

    def on_train_batch_end(self, batch, logs=None):
        self.counts.append(int(self.model.total_tracker.count))


@pytest.mark.slow
def test_one_schedule_across_staged_train_calls_and_a_resume(tmp_path):
    """Warm-up over 3 global steps then x0.1 at step 5, 2 steps per epoch: stage 1 (lr 0.01)
    to epoch 2, stage 2 (lr 0.004) to epoch 3, then a new model resumed from the epoch-3
    checkpoint to epoch 4. The rates follow the global step, never restarting with a call;
    each epoch's losses average that epoch's steps only."""
    keras.utils.set_random_seed(0)
    config = shapes_config(STEPS_PER_EPOCH=2, VALIDATION_STEPS=1, LR_WARMUP_STEPS=3,
                           LR_WARMUP_FACTOR=0.25, LR_DECAY="step", LR_DECAY_STEPS=(5,))
    train, val = shapes_dataset(4, seed=1), shapes_dataset(2, seed=2)
    model = MaskRCNN("training", config, str(tmp_path))
    rec = RateRecorder()
    history1 = model.train(train, val, learning_rate=0.01, epochs=2, layers="heads",
                           custom_callbacks=[rec])
    history2 = model.train(train, val, learning_rate=0.004, epochs=3, layers="all",
                           custom_callbacks=[rec])
    assert len(history1.history["loss"]) == 2 and len(history2.history["loss"]) == 1
    resumed = MaskRCNN("training", config, str(tmp_path))
    resumed.load_weights(model.find_last(), by_name=True)
    assert resumed.epoch == 3
    resumed.train(train, val, learning_rate=0.004, epochs=4, layers="all",
                  custom_callbacks=[rec])

    def f(g):   # the schedule's factor at global step g, by hand
        warm = 0.25 + 0.75 * g / 3 if g < 3 else 1.0
        return warm * (0.1 if g >= 5 else 1.0)

    expected = [0.01 * f(0), 0.01 * f(1), 0.01 * f(2), 0.01 * f(3),   # stage 1: epochs 1-2
                0.004 * f(4), 0.004 * f(5),                           # stage 2: epoch 3
                0.004 * f(6), 0.004 * f(7)]                           # resumed: epoch 4
    np.testing.assert_allclose(rec.rates, expected, rtol=1e-5)
    # The loss trackers restart every epoch, in every call: 1, 2 updates per epoch.
    assert rec.counts == [1, 2] * 4
    # The rate each step used is logged with the losses (per step to TensorBoard).
    np.testing.assert_allclose(history1.history["learning_rate"], [0.01 * f(1), 0.01 * f(3)],
                               rtol=1e-5)


def test_fashion_cosine_decays_to_the_end_of_the_schedule():
    """fashion.py train: a cosine decay ends with the schedule (last stage's epoch x
    STEPS_PER_EPOCH), whatever epochs are asked for, unless --set gives LR_TOTAL_STEPS."""
    from samples.fashion import configs
    config = configs.make_config(demo=True, overrides=["LR_DECAY=cosine", "LR_TOTAL_STEPS=100"])
    stages = configs.schedule(config, False, (8, 0, 0))
    assert configs.fit_cosine_horizon(config, stages) == 8 * config.STEPS_PER_EPOCH
    assert config.LR_TOTAL_STEPS == 8 * config.STEPS_PER_EPOCH
    assert configs.fit_cosine_horizon(config, stages) is None           # already there
    given = ["LR_DECAY=cosine", "LR_TOTAL_STEPS=100"]
    config = configs.make_config(demo=True, overrides=given)
    assert configs.fit_cosine_horizon(config, stages, given) is None
    assert config.LR_TOTAL_STEPS == 100
    config = configs.make_config(demo=True, overrides=["LR_DECAY=step", "LR_DECAY_STEPS=(5,)"])
    assert configs.fit_cosine_horizon(config, stages) is None
