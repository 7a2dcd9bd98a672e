"""Train → save → load → predict → screen → CLI, end to end on a tiny generated ImageFolder.

Uses MobileNetV2 with random weights saved to a file (no download, no ../shared), so this runs
everywhere; it checks the contract, not accuracy.
"""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT, synthetic_cell

from bcc_core.data import PARTS

pytestmark = pytest.mark.slow


def _make_folder(root: Path, per_class=10):
    for k, (name, lobes) in enumerate([("mono", 1), ("bilobed", 2), ("trilobed", 3)]):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            img = synthetic_cell(200, 30 + 2 * (i % 5), seed=100 * k + i, lobes=lobes)
            cv2.imwrite(str(d / f"{name}_{i}.png"), img[..., ::-1])
    (root / "mono" / "notes.txt").write_text("not an image")
    (root / "mono" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import keras

    from bcc_core.backbones import get_spec
    from bcc_core.training import TrainConfig, train

    tmp = tmp_path_factory.mktemp("pipe")
    data = tmp / "data"
    _make_folder(data)
    inp = keras.Input((224, 224, 3))
    base = get_spec("mobilenetv2").build(inp, None)
    wfile = tmp / "random.weights.h5"
    base.save_weights(wfile)
    cfg = TrainConfig(task="synthetic", weights=str(wfile), epochs=2, aug_views=1, batch_size=8)
    with pytest.MonkeyPatch.context() as mp:
        seen = _spy_on_fits(mp)
        metrics = train(data, tmp / "model", cfg, progress=False)
    metrics["_seen"] = seen
    return data, tmp / "model", metrics


def _spy_on_fits(mp) -> dict:
    """Record what each stage of `train` and each low-level fit receives (split discipline test)."""
    from bcc_core import calibration, ood, review, training
    from bcc_core.trust import TrustModel

    seen = {}

    def wrap(mod, name, record):
        real = getattr(mod, name)

        def f(*a, **k):
            out = real(*a, **k)
            seen.setdefault(name, []).append(record(out, *a, **k))
            return out
        mp.setattr(mod, name, f)

    wrap(training, "prepare_data", lambda out, *a, **k: {"parts": out.parts, "x": out.x, "groups": out.groups})
    wrap(training, "fit_network", lambda out, xt, yt, xv, yv, *a, **k: {"x_train": xt, "x_val": xv})
    wrap(training, "evaluate", lambda out, test, *a, **k: {"test_ids": np.asarray(test.ids)})
    wrap(calibration, "fit_temperature", lambda out, logits, labels: {"n": len(logits), "logits": logits})
    wrap(ood, "fit", lambda out, feats, labels, *a, **k: {"n": len(feats)})
    wrap(review, "fit_selective_threshold", lambda out, conf, *a, **k: {"n": len(conf)})
    wrap(review, "conformal_qhat", lambda out, probs, *a, **k: {"n": len(probs)})
    real_fit = TrustModel.fit.__func__

    def trust_fit(cls, classes, train_part, cal_a, cal_b, *a, **k):
        seen.setdefault("trust_fit", []).append({p.name: np.asarray(p.ids) for p in (train_part, cal_a, cal_b)}
                                                | {"cal_a_logits": cal_a.logits})
        return real_fit(cls, classes, train_part, cal_a, cal_b, *a, **k)
    mp.setattr(TrustModel, "fit", classmethod(trust_fit))
    return seen


def test_training_writes_a_complete_model(trained):
    data, model_dir, metrics = trained
    for f in ("model.keras", "model_card.json", "metrics.json", "split.json", "ood_stats.npz"):
        assert (model_dir / f).is_file(), f
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["classes"] == ["bilobed", "mono", "trilobed"]
    assert card["calibration"]["temperature"] > 0
    assert "threshold" in card["ood"] and "threshold" in card["review_rule"]
    # The early-layer OOD detector is fitted by default and travels with the model.
    assert card["ood"]["early_layer"] == "block_9_add" and "mahalanobis_early" in card["ood"]["comparison"]
    from bcc_core.ood import load_stats

    assert "early_means" in load_stats(model_dir / "ood_stats.npz")
    assert card["data"]["n_images"] == 30 and card["data"]["problems"] >= 1  # broken.jpg / notes.txt reported
    split = json.loads((model_dir / "split.json").read_text())
    assert sum(metrics["split_sizes"].values()) == 30 and set(metrics["split_sizes"]) == set(PARTS)
    cm = np.array(metrics["test"]["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == metrics["split_sizes"]["test"]
    assert metrics["test"]["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert set(metrics["shortcut_audit"]["raw_images"]) == {"border_colour", "image_size", "colour_histogram"}
    assert {k: len(v) for k, v in split["splits"].items()} == metrics["split_sizes"]
    import hashlib
    import re

    from bcc_core.model_card import model_identity

    sha = hashlib.sha256((model_dir / "model.keras").read_bytes()).hexdigest()
    assert re.fullmatch(r"\d{4}\.\d{2}\.\d{2}\.\d{4}", card["version"])
    assert model_identity(model_dir) == {"id": "model", "version": card["version"], "sha256": sha}


def test_parts_are_disjoint_and_each_fit_sees_only_its_part(trained):
    """Issue 15's split discipline: named parts, disjoint by image and by duplicate group; the network
    sees train (+ val for stopping), the trust layer train / cal_a / cal_b, and only evaluation the test part."""
    from bcc_core.data import check_disjoint

    _, model_dir, metrics = trained
    seen = metrics["_seen"]
    (prep,) = seen["prepare_data"]
    P, g = prep["parts"], prep["groups"]
    check_disjoint(P, g)  # raises on a shared image or group
    assert sorted(np.concatenate(list(P.values())).tolist()) == list(range(30))
    card = json.loads((model_dir / "model_card.json").read_text())
    assert list(card["split"]["parts"]) == list(PARTS)
    split = json.loads((model_dir / "split.json").read_text())
    for k in PARTS:
        assert card["split"]["parts"][k]["n"] == len(P[k]) == split["sizes"][k]
        assert card["split"]["parts"][k]["sha256"] == split["sha256"][k] and card["split"]["parts"][k]["used_for"]
        assert {row[2] for row in split["splits"][k]} == set(g[P[k]].tolist())
    # the network: exactly the train and val images
    (net,) = seen["fit_network"]
    np.testing.assert_array_equal(net["x_train"], prep["x"][P["train"]])
    np.testing.assert_array_equal(net["x_val"], prep["x"][P["val"]])
    # the trust layer: train (OOD statistics), cal_a (temperature, OOD thresholds), cal_b (review, conformal)
    (tf,) = seen["trust_fit"]
    for k in ("train", "cal_a", "cal_b"):
        np.testing.assert_array_equal(tf[k], P[k])
    (temp,) = seen["fit_temperature"]
    assert temp["n"] == len(P["cal_a"])
    np.testing.assert_array_equal(temp["logits"], tf["cal_a_logits"])
    assert [c["n"] for c in seen["fit"]] == [len(P["train"])]
    assert seen["fit_selective_threshold"][0]["n"] <= len(P["cal_b"])
    assert [c["n"] for c in seen["conformal_qhat"]] == [len(P["cal_b"])]
    # the test part: read by evaluation, and by nothing that fits
    (ev,) = seen["evaluate"]
    np.testing.assert_array_equal(ev["test_ids"], P["test"])
    fitted = set(np.concatenate([tf["train"], tf["cal_a"], tf["cal_b"], P["val"]]).tolist())
    assert not fitted & set(P["test"].tolist())
    assert card["trust"]["fitted_on"]["review_rule"].startswith("cal_b")
    assert card["trust"]["fitted_on"]["temperature"].startswith("cal_a")


def test_loading_refuses_missing_or_inconsistent_card(trained, tmp_path):
    import shutil

    from bcc_core.models import load_model

    _, model_dir, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    (bad / "model_card.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_card.json"):
        load_model(bad)
    card = json.loads((model_dir / "model_card.json").read_text())
    card["classes"] = card["classes"][:2]
    (bad / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="outputs"):
        load_model(bad)
    card["classes"] = []
    (bad / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="invalid model card"):
        load_model(bad)


def test_predictor_matches_full_model_and_flags_noise(trained):
    from bcc_core.inference import Predictor
    from bcc_core.preprocess import preprocess

    _, model_dir, _ = trained
    p = Predictor.load(model_dir)
    imgs = [synthetic_cell(200, 32, seed=7, lobes=2), np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)]
    res = p.predict(imgs)
    assert len(res) == 2 and all(r.predicted_class in p.classes for r in res)
    assert abs(sum(res[0].probabilities.values()) - 1) < 1e-5
    # calibrated probabilities equal softmax(logits / T) of the saved model, with the card's T (not 1)
    x = preprocess(imgs[0], p.pcfg)[None]
    _, logits, _ = p.forward(x)
    T = p.card.trust["temperature"]
    assert abs(T - 1.0) > 1e-3  # else this check could not tell calibrated from raw probabilities
    z = logits[0].astype(np.float64) / T
    want = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    got = np.array([res[0].probabilities[c] for c in p.classes])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    raw = np.asarray(p.model(x.astype(np.float32), training=False))[0]
    assert not np.allclose(got, raw, atol=1e-6)  # the model's own softmax is uncalibrated
    assert res[1].status == "review" and any(f.code == "image_quality" for f in res[1].flags)


def test_gradcam_methods(trained):
    from bcc_core.explain import explain, overlay
    from bcc_core.inference import Predictor

    _, model_dir, _ = trained
    p = Predictor.load(model_dir)
    r = p.predict([synthetic_cell(200, 32, seed=3)])[0]
    from bcc_core.explain import class_maps

    for m in ("gradcam", "gradcam++", "scorecam"):
        h = explain(p, r.model_input, m)
        assert h.shape == (224, 224) and 0 <= h.min() and h.max() <= 1
        maps = class_maps(p, r.model_input, m)
        # One scale for all classes: the strongest map reaches 1 (an all-zero map would not).
        assert maps.shape == (3, 224, 224) and maps.max() == pytest.approx(1.0)
        assert np.array_equal(h, maps[p.classes.index(r.predicted_class)])
    # The compiled all-classes Grad-CAM gives tf-keras-vis' Gradcam maps, class by class.
    from bcc_core.explain import _gradcam_all, _maps, _vis

    mine = _gradcam_all(p, r.model_input)
    theirs = _maps(_vis(p, "gradcam"), p.card.gradcam_layer, r.model_input, "gradcam", [0, 1, 2])
    np.testing.assert_allclose(mine, theirs, rtol=1e-3, atol=1e-4 * float(theirs.max()))
    o = overlay(r.model_input, h, 0.5)
    assert o.shape == (224, 224, 3) and o.dtype == np.uint8
    with pytest.raises(ValueError, match="method"):
        explain(p, r.model_input, "lime")


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "bcc_core", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_cli_predict_screen_evaluate(trained, tmp_path):
    data, model_dir, _ = trained
    img = data / "mono" / "mono_0.png"
    r = _cli("predict", str(img), "--model", str(model_dir))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["predicted_class"] in ["bilobed", "mono", "trilobed"] and "flags" in out

    z = tmp_path / "batch.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(data / "bilobed" / "bilobed_1.png", "inner/b1.png")
        zf.writestr("inner/corrupt.png", b"not a png")
    csv = tmp_path / "res.csv"
    r = _cli("screen", str(data / "trilobed"), str(z), str(img), str(tmp_path / "missing.png"),
             "--model", str(model_dir), "--out", str(csv))
    assert r.returncode == 0, r.stderr
    import pandas as pd

    df = pd.read_csv(csv)
    assert len(df) == 10 + 2 + 1 + 1
    assert list(df.columns[:6]) == ["file", "status", "predicted_class", "confidence", "flags", "reason"]
    assert {"p_bilobed", "p_mono", "p_trilobed"} <= set(df.columns)
    assert (df.status == "error").sum() == 2 and df.loc[df.status == "error", "reason"].str.len().min() > 5
    assert "screened 14 images" in r.stdout
    # The end-of-run summary counts a class only among cells shown as ok; flagged cells await review.
    counted = {line.split(":")[0].strip(): int(line.split(":")[1].split()[0]) for line in r.stdout.splitlines()[2:]
               if ":" in line}
    ok = df[df.status == "ok"].predicted_class.value_counts()
    assert all(counted[c] == ok.get(c, 0) for c in ("bilobed", "mono", "trilobed"))
    assert counted["awaiting review"] == (df.status == "review").sum() and counted["errors"] == 2

    r = _cli("evaluate", "--model", str(model_dir), "--data", str(data), "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"accuracy", "macro_f1", "kappa", "roc_auc", "n"} <= set(last)


def test_cli_usage_errors():
    assert _cli("--help").returncode == 0
    h = _cli("--help").stdout
    for c in ("train", "evaluate", "predict", "screen", "compare"):
        assert c in h
    assert _cli("screen").returncode == 2
    assert _cli("frobnicate").returncode == 2

def test_cli_screen_missing_input_is_an_error_row(tmp_path):
    import pandas as pd

    out = tmp_path / "x.csv"
    r = _cli("screen", "/nonexistent/dir", "--out", str(out))
    # The run completes (exit 0) and the missing path is an error row with a reason, not a crash.
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert list(df.status) == ["error"] and "nonexistent" in df.file[0] and len(df.reason[0]) > 5


def test_cross_validation_reports_mean_and_std(trained, tmp_path):
    import keras

    from bcc_core.backbones import get_spec
    from bcc_core.training import TrainConfig, cross_validate

    data, _, _ = trained
    base = get_spec("mobilenetv2").build(keras.Input((224, 224, 3)), None)
    wfile = tmp_path / "random.weights.h5"
    base.save_weights(wfile)
    # 15 images outside each test fold: parts of 40/20/20/20% leave every class an image in each part
    cfg = TrainConfig(weights=str(wfile), epochs=1, aug_views=0, fractions=(0.4, 0.2, 0.2, 0.2, 0.0))
    res = cross_validate(data, tmp_path / "cv", cfg, k=2, progress=False)
    assert len(res["folds"]) == 2 and (tmp_path / "cv" / "cv.json").is_file()
    assert sum(f["n_test"] for f in res["folds"]) == 30  # every image is tested exactly once
    acc = [f["accuracy"] for f in res["folds"]]
    assert res["summary"]["accuracy"]["mean"] == pytest.approx(np.mean(acc))
    assert res["summary"]["accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))


def test_weight_averaging_loads_the_mean_of_epoch_end_weights():
    import keras

    from bcc_core.train_seq import WeightAveraging

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.w = []

        def on_epoch_end(self, epoch, logs=None):
            self.w.append(self.model.get_weights())

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    m.compile(keras.optimizers.SGD(0.05), "mse")
    rec, swa = Record(), WeightAveraging(start=1)
    m.fit(x, y, epochs=4, batch_size=16, verbose=0, callbacks=[rec, swa])  # rec runs first each epoch
    expect = [np.mean([w[i] for w in rec.w[1:]], axis=0) for i in range(2)]
    for got, want in zip(m.get_weights(), expect):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expect[0], rec.w[-1][0])  # the average is not simply the last epoch


@pytest.mark.parametrize("cached,layers", [(False, 6), (True, 41)], ids=["fresh views", "cached views"])
def test_cross_lab_fine_tuning_with_weight_averaging(trained, tmp_path, cached, layers):
    """The pbs5 recipe's path: cross-lab augmentation, top layers fine-tuned (afresh each epoch, or on the
    cached views at the frozen cut), weights averaged."""
    import keras

    from bcc_core.augment import AugmentConfig
    from bcc_core.backbones import get_spec
    from bcc_core.training import TrainConfig, train

    data, _, _ = trained
    base = get_spec("mobilenetv2").build(keras.Input((224, 224, 3)), None)
    wfile = tmp_path / "random.weights.h5"
    base.save_weights(wfile)
    cfg = TrainConfig(task="synthetic", weights=str(wfile), epochs=1, aug_views=2, batch_size=8,
                      fine_tune_layers=layers, fine_tune_epochs=2, fine_tune_lr=1e-4, swa_start=0,
                      fine_tune_cached=cached, augment=AugmentConfig.cross_lab().to_dict())
    m = train(data, tmp_path / "m", cfg, progress=False)
    card = json.loads((tmp_path / "m" / "model_card.json").read_text())
    assert card["training"]["swa_start"] == 0 and card["training"]["augment"]["amp_mix_p"] == 0.7
    assert card["training"]["fine_tune_cached"] is cached
    assert m["epochs_run"] == 1 + 2  # head epoch + every fine-tuning epoch (no early stop with averaging)
    assert len(m["history"]["val_loss"]) == 3 and all(np.isfinite(m["history"]["val_loss"]))
    assert ("train.fine_tune" in m["timing_s"]) is cached


def test_the_frozen_cut_reproduces_the_model_and_its_top_trains_the_models_own_layers():
    import keras

    from bcc_core.models import build_classifier
    from bcc_core.training import _unfreeze_top, split_at_frozen_cut

    model = build_classifier("mobilenetv2", 3, weights=None, input_size=96)
    x = np.random.default_rng(0).uniform(0, 255, (4, 96, 96, 3)).astype("float32")
    bottom, top = split_at_frozen_cut(model, 41)
    assert top.layers[1].name == "block_10_project"  # 41 weighted layers: block 10's projection onwards
    np.testing.assert_allclose(top(bottom(x)), model(x), rtol=1e-5, atol=1e-6)
    _unfreeze_top(model, 41)
    model_vars = {id(v) for v in model.weights}
    trained = {v.path.split("/")[0] for v in top.trainable_weights}
    assert all(id(v) in model_vars for v in top.weights)  # the top's variables are the model's own
    assert {"block_10_project", "block_16_project", "Conv_1", "logits"} <= trained
    assert not any(n.startswith(("block_9_", "Conv1")) or n.endswith("_BN") for n in trained)
    frozen = model.get_layer("block_9_project").get_weights()[0].copy()
    top.compile(keras.optimizers.Adam(1e-2), "categorical_crossentropy")
    top.train_on_batch(bottom(x), np.eye(3, dtype="float32")[[0, 1, 2, 0]])
    np.testing.assert_allclose(top(bottom(x)), model(x), rtol=1e-5, atol=1e-6)  # still one network
    np.testing.assert_array_equal(model.get_layer("block_9_project").get_weights()[0], frozen)
    with pytest.raises(ValueError, match="crosses the cut"):
        split_at_frozen_cut(model, 46)  # block 11's expansion: block 10's output skips past it to block_11_add


def test_cached_views_give_every_image_each_view_in_turn():
    from bcc_core.train_seq import CachedViews

    n, k = 10, 3
    views = [np.full((n, 2), v * 100, np.float16) + np.arange(n, dtype=np.float16)[:, None] for v in range(k)]
    seq = CachedViews(views, np.eye(n, dtype=np.float32), batch_size=4, seed=0)
    seen = {i: [] for i in range(n)}
    for _ in range(k):
        for b in range(len(seq)):
            xb, yb = seq[b]
            assert xb.dtype == np.float32
            for row, lab in zip(xb, yb.argmax(1)):
                assert row[0] % 100 == lab  # the row is image `lab`'s
                seen[int(lab)].append(int(row[0]) // 100)
        seq.on_epoch_end()
    assert all(sorted(v) == list(range(k)) for v in seen.values())  # each view exactly once in k epochs


def test_saved_model_carries_no_optimizer_state(tmp_path):
    import zipfile

    import h5py
    import keras

    from bcc_core.model_card import ModelCard
    from bcc_core.models import build_classifier, save_model

    m = build_classifier("small_cnn", 3, weights=None, input_size=64)
    m.compile(keras.optimizers.Adam(), "categorical_crossentropy")
    m.fit(np.zeros((4, 64, 64, 3), "float32"), np.eye(3)[[0, 1, 2, 0]], epochs=1, verbose=0)
    card = json.loads((ROOT / "models" / "pbs5-mobilenetv2" / "model_card.json").read_text())
    card.update(model_id="t", classes=["a", "b", "c"], backbone="small_cnn")
    save_model(m, ModelCard.from_dict(card), tmp_path)
    with zipfile.ZipFile(tmp_path / "model.keras") as z, h5py.File(z.open("model.weights.h5"), "r") as f:
        assert "optimizer" not in f
    back = keras.models.load_model(tmp_path / "model.keras", compile=False)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(back.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-6)


def test_resnet50_model_saves_and_loads_with_its_caffe_input(tmp_path):
    """ResNet's BGR/mean input normalisation is part of the saved graph and survives save/load
    (a Lambda around a Python function did not: save_model's own copy failed to deserialise it)."""
    import keras

    from bcc_core.model_card import ModelCard
    from bcc_core.models import build_classifier, load_model, save_model

    m = build_classifier("resnet50", 3, weights=None, input_size=64)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    pre = keras.Model(m.input, m.get_layer("caffe_preprocess").output)
    expected = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(pre.predict(x, verbose=0), expected, atol=1e-3)
    card = json.loads((ROOT / "models" / "pbs5-mobilenetv2" / "model_card.json").read_text())
    card.update(model_id="t", classes=["a", "b", "c"], backbone="resnet50", gradcam_layer="conv5_block3_out")
    card["preprocessing"]["size"] = card["input"]["size"] = 64
    save_model(m, ModelCard.from_dict(card), tmp_path)
    back, _ = load_model(tmp_path)
    np.testing.assert_allclose(back.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-5)
    assert not back.get_layer("caffe_preprocess").trainable
