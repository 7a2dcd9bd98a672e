"""Verify a model on a lab's own labelled cells: run it over a labelled folder and report, per class,
what a lab's quality manager needs before trusting it (recall and precision with 95% intervals, the
share shown as ok, wrong-and-ok, kappa, the confusion matrix), with the model's identity.

Used for external validation (`python -m bcc_core evaluate --external`), saved beside the model as
`external/<name>.json`, and shown on the metrics page. Measurement only: nothing here fits anything.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from .evaluation import labelled_set_report

REPORT_DIR = "external"


def model_identity(model_dir) -> dict:
    """Model id and the SHA-256 of its weights file: which model a figure belongs to."""
    d = Path(model_dir)
    h = hashlib.sha256()
    with open(d / "model.keras", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    card = json.loads((d / "model_card.json").read_text())
    return {"model_id": card.get("model_id", d.name), "weights_sha256": h.hexdigest(), "created": card.get("created")}


def verify_folder(predictor, root, class_map: dict | None = None, name: str = "", batch: int = 64,
                  progress: bool = False) -> dict:
    """Run the full pipeline over an ImageFolder of labelled cells and report (see labelled_set_report).

    Args:
        predictor: a loaded Predictor.
        root: `<root>/<label>/<image>`; labels may include cell types the model does not know.
        class_map: folder name → model class (e.g. {"neutrophil": "seg_neutrophil"}).
        name: the set's name (the lab).
    """
    from .data import list_imagefolder
    from .io import read_image

    class_map = class_map or {}
    ds = list_imagefolder(root)
    true = [class_map.get(ds.classes[l], ds.classes[l]) for l in ds.labels]
    suggested, ok = [], []
    for s in range(0, len(ds.paths), batch):
        res = predictor.predict([read_image(p) for p in ds.paths[s:s + batch]])
        suggested += [r.predicted_class for r in res]
        ok += [r.status == "ok" for r in res]
        if progress:
            print(f"  {min(s + batch, len(ds.paths))}/{len(ds.paths)}", flush=True)
    rep = labelled_set_report(true, suggested, ok, list(predictor.classes), name=name or Path(root).name)
    rep.update({"model": model_identity(predictor.model_dir), "data": {"root": Path(root).name,
                "file_list_sha256": ds.digest(), "class_map": class_map},
                "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return rep


def save_report(model_dir, report: dict) -> Path:
    out = Path(model_dir) / REPORT_DIR / f"{report['name']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return out


def load_reports(model_dir) -> list[dict]:
    """Saved external reports of a model whose weights still match (stale reports are left out)."""
    d = Path(model_dir) / REPORT_DIR
    if not d.is_dir():
        return []
    ident = None
    out = []
    for f in sorted(d.glob("*.json")):
        rep = json.loads(f.read_text())
        if ident is None:
            ident = model_identity(model_dir)
        if rep.get("model", {}).get("weights_sha256") == ident["weights_sha256"]:
            out.append(rep)
    return out
