"""Cell-centred preprocessing: locates the cell, normalises scale and stain, fixed output contract."""

import numpy as np
import pytest

from bcc_core.preprocess import PreprocessConfig, locate_cell, preprocess, reinhard
from conftest import synthetic_cell


def test_output_contract(cell_image):
    out = preprocess(cell_image)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


def test_locates_off_centre_cell():
    img = np.roll(synthetic_cell(400, 50), (40, -30), axis=(0, 1))
    cx, cy, ext = locate_cell(img)
    assert abs(cx - (200 - 30)) < 12 and abs(cy - (200 + 40)) < 12
    assert 80 < ext < 140  # nucleus diameter 100 px


def test_scale_normalised_across_magnifications():
    """The same cell imaged at two magnifications gives nearly the same model input."""
    import cv2

    small = synthetic_cell(360, 40, seed=1)
    big = cv2.resize(small, (720, 720), interpolation=cv2.INTER_LINEAR)
    a, b = preprocess(small).astype(float), preprocess(big).astype(float)
    assert np.abs(a - b).mean() < 12


def test_reinhard_removes_colour_cast(cell_image):
    cast = np.clip(cell_image.astype(int) + (25, -10, -30), 0, 255).astype(np.uint8)
    d_before = np.abs(cast.astype(float) - cell_image).mean()
    d_after = np.abs(reinhard(cast).astype(float) - reinhard(cell_image)).mean()
    assert d_after < d_before / 2


def test_tight_crop_is_padded_not_mirrored():
    img = synthetic_cell(360, 60)[90:270, 90:270]  # cell fills the frame, like BCCD crops
    out = preprocess(img)
    assert out.shape == (224, 224, 3)
    # corners are slide background (light), not a mirrored purple nucleus
    assert out[:10, :10].mean() > 150


def test_letterbox_mode_and_validation(cell_image):
    out = preprocess(cell_image[:, :200], PreprocessConfig(mode="letterbox", stain_norm="none", clahe=True))
    assert out.shape == (224, 224, 3)
    with pytest.raises(ValueError, match="mode"):
        PreprocessConfig(mode="zoom")
    with pytest.raises(ValueError, match="uint8"):
        preprocess(cell_image.astype(np.float32))
    assert PreprocessConfig.from_dict(PreprocessConfig().to_dict()) == PreprocessConfig()


def test_blank_image_does_not_crash():
    out = preprocess(np.full((100, 100, 3), 200, np.uint8))
    assert out.shape == (224, 224, 3)


def test_a_given_cell_location_is_used_and_equals_searching():
    img = synthetic_cell(240, 40, seed=5)
    cfg = PreprocessConfig()
    loc = locate_cell(img)
    assert np.array_equal(preprocess(img, cfg, loc), preprocess(img, cfg))
    # A different location gives a different crop: the argument is really used.
    moved = (loc[0] + 40, loc[1], loc[2])
    assert not np.array_equal(preprocess(img, cfg, moved), preprocess(img, cfg))


def test_reinhard_to_a_given_target_reaches_its_statistics(cell_image):
    """With an explicit target (another lab's statistics) the output's LAB mean/std match it."""
    import cv2

    mean, std = np.array([170.0, 150.0, 115.0]), np.array([30.0, 8.0, 12.0])
    out = reinhard(cell_image, mean, std, max_gain=1e3)
    lab = cv2.cvtColor(out, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(float)
    assert np.allclose(lab.mean(0), mean, atol=3) and np.allclose(lab.std(0), std, rtol=0.15)


def test_cell_is_found_under_another_labs_bluish_stain():
    """A stain that turns red cells and background bluish must not make the crop the whole field."""
    img = synthetic_cell(360, 40, seed=2)
    bluish = reinhard(img, np.array([205.0, 143.0, 105.0]), np.array([53.0, 20.0, 8.0]), max_gain=1e3)
    assert locate_cell(bluish, normalise=False)[2] > 250  # the raw search takes the whole field
    assert 70 < locate_cell(bluish)[2] < 150  # nucleus (84 px on the original) and at most its cytoplasm
    assert abs(locate_cell(img)[2] - locate_cell(img, normalise=False)[2]) < 10  # usual stains: same cell


def test_cards_without_locate_keep_the_raw_search_they_were_trained_with():
    legacy = {k: v for k, v in PreprocessConfig().to_dict().items() if k != "locate"}
    assert PreprocessConfig.from_dict(legacy).locate == "raw"
    assert PreprocessConfig().locate == "normalised"
    bluish = reinhard(synthetic_cell(360, 40, seed=2), np.array([205.0, 143.0, 105.0]),
                      np.array([53.0, 20.0, 8.0]), max_gain=1e3)
    assert not np.array_equal(preprocess(bluish, PreprocessConfig.from_dict(legacy)), preprocess(bluish))
    with pytest.raises(ValueError, match="locate"):
        PreprocessConfig(locate="auto")


def test_one_nucleus_finder_serves_the_crop_and_the_quality_gate(monkeypatch):
    """The gate measures nuclei with preprocess.find_nuclei, the finder behind the model's crop."""
    from bcc_core import preprocess as pp
    from bcc_core import quality

    img = synthetic_cell(300, 40, seed=3)
    calls = []
    real = pp.find_nuclei
    monkeypatch.setattr(quality, "find_nuclei", lambda *a, **k: calls.append("gate") or real(*a, **k))
    m = quality.measure_quality(img)
    nuc = real(img, normalise=True)
    assert calls == ["gate"]
    assert m["stained_frac"] == float(nuc.mask.mean()) and m["stain_threshold"] == nuc.threshold
    # locate_cell's box is the mask's largest central blob: its extent matches the mask's extent
    ys, xs = np.nonzero(nuc.mask)
    extent = max(np.ptp(xs) + 1, np.ptp(ys) + 1) / nuc.scale
    assert abs(locate_cell(img)[2] - extent) <= 8 / nuc.scale


def test_nuclei_score_is_blue_minus_green_and_floored():
    from bcc_core.preprocess import NUCLEUS_FLOOR, find_nuclei, nucleus_score

    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 1], img[..., 2] = 40, 150
    assert np.all(nucleus_score(img) == 110)
    # A frame with no nucleus (red cells on background only) keeps the floor and finds nothing.
    red = np.full((200, 200, 3), (236, 226, 214), np.uint8)
    red[50:100, 50:100] = (222, 170, 180)
    nuc = find_nuclei(red, normalise=False)
    assert nuc.threshold >= NUCLEUS_FLOOR and nuc.mask.sum() == 0
