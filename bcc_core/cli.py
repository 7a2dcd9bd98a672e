"""Command line: train / evaluate / predict / screen / compare (`python -m bcc_core --help`)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

# Keep TensorFlow's C++ start-up chatter off the user's terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class UsageError(Exception):
    pass


def _data(a):
    """One `--data` without a name: that folder, the original single-source call; else the list of sources."""
    if len(a.data) == 1 and "=" not in a.data[0]:
        return a.data[0]
    return list(a.data)


def _class_map(items) -> dict:
    """--class-map FOLDER=CLASS[,FOLDER=CLASS] (repeatable) as {folder: class}."""
    cmap = {}
    for item in items or []:
        for pair in item.split(","):
            src, sep, dst = pair.partition("=")
            if not sep or not src.strip() or not dst.strip():
                raise UsageError(f"--class-map takes FOLDER=CLASS pairs, got {pair!r}")
            cmap[src.strip()] = dst.strip()
    return cmap


def _class_options(a) -> dict:
    classes = tuple(c.strip() for c in (a.classes or "").split(",") if c.strip())
    return {"classes": classes, "class_map": _class_map(a.class_map)}


def _train_cfg(a):
    from .augment import AugmentConfig
    from .data import Source
    from .preprocess import PreprocessConfig
    from .training import TrainConfig

    pcfg = PreprocessConfig(mode=a.preprocess, clahe=a.clahe, stain_norm=a.stain_norm)
    aug = {"study1": AugmentConfig.study1_only, "none": AugmentConfig.none, "crosslab": AugmentConfig.cross_lab,
           "full": AugmentConfig}[a.augment]()
    task = a.task or "+".join(Source.parse(d).name for d in a.data)
    return TrainConfig(task=task, backbone=a.backbone, weights=a.weights, epochs=a.epochs, batch_size=a.batch_size,
                       learning_rate=a.lr, aug_views=a.aug_views, seed=a.seed, fine_tune_layers=a.fine_tune_layers,
                       fine_tune_epochs=a.fine_tune_epochs, fine_tune_lr=a.fine_tune_lr, swa_start=a.swa_start,
                       fine_tune_cached=a.fine_tune_cached,
                       near_duplicate_distance=a.near_duplicate_distance,
                       preprocess=pcfg.to_dict(), augment=aug.to_dict(), **_class_options(a))


def cmd_train(a) -> int:
    from .training import train

    cfg = _train_cfg(a)
    cmd = "python -m bcc_core " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    m = train(_data(a), a.out, cfg, progress=not a.quiet, cache=a.cache, limit_per_class=a.limit_per_class, reproduce=cmd)
    t = m["test"]
    print(f"saved {a.out}: test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f}, kappa {t['kappa']:.4f}, "
          f"ECE {m['calibration']['test_ece_after']:.4f}, {m['timing_s']['total']:.0f} s")
    for name, v in m.get("test_per_source", {}).items():
        print(f"  {name}: n={v['n']} accuracy {v['accuracy']:.4f} macro-F1 {v['macro_f1']:.4f}")
    for w in m["shortcut_audit"]["warnings"]:
        print(w, file=sys.stderr)
    return 0


def cmd_evaluate(a) -> int:
    import numpy as np

    from . import evaluation
    from .data import list_imagefolder, load_split
    from .inference import Predictor
    from .io import read_image

    pred = Predictor.load(a.model)
    if a.external:
        return _evaluate_external(pred, a)
    if a.split == "all":
        ds = list_imagefolder(a.data)
        cls_map = {c: pred.classes.index(c) for c in ds.classes if c in pred.classes}
        items = [(p, cls_map[ds.classes[l]]) for p, l in zip(ds.paths, ds.labels) if ds.classes[l] in cls_map]
    else:
        sp = load_split(Path(a.model) / "split.json", a.data)
        items = sp[a.split]
    images = [read_image(p) for p, _ in items]
    labels = np.array([l for _, l in items])
    res = pred.predict(images)
    probs = np.array([[r.probabilities[c] for c in pred.classes] for r in res])
    m = evaluation.classification_metrics(labels, probs, pred.classes)
    ok = np.array([r.status == "ok" for r in res])
    correct = probs.argmax(1) == labels
    m["ok_fraction"] = float(ok.mean())
    m["wrong_ok_of_all"] = float((ok & ~correct).mean())
    print(f"{a.split}: n={m['n']} accuracy={m['accuracy']:.4f} macro_f1={m['macro_f1']:.4f} kappa={m['kappa']:.4f}")
    for c, v in m["per_class"].items():
        print(f"  {c:>16}: precision {v['precision']:.3f} recall {v['recall']:.3f} f1 {v['f1']:.3f}")
    if a.json:
        print(json.dumps({**evaluation.summary_line(m), "ok_fraction": m["ok_fraction"],
                          "wrong_ok_of_all": m["wrong_ok_of_all"], "n_ok": int(ok.sum()),
                          "n_wrong_ok": int((ok & ~correct).sum()), "confusion_matrix": m["confusion_matrix"],
                          "classes": list(pred.classes), "split": a.split}))
    return 0


def _evaluate_external(pred, a) -> int:
    """Every image of a labelled folder from another lab, unknown cell types included; per class with
    Wilson 95% intervals; `--save NAME` keeps the report beside the model (shown on the metrics page)."""
    from .verification import save_report, verify_folder

    cmap = _class_map(a.class_map)
    rep = verify_folder(pred, a.data, cmap, name=a.save or Path(a.data).name)

    def f(r):
        return "n/a" if r["value"] is None else f"{r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"

    for folder, alike in rep["data"]["unmapped_look_alike"].items():
        print(f"note: folder {folder!r} looks like the model's {alike[0]!r} but is counted as a type the model "
              f"does not know; to read it as that class: --class-map {folder}={alike[0]}")
    print(f"external {rep['name']}: n={rep['n']} shown as ok {f(rep['shown_as_ok'])} "
          f"wrong-and-ok {f(rep['wrong_and_ok'])} kappa (known classes) {rep['kappa_known']}")
    for c, v in rep["per_true_label"].items():
        rec = f(v["recall"]) if v["recall"] else "(not a model class)"
        print(f"  {c:>16}: n {v['n']:4d} recall {rec} shown as ok {f(v['shown_as_ok'])}")
    if a.save:
        print(f"saved {save_report(a.model, rep)}")
    if a.json:
        print(json.dumps(rep))
    return 0


def cmd_predict(a) -> int:
    from .inference import Predictor
    from .io import ImageReadError, read_image

    try:
        img = read_image(a.image)
    except (ImageReadError, OSError) as e:
        print(json.dumps({"file": a.image, "status": "error", "reason": str(e)}))
        return 1
    pred = Predictor.load(a.model)
    r = pred.predict([img])[0]
    print(json.dumps({"file": a.image, "model": pred.card.model_id, **r.to_dict()}, indent=2))
    return 0


def _csv_rows_done(partial: Path, n_cols: int) -> list[tuple[int, list[str]]]:
    """Complete data rows of an unfinished screening CSV: (byte offset just after the row, cells).

    A row counts when its last line ends with a newline and it has every column: a run killed in the
    middle of writing a row leaves at most that row incomplete, and it is dropped."""
    import csv

    offsets: list[int] = []
    pos = [0]

    def lines(f):
        for raw in f:
            pos[0] += len(raw)
            offsets.append(pos[0] if raw.endswith(b"\n") else -1)
            yield raw.decode("utf-8")

    done: list[tuple[int, list[str]]] = []
    with open(partial, "rb") as f:
        reader = csv.reader(lines(f))
        try:
            for i, cells in enumerate(reader):
                end = offsets[-1]
                if end < 0 or len(cells) != n_cols:
                    break
                if i:  # the header
                    done.append((end, cells))
        except (csv.Error, UnicodeDecodeError):
            pass
    return done


def cmd_screen(a) -> int:
    """Screen into a CSV written row by row to `<out>.partial`, renamed to `<out>` when the run ends, so
    `<out>` is never half-written; `--resume` continues an unfinished `<out>.partial`."""
    import csv

    from .inference import Predictor
    from .io import iter_image_sources
    from .report import _cell, results_to_csv
    from .scale import inputs_digest, parse_shard, shard_range, write_shard_meta
    from .screening import ROW_KEYS, ScreeningConfig, iter_screen, summary

    # The CLI is its user's own shell: it reads any path that user can read (no folder allow-list, which
    # only the app applies: see BCC_IMAGE_ROOTS in the README).
    sources = list(iter_image_sources(a.inputs))
    if not sources:
        raise UsageError("no image files found in the given inputs")
    if a.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if a.ray is not None and (a.resume or a.case):
        raise UsageError("--ray does not combine with --resume or --case")
    n_all, first = len(sources), 0
    if a.shard:
        try:
            shard = parse_shard(a.shard)
        except ValueError as e:
            raise UsageError(str(e)) from None
        first, stop = shard_range(n_all, a.batch_size, *shard)
        sources = sources[first:stop]
    pred = Predictor.load(a.model)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial, meta_file = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")
    meta = {"inputs": [str(x) for x in a.inputs], "n_sources": len(sources), "model": str(pred.model_dir),
            "model_id": pred.card.model_id, "batch_size": a.batch_size}
    if a.shard:
        meta["shard"] = a.shard
    blank = {k: None for k in ROW_KEYS if k != "thumbnail"} | {"file": "", "status": "error", "flags": []}
    header = results_to_csv([blank], pred.classes).split("\n", 1)[0]
    n_cols = len(next(csv.reader([header])))
    done: list[tuple[int, list[str]]] = []
    if a.resume and partial.is_file() and meta_file.is_file():
        old = json.loads(meta_file.read_text())
        if old != meta:
            diff = ", ".join(k for k in meta if old.get(k) != meta[k])
            raise UsageError(f"--resume: {partial} was started with other settings ({diff}); "
                             "run with the same inputs, model and --batch-size, or without --resume to start again")
        done = _csv_rows_done(partial, n_cols)
        # Continue at a batch boundary: the model then sees the same batches as in an uninterrupted run.
        done = done[:len(done) - len(done) % a.batch_size]
        for (_, cells), src in zip(done, sources):
            if cells[0] != _cell(src.name):
                raise UsageError(f"--resume: {partial} lists {cells[0]!r} where the inputs give {src.name!r}; "
                                 "run without --resume to start again")
        print(f"resuming after {len(done)} of {len(sources)} images", file=sys.stderr)
    elif a.resume:
        print(f"--resume: no unfinished run at {partial}; starting from the beginning", file=sys.stderr)
    counts = [{"status": c[1], "predicted_class": c[2] or None} for _, c in done]
    case = None
    if a.case:  # the database layer is imported only for a case (start-up time of a plain screen)
        from . import cases

        case = _open_case(a, pred, len(sources))
    meta_file.write_text(json.dumps(meta))
    t = time.perf_counter()
    with open(partial, "r+b" if done else "wb") as f:
        if done:
            f.truncate(done[-1][0])
            f.seek(done[-1][0])
        else:
            f.write((header + "\n").encode("utf-8"))
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sources), initial=len(done), desc="screening", unit="img",
                   disable=not (sys.stderr.isatty() and not a.quiet))
        if a.ray is not None:
            from .scale import ray_rows

            rows = ((None, st, c, line) for st, c, line in
                    ray_rows([str(x) for x in a.inputs], n_all, str(pred.model_dir), a.batch_size, a.ray or None,
                             start=first, stop=first + len(sources)))
        else:
            # Worker processes pay for their start-up (~1 s) only on runs of a few batches or more.
            procs = a.processes if a.processes is not None else len(sources) - len(done) >= 4 * a.batch_size
            cfg = ScreeningConfig(batch_size=a.batch_size, thumbnail=0, workers=a.workers, processes=procs)
            rows = ((r, r["status"], r["predicted_class"], None)
                    for r in iter_screen(sources[len(done):], pred, cfg))
        for row, status, predicted, line in rows:
            if row is not None:
                row.pop("thumbnail", None)
                head, line = results_to_csv([row], pred.classes).split("\n", 1)
                assert head == header, (head, header)  # every row has the keys of ROW_KEYS, in that order
            f.write(line.encode("utf-8"))
            f.flush()  # a killed run keeps every row written so far
            if case is not None:
                engine, user, case_id, stored = case
                seq = len(counts)
                if seq not in stored:
                    cases.add_result(engine, user, case_id, seq, row)
            counts.append({"status": status, "predicted_class": predicted})
            bar.update(1)
        bar.close()
        os.fsync(f.fileno())
    if a.shard:
        write_shard_meta(out, {"shard": shard[0], "of": shard[1], "start": first, "stop": first + len(sources),
                               "n_sources": n_all, "inputs_sha256": inputs_digest([s.name for s in
                                                                                  iter_image_sources(a.inputs)]),
                               "model_id": pred.card.model_id, "model_sha256": pred.card.to_dict().get("model_sha256"),
                               "batch_size": a.batch_size, "header": header})
    os.replace(partial, out)  # atomic: readers see the old file or the complete new one
    if case is not None:
        print(f"case {a.case!r} (id {case[2]}): {cases.finish(case[0], case[1], case[2])}", file=sys.stderr)
    meta_file.unlink(missing_ok=True)
    dt = time.perf_counter() - t
    s = summary(counts)
    print(f"screened {s['n']} images in {dt:.1f} s: ok {s['ok']}, review {s['review']}, error {s['error']} -> {a.out}")
    # A flagged cell is never a finding: classes count the cells shown as ok; the rest await review.
    pct = (lambda k: f"{100 * k / s['n']:.1f}%") if s["n"] else (lambda k: "n/a")  # noqa: E731
    print("  shown as ok (percent of all images):")
    for c in pred.classes:
        k = s["ok_per_class"].get(c, 0)
        print(f"  {c:>16}: {k:5d}  ({pct(k)})")
    suggested = ", ".join(f"{c} {s['per_class'].get(c, 0) - s['ok_per_class'].get(c, 0)}" for c in pred.classes
                          if s["per_class"].get(c, 0) > s["ok_per_class"].get(c, 0))
    print(f"  {'awaiting review':>16}: {s['review']:5d}  ({pct(s['review'])})" + (f"  suggested: {suggested}" if suggested else ""))
    print(f"  {'errors':>16}: {s['error']:5d}  ({pct(s['error'])})")
    return 0


def cmd_merge(a) -> int:
    """Merge the CSVs of `screen --shard i/n` into the single-process CSV (checked to be one whole run)."""
    from .scale import merge_shards

    try:
        r = merge_shards(a.parts, a.out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"merged {r['shards']} shards, {r['n']} rows -> {a.out}")
    return 0


def cmd_export(a) -> int:
    """Export the model's forward pass for screening without TensorFlow (runtime.onnx + runtime.json)."""
    from .export import export_runtime

    m = export_runtime(a.model)
    for b, r in m["backends"].items():
        print(f"  {b:>12}: " + (f"{r['ms_per_image']:.1f} ms/image, parity {r['parity']}" if "parity" in r else r["error"]))
    print(f"exported {a.model}: {m['file']} run by {m['backend']} (SHA-256 {m['sha256'][:12]}…)")
    return 0


