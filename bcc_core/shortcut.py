"""Shortcut audit: how well do trivial cues (border colour, image size, colour histogram) predict the label?

If a cue a human would never use predicts the class far above chance, the dataset lets a model learn
the lab instead of the cell. Measured on the raw images and on the model's preprocessed inputs.
"""

from __future__ import annotations

import numpy as np


def border_colour(img: np.ndarray, width: int = 8) -> np.ndarray:
    """(6,) mean and std RGB of a strip along the image border (the slide background)."""
    b = np.concatenate([img[:width].reshape(-1, 3), img[-width:].reshape(-1, 3),
                        img[:, :width].reshape(-1, 3), img[:, -width:].reshape(-1, 3)]).astype(np.float32)
    return np.r_[b.mean(0), b.std(0)]


def colour_histogram(img: np.ndarray, bins: int = 8) -> np.ndarray:
    """(3*bins,) normalised per-channel histogram."""
    h = [np.histogram(img[..., c], bins=bins, range=(0, 256))[0] for c in range(3)]
    h = np.concatenate(h).astype(np.float32)
    return h / h.sum()


def cue_features(images, sizes=None) -> dict[str, np.ndarray]:
    """Trivial cue vectors per image.

    Args:
        images: sequence of (H, W, 3) uint8 RGB.
        sizes: optional (N, 2) original (width, height); default taken from the images.
    """
    border = np.stack([border_colour(im) for im in images])
    hist = np.stack([colour_histogram(im) for im in images])
    if sizes is None:
        sizes = np.array([[im.shape[1], im.shape[0]] for im in images], np.float32)
    return {"border_colour": border, "image_size": np.asarray(sizes, np.float32), "colour_histogram": hist}


def audit(cues: dict[str, np.ndarray], labels: np.ndarray, n_classes: int, folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated balanced accuracy of a simple classifier on each cue alone.

    Returns:
        {cue: {"balanced_accuracy": float, "chance": 1/C, "warning": bool}} — warning when the cue
        predicts the class far above chance (balanced accuracy > chance + 0.5·(1 − chance)).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    labels = np.asarray(labels)
    chance = 1.0 / n_classes
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = {}
    for name, X in cues.items():
        if name == "image_size":
            clf = DecisionTreeClassifier(max_depth=4, random_state=seed)
        else:
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        s = cross_val_score(clf, X, labels, cv=cv, scoring="balanced_accuracy")
        ba = float(s.mean())
        out[name] = {"balanced_accuracy": ba, "std": float(s.std()), "chance": chance,
                     "warning": bool(ba > chance + 0.5 * (1 - chance))}
    return out


def warnings_text(result: dict, where: str) -> list[str]:
    """Loud, plain-language warnings for cues that predict the class."""
    msgs = []
    for cue, r in result.items():
        if r["warning"]:
            msgs.append(f"SHORTCUT WARNING ({where}): the {cue.replace('_', ' ')} alone predicts the class with "
                        f"balanced accuracy {r['balanced_accuracy']:.1%} (chance {r['chance']:.1%}). The training "
                        f"data let a model tell the classes apart by a cue that is not the cell; accuracy on "
                        f"this data overstates accuracy on other labs.")
    return msgs


# A trivial cue on the model's own inputs that predicts the class this well means a confident answer
# may rest on the cue: such a model's results are never shown as ok. (pbs5's cross-lab recipe leaves
# colour at 0.84 on its inputs and is measured on another lab; all4's colour predicts at 0.96.)
STATUS_CAP_ACCURACY = 0.90


def cue_flag(card_audit: dict | None, limit: float = STATUS_CAP_ACCURACY):
    """A `shortcut_cue` flag for every result of a model whose card says a trivial cue on its inputs
    predicts the class with balanced accuracy ≥ limit; None otherwise.

    Args:
        card_audit: the card's `shortcut_audit` section ({"model_inputs": {cue: balanced accuracy}, "chance"}).
    """
    from .flags import Flag, next_step

    seen = (card_audit or {}).get("model_inputs") or {}
    hits = {cue: acc for cue, acc in seen.items() if acc is not None and acc >= limit}
    if not hits:
        return None
    cue, acc = max(hits.items(), key=lambda kv: kv[1])
    return Flag("shortcut_cue", "warning",
                f"On this model's training images the {cue.replace('_', ' ')} alone predicts the class "
                f"{acc:.0%} of the time (chance {card_audit.get('chance', 0):.0%}), so a confident suggestion "
                f"may rest on colour, not on the cells. {next_step('shortcut_cue')}", cue)
