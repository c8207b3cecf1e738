"""Config: matterport's attributes and defaults, derived values, overriding from strings."""

import numpy as np
import pytest

from mrcnn.config import Config, ConfigError

MATTERPORT_DEFAULTS = {
    "NAME": None, "GPU_COUNT": 1, "IMAGES_PER_GPU": 2, "STEPS_PER_EPOCH": 1000,
    "VALIDATION_STEPS": 50, "BACKBONE": "resnet101", "COMPUTE_BACKBONE_SHAPE": None,
    "BACKBONE_STRIDES": [4, 8, 16, 32, 64], "FPN_CLASSIF_FC_LAYERS_SIZE": 1024,
    "TOP_DOWN_PYRAMID_SIZE": 256, "NUM_CLASSES": 1, "RPN_ANCHOR_SCALES": (32, 64, 128, 256, 512),
    "RPN_ANCHOR_RATIOS": [0.5, 1, 2], "RPN_ANCHOR_STRIDE": 1, "RPN_NMS_THRESHOLD": 0.7,
    "RPN_TRAIN_ANCHORS_PER_IMAGE": 256, "PRE_NMS_LIMIT": 6000, "POST_NMS_ROIS_TRAINING": 2000,
    "POST_NMS_ROIS_INFERENCE": 1000, "USE_MINI_MASK": True, "MINI_MASK_SHAPE": (56, 56),
    "IMAGE_RESIZE_MODE": "square", "IMAGE_MIN_DIM": 800, "IMAGE_MAX_DIM": 1024,
    "IMAGE_MIN_SCALE": 0, "IMAGE_CHANNEL_COUNT": 3, "TRAIN_ROIS_PER_IMAGE": 200,
    "ROI_POSITIVE_RATIO": 0.33, "POOL_SIZE": 7, "MASK_POOL_SIZE": 14, "MASK_SHAPE": [28, 28],
    "MAX_GT_INSTANCES": 100, "DETECTION_MAX_INSTANCES": 100, "DETECTION_MIN_CONFIDENCE": 0.7,
    "DETECTION_NMS_THRESHOLD": 0.3, "LEARNING_RATE": 0.001, "LEARNING_MOMENTUM": 0.9,
    "WEIGHT_DECAY": 0.0001, "USE_RPN_ROIS": True, "TRAIN_BN": False, "GRADIENT_CLIP_NORM": 5.0,
    "MASK_HEAD": "fcn", "MIXED_PRECISION": False,
}


def test_matterport_defaults():
    config = Config()
    for name, value in MATTERPORT_DEFAULTS.items():
        assert getattr(config, name) == value, name
    np.testing.assert_allclose(config.MEAN_PIXEL, [123.7, 116.8, 103.9])
    np.testing.assert_allclose(config.RPN_BBOX_STD_DEV, [0.1, 0.1, 0.2, 0.2])
    np.testing.assert_allclose(config.BBOX_STD_DEV, [0.1, 0.1, 0.2, 0.2])
    assert set(config.LOSS_WEIGHTS) == {"rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss",
                                        "mrcnn_bbox_loss", "mrcnn_mask_loss"}


def test_derived_attributes():
    class Small(Config):
        NUM_CLASSES = 47
        IMAGES_PER_GPU = 3
        GPU_COUNT = 2
        IMAGE_MAX_DIM = 512

    config = Small()
    assert config.BATCH_SIZE == 6
    assert list(config.IMAGE_SHAPE) == [512, 512, 3]
    assert config.IMAGE_META_SIZE == 1 + 3 + 3 + 4 + 1 + 47
    config.override(["IMAGE_RESIZE_MODE='crop'", "IMAGE_MIN_DIM=256"])
    assert list(config.IMAGE_SHAPE) == [256, 256, 3]


