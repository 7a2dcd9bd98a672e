"""BCCD (measurement only) never reaches a fit: bcc_core.fit_guard and the quality-gate fit that calls it."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from bcc_core import quality
from bcc_core.fit_guard import (MARKER_FILE, MeasurementDataError, assert_bundle_fittable, assert_fittable,
                                measurement_only_names, measurement_only_reason)


def _image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(path), rng.integers(0, 256, (80, 80, 3), dtype=np.uint8))
    return path


def test_bccd_is_the_measurement_only_source():
    assert "bccd" in measurement_only_names()
    assert "pbs5" not in measurement_only_names() and "lisc" not in measurement_only_names()


@pytest.mark.parametrize("rel", ["bccd/monocyte/x.jpg", "BCCD/monocyte/x.jpg", "BCCD_cropped/eos/x.jpg",
                                 "data/bccd-2/neutrophil/x.png", "bccd"])
def test_bccd_paths_are_refused(tmp_path, rel):
    with pytest.raises(MeasurementDataError, match="measurement only"):
        assert_fittable([tmp_path / "pbs5/basophil/a.jpg", tmp_path / rel], what="a test fit")


@pytest.mark.parametrize("rel", ["pbs5/basophil/a.jpg", "lisc/neutrophil/bccd_like.jpg", "bccdx/a/b.jpg",
                                 "abccd/a/b.jpg"])
def test_other_paths_pass(tmp_path, rel):
    assert measurement_only_reason(tmp_path / rel) is None
    assert_fittable([tmp_path / rel])


def test_a_symlink_into_bccd_is_refused(tmp_path):
    real = _image(tmp_path / "bccd" / "monocyte" / "m.png")
    link_dir = tmp_path / "lab_cells" / "monocyte"
    link_dir.mkdir(parents=True)
    (link_dir / "m.png").symlink_to(real)
    with pytest.raises(MeasurementDataError):
        assert_fittable([link_dir / "m.png"])


def test_a_marker_file_refuses_a_set_under_any_name(tmp_path):
    f = _image(tmp_path / "lab_b" / "monocyte" / "m.png")
    assert_fittable([f])
    (tmp_path / "lab_b" / MARKER_FILE).write_text("measurement only\n")
    with pytest.raises(MeasurementDataError, match=MARKER_FILE):
        assert_fittable([f])


def test_adaptation_may_use_bccd_but_not_into_bundled_models(tmp_path):
    cells = tmp_path / "bccd"
    models = tmp_path / "models"
    assert_bundle_fittable([cells], tmp_path / "runs" / "adapt_bccd", models)  # a benchmark's own folder
    with pytest.raises(MeasurementDataError, match="bundled"):
        assert_bundle_fittable([cells], models / "pbs5-bccd", models)
    assert_bundle_fittable([tmp_path / "lab_a"], models / "pbs5-lab-a", models)


def test_the_quality_fit_refuses_bccd_paths_before_reading_them(tmp_path, monkeypatch):
    good = [_image(tmp_path / "pbs5" / "basophil" / f"{i}.png", i) for i in range(3)]
    bad = tmp_path / "bccd" / "monocyte" / "m.png"  # need not even exist: refused before any read
    read = []
    monkeypatch.setattr(quality, "fit_measures", lambda img, cfg=None: read.append(1) or {})
    with pytest.raises(MeasurementDataError):
        quality.fit_quality_thresholds({"pbs5": good, "other": [bad]})
    assert read == []


def test_fitted_thresholds_come_from_the_generated_file():
    doc = json.loads(quality.FIT_FILE.read_text(encoding="utf-8"))
    assert "bench/fit_quality_gate.py" in doc["generated_by"]
    assert "BCCD" in doc["parts"] and set(doc["images"]) == {"pbs5", "lisc"}
    cfg = quality.QualityConfig()
    for k in quality.FITTED_FIELDS:
        assert getattr(cfg, k) == doc["thresholds"][k]


def _synthetic_measures(rng, n, shift):
    return [{"laplacian_var_blurred": float(b), "cell_scale": float(c), "cell_extent": float(e)}
            for b, c, e in zip(rng.uniform(1, 5 + shift, n), rng.uniform(5 - shift, 10, n),
                               rng.uniform(40 - 10 * shift, 200, n))]


def test_thresholds_follow_the_stated_rules_in_every_source():
    rng = np.random.default_rng(0)
    by_source = {"lab_a": _synthetic_measures(rng, 1500, 0.0), "lab_b": _synthetic_measures(rng, 600, 1.0)}
    t = quality.thresholds_from_measures(by_source)
    for ms in by_source.values():  # each limit holds in each lab, not only in the pooled majority
        blurred = np.array([m["laplacian_var_blurred"] for m in ms])
        assert np.mean(blurred < t["blur_lap_var_min"]) >= quality.BLUR_CATCH - 0.002
        for k, col in (("cell_scale_min", "cell_scale"), ("min_cell_px", "cell_extent")):
            assert np.mean(np.array([m[col] for m in ms]) < t[k]) <= quality.VALID_MISS + 1e-9
    with pytest.raises(ValueError, match="at least 500"):
        quality.thresholds_from_measures({"lab_a": by_source["lab_a"], "tiny": by_source["lab_b"][:10]})


def test_the_shipped_fit_used_only_training_parts_of_the_current_splits():
    """quality_fit.json was fitted on the train parts of today's bundled splits, never on validation, test or
    BCCD images. Fails when a bundled split changes: re-run bench/fit_quality_gate.py then."""
    import hashlib
    from pathlib import Path

    from bench.fit_quality_gate import train_files

    root = Path(__file__).resolve().parents[2]
    doc = json.loads(quality.FIT_FILE.read_text(encoding="utf-8"))
    data = Path("/data-root-not-read")  # only the split files are read
    files, digests = train_files(data, root / "models")
    assert doc["split_files_sha256"] == digests, "a bundled split changed: re-run bench/fit_quality_gate.py"
    rel = sorted(f"{s}/{p.relative_to(data / s).as_posix()}" for s, ps in files.items() for p in ps)
    assert hashlib.sha256("\n".join(rel).encode()).hexdigest() == doc["image_list_sha256"]
    assert {s: len(ps) for s, ps in files.items()} == doc["images"]
    assert not any(r.lower().startswith("bccd") for r in rel)
    held_out = set()
    for model, prefix in (("pbs5-mobilenetv2", "pbs5/"), ("pb7-mobilenetv2", ""), ("all4-mobilenetv2", "all4/")):
        splits = json.loads((root / "models" / model / "split.json").read_text())["splits"]
        held_out |= {prefix + r[0] for part, rows in splits.items() if part != "train" for r in rows}
    assert not held_out & set(rel)


def test_training_adaptation_and_replay_banks_refuse_bccd_before_any_work(tmp_path):
    """Every entry point that fits on images calls the guard first: train (one root or several sources),
    adapt into the bundled models' folder, and a replay bank built from a measurement-only root."""
    from bcc_core.adapt import adapt
    from bcc_core.inference import models_root
    from bcc_core.replay import build_for_model
    from bcc_core.training import TrainConfig, train

    for cls in ("monocyte", "neutrophil"):
        for i in range(3):
            _image(tmp_path / "bccd" / cls / f"{cls}_{i}.png", seed=i)
            _image(tmp_path / "pbs5" / cls / f"{cls}_{i}.png", seed=10 + i)
    cfg = TrainConfig(task="t", backbone="small_cnn", weights="none", epochs=1)
    with pytest.raises(MeasurementDataError, match="training"):
        train(tmp_path / "bccd", tmp_path / "out1", cfg, progress=False)
    with pytest.raises(MeasurementDataError, match="training"):
        train([str(tmp_path / "pbs5"), f"lab2={tmp_path / 'bccd'}"], tmp_path / "out2", cfg, progress=False)
    parent = tmp_path / "no_such_parent"  # the guard runs before the parent is even read
    with pytest.raises(MeasurementDataError):
        adapt(parent, tmp_path / "bccd", models_root() / "bccd-adapted-never-written")
    assert not (models_root() / "bccd-adapted-never-written").exists()
    with pytest.raises(MeasurementDataError, match="replay bank"):
        build_for_model(tmp_path / "no_such_model", tmp_path / "bccd")
