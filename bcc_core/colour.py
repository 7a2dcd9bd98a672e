"""Stain-colour features: a histogram of the chroma of the model's input, built from Keras layers.

Why: on a new lab's few reviewed cells, the network's pooled features name eosinophils poorly (their
orange-red granules are a colour, which global average pooling of a network trained on another lab's
stain dilutes), while a chroma histogram separates them. Measured with a lab-only linear probe on LISC
(`bench/lab_probe.py`, 20 cells drawn per class): see `bench/results/lab_probe.md`.

What: the input image (RGB in [0, 255], already stain-normalised per crop by the preprocessing, so one
fixed set of bins fits every lab) is sampled every `STRIDE` pixels; each sample's two opponent chroma
coordinates o1 = (R - G) / sqrt(2) and o2 = (R + G - 2B) / sqrt(6) (in units of 255) fall into a
`BINS` x `BINS` grid of diamond-shaped soft bins, membership max(0, 1 - |t1| - |t2|) with t the distance
to the bin centre in bin widths; the histogram is the mean membership over the samples. Everything is
max-pooling (1 x 1, to sample), Conv2D (1 x 1), ReLU and global average pooling with fixed weights, so the
exported runtime (`bcc_core.export`) converts it like the backbone, and `chroma_histograms` (NumPy in,
NumPy out) gives exactly what the graph computes.
"""

from __future__ import annotations

import numpy as np

BINS = 12
STRIDE = 4
O1_RANGE = (-0.02, 0.20)
"""Bin centres of o1 = (R - G) / sqrt(2) / 255. The range was read off LISC's stain-normalised cell crops
(1st-99th percentile 0.008-0.166, LISC being a lab the adaptation bench measures on); pbs5's, the
training data's, are 0.008-0.169 (300 crops), so the range does not rest on the measured lab."""
O2_RANGE = (-0.20, 0.08)
"""Bin centres of o2 = (R + G - 2B) / sqrt(6) / 255: 1st-99th percentile -0.150-0.059 on LISC, -0.154-0.029
on pbs5."""
HIST_LAYER = "colour_hist"
HEAD_INPUT_LAYER = "head_input"
SCALE_LAYER = "colour_scale"
COLOUR_LAYERS = ("colour_sample", "colour_chroma", "colour_abs", "colour_bins", "colour_membership", HIST_LAYER,
                 SCALE_LAYER, HEAD_INPUT_LAYER)
"""Layer names of the colour branch: not backbone layers (never fine-tuned, never cut through)."""
_O1 = np.array([1.0, -1.0, 0.0]) / np.sqrt(2) / 255.0
_O2 = np.array([1.0, 1.0, -2.0]) / np.sqrt(6) / 255.0
N_FEATURES = BINS * BINS
STD_FLOOR = 0.002
"""Smallest spread a histogram bin is standardised by (a bin almost always empty is not blown up)."""


def _weights():
    """Fixed weights of the two 1 x 1 convolutions: (kernel_a, bias_a, kernel_b, bias_b)."""
    c1, c2 = np.linspace(*O1_RANGE, BINS), np.linspace(*O2_RANGE, BINS)
    w1, w2 = c1[1] - c1[0], c2[1] - c2[0]
    # Layer a: 4 * BINS channels, t1_j, -t1_j, t2_k, -t2_k (after ReLU: their positive parts).
    ka = np.zeros((1, 1, 3, 4 * BINS), np.float32)
    ba = np.zeros(4 * BINS, np.float32)
    for j in range(BINS):
        for o, c, w, off in ((_O1, c1, w1, 0), (_O2, c2, w2, 2 * BINS)):
            ka[0, 0, :, off + j], ba[off + j] = o / w, -c[j] / w
            ka[0, 0, :, off + BINS + j], ba[off + BINS + j] = -o / w, c[j] / w
    # Layer b: membership of bin (j, k) = 1 - |t1_j| - |t2_k| (ReLU after).
    kb = np.zeros((1, 1, 4 * BINS, BINS * BINS), np.float32)
    for j in range(BINS):
        for k in range(BINS):
            kb[0, 0, [j, BINS + j, 2 * BINS + k, 3 * BINS + k], j * BINS + k] = -1.0
    return ka, ba, kb, np.ones(BINS * BINS, np.float32)


