"""Batch screening: any number of image sources → one result row per image, progress via a callback.

Images are decoded, searched for their cell, quality-checked and normalised by workers (threads, or
processes with `ScreeningConfig.processes`) while the model runs on the batches before them; batches go
to the model whole and in input order, so rows come out in input order and a resumed run sees the same
batches. A bad file becomes an `error` row with its reason, never a crash and never a silent skip. A
failure while preparing one image makes that image an error row; a failure of the model on one batch
makes that batch's images error rows, and the run goes on. :func:`iter_screen` yields rows as they are
produced, holding a few batches in memory, so a caller can write them out (the `screen` CLI does)
instead of keeping them all. Rows are `bcc_core.results.ScreenResult.to_row()` dicts; `iter_results`
yields the typed results themselves.
"""

from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np

from .io import content_hash, read_image
from .results import ROW_KEYS, ModelIdentity, ScreenResult

__all__ = ["ROW_KEYS", "ScreeningConfig", "iter_results", "iter_screen", "screen", "summary"]


@dataclass(frozen=True)
class ScreeningConfig:
    """batch_size: images per model call; workers: decode/prepare workers; thumbnail: px kept per image
    for the results table (48 px by default, 96 on demand; 0: none); processes: prepare in worker
    processes instead of threads (real Predictors only: a process gets the card's preprocessing and
    quality settings, not the model); prefetch: batches prepared ahead of the one the model runs."""

    batch_size: int = 32
    workers: int = 2
    thumbnail: int = 96
    processes: bool = False
    prefetch: int = 2


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _prepare_bytes(name: str, data: bytes, predictor, thumbnail: int) -> dict:
    """Decode, cell search, quality gate, normalisation and thumbnail of one image's bytes."""
    try:
        img = read_image(data)
    except Exception as e:
        # read_image only sees bytes here; name the file the user knows.
        return {"file": name, "error": _reason(e).replace("<bytes>", name)}
    try:
        model_input, quality = predictor.prepare(img)
    except Exception as e:
        return {"file": name, "error": f"{name}: the image could not be prepared for the model "
                                       f"({type(e).__name__}: {_reason(e)})"}
    thumb = cv2.resize(img, (thumbnail, thumbnail), interpolation=cv2.INTER_AREA) if thumbnail else None
    return {"file": name, "sha256": content_hash(data), "input": model_input, "quality": quality, "thumbnail": thumb}


def _read(src) -> bytes | dict:
    try:
        return src.load()
    except Exception as e:
        return {"file": src.name, "error": _reason(e).replace("<bytes>", src.name)}


def _load(src, predictor, cfg: ScreeningConfig) -> dict:
    data = _read(src)
    return data if isinstance(data, dict) else _prepare_bytes(src.name, data, predictor, cfg.thumbnail)


class _Preparer:
    """What a worker process needs of a Predictor to prepare an image: its card's settings, not its model."""

    def __init__(self, pcfg, qcfg):
        self.pcfg, self.qcfg = pcfg, qcfg

    def prepare(self, img):
        from .inference import Predictor

        return Predictor.prepare(self, img)


def _worker_init() -> None:
    # One worker is one core's worth of work: OpenCV's own thread pool only adds contention.
    cv2.setNumThreads(1)


def _identity(predictor) -> ModelIdentity:
    card = getattr(predictor, "card", None)
    return ModelIdentity.from_card(card) if card is not None else ModelIdentity()


def _batch_results(items, predictor, cfg: ScreeningConfig, model: ModelIdentity) -> list[ScreenResult]:
    good = [it for it in items if "error" not in it]
    try:
        preds = predictor.predict_inputs(np.stack([it["input"] for it in good]), [it["quality"] for it in good],
                                         cfg.batch_size) if good else []
        if len(preds) != len(good):
            raise RuntimeError(f"the model returned {len(preds)} results for {len(good)} images")
    except Exception as e:
        msg = (f"the model failed on this batch of {len(good)} image(s) ({type(e).__name__}: {_reason(e)}); "
               "screen the image again")
        return [ScreenResult.error(it["file"], it["error"] if "error" in it else f"{it['file']}: {msg}", model)
                for it in items]
    preds = iter(preds)
    return [ScreenResult.error(it["file"], it["error"], model) if "error" in it else
            ScreenResult.from_prediction(it["file"], next(preds), it["sha256"], it["thumbnail"], model)
            for it in items]


