"""Out-of-distribution scores from the prediction's own forward pass (features + logits).

Three scores, higher = more unusual:
- `mahalanobis`: min over classes of the Mahalanobis distance to the class mean, shared Ledoit-Wolf
  shrinkage covariance (Lee et al. 2018, without input perturbation).
- `knn`: distance to the k-th nearest training feature after L2 normalisation (Sun et al. 2022).
- `energy`: -T·logsumexp(logits/T) (Liu et al. 2020).
- `mahalanobis_early`: the same Mahalanobis score on the pooled activations of a mid-network layer
  (Lee et al. 2018 combine several layers). Fine-tuning for lab invariance teaches the top of the
  network to ignore colour and texture; the early layer still sees them, so a cell type or a lab that
  looks unlike the training images is caught even when the top features are confident.
Thresholds are fitted on in-distribution validation data only.
"""

from __future__ import annotations

import numpy as np

METHODS = ("mahalanobis", "knn", "energy")
EARLY = "mahalanobis_early"
COMBINED = "union"
_EARLY_KEYS = ("early_means", "early_precision")
_INDEX_KEYS = ("precision_index", "early_precision_index")


def methods_for(stats: dict | None) -> tuple[str, ...]:
    """The detectors these statistics support (the early-layer one only when it was fitted)."""
    return METHODS + ((EARLY,) if stats and "early_means" in stats else ())


def _class_gaussian(f: np.ndarray, labels: np.ndarray, n_classes: int):
    from sklearn.covariance import LedoitWolf

    means = np.stack([f[labels == c].mean(0) for c in range(n_classes)])
    lw = LedoitWolf().fit(f - means[labels])
    return means, lw


def _grouped_precision(f: np.ndarray, labels: np.ndarray, means: np.ndarray, cov_groups: np.ndarray) -> np.ndarray:
    """(G, D, D) Ledoit-Wolf precision per covariance group, each from its own components' residuals
    (e.g. one per source: another lab's cells vary differently from the training data's)."""
    from sklearn.covariance import LedoitWolf

    out = []
    for g in range(int(cov_groups.max()) + 1):
        rows = np.isin(labels, np.flatnonzero(cov_groups == g))
        out.append(LedoitWolf().fit(f[rows] - means[labels[rows]]).precision_)
    return np.stack(out)


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def fit(features: np.ndarray, labels: np.ndarray, n_classes: int, k: int = 10, max_bank: int = 1500,
        seed: int = 0, early: np.ndarray | None = None, cov_groups: np.ndarray | None = None) -> dict:
    """Fit the OOD statistics on clean training features.

    Args:
        features: (N, D) float penultimate features of training images (no augmentation).
        labels: (N,) int class indices.
        n_classes: number of classes.
        k: neighbour rank for the kNN score.
        max_bank: at most this many features are kept for kNN (stratified random subset).
        early: (N, E) pooled early-layer activations of the same images (optional detector).
        cov_groups: (n_classes,) int group of each component (label); one shared covariance per
            group instead of one for all (adapted models: one per source). Default: one for all.

    Returns:
        Statistics (class means, precision matrices, kNN bank) as arrays.
    """
    f = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    means, lw = _class_gaussian(f, labels, n_classes)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(f))[:max_bank]
    extra = {}
    if early is not None:
        e = np.asarray(early, np.float64)
        e_means, e_lw = _class_gaussian(e, labels, n_classes)
        extra = {"early_means": e_means.astype(np.float32), "early_precision": e_lw.precision_.astype(np.float32)}
        if cov_groups is not None:
            extra["early_precision"] = _grouped_precision(e, labels, e_means, cov_groups).astype(np.float32)
            extra["early_precision_index"] = np.asarray(cov_groups, np.int16)
    precision = lw.precision_
    if cov_groups is not None:
        precision = _grouped_precision(f, labels, means, cov_groups)
        extra["precision_index"] = np.asarray(cov_groups, np.int16)
    return {**extra,
        "means": means.astype(np.float32),
        "precision": precision.astype(np.float32),
        "shrinkage": float(lw.shrinkage_),
        "bank": _l2n(f[idx]).astype(np.float32),
        "k": int(k),
    }


