"""Adapting a model to a lab (bcc_core.adapt) on a tiny synthetic model: class checks, lineage, no
forgetting of unlabelled classes, a loadable folder, disjoint fitting / calibration cells."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import synthetic_cell

SHAPES = [("mono", 1), ("bilobed", 2), ("trilobed", 3)]


def _write(d: Path, name: str, img: np.ndarray):
    d.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(d / name), img[..., ::-1])


def _lab_cell(seed, lobes):
    """Another 'lab': bluish stain, smaller cells."""
    img = synthetic_cell(160, 22 + seed % 4, seed=seed, lobes=lobes).astype(np.int16)
    img[..., 2] += 20
    img[..., 0] -= 25
    return np.clip(img, 0, 255).astype(np.uint8)


def train_synthetic_parent(tmp: Path, backbone: str, epochs: int, weights: str = "none") -> dict:
    """A parent trained on 3 synthetic classes, 14 cells each, into tmp / "parent": from scratch, or from
    `weights` (a MobileNetV2 weights file)."""
    from bcc_core.augment import AugmentConfig
    from bcc_core.preprocess import PreprocessConfig
    from bcc_core.training import TrainConfig, train

    for k, (name, lobes) in enumerate(SHAPES):
        for i in range(14):
            # Each class carries a tint (kept: no stain normalisation), so the tiny parent really learns its
            # classes; a parent at chance would make "keeps the parent's predictions" a coin toss.
            img = synthetic_cell(160, 26 + 2 * (i % 5), seed=100 * k + i, lobes=lobes).astype(np.int16)
            img[..., k] += 70
            _write(tmp / "data" / name, f"{name}_{i}.png", np.clip(img, 0, 255).astype(np.uint8))
    cfg = TrainConfig(task="synthetic", backbone=backbone, weights=weights, epochs=epochs, learning_rate=2e-3,
                      aug_views=0, batch_size=8, preprocess=PreprocessConfig(size=64, stain_norm="none").to_dict(),
                      augment=AugmentConfig.none().to_dict())
    return train(tmp / "data", tmp / "parent", cfg, progress=False)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapt")
    m = train_synthetic_parent(tmp, "small_cnn", epochs=8)
    assert m["test"]["accuracy"] > 0.8  # a parent that knows its classes (the premise of the tests below)
    return tmp / "parent"


def _lab_folder(root: Path, classes: dict, per_class=10, dup=False) -> Path:
    for name, lobes in classes.items():
        for i in range(per_class):
            _write(root / name, f"{name}_{i}.png", _lab_cell(1000 + 37 * lobes + i, lobes))
    if dup:  # a byte-identical copy must land on the same side as its original
        first = sorted((root / list(classes)[0]).iterdir())[0]
        shutil.copy(first, first.with_name("copy_of_" + first.name))
    return root


def test_training_writes_a_replay_bank(parent):
    from bcc_core.replay import load_bank

    bank = load_bank(parent / "replay.npz")
    card = json.loads((parent / "model_card.json").read_text())
    assert list(bank["classes"]) == card["classes"]
    assert {"train", "val", "cal_a", "cal_b", "test"} <= set(bank["part"])
    for part, n in card["split"]["sizes"].items():  # every part but train (subsampled) kept whole
        assert part == "train" or (bank["part"] == part).sum() == n
    assert bank["features"].shape[0] == len(bank["labels"]) == len(bank["part"]) and "early" in bank
    assert (bank["part"] == "test").sum() == card["split"]["sizes"]["test"]
    # Each row's chroma histogram, as the layers an adapted head reads it compute it (bcc_core.colour).
    from bcc_core.colour import N_FEATURES

    assert bank["colour"].shape == (len(bank["labels"]), N_FEATURES)
    assert 0 < bank["colour"].sum(1).min() and bank["colour"].sum(1).max() <= 1 + 1e-3


def test_unknown_folder_is_refused_with_the_model_classes(parent, tmp_path):
    from bcc_core.adapt import adapt

    lab = _lab_folder(tmp_path / "lab", {"mono": 1, "quadlobed": 4})
    with pytest.raises(ValueError, match=r"quadlobed.*bilobed.*mono.*trilobed"):
        adapt(parent, lab, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_add_classes_needs_enough_cells_then_adds_an_output(parent, tmp_path):
    from bcc_core.adapt import AdaptConfig, adapt
    from bcc_core.inference import Predictor

    few = _lab_folder(tmp_path / "few", {"mono": 1}, per_class=10)
    _lab_folder(tmp_path / "few", {"quadlobed": 4}, per_class=3)
    with pytest.raises(ValueError, match="quadlobed.*3 distinct cells.*at least 8"):
        adapt(parent, few, tmp_path / "o1", AdaptConfig(add_classes=True, epochs=5))
    lab = _lab_folder(tmp_path / "lab", {"mono": 1, "quadlobed": 4}, per_class=10)
    adapt(parent, lab, tmp_path / "o2", AdaptConfig(lab="lab B", add_classes=True, epochs=5))
    p = Predictor.load(tmp_path / "o2")
    assert p.classes == ["bilobed", "mono", "trilobed", "quadlobed"]
    r = p.predict([_lab_cell(5, 4)])[0]
    assert set(r.probabilities) == set(p.classes) and abs(sum(r.probabilities.values()) - 1) < 1e-5
    parent_w = Predictor.load(parent).model.get_layer("logits").get_weights()[0]
    assert p.model.get_layer("logits").get_weights()[0].shape == (parent_w.shape[0], 4)


@pytest.fixture(scope="module")
def adapted(parent, tmp_path_factory):
    from bcc_core.adapt import AdaptConfig, adapt

    from bcc_core.trust import TrustModel

    tmp = tmp_path_factory.mktemp("adapted")
    lab = _lab_folder(tmp / "lab", {"mono": 1, "bilobed": 2}, per_class=12, dup=True)
    _write(lab / "mono", "filed_wrong.png", _lab_cell(5000, 2))  # a reviewer's slip: a bilobed cell filed as mono
    calls = []
    fits = []  # what the trust layer was fitted on (the parts' item ids)
    seconds = []  # the second opinion it was given, and the parts it judged with it
    real_fit = TrustModel.fit.__func__

    def spy(cls, classes, train, cal_a, cal_b, *args, **kw):
        fits.append({"train": list(train.ids), "cal_a": list(cal_a.ids), "cal_b": list(cal_b.ids)})
        seconds.append((kw.get("second_opinion"), cal_a, cal_b, kw.get("no_errors_extra")))
        return real_fit(cls, classes, train, cal_a, cal_b, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrustModel, "fit", classmethod(spy))
        # the histogram is read from these 12 cells a class (from 10 by default), so a second opinion is fitted
        # the doubted cells learnt as labelled (the default leaves them out: test_leave_out_... adapts that way)
        summary = adapt(parent, lab, tmp / "new", AdaptConfig(lab="lab B", seed=1, doubted_labels="list"),
                        progress=lambda f, m: calls.append((f, m)))
    summary["_trust_fits"], summary["_second_opinions"] = fits, seconds
    return lab, tmp / "new", summary, calls


def test_card_names_parent_hash_lab_and_cells(parent, adapted):
    from bcc_core.model_card import load_card

    lab, new, summary, calls = adapted
    card = load_card(new)  # validates against the schema
    lin = card.lineage
    assert lin["parent"]["model_id"] == "parent"
    assert lin["parent"]["model_sha256"] == hashlib.sha256((parent / "model.keras").read_bytes()).hexdigest()
    assert lin["lab"] == "lab B"
    files = sorted(str(p.relative_to(lab)) for p in lab.rglob("*.png"))
    assert sorted(c["file"] for c in lin["cells"]) == files
    for c in lin["cells"]:
        assert c["sha256"] == hashlib.sha256((lab / c["file"]).read_bytes()).hexdigest()
    ba = lin["before_after"]
    assert set(ba["lab_calibration_part"]["after"]["recall"]) == {"bilobed", "mono"}
    assert 0 <= ba["parent_test_macro_f1"]["after"] <= 1
    assert calls[-1][0] == 1.0 and all(0 <= f <= 1 for f, _ in calls)
    assert [f for f, _ in calls] == sorted(f for f, _ in calls)


def test_a_second_opinion_on_the_features_alone_is_shipped_and_scores_the_labs_cells_out_of_sample(adapted):
    """A head reading the histogram ships with a features-only second opinion (its file hashed in the card); the
    trust fit judges the lab's calibration and out-of-fold fitting cells by second opinions fitted without them,
    and the parent's replay rows by the shipped one."""
    from bcc_core.inference import Predictor
    from bcc_core.second_opinion import FILE

    lab, new, summary, _ = adapted
    assert summary["second_opinion"] and summary["colour_features"]
    card = json.loads((new / "model_card.json").read_text())
    so_card = card["trust"]["second_opinion"]
    assert so_card["file"] == FILE and so_card["sha256"] == hashlib.sha256((new / FILE).read_bytes()).hexdigest()
    assert "second opinion" in card["lineage"]["what_was_refitted"]
    ((second, cal_a, cal_b, extra),) = summary["_second_opinions"]
    assert second is not None
    for part in (cal_a, cal_b, extra):
        assert part.second_logits is not None and part.second_logits.shape == part.logits.shape
        is_lab = np.array([str(i).startswith("lab:") for i in part.ids])
        shipped = second.logits(part.features)
        np.testing.assert_allclose(part.second_logits[~is_lab], shipped[~is_lab], rtol=1e-5, atol=1e-5)
        assert is_lab.any()  # out of sample: heads fitted without these cells score them differently
        assert not np.allclose(part.second_logits[is_lab], shipped[is_lab], atol=1e-4)
    p = Predictor.load(new, runtime="keras")
    p.predict_inputs(np.zeros((1, *p.model.input_shape[1:3], 3), np.uint8))
    assert p.__dict__["trust"].second_opinion is not None  # the trust layer read from the card carries it


