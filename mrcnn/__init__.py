"""Mask R-CNN for TensorFlow 2 / Keras 3, matterport-compatible, with a swappable U-Net mask head.

Modules (one concern each):
    config     Config: every knob and its default
    utils      numpy/OpenCV helpers (boxes, IoU, NMS, anchors, resize, masks, RLE, AP) and Dataset
    data       load_image_gt, RPN targets, image meta, augmentation, the parallel loader
    backbone   ResNet50/101 + FPN
    layers     graph layers: ProposalLayer, PyramidROIAlign, DetectionTargetLayer, DetectionLayer
    heads      RPN, box classifier head, mask heads (MASK_HEADS registry: "fcn", "unet")
    losses     the five Mask R-CNN losses
    model      MaskRCNN (build / train / detect / load_weights) and matterport re-exports
    evaluate   COCO-style evaluation through pycocotools and the iMaterialist metric
    visualize  matplotlib drawing helpers
"""

__version__ = "0.1.0"
