"""Typed results: one `ScreenResult` per image, produced by screening and the single-image path alike.

`ScreenResult.to_row()` gives the result row every consumer reads today (CSV, JSON, FHIR, audit, the
pages: the keys of `ROW_KEYS`, in that order); the result also names the model that produced it
(`ModelIdentity`: id, version, SHA-256 of model.keras), which `to_dict()` adds for exports and audit
entries that record it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROW_KEYS = ("file", "status", "predicted_class", "confidence", "flags", "reason", "probabilities", "sha256",
            "ood_score", "prediction_set", "thumbnail")
"""Keys of every result row, in this order (error rows too, so streamed CSV columns never shift)."""


@dataclass(frozen=True)
class ModelIdentity:
    """Which model produced a result: card `model_id`, `version` ("" when the card has none) and the
    SHA-256 of its model.keras (card `model_sha256`; "" on cards written before hashes were kept)."""

    model_id: str = ""
    version: str = ""
    sha256: str = ""

    @classmethod
    def from_card(cls, card: Any) -> "ModelIdentity":
        """From a `ModelCard` or a card dict (older cards without version or hash included)."""
        d = card if isinstance(card, dict) else card.to_dict()
        return cls(str(d.get("model_id") or ""), str(d.get("version") or ""), str(d.get("model_sha256") or ""))

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "model_version": self.version, "model_sha256": self.sha256}


@dataclass(frozen=True)
class ScreenResult:
    """One image's result.

    Attributes:
        file: the name the user knows (path, "archive.zip:member", upload name).
        status: "ok" | "review" | "error".
        predicted_class, confidence: the suggestion and its calibrated probability (None on error rows).
        flags: list of `bcc_core.flags.Flag`.
        reason: why the row is flagged or failed ("" when ok).
        probabilities: class → calibrated probability (None on error rows).
        sha256: SHA-256 of the image bytes (None when they could not be read).
        ood_score: the OOD score (None on error rows).
        prediction_set: conformal prediction set (class names; None on error rows).
        thumbnail: (t, t, 3) uint8 RGB or None.
        model: the model that produced it.
    """

    file: str
    status: str
    predicted_class: str | None = None
    confidence: float | None = None
    flags: list = field(default_factory=list)
    reason: str = ""
    probabilities: dict | None = None
    sha256: str | None = None
    ood_score: float | None = None
    prediction_set: list | None = None
    thumbnail: Any = None
    model: ModelIdentity = ModelIdentity()

    @classmethod
    def from_prediction(cls, file: str, prediction, sha256: str | None = None, thumbnail=None,
                        model: ModelIdentity = ModelIdentity()) -> "ScreenResult":
        """From a `bcc_core.inference.Prediction` (the single-image path and screening)."""
        p = prediction
        return cls(file, p.status, p.predicted_class, p.confidence, p.flags, " ".join(f.message for f in p.flags),
                   p.probabilities, sha256, p.ood_score, p.prediction_set, thumbnail, model)

    @classmethod
    def error(cls, file: str, reason: str, model: ModelIdentity = ModelIdentity()) -> "ScreenResult":
        """An image that could not be read, prepared or run: status "error" with its reason."""
        return cls(file, "error", reason=reason, model=model)

    def to_row(self) -> dict:
        """The result row consumers read (report.results_to_csv/json/FHIR, audit, pages): the keys of
        ROW_KEYS in that order; error rows have None where there is no value, and `flags` []."""
        return {"file": self.file, "status": self.status, "predicted_class": self.predicted_class,
                "confidence": self.confidence, "flags": list(self.flags), "reason": self.reason,
                "probabilities": self.probabilities, "sha256": self.sha256, "ood_score": self.ood_score,
                "prediction_set": self.prediction_set, "thumbnail": self.thumbnail}

    def to_dict(self) -> dict:
        """`to_row()` without the thumbnail, flags as dicts, plus the model identity (JSON-serialisable)."""
        row = self.to_row()
        row.pop("thumbnail")
        row["flags"] = [f.to_dict() if hasattr(f, "to_dict") else f for f in row["flags"]]
        return row | self.model.to_dict()
