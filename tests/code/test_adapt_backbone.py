"""Adapting with the top of the backbone fine-tuned (bcc_core.adapt, replay activations at the cut): on a
small MobileNetV2 parent trained on synthetic cells (from the offline ImageNet weights when present). What
must hold: the layers below the cut stay the parent's, the top and the head change, the child's replay bank
is rebuilt through the new network (so a child can be adapted again), and the codec of the stored
activations is faithful."""

import dataclasses
import json

import numpy as np
import pytest

from test_adapt import _lab_cell, _lab_folder, assert_scores_as_fitted, train_synthetic_parent


def test_cut_codec_round_trip_and_bank_concatenation():
    from bcc_core.replay import concat_banks, decode_cut, encode_cut, fit_codec

    rng = np.random.default_rng(0)
    # Activations of rank 4 over 16 channels: 4 components reproduce them up to the 8-bit step.
    c = (rng.normal(size=(30, 3, 3, 4)) @ rng.normal(size=(4, 16))).astype(np.float32)
    codec = fit_codec(c, k=4)
    codes = encode_cut(c, codec)
    assert codes.dtype == np.uint8 and codes.shape == (30, 3, 3, 4)
    step = float(np.max(codec["cut_hi"] - codec["cut_lo"])) / 255
    assert np.abs(decode_cut(codes, codec) - c).max() <= 4 * step * np.abs(codec["cut_basis"]).sum(0).max()
    base = {"features": np.zeros((5, 2)), "labels": np.arange(5), "part": np.array(["train"] * 5),
            "source": np.array(["p"] * 5), "classes": np.array(["a"]), "meta": np.array("{}"),
            "cut_codes": codes[:2], "cut_rows": np.array([1, 3], np.int32), "cut_meta": np.array("{}"), **codec}
    lab = {"features": np.ones((3, 2)), "labels": np.zeros(3, int), "part": np.array(["lab_fit"] * 3),
           "source": np.array(["lab"] * 3), "classes": np.array(["a"]), "meta": np.array("{}"),
           "cut_codes": codes[2:5], "cut_rows": np.arange(3, dtype=np.int32)}
    both = concat_banks(base, lab)
    assert list(both["cut_rows"]) == [1, 3, 5, 6, 7]  # the lab's rows follow the parent's five
    np.testing.assert_array_equal(both["cut_codes"], codes[:5])
    head_only = concat_banks(base, {k: v for k, v in lab.items() if not k.startswith("cut")})
    assert list(head_only["cut_rows"]) == [1, 3]


@pytest.fixture(scope="module")
def mparent(tmp_path_factory):
    """A MobileNetV2 parent on synthetic cells: from the offline ImageNet weights when ../shared has them (a
    parent that tells images apart, 100% on its test part), else from scratch, whose every image gets the same
    output (its batch-norm statistics never settle in 3 epochs): the structural checks hold either way, the
    scoring checks need the first."""
    from bcc_core.backbones import default_weights_path

    tmp = tmp_path_factory.mktemp("adapt_backbone")
    weights = default_weights_path()
    m = train_synthetic_parent(tmp, "mobilenetv2", epochs=3, weights=str(weights) if weights else "none")
    if weights:
        assert m["test"]["accuracy"] > 0.8
    return tmp


def _lab_b(root):
    """Lab B's reviewed cells (12 per class), written once per module."""
    lab = root / "lab"
    return lab if lab.is_dir() else _lab_folder(lab, {"mono": 1, "bilobed": 2}, per_class=12)


def _cfg_b():
    """Fine-tuned (`adapt --fine-tune`); not cross-fitted, so the calibration cells are scored by the head the
    folder ships (the scoring checks compare the two)."""
    from bcc_core.adapt import AdaptConfig
    from bcc_core.replay import CUT_LAYERS

    return AdaptConfig(lab="lab B", seed=1, backbone_layers=CUT_LAYERS, backbone_epochs=2, backbone_aug_views=1,
                       backbone_min_cells=12, colour_min_cells=12, test_time_views=1, cross_fit=False)


def _weights(model, name):
    return [np.asarray(w) for w in model.get_layer(name).get_weights()]


def test_training_stores_activations_at_the_cut(mparent):
    from bcc_core.replay import cut_meta, load_bank

    bank = load_bank(mparent / "parent" / "replay.npz")
    meta = cut_meta(bank)
    assert meta["layer"] == "block_13_project_BN" and meta["fine_tune_layers"] == 21
    rows = bank["cut_rows"]
    assert len(rows) == len(bank["cut_codes"]) and bank["cut_codes"].dtype == np.uint8
    for part in ("cal_a", "cal_b"):  # every calibration row: the trust refit needs them all
        assert set(np.flatnonzero(bank["part"] == part)) <= set(rows)
    assert set(bank["part"][rows]) <= {"train", "cal_a", "cal_b", "test"}


