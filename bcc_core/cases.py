"""Cases: a screening run kept as a sample the lab can reopen, review, sign and amend.

A case holds the model's identity (id and weights SHA-256), every input's content hash and its name
relative to the case, and every result row, written as it arrives (a killed run leaves an
"incomplete" case with every row screened so far). Reviewers decide on cells; a signer signs when every
flagged cell has a decision; a signed case is read-only except for amendments (who, when, why). Every
write is a trail entry (bcc_core.trail), in the same transaction.
"""

from __future__ import annotations

import json
import uuid
from pathlib import PurePosixPath

import sqlalchemy as sa

from . import store, trail
from .users import User

DECISIONS = ("confirm", "correct", "reject_image")


class CaseError(ValueError):
    """A case action that is not allowed in the case's state (e.g. editing a signed case)."""


def relative_name(name: str) -> str:
    """A result's name relative to its case: archive members keep `archive.zip:member`, paths keep only
    the file name (server folders often carry patient names or record numbers)."""
    if ":" in name and not (len(name) > 1 and name[1] == ":"):
        arch, member = name.split(":", 1)
        return f"{PurePosixPath(arch.replace(chr(92), '/')).name}:{member}"
    return PurePosixPath(name.replace("\\", "/")).name


def create_case(engine, user: User, sample_label: str, model_id: str, model_sha256: str, n_inputs: int) -> int:
    user.require("screen")
    label = sample_label.strip()
    if not label:
        raise ValueError("a case needs a sample label (e.g. the slide or accession number)")
    with engine.begin() as con:
        return trail.write(con, user.username, "case.create", "case", {
            "uid": str(uuid.uuid4()), "sample_label": label, "created_by": user.username, "created_at": trail.now(),
            "model_id": model_id, "model_sha256": model_sha256, "n_inputs": int(n_inputs), "status": "running"})


def add_result(engine, user: User, case_id: int, seq: int, row: dict) -> int:
    """Store one screening row (bcc_core.screening row dict) as it arrives."""
    flags = [f.to_dict() if hasattr(f, "to_dict") else f for f in (row.get("flags") or [])]
    values = {"case_id": case_id, "seq": int(seq), "name": relative_name(str(row["file"])),
              "image_sha256": row.get("sha256"), "status": row["status"],
              "predicted_class": row.get("predicted_class"),
              "confidence": None if row.get("confidence") is None else float(row["confidence"]),
              "flags": trail.canonical(flags),
              "probabilities": None if row.get("probabilities") is None else
              trail.canonical({k: round(float(v), 6) for k, v in row["probabilities"].items()}),
              "reason": row.get("reason") or "", "created_at": trail.now()}
    with engine.begin() as con:
        _require_status(con, case_id, ("running", "incomplete"))
        return trail.write(con, user.username, "result.add", "result", values)


def finish(engine, user: User, case_id: int) -> str:
    """Mark a case complete when every input has a row, else incomplete (it can be resumed)."""
    with engine.begin() as con:
        case = _case(con, case_id)
        n = con.execute(sa.select(sa.func.count()).select_from(store.results)
                        .where(store.results.c.case_id == case_id)).scalar_one()
        status = "complete" if n >= case.n_inputs else "incomplete"
        trail.write(con, user.username, "case.finish", "case", {"status": status}, case_id)
    return status


def screened_seqs(engine, case_id: int) -> set[int]:
    """Input positions already stored (to resume a killed run without repeating a row)."""
    with engine.connect() as con:
        return {r.seq for r in con.execute(sa.select(store.results.c.seq).where(store.results.c.case_id == case_id))}


