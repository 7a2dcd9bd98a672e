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
