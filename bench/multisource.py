"""Multi-source training (pbs5 + LISC) measured per source, with one lab held out.

Recipes (fast path: frozen backbone features, `TrainConfig` defaults, one model per seed):

* ``pbs5``      - pbs5 only (LISC held out entirely: the leave-one-source-out model for LISC);
* ``pbs5+lisc`` - pbs5 + LISC's basophil, monocyte and neutrophil (-> seg_neutrophil), pbs5's 5 classes;
* ``pb7``       - pbs5 + all of LISC, 7 classes (adds eosinophil and lymphocyte).

Each model is measured on: its own pbs5 test split; LISC's held-out test cells (the cells in the test
part of the LISC-trained model of the same seed, so pbs5-only is scored on exactly those cells); and
BCCD, a lab none of them saw (measurement only: never trained, tuned or thresholded on). Per class:
recall with a Wilson 95% interval, precision, shown-as-ok rate (status ok = no flag); per set:
wrong-and-ok (of all images). BCCD eosinophils/lymphocytes are unknown types for a 5-class model,
so any of them shown as ok counts as wrong-and-ok. LISC has ~5 shifted copies of each cell: intervals
on images are too narrow there; the number of distinct cells is given.

``--card-recipe MODEL`` trains the same recipes with that bundled model's training settings instead of the
fast path (its card's augmentation, fine-tuning, trust settings; the recipe sets sources, classes, class map
and seed): what the model would be had it been trained on the recipe's sources (models under
``bench/_work/multisource/<recipe>_card_s<seed>``).

``--models`` instead measures given model folders (bundled models and candidates) the same way.

Usage:
  python bench/multisource.py --seeds 42,1,2 --data ../shared/data --out bench/results/multisource.md
  python bench/multisource.py --card-recipe models/pbs5-mobilenetv2 --recipes pbs5+lisc,pbs5 --seeds 42,1,2 \
      --out bench/results/multisource_card_recipe.md
  python bench/multisource.py --models models/pbs5-mobilenetv2,models/pb7-mobilenetv2 --out bench/results/multisource_models.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from _report import write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bcc_core.backbones import OFFLINE_IMAGENET_WEIGHTS as WEIGHTS  # noqa: E402
from bcc_core.evaluation import wilson  # noqa: E402  (Wilson 95% interval: the one the product reports)

WORK = ROOT / "bench" / "_work" / "multisource"
PBS5 = ("basophil", "erythroblast", "monocyte", "myeloblast", "seg_neutrophil")
PB7 = ("basophil", "eosinophil", "erythroblast", "lymphocyte", "monocyte", "myeloblast", "seg_neutrophil")
CLASS_MAP = {"neutrophil": "seg_neutrophil"}
RECIPES = {  # pbs5+lisc first: pbs5-only is scored on the LISC test cells of its split
    "pbs5+lisc": {"sources": ["pbs5", "lisc"], "classes": PBS5},
    "pbs5": {"sources": ["pbs5"], "classes": PBS5},
    "pb7": {"sources": ["pbs5", "lisc"], "classes": PB7},
}



def measure(pred, images, truth, cells=None) -> dict:
    """Per-class recall (Wilson 95%), precision, shown-as-ok; wrong-and-ok over all images.

    Args:
        pred: a `Predictor`.
        images: list of RGB uint8 arrays.
        truth: expected class name per image, or None for a type the model does not know.
        cells: optional distinct-cell id per image (LISC copies), to report the number of cells.
    """
    res = pred.predict(images)
    p = np.array([r.predicted_class for r in res])
    ok = np.array([r.status == "ok" for r in res])
    t = np.array([x if x is not None else "" for x in truth])
    right = p == t
    per = {}
    for c in sorted(set(t.tolist()) - {""}):
        m = t == c
        k, n = int(right[m].sum()), int(m.sum())
        lo, hi = wilson(k, n)
        said = p == c
        per[c] = {"n": n, "recall": k / n, "recall_ci95": [lo, hi],
                  "precision": float(right[said].mean()) if said.any() else None,
                  "ok": float(ok[m].mean()), "wrong_ok": int((ok & m & ~right).sum())}
        if cells is not None:
            per[c]["cells"] = len({cells[i] for i in np.flatnonzero(m)})
    unk = t == ""
    return {"n": len(res), "accuracy_known": float(right[~unk].mean()) if (~unk).any() else None,
            "ok_fraction": float(ok.mean()), "wrong_ok_of_all": float((ok & ~right).mean()),
            "unknown_n": int(unk.sum()), "unknown_ok": int((ok & unk).sum()), "per_class": per}


def _read(paths):
    from bcc_core.io import read_image

    return [read_image(p) for p in paths]


class Sets:
    """The evaluation images, read once: BCCD, LISC (test cells chosen per split), pbs5 test per model."""

    def __init__(self, data: Path):
        from bcc_core.data import list_imagefolder

        self.data = data
        bccd = list_imagefolder(data / "bccd")
        self.bccd_images = _read(bccd.paths)
        self.bccd_truth = [CLASS_MAP.get(bccd.classes[l], bccd.classes[l]) for l in bccd.labels]
        self.cell_of = {}
        with open(data / "lisc" / "groups.csv") as fh:
            next(fh)
            for line in fh:
                f, _, g = line.strip().split(",")[:3]
                self.cell_of[f] = g
        self._img = {}

    def images(self, paths):
        missing = [p for p in paths if p not in self._img]
        for p, im in zip(missing, _read(missing)):
            self._img[p] = im
        return [self._img[p] for p in paths]

    def split_items(self, model_dir: Path, source: str, part: str = "test"):
        """(abs path, class name) of one source's images in a model's split part."""
        doc = json.loads((model_dir / "split.json").read_text())
        classes = doc["classes"]
        rows = doc["splits"][part]
        several = any(r[0].startswith(("pbs5/", "lisc/")) for r in rows)
        out = []
        for rel, lab, _ in rows:
            if several:
                src, rest = rel.split("/", 1)
            else:
                src, rest = json.loads((model_dir / "model_card.json").read_text())["data"]["root"], rel
            if src == source:
                out.append((str(self.data / src / rest), classes[lab]))
        return out


def evaluate_model(model_dir: Path, sets: Sets, lisc_items) -> dict:
    """pbs5 own test split, LISC test cells (`lisc_items`: (path, class) in the model's class names), BCCD."""
    from bcc_core.inference import Predictor

    pred = Predictor.load(model_dir)
    known = set(pred.classes)
    out = {"model": model_dir.name, "classes": pred.classes}
    pb = sets.split_items(model_dir, "pbs5")
    out["pbs5_test"] = measure(pred, sets.images([p for p, _ in pb]), [c for _, c in pb])
    if lisc_items:
        li = [(p, c) for p, c in lisc_items]
        truth = [c if c in known else None for _, c in li]
        cells = [sets.cell_of.get(Path(p).parent.name + "/" + Path(p).name) for p, _ in li]
        out["lisc_test"] = measure(pred, sets.images([p for p, _ in li]), truth, cells)
    out["bccd"] = measure(pred, sets.bccd_images, [c if c in known else None for c in sets.bccd_truth])
    return out


def _lisc_from(model_dir: Path, sets: Sets):
    """LISC test items of a LISC-trained model, with its folder classes mapped to class names."""
    return sets.split_items(model_dir, "lisc") if (model_dir / "split.json").is_file() else []


RECIPE_SETS = ("task", "weights", "seed", "classes", "class_map")
"""TrainConfig fields a recipe sets itself; every other field may come from a bundled model's card."""


def card_settings(model_dir: Path) -> dict:
    """A bundled model's training settings (its card's `training`) without the fields a recipe sets."""
    from bcc_core.training import TrainConfig

    training = json.loads((Path(model_dir) / "model_card.json").read_text())["training"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(RECIPE_SETS)
    out = {k: v for k, v in training.items() if k in fields}
    if "fractions" in out:
        out["fractions"] = tuple(out["fractions"])
    return out


def train_recipe(name: str, seed: int, data: Path, settings: dict | None = None) -> Path:
    """Train recipe `name` (fast path, or with `settings` from a bundled card) once per seed; reuse a finished one."""
    from bcc_core.training import TrainConfig, train

    r = RECIPES[name]
    out = WORK / (f"{name}_card_s{seed}" if settings else f"{name}_s{seed}")
    if (out / "metrics.json").is_file() and (out / "model_card.json").is_file():
        return out
    cfg = TrainConfig(**(settings or {}), task=name, weights=str(WEIGHTS), seed=seed, classes=tuple(r["classes"]),
                      class_map=dict(CLASS_MAP) if "lisc" in r["sources"] else {})
    srcs = [str(data / s) for s in r["sources"]]
    t = time.perf_counter()
    train(srcs[0] if len(srcs) == 1 else srcs, out, cfg, progress=False, cache=True)
    print(f"trained {name} seed {seed} in {(time.perf_counter() - t) / 60:.1f} min", flush=True)
    return out


# ----------------------------------------------------------------------------- report


def _fmt_ci(v):
    lo, hi = v["recall_ci95"]
    return f"{v['recall']:.2f} [{lo:.2f}, {hi:.2f}]"


def _row_classes(res, set_name, classes):
    cells = []
    per = res[set_name]["per_class"]
    for c in classes:
        v = per.get(c)
        prec = "–" if v is None or v["precision"] is None else f"{v['precision']:.2f}"
        cells.append("–" if v is None else f"{_fmt_ci(v)} p={prec} ok={v['ok']:.2f}")
    return cells


def table(rows: list[tuple[str, dict]], set_name: str, classes) -> list[str]:
    head = ["model"] + list(classes) + ["wrong & ok (of all)", "shown ok", "n"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, res in rows:
        if set_name not in res:
            continue
        s = res[set_name]
        out.append("| " + " | ".join([label] + _row_classes(res, set_name, classes)
                                    + [f"{s['wrong_ok_of_all']:.2%}", f"{s['ok_fraction']:.1%}", str(s["n"])]) + " |")
    return out


def seed_summary(results: dict) -> list[str]:
    """Mean (min..max) over seeds of the headline figures per recipe."""
    keys = [("bccd", "monocyte"), ("bccd", "seg_neutrophil"), ("bccd", "eosinophil"), ("bccd", "lymphocyte"),
            ("lisc_test", "basophil"), ("lisc_test", "monocyte"), ("lisc_test", "seg_neutrophil")]
    head = ["recipe", "seeds", "pbs5 test acc"] + [f"{s.replace('_test', '')} {c} recall" for s, c in keys] + \
           ["BCCD wrong & ok", "LISC wrong & ok"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe in RECIPES:
        runs = [v for k, v in results.items() if k.rsplit("_s", 1)[0] == recipe]
        if not runs:
            continue

        def agg(vals):
            vals = [x for x in vals if x is not None]
            if not vals:
                return "–"
            return f"{np.mean(vals):.3f}" + (f" ({min(vals):.2f}–{max(vals):.2f})" if len(vals) > 1 else "")

        cells = [recipe, str(len(runs)), agg([r["pbs5_test"]["accuracy_known"] for r in runs])]
        for s, c in keys:
            cells.append(agg([r[s]["per_class"][c]["recall"] if s in r and c in r[s]["per_class"] else None
                              for r in runs]))
        cells.append(agg([r["bccd"]["wrong_ok_of_all"] for r in runs]))
        cells.append(agg([r["lisc_test"]["wrong_ok_of_all"] if "lisc_test" in r else None for r in runs]))
        out.append("| " + " | ".join(cells) + " |")
    return out


def report(results: dict, out: Path, title: str, intro: list[str]):
    """Write the Markdown tables (and the JSON) of `results`: every recipe / model measured so far."""
    rows = sorted(results.items())
    lines = [f"# {title}", "", *intro, ""]
    if any("_s" in k for k in results):
        lines += ["## Summary over seeds (mean, min–max)", "", *seed_summary(results), ""]
    for set_name, label, classes in (
            ("bccd", "BCCD (another lab; measurement only)", PB7),
            ("lisc_test", "LISC held-out test cells", PB7),
            ("pbs5_test", "pbs5 test split (each model's own)", PBS5)):
        lines += [f"## {label}", "", "Per class: recall [Wilson 95%] p=precision ok=shown-as-ok rate.", "",
                  *table(rows, set_name, classes), ""]
    lisc_cells = {k: {c: v["cells"] for c, v in r["lisc_test"]["per_class"].items()} for k, r in rows if "lisc_test" in r}
    if lisc_cells:
        lines += ["Distinct LISC cells per class in the test sets: " + json.dumps(next(iter(lisc_cells.values()))), ""]
    write_report(out, lines, results, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--card-recipe",
                    help="train the recipes with this bundled model's card settings (not the fast path)")
    ap.add_argument("--models", help="comma-separated model folders to measure instead of training recipes")
    ap.add_argument("--lisc-split", help="model folder whose LISC test cells are used for models not trained on LISC")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "multisource.md"))
    ap.add_argument("--resume", action="store_true", help="keep results already in the --out .json (else re-measure)")
    a = ap.parse_args(argv)
    data = Path(a.data)
    if not (data / "lisc").is_dir() or not (data / "bccd").is_dir():
        print(f"skip: {data}/lisc or {data}/bccd not found")
        return 0
    sets = Sets(data)
    out = Path(a.out)
    prev = out.with_suffix(".json")
    results = json.loads(prev.read_text()) if a.resume and prev.is_file() else {}
    if a.models:
        ref = _lisc_from(Path(a.lisc_split), sets) if a.lisc_split else []
        for m in [Path(x) for x in a.models.split(",")]:
            own = _lisc_from(m, sets)
            results[m.name] = evaluate_model(m, sets, own or ref)
            results[m.name]["lisc_cells_from"] = m.name if own else (Path(a.lisc_split).name if ref else None)
            report(results, out, "Bundled and candidate models per source",
                         ["Generated by `bench/multisource.py --models`. LISC test cells: the model's own split, or "
                          "(for a model not trained on LISC) those of `--lisc-split`."])
        return 0
    settings = card_settings(Path(a.card_recipe)) if a.card_recipe else None
    how = (f"each recipe trained with the training settings of `{a.card_recipe}`'s card (augmentation, "
           f"fine-tuning {settings.get('fine_tune_layers')} layers for {settings.get('fine_tune_epochs')} epochs, "
           "trust); "
           "the recipe sets sources, classes and seed" if settings else
           "fast path (frozen MobileNetV2 features, `TrainConfig` defaults)")
    intro = [f"Generated by `bench/multisource.py`: {how}, "
             "one model per recipe and seed. `pbs5` never saw LISC: on LISC it is the leave-one-source-out model, "
             "scored on the same held-out LISC cells as the `pbs5+lisc` model of its seed. BCCD: no model saw it; "
             "recall counts the suggested class whatever its status; wrong & ok counts unknown types shown as ok."]
    title = ("Multi-source training with a bundled model's recipe: " + Path(a.card_recipe).name if settings else
             "Multi-source training: pbs5 + LISC, per source and leave-one-source-out")
    for seed in [int(s) for s in a.seeds.split(",")]:
        for recipe in a.recipes.split(","):
            key = f"{recipe}_s{seed}"
            if key in results:
                continue
            d = train_recipe(recipe, seed, data, settings)
            lisc = _lisc_from(d, sets)
            with_lisc = WORK / (f"pbs5+lisc_card_s{seed}" if settings else f"pbs5+lisc_s{seed}")
            if not lisc and (with_lisc / "split.json").is_file():
                lisc = _lisc_from(with_lisc, sets)
            results[key] = evaluate_model(d, sets, lisc)
            report(results, out, title, intro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
