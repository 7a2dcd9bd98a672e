"""Datasets on disk: ImageFolder listing, verification, duplicate grouping and grouped splits.

Duplicates (byte-identical files, and the same field re-encoded or shifted) must never be split
across train/val/test, or the test score measures memory instead of generalisation. The workflow is::

    ds = list_imagefolder(root)                 # files + problems (never fatal)
    groups = group_duplicates(ds.paths)         # exact (md5) + near (pHash) duplicate groups
    split = split_grouped(ds.labels, groups)    # stratified, groups kept whole, seeded
    save_split("split.json", ds, split, groups) # relative paths + dataset digest

Several sources (labs) in one run: ``ms = list_sources(["../pbs5", "lisc=../lisc"], classes, class_map)``
gives the merged ``ms.dataset`` with a source per image; ``ms.groups()`` groups duplicates per source
(plus a source's ``groups.csv``) and ``split_grouped(ms.strata(), groups)`` stratifies by class x source.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from bcc_core.io import IMAGE_EXTENSIONS, MAX_PIXELS, MIN_SIDE, is_image_name

__all__ = [
    "Dataset",
    "Split",
    "DEFAULT_MAX_DISTANCE",
    "DEFAULT_HASH_SIZE",
    "list_imagefolder",
    "verify_image_file",
    "group_duplicates",
    "duplicate_report",
    "split_grouped",
    "split_parts",
    "check_disjoint",
    "PARTS",
    "kfold_grouped",
    "save_split",
    "load_split",
    "subset",
    "Source",
    "MultiSource",
    "SOURCE_TERMS",
    "list_sources",
    "merge_group_file",
    "subset_sources",
]

SPLIT_FORMAT = "bcc_split/1"

DEFAULT_HASH_SIZE = 8
"""Default pHash side: 8 -> 64-bit hashes."""

DEFAULT_MAX_DISTANCE = 4
"""Default Hamming radius (of 64 bits) for near duplicates; see ``group_duplicates`` for how it was chosen."""


# --------------------------------------------------------------------------- dataset listing


@dataclass(frozen=True)
class Dataset:
    """An ImageFolder dataset listing.

    Attributes:
        root: Absolute dataset root.
        classes: Class names; label ``i`` means ``classes[i]``.
        paths: Absolute image paths, sorted by class then relative path.
        labels: Integer label per path, ``0 <= label < len(classes)``.
        problems: ``(path, reason)`` for every file that was not listed (wrong extension,
            unreadable, too small) and every class folder without images.
    """

    root: str
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    problems: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"paths ({len(self.paths)}) and labels ({len(self.labels)}) differ in length")
        if self.labels and not (0 <= min(self.labels) and max(self.labels) < len(self.classes)):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        """Number of images per class, in class order (classes without images give 0)."""
        n = np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.classes))
        return {c: int(n[i]) for i, c in enumerate(self.classes)}

    def relpaths(self) -> list[str]:
        """Paths relative to ``root``, with ``/`` separators."""
        root = Path(self.root)
        return [
            Path(p).relative_to(root).as_posix() if Path(p).is_absolute() else Path(p).as_posix() for p in self.paths
        ]

    def digest(self) -> str:
        """SHA-256 hex over the sorted ``"class/relative_path"`` lines: provenance of the file list.

        Independent of where the dataset lives on disk and of file contents (use
        ``group_duplicates``/md5 for contents).
        """
        lines = sorted(
            f"{self.classes[lab]}/{self._rel_in_class(p, self.classes[lab])}" for p, lab in zip(self.paths, self.labels)
        )
        return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()

    def _rel_in_class(self, path: str, cls: str) -> str:
        p = Path(path)
        try:
            return p.relative_to(Path(self.root) / cls).as_posix()
        except ValueError:
            return p.name


def verify_image_file(path: str | os.PathLike) -> str | None:
    """Check that a file decodes as an image of acceptable size, cheaply.

    JPEGs are decoded with DCT scaling (``Image.draft``, 1/8 size), which still reads the whole
    entropy-coded stream and so catches truncated files that ``Image.verify()`` accepts, at about
    0.5 ms per 360x360 file. Other formats are fully decoded.

    Args:
        path: Image file path.

    Returns:
        ``None`` if the file is fine, else the reason it is not.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w < MIN_SIDE or h < MIN_SIDE:
                    return f"image is {w}x{h} pixels, smaller than {MIN_SIDE}x{MIN_SIDE}"
                if w * h > MAX_PIXELS:
                    return f"image is {w}x{h}, larger than {MAX_PIXELS // 1_000_000} megapixels"
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                im.load()
    except Exception as exc:  # any decoder failure is a data problem, recorded not raised
        return f"unreadable image ({type(exc).__name__}: {exc})"
    return None


