"""How far can a frozen backbone go on a new lab? The few-shot ceiling of its features, layer by layer.

Adaptation (`bcc_core.adapt`) keeps the backbone frozen and refits the head on a lab's reviewed cells. Its
recall on the lab can be no better than what the frozen features allow. This bench measures that ceiling
directly: for each depth of the model (and of the plain ImageNet backbone), a logistic regression trained on
N of the lab's own cells per class ONLY (no parent, no replay: the most lab-specific head there is), measured
on the rest of the lab, repeated with different draws. When even this ceiling is below the target for a
class, no head-only adaptation can meet it and the backbone itself has to learn the lab. With every other cell
of the lab to learn from (10-fold cross-validation), it also lists the cells whose label two independent readers
doubt: that head and the bundled model, which never saw the lab.

The new lab is BCCD (allowed as the adaptation benchmark's "new lab"; nothing here is bundled).

Usage: python bench/adapt_ceiling.py --model models/pb7-mobilenetv2 --data ../shared/data --out bench/results/adapt_ceiling.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from _report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bcc_core.backbones import OFFLINE_IMAGENET_WEIGHTS  # noqa: E402

LAYERS = ("block_6_expand_relu", "block_13_expand_relu", "block_16_project_BN", "out_relu")
WITH_HISTOGRAM = ("block_16_project_BN", "out_relu")
"""Depths also measured with the chroma histogram beside them (`bcc_core.colour`): what an adapted head reads."""
TARGET = 0.90


def layer_features(pred, inputs: np.ndarray, weights: str | None) -> dict:
    """Globally pooled activations of LAYERS for the model and for the plain ImageNet MobileNetV2."""
    import keras
    from keras.applications.mobilenet_v2 import preprocess_input

    from bcc_core.colour import chroma_histograms

    m = pred.model
    fm = keras.Model(m.inputs, [keras.layers.GlobalAveragePooling2D()(m.get_layer(name).output) for name in LAYERS])
    feats = {f"model {name}": f for name, f in zip(LAYERS, fm.predict(inputs, batch_size=32, verbose=0))}
    hist = chroma_histograms(inputs)
    feats.update({f"model {name} + chroma histogram": np.hstack([feats[f"model {name}"], hist]) for name in WITH_HISTOGRAM})
    if weights and Path(weights).is_file():
        base = keras.applications.MobileNetV2(include_top=False, weights=weights, input_shape=inputs.shape[1:])
        im = keras.Model(base.inputs, [keras.layers.GlobalAveragePooling2D()(base.get_layer(n).output) for n in LAYERS])
        out = im.predict(preprocess_input(inputs.astype("float32")), batch_size=32, verbose=0)
        feats.update({f"ImageNet {name}": f for name, f in zip(LAYERS, out)})
    return feats


def ceiling(X: np.ndarray, y: np.ndarray, taught: list[int], n: int, repeats: int) -> np.ndarray:
    """Mean recall per taught class of a lab-only logistic regression on n cells per class (repeats draws)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    recalls = []
    for rep in range(repeats):
        rng = np.random.default_rng(rep)
        tr = np.concatenate([rng.choice(np.nonzero(y == c)[0], n, replace=False) for c in taught])
        te = np.setdiff1d(np.nonzero(np.isin(y, taught))[0], tr)
        sc = StandardScaler().fit(X[tr])
        clf = LogisticRegression(C=0.05, max_iter=3000, class_weight="balanced").fit(sc.transform(X[tr]), y[tr])
        p = clf.predict(sc.transform(X[te]))
        recalls.append([float((p[y[te] == c] == c).mean()) for c in taught])
    return np.array(recalls).mean(0)


