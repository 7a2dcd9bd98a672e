"""screen() keeps input order with errors across batch boundaries, on a stub predictor with fixed logits.

The stub has no network: each image carries its index in its pixels, and the stub's logits for that index
come from a fixed table, so every row can be checked against what it must be.
"""

from __future__ import annotations

import numpy as np
import pytest

from bcc_core.flags import Flag, status_for
from bcc_core.inference import Prediction
from bcc_core.io import ImageSource, encode_png
from bcc_core.screening import ScreeningConfig, screen

CLASSES = ["a", "b", "c"]
N = 23
LOGITS = np.random.default_rng(0).normal(0, 3, (N, len(CLASSES)))  # fixed logits per image index
BAD = {0, 7, 8, 15, 22}  # unreadable files: first, across the 8|16 batch boundaries, last


class StubPredictor:
    """Duck-typed predictor (what screening needs): `prepare(img)` and `predict_inputs(x, quality, bs)`."""

    def __init__(self, fail_batch_containing: int | None = None):
        self.fail_on = fail_batch_containing
        self.batches: list[list[int]] = []

    def prepare(self, img):
        return img[:8, :8].copy(), []

    def predict_inputs(self, inputs, quality_flags=None, batch_size=32):
        ids = [int(x[0, 0, 0]) for x in inputs]
        self.batches.append(ids)
        if self.fail_on in ids:
            raise RuntimeError("stub model failure")
        out = []
        for i in ids:
            p = np.exp(LOGITS[i] - LOGITS[i].max())
            p /= p.sum()
            k = int(p.argmax())
            flags = [Flag("low_confidence", "warning", "stub", "below_threshold")] if p[k] < 0.6 else []
            out.append(Prediction(CLASSES[k], float(p[k]), dict(zip(CLASSES, map(float, p))), flags,
                                  status_for(flags), 0.0, [CLASSES[k]], inputs[0]))
        return out


def _sources():
    out = []
    for i in range(N):
        if i in BAD:
            out.append(ImageSource(f"img_{i:02d}.png", lambda: b"not an image"))
        else:
            img = np.full((16, 16, 3), i, np.uint8)
            out.append(ImageSource(f"img_{i:02d}.png", lambda data=encode_png(img): data))
    return out


def _expected(i):
    p = np.exp(LOGITS[i] - LOGITS[i].max())
    p /= p.sum()
    return CLASSES[int(p.argmax())], float(p.max())


@pytest.mark.parametrize("batch_size, workers", [(8, 1), (8, 3), (5, 2), (32, 2)])
def test_rows_keep_input_order_with_errors_across_batches(batch_size, workers):
    stub = StubPredictor()
    rows = screen(_sources(), stub, ScreeningConfig(batch_size=batch_size, workers=workers, thumbnail=0))
    assert [r["file"] for r in rows] == [f"img_{i:02d}.png" for i in range(N)]
    for i, r in enumerate(rows):
        if i in BAD:
            assert r["status"] == "error" and r["predicted_class"] is None and r["reason"]
        else:
            cls, conf = _expected(i)
            assert r["status"] in ("ok", "review") and r["predicted_class"] == cls
            assert r["confidence"] == pytest.approx(conf)
            assert (r["status"] == "review") == (conf < 0.6)
    # Every readable image went to the model exactly once, in order, in batches of at most batch_size.
    seen = [i for b in stub.batches for i in b]
    assert seen == [i for i in range(N) if i not in BAD]
    assert all(len(b) <= batch_size for b in stub.batches)


def test_a_failing_batch_becomes_error_rows_and_the_run_goes_on():
    stub = StubPredictor(fail_batch_containing=10)  # batch 8..15 with batch_size 8
    rows = screen(_sources(), stub, ScreeningConfig(batch_size=8, workers=2, thumbnail=0))
    assert [r["file"] for r in rows] == [f"img_{i:02d}.png" for i in range(N)]
    for i, r in enumerate(rows):
        if 8 <= i < 16 or i in BAD:
            assert r["status"] == "error"
            if i not in BAD:
                assert "model failed on this batch" in r["reason"]
        else:
            assert r["predicted_class"] == _expected(i)[0]
