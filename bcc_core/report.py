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
                 decisions: dict[int, tuple[str, str | None]] | None = None) -> "pd.DataFrame":
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
    import pandas as pd  # here, not at import time: screening imports this module and never needs pandas

    df = pd.DataFrame(out, columns=["category", "kind", "count", "percent"])
    df["count"] = df["count"].astype(int)
    df["percent"] = df["percent"].astype(float)
    return df


# ---------------------------------------------------------------------------------------------- case reports
# A case (bcc_core.cases) exported as the lab's record: CSV, JSON, a FHIR R4 DiagnosticReport and a PDF.
# Pseudonymised by default: the case is named by its random uid, cells by their position; the sample label,
# file names and reviewers' free-text comments appear only when the caller asks for them. Every export
# names the model (id, version, weights SHA-256).

# LOINC terms of the manual differential panel (24318-8, "/100 leukocytes in Blood", method-less), for the
# classes where one exists and means the same cell type; other classes are reported with text only.
LOINC = "http://loinc.org"
LOINC_PER_100_LEUKOCYTES = {
    "basophil": ("30180-4", "Basophils/100 leukocytes in Blood"),
    "eosinophil": ("26450-7", "Eosinophils/100 leukocytes in Blood"),
    "lymphocyte": ("26478-8", "Lymphocytes/100 leukocytes in Blood"),
    "monocyte": ("26485-3", "Monocytes/100 leukocytes in Blood"),
    "myeloblast": ("26446-5", "Blasts/100 leukocytes in Blood"),
}
# Final labels that are not leukocytes: counted, but not in the leukocyte denominator (erythroblasts are
# reported per 100 leukocytes, as nucleated red cells are in a manual differential).
NOT_LEUKOCYTES = ("erythroblast", "not_a_cell", "artefact")
EXPORT_FORMATS = ("csv", "json", "fhir", "pdf")


def cell_final_class(r: Mapping[str, Any]) -> str | None:
    """What a stored cell counts as: the reviewer's final class, else the model's class when shown as OK;
    None for an unusable image, an error, or a flagged cell nobody has decided yet."""
    if r["status"] == "error" or r.get("decision") == "reject_image":
        return None
    if r.get("decision") in ("confirm", "correct"):
        return r.get("final_class")
    return r.get("predicted_class") if r["status"] == "ok" else None


