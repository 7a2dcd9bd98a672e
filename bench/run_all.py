"""Run the benchmarks and write bench/RESULTS.md from one run (nothing typed by hand, nothing copied from older runs).

Steps (each writes bench/results/step_<step>.md, stamped with the commit and the time it ran): evaluate, reproduce,
crosslab, quality, perf, speed, compare, cv, noncells, augment, styleleak, multisource, cardrecipe, adapt, ceiling,
memory, train_time.
`make bench` runs every step and rewrites bench/RESULTS.md from this run's sections only. A partial run
(`--only a,b`) rewrites only its own step files and says so; RESULTS.md is left as the last full run wrote it,
unless `--refresh` is given: then RESULTS.md is rebuilt from every step file, the re-run sections in place of the
full run's, and its header names each re-run section, its commit and what under models/ differs from the full run's
commit (a clean tree only, so every stamp names the code that ran).
A full run takes longer than a working session here; `--resume` continues an interrupted full run while the
code is that run's (clean tree only; bench/results/bench_run.json records its finished steps and is committed
with them; commits of bench outputs alone keep the run), so every section still comes from one commit's code
and models.
Usage: python bench/run_all.py [--only evaluate,crosslab [--refresh]] [--resume] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "_work"
PY = sys.executable
sys.path.insert(0, str(ROOT))  # this checkout's bcc_core, not an installed one

from bcc_core.backbones import OFFLINE_IMAGENET_WEIGHTS as WEIGHTS  # noqa: E402
MODELS = {"pbs5": "models/pbs5-mobilenetv2", "all4": "models/all4-mobilenetv2", "pb7": "models/pb7-mobilenetv2"}
# The folder under --data that each model's split.json paths are relative to (pb7's name their source: pbs5/..., lisc/...).
DATASET = {"pbs5": "pbs5", "all4": "all4", "pb7": ""}


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, **kw)


def step_evaluate(data):
    """Each bundled model once on its own held-out test part (used by evaluation only), with 95% intervals."""
    from bcc_core.evaluation import confusion_report, rate

    def r(x, d=1):
        return f"{x['value']:.{d}%} ({x['ci95'][0]:.{d}%}–{x['ci95'][1]:.{d}%})"

    lines = ["# Bundled models on their held-out test parts", "",
             "`python -m bcc_core evaluate --split test --json`: duplicate groups kept on one side of the split; the "
             "test part is touched by evaluation only. Accuracy, shown as ok and wrong-and-ok: Wilson 95% intervals; "
             "macro-F1 and kappa: bootstrap 95% intervals from the confusion matrix. pb7's test part holds its pbs5 "
             "and LISC test images (LISC: whole duplicate groups, about five copies of each cell; per source in the "
             "multi-source section).", "",
             "| model | n | accuracy | macro-F1 | kappa | shown as ok | wrong & ok (of all) |", "|---|---|---|---|---|---|---|"]
    per_class = []
    for task, m in MODELS.items():
        r_ = run([PY, "-m", "bcc_core", "evaluate", "--model", m, "--data", data / DATASET[task], "--split", "test", "--json"])
        if r_.returncode:
            lines.append(f"| {m} | failed: {r_.stderr.strip().splitlines()[-1] if r_.stderr else '?'} |")
            continue
        j = json.loads(r_.stdout.strip().splitlines()[-1])
        rep = confusion_report(j["confusion_matrix"], j["classes"])
        f1, kap = rep["intervals"]["macro_f1"], rep["intervals"]["kappa"]
        lines.append(f"| {m} | {j['n']} | {r(rep['accuracy'])} | {j['macro_f1']:.3f} ({f1[0]:.3f}–{f1[1]:.3f}) | "
                     f"{j['kappa']:.3f} ({kap[0]:.3f}–{kap[1]:.3f}) | {r(rate(j['n_ok'], j['n']))} | "
                     f"{r(rate(j['n_wrong_ok'], j['n']), 2)} |")
        per_class += ["", f"## {m}: per class", "", "| class | n | recall (95% CI) | precision (95% CI) |", "|---|---|---|---|"]
        per_class += [f"| {c} | {v['support']} | {r(v['recall'])} | {r(v['precision'])} |" for c, v in rep["per_class"].items()]
    return lines + per_class


def _card_command(card: dict, data: Path, out: Path, subcommand: str = "train") -> list:
    """The training command recorded in the card, with this machine's data, weights and output paths
    (`subcommand="cv"`: the same recipe under grouped cross-validation)."""
    import shlex

    args = shlex.split(card["reproduce"])[4:]  # drop "python -m bcc_core train"
    swap = {"--weights": str(WEIGHTS), "--out": str(out)}
    cmd = [PY, "-m", "bcc_core", subcommand]
    i = 0
    while i < len(args):
        if args[i] == "--data":  # each source: this machine's copy of the same folder, NAME= kept
            name, sep, path = args[i + 1].rpartition("=") if "=" in args[i + 1] else ("", "", args[i + 1])
            cmd += ["--data", name + sep + str(data / Path(path).name)]
            i += 2
        elif args[i] in swap:
            cmd += [args[i], swap[args[i]]]
            i += 2
        else:
            cmd.append(args[i])
            i += 1
    return cmd + (["--quiet"] if "--quiet" not in cmd else [])


def _numeric_leaves(d, prefix=""):
    """{dotted path: number} for every numeric value of a card section (lists by index)."""
    out = {}
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[key] = float(v)
        elif isinstance(v, (dict, list)):
            out.update(_numeric_leaves(v, key))
    return out


CARD_FIGURES = ("metrics", "calibration", "ood", "review_rule", "trust", "quality")  # sections holding fitted/measured figures
KEY_FIGURES = (("test accuracy", "metrics.test.accuracy"), ("test macro-F1", "metrics.test.macro_f1"),
               ("test ECE after calibration", "calibration.test_ece_after"), ("temperature", "calibration.temperature"))


def _test_predictions(model_dir: Path, data: Path, task: str):
    from bcc_core.data import load_split
    from bcc_core.inference import Predictor
    from bcc_core.io import read_image

    pred = Predictor.load(model_dir)
    items = load_split(Path(model_dir) / "split.json", data / DATASET[task])["test"]
    res = pred.predict([read_image(p) for p, _ in items])
    return [str(p) for p, _ in items], [r.predicted_class for r in res], [r.status == "ok" for r in res]


def step_reproduce(data, seeds=(None, 1)):
    """Retrain each bundled model from its card twice (the card's seed, and another) from scratch, no cache:
    split hash, top-1 agreement with the bundled model on its test part, and every figure of the card."""
    lines = ["# Reproducing the bundled models from their cards", "",
             "Each card's `reproduce` command, run from scratch in a fresh process (no cache), with the card's own seed "
             "and with another seed. Same split: the reproduced test part lists the same images (by path). Agreement: "
             "share of the test images given the same suggested class (and the same ok / review status) as the bundled "
             "model. Card figures: every number in the card's metrics, calibration, OOD, review-rule and quality "
             "sections. Wall time is measured on this shared 2-core CPU.", ""]
    for task, m in MODELS.items():
        card = json.loads((ROOT / m / "model_card.json").read_text())
        card_seed = (card.get("training") or {}).get("seed", 42)
        base_paths, base_cls, base_ok = _test_predictions(ROOT / m, data, task)
        base_fig = {k: v for sec in CARD_FIGURES for k, v in _numeric_leaves(card.get(sec) or {}, sec).items()}
        cols, rows = [], {}
        for seed in seeds:
            seed = card_seed if seed is None else seed
            out = WORK / f"repro-{task}-seed{seed}"
            cmd = _card_command(card, data, out)
            cmd = [c for i, c in enumerate(cmd) if not (c == "--seed" or (i and cmd[i - 1] == "--seed"))] + ["--seed", seed]
            t = time.perf_counter()
            r = run(cmd)
            wall = time.perf_counter() - t
            col = f"seed {seed}" + (" (card's)" if seed == card_seed else "")
            cols.append(col)
            if r.returncode:
                rows.setdefault("status", {})[col] = "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:200]
                continue
            new = json.loads((out / "model_card.json").read_text())
            paths, cls, ok = _test_predictions(out, data, task)
            same_split = sorted(paths) == sorted(base_paths)
            agree = same_cls = None
            if same_split:
                b = dict(zip(base_paths, zip(base_cls, base_ok)))
                same_cls = sum(b[p][0] == c for p, c in zip(paths, cls)) / len(paths)
                agree = sum(b[p] == (c, o) for p, c, o in zip(paths, cls, ok)) / len(paths)
            fig = {k: v for sec in CARD_FIGURES for k, v in _numeric_leaves(new.get(sec) or {}, sec).items()}
            common = [k for k in base_fig if k in fig]
            diffs = sorted(((abs(fig[k] - base_fig[k]) / max(abs(base_fig[k]), 1e-9), k) for k in common), reverse=True)
            rows.setdefault("wall time", {})[col] = f"{wall / 60:.1f} min"
            rows.setdefault("same test part as the bundled model", {})[col] = "yes" if same_split else "no (split differs)"
            # the card's named parts (train, val, cal_a, cal_b, test) by content hash of their files
            bp, rp = (card.get("split") or {}).get("parts") or {}, (new.get("split") or {}).get("parts") or {}
            same_parts = [k for k in bp if (rp.get(k) or {}).get("sha256") == bp[k].get("sha256")]
            rows.setdefault("split parts with the same content hash", {})[col] = (
                f"{len(same_parts)} of {len(bp)} ({', '.join(same_parts) or 'none'})" if bp else "n/a (no part hashes in the card)")
            rows.setdefault("same suggested class on the test part", {})[col] = "n/a" if same_cls is None else f"{same_cls:.1%}"
            rows.setdefault("same class and status on the test part", {})[col] = "n/a" if agree is None else f"{agree:.1%}"
            for name, key in KEY_FIGURES:
                if key in fig and key in base_fig:
                    rows.setdefault(name, {})[col] = f"{fig[key]:.4f} (bundled {base_fig[key]:.4f})"
            rows.setdefault("card figures compared", {})[col] = str(len(common))
            rows.setdefault("card figures within 5% of the bundled value", {})[col] = \
                f"{sum(d <= 0.05 for d, _ in diffs)} of {len(diffs)}"
            rows.setdefault("largest relative differences", {})[col] = "; ".join(
                f"{k} {base_fig[k]:.4g} → {fig[k]:.4g}" for d, k in diffs[:3] if d > 0.05) or "none above 5%"
        lines += [f"## {m}", "", f"`{card['reproduce']}`", "", "| measure | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        lines += [f"| {name} | " + " | ".join(v.get(c, "") for c in cols) + " |" for name, v in rows.items()]
        lines.append("")
    return lines


def _script(title: str, script: str, out: str, *args) -> list:
    """Run one bench script that writes bench/results/<out>; its lines, or the failure under `title`."""
    r = run([PY, f"bench/{script}", *args, "--out", RES / out])
    return (RES / out).read_text().splitlines() if r.returncode == 0 else [f"# {title}", "", "failed: " + r.stderr[-1500:]]


def step_crosslab(data):
    return _script("Cross-lab", "crosslab.py", "crosslab.md", "--model", MODELS["pbs5"], "--model", MODELS["pb7"],
                   "--data", data)


def step_quality(data):
    return _script("Quality gate", "quality_gate.py", "quality.md", "--data", data)


def step_perf(data):
    return _script("The running app", "perf.py", "perf.md", "--model", MODELS["pbs5"], "--app")


def step_speed(data):
    """Screening against the obvious pipeline (same run, interleaved), stages, runtimes, single image."""
    return _script("Speed", "speed.py", "speed.md", "--model", MODELS["pbs5"], "--data", data / "pbs5")


def step_compare(data, limit=80, epochs=3):
    lines = ["# Backbone comparisons: equal initialisation and budget", "",
             f"The backbones of Study 2's Table 4 and Study 1, each trained with the same split, preprocessing, "
             f"augmentation, initialisation and budget ({epochs} epochs, {limit} images per class: a CPU budget). ImageNet "
             "weights exist offline here only for MobileNetV2, so every backbone trains from scratch: these tables can "
             "at most rank architectures under a small from-scratch budget (each says whether any learned above "
             "chance). They do not reproduce, and cannot confirm or refute, the studies' pretrained figures.", ""]
    for task, bbs in (("all4", "small_cnn,resnet50,mobilenetv2"), ("pbs5", "mobilenetv2,efficientnetb0")):
        out = WORK / f"compare-{task}"
        r = run([PY, "-m", "bcc_core", "compare", "--data", data / task, "--backbones", bbs, "--weights", "none",
                 "--out", out, "--limit-per-class", limit, "--epochs", epochs, "--quiet"]
                + (["--preprocess", "letterbox"] if task == "all4" else []))
        if r.returncode:
            lines += [f"## {task}", "", "failed: " + r.stderr[-1500:], ""]
            continue
        md = (out / "comparison.md").read_text()
        (RES / f"comparison_{task}.md").write_text(md)
        (RES / f"comparison_{task}.csv").write_text((out / "comparison.csv").read_text())
        lines += [f"## {task} (backbones of {'Study 2, Table 4' if task == 'all4' else 'Study 1'})", "", md, ""]
        lines += [_chance_note(out / "comparison.csv"), ""]
    return lines


def _chance_note(csv_path) -> str:
    """What the table can support: a backbone whose kappa is ~0 learned nothing at this budget, so it cannot
    be ranked against the others."""
    import csv

    rows = list(csv.DictReader(Path(csv_path).read_text().splitlines()))
    none = [r["model"] for r in rows if abs(float(r["kappa"])) < 0.05]
    if len(none) == len(rows):
        return ("**Every backbone stayed at chance (kappa ~0: no better than guessing) at this budget: "
                "the table ranks nothing.** A fair comparison needs ImageNet weights for every backbone (only "
                "MobileNetV2's are available offline here) or a from-scratch budget far beyond this CPU's.")
    if none:
        return (f"At chance (kappa ~0) at this budget: {', '.join(none)}; they cannot be ranked against the others "
                "or each other.")
    return "Every backbone learned above chance at this budget (kappa > 0.05)."


def step_cv(data, folds=5):
    """Grouped stratified k-fold cross-validation of the bundled pbs5 recipe (the card's own command)."""
    card = json.loads((ROOT / MODELS["pbs5"] / "model_card.json").read_text())
    out = WORK / "cv-pbs5"
    r = run(_card_command(card, data, out, "cv") + ["--folds", folds])
    if r.returncode:
        return ["# Cross-validation", "", "failed: " + r.stderr[-1500:]]
    res = json.loads((out / "cv.json").read_text())
    lines = [f"# Grouped stratified {folds}-fold cross-validation of the bundled pbs5 recipe", "",
             f"The card's own training command under `python -m bcc_core cv`: `{card['reproduce']}`; duplicate groups "
             "kept together; each fold's held-out part is used by its evaluation only.", "",
             "| metric | mean | std | per fold |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['mean']:.4f} | {v['std']:.4f} | " + ", ".join(f"{f[k]:.4f}" for f in res["folds"]) + " |"
              for k, v in res["summary"].items()]
    return lines


def step_noncells(data):
    """Images that are not a single blood cell must never be shown as ok: smear fields and synthetic junk."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    junk = WORK / "noncells"
    junk.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(junk / f"noise_{i}.png")
        Image.fromarray(np.full((300, 300, 3), int(rng.integers(0, 256)), np.uint8)).save(junk / f"blank_{i}.png")
        Image.fromarray(np.clip(rng.normal(128, 40, (300, 300, 3)), 0, 255).astype(np.uint8)).save(junk / f"gauss_{i}.png")
    lines = ["# Non-cell images through the pbs5 model", "", "| input | images | shown as ok |", "|---|---|---|"]
    for name, src in (("all4 smear fields (all)", data / "all4"), ("synthetic noise / blank / Gaussian", junk)):
        out = WORK / f"noncells_{'all4' if 'all4' in str(src) else 'junk'}.csv"
        r = run([PY, "-m", "bcc_core", "screen", src, "--model", MODELS["pbs5"], "--out", out, "--quiet"])
        if r.returncode:
            lines.append(f"| {name} | failed | {r.stderr[-300:]} |")
            continue
        df = pd.read_csv(out)
        lines.append(f"| {name} | {len(df)} | {(df.status == 'ok').sum()} |")
    return lines


def step_augment(data):
    return _script("Augmentation speed", "augment_speed.py", "augment_speed.md", "--data", data)


def step_styleleak(data):
    return _script("Style leak", "style_leak.py", "style_leak.md", "--data", data)


def step_multisource(data, seeds="42,1,2"):
    """pbs5 vs pbs5+LISC vs pb7 (fast path, several seeds; LISC held out for pbs5-only), then the bundled models."""
    lines = _script("Multi-source", "multisource.py", "multisource.md", "--data", data, "--seeds", seeds)
    models = ",".join(m for m in (MODELS["pbs5"], "models/pb7-mobilenetv2") if (ROOT / m).is_dir())
    return lines + [""] + _script("Multi-source (bundled models)", "multisource.py", "multisource_models.md",
                                  "--data", data, "--models", models, "--lisc-split", "models/pb7-mobilenetv2")


def step_cardrecipe(data, seeds="42,1,2"):
    """pbs5 vs pbs5+LISC trained with the bundled pbs5 model's own recipe (its card's settings), several seeds:
    issue 17 asks to retrain the bundled pbs5 model with LISC's three shared classes when that measures better."""
    return _script("Multi-source (the bundled pbs5 recipe)", "multisource.py", "multisource_card_recipe.md", "--data",
                   data, "--seeds", seeds, "--recipes", "pbs5+lisc,pbs5", "--card-recipe", MODELS["pbs5"])


def step_adapt(data):
    """The bundled pbs5 model adapted to BCCD, then to LISC (a lab it never saw, expert-labelled), from N reviewed
    cells per class, measured on the rest of that lab; pb7 adapted to BCCD."""
    return (_script("Learning a new lab (BCCD)", "adapt_lab.py", "adapt_lab.md", "--model", MODELS["pbs5"], "--data", data,
                    "--n", "10", "--add-classes-n", "10")
            + [""] + _script("Learning a new lab (LISC)", "adapt_lab.py", "adapt_lab_lisc.md", "--model", MODELS["pbs5"],
                             "--data", data, "--lab", "lisc", "--n", "20", "--add-classes-n", "20")
            + [""] + _script("Learning a new lab (LISC), the top fine-tuned: the alternative to the head alone",
                             "adapt_lab.py", "adapt_lab_lisc_fine_tuned.md", "--model", MODELS["pbs5"], "--data", data,
                             "--lab", "lisc", "--n", "20", "--add-classes-n", "20",
                             "--set", "backbone_layers=21",  # bcc_core.replay.CUT_LAYERS: adapt --fine-tune
                             "--work", "runs/adapt_lab_bench_fine_tuned")
            + [""] + _script("Learning a new lab (pb7, BCCD)", "adapt_lab.py", "adapt_lab_pb7.md", "--model", MODELS["pb7"],
                             "--data", data, "--n", "", "--add-classes-n", "10"))


def step_train_time(data):
    """Reproducing the pbs5 recipe: fine-tuning on cached views against fresh augmentation every epoch."""
    return _script("Training time", "train_time.py", "train_time.md", "--model", MODELS["pbs5"], "--data", data)


def step_memory(data):
    """Peak memory of `screen` on 500 vs 5,000 images, and on inputs built to exhaust memory."""
    return _script("Memory", "memory.py", "memory.md", "--model", MODELS["pbs5"], "--data", data / "pbs5")


def step_ceiling(data):
    """The few-shot ceiling of frozen features on BCCD (what head-only adaptation can reach at best), and on LISC
    what limits it: cells fitted, features, preprocessing (a lab-only linear probe)."""
    return (_script("Adaptation ceiling", "adapt_ceiling.py", "adapt_ceiling.md", "--model", MODELS["pb7"], "--data", data)
            + [""] + _script("What limits learning a new lab (LISC probe)", "lab_probe.py", "lab_probe.md",
                             "--model", MODELS["pbs5"], "--data", data, "--lab", "lisc"))


STEPS = {"evaluate": step_evaluate, "reproduce": step_reproduce, "crosslab": step_crosslab,
         "quality": step_quality, "perf": step_perf, "speed": step_speed, "compare": step_compare, "cv": step_cv, "noncells": step_noncells,
         "augment": step_augment, "styleleak": step_styleleak,
         "multisource": step_multisource, "cardrecipe": step_cardrecipe, "adapt": step_adapt,
         "ceiling": step_ceiling, "memory": step_memory, "train_time": step_train_time}


# Tracked beside the sections it lists, so a run that outlasts a working session lands with its finished part.
RUN_RECORD = RES / "bench_run.json"
OUTPUTS = (":!bench/results", ":!bench/RESULTS.md")  # the bench's own outputs: never "code"


def _commit() -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # The bench's own outputs do not count: a run that has written some sections is still at its commit.
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *OUTPUTS],
                           cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (sha or "unknown") + (" with uncommitted changes" if dirty else "")


