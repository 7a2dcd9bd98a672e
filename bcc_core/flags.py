"""Flags: why a result should not be taken at face value.

A :class:`Flag` is attached to a prediction whenever the tool has a reason to doubt it. Every flag carries
a plain-language message for the haematologist that includes what to do next, so the user interface can
show it verbatim. Flags are data, not exceptions: a flagged image still gets a row in every export.

Example:
    >>> f = Flag("image_quality", "critical", "Image is blank.", detail="blank")
    >>> status_for([f])
    'review'
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

FLAG_CODES: tuple[str, ...] = ("low_confidence", "out_of_distribution", "image_quality", "shortcut_cue")
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")
# Short names a reviewer sees for each flag code (tables, box titles).
FLAG_TITLES: dict[str, str] = {"low_confidence": "Low confidence", "out_of_distribution": "Unlike the training images",
                               "image_quality": "Image quality", "shortcut_cue": "Colour shortcut in this model"}

_NEXT_STEPS: dict[str, str] = {
    "low_confidence": (
        "Review the cell yourself: the model could not separate the top classes. "
        "Confirm or correct the suggested class."
    ),
    "out_of_distribution": (
        "Do not rely on the predicted class: this image is unlike the images the model was trained on "
        "(different lab, stain, scanner or cell type). Classify it manually."
    ),
    "image_quality": (
        "Re-capture or re-crop the image (one stained white blood cell, centred, in focus, "
        "correctly exposed) and upload it again, or classify it manually."
    ),
    "shortcut_cue": (
        "Judge the image yourself: this model's suggestions can rest on the colour of the image rather than "
        "on the cells, so no suggestion of it is shown as OK."
    ),
}


@dataclass(frozen=True)
class Flag:
    """One reason to doubt a prediction.

    Attributes:
        code: One of :data:`FLAG_CODES`: ``"low_confidence"``, ``"out_of_distribution"``,
            ``"image_quality"``.
        severity: One of :data:`SEVERITIES`: ``"info"``, ``"warning"``, ``"critical"``.
        message: Plain language for a haematologist, including what to do next.
        detail: Machine-readable sub-reason, e.g. ``"blank"``, ``"blurred"``, ``"not_single_cell"``;
            empty when the code says it all.

    Raises:
        ValueError: If ``code`` or ``severity`` is not one of the allowed values, or ``message`` is empty.
    """

    code: str
    severity: str
    message: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.code not in FLAG_CODES:
            raise ValueError(f"Flag code {self.code!r} is not valid; use one of {FLAG_CODES}.")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Flag severity {self.severity!r} is not valid; use one of {SEVERITIES}.")
        if not isinstance(self.message, str) or not self.message.strip():
            raise ValueError("Flag message must be a non-empty plain-language sentence.")
        if not isinstance(self.detail, str):
            raise ValueError(f"Flag detail must be a string, got {type(self.detail).__name__}.")

    def to_dict(self) -> dict[str, str]:
        """Return the flag as a JSON-serialisable dict with keys code, severity, message, detail."""
        return {"code": self.code, "severity": self.severity, "message": self.message, "detail": self.detail}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Flag:
        """Build a flag from :meth:`to_dict` output (``detail`` optional)."""
        return cls(code=d["code"], severity=d["severity"], message=d["message"], detail=d.get("detail", ""))


def status_for(flags: Iterable[Any] | None) -> str:
    """Overall status of a prediction given its flags.

    Args:
        flags: Iterable of :class:`Flag` (or anything); ``None`` means no flags.

    Returns:
        ``"ok"`` if there are no flags, else ``"review"``.
    """
    return "review" if flags and any(True for _ in flags) else "ok"


@dataclass(frozen=True)
class Verdict:
    """What a reviewer should read first about a result, from its most severe flag.

    Attributes:
        level: ``"ok"`` (no flag), ``"review"`` (doubt about the class), ``"unknown"`` (the image is
            unlike anything the model was trained on) or ``"do_not_use"`` (a critical flag: not a usable
            single-cell image, or similar).
        headline: The words to show in large type instead of the suggested class when level is
            ``unknown`` or ``do_not_use``; a short status line otherwise.
        trust_suggestion: False when the suggested class must not be shown as the answer.
    """

    level: str
    headline: str
    trust_suggestion: bool

    @property
    def label(self) -> str:
        """One or two words for a table cell."""
        return {"do_not_use": "Do not use", "unknown": "Not recognised", "review": "Needs review",
                "ok": "OK"}[self.level]


def verdict(flags: Iterable[Flag] | None) -> Verdict:
    """The most severe reading of a result's flags (critical > out of distribution > other doubts)."""
    flags = list(flags or [])
    critical = [f for f in flags if f.severity == "critical"]
    if critical:
        return Verdict("do_not_use", "Do not use — " + _first_sentence(critical[0].message), False)
    if any(f.code == "out_of_distribution" for f in flags):
        return Verdict("unknown", "Not recognised — classify it yourself", False)
    if flags:
        return Verdict("review", "Needs review — the suggestion is uncertain", True)
    return Verdict("ok", "No flag raised — the suggestion still needs confirmation", True)


def _first_sentence(text: str) -> str:
    head = text.split(". ")[0].rstrip(".")
    return head[0].lower() + head[1:] if head[:1].isupper() and head[1:2].islower() else head


def next_step(code: str) -> str:
    """What the user should do next for a flag code.

    Args:
        code: One of :data:`FLAG_CODES`.

    Returns:
        A plain-language instruction.

    Raises:
        ValueError: If ``code`` is not a known flag code.
    """
    try:
        return _NEXT_STEPS[code]
    except KeyError:
        raise ValueError(f"Unknown flag code {code!r}; use one of {FLAG_CODES}.") from None
