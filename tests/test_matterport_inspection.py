"""matterport's inspection notebooks, call by call, on the demo data (issue 12, item 9).

The calls below are the ones matterport's inspect_data.ipynb and inspect_model.ipynb make, in
their order and with their arguments (matterport's names: modellib, utils, visualize, log),
against this package: the notebooks' client code runs unchanged.
"""

import os

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import mrcnn.model as modellib  # noqa: E402
from mrcnn import checkpoints, utils, visualize  # noqa: E402
from mrcnn.model import log  # noqa: E402
from samples.fashion import demo_data  # noqa: E402
from samples.fashion.configs import DemoConfig  # noqa: E402
from samples.fashion.dataset import FashionDataset  # noqa: E402

class InspectConfig(DemoConfig):
    """The demo's configuration as a matterport user would have it: no attribute head (its
    extra inputs and outputs are not in matterport's batches)."""
    GPU_COUNT = 1
    IMAGES_PER_GPU = 1
    DETECTION_MIN_CONFIDENCE = 0.0
    NUM_ATTRIBUTES = 0


def get_ax(rows=1, cols=1, size=4):
    _, ax = plt.subplots(rows, cols, figsize=(size * cols, size * rows))
    return ax


@pytest.fixture(scope="module")
def dataset():
    ds = FashionDataset()
    ds.load_dataset(demo_data.ensure_demo_data(), subset="val", val_fraction=0.25, limit=6)
    ds.prepare()
    return ds


def test_inspect_data_sequence(dataset):
    config = InspectConfig()
    print("Image Count: {}".format(len(dataset.image_ids)))
    print("Class Count: {}".format(dataset.num_classes))
    for i, info in enumerate(dataset.class_info[:3]):
        print("{:3}. {:50}".format(i, info["name"]))

    rng = np.random.RandomState(0)
    for image_id in rng.choice(dataset.image_ids, 2):
        image = dataset.load_image(image_id)
        mask, class_ids = dataset.load_mask(image_id)
        visualize.display_top_masks(image, mask, class_ids, dataset.class_names)
    plt.close("all")

    image_id = dataset.image_ids[0]
    image = dataset.load_image(image_id)
    mask, class_ids = dataset.load_mask(image_id)
    bbox = utils.extract_bboxes(mask)
    print("image_id ", image_id, dataset.image_reference(image_id))
    log("image", image)
    log("mask", mask)
    log("class_ids", class_ids)
    log("bbox", bbox)
    visualize.display_instances(image, bbox, mask, class_ids, dataset.class_names,
                                ax=get_ax())

    # Resizing as the model does.
    image, window, scale, padding, _ = utils.resize_image(
        image, min_dim=config.IMAGE_MIN_DIM, max_dim=config.IMAGE_MAX_DIM,
        mode=config.IMAGE_RESIZE_MODE)
    mask = utils.resize_mask(mask, scale, padding)
    assert image.shape[:2] == mask.shape[:2] == tuple(config.IMAGE_SHAPE[:2])

    # Mini masks: full size by default, mini with use_mini_mask=True (matterport's defaults).
    image, image_meta, class_ids, bbox, mask = modellib.load_image_gt(
        dataset, config, image_id, use_mini_mask=False)
    assert mask.shape[:2] == tuple(config.IMAGE_SHAPE[:2])
    image, image_meta, class_ids, bbox, mask = modellib.load_image_gt(
        dataset, config, image_id, use_mini_mask=True)
    assert mask.shape[:2] == tuple(config.MINI_MASK_SHAPE)
    visualize.display_images([image] + [mask[:, :, i] for i in range(min(mask.shape[-1], 2))])
    full = utils.expand_mask(bbox, mask, image.shape)
    assert full.shape[:2] == image.shape[:2]

    # Anchors.
    backbone_shapes = modellib.compute_backbone_shapes(config, config.IMAGE_SHAPE)
    anchors = utils.generate_pyramid_anchors(config.RPN_ANCHOR_SCALES, config.RPN_ANCHOR_RATIOS,
                                             backbone_shapes, config.BACKBONE_STRIDES,
                                             config.RPN_ANCHOR_STRIDE)
    log("Count", anchors.shape[0])
    log("Scales", config.RPN_ANCHOR_SCALES)
    log("ratios", config.RPN_ANCHOR_RATIOS)

    # The data generator with random ROIs and detection targets.
    random_rois = 200
    g = modellib.data_generator(dataset, config, shuffle=True, random_rois=random_rois,
                                batch_size=2, detection_targets=True)
    if random_rois:
        [normalized_images, image_meta, rpn_match, rpn_bbox, gt_class_ids, gt_boxes, gt_masks,
         rpn_rois, rois], [mrcnn_class_ids, mrcnn_bbox, mrcnn_mask] = next(g)
        log("rois", rois)
        log("mrcnn_class_ids", mrcnn_class_ids)
        log("mrcnn_bbox", mrcnn_bbox)
        log("mrcnn_mask", mrcnn_mask)
    log("gt_class_ids", gt_class_ids)
    log("gt_boxes", gt_boxes)
    log("gt_masks", gt_masks)
    log("rpn_match", rpn_match)
    log("rpn_bbox", rpn_bbox)
    assert rpn_rois.shape == (2, random_rois, 4)
    assert rois.shape[:2] == mrcnn_class_ids.shape[:2] == (2, config.TRAIN_ROIS_PER_IMAGE)
    b = 0
    sample_image = modellib.unmold_image(normalized_images[b], config)
    positive_anchor_ids = np.where(rpn_match[b] == 1)[0]
    print("Positive anchors: {}".format(len(positive_anchor_ids)))
    visualize.draw_boxes(sample_image, boxes=anchors[positive_anchor_ids], ax=get_ax())
    plt.close("all")


