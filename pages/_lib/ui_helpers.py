"""Small pure helpers for the app's pages (no Streamlit): file look-ups, data URIs, table shaping.

Everything here returns plain data or a short human-readable note, so that a missing or partial file
beside a model becomes a message on the page instead of an exception.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

GRADCAM_METHODS: dict[str, str] = {"Grad-CAM": "gradcam", "Grad-CAM++": "gradcam++", "Score-CAM": "scorecam"}
"""Label shown in the app -> method name accepted by ``bcc_core.explain.explain``."""


def read_json(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """Read a JSON object from a file.

    Returns:
        ``(data, None)`` on success, ``(None, note)`` when the file is missing or not valid JSON.
    """
    p = Path(path)
    if not p.is_file():
        return None, f"`{p.name}` is missing in `{p.parent}`."
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return None, f"`{p}` could not be read ({e})."
    if not isinstance(d, dict):
        return None, f"`{p}` does not contain a JSON object."
    return d, None


def png_data_uri(img: np.ndarray | None, max_side: int = 64) -> str | None:
    """Encode a small RGB image as a ``data:image/png;base64,...`` URI (for table image columns).

    Args:
        img: ``(H, W, 3)`` uint8 RGB, or None.
        max_side: Larger images are shrunk so the longer side is at most this many pixels.

    Returns:
        The data URI, or None when ``img`` is None or not an RGB array.
    """
    if img is None:
        return None
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        return None
    from PIL import Image

    im = Image.fromarray(arr.astype(np.uint8), mode="RGB")
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side))
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def flag_codes(flags: Iterable[Any] | None) -> str:
    """Comma-separated flag codes (``"low_confidence, image_quality"``), empty for no flags."""
    out = []
    for f in flags or []:
        code = getattr(f, "code", None) or (f.get("code") if isinstance(f, Mapping) else str(f))
        detail = getattr(f, "detail", None) or (f.get("detail") if isinstance(f, Mapping) else "")
        out.append(f"{code} ({detail})" if detail else str(code))
    return ", ".join(out)


def results_frame(rows: Sequence[Mapping[str, Any]], thumbnails: bool = True,
                  thumbnail_uris: Sequence[str | None] | None = None, start: int = 0):
    """Screening rows -> the DataFrame shown in the results table (one row per input, input order kept).

    Args:
        rows: Screening rows (``bcc_core.screening.screen``).
        thumbnails: Include a ``thumbnail`` column (PNG data URIs).
        thumbnail_uris: Data URIs already computed for ``rows`` (same order), so a table that is
            redrawn while a batch runs does not re-encode every image each time.
        start: Position of ``rows[0]`` in the whole batch (for the ``#`` column).

    Returns:
        Columns ``#`` (position in the batch), ``thumbnail`` (when requested), file, status, verdict (the
        most severe flag in words, as the detail view says it), predicted_class, confidence (0..1, missing
        for errors), why (flag titles, or an error's reason), flags (codes), reason (full messages).
    """
    import pandas as pd

    from bcc_core.flags import FLAG_TITLES, Flag, verdict

    recs = []
    for i, r in enumerate(rows):
        rec = {"#": start + i}
        if thumbnails:
            rec["thumbnail"] = thumbnail_uris[i] if thumbnail_uris is not None else png_data_uri(r.get("thumbnail"))
        conf = r.get("confidence")
        flags = [f for f in (r.get("flags") or []) if isinstance(f, Flag)]
        rec.update({
            "file": str(r.get("file", "")),
            "status": r.get("status", ""),
            "verdict": "Error (unreadable)" if r.get("status") == "error" else verdict(flags).label,
            "predicted_class": r.get("predicted_class") or "",
            "confidence": float(conf) if conf is not None else None,
            "why": (r.get("reason") or "") if r.get("status") == "error" else
                   "; ".join(dict.fromkeys(FLAG_TITLES.get(f.code, f.code) for f in flags)),
            "flags": flag_codes(r.get("flags")),
            "reason": r.get("reason") or "",
        })
        recs.append(rec)
    cols = ["#"] + (["thumbnail"] if thumbnails else []) + ["file", "status", "verdict", "predicted_class",
                                                               "confidence", "why", "flags", "reason"]
    return pd.DataFrame.from_records(recs, columns=cols)


def summary_counts(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> dict:
    """Counts for the screening summary.

    Returns:
        ``{"total", "ok", "review", "error", "flagged", "per_class": {class: n}}`` where per_class
        counts predicted classes among readable images (status ok or review).
    """
    st = {"ok": 0, "review": 0, "error": 0}
    per = {c: 0 for c in classes}
    for r in rows:
        s = r.get("status", "error")
        st[s] = st.get(s, 0) + 1
        c = r.get("predicted_class")
        if s != "error" and c:
            per[c] = per.get(c, 0) + 1
    return {"total": len(rows), **st, "flagged": st.get("review", 0), "per_class": per}


def fmt_pct(v: Any, digits: int = 1) -> str:
    """``0.934 -> "93.4%"``; None / non-numbers -> ``"n/a"``."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
        return f"{v * 100:.{digits}f}%"
    return "n/a"


def fmt_prob(v: Any) -> str:
    """A probability for display, never rounded to a certainty the model cannot have.

    ``0.934 -> "93.4%"``, ``0.99996 -> "> 99.9%"``, ``0.00001 -> "< 0.1%"``, exactly 0 -> ``"0%"``;
    None / non-numbers -> ``"n/a"``.
    """
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)):
        return "n/a"
    if v >= 0.9995:
        return "> 99.9%"
    if v == 0:
        return "0%"
    if v < 0.0005:
        return "< 0.1%"
    return f"{v * 100:.1f}%"


def fmt_num(v: Any, digits: int = 3) -> str:
    """Number with ``digits`` decimals; None / non-numbers -> ``"n/a"``."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
        return f"{v:.{digits}f}"
    return "n/a"