def _open_case(a, pred, n_inputs: int):
    """(engine, user, case id, input positions already stored) for `screen --case LABEL --db DB`.

    The CLI runs as its shell user (recorded as `cli:<login>`); with --resume the latest unfinished case
    of that label continues, otherwise a new case is created. Rows are stored as they are produced.
    """
    import getpass

    from . import cases, store
    from .users import User
    from .verification import model_identity

    engine = store.open_store(a.db)
    user = User(f"cli:{getpass.getuser()}", "reviewer")
    if a.resume:
        open_ = [c for c in cases.list_cases(engine) if c["sample_label"] == a.case.strip()
                 and c["status"] in ("running", "incomplete")]
        if open_:
            return engine, user, open_[0]["id"], cases.screened_seqs(engine, open_[0]["id"])
    ident = model_identity(pred.model_dir)
    case_id = cases.create_case(engine, user, a.case, ident["model_id"], ident["weights_sha256"], n_inputs,
                                model_version=cases.model_version(pred.model_dir))
    return engine, user, case_id, set()


def cmd_compare(a) -> int:
    from .compare import compare

    backbones = [b.strip() for b in a.backbones.split(",") if b.strip()]
    weights = [w.strip() for w in a.weights.split(",")] if a.weights else None
    if weights and len(weights) not in (1, len(backbones)):
        raise UsageError("--weights takes one value or one per backbone")
    cfg = _train_cfg(argparse.Namespace(**{**vars(a), "backbone": backbones[0], "weights": "none"}))
    compare(_data(a), backbones, weights, a.out, cfg, limit_per_class=a.limit_per_class, progress=not a.quiet)
    return 0


