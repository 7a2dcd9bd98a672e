"""Exports of classification results: CSV, JSON, a FHIR R4 Bundle and a differential count.

A *result row* is a dict describing one uploaded image::

    {
        "file": "cell_001.jpg",
        "status": "ok" | "review" | "error",
        "predicted_class": "monocyte" | None,
        "confidence": 0.93 | None,             # probability of the predicted class, 0-1
        "flags": [Flag, ...] | [dict, ...] | ["low_confidence", ...],
        "reason": "why the row is flagged or failed ('' if ok)",
        "probabilities": {"monocyte": 0.93, ...} | None,
        # optional extras, exported after the fixed columns:
        "sha256": "...", "ood_score": 0.12, "prediction_set": ["monocyte"],
    }

Every export states that the output is decision support for a second reader, not a diagnosis.
Nothing here imports TensorFlow or Streamlit.
"""

from __future__ import annotations

import csv
import io
import json
import math
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from bcc_core.flags import FLAG_CODES, Flag, next_step

DISCLAIMER = "Decision support for a second reader; not a diagnosis."
OBSERVATION_CODE_TEXT = "Blood cell morphology classification (automated, decision support)"
STATUSES = ("ok", "review", "error")
FIXED_COLUMNS = ("file", "status", "predicted_class", "confidence", "flags", "reason")
_ROW_KEYS = set(FIXED_COLUMNS) | {"probabilities"}
_CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def utc_now_iso() -> str:
    """Current time as an ISO 8601 string in UTC with an explicit offset, e.g. ``2025-01-31T12:00:00.000+00:00``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def flag_dicts(flags: Any) -> list[dict[str, str]]:
    """Normalise the ``flags`` of a row to a list of flag dicts.

    Args:
        flags: ``None``, a list of :class:`~bcc_core.flags.Flag`, of dicts with at least ``code``, or
            of code strings; a single ``";"``-joined string of codes is also accepted.

    Returns:
        List of ``{"code", "severity", "message", "detail"}`` dicts. Bare codes get the generic
        next step as message and an empty severity.

    Raises:
        ValueError: If an entry is of another type or a dict without ``code``.
    """
    if flags is None:
        return []
    if isinstance(flags, str):
        flags = [c for c in flags.split(";") if c.strip()]
    out = []
    for f in flags:
        if isinstance(f, Flag):
            out.append(f.to_dict())
        elif isinstance(f, Mapping):
            if "code" not in f:
                raise ValueError(f"Flag dict {dict(f)!r} has no 'code'; expected keys code, severity, message.")
            out.append({"code": str(f["code"]), "severity": str(f.get("severity", "")),
                        "message": str(f.get("message", "")), "detail": str(f.get("detail", ""))})
        elif isinstance(f, str):
            code = f.strip()
            msg = next_step(code) if code in FLAG_CODES else ""
            out.append({"code": code, "severity": "", "message": msg, "detail": ""})
        else:
            raise ValueError(f"Flag {f!r} has type {type(f).__name__}; expected Flag, dict or code string.")
    return out


def _check_row(row: Mapping[str, Any], classes: list[str] | None = None) -> None:
    if not isinstance(row, Mapping):
        raise ValueError(f"A result row must be a dict, got {type(row).__name__}.")
    if "file" not in row:
        raise ValueError(f"Result row {dict(row)!r} has no 'file' key.")
    if row.get("status") not in STATUSES:
        raise ValueError(f"Row for {row.get('file')!r} has status {row.get('status')!r}; use one of {STATUSES}.")
    if classes is None:
        return
    pred = row.get("predicted_class")
    if pred is not None and pred not in classes:
        raise ValueError(f"Row for {row['file']!r} predicts {pred!r}, which is not one of the classes {classes}.")
    probs = row.get("probabilities") or {}
    unknown = set(probs) - set(classes)
    if unknown:
        raise ValueError(f"Row for {row['file']!r} has probabilities for unknown classes {sorted(unknown)}; "
                         f"classes are {classes}.")


def _plain(v: Any) -> Any:
    """Convert numpy scalars/arrays, sets and NaN to JSON-friendly Python values."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple, set)):
        return [_plain(x) for x in v]
    if isinstance(v, Flag):
        return v.to_dict()
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _cell(v: Any) -> str:
    v = _plain(v)
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.6f}"
    if isinstance(v, list):
        return ";".join(_cell(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    s = str(v)
    # Spreadsheet formula injection: file names and comments are user-controlled.
    return "'" + s if s.startswith(_CSV_FORMULA_START) else s


def _extra_keys(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in _ROW_KEYS and k not in keys)
    return keys


def results_to_csv(rows: list[dict[str, Any]], classes: list[str]) -> str:
    """Export result rows as CSV text.

    Columns, in order: ``file, status, predicted_class, confidence, flags`` (``;``-joined codes),
    ``reason``, then ``p_<class>`` for each class in ``classes`` order, then any extra keys in order of
    first appearance (lists ``;``-joined, dicts as JSON). Missing values are empty cells; floats have 6
    decimals. Text starting with ``= + - @`` is prefixed with ``'`` so spreadsheets do not run it.

    Args:
        rows: Result rows (see module docstring).
        classes: Model classes, defining the ``p_`` columns.

    Returns:
        CSV text with a header line, ``\\n`` line endings.

    Raises:
        ValueError: If a row has an invalid status, an unknown class or malformed flags, or
            ``classes`` has duplicates.
    """
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be unique, got {classes}.")
    for r in rows:
        _check_row(r, classes)
    extras = _extra_keys(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*FIXED_COLUMNS, *(f"p_{c}" for c in classes), *extras])
    for r in rows:
        probs = r.get("probabilities") or {}
        w.writerow([
            _cell(r.get("file")), r["status"], _cell(r.get("predicted_class")), _cell(r.get("confidence")),
            ";".join(f["code"] for f in flag_dicts(r.get("flags"))), _cell(r.get("reason", "")),
            *(_cell(probs.get(c)) for c in classes),
            *(_cell(r.get(k)) for k in extras),
        ])
    return buf.getvalue()


def _model_info(model_card: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(model_card, Mapping):
        raise ValueError(f"model_card must be a dict, got {type(model_card).__name__}.")
    model_id = model_card.get("model_id") or model_card.get("id") or model_card.get("name")
    if not model_id:
        raise ValueError("model_card needs a 'model_id' (or 'id'/'name') to say which model made the result.")
    return {"id": str(model_id), "version": str(model_card.get("version", "")),
            "classes": list(model_card.get("classes", []))}


def result_to_json(row: dict[str, Any], model_card: dict[str, Any]) -> str:
    """Export one result as a self-describing JSON document.

    Args:
        row: One result row (see module docstring).
        model_card: Dict with ``model_id`` (or ``id``/``name``), optional ``version`` and ``classes``.

    Returns:
        JSON text with the row's fields (flags as full dicts), ``model`` (id, version, classes),
        ``intended_use`` (the disclaimer) and ``timestamp`` (UTC ISO 8601).

    Raises:
        ValueError: If the row or model card is invalid.
    """
    model = _model_info(model_card)
    _check_row(row, model["classes"] or None)
    doc: dict[str, Any] = {
        "file": row.get("file"),
        "status": row["status"],
        "predicted_class": row.get("predicted_class"),
        "confidence": row.get("confidence"),
        "probabilities": row.get("probabilities"),
        "flags": flag_dicts(row.get("flags")),
        "reason": row.get("reason", ""),
    }
    doc.update({k: row[k] for k in row if k not in _ROW_KEYS})
    doc.update({"model": model, "intended_use": DISCLAIMER, "timestamp": utc_now_iso()})
    return json.dumps(_plain(doc), indent=2, ensure_ascii=False)


def _observation(row: Mapping[str, Any], model: dict[str, Any], patient_ref: str | None, now: str) -> dict:
    device = model["id"] + (f" v{model['version']}" if model["version"] else "")
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": str(uuid.uuid4()),
        "status": "preliminary",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "laboratory", "display": "Laboratory"}]}],
        "code": {"text": OBSERVATION_CODE_TEXT},
        "issued": now,
        "device": {"display": device},
        "note": [{"text": DISCLAIMER}, {"text": f"Image: {row.get('file')}"}],
    }
    if patient_ref:
        obs["subject"] = {"reference": patient_ref}
    if row.get("predicted_class") is not None:
        obs["valueCodeableConcept"] = {"text": str(row["predicted_class"])}
    else:
        obs["dataAbsentReason"] = {"text": row.get("reason") or "No class was assigned."}
    components = []
    conf = _plain(row.get("confidence"))
    if conf is not None:
        # R4 components have no valueDecimal; a dimensionless UCUM quantity ("1") carries the probability.
        components.append({"code": {"text": "Model confidence (probability of the predicted class)"},
                           "valueQuantity": {"value": round(float(conf), 6), "unit": "probability",
                                             "system": "http://unitsofmeasure.org", "code": "1"}})
    for f in flag_dicts(row.get("flags")):
        label = f["code"] + (f" ({f['severity']}" + (f", {f['detail']}" if f["detail"] else "") + ")"
                             if f["severity"] else "")
        components.append({"code": {"text": "Decision-support flag"},
                           "valueCodeableConcept": {
                               "coding": [{"code": f["code"], "display": label}],
                               "text": f"{label}: {f['message']}" if f["message"] else label}})
    if row.get("status") == "review":
        obs["note"].append({"text": "Flagged for human review: " + (row.get("reason") or "see components.")})
    if components:
        obs["component"] = components
    return obs