def list_imagefolder(
    root: str | os.PathLike, classes: Sequence[str] | None = None, verify: bool = True
) -> Dataset:
    """List an ImageFolder dataset ``<root>/<class>/<...>/<file>``.

    Files are found recursively below each class folder; hidden files and folders are skipped.
    Files with non-image extensions and (if ``verify``) unreadable or too-small images go to
    ``problems`` and are not listed; they never raise.

    Args:
        root: Dataset root folder.
        classes: Class folder names in label order. ``None``: all non-hidden subfolders, sorted.
        verify: Decode each image cheaply (see ``verify_image_file``; ~2-3 s per 5,000 JPEGs).

    Returns:
        The :class:`Dataset`.

    Raises:
        ValueError: ``root`` is not a folder, a requested class folder is missing, there are no
            class folders, or no images at all.
    """
    rootp = Path(root).expanduser()
    if not rootp.is_dir():
        raise ValueError(
            f"dataset root {str(root)!r} does not exist or is not a folder; expected <root>/<class>/<image>"
        )
    rootp = rootp.resolve()
    available = sorted(
        d.name for d in rootp.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX"
    )
    if classes is None:
        classes = available
        if not classes:
            raise ValueError(f"dataset root {str(rootp)!r} has no class subfolders; expected <root>/<class>/<image>")
    else:
        classes = list(classes)
        if len(set(classes)) != len(classes):
            raise ValueError(f"class names must be unique, got {classes}")
        missing = [c for c in classes if c not in available]
        if missing:
            raise ValueError(f"class folder(s) {missing} not found under {str(rootp)!r}; available: {available}")
        if not classes:
            raise ValueError("classes must not be empty")

    paths: list[str] = []
    labels: list[int] = []
    problems: list[tuple[str, str]] = []
    for lab, cls in enumerate(classes):
        cdir = rootp / cls
        found: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(cdir):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
            for fn in filenames:
                if fn.startswith("."):
                    continue  # OS metadata (.DS_Store, ._foo.jpg), not data
                p = Path(dirpath) / fn
                found.append((p.relative_to(cdir).as_posix(), p))
        found.sort(key=lambda t: t[0])
        n_ok = 0
        for _, p in found:
            if not is_image_name(p.name):
                reason = f"not an image extension ({p.suffix or 'none'}); accepted: {', '.join(IMAGE_EXTENSIONS)}"
                problems.append((str(p), reason))
                continue
            if verify:
                reason = verify_image_file(p)
                if reason is not None:
                    problems.append((str(p), reason))
                    continue
            paths.append(str(p))
            labels.append(lab)
            n_ok += 1
        if n_ok == 0:
            problems.append((str(cdir), "class folder has no readable images"))
    if not paths:
        raise ValueError(
            f"no readable images under {str(rootp)!r} (classes {list(classes)}); "
            f"accepted extensions: {', '.join(IMAGE_EXTENSIONS)}; {len(problems)} problem(s), first: {problems[:3]}"
        )
    return Dataset(
        root=str(rootp), classes=tuple(classes), paths=tuple(paths), labels=tuple(labels), problems=tuple(problems)
    )


