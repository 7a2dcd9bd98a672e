"""The bundled models' replay banks (replay.npz) agree with their cards and splits, and reproduce the
card's test figure through the head alone (the features are the model's own)."""

import json

import numpy as np
import pytest

from conftest import MODELS, require_model

BUNDLED = ["pbs5-mobilenetv2", "all4-mobilenetv2", "pb7-mobilenetv2"]


@pytest.mark.parametrize("name", BUNDLED)
def test_replay_bank_matches_card_and_reproduces_test_f1(name):
    from sklearn.metrics import f1_score

    from bcc_core.models import LOGITS_LAYER, head_only, load_model
    from bcc_core.ood import load_stats
    from bcc_core.replay import load_bank

    d = require_model(name)
    if not (d / "replay.npz").is_file():
        pytest.fail(f"{d}/replay.npz missing: python -m bcc_core replay-bank --model {d} --data <dataset>")
    bank = load_bank(d / "replay.npz")
    card = json.loads((d / "model_card.json").read_text())
    assert list(bank["classes"]) == card["classes"]
    sizes = card["split"]["sizes"]
    assert (bank["part"] == "test").sum() == sizes["test"]
    if card.get("trust"):  # five named parts: every part but train (subsampled) is kept whole
        for part in ("val", "cal_a", "cal_b"):
            assert (bank["part"] == part).sum() == sizes[part], part
    else:  # a card from before the five-part split: validation halves A and B
        assert np.isin(bank["part"], ["val_a", "val_b"]).sum() == sizes["val"]
        assert abs((bank["part"] == "val_a").sum() - (bank["part"] == "val_b").sum()) <= 1
    assert set(bank["source"]) == {card["data"]["name"]}  # only the model's own training data, never BCCD
    assert bank["early"].shape[1] == load_stats(d / "ood_stats.npz")["early_means"].shape[1]
    model, _ = load_model(d)
    test = bank["part"] == "test"
    logits = np.asarray(head_only(model, LOGITS_LAYER)(bank["features"][test]))
    f1 = f1_score(bank["labels"][test], logits.argmax(1), average="macro")
    assert f1 == pytest.approx(card["metrics"]["test"]["macro_f1"], abs=0.005)


@pytest.mark.parametrize("name,root", [("pbs5-mobilenetv2", "pbs5"), ("all4-mobilenetv2", "all4"),
                                       ("pb7-mobilenetv2", "")])
def test_replay_bank_holds_the_chroma_histograms_of_its_images(name, root):
    """An adaptation's head reads each row's chroma histogram (bcc_core.colour): the bank's are those of the
    row's own image, as the layers compute them (checked on the first test images when the data is here)."""
    from bcc_core.colour import N_FEATURES, chroma_histograms
    from bcc_core.data import load_split
    from bcc_core.inference import Predictor
    from bcc_core.replay import load_bank
    from bcc_core.training import load_images

    from conftest import SHARED

    d = require_model(name)
    bank = load_bank(d / "replay.npz")
    assert bank["colour"].shape == (len(bank["labels"]), N_FEATURES)
    data = SHARED / root if root else SHARED
    if not data.is_dir():
        pytest.skip(f"{data} not here: the histograms' shape only")
    test_items = load_split(d / "split.json", data)["test"][:6]
    x = load_images([p for p, _ in test_items], Predictor.load(d).pcfg, False)[0]
    rows = np.flatnonzero(bank["part"] == "test")[:6]
    assert list(bank["labels"][rows]) == [l for _, l in test_items]
    np.testing.assert_allclose(bank["colour"][rows], chroma_histograms(x), atol=2e-3)
