"""Export a model folder's forward pass for screening without TensorFlow (`bcc_core.runtime` runs it).

`export_runtime(model_dir)` is the last stage of `train()` and `adapt()` and the body of
`python -m bcc_core export --model DIR`. It turns the Keras graph (from `model.keras`'s own
config.json) into one ONNX graph with three outputs — GAP features, logits, and the card's early OOD
layer globally pooled — the same three `Predictor.forward` computes, in one pass. The weights are not
copied: `runtime.json` records, per graph tensor, the HDF5 path of that array inside `model.keras`, so a
bundled folder grows by the graph alone (~100 kB) and stays under its size budget. The export is then
run by each available backend (ONNX Runtime, OpenVINO) on probe inputs, compared with Keras (same top-1,
calibrated probabilities within `PARITY_ATOL`), timed, and the fastest backend that agrees is recorded in
`runtime.json` with both files' SHA-256.

Only the layer types of the project's backbones' graphs are converted (MobileNetV2: Conv2D,
DepthwiseConv2D, BatchNormalization, ReLU, ZeroPadding2D, Add, GAP, Dense, Dropout, Rescaling; small_cnn's
MaxPooling2D and Activation; an adapted head's chroma histogram, `bcc_core.colour`: Concatenate); a model
with another layer raises `NotImplementedError` naming it, and screening keeps using Keras.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

import numpy as np

from .runtime import BACKENDS, GRAPH_FILE, SIDECAR, Runtime, _sha256, _transform, read_keras_weights

OPSET = 17
PARITY_ATOL = 1e-3
"""Largest difference of a calibrated probability between the export and Keras that an export may have."""


class _Graph:
    """ONNX nodes in NCHW built from a Keras functional config (NHWC)."""

    def __init__(self, weight_path):
        self.nodes, self.consts, self.weights = [], [], {}
        self._weight_path = weight_path  # (layer name, index) -> h5 path

    def const(self, name, arr):
        from onnx import numpy_helper

        self.consts.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def weight(self, layer, i, transform):
        name = f"{layer}/w{i}"
        self.weights[name] = [self._weight_path(layer, i), transform]
        return name

    def node(self, op, inputs, output, public=False, **attrs):
        from onnx import helper

        # Layer tensors get a prefix so that a layer called "features" cannot clash with the output.
        output = output if public else f"k:{output}"
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output


def _same_pads(size, k, s, d):
    """TF 'same' padding for one axis: (begin, end), the extra pixel at the end."""
    eff = (k - 1) * d + 1
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    return total // 2, total - total // 2


def _conv_pads(cfg, in_shape):
    if cfg["padding"] == "valid":
        return [0, 0, 0, 0]
    if cfg["padding"] != "same":
        raise NotImplementedError(f"padding {cfg['padding']!r}")
    (kh, kw), (sh, sw) = cfg["kernel_size"], cfg["strides"]
    dh, dw = cfg.get("dilation_rate", (1, 1))
    (t, b), (l, r) = _same_pads(in_shape[1], kh, sh, dh), _same_pads(in_shape[2], kw, sw, dw)
    return [t, l, b, r]


def _activation(g, name, act, x):
    if act in (None, "linear"):
        return x
    if act == "relu":
        return g.node("Relu", [x], f"{name}/relu")
    if act == "softmax":
        return g.node("Softmax", [x], f"{name}/softmax", axis=-1)
    raise NotImplementedError(f"activation {act!r} in layer {name}")


def _convert_layer(g, cls, name, cfg, inputs, in_shape):
    """Emit one layer's nodes; return its output tensor name."""
    x = inputs[0]
    if cls == "InputLayer":
        return x
    if cls == "Rescaling":
        y = g.node("Mul", [x, g.const(f"{name}/scale", np.float32(cfg["scale"]))], f"{name}/mul")
        return g.node("Add", [y, g.const(f"{name}/offset", np.float32(cfg["offset"]))], name)
    if cls in ("Conv2D", "DepthwiseConv2D"):
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise NotImplementedError(f"{name}: data_format {cfg['data_format']}")
        dw = cls == "DepthwiseConv2D"
        if dw and cfg.get("depth_multiplier", 1) != 1:
            raise NotImplementedError(f"{name}: depth_multiplier {cfg['depth_multiplier']}")
        ins = [x, g.weight(name, 0, "dw" if dw else "conv")]
        if cfg.get("use_bias"):
            ins.append(g.weight(name, 1, "id"))
        group = in_shape[-1] if dw else cfg.get("groups", 1)
        y = g.node("Conv", ins, name if cfg.get("activation") in (None, "linear") else f"{name}/conv",
                   strides=list(cfg["strides"]), pads=_conv_pads(cfg, in_shape),
                   dilations=list(cfg.get("dilation_rate", (1, 1))), group=int(group))
        return _activation(g, name, cfg.get("activation"), y)
    if cls == "BatchNormalization":
        if cfg["axis"] not in (-1, 3, [3], [-1]):
            raise NotImplementedError(f"{name}: batch-norm axis {cfg['axis']}")
        c, i = in_shape[-1], 0
        if cfg.get("scale", True):
            gamma, i = g.weight(name, i, "id"), i + 1
        else:
            gamma = g.const(f"{name}/gamma", np.ones(c, np.float32))
        if cfg.get("center", True):
            beta, i = g.weight(name, i, "id"), i + 1
        else:
            beta = g.const(f"{name}/beta", np.zeros(c, np.float32))
        mean, var = g.weight(name, i, "id"), g.weight(name, i + 1, "id")
        return g.node("BatchNormalization", [x, gamma, beta, mean, var], name, epsilon=float(cfg["epsilon"]))
    if cls == "ReLU":
        if cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
            raise NotImplementedError(f"{name}: leaky/thresholded ReLU")
        if cfg.get("max_value") is None:
            return g.node("Relu", [x], name)
        return g.node("Clip", [x, g.const(f"{name}/min", np.float32(0)),
                               g.const(f"{name}/max", np.float32(cfg["max_value"]))], name)
    if cls == "ZeroPadding2D":
        (t, b), (l, r) = cfg["padding"]
        return g.node("Pad", [x, g.const(f"{name}/pads", np.array([0, 0, t, l, 0, 0, b, r], np.int64))], name,
                      mode="constant")
    if cls == "Add":
        y = x
        for k, other in enumerate(inputs[1:]):
            y = g.node("Add", [y, other], name if k == len(inputs) - 2 else f"{name}/{k}")
        return y
    if cls == "GlobalAveragePooling2D":
        if cfg.get("keepdims"):
            raise NotImplementedError(f"{name}: keepdims")
        return g.node("Flatten", [g.node("GlobalAveragePool", [x], f"{name}/gap")], name, axis=1)
    if cls == "MaxPooling2D":
        (kh, kw), (sh, sw) = cfg["pool_size"], cfg.get("strides") or cfg["pool_size"]
        pads = _conv_pads({"padding": cfg["padding"], "kernel_size": (kh, kw), "strides": (sh, sw)}, in_shape)
        # TF pads 'same' max-pooling with -inf, which is what ONNX MaxPool does with explicit pads.
        return g.node("MaxPool", [x], name, kernel_shape=[kh, kw], strides=[sh, sw], pads=pads)
    if cls == "Dropout":
        return g.node("Identity", [x], name)
    if cls == "Dense":
        ins = [x, g.weight(name, 0, "id")] + ([g.weight(name, 1, "id")] if cfg.get("use_bias", True) else [])
        y = g.node("Gemm", ins, name if cfg.get("activation") in (None, "linear") else f"{name}/gemm")
        return _activation(g, name, cfg.get("activation"), y)
    if cls == "Activation":
        return _activation(g, name, cfg["activation"], x)
    if cls == "Concatenate":  # on the channel axis (last in Keras, 1 in ONNX's NCHW and for (N, D) alike)
        if cfg.get("axis", -1) not in (-1, len(in_shape) - 1):
            raise NotImplementedError(f"{name}: concatenation on axis {cfg['axis']}")
        return g.node("Concat", list(inputs), name, axis=1)
    raise NotImplementedError(f"layer {name!r} of type {cls} has no ONNX conversion here; "
                              "screening keeps using Keras for this model")