def results_to_fhir_bundle(rows: list[dict[str, Any]], model_card: dict[str, Any],
                           patient_ref: str | None = None) -> dict[str, Any]:
    """Export results as a FHIR R4 ``Bundle`` (type ``collection``) of ``Observation`` resources.

    One Observation per row whose status is not ``"error"``: status ``preliminary``, category
    ``laboratory``, code text :data:`OBSERVATION_CODE_TEXT`, ``valueCodeableConcept.text`` = predicted
    class, components for the confidence (dimensionless UCUM quantity) and for each flag, a note with
    :data:`DISCLAIMER`, and ``device.display`` = model id (and version).

    The bundle is validated with the ``fhir.resources`` R4B models (structurally identical to R4 for
    Bundle and Observation) when that package is installed; without it the dict is returned unvalidated.

    Args:
        rows: Result rows (see module docstring).
        model_card: Dict with ``model_id`` (or ``id``/``name``), optional ``version`` and ``classes``.
        patient_ref: Optional FHIR reference for ``subject``, e.g. ``"Patient/123"``.

    Returns:
        The Bundle as a plain, JSON-serialisable dict.

    Raises:
        ValueError: If a row or the model card is invalid, or the bundle fails FHIR validation.
    """
    model = _model_info(model_card)
    for r in rows:
        _check_row(r, model["classes"] or None)
    now = utc_now_iso()
    entries = []
    for r in rows:
        if r["status"] == "error":
            continue
        obs = _observation(r, model, patient_ref, now)
        entries.append({"fullUrl": f"urn:uuid:{obs['id']}", "resource": obs})
    bundle = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "collection",
              "timestamp": now, "entry": entries}
    validate_fhir_bundle(bundle)
    return bundle


