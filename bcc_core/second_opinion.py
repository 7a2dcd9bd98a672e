"""A second opinion for an adapted model: a head that reads the network's pooled features alone.

Why: an adapted head that also reads the image's chroma histogram (`bcc_core.colour`) names a new lab's cells
much better, but learns from few reviewed cells, and some of its confident errors are cells whose colour
misleads it. A second head, fitted on the same rows without the histogram, errs differently: a cell is shown as
ok only when both name the same class (`TrustModel.decide`); otherwise it goes to review, with the other
name given. Measured in `bcc_core.adapt.AdaptConfig.second_opinion`.

What: the Study-1 head's inference path (Dense + ReLU, then the logits; dropout is inactive at inference) as
four arrays in `FILE` beside the card. NumPy only, so the exported runtimes use it as they are: the features
are already one of the forward pass's outputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILE = "second_opinion.npz"
READS = "the pooled network features, without the chroma histogram"


@dataclass(frozen=True)
class SecondOpinion:
    """Weights of a features-only head: logits = relu(f @ dense_kernel + dense_bias) @ logits_kernel + logits_bias."""

    dense_kernel: np.ndarray
    dense_bias: np.ndarray
    logits_kernel: np.ndarray
    logits_bias: np.ndarray

    @classmethod
    def from_layers(cls, layers: list) -> "SecondOpinion":
        """From a head's Keras layers (dropout1, dense, dropout2, logits), e.g. `bcc_core.adapt._train_head`'s."""
        (k1, b1), (k2, b2) = layers[1].get_weights(), layers[3].get_weights()
        return cls(*(np.asarray(a, np.float32) for a in (k1, b1, k2, b2)))

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(N, C) logits for pooled features (N, D)."""
        f = np.asarray(features, np.float32)
        if f.shape[1] != self.dense_kernel.shape[0]:
            raise ValueError(f"the second opinion reads {self.dense_kernel.shape[0]} features, got {f.shape[1]}")
        return np.maximum(f @ self.dense_kernel + self.dense_bias, 0.0) @ self.logits_kernel + self.logits_bias

    def save(self, model_dir: str | Path) -> str:
        """Write `FILE` into the model folder; returns its SHA-256 (recorded in the card)."""
        path = Path(model_dir) / FILE
        np.savez(path, dense_kernel=self.dense_kernel, dense_bias=self.dense_bias,
                 logits_kernel=self.logits_kernel, logits_bias=self.logits_bias)
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @classmethod
    def load(cls, model_dir: str | Path, sha256: str | None) -> "SecondOpinion":
        """Read `FILE`; with `sha256` (the card's), refuse a file that is not the one the card was written with.

        Raises:
            FileNotFoundError: the card names a second opinion the folder lacks.
            ValueError: the file's hash differs from the card's.
        """
        path = Path(model_dir) / FILE
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir}: the card's second opinion needs {FILE}, which is missing")
        data = path.read_bytes()
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"{path}: its SHA-256 differs from the card's: the file was changed after the model "
                             "was written; re-adapt the model")
        with np.load(path) as z:
            return cls(z["dense_kernel"], z["dense_bias"], z["logits_kernel"], z["logits_bias"])
