"""Does an image's global style still tell which lab it came from, after augmentation?

In pbs5 every class comes from one lab, so anything that identifies the lab identifies (part of) the
class. Augmentation is meant to make the lab's look uninformative. This bench measures it: a linear
classifier on global style features alone (radially averaged log-amplitude spectrum per colour
channel, LAB mean and spread, Laplacian sharpness) is cross-validated to predict the lab from the
preprocessed training inputs, clean and after each augmentation recipe. Balanced accuracy 0.5 means
the style carries no lab information; a CNN can still find subtler cues, so this is a lower bound on
what leaks.

Usage: python bench/style_leak.py --data ../shared/data --out bench/results/style_leak.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bcc_core.augment import AugmentConfig, augment_batch  # noqa: E402
from bcc_core.data import list_imagefolder  # noqa: E402
from bcc_core.io import read_image  # noqa: E402
from bcc_core.preprocess import PreprocessConfig, preprocess  # noqa: E402
from bcc_core.shortcut import audit  # noqa: E402
from crosslab import BARCELONA  # noqa: E402  (which pbs5 classes were imaged in which lab)


def style_features(images: np.ndarray, bins: int = 12) -> np.ndarray:
    """(N, 3*bins + 7) global style descriptors of (N, S, S, 3) uint8 images."""
    import cv2

    n = images.shape[1]
    yy, xx = np.mgrid[0:n, 0:n // 2 + 1]
    r = np.hypot(np.minimum(yy, n - yy), xx)
    ring = np.minimum((r / (n / 2) * bins).astype(int), bins - 1).ravel()
    count = np.bincount(ring, minlength=bins)
    out = []
    for im in images:
        f = []
        for ch in range(3):
            amp = np.log1p(np.abs(np.fft.rfft2(im[..., ch].astype(np.float32))))
            f.extend(np.bincount(ring, amp.ravel(), bins) / count)
        mu, sd = cv2.meanStdDev(cv2.cvtColor(im, cv2.COLOR_RGB2LAB))
        f.extend(mu.ravel())
        f.extend(sd.ravel())
        f.append(np.log1p(cv2.Laplacian(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()))
        out.append(f)
    return np.asarray(out)


def lab_leak(images: np.ndarray, lab: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """5-fold cross-validated balanced accuracy (mean, std) of predicting the lab from style alone,
    with the shortcut audit's classifier (`bcc_core.shortcut.audit`)."""
    r = audit({"style": style_features(images)}, lab, n_classes=2, seed=seed)["style"]
    return r["balanced_accuracy"], r["std"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/style_leak.md")
    a = ap.parse_args(argv)

    ds = list_imagefolder(Path(a.data) / "pbs5")
    paths, labels, classes = ds.paths, np.asarray(ds.labels), ds.classes
    rng = np.random.default_rng(a.seed)
    pick = np.concatenate([rng.choice(np.flatnonzero(labels == c), a.per_class, replace=False)
                           for c in range(len(classes))])
    y = labels[pick]
    groups = np.array([0 if c in BARCELONA else 1 for c in classes])
    lab = groups[y]
    pcfg = PreprocessConfig()
    x = np.stack([preprocess(read_image(paths[i]), pcfg) for i in pick])

    sym = dataclasses.replace(AugmentConfig.cross_lab(), amp_mix_p=1.0, amp_mix_range=(0.0, 1.0))
    rows = [("none (clean inputs)", x)]
    rows.append(("full (Study 1 + 2 operations, no amplitude mixing)",
                 augment_batch(x, a.seed + 1, AugmentConfig(), labels=y)))
    rows.append(("cross-lab (bundled pbs5 recipe): mixing p 0.7, weight U(0.1, 0.7), partner of another class",
                 augment_batch(x, a.seed + 2, AugmentConfig.cross_lab(), labels=y)))
    rows.append(("cross-lab, mixing p 1, weight U(0, 1), partner of another class",
                 augment_batch(x, a.seed + 3, sym, labels=y)))
    rows.append(("cross-lab, mixing p 1, weight U(0, 1), partner from the other lab (tried, not bundled)",
                 augment_batch(x, a.seed + 4, sym, labels=y, label_groups=groups)))

    lines = ["# Style leak: can global style alone tell the two pbs5 labs apart?", "",
             f"{len(x)} preprocessed pbs5 images ({a.per_class} per class, seed {a.seed}); lab = Barcelona "
             "(basophil, erythroblast, monocyte) or Munich (myeloblast, seg_neutrophil), from the data README. "
             "Features: radially averaged log-amplitude spectrum (12 rings x 3 channels), LAB mean and std, "
             "Laplacian sharpness. Classifier: standardised logistic regression, 5-fold CV. Chance = 0.50.", "",
             "| augmentation | lab predicted from style, balanced accuracy |", "|---|---|"]
    for name, imgs in rows:
        m, s = lab_leak(imgs, lab, a.seed)
        lines.append(f"| {name} | {m:.3f} ± {s:.3f} |")
        print(f"{name}: {m:.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
