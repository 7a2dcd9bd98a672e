"""Why the model said what it said: Grad-CAM, Grad-CAM++ and Score-CAM (tf-keras-vis) and overlays."""

from __future__ import annotations

import threading
import warnings

import cv2
import numpy as np

METHODS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM"}
# Visualisers are built once per (predictor, method) and kept here, not on the shared Predictor; the lock
# keeps two app sessions from building (or running) the same one at once.
_CACHE: dict = {}
_LOCK = threading.Lock()


def _build_vis(model, method: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from tf_keras_vis.gradcam import Gradcam
        from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
        from tf_keras_vis.scorecam import Scorecam
        from tf_keras_vis.utils.model_modifiers import ReplaceToLinear
    cls = {"gradcam": Gradcam, "gradcam++": GradcamPlusPlus, "scorecam": Scorecam}[method]
    from .models import with_list_inputs

    # clone=True: the shared cached model must never be modified. tf-keras-vis feeds inputs as a list.
    return cls(with_list_inputs(model), model_modifier=ReplaceToLinear(), clone=True)


def _vis(predictor, method: str):
    """The tf-keras-vis object for (predictor, method), built once. Keyed on the predictor object,
    which the cache keeps alive, so a key can never be reused by another model."""
    key = (predictor, method)
    if key not in _CACHE:
        _CACHE[key] = _build_vis(predictor.model, method)
    return _CACHE[key]


def _maps(vis, layer: str, model_input: np.ndarray, method: str, classes: list[int]) -> np.ndarray:
    """Raw (unnormalised, non-negative) maps of one image for several classes in one batched call."""
    from tf_keras_vis.utils.scores import CategoricalScore

    x = np.repeat(model_input[None].astype(np.float32), len(classes), axis=0)
    kw = {"penultimate_layer": layer, "seek_penultimate_conv_layer": False, "normalize_cam": False}
    if method == "scorecam":
        kw["max_N"] = 16  # the top-16 activation maps: ~1 s on a CPU instead of one pass per channel
    cams = vis(CategoricalScore(list(classes)), x, **kw)
    return np.maximum(np.nan_to_num(np.asarray(cams, np.float32)), 0.0)


def _gradcam_fn(predictor):
    """Every class's Grad-CAM from one compiled forward pass to the target layer, in closed form.

    In every model build_classifier makes, the target layer feeds global average pooling and then the
    head Dense(ReLU) → Dense(logits) (dropout is the identity at inference). The gradient of logit c with
    respect to activation A[h, w, k] is therefore the same at every position, (1 / HW) · ∂logit_c/∂f_k with
    ∂logits/∂f = W1 · diag(ReLU'(f·W1 + b1)) · W2, which is exactly Grad-CAM's channel weight. Same
    maps as tf-keras-vis' Gradcam on a linear output (tested against it), several times faster.
    """
    key = (predictor, "gradcam_fn")
    if key not in _CACHE:
        import keras

        from .models import LOGITS_LAYER
        from .training import compiled

        from .colour import SCALE_LAYER, has_colour

        m = predictor.model
        # A head that also reads the image's chroma histogram (`bcc_core.colour`): that input is constant
        # with respect to the target layer, so it only shifts which head units are active.
        outs = [m.get_layer(predictor.card.gradcam_layer).output] + (
            [m.get_layer(SCALE_LAYER).output] if has_colour(m) else [])
        to_conv = compiled(keras.Model(m.input, outs))
        w1, b1 = (np.asarray(v, np.float64) for v in m.get_layer("head_dense").get_weights())
        w2, _ = (np.asarray(v, np.float64) for v in m.get_layer(LOGITS_LAYER).get_weights())

        def f(x):
            got = to_conv(x)
            got = got if isinstance(got, (list, tuple)) else [got]
            conv = np.asarray(got[0], np.float64)[0]                    # (h, w, k)
            feats = conv.mean(axis=(0, 1))                              # the GAP features
            k = feats.shape[0]
            pre = feats @ w1[:k] + b1 + (np.asarray(got[1], np.float64)[0] @ w1[k:] if len(got) > 1 else 0.0)
            jac = (w1[:k] * (pre > 0)[None, :]) @ w2                    # (k, C): ∂logits/∂features
            weights = jac.T / (conv.shape[0] * conv.shape[1])           # (C, k): mean gradient per channel
            return np.maximum(np.einsum("hwk,ck->chw", conv, weights), 0.0)

        _CACHE[key] = f
    return _CACHE[key]


def _gradcam_all(predictor, model_input: np.ndarray) -> np.ndarray:
    """(C, S, S) raw Grad-CAM maps of one image, upsampled as tf-keras-vis does (bilinear spline zoom)."""
    from scipy.ndimage import zoom

    with _LOCK:
        cams = np.asarray(_gradcam_fn(predictor)(model_input[None].astype(np.float32)), np.float32)
    h, w = cams.shape[1:]
    cams = zoom(cams, (1, model_input.shape[0] / h, model_input.shape[1] / w), order=1)
    return np.maximum(np.nan_to_num(cams), 0.0)


def class_maps(predictor, model_input: np.ndarray, method: str = "gradcam") -> np.ndarray:
    """Heatmaps of one image for every class of the model, on ONE scale: (C, S, S) float32 in [0, 1].

    The strongest map of this image reaches 1; every other class's map is scaled by the same factor,
    so a class the model finds little evidence for shows little heat (a per-map rescaling would paint
    a full-red hot spot for a class at < 0.1% probability).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if method == "gradcam":
        maps = _gradcam_all(predictor, model_input)
    else:
        with _LOCK:
            vis = _vis(predictor, method)
            maps = _maps(vis, predictor.card.gradcam_layer, model_input, method, list(range(len(predictor.classes))))
    top = float(maps.max())
    return maps / top if top > 0 else maps


def explain(predictor, model_input: np.ndarray, method: str = "gradcam", class_index: int | None = None) -> np.ndarray:
    """Class activation map for one preprocessed image, on the image's common scale across classes.

    Args:
        predictor: a loaded `Predictor` (its card names the target conv layer).
        model_input: (S, S, 3) uint8, the preprocessed image the model saw.
        method: "gradcam" | "gradcam++" | "scorecam".
        class_index: class to explain (default: the predicted one).

    Returns:
        (S, S) float32 heatmap in [0, 1] (see `class_maps`).
    """
    maps = class_maps(predictor, model_input, method)
    if class_index is None:
        class_index = int(np.argmax(predictor.model(model_input[None].astype(np.float32), training=False)[0]))
    return maps[int(class_index)]


# ---------------------------------------------------------------- sanity checks (Adebayo et al. 2018)

# A method passes when its maps tell classes apart and depend on the learned weights. Thresholds: a map
# that changes by less than 5% of the image's strongest map between classes, or whose pixel ranking
# survives randomising the classifier's top (Spearman > 0.5), explains the input, not the decision.
MIN_CLASS_DIFFERENCE = 0.05
MAX_RANDOMISED_SIMILARITY = 0.5


def randomised_top(model, n_top_layers: int = 8, seed: int = 0):
    """A copy of `model` whose top weighted layers (head and last convolution block) are re-initialised
    at random, the rest kept: the cascading model-randomisation test's first steps."""
    import keras

    keras.utils.set_random_seed(seed)
    copy = keras.models.clone_model(model)   # fresh initial weights everywhere
    weighted = [l for l in model.layers if l.weights]
    keep = weighted[:-n_top_layers] if n_top_layers else weighted
    for layer in keep:
        copy.get_layer(layer.name).set_weights(layer.get_weights())
    return copy


def sanity_check(predictor, inputs: np.ndarray, method: str, n_top_layers: int = 8) -> dict:
    """Do the method's maps differ across classes, and change when the model's top weights are randomised?

    Args:
        predictor: a loaded Predictor.
        inputs: (N, S, S, 3) uint8 model inputs (a few real images of the model's task).
        method: explanation method.
        n_top_layers: weighted layers re-initialised for the randomisation test.

    Returns:
        {"method", "n_images", "class_difference" (mean |map_a - map_b| over class pairs, common scale),
         "randomised_similarity" (mean Spearman correlation of the suggested class's map before/after),
         "passed", thresholds}.
    """
    from scipy.stats import spearmanr

    rand_vis = _build_vis(randomised_top(predictor.model, n_top_layers), method)
    layer = predictor.card.gradcam_layer
    n_cls = len(predictor.classes)
    diffs, sims = [], []
    for x in inputs:
        maps = class_maps(predictor, x, method)
        top = int(np.argmax(predictor.model(x[None].astype(np.float32), training=False)[0]))
        pairs = [(a, b) for a in range(n_cls) for b in range(a + 1, n_cls)]
        diffs.append(float(np.mean([np.abs(maps[a] - maps[b]).mean() for a, b in pairs])))
        rmap = _maps(rand_vis, layer, x, method, [top])[0]
        orig = maps[top]
        if orig.std() == 0 or rmap.std() == 0:
            sims.append(0.0 if orig.std() != rmap.std() else 1.0)
        else:
            sims.append(float(spearmanr(orig[::8, ::8].ravel(), rmap[::8, ::8].ravel())[0]))
    diff, sim = float(np.mean(diffs)), float(np.mean(sims))
    return {"method": method, "n_images": int(len(inputs)), "class_difference": diff, "randomised_similarity": sim,
            "passed": bool(diff >= MIN_CLASS_DIFFERENCE and sim <= MAX_RANDOMISED_SIMILARITY),
            "min_class_difference": MIN_CLASS_DIFFERENCE, "max_randomised_similarity": MAX_RANDOMISED_SIMILARITY,
            "n_top_layers_randomised": n_top_layers}


def overlay(model_input: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a jet-coloured heatmap over the image: (S, S, 3) uint8 RGB."""
    h = cv2.resize(heatmap.astype(np.float32), (model_input.shape[1], model_input.shape[0]))
    colour = cv2.applyColorMap(np.uint8(255 * np.clip(h, 0, 1)), cv2.COLORMAP_JET)[..., ::-1]
    return cv2.addWeighted(model_input, 1 - alpha, colour, alpha, 0)


CHECKS_FILE = "explanation_checks.json"


def check_methods(predictor, inputs: np.ndarray, methods=tuple(METHODS)) -> dict:
    """Sanity checks for every method; {"methods": {name: result}, "offered": [names that passed]}."""
    results = {m: sanity_check(predictor, inputs, m) for m in methods}
    return {"methods": results, "offered": [m for m, r in results.items() if r["passed"]],
            "reference": "Adebayo et al. 2018, Sanity checks for saliency maps (model randomisation test)"}


def offered_methods(model_dir) -> tuple[list[str], str]:
    """Methods the app may offer for a model: those that passed its recorded sanity checks.

    Returns:
        (method names, note). Without a checks file only Grad-CAM is offered, and the note says so.
    """
    import json
    from pathlib import Path

    f = Path(model_dir) / CHECKS_FILE
    if not f.is_file():
        return ["gradcam"], (f"The explanation sanity checks have not been run for this model ({CHECKS_FILE} is "
                             "missing): only Grad-CAM is offered. Run `python -m bcc_core explain-check`.")
    doc = json.loads(f.read_text())
    res = doc.get("methods", {})
    failed = [METHODS[m] for m, r in res.items() if not r.get("passed") and m in METHODS]
    note = ("Only methods that pass the sanity checks are offered (their maps differ between classes and "
            "change when the model's top layers are randomised)."
            + (f" Not offered, failed the checks: {', '.join(failed)}." if failed else ""))
    return [m for m in doc.get("offered", []) if m in METHODS], note
