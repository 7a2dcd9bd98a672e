"""Behavioural tests of the bundled models (skip when a model is not bundled)."""

import json

import numpy as np
import pytest

from conftest import MODELS, SHARED, require_model, require_shared


def _bundled():
    return sorted(p.parent for p in MODELS.glob("*/model_card.json"))


@pytest.mark.parametrize("model_dir", _bundled(), ids=lambda p: p.name)
def test_card_valid_and_model_small(model_dir):
    from bcc_core.model_card import validate_card

    card = json.loads((model_dir / "model_card.json").read_text())
    validate_card(card)
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    assert size < 25 * 1024 * 1024, f"{model_dir.name} is {size / 1e6:.1f} MB"
    assert "not a diagnosis" in card["intended_use"].lower() or "second reader" in card["intended_use"].lower()
    assert card["trust"]["temperature"] > 0 and card["trust"]["temperature"] == card["calibration"]["temperature"]
    assert card["ood"]["threshold"] is not None and card["review_rule"]["guarantee"]
    # no sentinel: a certified threshold is a probability, an uncertified one is null
    rv = card["trust"]["review"]
    assert (0 < rv["threshold"] <= 1) if rv["certified"] else rv["threshold"] is None
    assert card["version"] and len(card["model_sha256"]) == 64


@pytest.mark.parametrize("model_dir", _bundled(), ids=lambda p: p.name)
def test_card_quality_gate_is_the_fitted_gate(model_dir):
    """A bundled card's quality gate is the one training writes today (issue 15: the all4 card kept a
    cell-scale limit from before the gate was refitted without BCCD)."""
    from bcc_core.quality import FITTED_FIELDS, QualityConfig

    quality = json.loads((model_dir / "model_card.json").read_text())["quality"]
    fitted = QualityConfig(expect_single_cell=quality["expect_single_cell"]).to_dict()
    assert {k: quality[k] for k in FITTED_FIELDS} == {k: fitted[k] for k in FITTED_FIELDS}


@pytest.mark.parametrize("model_dir", _bundled(), ids=lambda p: p.name)
def test_split_parts_disjoint_and_what_was_fitted_on_each(model_dir):
    """Issue 15: named parts, disjoint by image and by duplicate group, with sizes and content hashes in
    split.json and the card; trust fitted on the calibration parts only, the test part used by evaluation."""
    from bcc_core.data import PARTS

    card = json.loads((model_dir / "model_card.json").read_text())
    split = json.loads((model_dir / "split.json").read_text())
    assert list(split["splits"]) == list(PARTS) == list(card["split"]["parts"])
    files = {k: {row[0] for row in v} for k, v in split["splits"].items()}
    groups = {k: {row[2] for row in v} for k, v in split["splits"].items()}
    for i, a in enumerate(PARTS):
        assert len(files[a]) == len(split["splits"][a]) == split["sizes"][a] == card["split"]["parts"][a]["n"]
        assert split["sha256"][a] == card["split"]["parts"][a]["sha256"]
        for b in PARTS[i + 1:]:
            assert not files[a] & files[b], (a, b)
            assert not groups[a] & groups[b], (a, b)
    fitted = card["trust"]["fitted_on"]
    assert fitted["ood_statistics"].startswith("train ")
    assert fitted["temperature"].startswith("cal_a ") and fitted["ood_thresholds"].startswith("cal_a ")
    assert fitted["review_rule"].startswith("cal_b ") and fitted["conformal"].startswith("cal_b ")
    assert card["metrics"]["measured_on"].startswith("test part")
    assert card["review_rule"]["measured_on_test"]["n"] == split["sizes"]["test"]


@pytest.fixture(scope="module")
def pbs5():
    from bcc_core.inference import Predictor

    return Predictor.load(require_model("pbs5-mobilenetv2"))