def _history(arg):
    """Tensor references (layer name) in a config's inbound-node arguments, in order."""
    if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
        return [(arg["config"]["keras_history"][0], arg["config"]["shape"])]
    if isinstance(arg, (list, tuple)):
        return [t for a in arg for t in _history(a)]
    return []


def build_graph(config: dict, weight_path, early_layer: str | None, size: int, extra: dict | None = None):
    """The ONNX graph (no weights) for a Keras functional model config, and its weight map.

    Args:
        config: `model.keras`'s config.json (`{"config": {"layers": [...]}}`).
        weight_path: (layer name, variable index) → HDF5 path of that array in model.weights.h5.
        early_layer: layer whose globally pooled output is the third output (or None).
        size: input side S; the input is "image" (N, S, S, 3) float32 RGB in [0, 255].
        extra: further outputs {output name: layer name} of 4-D feature maps, as Keras has them (NHWC).

    Returns:
        (onnx.ModelProto without the weight initializers, {tensor name: [h5 path, transform]}, outputs).
    """
    import onnx
    from onnx import TensorProto, helper

    from .models import FEATURES_LAYER, LOGITS_LAYER

    layers = {l["name"]: l for l in config["config"]["layers"]}
    order = [l["name"] for l in config["config"]["layers"]]
    wanted = [FEATURES_LAYER, LOGITS_LAYER] + ([early_layer] if early_layer else []) + list((extra or {}).values())
    need, stack = set(), list(wanted)
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        for node in layers[n].get("inbound_nodes", []):
            stack.extend(h for h, _ in _history(node["args"]))
    g = _Graph(weight_path)
    tensor: dict[str, str] = {}
    nchw = g.node("Transpose", ["image"], "image_nchw", perm=[0, 3, 1, 2])
    for n in order:
        if n not in need:
            continue
        l = layers[n]
        nodes = l.get("inbound_nodes", [])
        if l["class_name"] == "InputLayer":
            tensor[n] = nchw
            continue
        if len(nodes) != 1:
            raise NotImplementedError(f"layer {n!r} is called {len(nodes)} times")
        hist = _history(nodes[0]["args"])
        tensor[n] = _convert_layer(g, l["class_name"], n, l["config"], [tensor[h] for h, _ in hist], hist[0][1])
    outs = ["features", "logits"]
    g.node("Identity", [tensor[FEATURES_LAYER]], "features", public=True)
    g.node("Identity", [tensor[LOGITS_LAYER]], "logits", public=True)
    if early_layer:
        pooled = g.node("GlobalAveragePool", [tensor[early_layer]], "early_gap")
        g.node("Flatten", [pooled], "early", public=True, axis=1)
        outs.append("early")
    for out_name, layer in (extra or {}).items():  # feature maps, back to Keras' NHWC
        g.node("Transpose", [tensor[layer]], out_name, public=True, perm=[0, 2, 3, 1])
        outs.append(out_name)
    graph = helper.make_graph(
        g.nodes, "bcc_forward",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        initializer=g.consts)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bcc_core.export")
    proto.ir_version = 8
    return proto, g.weights, outs


