"""Unit tests for bcc_core.audit (SQLite audit log in tmp_path)."""

import csv
import io
import sqlite3
import threading
from datetime import datetime

import pytest

from bcc_core.audit import AuditLog
from bcc_core.flags import Flag

SHA = "0123456789abcdef" * 4


@pytest.fixture
def log(tmp_path):
    return AuditLog(tmp_path / "sub" / "audit.sqlite")


def _pred(log, cls="monocyte", status="review", flags=("low_confidence",), conf=0.55, name="c.jpg"):
    return log.record_prediction(SHA, name, "bcc-cnn v1", cls, conf, status, list(flags))


def test_schema_created_in_wal_mode(tmp_path):
    path = tmp_path / "a.sqlite"
    AuditLog(path)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"predictions", "decisions"} <= tables
    con.close()
    AuditLog(path)  # re-opening an existing database is fine


def test_history_is_append_only_and_latest_is_current(log):
    pid = _pred(log)
    d1 = log.record_decision(pid, "dr.a", "confirm")
    d2 = log.record_decision(pid, "dr.b", "correct", "basophil", "granules obscure nucleus")
    d3 = log.record_decision(pid, "dr.a", "reject_image", comment="out of focus")
    h = log.history(pid)
    assert [x["decision_id"] for x in h] == [d1, d2, d3]
    assert [x["decision"] for x in h] == ["confirm", "correct", "reject_image"]
    assert [x["is_current"] for x in h] == [False, False, True]
    assert h[0]["final_class"] == "monocyte"  # confirm stores the model's class
    assert h[1]["final_class"] == "basophil" and h[2]["final_class"] is None
    for x in h:
        assert datetime.fromisoformat(x["created_at"]).utcoffset().total_seconds() == 0


def test_database_refuses_update_and_delete_of_decisions(log):
    pid = _pred(log)
    log.record_decision(pid, "dr.a", "confirm")
    con = sqlite3.connect(log.path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE decisions SET decision = 'correct'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM decisions")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM predictions")
    con.close()
    assert len(log.history(pid)) == 1


def test_queue_filters_status_and_undecided(log):
    p1 = _pred(log, name="1.jpg")
    p2 = _pred(log, name="2.jpg")
    p3 = _pred(log, status="ok", flags=(), name="3.jpg")
    log.record_decision(p1, "dr.a", "confirm")
    q = log.queue()
    assert list(q["prediction_id"]) == [p2]
    assert q.iloc[0]["flags"] == ["low_confidence"] and q.iloc[0]["decision"] is None
    q_all_review = log.queue(undecided_only=False)
    assert list(q_all_review["prediction_id"]) == [p1, p2]
    assert q_all_review.set_index("prediction_id").loc[p1, "decision"] == "confirm"
    assert list(log.queue(status="ok")["prediction_id"]) == [p3]
    assert list(log.queue(status=None)["prediction_id"]) == [p2, p3]
    # ids from the DataFrame (numpy ints) are accepted back
    log.record_decision(q.iloc[0]["prediction_id"], "dr.b", "reject_image")
    assert log.queue().empty
    with pytest.raises(ValueError, match="status"):
        log.queue(status="pending")


@pytest.mark.parametrize("args, match", [
    (("dr.a", "approve", None), "decision"),
    (("dr.a", "correct", None), "final_class"),
    (("dr.a", "correct", "monocyte"), "confirm"),
    (("dr.a", "confirm", "basophil"), "correct"),
    (("dr.a", "reject_image", "basophil"), "final_class"),
    (("  ", "confirm", None), "reviewer"),
])
def test_record_decision_validation(log, args, match):
    pid = _pred(log)
    with pytest.raises(ValueError, match=match):
        log.record_decision(pid, *args)
    assert log.history(pid) == []  # nothing half-written


def test_record_decision_unknown_prediction(log):
    with pytest.raises(ValueError, match="No prediction"):
        log.record_decision(999, "dr.a", "confirm")
    with pytest.raises(ValueError, match="No prediction"):
        log.history(999)


def test_confirm_needs_a_predicted_class(log):
    pid = _pred(log, cls=None, status="review", flags=("image_quality",), conf=None)
    with pytest.raises(ValueError, match="no predicted class"):
        log.record_decision(pid, "dr.a", "confirm")
    log.record_decision(pid, "dr.a", "correct", "basophil")


@pytest.mark.parametrize("kwargs, match", [
    ({"image_sha256": "xyz"}, "64 hex"),
    ({"confidence": 1.5}, "confidence"),
    ({"status": "pending"}, "status"),
    ({"file_name": ""}, "file_name"),
    ({"flags": "low_confidence"}, "list"),
])
def test_record_prediction_validation(log, kwargs, match):
    args = {"image_sha256": SHA, "file_name": "a.jpg", "model_id": "m", "predicted_class": "monocyte",
            "confidence": 0.5, "status": "ok", "flags": [], **kwargs}
    with pytest.raises(ValueError, match=match):
        log.record_prediction(**args)


