"""Mask R-CNN for TensorFlow 2 / Keras 3, matterport-compatible, with a swappable U-Net mask head.

Modules (one concern each):
    config       Config: every knob and its default
    errors       MrcnnError: the base of every error a user can fix
    utils        numpy/OpenCV helpers (boxes, IoU, NMS, anchors, resize, masks, RLE, AP), Dataset
    image_meta   the image-meta layout (one field table) and its numpy / graph readers, writers
    data         load_image_gt, RPN targets, augmentation, the parallel loader, data_generator
    backbone     ResNet50/101 + FPN (BACKBONES registry)
    layers       graph layers: ProposalLayer, PyramidROIAlign, DetectionTargetLayer, DetectionLayer
    heads        RPN, box classifier head, mask heads (MASK_HEADS registry: "fcn", "unet")
    losses       the five Mask R-CNN losses, each a (sum, count) pair
    training     the training model's train_step, learning-rate schedule, callbacks (NaN guard,
                 checkpoints, training states, evaluation during training), layer stages
    training_state  a training state's file: weights, optimizer, position (exact resume)
    distribute   strategy selection, TF_CONFIG, sharded input
    weights      weights files: legacy Keras 2 .h5 by name, .weights.h5, loading with a report
    checkpoints  run folders, checkpoint names, find_last, atomic writes
    pretrained   matterport's COCO weights and ImageNet ResNets
    model        MaskRCNN (build / train / detect / load_weights) and matterport re-exports
    evaluate     COCO-style evaluation through pycocotools and the iMaterialist metric
    attribute_eval  Fashionpedia's attribute-aware AP (IoU and attribute-F1 thresholds)
    tta          test-time augmentation: flipped and rescaled copies, merged (WBF or NMS)
    tuning       score / NMS / mask / area thresholds swept on detections computed once
    export       SavedModel for serving
    visualize    matplotlib drawing helpers
"""

__version__ = "0.1.0"
