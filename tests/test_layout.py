"""The package layout: one home per concern, and what must keep working across it.

- every name `mrcnn.model` exported before the split still imports from it;
- the mask-head and backbone registries: one definition of the names, a third head is a
  few lines, and config / build pick it up;
- the image-meta layout: one table; numpy, graph and the export composer agree;
- the private Keras APIs we still use: a loud failure here if Keras changes them.
"""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

from mrcnn import backbone, config as config_module, heads, image_meta, layers
from mrcnn.config import Config, ConfigError

# Every public name mrcnn.model exported before the split into training / distribute /
# weights / checkpoints (read from the module at commit 0b4a2c8).
MODEL_NAMES = [
    "AnchorsLayer", "AtomicCheckpoint", "BatchNorm", "CHECKPOINT_SUFFIX", "Config",
    "ConfigError", "DetectionLayer", "DetectionTargetLayer", "LAYER_REGEX", "LOSS_NAMES",
    "LOSS_TERM_NAMES", "MASK_HEADS", "MaskRCNN", "MaskRCNNTrainingModel", "NaNGuard",
    "ProposalLayer", "PyramidROIAlign", "TrainingDivergedError", "WeightsError",
    "apply_box_deltas_graph", "build_backbone", "build_fpn_mask_graph", "build_mask_head",
    "build_rpn_model", "build_rpn_targets", "build_unet_mask_graph", "clip_boxes_graph",
    "cluster_from_tf_config", "compose_image_meta", "compute_anchors", "compute_backbone_shapes",
    "conv_block", "find_last", "fpn_classifier_graph", "fpn_graph", "identity_block",
    "largest_positive_count", "load_image_gt", "log", "make_strategy", "mask_roi_count",
    "masked_mean", "mold_image", "mrcnn_bbox_loss_graph", "mrcnn_bbox_loss_sum_count",
    "mrcnn_class_loss_graph", "mrcnn_class_loss_sum_count", "mrcnn_mask_loss_graph",
    "mrcnn_mask_loss_sum_count", "native_layer_keys", "norm_boxes_graph", "overlaps_graph",
    "parse_image_meta", "parse_image_meta_graph", "positive_rois_per_image",
    "read_weights_file", "resnet_graph", "rpn_bbox_loss_graph", "rpn_bbox_loss_sum_count",
    "rpn_class_loss_graph", "rpn_class_loss_sum_count", "rpn_graph", "save_weights_atomic",
    "smooth_l1_loss", "trim_zeros_graph", "unmold_image", "utils", "worker_info",
]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_module_keeps_every_name_it_exported(name):
    from mrcnn import model
    assert hasattr(model, name), name


def test_model_module_holds_maskrcnn_and_reexports_only():
    """The classes and functions defined in mrcnn/model.py itself: MaskRCNN and the Trunk it
    builds; everything else is imported from the module of its concern."""
    from mrcnn import model
    own = sorted(n for n, v in vars(model).items()
                 if (inspect.isclass(v) or inspect.isfunction(v))
                 and v.__module__ == "mrcnn.model")
    assert own == ["MaskRCNN", "Trunk"]


def test_user_errors_share_one_base_class():
    from mrcnn import data, errors, export, utils, weights, training
    for cls in (ConfigError, utils.RLEError, utils.MaskError, utils.ImageLoadError,
                data.SampleLoadError, export.ExportError, weights.WeightsError,
                training.TrainingDivergedError):
        assert issubclass(cls, errors.MrcnnError), cls
    # ...and still the built-in exceptions they always were.
    assert issubclass(weights.WeightsError, ValueError)
    assert issubclass(utils.ImageLoadError, IOError)
    assert weights.WeightsError.hint and training.TrainingDivergedError.hint


# ----------------------------------------------------------------------------- registries

class TinyConfig(Config):
    NAME = "tiny"
    BACKBONE = "resnet50"
    NUM_CLASSES = 3
    MASK_POOL_SIZE = 4
    MASK_SHAPE = [8, 8]


def test_mask_head_names_are_defined_once_by_the_registry():
    assert set(heads.MASK_HEADS) == {"fcn", "unet"}
    assert not hasattr(config_module, "MASK_HEAD_NAMES")
    with pytest.raises(ConfigError, match="MASK_HEAD must be one of fcn, unet"):
        TinyConfig().override({"MASK_HEAD": "nope"})


def test_a_third_mask_head_is_a_few_lines_and_config_and_build_pick_it_up():
    def build_tiny_mask_graph(rois, feature_maps, image_meta, pool_size, num_classes,
                              train_bn=True):
        x = layers.PyramidROIAlign([pool_size, pool_size], name="roi_align_tiny")(
            [rois, image_meta] + feature_maps)
        x = heads.TimeDistributed(keras.layers.Conv2DTranspose(
            num_classes, 2, strides=2, activation="sigmoid", dtype="float32"),
            dtype="float32", name="mrcnn_mask")(x)
        return x

    heads.register_mask_head("tiny_test")(build_tiny_mask_graph)
    try:
        config = TinyConfig().override({"MASK_HEAD": "tiny_test"})
        rois = keras.Input([None, 4])
        meta = keras.Input([config.IMAGE_META_SIZE])
        maps = [keras.Input([s, s, 8]) for s in (32, 16, 8, 4)]
        out = heads.build_mask_head(config, rois, maps, meta, train_bn=False)
        assert tuple(out.shape[2:]) == (8, 8, 3)
        with pytest.raises(ValueError, match="registered already"):
            heads.register_mask_head("tiny_test")(lambda *a, **k: None)
    finally:
        del heads.MASK_HEADS["tiny_test"]