def test_classes_are_checked_when_given(tmp_path):
    log = AuditLog(tmp_path / "c.sqlite", classes=["monocyte", "basophil"])
    with pytest.raises(ValueError, match="known class"):
        log.record_prediction(SHA, "a.jpg", "m", "lymphocyte", 0.5, "ok", [])
    pid = log.record_prediction(SHA, "a.jpg", "m", "monocyte", 0.5, "ok", [])
    with pytest.raises(ValueError, match="known class"):
        log.record_decision(pid, "dr.a", "correct", "lymph")


def test_flag_objects_are_stored_as_codes(log):
    pid = log.record_prediction(SHA.upper(), "a.jpg", "m", "monocyte", 0.5, "review",
                                [Flag("image_quality", "warning", "Blurred.", "blurred")])
    p = log.prediction(pid)
    assert p["flags"] == ["image_quality"] and p["image_sha256"] == SHA


def test_export_csv_has_full_history(log):
    p1 = _pred(log, name="1.jpg")
    p2 = _pred(log, name="=cmd.jpg")
    log.record_decision(p1, "dr.a", "confirm")
    log.record_decision(p1, "dr.b", "correct", "basophil", "second look")
    rows = list(csv.DictReader(io.StringIO(log.export_csv())))
    assert len(rows) == 3  # two decisions on p1, p2 undecided
    p1_rows = [r for r in rows if r["prediction_id"] == str(p1)]
    assert [r["decision"] for r in p1_rows] == ["confirm", "correct"]
    assert [r["is_current"] for r in p1_rows] == ["False", "True"]
    p2_row = [r for r in rows if r["prediction_id"] == str(p2)][0]
    assert p2_row["decision"] == "" and p2_row["flags"] == "low_confidence"
    assert p2_row["file_name"] == "'=cmd.jpg"


def test_agreement_uses_current_decision_per_class(log):
    a, b, c, d = (_pred(log, cls=k) for k in ["monocyte", "monocyte", "basophil", "basophil"])
    log.record_decision(a, "dr.a", "correct", "basophil")
    log.record_decision(a, "dr.a", "confirm")  # changed mind: current is confirm
    log.record_decision(b, "dr.a", "correct", "basophil")
    log.record_decision(c, "dr.a", "confirm")
    log.record_decision(d, "dr.a", "reject_image")
    ag = log.agreement()
    assert ag["n_reviewed"] == 4
    assert ag["per_class"]["monocyte"]["agreement"] == pytest.approx(0.5)
    assert ag["per_class"]["basophil"]["agreement"] == pytest.approx(1.0)  # rejected image not counted
    assert ag["per_class"]["basophil"]["rejected"] == 1
    assert ag["overall"] == pytest.approx(2 / 3)


def test_agreement_empty(log):
    assert log.agreement() == {"overall": None, "n_reviewed": 0, "per_class": {}}


def test_concurrent_writes_from_threads(log):
    pid = _pred(log)
    errors = []

    def work(i):
        try:
            for _ in range(10):
                log.record_decision(pid, f"dr.{i}", "confirm")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(log.history(pid)) == 40


def test_in_memory_log():
    log = AuditLog(":memory:")
    pid = _pred(log)
    log.record_decision(pid, "dr.a", "confirm")
    assert len(log.history(pid)) == 1


def test_summary_counts_each_image_once_and_gives_agreement_an_interval(tmp_path):
    """The same batch screened twice (another session) adds predictions, not images; an image's current
    decision is the latest on any of its predictions; agreement shows its n and a 95% interval."""
    log = AuditLog(tmp_path / "a.sqlite")
    shas = [f"{i:02x}" * 32 for i in range(4)]
    first = [log.record_prediction(h, f"c{i}.png", "m1", "monocyte", 0.9, "review", ["low_confidence"])
             for i, h in enumerate(shas)]
    second = [log.record_prediction(h, f"c{i}.png", "m1", "monocyte", 0.9, "review", ["low_confidence"])
              for i, h in enumerate(shas)]
    log.record_decision(first[0], "dr", "confirm")
    log.record_decision(second[1], "dr", "correct", "myeloblast")
    log.record_decision(second[2], "dr", "confirm")
    s = log.summary()
    assert s["predictions"] == 8 and s["images"] == 4 and s["flagged_images"] == 4
    assert s["undecided_flagged_images"] == 1 and s["decided_images"] == 3
    assert s["agreement"]["k"] == 2 and s["agreement"]["n"] == 3
    lo, hi = s["agreement"]["ci95"]
    assert lo < 2 / 3 < hi
    # The same image under another model is another image for these counts.
    log.record_prediction(shas[0], "c0.png", "m2", "monocyte", 0.9, "ok", [])
    assert log.summary()["images"] == 5
