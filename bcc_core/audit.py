"""Audit record of predictions and of the human review decisions made on them (SQLite, stdlib).

Two tables:

* ``predictions`` – one row per classified image (hash, file name, model, class, confidence, status,
  flag codes).
* ``decisions`` – review decisions, **append-only**: triggers refuse UPDATE and DELETE on both tables,
  so a changed mind is a new decision and the full history stays. The latest decision (highest id)
  of a prediction is its current one.

Each call opens its own short-lived connection (Streamlit runs callbacks in threads) and writes are
serialised by a lock; the database uses WAL so readers do not block the writer. Timestamps are UTC
ISO 8601 strings. Nothing happens at import time.

Example:
    >>> log = AuditLog(":memory:")  # doctest: +SKIP
    >>> pid = log.record_prediction("ab" * 32, "c1.jpg", "cnn-v1", "monocyte", 0.55, "review",
    ...                             ["low_confidence"])  # doctest: +SKIP
    >>> log.record_decision(pid, "dr.smith", "correct", "myeloblast", "nucleoli visible")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

DECISIONS = ("confirm", "correct", "reject_image")
PREDICTION_STATUSES = ("ok", "review", "error")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    file_name TEXT NOT NULL,
    model_id TEXT NOT NULL,
    predicted_class TEXT,
    confidence REAL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'review', 'error')),
    flags TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS ix_predictions_status ON predictions(status);
CREATE INDEX IF NOT EXISTS ix_predictions_sha ON predictions(image_sha256);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prediction_id INTEGER NOT NULL REFERENCES predictions(id),
    created_at TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('confirm', 'correct', 'reject_image')),
    final_class TEXT,
    comment TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS ix_decisions_prediction ON decisions(prediction_id, id);
CREATE TRIGGER IF NOT EXISTS decisions_no_update BEFORE UPDATE ON decisions
BEGIN SELECT RAISE(ABORT, 'audit decisions are append-only: record a new decision instead'); END;
CREATE TRIGGER IF NOT EXISTS decisions_no_delete BEFORE DELETE ON decisions
BEGIN SELECT RAISE(ABORT, 'audit decisions are append-only: they cannot be deleted'); END;
CREATE TRIGGER IF NOT EXISTS predictions_no_update BEFORE UPDATE ON predictions
BEGIN SELECT RAISE(ABORT, 'audit predictions are append-only'); END;
CREATE TRIGGER IF NOT EXISTS predictions_no_delete BEFORE DELETE ON predictions
BEGIN SELECT RAISE(ABORT, 'audit predictions are append-only: they cannot be deleted'); END;
CREATE VIEW IF NOT EXISTS current_decisions AS
    SELECT d.* FROM decisions d
    WHERE d.id = (SELECT MAX(d2.id) FROM decisions d2 WHERE d2.prediction_id = d.prediction_id);
"""

_EXPORT_COLUMNS = [
    "prediction_id", "predicted_at", "image_sha256", "file_name", "model_id", "predicted_class",
    "confidence", "status", "flags", "decision_id", "decided_at", "reviewer", "decision", "final_class",
    "comment", "is_current",
]


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _id(value: Any) -> int:
    # Ids often come back from pandas as numpy integers, which sqlite3 cannot bind.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"prediction_id must be an integer id, got {value!r}.")
    return int(value)


def _text(name: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}.")
    value = value.strip()
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty.")
    return value


