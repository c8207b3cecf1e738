"""Network heads: the RPN, the box classifier head and the two mask heads.

    rpn_graph / build_rpn_model      Region Proposal Network, shared across pyramid levels
    fpn_classifier_graph             box classifier + box regressor on 7x7 RoIAlign features
    build_fpn_mask_graph             the paper's FCN mask head ("fcn")
    build_unet_mask_graph            the seed design's U-Net mask head ("unet")
    MASK_HEADS, register_mask_head   the mask-head registry and its contract
    build_mask_head                  the mask head chosen by config.MASK_HEAD

Every trainable layer has a name starting with `rpn_` or `mrcnn_`, so matterport's "heads"
training regex r"(mrcnn\\_.*)|(rpn\\_.*)|(fpn\\_.*)" selects them, and the FCN and classifier
layers keep matterport's names so that mask_rcnn_coco.h5 loads into them by name. Both mask
heads end in a layer named "mrcnn_mask" with the same output shape, so losses and detection
code do not depend on the head.

Mixed precision: the outputs that feed losses or box decoding (rpn logits / probs / deltas,
mrcnn_class_logits, mrcnn_class, mrcnn_bbox, mrcnn_mask) are computed in float32 whatever the
global dtype policy.
"""

import inspect

import keras
import tensorflow as tf
from keras import layers as KL

from mrcnn.backbone import BatchNorm
from mrcnn.config import ConfigError
from mrcnn.layers import PyramidROIAlign


# === Mask-head registry ===

MASK_HEADS = {}


def register_mask_head(name):
    """Register a mask-head builder under `name`: config.MASK_HEAD and fashion.py's --head
    accept every registered name. Use as a decorator, in a module imported before the model
    is built:

        @register_mask_head("my_head")
        def build_my_mask_graph(rois, feature_maps, image_meta, pool_size, num_classes,
                                train_bn=True):
            ...

    The contract a head must meet (the losses, detection code and weight loading rely on it):
    - rois: [batch, num_rois, (y1, x1, y2, x2)] normalized (num_rois may be dynamic);
      feature_maps: [P2, P3, P4, P5]; image_meta: [batch, IMAGE_META_SIZE];
      pool_size: config.MASK_POOL_SIZE; num_classes: config.NUM_CLASSES; train_bn: whether
      its BatchNorm layers (use mrcnn.backbone.BatchNorm) train.
    - It returns per-class mask probabilities [batch, num_rois, 2 * pool_size,
      2 * pool_size, num_classes] (config.MASK_SHAPE must be [2 * pool_size] * 2), float32.
    - Its last layer is named "mrcnn_mask", and every layer with weights is named
      "mrcnn_..." so that matterport's "heads" layer regex trains it. Wrap per-ROI 2-D layers
      in mrcnn.heads.TimeDistributed.
    Returns the builder, unchanged.
    """
    def add(builder):
        if MASK_HEADS.get(name, builder) is not builder:
            raise ValueError("a mask head named %r is registered already (%s)"
                             % (name, MASK_HEADS[name].__name__))
        MASK_HEADS[name] = builder
        return builder
    return add


# === Per-ROI wrapper ===