def cmd_cv(a) -> int:
    from .training import cross_validate

    cfg = _train_cfg(a)
    res = cross_validate(_data(a), a.out, cfg, k=a.folds, progress=not a.quiet, limit_per_class=a.limit_per_class)
    for key, v in res["summary"].items():
        print(f"{key:>9}: {v['mean']:.4f} ± {v['std']:.4f}")
    return 0


def cmd_explain_check(a) -> int:
    """Explanation sanity checks on a few images per class; writes explanation_checks.json beside the model."""
    import numpy as np

    from .data import list_imagefolder, subset
    from .explain import CHECKS_FILE, check_methods
    from .inference import Predictor
    from .io import read_image

    p = Predictor.load(a.model)
    ds = list_imagefolder(a.images, classes=[c for c in p.classes if (Path(a.images) / c).is_dir()])
    ds = subset(ds, a.per_class, seed=0)
    x = np.stack([p.prepare(read_image(f))[0] for f in ds.paths])
    res = check_methods(p, x)
    res["images"] = {"root": Path(a.images).name, "n": len(ds.paths), "per_class": a.per_class}
    (Path(a.model) / CHECKS_FILE).write_text(json.dumps(res, indent=2))
    print(json.dumps({m: {k: r[k] for k in ("class_difference", "randomised_similarity", "passed")}
                      for m, r in res["methods"].items()}, indent=2))
    return 0


