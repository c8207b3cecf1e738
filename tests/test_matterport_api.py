"""matterport's public API, name by name: client code written for matterport's Mask_RCNN 2.1
(its samples, notebooks and users' scripts) calls these with positional arguments and
keywords, so every parameter name, its position and its default must stay as matterport
had them. Parameters we add come after matterport's and are optional.

The expected signatures below are matterport 2.1's (mrcnn/utils.py, model.py, visualize.py,
config.py), written out by hand; docs/matterport-api.md has the full table, with the
names we do not provide or that differ and why. A rename, a reordering or a changed
default fails here.
"""

import inspect

import numpy as np
import pytest

from mrcnn import config as config_module
from mrcnn import data, model, utils, visualize

EMPTY = inspect.Parameter.empty


def matterport(params):
    """The signature of `def f(<params>)`."""
    namespace = {}
    exec("def f(%s):\n    pass" % params, {}, namespace)
    return inspect.signature(namespace["f"])


def check(ours, theirs, where):
    """ours (a callable) accepts every call matterport's signature `theirs` accepts, with the
    same meaning: the same parameters in the same order with the same defaults, then only
    optional extras."""
    expected = list(matterport(theirs).parameters.values())
    actual = list(inspect.signature(ours).parameters.values())
    if actual and actual[0].name == "self":
        actual = actual[1:]
    var_kw = [p for p in actual if p.kind is p.VAR_KEYWORD]
    positional = [p for p in actual if p.kind is not p.VAR_KEYWORD]
    for i, m in enumerate(expected):
        if m.kind is m.VAR_KEYWORD:
            assert var_kw, "%s: matterport takes **%s, we do not" % (where, m.name)
            continue
        assert i < len(positional), "%s: parameter %r missing" % (where, m.name)
        p = positional[i]
        if m.kind is m.VAR_POSITIONAL:
            assert p.kind is p.VAR_POSITIONAL, "%s: matterport takes *%s at position %d" % (
                where, m.name, i + 1)
            continue
        assert p.name == m.name, "%s: parameter %d is %r, matterport's is %r" % (
            where, i + 1, p.name, m.name)
        assert p.kind is p.POSITIONAL_OR_KEYWORD, "%s: %r must be positional-or-keyword" % (
            where, p.name)
        if m.default is not EMPTY:
            assert p.default is not EMPTY and p.default == m.default, \
                "%s: %s defaults to %r, matterport's to %r" % (where, p.name, p.default,
                                                                m.default)
    n = len([m for m in expected if m.kind is not m.VAR_KEYWORD])
    for p in positional[n:]:
        assert p.default is not EMPTY or p.kind is p.VAR_POSITIONAL, \
            "%s: our extra parameter %r must be optional" % (where, p.name)


# ----------------------------------------------------------------------------- mrcnn.utils

UTILS = {
    "extract_bboxes": "mask",
    "compute_iou": "box, boxes, box_area, boxes_area",
    "compute_overlaps": "boxes1, boxes2",
    "compute_overlaps_masks": "masks1, masks2",
    "non_max_suppression": "boxes, scores, threshold",
    "apply_box_deltas": "boxes, deltas",
    "box_refinement_graph": "box, gt_box",
    "box_refinement": "box, gt_box",
    "resize_image": "image, min_dim=None, max_dim=None, min_scale=None, mode='square'",
    "resize_mask": "mask, scale, padding, crop=None",
    "minimize_mask": "bbox, mask, mini_shape",
    "expand_mask": "bbox, mini_mask, image_shape",
    "unmold_mask": "mask, bbox, image_shape",
    "generate_anchors": "scales, ratios, shape, feature_stride, anchor_stride",
    "generate_pyramid_anchors": "scales, ratios, feature_shapes, feature_strides, "
                                "anchor_stride",
    "trim_zeros": "x",
    "compute_matches": "gt_boxes, gt_class_ids, gt_masks, pred_boxes, pred_class_ids, "
                       "pred_scores, pred_masks, iou_threshold=0.5, score_threshold=0.0",
    "compute_ap": "gt_boxes, gt_class_ids, gt_masks, pred_boxes, pred_class_ids, pred_scores, "
                  "pred_masks, iou_threshold=0.5",
    "compute_ap_range": "gt_box, gt_class_id, gt_mask, pred_box, pred_class_id, pred_score, "
                        "pred_mask, iou_thresholds=None, verbose=1",
    "compute_recall": "pred_boxes, gt_boxes, iou",
    "batch_slice": "inputs, graph_fn, batch_size, names=None",
    "download_trained_weights": "coco_model_path, verbose=1",
    "norm_boxes": "boxes, shape",
    "denorm_boxes": "boxes, shape",
    "resize": "image, output_shape, order=1, mode='constant', cval=0, clip=True, "
              "preserve_range=False, anti_aliasing=False, anti_aliasing_sigma=None",
}