def validate_fhir_bundle(bundle: dict[str, Any]) -> bool:
    """Validate a Bundle dict against the ``fhir.resources`` R4B models.

    Returns:
        ``True`` if validated, ``False`` if ``fhir.resources`` is not installed (nothing checked).

    Raises:
        ValueError: If the bundle is not valid FHIR; the message lists the offending fields.
    """
    try:
        from fhir.resources.R4B.bundle import Bundle
    except ImportError:
        return False
    try:
        Bundle.model_validate(bundle)
    except Exception as e:  # pydantic.ValidationError; keep pydantic an optional import
        raise ValueError(f"FHIR Bundle is not valid R4: {e}") from e
    return True


def differential(rows: list[dict[str, Any]], classes: list[str],
                 decisions: dict[int, tuple[str, str | None]] | None = None) -> pd.DataFrame:
    """Working differential of a batch: what the cells are, as far as anyone can say yet.

    A cell counts under a class only when it is settled: shown as ok by the model (no flag), or decided
    by a reviewer (their final class; a cell type the model does not know becomes its own row). A
    flagged cell nobody has decided is "awaiting review", never a finding. Every percentage has one
    denominator, all images of the batch, so the column sums to 100.

    Args:
        rows: Result rows (see module docstring).
        classes: Model classes, in display order.
        decisions: {row index: (decision, final_class)} of the reviewers' current decisions.

    Returns:
        DataFrame with columns ``category``, ``kind`` ("class" | "summary"), ``count``, ``percent`` (of all
        images): one class row per model class (then reviewer-assigned labels), and the summary rows
        "awaiting review", "rejected by reviewer", "errors".

    Raises:
        ValueError: If a row has an invalid status or a class not in ``classes``.
    """
    classes = list(classes)
    decisions = decisions or {}
    for r in rows:
        _check_row(r, classes)
    counts: dict[str, int] = {c: 0 for c in classes}
    waiting = rejected = errors = 0
    for i, r in enumerate(rows):
        if r["status"] == "error":
            errors += 1
        elif i in decisions:
            decision, final = decisions[i]
            if decision == "reject_image":
                rejected += 1
            else:
                label = final if decision == "correct" else r.get("predicted_class")
                counts[label] = counts.get(label, 0) + 1
        elif r["status"] == "ok" and r.get("predicted_class") is not None:
            counts[r["predicted_class"]] += 1
        else:
            waiting += 1
    total = len(rows)

    def pct(n: int) -> float:
        return 100.0 * n / total if total else 0.0

    out = [{"category": c, "kind": "class", "count": n, "percent": pct(n)} for c, n in counts.items()]
    out += [{"category": k, "kind": "summary", "count": n, "percent": pct(n)}
            for k, n in (("awaiting review", waiting), ("rejected by reviewer", rejected), ("errors", errors))]
    df = pd.DataFrame(out, columns=["category", "kind", "count", "percent"])
    df["count"] = df["count"].astype(int)
    df["percent"] = df["percent"].astype(float)
    return df
