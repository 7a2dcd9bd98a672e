"""Batch screening: any number of image sources → one result row per image, progress via a callback.

Images are decoded and preprocessed in a thread pool and sent to the model in compiled batches; a bad
file becomes an `error` row with its reason, never a crash and never a silent skip.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from .io import content_hash, read_image


@dataclass(frozen=True)
class ScreeningConfig:
    batch_size: int = 32
    workers: int = 2
    thumbnail: int = 96  # px kept per image for the results table (48 px by default, 96 on demand)


def _load(src, predictor, cfg: ScreeningConfig):
    try:
        data = src.load()
        img = read_image(data)
    except Exception as e:
        # read_image only sees bytes here; name the file the user knows.
        return {"file": src.name, "error": (str(e) or type(e).__name__).replace("<bytes>", src.name)}
    model_input, quality = predictor.prepare(img)
    return {"file": src.name, "sha256": content_hash(data), "input": model_input, "quality": quality,
            "thumbnail": cv2.resize(img, (cfg.thumbnail, cfg.thumbnail), interpolation=cv2.INTER_AREA)}


def _error_row(item) -> dict:
    return {"file": item["file"], "status": "error", "predicted_class": None, "confidence": None, "flags": [],
            "reason": item["error"], "probabilities": None, "sha256": None, "ood_score": None, "thumbnail": None,
            "prediction_set": None}


def screen(sources, predictor, cfg: ScreeningConfig = ScreeningConfig(),
           on_result: Callable[[dict, int, int], None] | None = None, progress: bool = False) -> list[dict]:
    """Screen every source.

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
    with ThreadPoolExecutor(cfg.workers) as ex:
        for start in range(0, total, cfg.batch_size):
            items = list(ex.map(lambda s: _load(s, predictor, cfg), sources[start:start + cfg.batch_size]))
            good = [it for it in items if "error" not in it]
            preds = iter(predictor.predict_inputs(np.stack([it["input"] for it in good]),
                                                  [it["quality"] for it in good], cfg.batch_size) if good else [])
            for it in items:
                if "error" in it:
                    row = _error_row(it)
                else:
                    p = next(preds)
                    row = {"file": it["file"], "status": p.status, "predicted_class": p.predicted_class,
                           "confidence": p.confidence, "flags": p.flags,
                           "reason": " ".join(f.message for f in p.flags), "probabilities": p.probabilities,
                           "sha256": it["sha256"], "ood_score": p.ood_score, "prediction_set": p.prediction_set,
                           "thumbnail": it["thumbnail"]}
                rows.append(row)
                bar.update(1)
                if on_result:
                    on_result(row, len(rows), total)
    bar.close()
    return rows


def summary(rows: list[dict]) -> dict:
    """Counts for the end-of-run summary."""
    n = len(rows)
    st = {s: sum(r["status"] == s for r in rows) for s in ("ok", "review", "error")}
    per_class: dict[str, int] = {}
    for r in rows:
        if r["status"] != "error":
            per_class[r["predicted_class"]] = per_class.get(r["predicted_class"], 0) + 1
    return {"n": n, **st, "per_class": per_class}