def test_fine_tuned_top_changes_only_above_the_cut_and_can_adapt_again(mparent):
    from bcc_core.adapt import adapt
    from bcc_core.inference import Predictor
    from bcc_core.replay import load_bank

    parent = mparent / "parent"
    cfg = _cfg_b()
    steps = []
    s1 = adapt(parent, _lab_b(mparent), mparent / "child", cfg, progress=lambda f, m: steps.append((f, m)))
    assert s1["backbone_fine_tuned"] and not s1["head_only_because"]
    assert any("fine-tuning the top of the network" in m for _, m in steps)
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions), steps  # the progress bar never runs backwards
    old, new = Predictor.load(parent).model, Predictor.load(mparent / "child").model
    for below in ("Conv1", "block_9_expand", "block_13_expand"):  # the parent's, bit for bit
        for a, b in zip(_weights(old, below), _weights(new, below)):
            np.testing.assert_array_equal(a, b)
    for above in ("block_14_expand", "block_16_project", "Conv_1", "head_dense"):
        # (head_dense also gains the rows of the chroma histogram the adapted head reads)
        assert any(a.shape != b.shape or not np.allclose(a, b)
                   for a, b in zip(_weights(old, above), _weights(new, above))), above
    card = json.loads((mparent / "child" / "model_card.json").read_text())
    assert card["lineage"]["what_was_refitted"].startswith("the backbone's top 21 layers and the head, from the "
                                                           "activations at block_13_project_BN")
    bank_p, bank_c = load_bank(parent / "replay.npz"), load_bank(mparent / "child" / "replay.npz")
    # The child keeps the parent rows it can recompute (those with activations) and adds the lab's cells.
    n_parent_rows = int((~np.char.startswith(bank_c["part"].astype(str), "lab_")).sum())
    assert n_parent_rows == len(bank_p["cut_rows"])
    assert len(bank_c["cut_rows"]) == len(bank_c["labels"])
    np.testing.assert_array_equal(bank_c["cut_codes"][:n_parent_rows], bank_p["cut_codes"])
    assert not np.allclose(bank_c["features"][:n_parent_rows], bank_p["features"][bank_p["cut_rows"]], atol=1e-3)
    # The child is a parent like any other: a second lab's adaptation fine-tunes it again.
    # Scored over the flips / rotations of each image (test_time_views), fitted and applied the same way.
    lab2 = _lab_folder(mparent / "lab2", {"mono": 1, "trilobed": 3}, per_class=12)
    s2 = adapt(mparent / "child", lab2, mparent / "grandchild", dataclasses.replace(cfg, test_time_views=8))
    assert s2["backbone_fine_tuned"]
    card2 = json.loads((mparent / "grandchild" / "model_card.json").read_text())
    assert card2["lineage"]["parent"]["model_id"] == "child"
    from bcc_core.backbones import default_weights_path

    if default_weights_path() is None:
        pytest.skip("scoring checks need a parent that tells images apart: no ../shared/weights")
    assert_scores_as_fitted(mparent / "grandchild", lab2, s2, 8)
    assert_scores_as_fitted(mparent / "child", _lab_b(mparent), s1, 1)