def _code_unchanged_since(commit: str) -> bool:
    """True when HEAD's tree equals `commit`'s apart from the bench's own outputs: a commit that only lands the
    finished part of a run leaves the run's code and models as they were."""
    sha = (commit.split() or [""])[0]
    return bool(sha) and subprocess.run(["git", "diff", "--quiet", sha, "HEAD", "--", ".", *OUTPUTS], cwd=ROOT,
                          capture_output=True).returncode == 0


def _run_record(commit: str, now: datetime, resume: bool) -> dict:
    """This full run's record: its commit, start and finished steps. `resume` continues the record of an
    interrupted run whose code is this tree's (clean tree only; commits that land only bench outputs between
    the parts are allowed); otherwise a new one starts. The record keeps the commit the run began at."""
    if resume and "uncommitted" not in commit and RUN_RECORD.is_file():
        rec = json.loads(RUN_RECORD.read_text())
        if rec.get("commit") == commit or _code_unchanged_since(rec.get("commit", "")):
            rec["resumed"] = rec.get("resumed", 0) + 1
            return rec
        print(f"bench/results/bench_run.json is a run at {rec.get('commit')}, whose code differs from this tree: "
              f"a new run starts. To finish that one instead: git worktree add ../bench_run {rec.get('commit')} && "
              "git -C ../bench_run checkout main -- bench/results && cd ../bench_run && make bench-resume",
              flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    rec = {"commit": commit, "started": now.isoformat(), "resumed": 0, "done": {}}
    if "uncommitted" not in commit:
        RUN_RECORD.write_text(json.dumps(rec, indent=2))
    return rec


ONE_RUN = "Every section below was generated in this run"
"""The full run's header says this; a refreshed RESULTS.md says it of the sections it did not re-run."""


def _stamp(name: str, started: datetime, wall_s: float, commit: str) -> str:
    return (f"_Section `{name}`: generated {started:%Y-%m-%d %H:%M} UTC at commit {commit} by `bench/run_all.py`, "
            f"{wall_s / 60:.1f} min._")


STAMP = re.compile(r"_Section `(?P<name>[^`]+)`: generated (?P<when>.+? UTC) at commit (?P<commit>\S+)")
"""Reads back what `_stamp` writes."""


def _models_changed(since: str, commit: str) -> list[str]:
    """Files under models/ that differ between two commits (bundled models and their replay banks)."""
    out = subprocess.run(["git", "diff", "--name-only", since.split()[0], commit.split()[0], "--", "models"], cwd=ROOT,
                         capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else ["(not comparable: " + out.stderr.strip() + ")"]


def _section(text: str) -> str:
    return text.replace("\n# ", "\n## ").replace("# ", "## ", 1)


def refresh_results(header: str, full_commit: str) -> str:
    """RESULTS.md rebuilt from every step file: `header` is the full run's opening paragraph; each section whose
    stamp names another commit than the full run's is listed after it, with what under models/ differs."""
    texts = [(RES / f"step_{n}.md").read_text() for n in STEPS if (RES / f"step_{n}.md").is_file()]
    later = []
    for text in texts:
        m = STAMP.search(text)
        if m and m["commit"] != full_commit:
            changed = _models_changed(full_commit, m["commit"])
            later.append(f"- `{m['name']}`: re-run {m['when']} at commit {m['commit']} (`--only {m['name']} --refresh`); "
                         f"under models/ since {full_commit}: {', '.join(changed) if changed else 'nothing changed'}.")
    intro = header.replace(ONE_RUN, "Every other section below was generated in that run") if later else header
    parts = ["# Benchmark results", "", intro, ""]
    if later:
        parts += ["Sections re-run since, each with its own stamp:", "", *later, ""]
    return "\n".join(parts + ["", *map(_section, texts)]) + "\n"


def _full_run_header(results: str) -> tuple[str, str]:
    """The opening paragraph of a RESULTS.md a full run wrote, and that run's commit."""
    paras = results.split("\n\n")
    para = paras[1] if len(paras) > 1 else ""
    m = re.search(r"at commit (\S+), from", para)
    if not para.startswith("One run of") or not m:
        raise ValueError("bench/RESULTS.md does not open with a full run's header: run `make bench` first")
    return para, m.group(1)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(STEPS))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted full run at the same commit (clean tree): steps it finished are "
                         "kept as they were written, the others run; a run at another commit starts afresh")
    ap.add_argument("--refresh", action="store_true",
                    help="with --only: also rebuild bench/RESULTS.md, these sections re-run in place of the last full "
                         "run's and named in its header (clean tree only)")
    a = ap.parse_args(argv)
    data = Path(a.data)
    if not data.is_dir():
        print(f"{data} not found: benchmarks need the datasets")
        return 1
    names = [n for n in a.only.split(",") if n]
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        print(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
        return 2
    RES.mkdir(parents=True, exist_ok=True)
    commit, t0 = _commit(), datetime.now(timezone.utc)
    full = names == list(STEPS)
    if a.refresh and (full or "uncommitted" in commit):
        print("--refresh re-runs some steps (--only) from a clean tree (commit first): each section's stamp must name "
              "the code that ran")
        return 2
    results = ROOT / "bench" / "RESULTS.md"
    try:  # refused before anything runs
        header = _full_run_header(results.read_text() if results.is_file() else "") if a.refresh else None
    except ValueError as e:
        print(e)
        return 2
    # Only a full run keeps a record: a partial one must not replace the record of a full run it may interrupt.
    record = _run_record(commit, t0, resume=a.resume) if full else {"done": {}}
    if full and "uncommitted" not in commit:
        commit = record["commit"]  # a resumed run's code is its first part's (checked), so its sections say that commit
    sections = []
    for name in names:
        if name in record["done"]:  # finished earlier in this run (same commit, clean tree)
            print(f"step {name}: kept from this run's earlier part ({record['done'][name]})", flush=True)
            sections.append((RES / f"step_{name}.md").read_text())
            continue
        started, t = datetime.now(timezone.utc), time.perf_counter()
        lines = STEPS[name](data)
        text = "\n".join([lines[0], "", _stamp(name, started, time.perf_counter() - t, commit), *lines[1:]]) + "\n"
        (RES / f"step_{name}.md").write_text(text)
        sections.append(text)
        failed = any(line.startswith("failed: ") for line in lines)  # not done: a resumed run tries it again
        if full and "uncommitted" not in commit and not failed:
            record["done"][name] = f"{started:%Y-%m-%d %H:%M} UTC"
            RUN_RECORD.write_text(json.dumps(record, indent=2))
    if a.refresh:
        results.write_text(refresh_results(*header))
        print(f"bench/RESULTS.md rebuilt: {', '.join(names)} re-run at {commit}, the other sections the full run's.")
        return 0
    if names != list(STEPS):
        print(f"Partial run ({', '.join(names)}): wrote bench/results/step_<name>.md for these steps only; "
              "bench/RESULTS.md is written by a full run (`make bench`) and was left unchanged.")
        return 0
    began = datetime.fromisoformat(record["started"])
    parts = ["# Benchmark results", "",
             f"One run of `bench/run_all.py` (`make bench`) on a {os.cpu_count()}-core CPU at commit {commit}, from "
             f"{began:%Y-%m-%d %H:%M} to {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
             + (f", continued {record['resumed']} time(s) at the same commit with `--resume`" if record["resumed"] else "")
             + f". {ONE_RUN}; each says when and how long it took.", ""]
    parts += ["", *map(_section, sections)]
    results.write_text("\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
