"""Weight initialization schemes for a built Mask R-CNN (config.WEIGHT_INIT).

"keras" (the default, matterport's): every layer keeps the initializer it was built with:
Keras' Glorot uniform kernels and zero biases (He normal in the U-Net head, as the seed
specifies). Pretrained weights (COCO, ImageNet) overwrite most of them anyway.

"torchvision": the initialization torchvision's Mask R-CNN starts from when it is trained
without pretrained weights. Glorot uniform keeps about half the variance a ReLU layer needs,
so through a from-scratch ResNet with frozen (identity) BatchNorm the signal shrinks block
after block; He initialization keeps it (and with frozen BatchNorm lets it grow through the
residual sums). Measured from scratch on benchmarks/bench_accuracy.py's shapes (with
PIXEL_STD), it did worse than "keras" in both pairings tried (benchmarks/RESULTS.md), so no
configuration here uses it; it is there to reproduce torchvision's starting point. It draws
    backbone, mask-head and U-Net convolutions (each followed by a ReLU) and the mask logits
        from He normal with fan-out: N(0, 2 / (kh * kw * out_channels));
    FPN convolutions (linear) and the box head's two fully connected layers
        from a uniform distribution of variance 1 / fan-in;
    the RPN's convolutions and the class (and attribute) logits from N(0, 0.01);
    the box deltas from N(0, 0.001), so the first boxes are the proposals;
    every bias zero. BatchNorm layers keep theirs.
Layers are told apart by matterport's names ("rpn_*", "fpn_*", "mrcnn_*"); any other
convolution or dense layer (the backbone's, a custom head's) gets He normal with fan-out.
"""

import keras

from mrcnn.config import WEIGHT_INIT_SCHEMES


def _he_fan_out(seed):
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal", seed=seed)


def _uniform_fan_in(seed):
    return keras.initializers.VarianceScaling(1.0, "fan_in", "uniform", seed=seed)


def _normal(stddev):
    return lambda seed: keras.initializers.RandomNormal(0.0, stddev, seed=seed)


# (name prefix, initializer factory), first match wins; the rest get He normal fan-out.
_TORCHVISION_RULES = (
    ("rpn_", _normal(0.01)),
    ("fpn_", _uniform_fan_in),
    ("mrcnn_class_logits", _normal(0.01)),
    ("mrcnn_attribute_logits", _normal(0.01)),
    ("mrcnn_bbox_fc", _normal(0.001)),
    ("mrcnn_class_conv", _uniform_fan_in),
)


def _kernel_layers(layer):
    """(name, layer) of every layer with a kernel inside `layer`: nested models (the RPN)
    are walked, a TimeDistributed wrapper lends its name to the layer it wraps."""
    if isinstance(layer, keras.Model):
        for inner in layer.layers:
            yield from _kernel_layers(inner)
    elif isinstance(layer, keras.layers.TimeDistributed):
        if hasattr(layer.layer, "kernel"):
            yield layer.name, layer.layer
    elif hasattr(layer, "kernel"):
        yield layer.name, layer


def initialize_weights(keras_model, scheme, seed=None):
    """Re-draw the kernels (and zero the biases) of `keras_model`'s convolution and dense
    layers by `scheme` (WEIGHT_INIT_SCHEMES). "keras" leaves the model as built. Returns the
    number of layers re-drawn. Seeded by `seed` (an int), else by Keras' global seed
    (keras.utils.set_random_seed)."""
    if scheme not in WEIGHT_INIT_SCHEMES:
        raise ValueError("WEIGHT_INIT must be one of %s, not %r"
                         % (", ".join(WEIGHT_INIT_SCHEMES), scheme))
    if scheme == "keras":
        return 0
    count = 0
    for i, (name, layer) in enumerate(_kernel_layers(keras_model)):
        factory = next((f for prefix, f in _TORCHVISION_RULES if name.startswith(prefix)),
                       _he_fan_out)
        kernel = layer.kernel
        init = factory(None if seed is None else seed + i)
        kernel.assign(keras.ops.cast(init(kernel.shape), kernel.dtype))
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(keras.ops.zeros(layer.bias.shape, layer.bias.dtype))
        count += 1
    return count
