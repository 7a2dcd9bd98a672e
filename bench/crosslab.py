"""Cross-lab checks for a pbs5 model: an external lab (BCCD) and simulated lab shifts on the test split.

BCCD (another lab, microscope and stain) is used only to measure: its neutrophils should be called
seg_neutrophil, monocytes monocyte, basophils basophil; its eosinophils and lymphocytes are cell types
the model does not know and must not be shown as `ok`.

Usage: python bench/crosslab.py --model models/pbs5-mobilenetv2 --data ../shared/data --out bench/results/crosslab.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bcc_core.augment import unsharp_mask  # noqa: E402
from bcc_core.preprocess import reinhard  # noqa: E402

BCCD_MAP = {"neutrophil": "seg_neutrophil", "monocyte": "monocyte", "basophil": "basophil",
            "eosinophil": None, "lymphocyte": None}
BARCELONA = ("basophil", "erythroblast", "monocyte")
MUNICH = ("myeloblast", "seg_neutrophil")


def external_report(pred, images, truth) -> dict:
    """truth: class name or None (unknown type). Recall counts the suggested class whatever the status."""
    res = pred.predict(images)
    n = len(res)
    ok = np.array([r.status == "ok" for r in res])
    known = np.array([t is not None for t in truth])
    right = np.array([t is not None and r.predicted_class == t for r, t in zip(res, truth)])
    wrong_ok = ok & ~right  # includes unknown types shown as ok
    per = {}
    for t in sorted({t for t in truth if t}):
        m = np.array([x == t for x in truth])
        per[t] = {"n": int(m.sum()), "recall": float(right[m].mean()), "ok": float(ok[m].mean())}
    unk = ~known
    return {"n": n, "recall_known": float(right[known].mean()) if known.any() else None, "per_class": per,
            "ok_fraction": float(ok.mean()), "wrong_ok_of_all": float(wrong_ok.mean()),
            "unknown_types_ok": int((ok & unk).sum()), "unknown_types_n": int(unk.sum()),
            "flag_counts": _flag_counts(res), "predicted": dict(Counter(r.predicted_class for r in res))}


def _flag_counts(res):
    return dict(Counter(f.code for r in res for f in r.flags))


def lab_stats(images):
    labs = [cv2.cvtColor(im, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32) for im in images]
    allp = np.concatenate(labs)
    return allp.mean(0), allp.std(0)


def restain(img, target):
    """Give an image another lab's global colour statistics (Reinhard transfer on the raw image)."""
    return reinhard(img, *target, max_gain=1e3)


