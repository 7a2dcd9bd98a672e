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
    from .data import alike_classes, list_imagefolder
    from .io import read_image

    class_map = class_map or {}
    ds = list_imagefolder(root)
    # A folder left unmapped that names a model class otherwise ('neutrophil') would count its cells as a
    # type the model does not know: every one shown as ok would be "wrong and ok". The report names them.
    look_alike = {f: m for f in ds.classes if f not in class_map and f not in predictor.classes
                  and (m := alike_classes(f, predictor.classes))}
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
                "file_list_sha256": ds.digest(), "class_map": class_map, "unmapped_look_alike": look_alike},
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


def report_html(rep: dict) -> str:
    """A self-contained, printable HTML verification report (no scripts, no external resources)."""
    from html import escape

    def r(x, digits=1):
        if not x or x.get("value") is None:
            return "n/a"
        return (f"{x['value']:.{digits}%} (95% CI {x['ci95'][0]:.{digits}%}–{x['ci95'][1]:.{digits}%}; "
                f"{x['k']}/{x['n']})")

    m = rep.get("model", {})
    rows = "".join(
        f"<tr><td>{escape(c)}</td><td>{v['n']}</td><td>{r(v['recall']) if v['recall'] else 'not a model class'}</td>"
        f"<td>{r((rep['per_suggested_class'].get(c) or {}).get('precision'))}</td><td>{r(v['shown_as_ok'])}</td>"
        f"<td>{v['wrong_and_ok']}</td></tr>" for c, v in rep["per_true_label"].items())
    conf = rep["confusion"]
    cm = "<tr><th>true \\ suggested</th>" + "".join(f"<th>{escape(c)}</th>" for c in conf["columns"]) + "</tr>" + "".join(
        f"<tr><th>{escape(rname)}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
        for rname, row in zip(conf["rows"], conf["matrix"]))
    kappa = "n/a" if rep.get("kappa_known") is None else f"{rep['kappa_known']:.3f}"
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Local verification: {escape(rep['name'])}</title>
<style>body{{font-family:sans-serif;color:#111;max-width:960px;margin:2em auto}}table{{border-collapse:collapse;
margin:1em 0}}td,th{{border:1px solid #999;padding:4px 8px;text-align:left}}.note{{background:#fff4d6;padding:8px}}</style>
</head><body>
<h1>Local verification report — {escape(rep['name'])}</h1>
<p class="note">Decision support for a second reader, not a diagnosis. Figures are measured on the labelled cells
listed below; a lab's verification needs enough cells per class for the intervals to be narrow.</p>
<h2>Model</h2><p>{escape(str(m.get('model_id')))} — weights SHA-256 <code>{escape(str(m.get('weights_sha256')))}</code>,
created {escape(str(m.get('created')))}</p>
<h2>Data</h2><p>{rep['n']} labelled images from <code>{escape(str(rep.get('data', {}).get('root')))}</code>
(file list SHA-256 <code>{escape(str(rep.get('data', {}).get('file_list_sha256')))}</code>), measured
{escape(str(rep.get('measured')))}.</p>
<h2>Summary</h2><ul><li>Agreement on the model's classes: {r(rep['agreement_known'])}</li>
<li>Cohen's kappa (model's classes): {kappa}</li><li>Shown as OK: {r(rep['shown_as_ok'])}</li>
<li>Wrong and shown as OK: {r(rep['wrong_and_ok'], 2)}</li><li>Errors among results shown as OK:
{r(rep['error_among_ok'], 2)}</li></ul>
<h2>Per class</h2><table><tr><th>true label</th><th>cells</th><th>recall</th><th>precision</th><th>shown as OK</th>
<th>wrong and OK</th></tr>{rows}</table>
<h2>Confusion matrix</h2><table>{cm}</table>
<p>Intervals: Wilson score, 95%. Cells of a type the model does not know count as wrong when shown as OK.</p>
</body></html>"""


def _rate_md(x, digits=1) -> str:
    if not x or x.get("value") is None:
        return "n/a"
    return f"{x['value']:.{digits}%} ({x['ci95'][0]:.{digits}%}–{x['ci95'][1]:.{digits}%}; {x['k']}/{x['n']})"


def report_markdown(rep: dict, heading: str = "##") -> list[str]:
    """The same report as `report_html`, as Markdown lines (for bench/RESULTS.md): per true label recall,
    precision of the suggestion, shown as ok and wrong-and-ok, each with a Wilson 95% interval; the summary
    rates; the confusion matrix."""
    m = rep.get("model", {})
    per_true, per_sugg = rep["per_true_label"], rep["per_suggested_class"]
    known = [c for c, v in per_true.items() if v["known_to_model"]]
    mean_recall = (sum(per_true[c]["recall"]["value"] for c in known) / len(known)) if known else None
    kappa = "n/a" if rep.get("kappa_known") is None else f"{rep['kappa_known']:.3f}"
    lines = [f"{heading} {rep['name']}: model `{m.get('model_id')}` (weights SHA-256 {str(m.get('weights_sha256'))[:12]}…)", "",
             f"- {rep['n']} labelled images (file list SHA-256 {str(rep.get('data', {}).get('file_list_sha256'))[:12]}…, "
             f"class map {rep.get('data', {}).get('class_map') or {}})",
             f"- shown as ok: {_rate_md(rep['shown_as_ok'])}; **wrong and shown as ok: {_rate_md(rep['wrong_and_ok'], 2)}**; "
             f"errors among ok: {_rate_md(rep['error_among_ok'], 2)}",
             f"- agreement on the model's classes: {_rate_md(rep['agreement_known'])} (pooled, dominated by the largest "
             f"class); **mean per-class recall {'n/a' if mean_recall is None else f'{mean_recall:.1%}'}**; kappa {kappa}", "",
             "| true label | n | recall (95% CI) | shown as ok (95% CI) | wrong and ok |", "|---|---|---|---|---|"]
    for c, v in per_true.items():
        rec = _rate_md(v["recall"]) if v["known_to_model"] else "not a model class"
        lines.append(f"| {c} | {v['n']} | {rec} | {_rate_md(v['shown_as_ok'])} | {v['wrong_and_ok']} |")
    lines += ["", "| suggested class | precision (95% CI) | precision among ok (95% CI) |", "|---|---|---|"]
    lines += [f"| {c} | {_rate_md(v['precision'])} | {_rate_md(v['precision_among_ok'])} |" for c, v in per_sugg.items()]
    conf = rep["confusion"]
    lines += ["", "| true \\ suggested | " + " | ".join(conf["columns"]) + " |", "|---|" + "---|" * len(conf["columns"])]
    lines += [f"| {r} | " + " | ".join(map(str, row)) + " |" for r, row in zip(conf["rows"], conf["matrix"])]
    return lines
