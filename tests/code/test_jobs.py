"""bcc_core.jobs: a screening run in a background thread stores every row in its case, refuses a second start for
the same running case, records an exception that ends it, and reports progress from the store."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from bcc_core import cases, jobs, store, users
from bcc_core.flags import Flag
from bcc_core.inference import Prediction
from bcc_core.io import ImageSource, encode_png

PASSWORD = "a long password"


class Stub:
    """What screening needs of a predictor; `gate` (if set) holds each model call until released."""

    def __init__(self, gate: threading.Event | None = None):
        self.gate, self.calls = gate, 0

    def prepare(self, img):
        return img[:8, :8].copy(), []

    def predict_inputs(self, x, q=None, bs=32):
        self.calls += 1
        if self.gate is not None and self.calls > 1:   # the first batch passes, the rest wait for the gate
            assert self.gate.wait(60), "the test never opened the gate"
        return [Prediction("a", 0.9, {"a": 0.9, "b": 0.1}, [Flag("low_confidence", "warning", "m", "d")], "review")
                for _ in x]


def _sources(n):
    img = np.full((16, 16, 3), 120, np.uint8)
    out = [ImageSource(f"c{i}.png", lambda i=i: encode_png(np.clip(img + i, 0, 255).astype(np.uint8)))
           for i in range(n)]
    out[2] = ImageSource("bad.png", lambda: b"not an image")
    return out


@pytest.fixture
def setup(tmp_path):
    eng = store.open_store(str(tmp_path / "bcc.sqlite"))
    users.add_user(eng, "rita", PASSWORD, "reviewer")
    return eng, users.login(eng, "rita", PASSWORD)


def test_a_job_stores_every_row_refuses_a_second_start_and_finishes_the_case(setup):
    from bcc_core.screening import ScreeningConfig

    eng, rita = setup
    cid = cases.create_case(eng, rita, "JOB-1", "m", "ab" * 32, 6)
    gate = threading.Event()
    job = jobs.start(eng, rita, cid, _sources(6), Stub(gate), cfg=ScreeningConfig(batch_size=2, thumbnail=8))
    assert job.running and jobs.get(eng, cid) is job and jobs.latest(eng, "rita") is job
    with pytest.raises(jobs.JobRefused, match="being screened already"):
        jobs.start(eng, rita, cid, _sources(6), Stub())
    gate.set()
    assert job.wait(120)
    assert (job.state, job.status, job.error, job.done) == ("done", "complete", None, 6)
    assert jobs.progress(eng, cid) == (6, 6)
    case, rows = cases.case_rows(eng, cid)
    assert case["status"] == "complete" and [r["seq"] for r in rows] == list(range(6))
    assert [r["status"] for r in rows] == ["review", "review", "error", "review", "review", "review"]


def test_a_resumed_job_screens_only_the_rest_and_an_exception_is_recorded(setup, monkeypatch):
    eng, rita = setup
    cid = cases.create_case(eng, rita, "JOB-2", "m", "ab" * 32, 4)
    real = cases.add_result

    def dies_at_seq_3(engine, user, case_id, seq, row):
        if seq == 3:
            raise RuntimeError("disk full")
        return real(engine, user, case_id, seq, row)

    monkeypatch.setattr(cases, "add_result", dies_at_seq_3)
    job = jobs.start(eng, rita, cid, _sources(4), Stub())
    assert job.wait(120)
    assert (job.state, job.status, job.error, job.done) == ("failed", "incomplete", "RuntimeError: disk full", 3)
    assert jobs.progress(eng, cid) == (3, 4)
    monkeypatch.setattr(cases, "add_result", real)
    again = jobs.start(eng, rita, cid, _sources(4), Stub(), todo=[3])   # the ended job does not block a resume
    assert again.wait(120) and (again.state, again.status, again.done) == ("done", "complete", 1)
    assert jobs.get(eng, cid) is again and [r["seq"] for r in cases.case_rows(eng, cid)[1]] == [0, 1, 2, 3]
