"""The exported forward pass (bcc_core.export / bcc_core.runtime): same outputs as Keras, no weights
copied, tied to the card's weights, and screening without TensorFlow."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT, require_model, require_shared, synthetic_cell

# Keras 3.15's own model.save/load converts TensorFlow variables with np.array(x): a third-party warning.
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")]


def _randomise_batch_norm(model, seed: int) -> None:
    """Random, not freshly initialised, batch-norm statistics: a conversion that ignored them would pass."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            g, b, m, v = layer.get_weights()
            layer.set_weights([a.astype(np.float32) for a in (rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.1, b.shape),
                                                              rng.normal(0, 0.1, m.shape), rng.uniform(0.5, 1.5, v.shape))])


def _keras_vs_onnx(model, early, size, tmp_path):
    """Convert a Keras model with build_graph, fill its weights from the saved file, run both."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from bcc_core.export import _weight_locator, build_graph, probe_inputs
    from bcc_core.models import trust_outputs_model
    from bcc_core.runtime import _transform, read_keras_weights

    f = tmp_path / "m.keras"
    model.save(f)
    config = json.loads(zipfile.ZipFile(f).read("config.json"))
    proto, weights, outs = build_graph(config, _weight_locator(model, f), early, size)
    h5 = read_keras_weights(f)
    proto.graph.initializer.extend(numpy_helper.from_array(_transform(t, h5[p]).astype(np.float32), n)
                                   for n, (p, t) in weights.items())
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = probe_inputs(size, 6).astype(np.float32)
    got = sess.run(outs, {"image": x})
    ref = [np.asarray(t) for t in trust_outputs_model(model, early)(x, training=False)]
    return ref, got, weights


@pytest.mark.parametrize("backbone,size,early", [("mobilenetv2", 96, "block_3_expand_relu"),
                                                   ("small_cnn", 64, "block2_pool")])
def test_converted_graph_computes_what_keras_computes(backbone, size, early, tmp_path):
    from bcc_core.models import build_classifier

    model = build_classifier(backbone, 3, weights=None, input_size=size)
    _randomise_batch_norm(model, seed=0)
    ref, got, weights = _keras_vs_onnx(model, early, size, tmp_path)
    assert len(got) == 3
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(r).max())))
    # No weight is copied into the graph: every weight tensor is a reference into model.keras.
    assert weights and all(p.startswith("layers/") for p, _ in weights.values())


def test_training_frozen_pass_session_computes_what_keras_computes():
    """`export.session_for`: the in-memory model (no file) with a feature map as an extra NHWC output."""
    import keras

    from bcc_core.export import probe_inputs, session_for
    from bcc_core.models import build_classifier
    from bcc_core.training import split_at_frozen_cut

    model = build_classifier("mobilenetv2", 3, weights=None, input_size=96)
    _randomise_batch_norm(model, seed=1)
    bottom, _ = split_at_frozen_cut(model, 41)
    run, outs = session_for(model, 96, extra={"cut": bottom.layers[-1].name})
    assert outs == ["features", "logits", "cut"]
    x = probe_inputs(96, 5).astype(np.float32)
    got = run(x)
    ref = [np.asarray(t) for t in keras.Model(model.input, [model.get_layer("features").output, bottom.output])(x)]
    for r, g in zip(ref, (got[0], got[2])):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(r).max())))


def test_a_layer_without_conversion_is_refused_by_name():
    from bcc_core.export import build_graph

    config = {"config": {"layers": [
        {"class_name": "InputLayer", "name": "image", "config": {}, "inbound_nodes": []},
        {"class_name": "LayerNormalization", "name": "ln", "config": {},
         "inbound_nodes": [{"args": [{"class_name": "__keras_tensor__",
                                      "config": {"shape": [None, 8, 8, 3], "keras_history": ["image", 0, 0]}}]}]},
        {"class_name": "GlobalAveragePooling2D", "name": "features", "config": {},
         "inbound_nodes": [{"args": [{"class_name": "__keras_tensor__",
                                      "config": {"shape": [None, 8, 8, 3], "keras_history": ["ln", 0, 0]}}]}]},
        {"class_name": "Dense", "name": "logits", "config": {"use_bias": False},
         "inbound_nodes": [{"args": [{"class_name": "__keras_tensor__",
                                      "config": {"shape": [None, 3], "keras_history": ["features", 0, 0]}}]}]}]}}
    with pytest.raises(NotImplementedError, match="LayerNormalization"):
        build_graph(config, lambda layer, i: f"layers/{layer}/vars/{i}", None, 8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A copy of the bundled pbs5 model, exported afresh."""
    from bcc_core.export import export_runtime

    src = require_model()
    d = tmp_path_factory.mktemp("rt") / src.name
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("runtime.*"))
    meta = export_runtime(d)
    return d, meta


