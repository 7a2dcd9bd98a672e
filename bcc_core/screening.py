"""Batch screening: any number of image sources → one result row per image, progress via a callback.

Images are decoded and preprocessed in a thread pool and sent to the model in compiled batches; a bad
file becomes an `error` row with its reason, never a crash and never a silent skip. A failure while
preparing one image makes that image an error row; a failure of the model on one batch makes that
batch's images error rows, and the run goes on. :func:`iter_screen` yields rows as they are produced,
holding one batch in memory, so a caller can write them out (the `screen` CLI does) instead of keeping
them all.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np

from .io import content_hash, read_image

ROW_KEYS = ("file", "status", "predicted_class", "confidence", "flags", "reason", "probabilities", "sha256",
            "ood_score", "prediction_set", "thumbnail")
"""Keys of every result row, in this order (error rows too, so streamed CSV columns never shift)."""


@dataclass(frozen=True)
class ScreeningConfig:
    batch_size: int = 32
    workers: int = 2
    thumbnail: int = 96  # px kept per image for the results table (48 px by default, 96 on demand); 0: none


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _load(src, predictor, cfg: ScreeningConfig):
    try:
        data = src.load()
        img = read_image(data)
    except Exception as e:
        # read_image only sees bytes here; name the file the user knows.
        return {"file": src.name, "error": _reason(e).replace("<bytes>", src.name)}
    try:
        model_input, quality = predictor.prepare(img)
    except Exception as e:
        return {"file": src.name, "error": f"{src.name}: the image could not be prepared for the model "
                                           f"({type(e).__name__}: {_reason(e)})"}
    thumb = (cv2.resize(img, (cfg.thumbnail, cfg.thumbnail), interpolation=cv2.INTER_AREA)
             if cfg.thumbnail else None)
    return {"file": src.name, "sha256": content_hash(data), "input": model_input, "quality": quality,
            "thumbnail": thumb}


def _error_row(item) -> dict:
    return dict.fromkeys(ROW_KEYS) | {"file": item["file"], "status": "error", "flags": [], "reason": item["error"]}


def _result_row(it, p) -> dict:
    return {"file": it["file"], "status": p.status, "predicted_class": p.predicted_class,
            "confidence": p.confidence, "flags": p.flags, "reason": " ".join(f.message for f in p.flags),
            "probabilities": p.probabilities, "sha256": it["sha256"], "ood_score": p.ood_score,
            "prediction_set": p.prediction_set, "thumbnail": it["thumbnail"]}


def _batch_rows(items, predictor, cfg: ScreeningConfig) -> list[dict]:
    good = [it for it in items if "error" not in it]
    try:
        preds = predictor.predict_inputs(np.stack([it["input"] for it in good]), [it["quality"] for it in good],
                                         cfg.batch_size) if good else []
        if len(preds) != len(good):
            raise RuntimeError(f"the model returned {len(preds)} results for {len(good)} images")
    except Exception as e:
        msg = (f"the model failed on this batch of {len(good)} image(s) ({type(e).__name__}: {_reason(e)}); "
               "screen the image again")
        return [_error_row(it if "error" in it else {"file": it["file"], "error": f"{it['file']}: {msg}"})
                for it in items]
    preds = iter(preds)
    return [_error_row(it) if "error" in it else _result_row(it, next(preds)) for it in items]


def iter_screen(sources: Sequence, predictor, cfg: ScreeningConfig = ScreeningConfig()) -> Iterator[dict]:
    """Screen every source, yielding one row per source in input order, a batch at a time.

    Args:
        sources: sequence of `bcc_core.io.ImageSource`.
        predictor: a loaded `Predictor`.
        cfg: batch size, decode workers, thumbnail size.

    Yields:
        Rows (dicts with the keys of :data:`ROW_KEYS`): file, status ("ok" | "review" | "error"),
        predicted_class, confidence, flags (list[Flag]), reason, probabilities, sha256, ood_score,
        prediction_set, thumbnail ((t, t, 3) uint8 or None).
    """
    with ThreadPoolExecutor(cfg.workers) as ex:
        for start in range(0, len(sources), cfg.batch_size):
            items = list(ex.map(lambda s: _load(s, predictor, cfg), sources[start:start + cfg.batch_size]))
            yield from _batch_rows(items, predictor, cfg)


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
    for r in rows:
        if r["status"] != "error":
            per_class[r["predicted_class"]] = per_class.get(r["predicted_class"], 0) + 1
    return {"n": n, **st, "per_class": per_class}
