"""Screening beyond one process: shards for plain job schedulers (`screen --shard i/n` + `merge`) and
Ray Data (`screen --ray [ADDRESS]`, the optional `scale` extra).

Both cut the input list at batch boundaries of the single-process run (`batch_size` images from the
first input on), so every image is screened in exactly the batch it would have been in alone, and the
merged CSV equals the single-process one line for line. A shard writes its CSV and `<out>.shard.json`
(which inputs, which part, which model); `merge_shards` checks that the parts are one complete,
consistent set before writing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SHARD_SUFFIX = ".shard.json"


def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" → (i, n) with 0 ≤ i < n; ValueError otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_range(n_sources: int, batch_size: int, i: int, n: int) -> tuple[int, int]:
    """[start, stop) of shard i of n: whole batches of the single-process run, spread evenly."""
    n_batches = -(-n_sources // batch_size)
    lo, hi = i * n_batches // n, (i + 1) * n_batches // n
    return min(lo * batch_size, n_sources), min(hi * batch_size, n_sources)


def inputs_digest(names: list[str]) -> str:
    """SHA-256 of the ordered input names: shards of one run list the same inputs in the same order."""
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def write_shard_meta(out: Path, meta: dict) -> Path:
    p = out.with_name(out.name + SHARD_SUFFIX)
    p.write_text(json.dumps(meta, indent=2))
    return p


def merge_shards(parts: list[str | Path], out: str | Path) -> dict:
    """Concatenate shard CSVs into the single-process CSV, after checking that they are the n parts of
    one run (same inputs, model, batch size and header; every part present once; each part's row count
    is its range's).

    Returns:
        {"n": rows written, "shards": n}.

    Raises:
        ValueError: naming what is missing or inconsistent (nothing is written).
    """
    metas = []
    for p in map(Path, parts):
        mf = p.with_name(p.name + SHARD_SUFFIX)
        if not mf.is_file():
            raise ValueError(f"{p}: no {mf.name} beside it; was it written by screen --shard?")
        metas.append((json.loads(mf.read_text()), p))
    metas.sort(key=lambda m: m[0]["shard"])
    first = metas[0][0]
    keys = ("of", "n_sources", "inputs_sha256", "model_id", "model_sha256", "batch_size", "header")
    for m, p in metas:
        diff = [k for k in keys if m.get(k) != first.get(k)]
        if diff:
            raise ValueError(f"{p} belongs to another run than {metas[0][1]} ({', '.join(diff)} differ)")
    found = [m["shard"] for m, _ in metas]
    if found != list(range(first["of"])):
        missing = sorted(set(range(first["of"])) - set(found))
        dup = sorted({s for s in found if found.count(s) > 1})
        raise ValueError(f"shards of {first['of']}: " + (f"missing {missing}" if missing else "") +
                         (f" given twice {dup}" if dup else ""))
    lines_all = [first["header"] + "\n"]
    expect = 0
    for m, p in metas:
        if m["start"] != expect:
            raise ValueError(f"{p}: starts at input {m['start']}, expected {expect}")
        data = p.read_text(encoding="utf-8")
        head, _, body = data.partition("\n")
        if head != first["header"]:
            raise ValueError(f"{p}: header differs from the shard metadata")
        import csv
        import io

        rows = list(csv.reader(io.StringIO(body)))
        if len(rows) != m["stop"] - m["start"]:
            raise ValueError(f"{p}: {len(rows)} rows, expected {m['stop'] - m['start']} (is the shard finished?)")
        lines_all.append(body)
        expect = m["stop"]
    if expect != first["n_sources"]:
        raise ValueError(f"the shards cover {expect} of {first['n_sources']} inputs")
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write("".join(lines_all))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return {"n": expect, "shards": first["of"]}


class _ScreenActor:
    """A Ray actor: the exported model loaded once, the run's input list enumerated once; each call
    screens whole batches given as [start, stop) and returns their CSV lines."""

    def __init__(self, inputs: list[str], model_dir: str | None, batch_size: int):
        import cv2

        from .inference import Predictor
        from .io import iter_image_sources

        cv2.setNumThreads(1)
        self.sources = list(iter_image_sources(inputs))
        self.pred = Predictor.load(model_dir)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .report import results_to_csv
        from .screening import ScreeningConfig, iter_screen

        starts, lines, status, cls = [], [], [], []
        cfg = ScreeningConfig(batch_size=self.batch_size, workers=1, thumbnail=0, prefetch=0)
        for lo, hi in zip(batch["start"], batch["stop"]):
            for k, row in enumerate(iter_screen(self.sources[int(lo):int(hi)], self.pred, cfg)):
                row.pop("thumbnail", None)
                starts.append(int(lo) + k)
                lines.append(results_to_csv([row], self.pred.classes).split("\n", 1)[1])
                status.append(row["status"])
                cls.append(row["predicted_class"] or "")
        return {"i": np.array(starts, np.int64), "line": np.array(lines, dtype=object),
                "status": np.array(status, dtype=object), "predicted_class": np.array(cls, dtype=object)}


def ray_rows(inputs: list[str], n_sources: int, model_dir: str | None, batch_size: int, address: str | None,
             actors: int | None = None, start: int = 0, stop: int | None = None):
    """Screen inputs[start:stop] on Ray Data, yielding (status, predicted_class, CSV line) in input order.

    Each actor of the pool (`actors`, default: the cluster's CPUs, up to 1 per 2 CPUs) holds the
    exported model; work is handed out as whole batches of the single-process run, and Ray keeps their
    order. `address`: a running cluster ("auto", "ray://host:10001"); None starts a local Ray instance.
    Every machine needs the project installed (`pip install .[scale]`) and the inputs and model folder
    at the same paths (a shared file system).
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    stop = n_sources if stop is None else stop
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    items = [{"start": s, "stop": min(s + batch_size, stop)} for s in range(start, stop, batch_size)]
    if not items:
        return
    n_cpu = int(ray.cluster_resources().get("CPU", 1))
    size = actors or max(1, n_cpu // 2)
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), max(1, 4 * size)))
    ds = ds.map_batches(_ScreenActor, batch_size=1, concurrency=size, num_cpus=min(2, n_cpu),
                        fn_constructor_kwargs={"inputs": list(inputs), "model_dir": model_dir,
                                               "batch_size": batch_size})
    expect = start
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, line, st, c in zip(b["i"], b["line"], b["status"], b["predicted_class"]):
            if int(i) != expect:
                raise RuntimeError(f"Ray returned input {int(i)} where {expect} was due")
            expect += 1
            yield str(st), (str(c) or None), str(line)
    if expect != stop:
        raise RuntimeError(f"Ray returned {expect - start} of {stop - start} rows")
