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
    # Validated (True) when fhir.resources is installed, as requirements.txt has it; False only without it.
    import importlib.util

    assert validate_fhir_bundle(bundle) is (importlib.util.find_spec("fhir.resources") is not None)


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


# ---------------------------------------------------------------------------------------------- case exports

def _signed_case(tmp_path):
    """A signed, amended case of 5 cells kept in a throw-away SQLite store: (engine, case id)."""
    from bcc_core import cases, store, users

    eng = store.open_store(str(tmp_path / "bcc.sqlite"))
    users.add_user(eng, "rita", "correct horse battery", "reviewer")
    users.add_user(eng, "sam", "correct horse battery", "signer")
    rita, sam = users.User("rita", "reviewer"), users.User("sam", "signer")
    cid = cases.create_case(eng, rita, "MRN-778899 DOE JOHN", "pbs5-mobilenetv2", "ab" * 32, 5, "2026-11-30T10:00")
    flag = Flag("low_confidence", "warning", "Unsure.")
    thumb = np.full((8, 8, 3), 120, np.uint8)
    specs = [("ok", "monocyte", []), ("review", "myeloblast", [flag]), ("review", "monocyte", [flag]),
             ("ok", "basophil", []), ("error", None, [])]
    ids = []
    for i, (status, cls, flags) in enumerate(specs):
        ids.append(cases.add_result(eng, rita, cid, i, {
            "file": f"/srv/patients/DOE_JOHN/cell{i}.png", "status": status, "predicted_class": cls,
            "confidence": None if cls is None else 0.7, "flags": flags, "reason": "broken file" if cls is None else "",
            "probabilities": None if cls is None else {cls: 0.7}, "sha256": f"{i:02x}" * 32,
            "thumbnail": thumb if cls else None}))
    cases.finish(eng, rita, cid)
    cases.decide(eng, rita, ids[1], "correct", "lymphocyte", comment="atypical lymph, patient DOE")
    cases.decide(eng, rita, ids[2], "reject_image")
    cases.sign(eng, sam, cid)
    cases.decide(eng, sam, ids[1], "confirm", reason="second look: a myeloblast after all")
    return eng, cid


def test_case_exports_are_pseudonymised_and_name_the_model(tmp_path):
    from bcc_core import cases
    from bcc_core.report import case_document, case_to_csv, case_to_fhir, case_to_json, case_to_pdf

    eng, cid = _signed_case(tmp_path)
    case, rows = cases.case_rows(eng, cid)
    doc = case_document(case, rows, cases.history(eng, cid))
    files = {"csv": case_to_csv(doc), "json": case_to_json(doc), "fhir": json.dumps(case_to_fhir(doc)),
             "pdf": case_to_pdf(doc, compress=False).decode("latin-1")}
    for fmt, text in files.items():
        # No file name, server path, sample label or comment in any pseudonymised export ...
        for secret in ("DOE", "/srv", "cell1.png", "MRN-778899", "patient"):
            assert secret not in text, (fmt, secret)
        # ... and every export names the model: id, version, weights SHA-256.
        assert "pbs5-mobilenetv2" in text and "ab" * 32 in text and "2026-11-30T10:00" in text, fmt
    assert files["pdf"].startswith("%PDF") and case_to_pdf(doc)[:4] == b"%PDF"
    # The amendment's reason is part of the signed record; the final class follows the amendment.
    assert doc["amendments"] == [{"seq": 1, "by": "sam", "at": doc["amendments"][0]["at"], "decision": "confirm",
                                  "final_class": "myeloblast", "reason": "second look: a myeloblast after all"}]
    diff = {d["category"]: d for d in doc["differential"]}
    assert diff["myeloblast"]["count"] == 1 and diff["monocyte"]["count"] == 1 and diff["basophil"]["count"] == 1
    assert diff["myeloblast"]["percent"] == pytest.approx(100 / 3)       # of the three leukocytes counted
    assert diff["unusable (reviewer)"]["count"] == 1 and diff["errors"]["count"] == 1
    assert diff["awaiting review"]["count"] == 0


def test_case_fhir_report_validates_with_loinc_codings_and_its_status(tmp_path):
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    from bcc_core import cases
    from bcc_core.report import LOINC, case_document, case_to_fhir

    eng, cid = _signed_case(tmp_path)
    case, rows = cases.case_rows(eng, cid)
    doc = case_document(case, rows, cases.history(eng, cid), include_label=True, include_names=True,
                        include_comments=True)
    bundle = case_to_fhir(doc, patient_ref="Patient/123")
    Bundle.model_validate(bundle)
    report = bundle["entry"][0]["resource"]
    DiagnosticReport.model_validate(report)
    assert report["status"] == "amended" and report["subject"] == {"reference": "Patient/123"}
    assert report["specimen"] == [{"display": "MRN-778899 DOE JOHN"}]       # only because it was asked for
    assert len(report["result"]) == len(doc["differential"])
    obs = {e["resource"]["code"]["text"].split(" (")[0]: e["resource"] for e in bundle["entry"]
           if e["resource"]["resourceType"] == "Observation"}
    assert obs["monocyte"]["code"]["coding"] == [{"system": LOINC, "code": "26485-3",
                                                 "display": "Monocytes/100 leukocytes in Blood"}]
    assert "coding" not in obs["awaiting review"]["code"]
    device = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Device")
    assert device["identifier"][0]["value"] == "ab" * 32 and device["version"][0]["value"] == "2026-11-30T10:00"
    assert all(c.get("system") for e in bundle["entry"] for c in
               (e["resource"].get("code") or {}).get("coding", []))          # every coding carries its system
    assert [c["name"] for c in doc["cells"]][:2] == ["cell0.png", "cell1.png"]
    assert doc["comments"][0]["comment"] == "atypical lymph, patient DOE"


def test_an_unsigned_case_exports_as_preliminary(tmp_path):
    from bcc_core import cases, store, users
    from bcc_core.report import case_document, case_to_fhir

    eng = store.open_store(str(tmp_path / "bcc.sqlite"))
    rita = users.User("rita", "reviewer")
    cid = cases.create_case(eng, rita, "S1", "m", "cd" * 32, 1)
    cases.add_result(eng, rita, cid, 0, {"file": "a.png", "status": "review", "predicted_class": "monocyte",
                                         "confidence": 0.5, "flags": [], "reason": "", "sha256": "00" * 32})
    case, rows = cases.case_rows(eng, cid)
    doc = case_document(case, rows, [])
    bundle = case_to_fhir(doc)
    assert bundle["entry"][0]["resource"]["status"] == "preliminary"
    assert "NOT SIGNED" in bundle["entry"][0]["resource"]["conclusion"]
    assert {d["category"]: d["count"] for d in doc["differential"]}["awaiting review"] == 1
