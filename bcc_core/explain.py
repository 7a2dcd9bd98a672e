"""Why the model said what it said: Grad-CAM, Grad-CAM++ and Score-CAM (tf-keras-vis) and overlays."""

from __future__ import annotations

import threading
import warnings

import cv2
import numpy as np

METHODS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM"}
# Visualisers are built once per (model, method) and kept here, not on the shared Predictor; the lock
# keeps two app sessions from building (or running) the same one at once.
_CACHE: dict = {}
_LOCK = threading.Lock()


def _vis(predictor, method: str):
    """Build (once per predictor and method) the tf-keras-vis object on a linear-output copy."""
    key = (id(predictor.model), method)
    if key in _CACHE:
        return _CACHE[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from tf_keras_vis.gradcam import Gradcam
        from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
        from tf_keras_vis.scorecam import Scorecam
        from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    cls = {"gradcam": Gradcam, "gradcam++": GradcamPlusPlus, "scorecam": Scorecam}[method]
    # clone=True: the shared cached model must never be modified.
    _CACHE[key] = cls(predictor.model, model_modifier=ReplaceToLinear(), clone=True)
    return _CACHE[key]


def explain(predictor, model_input: np.ndarray, method: str = "gradcam", class_index: int | None = None) -> np.ndarray:
    """Class activation map for one preprocessed image.

    Args:
        predictor: a loaded `Predictor` (its card names the target conv layer).
        model_input: (S, S, 3) uint8, the preprocessed image the model saw.
        method: "gradcam" | "gradcam++" | "scorecam".
        class_index: class to explain (default: the predicted one).

    Returns:
        (S, S) float32 heatmap in [0, 1].
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    from tf_keras_vis.utils.scores import CategoricalScore

    x = model_input[None].astype(np.float32)
    if class_index is None:
        class_index = int(np.argmax(predictor.model(x, training=False)[0]))
    with _LOCK:
        vis = _vis(predictor, method)
    kw = {"penultimate_layer": predictor.card.gradcam_layer, "seek_penultimate_conv_layer": False}
    if method == "scorecam":
        kw["max_N"] = 16  # the top-16 activation maps: ~1 s on a CPU instead of one pass per channel
    with _LOCK:
        cam = vis(CategoricalScore([class_index]), x, **kw)[0]
    cam = np.nan_to_num(np.asarray(cam, np.float32))
    lo, hi = float(cam.min()), float(cam.max())
    return (cam - lo) / (hi - lo) if hi > lo else np.zeros_like(cam)


def overlay(model_input: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a jet-coloured heatmap over the image: (S, S, 3) uint8 RGB."""
    h = cv2.resize(heatmap.astype(np.float32), (model_input.shape[1], model_input.shape[0]))
    colour = cv2.applyColorMap(np.uint8(255 * np.clip(h, 0, 1)), cv2.COLORMAP_JET)[..., ::-1]
    return cv2.addWeighted(model_input, 1 - alpha, colour, alpha, 0)
