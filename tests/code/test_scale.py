"""Shards (screen --shard i/n + merge) and the pipelined screening: order, errors and exact rows."""

import json

import cv2
import numpy as np
import pytest

from bcc_core.scale import SHARD_SUFFIX, merge_shards, parse_shard, shard_range


@pytest.mark.parametrize("n_sources,batch,n", [(0, 4, 3), (1, 4, 3), (10, 4, 3), (64, 8, 5), (100, 32, 2), (7, 1, 7)])
def test_shards_are_whole_batches_covering_every_input_once(n_sources, batch, n):
    ranges = [shard_range(n_sources, batch, i, n) for i in range(n)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n_sources
    for (a, b), (c, _) in zip(ranges, ranges[1:]):
        assert b == c and a <= b
    # Every cut lies on a batch boundary of the single-process run, so each image meets the same batch.
    assert all(lo % batch == 0 for lo, hi in ranges if lo < n_sources)


@pytest.mark.parametrize("text", ["1", "3/3", "-1/2", "a/b", "1/0"])
def test_bad_shard_is_refused(text):
    with pytest.raises(ValueError):
        parse_shard(text)


def _shard(tmp_path, i, n, start, stop, rows, **over):
    p = tmp_path / f"p{i}.csv"
    p.write_text("file,status\n" + "".join(f"f{k},ok\n" for k in range(start, start + rows)))
    meta = {"shard": i, "of": n, "start": start, "stop": stop, "n_sources": 6, "inputs_sha256": "x",
            "model_id": "m", "model_sha256": "h", "batch_size": 2, "header": "file,status"} | over
    p.with_name(p.name + SHARD_SUFFIX).write_text(json.dumps(meta))
    return p


def test_merge_joins_parts_in_order_and_refuses_an_incomplete_or_mixed_set(tmp_path):
    parts = [_shard(tmp_path, 0, 3, 0, 2, 2), _shard(tmp_path, 1, 3, 2, 4, 2), _shard(tmp_path, 2, 3, 4, 6, 2)]
    out = tmp_path / "all.csv"
    assert merge_shards(parts[::-1], out) == {"n": 6, "shards": 3}
    assert out.read_text().splitlines() == ["file,status"] + [f"f{k},ok" for k in range(6)]
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        merge_shards([parts[0], parts[2]], tmp_path / "x.csv")
    other = _shard(tmp_path, 1, 3, 2, 4, 2, model_sha256="other")
    with pytest.raises(ValueError, match="model_sha256"):
        merge_shards([parts[0], other, parts[2]], tmp_path / "x.csv")
    short = _shard(tmp_path, 1, 3, 2, 4, 1)
    with pytest.raises(ValueError, match="1 rows, expected 2"):
        merge_shards([parts[0], short, parts[2]], tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


class _Pred:
    """The card's real preprocessing and quality gate (so worker processes can run them) and a model
    that answers with each input's mean."""

    classes = ["a"]

    def __init__(self):
        from bcc_core.preprocess import PreprocessConfig
        from bcc_core.quality import QualityConfig

        self.pcfg, self.qcfg = PreprocessConfig(), QualityConfig()

    def prepare(self, img):
        from bcc_core.inference import Predictor

        return Predictor.prepare(self, img)

    def predict_inputs(self, x, quality, batch_size):
        from bcc_core.inference import Prediction

        return [Prediction("a", float(v.mean()) / 255, {"a": 1.0}, list(q), "ok", 0.0, ["a"]) for v, q in zip(x, quality)]


def test_worker_processes_give_the_rows_threads_give_in_input_order_with_errors():
    from conftest import synthetic_cell

    from bcc_core.io import ImageSource
    from bcc_core.screening import ScreeningConfig, screen

    def src(i):
        if i in (2, 7):
            return ImageSource(f"{i}.jpg", lambda: b"\xff\xd8\xff broken")
        ok, png = cv2.imencode(".png", synthetic_cell(160, 25 + i, seed=i))
        return ImageSource(f"{i}.png", lambda d=png.tobytes(): d)

    sources = [src(i) for i in range(11)]
    runs = [screen(sources, _Pred(), ScreeningConfig(batch_size=3, workers=2, thumbnail=8, processes=p, prefetch=1))
            for p in (False, True)]
    for rows in runs:
        assert [r["file"] for r in rows] == [s.name for s in sources]
        assert [i for i, r in enumerate(rows) if r["status"] == "error"] == [2, 7]
    strip = [[{k: v for k, v in r.items() if k not in ("thumbnail", "flags")} for r in rows] for rows in runs]
    assert strip[0] == strip[1]
    assert all(np.array_equal(a["thumbnail"], b["thumbnail"]) for a, b in zip(*runs) if a["status"] != "error")


def test_worker_processes_survive_a_main_module_with_side_effects(tmp_path, monkeypatch):
    """A Streamlit page or test runner may leave a script as __main__; workers must not re-import it."""
    import sys
    import types

    from bcc_core.io import ImageSource
    from bcc_core.screening import ScreeningConfig, screen

    script = tmp_path / "page.py"
    script.write_text("raise SystemExit('a worker imported the parent script')\n")
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", main)
    ok, png = cv2.imencode(".png", np.full((64, 64, 3), 200, np.uint8))
    rows = screen([ImageSource(f"{i}.png", lambda: png.tobytes()) for i in range(4)], _Pred(),
                  ScreeningConfig(batch_size=2, workers=2, thumbnail=0, processes=True))
    assert [r["status"] for r in rows] == ["ok"] * 4, rows[0]["reason"]
