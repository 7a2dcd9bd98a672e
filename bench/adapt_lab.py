"""Learning a new lab: adapt a bundled model to a lab it never saw from N reviewed cells per class and
measure on the rest of that lab (cells never used for fitting or calibration).

The new lab is BCCD (`--lab bccd`: BCCD may serve as the "new lab" of this benchmark, never in a bundled
model) or LISC (`--lab lisc`, for a model that was not trained on it: the pbs5 model; expert-labelled,
about 45 distinct cells per class, each photographed ~5 times, grouped by its groups.csv).
Every repeat draws the "reviewed" cells with its own seed: N distinct cells per class (duplicate groups),
one image each, as a lab reviewing N cells would have; it writes them as a temporary ImageFolder of
symlinks (`neutrophil` -> `seg_neutrophil`) and runs `bcc_core.adapt.adapt` exactly as
`python -m bcc_core adapt --data` does; the adapted folder is then loaded by `Predictor` and run on the
remaining cells, one image per remaining cell. Classes with fewer than 2N cells give half their cells
(if at least 5 remain to measure) or are measure-only. Eosinophils and lymphocytes are cell types the
pbs5 model does not know: shown as ok they count as wrong (unless `--add-classes` teaches them). Alternatives measured on the same cells in the same run: the parent unadapted, and a
plain logistic-regression head (sklearn) on the same frozen features (parent replay + the lab's
labelled cells, class-balanced per source) with the parent's OOD statistics and review threshold.

Usage: python bench/adapt_lab.py --model models/pbs5-mobilenetv2 --data ../shared/data [--lab lisc]
       [--set KEY=VALUE] [--first-repeat 5] --out bench/results/adapt_lab.md
`--set` overrides an `AdaptConfig` setting (a settings study); `--first-repeat K` runs repeats K.. (more draws of
the same N: repeat r draws with seed r, so 0-4 and 5-9 together are ten repeats); `--render A.json --render B.json
--out C.md` reports the parts of one study together.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapt_lab_report import fmt_recall, report  # noqa: E402  (imports bcc_core)

KNOWN = {"neutrophil": "seg_neutrophil", "monocyte": "monocyte", "basophil": "basophil"}
UNKNOWN = ("eosinophil", "lymphocyte")
MIN_MEASURE = 5
# A setting missing from a saved run's config was added after that run, which behaved as its default did
# then: the default now, except these (colour_gain became 3 once measured, runs before it read the
# histogram unscaled; cross_fit became the default once measured, runs before it fitted the head on the
# fitting part; lab_check_folds likewise, runs before it checked the calibration cells only; second_opinion
# likewise, runs before it showed a cell as ok on the one head's word; doubted_labels likewise, runs before it
# learnt the doubted cells as labelled).
RAN_AS_BEFORE_IT_EXISTED = {"colour_gain": 1.0, "colour_with_top": "refit", "cross_fit": False, "lab_check_folds": 0,
                            "second_opinion": False, "doubted_labels": "list"}



def pick_labelled(names, groups, n_per_class, taught, rng):
    """Indices of the 'reviewed' cells: N distinct cells (duplicate groups) per class, one image each
    (half of a small class if at least MIN_MEASURE cells remain to measure, else none)."""
    chosen = []
    for c in taught:
        g = np.unique(groups[names == c])
        k = n_per_class if len(g) >= 2 * n_per_class else min(n_per_class, len(g) // 2)
        if len(g) - k < MIN_MEASURE or k < 2:
            continue
        chosen += [np.flatnonzero((groups == gi) & (names == c))[0] for gi in rng.choice(g, k, replace=False)]
    return np.array(sorted(chosen), int)


def flip_labels(filed: dict, names, target: dict, k: int, rng) -> list[int]:
    """Reviewer error: file k of each class's reviewed cells under another class reviewed in this repeat (in
    place); returns the cells moved."""
    folders = sorted(set(filed.values()))
    moved = []
    for c in folders:
        cells = sorted(i for i, f in filed.items() if f == c and target[names[i]] == c)
        for i in rng.choice(cells, max(0, min(k, len(cells) - 2)), replace=False):  # two stay: one fits, one calibrates
            filed[int(i)] = str(rng.choice([f for f in folders if f != c]))
            moved.append(int(i))
    return moved


def label_check_figures(doubted: list[dict] | None, flipped: list[str], left_out=()) -> dict | None:
    """What adapt's label check listed (the cells a first pass left out included): how many cells, and of the
    cells filed under a wrong class (file names), how many it found and how many were left out."""
    if doubted is None:
        return None
    files = sorted({d["file"] for d in doubted} | set(left_out))
    listed, gone = {Path(f).name for f in files}, {Path(f).name for f in left_out}
    return {"doubted": len(listed), "flipped": len(flipped), "flipped_found": len(listed & set(flipped)),
            "left_out": len(gone), "flipped_left_out": len(gone & set(flipped)), "files": files}


def trained_on(model_dir, lab: str) -> bool:
    """Whether the model's card names `lab` among its training data (then it is not a new lab for it)."""
    card = json.loads((Path(model_dir) / "model_card.json").read_text())
    return lab.lower() in json.dumps(card.get("data", {})).lower()