def session_for(model, size: int, early_layer: str | None = None, extra: dict | None = None):
    """An ONNX Runtime forward pass of a Keras model as it is in memory (weights included, no file written).

    Training's frozen pass and its outputs for the trust fit use it: the same graph conversion as
    `export_runtime`, run as screening runs it. `run(x)` returns the outputs in the order of the returned
    names: features, logits, early (when given), then the `extra` layers (NHWC).

    Returns:
        (run, output names).

    Raises:
        NotImplementedError: the model has a layer this converter does not handle.
    """
    import keras
    from onnx import numpy_helper

    from .runtime import ort_session

    config = keras.saving.serialize_keras_object(model)
    proto, weights, outs = build_graph(config, lambda layer, i: (layer, i), early_layer, size, extra)
    proto.graph.initializer.extend(
        numpy_helper.from_array(_transform(t, np.asarray(model.get_layer(layer).weights[i].numpy())), name)
        for name, ((layer, i), t) in weights.items())
    sess = ort_session(proto.SerializeToString())
    return (lambda x: sess.run(outs, {"image": np.asarray(x, np.float32)})), outs


def _weight_locator(model, model_file: Path):
    """(layer, i) → HDF5 path of the array in model.keras equal to that Keras variable (matched by value:
    Keras names the HDF5 groups by layer class, not by layer name)."""
    h5 = read_keras_weights(model_file)
    index: dict[tuple, str] = {}
    for path, arr in h5.items():
        index.setdefault((arr.shape, hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()), path)

    def find(layer, i):
        v = np.asarray(model.get_layer(layer).weights[i].numpy())
        key = (v.shape, hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest())
        if key not in index:
            raise ValueError(f"{model_file}: weight {i} of layer {layer!r} is not stored in the file as loaded")
        return index[key]

    return find