@pytest.mark.slow
def test_prediction_invariant_to_flips_and_rotations(pbs5):
    from bcc_core.data import load_split
    from bcc_core.io import read_image

    require_shared()
    items = load_split(pbs5.model_dir / "split.json", SHARED / "pbs5")["test"]
    picked = [it for c in range(5) for it in [x for x in items if x[1] == c][:3]]
    imgs = [read_image(p) for p, _ in picked]
    base = [r.predicted_class for r in pbs5.predict(imgs)]
    for t in (np.fliplr, np.flipud, lambda a: np.rot90(a, 1), lambda a: np.rot90(a, 2)):
        moved = [r.predicted_class for r in pbs5.predict([np.ascontiguousarray(t(im)) for im in imgs])]
        agree = np.mean([a == b for a, b in zip(base, moved)])
        assert agree >= 14 / 15


def test_non_cells_are_never_ok(pbs5):
    rng = np.random.default_rng(0)
    junk = [np.full((300, 300, 3), 128, np.uint8), np.full((300, 300, 3), 255, np.uint8),
            rng.integers(0, 256, (300, 300, 3), dtype=np.uint8),
            np.clip(rng.normal(128, 60, (300, 300, 3)), 0, 255).astype(np.uint8)]
    res = pbs5.predict(junk)
    assert all(r.status == "review" for r in res)
    # calibrated confidence is not extreme on noise
    assert res[2].confidence <= 0.99 or any(f.code == "image_quality" for f in res[2].flags)


@pytest.mark.slow
def test_smear_fields_are_not_ok(pbs5):
    from bcc_core.data import list_imagefolder, subset
    from bcc_core.io import read_image

    require_shared()
    ds = subset(list_imagefolder(SHARED / "all4", verify=False), 5, seed=0)
    res = pbs5.predict([read_image(p) for p in ds.paths])
    assert all(r.status == "review" for r in res)


@pytest.mark.slow
def test_other_lab_bccd_is_safe(pbs5):
    """BCCD (another lab, measure only): wrong answers shown as ok stay <= 2% of all images, and no
    eosinophil or lymphocyte (types the model does not know) is shown as ok."""
    from bcc_core.data import list_imagefolder
    from bcc_core.io import read_image

    require_shared()
    ds = list_imagefolder(SHARED / "bccd", verify=False)
    truth = {"neutrophil": "seg_neutrophil", "monocyte": "monocyte", "basophil": "basophil"}
    res = pbs5.predict([read_image(p) for p in ds.paths])
    names = [ds.classes[l] for l in ds.labels]
    wrong_ok = [r.status == "ok" and r.predicted_class != truth.get(n) for r, n in zip(res, names)]
    assert np.mean(wrong_ok) <= 0.02
    assert not any(r.status == "ok" for r, n in zip(res, names) if n not in truth)
    neutro = [r.predicted_class == "seg_neutrophil" for r, n in zip(res, names) if n == "neutrophil"]
    assert np.mean(neutro) >= 0.90


TASK_DATA = {"pbs5": "pbs5", "all4": "all4", "pb7": "pbs5"}


@pytest.mark.slow
@pytest.mark.parametrize("model_dir", _bundled(), ids=lambda p: p.name)
def test_explanation_sanity_checks_on_the_bundled_model(model_dir):
    """Adebayo et al.'s checks run here on each bundled model with images of its task: Grad-CAM passes
    (maps differ between classes, and lose their ranking when the top layers are randomised), and the
    methods the app offers (explanation_checks.json) are exactly those that pass in this run."""
    from bcc_core.data import list_imagefolder, subset
    from bcc_core.explain import check_methods, offered_methods
    from bcc_core.inference import Predictor
    from bcc_core.io import read_image

    shared = require_shared()
    p = Predictor.load(model_dir)
    root = shared / TASK_DATA.get(p.card.task, p.card.task)
    ds = subset(list_imagefolder(root, classes=[c for c in p.classes if (root / c).is_dir()]), 1, seed=1)
    x = np.stack([p.prepare(read_image(f))[0] for f in ds.paths])
    res = check_methods(p, x)
    assert res["methods"]["gradcam"]["passed"], res["methods"]["gradcam"]
    offered, _ = offered_methods(model_dir)
    assert set(offered) == set(res["offered"]), (offered, {m: r for m, r in res["methods"].items()})
    # One colour scale across classes: the image's strongest map reaches 1, the others are not rescaled.
    from bcc_core.explain import class_maps

    maps = class_maps(p, x[0])
    assert maps.max() == pytest.approx(1.0) and sorted(m.max() for m in maps)[0] < 0.99