def test_a_cell_filed_under_the_wrong_class_is_listed_for_a_reviewer_and_still_learnt_as_filed(adapted):
    """The label check reads every reviewed cell as scored by a head fitted without it: the bilobed cell filed as
    mono is listed (in the summary and the card), with the class it looks like; the model learnt it as filed."""
    from bcc_core.label_check import METHOD

    lab, new, summary, _ = adapted
    listed = {d["file"]: d for d in summary["labels_to_recheck"]}
    assert "mono/filed_wrong.png" in listed
    d = listed["mono/filed_wrong.png"]
    assert d["label"] == "mono" and d["suggested"] == "bilobed" and d["p_suggested"] > d["p_label"]
    assert len(listed) <= 3  # a handful of doubts, not every cell
    card = json.loads((new / "model_card.json").read_text())
    check = card["lineage"]["labels_to_recheck"]
    assert check["method"] == METHOD and check["cells"] == summary["labels_to_recheck"]
    assert check["checked"] == len(list(lab.rglob("*.png")))
    cells = json.loads((new / "cells.json").read_text())["cells"]
    assert {c["class"] for c in cells if c["file"] == "mono/filed_wrong.png"} == {"mono"}  # learnt as filed


def test_leave_out_adapts_again_without_the_doubted_cells_and_records_them(parent, tmp_path):
    """doubted_labels = 'leave_out': a first pass finds the slip, a second adapts without it; the card lists it
    among the files not used (with the reason) and in the label check's left_out; progress runs once, upward."""
    from bcc_core.adapt import LEFT_OUT, AdaptConfig, adapt

    lab = _lab_folder(tmp_path / "lab", {"mono": 1, "bilobed": 2}, per_class=12)
    _write(lab / "mono", "filed_wrong.png", _lab_cell(5000, 2))
    calls = []
    summary = adapt(parent, lab, tmp_path / "new", AdaptConfig(lab="lab B", seed=1, doubted_labels="leave_out"),
                    progress=lambda f, m: calls.append((f, m)))
    assert "mono/filed_wrong.png" in summary["labels_left_out"]
    card = json.loads((tmp_path / "new" / "model_card.json").read_text())
    lin = card["lineage"]
    assert "mono/filed_wrong.png" not in {c["file"] for c in lin["cells"]}
    assert {"file": str(lab.resolve() / "mono" / "filed_wrong.png"), "reason": LEFT_OUT} in lin["files_not_used"]
    assert lin["labels_to_recheck"]["left_out"] == summary["labels_left_out"]
    assert lin["n_cells"]["per_class"]["mono"] == 13 - sum(f.startswith("mono/") for f in summary["labels_left_out"])
    assert [f for f, _ in calls] == sorted(f for f, _ in calls) and calls[-1][0] == 1.0
    assert any("adapting again without" in m for _, m in calls)


