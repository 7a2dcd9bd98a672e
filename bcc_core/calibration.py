"""Temperature scaling (Guo et al. 2017): fit on validation logits, apply everywhere, measure ECE."""

from __future__ import annotations

import numpy as np


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities.

    Args:
        logits: (N, C) float pre-softmax scores.
        temperature: > 0, from the model card.

    Returns:
        (N, C) float64 probabilities, rows sum to 1.
    """
    from .trust import softmax_t  # numpy only: importing this module needs no scipy

    return softmax_t(logits, temperature)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels."""
    from scipy.special import log_softmax

    lp = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-lp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising validation NLL (searched on log T in [1/20, 20])."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lt: nll(logits, labels, float(np.exp(lt))), bounds=(-3.0, 3.0),
                          method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict:
    """Reliability-diagram data and expected calibration error (equal-width confidence bins).

    Returns:
        dict with `ece`, `mce`, and per-bin lists `bin_lower`, `bin_upper`, `confidence`,
        `accuracy`, `count` (bins with no samples have None confidence/accuracy).
    """
    probs = np.asarray(probs)
    conf = probs.max(1)
    correct = (probs.argmax(1) == np.asarray(labels)).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    out = {"bin_lower": edges[:-1].tolist(), "bin_upper": edges[1:].tolist(), "confidence": [],
           "accuracy": [], "count": []}
    ece = mce = 0.0
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        out["count"].append(n)
        if n == 0:
            out["confidence"].append(None)
            out["accuracy"].append(None)
            continue
        c, a = float(conf[m].mean()), float(correct[m].mean())
        out["confidence"].append(c)
        out["accuracy"].append(a)
        ece += n / len(conf) * abs(a - c)
        mce = max(mce, abs(a - c))
    out["ece"] = float(ece)
    out["mce"] = float(mce)
    out["n_bins"] = n_bins
    return out


def calibration_report(val_logits, val_labels, test_logits, test_labels, n_bins: int = 15) -> dict:
    """Fit T on validation; ECE before/after on validation and test; reliability data for test."""
    t = fit_temperature(val_logits, val_labels)
    before = reliability(apply_temperature(test_logits, 1.0), test_labels, n_bins)
    after = reliability(apply_temperature(test_logits, t), test_labels, n_bins)
    return {
        "temperature": t,
        "method": "temperature scaling (Guo et al. 2017), fitted on the validation split by NLL",
        "n_bins": n_bins,
        "val_nll_before": nll(val_logits, val_labels), "val_nll_after": nll(val_logits, val_labels, t),
        "test_ece_before": before["ece"], "test_ece_after": after["ece"],
        "reliability_before": before, "reliability_after": after,
    }
