"""The reviewer's worklist: which cells of a screening run to verify, in which order, and what a label
chosen by the reviewer means as an audit decision.

A decision is always made on one cell that the reviewer has open; the worklist only says which cell
to open next. Labels are the model's classes plus the other cell types a haematologist meets in a
smear (the model cannot suggest them, but a reviewer must be able to record them), configurable per
lab with ``$BCC_REVIEW_LABELS``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Cell types and outcomes a reviewer can assign beyond the model's own classes (CellaVision-style
# reclassification lists include these; "not a cell" and "artefact" keep such images out of counts).
DEFAULT_EXTRA_LABELS = ("lymphocyte", "eosinophil", "band_neutrophil", "other_unidentified", "not_a_cell",
                        "artefact")
LABELS_ENV = "BCC_REVIEW_LABELS"


def review_labels(model_classes: Sequence[str], extra: Sequence[str] | None = None) -> list[str]:
    """Labels a reviewer can choose from: the model's classes first, then the extra cell types.

    Args:
        model_classes: the model's classes, in card order.
        extra: extra labels; default ``$BCC_REVIEW_LABELS`` (comma-separated) or DEFAULT_EXTRA_LABELS.

    Returns:
        Unique labels, model classes first, in a stable order.
    """
    if extra is None:
        env = os.environ.get(LABELS_ENV, "").strip()
        extra = [s.strip() for s in env.split(",") if s.strip()] if env else list(DEFAULT_EXTRA_LABELS)
    out: list[str] = []
    for label in [*model_classes, *extra]:
        if label not in out:
            out.append(label)
    return out


def decision_for(label: str, suggested: str | None) -> tuple[str, str | None]:
    """The audit decision for a reviewer's label: ("confirm", suggested) or ("correct", label)."""
    if not label:
        raise ValueError("a review label must not be empty")
    return ("confirm", suggested) if label == suggested else ("correct", label)


@dataclass(frozen=True)
class Worklist:
    """Cells to verify in order (row indices of a screening run) and which are already decided."""

    order: tuple[int, ...]
    decided: frozenset[int] = frozenset()

    @classmethod
    def from_rows(cls, rows: Sequence[dict], decided: Iterable[int] = (), include_ok: bool = False) -> "Worklist":
        """Flagged cells (status review), or every readable cell with `include_ok`, in input order."""
        wanted = ("review", "ok") if include_ok else ("review",)
        return cls(tuple(i for i, r in enumerate(rows) if r.get("status") in wanted), frozenset(decided))

    @property
    def pending(self) -> list[int]:
        return [i for i in self.order if i not in self.decided]

    def step(self, current: int | None, offset: int) -> int | None:
        """The cell `offset` places after (negative: before) `current` in the worklist, wrapping round.

        A current cell outside the worklist (opened from the table) steps from its place in input order.
        """
        if not self.order:
            return None
        if current is None:
            return self.order[0] if offset >= 0 else self.order[-1]
        if current in self.order:
            pos = self.order.index(current)
        else:  # insertion point: the next cell after it is at pos, the previous at pos - 1
            pos = sum(i < current for i in self.order) - (1 if offset > 0 else 0)
        return self.order[(pos + offset) % len(self.order)]

    def next_pending(self, after: int | None) -> int | None:
        """The first undecided cell after `after` (wrapping round), or None when all are decided."""
        pending = self.pending
        if not pending:
            return None
        if after is None:
            return pending[0]
        later = [i for i in pending if i > after]
        return later[0] if later else pending[0]