def lab_groups(ds, lab_dir: Path) -> np.ndarray:
    """Duplicate groups of a lab's images: exact and near duplicates, joined with its groups.csv if any."""
    from bcc_core.data import group_duplicates, merge_group_file

    return merge_group_file(ds.paths, group_duplicates(ds.paths, progress=False), lab_dir / "groups.csv")


def measure(pred_cls, ok, truth, classes):
    """Per-class recall counts, ok fraction, wrong-and-ok (unknown types shown as ok count as wrong)."""
    right = np.array([t is not None and p == t for p, t in zip(pred_cls, truth)])
    per = {}
    for c in classes:
        m = np.array([t == c for t in truth])
        if m.any():
            per[c] = {"hits": int(right[m].sum()), "n": int(m.sum())}
    unk = np.array([t is None for t in truth])
    confusion: dict = {}  # true class (or "not a model class") -> suggested class -> cells
    for p, t in zip(pred_cls, truth):
        row = confusion.setdefault(t or "not a model class", {})
        row[p] = row.get(p, 0) + 1
    return {"n": len(truth), "per_class": per, "ok": int(ok.sum()), "wrong_ok": int((ok & ~right).sum()),
            "unknown_ok": int((ok & unk).sum()), "unknown_n": int(unk.sum()), "confusion": confusion}


def threshold_ceiling(conf, wrong, gate, wrong_ok_max: float = 0.02) -> dict:
    """The most cells any single confidence threshold could show as ok with wrong-and-ok (of all cells) ≤
    `wrong_ok_max`, the threshold chosen on these same cells (so not attainable by a rule fitted elsewhere: an
    upper bound). `gate`: cells no other flag stops (OOD, quality, an unreviewed class); ties are taken together."""
    conf, wrong, gate = (np.asarray(v) for v in (conf, wrong, gate))
    n = len(conf)
    order = np.argsort(-conf[gate], kind="stable")
    c, w = conf[gate][order], np.cumsum(wrong[gate][order])
    best = {"threshold": None, "ok": 0, "wrong_ok": 0, "n": n}
    for i in range(len(c)):
        if i + 1 < len(c) and c[i + 1] == c[i]:
            continue
        if w[i] > wrong_ok_max * n:
            break
        best = {"threshold": float(c[i]), "ok": i + 1, "wrong_ok": int(w[i]), "n": n}
    return best


def ceilings(pred, x, qbad, truth) -> dict:
    """threshold_ceiling of the adapted network as it runs (`pred.views`), and, for a model scoring one view,
    of its probabilities averaged over the 8 flips / 90° rotations of each cell (does that score rank its
    errors lower?)."""
    from bcc_core.preprocess import dihedral_views
    from bcc_core.trust import TrustModel, softmax_t

    tm = TrustModel.from_card(pred.card, pred.model_dir, pred.ood_stats)
    f, lg, e = pred.forward(x)
    d = tm.decide(lg, f, e, qbad, use_review=False)  # ok = no flag but the threshold's
    classes = np.array(pred.classes)
    y = np.array([t if t is not None else "" for t in truth])
    as_run = {"as_run": threshold_ceiling(d.confidence, classes[d.pred] != y, d.ok),
              "as_run_accuracy": float((classes[d.pred] == y).mean()), "views": pred.views}
    if pred.views > 1:
        return as_run
    probs = np.mean([d.probs] + [softmax_t(pred.forward(v)[1], tm.temperature) for v in dihedral_views(x, 7)], 0)
    p_tta = probs.argmax(1)
    gate_tta = ~d.ood_flag & ~np.asarray(qbad, bool) & ~np.isin(classes[p_tta], tm.review_classes)
    if tm.cue_flag() is not None:
        gate_tta[:] = False
    return {**as_run, "dihedral_mean": threshold_ceiling(probs.max(1), classes[p_tta] != y, gate_tta),
            "dihedral_mean_accuracy": float((classes[p_tta] == y).mean())}


