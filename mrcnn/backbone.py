"""ResNet50/101 + Feature Pyramid Network backbone, with matterport's layer names.

Layer names are part of the interface: matterport's released weights (mask_rcnn_coco.h5,
the ImageNet ResNet weights) load by name, and training regexes ("heads", "3+", "4+", "5+")
select layers by name. The names are:

    conv1, bn_conv1                                stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool)
    res{stage}{block}_branch2a/2b/2c               bottleneck convs  (stage 2..5, block a, b, ...)
    bn{stage}{block}_branch2a/2b/2c                their BatchNorms
    res{stage}a_branch1, bn{stage}a_branch1        projection shortcut of the first block
    res{stage}{block}_out                          the block's final ReLU
    fpn_c5p5 .. fpn_c2p2                           FPN lateral 1x1 convs
    fpn_p5upsampled .. fpn_p3upsampled, fpn_p4add .. fpn_p2add     top-down pathway
    fpn_p2 .. fpn_p5 (3x3 convs), fpn_p6 (1x1 max-pool, stride 2 of P5)

Stage 2 has blocks a-c, stage 3 a-d, stage 4 a-f (resnet50) or a-w (resnet101), stage 5 a-c.

A custom backbone: set `config.BACKBONE` to a callable

    backbone(input_image, stage5=True, train_bn=False) -> [C1, C2, C3, C4, C5]

(C1 may be None; C2..C5 at strides 4, 8, 16, 32) and `config.COMPUTE_BACKBONE_SHAPE` to a
callable `(image_shape) -> [[h, w] per pyramid level]`; see `build_backbone` and
`mrcnn.utils.compute_backbone_shapes`.
"""

import keras
from keras import layers as KL

# The pyramid's feature-map sizes are numpy arithmetic, shared with the data pipeline.
from mrcnn.utils import compute_backbone_shapes  # noqa: F401

RESNET_ARCHITECTURES = ("resnet50", "resnet101")

# Number of blocks of stage 4 (the other stages are the same for both depths).
STAGE4_BLOCKS = {"resnet50": 6, "resnet101": 23}


@keras.saving.register_keras_serializable(package="mrcnn")
class BatchNorm(KL.BatchNormalization):
    """BatchNormalization whose mode is chosen when it is placed in the graph, as in matterport.

    Call it as `BatchNorm(name=...)(x, training=train_bn)`:
    - `training=False` freezes the layer: it always normalizes with its moving statistics and
      never updates them, even while the model trains (what small batches need:
      config.TRAIN_BN = False). Its gamma and beta stay trainable, as in matterport.
    - `training=True` or `None`: the layer follows the mode the model runs in (batch
      statistics in fit, moving statistics in predict / detect / a plain `model(x)`).
      Matterport's graph kept `training=True` even at inference; this does not.

    Why the extra `frozen` state: a Keras 3 functional model passes its own `training` value
    to every layer at run time, overriding the `training=False` recorded when the graph was
    built (Keras 2, which matterport was written for, kept it). So a `training=False` given
    with a symbolic input sets `frozen`, which `call` honours and `get_config` saves.
    """

    def __init__(self, *args, frozen=False, **kwargs):
        # Positional arguments are BatchNormalization's (axis, momentum, ...), as matterport's.
        super().__init__(*args, **kwargs)
        self.frozen = bool(frozen)

    def __call__(self, inputs, *args, **kwargs):
        if isinstance(inputs, keras.KerasTensor) and "training" in kwargs:
            # Building the graph: False freezes; True is left to the model's mode (Keras
            # would otherwise use batch statistics in a plain `model(x)` call).
            if kwargs["training"] is False:
                self.frozen = True
            kwargs["training"] = None
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs, training=None):
        if self.frozen:
            training = False
        return super().call(inputs, training=training)

    def get_config(self):
        config = super().get_config()
        config["frozen"] = self.frozen
        return config


