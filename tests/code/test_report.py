"""Unit tests for bcc_core.report (CSV, JSON, FHIR bundle, differential)."""

import csv
import io
import json
from datetime import datetime

import numpy as np
import pytest

from bcc_core.flags import Flag
from bcc_core.report import (
    DISCLAIMER,
    OBSERVATION_CODE_TEXT,
    differential,
    result_to_json,
    results_to_csv,
    results_to_fhir_bundle,
    validate_fhir_bundle,
)

CLASSES = ["basophil", "monocyte", "seg_neutrophil"]
CARD = {"model_id": "bcc-cnn", "version": "1.2.0", "classes": CLASSES}


def _rows():
    return [
        {"file": "a.jpg", "status": "ok", "predicted_class": "monocyte", "confidence": 0.91, "flags": [],
         "reason": "", "probabilities": {"basophil": 0.04, "monocyte": 0.91, "seg_neutrophil": 0.05},
         "sha256": "aa" * 32, "ood_score": 0.1, "prediction_set": ["monocyte"]},
        {"file": "b.jpg", "status": "review", "predicted_class": "basophil", "confidence": np.float32(0.48),
         "flags": [Flag("low_confidence", "warning", "Top classes are close.")], "reason": "low confidence",
         "probabilities": {"basophil": 0.48, "monocyte": 0.45, "seg_neutrophil": 0.07},
         "sha256": "bb" * 32, "prediction_set": ["basophil", "monocyte"]},
        {"file": "c.jpg", "status": "review", "predicted_class": "monocyte", "confidence": 0.7,
         "flags": [{"code": "out_of_distribution", "severity": "warning", "message": "Unusual image."},
                   {"code": "image_quality", "severity": "warning", "message": "Blurred.", "detail": "blurred"}],
         "reason": "unusual image", "probabilities": {"basophil": 0.1, "monocyte": 0.7, "seg_neutrophil": 0.2}},
        {"file": "d.jpg", "status": "review", "predicted_class": "seg_neutrophil", "confidence": 0.8,
         "flags": ["low_confidence"], "reason": "", "probabilities": None},
        {"file": "e.jpg", "status": "error", "predicted_class": None, "confidence": None, "flags": [],
         "reason": "cannot decode image: truncated JPEG", "probabilities": None},
    ]


def _parse(text):
    return list(csv.reader(io.StringIO(text)))


# ---------------------------------------------------------------- CSV


def test_csv_header_order_and_p_columns():
    table = _parse(results_to_csv(_rows(), CLASSES))
    header = table[0]
    assert header[:6] == ["file", "status", "predicted_class", "confidence", "flags", "reason"]
    assert header[6:9] == ["p_basophil", "p_monocyte", "p_seg_neutrophil"]
    assert header[9:] == ["sha256", "ood_score", "prediction_set"]
    assert len(table) == 1 + len(_rows())


def test_csv_values():
    table = _parse(results_to_csv(_rows(), CLASSES))
    h = table[0]
    rec = [dict(zip(h, r)) for r in table[1:]]
    assert rec[0]["p_monocyte"] == "0.910000" and rec[0]["flags"] == "" and rec[0]["prediction_set"] == "monocyte"
    assert rec[1]["flags"] == "low_confidence" and rec[1]["confidence"] == "0.480000"
    assert rec[1]["prediction_set"] == "basophil;monocyte" and rec[1]["ood_score"] == ""
    assert rec[2]["flags"] == "out_of_distribution;image_quality"
    assert rec[3]["flags"] == "low_confidence" and rec[3]["p_basophil"] == ""
    assert rec[4]["status"] == "error" and rec[4]["confidence"] == "" and rec[4]["reason"].startswith("cannot")


def test_csv_neutralises_spreadsheet_formulas():
    rows = [{"file": "=HYPERLINK(\"x\")", "status": "ok", "predicted_class": "monocyte", "confidence": 0.9,
             "flags": [], "reason": "", "probabilities": None}]
    assert _parse(results_to_csv(rows, CLASSES))[1][0].startswith("'=")


def test_csv_empty_rows_gives_header_only():
    assert _parse(results_to_csv([], CLASSES)) == [
        ["file", "status", "predicted_class", "confidence", "flags", "reason",
         "p_basophil", "p_monocyte", "p_seg_neutrophil"]]


@pytest.mark.parametrize("bad", [
    {"status": "done"},
    {"predicted_class": "lymphocyte"},
    {"probabilities": {"lymphocyte": 1.0}},
    {"flags": [42]},
])
def test_csv_rejects_invalid_rows(bad):
    row = {**_rows()[0], **bad}
    with pytest.raises(ValueError):
        results_to_csv([row], CLASSES)


# ---------------------------------------------------------------- JSON