def lr_head(bank, f_lab, y_lab, n_cls, seed):
    from sklearn.linear_model import LogisticRegression

    from bcc_core.adapt import _sample_weights

    fit = np.isin(bank["part"], ("train", "lab_fit"))
    X = np.concatenate([bank["features"][fit], f_lab])
    Y = np.concatenate([bank["labels"][fit], y_lab])
    S = np.r_[np.zeros(fit.sum(), int), np.ones(len(y_lab), int)]
    clf = LogisticRegression(max_iter=3000, C=1.0, random_state=seed)
    clf.fit(X, Y, sample_weight=_sample_weights(Y, S, 1, 1.0))
    return clf


def parent_test_images(model_dir: Path, data: Path):
    """The parent's test part (its split.json) as model inputs and labels, from whichever root resolves it."""
    from bcc_core.data import load_split
    from bcc_core.inference import Predictor
    from bcc_core.io import read_image

    card = json.loads((model_dir / "model_card.json").read_text())
    for root in (data / card["data"]["name"], data):
        try:
            test = load_split(model_dir / "split.json", root)["test"]
        except (FileNotFoundError, ValueError):
            continue
        pred = Predictor.load(model_dir)
        return np.stack([pred.prepare(read_image(p))[0] for p, _ in test]), np.array([y for _, y in test])
    raise FileNotFoundError(f"{model_dir}/split.json: its test images are not under {data}")


def test_macro_f1(pred, x, y, n_old: int) -> float:
    """Macro-F1 over the parent's classes (a parent test image suggested as an added class is a miss)."""
    from sklearn.metrics import f1_score

    logits = pred.forward(x)[1]
    return float(f1_score(y, np.asarray(logits).argmax(1), labels=list(range(n_old)), average="macro", zero_division=0))


