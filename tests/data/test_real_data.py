"""bcc_core.data on the real shared datasets (pbs5, all4); skipped when ../shared/data is absent.

About 10-20 s in total (verified listings of both sets and one full near-duplicate pass over all4).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bcc_core.data import group_duplicates, list_imagefolder, load_split, save_split, split_grouped
from bcc_core.io import read_image

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

pytestmark = pytest.mark.slow

PBS5_CLASSES = ("basophil", "erythroblast", "monocyte", "myeloblast", "seg_neutrophil")
ALL4_COUNTS = {"Benign": 504, "Early": 985, "Pre": 963, "Pro": 804}


def _require(name: str) -> Path:
    root = DATA / name
    if not root.is_dir():
        pytest.skip(f"real data not available at {root}")
    return root


def _dup_pairs(name: str) -> list[tuple[str, str]]:
    f = DATA / f"{name}.exact_dups.txt"
    if not f.is_file():
        pytest.skip(f"{f} not available")
    return [tuple(line.split("\t")) for line in f.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pbs5():
    return list_imagefolder(_require("pbs5"), verify=True)


@pytest.fixture(scope="module")
def all4():
    ds = list_imagefolder(_require("all4"), verify=True)
    groups = group_duplicates(ds.paths, progress=False)
    return ds, groups


def _index(ds) -> dict[str, int]:
    return {Path(p).relative_to(ds.root).as_posix(): i for i, p in enumerate(ds.paths)}


def test_pbs5_listing(pbs5):
    assert pbs5.classes == PBS5_CLASSES
    assert pbs5.counts() == {c: 1000 for c in PBS5_CLASSES}
    assert pbs5.problems == ()
    img = read_image(pbs5.paths[0])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 300


def test_pbs5_exact_duplicates_grouped(pbs5):
    pairs = _dup_pairs("pbs5")
    assert len(pairs) == 6
    groups = group_duplicates(pbs5.paths, near=False, progress=False)
    idx = _index(pbs5)
    for a, b in pairs:
        assert groups[idx[a]] == groups[idx[b]], (a, b)
    sizes = np.bincount(groups)
    assert (sizes > 1).sum() == 6 and sizes.max() == 2  # nothing else is byte-identical


def test_pbs5_near_grouping_does_not_over_merge(pbs5):
    # The dup files plus 150 random cells per class: single cells on uniform backgrounds hash alike,
    # so a too-large radius would chain them into big (and cross-class) groups.
    idx = _index(pbs5)
    dup_idx = sorted({idx[p] for pair in _dup_pairs("pbs5") for p in pair})
    rng = np.random.default_rng(0)
    labels = np.asarray(pbs5.labels)
    rest = [int(i) for c in range(5) for i in rng.choice(np.flatnonzero(labels == c), 150, replace=False)]
    sel = sorted(set(dup_idx) | set(rest))
    groups = group_duplicates([pbs5.paths[i] for i in sel], progress=False)
    pos = {i: k for k, i in enumerate(sel)}
    for a, b in _dup_pairs("pbs5"):
        assert groups[pos[idx[a]]] == groups[pos[idx[b]]]
    sizes = np.bincount(groups)
    print(f"pbs5 sample n={len(sel)}: groups={len(sizes)}, multi={int((sizes > 1).sum())}, max size={sizes.max()}")
    assert sizes.max() <= 3
    assert (sizes > 1).sum() <= 10
    sel_labels = labels[sel]
    for g in np.flatnonzero(sizes > 1):
        assert len(set(sel_labels[groups == g].tolist())) == 1


def test_all4_listing_and_duplicate_groups(all4):
    ds, groups = all4
    assert ds.counts() == ALL4_COUNTS
    assert ds.problems == ()
    idx = _index(ds)
    pairs = _dup_pairs("all4")
    assert len(pairs) == 40
    for a, b in pairs:
        assert groups[idx[a]] == groups[idx[b]], (a, b)
    sizes = np.bincount(groups)
    multi = np.flatnonzero(sizes > 1)
    labels = np.asarray(ds.labels)
    cross = [g for g in multi if len(set(labels[groups == g].tolist())) > 1]
    print(
        f"all4: groups={len(sizes)}, multi-member={len(multi)}, items in them={int(sizes[multi].sum())}, "
        f"size histogram={np.bincount(sizes)[1:].tolist()}, cross-class={len(cross)}"
    )
    # 40 exact pairs + most of the ~85 near pairs, but no chaining of unrelated fields.
    assert 80 <= len(multi) <= 140
    assert sizes.max() <= 4
    assert cross == []


def test_all4_split_keeps_duplicate_groups_together(all4, tmp_path):
    ds, groups = all4
    labels = np.asarray(ds.labels)
    split = split_grouped(labels, groups, (0.7, 0.15, 0.15), seed=42)
    parts = [np.asarray(p, dtype=np.int64) for p in (split.train, split.val, split.test)]
    allidx = np.concatenate(parts)
    assert len(allidx) == len(ds) == len(np.unique(allidx))
    side = np.full(len(ds), -1)
    for k, p in enumerate(parts):
        side[p] = k
    for g in np.flatnonzero(np.bincount(groups) > 1):
        assert len(set(side[groups == g].tolist())) == 1
    idx = _index(ds)
    for a, b in _dup_pairs("all4"):
        assert side[idx[a]] == side[idx[b]]
    overall = np.bincount(labels, minlength=4) / len(labels)
    for p, fr in zip(parts, (0.7, 0.15, 0.15)):
        assert abs(len(p) / len(ds) - fr) < 0.01
        assert np.abs(np.bincount(labels[p], minlength=4) / len(p) - overall).max() < 0.02

    out = tmp_path / "split.json"
    save_split(out, ds, split, groups, meta={"seed": 42})
    loaded = load_split(out, DATA / "all4")
    assert [len(loaded[k]) for k in ("train", "val", "test")] == [len(p) for p in parts]
    assert loaded["test"][0] == (ds.paths[parts[2][0]], int(labels[parts[2][0]]))
