"""Several data sources in one training run: listing, class map, groups.csv, class x source split, card.

Synthetic ImageFolders generated in tmp_path (smooth random textures that hash apart).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from bcc_core.data import (
    GROUPS_FILE,
    Source,
    list_sources,
    merge_group_file,
    split_grouped,
    subset_sources,
)


def _field(seed: int, size: int = 64) -> np.ndarray:
    """Smooth random RGB texture (size, size, 3) uint8; different seeds give different pHashes."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC), (0, 0), 2)


def _folder(root: Path, counts: dict[str, int], seed0: int) -> Path:
    k = seed0
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(_field(k)).save(root / cls / f"{cls}_{i:03d}.png")
            k += 1
    return root


@pytest.fixture
def two_sources(tmp_path: Path):
    """Lab A: a, b, c (12 each). Lab B: a, neutro (-> c), extra (not a class); 5 cells x 3 copies per class
    with a groups.csv saying which files are copies of one cell."""
    a = _folder(tmp_path / "labA", {"a": 12, "b": 12, "c": 12}, seed0=0)
    b = _folder(tmp_path / "labB", {"a": 15, "neutro": 15, "extra": 4}, seed0=1000)
    rows = [("file", "cell_group")]
    for cls in ("a", "neutro", "extra"):
        for p in sorted((b / cls).iterdir()):
            i = int(p.stem.split("_")[-1])
            rows.append((f"{cls}/{p.name}", f"{cls}_{i // 3:02d}"))
    with (b / GROUPS_FILE).open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return a, b


def test_source_parse_names():
    assert Source.parse("lisc=../x/y") == Source("lisc", "../x/y")
    assert Source.parse("/data/pbs5").name == "pbs5"
    assert Source.parse("/data/set=1/pbs5").name == "pbs5"  # '=' inside a path is not a name


def test_class_map_classes_and_skipped_folders(two_sources):
    a, b = two_sources
    ms = list_sources([str(a), f"B={b}"], classes=["a", "b", "c"], class_map={"neutro": "c"})
    ds = ms.dataset
    assert ds.classes == ("a", "b", "c")
    assert ms.names() == ["labA", "B"]
    assert ms.skipped == {"labA": [], "B": ["extra"]}
    src = np.asarray(ms.sources)
    lab = np.asarray(ds.labels)
    assert (src == "labA").sum() == 36 and (src == "B").sum() == 30
    # B's 'neutro' folder is read as class c; nothing of 'extra' is listed.
    assert all(lab[i] == 2 for i, p in enumerate(ds.paths) if "/neutro/" in p)
    assert not any("/extra/" in p for p in ds.paths)
    assert ds.counts() == {"a": 27, "b": 12, "c": 27}
    # Paths in split.json are relative to the common parent: <source folder>/<class folder>/<file>.
    assert {r.split("/")[0] for r in ds.relpaths()} == {"labA", "labB"}


def test_default_classes_are_the_union_and_errors(two_sources):
    a, b = two_sources
    ms = list_sources([a, b], class_map={"neutro": "c"})
    assert ms.dataset.classes == ("a", "b", "c", "extra")
    with pytest.raises(ValueError, match="in no source"):
        list_sources([a, b], classes=["a", "zzz"])
    with pytest.raises(ValueError, match="unique"):
        list_sources([a, f"labA={b}"])
    with pytest.raises(ValueError, match="no folder among the classes"):
        list_sources([a, b], classes=["b"])


def test_group_file_keeps_copies_together(two_sources):
    a, b = two_sources
    ms = list_sources([a, b], classes=["a", "b", "c"], class_map={"neutro": "c"})
    g = ms.groups(progress=False)
    src = np.asarray(ms.sources)
    # labA: every image its own group (no duplicates); B: 30 files = 10 cells of 3 copies.
    assert len(np.unique(g[src == "labA"])) == 36
    assert len(np.unique(g[src == "labB"])) == 10
    assert not set(g[src == "labA"]) & set(g[src == "labB"])  # ids unique across sources

    def cell(path):
        cls, i = Path(path).stem.rsplit("_", 1)
        return cls, int(i) // 3

    for gid in np.unique(g[src == "labB"]):
        assert len({cell(ms.dataset.paths[i]) for i in np.flatnonzero(g == gid)}) == 1  # exactly one cell's copies
    # Without the file the copies (different pixels) would not be grouped: the hook is what groups them.
    (b / GROUPS_FILE).unlink()
    g2 = list_sources([a, b], classes=["a", "b", "c"], class_map={"neutro": "c"}).groups(progress=False)
    assert len(np.unique(g2)) == 66