def cmd_users(a) -> int:
    """users add NAME --role R (password from $BCC_NEW_PASSWORD or a prompt) | list | disable NAME."""
    import getpass

    from . import store, users

    engine = store.open_store(a.db)
    if a.action == "list":
        for u in users.list_users(engine):
            print(f"{u['username']:<20} {u['role']:<9} {'active' if u['active'] else 'disabled':<8} {u['created_at']}")
        return 0
    if not a.name:
        raise UsageError(f"users {a.action} needs a user name")
    if a.action == "add":
        if not a.role:
            raise UsageError(f"users add needs --role ({', '.join(store.ROLES)})")
        pw = os.environ.get("BCC_NEW_PASSWORD") or getpass.getpass(f"Password for {a.name}: ")
        try:
            users.add_user(engine, a.name, pw, a.role, actor=f"cli:{getpass.getuser()}")
        except ValueError as e:
            raise UsageError(str(e)) from None
        print(f"added {a.name} ({a.role})")
    else:
        users.set_active(engine, a.name, a.action == "enable", actor=f"cli:{getpass.getuser()}")
        print(f"{a.action}d {a.name}")
    return 0


def cmd_audit(a) -> int:
    """audit verify: recompute the hash chain and check every row; exit 1 naming the first problem."""
    from . import store, trail

    v = trail.verify(store.open_store(a.db))
    if v["ok"]:
        print(f"audit trail verifies: {v['entries']} entries, every row accounted for")
        return 0
    first = v["problems"][0]
    named = (f"first broken entry: {v['first_broken']}" if v["first_broken"] is not None
             else f"first problem: {first['entity']} row {first['id']}")
    print(f"AUDIT TRAIL BROKEN: {len(v['problems'])} problem(s); {named}")
    for p in v["problems"][:20]:
        where = f"entry {p['entry']}" if "entry" in p else f"{p['entity']} row {p['id']}"
        print(f"  {where}: {p['what']}")
    return 1


