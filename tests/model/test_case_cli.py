"""`screen --case X --db D` then `audit verify --db D`: exit 0; a row changed with plain SQLite (no app)
or an entry deleted from the middle of the trail makes it exit 1 and name the entry or row."""

import sqlite3
import subprocess
import sys

import pytest

from conftest import ROOT, require_model

sys.path.insert(0, str(ROOT / "tests" / "app"))
from app_test_images import png_bytes, synthetic_cell  # noqa: E402


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bcc_core", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


@pytest.mark.slow
def test_screen_records_a_case_and_audit_verify_detects_tampering(tmp_path):
    model = require_model("pbs5-mobilenetv2")
    cells = tmp_path / "cells"
    cells.mkdir()
    for i in range(5):
        (cells / f"cell{i}.png").write_bytes(png_bytes(synthetic_cell(60 + i)))
    db = tmp_path / "lab.sqlite"
    r = _cli("screen", str(cells), "--model", str(model), "--out", str(tmp_path / "r.csv"), "--case", "SLIDE-9",
             "--db", str(db), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "case 'SLIDE-9'" in r.stderr and "complete" in r.stderr
    ok = _cli("audit", "verify", "--db", str(db))
    assert ok.returncode == 0 and "verifies" in ok.stdout
    con = sqlite3.connect(db)
    names = [n for (n,) in con.execute("SELECT name FROM results ORDER BY seq")]
    assert names == [f"cell{i}.png" for i in range(5)]               # relative to the case, not server paths
    con.execute("UPDATE results SET predicted_class = 'basophil', confidence = 0.99 WHERE seq = 3")
    con.commit()
    bad = _cli("audit", "verify", "--db", str(db))
    assert bad.returncode == 1 and "result row 4" in bad.stdout, bad.stdout
    con.execute("DELETE FROM trail WHERE id = 3")
    con.commit()
    con.close()
    bad = _cli("audit", "verify", "--db", str(db))
    assert bad.returncode == 1 and "first broken entry: 3" in bad.stdout, bad.stdout


def test_case_export_writes_a_pseudonymised_report_and_records_it(tmp_path, capsys):
    import json

    from bcc_core import cases, store, trail, users
    from bcc_core.cli import main

    def cli(*args):   # in this process: the command's code path without a second interpreter's start-up
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    db = tmp_path / "lab.sqlite"
    eng = store.open_store(str(db))
    rita, sam = users.User("rita", "reviewer"), users.User("sam", "signer")
    cid = cases.create_case(eng, rita, "ACC-1234", "pbs5-mobilenetv2", "ab" * 32, 1, "2026-11-30")
    rid = cases.add_result(eng, rita, cid, 0, {"file": "/data/DOE_JANE/c0.png", "status": "review",
                                               "predicted_class": "monocyte", "confidence": 0.6, "flags": [],
                                               "reason": "", "probabilities": {"monocyte": 0.6}, "sha256": "00" * 32})
    cases.finish(eng, rita, cid)
    early = cli("case", "export", str(cid), "--format", "pdf", "--out", str(tmp_path / "r.pdf"), "--db", str(db))
    assert early.returncode == 2 and "once it is signed" in early.stderr            # no report before sign-off
    cases.decide(eng, rita, rid, "confirm")
    cases.sign(eng, sam, cid)
    out = tmp_path / "report.json"
    r = cli("case", "export", str(cid), "--format", "fhir", "--out", str(out), "--db", str(db))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "DOE_JANE" not in text and "ACC-1234" not in text and "ab" * 32 in text
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(json.loads(text))
    r = cli("case", "export", str(cid), "--format", "pdf", "--out", str(tmp_path / "r.pdf"), "--db", str(db),
             "--include", "label")
    assert r.returncode == 0 and (tmp_path / "r.pdf").read_bytes()[:4] == b"%PDF"
    with eng.connect() as con:
        import sqlalchemy as sa

        exports = [json.loads(a) for (a,) in con.execute(sa.select(store.trail.c.after)
                                                          .where(store.trail.c.action == "case.export"))]
    assert [e["formats"] for e in exports] == [["fhir"], ["pdf"]] and exports[1]["options"] == ["label"]
    assert trail.verify(eng)["ok"]
