"""Backbone registry: name → constructor, input size, normalisation and Grad-CAM layer.

Every backbone is built as a flat graph on the classifier's own input tensor
(`Backbone(input_tensor=..., include_top=False)`), so tf-keras-vis can reach its last conv layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Where the offline MobileNetV2 ImageNet weights sit beside a checkout (../shared/weights/README.md), whether
# or not they are there: scripts name this path in their skip messages.
OFFLINE_IMAGENET_WEIGHTS = (Path(__file__).resolve().parents[2] / "shared" / "weights"
                            / "mobilenet_v2_1.0_224_imagenet_notop.weights.h5")
WEIGHTS_HELP = "weights must be 'imagenet' (downloaded by Keras, needs internet), a path to a .weights.h5 / .h5 file, or 'none'"


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of the code needs to know about a backbone.

    Attributes:
        name: registry key.
        input_size: square input side the ImageNet weights expect.
        gradcam_layer: name of the last convolutional activation (Grad-CAM target).
        normalisation: how [0, 1] pixels are mapped for this backbone: "minus1_1" (x*2-1),
            "caffe" (ResNet: BGR, mean-subtracted on 0..255) or "raw255" (EfficientNet normalises
            internally from 0..255).
        build: constructor (input_tensor, weights) -> keras.Model without top.
        early_layer: a mid-network block output whose pooled activations feed the early-layer OOD
            detector (colour/texture statistics that fine-tuning for lab invariance leaves intact).
    """

    name: str
    input_size: int
    gradcam_layer: str
    normalisation: str
    build: Callable
    early_layer: str | None = None


def _mobilenetv2(input_tensor, weights):
    import keras

    return keras.applications.MobileNetV2(include_top=False, weights=weights, input_tensor=input_tensor,
                                          input_shape=tuple(input_tensor.shape[1:]), alpha=1.0)


def _efficientnetb0(input_tensor, weights):
    import keras

    return keras.applications.EfficientNetB0(include_top=False, weights=weights, input_tensor=input_tensor,
                                             input_shape=tuple(input_tensor.shape[1:]))


def _resnet50(input_tensor, weights):
    import keras

    return keras.applications.ResNet50(include_top=False, weights=weights, input_tensor=input_tensor,
                                       input_shape=tuple(input_tensor.shape[1:]))


def _small_cnn(input_tensor, weights):
    """Study 2's from-scratch CNN: four conv blocks (32-64-128-256), batch-norm, max-pool."""
    import keras
    from keras import layers

    if weights not in (None, "none"):
        raise ValueError("small_cnn has no pretrained weights; use --weights none")
    x = input_tensor
    for i, f in enumerate((32, 64, 128, 256), start=1):
        x = layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = layers.Activation("relu", name=f"block{i}_relu" if i < 4 else "last_conv_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    # Like keras.applications: the sub-model starts at the classifier's own Input (flat graph).
    return keras.Model(keras.utils.get_source_inputs(input_tensor), x, name="small_cnn")


REGISTRY: dict[str, BackboneSpec] = {
    "mobilenetv2": BackboneSpec("mobilenetv2", 224, "out_relu", "minus1_1", _mobilenetv2, "block_9_add"),
    "efficientnetb0": BackboneSpec("efficientnetb0", 224, "top_activation", "raw255", _efficientnetb0, "block4c_add"),
    "resnet50": BackboneSpec("resnet50", 224, "conv5_block3_out", "caffe", _resnet50, "conv3_block4_out"),
    "small_cnn": BackboneSpec("small_cnn", 224, "block4_pool", "zero_one", _small_cnn, "block2_pool"),
}


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone by name, with a message listing the valid ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(REGISTRY)}") from None


def resolve_weights(weights: str | None) -> str | None:
    """Normalise the weights argument: 'imagenet', an existing file path, or None.

    Raises:
        ValueError: for anything else, saying what is accepted.
    """
    if weights is None or str(weights).lower() in ("none", ""):
        return None
    if str(weights).lower() == "imagenet":
        return "imagenet"
    p = Path(weights).expanduser()
    if not p.is_file():
        raise ValueError(f"weights file not found: {p}. {WEIGHTS_HELP}")
    return str(p)


def default_weights_path() -> Path | None:
    """The offline MobileNetV2 ImageNet weights beside a checkout (`OFFLINE_IMAGENET_WEIGHTS`), if present."""
    return OFFLINE_IMAGENET_WEIGHTS if OFFLINE_IMAGENET_WEIGHTS.is_file() else None