def probe_inputs(size: int, n: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random colour images (N, S, S, 3) uint8: a parity probe that needs no data set."""
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_CUBIC) for s in small])


def parity(reference, candidate, temperature: float = 1.0) -> dict:
    """Agreement of two forward passes' outputs (features, logits, early): top-1 and calibrated probabilities."""
    from scipy.special import softmax

    pr, pc = softmax(reference[1] / temperature, axis=1), softmax(candidate[1] / temperature, axis=1)
    res = {"n": int(len(pr)), "top1_equal": int((pr.argmax(1) == pc.argmax(1)).sum()),
           "max_prob_diff": float(np.abs(pr - pc).max()) if len(pr) else 0.0,
           "max_feature_diff": float(np.abs(reference[0] - candidate[0]).max()) if len(pr) else 0.0}
    if reference[2] is not None and candidate[2] is not None and len(pr):
        res["max_early_diff"] = float(np.abs(reference[2] - candidate[2]).max())
    res["passed"] = res["top1_equal"] == res["n"] and res["max_prob_diff"] <= PARITY_ATOL
    return res


def _time_backend(rt: Runtime, x: np.ndarray, repeats: int = 3) -> float:
    rt.forward(x[:8])  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        rt.forward(x, 32)
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts)) / len(x)


def export_runtime(model_dir: str | Path, backends: tuple[str, ...] | None = None,
                   inputs: np.ndarray | None = None) -> dict:
    """Export the model folder's forward pass for screening without TensorFlow.

    Writes `runtime.onnx` (graph only) and `runtime.json` (graph and weights SHA-256, weight map, the
    chosen backend, parity and timing per backend) into the folder. Call it after the card (with
    `model_sha256`) is written: the export is tied to that exact model.keras.

    Args:
        model_dir: a saved model folder (model.keras + model_card.json).
        backends: backends to try (default: those of `runtime.BACKENDS` that are installed).
        inputs: preprocessed inputs (N, S, S, 3) uint8 for the parity check and timing (default: 32
            smooth random probe images).

    Returns:
        The sidecar written (dict): backend, sha256, model_sha256, parity and ms/image per backend.

    Raises:
        NotImplementedError: the model has a layer this converter does not handle (nothing is written).
        RuntimeError: no backend agrees with Keras within PARITY_ATOL (nothing is kept).
    """
    import importlib.util

    from .models import load_model, trust_outputs_model
    from .training import batched_predict, compiled

    d = Path(model_dir)
    model, card = load_model(d)
    early = (card.ood or {}).get("early_layer")
    size = int(card.preprocessing["size"])
    config = json.loads(zipfile.ZipFile(d / "model.keras").read("config.json"))
    proto, weights, outs = build_graph(config, _weight_locator(model, d / "model.keras"), early, size)
    x = probe_inputs(size) if inputs is None else inputs
    ref = batched_predict(compiled(trust_outputs_model(model, early)), x, 32)
    ref = (ref[0], ref[1], ref[2] if len(ref) > 2 else None)
    graph_file, sidecar = d / GRAPH_FILE, d / SIDECAR
    tmp_graph = d / (GRAPH_FILE + ".tmp")
    tmp_graph.write_bytes(proto.SerializeToString())
    meta = {"format": "onnx", "file": GRAPH_FILE, "sha256": _sha256(tmp_graph),
            "model_sha256": card.to_dict().get("model_sha256") or _sha256(d / "model.keras"),
            "model_id": card.model_id, "outputs": outs, "input": {"name": "image", "size": size, "layout": "NHWC",
                                                                  "range": [0, 255]},
            "weights": weights, "parity_atol": PARITY_ATOL}
    import os

    os.replace(tmp_graph, graph_file)
    sidecar.write_text(json.dumps({**meta, "backend": None}))  # lets Runtime load it for the checks below
    results = {}
    try:
        for b in backends or tuple(b for b in BACKENDS if importlib.util.find_spec(b)):
            try:
                rt = Runtime(d, backend=b)
                got = rt.forward(x, 32)
                results[b] = {"parity": parity(ref, got, card.temperature), "ms_per_image": _time_backend(rt, x)}
            except Exception as e:  # a backend that fails to load or run is recorded, not fatal
                results[b] = {"error": f"{type(e).__name__}: {e}"}
        ok = {b: r for b, r in results.items() if "parity" in r and r["parity"]["passed"]}
        if not ok:
            raise RuntimeError(f"{d}: no runtime backend matches Keras within {PARITY_ATOL}: {results}")
    except BaseException:
        graph_file.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
        raise
    best = min(ok, key=lambda b: ok[b]["ms_per_image"])
    meta |= {"backend": best, "backends": results, "probe": "given inputs" if inputs is not None else "random"}
    sidecar.write_text(json.dumps(meta, indent=2))
    return meta
