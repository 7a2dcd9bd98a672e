"""Unit tests for bcc_core.quality on synthetic images drawn in the test."""

import json

import cv2
import numpy as np
import pytest

from bcc_core.flags import Flag
from bcc_core.quality import QualityConfig, check_quality, flags_from_measures, measure_quality

BACKGROUND = (236, 226, 214)  # pale beige slide background
RBC = (222, 170, 180)  # pink red cell
CYTOPLASM = (200, 172, 212)  # lilac
NUCLEUS = (95, 45, 150)  # purple, Romanowsky-stained chromatin


def _disc(img, centre, radius, colour):
    cv2.circle(img, (int(centre[0]), int(centre[1])), int(radius), colour, -1, cv2.LINE_AA)


def _finish(img, seed=0):
    """Mild sensor noise so the image is not perfectly flat."""
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.int16) + rng.normal(0, 3, img.shape).round(), 0, 255).astype(np.uint8)


def draw_cell(size=360, centre=None, seed=0):
    """One purple nucleated cell (centred by default) among pink red cells on a light background."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), BACKGROUND, np.uint8)
    cx, cy = centre if centre is not None else (size / 2, size / 2)
    for _ in range(14):
        p = rng.uniform(0, size, 2)
        if np.hypot(p[0] - cx, p[1] - cy) > 0.3 * size:
            _disc(img, p, 0.1 * size, RBC)
    _disc(img, (cx, cy), 0.15 * size, CYTOPLASM)
    _disc(img, (cx, cy), 0.1 * size, NUCLEUS)
    return _finish(img, seed)


def draw_field(size=224, n_cells=12, seed=0):
    """A smear field: many small red cells and several small nucleated cells across the frame."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), BACKGROUND, np.uint8)
    for _ in range(70):
        _disc(img, rng.uniform(0, size, 2), 0.035 * size, RBC)
    for _ in range(n_cells):
        _disc(img, rng.uniform(0.1 * size, 0.9 * size, 2), 0.05 * size, NUCLEUS)
    return _finish(img, seed)


def draw_three_cells(size=360):
    """Three separate nucleated cells of the same size at single-cell magnification."""
    img = np.full((size, size, 3), BACKGROUND, np.uint8)
    for cx, cy in [(0.25, 0.3), (0.72, 0.3), (0.5, 0.75)]:
        _disc(img, (cx * size, cy * size), 0.12 * size, CYTOPLASM)
        _disc(img, (cx * size, cy * size), 0.08 * size, NUCLEUS)
    return _finish(img)


def details(img, cfg=None):
    flags = check_quality(img, cfg)
    assert all(isinstance(f, Flag) and f.code == "image_quality" for f in flags)
    return [f.detail for f in flags]


# ---------------------------------------------------------------- passes


@pytest.mark.parametrize("size", [224, 360, 800])
def test_good_synthetic_cell_passes_at_any_resolution(size):
    assert details(draw_cell(size)) == []


def test_cell_with_too_few_pixels_is_flagged():
    # At 128 px the drawn nucleus is under 40 px across: too few pixels to judge chromatin.
    flags = check_quality(draw_cell(128))
    assert [f.detail for f in flags] == ["not_single_cell"] and "px" in flags[0].message


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_good_synthetic_cell_passes_other_layouts(seed):
    assert details(draw_cell(300, seed=seed)) == []


def test_non_square_cell_passes():
    img = draw_cell(400)[40:360, :]  # 320 x 400
    assert details(img) == []


# ---------------------------------------------------------------- failures with the right detail


@pytest.mark.parametrize("value, expected", [
    (0, ["blank", "underexposed"]), (128, ["blank"]), (255, ["blank", "overexposed"])])
def test_uniform_images_are_blank(value, expected):
    assert details(np.full((300, 300, 3), value, np.uint8)) == expected


def test_uniform_colour_is_blank():
    assert details(np.full((200, 250, 3), (200, 150, 210), np.uint8)) == ["blank"]


def test_tiny_image_is_too_small():
    assert details(draw_cell(360)[170:190, 170:190]) == ["too_small"]


@pytest.mark.parametrize("kind", ["grey_gauss", "colour_gauss", "uniform_colour"])
def test_noise_is_not_a_stained_cell(kind):
    rng = np.random.default_rng(0)
    img = {
        "grey_gauss": np.repeat(np.clip(rng.normal(128, 40, (300, 300, 1)), 0, 255), 3, axis=2),
        "colour_gauss": np.clip(rng.normal(128, 40, (300, 300, 3)), 0, 255),
        "uniform_colour": rng.integers(0, 256, (300, 300, 3)),
    }[kind].astype(np.uint8)
    assert "not_stained_cell" in details(img)