class AuditLog:
    """Append-only audit log of predictions and review decisions in one SQLite file.

    Args:
        path: Database file (created with its parent folder if missing), or ``":memory:"`` for a
            private in-memory log (kept on one shared connection; for tests).
        classes: Optional list of valid class names; when given, ``predicted_class`` and
            ``final_class`` are checked against it.

    Raises:
        ValueError: If ``classes`` has duplicates.
        sqlite3.Error: If the file cannot be opened as a database.
    """

    def __init__(self, path: str | Path, classes: Sequence[str] | None = None) -> None:
        self._memory = str(path) == ":memory:"
        self.path = str(path) if self._memory else str(Path(path))
        if classes is not None and len(set(classes)) != len(classes):
            raise ValueError(f"classes must be unique, got {list(classes)}.")
        self.classes = tuple(classes) if classes is not None else None
        self._lock = threading.RLock()
        self._shared: sqlite3.Connection | None = None
        if self._memory:
            self._shared = sqlite3.connect(":memory:", check_same_thread=False)
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            if not self._memory:
                con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One connection per call (or the shared in-memory one), committed on success, under the lock."""
        with self._lock:
            con = self._shared or sqlite3.connect(self.path, timeout=30)
            con.row_factory = sqlite3.Row
            try:
                con.execute("PRAGMA foreign_keys=ON")
                yield con
                con.commit()
            except BaseException:
                con.rollback()
                raise
            finally:
                if con is not self._shared:
                    con.close()

    def _check_class(self, name: str, value: str | None) -> None:
        if value is not None and self.classes is not None and value not in self.classes:
            raise ValueError(f"{name} {value!r} is not a known class; use one of {list(self.classes)}.")

    # ------------------------------------------------------------------ writes

    def record_prediction(self, image_sha256: str, file_name: str, model_id: str, predicted_class: str | None,
                          confidence: float | None, status: str, flags: Sequence[Any] = ()) -> int:
        """Store one prediction.

        Args:
            image_sha256: Hex SHA-256 of the image bytes (64 hex characters, case-insensitive).
            file_name: Name of the uploaded file.
            model_id: Id (and version) of the model that made the prediction.
            predicted_class: Predicted class, or ``None`` (e.g. the image failed the quality gate).
            confidence: Probability of the predicted class in [0, 1], or ``None``.
            status: ``"ok"``, ``"review"`` or ``"error"``.
            flags: Flag codes (``Flag`` objects are reduced to their code).

        Returns:
            The new prediction id.

        Raises:
            ValueError: If an argument is out of range or of the wrong type.
        """
        sha = _text("image_sha256", image_sha256).lower()
        if not _SHA256.match(sha):
            raise ValueError(f"image_sha256 must be 64 hex characters, got {image_sha256!r}.")
        file_name = _text("file_name", file_name)
        model_id = _text("model_id", model_id)
        if predicted_class is not None:
            predicted_class = _text("predicted_class", predicted_class)
        self._check_class("predicted_class", predicted_class)
        if confidence is not None:
            try:
                confidence = float(confidence)
            except (TypeError, ValueError):
                raise ValueError(f"confidence must be a number in [0, 1] or None, got {confidence!r}.") from None
            if not (math.isfinite(confidence) and 0.0 <= confidence <= 1.0):
                raise ValueError(f"confidence must be in [0, 1] or None, got {confidence!r}.")
        if status not in PREDICTION_STATUSES:
            raise ValueError(f"status {status!r} is not valid; use one of {PREDICTION_STATUSES}.")
        if isinstance(flags, str):
            raise ValueError("flags must be a list of flag codes, not a single string.")
        codes = [getattr(f, "code", f) for f in flags]
        if not all(isinstance(c, str) and c for c in codes):
            raise ValueError(f"flags must be non-empty flag code strings, got {list(flags)!r}.")
        with self._connect() as con:
            cur = con.execute(
                "INSERT INTO predictions (created_at, image_sha256, file_name, model_id, predicted_class,"
                " confidence, status, flags) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (_utc_now(), sha, file_name, model_id, predicted_class, confidence, status, json.dumps(codes)))
            return int(cur.lastrowid)

    def record_decision(self, prediction_id: int, reviewer: str, decision: str, final_class: str | None = None,
                        comment: str = "") -> int:
        """Append a review decision for a prediction; earlier decisions are kept as history.

        Args:
            prediction_id: Id returned by :meth:`record_prediction`.
            reviewer: Who decided (user name or initials); must not be empty.
            decision: ``"confirm"`` (model class is right), ``"correct"`` (another class is right; needs
                ``final_class``) or ``"reject_image"`` (image unusable; no class).
            final_class: For ``correct``: the right class, different from the predicted one. For
                ``confirm``: ``None`` or the predicted class. For ``reject_image``: ``None``.
            comment: Free text, optional.

        Returns:
            The new decision id.

        Raises:
            ValueError: If the prediction does not exist or the decision is inconsistent.
        """
        if decision not in DECISIONS:
            raise ValueError(f"decision {decision!r} is not valid; use one of {DECISIONS}.")
        reviewer = _text("reviewer", reviewer)
        comment = _text("comment", comment if comment is not None else "", allow_empty=True)
        if final_class is not None:
            final_class = _text("final_class", final_class, allow_empty=True) or None
        prediction_id = _id(prediction_id)
        with self._connect() as con:
            row = con.execute("SELECT predicted_class FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
            if row is None:
                raise ValueError(f"No prediction with id {prediction_id}; record the prediction first.")
            predicted = row["predicted_class"]
            if decision == "correct":
                if final_class is None:
                    raise ValueError("decision 'correct' needs final_class: the class the reviewer assigns.")
                if final_class == predicted:
                    raise ValueError(f"final_class {final_class!r} equals the predicted class; "
                                     "use decision 'confirm' instead.")
                self._check_class("final_class", final_class)
            elif decision == "confirm":
                if predicted is None:
                    raise ValueError("There is no predicted class to confirm; use 'correct' with a "
                                     "final_class or 'reject_image'.")
                if final_class is not None and final_class != predicted:
                    raise ValueError(f"'confirm' keeps the predicted class {predicted!r}; to assign "
                                     f"{final_class!r} use decision 'correct'.")
                final_class = predicted
            else:  # reject_image
                if final_class is not None:
                    raise ValueError("decision 'reject_image' takes no final_class (the image is unusable).")
            cur = con.execute(
                "INSERT INTO decisions (prediction_id, created_at, reviewer, decision, final_class, comment)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (prediction_id, _utc_now(), reviewer, decision, final_class, comment))
            return int(cur.lastrowid)

    # ------------------------------------------------------------------ reads

    def history(self, prediction_id: int) -> list[dict[str, Any]]:
        """All decisions on one prediction, oldest first; the last one is current.

        Returns:
            List of dicts with ``decision_id, prediction_id, created_at, reviewer, decision,
            final_class, comment, is_current``; empty if the prediction was never reviewed.

        Raises:
            ValueError: If the prediction does not exist.
        """
        prediction_id = _id(prediction_id)
        with self._connect() as con:
            if con.execute("SELECT 1 FROM predictions WHERE id = ?", (prediction_id,)).fetchone() is None:
                raise ValueError(f"No prediction with id {prediction_id}.")
            rows = con.execute(
                "SELECT id AS decision_id, prediction_id, created_at, reviewer, decision, final_class, comment"
                " FROM decisions WHERE prediction_id = ? ORDER BY id", (prediction_id,)).fetchall()
        out = [dict(r) for r in rows]
        for i, r in enumerate(out):
            r["is_current"] = i == len(out) - 1
        return out

    def prediction(self, prediction_id: int) -> dict[str, Any]:
        """One stored prediction as a dict (``flags`` as a list of codes).

        Raises:
            ValueError: If the prediction does not exist.
        """
        prediction_id = _id(prediction_id)
        with self._connect() as con:
            row = con.execute("SELECT * FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
        if row is None:
            raise ValueError(f"No prediction with id {prediction_id}.")
        d = dict(row)
        d["flags"] = json.loads(d["flags"])
        return d

    def queue(self, status: str | None = "review", undecided_only: bool = True) -> pd.DataFrame:
        """Predictions waiting for (or having had) review, oldest first.

        Args:
            status: Only predictions with this status (``"ok"``, ``"review"``, ``"error"``), or ``None``
                for all.
            undecided_only: Only predictions without any decision yet.

        Returns:
            DataFrame with columns ``prediction_id, created_at, image_sha256, file_name, model_id,
            predicted_class, confidence, status, flags`` (list of codes) and the current decision:
            ``decision, final_class, reviewer, decided_at`` (``None`` when undecided).

        Raises:
            ValueError: If ``status`` is not valid.
        """
        if status is not None and status not in PREDICTION_STATUSES:
            raise ValueError(f"status {status!r} is not valid; use one of {PREDICTION_STATUSES} or None.")
        sql = ("SELECT p.id AS prediction_id, p.created_at, p.image_sha256, p.file_name, p.model_id,"
               " p.predicted_class, p.confidence, p.status, p.flags, c.decision, c.final_class, c.reviewer,"
               " c.created_at AS decided_at"
               " FROM predictions p LEFT JOIN current_decisions c ON c.prediction_id = p.id WHERE 1=1")
        params: list[Any] = []
        if status is not None:
            sql += " AND p.status = ?"
            params.append(status)
        if undecided_only:
            sql += " AND c.id IS NULL"
        sql += " ORDER BY p.id"
        cols = ["prediction_id", "created_at", "image_sha256", "file_name", "model_id", "predicted_class",
                "confidence", "status", "flags", "decision", "final_class", "reviewer", "decided_at"]
        with self._connect() as con:
            rows = [dict(r) for r in con.execute(sql, params).fetchall()]
        for r in rows:
            r["flags"] = json.loads(r["flags"])
        return pd.DataFrame(rows, columns=cols)

    def export_csv(self) -> str:
        """Full audit trail as CSV text: one line per decision (all history), plus one line for each
        prediction never reviewed (empty decision columns). ``flags`` are ``;``-joined codes,
        ``is_current`` marks each prediction's latest decision.
        """
        sql = ("SELECT p.id AS prediction_id, p.created_at AS predicted_at, p.image_sha256, p.file_name,"
               " p.model_id, p.predicted_class, p.confidence, p.status, p.flags, d.id AS decision_id,"
               " d.created_at AS decided_at, d.reviewer, d.decision, d.final_class, d.comment,"
               " CASE WHEN d.id IS NULL THEN NULL WHEN d.id = (SELECT MAX(id) FROM decisions"
               "  WHERE prediction_id = p.id) THEN 1 ELSE 0 END AS is_current"
               " FROM predictions p LEFT JOIN decisions d ON d.prediction_id = p.id ORDER BY p.id, d.id")
        with self._connect() as con:
            rows = con.execute(sql).fetchall()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(_EXPORT_COLUMNS)
        for r in rows:
            d = dict(r)
            d["flags"] = ";".join(json.loads(d["flags"]))
            d["is_current"] = "" if d["is_current"] is None else bool(d["is_current"])
            w.writerow(["" if d[c] is None else _safe_cell(d[c]) for c in _EXPORT_COLUMNS])
        return buf.getvalue()

    def agreement(self) -> dict[str, Any]:
        """How often reviewers confirmed the model, from each prediction's current decision.

        Rejected images are counted but excluded from the agreement fraction (they say nothing about
        the class).

        Returns:
            ``{"overall": float | None, "n_reviewed": int, "per_class": {predicted_class: {"agreement":
            float | None, "reviewed", "confirmed", "corrected", "rejected": int}}}``; agreement is
            confirmed / (confirmed + corrected), ``None`` when that is 0.
        """
        sql = ("SELECT p.predicted_class AS cls, c.decision AS decision, COUNT(*) AS n"
               " FROM predictions p JOIN current_decisions c ON c.prediction_id = p.id"
               " GROUP BY p.predicted_class, c.decision")
        with self._connect() as con:
            rows = con.execute(sql).fetchall()
        per: dict[str, dict[str, Any]] = {}
        for r in rows:
            cls = r["cls"] if r["cls"] is not None else "(no class)"
            e = per.setdefault(cls, {"agreement": None, "reviewed": 0, "confirmed": 0, "corrected": 0,
                                     "rejected": 0})
            key = {"confirm": "confirmed", "correct": "corrected", "reject_image": "rejected"}[r["decision"]]
            e[key] += int(r["n"])
            e["reviewed"] += int(r["n"])
        for e in per.values():
            judged = e["confirmed"] + e["corrected"]
            e["agreement"] = e["confirmed"] / judged if judged else None
        conf = sum(e["confirmed"] for e in per.values())
        judged = conf + sum(e["corrected"] for e in per.values())
        return {"overall": conf / judged if judged else None,
                "n_reviewed": sum(e["reviewed"] for e in per.values()),
                "per_class": dict(sorted(per.items()))}


    def summary(self) -> dict[str, Any]:
        """Counts for a quality review, one image counted once: predictions are grouped by (image SHA-256,
        model id), so re-screening the same files (another session, a rerun) adds no images, and an
        image's current decision is the latest decision on any of its predictions.

        Returns:
            ``{"predictions", "images", "flagged_images", "undecided_flagged_images", "decided_images",
            "agreement": {"k", "n", "value", "ci95"}}``; agreement is confirmed / (confirmed + corrected)
            over images, with a Wilson 95% interval.
        """
        from .evaluation import rate

        sql = ("WITH latest_pred AS (SELECT image_sha256, model_id, status, ROW_NUMBER() OVER (PARTITION BY"
               "   image_sha256, model_id ORDER BY id DESC) AS rn FROM predictions),"
               " latest_dec AS (SELECT p.image_sha256, p.model_id, d.decision, ROW_NUMBER() OVER (PARTITION BY"
               "   p.image_sha256, p.model_id ORDER BY d.id DESC) AS rn"
               "   FROM decisions d JOIN predictions p ON p.id = d.prediction_id)"
               " SELECT lp.status, ld.decision FROM latest_pred lp LEFT JOIN latest_dec ld ON"
               "  ld.image_sha256 = lp.image_sha256 AND ld.model_id = lp.model_id AND ld.rn = 1 WHERE lp.rn = 1")
        with self._connect() as con:
            n_pred = int(con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])
            rows = [(r[0], r[1]) for r in con.execute(sql).fetchall()]
        confirmed = sum(d == "confirm" for _, d in rows)
        corrected = sum(d == "correct" for _, d in rows)
        return {"predictions": n_pred, "images": len(rows),
                "flagged_images": sum(s == "review" for s, _ in rows),
                "undecided_flagged_images": sum(s == "review" and d is None for s, d in rows),
                "decided_images": sum(d is not None for _, d in rows),
                "agreement": rate(confirmed, confirmed + corrected)}


def _safe_cell(v: Any) -> Any:
    # Reviewer comments and file names are free text opened in spreadsheets: neutralise formulas.
    if isinstance(v, str) and v.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + v
    return v