def test_export_is_small_tied_to_the_weights_and_chosen_by_parity(exported):
    d, meta = exported
    assert meta["backend"] in meta["backends"]
    assert meta["backends"][meta["backend"]]["parity"]["passed"]
    side = json.loads((d / "runtime.json").read_text())
    assert side["model_sha256"] == json.loads((d / "model_card.json").read_text())["model_sha256"]
    assert (d / "runtime.onnx").stat().st_size < 200_000  # the graph only: weights stay in model.keras


def test_bundled_model_folders_stay_under_25_mb():
    for d in sorted((ROOT / "models").glob("*/model_card.json")):
        total = sum(f.stat().st_size for f in d.parent.rglob("*") if f.is_file())
        assert total < 25_000_000, (d.parent.name, total)


def test_bundled_exports_belong_to_the_bundled_weights():
    """A retrained bundled model needs its export redone (`make export`); until then screening falls back to
    Keras (TensorFlow) without saying so on the command line."""
    from bcc_core.runtime import SIDECAR

    for card_file in sorted((ROOT / "models").glob("*/model_card.json")):
        side = card_file.parent / SIDECAR
        if side.is_file():
            assert json.loads(side.read_text())["model_sha256"] == json.loads(card_file.read_text())["model_sha256"], (
                f"{card_file.parent.name}: stale export; run make export")


def test_a_changed_graph_or_stale_weights_are_refused_and_auto_falls_back_to_keras(exported, tmp_path):
    from bcc_core.inference import Predictor
    from bcc_core.runtime import Runtime

    d = tmp_path / "m"
    shutil.copytree(exported[0], d)
    graph = d / "runtime.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="runtime.onnx has SHA-256"):
        Runtime(d)
    with pytest.raises(ValueError):
        Predictor.load(d, runtime="export")
    assert Predictor.load(d).runtime_backend == "keras"
    # An export made for other weights than the card's: refused too.
    shutil.copy(exported[0] / "runtime.onnx", graph)
    side = json.loads((d / "runtime.json").read_text())
    side["model_sha256"] = "0" * 64
    (d / "runtime.json").write_text(json.dumps(side))
    with pytest.raises(ValueError, match="not the file the card and the export were made for"):
        Runtime(d)


def test_export_matches_keras_on_the_whole_pbs5_test_split(exported):
    """Issue 14: the same top-1 on every test image, calibrated probabilities within 1e-3."""
    from bcc_core.data import load_split
    from bcc_core.export import PARITY_ATOL
    from bcc_core.inference import Predictor
    from bcc_core.io import read_image

    data = require_shared() / "pbs5"
    if not data.is_dir():
        pytest.skip("pbs5 not present")
    d = exported[0]
    rt, ks = Predictor.load(d, runtime="export"), Predictor.load(d, runtime="keras")
    assert (rt.runtime_backend, ks.runtime_backend) == (exported[1]["backend"], "keras")
    items = load_split(d / "split.json", data)["test"]
    assert len(items) > 500
    x = np.stack([rt.prepare(read_image(p))[0] for p, _ in items])
    a, b = rt.predict_inputs(x), ks.predict_inputs(x)
    pa = np.array([[r.probabilities[c] for c in rt.classes] for r in a])
    pb = np.array([[r.probabilities[c] for c in ks.classes] for r in b])
    assert (pa.argmax(1) == pb.argmax(1)).all()
    assert np.abs(pa - pb).max() <= PARITY_ATOL
    assert [r.status for r in a] == [r.status for r in b]


def test_cli_screen_on_an_export_never_imports_tensorflow(tmp_path):
    d = require_model()
    if not (d / "runtime.json").is_file():
        pytest.skip("the bundled model has no export (python -m bcc_core export --model models/pbs5-mobilenetv2)")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(5):
        cv2.imwrite(str(imgs / f"c{i}.png"), synthetic_cell(200, 30 + 3 * i, seed=i)[..., ::-1])
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff nope")
    code = ("import json, sys\nfrom bcc_core.cli import main\n"
            f"rc = main(['screen', {str(imgs)!r}, '--model', {str(d)!r}, '--out', {str(tmp_path / 'r.csv')!r}, "
            "'--quiet'])\nprint(json.dumps({'rc': rc, 'tf': sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras'))}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res == {"rc": 0, "tf": []}, p.stderr[-2000:]
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert len(rows) == 7 and sum(",error," in r for r in rows) == 1
