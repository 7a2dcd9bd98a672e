"""Reviewed cells whose label the adapted model doubts: labels worth a second look before a model learns them.

A lab's reviewed cells teach an adapted model, and a mislabelled cell teaches it the wrong thing. Public sets
carry such cells too: on BCCD (labels not re-checked by experts) a head trained on BCCD's own other cells and
the pb7 model, which never saw BCCD, both name as neutrophils some of the cells labelled eosinophil.

Each reviewed cell is scored by a head that was fitted without it (adaptation's cross-fitting and lab-check
folds). Confident learning (Northcutt et al., JAIR 2021; `cleanlab.filter.find_label_issues`) then estimates,
from those out-of-sample probabilities, how often each label is confused with each other class, and lists the
cells most likely to carry the wrong one. The list is advice for a reviewer, never a correction: the model is
fitted on the labels as given, and the cells listed are named in the card so a reviewer can re-check them.
"""

from __future__ import annotations

import numpy as np

METHOD = ("confident learning (Northcutt et al. 2021, cleanlab.filter.find_label_issues, prune_by_noise_rate) on "
          "probabilities from heads fitted without each cell")


def doubted_labels(labels: np.ndarray, logits: np.ndarray, temperature: float, classes: list[str],
                   files: list[str]) -> list[dict]:
    """The reviewed cells whose given label the out-of-sample probabilities doubt, most doubted first.

    Args:
        labels: the given class index of each cell (indices into `classes`).
        logits: each cell's logits from a head fitted without it, shape (n, len(classes)).
        temperature: the adapted model's temperature (the probabilities are the ones it would show).
        classes: the model's classes.
        files: each cell's file, as the lab named it.

    Returns:
        One dict per doubted cell: file, label, suggested (the likeliest other class among the labelled ones),
        p_label and p_suggested (probabilities renormalised over the classes the lab labelled).
        Empty when fewer than two classes are labelled.
    """
    from cleanlab.filter import find_label_issues
    from scipy.special import softmax

    labels = np.asarray(labels, int)
    present = np.unique(labels)
    if len(present) < 2:
        return []
    p = softmax(np.asarray(logits, np.float64)[:, present] / temperature, axis=1)  # over the labelled classes only
    y = np.searchsorted(present, labels)
    # n_jobs=1: cleanlab would otherwise fork a process pool (on Linux) from a process whose TensorFlow threads may
    # hold locks at the fork, and the children can hang (seen in the app's server); a lab's few cells need no pool.
    issues = find_label_issues(y, p, filter_by="prune_by_noise_rate", return_indices_ranked_by="self_confidence",
                               n_jobs=1)
    out = []
    for i in issues:
        other = p[i].copy()
        other[y[i]] = -1.0
        j = int(other.argmax())
        out.append({"file": files[i], "label": classes[labels[i]], "suggested": classes[present[j]],
                    "p_label": round(float(p[i, y[i]]), 3), "p_suggested": round(float(p[i, j]), 3)})
    return out
