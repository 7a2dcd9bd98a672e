"""The bench scripts `make bench` runs for hours fail at their end only if nothing runs their last lines
before: each keeps the shared writer (bench/_report.py), and multisource renders its saved results."""

import importlib
import json
import sys
from pathlib import Path

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
    from types import SimpleNamespace as R

    from bcc_core.flags import Flag

    adapt_lab = importlib.import_module("adapt_lab")
    below = [Flag("low_confidence", "warning", "below the threshold", "below_threshold")]
    ood = [Flag("out_of_distribution", "warning", "unlike the training images", "ood_score")]
    # confidence, suggested class, true class, flags; 50 cells: 1 wrong allowed (2%)
    cells = ([(0.99, "a", "a", [])] * 20 + [(0.95, "b", "a", below)] + [(0.9, "a", "a", below)] * 10
             + [(0.8, "b", "a", below)] + [(0.7, "a", "a", below)] * 8 + [(0.999, "b", "a", ood)] * 10)
    results = [R(confidence=c, predicted_class=p, flags=f) for c, p, _, f in cells]
    got = adapt_lab.threshold_ceiling(results, [t for _, _, t, _ in cells])
    assert got == {"threshold": 0.9, "ok": 31, "wrong_ok": 1, "n": 50}
    # An unknown cell type (truth None) shown as ok counts as wrong.
    got = adapt_lab.threshold_ceiling(results[:21], [None] + [t for _, _, t, _ in cells[1:21]])
    assert got["ok"] == 0 and got["threshold"] is None
