"""The chroma histogram (`bcc_core.colour`): Keras layers that compute exactly the documented histogram."""

import numpy as np
import pytest


def _reference(x: np.ndarray) -> np.ndarray:
    """The histogram as the module docstring defines it, written directly in NumPy."""
    from bcc_core.colour import BINS, O1_RANGE, O2_RANGE, STRIDE

    o = x[:, ::STRIDE, ::STRIDE].reshape(len(x), -1, 3).astype(np.float64) / 255.0
    o1 = o @ (np.array([1.0, -1.0, 0.0]) / np.sqrt(2))
    o2 = o @ (np.array([1.0, 1.0, -2.0]) / np.sqrt(6))
    c1, c2 = np.linspace(*O1_RANGE, BINS), np.linspace(*O2_RANGE, BINS)
    t1 = (o1[..., None] - c1) / (c1[1] - c1[0])
    t2 = (o2[..., None] - c2) / (c2[1] - c2[0])
    m = np.maximum(0.0, 1.0 - np.abs(t1)[..., :, None] - np.abs(t2)[..., None, :])
    return m.mean(1).reshape(len(x), -1)


def test_layers_compute_the_documented_histogram():
    from bcc_core.colour import N_FEATURES, chroma_histograms

    rng = np.random.default_rng(0)
    pinkish = np.clip(rng.normal([200, 150, 185], 8, (3, 64, 64, 3)), 0, 255)
    noise = rng.integers(0, 256, (2, 64, 64, 3)).astype(np.float32)
    x = np.concatenate([pinkish, noise]).astype(np.float32)
    h = chroma_histograms(x)
    assert h.shape == (5, N_FEATURES)
    np.testing.assert_allclose(h, _reference(x), atol=1e-6)
    assert h[:3].sum(1).min() > 0.5  # stained-looking pixels fall inside the grid


def test_a_pixel_at_a_bin_centre_belongs_to_that_bin_only():
    from bcc_core.colour import BINS, O1_RANGE, O2_RANGE, chroma_histograms

    # Grey (R = G = B) has o1 = o2 = 0; choose bins whose centres are near it and build that colour exactly.
    c1, c2 = np.linspace(*O1_RANGE, BINS), np.linspace(*O2_RANGE, BINS)
    j, k = 3, 7
    # Solve (R - G)/sqrt2 = c1[j] * 255, (R + G - 2B)/sqrt6 = c2[k] * 255 with B = 128.
    d, s = c1[j] * 255 * np.sqrt(2), c2[k] * 255 * np.sqrt(6) + 2 * 128
    rgb = np.array([(s + d) / 2, (s - d) / 2, 128.0], np.float32)
    h = chroma_histograms(np.broadcast_to(rgb, (1, 32, 32, 3)).copy())[0]
    assert h[j * BINS + k] == pytest.approx(1.0, abs=1e-4)
    assert np.delete(h, j * BINS + k).max() == pytest.approx(0.0, abs=1e-4)


def test_head_rows_need_the_histogram_for_a_colour_head():
    import keras

    from bcc_core.colour import chroma_branch, has_colour, head_rows, scaled_head_input

    inp = keras.Input((32, 32, 3))
    feats = keras.layers.GlobalAveragePooling2D(name="features")(inp)
    mean, scale = np.full(144, 0.01, np.float32), np.full(144, 3.0, np.float32)
    model = keras.Model(inp, scaled_head_input(feats, chroma_branch(inp), mean, scale))
    assert has_colour(model)
    f, h = np.ones((2, 3), np.float32), np.full((2, 144), 0.02, np.float32)
    rows = head_rows(model, f, h)
    np.testing.assert_allclose(rows, np.concatenate([f, (h - mean) * scale], 1), rtol=1e-6)
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    from bcc_core.colour import chroma_histograms

    np.testing.assert_allclose(np.asarray(model(x)), head_rows(model, x.mean((1, 2)), chroma_histograms(x)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chroma histogram"):
        head_rows(model, f, None)


def test_view_histograms_are_those_of_each_view():
    from bcc_core.colour import chroma_histograms, view_histograms
    from bcc_core.preprocess import dihedral_views

    x = np.random.default_rng(2).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    got = view_histograms(x, 7, chunk=2)  # chunks of 2 over 5 images: the pieces are put back in order
    assert len(got) == 7
    for v, xv in enumerate(dihedral_views(x, 7)):
        np.testing.assert_allclose(got[v], chroma_histograms(xv), atol=1e-7)