def test_leave_out_keeps_three_quarters_of_a_class_and_what_an_added_class_needs():
    from bcc_core.adapt import AdaptConfig, _may_leave_out

    files = [f"c{i}" for i in range(24)]
    y = np.repeat([0, 3], 12)  # class 3 is added (n_old = 3): it needs min_new_class_cells
    groups = np.arange(24)
    doubted = [{"file": f"c{i}"} for i in (0, 1, 2, 3, 4, 12, 13, 14, 15, 16)]
    left = _may_leave_out(doubted, files, y, groups, 3, AdaptConfig(min_new_class_cells=10))
    assert left == ("c0", "c1", "c2", "c12", "c13")  # 9 of 12 stay; the added class keeps 10
    groups[1] = groups[0]  # c1 is a copy of c0: one distinct cell; 9 of the class's 11 must stay
    assert _may_leave_out(doubted[:4], files, y, groups, 3, AdaptConfig()) == ("c0", "c1", "c2")
    # a first pass whose head read the histogram (from colour_min_cells a class) keeps that many: the second pass
    # is the same kind of model, never one that reads the features alone because cells were left out
    assert _may_leave_out(doubted[:4], files, y, groups, 3, AdaptConfig(), keep=10) == ("c0", "c1")


def test_lab_cells_are_in_the_fit_or_the_calibration_part_never_both(adapted):
    from bcc_core.replay import load_bank

    lab, new, summary, _ = adapted
    cells = json.loads((new / "cells.json").read_text())["cells"]
    fit = {c["sha256"] for c in cells if c["part"] == "fit"}
    cal_a = {c["sha256"] for c in cells if c["part"] == "calibration_a"}
    cal_b = {c["sha256"] for c in cells if c["part"] == "calibration_b"}
    assert fit and cal_a and cal_b and not fit & cal_a and not fit & cal_b and not cal_a & cal_b
    # the byte-identical copy shares its original's part (duplicates grouped before the split)
    parts = {c["file"]: c["part"] for c in cells}
    copy = next(f for f in parts if "copy_of_" in f)
    assert parts[copy] == parts[copy.replace("copy_of_", "")]
    # every class has cells on both sides, and the replay carries the lab's cells forward by part
    for k in ("mono", "bilobed"):
        assert {c["part"] for c in cells if c["class"] == k} == {"fit", "calibration_a", "calibration_b"}
    bank = load_bank(new / "replay.npz")
    lab_rows = bank["source"] == "lab B"
    assert lab_rows.sum() == len(cells) and summary["cross_fitted"]
    # Cross-fitted (the default), the shipped head learnt from every cell: all of them enter a later adaptation's
    # fit, none its calibration (test_cross_fitted_... shows the parts kept apart without cross-fitting).
    assert set(bank["part"][lab_rows]) == {"lab_fit"}