def mahalanobis(features: np.ndarray, stats: dict, prefix: str = "") -> np.ndarray:
    """(N,) min class Mahalanobis distance (`prefix="early_"`: the early-layer statistics)."""
    f = np.asarray(features, np.float32)
    P = stats[prefix + "precision"]
    index = stats.get(prefix + "precision_index")
    d = []
    for j, mu in enumerate(stats[prefix + "means"]):
        z = f - mu
        Pj = P[int(index[j])] if P.ndim == 3 else P  # (G, D, D): one precision per covariance group
        d.append(np.einsum("nd,de,ne->n", z, Pj, z, optimize=True))
    return np.sqrt(np.maximum(np.min(np.stack(d, 1), 1), 0))


def knn(features: np.ndarray, stats: dict) -> np.ndarray:
    """(N,) Euclidean distance of the normalised feature to its k-th nearest bank feature."""
    f = _l2n(np.asarray(features, np.float32))
    sims = f @ stats["bank"].T
    k = min(stats["k"], sims.shape[1])
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(2 - 2 * kth, 0))


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N,) negative free energy: higher means less like training data."""
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(axis=1)
    # numpy only (no scipy): the trust layer's apply must run in a minimal exported runtime
    return -temperature * (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


def score(method: str, features: np.ndarray, logits: np.ndarray, stats: dict, temperature: float = 1.0,
          scales: dict | None = None, early: np.ndarray | None = None) -> np.ndarray:
    """Score by the named method (`early`: pooled early-layer activations, for `mahalanobis_early`).

    `union` combines the detectors, which fail on different inputs: each score is rescaled so
    that its validation median maps to 0 and its threshold to 1 (`scales[m] = (median, threshold)`),
    and the largest is returned; > 1 means at least one detector fires.
    """
    if method == COMBINED:
        if not scales:
            raise ValueError("the union OOD score needs per-method (median, threshold) scales from the card")
        parts = []
        for m, (med, thr) in scales.items():
            parts.append((score(m, features, logits, stats, temperature, early=early) - med) / max(thr - med, 1e-9))
        return np.max(np.stack(parts, 1), 1)
    if method == "mahalanobis":
        return mahalanobis(features, stats)
    if method == "knn":
        return knn(features, stats)
    if method == "energy":
        return energy(logits, temperature)
    if method == EARLY:
        if early is None or "early_means" not in stats:
            raise ValueError("the early-layer OOD score needs early-layer activations and statistics")
        return mahalanobis(early, stats, prefix="early_")
    raise ValueError(f"unknown OOD method {method!r}; choose one of {METHODS + (EARLY,)}")


def fit_threshold(val_scores: np.ndarray, quantile: float = 0.95) -> float:
    """Threshold at the given quantile of in-distribution validation scores (≈1−q of ID flagged)."""
    return float(np.quantile(np.asarray(val_scores), quantile))


def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under ROC for separating OOD (positive) from ID by the score."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    return float(roc_auc_score(y, np.r_[id_scores, ood_scores]))


def save_stats(path, stats: dict) -> None:
    """Save fitted statistics as a compressed .npz beside the model."""
    early = {k: stats[k].astype(np.float32) for k in _EARLY_KEYS if k in stats}
    early.update({k: np.asarray(stats[k], np.int16) for k in _INDEX_KEYS if k in stats})
    np.savez_compressed(path, means=stats["means"], precision=stats["precision"].astype(np.float32), bank=stats["bank"].astype(np.float16),
                        k=np.array(stats["k"]), shrinkage=np.array(stats["shrinkage"]), **early)


def load_stats(path) -> dict:
    z = np.load(path)
    early = {k: z[k].astype(np.float32) for k in _EARLY_KEYS if k in z.files}
    early.update({k: z[k].astype(int) for k in _INDEX_KEYS if k in z.files})
    return {"means": z["means"].astype(np.float32), "precision": z["precision"].astype(np.float32),
            "bank": z["bank"].astype(np.float32), "k": int(z["k"]), "shrinkage": float(z["shrinkage"]), **early}
