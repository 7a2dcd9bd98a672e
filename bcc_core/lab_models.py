"""A lab's own models: adapted candidates, promotion into the model selector, and roll-back.

Bundled models live in the checkout's `models/` (read-only). Models adapted to a lab are written as
candidates to `<data>/candidates/<id>`; promoting moves one to `<data>/models/<id>`, where the app's
model selector lists it beside the bundled ones; rolling back moves it to `<data>/retired/<id>` (the
parent stays available). `<data>` is `$BCC_DATA_DIR` (default ~/.bcc). Each promotion and roll-back is
an audit-trail entry (who, when, model id, weights SHA-256, parent).
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

from .io import IMAGE_EXTENSIONS


def data_dir() -> Path:
    return Path(os.environ.get("BCC_DATA_DIR") or "~/.bcc").expanduser()


def candidates_dir() -> Path:
    return data_dir() / "candidates"


def promoted_dir() -> Path:
    return data_dir() / "models"


def retired_dir() -> Path:
    return data_dir() / "retired"


def new_candidate_dir(parent_id: str, lab: str) -> Path:
    """A fresh folder name for a candidate adapted from `parent_id` to `lab`."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in lab.strip().lower()) or "lab"
    base = f"{parent_id}--{safe}"
    n = 1
    while any((d / f"{base}-v{n}").exists() for d in (candidates_dir(), promoted_dir(), retired_dir())):
        n += 1
    return candidates_dir() / f"{base}-v{n}"


def unpack_labelled_zip(data: bytes, dest: Path, max_members: int = 20000, max_total: int = 2 << 30) -> Path:
    """A labelled .zip (`<class>/<image>`, optionally under one top folder) as an ImageFolder in dest.

    Members outside class folders, hidden files, unsafe paths and non-image files are skipped; sizes
    are checked from the directory before anything is written.
    """
    import io

    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > max_members or sum(i.file_size for i in infos) > max_total:
            raise ValueError(f"the archive is too large ({len(infos)} files); at most {max_members} files, "
                             f"{max_total >> 20} MB")
        parts = [Path(i.filename).parts for i in infos]
        tops = {p[0] for p in parts if len(p) >= 3}
        strip = 1 if len(tops) == 1 and all(len(p) >= 3 for p in parts if not p[-1].startswith(".")) else 0
        n = 0
        for info, p in zip(infos, parts):
            p = p[strip:]
            if len(p) < 2 or any(s.startswith(".") or s in ("..", "__MACOSX") for s in p):
                continue
            if Path(p[-1]).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            out = dest / p[0] / "_".join(p[1:])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(zf.read(info))
            n += 1
    if n == 0:
        raise ValueError("no images in class folders: the archive must hold <class>/<image> files")
    return dest


def list_lab_models() -> list[Path]:
    """Promoted lab models (folders with a card), newest first."""
    d = promoted_dir()
    found = [p.parent for p in d.glob("*/model_card.json")] if d.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def _identity(model_dir: Path) -> dict:
    from .verification import model_identity

    ident = model_identity(model_dir)
    card = json.loads((model_dir / "model_card.json").read_text())
    return {**ident, "parent": (card.get("lineage") or {}).get("parent"), "lab": (card.get("lineage") or {}).get("lab")}


def promote(candidate: Path, actor: str, engine=None) -> Path:
    """Move a candidate into the lab's models (listed in the model selector); a trail entry records it."""
    candidate = Path(candidate)
    if candidate.parent.resolve() != candidates_dir().resolve() or not (candidate / "model_card.json").is_file():
        raise ValueError(f"{candidate} is not an adapted candidate model")
    target = promoted_dir() / candidate.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(candidate), target)
    _record(engine, actor, "model.promote", _identity(target))
    return target


def rollback(model_dir: Path, actor: str, engine=None) -> Path:
    """Withdraw a promoted lab model (kept under retired/); its parent stays available."""
    model_dir = Path(model_dir)
    if model_dir.parent.resolve() != promoted_dir().resolve():
        raise ValueError(f"{model_dir} is not a promoted lab model (bundled models cannot be rolled back)")
    ident = _identity(model_dir)
    target = retired_dir() / model_dir.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(model_dir), target)
    _record(engine, actor, "model.rollback", ident)
    return target


def _record(engine, actor: str, action: str, details: dict) -> None:
    from . import store, trail

    trail.record(engine or store.open_store(), actor, action, "model", None, details)


def reviewed_labels(prediction_ids: dict, current) -> tuple[tuple[int, str], ...]:
    """(row index, final class) of a batch's cells whose current decision is confirm or correct.

    Args:
        prediction_ids: {row index: the case result id of that cell}.
        current: the current decisions of the case's cells: a DataFrame indexed by result id with
            `decision` and `final_class` columns (built by the batch page from the case rows).
    """
    out = []
    for i, pid in sorted(prediction_ids.items()):
        if pid in current.index and current.at[pid, "decision"] in ("confirm", "correct"):
            out.append((i, str(current.at[pid, "final_class"])))
    return tuple(out)