def test_result_to_json_has_model_disclaimer_and_utc_timestamp():
    doc = json.loads(result_to_json(_rows()[1], CARD))
    assert doc["model"] == {"id": "bcc-cnn", "version": "1.2.0", "classes": CLASSES}
    assert doc["intended_use"] == DISCLAIMER == "Decision support for a second reader; not a diagnosis."
    ts = datetime.fromisoformat(doc["timestamp"])
    assert ts.utcoffset().total_seconds() == 0
    assert doc["predicted_class"] == "basophil" and abs(doc["confidence"] - 0.48) < 1e-6
    assert doc["flags"][0]["code"] == "low_confidence" and doc["flags"][0]["message"]
    assert doc["sha256"] == "bb" * 32 and doc["prediction_set"] == ["basophil", "monocyte"]


def test_result_to_json_needs_model_id():
    with pytest.raises(ValueError, match="model_id"):
        result_to_json(_rows()[0], {"version": "1"})


# ---------------------------------------------------------------- FHIR


def test_fhir_bundle_one_observation_per_non_error_row():
    rows = _rows()
    bundle = results_to_fhir_bundle(rows, CARD, patient_ref="Patient/123")
    json.dumps(bundle)  # plain, serialisable
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    obs = [e["resource"] for e in bundle["entry"]]
    assert len(obs) == sum(r["status"] != "error" for r in rows) == 4
    assert len({e["fullUrl"] for e in bundle["entry"]}) == 4
    for o, r in zip(obs, [r for r in rows if r["status"] != "error"]):
        assert o["resourceType"] == "Observation" and o["status"] == "preliminary"
        assert o["category"][0]["coding"][0]["code"] == "laboratory"
        assert o["code"]["text"] == OBSERVATION_CODE_TEXT
        assert o["valueCodeableConcept"]["text"] == r["predicted_class"]
        assert o["device"]["display"].startswith("bcc-cnn")
        assert any(n["text"] == DISCLAIMER for n in o["note"])
        assert o["subject"] == {"reference": "Patient/123"}
        comps = o["component"]
        assert comps[0]["valueQuantity"]["value"] == pytest.approx(float(r["confidence"]), abs=1e-6)
        assert len(comps) == 1 + len(r["flags"])
    assert validate_fhir_bundle(bundle) in (True, False)


def test_fhir_bundle_validates_with_fhir_resources():
    pytest.importorskip("fhir.resources")
    bundle = results_to_fhir_bundle(_rows(), CARD)
    assert validate_fhir_bundle(bundle) is True
    # and the validator really checks: R4 components have no valueDecimal
    bundle["entry"][0]["resource"]["component"][0] = {"code": {"text": "c"}, "valueDecimal": 0.5}
    with pytest.raises(ValueError, match="not valid"):
        validate_fhir_bundle(bundle)


def test_fhir_bundle_without_patient_has_no_subject():
    bundle = results_to_fhir_bundle(_rows()[:1], CARD)
    assert "subject" not in bundle["entry"][0]["resource"]


# ---------------------------------------------------------------- differential


def test_differential_counts_only_settled_cells_with_one_denominator():
    """Flagged, undecided cells are 'awaiting review', not findings; every percent is of all images."""
    df = differential(_rows(), CLASSES)
    assert list(df.columns) == ["category", "kind", "count", "percent"]
    cls = df[df.kind == "class"].set_index("category")
    assert list(cls.index) == CLASSES
    assert cls.loc["monocyte", "count"] == 1 and cls.loc["monocyte", "percent"] == pytest.approx(20.0)
    assert cls.loc["basophil", "count"] == 0   # suggested for b.jpg, but flagged and undecided
    summ = df[df.kind == "summary"].set_index("category")
    assert summ.loc["awaiting review", "count"] == 3
    assert summ.loc["errors", "count"] == 1 and summ.loc["errors", "percent"] == pytest.approx(20.0)
    assert df["percent"].sum() == pytest.approx(100.0) and df["count"].sum() == 5


def test_differential_uses_reviewers_decisions():
    decisions = {1: ("confirm", "basophil"), 2: ("correct", "lymphocyte"), 3: ("reject_image", None)}
    df = differential(_rows(), CLASSES, decisions).set_index("category")
    assert df.loc["basophil", "count"] == 1 and df.loc["monocyte", "count"] == 1
    assert df.loc["lymphocyte", "kind"] == "class" and df.loc["lymphocyte", "count"] == 1
    assert df.loc["awaiting review", "count"] == 0 and df.loc["rejected by reviewer", "count"] == 1
    assert df["percent"].sum() == pytest.approx(100.0)


def test_differential_empty_and_all_errors():
    df = differential([], CLASSES)
    assert df["count"].sum() == 0
    df = differential([_rows()[-1]], CLASSES)
    assert df[df.kind == "class"]["count"].sum() == 0
    assert df.set_index("category").loc["errors", "count"] == 1