def test_override_from_strings():
    config = Config().override([
        "IMAGE_MAX_DIM=512", "RPN_ANCHOR_SCALES=(16,32,64,128,256)", "NAME=fashion",
        "LEARNING_RATE=1", "USE_MINI_MASK=False", "MEAN_PIXEL=[1, 2, 3]",
        "LOSS_WEIGHTS={'mrcnn_mask_loss': 2.0}", "MASK_HEAD=unet"])
    assert config.IMAGE_MAX_DIM == 512 and list(config.IMAGE_SHAPE) == [512, 512, 3]
    assert config.RPN_ANCHOR_SCALES == (16, 32, 64, 128, 256)
    assert config.NAME == "fashion"
    assert config.LEARNING_RATE == 1.0 and isinstance(config.LEARNING_RATE, float)
    assert config.USE_MINI_MASK is False
    np.testing.assert_array_equal(config.MEAN_PIXEL, [1, 2, 3])
    assert config.LOSS_WEIGHTS["mrcnn_mask_loss"] == 2.0
    assert config.LOSS_WEIGHTS["rpn_class_loss"] == 1.0
    assert config.MASK_HEAD == "unet"


def test_an_option_off_by_default_can_be_set_off_again():
    """A subclass that turns on an option whose default is None (PIXEL_STD, EVAL_KEEP_BEST)
    takes None back, from a string or a value (a run recorded with the option off loads into
    it); an attribute with a real default still refuses None."""
    class On(Config):
        PIXEL_STD = (58.4, 57.1, 57.4)
        EVAL_EVERY_EPOCHS = 1
        EVAL_KEEP_BEST = "segm_AP"

    config = On().override(["PIXEL_STD=None"]).override({"EVAL_KEEP_BEST": None})
    assert config.PIXEL_STD is None and config.EVAL_KEEP_BEST is None
    assert On().override({"PIXEL_STD": [1, 2, 3]}).PIXEL_STD == (1, 2, 3)
    with pytest.raises(ConfigError, match="LEARNING_RATE must be a number"):
        On().override({"LEARNING_RATE": None})


@pytest.mark.parametrize("assignment, message", [
    ("IMAGE_MAX_DIMS=512", "unknown configuration attribute 'IMAGE_MAX_DIMS'"),
    ("IMAGE_MAX_DIM=big", "IMAGE_MAX_DIM"),
    ("IMAGE_MAX_DIM=5.5", "IMAGE_MAX_DIM must be an integer"),
    ("USE_MINI_MASK=1", "USE_MINI_MASK must be True or False"),
    ("MEAN_PIXEL=[1, 2]", "MEAN_PIXEL must be a sequence of 3 numbers"),
    ("LOSS_WEIGHTS={'mask': 1}", "LOSS_WEIGHTS has no key(s) mask"),
    ("BATCH_SIZE=4", "BATCH_SIZE is derived"),
    ("MASK_HEAD=unet2", "MASK_HEAD must be one of fcn, unet"),
    ("IMAGE_MAX_DIM=500", "multiple of 64"),
    ("MIXED_PRECISION=float8", "MIXED_PRECISION must be False, True, 'float16' or 'bfloat16'"),
    ("MIXED_PRECISION=1", "MIXED_PRECISION must be False, True"),
    ("no_equals_sign", "expected NAME=VALUE"),
])
def test_override_rejects_bad_values(assignment, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        Config().override([assignment])


@pytest.mark.parametrize("value, policy", [
    ("False", "float32"), ("True", "mixed_float16"), ("float16", "mixed_float16"),
    ("'float16'", "mixed_float16"), ("bfloat16", "mixed_bfloat16")])
def test_mixed_precision_values_and_policies(value, policy, monkeypatch):
    # On a GPU (True falls back without one: tests/test_precision.py).
    from mrcnn import config as config_module
    monkeypatch.setattr(config_module, "gpu_available", lambda: True)
    assert Config().override(["MIXED_PRECISION=" + value]).precision_policy == policy


def test_to_dict_and_display(capsys):
    config = Config()
    values = config.to_dict()
    for name in MATTERPORT_DEFAULTS:
        assert name in values
    for name in ("BATCH_SIZE", "IMAGE_SHAPE", "IMAGE_META_SIZE"):
        assert name in values
    assert not any(name.startswith("_") or not name.isupper() for name in values)
    config.display()
    out = capsys.readouterr().out
    assert "IMAGE_META_SIZE" in out and "MASK_HEAD" in out


def test_failed_override_changes_nothing():
    config = Config()
    with pytest.raises(ConfigError):
        config.override(["IMAGE_MAX_DIM=512", "MASK_HEAD=nope"])
    assert config.IMAGE_MAX_DIM == 1024 and config.MASK_HEAD == "fcn"
    assert list(config.IMAGE_SHAPE) == [1024, 1024, 3]
