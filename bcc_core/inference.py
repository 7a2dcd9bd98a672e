"""Run a saved model the way its card says: quality gate → preprocess → one forward pass →
calibrated probabilities, OOD score, review rule → flags and status."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import ood
from .flags import Flag
from .preprocess import PreprocessConfig, clamp_views, dihedral_views, find_cell, preprocess

DEFAULT_MODEL = "pbs5-mobilenetv2"


def models_root() -> Path:
    """`models/` of this checkout (bundled models)."""
    return Path(__file__).resolve().parents[1] / "models"


def default_model_dir() -> Path:
    return models_root() / DEFAULT_MODEL


def list_models(root: str | Path | None = None) -> list[Path]:
    """Model directories (holding a model_card.json) under root, default model first."""
    r = Path(root) if root else models_root()
    if not r.is_dir():
        return []
    found = sorted(p.parent for p in r.glob("*/model_card.json"))
    return sorted(found, key=lambda p: (p.name != DEFAULT_MODEL, p.name))


def card_classes(model_dir: str | Path) -> list[str]:
    """A model folder's classes from its card ([] when it has no readable card)."""
    try:
        return list(json.loads((Path(model_dir) / "model_card.json").read_text())["classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def wider_models(model_dir: str | Path, candidates) -> list[tuple[str, list[str]]]:
    """The models among `candidates` that name every class of `model_dir` and more: [(folder, extra classes)]
    (e.g. pb7-mobilenetv2 beside pbs5-mobilenetv2: eosinophil and lymphocyte, met in every smear)."""
    own = set(card_classes(model_dir))
    out = []
    for d in candidates:
        cls = card_classes(d)
        if own and Path(d) != Path(model_dir) and own < set(cls):
            out.append((str(d), [c for c in cls if c not in own]))
    return out


@dataclass
class Prediction:
    """One image's result. `confidence` and `probabilities` are calibrated."""

    predicted_class: str
    confidence: float
    probabilities: dict
    flags: list = field(default_factory=list)
    status: str = "ok"
    ood_score: float = 0.0
    prediction_set: list = field(default_factory=list)
    model_input: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {"predicted_class": self.predicted_class, "confidence": round(float(self.confidence), 6),
                "probabilities": {k: round(float(v), 6) for k, v in self.probabilities.items()},
                "status": self.status, "flags": [f.to_dict() for f in self.flags],
                "ood_score": round(float(self.ood_score), 4), "prediction_set": list(self.prediction_set)}


class Predictor:
    """A loaded model with everything its card prescribes. Thread-safe for prediction; never mutate."""

    def __init__(self, model, card, model_dir: Path, ood_stats: dict | None, runtime=None):
        """`model`: the Keras model, or None with a `runtime` (a `bcc_core.runtime.Runtime`, the exported
        forward pass): the forward pass then never touches TensorFlow, and the Keras model is loaded on
        first use of `.model` (Grad-CAM, adaptation)."""
        import threading

        self._model = model
        self._runtime = runtime
        self._lock = threading.Lock()
        self.card = card
        self.model_dir = Path(model_dir)
        self.classes = list(card.classes)
        self.pcfg = PreprocessConfig.from_dict(card.preprocessing)
        self.ood_stats = ood_stats
        self.early_layer = (card.ood or {}).get("early_layer")
        self.views = clamp_views((card.trust or {}).get("views", 1))
        self._forward = None
        if runtime is None:
            from .models import trust_outputs_model
            from .training import compiled

            self._forward = compiled(trust_outputs_model(model, self.early_layer))
        from .quality import QualityConfig

        import dataclasses

        known = {f.name for f in dataclasses.fields(QualityConfig)}
        self.qcfg = QualityConfig.from_dict({k: v for k, v in (card.quality or {}).items() if k in known})
        from .shortcut import cue_flag

        self.cue_flag = cue_flag(card.shortcut_audit)

    @property
    def model(self):
        """The Keras model (loaded on first use when the forward pass runs on the exported runtime)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    from .models import load_model

                    self._model = load_model(self.model_dir)[0]
        return self._model

    @property
    def runtime_backend(self) -> str:
        """What runs the forward pass: "keras", or the export's backend ("onnxruntime", "openvino")."""
        return "keras" if self._runtime is None else self._runtime.backend

    @classmethod
    def load(cls, model_dir: str | Path | None = None, runtime: str = "auto") -> "Predictor":
        """Load model + card (validated) + OOD statistics from a model directory.

        Args:
            model_dir: the model folder (default: the bundled default model).
            runtime: "auto": the folder's export (`bcc_core.export`) when it has one that loads and matches
                the card's weights, else Keras (a stale or changed export is logged and skipped);
                "export": the export or an error; "keras": always Keras (TensorFlow).
        """
        d = Path(model_dir) if model_dir else default_model_dir()
        rt, model = None, None
        if runtime not in ("auto", "export", "keras"):
            raise ValueError(f"runtime must be auto, export or keras, not {runtime!r}")
        if runtime != "keras":
            from .runtime import Runtime, has_export

            if has_export(d):
                try:
                    rt = Runtime(d)
                except Exception as e:
                    if runtime == "export":
                        raise
                    import logging

                    logging.getLogger(__name__).warning("%s: not using the exported runtime (%s); using Keras", d, e)
            elif runtime == "export":
                raise FileNotFoundError(f"{d}: no exported runtime here; run python -m bcc_core export --model {d}")
        if rt is None:
            from .models import load_model

            model, card = load_model(d)
        else:
            from .model_card import load_card

            card = load_card(d)
        stats_file = d / card.ood.get("stats_file", "ood_stats.npz") if card.ood else None
        stats = ood.load_stats(stats_file) if stats_file and stats_file.is_file() else None
        if card.ood.get("threshold") is not None and stats is None and card.ood.get("method") != "energy":
            raise ValueError(f"{d}: the card sets an OOD threshold but {stats_file} is missing")
        return cls(model, card, d, stats, runtime=rt)

    def forward(self, inputs: np.ndarray, batch_size: int = 32, views: int | None = None):
        """(features, logits, early-layer activations or None) for preprocessed inputs (N, S, S, 3)
        uint8, in one compiled pass per batch (the exported runtime's when loaded with one).

        `views` (default: the card's `trust.views`, 1 when absent): the logits are the mean over the image and
        its first views - 1 flips / 90° rotations (`dihedral_views`); features and early activations are always
        the image's own (the OOD statistics describe single images)."""
        views = clamp_views(self.views if views is None else views)
        feats, logits, early = self._forward_once(inputs, batch_size)
        for v in dihedral_views(inputs, views - 1) if len(inputs) else []:
            logits = logits + self._forward_once(v, batch_size)[1]
        return feats, logits / views if views > 1 else logits, early

    def _forward_once(self, inputs: np.ndarray, batch_size: int):
        if self._runtime is not None:
            return self._runtime.forward(inputs, batch_size)
        from .training import batched_predict

        out = batched_predict(self._forward, inputs, batch_size)
        return (*out, None) if len(out) == 2 else tuple(out)

    def predict_inputs(self, inputs: np.ndarray, quality_flags: list[list[Flag]] | None = None,
                       batch_size: int = 32) -> list[Prediction]:
        """Predictions for already preprocessed inputs (N, S, S, 3) uint8."""
        if len(inputs) == 0:
            return []
        feats, logits, early = self.forward(inputs, batch_size)
        trust = self.__dict__.get("trust")
        if trust is None:  # built once from the card (old card layouts included); numpy only from here on
            from .trust import TrustModel

            trust = self.__dict__["trust"] = TrustModel.from_card(self.card, self.model_dir, self.ood_stats)
        res = trust.apply(logits, feats, early, quality_flags)
        return [Prediction(r.predicted_class, r.confidence, dict(zip(self.classes, map(float, r.probabilities))),
                           r.flags, r.status, r.ood_score, r.prediction_set, inputs[i]) for i, r in enumerate(res)]

    def prepare(self, img: np.ndarray) -> tuple[np.ndarray, list[Flag]]:
        """The card's quality gate and preprocessing for one RGB image: (model input, quality flags)."""
        from .quality import check_quality

        # One cell search serves both the crop and the gate's cell-size check.
        valid = img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
        cell = find_cell(img, self.pcfg) if self.pcfg.mode == "cell" and valid else None
        return preprocess(img, self.pcfg, cell), check_quality(img, self.qcfg, cell)

    def predict(self, images: list[np.ndarray], batch_size: int = 32) -> list[Prediction]:
        """Full pipeline for RGB images (H, W, 3) uint8 of any size."""
        if not images:
            return []
        inputs, qflags = zip(*(self.prepare(im) for im in images))
        return self.predict_inputs(np.stack(inputs), list(qflags), batch_size)