def test_trust_is_refitted_on_the_labs_calibration_parts_only(parent, adapted):
    """Calibration A gets the lab's part A (and the parent's calibration-A replay), B the lab's part B (and
    the parent's B replay); neither sees a fitting cell, a test row or the other part."""
    from bcc_core.replay import load_bank

    lab, new, summary, _ = adapted
    (fit,) = summary["_trust_fits"]
    cells = json.loads((new / "cells.json").read_text())["cells"]
    by_part = {p: {f"lab:{c['sha256']}" for c in cells if c["part"] == p} for p in ("fit", "calibration_a", "calibration_b")}
    lab_ids = {k: {i for i in v if i.startswith("lab:")} for k, v in fit.items()}
    assert lab_ids["train"] == by_part["fit"]
    assert lab_ids["cal_a"] == by_part["calibration_a"] and lab_ids["cal_b"] == by_part["calibration_b"]
    bank = load_bank(parent / "replay.npz")
    rows = {k: {int(i.split(":")[1]) for i in v if i.startswith("bank:")} for k, v in fit.items()}
    assert {bank["part"][i] for i in rows["train"]} == {"train"}
    assert {bank["part"][i] for i in rows["cal_a"]} == {"cal_a"}
    assert {bank["part"][i] for i in rows["cal_b"]} == {"cal_b"}
    card = json.loads((new / "model_card.json").read_text())
    rv = card["trust"]["review"]
    assert (rv["threshold"] is None) == (not rv["certified"]) and card["version"]
    assert card["trust"]["review_classes"] == ["trilobed"]  # not reviewed by the lab: always sent to review


def test_unlabelled_class_keeps_the_parents_predictions(parent, adapted):
    from bcc_core.colour import has_colour, head_rows
    from bcc_core.inference import Predictor
    from bcc_core.models import LOGITS_LAYER, head_only
    from bcc_core.replay import load_bank

    _, new, summary, _ = adapted
    bank = load_bank(parent / "replay.npz")
    old_p, new_p = Predictor.load(parent), Predictor.load(new)
    assert has_colour(new_p.model) and not has_colour(old_p.model)  # the adapted head also reads the chroma
    tri = bank["labels"] == old_p.classes.index("trilobed")
    f, h = bank["features"][tri], bank["colour"][tri]
    before = np.asarray(head_only(old_p.model, LOGITS_LAYER)(head_rows(old_p.model, f, h))).argmax(1)
    after = np.asarray(head_only(new_p.model, LOGITS_LAYER)(head_rows(new_p.model, f, h))).argmax(1)
    assert (before == after).mean() >= 0.9
    assert summary["unlabelled_classes_same_prediction"] >= 0.9


def test_the_head_reads_the_histogram_standardised_times_the_gain(adapted):
    """The fixed scale layer standardises each histogram bin on the head's fitting rows and multiplies it by
    `colour_gain` (the child bank holds those rows but not their flips / rotations, whose histograms are nearly
    the same: each lab row is counted as its views, so the spread is close to the gain, not equal)."""
    from bcc_core.adapt import AdaptConfig
    from bcc_core.colour import SCALE_LAYER, STD_FLOOR
    from bcc_core.inference import Predictor
    from bcc_core.replay import load_bank

    _, new, _, _ = adapted
    w, _ = Predictor.load(new, runtime="keras").model.get_layer(SCALE_LAYER).get_weights()
    assert np.allclose(w, np.diag(np.diag(w)))  # per bin, no mixing
    child = load_bank(new / "replay.npz")
    # The head fits each lab cell with its 7 flips / rotations (AdaptConfig.aug_views): 8 rows a cell.
    reps = np.where(child["part"] == "lab_fit", 1 + AdaptConfig().aug_views, 1)
    keep = np.isin(child["part"], ("train", "lab_fit"))
    h = np.repeat(child["colour"][keep].astype(np.float64), reps[keep], axis=0)
    spread = h.std(0) * np.diag(w)
    varied = h.std(0) > 2 * STD_FLOOR
    gain = AdaptConfig().colour_gain
    assert varied.sum() >= 10 and np.median(spread[varied]) == pytest.approx(gain, rel=0.1)


def test_adapted_folder_predicts_and_differs_from_parent(parent, adapted):
    from bcc_core.inference import Predictor

    _, new, _, _ = adapted
    p = Predictor.load(new)
    res = p.predict([_lab_cell(7, 1), _lab_cell(8, 2)])
    assert len(res) == 2 and all(r.predicted_class in p.classes and r.status in ("ok", "review") for r in res)
    w_new = p.model.get_layer("logits").get_weights()[0]
    w_old = Predictor.load(parent).model.get_layer("logits").get_weights()[0]
    assert not np.allclose(w_new, w_old)  # the head was retrained
    # the backbone is the parent's, untouched
    name = p.early_layer
    np.testing.assert_array_equal(p.model.get_layer("block1_conv").get_weights()[0],
                                  Predictor.load(parent).model.get_layer("block1_conv").get_weights()[0])
    assert name == "block2_pool"