@keras.saving.register_keras_serializable(package="mrcnn")
class TimeDistributed(KL.TimeDistributed):
    """keras.layers.TimeDistributed that folds the ROI axis into the batch axis.

    Input [batch, num_rois, ...] is reshaped to [batch * num_rois, ...], the wrapped layer runs
    once on that, and the result is reshaped back: the behaviour of Keras 2's TimeDistributed,
    which matterport was written for. Keras 3's version instead loops over a static ROI axis
    in Python (one copy of the layer's ops per ROI: a 200-ROI head becomes 200 convolutions)
    and, for a wrapped BatchNorm in training mode, normalizes each ROI slot separately rather
    than over all ROIs. Weights and names are the same as with the Keras wrapper, so weight
    files load alike.
    """

    def __call__(self, inputs, *args, **kwargs):
        # A wrapped BatchNorm gets the graph-building `training` as BatchNorm itself would:
        # False freezes it, True / None leave it to the model's mode (see BatchNorm).
        if (isinstance(inputs, keras.KerasTensor) and isinstance(self.layer, BatchNorm)
                and "training" in kwargs):
            if kwargs["training"] is False:
                self.layer.frozen = True
            kwargs["training"] = None
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        shape = tf.shape(inputs)
        # Static inner dims where known, so the wrapped layer sees a fully defined shape.
        inner = [d if d is not None else shape[i + 2] for i, d in enumerate(inputs.shape[2:])]
        x = tf.reshape(inputs, [-1] + inner)                          # [batch * rois, ...]
        kwargs = {}
        if "training" in inspect.signature(self.layer.call).parameters:
            kwargs["training"] = training
        y = self.layer(x, **kwargs)                                   # [batch * rois, ...out]
        out_inner = [d if d is not None else tf.shape(y)[i + 1]
                     for i, d in enumerate(y.shape[1:])]
        return tf.reshape(y, [shape[0], shape[1]] + out_inner)       # [batch, rois, ...out]


# ---------------------------------------------------------------------------- RPN

def rpn_graph(feature_map, anchors_per_location, anchor_stride):
    """Region Proposal Network on one feature map.

    feature_map: [batch, height, width, depth]
    anchors_per_location: anchors per feature-map cell (len(RPN_ANCHOR_RATIOS))
    anchor_stride: 1 for an anchor set at every cell, 2 for every other cell, ...
    Returns
        rpn_class_logits [batch, anchors, 2]  anchor classifier logits (bg, fg), float32
        rpn_probs        [batch, anchors, 2]  their softmax, float32
        rpn_bbox         [batch, anchors, 4]  deltas (dy, dx, log(dh), log(dw)), float32
    where anchors = height * width * anchors_per_location / anchor_stride**2.
    """
    # Shared convolutional base of the RPN.
    shared = KL.Conv2D(512, (3, 3), padding="same", activation="relu", strides=anchor_stride,
                       name="rpn_conv_shared")(feature_map)
    #                                                                   [batch, h, w, 512]
    # Anchor score.
    x = KL.Conv2D(2 * anchors_per_location, (1, 1), padding="valid", activation="linear",
                  name="rpn_class_raw")(shared)                       # [batch, h, w, 2 * apl]
    rpn_class_logits = KL.Reshape((-1, 2), dtype="float32", name="rpn_class_logits")(x)
    #                                                                   [batch, anchors, 2]
    rpn_probs = KL.Activation("softmax", dtype="float32", name="rpn_class_xxx")(
        rpn_class_logits)                                             # [batch, anchors, 2]

    # Box refinement deltas.
    x = KL.Conv2D(4 * anchors_per_location, (1, 1), padding="valid", activation="linear",
                  name="rpn_bbox_pred")(shared)                       # [batch, h, w, 4 * apl]
    rpn_bbox = KL.Reshape((-1, 4), dtype="float32", name="rpn_bbox")(x)
    #                                                                   [batch, anchors, 4]
    return [rpn_class_logits, rpn_probs, rpn_bbox]


def build_rpn_model(anchor_stride, anchors_per_location, depth):
    """The RPN as a keras Model named "rpn_model", applied to every pyramid level in turn so
    that all levels share its weights.

    Input "input_rpn_feature_map": [batch, height, width, depth].
    Outputs [rpn_class_logits, rpn_probs, rpn_bbox] (see rpn_graph).
    """
    input_feature_map = KL.Input(shape=[None, None, depth], name="input_rpn_feature_map")
    outputs = rpn_graph(input_feature_map, anchors_per_location, anchor_stride)
    return keras.Model([input_feature_map], outputs, name="rpn_model")


# ---------------------------------------------------------------------------- classifier