def case_differential(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The case's differential from its stored rows (bcc_core.cases.case_rows) and current decisions.

    Returns:
        One dict per final class ({"category", "kind": "class", "count", "percent"}: percent of the
        leukocytes counted, or None for non-cells), then "awaiting review", "unusable (reviewer)" and
        "errors" ({"kind": "summary", "percent": of all images}).
    """
    counts: dict[str, int] = {}
    waiting = rejected = errors = 0
    for r in rows:
        if r["status"] == "error":
            errors += 1
            continue
        c = cell_final_class(r)
        if c is not None:
            counts[c] = counts.get(c, 0) + 1
        elif r.get("decision") == "reject_image":
            rejected += 1
        else:
            waiting += 1
    leuk = sum(n for c, n in counts.items() if c not in NOT_LEUKOCYTES)
    out = [{"category": c, "kind": "class", "count": n,
            "percent": (100.0 * n / leuk if leuk else None) if c not in ("not_a_cell", "artefact") else None}
           for c, n in sorted(counts.items())]
    total = len(rows)
    out += [{"category": k, "kind": "summary", "count": n, "percent": 100.0 * n / total if total else 0.0}
            for k, n in (("awaiting review", waiting), ("unusable (reviewer)", rejected), ("errors", errors))]
    return out


def case_document(case: Mapping[str, Any], rows: list[Mapping[str, Any]], decisions: list[Mapping[str, Any]],
                  include_label: bool = False, include_names: bool = False,
                  include_comments: bool = False) -> dict[str, Any]:
    """The one description of a case every export is made from (pseudonymised unless asked otherwise).

    Args:
        case, rows: from bcc_core.cases.case_rows (rows carry their current decision).
        decisions: bcc_core.cases.history (every decision, amendments included).
        include_label: include the sample label (it may be an accession number).
        include_names: include the cells' file names (they often carry patient names).
        include_comments: include reviewers' free-text comments (amendment reasons are always included:
            they are part of the signed record).
    """
    amendments = [d for d in decisions if d["amendment"]]
    doc: dict[str, Any] = {
        "case": {"id": case["uid"], "status": case["status"], "amended": bool(amendments),
                 "created_by": case["created_by"], "created_at": case["created_at"],
                 "signed_by": case.get("signed_by"), "signed_at": case.get("signed_at"),
                 "n_inputs": case["n_inputs"]},
        "model": {"id": case["model_id"], "version": case.get("model_version") or "",
                  "weights_sha256": case["model_sha256"]},
        "differential": case_differential(rows),
        "cells": [],
        "amendments": [],
        "pseudonymised": not (include_label or include_names),
        "intended_use": DISCLAIMER,
        "generated_at": utc_now_iso(),
    }
    if include_label:
        doc["case"]["sample_label"] = case["sample_label"]
    for r in rows:
        cell = {"seq": r["seq"], "image_sha256": r.get("image_sha256"), "status": r["status"],
                "predicted_class": r.get("predicted_class"), "confidence": r.get("confidence"),
                "flags": [f["code"] for f in flag_dicts(r.get("flags"))], "decision": r.get("decision"),
                "final_class": cell_final_class(r), "decided_by": r.get("decided_by"),
                "decided_at": r.get("decided_at"), "amended": bool(r.get("amendment"))}
        if include_names:
            cell["name"] = r["name"]
        if r["status"] == "error":
            cell["reason"] = r.get("reason") if include_names else "unreadable image"
        doc["cells"].append(cell)
    for d in amendments:
        reason, _, comment = str(d["comment"]).removeprefix("AMENDMENT: ").partition(" — ")
        a = {"seq": d["seq"], "by": d["actor"], "at": d["decided_at"], "decision": d["decision"],
             "final_class": d["final_class"], "reason": reason}
        if include_comments and comment:
            a["comment"] = comment
        doc["amendments"].append(a)
    if include_comments:
        doc["comments"] = [{"seq": d["seq"], "by": d["actor"], "at": d["decided_at"], "comment": d["comment"]}
                           for d in decisions if d["comment"] and not d["amendment"]]
    return doc


CASE_CSV_COLUMNS = ("seq", "name", "image_sha256", "status", "predicted_class", "confidence", "flags",
                    "decision", "final_class", "decided_by", "decided_at", "amended")


def case_to_csv(doc: Mapping[str, Any]) -> str:
    """The case's cells as CSV: a commented header names the case, the model and the disclaimer."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    m, c = doc["model"], doc["case"]
    w.writerow([f"# case {c['id']}" + (f" ({_cell(c['sample_label'])})" if "sample_label" in c else "")
                + f"; status {c['status']}; model {m['id']} version {m['version']} weights SHA-256 "
                f"{m['weights_sha256']}; {DISCLAIMER}"])
    cols = [k for k in CASE_CSV_COLUMNS if k != "name" or any("name" in x for x in doc["cells"])]
    w.writerow(cols)
    for x in doc["cells"]:
        w.writerow([_cell(x.get(k)) for k in cols])
    return buf.getvalue()


def case_to_json(doc: Mapping[str, Any]) -> str:
    return json.dumps(_plain(dict(doc)), indent=2, ensure_ascii=False)


def _fhir_status(doc: Mapping[str, Any]) -> str:
    if doc["case"]["status"] != "signed":
        return "preliminary"
    return "amended" if doc["case"]["amended"] else "final"


