"""Cases: a screening run kept as a sample the lab can reopen, review, sign and amend.

A case holds the model's identity (id and weights SHA-256), every input's content hash and its name
relative to the case, and every result row, written as it arrives (a killed run leaves an
"incomplete" case with every row screened so far). Reviewers decide on cells; a signer signs when every
flagged cell has a decision; a signed case is read-only except for amendments (who, when, why). Every
write is a trail entry (bcc_core.trail), in the same transaction.
"""

from __future__ import annotations

import hashlib
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


def create_case(engine, user: User, sample_label: str, model_id: str, model_sha256: str, n_inputs: int,
                model_version: str = "") -> int:
    """A new case for a screening run of `n_inputs` images (status "running" until `finish`)."""
    user.require("screen")
    label = sample_label.strip()
    if not label:
        raise ValueError("a case needs a sample label (e.g. the slide or accession number)")
    with engine.begin() as con:
        return trail.write(con, user.username, "case.create", "case", {
            "uid": str(uuid.uuid4()), "sample_label": label, "created_by": user.username, "created_at": trail.now(),
            "model_id": model_id, "model_sha256": model_sha256, "n_inputs": int(n_inputs), "status": "running",
            "model_version": model_version or None})


def model_version(model_dir) -> str:
    """What a case records as the model's version: the card's `version`, else its creation stamp."""
    from pathlib import Path

    card = json.loads((Path(model_dir) / "model_card.json").read_text())
    return str(card.get("version") or card.get("created") or "")


def add_result(engine, user: User, case_id: int, seq: int, row: dict) -> int:
    """Store one screening row (bcc_core.screening row dict) as it arrives, with its thumbnail if it has one
    (`row["thumbnail"]`: (h, w, 3) uint8 RGB, kept as PNG under its SHA-256)."""
    png = _thumbnail_png(row.get("thumbnail"))
    flags = [f.to_dict() if hasattr(f, "to_dict") else f for f in (row.get("flags") or [])]
    values = {"case_id": case_id, "seq": int(seq), "name": relative_name(str(row["file"])),
              "image_sha256": row.get("sha256"), "status": row["status"],
              "predicted_class": row.get("predicted_class"),
              "confidence": None if row.get("confidence") is None else float(row["confidence"]),
              "flags": trail.canonical(flags),
              "probabilities": None if row.get("probabilities") is None else
              trail.canonical({k: round(float(v), 6) for k, v in row["probabilities"].items()}),
              "reason": row.get("reason") or "", "created_at": trail.now(),
              "thumb_sha256": None if png is None else hashlib.sha256(png).hexdigest()}
    with engine.begin() as con:
        _require_status(con, case_id, ("running", "incomplete"))
        rid = trail.write(con, user.username, "result.add", "result", values)
        # After trail.write: the chain head is locked, so two writers never insert the same image at once.
        if png is not None and con.execute(sa.select(store.cell_images.c.sha256).where(
                store.cell_images.c.sha256 == values["thumb_sha256"])).first() is None:
            con.execute(sa.insert(store.cell_images).values(sha256=values["thumb_sha256"], png=png))
        return rid


def _thumbnail_png(img) -> bytes | None:
    if img is None:
        return None
    import numpy as np

    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        return None
    from .io import encode_png

    return encode_png(arr.astype(np.uint8))


# Originals of flagged cells are kept (content-addressed, beside the thumbnails) so that a reopened case shows
# what the model saw and its Grad-CAM; larger files are not kept (the stored prediction is still shown).
MAX_KEPT_IMAGE_BYTES = 8 << 20


def keep_image(engine, data: bytes) -> str | None:
    """Keep an input image's bytes under their SHA-256 (the `image_sha256` of its result rows); the hash, or
    None when the file is larger than MAX_KEPT_IMAGE_BYTES."""
    if len(data) > MAX_KEPT_IMAGE_BYTES:
        return None
    sha = hashlib.sha256(data).hexdigest()
    try:
        with engine.begin() as con:
            if con.execute(sa.select(store.cell_images.c.sha256).where(store.cell_images.c.sha256 == sha)).first() \
                    is None:
                con.execute(sa.insert(store.cell_images).values(sha256=sha, png=data))
    except sa.exc.IntegrityError:  # another process kept the same image at the same moment
        pass
    return sha


def cell_image(engine, thumb_sha256: str | None) -> bytes | None:
    """Bytes kept under a SHA-256 (a result's thumbnail PNG, or a kept original by its image_sha256), or None
    when there are none or they no longer match the hash."""
    if not thumb_sha256:
        return None
    with engine.connect() as con:
        png = con.execute(sa.select(store.cell_images.c.png).where(store.cell_images.c.sha256 == thumb_sha256)).scalar()
    if png is None or hashlib.sha256(bytes(png)).hexdigest() != thumb_sha256:
        return None
    return bytes(png)


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
           reason: str = "", expect_sha256: str | None = None) -> int:
    """A reviewer's decision on one cell. On a signed case only a signer may amend, with a reason.

    Args:
        expect_sha256: the content hash of the image the reviewer was shown; the decision is refused when
            the stored result is of another image (a decision lands only on the prediction that was seen).
    """
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
        if expect_sha256 is not None and res.image_sha256 != expect_sha256:
            raise CaseError(f"cell #{res.seq} of this case is a different image from the one shown; nothing recorded")
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