def pooled(results: list[dict]) -> dict:
    """Saved results of one study run in parts (`--first-repeat`) as one: their repeats together. Refuses parts
    of different studies or repeats that appear twice."""
    from bcc_core.adapt import AdaptConfig

    first, defaults = results[0], {**AdaptConfig().to_dict(), **RAN_AS_BEFORE_IT_EXISTED}
    for r in results[1:]:
        for k in ("model", "lab"):
            if r.get(k) != first.get(k):
                raise SystemExit(f"cannot pool: {k} differs ({first.get(k)} vs {r.get(k)})")
        a, b = first.get("config", {}), r.get("config", {})  # a setting added later: see RAN_AS_BEFORE_IT_EXISTED
        differ = {k for k in a.keys() | b.keys() if a.get(k, defaults.get(k)) != b.get(k, defaults.get(k))}
        if differ:
            raise SystemExit(f"cannot pool: settings differ ({', '.join(sorted(differ))})")
    runs = [run for r in results for run in r["runs"]]
    keys = [(run["n_per_class"], run["add_classes"], run["repeat"]) for run in runs]
    if len(set(keys)) != len(keys):
        raise SystemExit("cannot pool: a repeat appears twice")
    if len(results) == 1:
        return first
    overrides = {k: v for r in results for k, v in r.get("config_overrides", {}).items()}
    return {**first, "runs": runs, "config_overrides": overrides, "wall_time_s": sum(r["wall_time_s"] for r in results),
            "load_avg_15min_at_end": max(r.get("load_avg_15min_at_end") or 0 for r in results)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/pbs5-mobilenetv2")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--lab", default="bccd", help="the new lab: a folder of --data (bccd, or lisc for the pbs5 model)")
    ap.add_argument("--out", default="bench/results/adapt_lab.md")
    ap.add_argument("--n", default="10,20", help="reviewed cells per class, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--first-repeat", type=int, default=0, help="repeat numbers start here: other draws of the "
                                                              "same N (each repeat's seed is its number)")
    ap.add_argument("--add-classes-n", default="10", help="N values also run with --add-classes (eosinophil, "
                                                          "lymphocyte taught); empty to skip")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="AdaptConfig override (settings study), e.g. --set lab_weight=2")
    ap.add_argument("--flip", type=int, default=0, metavar="K",
                    help="reviewer error: K of each class's reviewed cells are filed under another taught class "
                         "(drawn per repeat); the held-out cells keep their labels")
    ap.add_argument("--work", default="runs/adapt_lab_bench", help="adapted models are written here (gitignored)")
    ap.add_argument("--render", metavar="JSON", action="append",
                    help="only write --out from saved results (no adaptation); repeated, their repeats are pooled "
                         "(same model, lab and settings, distinct repeat numbers)")
    a = ap.parse_args(argv)
    if a.render:
        res = pooled([json.loads(Path(f).read_text()) for f in a.render])
        if len(a.render) > 1:
            res["pooled_from"] = [Path(f).name for f in a.render]
        write_report(a.out, report(res), res)
        return 0

    from bcc_core import calibration, ood
    from bcc_core.adapt import AdaptConfig, adapt
    from bcc_core.data import list_imagefolder
    from bcc_core.inference import Predictor
    from bcc_core.replay import REPLAY_FILE, load_bank

    import dataclasses

    types = {f.name: f.type for f in dataclasses.fields(AdaptConfig)}
    conv = {"int": int, "float": float, "str": str, "bool": lambda v: v.lower() in ("1", "true", "yes")}
    overrides = {k: conv[types[k]](v) for k, v in (kv.split("=", 1) for kv in a.set)}
    data = Path(a.data)
    lab_dir = data / a.lab
    if not lab_dir.is_dir():
        print(f"skip: {lab_dir} not found")
        return 0
    if trained_on(a.model, a.lab):
        print(f"refused: {a.model} was trained on {a.lab}; it is not a new lab for this model")
        return 2
    t_start = time.perf_counter()
    parent = Predictor.load(a.model)
    bank = load_bank(Path(a.model) / REPLAY_FILE)
    test = bank["part"] == "test"
    n_old = len(parent.classes)
    ds = list_imagefolder(lab_dir)
    names = np.array([ds.classes[l] for l in ds.labels])
    groups = lab_groups(ds, lab_dir)
    from bcc_core.io import read_image

    prepared = [parent.prepare(read_image(p)) for p in ds.paths]
    inputs = np.stack([p[0] for p in prepared])
    qflags = [p[1] for p in prepared]
    feats, logits, early = parent.forward(inputs)
    parent_res = parent.predict_inputs(inputs, qflags)
    x_test, y_test = parent_test_images(Path(a.model), data)
    f1_parent_images = test_macro_f1(parent, x_test, y_test, n_old)
    qbad = np.array([bool(q) for q in qflags])
    cache: dict = {}
    work = Path(a.work)
    runs = []
    modes = [(int(n), False) for n in a.n.split(",") if n] + [(int(n), True) for n in a.add_classes_n.split(",") if n]
    for n_per, add in modes:
        taught = list(KNOWN) + (list(UNKNOWN) if add else [])
        for r in range(a.first_repeat, a.first_repeat + a.repeats):
            rng = np.random.default_rng(10_000 * n_per + 100 * add + r)
            lab_idx = pick_labelled(names, groups, n_per, taught, rng)
            # Every other cell, one image each (a copy or near-duplicate of a reviewed cell is not an unseen cell).
            rest = np.array([i for i in range(len(names)) if not np.isin(groups[i], groups[lab_idx])
                             and i == np.flatnonzero(groups == groups[i])[0]], int)
            target = {**KNOWN, **({u: u for u in UNKNOWN} if add else {})}
            filed = {int(i): target[names[i]] for i in lab_idx}  # the folder each reviewed cell is filed under
            flipped = flip_labels(filed, names, target, a.flip, rng) if a.flip else []
            with tempfile.TemporaryDirectory() as tmp:
                for i in lab_idx:
                    d = Path(tmp) / filed[int(i)]
                    d.mkdir(exist_ok=True)
                    (d / Path(ds.paths[i]).name).symlink_to(ds.paths[i])
                out = work / f"n{n_per}{'_add' if add else ''}_r{r}"
                summ = adapt(a.model, tmp, out, AdaptConfig(lab=a.lab, add_classes=add, seed=r, **overrides),
                             cache=cache)
            new = Predictor.load(out)
            res = new.predict_inputs(inputs[rest], [qflags[i] for i in rest])
            truth = [target.get(names[i]) if (add or names[i] in KNOWN) else None for i in rest]
            truth_parent = [KNOWN.get(names[i]) for i in rest]
            m_new = measure([x.predicted_class for x in res], np.array([x.status == "ok" for x in res]), truth,
                            new.classes)
            # Forgetting, measured on the parent's test images (the adapted network's top may have changed).
            m_new["parent_f1"] = {"before": f1_parent_images, "after": test_macro_f1(new, x_test, y_test, n_old),
                                  "on": f"{len(y_test)} test images"}
            m_new["parent_f1_card"] = summ["parent_test_macro_f1"]
            m_new["backbone_fine_tuned"] = summ["backbone_fine_tuned"]
            m_new["lab_cal"] = summ["after"]
            m_new["time_s"] = summ["time_s"]
            m_new["threshold_ceiling"] = ceilings(new, inputs[rest], qbad[rest], truth)
            m_new["labels_to_recheck"] = label_check_figures(summ["labels_to_recheck"],
                                                             [Path(ds.paths[i]).name for i in flipped],
                                                             summ["labels_left_out"])
            pr = [parent_res[i] for i in rest]
            m_par = measure([x.predicted_class for x in pr], np.array([x.status == "ok" for x in pr]), truth,
                            new.classes)
            # Plain logistic regression on the same frozen features, the parent's thresholds.
            y_lab = np.array([new.classes.index(filed[int(i)]) for i in lab_idx])
            clf = lr_head(bank, feats[lab_idx], y_lab, len(new.classes), r)
            dec = clf.decision_function(feats[rest])
            pl = clf.predict_proba(feats[rest])
            u = ood.score(parent.card.ood["method"], feats[rest], dec, parent.ood_stats, parent.card.temperature,
                          parent.card.ood["scales"], early=early[rest])
            ok_lr = (u <= parent.card.ood["threshold"]) & ~qbad[rest] & (pl.max(1) >= parent.card.review_rule["threshold"])
            m_lr = measure([new.classes[k] for k in clf.classes_[pl.argmax(1)]], ok_lr, truth, new.classes)
            from sklearn.metrics import f1_score

            pt = clf.predict(bank["features"][test])
            m_lr["parent_f1"] = {"before": summ["parent_test_macro_f1"]["before"],
                                 "after": float(f1_score(bank["labels"][test], pt, labels=list(range(n_old)),
                                                         average="macro", zero_division=0))}
            m_par["parent_f1"] = {"before": summ["parent_test_macro_f1"]["before"],
                                  "after": summ["parent_test_macro_f1"]["before"]}
            runs.append({"n_per_class": n_per, "add_classes": add, "repeat": r, "n_labelled": int(len(lab_idx)),
                         "labelled_per_class": {c: int((names[lab_idx] == c).sum()) for c in taught},
                         "taught": sorted({target[names[i]] for i in lab_idx}),
                         "n_rest": int(len(rest)), "adapted": m_new, "parent": m_par, "logreg": m_lr})
            print(f"N={n_per} add={add} r={r}: adapted ok {m_new['ok']}/{m_new['n']} wrong&ok {m_new['wrong_ok']}, "
                  f"recall {fmt_recall(m_new)}, "
                  f"F1 {m_new['parent_f1']['after']:.4f}; logreg ok {m_lr['ok']} wrong&ok {m_lr['wrong_ok']}", flush=True)
    res = {"model": a.model, "lab": a.lab, "flip_per_class": a.flip, "config_overrides": overrides, "config": AdaptConfig(**overrides).to_dict(), "runs": runs, "wall_time_s": time.perf_counter() - t_start,
           "load_avg_15min_at_end": os.getloadavg()[2]}
    lines = report(res)
    write_report(a.out, lines, res)
    return 0





if __name__ == "__main__":
    sys.exit(main())