DATASET = {
    "__init__": "class_map=None",
    "add_class": "source, class_id, class_name",
    "add_image": "source, image_id, path, **kwargs",
    "image_reference": "image_id",
    "prepare": "class_map=None",
    "map_source_class_id": "source_class_id",
    "get_source_class_id": "class_id, source",
    "source_image_link": "image_id",
    "load_image": "image_id",
    "load_mask": "image_id",
}


@pytest.mark.parametrize("name", sorted(UTILS))
def test_utils_functions(name):
    check(getattr(utils, name), UTILS[name], "utils." + name)


@pytest.mark.parametrize("name", sorted(DATASET))
def test_dataset_methods(name):
    check(getattr(utils.Dataset, name), DATASET[name], "utils.Dataset." + name)


def test_dataset_image_ids_property_and_coco_url():
    assert isinstance(inspect.getattr_static(utils.Dataset, "image_ids"), property)
    assert utils.COCO_MODEL_URL == \
        "https://github.com/matterport/Mask_RCNN/releases/download/v2.0/mask_rcnn_coco.h5"


# ----------------------------------------------------------------------------- mrcnn.model

MODEL_FUNCTIONS = {
    "log": "text, array=None",
    "compute_backbone_shapes": "config, image_shape",
    "identity_block": "input_tensor, kernel_size, filters, stage, block, use_bias=True, "
                      "train_bn=True",
    "conv_block": "input_tensor, kernel_size, filters, stage, block, strides=(2, 2), "
                  "use_bias=True, train_bn=True",
    "resnet_graph": "input_image, architecture, stage5=False, train_bn=True",
    "apply_box_deltas_graph": "boxes, deltas",
    "clip_boxes_graph": "boxes, window",
    "overlaps_graph": "boxes1, boxes2",
    "rpn_graph": "feature_map, anchors_per_location, anchor_stride",
    "build_rpn_model": "anchor_stride, anchors_per_location, depth",
    "fpn_classifier_graph": "rois, feature_maps, image_meta, pool_size, num_classes, "
                            "train_bn=True, fc_layers_size=1024",
    "build_fpn_mask_graph": "rois, feature_maps, image_meta, pool_size, num_classes, "
                            "train_bn=True",
    "smooth_l1_loss": "y_true, y_pred",
    "rpn_class_loss_graph": "rpn_match, rpn_class_logits",
    "rpn_bbox_loss_graph": "config, target_bbox, rpn_match, rpn_bbox",
    "mrcnn_class_loss_graph": "target_class_ids, pred_class_logits, active_class_ids",
    "mrcnn_bbox_loss_graph": "target_bbox, target_class_ids, pred_bbox",
    "mrcnn_mask_loss_graph": "target_masks, target_class_ids, pred_masks",
    "load_image_gt": "dataset, config, image_id, augment=False, augmentation=None, "
                     "use_mini_mask=False",
    "build_rpn_targets": "image_shape, anchors, gt_class_ids, gt_boxes, config",
    "data_generator": "dataset, config, shuffle=True, augment=False, augmentation=None, "
                      "random_rois=0, batch_size=1, detection_targets=False, "
                      "no_augmentation_sources=None",
    "compose_image_meta": "image_id, original_image_shape, image_shape, window, scale, "
                          "active_class_ids",
    "parse_image_meta": "meta",
    "parse_image_meta_graph": "meta",
    "mold_image": "images, config",
    "unmold_image": "normalized_images, config",
    "trim_zeros_graph": "boxes, name='trim_zeros'",
    "norm_boxes_graph": "boxes, shape",
    "denorm_boxes_graph": "boxes, shape",
    "log2_graph": "x",
    "batch_pack_graph": "x, counts, num_rows",
    "detection_targets_graph": "proposals, gt_class_ids, gt_boxes, gt_masks, config",
    "refine_detections_graph": "rois, probs, deltas, window, config",
    "generate_random_rois": "image_shape, count, gt_class_ids, gt_boxes",
    "build_detection_targets": "rpn_rois, gt_class_ids, gt_boxes, gt_masks, config",
}