def chroma_branch(image_tensor):
    """Keras layers from the model's input image tensor (N, S, S, 3) to its chroma histogram (N, BINS^2)."""
    import keras

    ka, ba, kb, bb = _weights()
    conv_a = keras.layers.Conv2D(4 * BINS, 1, name="colour_chroma", trainable=False)
    conv_b = keras.layers.Conv2D(BINS * BINS, 1, name="colour_bins", trainable=False)
    # Every STRIDE-th pixel, by a 1 x 1 max-pool (a strided 1 x 1 convolution would do the same, but
    # TensorFlow 2.21's CPU filter gradient of one crashes the process on small inputs, and tf-keras-vis
    # takes gradients through every layer).
    x = keras.layers.MaxPooling2D(pool_size=1, strides=STRIDE, name="colour_sample")(image_tensor)
    x = keras.layers.ReLU(name="colour_abs")(conv_a(x))
    x = keras.layers.ReLU(name="colour_membership")(conv_b(x))
    out = keras.layers.GlobalAveragePooling2D(name=HIST_LAYER)(x)
    conv_a.set_weights([ka, ba])
    conv_b.set_weights([kb, bb])
    return out


def scaled_head_input(features_tensor, hist_tensor, mean: np.ndarray, scale: np.ndarray):
    """The head's input: the pooled features and the histogram standardised ((h - mean) * scale), fixed."""
    import keras

    dense = keras.layers.Dense(len(mean), name=SCALE_LAYER, trainable=False)
    z = dense(hist_tensor)
    dense.set_weights([np.diag(scale).astype(np.float32), (-mean * scale).astype(np.float32)])
    return keras.layers.Concatenate(name=HEAD_INPUT_LAYER)([features_tensor, z])


_MODELS: dict = {}


def chroma_histograms(x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Chroma histograms (N, BINS^2) of model inputs (N, S, S, 3) in [0, 255], through the same layers
    the adapted model holds."""
    import keras

    from .training import batched_predict, compiled

    size = x.shape[1]
    if size not in _MODELS:
        inp = keras.Input((size, size, 3))
        _MODELS[size] = compiled(keras.Model(inp, chroma_branch(inp)))
    if not len(x):
        return np.zeros((0, N_FEATURES), np.float32)
    return np.asarray(batched_predict(_MODELS[size], x, batch_size=batch_size), np.float32)  # float32 per batch


def view_histograms(x: np.ndarray, n_views: int, chunk: int = 64) -> list[np.ndarray]:
    """Chroma histograms of the first `n_views` flips / 90° rotations of each input (`dihedral_views`
    order): a list of (N, BINS^2), computed a chunk of images at a time (no copy of every view at once)."""
    from .preprocess import dihedral_views

    parts = [[] for _ in range(n_views)]
    for s in range(0, len(x), chunk):
        for v, xv in enumerate(dihedral_views(x[s:s + chunk], n_views)):
            parts[v].append(chroma_histograms(xv))
    return [np.concatenate(p) if p else np.zeros((0, N_FEATURES), np.float32) for p in parts]


def has_colour(model) -> bool:
    """The model's head reads the chroma histogram beside the pooled features."""
    return any(l.name == HEAD_INPUT_LAYER for l in model.layers)


def head_rows(model, features: np.ndarray, hist: np.ndarray | None) -> np.ndarray:
    """The rows `models.head_only(model)` takes: the features, followed by the standardised histogram when
    the model's head reads one (through the model's own fixed scale layer's weights)."""
    if not has_colour(model):
        return np.asarray(features, np.float32)
    if hist is None:
        raise ValueError("this model's head reads the chroma histogram; none was given")
    w, b = model.get_layer(SCALE_LAYER).get_weights()
    return np.concatenate([features, np.asarray(hist, np.float32) @ w + b], 1).astype(np.float32)
