"""Bundled sample cells (assets/samples/): what a fresh checkout can show without any other data.

``samples.csv`` in the folder lists every file with its class and source (``scripts/make_samples.py``
writes it; ``ATTRIBUTION.md`` beside it gives the licence and the changes made).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SAMPLES_ENV = "BCC_SAMPLES_DIR"


def samples_dir() -> Path:
    """``$BCC_SAMPLES_DIR`` if set, else ``assets/samples`` of this checkout."""
    return Path(os.environ.get(SAMPLES_ENV) or Path(__file__).resolve().parents[1] / "assets" / "samples")


@dataclass(frozen=True)
class Sample:
    """One bundled sample image.

    Attributes:
        path: The file.
        label: Its class ("" for batch inputs that are not a cell, e.g. a blank frame).
        source: Data set it comes from ("pbs5") or "generated".
        original_file: Its file in the source data set ("" when generated).
    """

    path: Path
    label: str
    source: str
    original_file: str


def _manifest(root: Path) -> list[Sample]:
    index = root / "samples.csv"
    if not index.is_file():
        return []
    with index.open(newline="", encoding="utf-8") as f:
        return [Sample(root / r["file"], r["class"], r["source"], r["original_file"]) for r in csv.DictReader(f)
                if (root / r["file"]).is_file()]


def sample_images(model_classes: Sequence[str], root: Path | None = None) -> list[Sample]:
    """Single-image samples of the given classes, in the model's class order (empty if none are bundled).

    Args:
        model_classes: The model's classes; samples of other classes are left out.
        root: Samples folder; default :func:`samples_dir`.
    """
    root = samples_dir() if root is None else Path(root)
    singles = [s for s in _manifest(root) if s.path.parent == root and s.label]
    order = {c: i for i, c in enumerate(model_classes)}
    return sorted((s for s in singles if s.label in order), key=lambda s: (order[s.label], s.path.name))


def sample_batch_paths(root: Path | None = None) -> list[Path]:
    """The files of the sample batch (``batch/``), sorted by name; empty if it is not bundled.

    It holds cells of every pbs5 class plus inputs that must be flagged or refused (an out-of-focus
    cell, a blank frame, a file that is not an image), so screening it shows each kind of row.
    """
    root = samples_dir() if root is None else Path(root)
    batch = root / "batch"
    return sorted(p for p in batch.iterdir() if p.is_file()) if batch.is_dir() else []


def sample_batch_sources(root: Path | None = None) -> list:
    """The sample batch as ``io.ImageSource`` items for ``screening.screen`` (names ``sample batch/<file>``).

    Each file is read with the same decode limits as any upload when the screening loads it.
    """
    import functools

    from .io import ImageSource, read_image_bytes

    return [ImageSource(name=f"sample batch/{p.name}", load=functools.partial(read_image_bytes, p))
            for p in sample_batch_paths(root)]