def write_reviewed_cells(items, dest: Path) -> Path:
    """Reviewed cells as an ImageFolder: items are (final class, file name, image bytes)."""
    dest.mkdir(parents=True, exist_ok=True)
    for k, (label, name, data) in enumerate(items):
        out = dest / _reviewed_file(k, label, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    return dest


def _reviewed_file(k: int, label: str, name: str) -> str:
    """The k-th reviewed cell's file in the ImageFolder `write_reviewed_cells` writes, relative to it."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(name.split(":")[-1]).name)
    return f"{label}/{k:05d}_{safe}"


def reviewed_from_store(engine, image_roots, signed_only: bool = True, sample_labels=None,
                        max_files: int = 200_000) -> tuple[list[dict], dict]:
    """Reviewers' confirmed and corrected cells from the case store, matched to their images by content.

    Each result row records its image's SHA-256. The image itself comes from the store when the case kept
    the original (flagged cells' originals are kept, bcc_core.cases.keep_image), else from the folders the
    lab points at (every image file there is hashed). Either way a reviewed cell is used only when the bytes
    hash to the value recorded when it was screened (the image the reviewer saw). The latest decision per
    cell counts (an amendment replaces the decision it amends).

    Args:
        engine: an open store (bcc_core.store.open_store).
        image_roots: folders searched (recursively) for screened images the store did not keep; may be empty.
        signed_only: only cases whose review is signed (default), else every case.
        sample_labels: only these cases (sample labels), else all.
        max_files: cap on the image files hashed.

    Returns:
        (cells, summary): cells are dicts {class, name, data (bytes), sha256, decision_id, case_uid};
        summary counts reviewed cells, matched, missing images and cells used.
    """
    import hashlib

    import sqlalchemy as sa

    from . import store

    latest = (sa.select(store.decisions.c.result_id, sa.func.max(store.decisions.c.id).label("did"))
              .group_by(store.decisions.c.result_id).subquery())
    q = (sa.select(store.decisions.c.id, store.decisions.c.decision, store.decisions.c.final_class,
                   store.results.c.image_sha256, store.results.c.name, store.cases.c.uid, store.cases.c.status,
                   store.cases.c.sample_label)
         .select_from(latest.join(store.decisions, store.decisions.c.id == latest.c.did)
                      .join(store.results, store.results.c.id == store.decisions.c.result_id)
                      .join(store.cases, store.cases.c.id == store.results.c.case_id))
         .order_by(store.decisions.c.id))
    with engine.connect() as con:
        rows = [r for r in con.execute(q)
                if r.decision in ("confirm", "correct") and r.final_class and r.image_sha256
                and (not signed_only or r.status == "signed")
                and (not sample_labels or r.sample_label in set(sample_labels))]
    from .cases import cell_image

    wanted = {r.image_sha256 for r in rows}
    kept = {h: data for h in wanted if (data := cell_image(engine, h)) is not None}
    found: dict[str, Path] = {}
    n_files = 0
    for root in image_roots:
        for p in sorted(Path(root).rglob("*")):
            if not (p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
                continue
            n_files += 1
            if n_files > max_files:
                raise ValueError(f"more than {max_files} image files under {', '.join(map(str, image_roots))}: "
                                 "point --images at the folders of the reviewed cases")
            h = hashlib.sha256(p.read_bytes()).hexdigest()
            if h in wanted and h not in kept:
                found.setdefault(h, p)
    cells, seen = [], set()
    for r in rows:
        h = r.image_sha256
        if h in seen or (h not in kept and h not in found):  # one image reviewed in two cases counts once
            continue
        seen.add(h)
        data = kept[h] if h in kept else found[h].read_bytes()
        cells.append({"class": r.final_class, "name": r.name, "data": data, "sha256": h,
                      "decision_id": int(r.id), "case_uid": r.uid})
    summary = {"reviewed": len(rows), "images_kept_in_store": len(kept), "images_found": len(found),
               "images_missing": len(wanted - set(kept) - set(found)), "cells_used": len(cells),
               "files_hashed": n_files, "signed_only": signed_only}
    return cells, summary


def record_review_source(model_dir: Path, cells: list[dict], summary: dict) -> None:
    """Name in an adapted model's card the reviewers' decisions it learnt from (decision ids, cases, images), and
    those it did not (`not_learnt`, with why: e.g. a label the label check doubted, left out), so a reviewer can
    find each in its case. `cells` in the order given to `write_reviewed_cells`."""
    card_file = Path(model_dir) / "model_card.json"
    card = json.loads(card_file.read_text())
    lineage = card.setdefault("lineage", {})
    learnt = {c["sha256"] for c in lineage.get("cells", [])}
    # adapt's own record of each file it did not use and why (a doubted label left out, an unreadable image, ...);
    # its paths are absolute, under the folder write_reviewed_cells wrote.
    why_not = {Path(u["file"]).as_posix(): u["reason"] for u in lineage.get("files_not_used", [])}

    def why(k: int, c: dict) -> str:
        f = "/" + _reviewed_file(k, c["class"], c["name"])
        return next((r for path, r in why_not.items() if path.endswith(f)), "not among the cells learnt from")

    rows = [{"decision_id": c["decision_id"], "case_uid": c["case_uid"], "sha256": c["sha256"], "class": c["class"]}
            for c in cells]
    lineage["reviewed_decisions"] = {
        "summary": summary,
        "cells": [r for r in rows if r["sha256"] in learnt],
        "not_learnt": [{**r, "why": why(k, c)} for k, (r, c) in enumerate(zip(rows, cells))
                       if r["sha256"] not in learnt]}
    card_file.write_text(json.dumps(card, indent=2) + "\n")