# ---------------------------------------------------------------------------- ResNet

def identity_block(input_tensor, kernel_size, filters, stage, block, use_bias=True,
                   train_bn=True):
    """Bottleneck block whose shortcut is the identity.

    input_tensor: [batch, h, w, filters[2]]
    kernel_size: side of the middle conv (3)
    filters: [f1, f2, f3] channels of the three convs
    stage: 2..5; block: 'a', 'b', ... (they make the layer names)
    Returns [batch, h, w, f3].
    """
    f1, f2, f3 = filters
    conv_name_base = "res" + str(stage) + block + "_branch"
    bn_name_base = "bn" + str(stage) + block + "_branch"

    x = KL.Conv2D(f1, (1, 1), name=conv_name_base + "2a", use_bias=use_bias)(input_tensor)
    x = BatchNorm(name=bn_name_base + "2a")(x, training=train_bn)
    x = KL.Activation("relu")(x)                                      # [batch, h, w, f1]

    x = KL.Conv2D(f2, (kernel_size, kernel_size), padding="same",
                  name=conv_name_base + "2b", use_bias=use_bias)(x)
    x = BatchNorm(name=bn_name_base + "2b")(x, training=train_bn)
    x = KL.Activation("relu")(x)                                      # [batch, h, w, f2]

    x = KL.Conv2D(f3, (1, 1), name=conv_name_base + "2c", use_bias=use_bias)(x)
    x = BatchNorm(name=bn_name_base + "2c")(x, training=train_bn)   # [batch, h, w, f3]

    x = KL.Add()([x, input_tensor])
    x = KL.Activation("relu", name="res" + str(stage) + block + "_out")(x)
    return x                                                          # [batch, h, w, f3]


def conv_block(input_tensor, kernel_size, filters, stage, block, strides=(2, 2),
               use_bias=True, train_bn=True):
    """Bottleneck block with a projection shortcut (1x1 conv + BN), striding both branches.

    input_tensor: [batch, h, w, c]
    Returns [batch, h / s, w / s, filters[2]] for strides (s, s).
    """
    f1, f2, f3 = filters
    conv_name_base = "res" + str(stage) + block + "_branch"
    bn_name_base = "bn" + str(stage) + block + "_branch"

    x = KL.Conv2D(f1, (1, 1), strides=strides, name=conv_name_base + "2a",
                  use_bias=use_bias)(input_tensor)
    x = BatchNorm(name=bn_name_base + "2a")(x, training=train_bn)
    x = KL.Activation("relu")(x)                                      # [batch, h/s, w/s, f1]

    x = KL.Conv2D(f2, (kernel_size, kernel_size), padding="same",
                  name=conv_name_base + "2b", use_bias=use_bias)(x)
    x = BatchNorm(name=bn_name_base + "2b")(x, training=train_bn)
    x = KL.Activation("relu")(x)                                      # [batch, h/s, w/s, f2]

    x = KL.Conv2D(f3, (1, 1), name=conv_name_base + "2c", use_bias=use_bias)(x)
    x = BatchNorm(name=bn_name_base + "2c")(x, training=train_bn)   # [batch, h/s, w/s, f3]

    shortcut = KL.Conv2D(f3, (1, 1), strides=strides, name=conv_name_base + "1",
                         use_bias=use_bias)(input_tensor)
    shortcut = BatchNorm(name=bn_name_base + "1")(shortcut, training=train_bn)

    x = KL.Add()([x, shortcut])
    x = KL.Activation("relu", name="res" + str(stage) + block + "_out")(x)
    return x                                                          # [batch, h/s, w/s, f3]