# Layers: their constructors (Keras passes **kwargs on).
MODEL_LAYERS = {
    "ProposalLayer": "proposal_count, nms_threshold, config=None, **kwargs",
    "PyramidROIAlign": "pool_shape, **kwargs",
    "DetectionTargetLayer": "config, **kwargs",
    "DetectionLayer": "config=None, **kwargs",
    "BatchNorm": "*args, **kwargs",
}

# Defined in mrcnn.data (and re-exported by mrcnn.model, checked above).
DATA_FUNCTIONS = {
    "generate_random_rois": "image_shape, count, gt_class_ids, gt_boxes",
    "build_detection_targets": "rpn_rois, gt_class_ids, gt_boxes, gt_masks, config",
}

MASKRCNN = {
    "__init__": "mode, config, model_dir",
    "build": "mode, config",
    "find_last": "",
    "load_weights": "filepath, by_name=False, exclude=None",
    "get_imagenet_weights": "",
    "compile": "learning_rate, momentum",
    "set_trainable": "layer_regex, keras_model=None, indent=0, verbose=1",
    "set_log_dir": "model_path=None",
    "train": "train_dataset, val_dataset, learning_rate, epochs, layers, augmentation=None, "
             "custom_callbacks=None, no_augmentation_sources=None",
    "mold_inputs": "images",
    "unmold_detections": "detections, mrcnn_mask, original_image_shape, image_shape, window",
    "detect": "images, verbose=0",
    "detect_molded": "molded_images, image_metas, verbose=0",
    "get_anchors": "image_shape",
    "ancestor": "tensor, name, checked=None",
    "find_trainable_layer": "layer",
    "get_trainable_layers": "",
    "run_graph": "images, outputs, image_metas=None",
}


@pytest.mark.parametrize("name", sorted(MODEL_FUNCTIONS))
def test_model_functions(name):
    check(getattr(model, name), MODEL_FUNCTIONS[name], "model." + name)


@pytest.mark.parametrize("name", sorted(MODEL_LAYERS))
def test_model_layers(name):
    check(getattr(model, name).__init__, MODEL_LAYERS[name], "model.%s()" % name)


@pytest.mark.parametrize("name", sorted(DATA_FUNCTIONS))
def test_matterport_data_functions_in_mrcnn_data(name):
    check(getattr(data, name), DATA_FUNCTIONS[name], "data." + name)


@pytest.mark.parametrize("name", sorted(MASKRCNN))
def test_maskrcnn_methods(name):
    check(getattr(model.MaskRCNN, name), MASKRCNN[name], "MaskRCNN." + name)


# ----------------------------------------------------------------------------- mrcnn.visualize

VISUALIZE = {
    "display_images": "images, titles=None, cols=4, cmap=None, norm=None, interpolation=None",
    "random_colors": "N, bright=True",
    "apply_mask": "image, mask, color, alpha=0.5",
    "display_instances": "image, boxes, masks, class_ids, class_names, scores=None, title='', "
                         "figsize=(16, 16), ax=None, show_mask=True, show_bbox=True, "
                         "colors=None, captions=None",
    "display_differences": "image, gt_box, gt_class_id, gt_mask, pred_box, pred_class_id, "
                           "pred_score, pred_mask, class_names, title='', ax=None, "
                           "show_mask=True, show_box=True, iou_threshold=0.5, "
                           "score_threshold=0.5",
    "draw_rois": "image, rois, refined_rois, mask, class_ids, class_names, limit=10",
    "draw_box": "image, box, color",
    "display_top_masks": "image, mask, class_ids, class_names, limit=4",
    "plot_precision_recall": "AP, precisions, recalls",
    "plot_overlaps": "gt_class_ids, pred_class_ids, pred_scores, overlaps, class_names, "
                     "threshold=0.5",
    "draw_boxes": "image, boxes=None, refined_boxes=None, masks=None, captions=None, "
                  "visibilities=None, title='', ax=None",
    "display_table": "table",
    "display_weight_stats": "model",
}