def case_to_fhir(doc: Mapping[str, Any], patient_ref: str | None = None) -> dict[str, Any]:
    """A FHIR R4 Bundle (collection): the DiagnosticReport of the case, one Observation per differential
    category (LOINC where a term exists, counts as components) and the Device (model id, version, weights
    SHA-256) every Observation names. Validated with fhir.resources.

    Args:
        doc: case_document(...).
        patient_ref: a FHIR reference for `subject` (e.g. "Patient/123"); none unless the user gives one.
    """
    status = _fhir_status(doc)
    m, c = doc["model"], doc["case"]
    now = utc_now_iso()
    device_id = str(uuid.uuid4())
    device = {"resourceType": "Device", "id": device_id,
              "identifier": [{"type": {"text": "model weights SHA-256"}, "value": m["weights_sha256"]}],
              "deviceName": [{"name": m["id"], "type": "model-name"}],
              "version": [{"value": m["version"] or "unversioned"}],
              "note": [{"text": DISCLAIMER}]}
    entries = [{"fullUrl": f"urn:uuid:{device_id}", "resource": device}]
    hm = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "HM",
                      "display": "Hematology"}]}
    lab = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                       "code": "laboratory", "display": "Laboratory"}]}
    refs = []
    for d in doc["differential"]:
        oid = str(uuid.uuid4())
        code: dict[str, Any] = {"text": f"{d['category']} (digital morphology, reviewed)"}
        if d["kind"] == "class" and d["category"] in LOINC_PER_100_LEUKOCYTES:
            lc, display = LOINC_PER_100_LEUKOCYTES[d["category"]]
            code["coding"] = [{"system": LOINC, "code": lc, "display": display}]
        obs: dict[str, Any] = {"resourceType": "Observation", "id": oid, "status": status, "category": [lab],
                               "code": code, "issued": now, "device": {"reference": f"urn:uuid:{device_id}"},
                               "component": [{"code": {"text": "cells counted"}, "valueInteger": int(d["count"])}]}
        if patient_ref:
            obs["subject"] = {"reference": patient_ref}
        if d["percent"] is not None:
            obs["valueQuantity"] = {"value": round(float(d["percent"]), 2), "unit": "%",
                                    "system": "http://unitsofmeasure.org", "code": "%"}
        else:
            obs["dataAbsentReason"] = {"text": "not a leukocyte: counted only"}
        obs["note"] = [{"text": ("percent of the leukocytes counted" if d["kind"] == "class" else
                                 "percent of all images of the case") + ". " + DISCLAIMER}]
        entries.append({"fullUrl": f"urn:uuid:{oid}", "resource": obs})
        refs.append({"reference": f"urn:uuid:{oid}"})
    rid = str(uuid.uuid4())
    conclusion = (f"Digital morphology of {c['n_inputs']} cell image(s), model {m['id']} {m['version']}. "
                  + (f"Signed by {c['signed_by']} at {c['signed_at']}." if c["status"] == "signed" else
                     f"NOT SIGNED (status {c['status']}): preliminary.")
                  + (f" Amended {len(doc['amendments'])} time(s): "
                     + "; ".join(f"cell #{a['seq']} by {a['by']}: {a['reason']}" for a in doc["amendments"])
                     if doc["amendments"] else "") + f" {DISCLAIMER}")
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "id": rid, "status": status, "category": [hm],
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{c['id']}"}],
        "code": {"text": "Blood cell morphology, digital pre-classification with human review"},
        "issued": now, "result": refs, "conclusion": conclusion}
    if c["status"] == "signed":
        report["effectiveDateTime"] = c["signed_at"]
        report["resultsInterpreter"] = [{"display": c["signed_by"]}]
    if patient_ref:
        report["subject"] = {"reference": patient_ref}
    if "sample_label" in c:
        report["specimen"] = [{"display": c["sample_label"]}]
    entries.insert(0, {"fullUrl": f"urn:uuid:{rid}", "resource": report})
    bundle = {"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "collection", "timestamp": now,
              "entry": entries}
    validate_fhir_bundle(bundle)
    return bundle


def _latin1(text: Any) -> str:
    """PDF core fonts are Latin-1: other characters become '?' (said in the report's footer)."""
    return str("" if text is None else text).encode("latin-1", "replace").decode("latin-1")