def test_green_yellow_picture_is_not_a_stained_cell():
    img = np.full((300, 300, 3), (210, 200, 60), np.uint8)  # yellow
    _disc(img, (150, 150), 60, (40, 160, 50))  # green disc
    assert "not_stained_cell" in details(_finish(img))


def test_heavily_blurred_cell_is_blurred():
    img = draw_cell(360)
    blurred = cv2.GaussianBlur(img, (0, 0), 0.04 * 360)
    assert "blurred" in details(blurred)
    m_sharp, m_blur = measure_quality(img), measure_quality(blurred)
    assert m_blur["laplacian_var"] < m_sharp["laplacian_var"] / 10


def test_overexposed_cell():
    img = np.clip(draw_cell(360).astype(np.float32) * 2.5, 0, 255).astype(np.uint8)
    assert "overexposed" in details(img)


def test_underexposed_cell():
    img = (draw_cell(360).astype(np.float32) * 0.15).astype(np.uint8)
    assert "underexposed" in details(img)


def test_red_cells_only_is_no_cell():
    rng = np.random.default_rng(0)
    img = np.full((360, 360, 3), BACKGROUND, np.uint8)
    for _ in range(14):
        _disc(img, rng.uniform(0, 360, 2), 36, RBC)
    assert details(_finish(img)) == ["no_cell"]


def test_smear_field_is_not_single_cell():
    d = details(draw_field())
    assert "not_single_cell" in d
    # The field's structures are smaller than a single cell's (cell_scale_min itself is fitted on data).
    assert measure_quality(draw_field())["cell_scale"] < measure_quality(draw_cell(360))["cell_scale"]


def test_three_comparable_cells_are_not_single_cell():
    img = draw_three_cells()
    assert "not_single_cell" in details(img)
    assert measure_quality(img)["n_comparable_blobs"] == 3


def test_off_centre_cell_is_not_single_cell():
    img = draw_cell(360, centre=(60, 60))
    assert "not_single_cell" in details(img)
    assert measure_quality(img)["central_blob_dist"] > QualityConfig().centre_dist_max


def test_flag_messages_say_what_to_do_next():
    for img in [np.zeros((300, 300, 3), np.uint8), draw_field(), draw_cell(360)[:20, :20]]:
        for f in check_quality(img):
            assert f.severity in ("warning", "critical")
            assert "Re-capture" in f.message or "classify it manually" in f.message


# ---------------------------------------------------------------- measures, config and validation


def test_measure_quality_keys_and_ranges():
    m = measure_quality(draw_cell(360))
    for k in ["height", "width", "min_side", "mean", "std", "colour_std", "laplacian_var", "noise_ratio",
              "dark_frac", "bright_frac", "off_stain_frac", "stain_threshold", "stain_peak", "stained_frac",
              "n_blobs", "n_comparable_blobs", "largest_blob_frac", "largest_blob_dist", "central_blob_dist",
              "cell_scale"]:
        assert k in m and isinstance(m[k], float), k
    assert m["height"] == m["width"] == 360
    assert 0 <= m["dark_frac"] <= 1 and 0 <= m["bright_frac"] <= 1
    # nucleus disc is pi*0.1^2 ~ 3.1 % of the image, with its lilac cytoplasm pi*0.15^2 ~ 7.1 %: on the
    # stain-normalised copy the finder may take some cytoplasm, never the red cells around
    assert 0.02 < m["stained_frac"] < 0.075
    assert m["n_comparable_blobs"] == 1 and m["central_blob_dist"] < 0.05


def test_config_round_trip_and_json():
    cfg = QualityConfig(blur_lap_var_min=7.5)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert QualityConfig.from_dict(d) == cfg
    assert QualityConfig.from_dict({}) == QualityConfig()
    with pytest.raises(ValueError, match="Unknown QualityConfig keys"):
        QualityConfig.from_dict({"blur": 3})


def test_config_thresholds_are_used():
    img = draw_cell(360)
    assert details(img, QualityConfig(blur_lap_var_min=1e9)) == ["blurred"]
    assert details(img, QualityConfig(min_side_px=1000)) == ["too_small"]
    m = measure_quality(img)
    assert flags_from_measures(m, QualityConfig(cell_scale_min=100))[0].detail == "not_single_cell"


@pytest.mark.parametrize("bad, exc", [
    (np.zeros((50, 50), np.uint8), ValueError),
    (np.zeros((50, 50, 4), np.uint8), ValueError),
    (np.zeros((50, 50, 3), np.float32), ValueError),
    (np.zeros((0, 50, 3), np.uint8), ValueError),
    ([[0, 0, 0]], TypeError),
])
def test_invalid_inputs_raise_with_a_clear_message(bad, exc):
    with pytest.raises(exc, match="uint8|RGB|ndarray|pixels"):
        check_quality(bad)


def test_input_is_not_modified():
    img = draw_cell(360)
    before = img.copy()
    check_quality(img)
    np.testing.assert_array_equal(img, before)