def fpn_classifier_graph(rois, feature_maps, image_meta, pool_size, num_classes,
                         train_bn=True, fc_layers_size=1024, num_attributes=0):
    """Box classifier and regressor head on the FPN features.

    rois: [batch, num_rois, (y1, x1, y2, x2)] normalized
    feature_maps: [P2, P3, P4, P5], each [batch, h, w, channels]
    image_meta: [batch, IMAGE_META_SIZE]
    pool_size: RoIAlign output side (POOL_SIZE, 7)
    train_bn: passed as `training` to the BatchNorms (False freezes them)
    fc_layers_size: width of the two "fully connected" layers (1x1 convs)
    num_attributes: NUM_ATTRIBUTES; when > 0 a fourth output (Attribute-Mask R-CNN), a
        Dense on the same shared features as the class and box outputs
    Returns (all float32)
        mrcnn_class_logits [batch, num_rois, num_classes]
        mrcnn_probs        [batch, num_rois, num_classes]
        mrcnn_bbox         [batch, num_rois, num_classes, (dy, dx, log(dh), log(dw))]
        mrcnn_attribute_logits [batch, num_rois, num_attributes] (only with num_attributes;
            independent sigmoids, one per attribute)
    """
    # ROI pooling.
    x = PyramidROIAlign([pool_size, pool_size], name="roi_align_classifier")(
        [rois, image_meta] + list(feature_maps))
    #                                           [batch, num_rois, pool_size, pool_size, channels]
    # Two 1024 FC layers, implemented with Conv2D for consistency.
    x = TimeDistributed(KL.Conv2D(fc_layers_size, (pool_size, pool_size), padding="valid"),
                        name="mrcnn_class_conv1")(x)                  # [batch, num_rois, 1, 1, fc]
    x = TimeDistributed(BatchNorm(), name="mrcnn_class_bn1")(x, training=train_bn)
    x = KL.Activation("relu", name="mrcnn_class_relu1")(x)           # [batch, num_rois, 1, 1, fc]
    x = TimeDistributed(KL.Conv2D(fc_layers_size, (1, 1)),
                        name="mrcnn_class_conv2")(x)                  # [batch, num_rois, 1, 1, fc]
    x = TimeDistributed(BatchNorm(), name="mrcnn_class_bn2")(x, training=train_bn)
    x = KL.Activation("relu", name="mrcnn_class_relu2")(x)           # [batch, num_rois, 1, 1, fc]
    shared = KL.Reshape((-1, fc_layers_size), name="pool_squeeze")(x)
    #                                                                   [batch, num_rois, fc]
    # Classifier head.
    mrcnn_class_logits = TimeDistributed(KL.Dense(num_classes, dtype="float32"),
                                         dtype="float32", name="mrcnn_class_logits")(shared)
    #                                                                   [batch, num_rois, classes]
    mrcnn_probs = TimeDistributed(KL.Activation("softmax", dtype="float32"), dtype="float32",
                                  name="mrcnn_class")(mrcnn_class_logits)
    #                                                                   [batch, num_rois, classes]
    # Box regression head.
    x = TimeDistributed(KL.Dense(num_classes * 4, activation="linear", dtype="float32"),
                        dtype="float32", name="mrcnn_bbox_fc")(shared)
    #                                                                   [batch, num_rois, classes * 4]
    mrcnn_bbox = KL.Reshape((-1, num_classes, 4), dtype="float32", name="mrcnn_bbox")(x)
    #                                                                   [batch, num_rois, classes, 4]
    if not num_attributes:
        return mrcnn_class_logits, mrcnn_probs, mrcnn_bbox
    # Attribute head (Fashionpedia's Attribute-Mask R-CNN): multi-label logits.
    mrcnn_attribute_logits = TimeDistributed(
        KL.Dense(int(num_attributes), dtype="float32"), dtype="float32",
        name="mrcnn_attribute_logits")(shared)                       # [batch, num_rois, attrs]
    return mrcnn_class_logits, mrcnn_probs, mrcnn_bbox, mrcnn_attribute_logits


# ---------------------------------------------------------------------------- mask heads

