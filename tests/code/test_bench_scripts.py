"""The bench scripts `make bench` runs for hours fail at their end only if nothing runs their last lines
before: each keeps the shared writer (bench/_report.py), and multisource renders its saved results."""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_"))


@pytest.fixture(scope="module")
def bench_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_imports_and_keeps_the_shared_writer(bench_path, script):
    """multisource.py once defined its own `write_report`, which then called itself with the shared writer's
    arguments: a TypeError after every recipe had been trained."""
    import _report

    mod = importlib.import_module(script)
    assert getattr(mod, "write_report", _report.write_report) is _report.write_report


def test_multisource_renders_its_saved_results(bench_path, tmp_path):
    multisource = importlib.import_module("multisource")
    saved = json.loads((BENCH / "results" / "multisource.json").read_text())
    out = tmp_path / "multisource.md"
    multisource.report(saved, out, "Multi-source training", ["intro"])
    text = out.read_text()
    assert text.startswith("# Multi-source training") and "BCCD" in text
    assert json.loads(out.with_suffix(".json").read_text()) == saved


def test_card_recipe_trains_with_the_cards_settings_and_the_recipes_sources(bench_path):
    """multisource --card-recipe: every training setting of the bundled card (augmentation, fine-tuning, trust) is
    kept; only what a recipe decides (task, classes, class map, seed, weights file) is the recipe's."""
    from bcc_core.training import TrainConfig

    multisource = importlib.import_module("multisource")
    card = BENCH.parent / "models" / "pbs5-mobilenetv2"
    training = json.loads((card / "model_card.json").read_text())["training"]
    r = multisource.RECIPES["pbs5+lisc"]
    cfg = TrainConfig(**multisource.card_settings(card), task="pbs5+lisc", weights="w.h5", seed=7,
                      classes=tuple(r["classes"]), class_map=dict(multisource.CLASS_MAP)).to_dict()
    assert cfg["augment"] == training["augment"] and training["augment"]["amp_mix_p"] > 0
    assert cfg["fine_tune_layers"] == training["fine_tune_layers"] > 0 and cfg["fine_tune_cached"]
    assert {k for k in cfg if cfg[k] != training.get(k)} == {"task", "weights", "seed", "classes", "class_map"}


def test_threshold_ceiling_is_the_best_threshold_on_the_cells_themselves(bench_path):
    """adapt_lab's limit row: the lowest confidence threshold whose wrong-and-ok stays within budget, ties taken
    together, cells stopped by another flag never counted."""
    adapt_lab = importlib.import_module("adapt_lab")
    # confidence, wrong, passes the other gates; 50 cells: 1 wrong and ok allowed (2%)
    cells = ([(0.99, False, True)] * 20 + [(0.95, True, True)] + [(0.9, False, True)] * 10 + [(0.8, True, True)]
             + [(0.7, False, True)] * 8 + [(0.999, True, False)] * 10)
    conf, wrong, gate = (np.array(v) for v in zip(*cells))
    assert adapt_lab.threshold_ceiling(conf, wrong, gate) == {"threshold": 0.9, "ok": 31, "wrong_ok": 1, "n": 50}
    # 21 cells allow no error; the top tie holds one: no threshold shows anything.
    wrong[0] = True
    assert adapt_lab.threshold_ceiling(conf[:21], wrong[:21], gate[:21])["threshold"] is None


def test_saved_limits_of_every_age_read_under_todays_keys(bench_path):
    """adapt_lab's limit of the model as it runs is "as_run" (8 views for an 8-view model); results saved
    earlier call it "single", or hold the bare limit, and still render."""
    read = importlib.import_module("adapt_lab_report")._as_run
    lim = {"threshold": 0.9, "ok": 31, "wrong_ok": 1, "n": 50}
    today = {"as_run": lim, "as_run_accuracy": 0.8, "views": 8}
    assert read(today) is today
    assert read({"single": lim, "single_accuracy": 0.8, "dihedral_mean": lim}) == {
        "as_run": lim, "as_run_accuracy": 0.8, "dihedral_mean": lim}
    assert read(lim) == {"as_run": lim}


