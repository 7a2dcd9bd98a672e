"""Cross-lab evidence for a bundled model: one real other lab (BCCD), and simulated shifts that reach the model.

BCCD (another lab, microscope and stain) is measurement only: never trained, tuned or calibrated on. Its report is
the same one a lab gets from `evaluate --external` (bcc_core.verification): per true label recall, per suggested
class precision, shown-as-ok and wrong-and-ok, each with a Wilson 95% interval, and the confusion matrix.

Simulated shifts: the pipeline finds the cell on a stain-normalised copy and stain-normalises the crop, so a
recolouring or rescaling of the raw image may barely move what the model sees. Each shift is therefore first
measured where it matters, on the model input: the median mean-absolute difference (grey levels) between the model
input of a shifted image and of the same image unshifted, against the median difference between the model inputs
of two different cells of the same class (the variation the model must tolerate anyway). A shift whose input change
is below REACH of that reference is listed as undone by the preprocessing and not reported as evidence.

Usage: python bench/crosslab.py --model models/pbs5-mobilenetv2 [--model models/pb7-mobilenetv2] --data ../shared/data
       --out bench/results/crosslab.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
from _report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bcc_core.augment import unsharp_mask  # noqa: E402
from bcc_core.preprocess import reinhard  # noqa: E402

BCCD_CLASS_MAP = {"neutrophil": "seg_neutrophil"}  # BCCD folder → model class; other names are the same word
BARCELONA = ("basophil", "erythroblast", "monocyte")  # pbs5: each class was imaged in one of two labs
MUNICH = ("myeloblast", "seg_neutrophil")
REACH = 0.25  # a shift counts as reaching the model when it moves the input by ≥ 25% of the between-cell difference


def lab_stats(images):
    labs = [cv2.cvtColor(im, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32) for im in images]
    allp = np.concatenate(labs)
    return allp.mean(0), allp.std(0)


def restain(img, target):
    """Give an image another lab's global colour statistics (Reinhard transfer on the raw image)."""
    return reinhard(img, *target, max_gain=1e3)


def rescale(img, f):
    h, w = img.shape[:2]
    return cv2.resize(img, (max(8, int(w * f)), max(8, int(h * f))), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


def _centre_crop(img, hw):
    h, w = hw
    H, W = img.shape[:2]
    y0, x0 = (H - h) // 2, (W - w) // 2
    return img[y0:y0 + h, x0:x0 + w]


def other_look(img, c, st_b, st_m):
    """The other lab's whole look: its stain, and its optics (Munich images are softer than Barcelona's)."""
    if c in BARCELONA:
        return cv2.GaussianBlur(restain(img, st_m), (0, 0), 1.5)
    return unsharp_mask(restain(img, st_b), 2.0, 1.0)


def hue_shift(img, deg):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(int) + deg // 2) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _jpeg(img, q):
    return cv2.imdecode(cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])[1], 1)[..., ::-1].copy()


def shifts(st_b, st_m) -> dict:
    """name → (what it simulates, function(image, class name) → shifted image)."""
    other = lambda c: st_m if c in BARCELONA else st_b  # noqa: E731
    return {
        "stain of the other lab": ("another lab's staining (Reinhard transfer of the other pbs5 lab's colour statistics)",
                                   lambda im, c: restain(im, other(c))),
        "magnification x0.6": ("a lower-magnification objective or a camera with larger pixels", lambda im, c: rescale(im, 0.6)),
        "magnification x1.5": ("a higher magnification (cropped back to the original field)",
                               lambda im, c: _centre_crop(rescale(im, 1.5), im.shape[:2])),
        "other stain + magnification": ("the other lab's stain and its pixel size (x1.25 Barcelona, x0.8 Munich)",
                                        lambda im, c: rescale(restain(im, other(c)), 1.25 if c in BARCELONA else 0.8)),
        "other stain + optics": ("the other lab's stain and sharpness (Barcelona blurred, Munich sharpened)",
                                 lambda im, c: other_look(im, c, st_b, st_m)),
        "hue +20 deg": ("a stain whose hue differs (e.g. a different Romanowsky recipe)", lambda im, c: hue_shift(im, 20)),
        "blur sigma 2": ("a slide slightly out of focus", lambda im, c: cv2.GaussianBlur(im, (0, 0), 2.0)),
        "JPEG q=30": ("a scanner exporting heavily compressed images", lambda im, c: _jpeg(im, 30)),
    }


def model_inputs(pred, images) -> np.ndarray:
    return np.stack([pred.prepare(im)[0] for im in images]).astype(np.float32)


def between_cell_difference(inputs, labels, rng) -> float:
    """Median mean-absolute difference between the model inputs of two different cells of one class."""
    d = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        for _ in range(min(200, len(idx))):
            i, j = rng.choice(idx, 2, replace=False)
            d.append(np.abs(inputs[i] - inputs[j]).mean())
    return float(np.median(d))


