"""Cases, users and the tamper-evident trail on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3

import pytest
import sqlalchemy as sa

from db_fixtures import postgres_url  # noqa: F401  (pytest fixture)

from bcc_core import cases, store, trail, users
from bcc_core.flags import Flag

PASSWORD = "correct horse battery"


def _row(i: int, status: str = "review", cls: str = "monocyte") -> dict:
    flags = [Flag("low_confidence", "warning", "Unsure.")] if status == "review" else []
    return {"file": f"/srv/patients/DOE_JOHN/slide7/cell{i}.png", "status": status, "predicted_class": cls,
            "confidence": 0.61 + i / 100, "flags": flags, "reason": "Unsure." if flags else "",
            "probabilities": {"monocyte": 0.61 + i / 100, "myeloblast": 0.39 - i / 100}, "sha256": f"{i:02x}" * 32}


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    url = str(tmp_path / "bcc.sqlite") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    eng = store.open_store(url)
    if request.param == "postgresql":  # one database for the session: start each test empty
        with eng.begin() as con:
            for t in ("trail", "decisions", "results", "cases", "users"):
                con.execute(sa.text(f"DELETE FROM {t}"))
            con.execute(sa.update(store.trail_head).values(last_id=0, last_hash=store.GENESIS, writes=0))
    yield eng
    eng.dispose()


def _people(engine):
    users.add_user(engine, "rita", PASSWORD, "reviewer")
    users.add_user(engine, "sam", PASSWORD, "signer")
    users.add_user(engine, "vic", PASSWORD, "viewer")
    return users.login(engine, "rita", PASSWORD), users.login(engine, "sam", PASSWORD), \
        users.login(engine, "vic", PASSWORD)


def _case(engine, user, n=4):
    cid = cases.create_case(engine, user, "SLIDE-0042", "pbs5-mobilenetv2", "ab" * 32, n)
    ids = [cases.add_result(engine, user, cid, i, _row(i, "review" if i % 2 == 0 else "ok")) for i in range(n)]
    return cid, ids


def test_a_case_from_screening_to_sign_off_and_amendment(engine):
    rita, sam, vic = _people(engine)
    cid, ids = _case(engine, rita)
    assert cases.finish(engine, rita, cid) == "complete"
    case, rows = cases.case_rows(engine, cid)
    # Names are relative to the case: no server path, no patient folder.
    assert [r["name"] for r in rows] == [f"cell{i}.png" for i in range(4)]
    with pytest.raises(users.AuthError):
        cases.decide(engine, vic, ids[0], "confirm")                     # a viewer may not decide
    cases.decide(engine, rita, ids[0], "confirm")
    with pytest.raises(cases.CaseError, match="1 flagged cell"):
        cases.sign(engine, sam, cid)                                     # #2 is still undecided
    cases.decide(engine, rita, ids[2], "correct", "lymphocyte", "small round cell")
    with pytest.raises(users.AuthError):
        cases.sign(engine, rita, cid)                                    # a reviewer may not sign
    cases.sign(engine, sam, cid)
    with pytest.raises(users.AuthError):
        cases.decide(engine, rita, ids[2], "confirm")                    # signed: read-only for reviewers
    with pytest.raises(cases.CaseError, match="needs a reason"):
        cases.decide(engine, sam, ids[2], "confirm")
    cases.decide(engine, sam, ids[2], "correct", "eosinophil", reason="granules were missed")
    _, rows = cases.case_rows(engine, cid)
    assert rows[2]["final_class"] == "eosinophil" and rows[2]["amendment"] and rows[0]["decision"] == "confirm"
    v = trail.verify(engine)
    assert v["ok"], v["problems"]
    with engine.connect() as con:
        actions = [r.action for r in con.execute(sa.select(store.trail.c.action).order_by(store.trail.c.id))]
    assert actions.count("login") == 3 and "case.sign" in actions and actions[-1] == "decision.amend"


def test_login_refuses_wrong_password_and_disabled_users(engine):
    _people(engine)
    with pytest.raises(users.AuthError):
        users.login(engine, "rita", "wrong password!")
    users.set_active(engine, "rita", False, actor="admin")
    with pytest.raises(users.AuthError):
        users.login(engine, "rita", PASSWORD)
    with pytest.raises(ValueError):
        users.add_user(engine, "rita", PASSWORD, "reviewer")             # duplicate
    assert trail.verify(engine)["ok"]


def test_an_incomplete_case_keeps_its_rows_and_resumes(engine):
    rita, _, _ = _people(engine)
    cid = cases.create_case(engine, rita, "SLIDE-7", "m", "cd" * 32, 5)
    for i in range(3):                                                   # the run was killed after 3 rows
        cases.add_result(engine, rita, cid, i, _row(i))
    assert cases.finish(engine, rita, cid) == "incomplete"
    assert cases.screened_seqs(engine, cid) == {0, 1, 2}
    for i in (3, 4):
        cases.add_result(engine, rita, cid, i, _row(i))
    assert cases.finish(engine, rita, cid) == "complete"
    with pytest.raises(cases.CaseError, match="complete"):
        cases.add_result(engine, rita, cid, 4, _row(4))                 # a complete case takes no more rows
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as con:    # one row per input position
        con.execute(sa.insert(store.results).values(case_id=cid, seq=1, name="x", status="ok", flags="[]",
                                                    reason="", created_at="t"))


# ---------------------------------------------------------------- tampering (SQLite, plain SQL)

@pytest.fixture
def sqlite_case(tmp_path):
    path = tmp_path / "bcc.sqlite"
    eng = store.open_store(str(path))
    rita, sam, _ = _people(eng)
    cid, ids = _case(eng, rita)
    cases.finish(eng, rita, cid)
    cases.decide(eng, rita, ids[0], "confirm")
    cases.decide(eng, rita, ids[2], "correct", "lymphocyte")
    cases.sign(eng, sam, cid)
    assert trail.verify(eng)["ok"]
    eng.dispose()
    return path


def _tamper(path, sql):
    con = sqlite3.connect(path)
    con.execute(sql)
    con.commit()
    con.close()
    return trail.verify(store.open_store(str(path)))


@pytest.mark.parametrize("sql, named", [
    ("UPDATE results SET predicted_class = 'myeloblast' WHERE id = 2", {"entity": "result", "id": 2}),
    ("UPDATE decisions SET final_class = 'monocyte' WHERE id = 2", {"entity": "decision", "id": 2}),
    ("UPDATE cases SET signed_by = 'mallory'", {"entity": "case", "id": 1}),
    ("UPDATE users SET role = 'admin' WHERE username = 'vic'", {"entity": "user", "id": 3}),
    ("DELETE FROM decisions WHERE id = 1", {"entity": "decision", "id": 1}),
    ("INSERT INTO decisions (case_id, result_id, actor, decided_at, decision, final_class, comment, amendment) "
     "VALUES (1, 2, 'mallory', 't', 'confirm', 'monocyte', '', 0)", {"entity": "decision", "id": 3}),
])
def test_verify_names_a_row_changed_behind_the_apps_back(sqlite_case, sql, named):
    v = _tamper(sqlite_case, sql)
    assert not v["ok"]
    assert any(p.get("entity") == named["entity"] and p.get("id") == named["id"] for p in v["problems"]), v


@pytest.mark.parametrize("sql, entry", [
    ("UPDATE trail SET actor = 'mallory' WHERE id = 5", 5),
    ("DELETE FROM trail WHERE id = 7", 7),
    ("UPDATE trail SET after = replace(after, 'lymphocyte', 'monocyte') WHERE action = 'decision.add'", None),
])
def test_verify_names_the_first_broken_trail_entry(sqlite_case, sql, entry):
    v = _tamper(sqlite_case, sql)
    assert not v["ok"]
    if entry is not None:
        assert v["first_broken"] == entry
    else:
        assert v["first_broken"] is not None


def test_removing_entries_from_the_end_is_detected(sqlite_case):
    v = _tamper(sqlite_case, "DELETE FROM trail WHERE id = (SELECT MAX(id) FROM trail)")
    assert not v["ok"]


# ---------------------------------------------------------------- two processes at once

def _review_many(url: str, label: str, n: int) -> None:
    eng = store.open_store(url)
    user = users.login(eng, "sam", PASSWORD)
    cid = cases.create_case(eng, user, label, "m", "ef" * 32, n)
    for i in range(n):
        rid = cases.add_result(eng, user, cid, i, _row(i))
        cases.decide(eng, user, rid, "confirm")
    cases.finish(eng, user, cid)
    eng.dispose()


def test_two_processes_reviewing_different_cases_lose_nothing(engine):
    _people(engine)
    url = engine.url.render_as_string(hide_password=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_review_many, args=(url, f"CASE-{k}", 15)) for k in range(2)]
    from bcc_core.screening import neutral_main

    with neutral_main():  # after an in-process AppTest, __main__ is the app script: spawn must not re-run it
        for p in procs:
            p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    listed = cases.list_cases(engine)
    assert sorted(c["sample_label"] for c in listed) == ["CASE-0", "CASE-1"]
    for c in listed:
        _, rows = cases.case_rows(engine, c["id"])
        assert len(rows) == 15 and all(r["decision"] == "confirm" for r in rows)
    v = trail.verify(engine)
    assert v["ok"], v["problems"][:3]


def test_the_migrations_build_the_schema_the_code_uses(tmp_path):
    """store.py's tables (what the code reads and writes) and the Alembic migrations (what a database
    is built from) are written twice on purpose — a migration is history and never changes; this keeps
    the two from drifting apart."""
    eng = store.open_store(str(tmp_path / "schema.sqlite"))
    insp = sa.inspect(eng)
    for t in store.metadata.sorted_tables:
        cols = {c["name"]: c for c in insp.get_columns(t.name)}
        assert set(cols) == {c.name for c in t.columns}, t.name
        assert {n for n, c in cols.items() if not c["nullable"]} >= {c.name for c in t.columns if not c.nullable
                                                                      and not c.primary_key}, t.name


# ---------------------------------------------------------------- the app's needs: binding, images, agreement, users

def test_a_decision_lands_only_on_the_image_that_was_shown(tmp_path):
    eng = store.open_store(str(tmp_path / "b.sqlite"))
    rita, _, _ = _people(eng)
    cid, ids = _case(eng, rita)
    with pytest.raises(cases.CaseError, match="different image"):
        cases.decide(eng, rita, ids[0], "confirm", expect_sha256="ff" * 32)
    cases.decide(eng, rita, ids[0], "confirm", expect_sha256=_row(0)["sha256"])
    assert [d["seq"] for d in cases.history(eng, cid)] == [0]


def test_cell_thumbnails_are_kept_and_shown_only_while_their_hash_holds(tmp_path):
    import numpy as np

    path = tmp_path / "t.sqlite"
    eng = store.open_store(str(path))
    rita, _, _ = _people(eng)
    cid = cases.create_case(eng, rita, "S", "m", "cd" * 32, 2, model_version="v1")
    img = np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    cases.add_result(eng, rita, cid, 0, {**_row(0), "thumbnail": img})
    cases.add_result(eng, rita, cid, 1, {**_row(1), "thumbnail": img})      # the same image is stored once
    case, rows = cases.case_rows(eng, cid)
    assert case["model_version"] == "v1" and rows[0]["thumb_sha256"] == rows[1]["thumb_sha256"]
    png = cases.cell_image(eng, rows[0]["thumb_sha256"])
    from PIL import Image
    import io

    assert (np.asarray(Image.open(io.BytesIO(png))) == img).all()
    con = sqlite3.connect(path)
    con.execute("UPDATE cell_images SET png = X'00'")
    con.commit()
    con.close()
    assert cases.cell_image(eng, rows[0]["thumb_sha256"]) is None          # swapped bytes are never shown


def test_agreement_over_signed_cases_counts_only_decided_cells(tmp_path):
    eng = store.open_store(str(tmp_path / "a.sqlite"))
    rita, sam, _ = _people(eng)
    cid, ids = _case(eng, rita)          # 0, 2 flagged (monocyte); 1, 3 ok (monocyte)
    cases.finish(eng, rita, cid)
    cases.decide(eng, rita, ids[0], "confirm")
    cases.decide(eng, rita, ids[2], "correct", "lymphocyte")
    cases.decide(eng, rita, ids[1], "confirm")
    open_cid, open_ids = _case(eng, rita)                                 # not signed: not counted
    cases.decide(eng, rita, open_ids[0], "correct", "basophil")
    assert cases.agreement(eng)["cases"] == 0
    cases.sign(eng, sam, cid)
    a = cases.agreement(eng)
    assert (a["cases"], a["cells"], a["reviewed"]) == (1, 4, 3)
    assert (a["agreement"]["k"], a["agreement"]["n"]) == (2, 3) and a["agreement"]["ci95"][0] < 2 / 3 < \
        a["agreement"]["ci95"][1]
    assert (a["flagged_corrected"]["k"], a["flagged_corrected"]["n"]) == (1, 2)
    assert (a["ok_corrected"]["k"], a["ok_corrected"]["n"]) == (0, 1) and a["ok_reviewed"]["k"] == 1
    assert a["labels"] == ["lymphocyte", "monocyte"] and a["confusion"] == [[0, 0], [1, 2]]
    # Per model: another model's signed case is not pooled with this one's.
    other = cases.create_case(eng, rita, "S-other", "all4-mobilenetv2", "ef" * 32, 1)
    oid = cases.add_result(eng, rita, other, 0, _row(0))
    cases.finish(eng, rita, other)
    cases.decide(eng, rita, oid, "correct", "basophil")
    cases.sign(eng, sam, other)
    assert sorted((m["model_id"], m["cases"]) for m in cases.signed_models(eng)) == [("all4-mobilenetv2", 1),
                                                                                  ("pbs5-mobilenetv2", 1)]
    assert cases.agreement(eng, "ab" * 32)["reviewed"] == 3 and cases.agreement(eng, "ef" * 32)["reviewed"] == 1
    assert cases.agreement(eng)["reviewed"] == 4


def test_user_administration_keeps_an_admin_and_locks_out_guessing(tmp_path):
    eng = store.open_store(str(tmp_path / "u.sqlite"))
    users.add_user(eng, "ada", PASSWORD, "admin")
    users.add_user(eng, "rita", PASSWORD, "reviewer")
    assert users.count_users(eng) == 2
    with pytest.raises(ValueError, match="only active administrator"):
        users.set_active(eng, "ada", False, actor="ada")
    with pytest.raises(ValueError, match="only active administrator"):
        users.set_role(eng, "ada", "signer", actor="ada")
    users.set_role(eng, "rita", "signer", actor="ada")
    assert users.current(eng, "rita") == users.User("rita", "signer")
    users.set_password(eng, "rita", "a new long password", actor="ada")
    with pytest.raises(users.AuthError):
        users.login(eng, "rita", PASSWORD)
    for _ in range(users.MAX_FAILED_LOGINS - 1):
        with pytest.raises(users.AuthError):
            users.login(eng, "rita", "guess guess guess")
    with pytest.raises(users.AuthError):                                   # locked: even the right password
        users.login(eng, "rita", "a new long password")
    assert users.login(eng, "ada", PASSWORD).role == "admin"               # other accounts are not affected
    users.set_active(eng, "rita", False, actor="ada")
    assert users.current(eng, "rita") is None
    assert trail.verify(eng)["ok"]


def test_originals_are_kept_under_their_content_hash_up_to_a_size(tmp_path, monkeypatch):
    import hashlib

    eng = store.open_store(str(tmp_path / "k.sqlite"))
    data = b"\x89PNG fake original bytes"
    sha = cases.keep_image(eng, data)
    assert sha == hashlib.sha256(data).hexdigest() and cases.keep_image(eng, data) == sha   # kept once
    assert cases.cell_image(eng, sha) == data
    monkeypatch.setattr(cases, "MAX_KEPT_IMAGE_BYTES", 4)
    assert cases.keep_image(eng, b"too large") is None
    assert cases.cell_image(eng, hashlib.sha256(b"too large").hexdigest()) is None


def test_a_case_records_the_cards_version_else_its_creation_stamp(tmp_path):
    import json

    (tmp_path / "model_card.json").write_text(json.dumps({"created": "2026-11-30T10:00:00"}))
    assert cases.model_version(tmp_path) == "2026-11-30T10:00:00"
    (tmp_path / "model_card.json").write_text(json.dumps({"created": "2026-11-30T10:00:00", "version": "2026.11.30"}))
    assert cases.model_version(tmp_path) == "2026.11.30"