def test_inspect_model_sequence(dataset, tmp_path):
    config = InspectConfig()
    model = modellib.MaskRCNN(mode="inference", model_dir=str(tmp_path), config=config)
    # A checkpoint in a run folder, as training leaves it; the notebook loads find_last().
    run = checkpoints.run_dir(str(tmp_path), config.NAME)
    os.makedirs(run)
    model.save_weights(checkpoints.checkpoint_path(run, config.NAME, 1))
    weights_path = model.find_last()
    print("Loading weights ", weights_path)
    model.load_weights(weights_path, by_name=True)

    image_id = dataset.image_ids[0]
    image, image_meta, gt_class_id, gt_bbox, gt_mask = modellib.load_image_gt(
        dataset, config, image_id, use_mini_mask=False)
    info = dataset.image_info[image_id]
    print("image ID: {}.{} ({}) {}".format(info["source"], info["id"], image_id,
                                          dataset.image_reference(image_id)))
    results = model.detect([image], verbose=1)
    ax = get_ax(1)
    r = results[0]
    visualize.display_instances(image, r["rois"], r["masks"], r["class_ids"],
                                dataset.class_names, r["scores"], ax=ax, title="Predictions")
    log("gt_class_id", gt_class_id)
    log("gt_bbox", gt_bbox)
    log("gt_mask", gt_mask)

    # Precision-recall and overlaps.
    AP, precisions, recalls, overlaps = utils.compute_ap(
        gt_bbox, gt_class_id, gt_mask, r["rois"], r["class_ids"], r["scores"], r["masks"])
    visualize.plot_precision_recall(AP, precisions, recalls)
    visualize.plot_overlaps(gt_class_id, r["class_ids"], r["scores"], overlaps,
                            dataset.class_names)
    plt.close("all")

    # RPN targets and predictions.
    target_rpn_match, target_rpn_bbox = modellib.build_rpn_targets(
        image.shape, model.anchors, gt_class_id, gt_bbox, model.config)
    log("target_rpn_match", target_rpn_match)
    positive_anchor_ix = np.where(target_rpn_match[:] == 1)[0]
    positive_anchors = model.anchors[positive_anchor_ix]
    refined_anchors = utils.apply_box_deltas(
        positive_anchors,
        target_rpn_bbox[:positive_anchors.shape[0]] * model.config.RPN_BBOX_STD_DEV)
    log("refined_anchors", refined_anchors)
    visualize.draw_boxes(image, boxes=positive_anchors, refined_boxes=refined_anchors,
                         ax=get_ax())

    pillar = model.keras_model.get_layer("ROI").output
    nms_node = model.ancestor(pillar, "ROI/rpn_non_max_suppression:0")
    if nms_node is None:
        nms_node = model.ancestor(pillar, "ROI/rpn_non_max_suppression/NonMaxSuppressionV2:0")
    rpn = model.run_graph([image], [
        ("rpn_class", model.keras_model.get_layer("rpn_class").output),
        ("pre_nms_anchors", model.ancestor(pillar, "ROI/pre_nms_anchors:0")),
        ("refined_anchors", model.ancestor(pillar, "ROI/refined_anchors:0")),
        ("refined_anchors_clipped", model.ancestor(pillar, "ROI/refined_anchors_clipped:0")),
        ("post_nms_anchor_ix", nms_node),
        ("proposals", model.keras_model.get_layer("ROI").output),
    ])
    limit = 10
    sorted_anchor_ids = np.argsort(rpn["rpn_class"][:, :, 1].flatten())[::-1]
    visualize.draw_boxes(image, boxes=model.anchors[sorted_anchor_ids[:limit]], ax=get_ax())
    ax = get_ax(1, 2)
    visualize.draw_boxes(image, boxes=rpn["pre_nms_anchors"][0, :limit],
                         refined_boxes=rpn["refined_anchors"][0, :limit], ax=ax[0])
    visualize.draw_boxes(image, refined_boxes=rpn["refined_anchors_clipped"][0, :limit],
                         ax=ax[1])
    h, w = config.IMAGE_SHAPE[:2]
    proposals = rpn["proposals"][0, :limit] * np.array([h, w, h, w])
    visualize.draw_boxes(image, refined_boxes=proposals, ax=get_ax())
    recall, positive_anchor_ids = utils.compute_recall(rpn["refined_anchors"][0], gt_bbox, 0.7)
    print("Refined Anchors ({:5})   Recall: {:.3f}  Positive anchors: {}".format(
        rpn["refined_anchors"].shape[1], recall, len(positive_anchor_ids)))
    plt.close("all")

    # Classifier and mask heads.
    mrcnn = model.run_graph([image], [
        ("proposals", model.keras_model.get_layer("ROI").output),
        ("probs", model.keras_model.get_layer("mrcnn_class").output),
        ("deltas", model.keras_model.get_layer("mrcnn_bbox").output),
        ("masks", model.keras_model.get_layer("mrcnn_mask").output),
        ("detections", model.keras_model.get_layer("mrcnn_detection").output),
    ])
    det_class_ids = mrcnn["detections"][0, :, 4].astype(np.int32)
    det_count = np.where(det_class_ids == 0)[0]
    det_count = det_count[0] if len(det_count) else len(det_class_ids)
    det_class_ids = det_class_ids[:det_count]
    proposals = np.around(mrcnn["proposals"][0] * np.array([h, w, h, w])).astype(np.int32)
    roi_class_ids = np.argmax(mrcnn["probs"][0], axis=1)
    roi_bbox_specific = mrcnn["deltas"][0, np.arange(proposals.shape[0]), roi_class_ids]
    refined_proposals = utils.apply_box_deltas(
        proposals, roi_bbox_specific * config.BBOX_STD_DEV).astype(np.int32)
    log("refined_proposals", refined_proposals)
    det_boxes = mrcnn["detections"][0, :, :4] * np.array([h, w, h, w])
    det_mask_specific = np.array([mrcnn["masks"][0, i, :, :, c]
                                  for i, c in enumerate(det_class_ids)])
    det_masks = np.array([utils.unmold_mask(m, det_boxes[i].astype(np.int32), image.shape)
                          for i, m in enumerate(det_mask_specific)])
    log("det_mask_specific", det_mask_specific)
    log("det_masks", det_masks)

    # Activations and weights.
    activations = model.run_graph([image], [
        ("input_image", model.keras_model.get_layer("input_image").output),
        ("res4f_out", model.keras_model.get_layer("res4f_out").output),
        ("rpn_bbox", model.keras_model.get_layer("rpn_bbox").output),
        ("roi", model.keras_model.get_layer("ROI").output),
    ])
    unmolded = modellib.unmold_image(activations["input_image"][0], config)
    np.testing.assert_allclose(unmolded, image, atol=1)
    visualize.display_weight_stats(model)
    layers = [layer for layer in model.get_trainable_layers()
              if layer.__class__.__name__ in ("Conv2D", "Dense", "Conv2DTranspose")]
    assert layers
    for layer in layers[:3]:
        for w, weight in enumerate(layer.get_weights()):
            assert np.isfinite(weight).all(), layer.weights[w].name
    plt.close("all")