def cmd_case(a) -> int:
    """case list [--search TEXT] | show ID | export ID --format F --out FILE (pseudonymised unless --include)."""
    from . import cases, store

    engine = store.open_store(a.db)
    if a.action == "export":
        return _case_export(engine, a)
    if a.action == "list":
        for c in cases.list_cases(engine, a.search or ""):
            print(f"{c['id']:>5}  {c['sample_label']:<24} {c['status']:<10} {c['n_inputs']:>6} inputs  "
                  f"{c['model_id']}  {c['created_by']}  {c['created_at']}")
        return 0
    if a.id is None:
        raise UsageError("case show needs a case id")
    case, rows = cases.case_rows(engine, a.id)
    print(json.dumps({"case": case, "results": rows}, indent=2, default=str))
    return 0


def _case_export(engine, a) -> int:
    """One export of a case, as the app makes it, recorded in the trail (as cli:<login>) with its SHA-256."""
    import getpass
    import hashlib

    from . import cases
    from .report import case_document, case_to_csv, case_to_fhir, case_to_json, case_to_pdf
    from .users import User

    if a.id is None or not a.out:
        raise UsageError("case export needs a case id, --format and --out")
    case, rows = cases.case_rows(engine, a.id)
    if a.format in ("fhir", "pdf") and case["status"] != "signed":
        raise UsageError(f"case {a.id} is {case['status']}: the report (fhir, pdf) is issued once it is signed")
    inc = set(a.include or [])
    doc = case_document(case, rows, cases.history(engine, a.id), include_label="label" in inc,
                        include_names="names" in inc, include_comments="comments" in inc)
    data = {"csv": lambda: case_to_csv(doc).encode(), "json": lambda: case_to_json(doc).encode(),
            "fhir": lambda: json.dumps(case_to_fhir(doc, patient_ref=a.patient), indent=2).encode(),
            "pdf": lambda: case_to_pdf(doc, {r["seq"]: png for r in rows
                                             if (png := cases.cell_image(engine, r.get("thumb_sha256")))})}[a.format]()
    Path(a.out).write_bytes(data)
    cases.record_export(engine, User(f"cli:{getpass.getuser()}", "viewer"), a.id,
                        {"formats": [a.format], "options": sorted(inc) + (["patient_reference"] if a.patient else []),
                         "sha256": {a.format: hashlib.sha256(data).hexdigest()}})
    print(f"wrote {a.out} ({a.format}, {'pseudonymised' if not inc & {'label', 'names'} else 'identified'})")
    return 0


def cmd_replay_bank(a) -> int:
    from .replay import build_for_model

    r = build_for_model(a.model, a.data, per_class_train=a.per_class_train, progress=not a.quiet)
    print(f"wrote {r['file']} ({r['bytes'] / 1e6:.1f} MB): " + ", ".join(f"{k} {v}" for k, v in r["rows"].items()))
    return 0


def _adapt_from_audit(a) -> int:
    """`adapt --from-audit`: the reviewed cells become a temporary ImageFolder, then the usual adaptation;
    the new card names the decisions (ids, cases, image hashes) it learnt from."""
    import tempfile

    from . import lab_models, store

    engine = store.open_store(a.from_audit or None)
    cells, summary = lab_models.reviewed_from_store(engine, a.images, signed_only=not a.include_unsigned,
                                                    sample_labels=a.case or None)
    print(f"reviewed cells: {summary['reviewed']} ({'signed cases' if summary['signed_only'] else 'all cases'}); "
          f"images kept with their case: {summary['images_kept_in_store']}, found under --images: "
          f"{summary['images_found']}, missing: {summary['images_missing']}; used: {summary['cells_used']}")
    if not cells:
        raise UsageError("no reviewed cell could be matched to an image: give --images DIR (the folders holding "
                         "the screened images) or --include-unsigned")
    with tempfile.TemporaryDirectory(prefix="bcc-reviewed-") as tmp:
        folder = lab_models.write_reviewed_cells([(c["class"], c["name"], c["data"]) for c in cells], Path(tmp) / "cells")
        rc = cmd_adapt(argparse.Namespace(**{**vars(a), "from_audit": None, "data": str(folder),
                                             "lab": a.lab or "reviewed cells"}))
    lab_models.record_review_source(Path(a.out), cells, summary)
    return rc