def case_to_pdf(doc: Mapping[str, Any], thumbnails: Mapping[int, bytes] | None = None, compress: bool = True) -> bytes:
    """A printable report of the case (fpdf2): status, model, differential, flagged cells with their
    decisions (and thumbnails when given: {seq: PNG bytes}), amendments, the disclaimer on every page.
    `compress=False` leaves the page text readable in the file (tests search it)."""
    from fpdf import FPDF

    c, m = doc["case"], doc["model"]
    status = {"preliminary": "PRELIMINARY - NOT SIGNED", "final": "SIGNED",
              "amended": "SIGNED, AMENDED"}[_fhir_status(doc)]

    class Report(FPDF):
        def footer(self):
            self.set_y(-12)
            self.set_font("Helvetica", size=7)
            self.cell(0, 5, _latin1(f"{DISCLAIMER}  Case {c['id']}  -  page {self.page_no()}/{{nb}}"), align="C")

    pdf = Report(format="A4")
    pdf.set_compression(compress)
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 15)
    pdf.cell(0, 9, "Blood cell morphology - digital pre-classification", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "B", 11)
    pdf.cell(0, 7, status, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=9)
    lines = [("Case", c["id"]), ("Sample label", c.get("sample_label", "(withheld: pseudonymised export)")),
             ("Screened by / at", f"{c['created_by']} / {c['created_at']}"),
             ("Signed by / at", f"{c['signed_by']} / {c['signed_at']}" if c.get("signed_by") else "not signed"),
             ("Images", c["n_inputs"]), ("Model", f"{m['id']}  version {m['version'] or 'n/a'}"),
             ("Weights SHA-256", m["weights_sha256"]), ("Generated", doc["generated_at"])]
    for k, v in lines:
        pdf.set_font("Helvetica", "B", 9)
        pdf.cell(38, 5, _latin1(k))
        pdf.set_font("Helvetica", size=9)
        pdf.multi_cell(0, 5, _latin1(v), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    pdf.set_font("Helvetica", "B", 11)
    pdf.cell(0, 7, "Differential", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=9)
    with pdf.table(col_widths=(60, 25, 45), width=130, align="LEFT") as t:
        t.row(["category", "cells", "percent"])
        for d in doc["differential"]:
            pct = "" if d["percent"] is None else f"{d['percent']:.1f}%" + (" of leukocytes" if d["kind"] == "class"
                                                                          else " of images")
            t.row([_latin1(d["category"]), str(d["count"]), pct])
    pdf.ln(3)
    pdf.set_font("Helvetica", "B", 11)
    pdf.cell(0, 7, "Flagged and reviewed cells", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=8)
    shown = [x for x in doc["cells"] if x["status"] == "review" or x["decision"]]
    names = any("name" in x for x in shown)
    thumbs = thumbnails or {}
    with pdf.table(col_widths=(12, 14, 34, 26, 40, 34, 30) if not names else (10, 12, 26, 30, 22, 32, 28, 30),
                   line_height=4.5) as t:
        t.row(["#", "cell", *(["file"] if names else []), "suggested", "confidence / flags", "decision", "by"])
        for x in shown:
            row = t.row()
            row.cell(str(x["seq"]))
            png = thumbs.get(x["seq"])
            if png:
                row.cell(img=io.BytesIO(png), img_fill_width=True)
            else:
                row.cell("")
            if names:
                row.cell(_latin1(x.get("name", "")))
            conf = "" if x["confidence"] is None else f"{x['confidence']:.0%}"
            row.cell(_latin1(x["predicted_class"] or ""))
            row.cell(_latin1(f"{conf} {', '.join(x['flags'])}".strip()))
            dec = {"confirm": "confirmed", "correct": f"-> {x['final_class']}", "reject_image": "unusable",
                   None: "AWAITING REVIEW"}[x["decision"]] + (" (amended)" if x["amended"] else "")
            row.cell(_latin1(dec))
            row.cell(_latin1(f"{x['decided_by'] or ''}"))
    if doc["amendments"]:
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 11)
        pdf.cell(0, 7, "Amendments after sign-off (the original decisions are kept in the record)",
                 new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", size=8)
        for a in doc["amendments"]:
            pdf.multi_cell(0, 4.5, _latin1(f"Cell #{a['seq']}: {a['decision']} {a['final_class'] or ''} by {a['by']} "
                                           f"at {a['at']}. Reason: {a['reason']}"), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    pdf.set_font("Helvetica", "I", 8)
    pdf.multi_cell(0, 4, _latin1(f"{DISCLAIMER} A cell counts under a class only when shown as OK by the model "
                                 "or decided by a reviewer; flagged cells never count as findings. Percentages of "
                                 "classes are of the leukocytes counted. Characters outside Latin-1 are printed "
                                 "as '?'; the JSON and FHIR exports keep them."), new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
