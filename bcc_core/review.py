"""The review rule: which predictions may be shown as `ok`, with a stated statistical guarantee.

Selective classification with risk control (Learn-then-Test, Angelopoulos et al. 2021; fixed-sequence
testing with a Clopper-Pearson bound). On a held-out calibration set we scan confidence thresholds from
strict to lenient and keep the most lenient one whose upper confidence bound on the *selective error*
(errors among accepted images) stays ≤ α. Guarantee, under exchangeability of future images with the
calibration images: P(error rate among images shown as ok ≤ α) ≥ 1 − δ.

Split-conformal prediction sets (LAC score, Sadinle et al. 2019) are reported alongside: a set with
≥ 1 − α_set coverage, and "only single-class sets are ok" as a second view of the same idea.
"""

from __future__ import annotations

import numpy as np


def clopper_pearson_upper(errors: int, n: int, delta: float) -> float:
    """One-sided (1 − δ) upper confidence bound on a binomial rate."""
    from scipy.stats import beta

    if n == 0:
        return 1.0
    if errors >= n:
        return 1.0
    return float(beta.ppf(1 - delta, errors + 1, n - errors))


def fit_selective_threshold(confidence: np.ndarray, correct: np.ndarray, alpha: float = 0.02,
                            delta: float = 0.1, min_accepted: int = 30) -> dict:
    """Most lenient confidence threshold with a (1 − δ) bound on selective error ≤ α.

    Args:
        confidence: (N,) calibrated max-probability on calibration images (already past the other gates).
        correct: (N,) bool, prediction was right.
        alpha: tolerated error rate among accepted predictions.
        delta: allowed probability that the guarantee fails.
        min_accepted: never claim a bound from fewer accepted images.

    Returns:
        dict with threshold (None when no threshold can be certified: accept nothing), the bound,
        coverage and counts (`accepted` 0 when nothing is certified) on the calibration set.
    """
    conf = np.asarray(confidence, np.float64)
    corr = np.asarray(correct, bool)
    order = np.argsort(-conf)
    conf_s, err_s = conf[order], (~corr[order]).astype(int)
    cum_err = np.cumsum(err_s)
    n_min = int(np.ceil(np.log(delta) / np.log(1 - alpha)))
    best = None
    # Fixed-sequence testing: thresholds in decreasing order, stop at the first failure (valid at δ
    # without a multiplicity correction).
    for i in range(len(conf_s)):
        if i + 1 < len(conf_s) and conf_s[i + 1] == conf_s[i]:
            continue  # a threshold accepts all ties at once
        n_acc = i + 1
        # The sequence starts where a bound ≤ α is reachable at all (zero errors in n_min images);
        # testing stricter thresholds first would only fail on their small counts.
        if n_acc < max(min_accepted, n_min):
            continue
        ub = clopper_pearson_upper(int(cum_err[i]), n_acc, delta)
        if ub > alpha:
            break
        best = (float(conf_s[i]), ub, n_acc, int(cum_err[i]))
    if best is None:
        return {"threshold": None, "upper_bound": None, "accepted": 0, "errors": 0,
                "coverage": 0.0, "n_calibration": int(len(conf))}
    thr, ub, n_acc, errs = best
    return {"threshold": thr, "upper_bound": ub, "accepted": n_acc, "errors": errs,
            "coverage": n_acc / len(conf), "n_calibration": int(len(conf))}


def guarantee_text(alpha: float, delta: float) -> str:
    return (f"Among images shown as ok (no quality or out-of-distribution flag and calibrated confidence at or "
            f"above the threshold), the error rate is at most {alpha:.0%} with probability at least "
            f"{1 - delta:.0%}, provided future images are exchangeable with the calibration images "
            f"(same lab, stain and scanner as the training data). It does not hold for images from other labs.")


def conformal_qhat(probs: np.ndarray, labels: np.ndarray, alpha: float = 0.05) -> float:
    """Split-conformal LAC quantile: sets {c : p_c ≥ 1 − q̂} cover the truth with prob ≥ 1 − α."""
    s = 1.0 - np.asarray(probs)[np.arange(len(labels)), labels]
    n = len(s)
    level = min(1.0, np.ceil((n + 1) * (1 - alpha)) / n)
    return float(np.quantile(s, level, method="higher"))


def prediction_sets(probs: np.ndarray, qhat: float) -> np.ndarray:
    """(N, C) bool membership of each class in the conformal set."""
    return np.asarray(probs) >= 1.0 - qhat


def evaluate_rule(confidence: np.ndarray, correct: np.ndarray, flagged: np.ndarray, threshold: float) -> dict:
    """Measured behaviour of the rule on a labelled set (e.g. the test split)."""
    conf = np.asarray(confidence)
    ok = (conf >= threshold) & ~np.asarray(flagged, bool)
    n = len(conf)
    wrong_ok = int((ok & ~np.asarray(correct, bool)).sum())
    return {"n": int(n), "ok": int(ok.sum()), "review": int(n - ok.sum()),
            "ok_fraction": float(ok.mean()) if n else 0.0,
            "selective_error": float(wrong_ok / ok.sum()) if ok.sum() else 0.0,
            "wrong_ok_of_all": float(wrong_ok / n) if n else 0.0,
            "accuracy_of_reviewed": float(np.asarray(correct)[~ok].mean()) if (~ok).sum() else None}