class _Pipeline:
    """Submits sources to the workers in input order, at most `ahead` in flight; `next()` returns the
    prepared item of the oldest. A worker process that dies makes its image an error row, and a new pool
    takes the images that were still waiting."""

    def __init__(self, sources, predictor, cfg: ScreeningConfig):
        self.sources, self.cfg, self.predictor = sources, cfg, predictor
        self.ahead = max(1, cfg.prefetch + 1) * cfg.batch_size
        self.next_index = 0
        self.pending: deque[tuple[object, Future]] = deque()
        self.preparer = None
        if cfg.processes and hasattr(predictor, "pcfg") and hasattr(predictor, "qcfg"):
            self.preparer = _Preparer(predictor.pcfg, predictor.qcfg)
        self.pool = self._new_pool()

    def _new_pool(self):
        if self.preparer is None:
            return ThreadPoolExecutor(self.cfg.workers)
        import multiprocessing as mp

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["bcc_core.screening", "bcc_core.inference"])
        return ProcessPoolExecutor(self.cfg.workers, mp_context=ctx, initializer=_worker_init)

    def _submit(self, src) -> Future:
        if self.preparer is None:
            return self.pool.submit(_load, src, self.predictor, self.cfg)
        data = _read(src)  # archives and file limits stay in this process; workers get bytes
        if isinstance(data, dict):
            f: Future = Future()
            f.set_result(data)
            return f
        with neutral_main():
            return self.pool.submit(_prepare_bytes, src.name, data, self.preparer, self.cfg.thumbnail)

    def fill(self) -> None:
        while len(self.pending) < self.ahead and self.next_index < len(self.sources):
            src = self.sources[self.next_index]
            self.pending.append((src, self._submit(src)))
            self.next_index += 1

    def next(self) -> dict:
        src, fut = self.pending.popleft()
        try:
            return fut.result()
        except BrokenExecutor as e:
            waiting = [s for s, _ in self.pending]
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
            self.pending = deque((s, self._submit(s)) for s in waiting)
            return {"file": src.name, "error": f"{src.name}: the worker preparing this image stopped "
                                               f"({type(e).__name__}: {_reason(e)})"}
        except Exception as e:
            return {"file": src.name, "error": f"{src.name}: the image could not be prepared for the model "
                                               f"({type(e).__name__}: {_reason(e)})"}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def neutral_main():
    """A new worker process re-imports the parent's `__main__` from its file; when that is a script
    with side effects (a Streamlit page run in-process, a test runner's app), the worker dies. Workers
    are started inside submit(), so for its duration `__main__` is an empty module: nothing is re-imported."""
    import sys
    import types

    saved = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = saved


@contextlib.contextmanager
def _cpu_limits(cfg: ScreeningConfig):
    """While screening: OpenCV and BLAS single-threaded in this process. The workers and the model's own
    threads already use the cores; nested pools on top oversubscribe them (measured: a 1280x1280 matrix-
    vector product 20x slower with 2 OpenBLAS threads on a busy 2-core machine)."""
    old = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it, only OpenCV is limited
        threadpool_limits = None
    try:
        with threadpool_limits(1, "blas") if threadpool_limits else contextlib.nullcontext():
            yield
    finally:
        cv2.setNumThreads(old)


def iter_results(sources: Sequence, predictor, cfg: ScreeningConfig = ScreeningConfig()) -> Iterator[ScreenResult]:
    """Screen every source, yielding one `ScreenResult` per source in input order, a batch at a time.

    Args:
        sources: sequence of `bcc_core.io.ImageSource`.
        predictor: a loaded `Predictor` (or anything with `prepare(img)` and `predict_inputs(x, quality, bs)`).
        cfg: batch size, workers, thumbnail size, processes, prefetch.
    """
    model = _identity(predictor)
    pipe = _Pipeline(sources, predictor, cfg)
    try:
        with _cpu_limits(cfg):
            pipe.fill()
            for start in range(0, len(sources), cfg.batch_size):
                items = [pipe.next() for _ in range(min(cfg.batch_size, len(sources) - start))]
                pipe.fill()  # the workers go on with the next batches while the model runs on this one
                results = _batch_results(items, predictor, cfg, model)
                yield from results
    finally:
        pipe.close()


def iter_screen(sources: Sequence, predictor, cfg: ScreeningConfig = ScreeningConfig()) -> Iterator[dict]:
    """Screen every source, yielding one row per source in input order, a batch at a time.

    Args:
        sources: sequence of `bcc_core.io.ImageSource`.
        predictor: a loaded `Predictor`.
        cfg: batch size, decode workers, thumbnail size (see `ScreeningConfig`).

    Yields:
        Rows (`ScreenResult.to_row()`: dicts with the keys of :data:`ROW_KEYS`): file, status ("ok" |
        "review" | "error"), predicted_class, confidence, flags (list[Flag]), reason, probabilities,
        sha256, ood_score, prediction_set, thumbnail ((t, t, 3) uint8 or None).
    """
    for r in iter_results(sources, predictor, cfg):
        yield r.to_row()


def screen(sources, predictor, cfg: ScreeningConfig = ScreeningConfig(),
           on_result: Callable[[dict, int, int], None] | None = None, progress: bool = False) -> list[dict]:
    """Screen every source and return all rows (see :func:`iter_screen` to stream them instead).

    Args:
        sources: sequence of `bcc_core.io.ImageSource`.
        predictor: a loaded `Predictor`.
        cfg: batch size, decode workers, thumbnail size.
        on_result: called as on_result(row, done, total) for each finished row, in input order.
        progress: show a tqdm bar (for terminals).

    Returns:
        Rows (dicts) in input order: file, status ("ok" | "review" | "error"), predicted_class,
        confidence, flags (list[Flag]), reason, probabilities, sha256, ood_score, prediction_set, thumbnail.
    """
    from tqdm.auto import tqdm

    sources = list(sources)
    total = len(sources)
    rows: list[dict] = []
    bar = tqdm(total=total, desc="screening", unit="img", disable=not progress)
    for row in iter_screen(sources, predictor, cfg):
        rows.append(row)
        bar.update(1)
        if on_result:
            on_result(row, len(rows), total)
    bar.close()
    return rows


def summary(rows: list[dict]) -> dict:
    """Counts for the end-of-run summary (rows need `status` and `predicted_class` only)."""
    n = len(rows)
    st = {s: sum(r["status"] == s for r in rows) for s in ("ok", "review", "error")}
    per_class: dict[str, int] = {}
    ok_per_class: dict[str, int] = {}
    for r in rows:
        if r["status"] != "error":
            per_class[r["predicted_class"]] = per_class.get(r["predicted_class"], 0) + 1
        if r["status"] == "ok":
            ok_per_class[r["predicted_class"]] = ok_per_class.get(r["predicted_class"], 0) + 1
    return {"n": n, **st, "per_class": per_class, "ok_per_class": ok_per_class}