@pytest.mark.parametrize("name", sorted(VISUALIZE))
def test_visualize_functions(name):
    check(getattr(visualize, name), VISUALIZE[name], "visualize." + name)


def test_drawing_helpers_return_what_matterport_returns():
    image = np.zeros((20, 20, 3), np.uint8)
    assert visualize.draw_box(image, (2, 3, 10, 12), (255, 0, 0)) is image
    assert image[2, 5, 0] == 255
    canvas = np.zeros((4, 4, 3), np.float32)
    assert visualize.apply_mask(canvas, np.eye(4), (1.0, 0.0, 0.0)) is canvas
    colors = visualize.random_colors(5)
    assert len(colors) == 5 and all(len(c) == 3 and max(c) <= 1 for c in colors)


# ----------------------------------------------------------------------------- mrcnn.config

# matterport 2.1's Config attributes and their defaults.
CONFIG_DEFAULTS = {
    "NAME": None, "GPU_COUNT": 1, "IMAGES_PER_GPU": 2, "STEPS_PER_EPOCH": 1000,
    "VALIDATION_STEPS": 50, "BACKBONE": "resnet101", "COMPUTE_BACKBONE_SHAPE": None,
    "BACKBONE_STRIDES": [4, 8, 16, 32, 64], "FPN_CLASSIF_FC_LAYERS_SIZE": 1024,
    "TOP_DOWN_PYRAMID_SIZE": 256, "NUM_CLASSES": 1, "RPN_ANCHOR_SCALES": (32, 64, 128, 256, 512),
    "RPN_ANCHOR_RATIOS": [0.5, 1, 2], "RPN_ANCHOR_STRIDE": 1, "RPN_NMS_THRESHOLD": 0.7,
    "RPN_TRAIN_ANCHORS_PER_IMAGE": 256, "PRE_NMS_LIMIT": 6000, "POST_NMS_ROIS_TRAINING": 2000,
    "POST_NMS_ROIS_INFERENCE": 1000, "USE_MINI_MASK": True, "MINI_MASK_SHAPE": (56, 56),
    "IMAGE_RESIZE_MODE": "square", "IMAGE_MIN_DIM": 800, "IMAGE_MAX_DIM": 1024,
    "IMAGE_MIN_SCALE": 0, "IMAGE_CHANNEL_COUNT": 3, "MEAN_PIXEL": [123.7, 116.8, 103.9],
    "TRAIN_ROIS_PER_IMAGE": 200, "ROI_POSITIVE_RATIO": 0.33, "POOL_SIZE": 7,
    "MASK_POOL_SIZE": 14, "MASK_SHAPE": [28, 28], "MAX_GT_INSTANCES": 100,
    "RPN_BBOX_STD_DEV": [0.1, 0.1, 0.2, 0.2], "BBOX_STD_DEV": [0.1, 0.1, 0.2, 0.2],
    "DETECTION_MAX_INSTANCES": 100, "DETECTION_MIN_CONFIDENCE": 0.7,
    "DETECTION_NMS_THRESHOLD": 0.3, "LEARNING_RATE": 0.001, "LEARNING_MOMENTUM": 0.9,
    "WEIGHT_DECAY": 0.0001,
    "LOSS_WEIGHTS": {"rpn_class_loss": 1., "rpn_bbox_loss": 1., "mrcnn_class_loss": 1.,
                     "mrcnn_bbox_loss": 1., "mrcnn_mask_loss": 1.},
    "USE_RPN_ROIS": True, "TRAIN_BN": False, "GRADIENT_CLIP_NORM": 5.0,
    # Derived in __init__:
    "BATCH_SIZE": 2, "IMAGE_SHAPE": [1024, 1024, 3], "IMAGE_META_SIZE": 13,
}


def test_config_constructor_display_and_defaults(capsys):
    check(config_module.Config.__init__, "", "Config()")
    check(config_module.Config.display, "", "Config.display")
    config = config_module.Config()
    for name, value in CONFIG_DEFAULTS.items():
        ours = getattr(config, name)
        if isinstance(value, list) or isinstance(ours, np.ndarray):
            np.testing.assert_array_equal(ours, value, err_msg=name)
        else:
            assert ours == value and type(ours) is type(value), name
    config.display()
    out = capsys.readouterr().out
    assert "Configurations:" in out and "IMAGE_SHAPE" in out and "USE_RPN_ROIS" in out