@register_mask_head("fcn")
def build_fpn_mask_graph(rois, feature_maps, image_meta, pool_size, num_classes,
                         train_bn=True):
    """The paper's FCN mask head: four 3x3 convs, a 2x deconv, a 1x1 sigmoid conv.

    rois: [batch, num_rois, (y1, x1, y2, x2)] normalized
    feature_maps: [P2, P3, P4, P5], each [batch, h, w, channels]
    image_meta: [batch, IMAGE_META_SIZE]
    pool_size: RoIAlign output side (MASK_POOL_SIZE, 14)
    Returns masks [batch, num_rois, 2 * pool_size, 2 * pool_size, num_classes], float32.
    """
    x = PyramidROIAlign([pool_size, pool_size], name="roi_align_mask")(
        [rois, image_meta] + list(feature_maps))
    #                                                   [batch, num_rois, 14, 14, channels]
    for i in range(1, 5):
        x = TimeDistributed(KL.Conv2D(256, (3, 3), padding="same"),
                            name="mrcnn_mask_conv%d" % i)(x)          # [batch, num_rois, 14, 14, 256]
        x = TimeDistributed(BatchNorm(), name="mrcnn_mask_bn%d" % i)(x, training=train_bn)
        x = KL.Activation("relu", name="mrcnn_mask_relu%d" % i)(x)   # [batch, num_rois, 14, 14, 256]

    x = TimeDistributed(KL.Conv2DTranspose(256, (2, 2), strides=2, activation="relu"),
                        name="mrcnn_mask_deconv")(x)                  # [batch, num_rois, 28, 28, 256]
    x = TimeDistributed(KL.Conv2D(num_classes, (1, 1), strides=1, activation="sigmoid",
                                  dtype="float32"),
                        dtype="float32", name="mrcnn_mask")(x)
    #                                                   [batch, num_rois, 28, 28, num_classes]
    return x


def _unet_conv(x, filters, stage, index, train_bn):
    """One step of the seed's U-Net: 3x3 conv with ReLU, then BatchNorm (in that order).

    Layers "mrcnn_mask_unet_{stage}_conv{index}" and "mrcnn_mask_unet_{stage}_bn{index}".
    x: [batch, num_rois, h, w, c] -> [batch, num_rois, h, w, filters]
    """
    prefix = "mrcnn_mask_unet_%s_" % stage
    x = TimeDistributed(KL.Conv2D(filters, (3, 3), padding="same", activation="relu",
                                  kernel_initializer="he_normal"),
                        name=prefix + "conv%d" % index)(x)
    x = TimeDistributed(BatchNorm(), name=prefix + "bn%d" % index)(x, training=train_bn)
    return x