def subset(dataset: Dataset, per_class: int, seed: int = 0) -> Dataset:
    """Random subset with at most ``per_class`` images per class (all of a class if it has fewer).

    Args:
        dataset: Source dataset.
        per_class: Maximum images per class, >= 1.
        seed: RNG seed; the same seed gives the same subset.

    Returns:
        A :class:`Dataset` with the same root, classes and problems, paths kept in original order.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    keep: list[int] = []
    for c in range(len(dataset.classes)):
        idx = np.flatnonzero(labels == c)
        if len(idx) > per_class:
            idx = rng.choice(idx, size=per_class, replace=False)
        keep.extend(int(i) for i in idx)
    keep.sort()
    return replace(
        dataset,
        paths=tuple(dataset.paths[i] for i in keep),
        labels=tuple(dataset.labels[i] for i in keep),
    )


# --------------------------------------------------------------------------- duplicates


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # Smaller index wins so the result does not depend on pair order.
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


def _phash_bits(data: bytes, hash_size: int) -> np.ndarray | None:
    """pHash of encoded image bytes as a bool vector of ``hash_size**2`` bits, or None if undecodable."""
    import imagehash

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(_io.BytesIO(data)) as im:
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    return None
                # pHash looks at a (4*hash_size)^2 thumbnail; decoding JPEGs at reduced DCT scale
                # (never below 2x the thumbnail) is several times faster and barely moves the hash.
                target = 8 * hash_size
                if im.format == "JPEG":
                    im.draft("RGB", (target, target))
                im.load()
                bits = imagehash.phash(im, hash_size=hash_size).hash
    except Exception:
        return None
    return np.asarray(bits, dtype=bool).ravel()


def _near_pairs(packed: np.ndarray, max_distance: int, block: int = 256, progress: bool = False) -> np.ndarray:
    """All pairs ``i < j`` with Hamming distance <= max_distance.

    Args:
        packed: ``(n, words)`` uint64 hashes (bits packed, zero padded).
        max_distance: Inclusive Hamming radius.
        block: Rows compared at once; memory is ``block * n * words * 8`` bytes.

    Returns:
        ``(m, 2)`` int64 array of index pairs.
    """
    n = packed.shape[0]
    out: list[np.ndarray] = []
    starts = range(0, n, block)
    for s in tqdm(starts, desc="near-dup pairs", unit="block", disable=not progress, leave=False):
        e = min(n, s + block)
        # Only compare against j > i: the upper triangle from column s on.
        x = packed[s:e, None, :] ^ packed[None, s:, :]
        d = np.bitwise_count(x).sum(axis=2, dtype=np.int32)
        ii, jj = np.nonzero(d <= max_distance)
        jj = jj + s
        ii = ii + s
        keep = jj > ii
        if keep.any():
            out.append(np.stack([ii[keep], jj[keep]], axis=1))
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(out).astype(np.int64)


def group_duplicates(
    paths: Sequence[str | os.PathLike],
    near: bool = True,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    hash_size: int = DEFAULT_HASH_SIZE,
    progress: bool = True,
) -> np.ndarray:
    """Group exact and near duplicate images.

    Exact duplicates share the md5 of their bytes. Near duplicates have perceptual hashes
    (``imagehash.phash``, ``hash_size**2`` bits) within Hamming distance ``max_distance``. Groups
    are merged transitively (union-find), so a too-large radius chains unrelated images together.

    How the defaults (64-bit hash, radius 4) were chosen, on the shared data. pHash distances
    between different images are even numbers (the hash splits at the median), so the useful
    radii are 0, 2, 4, 6, ...

    * pbs5 (single-cell crops on uniform backgrounds, which hash alike): radius 4 finds the 6
      byte-identical pairs plus 1 true re-encoded pair and nothing else. Radius 6 already joins
      different cells (2 cross-class pairs), radius 8 forms a group of 10 and 20 cross-class groups.
    * all4 (224x224 smear fields): radius 4 finds 95 pairs (the 40 byte-identical ones and 55
      re-encoded/shifted fields; 89 pairs + 2 triples, all within one class). Shifted fields reach
      distance 6-10 (radius 10: 113 pairs, still no cross-class group), radius 12 starts joining
      unrelated fields across classes.

    Radius 4 is therefore the largest safe 64-bit radius for single-cell crops. A 256-bit hash
    (``hash_size=16, max_distance=56``) separates better: on all4 it finds 106 pairs (a superset of
    the 95; unrelated fields only from distance ~86), on pbs5 exactly the same 7 pairs (unrelated
    cells only from ~66), at ~1.5x the hashing time.

    Files that cannot be read or decoded only take part in exact matching (if readable) and
    otherwise form their own group.

    Args:
        paths: Image file paths.
        near: Also group near duplicates (else only byte-identical files).
        max_distance: Inclusive Hamming radius for near duplicates, ``0 <= max_distance < hash_size**2``.
        hash_size: pHash side; the hash has ``hash_size**2`` bits.
        progress: Show tqdm progress bars.

    Returns:
        ``(len(paths),)`` int64 group ids ``0..G-1``, numbered by first occurrence.
    """
    n = len(paths)
    if hash_size < 2:
        raise ValueError(f"hash_size must be >= 2, got {hash_size}")
    if not 0 <= max_distance < hash_size * hash_size:
        raise ValueError(f"max_distance must be in 0..{hash_size * hash_size - 1}, got {max_distance}")
    uf = _UnionFind(n)
    first_by_md5: dict[str, int] = {}
    nbits = hash_size * hash_size
    bits = np.zeros((n, nbits), dtype=bool)
    has_hash = np.zeros(n, dtype=bool)
    for i, p in enumerate(tqdm(paths, desc="hashing images", unit="img", disable=not progress)):
        try:
            data = Path(p).read_bytes()
        except OSError:
            continue
        md5 = hashlib.md5(data).hexdigest()
        j = first_by_md5.setdefault(md5, i)
        if j != i:
            uf.union(j, i)
        if near:
            b = _phash_bits(data, hash_size)
            if b is not None:
                bits[i] = b
                has_hash[i] = True
    if near and has_hash.sum() > 1:
        idx = np.flatnonzero(has_hash)
        packed8 = np.packbits(bits[idx], axis=1)
        pad = (-packed8.shape[1]) % 8
        if pad:
            packed8 = np.pad(packed8, ((0, 0), (0, pad)))
        packed = np.ascontiguousarray(packed8).view(np.uint64)
        for a, b in _near_pairs(packed, max_distance, progress=progress):
            uf.union(int(idx[a]), int(idx[b]))
    roots = np.fromiter((uf.find(i) for i in range(n)), dtype=np.int64, count=n)
    _, first, inv = np.unique(roots, return_index=True, return_inverse=True)
    # Renumber so group ids follow the order of first appearance in ``paths``.
    order = np.argsort(np.argsort(first))
    return order[inv].astype(np.int64)


def duplicate_report(paths: Sequence[str | os.PathLike], groups: Sequence[int] | np.ndarray) -> list[list[str]]:
    """Groups with more than one member, as lists of paths.

    Args:
        paths: Paths, aligned with ``groups``.
        groups: Group id per path (e.g. from :func:`group_duplicates`).

    Returns:
        One list per multi-member group (paths in input order), ordered by first member.
    """
    g = np.asarray(groups)
    if len(g) != len(paths):
        raise ValueError(f"paths ({len(paths)}) and groups ({len(g)}) differ in length")
    members: dict[int, list[str]] = {}
    for p, gid in zip(paths, g.tolist()):
        members.setdefault(gid, []).append(str(p))
    return [m for m in members.values() if len(m) > 1]


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """Indices into a dataset; the three parts are disjoint and sorted.

    Attributes:
        train: Training indices.
        val: Validation indices (threshold / calibration fitting, early stopping).
        test: Held-out test indices.
    """

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def as_dict(self) -> dict[str, tuple[int, ...]]:
        return {"train": self.train, "val": self.val, "test": self.test}


def _check_labels_groups(labels, groups) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    g = np.asarray(groups)
    if y.ndim != 1 or g.ndim != 1 or len(y) != len(g):
        raise ValueError(f"labels and groups must be 1-D and of equal length, got {y.shape} and {g.shape}")
    if len(y) == 0:
        raise ValueError("labels is empty")
    return y, g


def split_grouped(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 42,
) -> Split:
    """Stratified train/val/test split that keeps every group on one side.

    Each group is assigned to its majority label; per label, groups are shuffled (seeded), sorted by
    size (largest first, so the big ones do not upset the balance at the end) and given one by one to
    the part furthest below its target count. With mostly small groups the class proportions of each
    part match the overall ones to within a few images.

    Args:
        labels: ``(n,)`` integer (or hashable) labels.
        groups: ``(n,)`` group ids; items sharing an id always land in the same part.
        fractions: ``(train, val, test)``, non-negative, summing to 1. A zero part stays empty.
        seed: RNG seed; same inputs and seed give the same split.

    Returns:
        :class:`Split` with sorted, disjoint index tuples covering ``0..n-1``.
    """
    y, g = _check_labels_groups(labels, groups)
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6 or fr[0] <= 0:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1 with train > 0, got {fractions}")
    return Split(*_assign_groups(y, g, fr, seed))


def _assign_groups(y: np.ndarray, g: np.ndarray, fr: np.ndarray, seed: int) -> list[tuple[int, ...]]:
    """The grouped, stratified assignment behind :func:`split_grouped` / :func:`split_parts`, for any
    number of parts (fractions ``fr``, summing to 1)."""
    rng = np.random.default_rng(seed)
    _, y_idx = np.unique(y, return_inverse=True)
    _, g_idx = np.unique(g, return_inverse=True)
    n_groups = int(g_idx.max()) + 1
    members = [[] for _ in range(n_groups)]
    for i, gi in enumerate(g_idx.tolist()):
        members[gi].append(i)
    # Majority label per group (ties -> smallest label index, deterministic).
    n_cls = int(y_idx.max()) + 1
    group_label = np.empty(n_groups, dtype=np.int64)
    for gi, m in enumerate(members):
        group_label[gi] = int(np.bincount(y_idx[m], minlength=n_cls).argmax())

    k = len(fr)
    parts: list[list[int]] = [[] for _ in range(k)]
    for c in range(n_cls):
        gids = np.flatnonzero(group_label == c)
        if len(gids) == 0:
            continue
        gids = gids[rng.permutation(len(gids))]
        sizes = np.array([len(members[j]) for j in gids])
        gids = gids[np.argsort(-sizes, kind="stable")]
        target = fr * sizes.sum()
        have = np.zeros(k)
        for j in gids:
            deficit = np.where(fr > 0, target - have, -np.inf)
            s = int(np.argmax(deficit))
            parts[s].extend(members[j])
            have[s] += len(members[j])
    return [tuple(sorted(p)) for p in parts]


PARTS = ("train", "val", "cal_a", "cal_b", "test")
"""The named, disjoint parts of a training run: ``train`` (network weights, OOD statistics), ``val``
(early stopping / checkpoint choice only), ``cal_a`` (temperature, OOD thresholds), ``cal_b`` (review
rule, conformal quantile) and ``test`` (evaluation only, never a fit or a choice)."""

PART_FRACTIONS = {"train": 0.625, "val": 0.075, "cal_a": 0.075, "cal_b": 0.075, "test": 0.15}

PART_USE = {
    "train": "network weights (head, fine-tuned layers) and the OOD statistics (class means, covariance, kNN bank)",
    "val": "early stopping / best-checkpoint choice of the network (nothing else)",
    "cal_a": "temperature scaling and the OOD detectors' thresholds",
    "cal_b": "review rule (Clopper-Pearson risk bound) and the conformal quantile",
    "test": "evaluation only: no fit, threshold or choice uses it",
}


def split_parts(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
    fractions: dict[str, float] | None = None,
    seed: int = 42,
) -> dict[str, tuple[int, ...]]:
    """Named, disjoint parts, stratified by ``labels`` (e.g. class x source), groups kept whole.

    Args:
        labels: ``(n,)`` strata.
        groups: ``(n,)`` duplicate-group ids.
        fractions: ``{part: fraction}`` (default :data:`PART_FRACTIONS`), non-negative, summing to 1,
            the first part > 0.
        seed: RNG seed.

    Returns:
        ``{part: sorted index tuple}`` in the order of ``fractions``; together they cover ``0..n-1``.
    """
    y, g = _check_labels_groups(labels, groups)
    fractions = dict(fractions or PART_FRACTIONS)
    fr = np.asarray(list(fractions.values()), dtype=np.float64)
    if (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6 or fr[0] <= 0:
        raise ValueError(f"fractions must be non-negative, sum to 1 and give the first part > 0, got {fractions}")
    return dict(zip(fractions, _assign_groups(y, g, fr, seed)))


def check_disjoint(parts: dict, groups: Sequence[int] | np.ndarray | None = None) -> None:
    """Raise ValueError when two parts share an item, or (with ``groups``) a duplicate group."""
    names = list(parts)
    g = None if groups is None else np.asarray(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ia, ib = np.asarray(parts[a], np.int64), np.asarray(parts[b], np.int64)
            shared = np.intersect1d(ia, ib)
            if len(shared):
                raise ValueError(f"parts {a!r} and {b!r} share {len(shared)} items (e.g. index {shared[0]})")
            if g is not None:
                sg = np.intersect1d(g[ia], g[ib])
                if len(sg):
                    raise ValueError(f"parts {a!r} and {b!r} share {len(sg)} duplicate groups (e.g. group {sg[0]})")


def kfold_grouped(
    labels: Sequence[int] | np.ndarray, groups: Sequence[int] | np.ndarray, k: int = 5, seed: int = 42
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold (sklearn ``StratifiedGroupKFold(shuffle=True)``).

    Args:
        labels: ``(n,)`` labels.
        groups: ``(n,)`` group ids; a group is never on both sides of a fold.
        k: Number of folds, ``2 <= k <= number of groups``.
        seed: Shuffle seed.

    Returns:
        ``k`` pairs ``(train_idx, test_idx)`` of int64 index arrays; the test parts partition ``0..n-1``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    y, g = _check_labels_groups(labels, groups)
    n_groups = len(np.unique(g))
    if k < 2 or k > n_groups:
        raise ValueError(f"k must be in 2..{n_groups} (number of groups), got {k}")
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Warns when a class has fewer members than k; the folds are still valid.
        warnings.simplefilter("ignore", UserWarning)
        folds = list(cv.split(np.zeros(len(y)), y, g))
    return [(np.asarray(tr, dtype=np.int64), np.asarray(te, dtype=np.int64)) for tr, te in folds]


def save_split(
    path_json: str | os.PathLike,
    dataset: Dataset,
    split: "Split | dict[str, Sequence[int]]",
    groups: Sequence[int] | np.ndarray,
    meta: dict | None = None,
) -> dict:
    """Write a split as JSON with paths relative to the dataset root.

    The file holds ``format``, ``classes``, ``dataset_digest`` (see :meth:`Dataset.digest`),
    per-part ``counts``, ``sizes`` and ``sha256`` (of the sorted SHA-256s of its files' bytes),
    ``n_groups``, optional ``meta`` (e.g. seed and fractions) and, per part, a list of
    ``[relative_path, label, group]``.

    Args:
        path_json: Output file; parent folders are created.
        dataset: The dataset the split indexes into.
        split: The split (:class:`Split`, or ``{part name: indices}`` from :func:`split_parts`).
        groups: Group id per dataset item (stored for auditing group integrity).
        meta: Extra JSON-serialisable information.

    Returns:
        ``{"sizes": {part: n}, "sha256": {part: hex}}`` (also in the file), for the model card.
    """
    g = np.asarray(groups)
    if len(g) != len(dataset):
        raise ValueError(f"groups ({len(g)}) and dataset ({len(dataset)}) differ in length")
    rel = dataset.relpaths()
    parts = split.as_dict() if isinstance(split, Split) else {k: tuple(int(i) for i in v) for k, v in split.items()}
    all_idx = np.concatenate([np.asarray(v, dtype=np.int64) for v in parts.values()])
    if len(all_idx) and (all_idx.min() < 0 or all_idx.max() >= len(dataset)):
        raise ValueError("split indices out of range for this dataset")
    check_disjoint(parts)
    sizes = {name: len(idx) for name, idx in parts.items()}
    hashes = {name: part_sha256([dataset.paths[i] for i in idx]) for name, idx in parts.items()}
    doc = {
        "format": SPLIT_FORMAT,
        "classes": list(dataset.classes),
        "dataset_digest": dataset.digest(),
        "n_items": len(dataset),
        "n_groups": int(len(np.unique(g))),
        "counts": {
            name: {c: int(sum(1 for i in idx if dataset.labels[i] == k)) for k, c in enumerate(dataset.classes)}
            for name, idx in parts.items()
        },
        "sizes": sizes,
        "sha256": hashes,
        "meta": meta or {},
        "splits": {
            name: [[rel[i], int(dataset.labels[i]), int(g[i])] for i in idx] for name, idx in parts.items()
        },
    }
    out = Path(path_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    os.replace(tmp, out)  # atomic: a crash never leaves half a split file
    return {"sizes": sizes, "sha256": hashes}


def part_sha256(paths: Sequence[str | os.PathLike]) -> str:
    """SHA-256 of a part's content: the sorted SHA-256s of its files' bytes, one per line (independent
    of file names and order; an unreadable file counts as ``unreadable:<name>``)."""
    lines = []
    for p in paths:
        try:
            lines.append(hashlib.sha256(Path(p).read_bytes()).hexdigest())
        except OSError:
            lines.append(f"unreadable:{Path(p).name}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def load_split(path_json: str | os.PathLike, data_root: str | os.PathLike) -> dict[str, list[tuple[str, int]]]:
    """Read a split written by :func:`save_split`, resolving paths under ``data_root``.

    Args:
        path_json: Split file.
        data_root: Dataset root on this machine.

    Returns:
        ``{"train": [(abs_path, label), ...], "val": [...], "test": [...]}`` plus every further part the
        file names (``cal_a``, ``cal_b``), in the file's order.

    Raises:
        ValueError: The file is not a split file of this format.
        FileNotFoundError: Some listed files do not exist under ``data_root`` (the message says how
            many, and shows the first few).
    """
    p = Path(path_json)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read split file {str(p)!r}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != SPLIT_FORMAT or "splits" not in doc:
        raise ValueError(f"{str(p)!r} is not a split file (expected format {SPLIT_FORMAT!r})")
    root = Path(data_root)
    out: dict[str, list[tuple[str, int]]] = {}
    missing: list[str] = []
    total = 0
    names = list(dict.fromkeys(["train", "val", "test", *doc["splits"]]))
    for name in names:
        rows = doc["splits"].get(name, [])
        items = []
        for row in rows:
            rel, lab = row[0], int(row[1])
            ap = root / rel
            total += 1
            if not ap.is_file():
                missing.append(rel)
            items.append((str(ap.resolve() if ap.exists() else ap.absolute()), lab))
        out[name] = items
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {total} files listed in {str(p)!r} are missing under data root {str(root)!r} "
            f"(first: {missing[:5]}); is data_root the folder that contains the class folders?"
        )
    return out


# --------------------------------------------------------------------------- several sources

GROUPS_FILE = "groups.csv"
"""A source may ship ``<root>/groups.csv`` with columns ``file,cell_group`` (``file`` relative to the
root, e.g. ``monocyte/x.jpg``): files sharing a ``cell_group`` are copies of one cell and are grouped
like duplicates (LISC ships one: each cell appears about five times, shifted)."""

SOURCE_TERMS = {
    "pbs5": {"licence": "CC BY 4.0 as published (Kaggle, S. Singh 2024; images from Acevedo et al. 2020 "
                        "and Matek et al. 2019)",
             "use": "training, validation and test"},
    "lisc": {"licence": "published for research and education; cite Rezatofighi & Soltanian-Zadeh, "
                        "Computerized Medical Imaging and Graphics 2011",
             "use": "training and validation (research and education)"},
    "all4": {"licence": "public (Aria, Ghaderzadeh et al., Taleqani Hospital); see the dataset page",
             "use": "training, validation and test"},
    "bccd": {"licence": "MIT (BCCD)", "use": "measurement only: never train, tune or fit thresholds on it"},
}
"""Terms of the shared datasets, keyed by their root folder name (recorded in the model card)."""


@dataclass(frozen=True)
class Source:
    """One dataset root taking part in a training run.

    Attributes:
        name: Short name recorded per image and in the card (default: the root folder name).
        root: ImageFolder root ``<root>/<class>/<image>``.
    """

    name: str
    root: str

    @classmethod
    def parse(cls, arg: "str | os.PathLike | Source") -> "Source":
        """``"PATH"`` or ``"NAME=PATH"`` (the CLI's ``--data``) to a :class:`Source`."""
        if isinstance(arg, Source):
            return arg
        s = str(arg)
        name, sep, path = s.partition("=")
        if not sep or not name or "/" in name or os.sep in name:
            name, path = Path(s).expanduser().resolve().name, s
        return cls(name=name, root=path)


@dataclass(frozen=True)
class MultiSource:
    """Several ImageFolder sources merged into one labelled :class:`Dataset`.

    Attributes:
        dataset: The merged dataset. Its ``root`` is the sources' common parent folder, so the
            relative paths in ``split.json`` read ``<source folder>/<class folder>/<file>``.
        sources: Source name per image, aligned with ``dataset.paths``.
        parts: Per source, its own listing (class folders as on disk, before the class map).
        skipped: Per source, class folders that were not used (not in the class list).
        class_map: Folder name -> class name applied to every source.
    """

    dataset: Dataset
    sources: tuple[str, ...]
    parts: dict
    skipped: dict
    class_map: dict

    def names(self) -> list[str]:
        return list(self.parts)

    def strata(self) -> np.ndarray:
        """``(n,)`` ``"class|source"`` keys: stratify a split by class and source together."""
        ds = self.dataset
        return np.array([f"{ds.classes[lab]}|{s}" for lab, s in zip(ds.labels, self.sources)])

    def groups(self, max_distance: int = DEFAULT_MAX_DISTANCE, progress: bool = True) -> np.ndarray:
        """Duplicate groups: md5/pHash within each source plus each source's ``groups.csv``.

        pHash is compared within a source only (single-cell crops on uniform backgrounds of two labs
        hash alike more easily than copies do). Group ids are unique across sources.

        Returns:
            ``(n,)`` int64 group ids ``0..G-1``, numbered by first occurrence.
        """
        out = np.empty(len(self.dataset), np.int64)
        src = np.asarray(self.sources)
        offset = 0
        for name, part in self.parts.items():
            idx = np.flatnonzero(src == name)
            paths = [self.dataset.paths[i] for i in idx]
            g = group_duplicates(paths, max_distance=max_distance, progress=progress)
            g = merge_group_file(paths, g, Path(part.root) / GROUPS_FILE)
            out[idx] = g + offset
            offset += int(g.max()) + 1 if len(g) else 0
        _, first, inv = np.unique(out, return_index=True, return_inverse=True)
        return np.argsort(np.argsort(first))[inv].astype(np.int64)

    def card_sources(self) -> list[dict]:
        """The card's per-source entries: name, folder, counts, digest, terms, use, skipped folders."""
        rows = []
        src = np.asarray(self.sources)
        for name, part in self.parts.items():
            labels = np.asarray(self.dataset.labels)[src == name]
            counts = {c: int((labels == k).sum()) for k, c in enumerate(self.dataset.classes) if (labels == k).any()}
            folder = Path(part.root).name
            terms = SOURCE_TERMS.get(folder, {"licence": "unknown: check the dataset's own terms before use",
                                              "use": "unknown"})
            rows.append({"name": name, "root": folder, "n_images": int(len(labels)), "class_counts": counts,
                         "file_list_sha256": part.digest(), "skipped_folders": list(self.skipped[name]),
                         "group_file": (Path(part.root) / GROUPS_FILE).is_file(), **terms})
        return rows


def _mapped(folder: str, class_map: dict) -> str:
    return class_map.get(folder, folder)


def _name_key(name: str) -> str:
    """A class name reduced for comparison: lower case, '-' and ' ' as '_', no plural 's'."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return key[:-1] if key.endswith("s") and len(key) > 3 else key


def alike_classes(folder: str, model_classes: Sequence[str]) -> list[str]:
    """The model classes a folder may mean although it is not spelt the same: equal but for case,
    separators or a plural ('Lymphocytes' ~ 'lymphocyte'), or the last word of a qualified class
    ('neutrophil' ~ 'seg_neutrophil'). Read such a folder through a class map, never as a class of its own."""
    k = _name_key(folder)
    return [c for c in model_classes if c != folder and (
        (ck := _name_key(c)) == k or ck.endswith("_" + k) or k.endswith("_" + ck))]


def list_sources(
    sources: Sequence["str | os.PathLike | Source"],
    classes: Sequence[str] | None = None,
    class_map: dict | None = None,
    verify: bool = True,
) -> MultiSource:
    """List several ImageFolder roots as one dataset with a source per image.

    Args:
        sources: Roots as :class:`Source` or ``"PATH"`` / ``"NAME=PATH"`` strings.
        classes: Class names in label order. ``None``: every (mapped) folder name of any source, sorted.
            A source's folders whose mapped name is not in ``classes`` are skipped (and listed).
        class_map: Folder name -> class name, e.g. ``{"neutrophil": "seg_neutrophil"}``.
        verify: Decode each image cheaply (see :func:`list_imagefolder`).

    Returns:
        The :class:`MultiSource`.

    Raises:
        ValueError: No sources, duplicate source names, a requested class found in no source, or a
            source with no folder in the class list.
    """
    specs = [Source.parse(s) for s in sources]
    if not specs:
        raise ValueError("at least one data source is needed")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}; name them with NAME=PATH")
    cmap = dict(class_map or {})
    folders = {}
    for s in specs:
        root = Path(s.root).expanduser()
        if not root.is_dir():
            raise ValueError(f"source {s.name!r}: {s.root!r} is not a folder; expected <root>/<class>/<image>")
        folders[s.name] = sorted(d.name for d in root.iterdir()
                                 if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX")
    available = sorted({_mapped(f, cmap) for fs in folders.values() for f in fs})
    if classes is None:
        classes = available
    classes = list(classes)
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be unique and non-empty, got {classes}")
    missing = [c for c in classes if c not in available]
    if missing:
        raise ValueError(f"class(es) {missing} are in no source; available (after the class map): {available}")

    paths, labels, src, problems = [], [], [], []
    parts, skipped = {}, {}
    for s in specs:
        used = [f for f in folders[s.name] if _mapped(f, cmap) in classes]
        skipped[s.name] = [f for f in folders[s.name] if f not in used]
        if not used:
            raise ValueError(f"source {s.name!r} has no folder among the classes {classes} "
                             f"(its folders: {folders[s.name]}; class map: {cmap})")
        part = list_imagefolder(s.root, classes=used, verify=verify)
        parts[s.name] = part
        for p, lab in zip(part.paths, part.labels):
            paths.append(p)
            labels.append(classes.index(_mapped(part.classes[lab], cmap)))
            src.append(s.name)
        problems.extend(part.problems)
    root = os.path.commonpath([p.root for p in parts.values()])
    if len(parts) > 1 and root in {p.root for p in parts.values()}:
        raise ValueError("sources must not be nested inside each other")
    ds = Dataset(root=root if len(parts) > 1 else next(iter(parts.values())).root, classes=tuple(classes),
                 paths=tuple(paths), labels=tuple(labels), problems=tuple(problems))
    return MultiSource(dataset=ds, sources=tuple(src), parts=parts, skipped=skipped, class_map=cmap)


def merge_group_file(paths: Sequence[str], groups: np.ndarray, group_file: str | os.PathLike) -> np.ndarray:
    """Join groups that a ``groups.csv`` (``file,cell_group``, ``file`` relative to its folder) puts together.

    Args:
        paths: Absolute image paths (aligned with ``groups``).
        groups: ``(n,)`` group ids (e.g. from :func:`group_duplicates`).
        group_file: The CSV; when it does not exist ``groups`` is returned renumbered, unchanged.

    Returns:
        ``(n,)`` int64 group ids ``0..G-1``, numbered by first occurrence; files the CSV does not
        list keep their own groups.

    Raises:
        ValueError: The file lacks the ``file`` or ``cell_group`` column.
    """
    import csv

    g = np.asarray(groups, dtype=np.int64)
    n = len(g)
    uf = _UnionFind(n)
    first_of_group: dict[int, int] = {}
    for i, gi in enumerate(g.tolist()):
        j = first_of_group.setdefault(gi, i)
        if j != i:
            uf.union(j, i)
    gf = Path(group_file)
    if gf.is_file():
        with gf.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not {"file", "cell_group"} <= set(reader.fieldnames or ()):
                raise ValueError(f"{gf}: needs columns file,cell_group; has {reader.fieldnames}")
            cell = {row["file"]: row["cell_group"] for row in reader}
        base = gf.parent.resolve()
        first_of_cell: dict[str, int] = {}
        for i, p in enumerate(paths):
            try:
                rel = Path(p).resolve().relative_to(base).as_posix()
            except ValueError:
                continue
            c = cell.get(rel)
            if c is not None:
                j = first_of_cell.setdefault(c, i)
                if j != i:
                    uf.union(j, i)
    roots = np.fromiter((uf.find(i) for i in range(n)), dtype=np.int64, count=n)
    _, first, inv = np.unique(roots, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inv].astype(np.int64)


def subset_sources(ms: MultiSource, per_class: int, seed: int = 0) -> MultiSource:
    """Random subset with at most ``per_class`` images per class *and source* (quick checks, tests).

    Args:
        ms: The merged sources.
        per_class: Maximum images per (class, source), >= 1.
        seed: RNG seed.

    Returns:
        A :class:`MultiSource` with the same parts, paths kept in original order.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    strata = ms.strata()
    keep: list[int] = []
    for key in np.unique(strata):
        idx = np.flatnonzero(strata == key)
        if len(idx) > per_class:
            idx = rng.choice(idx, size=per_class, replace=False)
        keep.extend(int(i) for i in idx)
    keep.sort()
    ds = replace(ms.dataset, paths=tuple(ms.dataset.paths[i] for i in keep),
                 labels=tuple(ms.dataset.labels[i] for i in keep))
    return replace(ms, dataset=ds, sources=tuple(ms.sources[i] for i in keep))
