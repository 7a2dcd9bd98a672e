"""Metrics (scikit-learn), ROC data, latency and the JSON the dashboard reads."""

from __future__ import annotations

import time

import numpy as np


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """All of Study 1's and Study 2's metrics from true labels and class probabilities.

    Args:
        labels: (N,) int true class indices.
        probs: (N, C) calibrated probabilities.
        classes: C class names.

    Returns:
        JSON-serialisable dict: accuracy, macro/weighted precision/recall/F1, per-class
        precision/recall/F1/specificity/support/ROC-AUC, macro one-vs-rest ROC-AUC, Cohen's kappa,
        log loss, confusion matrix (rows = true), ROC curves (downsampled).
    """
    from sklearn import metrics as M

    labels = np.asarray(labels)
    probs = np.asarray(probs, np.float64)
    pred = probs.argmax(1)
    k = len(classes)
    idx = list(range(k))
    cm = M.confusion_matrix(labels, pred, labels=idx)
    p, r, f, s = M.precision_recall_fscore_support(labels, pred, labels=idx, zero_division=0)
    # Specificity is recall of the negative class in each one-vs-rest problem.
    mcm = M.multilabel_confusion_matrix(labels, pred, labels=idx)
    spec = [float(tn / (tn + fp)) if (tn + fp) else None for (tn, fp), _ in ((m[0], m[1]) for m in mcm)]
    present = np.unique(labels)
    roc_auc, curves = {}, {}
    for c in idx:
        if c in present and len(present) > 1:
            y = (labels == c).astype(int)
            roc_auc[classes[c]] = float(M.roc_auc_score(y, probs[:, c]))
            fpr, tpr, _ = M.roc_curve(y, probs[:, c], drop_intermediate=True)
            keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).astype(int))
            curves[classes[c]] = {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()}
    macro_auc = float(np.mean(list(roc_auc.values()))) if roc_auc else None
    return {
        "n": int(len(labels)),
        "accuracy": float(M.accuracy_score(labels, pred)),
        "balanced_accuracy": float(M.balanced_accuracy_score(labels, pred)),
        "macro_precision": float(np.mean(p)), "macro_recall": float(np.mean(r)),
        "macro_f1": float(M.f1_score(labels, pred, labels=idx, average="macro", zero_division=0)),
        "weighted_f1": float(M.f1_score(labels, pred, labels=idx, average="weighted", zero_division=0)),
        "kappa": float(M.cohen_kappa_score(labels, pred, labels=idx)),
        "roc_auc": macro_auc,
        "log_loss": float(M.log_loss(labels, np.clip(probs, 1e-12, 1), labels=idx)),
        "per_class": {classes[c]: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]),
                                   "specificity": spec[c], "support": int(s[c]),
                                   "roc_auc": roc_auc.get(classes[c])} for c in idx},
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
        "roc_curves": curves,
    }


def latency(predict_fn, image_shape=(224, 224, 3), batch_sizes=(1, 32), repeats: int = 5, warmup: int = 2) -> dict:
    """Median milliseconds per image of `predict_fn(batch)` at each batch size (after warm-up)."""
    rng = np.random.default_rng(0)
    out = {}
    for bs in batch_sizes:
        x = rng.uniform(0, 255, (bs, *image_shape)).astype(np.float32)
        for _ in range(warmup):
            predict_fn(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            predict_fn(x)
            times.append(time.perf_counter() - t)
        out[f"batch{bs}_ms_per_image"] = float(np.median(times) / bs * 1000)
    out["repeats"] = repeats
    return out


def summary_line(m: dict) -> dict:
    """The fields the CLI's --json promises, plus a few more."""
    return {k: m.get(k) for k in ("accuracy", "macro_f1", "kappa", "roc_auc", "log_loss", "n", "balanced_accuracy")}