def rescale(img, f):
    h, w = img.shape[:2]
    r = cv2.resize(img, (max(8, int(w * f)), max(8, int(h * f))), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
    return r


def other_look(img, c, st_b, st_m):
    """The other lab's whole look: its stain, and its optics (Munich images are softer than Barcelona's)."""
    if c in BARCELONA:
        return cv2.GaussianBlur(restain(img, st_m), (0, 0), 1.5)
    return unsharp_mask(restain(img, st_b), 2.0, 1.0)


def hue_shift(img, deg):
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(int) + deg // 2) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def simulated_shifts(pred, items, classes) -> dict:
    """Accuracy of the suggested class under simulated lab shifts (whatever the status)."""
    from sklearn.metrics import f1_score, recall_score

    from bcc_core.io import read_image

    imgs = [read_image(p) for p, _ in items]
    y = np.array([l for _, l in items])
    names = [classes[l] for l in y]
    barca = [im for im, c in zip(imgs, names) if c in BARCELONA]
    munich = [im for im, c in zip(imgs, names) if c in MUNICH]
    st_b, st_m = lab_stats(barca[:100]), lab_stats(munich[:100])
    shifts = {
        "none": lambda im, c: im,
        "stain of the other lab (Reinhard transfer)": lambda im, c: restain(im, st_m if c in BARCELONA else st_b),
        "magnification x0.6": lambda im, c: rescale(im, 0.6),
        "magnification x1.5 (crop to original size)": lambda im, c: _centre_crop(rescale(im, 1.5), im.shape[:2]),
        "other lab's stain + magnification (x1.25 Barcelona, x0.8 Munich)":
            lambda im, c: rescale(restain(im, st_m if c in BARCELONA else st_b), 1.25 if c in BARCELONA else 0.8),
        "other lab's stain + sharpness (Barcelona blurred, Munich sharpened)":
            lambda im, c: other_look(im, c, st_b, st_m),
        "hue +20 deg": lambda im, c: hue_shift(im, 20),
        "blur sigma 2": lambda im, c: cv2.GaussianBlur(im, (0, 0), 2.0),
        "JPEG q=30": lambda im, c: cv2.imdecode(cv2.imencode(".jpg", im[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 30])[1], 1)[..., ::-1].copy(),
    }
    out = {}
    for name, f in shifts.items():
        res = pred.predict([f(im, c) for im, c in zip(imgs, names)])
        p = np.array([classes.index(r.predicted_class) for r in res])
        ok = np.array([r.status == "ok" for r in res])
        recall = recall_score(y, p, labels=list(range(len(classes))), average=None, zero_division=0)
        present = [i for i in range(len(classes)) if (y == i).any()]
        worst = min(present, key=lambda i: recall[i])
        out[name] = {"accuracy": float((p == y).mean()), "macro_f1": float(f1_score(y, p, average="macro")),
                     "ok_fraction": float(ok.mean()), "wrong_ok_of_all": float((ok & (p != y)).mean()),
                     "recall": {classes[i]: float(recall[i]) for i in present},
                     "worst_class": classes[worst], "worst_recall": float(recall[worst])}
    return out


def _centre_crop(img, hw):
    h, w = hw
    H, W = img.shape[:2]
    y0, x0 = (H - h) // 2, (W - w) // 2
    return img[y0:y0 + h, x0:x0 + w]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/pbs5-mobilenetv2")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="bench/results/crosslab.md")
    ap.add_argument("--limit", type=int, default=0, help="test images per class for the simulated shifts (0 = all)")
    a = ap.parse_args(argv)
    from bcc_core.data import list_imagefolder, load_split
    from bcc_core.inference import Predictor
    from bcc_core.io import read_image

    data = Path(a.data)
    if not (data / "bccd").is_dir():
        print(f"skip: {data}/bccd not found")
        return 0
    pred = Predictor.load(a.model)
    ds = list_imagefolder(data / "bccd")
    imgs = [read_image(p) for p in ds.paths]
    truth = [BCCD_MAP.get(ds.classes[l]) for l in ds.labels]
    ext = external_report(pred, imgs, truth)
    items = load_split(Path(a.model) / "split.json", data / "pbs5")["test"]
    if a.limit:
        items = [it for c in range(len(pred.classes)) for it in [x for x in items if x[1] == c][: a.limit]]
    sim = simulated_shifts(pred, items, pred.classes)
    lines = [f"# Cross-lab checks — model `{Path(a.model).name}`", "",
             "Generated by `bench/crosslab.py`. BCCD is another lab's white cells (measure only: never trained or tuned on).", "",
             "## External lab (BCCD)", "",
             f"- images: {ext['n']}; shown as ok: {ext['ok_fraction']:.1%}; **wrong and shown as ok: {ext['wrong_ok_of_all']:.2%} of all images** (target ≤ 2%)",
             f"- unknown cell types (eosinophil, lymphocyte) shown as ok: {ext['unknown_types_ok']} of {ext['unknown_types_n']}",
             f"- recall of the suggested class on known types: {ext['recall_known']:.1%}", "",
             "| BCCD class → expected | n | recall | shown as ok |", "|---|---|---|---|"]
    for t, v in ext["per_class"].items():
        lines.append(f"| {t} | {v['n']} | {v['recall']:.1%} | {v['ok']:.1%} |")
    lines += ["", f"Flags raised: {json.dumps(ext['flag_counts'])}", f"Suggested classes: {json.dumps(ext['predicted'])}", "",
              "## Simulated lab shifts on the pbs5 test split", "",
              "Recall is of the suggested class whatever the status; the issue asks for every class ≥ 90% on other labs.", "",
              "| shift | accuracy | macro-F1 | worst class recall | shown as ok | wrong and ok (of all) |",
              "|---|---|---|---|---|---|"]
    for k, v in sim.items():
        lines.append(f"| {k} | {v['accuracy']:.1%} | {v['macro_f1']:.3f} | {v['worst_class']} {v['worst_recall']:.1%} "
                     f"| {v['ok_fraction']:.1%} | {v['wrong_ok_of_all']:.2%} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    Path(a.out).with_suffix(".json").write_text(json.dumps({"external_bccd": ext, "simulated": sim}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
