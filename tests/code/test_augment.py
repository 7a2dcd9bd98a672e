"""Unit tests for bcc_core.augment on synthetic images (no data, no model)."""

from __future__ import annotations

import dataclasses
import json
import time

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from bcc_core import augment as A
from bcc_core.augment import AugmentConfig


# ---------------------------------------------------------------------------------------------- data


def cell(h: int = 96, w: int = 96, seed: int = 0) -> np.ndarray:
    """Pinkish background with a horizontal gradient, a dark purple 'nucleus' disc, mild texture."""
    yy, xx = np.mgrid[:h, :w]
    img = np.empty((h, w, 3), np.float64)
    img[..., 0] = 215 + 20 * xx / max(w - 1, 1)
    img[..., 1] = 185 + 10 * yy / max(h - 1, 1)
    img[..., 2] = 200
    disc = (yy - 0.45 * h) ** 2 + (xx - 0.55 * w) ** 2 < (0.2 * min(h, w)) ** 2
    img[disc] = (95, 45, 135)
    img += np.random.default_rng(seed).normal(0, 4, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def checkerboard(h: int = 64, w: int = 64, square: int = 2) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    v = (((yy // square) + (xx // square)) % 2 * 160 + 48).astype(np.uint8)
    return np.repeat(v[..., None], 3, axis=2)


def only(**kw) -> AugmentConfig:
    """Config with everything off except the given overrides."""
    return dataclasses.replace(AugmentConfig.none(), **kw)


def sharpness(img: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image: high for sharp edges and texture."""
    return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_32F).var())


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(ys.mean()), float(xs.mean())


def nucleus(img: np.ndarray) -> np.ndarray:
    return img[..., 1] < 110


@pytest.fixture
def img() -> np.ndarray:
    return cell()


# ---------------------------------------------------------------------------------- determinism


def test_same_seed_same_output_other_seed_differs(img):
    cfg = AugmentConfig()
    a = A.augment(img, np.random.default_rng(7), cfg)
    b = A.augment(img, np.random.default_rng(7), cfg)
    assert np.array_equal(a, b)
    batch = np.stack([img] * 6)
    x1 = A.augment_batch(batch, seed=3, cfg=cfg)
    x2 = A.augment_batch(batch, seed=3, cfg=cfg)
    x3 = A.augment_batch(batch, seed=4, cfg=cfg)
    assert np.array_equal(x1, x2)
    assert not np.array_equal(x1, x3)
    # Different images of one batch get different draws.
    assert len({x1[i].tobytes() for i in range(6)}) == 6


def test_batch_item_independent_of_batch_size(img):
    cfg = AugmentConfig()
    big = A.augment_batch(np.stack([img] * 5), seed=11, cfg=cfg)
    small = A.augment_batch(np.stack([img] * 2), seed=11, cfg=cfg)
    assert np.array_equal(big[:2], small)


def test_threads_give_the_same_batch_as_one_thread(img):
    cfg = AugmentConfig.cross_lab()
    rng = np.random.default_rng(0)
    batch = np.stack([np.roll(img, int(k), axis=1) for k in rng.integers(0, 40, 12)])
    labels = np.arange(12) % 3
    one = A.augment_batch(batch, seed=5, cfg=cfg, labels=labels)
    assert np.array_equal(A.augment_batch(batch, seed=5, cfg=cfg, labels=labels, workers=3), one)


def test_input_not_modified(img):
    before = img.copy()
    for s in range(10):
        A.augment(img, np.random.default_rng(s), AugmentConfig())
    assert np.array_equal(img, before)


# ---------------------------------------------------------------------------------- shape / dtype


@pytest.mark.parametrize("shape", [(48, 80), (81, 37), (5, 7), (224, 224)])
def test_pipeline_preserves_shape_and_dtype(shape):
    im = cell(*shape)
    full = dataclasses.replace(
        AugmentConfig(), **{f.name: 1.0 for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_p")}
    )
    for cfg in (AugmentConfig(), full):
        for s in range(5):
            out = A.augment(im, np.random.default_rng(s), cfg)
            assert out.shape == im.shape and out.dtype == np.uint8
    batch = A.augment_batch(np.stack([im] * 3), seed=0, cfg=full)
    assert batch.shape == (3, *im.shape) and batch.dtype == np.uint8


def test_every_op_preserves_shape_and_dtype():
    im = cell(48, 80)
    rng = np.random.default_rng(0)
    outs = [
        A.hflip(im), A.vflip(im), A.rotate(im, 30), A.rotate(im, 90), A.channel_shift(im, (0.9, 1.0, 1.1)),
        A.sharpen(im, 1.5), A.adjust_contrast(im, 1.2), A.gaussian_blur(im, 1.0),
        A.gaussian_noise(im, 0.03, rng), A.random_crop(im, 0.8, (0.2, 0.9)), A.elastic(im, 30, 5, rng),
        A.zoom(im, 1.1), A.shift(im, 0.1, -0.1), A.stain_jitter(im, 8, 1.2, 0.9, 1.2),
        A.to_grayscale(im), A.jpeg(im, 50), A.down_up(im, 0.5),
    ]
    for out in outs:
        assert out.shape == im.shape and out.dtype == np.uint8


@pytest.mark.parametrize(
    "bad, exc",
    [
        (np.zeros((8, 8, 3), np.float32), TypeError),
        (np.zeros((8, 8), np.uint8), ValueError),
        (np.zeros((8, 8, 4), np.uint8), ValueError),
        ([[0, 0, 0]], TypeError),
    ],
)
def test_bad_images_raise_with_message(bad, exc):
    with pytest.raises(exc, match=r"\(H, W, 3\)|uint8"):
        A.augment(bad, np.random.default_rng(0), AugmentConfig())


def test_bad_parameters_raise(img):
    with pytest.raises(ValueError, match="factors"):
        A.channel_shift(img, (1.0, 1.0))
    with pytest.raises(ValueError, match="quality"):
        A.jpeg(img, 0)
    with pytest.raises(ValueError, match="scale"):
        A.random_crop(img, 1.5)
    with pytest.raises(ValueError, match="sigma"):
        A.gaussian_blur(img, -1)
    with pytest.raises(ValueError, match="seed"):
        A.augment_batch(np.stack([img]), seed=-1)
    with pytest.raises(ValueError, match="N, H, W, 3"):
        A.augment_batch(img, seed=0)


# ---------------------------------------------------------------------------------- geometric ops


def test_flips_are_exact(img):
    assert np.array_equal(A.hflip(img), img[:, ::-1])
    assert np.array_equal(A.vflip(img), img[::-1])
    assert np.array_equal(A.hflip(A.hflip(img)), img)


def test_flip_probability_is_respected(img):
    cfg = only(hflip_p=0.5)
    flipped = A.hflip(img)
    n = 400
    hits = sum(np.array_equal(A.augment(img, np.random.default_rng(s), cfg), flipped) for s in range(n))
    assert 0.4 < hits / n < 0.6


def test_rotate_90_equals_rot90(img):
    assert np.array_equal(A.rotate(img, 90), np.rot90(img))
    assert np.array_equal(A.rotate(img, -90), np.rot90(img, -1))
    assert np.array_equal(A.rotate(img, 180), np.rot90(img, 2))


def test_pipeline_rotation_matches_rotate_and_direction(img):
    # Goes through the composed single-warp path, so it checks its sign and centre conventions.
    cfg = only(rotate_p=1.0, rotate_angles_deg=(90.0,), rotate_random_sign=False)
    assert np.array_equal(A.augment(img, np.random.default_rng(0), cfg), np.rot90(img))
    cfg45 = only(rotate_p=1.0, rotate_angles_deg=(45.0,), rotate_random_sign=False)
    assert np.array_equal(A.augment(img, np.random.default_rng(0), cfg45), A.rotate(img, 45))
    # Both signs occur when rotate_random_sign is on.
    signed = only(rotate_p=1.0, rotate_angles_deg=(90.0,))
    outs = {A.augment(img, np.random.default_rng(s), signed).tobytes() for s in range(20)}
    assert outs == {np.rot90(img).tobytes(), np.rot90(img, -1).tobytes()}


def test_rotation_border_is_reflected_not_black():
    im = cell(60, 90)
    out = A.rotate(im, 45)
    # Reflected content, not a constant black fill: no near-black pixel anywhere.
    assert (out.max(axis=2) < 30).sum() == 0
    assert (cv2.warpAffine(im, cv2.getRotationMatrix2D((44.5, 29.5), 45, 1), (90, 60)).max(axis=2) < 30).sum() > 0
    # Rotating back recovers the centre (interpolation error only).
    # Rotating back recovers the centre up to interpolation error (smooth image: texture would blur).
    smooth = cv2.GaussianBlur(im, (0, 0), 2.0)
    back = A.rotate(A.rotate(smooth, 15), -15)
    centre = (slice(20, 40), slice(30, 60))
    assert np.abs(back[centre].astype(int) - smooth[centre]).mean() < 1.5
    assert np.abs(A.rotate(smooth, 15)[centre].astype(int) - smooth[centre]).mean() > 5


def test_crop_keeps_size_and_matches_resize():
    im = cell(64, 96)
    # The outermost output pixels interpolate with real neighbours just outside the window, where
    # cv2.resize of the cut-out clamps, so compare the interior.
    inner = (slice(1, -1), slice(1, -1))
    for offset, window in [((0.0, 0.0), np.s_[:32, :48]), ((1.0, 1.0), np.s_[32:, 48:]), ((0.5, 0.5), np.s_[16:48, 24:72])]:
        out = A.random_crop(im, 0.5, offset)
        assert out.shape == im.shape
        ref = cv2.resize(im[window], (96, 64), interpolation=cv2.INTER_LINEAR)
        assert np.abs(out.astype(int) - ref)[inner].max() <= 1
    assert np.array_equal(A.random_crop(im, 1.0), im)


def test_crop_in_pipeline_zooms_in_within_range(img):
    area0 = nucleus(img).sum()
    cfg = only(crop_p=1.0)
    for s in range(20):
        area = nucleus(A.augment(img, np.random.default_rng(s), cfg)).sum()
        # Side 80-100 % -> area grows by 1 to 1/0.8**2 = 1.56 (disc may be partly cut off).
        assert area <= area0 * 1.6 + 10


def test_zoom_and_shift():
    im = cell(80, 80)
    a0 = nucleus(im).sum()
    assert abs(nucleus(A.zoom(im, 1.5)).sum() / a0 - 2.25) < 0.2
    assert abs(nucleus(A.zoom(im, 0.8)).sum() / a0 - 0.64) < 0.1
    cy, cx = centroid(nucleus(im))
    sy, sx = centroid(nucleus(A.shift(im, 0.1, -0.05)))
    assert abs(sx - cx - 8) < 0.5 and abs(sy - cy + 4) < 0.5
    assert np.array_equal(A.zoom(im, 1.0), im)


def test_elastic_keeps_mean_and_moves_pixels(img):
    rng = np.random.default_rng(0)
    out = A.elastic(img, 30, 5, rng)
    assert abs(out.astype(float).mean() - img.mean()) < 2
    changed = np.abs(out.astype(int) - img).max(axis=2) > 10
    assert changed.mean() > 0.02  # pixels near the nucleus edge moved
    # Nucleus is deformed, not destroyed.
    assert abs(nucleus(out).sum() / nucleus(img).sum() - 1) < 0.2
    assert np.array_equal(A.elastic(img, 0, 5, rng), img)


# ---------------------------------------------------------------------------------- colour / blur / noise


def test_contrast_identity_and_matches_pil(img):
    assert np.array_equal(A.adjust_contrast(img, 1.0), img)
    low = A.adjust_contrast(img, 0.8)
    assert low.astype(float).std() < img.astype(float).std() * 0.85
    for f in (0.8, 1.2):
        pil = np.asarray(ImageEnhance.Contrast(Image.fromarray(img)).enhance(f))
        assert np.abs(pil.astype(int) - A.adjust_contrast(img, f)).max() <= 1


def test_sharpen_matches_pil(img):
    for f in (1.5, 0.5):
        pil = np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(f))
        assert np.abs(pil.astype(int) - A.sharpen(img, f)).max() <= 1
    assert np.array_equal(A.sharpen(img, 1.0), img)
    cb = checkerboard()
    assert A.sharpen(cb, 1.5).astype(float).std() > cb.astype(float).std()


def test_blur_identity_near_zero_and_smooths():
    cb = checkerboard()
    assert np.array_equal(A.gaussian_blur(cb, 0.0), cb)
    assert np.abs(A.gaussian_blur(cb, 0.1).astype(int) - cb).max() <= 1
    assert A.gaussian_blur(cb, 1.5).astype(float).std() < 0.5 * cb.astype(float).std()


@pytest.mark.parametrize("sigma", [0.01, 0.05])
def test_noise_std_matches_sigma(sigma):
    grey = np.full((128, 128, 3), 128, np.uint8)
    out = A.gaussian_noise(grey, sigma, np.random.default_rng(0))
    diff = out.astype(float) - grey
    assert abs(diff.std() - sigma * 255) < 0.05 * sigma * 255 + 0.15
    assert abs(diff.mean()) < 0.2


def test_channel_shift_within_ten_percent():
    im = np.clip(cell(), 60, 220)  # no saturation at 255 even with factor 1.1
    exact = A.channel_shift(im, (0.9, 1.0, 1.1)).astype(float)
    assert np.abs(exact[..., 0] - np.rint(im[..., 0] * 0.9)).max() == 0
    cfg = only(channel_shift_p=1.0)
    seen = []
    for s in range(30):
        out = A.augment(im, np.random.default_rng(s), cfg).astype(float)
        ratio = out / im
        lo, hi = ratio.reshape(-1, 3).min(0), ratio.reshape(-1, 3).max(0)
        tol = 0.5 / 60 + 1e-9  # rounding on the darkest pixel
        assert np.all(lo >= 0.9 - tol) and np.all(hi <= 1.1 + tol)
        assert np.all(hi - lo <= 2 * tol)  # one factor per channel, not per pixel
        seen.append((lo + hi) / 2)
    seen = np.array(seen)
    assert seen.min() < 0.95 and seen.max() > 1.05  # the range is actually used


def test_stain_jitter(img):
    assert np.array_equal(A.stain_jitter(img), img)
    grey = A.stain_jitter(img, saturation=0.0)
    assert np.abs(grey.astype(int).max(2) - grey.astype(int).min(2)).max() <= 1
    shifted = A.stain_jitter(img, hue_shift_deg=30)
    m = nucleus(img)
    assert np.abs(shifted[m].astype(float).mean(0) - img[m].mean(0)).max() > 15
    # Full turn is identity up to HSV round-off.
    assert np.abs(A.stain_jitter(img, hue_shift_deg=360).astype(int) - img).max() <= 1
    darker = A.stain_jitter(img, brightness=0.9)
    assert abs(darker.mean() - 0.9 * img.mean()) < 1
    assert A.stain_jitter(img, gamma=0.8).mean() > img.mean()


def test_grayscale(img):
    g = A.to_grayscale(img)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    assert np.array_equal(A.to_grayscale(img, 0.0), img)


def test_jpeg_quality_orders_error(img):
    hi = np.abs(A.jpeg(img, 95).astype(int) - img).mean()
    lo = np.abs(A.jpeg(img, 10).astype(int) - img).mean()
    assert hi < 5 and lo > 1.5 * hi
    # Channel order survives (RGB in, RGB out): the nucleus stays blue-dominant.
    m = nucleus(img)
    out = A.jpeg(img, 50)[m].mean(0)
    assert out[2] > out[0] > out[1]


def test_down_up_loses_detail():
    cb = checkerboard(square=1)
    assert np.array_equal(A.down_up(cb, 1.0), cb)
    assert A.down_up(cb, 0.5).astype(float).std() < 0.3 * cb.astype(float).std()


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "cfg",
    [
        AugmentConfig(),
        AugmentConfig.study1_only(),
        AugmentConfig.none(),
        AugmentConfig.cross_lab(),
        AugmentConfig(rotate_angles_deg=(10.0, 20.0), jpeg_quality_range=(30, 60), zoom_p=0.7),
    ],
)
def test_config_json_round_trip(cfg):
    back = AugmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert hash(back) == hash(cfg)
    assert dataclasses.asdict(back) == cfg.to_dict()


def test_config_defaults_are_published_values():
    c = AugmentConfig()
    assert (c.hflip_p, c.vflip_p) == (0.5, 0.5)
    assert c.rotate_angles_deg == (15.0, 30.0, 45.0, 90.0) and c.rotate_random_sign
    assert c.channel_shift_max == 0.10 and c.sharpen_factor == 1.5
    assert c.contrast_range == (0.8, 1.2) and c.blur_sigma_range == (0.5, 1.5)
    assert c.noise_sigma_range == (0.01, 0.05) and c.crop_scale_range == (0.8, 1.0)
    assert (c.elastic_alpha, c.elastic_sigma) == (30.0, 5.0)
    assert c.zoom_range == (0.9, 1.1) and c.shift_max == 0.10
    ops = [f.name for f in dataclasses.fields(c) if f.name.endswith("_p")]
    cross = {"amp_mix_p", "lab_jitter_p", "tight_crop_p", "unsharp_p"}
    assert len(ops) == 21 and all(getattr(c, p) > 0 for p in ops if p not in cross)
    # The cross-lab operations are opt-in (AugmentConfig.cross_lab()).
    assert all(getattr(c, p) == 0 for p in cross)
    x = AugmentConfig.cross_lab()
    assert all(getattr(x, p) > 0 for p in ops)
    assert x.blur_sigma_range[1] > c.blur_sigma_range[1] and x.down_up_scale_range[0] < c.down_up_scale_range[0]


def test_study1_only_and_none():
    s1 = AugmentConfig.study1_only()
    for name in ("zoom_p", "shift_p", "stain_p", "grayscale_p", "jpeg_p", "down_up_p", "scale_jitter_p"):
        assert getattr(s1, name) == 0.0
    for name in ("hflip_p", "vflip_p", "rotate_p", "channel_shift_p", "sharpen_p", "contrast_p",
                 "blur_p", "noise_p", "crop_p", "elastic_p"):
        assert getattr(s1, name) > 0.0
    none = AugmentConfig.none()
    assert all(getattr(none, f.name) == 0.0 for f in dataclasses.fields(none) if f.name.endswith("_p"))


def test_none_returns_input_unchanged(img):
    for s in range(5):
        out = A.augment(img, np.random.default_rng(s), AugmentConfig.none())
        assert np.array_equal(out, img) and out is not img
    assert np.array_equal(A.augment_batch(np.stack([img] * 3), 0, AugmentConfig.none()), np.stack([img] * 3))


def test_config_validation():
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(hflip_p=1.5)
    with pytest.raises(ValueError, match="low <= high"):
        AugmentConfig(contrast_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="crop_scale_range"):
        AugmentConfig(crop_scale_range=(0.5, 1.2))
    with pytest.raises(ValueError, match="valid keys"):
        AugmentConfig.from_dict({"hflip_prob": 0.5})
    with pytest.raises(ValueError, match="amp_mix_range"):
        AugmentConfig(amp_mix_range=(0.5, 1.5))
    with pytest.raises(ValueError, match="lab_jitter_shift"):
        AugmentConfig(lab_jitter_shift=(-1.0, 2.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        AugmentConfig().hflip_p = 0.1  # type: ignore[misc]


# ---------------------------------------------------------------------------------- preview / speed


def test_preview_grid_shape_and_first_tile():
    im = cell(32, 40)
    g = A.preview_grid(im, AugmentConfig(), n=16, seed=0, cols=4)
    assert g.shape == (4 * 32 + 3 * 2, 4 * 40 + 3 * 2, 3) and g.dtype == np.uint8
    assert np.array_equal(g[:32, :40], im)
    assert not np.array_equal(g[:32, 42:82], im)
    g5 = A.preview_grid(im, AugmentConfig(), n=5, cols=4, gap=0)
    assert g5.shape == (2 * 32, 4 * 40, 3)
    assert np.all(g5[32:, 40:] == 255)  # unused cells are blank
    assert np.array_equal(A.preview_grid(im, AugmentConfig(), n=5, cols=4, gap=0), g5)


# ---------------------------------------------------------------------------------- cross-lab ops


def test_amplitude_mix_keeps_structure_and_takes_style():
    content = cell(64, 64, seed=1)
    style = cv2.GaussianBlur(cell(64, 64, seed=2)[:, ::-1], (0, 0), 3)  # blurred, nucleus elsewhere
    assert np.array_equal(A.amplitude_mix(content, style, 0.0), content)
    out = A.amplitude_mix(content, style, 0.7)
    assert out.shape == content.shape and out.dtype == np.uint8
    # Structure follows the phase: the nucleus stays where the content image has it.
    assert nucleus(out).sum() > 0.5 * nucleus(content).sum()
    cy, cx = centroid(nucleus(out))
    ey, ex = centroid(nucleus(content))
    assert abs(cy - ey) < 3 and abs(cx - ex) < 3
    # Style follows the amplitude: the blurred partner's weak high frequencies make the result smoother.
    assert sharpness(out) < 0.6 * sharpness(content)
    with pytest.raises(ValueError, match="shape"):
        A.amplitude_mix(content, cell(32, 32), 0.5)
    with pytest.raises(ValueError, match="lam"):
        A.amplitude_mix(content, style, 1.5)


@pytest.mark.parametrize("lam", [0.1, 0.5, 1.0])
def test_amplitude_mix_equals_the_textbook_formula(lam):
    """Oracle: NumPy's float64 |F| blend with the content's phase, exp(i angle(F)). The product computes in
    float32 (OpenCV's DFT); a grey level or two apart on a few pixels is float32, not a different formula."""
    content = cell(48, 56, seed=4)
    style = cv2.GaussianBlur(cell(48, 56, seed=5)[::-1], (0, 0), 2)
    fx = np.fft.fft2(content.astype(np.float64), axes=(0, 1))
    fy = np.fft.fft2(style.astype(np.float64), axes=(0, 1))
    amp = (1 - lam) * np.abs(fx) + lam * np.abs(fy)
    want = np.clip(np.fft.ifft2(amp * np.exp(1j * np.angle(fx)), axes=(0, 1)).real, 0, 255)
    err = np.abs(A.amplitude_mix(content, style, lam).astype(float) - want)
    assert err.max() <= 2.0 and err.mean() <= 0.6  # rounding alone gives up to 0.5, mean 0.25


def test_lab_jitter_identity_and_shift(img):
    same = A.lab_jitter(img, (0, 0, 0), (1, 1, 1))
    assert np.abs(same.astype(int) - img).max() <= 2  # LAB round trip
    darker = A.lab_jitter(img, (-20, 0, 0), (1, 1, 1))
    assert darker.mean() < img.mean() - 10
    flat = A.lab_jitter(img, (0, 0, 0), (0.2, 1, 1))
    assert flat.std() < img.std()
    with pytest.raises(ValueError):
        A.lab_jitter(img, (0, 0, 0), (0, 1, 1))


def test_tight_crop_fills_outside_with_background(img):
    out = A.tight_crop(img, 0.5, 0.5)
    h, w = img.shape[:2]
    assert np.array_equal(out[h // 4 + 1:3 * h // 4 - 1, w // 4 + 1:3 * w // 4 - 1],
                          img[h // 4 + 1:3 * h // 4 - 1, w // 4 + 1:3 * w // 4 - 1])
    corner = out[:5, :5].reshape(-1, 3)
    assert (corner == corner[0]).all() and corner[0].mean() > 180  # one light background colour
    assert np.array_equal(A.tight_crop(img, 1.0, 1.0), img)
    with pytest.raises(ValueError):
        A.tight_crop(img, 0.0, 0.5)


def test_unsharp_mask_restores_edges_that_blur_removed():
    content = cell(64, 64, seed=5)
    blurred = A.gaussian_blur(content, 2.0)
    sharp = A.unsharp_mask(blurred, 2.0, 2.0)
    assert sharpness(sharp) > 2 * sharpness(blurred)
    # Flat regions stay flat: only edges change, the image's mean colour is kept.
    assert np.abs(sharp.astype(float).mean((0, 1)) - blurred.astype(float).mean((0, 1))).max() < 3
    assert np.array_equal(A.unsharp_mask(content, 1.0, 0.0), content)
    flat = np.full((16, 16, 3), 120, np.uint8)
    assert np.array_equal(A.unsharp_mask(flat, 2.0, 2.0), flat)
    for bad in ((0.0, 1.0), (1.0, -0.5), (float("nan"), 1.0)):
        with pytest.raises(ValueError):
            A.unsharp_mask(content, *bad)
    with pytest.raises(ValueError, match="unsharp_sigma_range"):
        AugmentConfig(unsharp_sigma_range=(0.0, 1.0))


def test_cross_lab_sharpens_as_well_as_blurs():
    """Sharpness must not tell the labs apart: the pbs5 recipe both sharpens and blurs."""
    x = AugmentConfig.cross_lab()
    assert x.unsharp_p > 0 and x.blur_p > 0
    content = cell(64, 64, seed=6)
    cfg = only(unsharp_p=1.0, unsharp_amount_range=(2.0, 2.0))
    assert sharpness(A.augment(content, np.random.default_rng(0), cfg)) > 1.5 * sharpness(content)


def test_batch_amplitude_partner_is_of_another_class():
    a, b = cell(48, 48, seed=3), cv2.GaussianBlur(cell(48, 48, seed=4), (0, 0), 4)
    cfg = only(amp_mix_p=1.0, amp_mix_range=(1.0, 1.0))
    batch = np.stack([a, a])
    # Same class everywhere: no partner, nothing happens.
    assert np.array_equal(A.augment_batch(batch, 0, cfg, labels=[0, 0]), batch)
    # Partner pool of another class: every image takes the blurred partner's amplitude.
    out = A.augment_batch(batch, 0, cfg, labels=[0, 0], pool=np.stack([a, b]), pool_labels=[0, 1])
    assert np.array_equal(out[0], A.amplitude_mix(a, b, 1.0)) and np.array_equal(out[1], out[0])
    # Without labels the operation is off (no partner): the default call stays label-free.
    assert np.array_equal(A.augment_batch(batch, 0, cfg), batch)


def test_batch_amplitude_partner_comes_from_another_source_when_sources_are_given():
    a, b, c = cell(48, 48, seed=3), cell(48, 48, seed=5), cv2.GaussianBlur(cell(48, 48, seed=4), (0, 0), 4)
    cfg = only(amp_mix_p=1.0, amp_mix_range=(1.0, 1.0))
    pool, pool_labels = np.stack([a, b, c]), [0, 1, 2]
    # Classes 0 and 1 come from one lab, class 2 from another: a class-0 image never takes its
    # partner from class 1 (same lab), only from class 2, whatever the seed.
    for seed in range(6):
        out = A.augment_batch(np.stack([a]), seed, cfg, labels=[0], pool=pool, pool_labels=pool_labels,
                              label_groups=[0, 0, 1])
        assert np.array_equal(out[0], A.amplitude_mix(a, c, 1.0))
    # Without sources, "another class" includes class 1 (same lab) for some seed.
    outs = [A.augment_batch(np.stack([a]), s, cfg, labels=[0], pool=pool, pool_labels=pool_labels)[0] for s in range(6)]
    assert any(np.array_equal(o, A.amplitude_mix(a, b, 1.0)) for o in outs)
    with pytest.raises(ValueError, match="one source per class"):
        A.augment_batch(np.stack([a]), 0, cfg, labels=[0], pool=pool, pool_labels=pool_labels, label_groups=[0, 1])


# ---------------------------------------------------------------------------------- registry


# SHA-256 of augment outputs produced by the code *before* the registry (commit 8052f57), on the images
# and seeds below; the registry must reproduce them bit for bit. Float rounding in OpenCV/NumPy may
# differ between versions, so the check runs on the versions that produced them.
_REFERENCE_VERSIONS = ("2.4.6", "5.0.0")  # numpy, opencv-python
_REFERENCE = {
    ("default", "labels", 0): "c508d8801348843adea675f5f80d9117ad58ac5efca2bdfc3b1758ce1a5c3639",
    ("crosslab", "groups", 42): "416ab797be2bc734e17ffa001bb2ce1fcecf438287bb3a85a1465adf541da1b8",
    ("all", "rect", 1): "205611acfd8a20fd2b74f6a8f8f17994201f17e45f13b4b49e0b04c9f89b4f84",
    ("all_nosign", "single", 0): "02a35adc934a9017c03a6c5145300e9a4e00e388e7d4a181fdc08064da5cf2e3",
    ("study1", "batch", 42): "4977d9bf72181d240d64b56c5b51557e22abf26fa5d37362e14a2e47b86b10a9",
}


def _reference_output(cfg_name: str, kind: str, seed: int) -> np.ndarray:
    allp = {f.name: 1.0 for f in dataclasses.fields(AugmentConfig) if f.name.endswith("_p")}
    cfg = {"default": AugmentConfig(), "crosslab": AugmentConfig.cross_lab(), "study1": AugmentConfig.study1_only(),
           "all": AugmentConfig(**allp),
           "all_nosign": AugmentConfig(**allp, rotate_random_sign=False, elastic_alpha=0.0)}[cfg_name]
    imgs = np.stack([cell(40, 40, s) for s in range(6)])
    if kind == "batch":
        return A.augment_batch(imgs, seed, cfg)
    if kind == "rect":
        return A.augment_batch(np.stack([cell(36, 52, s) for s in range(4)]), seed, cfg)
    if kind == "labels":
        return A.augment_batch(imgs, seed, cfg, labels=[0, 1, 2, 0, 1, 2])
    if kind == "groups":
        return A.augment_batch(imgs, seed, cfg, labels=[0, 1, 2, 0, 1, 2], label_groups=[0, 0, 1])
    return A.augment(imgs[0], np.random.default_rng(seed), cfg, partner=imgs[1])


@pytest.mark.skipif((np.__version__, cv2.__version__) != _REFERENCE_VERSIONS,
                    reason="reference outputs were produced with numpy 2.4.6 / opencv 5.0.0")
@pytest.mark.parametrize("key", sorted(_REFERENCE))
def test_registry_reproduces_the_outputs_of_the_code_before_it(key):
    import hashlib

    assert hashlib.sha256(_reference_output(*key).tobytes()).hexdigest() == _REFERENCE[key]


def test_every_config_field_is_declared_by_exactly_one_operation():
    declared = [p.name for op in A.OPERATIONS for p in op.params]
    assert len(declared) == len(set(declared))
    assert declared == [f.name for f in dataclasses.fields(AugmentConfig)]
    for op in A.OPERATIONS:
        assert op.params[0].name == op.prob and op.params[0].kind == "prob"
        assert op.stage in ("pixel", "affine", "field") and (op.apply is not None) == (op.stage == "pixel")
    assert {op.prob for op in A.OPERATIONS if op.study1} == {
        "hflip_p", "vflip_p", "rotate_p", "channel_shift_p", "sharpen_p", "contrast_p", "blur_p", "noise_p",
        "crop_p", "elastic_p"}


def test_operations_run_in_registry_order_and_only_when_they_fire(monkeypatch):
    calls = []
    ops = []
    for op in A.OPERATIONS:
        if op.stage != "pixel" or op.needs_partner:
            ops.append(op)
            continue
        ops.append(dataclasses.replace(
            op, apply=lambda img, d, rng, partner, _n=op.name, _f=op.apply: calls.append(_n) or _f(img, d, rng, partner)))
    monkeypatch.setattr(A, "OPERATIONS", tuple(ops))
    pixel = [op.name for op in ops if op.stage == "pixel" and not op.needs_partner]
    A.augment(cell(), np.random.default_rng(0), dataclasses.replace(
        AugmentConfig.none(), **{f"{n}_p": 1.0 for n in pixel}))
    assert calls == pixel
    calls.clear()
    A.augment(cell(), np.random.default_rng(0), dataclasses.replace(AugmentConfig.none(), blur_p=1.0))
    assert calls == ["blur"]
