"""Image quality gate: decide whether an upload is a usable single stained blood-cell image.

The gate runs before any class is trusted. It measures cheap, resolution-independent statistics
(:func:`measure_quality`) and turns them into ``image_quality`` flags (:func:`check_quality`) with a
machine-readable ``detail``:

* ``too_small``       – shorter side below ``QualityConfig.min_side_px``.
* ``blank``           – nearly uniform image (lens cap, empty slide area, failed capture).
* ``underexposed`` / ``overexposed`` – most pixels clipped dark / bright.
* ``not_stained_cell``– colour or texture statistics unlike a Romanowsky-type stain
  (May-Grünwald-Giemsa, Wright, Leishman), e.g. random noise or a natural photograph.
* ``blurred``         – very little fine detail, measured on a fixed 128×128 grey image so the
  threshold does not depend on the upload's resolution.
* ``no_cell``         – no purple/blue (nucleus-like) stained region.
* ``not_single_cell`` – several separate nucleated cells of comparable size, no stained region near
  the centre, or structures far too small for a single-cell crop (a whole smear field).

The nucleus score is ``(R + B) / 2 - G``: Romanowsky stains make nuclei purple/blue (green strongly
absorbed) while the background, red cells and most cytoplasm stay close to neutral or pink. It is
thresholded with Otsu's method and a floor, so it adapts to stain intensity across labs but does not
pick up red cells when no nucleus is present.

Thresholds were fitted with ``bench/quality_gate.py`` on three public data sets (see ``QualityConfig``).
Typical cost is 1–3 ms per image because everything is measured on a copy whose longer side is at most
``QualityConfig.work_side_px``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from bcc_core.flags import Flag, next_step

_BLUR_SIDE = 128  # fixed grey size for the blur and scale measures (resolution independence)
_SCALE_SIGMAS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # in px of the 128×128 grey image


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the quality gate. All fractions are in [0, 1]; grey levels in [0, 255].

    Values were fitted on pbs5 (5,000 single-cell crops, 360–400 px), bccd (351 blurrier crops,
    130–370 px, another lab) and all4 (3,256 smear fields, 224 px); see ``bench/quality_gate.py``.
    With these defaults: pbs5 0.28 % flagged, bccd 0.57 % flagged (none for blur or size), all4
    97.97 % flagged ``not_single_cell``; every synthetic bad input of the benchmark is flagged.

    Attributes:
        min_side_px: Shorter side below this is ``too_small``.
        work_side_px: Longer side of the working copy (images are only ever shrunk).
        blank_std_max: Grey and per-channel standard deviation below this is ``blank``.
        blur_lap_var_min: Variance of the Laplacian of the 128×128 grey image below this is
            ``blurred`` (valid bccd crops start at ~5; a pbs5 crop blurred with σ≈3% of its side ~3).
        dark_level: Grey level at or below which a pixel counts as clipped dark.
        bright_level: Grey level at or above which a pixel counts as clipped bright.
        underexposed_frac: Clipped-dark fraction above this is ``underexposed``.
        underexposed_mean: Mean grey level below this is ``underexposed``.
        overexposed_frac: Clipped-bright fraction above this is ``overexposed`` (some labs clip the
            empty background, so this is high).
        overexposed_mean: Mean grey level above this is ``overexposed``.
        off_stain_frac_max: Fraction of saturated pixels with hues a Romanowsky stain does not produce
            (yellow, green, cyan) above this is ``not_stained_cell``.
        off_stain_sat_min: Saturation (0–255) from which a pixel's hue is judged.
        noise_ratio_max: Laplacian variance / grey variance on the 128×128 image above this is
            ``not_stained_cell`` (pixel noise; natural images stay far below, white noise is ~10–20).
        stain_floor: Lowest nucleus-score threshold, whatever Otsu says (keeps red cells out).
        stain_peak_min: 99.8th percentile of the nucleus score below this means ``no_cell`` (a high
            percentile so that small nuclei, ~0.5 % of the frame, still count).
        stained_frac_min: Stained area fraction below this means ``no_cell``.
        blob_min_frac: Stained blobs smaller than this fraction of the image are ignored (platelets,
            granules, debris).
        merge_frac: Closing kernel as a fraction of the shorter side, merging lobes of one nucleus.
        comparable_ratio: Blobs at least this fraction of the largest blob count as comparable cells.
        max_comparable_blobs: More comparable blobs than this is ``not_single_cell``.
        centre_dist_max: If no comparable blob's centroid is within this normalised distance of the
            centre (0 = centre, 1 = edge midpoint), the image is ``not_single_cell``.
        cell_scale_min: Characteristic structure size (σ in px of the 128×128 image at which most
            blob energy lies) below this means cells are tiny in the frame: a smear field.
    """

    min_side_px: int = 64
    work_side_px: int = 256
    blank_std_max: float = 6.0
    blur_lap_var_min: float = 4.0
    dark_level: int = 20
    bright_level: int = 250
    underexposed_frac: float = 0.5
    underexposed_mean: float = 50.0
    overexposed_frac: float = 0.7
    overexposed_mean: float = 248.0
    off_stain_frac_max: float = 0.1
    off_stain_sat_min: int = 60
    noise_ratio_max: float = 2.0
    stain_floor: float = 35.0
    stain_peak_min: float = 45.0
    stained_frac_min: float = 0.005
    blob_min_frac: float = 0.003
    merge_frac: float = 0.08
    comparable_ratio: float = 0.25
    max_comparable_blobs: int = 2
    centre_dist_max: float = 0.6
    cell_scale_min: float = 5.2
    # Models of whole smear fields (all4) expect several cells: the single-cell checks are off there.
    expect_single_cell: bool = True
    # Smallest stained-cell extent (px, original image) with enough pixels to see chromatin; pbs5's
    # smallest nucleus is ~45 px, BCCD's ~87 px, a blast in an all4 smear field ~30-50 px.
    min_cell_px: float = 40.0

    def to_dict(self) -> dict[str, Any]:
        """Return the thresholds as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QualityConfig:
        """Build a config from :meth:`to_dict` output; missing keys keep their defaults.

        Raises:
            ValueError: If ``d`` has keys that are not thresholds of this config.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown QualityConfig keys {sorted(unknown)}; valid keys are {sorted(names)}.")
        return cls(**d)


