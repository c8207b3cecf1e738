"""matterport client code against this package: legacy checkpoints, run_graph, ancestor's
proposal steps, and loads that say what they did not load (issue 12)."""

import logging
import os

import keras
import numpy as np
import pytest

from synthetic import shapes_config, shapes_dataset, write_legacy_h5

from mrcnn import checkpoints, utils
from mrcnn.model import MaskRCNN, load_image_gt, mold_image


@pytest.fixture(scope="module")
def inference_model(tmp_path_factory):
    keras.utils.set_random_seed(1)
    return MaskRCNN("inference", shapes_config(), str(tmp_path_factory.mktemp("logs")))


# ----------------------------------------------------------------------------- item 5

def test_find_last_and_load_a_matterport_checkpoint_continue_its_epoch(tmp_path,
                                                                       inference_model):
    run = tmp_path / "shapes20240131T1530"
    run.mkdir()
    path = str(run / "mask_rcnn_shapes_0003.h5")
    write_legacy_h5(inference_model.keras_model, path)
    (run / "events.out.tfevents.1").write_bytes(b"")
    # Our own naming rules accept it.
    assert checkpoints.checkpoint_epoch(path) == 3
    assert checkpoints.find_last(str(tmp_path), "shapes") == path

    keras.utils.set_random_seed(2)
    model = MaskRCNN("inference", shapes_config(), str(tmp_path))
    assert model.find_last() == path
    n = model.load_weights(model.find_last(), by_name=True)
    assert n == len([layer for layer in model.keras_model.layers if layer.weights])
    for a, b in zip(model.keras_model.get_weights(), inference_model.keras_model.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Training continues matterport's run: its folder and its epoch count.
    assert model.epoch == 3
    assert model.log_dir == str(run)
    assert model.checkpoint_path.endswith("mask_rcnn_shapes_{epoch:04d}.weights.h5")


def test_checkpoint_names_are_one_definition():
    """Every writer of checkpoint names and every lister agree (mrcnn.checkpoints)."""
    import datetime
    started = datetime.datetime(2026, 3, 4, 5, 6)
    folder = checkpoints.run_dir("/logs", "Shapes", started)
    assert folder == os.path.join("/logs", "shapes20260304T0506")
    path = checkpoints.checkpoint_path(folder, "Shapes", 7)
    assert path == os.path.join(folder, "mask_rcnn_shapes_0007.weights.h5")
    assert checkpoints.parse_checkpoint_path(path) == (started, 7)
    partial = checkpoints.partial_path(path)
    assert checkpoints.is_partial(partial) and not checkpoints.is_partial(path)
    assert checkpoints.checkpoint_epoch(partial) is None
    assert checkpoints.checkpoint_epoch(path) == 7


# ----------------------------------------------------------------------------- item 6

def test_run_graph_takes_molded_images_with_metas_and_reuses_its_sub_model(inference_model,
                                                                          monkeypatch):
    model = inference_model
    dataset = shapes_dataset(1, seed=4)
    config = model.config
    image, image_meta, _, _, _ = load_image_gt(dataset, config, 0, use_mini_mask=False)
    outputs = [("proposals", "ROI"), ("rpn_class", "rpn_class")]
    raw = model.run_graph([image], outputs)
    built = []
    real_model = keras.Model

    def counting_model(*args, **kwargs):
        built.append(1)
        return real_model(*args, **kwargs)

    monkeypatch.setattr(keras, "Model", counting_model)
    molded = mold_image(image.astype(np.float32), config)
    again = model.run_graph(molded[np.newaxis], outputs, image_metas=image_meta[np.newaxis])
    assert built == []                      # the sub-model of these outputs was cached
    # Molded once, not twice: the same values as from the raw image.
    for name in ("proposals", "rpn_class"):
        np.testing.assert_allclose(again[name], raw[name], atol=1e-5)


# ----------------------------------------------------------------------------- item 7

def test_matterport_rpn_walk_through_names_resolve(inference_model):
    model = inference_model
    pillar = model.keras_model.get_layer("ROI").output
    nms_node = model.ancestor(pillar, "ROI/rpn_non_max_suppression:0")
    assert nms_node is not None
    assert model.ancestor(pillar, "ROI/rpn_non_max_suppression/NonMaxSuppressionV3:0") \
        is nms_node
    image = shapes_dataset(1, seed=5).load_image(0)
    rpn = model.run_graph([image], [
        ("rpn_class", model.keras_model.get_layer("rpn_class").output),
        ("pre_nms_anchors", model.ancestor(pillar, "ROI/pre_nms_anchors:0")),
        ("refined_anchors", model.ancestor(pillar, "ROI/refined_anchors:0")),
        ("refined_anchors_clipped", model.ancestor(pillar, "ROI/refined_anchors_clipped:0")),
        ("post_nms_anchor_ix", nms_node),
        ("proposals", model.keras_model.get_layer("ROI").output),
    ])
    config = model.config
    k = min(config.PRE_NMS_LIMIT, rpn["rpn_class"].shape[1])
    assert rpn["pre_nms_anchors"].shape == (1, k, 4)
    # The top-k anchors by foreground score, in that order (numpy check).
    anchors = model.get_anchors(config.IMAGE_SHAPE)
    order = np.argsort(-rpn["rpn_class"][0, :, 1], kind="stable")[:k]
    np.testing.assert_allclose(rpn["pre_nms_anchors"][0, :20], anchors[order[:20]], atol=1e-6)
    clipped = rpn["refined_anchors_clipped"][0]
    np.testing.assert_allclose(clipped, np.clip(rpn["refined_anchors"][0], 0, 1), atol=1e-6)
    # The proposals are the clipped boxes NMS kept, in NMS order; -1 marks padding.
    ix = rpn["post_nms_anchor_ix"][0]
    kept = ix[ix >= 0]
    assert len(kept) and (ix[len(kept):] == -1).all()
    np.testing.assert_allclose(rpn["proposals"][0, :len(kept)], clipped[kept], atol=1e-6)
    assert not rpn["proposals"][0, len(kept):].any()
    # Independent NMS on those boxes keeps the same indices.
    scores = np.sort(rpn["rpn_class"][0, :, 1])[::-1][:k]
    ref = utils.non_max_suppression(clipped, scores, config.RPN_NMS_THRESHOLD)
    np.testing.assert_array_equal(np.sort(ref[:len(kept)]), np.sort(kept))


def test_ancestor_names_that_cannot_resolve_say_so(inference_model):
    model = inference_model
    pillar = model.keras_model.get_layer("ROI").output
    with pytest.raises(ValueError, match="ROI/pre_nms_anchors:0"):
        model.ancestor(pillar, "ROI/no_such_step_or_layer")
    # A real layer that is not upstream is simply not an ancestor.
    assert model.ancestor(pillar, "mrcnn_detection") is None
    with pytest.raises(ValueError, match="is None"):
        model.run_graph([shapes_dataset(1).load_image(0)], [("x", None)])


# ----------------------------------------------------------------------------- item 8

def test_loading_another_heads_checkpoint_by_name_says_what_it_did_not_load(tmp_path, caplog):
    unet = MaskRCNN("training", shapes_config(MASK_HEAD="unet"), str(tmp_path))
    path = str(tmp_path / "unet.weights.h5")
    from mrcnn.weights import save_weights_atomic
    save_weights_atomic(unet.keras_model, path, attrs=checkpoints.checkpoint_attributes(
        epoch=1, **unet.architecture()))
    fcn = MaskRCNN("inference", shapes_config(MASK_HEAD="fcn"), str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mrcnn.weights"):
        fcn.load_weights(path, by_name=True)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    # First the architecture the file records, then the layers that got nothing.
    assert "mask_head: file unet, model fcn" in messages[0]
    assert "got nothing from the file" in messages[1]
    for name in ("mrcnn_mask_conv1", "mrcnn_mask_deconv", "mrcnn_mask"):
        assert name in messages[1]


# ----------------------------------------------------------------------------- item 1

def test_get_imagenet_weights_gives_a_file_load_weights_takes(tmp_path, monkeypatch):
    from mrcnn import pretrained
    keras.utils.set_random_seed(3)
    app = keras.applications.ResNet50(weights=None, include_top=False,
                                      input_shape=(None, None, 3))
    asked = []
    monkeypatch.setattr(pretrained, "imagenet_app",
                        lambda architecture, weights="imagenet": asked.append(architecture)
                        or app)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    model = MaskRCNN("inference", shapes_config(), str(tmp_path / "logs"))
    path = model.get_imagenet_weights()
    assert asked == ["resnet50"] and path.startswith(str(tmp_path))
    assert model.get_imagenet_weights() == path and asked == ["resnet50"]    # cached
    model.load_weights(path, by_name=True)
    # conv1: Keras Applications' kernel with its input channels reversed (BGR -> RGB).
    theirs = np.asarray(app.get_layer("conv1_conv").weights[0])
    np.testing.assert_array_equal(np.asarray(model.keras_model.get_layer("conv1").weights[0]),
                                  theirs[:, :, ::-1, :])
    np.testing.assert_array_equal(
        np.asarray(model.keras_model.get_layer("res4f_branch2c").weights[0]),
        np.asarray(app.get_layer("conv4_block6_3_conv").weights[0]))


def test_get_imagenet_weights_offline_names_the_file(tmp_path, monkeypatch):
    from mrcnn import pretrained

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    model = MaskRCNN("inference", shapes_config(), str(tmp_path / "logs"))
    with pytest.raises(pretrained.WeightsUnavailable,
                       match="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        model.get_imagenet_weights()
    models = tmp_path / "models"
    assert not models.exists() or not [n for n in os.listdir(models) if "mrcnn_" in n]
