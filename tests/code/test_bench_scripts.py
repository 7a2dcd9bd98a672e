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