def resnet_graph(input_image, architecture, stage5=False, train_bn=True):
    """ResNet50 or ResNet101 (matterport's layer names).

    input_image: [batch, H, W, 3]
    architecture: "resnet50" or "resnet101"
    stage5: build stage 5 (else C5 is None)
    train_bn: passed as `training` to every BatchNorm (False freezes them)
    Returns [C1, C2, C3, C4, C5] at strides 4 (C1, after the max-pool), 4, 8, 16, 32.
    """
    if architecture not in RESNET_ARCHITECTURES:
        raise ValueError("architecture must be one of %s, not %r"
                         % (", ".join(RESNET_ARCHITECTURES), architecture))
    # Stage 1
    x = KL.ZeroPadding2D((3, 3))(input_image)                        # [batch, H+6, W+6, 3]
    x = KL.Conv2D(64, (7, 7), strides=(2, 2), name="conv1", use_bias=True)(x)
    x = BatchNorm(name="bn_conv1")(x, training=train_bn)
    x = KL.Activation("relu")(x)                                      # [batch, H/2, W/2, 64]
    C1 = x = KL.MaxPooling2D((3, 3), strides=(2, 2), padding="same")(x)
    #                                                                   [batch, H/4, W/4, 64]
    # Stage 2
    x = conv_block(x, 3, [64, 64, 256], stage=2, block="a", strides=(1, 1), train_bn=train_bn)
    x = identity_block(x, 3, [64, 64, 256], stage=2, block="b", train_bn=train_bn)
    C2 = x = identity_block(x, 3, [64, 64, 256], stage=2, block="c", train_bn=train_bn)
    #                                                                   [batch, H/4, W/4, 256]
    # Stage 3
    x = conv_block(x, 3, [128, 128, 512], stage=3, block="a", train_bn=train_bn)
    for block in "bcd":
        x = identity_block(x, 3, [128, 128, 512], stage=3, block=block, train_bn=train_bn)
    C3 = x                                                            # [batch, H/8, W/8, 512]
    # Stage 4
    x = conv_block(x, 3, [256, 256, 1024], stage=4, block="a", train_bn=train_bn)
    for i in range(1, STAGE4_BLOCKS[architecture]):
        x = identity_block(x, 3, [256, 256, 1024], stage=4, block=chr(ord("a") + i),
                           train_bn=train_bn)
    C4 = x                                                            # [batch, H/16, W/16, 1024]
    # Stage 5
    if stage5:
        x = conv_block(x, 3, [512, 512, 2048], stage=5, block="a", train_bn=train_bn)
        x = identity_block(x, 3, [512, 512, 2048], stage=5, block="b", train_bn=train_bn)
        C5 = identity_block(x, 3, [512, 512, 2048], stage=5, block="c", train_bn=train_bn)
        #                                                               [batch, H/32, W/32, 2048]
    else:
        C5 = None
    return [C1, C2, C3, C4, C5]


# === Backbone registry ===

BACKBONES = {}


def register_backbone(name):
    """Register a backbone builder under `name`: config.BACKBONE accepts every registered
    name (a callable BACKBONE needs no registration). Use as a decorator:

        @register_backbone("my_net")
        def my_net_graph(input_image, stage5=True, train_bn=True):
            ...
            return [C1, C2, C3, C4, C5]

    The contract: input_image [batch, H, W, channels]; returns five tensors C1..C5 (C1 may
    be None; C5 None when stage5 is False) at strides 2-4, 4, 8, 16, 32
    (config.BACKBONE_STRIDES[:4] and 64 for P6), with any channel count. Its BatchNorm layers
    use mrcnn.backbone.BatchNorm with `train_bn`, and its layer names do not start with
    "mrcnn_", "rpn_" or "fpn_" (those are the heads, trained by the "heads" stage).
    Returns the builder, unchanged.
    """
    def add(builder):
        if BACKBONES.get(name, builder) is not builder:
            raise ValueError("a backbone named %r is registered already" % (name,))
        BACKBONES[name] = builder
        return builder
    return add


@register_backbone("resnet50")
def resnet50_graph(input_image, stage5=True, train_bn=True):
    """ResNet-50 (matterport's layer names): resnet_graph(input_image, "resnet50", ...)."""
    return resnet_graph(input_image, "resnet50", stage5=stage5, train_bn=train_bn)


