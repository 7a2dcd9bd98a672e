"""Grad-CAM looks at the evidence: on a model whose classes are 'a red patch' and 'a blue patch', each class's
map peaks on its planted patch (an all-zero or uniform map fails)."""

from __future__ import annotations

import numpy as np
import pytest

S = 32


class _Card:
    gradcam_layer = "target_conv"


class _StubPredictor:
    """What bcc_core.explain reads of a Predictor: the model, its card's target layer, the classes."""

    def __init__(self, model):
        self.model, self.card, self.classes = model, _Card(), ["red", "blue"]


@pytest.fixture(scope="module")
def predictor():
    import keras
    from keras import layers

    from bcc_core.models import FEATURES_LAYER, LOGITS_LAYER, PROBS_LAYER

    inp = keras.Input((S, S, 3), name="image")
    x = layers.Rescaling(1.0 / 255.0, name="scale_0_1")(inp)
    # Two 1x1 detectors on the full-resolution grid: red minus green, blue minus green.
    conv = layers.Conv2D(2, 1, activation="relu", name="target_conv")
    x = conv(x)
    f = layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(x)
    dense = layers.Dense(2, activation="relu", name="head_dense")
    logits_layer = layers.Dense(2, name=LOGITS_LAYER)
    out = layers.Activation("softmax", name=PROBS_LAYER)(logits_layer(dense(f)))
    model = keras.Model(inp, out)
    conv.set_weights([np.array([[[[1, 0], [-1, -1], [0, 1]]]], np.float32).reshape(1, 1, 3, 2),
                      np.zeros(2, np.float32)])
    dense.set_weights([np.eye(2, dtype=np.float32), np.zeros(2, np.float32)])
    logits_layer.set_weights([10 * np.eye(2, dtype=np.float32), np.zeros(2, np.float32)])
    return _StubPredictor(model)


def _image(red_at, blue_at=None, side=6):
    img = np.full((S, S, 3), 120, np.uint8)  # grey: neither detector fires
    (ry, rx) = red_at
    img[ry:ry + side, rx:rx + side] = (230, 30, 30)
    if blue_at is not None:
        by, bx = blue_at
        img[by:by + side, bx:bx + side] = (30, 30, 230)
    return img


def _inside(yx, at, side=6, margin=1):
    y, x = yx
    return at[0] - margin <= y < at[0] + side + margin and at[1] - margin <= x < at[1] + side + margin


@pytest.mark.parametrize("red_at, blue_at", [((3, 4), (20, 22)), ((22, 2), (4, 18)), ((12, 12), None)])
def test_each_class_map_peaks_on_its_planted_patch(predictor, red_at, blue_at):
    from bcc_core.explain import class_maps, explain

    img = _image(red_at, blue_at)
    maps = class_maps(predictor, img, "gradcam")
    assert maps.shape == (2, S, S) and maps.max() == pytest.approx(1.0)
    red_peak = np.unravel_index(np.argmax(maps[0]), maps[0].shape)
    assert _inside(red_peak, red_at), (red_peak, red_at)
    ry, rx = red_at
    # Most of the red map's mass is on the red patch (bilinear upsampling spreads it by about a pixel).
    patch = np.zeros((S, S), bool)
    patch[max(ry - 2, 0):ry + 8, max(rx - 2, 0):rx + 8] = True
    assert maps[0][patch].sum() >= 0.8 * maps[0].sum()
    if blue_at is not None:
        blue_peak = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
        assert _inside(blue_peak, blue_at), (blue_peak, blue_at)
        by, bx = blue_at
        assert maps[0][by + 1:by + 5, bx + 1:bx + 5].max() < 0.05  # no red evidence on the blue patch
    # explain() of the predicted class (red when only red is planted) is that class's map.
    if blue_at is None:
        assert np.array_equal(explain(predictor, img, "gradcam"), maps[0])


def test_moving_the_patch_moves_the_peak(predictor):
    from bcc_core.explain import class_maps

    peaks = []
    for at in [(2, 2), (2, 24), (24, 2), (24, 24)]:
        m = class_maps(predictor, _image(at), "gradcam")[0]
        peaks.append(np.unravel_index(np.argmax(m), m.shape))
        assert _inside(peaks[-1], at)
    assert len(set(peaks)) == 4