def cross_validated(X: np.ndarray, y: np.ndarray, taught: list[int], folds: int = 10) -> np.ndarray:
    """Each taught cell's class as named by a lab-only logistic regression fitted on the other folds (stratified)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    m = np.isin(y, taught)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=3000, class_weight="balanced"))
    out = np.full(len(y), -1)
    out[m] = cross_val_predict(clf, X[m], y[m], cv=StratifiedKFold(folds, shuffle=True, random_state=0))
    return out


def all_cells_section(feats: dict, y: np.ndarray, classes: list[str], bundled: list[str], model: str,
                      files: list[str]) -> tuple[list[str], dict]:
    """The ceiling with every other BCCD cell to learn from (10-fold cross-validation), and the cells whose label
    two independent readers doubt: that head, and the bundled model, which never saw BCCD."""
    taught = [c for c in range(len(classes)) if (y == c).sum() >= 20]
    names = [classes[c] for c in taught]
    lines = ["## Every other cell to learn from (10-fold cross-validation)", "",
             "The same lab-only logistic regression, fitted on nine tenths of BCCD and measured on the tenth, each "
             "cell once: how far these features go with far more than 20 of the lab's cells a class.", "",
             "| features | " + " | ".join(names) + " | lowest |", "|---|" + "---|" * (len(names) + 1)]
    result, best = {}, None
    for key, X in feats.items():
        pred = cross_validated(X.astype(np.float64), y, taught)
        r = np.array([float((pred[y == c] == c).mean()) for c in taught])
        result[key] = dict(zip(names, r.tolist()))
        lines.append(f"| {key} | " + " | ".join(f"{v:.1%}" for v in r) + f" | {r.min():.1%} |")
        if best is None or r.min() > best[0]:
            best = (r.min(), key, pred)
    _, key, pred = best
    as_model = {"neutrophil": "seg_neutrophil"}
    lines += ["", f"Cells whose label two independent readers doubt: the cross-validated head on `{key}` (the best "
              f"row) and the bundled `{model}` (trained on pbs5 and LISC, never on BCCD) both name the same other "
              f"class. BCCD's labels were not re-checked by experts.", "",
              "| label | cells | both name another class | as | a reader right on every other cell could reach |",
              "|---|---|---|---|---|"]
    doubted = {}
    for c in taught:
        idx = np.flatnonzero(y == c)
        both = [i for i in idx if pred[i] != c and as_model.get(classes[pred[i]], classes[pred[i]]) == bundled[i]]
        doubted[classes[c]] = [files[i] for i in both]
        to = sorted({classes[pred[i]] for i in both})
        lines.append(f"| {classes[c]} | {len(idx)} | {len(both)} | {', '.join(to) or '–'} | "
                     f"{1 - len(both) / len(idx):.1%} |")
    lines += ["", "If these labels are right, both readers are wrong on them; if they are wrong, no reader can reach "
              "the figure in the last column on BCCD as labelled. Cells to re-check: "
              + "; ".join(f"{c}: " + ", ".join(f"`{f}`" for f in fs) for c, fs in doubted.items() if fs) + ".", ""]
    return lines, {"recall": result, "doubted_by_both": doubted, "head_features": key}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/pb7-mobilenetv2")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--weights", default=str(OFFLINE_IMAGENET_WEIGHTS))
    ap.add_argument("--n", default="10,20", help="reviewed cells per class")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/results/adapt_ceiling.md")
    a = ap.parse_args(argv)
    from bcc_core.data import list_imagefolder
    from bcc_core.inference import Predictor
    from bcc_core.io import read_image

    lab = Path(a.data) / "bccd"
    if not lab.is_dir():
        print(f"skip: {lab} not found")
        return 0
    pred = Predictor.load(a.model)
    ds = list_imagefolder(lab)
    y = np.array(ds.labels)
    inputs = np.stack([pred.prepare(read_image(p))[0] for p in ds.paths])
    feats = layer_features(pred, inputs, a.weights)
    lines = [f"# Few-shot ceiling of frozen features on a new lab (BCCD), model `{Path(a.model).name}`", "",
             "Generated by `bench/adapt_ceiling.py`. A logistic regression trained on N of BCCD's own cells per class only "
             "(globally pooled activations at each depth, at two of them also with the image's chroma histogram beside them, "
             f"as an adapted head reads it; {a.repeats} draws), measured on the rest of BCCD: a practical "
             "ceiling for a head on a frozen backbone there. Classes with fewer than 2N cells are left out.", ""]
    result = {}
    for n in [int(v) for v in a.n.split(",")]:
        taught = [c for c in range(len(ds.classes)) if (y == c).sum() >= 2 * n]
        names = [ds.classes[c] for c in taught]
        lines += [f"## N = {n} cells per class", "", "| features | " + " | ".join(names) + " | lowest |",
                  "|---|" + "---|" * (len(names) + 1)]
        for key, X in feats.items():
            r = ceiling(X.astype(np.float64), y, taught, n, a.repeats)
            result[f"{n}/{key}"] = dict(zip(names, r.tolist()))
            lines.append(f"| {key} | " + " | ".join(f"{v:.1%}" for v in r) + f" | {r.min():.1%} |")
        best = max((min(v.values()), k) for k, v in result.items() if k.startswith(f"{n}/"))
        lines += ["", f"Best lowest-class recall at N = {n}: {best[0]:.1%} ({best[1].split('/', 1)[1]}); target {TARGET:.0%} "
                  + ("reached by a lab-only linear head on these features." if best[0] >= TARGET else
                     "not reached even by a lab-only linear head on these frozen features: a head-only adaptation is "
                     "unlikely to meet it; the backbone has to learn the lab."), ""]
    bundled = [r.predicted_class for r in pred.predict_inputs(inputs)]
    files = [str(Path(p).relative_to(ds.root)) for p in ds.paths]
    more, result["all_cells"] = all_cells_section(feats, y, list(ds.classes), bundled, Path(a.model).name, files)
    write_report(a.out, lines + more, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
