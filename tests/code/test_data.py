"""Unit tests for bcc_core.data (synthetic ImageFolder trees generated in tmp_path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from bcc_core.data import (
    Dataset,
    PARTS,
    Split,
    _near_pairs,
    check_disjoint,
    part_sha256,
    split_parts,
    duplicate_report,
    group_duplicates,
    kfold_grouped,
    list_imagefolder,
    load_split,
    save_split,
    split_grouped,
    subset,
    verify_image_file,
)


def _field(seed: int, size: int = 96) -> np.ndarray:
    """Smooth random RGB texture (H, W, 3) uint8: structured enough for a perceptual hash."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(img, (0, 0), 2)


def _save(img: np.ndarray, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, **kw)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """ImageFolder with 3 classes, nested files and every kind of problem file."""
    root = tmp_path / "ds"
    k = 0
    for cls, n in (("alpha", 4), ("beta", 3), ("gamma", 2)):
        for i in range(n):
            _save(_field(k), root / cls / f"{cls}_{i}.png")
            k += 1
    _save(_field(100), root / "beta" / "nested" / "deep.JPG", quality=90)
    (root / "alpha" / "notes.txt").write_text("metadata")
    (root / "alpha" / ".DS_Store").write_bytes(b"\0")
    (root / "beta" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    jpg = root / "gamma" / "truncated.jpg"
    _save(_field(101, 128), jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[:-600])
    _save(_field(102, 4), root / "gamma" / "tiny.png")
    (root / "empty_class").mkdir()
    _save(_field(104), root / "alpha" / ".ipynb_checkpoints" / "alpha_0-checkpoint.png")
    (root / ".hidden_class").mkdir()
    _save(_field(103), root / ".hidden_class" / "x.png")
    return root


# --------------------------------------------------------------------------- listing


def test_listing_classes_labels_counts_and_order(folder):
    ds = list_imagefolder(folder)
    assert ds.classes == ("alpha", "beta", "empty_class", "gamma")
    assert ds.counts() == {"alpha": 4, "beta": 4, "empty_class": 0, "gamma": 2}
    rel = [Path(p).relative_to(folder).as_posix() for p in ds.paths]
    assert rel[:4] == [f"alpha/alpha_{i}.png" for i in range(4)]
    assert rel[4:8] == ["beta/beta_0.png", "beta/beta_1.png", "beta/beta_2.png", "beta/nested/deep.JPG"]
    assert list(ds.labels) == [0] * 4 + [1] * 4 + [3] * 2
    assert all(Path(p).is_absolute() for p in ds.paths)
    assert len(ds) == 10


def test_problems_are_recorded_not_fatal(folder):
    ds = list_imagefolder(folder)
    probs = {Path(p).relative_to(folder).as_posix(): r for p, r in ds.problems}
    assert set(probs) == {"alpha/notes.txt", "beta/corrupt.jpg", "gamma/truncated.jpg", "gamma/tiny.png", "empty_class"}
    assert "extension" in probs["alpha/notes.txt"]
    assert "unreadable" in probs["beta/corrupt.jpg"]
    assert "truncated" in probs["gamma/truncated.jpg"]  # Image.verify() alone would not catch this
    assert "smaller" in probs["gamma/tiny.png"]
    assert "no readable images" in probs["empty_class"]
    assert not any(".DS_Store" in p or "hidden" in p for p in probs)


def test_verify_false_only_checks_extensions(folder):
    ds = list_imagefolder(folder, verify=False)
    rel = {Path(p).relative_to(folder).as_posix() for p in ds.paths}
    assert {"beta/corrupt.jpg", "gamma/truncated.jpg", "gamma/tiny.png"} <= rel
    assert [Path(p).name for p, _ in ds.problems] == ["notes.txt", "empty_class"]


def test_explicit_class_order_and_errors(folder, tmp_path):
    ds = list_imagefolder(folder, classes=["gamma", "alpha"])
    assert ds.classes == ("gamma", "alpha")
    assert ds.counts() == {"gamma": 2, "alpha": 4}
    assert set(ds.labels) == {0, 1}
    assert all("/gamma/" in p for p, lab in zip(ds.paths, ds.labels) if lab == 0)
    with pytest.raises(ValueError, match="not found"):
        list_imagefolder(folder, classes=["alpha", "delta"])
    with pytest.raises(ValueError, match="does not exist"):
        list_imagefolder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    _save(_field(1), tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class subfolders"):
        list_imagefolder(tmp_path / "flat")
    (tmp_path / "noimg" / "c").mkdir(parents=True)
    (tmp_path / "noimg" / "c" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no readable images"):
        list_imagefolder(tmp_path / "noimg")


def test_digest_depends_on_file_list_not_location(folder, tmp_path):
    d1 = list_imagefolder(folder).digest()
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(folder, copy)
    assert list_imagefolder(copy).digest() == d1
    (copy / "alpha" / "alpha_0.png").rename(copy / "alpha" / "alpha_renamed.png")
    assert list_imagefolder(copy).digest() != d1
    assert len(d1) == 64
    # Lines are sorted, so the digest does not depend on the class order requested.
    assert (
        list_imagefolder(folder, classes=["gamma", "alpha"]).digest()
        == list_imagefolder(folder, classes=["alpha", "gamma"]).digest()
    )


def test_dataset_validates_lengths_and_labels():
    with pytest.raises(ValueError):
        Dataset(root="/", classes=("a",), paths=("x",), labels=(), problems=())
    with pytest.raises(ValueError):
        Dataset(root="/", classes=("a",), paths=("x",), labels=(1,), problems=())


def test_verify_image_file_ok(tmp_path):
    assert verify_image_file(_save(_field(0), tmp_path / "ok.jpg", quality=90)) is None
    assert verify_image_file(_save(_field(0), tmp_path / "ok.png")) is None
    assert verify_image_file(tmp_path / "missing.png") is not None


def test_subset_per_class_deterministic(folder):
    ds = list_imagefolder(folder)
    s1, s2, s3 = subset(ds, 2, seed=0), subset(ds, 2, seed=0), subset(ds, 2, seed=5)
    assert s1 == s2
    assert s1.counts() == {"alpha": 2, "beta": 2, "empty_class": 0, "gamma": 2}
    assert set(s1.paths) <= set(ds.paths)
    assert all(ds.labels[ds.paths.index(p)] == lab for p, lab in zip(s1.paths, s1.labels))
    seeds_differ = any(subset(ds, 2, seed=s).paths != s1.paths for s in range(1, 10))
    assert seeds_differ
    assert s3.classes == ds.classes
    with pytest.raises(ValueError):
        subset(ds, 0)


# --------------------------------------------------------------------------- duplicates


@pytest.fixture
def dup_files(tmp_path: Path) -> dict[str, Path]:
    """Unrelated images plus exact copies, re-encodings and a chain of slightly shifted crops."""
    d = tmp_path / "dups"
    f: dict[str, Path] = {}
    for i in range(8):
        f[f"u{i}"] = _save(_field(1000 + i, 128), d / f"u{i}.png")
    f["u0_copy"] = d / "u0_copy.png"
    shutil.copy(f["u0"], f["u0_copy"])
    f["u1_jpg"] = _save(np.asarray(Image.open(f["u1"])), d / "u1_reenc.jpg", quality=80)
    base = _field(2000, 160)
    # Chain: each crop is 1 px away from the previous one; ends may be further apart than neighbours.
    for k in range(3):
        f[f"s{k}"] = _save(base[k : k + 128, k : k + 128], d / f"s{k}.png")
    f["broken"] = d / "broken.jpg"
    f["broken"].write_bytes(b"\xff\xd8 not really")
    f["broken_copy"] = d / "broken_copy.jpg"
    f["broken_copy"].write_bytes(b"\xff\xd8 not really")
    return f


def test_group_duplicates_exact_near_and_unrelated(dup_files):
    names = list(dup_files)
    g = group_duplicates([dup_files[n] for n in names], progress=False)
    gid = dict(zip(names, g.tolist()))
    assert g.dtype.kind == "i" and len(g) == len(names)
    assert gid["u0"] == gid["u0_copy"]
    assert gid["u1"] == gid["u1_jpg"]
    assert gid["s0"] == gid["s1"] == gid["s2"]
    assert gid["broken"] == gid["broken_copy"]  # undecodable but byte-identical
    unrelated = [gid[f"u{i}"] for i in range(8)] + [gid["s0"], gid["broken"]]
    assert len(set(unrelated)) == len(unrelated)
    # Ids are 0..G-1 in order of first appearance.
    _, first = np.unique(g, return_index=True)
    assert list(np.unique(g)) == list(range(g.max() + 1))
    assert list(g[np.sort(first)]) == list(range(g.max() + 1))


def test_exact_only_and_zero_radius(dup_files):
    names = list(dup_files)
    paths = [dup_files[n] for n in names]
    g = dict(zip(names, group_duplicates(paths, near=False, progress=False).tolist()))
    assert g["u0"] == g["u0_copy"]
    assert g["u1"] != g["u1_jpg"]
    assert g["s0"] != g["s1"]
    g16 = dict(zip(names, group_duplicates(paths, hash_size=16, max_distance=40, progress=False).tolist()))
    assert g16["u1"] == g16["u1_jpg"] and g16["u0"] == g16["u0_copy"]
    assert len({g16[f"u{i}"] for i in range(8)}) == 8


def test_group_duplicates_missing_file_is_own_group(tmp_path, dup_files):
    paths = [dup_files["u0"], tmp_path / "does_not_exist.png", dup_files["u0_copy"]]
    g = group_duplicates(paths, progress=False)
    assert g[0] == g[2] and g[1] != g[0]


def test_group_duplicates_validates_arguments(dup_files):
    with pytest.raises(ValueError):
        group_duplicates([dup_files["u0"]], max_distance=64, progress=False)
    with pytest.raises(ValueError):
        group_duplicates([dup_files["u0"]], hash_size=1, progress=False)
    assert group_duplicates([], progress=False).shape == (0,)


@pytest.mark.parametrize("words, radius", [(1, 20), (4, 100)])
def test_near_pairs_matches_brute_force(words, radius):
    rng = np.random.default_rng(words)
    packed = rng.integers(0, 2**63, size=(300, words), dtype=np.uint64)
    packed[7] = packed[3]  # guarantee a few hits
    packed[50] = packed[49] ^ np.uint64(0b1011)
    got = {tuple(p) for p in _near_pairs(packed, radius, block=64).tolist()}
    bits = np.unpackbits(packed.view(np.uint8), axis=1).astype(np.int32)
    dist = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)
    ii, jj = np.nonzero(np.triu(dist <= radius, k=1))
    assert got == set(zip(ii.tolist(), jj.tolist()))
    assert (3, 7) in got and (49, 50) in got


def test_duplicate_report():
    paths = ["a", "b", "c", "d", "e"]
    assert duplicate_report(paths, [0, 1, 0, 2, 1]) == [["a", "c"], ["b", "e"]]
    assert duplicate_report(paths, [0, 1, 2, 3, 4]) == []
    with pytest.raises(ValueError):
        duplicate_report(paths, [0, 1])


# --------------------------------------------------------------------------- splits


def _synthetic_labels_groups(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced 3-class labels (600/300/100) with groups of size 1-4 (same label inside)."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    gid = 0
    for c, n in ((0, 600), (1, 300), (2, 100)):
        left = n
        while left > 0:
            size = int(min(left, rng.choice([1, 1, 1, 2, 3, 4])))
            labels += [c] * size
            groups += [gid] * size
            gid += 1
            left -= size
    perm = rng.permutation(len(labels))
    return np.asarray(labels)[perm], np.asarray(groups)[perm]


def _check_split(split: Split, labels: np.ndarray, groups: np.ndarray, fractions, tol=0.02):
    parts = [np.asarray(p, dtype=np.int64) for p in (split.train, split.val, split.test)]
    allidx = np.concatenate(parts)
    assert len(allidx) == len(labels) == len(np.unique(allidx))  # disjoint and covering
    assert set(allidx.tolist()) == set(range(len(labels)))
    sets = [set(groups[p].tolist()) for p in parts]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    overall = np.bincount(labels, minlength=labels.max() + 1) / len(labels)
    for p, fr in zip(parts, fractions):
        if fr == 0:
            assert len(p) == 0
            continue
        assert abs(len(p) / len(labels) - fr) < tol
        prop = np.bincount(labels[p], minlength=labels.max() + 1) / len(p)
        assert np.abs(prop - overall).max() < tol, (prop, overall)


def test_split_grouped_disjoint_complete_grouped_stratified():
    labels, groups = _synthetic_labels_groups()
    sp = split_grouped(labels, groups)
    _check_split(sp, labels, groups, (0.7, 0.15, 0.15))
    assert all(list(p) == sorted(p) for p in (sp.train, sp.val, sp.test))


def test_split_grouped_deterministic_and_seed_dependent():
    labels, groups = _synthetic_labels_groups()
    a = split_grouped(labels, groups, seed=1)
    b = split_grouped(labels, groups, seed=1)
    c = split_grouped(labels, groups, seed=2)
    assert a == b
    assert a.test != c.test
    _check_split(c, labels, groups, (0.7, 0.15, 0.15))


def test_split_grouped_other_fractions_and_arbitrary_group_ids():
    labels, groups = _synthetic_labels_groups(3)
    groups = groups * 7 + 1000  # ids need not be 0..G-1
    _check_split(split_grouped(labels, groups, (0.8, 0.0, 0.2), seed=0), labels, groups, (0.8, 0.0, 0.2))
    _check_split(split_grouped(labels, groups, (0.5, 0.25, 0.25), seed=0), labels, groups, (0.5, 0.25, 0.25))


def test_split_grouped_keeps_cross_class_group_together():
    labels, groups = _synthetic_labels_groups()
    labels = labels.copy()
    members = np.flatnonzero(groups == groups[0])
    extra = np.flatnonzero(labels != labels[0])[:2]
    groups = groups.copy()
    groups[extra] = groups[0]  # a group holding two labels (label noise between duplicates)
    sp = split_grouped(labels, groups)
    where = [k for k, p in enumerate((sp.train, sp.val, sp.test)) if set(np.r_[members, extra].tolist()) & set(p)]
    assert len(where) == 1


def test_split_grouped_validates():
    labels, groups = _synthetic_labels_groups()
    for fr in [(0.7, 0.2, 0.2), (0.0, 0.5, 0.5), (0.5, 0.5), (1.2, -0.1, -0.1)]:
        with pytest.raises(ValueError):
            split_grouped(labels, groups, fr)
    with pytest.raises(ValueError):
        split_grouped(labels, groups[:-1])


def test_kfold_grouped_partitions_and_keeps_groups():
    labels, groups = _synthetic_labels_groups()
    folds = kfold_grouped(labels, groups, k=5, seed=0)
    assert len(folds) == 5
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests.tolist()) == list(range(len(labels)))
    overall = np.bincount(labels) / len(labels)
    for tr, te in folds:
        assert not set(groups[tr].tolist()) & set(groups[te].tolist())
        assert len(tr) + len(te) == len(labels)
        assert np.abs(np.bincount(labels[te], minlength=3) / len(te) - overall).max() < 0.03
    again = kfold_grouped(labels, groups, k=5, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    with pytest.raises(ValueError):
        kfold_grouped(labels, groups, k=1)


def test_split_parts_named_disjoint_grouped_stratified():
    labels, groups = _synthetic_labels_groups()
    fr = {"train": 0.625, "val": 0.075, "cal_a": 0.075, "cal_b": 0.075, "test": 0.15}
    parts = split_parts(labels, groups, fr, seed=4)
    assert list(parts) == list(PARTS)
    allidx = np.concatenate([np.asarray(p) for p in parts.values()])
    assert sorted(allidx.tolist()) == list(range(len(labels)))
    check_disjoint(parts, groups)
    overall = np.bincount(labels) / len(labels)
    for k, idx in parts.items():
        idx = np.asarray(idx)
        assert abs(len(idx) / len(labels) - fr[k]) < 0.02, k
        assert np.abs(np.bincount(labels[idx], minlength=3) / len(idx) - overall).max() < 0.05, k
    # three parts with the same fractions give split_grouped's split (one algorithm)
    three = split_parts(labels, groups, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=4)
    assert tuple(three.values()) == tuple(split_grouped(labels, groups, seed=4).as_dict().values())
    with pytest.raises(ValueError):
        split_parts(labels, groups, {"train": 0.5, "test": 0.4})


def test_check_disjoint_names_shared_items_and_groups():
    groups = np.array([0, 0, 1, 2, 3])
    check_disjoint({"a": [0, 1], "b": [2], "c": [3, 4]}, groups)
    with pytest.raises(ValueError, match="'a' and 'b' share 1 items"):
        check_disjoint({"a": [0, 2], "b": [2]})
    with pytest.raises(ValueError, match="'a' and 'b' share 1 duplicate groups"):
        check_disjoint({"a": [0], "b": [1]}, groups)  # two copies of one image on both sides


# --------------------------------------------------------------------------- save / load


def test_save_split_named_parts_sizes_and_content_hashes(folder, tmp_path):
    ds = list_imagefolder(folder)
    groups = group_duplicates(ds.paths, progress=False)
    parts = split_parts(ds.labels, groups, {"train": 0.5, "cal_a": 0.25, "test": 0.25}, seed=1)
    info = save_split(tmp_path / "split.json", ds, parts, groups)
    doc = json.loads((tmp_path / "split.json").read_text())
    assert info["sizes"] == doc["sizes"] == {k: len(v) for k, v in parts.items()}
    assert doc["sha256"]["cal_a"] == part_sha256([ds.paths[i] for i in parts["cal_a"]])
    # the hash is of the content: same files in another order (or renamed) give the same hash
    assert part_sha256([ds.paths[i] for i in reversed(parts["cal_a"])]) == doc["sha256"]["cal_a"]
    copy = tmp_path / "renamed.png"
    shutil.copy(ds.paths[parts["test"][0]], copy)
    assert part_sha256([copy]) == part_sha256([ds.paths[parts["test"][0]]])
    assert list(load_split(tmp_path / "split.json", folder)) == ["train", "val", "test", "cal_a"]
    with pytest.raises(ValueError, match="share"):
        save_split(tmp_path / "bad.json", ds, {"train": [0, 1], "test": [1]}, groups)


def test_save_load_split_roundtrip_relative_paths(folder, tmp_path):
    ds = list_imagefolder(folder)
    groups = group_duplicates(ds.paths, progress=False)
    sp = split_grouped(ds.labels, groups, (0.5, 0.25, 0.25), seed=3)
    out = tmp_path / "run" / "split.json"
    save_split(out, ds, sp, groups, meta={"seed": 3, "fractions": [0.5, 0.25, 0.25]})
    doc = json.loads(out.read_text())
    assert doc["dataset_digest"] == ds.digest()
    assert doc["classes"] == list(ds.classes)
    assert doc["meta"]["seed"] == 3
    assert str(folder) not in out.read_text()  # no absolute paths: portable between machines

    moved = tmp_path / "other_machine" / "data"
    shutil.copytree(folder, moved)
    loaded = load_split(out, moved)
    assert set(loaded) == {"train", "val", "test"}
    for name, idx in sp.as_dict().items():
        expect = [(str(moved / Path(ds.paths[i]).relative_to(folder)), ds.labels[i]) for i in idx]
        assert [(Path(p).resolve(), lab) for p, lab in loaded[name]] == [(Path(p).resolve(), lab) for p, lab in expect]
        assert all(Path(p).is_file() for p, _ in loaded[name])


def test_load_split_reports_missing_files_and_bad_format(folder, tmp_path):
    ds = list_imagefolder(folder)
    groups = np.arange(len(ds))
    sp = split_grouped(ds.labels, groups, seed=0)
    out = tmp_path / "split.json"
    save_split(out, ds, sp, groups)
    Path(ds.paths[0]).unlink()
    Path(ds.paths[1]).unlink()
    with pytest.raises(FileNotFoundError, match=f"2 of {len(ds)} files"):
        load_split(out, folder)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a split file"):
        load_split(bad, folder)
    with pytest.raises(ValueError, match="cannot read"):
        load_split(tmp_path / "absent.json", folder)


def test_save_split_validates(folder, tmp_path):
    ds = list_imagefolder(folder)
    with pytest.raises(ValueError):
        save_split(tmp_path / "s.json", ds, Split((0,), (), ()), np.arange(len(ds) - 1))
    with pytest.raises(ValueError):
        save_split(tmp_path / "s.json", ds, Split((0, len(ds)), (), ()), np.arange(len(ds)))