@register_mask_head("unet")
def build_unet_mask_graph(rois, feature_maps, image_meta, pool_size, num_classes,
                          train_bn=True):
    """The seed design's U-Net mask head.

    Same signature and output as build_fpn_mask_graph:
    rois: [batch, num_rois, (y1, x1, y2, x2)] normalized
    feature_maps: [P2, P3, P4, P5], each [batch, h, w, channels]
    image_meta: [batch, IMAGE_META_SIZE]
    pool_size: RoIAlign output side (MASK_POOL_SIZE, 14; must be even)
    Returns masks [batch, num_rois, 2 * pool_size, 2 * pool_size, num_classes], float32.

    Architecture (the seed's; each conv is 3x3 "same" with ReLU followed by BatchNorm):
        RoIAlign 14x14 -> conv 256, conv 256 -> (skip) -> max-pool 2x2 -> 7x7
        -> conv 256, conv 512, conv 256 -> upsample 2x -> 14x14, concatenate skip (512 ch)
        -> conv 256, conv 128 -> upsample 2x -> 28x28 -> conv 256, conv 256
        -> 1x1 conv num_classes, sigmoid.
    Every 2-D layer runs per ROI (TimeDistributed). Layer names, with the seed's in brackets:
        mrcnn_mask_unet_down1_conv1/bn1 [layer11], mrcnn_mask_unet_down1_conv2/bn2 [layer12],
        mrcnn_mask_unet_down1_pool,
        mrcnn_mask_unet_bottleneck_conv1..3/bn1..3 [layer21..23],
        mrcnn_mask_unet_up1_upsample, mrcnn_mask_unet_up1_concat,
        mrcnn_mask_unet_up1_conv1..2/bn1..2 [layer31..32],
        mrcnn_mask_unet_up2_upsample, mrcnn_mask_unet_up2_conv1..2/bn1..2 [layer41..42],
        mrcnn_mask [layer43].
    """
    if pool_size % 2:
        raise ValueError("the U-Net mask head halves its RoIAlign output once, so "
                         "MASK_POOL_SIZE must be even (it is %d)" % pool_size)
    # ROI pooling.
    x = PyramidROIAlign([pool_size, pool_size], name="roi_align_mask")(
        [rois, image_meta] + list(feature_maps))
    #                                                   [batch, num_rois, 14, 14, channels]
    # Downsampling path.
    x = _unet_conv(x, 256, "down1", 1, train_bn)                      # [batch, num_rois, 14, 14, 256]
    x = _unet_conv(x, 256, "down1", 2, train_bn)                      # [batch, num_rois, 14, 14, 256]
    skip_connection = x                                               # [batch, num_rois, 14, 14, 256]
    x = TimeDistributed(KL.MaxPooling2D((2, 2)), name="mrcnn_mask_unet_down1_pool")(x)
    #                                                                   [batch, num_rois, 7, 7, 256]
    # Bottleneck.
    x = _unet_conv(x, 256, "bottleneck", 1, train_bn)                 # [batch, num_rois, 7, 7, 256]
    x = _unet_conv(x, 512, "bottleneck", 2, train_bn)                 # [batch, num_rois, 7, 7, 512]
    x = _unet_conv(x, 256, "bottleneck", 3, train_bn)                 # [batch, num_rois, 7, 7, 256]
    # Upsampling path.
    x = TimeDistributed(KL.UpSampling2D((2, 2)), name="mrcnn_mask_unet_up1_upsample")(x)
    #                                                                   [batch, num_rois, 14, 14, 256]
    x = KL.Concatenate(axis=-1, name="mrcnn_mask_unet_up1_concat")([x, skip_connection])
    #                                                                   [batch, num_rois, 14, 14, 512]
    x = _unet_conv(x, 256, "up1", 1, train_bn)                        # [batch, num_rois, 14, 14, 256]
    x = _unet_conv(x, 128, "up1", 2, train_bn)                        # [batch, num_rois, 14, 14, 128]
    x = TimeDistributed(KL.UpSampling2D((2, 2)), name="mrcnn_mask_unet_up2_upsample")(x)
    #                                                                   [batch, num_rois, 28, 28, 128]
    x = _unet_conv(x, 256, "up2", 1, train_bn)                        # [batch, num_rois, 28, 28, 256]
    x = _unet_conv(x, 256, "up2", 2, train_bn)                        # [batch, num_rois, 28, 28, 256]
    x = TimeDistributed(KL.Conv2D(num_classes, (1, 1), padding="same", activation="sigmoid",
                                  dtype="float32"),
                        dtype="float32", name="mrcnn_mask")(x)
    #                                                   [batch, num_rois, 28, 28, num_classes]
    return x


def build_mask_head(config, rois, feature_maps, image_meta, train_bn):
    """The mask head named by config.MASK_HEAD, built with config.MASK_POOL_SIZE and
    config.NUM_CLASSES. Returns [batch, num_rois, MASK_SHAPE[0], MASK_SHAPE[1], NUM_CLASSES].
    """
    try:
        head = MASK_HEADS[config.MASK_HEAD]
    except KeyError:
        raise ConfigError("MASK_HEAD must be one of %s, not %r"
                         % (", ".join(sorted(MASK_HEADS)), config.MASK_HEAD)) from None
    if list(config.MASK_SHAPE) != [2 * config.MASK_POOL_SIZE] * 2:
        raise ValueError("the mask heads output 2 x MASK_POOL_SIZE = %d pixels a side, but "
                         "MASK_SHAPE is %s" % (2 * config.MASK_POOL_SIZE,
                                               list(config.MASK_SHAPE)))
    return head(rois, feature_maps, image_meta, config.MASK_POOL_SIZE, config.NUM_CLASSES,
                train_bn=train_bn)
