"""Real-data integration: train on a small pbs5 subset with the offline ImageNet weights, then evaluate."""

import json

import pytest

from conftest import ROOT, require_shared

pytestmark = pytest.mark.slow


def test_train_small_real_subset_learns(tmp_path):
    from bcc_core.backbones import default_weights_path
    from bcc_core.training import TrainConfig, train

    data = require_shared() / "pbs5"
    w = default_weights_path()
    if w is None:
        pytest.skip("offline MobileNetV2 weights not present")
    cfg = TrainConfig(weights=str(w), epochs=4, aug_views=1)
    m = train(data, tmp_path / "m", cfg, progress=False, limit_per_class=30)
    # 5 classes x 30 images: the frozen ImageNet features already separate them well above chance.
    assert m["test"]["accuracy"] > 0.6
    card = json.loads((tmp_path / "m" / "model_card.json").read_text())
    assert card["data"]["n_images"] == 150 and card["backbone"] == "mobilenetv2"
    assert card["parameters"]["total"] == pytest.approx(2.42e6, rel=0.02)  # not the 3.5 M Study 1 claimed