def test_the_same_cells_and_settings_give_the_same_model(mparent):
    """An auditor re-running an adaptation from its card (cells, settings, parent) on the same machine gets the
    same network and trust layer, bit for bit: nothing in adapt draws from an unseeded source. (Across CPU
    models the floating-point kernels differ, and so may the fine-tuned weights.)"""
    from bcc_core.adapt import adapt
    from bcc_core.inference import Predictor

    first = mparent / "child"  # adapted by the fine-tuning test above; redone here when this test runs alone
    if not (first / "model_card.json").is_file():
        adapt(mparent / "parent", _lab_b(mparent), first, _cfg_b())
    again = mparent / "child_again"
    assert adapt(mparent / "parent", _lab_b(mparent), again, _cfg_b())["backbone_fine_tuned"]
    for wa, wb in zip(Predictor.load(first).model.get_weights(), Predictor.load(again).model.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    card_a, card_b = (json.loads((d / "model_card.json").read_text()) for d in (first, again))
    assert card_a["trust"] == card_b["trust"]


def test_too_few_cells_or_switched_off_keep_the_whole_backbone(mparent):
    from bcc_core.adapt import AdaptConfig, adapt, can_fine_tune
    from bcc_core.inference import Predictor
    from bcc_core.replay import CUT_LAYERS, load_bank

    lab = _lab_folder(mparent / "lab0", {"mono": 1, "bilobed": 2}, per_class=12)
    s = adapt(mparent / "parent", lab, mparent / "head_only", AdaptConfig(lab="lab C", epochs=3,
                                                                          backbone_layers=CUT_LAYERS))  # 12 < 15 cells
    assert not s["backbone_fine_tuned"] and "fewer than 15 distinct reviewed cells" in s["head_only_because"]
    old, new = Predictor.load(mparent / "parent").model, Predictor.load(mparent / "head_only").model
    for name in ("block_14_expand", "Conv_1"):
        for a, b in zip(_weights(old, name), _weights(new, name)):
            np.testing.assert_array_equal(a, b)
    r = Predictor.load(mparent / "head_only").predict([_lab_cell(3, 1)])[0]
    assert r.predicted_class in ("bilobed", "mono", "trilobed")
    bank = load_bank(mparent / "parent" / "replay.npz")
    assert "the default (adapt --fine-tune" in can_fine_tune(bank, None, AdaptConfig())
    fine = AdaptConfig(backbone_layers=CUT_LAYERS)
    assert "no activations at the cut" in can_fine_tune({k: v for k, v in bank.items() if not k.startswith("cut")},
                                                        None, fine)
    assert can_fine_tune(bank, None, fine, cells_per_class={"mono": 20, "bilobed": 25}) == ""


def test_unknown_folders_name_a_model_that_knows_them():
    from bcc_core.adapt import check_classes

    others = {"models/pb7": ["basophil", "eosinophil", "lymphocyte", "monocyte", "seg_neutrophil"]}
    with pytest.raises(ValueError, match=r"\['lymphocyte'\].*the model pb7 knows all of them \(CLI: --model models/pb7"):
        check_classes(["monocyte", "lymphocyte"], ["basophil", "monocyte"], False, others)
    with pytest.raises(ValueError) as e:
        check_classes(["monocyte", "platelet"], ["basophil", "monocyte"], False, others)
    assert "knows all" not in str(e.value)
    assert check_classes(["monocyte", "platelet"], ["basophil", "monocyte"], True, others)[-1] == "platelet"


def test_wider_models_name_the_models_that_know_every_class_and_more(tmp_path):
    from bcc_core.inference import card_classes, wider_models

    def model(name, classes):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_card.json").write_text(json.dumps({"classes": classes}))
        return tmp_path / name

    five = model("five", ["basophil", "monocyte", "seg_neutrophil"])
    seven = model("seven", ["basophil", "eosinophil", "lymphocyte", "monocyte", "seg_neutrophil"])
    other = model("other", ["early", "pre", "pro"])
    same = model("same", ["seg_neutrophil", "monocyte", "basophil"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_card.json").write_text("{not json")
    everyone = [five, seven, other, same, tmp_path / "broken"]
    assert wider_models(five, everyone) == [(str(seven), ["eosinophil", "lymphocyte"])]
    assert wider_models(seven, everyone) == [] and wider_models(tmp_path / "broken", everyone) == []
    assert card_classes(tmp_path / "broken") == [] and card_classes(tmp_path / "missing") == []


def test_joint_colour_head_is_trained_with_the_top_and_not_refitted(mparent):
    """colour_with_top="joint": the head trained with the fine-tuned top reads the chroma histogram from the
    start, so no head is refitted after; the folder holds the histogram branch and scores the lab's cells
    as adapt scored them when fitting the trust layer."""
    from bcc_core.adapt import adapt
    from bcc_core.colour import N_FEATURES, has_colour
    from bcc_core.inference import Predictor

    steps = []
    out = mparent / "joint"
    s = adapt(mparent / "parent", _lab_b(mparent), out, dataclasses.replace(_cfg_b(), colour_with_top="joint"),
              progress=lambda f, m: steps.append(m))
    assert s["backbone_fine_tuned"] and s["colour_features"]
    assert not any(m.startswith("training the head") for m in steps), steps  # no refit after the fine-tuning
    model = Predictor.load(out, runtime="keras").model
    assert has_colour(model)
    k = model.get_layer("head_dense").get_weights()[0]
    assert np.abs(k[-N_FEATURES:]).max() > 0  # the histogram's rows were trained (they start at zero)
    card = json.loads((out / "model_card.json").read_text())
    assert "trained with the top" in card["lineage"]["what_was_refitted"]
    from bcc_core.backbones import default_weights_path

    if default_weights_path() is None:
        pytest.skip("scoring checks need a parent that tells images apart: no ../shared/weights")
    assert_scores_as_fitted(out, _lab_b(mparent), s, 1)


def test_cross_fitted_head_on_the_fine_tuned_top(mparent):
    """cross_fit with the top fine-tuned: the top learns from the fitting cells only, the head refitted on
    its features (to read the histogram) from every reviewed cell; calibration is scored out of sample."""
    from bcc_core.adapt import adapt

    steps = []
    s = adapt(mparent / "parent", _lab_b(mparent), mparent / "cross", dataclasses.replace(_cfg_b(), cross_fit=True),
              progress=lambda f, m: steps.append(f))
    assert s["backbone_fine_tuned"] and s["colour_features"] and s["cross_fitted"]
    assert steps == sorted(steps)  # the progress bar never runs backwards
    card = json.loads((mparent / "cross" / "model_card.json").read_text())
    text = card["lineage"]["what_was_refitted"]
    assert text.startswith("the backbone's top 21 layers") and "cross-fitted: the head was fitted on all 24" in text
    joint = adapt(mparent / "parent", _lab_b(mparent), mparent / "cross_joint",
                  dataclasses.replace(_cfg_b(), cross_fit=True, colour_with_top="joint"))
    assert not joint["cross_fitted"]  # no head is refitted after the top: nothing to cross-fit
