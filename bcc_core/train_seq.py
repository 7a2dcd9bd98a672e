"""Keras pieces of end-to-end training: an augmenting data sequence and stochastic weight averaging.

Kept apart from `training` so that importing `training` (e.g. for its config) does not import Keras.
"""

from __future__ import annotations

import keras
import numpy as np

from .augment import AugmentConfig, augment_batch


class AugSequence(keras.utils.PyDataset):
    """Batches of augmented preprocessed images, reshuffled every epoch, deterministic per seed.

    With `cfg.amp_mix_p > 0` every image draws its amplitude-mixing partner from the whole training
    set among images of another class (cross-lab augmentation).
    """

    def __init__(self, x: np.ndarray, y_onehot: np.ndarray, batch_size: int, aug: AugmentConfig, seed: int,
                 workers: int = 2):
        super().__init__(workers=workers, use_multiprocessing=False)
        self.x, self.y, self.bs, self.aug, self.seed = x, y_onehot, batch_size, aug, seed
        self.labels = y_onehot.argmax(1)
        self.epoch = 0
        self.order = np.random.default_rng(seed).permutation(len(x))

    def __len__(self) -> int:
        return (len(self.x) + self.bs - 1) // self.bs

    def __getitem__(self, i):
        idx = self.order[i * self.bs:(i + 1) * self.bs]
        xb = augment_batch(self.x[idx], seed=self.seed * 100003 + self.epoch * 1009 + i, cfg=self.aug,
                           labels=self.labels[idx], pool=self.x, pool_labels=self.labels)
        return xb.astype(np.float32), self.y[idx]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.x))


class CachedViews(keras.utils.PyDataset):
    """Batches of cached activations: `views[k][i]` is view k of image i (float16, any shape).

    Every image starts at a random view and moves to its next view each epoch, so over the epochs it
    meets all of its views in turn; order reshuffled every epoch, deterministic per seed.
    """

    def __init__(self, views: list[np.ndarray], y_onehot: np.ndarray, batch_size: int, seed: int):
        super().__init__()
        if not views or any(len(v) != len(y_onehot) for v in views):
            raise ValueError("every view needs one row per label")
        self.views, self.y, self.bs, self.seed = views, y_onehot, batch_size, seed
        rng = np.random.default_rng(seed)
        self.start = rng.integers(len(views), size=len(y_onehot))
        self.order = rng.permutation(len(y_onehot))
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.y) + self.bs - 1) // self.bs

    def __getitem__(self, i):
        idx = self.order[i * self.bs:(i + 1) * self.bs]
        which = (self.start[idx] + self.epoch) % len(self.views)
        xb = np.empty((len(idx),) + self.views[0].shape[1:], np.float32)
        for k in np.unique(which):
            sel = which == k
            xb[sel] = self.views[k][idx[sel]]
        return xb, self.y[idx]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.y))


class WeightAveraging(keras.callbacks.Callback):
    """Stochastic weight averaging (Izmailov et al. 2018): the running mean of the weights at the end
    of each epoch from `start` on is loaded into the model when training ends.

    Averaging along the trajectory finds flatter minima, which transfer better to shifted domains
    (SWAD, Cha et al. 2021). Batch-norm statistics are frozen during our fine-tuning, so the
    average needs no statistics refresh.
    """

    def __init__(self, start: int):
        super().__init__()
        self.start = max(0, int(start))
        self.mean: list[np.ndarray] | None = None
        self.n = 0

    def on_epoch_end(self, epoch, logs=None):
        if epoch < self.start:
            return
        w = self.model.get_weights()
        self.n += 1
        if self.mean is None:
            self.mean = [a.astype(np.float64) for a in w]
        else:
            self.mean = [m + (a - m) / self.n for m, a in zip(self.mean, w)]

    def on_train_end(self, logs=None):
        if self.mean is not None:
            self.model.set_weights([m.astype(a.dtype) for m, a in zip(self.mean, self.model.get_weights())])
