"""Quality gate on real reference images (skipped when ../shared/data is absent).

* pbs5: valid single-cell crops of the reference lab: false-flag rate must stay low.
* bccd: valid single cells from another lab (smaller, blurrier): must not be flagged for that.
* all4: whole smear fields, not single cells: must be flagged (``not_single_cell``).
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


def test_pbs5_sample_is_rarely_flagged():
    d = _details(_files("pbs5", 100))
    assert _flag_rate(d) <= 0.02, [x for x in d if x]


def test_bccd_blurrier_cells_are_not_flagged_as_bad_quality():
    d = _details(_files("bccd", None))
    assert _flag_rate(d) <= 0.03
    # blur and size alone must not reject these valid cells
    assert sum("blurred" in x or "too_small" in x for x in d) == 0


def test_all4_smear_fields_are_flagged_not_single_cell():
    d = _details(_files("all4", 100))
    assert _flag_rate(d) >= 0.95
    assert np.mean(["not_single_cell" in x for x in d]) >= 0.90


@pytest.mark.parametrize("name, lo, hi", [("pbs5", 0.0, 0.01), ("bccd", 0.0, 0.03), ("all4", 0.95, 1.0)])
def test_full_data_set_rates(name, lo, hi):
    """All images (~8,600, about 30 s): the targets of bench/quality_gate.py."""
    rate = _flag_rate(_details(_files(name, None)))
    assert lo <= rate <= hi