def _validate(img: Any) -> np.ndarray:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"Expected an np.ndarray (H, W, 3) uint8 RGB image, got {type(img).__name__}.")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"Expected an (H, W, 3) RGB image, got shape {img.shape}.")
    if img.dtype != np.uint8:
        raise ValueError(f"Expected dtype uint8 (values 0-255), got {img.dtype}.")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"Image has no pixels (shape {img.shape}).")
    return img


def _shrink(img: np.ndarray, max_side: int) -> np.ndarray:
    # pyrDown (anti-aliased halving) then bilinear for the last < 2x step: ~10x faster than INTER_AREA
    # at non-integer ratios, which matters for the 5 ms budget.
    while max(img.shape[:2]) >= 2 * max_side:
        img = cv2.pyrDown(img)
    h, w = img.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)


def _otsu(score: np.ndarray) -> float:
    # Otsu on an int score mapped to uint8: 2 units per grey level over the range [-32, 95].
    u8 = np.clip(score * 2 + 64, 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return (float(t) - 64.0) / 2.0


def measure_quality(img: np.ndarray, cfg: QualityConfig | None = None) -> dict[str, float]:
    """Measure cheap image statistics used by the quality gate.

    Args:
        img: ``(H, W, 3)`` uint8 RGB image, values 0–255, any size ≥ 1×1.
        cfg: Thresholds that shape the measurement (working size, stain floor, blob sizes);
            defaults to ``QualityConfig()``.

    Returns:
        Dict of floats:
            ``height``, ``width``, ``min_side`` (px of the input);
            ``mean``, ``std`` (grey, 0–255), ``colour_std`` (largest per-channel std);
            ``laplacian_var`` (variance of the Laplacian of the 128×128 grey image);
            ``noise_ratio`` (``laplacian_var`` / grey variance of that image);
            ``dark_frac``, ``bright_frac`` (clipped fractions, 0–1);
            ``off_stain_frac`` (saturated yellow/green/cyan pixels, 0–1);
            ``stain_threshold``, ``stain_peak`` (nucleus score threshold and 99.8th percentile,
            score ``(R+B)/2-G`` in −255…255); ``stained_frac`` (0–1);
            ``n_blobs``, ``n_comparable_blobs`` (stained blobs of cell size / of size comparable to
            the largest); ``largest_blob_frac`` (0–1 of image area); ``largest_blob_dist`` and
            ``central_blob_dist`` (normalised centroid distance from the centre of the largest blob
            and of the most central comparable blob; 0 = centre, 1 = edge midpoint, NaN if no blob);
            ``cell_scale`` (characteristic structure σ in px of the 128×128 image).

    Raises:
        TypeError: If ``img`` is not an ndarray.
        ValueError: If ``img`` is not ``(H, W, 3)`` uint8.
    """
    cfg = cfg or QualityConfig()
    img = _validate(img)
    h, w = img.shape[:2]
    m: dict[str, float] = {"height": float(h), "width": float(w), "min_side": float(min(h, w))}

    work = _shrink(img, cfg.work_side_px)
    wh, ww = work.shape[:2]
    grey = cv2.cvtColor(work, cv2.COLOR_RGB2GRAY)
    g_mean, g_std = cv2.meanStdDev(grey)
    m["mean"] = float(g_mean[0, 0])
    m["std"] = float(g_std[0, 0])
    m["colour_std"] = float(cv2.meanStdDev(work)[1].max())
    m["dark_frac"] = float(np.mean(grey <= cfg.dark_level))
    m["bright_frac"] = float(np.mean(grey >= cfg.bright_level))

    g128 = cv2.resize(grey, (_BLUR_SIDE, _BLUR_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    lap_var = float(cv2.Laplacian(g128, cv2.CV_32F).var())
    m["laplacian_var"] = lap_var
    m["noise_ratio"] = lap_var / (float(g128.var()) + 1e-6)

    # Characteristic scale: where scale-normalised LoG energy sits. Smear fields put most energy at
    # small σ (many small cells); single-cell crops at large σ. The border is excluded to ignore
    # padding artefacts of the Gaussian.
    # Large σ are computed on a 64×64 copy at σ/2 (same scale, ~4x cheaper).
    g64 = cv2.resize(g128, (_BLUR_SIDE // 2, _BLUR_SIDE // 2), interpolation=cv2.INTER_AREA)
    energies = []
    for s in _SCALE_SIGMAS:
        src, sig, b = (g128, s, 16) if s < 6 else (g64, s / 2, 8)
        ks = 2 * int(np.ceil(3 * sig)) + 1
        lap = cv2.Laplacian(cv2.GaussianBlur(src, (ks, ks), sig), cv2.CV_32F) * (sig * sig)
        energies.append(float(np.mean(lap[b:-b, b:-b] ** 2)))
    e = np.asarray(energies)
    if e.sum() > 1e-9:
        m["cell_scale"] = float(np.exp(np.sum(np.log(_SCALE_SIGMAS) * e) / e.sum()))
    else:
        m["cell_scale"] = float("nan")

    hsv = cv2.cvtColor(work, cv2.COLOR_RGB2HSV)
    hue, sat = hsv[..., 0], hsv[..., 1]
    # OpenCV hue is 0-179 (degrees/2). Romanowsky stains give pink/red/purple/blue (hue ≥ 100 or ≤ 15)
    # and near-neutral backgrounds; 20-90 is yellow/green/cyan, which stained cells never are.
    off = (sat >= cfg.off_stain_sat_min) & (hue >= 20) & (hue <= 90)
    m["off_stain_frac"] = float(off.mean())

    w16 = work.astype(np.int16)
    score = (w16[..., 0] + w16[..., 2]) // 2 - w16[..., 1]
    thr = max(_otsu(score), cfg.stain_floor)
    m["stain_threshold"] = thr
    m["stain_peak"] = float(np.percentile(score, 99.8))
    mask = (score > thr).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    m["stained_frac"] = float(mask.mean())

    # Blobs are found on a half-resolution mask: the large closing kernel dominates the run time and
    # cell-sized blobs lose nothing at ~128 px.
    if min(wh, ww) >= 128:
        mask = (cv2.resize(mask * 255, (ww // 2, wh // 2), interpolation=cv2.INTER_AREA) > 127).astype(np.uint8)
        wh, ww = mask.shape
    k = max(3, int(round(cfg.merge_frac * min(wh, ww))) | 1)
    merged = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    # Outer contours instead of connected-component labelling: same blobs (holes filled), ~30x faster.
    contours, _ = cv2.findContours(merged, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    blob_area, blob_xy = [], []
    for c in contours:
        mo = cv2.moments(c)
        if mo["m00"] > 0 and mo["m00"] >= cfg.blob_min_frac * wh * ww:
            blob_area.append(mo["m00"] / float(wh * ww))
            blob_xy.append((mo["m10"] / mo["m00"], mo["m01"] / mo["m00"]))
    areas = np.asarray(blob_area, dtype=np.float64)
    cents = np.asarray(blob_xy, dtype=np.float64).reshape(-1, 2)
    m["n_blobs"] = float(len(areas))
    if len(areas):
        order = np.argsort(-areas)
        areas, cents = areas[order], cents[order]
        dists = np.hypot((cents[:, 0] - (ww - 1) / 2) / (ww / 2), (cents[:, 1] - (wh - 1) / 2) / (wh / 2))
        comparable = areas >= cfg.comparable_ratio * areas[0]
        m["n_comparable_blobs"] = float(comparable.sum())
        m["largest_blob_frac"] = float(areas[0])
        m["largest_blob_dist"] = float(dists[0])
        m["central_blob_dist"] = float(dists[comparable].min())
    else:
        m["n_comparable_blobs"] = 0.0
        m["largest_blob_frac"] = 0.0
        m["largest_blob_dist"] = float("nan")
        m["central_blob_dist"] = float("nan")
    return m


def _flag(detail: str, severity: str, what: str) -> Flag:
    return Flag("image_quality", severity, f"{what} {next_step('image_quality')}", detail)


def flags_from_measures(m: dict[str, float], cfg: QualityConfig | None = None) -> list[Flag]:
    """Turn :func:`measure_quality` output into ``image_quality`` flags.

    Split from :func:`check_quality` so thresholds can be re-fitted on cached measures.

    Args:
        m: Measures from :func:`measure_quality`.
        cfg: Thresholds; defaults to ``QualityConfig()``.

    Returns:
        Flags, most fundamental problem first; empty if the image passes. ``too_small`` and
        ``blank`` (with any exposure flag) stop further checks because the other measures are
        meaningless then; so does ``not_stained_cell``.
    """
    cfg = cfg or QualityConfig()
    flags: list[Flag] = []
    if m["min_side"] < cfg.min_side_px:
        return [_flag("too_small", "critical",
                      f"The image is only {int(m['width'])}×{int(m['height'])} px; at least "
                      f"{cfg.min_side_px} px on the shorter side is needed to see cell detail.")]
    if m["mean"] < cfg.underexposed_mean or m["dark_frac"] > cfg.underexposed_frac:
        flags.append(_flag("underexposed", "warning",
                           f"The image is too dark ({m['dark_frac']:.0%} of pixels near black); "
                           "nuclear detail may be lost."))
    if m["mean"] > cfg.overexposed_mean or m["bright_frac"] > cfg.overexposed_frac:
        flags.append(_flag("overexposed", "warning",
                           f"The image is too bright ({m['bright_frac']:.0%} of pixels near white); "
                           "the stain may be washed out."))
    if m["std"] < cfg.blank_std_max and m["colour_std"] < cfg.blank_std_max:
        # A dark or bright near-uniform frame keeps its exposure flag: it tells the user why.
        return [_flag("blank", "critical", "The image is nearly uniform: no cell or slide detail is visible."),
                *flags]
    if m["off_stain_frac"] > cfg.off_stain_frac_max or m["noise_ratio"] > cfg.noise_ratio_max:
        why = ("colours a blood-film stain does not produce (yellow, green, cyan)"
               if m["off_stain_frac"] > cfg.off_stain_frac_max else "pixel-level noise instead of cell structure")
        flags.append(_flag("not_stained_cell", "critical",
                           f"This does not look like a stained blood film (it shows {why})."))
        return flags
    if m["laplacian_var"] < cfg.blur_lap_var_min:
        flags.append(_flag("blurred", "warning",
                           "The image is out of focus; chromatin and granules cannot be assessed reliably."))
    no_cell = (m["stain_peak"] < cfg.stain_peak_min or m["stained_frac"] < cfg.stained_frac_min
               or m["n_blobs"] < 1)
    if no_cell:
        flags.append(_flag("no_cell", "critical",
                           "No purple/blue stained nucleus was found, so there is no white blood cell to classify."))
    reasons = []
    if not no_cell and m["n_comparable_blobs"] > cfg.max_comparable_blobs:
        reasons.append(f"{int(m['n_comparable_blobs'])} separate nucleated cells of similar size are visible")
    if not no_cell and not (m["central_blob_dist"] <= cfg.centre_dist_max):
        reasons.append("no stained cell is near the centre")
    # Independent of the stain: a field of pale cells is still a field.
    if m["cell_scale"] < cfg.cell_scale_min:
        reasons.append("the cells are very small in the frame, as in a whole smear field")
    if reasons and cfg.expect_single_cell:
        flags.append(_flag("not_single_cell", "critical",
                           "This is not a single-cell image: " + "; ".join(reasons) + ". "
                           "The classifier expects one white blood cell, centred."))
    return flags


def check_quality(img: np.ndarray, cfg: QualityConfig | None = None,
                  cell: tuple[float, float, float] | None = None) -> list[Flag]:
    """Run the quality gate on one image.

    Args:
        img: ``(H, W, 3)`` uint8 RGB image, values 0–255.
        cfg: Thresholds; defaults to ``QualityConfig()``.
        cell: ``preprocess.find_cell(img, pcfg)`` if the caller already has it (measured once per
            image, with the model card's search); otherwise ``locate_cell``'s default search.

    Returns:
        ``image_quality`` flags (see module docstring for the ``detail`` values); empty list when the
        image looks like a usable single stained white blood cell.

    Raises:
        TypeError: If ``img`` is not an ndarray.
        ValueError: If ``img`` is not ``(H, W, 3)`` uint8.
    """
    cfg = cfg or QualityConfig()
    m = measure_quality(img, cfg)
    flags = flags_from_measures(m, cfg)
    if cfg.expect_single_cell and not any(f.severity == "critical" for f in flags):
        from .preprocess import locate_cell

        extent = (cell if cell is not None else locate_cell(img))[2]
        if extent < 1.6 * cfg.min_cell_px and m["n_comparable_blobs"] >= 2:
            flags.append(_flag("not_single_cell", "critical",
                               f"Two or more small nucleated cells (about {extent:.0f} px) are visible, as in a "
                               "low-magnification smear field. The classifier expects one white blood cell, centred."))
        elif extent < cfg.min_cell_px:
            flags.append(_flag("not_single_cell", "critical",
                               f"The stained cell is only about {extent:.0f} px across (at least {cfg.min_cell_px:.0f} px "
                               "needed): too few pixels to judge chromatin and granules, as in a low-magnification "
                               "field. Image the cell at higher magnification, cropped to one cell."))
    return flags