def simulated(pred, items, classes) -> dict:
    """Each shift: how far it moves the model input, and (only when it reaches the model) accuracy, macro-F1,
    worst class recall, shown as ok and wrong-and-ok of the suggested class on the test split."""
    from sklearn.metrics import f1_score, recall_score

    from bcc_core.io import read_image

    imgs = [read_image(p) for p, _ in items]
    y = np.array([lab for _, lab in items])
    names = [classes[lab] for lab in y]
    st_b = lab_stats([im for im, c in zip(imgs, names) if c in BARCELONA][:100])
    st_m = lab_stats([im for im, c in zip(imgs, names) if c in MUNICH][:100])
    base = model_inputs(pred, imgs)
    ref = between_cell_difference(base, y, np.random.default_rng(0))
    out = {"between_cell_difference": ref, "reach": REACH, "shifts": {}}
    for name, (what, f) in shifts(st_b, st_m).items():
        shifted = [f(im, c) for im, c in zip(imgs, names)]
        x = model_inputs(pred, shifted)
        moved = float(np.median(np.abs(x - base).mean(axis=(1, 2, 3))))
        raw = float(np.median([np.abs(cv2.resize(s, im.shape[1::-1]).astype(np.float32) - im).mean()
                               for s, im in zip(shifted, imgs)]))
        row = {"simulates": what, "raw_change": raw, "input_change": moved, "input_change_ratio": moved / ref,
               "reaches_model": moved / ref >= REACH}
        if row["reaches_model"]:
            res = pred.predict_inputs(x.astype(np.uint8), [pred.prepare(im)[1] for im in shifted])
            p = np.array([classes.index(r.predicted_class) for r in res])
            ok = np.array([r.status == "ok" for r in res])
            recall = recall_score(y, p, labels=list(range(len(classes))), average=None, zero_division=0)
            present = [i for i in range(len(classes)) if (y == i).any()]
            worst = min(present, key=lambda i: recall[i])
            row.update({"accuracy": float((p == y).mean()), "macro_f1": float(f1_score(y, p, average="macro")),
                        "ok_fraction": float(ok.mean()), "wrong_ok_of_all": float((ok & (p != y)).mean()),
                        "n": int(len(y)), "worst_class": classes[worst], "worst_recall": float(recall[worst])})
        out["shifts"][name] = row
    return out


def simulated_lines(sim: dict) -> list[str]:
    ref = sim["between_cell_difference"]
    lines = ["## Simulated shifts on the pbs5 test split", "",
             f"Model input change: median mean-absolute difference (grey levels, 0–255) between the model input of a shifted "
             f"image and of the same image unshifted; two different cells of one class differ by {ref:.1f}. A shift counts as "
             f"reaching the model at ≥ {sim['reach']:.0%} of that. The raw image change compares the shifted image resized "
             "back to the original size (so a pure rescale shows only the detail it lost). Recall is of the suggested class whatever the status.", "",
             "| shift | simulates | raw image change | model input change | accuracy | macro-F1 | worst class recall | shown as ok | wrong and ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    undone = []
    for k, v in sim["shifts"].items():
        change = f"{v['raw_change']:.1f} | {v['input_change']:.1f} ({v['input_change_ratio']:.0%})"
        if not v["reaches_model"]:
            undone.append(f"{k} (raw {v['raw_change']:.1f} → input {v['input_change']:.1f})")
            continue
        lines.append(f"| {k} | {v['simulates']} | {change} | {v['accuracy']:.1%} | {v['macro_f1']:.3f} | "
                     f"{v['worst_class']} {v['worst_recall']:.1%} | {v['ok_fraction']:.1%} | {v['wrong_ok_of_all']:.2%} |")
    lines += ["", "Undone by the preprocessing (the model input barely moves), so not evidence of cross-lab robustness: "
              + ("; ".join(undone) if undone else "none") + ".",
              "", "Simulations of one lab's images are not another lab: the BCCD figures above are the cross-lab evidence."]
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", help="model folder (repeat); default the bundled pbs5 model")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="bench/results/crosslab.md")
    ap.add_argument("--limit", type=int, default=0, help="test images per class for the simulated shifts (0 = all)")
    a = ap.parse_args(argv)
    from bcc_core.data import load_split
    from bcc_core.inference import Predictor
    from bcc_core.verification import report_markdown, verify_folder

    data = Path(a.data)
    if not (data / "bccd").is_dir():
        print(f"skip: {data}/bccd not found")
        return 0
    models = a.model or ["models/pbs5-mobilenetv2"]
    lines = ["# Cross-lab evidence", "",
             "Generated by `bench/crosslab.py`. BCCD is another lab's white cells, measurement only (never trained, tuned "
             "or calibrated on). Intervals: Wilson 95%. A cell type the model does not know counts as wrong when shown "
             "as ok.", ""]
    result = {"external_bccd": {}, "simulated": None}
    for m in models:
        pred = Predictor.load(m)
        rep = verify_folder(pred, data / "bccd", BCCD_CLASS_MAP, name="BCCD")
        result["external_bccd"][Path(m).name] = rep
        lines += report_markdown(rep) + [""]
    pbs5 = models[0]  # the first model (trained on pbs5) also runs the simulations on its test split
    pred = Predictor.load(pbs5)
    items = load_split(Path(pbs5) / "split.json", data / "pbs5")["test"]
    if a.limit:
        items = [it for c in range(len(pred.classes)) for it in [x for x in items if x[1] == c][: a.limit]]
    result["simulated"] = simulated(pred, items, pred.classes)
    lines += [f"Model for the simulations: `{Path(pbs5).name}`.", ""] + simulated_lines(result["simulated"])
    write_report(a.out, lines, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
