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
        prediction_ids: {row index: audit prediction id}.
        current: the audit log's current decisions (`AuditLog.queue(status=None, undecided_only=False)`)
            indexed by prediction_id.
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
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(name.split(":")[-1]).name)
        out = dest / label / f"{k:05d}_{safe}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    return dest