def decide(engine, user: User, result_id: int, decision: str, final_class: str | None = None, comment: str = "",
           reason: str = "") -> int:
    """A reviewer's decision on one cell. On a signed case only a signer may amend, with a reason."""
    if decision not in DECISIONS:
        raise ValueError(f"decision {decision!r} is not one of {DECISIONS}")
    with engine.begin() as con:
        res = con.execute(sa.select(store.results).where(store.results.c.id == result_id)).first()
        if res is None:
            raise ValueError(f"no result {result_id}")
        case = _case(con, res.case_id)
        amendment = case.status == "signed"
        if amendment:
            user.require("amend")
            if not reason.strip():
                raise CaseError("case is signed: a change is an amendment and needs a reason")
        else:
            user.require("decide")
        if res.status == "error":
            raise CaseError("an unreadable image has no result to decide on")
        if decision == "correct":
            if not final_class or final_class == res.predicted_class:
                raise ValueError("'correct' needs a final class different from the suggested one")
        elif decision == "confirm":
            final_class = res.predicted_class
        else:
            final_class = None
        note = comment.strip() if not amendment else f"AMENDMENT: {reason.strip()}" + (
            f" — {comment.strip()}" if comment.strip() else "")
        return trail.write(con, user.username, "decision.amend" if amendment else "decision.add", "decision", {
            "case_id": res.case_id, "result_id": result_id, "actor": user.username, "decided_at": trail.now(),
            "decision": decision, "final_class": final_class, "comment": note, "amendment": amendment})


def sign(engine, user: User, case_id: int) -> None:
    """Sign a case: every flagged cell has a decision; the case becomes read-only."""
    user.require("sign")
    with engine.begin() as con:
        case = _case(con, case_id)
        if case.status == "signed":
            raise CaseError(f"case {case.sample_label!r} is signed already")
        if case.status != "complete":
            raise CaseError(f"case {case.sample_label!r} is {case.status}: finish (or resume) screening first")
        pending = [r for r in _current(con, case_id) if r["status"] == "review" and r["decision"] is None]
        if pending:
            raise CaseError(f"{len(pending)} flagged cell(s) have no decision yet (first: #{pending[0]['seq']} "
                            f"{pending[0]['name']})")
        trail.write(con, user.username, "case.sign", "case",
                    {"status": "signed", "signed_by": user.username, "signed_at": trail.now()}, case_id)


def list_cases(engine, search: str = "") -> list[dict]:
    q = sa.select(store.cases).order_by(store.cases.c.id.desc())
    if search.strip():
        q = q.where(store.cases.c.sample_label.ilike(f"%{search.strip()}%"))
    with engine.connect() as con:
        return [trail.row_dict(r) for r in con.execute(q)]


def case_rows(engine, case_id: int) -> tuple[dict, list[dict]]:
    """(case, its results in input order with each cell's current decision)."""
    with engine.connect() as con:
        return trail.row_dict(_case(con, case_id)), _current(con, case_id)


def _case(con, case_id: int):
    case = con.execute(sa.select(store.cases).where(store.cases.c.id == case_id)).first()
    if case is None:
        raise ValueError(f"no case {case_id}")
    return case


def _require_status(con, case_id: int, allowed: tuple[str, ...]) -> None:
    case = _case(con, case_id)
    if case.status not in allowed:
        raise CaseError(f"case {case.sample_label!r} is {case.status}: results cannot be added")


def _current(con, case_id: int) -> list[dict]:
    latest = (sa.select(store.decisions.c.result_id, sa.func.max(store.decisions.c.id).label("did"))
              .where(store.decisions.c.case_id == case_id).group_by(store.decisions.c.result_id).subquery())
    q = (sa.select(store.results, store.decisions.c.decision, store.decisions.c.final_class,
                   store.decisions.c.actor.label("decided_by"), store.decisions.c.decided_at,
                   store.decisions.c.amendment)
         .select_from(store.results.outerjoin(latest, latest.c.result_id == store.results.c.id)
                      .outerjoin(store.decisions, store.decisions.c.id == latest.c.did))
         .where(store.results.c.case_id == case_id).order_by(store.results.c.seq))
    out = []
    for r in con.execute(q):
        d = dict(r._mapping)
        d["flags"] = json.loads(d["flags"])
        d["probabilities"] = json.loads(d["probabilities"]) if d["probabilities"] else None
        out.append(d)
    return out