@register_backbone("resnet101")
def resnet101_graph(input_image, stage5=True, train_bn=True):
    """ResNet-101 (matterport's layer names): resnet_graph(input_image, "resnet101", ...)."""
    return resnet_graph(input_image, "resnet101", stage5=stage5, train_bn=train_bn)


def build_backbone(input_image, config, stage5=True, train_bn=None):
    """The backbone named by config.BACKBONE (a name in BACKBONES) or a callable.

    input_image: [batch, H, W, 3]
    train_bn: defaults to config.TRAIN_BN
    Returns [C1, C2, C3, C4, C5]. A callable BACKBONE is called as
    `config.BACKBONE(input_image, stage5=stage5, train_bn=train_bn)` and must return five
    tensors (C1 may be None) at strides 2-4, 4, 8, 16, 32.
    """
    if train_bn is None:
        train_bn = config.TRAIN_BN
    builder = config.BACKBONE if callable(config.BACKBONE) else BACKBONES[config.BACKBONE]
    outputs = builder(input_image, stage5=stage5, train_bn=train_bn)
    if not isinstance(outputs, (list, tuple)) or len(outputs) != 5:
        raise ValueError("a backbone must return [C1, C2, C3, C4, C5] (C1 may be None), got %r"
                         % (type(outputs).__name__,))
    return list(outputs)


# ---------------------------------------------------------------------------- FPN

def fpn_graph(C2, C3, C4, C5, top_down_pyramid_size):
    """Feature Pyramid Network top-down pathway (matterport's layer names).

    C2..C5: [batch, H/4, W/4, c2], ..., [batch, H/32, W/32, c5]
    Returns [P2, P3, P4, P5, P6], each with top_down_pyramid_size channels, at strides
    4, 8, 16, 32, 64. P6 is only used by the RPN (as in the paper).
    """
    size = top_down_pyramid_size
    P5 = KL.Conv2D(size, (1, 1), name="fpn_c5p5")(C5)               # [batch, H/32, W/32, size]
    P4 = KL.Add(name="fpn_p4add")([
        KL.UpSampling2D(size=(2, 2), name="fpn_p5upsampled")(P5),
        KL.Conv2D(size, (1, 1), name="fpn_c4p4")(C4)])               # [batch, H/16, W/16, size]
    P3 = KL.Add(name="fpn_p3add")([
        KL.UpSampling2D(size=(2, 2), name="fpn_p4upsampled")(P4),
        KL.Conv2D(size, (1, 1), name="fpn_c3p3")(C3)])               # [batch, H/8, W/8, size]
    P2 = KL.Add(name="fpn_p2add")([
        KL.UpSampling2D(size=(2, 2), name="fpn_p3upsampled")(P3),
        KL.Conv2D(size, (1, 1), name="fpn_c2p2")(C2)])               # [batch, H/4, W/4, size]
    # 3x3 convs on every level to get the final feature maps.
    P2 = KL.Conv2D(size, (3, 3), padding="same", name="fpn_p2")(P2)  # [batch, H/4, W/4, size]
    P3 = KL.Conv2D(size, (3, 3), padding="same", name="fpn_p3")(P3)  # [batch, H/8, W/8, size]
    P4 = KL.Conv2D(size, (3, 3), padding="same", name="fpn_p4")(P4)  # [batch, H/16, W/16, size]
    P5 = KL.Conv2D(size, (3, 3), padding="same", name="fpn_p5")(P5)  # [batch, H/32, W/32, size]
    # P6 is a 2x subsampling of P5.
    P6 = KL.MaxPooling2D(pool_size=(1, 1), strides=2, name="fpn_p6")(P5)
    #                                                                   [batch, H/64, W/64, size]
    return [P2, P3, P4, P5, P6]