def cmd_adapt(a) -> int:
    from .adapt import AdaptConfig, adapt, describe_review, untaught_warning
    from .replay import CUT_LAYERS

    if a.from_audit is not None:
        return _adapt_from_audit(a)
    cfg = AdaptConfig(lab=a.lab or Path(a.data).name, add_classes=a.add_classes, seed=a.seed,
                      class_map=_class_map(a.class_map),
                      **({"backbone_layers": CUT_LAYERS} if a.fine_tune else {}),
                      **({"cross_fit": False} if a.no_cross_fit else {}),
                      **({"colour_features": False} if a.no_colour else {}),
                      **({"second_opinion": False} if a.no_second_opinion else {}),
                      **({"doubted_labels": "list"} if a.keep_doubted else {}),
                      **({"test_time_views": a.views} if a.views is not None else {}))
    bar = None
    if not a.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=100, desc="adapt", bar_format="{l_bar}{bar}| {n:.0f}% {postfix}")

    def on_progress(fraction: float, message: str) -> None:
        if bar is not None:
            bar.n = round(100 * fraction)
            bar.set_postfix_str(message)
            bar.refresh()

    res = adapt(a.model, a.data, a.out, cfg, progress=on_progress)
    if bar is not None:
        bar.close()
    b, af = res["before"], res["after"]
    nc = res["n_cells"]
    cells = (f"{nc['fit'] + nc['calibration']} cells, all fitted, {nc['calibration']} of them also calibrating"
             if res["cross_fitted"] else f"{nc['fit']} fitting + {nc['calibration']} calibration cells")
    print(f"saved {a.out} (lab {cfg.lab!r}, {cells}, {res['time_s']:.0f} s)")
    print("  " + ("the top of the network and the head learnt the lab" if res["backbone_fine_tuned"]
                  else f"head only: {res['head_only_because']}"))
    print("  " + ("the head also reads each image's chroma histogram" if res["colour_features"]
                  else f"no chroma histogram: {res['colour_not_used_because']}"))
    if res["second_opinion"]:
        print("  second opinion: a cell is shown as ok only when a head reading the features alone names the same "
              "class")
    if res["untaught_white_cells"]:
        print(f"  warning: {untaught_warning(res['untaught_white_cells'])}")
    if res["cross_fitted"]:
        print("  cross-fitted: the head learnt from every reviewed cell; each calibration cell was scored by a head "
              "fitted without it")
    print(f"  {describe_review(res['review_rule'])}")
    print(f"  lab calibration part: shown as ok {b['ok_fraction']:.1%} -> {af['ok_fraction']:.1%}, wrong and ok "
          f"{b['wrong_ok_of_all']:.1%} -> {af['wrong_ok_of_all']:.1%}")
    for c, r in af["recall"].items():
        print(f"  {c:>16}: recall {b['recall'].get(c, float('nan')):.2f} -> {r:.2f}")
    print(f"  parent test macro-F1 (replay): {res['parent_test_macro_f1']['before']:.4f} -> "
          f"{res['parent_test_macro_f1']['after']:.4f}")
    if res["labels_left_out"]:
        print(f"  left out {len(res['labels_left_out'])} reviewed cell(s) whose label a first pass doubted "
              f"and adapted without them (--keep-doubted learns them as labelled; re-check them): "
              f"{', '.join(res['labels_left_out'])}")
    doubted = res["labels_to_recheck"]
    if doubted:
        print(f"  {len(doubted)} reviewed cell(s) whose label the model doubts (re-check them; the model learnt the "
              f"labels as given):")
        for d in doubted:
            print(f"    {d['file']}: labelled {d['label']} ({d['p_label']:.0%}), looks like {d['suggested']} "
                  f"({d['p_suggested']:.0%})")
    elif doubted is not None:
        print("  labels: the model doubts none of the reviewed cells' labels")
    return 0