def test_merge_group_file_rejects_bad_columns(tmp_path):
    f = tmp_path / GROUPS_FILE
    f.write_text("path,group\nx.png,1\n")
    with pytest.raises(ValueError, match="file,cell_group"):
        merge_group_file([str(tmp_path / "x.png")], np.array([0]), f)
    assert merge_group_file(["p", "q"], np.array([5, 5]), tmp_path / "absent.csv").tolist() == [0, 0]


def test_split_by_class_x_source_never_separates_a_cell(two_sources):
    a, b = two_sources
    ms = list_sources([a, b], classes=["a", "b", "c"], class_map={"neutro": "c"})
    g = ms.groups(progress=False)
    strata = ms.strata()
    split = split_grouped(strata, g, (0.6, 0.2, 0.2), seed=3)
    part = np.empty(len(g), int)
    for k, idx in enumerate((split.train, split.val, split.test)):
        part[list(idx)] = k
    for gid in np.unique(g):
        assert len(set(part[g == gid])) == 1, "a cell's copies were split"
    # Every class x source stratum is represented in every part (B's 5 cells per class: 3/1/1).
    for key in np.unique(strata):
        m = strata == key
        assert set(part[m]) == {0, 1, 2}, key
    src = np.asarray(ms.sources)
    assert ((part == 2) & (src == "labB")).sum() == 6  # 2 classes x 1 cell x 3 copies


def test_subset_sources_caps_each_class_and_source(two_sources):
    a, b = two_sources
    ms = subset_sources(list_sources([a, b], classes=["a", "b", "c"], class_map={"neutro": "c"}), 4, seed=0)
    keys, n = np.unique(ms.strata(), return_counts=True)
    assert dict(zip(keys.tolist(), n.tolist())) == {"a|labA": 4, "a|labB": 4, "b|labA": 4, "c|labA": 4, "c|labB": 4}
    assert len(ms.sources) == len(ms.dataset.paths)


def test_card_lists_every_source_with_terms(two_sources, tmp_path):
    a, b = two_sources
    ms = list_sources([a, b], classes=["a", "b", "c"], class_map={"neutro": "c"})
    rows = {r["name"]: r for r in ms.card_sources()}
    assert set(rows) == {"labA", "labB"}
    assert rows["labB"]["class_counts"] == {"a": 15, "c": 15}
    assert rows["labB"]["skipped_folders"] == ["extra"] and rows["labB"]["group_file"] is True
    assert rows["labA"]["file_list_sha256"] != rows["labB"]["file_list_sha256"]
    assert "unknown" in rows["labA"]["licence"]  # an unknown dataset's terms are not invented
    from bcc_core.data import SOURCE_TERMS

    # Shared datasets are recognised by their folder name.
    lisc = _folder(tmp_path / "lisc", {"a": 3}, seed0=5000)
    row = next(r for r in list_sources([a, lisc]).card_sources() if r["name"] == "lisc")
    assert row["licence"] == SOURCE_TERMS["lisc"]["licence"] and "Rezatofighi" in row["licence"]


def test_card_schema_accepts_sources_and_refuses_incomplete_ones(two_sources):
    from bcc_core.model_card import validate_card

    a, b = two_sources
    card = json.loads((Path(__file__).resolve().parents[2] / "models" / "pbs5-mobilenetv2" / "model_card.json")
                      .read_text()) if (Path(__file__).resolve().parents[2] / "models" / "pbs5-mobilenetv2").is_dir() \
        else pytest.skip("bundled model absent")
    validate_card(card)  # existing single-source cards stay valid
    card["data"]["sources"] = list_sources([a, b], class_map={"neutro": "c"}).card_sources()
    validate_card(card)
    del card["data"]["sources"][1]["licence"]
    with pytest.raises(ValueError, match="licence"):
        validate_card(card)
