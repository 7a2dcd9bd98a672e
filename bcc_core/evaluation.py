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
        # Mean recall over the classes present (sklearn's balanced accuracy, without its warning when a
        # suggested class has no true image, e.g. an adapted model's added classes on the parent's test part).
        "balanced_accuracy": float(np.mean(r[present])),
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


# ---------------------------------------------------------------- intervals and labelled-set reports

def wilson(k: int, n: int, level: float = 0.95) -> tuple[float | None, float | None]:
    """Wilson score interval for a proportion k/n (None, None when n = 0)."""
    if n <= 0:
        return None, None
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def rate(k: int, n: int) -> dict:
    """{"k", "n", "value", "ci95": [low, high]} for a proportion; value None when n = 0."""
    lo, hi = wilson(k, n)
    return {"k": int(k), "n": int(n), "value": (k / n) if n else None, "ci95": [lo, hi]}


def bootstrap_from_confusion(cm, n_boot: int = 2000, seed: int = 0) -> dict:
    """Percentile 95% intervals of accuracy, macro-F1 and Cohen's kappa from a confusion matrix.

    Each true class's row is resampled from a multinomial with its observed proportions (a parametric
    bootstrap that needs only the matrix, not the per-image predictions).
    """
    cm = np.asarray(cm, np.int64)
    rng = np.random.default_rng(seed)
    n_row = cm.sum(1)
    p_row = np.divide(cm, np.maximum(n_row[:, None], 1))
    stats = {"accuracy": [], "macro_f1": [], "kappa": []}
    for _ in range(n_boot):
        b = np.stack([rng.multinomial(n, p) if n else np.zeros(len(p), np.int64) for n, p in zip(n_row, p_row)])
        stats["accuracy"].append(np.trace(b) / b.sum())
        stats["macro_f1"].append(_macro_f1(b))
        stats["kappa"].append(_kappa(b))
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in stats.items()}


def _macro_f1(cm: np.ndarray) -> float:
    tp = np.diag(cm).astype(float)
    prec = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
    rec = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(tp), where=(prec + rec) > 0)
    return float(f1.mean())


def _kappa(cm: np.ndarray) -> float:
    n = cm.sum()
    po = np.trace(cm) / n
    pe = float((cm.sum(0) * cm.sum(1)).sum()) / n ** 2
    return float((po - pe) / (1 - pe)) if pe < 1 else 1.0


def confusion_report(cm, classes: list[str]) -> dict:
    """Per-class recall and precision with Wilson 95% intervals, and bootstrap intervals of the summary
    figures, from a square confusion matrix (rows = true class, columns = suggested class)."""
    cm = np.asarray(cm, np.int64)
    per = {}
    for i, c in enumerate(classes):
        per[c] = {"recall": rate(cm[i, i], cm[i].sum()), "precision": rate(cm[i, i], cm[:, i].sum()),
                  "support": int(cm[i].sum())}
    return {"per_class": per, "accuracy": rate(np.trace(cm), cm.sum()), "intervals": bootstrap_from_confusion(cm),
            "macro_f1": _macro_f1(cm), "kappa": _kappa(cm)}


def labelled_set_report(true: list[str], suggested: list[str | None], ok: list[bool], model_classes: list[str],
                        name: str = "") -> dict:
    """How a model did on a labelled set from a lab (external validation, or a lab's own verification).

    Args:
        true: each image's true label; may include cell types the model does not know.
        suggested: the model's suggested class per image (None for unreadable images).
        ok: whether each image was shown as ok (no flag).
        model_classes: the model's classes.
        name: a label for the set (e.g. the lab).

    Returns:
        JSON-ready dict: n; per true label (model classes first, then unknown types): n, recall with
        Wilson 95% interval, shown-as-ok; per suggested class: precision with interval; shown-as-ok and
        wrong-and-ok rates with intervals (an unknown type shown as ok is wrong); Cohen's kappa and the
        confusion matrix over the images of known classes; the full matrix (true label x suggestion).
    """
    true, suggested, ok = list(true), list(suggested), np.asarray(ok, bool)
    n = len(true)
    known = [c for c in model_classes if c in set(true)]
    unknown = sorted(set(true) - set(model_classes))
    correct = np.array([t == s for t, s in zip(true, suggested)])
    per_true = {}
    for c in known + unknown:
        m = np.array([t == c for t in true])
        per_true[c] = {"n": int(m.sum()), "known_to_model": c in model_classes,
                       "recall": rate(int((m & correct).sum()), int(m.sum())) if c in model_classes else None,
                       "shown_as_ok": rate(int((m & ok).sum()), int(m.sum())),
                       "wrong_and_ok": int((m & ok & ~correct).sum())}
    per_suggested = {}
    for c in model_classes:
        m = np.array([s == c for s in suggested])
        per_suggested[c] = {"precision": rate(int((m & correct).sum()), int(m.sum())),
                            "precision_among_ok": rate(int((m & ok & correct).sum()), int((m & ok).sum()))}
    cols = list(model_classes) + ["(none)"]
    full = [[int(sum(1 for t, s in zip(true, suggested) if t == r and (s or "(none)") == c)) for c in cols]
            for r in known + unknown]
    k_idx = [i for i, t in enumerate(true) if t in model_classes and suggested[i] in model_classes]
    kappa = None
    if len(k_idx) > 1:
        from sklearn.metrics import cohen_kappa_score

        kappa = float(cohen_kappa_score([true[i] for i in k_idx], [suggested[i] for i in k_idx],
                                        labels=list(model_classes)))
    wrong_ok = int((ok & ~correct).sum())
    return {"name": name, "n": n, "classes": list(model_classes), "true_labels": known + unknown,
            "per_true_label": per_true, "per_suggested_class": per_suggested,
            "shown_as_ok": rate(int(ok.sum()), n), "wrong_and_ok": rate(wrong_ok, n),
            "error_among_ok": rate(wrong_ok, int(ok.sum())),
            "agreement_known": rate(int(sum(correct[i] for i in k_idx)), len(k_idx)), "kappa_known": kappa,
            "confusion": {"rows": known + unknown, "columns": cols, "matrix": full}}


def ece_interval(rel: dict | None, n_boot: int = 2000, seed: int = 0) -> list[float] | None:
    """Percentile 95% interval of the ECE from reliability-diagram bins (count, confidence, accuracy):
    each bin's accuracy is resampled as Binomial(count, accuracy) / count, confidences held fixed."""
    if not rel or not rel.get("count"):
        return None
    bins = [(n, c, a) for n, c, a in zip(rel["count"], rel["confidence"], rel["accuracy"]) if n and c is not None]
    if not bins:
        return None
    n = np.array([b[0] for b in bins])
    conf = np.array([b[1] for b in bins])
    acc = np.array([b[2] for b in bins])
    rng = np.random.default_rng(seed)
    draws = rng.binomial(n[None, :], acc[None, :], size=(n_boot, len(n))) / n[None, :]
    ece = (n[None, :] / n.sum() * np.abs(draws - conf[None, :])).sum(1)
    return [float(np.percentile(ece, 2.5)), float(np.percentile(ece, 97.5))]