def _add_train_opts(p):
    p.add_argument("--data", required=True, action="append",
                   help="ImageFolder root: <root>/<class>/<image>; repeat for several sources, optionally NAME=PATH "
                        "(default name: the folder name). A groups.csv (file,cell_group) at a root keeps cells together")
    p.add_argument("--classes", help="comma-separated classes in label order (default: every folder of every "
                                     "source); folders of other classes are skipped and listed in the card")
    p.add_argument("--class-map", action="append", metavar="FOLDER=CLASS",
                   help="read a source's folder as a class, e.g. neutrophil=seg_neutrophil (repeatable)")
    p.add_argument("--task", help="task name recorded in the card (default: the data folder names joined by +)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--aug-views", type=int, default=4, help="augmented views per training image (frozen fast path)")
    p.add_argument("--augment", choices=["full", "study1", "none", "crosslab"], default="full",
                   help="crosslab: full + amplitude mixing between classes, LAB jitter, tight crops, strong blur "
                        "(for data whose classes come from different labs, e.g. pbs5)")
    p.add_argument("--preprocess", choices=["cell", "letterbox"], default="cell")
    p.add_argument("--stain-norm", choices=["reinhard", "none"], default="reinhard")
    p.add_argument("--clahe", action="store_true", help="CLAHE contrast enhancement (Study 1)")
    p.add_argument("--fine-tune-layers", type=int, default=0, help="unfreeze the last N backbone layers after head training")
    p.add_argument("--fine-tune-epochs", type=int, default=2)
    p.add_argument("--fine-tune-lr", type=float, default=1e-5)
    p.add_argument("--swa-start", type=int, default=-1,
                   help="fine-tuning: run every epoch and average the weights from this epoch on (-1: early stopping)")
    p.add_argument("--fine-tune-cached", action="store_true",
                   help="fine-tune on the head stage's views, cached where the fine-tuned layers begin "
                        "(the frozen layers run once per view instead of once per epoch)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--near-duplicate-distance", type=int, default=4,
                   help="pHash Hamming radius (of 64 bits) grouping near-duplicate images before the split")
    p.add_argument("--limit-per-class", type=int, help="train on a per-class subset (quick checks)")
    p.add_argument("--cache", action="store_true", help="reuse preprocessed inputs from .cache/ (experiments)")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bcc_core", description="Blood-cell classification: decision support for a second reader, not a diagnosis.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser("train", help="train a model and save it with its card")
    _add_train_opts(t)
    t.add_argument("--backbone", default="mobilenetv2", choices=["mobilenetv2", "efficientnetb0", "resnet50", "small_cnn"])
    t.add_argument("--weights", default="imagenet", help="imagenet | PATH to weights file | none")
    t.add_argument("--out", required=True, help="model directory to write")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("evaluate", help="evaluate a model on its recorded split or a whole folder")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test", choices=["train", "val", "cal_a", "cal_b", "test", "all"])
    e.add_argument("--json", action="store_true", help="last line printed is one JSON object")
    e.add_argument("--external", action="store_true",
                   help="--data is a labelled folder from another lab: every image, unknown cell types included, "
                        "per class with 95%% intervals, shown-as-ok and wrong-and-ok")
    e.add_argument("--class-map", action="append", metavar="FOLDER=CLASS", help="with --external: folder name to class")
    e.add_argument("--save", metavar="NAME", help="with --external: keep the report as <model>/external/NAME.json")
    e.set_defaults(func=cmd_evaluate)
    pr = sub.add_parser("predict", help="classify one image (JSON: class, probabilities, flags)")
    pr.add_argument("image")
    pr.add_argument("--model", default=None, help="model directory (default: models/pbs5-mobilenetv2)")
    pr.set_defaults(func=cmd_predict)
    s = sub.add_parser("screen", help="screen image files, folders and .zip archives into a CSV")
    s.add_argument("inputs", nargs="+")
    s.add_argument("--model", default=None)
    s.add_argument("--out", required=True, help="results CSV")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--resume", action="store_true",
                   help="continue an unfinished run (its rows are in OUT.partial) with the same inputs, model and "
                        "--batch-size, without repeating or losing a row")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--case", metavar="LABEL", help="also record the run as a case (sample label) in the database")
    s.add_argument("--db", help="with --case: database URL or SQLite file (default: $BCC_DATABASE_URL, else "
                                "$BCC_DATA_DIR/bcc.sqlite)")
    s.add_argument("--workers", type=int, default=2, help="decode/prepare workers beside the model (default 2)")
    s.add_argument("--processes", action=argparse.BooleanOptionalAction, default=None,
                   help="prepare images in worker processes, or with --no-processes in threads (default: "
                        "processes from 4 batches of images on)")
    s.add_argument("--shard", metavar="I/N", help="screen only part I of N (whole batches; 0-based); "
                                                   "join the parts with 'merge'")
    s.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="screen on Ray Data (pip install .[scale]): a running cluster's address, or none for a "
                        "local Ray instance")
    s.set_defaults(func=cmd_screen)
    mg = sub.add_parser("merge", help="merge the CSVs of screen --shard i/n into one, checked for completeness")
    mg.add_argument("parts", nargs="+", help="the shard CSVs (any order)")
    mg.add_argument("--out", required=True)
    mg.set_defaults(func=cmd_merge)
    ex = sub.add_parser("export", help="export a model for screening without TensorFlow (ONNX Runtime / OpenVINO)")
    ex.add_argument("--model", required=True, help="model folder (model.keras + model_card.json)")
    ex.set_defaults(func=cmd_export)
    cv = sub.add_parser("cv", help="grouped stratified k-fold cross-validation (mean ± std over folds)")
    _add_train_opts(cv)
    cv.add_argument("--backbone", default="mobilenetv2", choices=["mobilenetv2", "efficientnetb0", "resnet50", "small_cnn"])
    cv.add_argument("--weights", default="imagenet", help="imagenet | PATH to weights file | none")
    cv.add_argument("--folds", type=int, default=5)
    cv.add_argument("--out", required=True, help="folder for the fold models and cv.json")
    cv.set_defaults(func=cmd_cv)
    c = sub.add_parser("compare", help="train several backbones under identical conditions; write a comparison table")
    _add_train_opts(c)
    c.add_argument("--backbones", required=True, help="comma-separated, e.g. mobilenetv2,efficientnetb0,resnet50,small_cnn")
    c.add_argument("--weights", help="comma-separated per backbone: imagenet | PATH | none (default: none)")
    c.add_argument("--out", required=True, help="output folder for models and comparison.csv/.md")
    c.set_defaults(func=cmd_compare)
    db_help = "database URL or SQLite file (default: $BCC_DATABASE_URL, else $BCC_DATA_DIR/bcc.sqlite)"
    us = sub.add_parser("users", help="local users and roles (viewer, reviewer, signer, admin)")
    us.add_argument("action", choices=["add", "list", "disable", "enable"])
    us.add_argument("name", nargs="?")
    us.add_argument("--role", choices=["viewer", "reviewer", "signer", "admin"])
    us.add_argument("--db", help=db_help)
    us.set_defaults(func=cmd_users)
    au = sub.add_parser("audit", help="verify the tamper-evident audit trail (exit 1 naming the first broken entry)")
    au.add_argument("action", choices=["verify"])
    au.add_argument("--db", help=db_help)
    au.set_defaults(func=cmd_audit)
    ca = sub.add_parser("case", help="list, show or export saved cases")
    ca.add_argument("action", choices=["list", "show", "export"])
    ca.add_argument("id", nargs="?", type=int)
    ca.add_argument("--search", help="text in the sample label")
    ca.add_argument("--format", choices=["csv", "json", "fhir", "pdf"], default="json", help="export: file format")
    ca.add_argument("--out", help="export: the file to write")
    ca.add_argument("--include", action="append", choices=["label", "names", "comments"],
                    help="export: also include the sample label / file names / comments (pseudonymised otherwise)")
    ca.add_argument("--patient", help="export (fhir): a FHIR reference for the subject, e.g. Patient/123")
    ca.add_argument("--db", help=db_help)
    ca.set_defaults(func=cmd_case)
    ex = sub.add_parser("explain-check", help="explanation sanity checks (class difference, model randomisation); "
                                              "the app offers only the methods that pass")
    ex.add_argument("--model", required=True)
    ex.add_argument("--images", required=True, help="ImageFolder of the model's task (class folders)")
    ex.add_argument("--per-class", type=int, default=2)
    ex.set_defaults(func=cmd_explain_check)
    rb = sub.add_parser("replay-bank", help="write a model's replay bank (replay.npz) from its split and the dataset")
    rb.add_argument("--model", required=True)
    rb.add_argument("--data", required=True, help="the dataset root the model was trained on")
    rb.add_argument("--per-class-train", type=int, default=150, help="training images kept per class")
    rb.add_argument("--quiet", action="store_true")
    rb.set_defaults(func=cmd_replay_bank)
    ad = sub.add_parser("adapt", help="adapt a model to a lab from the lab's reviewed cells (new model folder)")
    ad.add_argument("--model", required=True, help="parent model directory (needs its replay.npz)")
    src = ad.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="ImageFolder of the lab's reviewed cells: <dir>/<class>/<image>")
    src.add_argument("--from-audit", nargs="?", const="", metavar="DATABASE_URL",
                     help="reviewers' confirmed/corrected cells from the case store (default: $BCC_DATABASE_URL or "
                          "the data folder's bcc.sqlite): images the case kept, else matched by content hash under --images")
    ad.add_argument("--images", action="append", default=[], metavar="DIR",
                    help="with --from-audit: folder holding screened images the case did not keep (repeatable)")
    ad.add_argument("--include-unsigned", action="store_true",
                    help="with --from-audit: also decisions in cases not yet signed (default: signed cases only)")
    ad.add_argument("--case", action="append", default=[], metavar="LABEL",
                    help="with --from-audit: only these cases (sample labels; repeatable)")
    ad.add_argument("--out", required=True, help="new model directory to write")
    ad.add_argument("--lab", help="lab name recorded in the card (default: the data folder name)")
    ad.add_argument("--add-classes", action="store_true",
                    help="a folder that is not a model class becomes a new class (needs enough distinct cells)")
    ad.add_argument("--class-map", action="append", metavar="FOLDER=CLASS",
                    help="with --data: read a folder as a model class, e.g. neutrophil=seg_neutrophil (repeatable)")
    ad.add_argument("--seed", type=int, default=0)
    depth = ad.add_mutually_exclusive_group()
    depth.add_argument("--fine-tune", action="store_true",
                    help="also fine-tune the backbone's top blocks (from 15 reviewed cells a class, when the parent's "
                         "replay bank holds their activations); the default retrains the head alone on the parent's "
                         "frozen features, which named a new lab's cells better (README: Learning a new lab)")
    depth.add_argument("--head-only", action="store_true",
                    help="the default (kept so that scripts written when fine-tuning was the default still run)")
    ad.add_argument("--no-cross-fit", action="store_true",
                    help="fit the head on the fitting part only (AdaptConfig.cross_fit; the default fits it on every "
                         "reviewed cell and scores each calibration cell by a head fitted without it)")
    ad.add_argument("--no-colour", action="store_true",
                    help="the new head reads the pooled features only, not each image's chroma histogram beside them "
                         "(AdaptConfig.colour_features)")
    ad.add_argument("--no-second-opinion", action="store_true",
                    help="show a cell as ok on the histogram-reading head's word alone (AdaptConfig.second_opinion; "
                         "by default a head reading the features alone must name the same class)")
    ad.add_argument("--keep-doubted", action="store_true",
                    help="learn the reviewed cells whose label the model doubts as labelled (only list them, to "
                         "re-check; AdaptConfig.doubted_labels = 'list'). By default adapt runs a second time without "
                         "them (at most a quarter of a class), which doubles the time when it doubts any")
    ad.add_argument("--views", type=int, choices=range(1, 9), metavar="{1..8}",
                    help="the adapted model scores each image by its logits averaged over the image and its flips / "
                         "90° rotations, this many in all (default 8, AdaptConfig.test_time_views; 8 costs 8x the "
                         "forward pass); the trust layer is fitted on scores made the same way")
    ad.add_argument("--quiet", action="store_true")
    ad.set_defaults(func=cmd_adapt)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else 2
    if not a.command:
        parser.print_help()
        return 2
    try:
        return a.func(a)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