def test_cli_adapt_refuses_unknown_class_in_its_message(parent, tmp_path, capsys):
    from bcc_core.cli import main

    lab = _lab_folder(tmp_path / "lab", {"mono": 1, "weird": 2}, per_class=3)
    assert main(["adapt", "--model", str(parent), "--data", str(lab), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "weird" in capsys.readouterr().err


def assert_scores_as_fitted(new: Path, lab: Path, summary: dict, views: int):
    """The adapted folder, loaded as the app loads it, scores images as `adapt` scored the lab's cells when it
    fitted the trust layer: with `views` > 1 the logits are the mean over the image's flips / rotations
    (the same for every view of one image), and the lab's calibration cells get adapt's figures."""
    from bcc_core.adapt import lab_figures
    from bcc_core.inference import Predictor
    from bcc_core.io import read_image
    from bcc_core.preprocess import dihedral_views

    p = Predictor.load(new)
    assert p.views == views and json.loads((new / "model_card.json").read_text())["trust"].get("views", 1) == views
    cells = [c for c in json.loads((new / "cells.json").read_text())["cells"] if c["part"].startswith("calibration")]
    prepared = [p.prepare(read_image(lab / c["file"])) for c in cells]
    x = np.stack([inp for inp, _ in prepared])
    one = p.forward(x, views=1)[1]
    assert np.ptp(one, axis=0).max() > 1e-3, "one output for every image: the checks below could not fail"
    per_view = [one] + [p.forward(v, views=1)[1] for v in dihedral_views(x, views - 1)]
    np.testing.assert_allclose(p.forward(x)[1], np.mean(per_view, 0), rtol=1e-4, atol=1e-4)
    if views == 8:  # a flipped image has the same eight views, so the same scores
        np.testing.assert_allclose(p.forward(x[:, :, ::-1])[1], p.forward(x)[1], rtol=1e-4, atol=1e-4)
    res = p.predict_inputs(x, [flags for _, flags in prepared])
    y = np.array([p.classes.index(c["class"]) for c in cells])
    probs = np.array([[r.probabilities[c] for c in p.classes] for r in res])
    got = lab_figures(y, probs, np.array([r.status == "ok" for r in res]), p.classes)
    assert got["recall"] == pytest.approx(summary["after"]["recall"])
    assert got["ok_fraction"] == pytest.approx(summary["after"]["ok_fraction"])


def test_views_average_the_logits_the_trust_layer_was_fitted_on(parent, tmp_path):
    """test_time_views = 8 (head retrained on frozen features): the card records the views, and the folder
    scores the lab's calibration cells exactly as adapt did when fitting temperature, OOD and review rule."""
    from bcc_core.adapt import AdaptConfig, adapt

    with pytest.raises(ValueError, match="1..8"):  # there are no more distinct flips / rotations
        AdaptConfig(test_time_views=9)
    with pytest.raises(ValueError, match="colour_gain must be positive"):
        AdaptConfig(colour_gain=0)
    lab = _lab_folder(tmp_path / "lab", {"mono": 1, "bilobed": 2}, per_class=12)
    # (not cross-fitted: the calibration cells are then scored by the head the folder ships)
    summary = adapt(parent, lab, tmp_path / "new", AdaptConfig(lab="lab B", seed=1, test_time_views=8, cross_fit=False))
    assert not summary["backbone_fine_tuned"]
    assert "8 flips" in json.loads((tmp_path / "new" / "model_card.json").read_text())["trust"]["fitted_on"]["views"]
    assert_scores_as_fitted(tmp_path / "new", lab, summary, 8)
    # ... while one view of a flipped image scores differently (the averaging is not vacuous here)
    from bcc_core.inference import Predictor

    p = Predictor.load(tmp_path / "new")
    x = np.stack([p.prepare(_lab_cell(7 + i, 1 + i % 2))[0] for i in range(4)])
    assert not np.allclose(p.forward(x[:, :, ::-1], views=1)[1], p.forward(x, views=1)[1], atol=1e-4)


def test_cli_views_help_names_adapts_default(capsys):
    """The CLI states the default without importing bcc_core.adapt for every command: it must stay true."""
    from bcc_core.adapt import AdaptConfig
    from bcc_core.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["adapt", "--help"])
    assert f"(default {AdaptConfig.test_time_views}," in " ".join(capsys.readouterr().out.split())


def test_cli_fine_tune_and_head_only_cannot_be_given_together(capsys):
    """`--head-only` (the default, kept for old scripts) and `--fine-tune` contradict each other: refused with
    both names, never one silently winning; each alone parses."""
    from bcc_core.cli import build_parser

    base = ["adapt", "--model", "m", "--data", "d", "--out", "o"]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(base + ["--fine-tune", "--head-only"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--head-only" in err and "--fine-tune" in err and "not allowed with" in err
    assert build_parser().parse_args(base + ["--fine-tune"]).fine_tune
    assert not build_parser().parse_args(base + ["--head-only"]).fine_tune


def test_fine_tuning_views_without_colour_keep_every_other_operation():
    """backbone_aug_colour=False takes stain jitter, channel shift and greyscale out of the fine-tuning's
    augmented views and nothing else; the default is the training augmentation itself."""
    import dataclasses

    from bcc_core.adapt import COLOUR_OPS, AdaptConfig, backbone_augment
    from bcc_core.augment import AugmentConfig

    assert backbone_augment(AdaptConfig()) == AugmentConfig()
    plain = dataclasses.asdict(backbone_augment(AdaptConfig(backbone_aug_colour=False)))
    full = dataclasses.asdict(AugmentConfig())
    changed = {k for k in full if plain[k] != full[k]}
    assert changed == set(COLOUR_OPS) and all(plain[k] == 0.0 for k in COLOUR_OPS)


def test_a_folder_named_like_a_model_class_is_mapped_never_added_beside_it(parent, tmp_path, capsys):
    """'Monos' is the model's 'mono' under another spelling: even with --add-classes it is refused (a second
    class for one cell type would split it by lab), and --class-map reads it as the model's class."""
    from bcc_core.adapt import AdaptConfig, adapt
    from bcc_core.cli import main

    lab = _lab_folder(tmp_path / "lab", {"Monos": 1, "bilobed": 2}, per_class=10)
    with pytest.raises(ValueError, match=r"'Monos' looks like 'mono'.*--class-map Monos=mono"):
        adapt(parent, lab, tmp_path / "o1", AdaptConfig(add_classes=True, epochs=5))
    with pytest.raises(ValueError, match=r"names folder\(s\) \['monocyte'\]"):
        adapt(parent, lab, tmp_path / "o1", AdaptConfig(class_map={"monocyte": "mono"}, epochs=5))
    assert not (tmp_path / "o1").exists()
    out = tmp_path / "o2"
    assert main(["adapt", "--model", str(parent), "--data", str(lab), "--out", str(out), "--head-only",
                 "--class-map", "Monos=mono", "--views", "1", "--quiet"]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["classes"] == ["bilobed", "mono", "trilobed"]
    assert card["lineage"]["config"]["class_map"] == {"Monos": "mono"} and card["lineage"]["config"]["cross_fit"]
    cells = card["lineage"]["cells"]
    assert {c["class"] for c in cells if c["file"].startswith("Monos/")} == {"mono"}
    assert card["lineage"]["n_cells"]["per_class"] == {"bilobed": 10, "mono": 10}
    said = capsys.readouterr().out
    assert "cannot name" not in said    # not a white-cell model: nothing to warn about
    doubted = card["lineage"]["labels_to_recheck"]["cells"]  # the label check's verdict, as the CLI gives it
    assert (f"{len(doubted)} reviewed cell(s) whose label the model doubts" in said if doubted else
            "the model doubts none of the reviewed cells' labels" in said)
    assert all(f"{d['file']}: labelled {d['label']}" in said for d in doubted)


def test_describe_review_says_what_set_the_threshold():
    """The sentence the CLI and the Your lab page give: not certified; the guarantee alone; raised by the lab's
    confident errors, counting the reviewed cells the check read (calibration and out-of-fold fitting cells)."""
    from bcc_core.adapt import describe_review

    assert describe_review({"certified": False, "threshold": None}).startswith("No review threshold")
    items = {"cal_b": 10, "cal_a": 9, "lab_fit_out_of_fold": 30}
    kept = {"certified": True, "threshold": 0.71, "guarantee_threshold": 0.71, "no_errors_wrong_seen": 0,
            "no_errors_items": items}
    assert describe_review(kept) == ("Cells are shown as ok from confidence 0.710 (the guarantee's): no confident "
                                     "error among 49 of your reviewed cells, each scored by a model fitted without "
                                     "it, passed the other gates.")
    raised = {**kept, "threshold": 0.9312, "no_errors_wrong_seen": 2}
    assert "the guarantee alone gave 0.710; 2 confident errors among 49 of your" in describe_review(raised)
    assert "from confidence 0.931:" in describe_review(raised) and describe_review(raised).endswith(
        "without it, raised it above them.")
    assert "among your calibration cells" in describe_review({**raised, "no_errors_items": None})
    # errors that passed the other gates but sat below the guarantee's threshold did not raise it
    assert describe_review({**kept, "no_errors_wrong_seen": 1}) == (
        "Cells are shown as ok from confidence 0.710 (the guarantee's): 1 error among 49 of your reviewed cells, "
        "each scored by a model fitted without it, passed the other gates, all below it.")
    assert describe_review({"certified": True, "threshold": 0.5}) == "Cells are shown as ok from confidence 0.500."


def test_a_white_cell_model_that_cannot_name_a_normal_smears_types_says_so():
    """pbs5 (and pbs5 taught three types) cannot name lymphocytes and eosinophils, a third of a normal smear's
    white cells: the adapted card, the CLI and the Your lab page carry the warning; pb7 and all4 do not."""
    from bcc_core.adapt import untaught_warning, untaught_white_cells

    pbs5 = ["basophil", "erythroblast", "monocyte", "myeloblast", "seg_neutrophil"]
    assert untaught_white_cells(pbs5) == ["lymphocyte", "eosinophil"]
    assert untaught_white_cells(pbs5 + ["eosinophil", "lymphocyte"]) == []
    assert untaught_white_cells(["Benign", "Early", "Pre", "Pro"]) == []
    assert untaught_white_cells(pbs5 + ["lymphocyte"]) == ["eosinophil"]
    msg = untaught_warning(["eosinophil"])
    assert msg.startswith("This model cannot name eosinophil: ") and "--add-classes" in msg
    assert (Path(__file__).parents[2] / msg.split("three types: ")[1].split(")")[0]).is_file()  # the cited figures


def test_alike_classes_catch_case_separators_plurals_and_qualified_names():
    from bcc_core.data import alike_classes

    model = ["basophil", "eosinophil", "lymphocyte", "monocyte", "seg_neutrophil", "band_neutrophil"]
    assert alike_classes("Lymphocytes", model) == ["lymphocyte"]
    assert alike_classes("neutrophil", model) == ["seg_neutrophil", "band_neutrophil"]
    assert alike_classes("Seg-Neutrophil", model) == ["seg_neutrophil"]
    assert alike_classes("platelet", model) == [] and alike_classes("monocyte", model) == []
    assert alike_classes("mono", ["monocyte"]) == []          # an abbreviation is not guessed


def test_external_evaluation_names_a_look_alike_folder_left_unmapped(parent, tmp_path, capsys):
    """`evaluate --external` on a folder 'Monos' (the model's 'mono'): without a map its cells count as an unknown
    type (any shown as ok would be 'wrong and ok'), and the output says so and gives the map."""
    from bcc_core.cli import main

    lab = _lab_folder(tmp_path / "lab", {"Monos": 1, "bilobed": 2}, per_class=4)
    assert main(["evaluate", "--model", str(parent), "--data", str(lab), "--external", "--json"]) == 0
    out = capsys.readouterr().out
    rep = json.loads(out.strip().splitlines()[-1])
    assert "note: folder 'Monos' looks like the model's 'mono'" in out and "--class-map Monos=mono" in out
    assert rep["data"]["unmapped_look_alike"] == {"Monos": ["mono"]}
    assert rep["per_true_label"]["Monos"]["recall"] is None          # not a model class as read
    assert main(["evaluate", "--model", str(parent), "--data", str(lab), "--external", "--json",
                 "--class-map", "Monos=mono"]) == 0
    out = capsys.readouterr().out
    rep = json.loads(out.strip().splitlines()[-1])
    assert "note:" not in out and rep["data"]["unmapped_look_alike"] == {}
    assert set(rep["per_true_label"]) == {"mono", "bilobed"}


def test_the_adapted_head_reads_the_chroma_and_exports_and_explains_like_keras(adapted):
    """The new head's chroma branch is part of the exported runtime (ONNX, parity-checked at export) and of
    the compiled Grad-CAM (the histogram shifts which head units are active): both agree with Keras."""
    from bcc_core.colour import has_colour
    from bcc_core.explain import _gradcam_all, _maps, _vis
    from bcc_core.inference import Predictor

    _, new, summary, _ = adapted
    assert summary["colour_features"] and not summary["colour_not_used_because"]
    assert "chroma histogram" in json.loads((new / "model_card.json").read_text())["lineage"]["what_was_refitted"]
    exported = json.loads((new / "metrics.json").read_text())["export"]
    assert exported["ok"], exported
    fast, keras_p = Predictor.load(new), Predictor.load(new, runtime="keras")
    assert fast.runtime_backend != "keras" and has_colour(keras_p.model)
    x = np.stack([keras_p.prepare(_lab_cell(s, lobes))[0] for s, lobes in ((7, 1), (8, 2), (9, 3))])
    np.testing.assert_allclose(fast.forward(x)[1], keras_p.forward(x)[1], rtol=1e-3, atol=1e-3)
    mine = _gradcam_all(keras_p, x[0])
    theirs = _maps(_vis(keras_p, "gradcam"), keras_p.card.gradcam_layer, x[0], "gradcam",
                   list(range(len(keras_p.classes))))
    np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-4 * float(theirs.max()))


def test_without_histograms_in_the_bank_the_head_reads_the_features_alone_and_says_why(parent, tmp_path, capsys):
    from bcc_core.adapt import AdaptConfig, adapt
    from bcc_core.cli import main
    from bcc_core.colour import has_colour
    from bcc_core.inference import Predictor

    old = tmp_path / "old_parent"
    shutil.copytree(parent, old)
    bank = dict(np.load(old / "replay.npz"))
    del bank["colour"]  # a bank written before the histograms existed
    np.savez_compressed(old / "replay.npz", **bank)
    lab = _lab_folder(tmp_path / "lab", {"mono": 1, "bilobed": 2}, per_class=10)
    s = adapt(old, lab, tmp_path / "new", AdaptConfig(epochs=3))
    assert not s["colour_features"] and "replay-bank" in s["colour_not_used_because"]
    assert not has_colour(Predictor.load(tmp_path / "new", runtime="keras").model)
    few = adapt(parent, lab, tmp_path / "few", AdaptConfig(epochs=3, colour_min_cells=11))  # 10 cells a class
    assert not few["colour_features"] and "fewer than 11 distinct reviewed cells" in few["colour_not_used_because"]
    assert not few["second_opinion"]  # the head reads the features alone: nothing to second
    capsys.readouterr()
    assert main(["adapt", "--model", str(parent), "--data", str(lab), "--out", str(tmp_path / "off"), "--quiet",
                 "--no-colour", "--no-cross-fit"]) == 0
    out = capsys.readouterr().out
    assert "no chroma histogram: switched off" in out and "cross-fitted" not in out
    lineage = json.loads((tmp_path / "off" / "model_card.json").read_text())["lineage"]
    assert not lineage["config"]["cross_fit"]
    assert "not_checked" in lineage["labels_to_recheck"] and "doubts" not in out  # no out-of-sample scores
    assert not has_colour(Predictor.load(tmp_path / "off", runtime="keras").model)
    # 10 cells a class: the histogram is read, and a second opinion guards it unless switched off
    for out, flag in (("so", []), ("no_so", ["--no-second-opinion"])):
        assert main(["adapt", "--model", str(parent), "--data", str(lab), "--out", str(tmp_path / out), "--quiet",
                     "--no-cross-fit", *flag]) == 0
        said = "second opinion: a cell is shown as ok only when a head reading the features alone" in capsys.readouterr().out
        trust = json.loads((tmp_path / out / "model_card.json").read_text())["trust"]
        assert said == (not flag) == ("second_opinion" in trust)


def test_cross_fitted_head_is_fitted_on_every_cell_and_calibrated_out_of_sample(parent, tmp_path, monkeypatch):
    """cross_fit (head only): the shipped head is fitted on every reviewed cell, the trust layer on scores of
    heads that never saw the cells they score; the child's replay bank offers none of the lab's cells for a
    later adaptation's calibration (the shipped head was fitted on all of them)."""
    from bcc_core.adapt import AdaptConfig, adapt
    from bcc_core.inference import Predictor
    from bcc_core.replay import load_bank
    from bcc_core.trust import TrustModel

    lab = _lab_folder(tmp_path / "lab", {"mono": 1, "bilobed": 2}, per_class=12)
    cfg = AdaptConfig(lab="lab B", seed=1, test_time_views=1, aug_views=1)
    split = adapt(parent, lab, tmp_path / "split", dataclasses.replace(cfg, cross_fit=False))
    steps, seen, fit = [], [], TrustModel.fit.__func__
    monkeypatch.setattr(TrustModel, "fit", classmethod(
        lambda cls, *a, **k: (seen.append(k.get("no_errors_extra")), fit(cls, *a, **k))[1]))
    cross = adapt(parent, lab, tmp_path / "cross", cfg,
                  progress=lambda f, m: steps.append(m))
    assert cross["cross_fitted"] and not split["cross_fitted"]
    assert sum("cross-fitting" in m for m in steps) == 2  # one head without calibration part A, one without B
    # ... and one without each fold of the fitting part, for the lab's no-errors check
    assert sum("the lab check: a head without fitting fold" in m for m in steps) == cfg.lab_check_folds == 3
    assert cross["n_cells"] == split["n_cells"]  # the same parts; only what the head is fitted on differs
    card = json.loads((tmp_path / "cross" / "model_card.json").read_text())
    refitted = card["lineage"]["what_was_refitted"]
    assert "the lab's 24 reviewed cells" in refitted and "cross-fitted: the head was fitted on all 24" in refitted
    assert "3 grouped folds" in refitted
    # the trust fit was handed the fitting cells, scored out of fold, for the lab's check (test_trust_units
    # shows what the check does with them; this parent's replay is too small for a certified rule)
    extra = seen[-1]
    fit_cells = {f"lab:{c['sha256']}" for c in card["lineage"]["cells"] if c["part"] == "fit"}
    assert extra.name == "lab_fit_out_of_fold" and set(extra.ids) == fit_cells and len(extra.ids) == len(fit_cells)
    assert set(extra.source) == {"lab B"}
    parts = load_bank(tmp_path / "cross" / "replay.npz")["part"].astype(str)
    assert (parts[np.char.startswith(parts, "lab_")] == "lab_fit").all() and (parts == "lab_fit").sum() == 24
    w_split, w_cross = (Predictor.load(tmp_path / d, runtime="keras").model.get_layer("logits").get_weights()[0]
                        for d in ("split", "cross"))
    assert not np.allclose(w_split, w_cross)  # fitted on 24 cells, not the 14 of the fitting part
    split_parts = load_bank(tmp_path / "split" / "replay.npz")["part"].astype(str)
    assert {p for p in split_parts if p.startswith("lab_")} == {"lab_fit", "lab_cal_a", "lab_cal_b"}