def test_parts_of_one_study_pool_and_others_are_refused(bench_path):
    """adapt_lab --render A --render B: the repeats of parts run with --first-repeat together; a setting added
    after a part ran counts at the value it had then; parts of other studies, or a repeat twice, are refused."""
    pooled = importlib.import_module("adapt_lab").pooled

    def part(repeats, **config):
        return {"model": "m", "lab": "lisc", "config": config, "config_overrides": {"test_time_views": 8},
                "wall_time_s": 60.0, "runs": [{"n_per_class": 20, "add_classes": True, "repeat": r} for r in repeats]}

    both = pooled([part([0, 1]), part([2, 3], backbone_aug_colour=True)])  # the setting's default
    assert [r["repeat"] for r in both["runs"]] == [0, 1, 2, 3] and both["wall_time_s"] == 120.0
    with pytest.raises(SystemExit, match="backbone_aug_colour"):
        pooled([part([0, 1]), part([2, 3], backbone_aug_colour=False)])
    with pytest.raises(SystemExit, match="twice"):
        pooled([part([0, 1]), part([1, 2])])
    # colour_gain's default became 3 after runs that read the histogram unscaled (as gain 1)
    with pytest.raises(SystemExit, match="colour_gain"):
        pooled([part([0, 1]), part([2, 3], colour_gain=3.0)])
    assert len(pooled([part([0, 1]), part([2, 3], colour_gain=1.0)])["runs"]) == 4


def test_reviewer_error_moves_k_cells_a_class_to_another_reviewed_class_and_the_check_is_scored_on_them(bench_path):
    """adapt_lab --flip: k of each class's reviewed cells are filed under another class of this repeat (two stay
    in place), and label_check_figures counts what adapt's check listed among them."""
    adapt_lab = importlib.import_module("adapt_lab")
    names = np.array(["neutrophil"] * 6 + ["monocyte"] * 6 + ["basophil"] * 3)
    target = {"neutrophil": "seg_neutrophil", "monocyte": "monocyte", "basophil": "basophil"}
    filed = {i: target[n] for i, n in enumerate(names)}
    moved = adapt_lab.flip_labels(filed, names, target, 2, np.random.default_rng(0))
    assert len(moved) == 2 + 2 + 1  # basophils keep two of their three
    assert all(filed[i] != target[names[i]] for i in moved)
    assert all(filed[i] == target[names[i]] for i in set(filed) - set(moved))
    files = {i: f"{filed[i]}/cell{i}.png" for i in filed}
    doubted = [{"file": files[moved[0]]}, {"file": files[moved[1]]}, {"file": files[next(i for i in filed if i not in moved)]}]
    fig = adapt_lab.label_check_figures(doubted, [f"cell{i}.png" for i in moved])
    assert (fig["doubted"], fig["flipped"], fig["flipped_found"], fig["left_out"]) == (3, 5, 2, 0)
    fig = adapt_lab.label_check_figures(doubted[2:], [f"cell{i}.png" for i in moved], [files[moved[0]]])
    assert (fig["doubted"], fig["flipped_found"], fig["left_out"], fig["flipped_left_out"]) == (2, 1, 1, 1)
    assert adapt_lab.label_check_figures(None, []) is None  # the check did not run (no cross-fitting)


def test_the_all_cells_ceiling_lists_cells_both_readers_name_as_another_class(bench_path):
    """adapt_ceiling's label doubt: a cell is listed only when the cross-validated head and the bundled model
    name the same other class (BCCD's neutrophil is the model's seg_neutrophil)."""
    adapt_ceiling = importlib.import_module("adapt_ceiling")
    rng = np.random.default_rng(0)
    classes = ["eosinophil", "neutrophil"]
    y = np.repeat([0, 1], 30)
    X = rng.normal(0, 1, (60, 8)) + 3 * y[:, None]
    X[0] += 3  # labelled eosinophil, lies among the neutrophils
    X[1] += 3  # the same, but the bundled model calls it an eosinophil: one reader only
    bundled = ["eosinophil"] * 30 + ["seg_neutrophil"] * 30
    bundled[0] = "seg_neutrophil"
    files = [f"{classes[c]}/c{i}.png" for i, c in enumerate(y)]
    lines, res = adapt_ceiling.all_cells_section({"f": X}, y, classes, bundled, "m", files)
    assert res["doubted_by_both"] == {"eosinophil": ["eosinophil/c0.png"], "neutrophil": []}
    assert "| eosinophil | 30 | 1 | neutrophil | 96.7% |" in lines