def list_cases(engine, search: str = "", statuses: tuple[str, ...] | None = None) -> list[dict]:
    """Cases, newest first, whose sample label contains `search` (any case), optionally of some statuses.

    Each has, besides its columns, `rows` (results stored), `flagged` and `pending` (flagged cells with no
    decision yet)."""
    q = sa.select(store.cases).order_by(store.cases.c.id.desc())
    if search.strip():
        q = q.where(store.cases.c.sample_label.ilike(f"%{search.strip()}%"))
    if statuses:
        q = q.where(store.cases.c.status.in_(list(statuses)))
    r, d = store.results, store.decisions
    decided = sa.exists().where(d.c.result_id == r.c.id)
    counts = (sa.select(r.c.case_id, sa.func.count().label("rows"),
                        sa.func.sum(sa.case((r.c.status == "review", 1), else_=0)).label("flagged"),
                        sa.func.sum(sa.case((sa.and_(r.c.status == "review", ~decided), 1), else_=0)).label("pending"))
              .group_by(r.c.case_id))
    with engine.connect() as con:
        per = {c.case_id: c for c in con.execute(counts)}
        out = []
        for row in con.execute(q):
            c = trail.row_dict(row)
            k = per.get(c["id"])
            c.update(rows=int(k.rows) if k else 0, flagged=int(k.flagged or 0) if k else 0,
                     pending=int(k.pending or 0) if k else 0)
            out.append(c)
        return out


def find_unfinished(engine, sample_label: str) -> dict | None:
    """The latest running or incomplete case of a sample label (to resume it), or None."""
    found = list_cases(engine, statuses=("running", "incomplete"))
    return next((c for c in found if c["sample_label"] == sample_label.strip()), None)


def history(engine, case_id: int) -> list[dict]:
    """Every decision on a case, oldest first, superseded ones and amendments included (nothing is ever
    overwritten): id, seq, name, actor, decided_at, decision, final_class, comment, amendment."""
    r, d = store.results, store.decisions
    q = (sa.select(d.c.id, r.c.seq, r.c.name, r.c.predicted_class, d.c.actor, d.c.decided_at, d.c.decision,
                   d.c.final_class, d.c.comment, d.c.amendment)
         .select_from(d.join(r, r.c.id == d.c.result_id)).where(d.c.case_id == case_id).order_by(d.c.id))
    with engine.connect() as con:
        return [dict(x._mapping) for x in con.execute(q)]


def record_view(engine, user: User, case_id: int) -> None:
    """Opening a case is an entry in the trail (who looked at which sample, when)."""
    user.require("view")
    trail.record(engine, user.username, "case.view", "case_view", case_id)


def record_export(engine, user: User, case_id: int, details: dict) -> None:
    """An export (format, what was included, the SHA-256 of each file produced) as a trail entry."""
    user.require("view")
    trail.record(engine, user.username, "case.export", "export", case_id, details)


def signed_models(engine) -> list[dict]:
    """The models of the signed cases: [{"model_id", "model_version", "model_sha256", "cases"}], most cases
    first (agreement is measured per model: one model's figures say nothing about another's)."""
    c = store.cases
    q = (sa.select(c.c.model_id, c.c.model_version, c.c.model_sha256, sa.func.count().label("cases"))
         .where(c.c.status == "signed").group_by(c.c.model_id, c.c.model_version, c.c.model_sha256)
         .order_by(sa.func.count().desc()))
    with engine.connect() as con:
        return [dict(r._mapping) for r in con.execute(q)]


def agreement(engine, model_sha256: str | None = None) -> dict:
    """Model against the reviewers' final classes over every signed case (current decisions, amendments
    included), with Wilson 95% intervals; only the cases of the model with these weights when given.

    Only cells a person decided count (an OK cell nobody opened says nothing about the model). Returns
    {"cases", "cells", "reviewed", "agreement", "kappa", "labels", "confusion" (rows: model, columns:
    final), "flagged_corrected", "ok_corrected", "ok_reviewed", "rejected"}; rates as
    bcc_core.evaluation.rate dicts ({"k", "n", "value", "ci95"}).
    """
    from .evaluation import rate

    with engine.connect() as con:
        q = sa.select(store.cases.c.id).where(store.cases.c.status == "signed")
        if model_sha256:
            q = q.where(store.cases.c.model_sha256 == model_sha256)
        signed = [c.id for c in con.execute(q)]
        rows = [r for cid in signed for r in _current(con, cid) if r["status"] != "error"]
    decided = [r for r in rows if r["decision"] in ("confirm", "correct")]
    model = [r["predicted_class"] for r in decided]
    final = [r["final_class"] for r in decided]
    labels = sorted(set(model) | set(final))
    idx = {c: i for i, c in enumerate(labels)}
    cm = [[0] * len(labels) for _ in labels]
    for m, f in zip(model, final):
        cm[idx[m]][idx[f]] += 1
    kappa = None
    if len(decided) >= 2 and len(labels) >= 2:
        from sklearn.metrics import cohen_kappa_score

        kappa = float(cohen_kappa_score(model, final, labels=labels))

    def corrected(status):
        sel = [r for r in decided if r["status"] == status]
        return rate(sum(r["decision"] == "correct" for r in sel), len(sel))

    ok = [r for r in rows if r["status"] == "ok"]
    return {"cases": len(signed), "cells": len(rows), "reviewed": len(decided),
            "agreement": rate(sum(m == f for m, f in zip(model, final)), len(decided)),
            "kappa": None if kappa is None or kappa != kappa else kappa, "labels": labels, "confusion": cm,
            "flagged_corrected": corrected("review"), "ok_corrected": corrected("ok"),
            "ok_reviewed": rate(sum(r["decision"] is not None for r in ok), len(ok)),
            "rejected": sum(r["decision"] == "reject_image" for r in rows)}


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