def test_backbone_names_come_from_the_registry():
    assert set(backbone.BACKBONES) == {"resnet50", "resnet101"}
    with pytest.raises(ConfigError, match="BACKBONE must be one of resnet101, resnet50"):
        TinyConfig().override({"BACKBONE": "resnet18"})

    def toy_backbone(input_image, stage5=True, train_bn=True):
        x = input_image
        outs = []
        for i in range(5):
            x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="toy_c%d" % i)(x)
            outs.append(x)
        return outs

    backbone.register_backbone("toy_test")(toy_backbone)
    try:
        config = TinyConfig().override({"BACKBONE": "toy_test"})
        c = backbone.build_backbone(keras.Input([64, 64, 3]), config)
        assert [int(t.shape[1]) for t in c] == [32, 16, 8, 4, 2]
    finally:
        del backbone.BACKBONES["toy_test"]


def test_the_cli_head_choices_are_the_registry():
    from samples.fashion import fashion
    parser = fashion.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in ("train", "evaluate", "detect", "submit", "export"):
        head = next(a for a in sub.choices[command]._actions if a.dest == "head")
        assert sorted(head.choices) == sorted(heads.MASK_HEADS), command


# ----------------------------------------------------------------------------- image meta

def test_image_meta_layout_is_one_table():
    assert [f[0] for f in image_meta.IMAGE_META_FIELDS] == [
        "image_id", "original_image_shape", "image_shape", "window", "scale",
        "active_class_ids"]
    assert TinyConfig().IMAGE_META_SIZE == image_meta.image_meta_size(3) == 1 + 3 + 3 + 4 + 1 + 3


def test_image_meta_numpy_graph_and_export_composer_agree():
    meta = image_meta.compose_image_meta(7, (300, 200, 3), (256, 256, 3), (0, 42, 256, 213),
                                         0.853, [1, 0, 1])
    np.testing.assert_array_equal(meta, [7, 300, 200, 3, 256, 256, 3, 0, 42, 256, 213, 0.853,
                                         1, 0, 1])
    parsed = image_meta.parse_image_meta(meta[None])
    graph = image_meta.parse_image_meta_graph(tf.constant(meta[None]))
    assert set(parsed) == set(graph) == {f[0] for f in image_meta.IMAGE_META_FIELDS}
    for name in parsed:
        np.testing.assert_allclose(np.asarray(graph[name]), parsed[name], rtol=1e-6)
    assert parsed["image_id"].shape == (1,) and parsed["window"].shape == (1, 4)
    composed = image_meta.compose_image_meta_graph(
        tf.constant([300, 200]), tf.constant([256, 256]), tf.constant([0, 42, 256, 213]),
        tf.constant(0.853), 3)
    expected = image_meta.compose_image_meta(0, (300, 200, 3), (256, 256, 3),
                                             (0, 42, 256, 213), 0.853, [0, 0, 0])
    np.testing.assert_allclose(np.asarray(composed), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="window has 3 values"):
        image_meta.compose_image_meta(0, (1, 1, 3), (1, 1, 3), (0, 0, 1), 1.0, [1])


# ----------------------------------------------------------------------------- private Keras

def test_private_keras_apis_we_use_still_exist():
    """Each private Keras API mrcnn still uses, and why (the comment at the use says it too):
    - keras.Model._maybe_symbolic_build (training.MaskRCNNTrainingModel overrides it: Keras'
      peek at fit()'s first batch fails under MultiWorkerMirroredStrategy);
    - PyDatasetAdapter (distribute.worker_input: no public PyDataset -> tf.data with its
      worker processes);
    - KerasTensor._keras_history and Operation._inbound_nodes (MaskRCNN.ancestor walks the
      graph; Keras 3 has no public graph walk).
    If this fails, Keras changed one of them: fix the user named above."""
    assert callable(getattr(keras.Model, "_maybe_symbolic_build", None))
    params = inspect.signature(keras.Model._maybe_symbolic_build).parameters
    assert {"iterator", "data_batch"} <= set(params)
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter
    assert callable(getattr(PyDatasetAdapter, "get_tf_dataset", None))
    x = keras.Input([3])
    y = keras.layers.Dense(2, name="d")(x)
    operation, node_index, _ = y._keras_history
    assert operation.name == "d"
    assert operation._inbound_nodes[node_index].input_tensors[0] is x


def test_weights_file_keys_are_keras_own(tmp_path):
    """weights._snake_case / native_layer_keys reproduce how Keras 3 keys the layers of a
    .weights.h5 file (its own helper is private)."""
    import h5py
    from mrcnn import weights
    x = keras.Input([8, 8, 3])
    y = keras.layers.Conv2D(2, 1, name="a")(x)
    y = keras.layers.Conv2DTranspose(2, 1, name="b")(y)
    y = keras.layers.BatchNormalization(name="c")(y)
    y = keras.layers.Conv2D(2, 1, name="e")(y)
    y = keras.layers.Flatten()(y)
    y = keras.layers.Dense(2, name="f")(y)
    model = keras.Model(x, y)
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    with h5py.File(path, "r") as f:
        stored = sorted(k for k in f["layers"] if len(f["layers"][k].get("vars", {})))
    keys = {k: layer.name for k, layer in weights.native_layer_keys(model).items()}
    assert sorted(k for k, name in keys.items() if model.get_layer(name).weights) == stored
    assert keys["conv2d_transpose"] == "b" and keys["conv2d_1"] == "e"
