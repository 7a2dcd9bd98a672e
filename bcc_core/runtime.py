"""The screening runtime: a model folder's exported forward pass (features, logits, early-layer
statistics in one graph) run by ONNX Runtime or OpenVINO, without TensorFlow.

An export is two files beside `model.keras`: `runtime.onnx`, the graph *without* its weights, and
`runtime.json`, which records the graph's SHA-256, the SHA-256 of the `model.keras` it was made from,
and where each of the graph's weight tensors lies in that file. The weights are read from `model.keras`
(a zip holding `model.weights.h5`) at load time, so an export adds tens of kB to a model folder, not
another copy of the weights, and the weights the runtime uses are the ones the card's `model_sha256`
vouches for. `bcc_core.export` writes the export; this module only reads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

GRAPH_FILE = "runtime.onnx"
SIDECAR = "runtime.json"
BACKENDS = ("onnxruntime", "openvino")
RUN_BATCH = 8
"""Images per runtime call, whatever the caller's batch size: MobileNetV2's activations at 32 images hold
~400 MB more than at 8 for no measurable speed-up on this CPU; per-image outputs do not depend on the
batch they ran in (checked bit for bit), so this changes memory only."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def has_export(model_dir: str | Path) -> bool:
    """True when the folder holds an export (graph + sidecar); whether it is valid is checked on load."""
    d = Path(model_dir)
    return (d / SIDECAR).is_file() and (d / GRAPH_FILE).is_file()


# Weight layouts: Keras stores HWIO conv kernels and (H, W, C, M) depthwise kernels; ONNX wants OIHW.
def _transform(name: str, w: np.ndarray) -> np.ndarray:
    if name == "id":
        return w
    if name == "conv":
        return np.ascontiguousarray(w.transpose(3, 2, 0, 1))
    if name == "dw":
        h, wd, c, m = w.shape
        return np.ascontiguousarray(w.transpose(2, 3, 0, 1).reshape(c * m, 1, h, wd))
    raise ValueError(f"unknown weight transform {name!r}")


def read_keras_weights(model_file: str | Path) -> dict[str, np.ndarray]:
    """Every weight array of a `.keras` file by its HDF5 path (h5py only; no TensorFlow)."""
    import h5py

    with zipfile.ZipFile(model_file) as z:
        buf = io.BytesIO(z.read("model.weights.h5"))
    out: dict[str, np.ndarray] = {}
    with h5py.File(buf, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, np.asarray(v)) if isinstance(v, h5py.Dataset) else None)
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _tensor(name: str, arr: np.ndarray) -> bytes:
    """An ONNX TensorProto (float32): dims = 1, data_type = 2, name = 8, raw_data = 9."""
    dims = b"".join(_varint(1 << 3) + _varint(int(d)) for d in arr.shape)
    return dims + _varint(2 << 3) + _varint(1) + _field(8, name.encode()) + _field(9, arr.astype("<f4").tobytes())


def load_graph(model_dir: str | Path, check: bool = True) -> tuple[bytes, dict]:
    """The exported graph with its weights filled in from model.keras (serialised ONNX) and the sidecar,
    after checking both files against the hashes the sidecar and the card record.

    The weights are appended as a second `graph` field holding only initializers: protobuf merges
    repeated occurrences of a message field, so the parser sees one graph with all its initializers.
    (Building them with the `onnx` package would cost its import, ~1.5 s of start-up, for nothing.)

    Raises:
        ValueError: a file does not match its recorded SHA-256, or the export was made from other weights.
    """
    d = Path(model_dir)
    meta = json.loads((d / SIDECAR).read_text())
    card = json.loads((d / "model_card.json").read_text())
    if check:
        g = _sha256(d / meta["file"])
        if g != meta["sha256"]:
            raise ValueError(f"{d}: {meta['file']} has SHA-256 {g[:12]}… but {SIDECAR} records "
                             f"{meta['sha256'][:12]}…; export the model again (python -m bcc_core export --model {d})")
        w = _sha256(d / "model.keras")
        if w != card.get("model_sha256") or w != meta["model_sha256"]:
            raise ValueError(f"{d}: model.keras (SHA-256 {w[:12]}…) is not the file the card and the export were "
                             f"made for (card {str(card.get('model_sha256'))[:12]}…, export "
                             f"{meta['model_sha256'][:12]}…); export the model again after saving it")
    weights = read_keras_weights(d / "model.keras")
    inits = b"".join(_field(5, _tensor(name, _transform(t, weights[path])))
                     for name, (path, t) in meta["weights"].items())
    return (d / meta["file"]).read_bytes() + _field(7, inits), meta


def ort_session(data: bytes, threads: int | None = None):
    """An ONNX Runtime CPU session for a serialised graph: all graph optimisations, one inter-op thread, and
    no busy-waiting between batches (screening's decode workers and training's augmentation need those
    cycles)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


class Runtime:
    """An exported forward pass: `forward(x)` → (features, logits, early or None), like
    `Predictor.forward`, for preprocessed inputs (N, S, S, 3) uint8/float32 RGB in [0, 255]."""

    def __init__(self, model_dir: str | Path, backend: str | None = None, threads: int | None = None,
                 check: bool = True):
        data, meta = load_graph(model_dir, check)
        self.meta = meta
        self.backend = backend or meta.get("backend", "onnxruntime")
        self.outputs = list(meta["outputs"])
        self.has_early = "early" in self.outputs
        if self.backend == "onnxruntime":
            self._sess = ort_session(data, threads)
            self._run = lambda x: self._sess.run(self.outputs, {"image": x})
        elif self.backend == "openvino":
            import openvino as ov

            core = ov.Core()
            cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
            if threads:
                cfg["INFERENCE_NUM_THREADS"] = threads
            compiled = core.compile_model(core.read_model(data, ov.Tensor(np.empty(0, np.uint8))), "CPU", cfg)
            req = compiled.create_infer_request()
            outs = [compiled.output(n) for n in self.outputs]

            def run(x):
                r = req.infer({"image": x})
                return [np.array(r[o]) for o in outs]

            self._run = run
        else:
            raise ValueError(f"unknown runtime backend {self.backend!r}; one of {BACKENDS}")

    def forward(self, inputs: np.ndarray, batch_size: int = 32):
        """(features, logits, early-layer pooled activations or None), in calls of at most RUN_BATCH images."""
        parts = []
        step = max(1, min(batch_size, RUN_BATCH))
        for s in range(0, len(inputs), step):
            parts.append(self._run(np.ascontiguousarray(inputs[s:s + step], dtype=np.float32)))
        res = [np.concatenate(p) for p in zip(*parts)] if parts else [np.zeros((0, 0), np.float32)] * len(self.outputs)
        return (res[0], res[1], res[2] if self.has_early else None)
