"""Training-time image augmentation (apply to the train split only).

Covers every operation of the published Study 1 and Study 2 pipelines, plus our own stain / scanner
robustness operations for images coming from other laboratories:

* Study 1: horizontal / vertical flips, rotations from {15, 30, 45, 90} degrees (either sign, border
  filled by reflection), per-channel colour shifts (+-10 %), sharpness 1.5 (PIL-style), contrast
  [0.8, 1.2], Gaussian blur sigma [0.5, 1.5], Gaussian noise sigma [0.01, 0.05] (on the [0, 1] scale),
  random crops of 80-100 % of the side resized back, elastic deformation (alpha 30, sigma 5).
* Study 2: zoom [0.9, 1.1] and shift (+-10 % translation).
* Robustness (ours): stain jitter (hue / saturation in HSV, brightness / gamma), random grayscale,
  JPEG re-compression, down-then-up sampling (lower resolution scanners) and scale jitter (different
  microns per pixel).
* Cross-lab (ours, :meth:`AugmentConfig.cross_lab`): Fourier amplitude mixing with an image of
  another class (or lab, :func:`augment_batch` ``label_groups``) (FACT, Xu et al. CVPR 2021: the
  partner's amplitude spectrum carries its lab's colour, sharpness and texture statistics, the
  phase keeps this image's cell), random LAB
  mean/contrast jitter, tight crops padded with background (other labs crop tighter), and strong
  blur / resolution / noise / JPEG settings. In pbs5 every class comes from one lab, so giving each
  class the other lab's "look" is what takes the lab away as a shortcut.

Every operation is a public function with explicit parameters (unit testable) and one entry of the
registry :data:`OPERATIONS`, which declares its :class:`AugmentConfig` fields (defaults, checks,
documentation), how its parameters are drawn from a ``np.random.Generator`` and how it is applied;
:class:`AugmentConfig` is built from the registry, and :func:`augment` walks it in order. A new
operation is one function and one registry entry.

All geometric operations of one :func:`augment` call (rotation, crop, zoom, scale jitter, shift and the
elastic field) are composed into a single resampling, so an image is interpolated at most once; flips
are exact pixel permutations. Images are ``np.ndarray (H, W, 3) uint8 RGB`` throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from functools import lru_cache
from typing import Any, Sequence

import cv2
import numpy as np

from .preprocess import background_colour

__all__ = [
    "AugmentConfig",
    "OPERATIONS",
    "Operation",
    "Param",
    "augment",
    "augment_batch",
    "preview_grid",
    "hflip",
    "vflip",
    "rotate",
    "channel_shift",
    "sharpen",
    "adjust_contrast",
    "gaussian_blur",
    "gaussian_noise",
    "random_crop",
    "elastic",
    "zoom",
    "shift",
    "stain_jitter",
    "to_grayscale",
    "jpeg",
    "down_up",
    "amplitude_mix",
    "lab_jitter",
    "tight_crop",
    "unsharp_mask",
]

# Reflection without repeating the edge pixel (…cba|abcd|dcb…): no black corners, no visible seam.
_BORDER = cv2.BORDER_REFLECT_101

# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _check_image(img: Any, name: str = "img") -> None:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (H, W, 3) uint8 RGB, got {type(img).__name__}")
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"{name} must have shape (H, W, 3) with H, W >= 1, got {img.shape}")
    if img.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 (0-255 RGB), got dtype {img.dtype}")


def _to_u8(x: np.ndarray) -> np.ndarray:
    """Round and saturate a float array in the 0-255 scale to uint8."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _lut_apply(img: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Apply a (256,) or (256, 3) float LUT (0-255 scale) to a uint8 image."""
    lut_u8 = _to_u8(lut)
    if lut_u8.ndim == 2:
        lut_u8 = lut_u8.reshape(256, 1, 3)
    return cv2.LUT(np.ascontiguousarray(img), lut_u8)


def _center(h: int, w: int) -> tuple[float, float]:
    # Pixel centres run 0..W-1, so the geometric centre is (W-1)/2: rotations by 90 degrees then
    # map pixels exactly onto pixels.
    return ((w - 1) / 2.0, (h - 1) / 2.0)


def _rotation_matrix(h: int, w: int, angle_deg: float, scale: float = 1.0) -> np.ndarray:
    m = np.eye(3)
    m[:2] = cv2.getRotationMatrix2D(_center(h, w), float(angle_deg), float(scale))
    return m


def _shift_matrix(h: int, w: int, dx_frac: float, dy_frac: float) -> np.ndarray:
    m = np.eye(3)
    m[0, 2] = dx_frac * w
    m[1, 2] = dy_frac * h
    return m


def _crop_matrix(h: int, w: int, scale: float, offset: tuple[float, float]) -> np.ndarray:
    """Forward map sending a (scale*H, scale*W) window at ``offset`` onto the full (H, W) frame."""
    oy, ox = offset
    top = oy * h * (1.0 - scale)
    left = ox * w * (1.0 - scale)
    m = np.eye(3)
    # Same pixel-centre convention as cv2.resize: dst + 0.5 = (src + 0.5 - corner) / scale.
    m[0, 0] = m[1, 1] = 1.0 / scale
    m[0, 2] = (0.5 - left) / scale - 0.5
    m[1, 2] = (0.5 - top) / scale - 0.5
    return m


@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    xs.flags.writeable = False
    ys.flags.writeable = False
    return xs, ys


def _elastic_field(
    h: int, w: int, alpha: float, sigma: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Simard et al. (2003) displacement field: uniform(-1, 1) noise, Gaussian-smoothed, times alpha.

    Returns:
        (dx, dy): float32 arrays (H, W) of displacements in pixels.
    """
    noise = rng.random((2, h, w), dtype=np.float32)
    noise *= 2.0
    noise -= 1.0
    dx = cv2.GaussianBlur(noise[0], (0, 0), sigma, borderType=_BORDER)
    dy = cv2.GaussianBlur(noise[1], (0, 0), sigma, borderType=_BORDER)
    dx *= alpha
    dy *= alpha
    return dx, dy


def _warp(
    img: np.ndarray,
    m: np.ndarray,
    field: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Resample ``img`` once through forward affine ``m`` (3x3) followed by an optional elastic field.

    Output pixel p takes the input at ``m^-1 (p + d(p))``; borders are reflected.
    """
    h, w = img.shape[:2]
    src = np.ascontiguousarray(img)
    if field is None:
        return cv2.warpAffine(
            src, m[:2], (w, h), flags=cv2.INTER_LINEAR, borderMode=_BORDER
        )
    inv = np.linalg.inv(m)
    xs, ys = _grid(h, w)
    px = xs + field[0]
    py = ys + field[1]
    map_x = (inv[0, 0] * px + inv[0, 1] * py + inv[0, 2]).astype(np.float32, copy=False)
    map_y = (inv[1, 0] * px + inv[1, 1] * py + inv[1, 2]).astype(np.float32, copy=False)
    return cv2.remap(src, map_x, map_y, cv2.INTER_LINEAR, borderMode=_BORDER)


def _resample(img: np.ndarray, m: np.ndarray, field_: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """One resampling for all geometric operations of an :func:`augment` call (none if they cancel)."""
    if field_ is not None or not np.allclose(m, np.eye(3), rtol=0.0, atol=1e-9):
        return _warp(img, m, field_)
    return img


def _fires(rng: np.random.Generator, p: float) -> bool:
    if p <= 0.0:
        return False
    return p >= 1.0 or rng.random() < p


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    # Multiplicative ranges such as (0.8, 1.25) are symmetric in log space.
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# --------------------------------------------------------------------------------------------------
# Individual operations (explicit parameters, no randomness except where a field must be drawn)
# --------------------------------------------------------------------------------------------------


def hflip(img: np.ndarray) -> np.ndarray:
    """Mirror left-right (exact).

    Args:
        img: (H, W, 3) uint8 RGB.

    Returns:
        (H, W, 3) uint8, ``img[:, ::-1]``.
    """
    _check_image(img)
    return cv2.flip(np.ascontiguousarray(img), 1)


def vflip(img: np.ndarray) -> np.ndarray:
    """Mirror top-bottom (exact).

    Args:
        img: (H, W, 3) uint8 RGB.

    Returns:
        (H, W, 3) uint8, ``img[::-1]``.
    """
    _check_image(img)
    return cv2.flip(np.ascontiguousarray(img), 0)


def rotate(img: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate counter-clockwise about the image centre, keeping the shape; borders reflected.

    Multiples of 90 degrees on a square image are exact (``np.rot90``).

    Args:
        img: (H, W, 3) uint8 RGB.
        angle_deg: Angle in degrees, positive = counter-clockwise (as ``np.rot90``), finite.

    Returns:
        (H, W, 3) uint8.

    Raises:
        ValueError: If ``angle_deg`` is not finite.
    """
    _check_image(img)
    if not math.isfinite(angle_deg):
        raise ValueError(f"angle_deg must be a finite number of degrees, got {angle_deg}")
    h, w = img.shape[:2]
    quarter = angle_deg / 90.0
    if h == w and quarter == int(quarter):
        return np.ascontiguousarray(np.rot90(img, int(quarter) % 4))
    return _warp(img, _rotation_matrix(h, w, angle_deg))


def channel_shift(img: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """Multiply each RGB channel by its own factor (Study 1 colour shift, factors in [0.9, 1.1]).

    Args:
        img: (H, W, 3) uint8 RGB.
        factors: Three non-negative multipliers (R, G, B).

    Returns:
        (H, W, 3) uint8, ``round(img * factors)`` saturated at 255.

    Raises:
        ValueError: If ``factors`` is not three finite non-negative numbers.
    """
    _check_image(img)
    f = np.asarray(factors, dtype=np.float64)
    if f.shape != (3,) or not np.all(np.isfinite(f)) or np.any(f < 0):
        raise ValueError(f"factors must be three finite numbers >= 0 (R, G, B), got {factors!r}")
    lut = np.arange(256, dtype=np.float64)[:, None] * f[None, :]
    return _lut_apply(img, lut)


def sharpen(img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ``ImageEnhance.Sharpness`` equivalent (Study 1 uses factor 1.5).

    Blends the image with its 3x3 smoothed version (PIL ``SMOOTH`` kernel, border pixels kept):
    ``out = smooth + factor * (img - smooth)``. Factor 1 is identity, > 1 sharpens, < 1 blurs.

    Args:
        img: (H, W, 3) uint8 RGB.
        factor: Sharpness factor, >= 0.

    Returns:
        (H, W, 3) uint8.

    Raises:
        ValueError: If ``factor`` is negative or not finite.
    """
    _check_image(img)
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"factor must be a finite number >= 0, got {factor}")
    if factor == 1.0:
        return img.copy()
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0
    src = np.ascontiguousarray(img)
    smooth = cv2.filter2D(src.astype(np.float32), -1, kernel, borderType=_BORDER)
    smooth = np.rint(smooth)  # PIL rounds the degenerate image to uint8 before blending
    # PIL leaves the one-pixel frame unfiltered.
    smooth[0, :] = src[0, :]
    smooth[-1, :] = src[-1, :]
    smooth[:, 0] = src[:, 0]
    smooth[:, -1] = src[:, -1]
    return _to_u8(smooth + factor * (src.astype(np.float32) - smooth))


def adjust_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    """PIL ``ImageEnhance.Contrast`` equivalent: scale distances from the mean grey level.

    Args:
        img: (H, W, 3) uint8 RGB.
        factor: Contrast factor >= 0 (Study 1 draws it from [0.8, 1.2]); 1 is identity.

    Returns:
        (H, W, 3) uint8, ``mean + factor * (img - mean)`` with ``mean`` the mean luma.

    Raises:
        ValueError: If ``factor`` is negative or not finite.
    """
    _check_image(img)
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"factor must be a finite number >= 0, got {factor}")
    gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    mean = float(int(gray.mean() + 0.5))
    lut = mean + factor * (np.arange(256, dtype=np.float64) - mean)
    return _lut_apply(img, lut)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` pixels (Study 1: [0.5, 1.5]).

    Args:
        img: (H, W, 3) uint8 RGB.
        sigma: Standard deviation in pixels, >= 0; 0 returns a copy.

    Returns:
        (H, W, 3) uint8.

    Raises:
        ValueError: If ``sigma`` is negative or not finite.
    """
    _check_image(img)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number of pixels >= 0, got {sigma}")
    if sigma == 0:
        return img.copy()
    return cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), sigma, borderType=_BORDER)


def gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add zero-mean Gaussian noise, ``sigma`` on the [0, 1] intensity scale (Study 1: [0.01, 0.05]).

    Args:
        img: (H, W, 3) uint8 RGB.
        sigma: Noise standard deviation as a fraction of 255, >= 0.
        rng: Source of the noise.

    Returns:
        (H, W, 3) uint8, clipped to [0, 255].

    Raises:
        ValueError: If ``sigma`` is negative or not finite.
    """
    _check_image(img)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0 (fraction of 255), got {sigma}")
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= np.float32(sigma * 255.0)
    # cv2.add rounds and saturates in one pass (3x faster than numpy rint/clip/astype).
    return cv2.add(np.ascontiguousarray(img), noise, dtype=cv2.CV_8U)


def random_crop(
    img: np.ndarray, scale: float, offset: tuple[float, float] = (0.5, 0.5)
) -> np.ndarray:
    """Crop a window of ``scale`` times each side and resize it back to (H, W).

    The randomness lives in :func:`augment`, which draws ``scale`` and ``offset``.

    Args:
        img: (H, W, 3) uint8 RGB.
        scale: Window side as a fraction of the image side, in (0, 1] (Study 1: [0.8, 1.0]).
        offset: (y, x) position of the window, each in [0, 1]: 0 = top/left edge, 0.5 = centred.

    Returns:
        (H, W, 3) uint8.

    Raises:
        ValueError: If ``scale`` or ``offset`` is out of range.
    """
    _check_image(img)
    if not (0.0 < scale <= 1.0):
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if len(offset) != 2 or not all(0.0 <= o <= 1.0 for o in offset):
        raise ValueError(f"offset must be (y, x) with each value in [0, 1], got {offset!r}")
    if scale == 1.0:
        return img.copy()
    h, w = img.shape[:2]
    return _warp(img, _crop_matrix(h, w, scale, (float(offset[0]), float(offset[1]))))


def elastic(img: np.ndarray, alpha: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Elastic deformation (Simard et al. 2003; Study 1: alpha 30, sigma 5) via ``cv2.remap``.

    Args:
        img: (H, W, 3) uint8 RGB.
        alpha: Displacement scale in pixels, >= 0.
        sigma: Gaussian smoothing of the random field in pixels, > 0.
        rng: Source of the random field.

    Returns:
        (H, W, 3) uint8; borders reflected.

    Raises:
        ValueError: If ``alpha`` < 0 or ``sigma`` <= 0.
    """
    _check_image(img)
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number of pixels >= 0, got {alpha}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number of pixels > 0, got {sigma}")
    h, w = img.shape[:2]
    return _warp(img, np.eye(3), _elastic_field(h, w, alpha, sigma, rng))


def zoom(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale the content about the image centre, keeping the shape (Study 2 zoom, scale jitter).

    Args:
        img: (H, W, 3) uint8 RGB.
        factor: > 0; > 1 enlarges the content (zoom in), < 1 shrinks it (reflected border).

    Returns:
        (H, W, 3) uint8.

    Raises:
        ValueError: If ``factor`` is not a finite positive number.
    """
    _check_image(img)
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a finite number > 0, got {factor}")
    if factor == 1.0:
        return img.copy()
    h, w = img.shape[:2]
    return _warp(img, _rotation_matrix(h, w, 0.0, factor))


def shift(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Translate by fractions of the width / height (Study 2: up to +-0.1); border reflected.

    Args:
        img: (H, W, 3) uint8 RGB.
        dx: Horizontal shift as a fraction of W, in (-1, 1); positive moves content right.
        dy: Vertical shift as a fraction of H, in (-1, 1); positive moves content down.

    Returns:
        (H, W, 3) uint8.

    Raises:
        ValueError: If a shift is outside (-1, 1).
    """
    _check_image(img)
    if not (-1.0 < dx < 1.0 and -1.0 < dy < 1.0):
        raise ValueError(f"dx, dy must be fractions of the side in (-1, 1), got {dx}, {dy}")
    h, w = img.shape[:2]
    return _warp(img, _shift_matrix(h, w, dx, dy))


def stain_jitter(
    img: np.ndarray,
    hue_shift_deg: float = 0.0,
    saturation: float = 1.0,
    brightness: float = 1.0,
    gamma: float = 1.0,
) -> np.ndarray:
    """Simulate another lab's stain / illumination: HSV hue and saturation, then brightness and gamma.

    ``out = 255 * clip(brightness * (rgb' / 255) ** gamma)`` where ``rgb'`` is the image after rotating
    the HSV hue by ``hue_shift_deg`` and scaling the saturation. All defaults give the identity.

    Args:
        img: (H, W, 3) uint8 RGB.
        hue_shift_deg: Hue rotation in degrees (any finite value, taken modulo 360).
        saturation: Saturation multiplier, >= 0 (0 gives grey).
        brightness: Intensity multiplier, >= 0.
        gamma: Gamma exponent, > 0 (< 1 brightens mid-tones).

    Returns:
        (H, W, 3) uint8.

    Raises:
        ValueError: On out-of-range parameters.
    """
    _check_image(img)
    if not math.isfinite(hue_shift_deg):
        raise ValueError(f"hue_shift_deg must be finite, got {hue_shift_deg}")
    if not (math.isfinite(saturation) and saturation >= 0):
        raise ValueError(f"saturation must be a finite number >= 0, got {saturation}")
    if not (math.isfinite(brightness) and brightness >= 0):
        raise ValueError(f"brightness must be a finite number >= 0, got {brightness}")
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma}")
    out = np.ascontiguousarray(img)
    if hue_shift_deg % 360.0 != 0.0 or saturation != 1.0:
        # float32 HSV keeps hue in degrees [0, 360) without the 2-degree quantisation of uint8 HSV.
        hsv = cv2.cvtColor(out.astype(np.float32) * np.float32(1.0 / 255.0), cv2.COLOR_RGB2HSV)
        if hue_shift_deg % 360.0 != 0.0:
            h = hsv[..., 0]
            h += np.float32(hue_shift_deg % 360.0)
            h[h >= 360.0] -= 360.0
        if saturation != 1.0:
            s = hsv[..., 1]
            s *= np.float32(saturation)
            np.minimum(s, 1.0, out=s)
        rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        rgb *= 255.0
        out = _to_u8(rgb)
    if brightness != 1.0 or gamma != 1.0:
        lut = 255.0 * brightness * (np.arange(256, dtype=np.float64) / 255.0) ** gamma
        out = _lut_apply(out, lut)
    return out if out is not img else img.copy()


def to_grayscale(img: np.ndarray, amount: float = 1.0) -> np.ndarray:
    """Blend towards 3-channel luma grayscale (some labs scan or export grey images).

    Args:
        img: (H, W, 3) uint8 RGB.
        amount: 0 = unchanged, 1 = fully grey; in [0, 1].

    Returns:
        (H, W, 3) uint8; with ``amount`` 1 the three channels are equal.

    Raises:
        ValueError: If ``amount`` is outside [0, 1].
    """
    _check_image(img)
    if not (0.0 <= amount <= 1.0):
        raise ValueError(f"amount must be in [0, 1], got {amount}")
    gray = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    gray3 = cv2.merge([gray, gray, gray])
    if amount == 1.0:
        return gray3
    return cv2.addWeighted(img, 1.0 - amount, gray3, amount, 0.0)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Re-compress as JPEG at ``quality`` and decode (compression artefacts of other pipelines).

    Args:
        img: (H, W, 3) uint8 RGB.
        quality: JPEG quality, integer in [1, 100].

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        ValueError: If ``quality`` is not an integer in [1, 100].
        RuntimeError: If OpenCV fails to encode (should not happen for valid images).
    """
    _check_image(img)
    if int(quality) != quality or not (1 <= quality <= 100):
        raise ValueError(f"quality must be an integer in [1, 100], got {quality}")
    # libjpeg's YCbCr conversion expects BGR order.
    bgr = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"cv2.imencode failed for an image of shape {img.shape}")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def down_up(img: np.ndarray, scale: float) -> np.ndarray:
    """Downscale by ``scale`` (area averaging) then upscale back (bilinear): a lower-resolution scanner.

    Args:
        img: (H, W, 3) uint8 RGB.
        scale: Intermediate size as a fraction of the original, in (0, 1]; 1 returns a copy.

    Returns:
        (H, W, 3) uint8.

    Raises:
        ValueError: If ``scale`` is outside (0, 1].
    """
    _check_image(img)
    if not (0.0 < scale <= 1.0):
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    h, w = img.shape[:2]
    small_w, small_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (small_w, small_h) == (w, h):
        return img.copy()
    small = cv2.resize(np.ascontiguousarray(img), (small_w, small_h), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def unsharp_mask(img: np.ndarray, sigma: float, amount: float) -> np.ndarray:
    """Unsharp masking: ``img + amount * (img - gaussian(img, sigma))``, clipped to uint8.

    Unlike :func:`sharpen` (Study 1's 3x3 PIL filter) this restores edges and chromatin texture at
    the scale of a blurry scanner's point-spread function.

    Args:
        img: (H, W, 3) uint8 RGB.
        sigma: Gaussian sigma in pixels, > 0.
        amount: Strength, >= 0; 0 returns a copy.

    Raises:
        ValueError: If ``sigma`` <= 0 or ``amount`` < 0 (or not finite).
    """
    _check_image(img)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    if not (math.isfinite(amount) and amount >= 0):
        raise ValueError(f"amount must be a finite number >= 0, got {amount}")
    if amount == 0:
        return img.copy()
    src = np.ascontiguousarray(img).astype(np.float32)
    blurred = cv2.GaussianBlur(src, (0, 0), sigma, borderType=_BORDER)
    return _to_u8(src + amount * (src - blurred))


def amplitude_mix(img: np.ndarray, partner: np.ndarray, lam: float) -> np.ndarray:
    """Fourier amplitude mixing (FACT, Xu et al. 2021): this image's phase, a blend of amplitudes.

    The amplitude spectrum carries global "style" (colour balance, contrast, sharpness, grain); the
    phase carries the structure (where the cell and its nucleus are). Mixing amplitudes with an image
    from another lab gives this cell that lab's look.

    Args:
        img: (H, W, 3) uint8 RGB (content).
        partner: (H, W, 3) uint8 RGB of the same shape (style).
        lam: Weight of the partner's amplitude, in [0, 1]; 0 returns a copy of ``img``.

    Returns:
        (H, W, 3) uint8.

    Raises:
        ValueError: On a shape mismatch or ``lam`` outside [0, 1].
    """
    _check_image(img)
    _check_image(partner, "partner")
    if partner.shape != img.shape:
        raise ValueError(f"partner must have the image's shape {img.shape}, got {partner.shape}")
    if not (0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if lam == 0.0:
        return img.copy()
    # Per channel in OpenCV's float32 DFT. Keeping fx's phase with the blended amplitude is scaling fx by
    # blend / |fx| = (1 - lam) + lam * |fy| / |fx|: no angle / exp round trip (half the time of NumPy's).
    out = np.empty(img.shape, np.float32)
    for c in range(img.shape[2]):
        fx = cv2.dft(np.ascontiguousarray(img[..., c], dtype=np.float32), flags=cv2.DFT_COMPLEX_OUTPUT)
        fy = cv2.dft(np.ascontiguousarray(partner[..., c], dtype=np.float32), flags=cv2.DFT_COMPLEX_OUTPUT)
        ax, ay = cv2.magnitude(fx[..., 0], fx[..., 1]), cv2.magnitude(fy[..., 0], fy[..., 1])
        gain = (1.0 - lam) + lam * ay / np.maximum(ax, 1e-12)
        out[..., c] = cv2.idft(fx * gain[..., None], flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE)
    return _to_u8(out)


def lab_jitter(img: np.ndarray, shift: Sequence[float], gain: Sequence[float]) -> np.ndarray:
    """Shift the LAB channel means and scale their spread (another lab's stain intensity and contrast).

    ``out = (lab - mean) * gain + mean + shift`` per LAB channel (8-bit OpenCV LAB).

    Args:
        img: (H, W, 3) uint8 RGB.
        shift: Three mean shifts (L, a, b).
        gain: Three contrast gains (L, a, b), each > 0.

    Returns:
        (H, W, 3) uint8.
    """
    _check_image(img)
    shift = np.asarray(shift, np.float32).reshape(3)
    gain = np.asarray(gain, np.float32).reshape(3)
    if not (np.all(np.isfinite(shift)) and np.all(np.isfinite(gain)) and np.all(gain > 0)):
        raise ValueError(f"shift must be finite and gain finite > 0, got {shift}, {gain}")
    lab = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2LAB).astype(np.float32)
    mean = lab.reshape(-1, 3).mean(0)
    lab = (lab - mean) * gain + mean + shift
    return cv2.cvtColor(_to_u8(lab), cv2.COLOR_LAB2RGB)


def tight_crop(img: np.ndarray, w_frac: float, h_frac: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Keep a box around the centre and fill the rest with the background colour.

    Other labs often crop cells tightly; preprocessing then pads the crop with the slide background.
    This makes the same picture from a loosely cropped training image.

    Args:
        img: (H, W, 3) uint8 RGB.
        w_frac, h_frac: Box width / height as a fraction of the image's, in (0, 1].
        dx, dy: Box centre offset as a fraction of the width / height (clipped to stay inside).

    Returns:
        (H, W, 3) uint8; pixels outside the box are the median of the brightest 30 % (background).
    """
    _check_image(img)
    if not (0.0 < w_frac <= 1.0 and 0.0 < h_frac <= 1.0):
        raise ValueError(f"w_frac, h_frac must be in (0, 1], got {w_frac}, {h_frac}")
    h, w = img.shape[:2]
    bw, bh = max(1, round(w * w_frac)), max(1, round(h * h_frac))
    x0 = int(np.clip(round(w / 2 - bw / 2 + dx * w), 0, w - bw))
    y0 = int(np.clip(round(h / 2 - bh / 2 + dy * h), 0, h - bh))
    out = np.empty_like(img)
    out[:] = np.round(background_colour(img)).astype(np.uint8)
    out[y0:y0 + bh, x0:x0 + bw] = img[y0:y0 + bh, x0:x0 + bw]
    return out


# --------------------------------------------------------------------------------------------------
# Registry: one entry per operation (its parameters, how they are drawn, how it is applied)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One field of :class:`AugmentConfig`, declared by the operation that uses it.

    Attributes:
        name: Field name (the operation's probability is ``<operation>_p``).
        default: Default value.
        doc: One line for the config's documentation.
        kind: ``"prob"`` (in [0, 1]), ``"float"``, ``"bool"``, ``"range"`` (finite ``(low, high)``,
            low <= high), ``"int_range"`` (the same, integers), ``"pair"`` (two finite numbers >= 0) or
            ``"angles"`` (a non-empty tuple of finite numbers).
        check: Extra condition on the normalised value; ``rule`` says it in words for the error.
        rule: What ``check`` requires, e.g. ``"in [0, 1)"``.
    """

    name: str
    default: Any
    doc: str
    kind: str = "float"
    check: Callable[[Any], bool] | None = None
    rule: str = ""


@dataclass(frozen=True)
class Operation:
    """One augmentation: its parameters, how they are drawn and how it is applied.

    :func:`augment` runs the operations in registry order. For each one it asks whether it fires
    (probability ``<name>_p``); if it does it calls ``draw(rng, cfg, h, w)`` and then, by ``stage``:
    ``"pixel"``: ``apply(img, drawn, rng, partner)``; ``"affine"``: ``drawn`` is a 3×3 forward map,
    composed with the other affine maps; ``"field"``: ``drawn`` is an elastic displacement field.
    Affine maps and the field are resampled in one pass before the next pixel operation.

    Attributes:
        name: Operation name; its probability field is ``<name>_p``.
        params: Its fields of :class:`AugmentConfig`, the probability first.
        draw: ``(rng, cfg, h, w) -> drawn parameters``; the only place that draws random numbers
            (besides ``apply`` of operations that need a random field, e.g. noise).
        apply: ``(img, drawn, rng, partner) -> img`` for ``"pixel"`` operations.
        stage: ``"pixel"``, ``"affine"`` or ``"field"``.
        study1: Part of the published Study 1 pipeline (kept by :meth:`AugmentConfig.study1_only`).
        needs_partner: Runs only when :func:`augment` is given a partner image (nothing is drawn
            otherwise).
        when: Extra condition on the config, checked after the operation fired (nothing is drawn when
            it is false).
    """

    name: str
    params: tuple[Param, ...]
    draw: Callable[[np.random.Generator, Any, int, int], Any]
    apply: Callable[[np.ndarray, Any, np.random.Generator, np.ndarray | None], np.ndarray] | None = None
    stage: str = "pixel"
    study1: bool = False
    needs_partner: bool = False
    when: Callable[[Any], bool] | None = None

    @property
    def prob(self) -> str:
        return f"{self.name}_p"


def _p(op: str, default: float, doc: str) -> Param:
    return Param(f"{op}_p", default, doc, "prob")


def _nonneg(v: Any) -> bool:
    return v[0] >= 0.0 if isinstance(v, tuple) else v >= 0.0


def _positive(v: Any) -> bool:
    return v[0] > 0.0 if isinstance(v, tuple) else v > 0.0


def _in_unit(v: tuple[float, float]) -> bool:  # within (0, 1]
    return 0.0 < v[0] and v[1] <= 1.0


def _uniform(name: str) -> Callable[[np.random.Generator, Any, int, int], float]:
    return lambda rng, cfg, h, w: float(rng.uniform(*getattr(cfg, name)))


def _draw_rotation(rng: np.random.Generator, cfg: Any, h: int, w: int) -> np.ndarray:
    angle = float(cfg.rotate_angles_deg[rng.integers(len(cfg.rotate_angles_deg))])
    if cfg.rotate_random_sign and rng.random() < 0.5:
        angle = -angle
    return _rotation_matrix(h, w, angle)


def _draw_crop(rng: np.random.Generator, cfg: Any, h: int, w: int) -> np.ndarray:
    s = rng.uniform(*cfg.crop_scale_range)
    off = (float(rng.random()), float(rng.random()))
    return _crop_matrix(h, w, float(s), off)


def _draw_shift(rng: np.random.Generator, cfg: Any, h: int, w: int) -> np.ndarray:
    dx, dy = rng.uniform(-cfg.shift_max, cfg.shift_max, size=2)
    return _shift_matrix(h, w, float(dx), float(dy))


def _draw_tight_crop(rng: np.random.Generator, cfg: Any, h: int, w: int) -> tuple[float, float, float, float]:
    fw, fh = rng.uniform(*cfg.tight_crop_range, size=2)
    dx, dy = rng.normal(0.0, 0.05, size=2)
    return float(fw), float(fh), float(dx), float(dy)


def _draw_stain(rng: np.random.Generator, cfg: Any, h: int, w: int) -> tuple[float, float, float, float]:
    hue = rng.uniform(-cfg.stain_hue_max_deg, cfg.stain_hue_max_deg)
    sat = rng.uniform(*cfg.stain_saturation_range)
    bri = rng.uniform(*cfg.stain_brightness_range)
    return float(hue), float(sat), float(bri), _log_uniform(rng, *cfg.stain_gamma_range)


def _draw_lab(rng: np.random.Generator, cfg: Any, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    sl, sab = cfg.lab_jitter_shift
    gl, gab = cfg.lab_jitter_log_gain
    shift_ = rng.normal(0.0, [sl, sab, sab])
    return shift_, np.exp(rng.normal(0.0, [gl, gab, gab]))


def _draw_unsharp(rng: np.random.Generator, cfg: Any, h: int, w: int) -> tuple[float, float]:
    sigma = float(rng.uniform(*cfg.unsharp_sigma_range))
    return sigma, float(rng.uniform(*cfg.unsharp_amount_range))


def _nothing(rng: np.random.Generator, cfg: Any, h: int, w: int) -> None:
    return None


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "amp_mix",
        (_p("amp_mix", 0.0, "Probability of Fourier amplitude mixing with a partner image of another class or "
                            "source (needs partners: :func:`augment_batch` with ``labels``; ignored without a "
                            "partner)."),
         Param("amp_mix_range", (0.1, 0.7), "Mixing weight range of the partner's amplitude, in [0, 1].", "range",
               lambda v: 0.0 <= v[0] and v[1] <= 1.0, "within [0, 1]")),
        _uniform("amp_mix_range"), lambda img, lam, rng, partner: amplitude_mix(img, partner, lam),
        needs_partner=True),
    Operation("hflip", (_p("hflip", 0.5, "Horizontal flip probability (Study 1: 0.5)."),),
              _nothing, lambda img, d, rng, partner: hflip(img), study1=True),
    Operation("vflip", (_p("vflip", 0.5, "Vertical flip probability (Study 1: 0.5)."),),
              _nothing, lambda img, d, rng, partner: vflip(img), study1=True),
    Operation(
        "crop",
        (_p("crop", 0.3, "Random crop probability."),
         Param("crop_scale_range", (0.8, 1.0), "Crop side as a fraction of the image side, in (0, 1]; resized back.",
               "range", _in_unit, "within (0, 1]")),
        _draw_crop, stage="affine", study1=True),
    Operation(
        "rotate",
        (_p("rotate", 0.5, "Rotation probability."),
         Param("rotate_angles_deg", (15.0, 30.0, 45.0, 90.0),
               "Angles in degrees to choose from uniformly (Study 1: 15, 30, 45, 90).", "angles"),
         Param("rotate_random_sign", True, "If True the chosen angle is negated with probability 0.5.", "bool")),
        _draw_rotation, stage="affine", study1=True),
    Operation(
        "zoom",
        (_p("zoom", 0.3, "Zoom probability (Study 2)."),
         Param("zoom_range", (0.9, 1.1), "Zoom factor range, > 0 (> 1 enlarges the content); sampled uniformly.",
               "range", _positive, "> 0")),
        lambda rng, cfg, h, w: _rotation_matrix(h, w, 0.0, float(rng.uniform(*cfg.zoom_range))), stage="affine"),
    Operation(
        "scale_jitter",
        (_p("scale_jitter", 0.4, "Scale jitter probability (different microns per pixel)."),
         Param("scale_jitter_range", (0.8, 1.25), "Scale factor range, > 0; sampled log-uniformly.", "range",
               _positive, "> 0")),
        lambda rng, cfg, h, w: _rotation_matrix(h, w, 0.0, _log_uniform(rng, *cfg.scale_jitter_range)),
        stage="affine"),
    Operation(
        "shift",
        (_p("shift", 0.3, "Translation probability (Study 2)."),
         Param("shift_max", 0.10, "Maximum translation as a fraction of width / height, in [0, 1).", "float",
               lambda v: 0.0 <= v < 1.0, "in [0, 1)")),
        _draw_shift, stage="affine"),
    Operation(
        "elastic",
        (_p("elastic", 0.3, "Elastic deformation probability."),
         Param("elastic_alpha", 30.0, "Displacement scale in pixels (Simard et al. 2003), >= 0.", "float", _nonneg,
               ">= 0"),
         Param("elastic_sigma", 5.0, "Smoothing sigma of the displacement field in pixels, > 0.", "float", _positive,
               "> 0")),
        lambda rng, cfg, h, w: _elastic_field(h, w, cfg.elastic_alpha, cfg.elastic_sigma, rng),
        stage="field", study1=True, when=lambda cfg: cfg.elastic_alpha > 0),
    Operation(
        "tight_crop",
        (_p("tight_crop", 0.0, "Probability of a tight crop: a random box around the centre is kept and the rest "
                               "filled with the background colour (what a tightly cropped image looks like after "
                               "preprocessing pads it)."),
         Param("tight_crop_range", (0.55, 0.95), "Box side as a fraction of the image side, in (0, 1].", "range",
               _in_unit, "within (0, 1]")),
        _draw_tight_crop, lambda img, d, rng, partner: tight_crop(img, *d)),
    Operation(
        "stain",
        (_p("stain", 0.5, "Stain / colour jitter probability."),
         Param("stain_hue_max_deg", 8.0, "Hue shift drawn from [-max, max] degrees, in [0, 180].", "float",
               lambda v: 0.0 <= v <= 180.0, "in [0, 180]"),
         Param("stain_saturation_range", (0.8, 1.2), "HSV saturation multiplier range, >= 0.", "range", _nonneg,
               ">= 0"),
         Param("stain_brightness_range", (0.9, 1.1), "Brightness multiplier range, >= 0.", "range", _nonneg, ">= 0"),
         Param("stain_gamma_range", (0.8, 1.25), "Gamma range, > 0; sampled log-uniformly.", "range", _positive,
               "> 0")),
        _draw_stain, lambda img, d, rng, partner: stain_jitter(img, *d)),
    Operation(
        "lab_jitter",
        (_p("lab_jitter", 0.0, "Probability of a random LAB mean shift and contrast gain."),
         Param("lab_jitter_shift", (10.0, 6.0), "Standard deviation of the LAB mean shift, (L, a/b) in 8-bit LAB "
                                                "units.", "pair"),
         Param("lab_jitter_log_gain", (0.25, 0.3), "Standard deviation of the log contrast gain, (L, a/b).",
               "pair")),
        _draw_lab, lambda img, d, rng, partner: lab_jitter(img, *d)),
    Operation(
        "channel_shift",
        (_p("channel_shift", 0.5, "Per-channel colour shift probability."),
         Param("channel_shift_max", 0.10, "Each RGB channel is multiplied by a factor in [1 - max, 1 + max]; in "
                                          "[0, 1).", "float", lambda v: 0.0 <= v < 1.0, "in [0, 1)")),
        lambda rng, cfg, h, w: rng.uniform(1.0 - cfg.channel_shift_max, 1.0 + cfg.channel_shift_max, size=3),
        lambda img, f, rng, partner: channel_shift(img, f), study1=True),
    Operation("grayscale", (_p("grayscale", 0.05, "Probability of converting to 3-channel grayscale."),),
              _nothing, lambda img, d, rng, partner: to_grayscale(img)),
    Operation(
        "contrast",
        (_p("contrast", 0.5, "Contrast change probability."),
         Param("contrast_range", (0.8, 1.2), "Contrast factor range (PIL ``ImageEnhance.Contrast`` semantics), "
                                             ">= 0.", "range", _nonneg, ">= 0")),
        _uniform("contrast_range"), lambda img, f, rng, partner: adjust_contrast(img, f), study1=True),
    Operation(
        "sharpen",
        (_p("sharpen", 0.2, "Sharpening probability."),
         Param("sharpen_factor", 1.5, "PIL ``ImageEnhance.Sharpness`` factor (Study 1: 1.5); 1.0 is identity.",
               "float", _nonneg, ">= 0")),
        lambda rng, cfg, h, w: cfg.sharpen_factor, lambda img, f, rng, partner: sharpen(img, f), study1=True),
    Operation(
        "unsharp",
        (_p("unsharp", 0.0, "Probability of strong unsharp masking. One pbs5 lab scans sharper than the other, and "
                            "blurring alone keeps \"sharp chromatin\" a cue for the sharp lab's classes (a blurred "
                            "image can come from either lab, a sharp one only from one); sharpening the blurry "
                            "lab's cells too makes sharpness uninformative."),
         Param("unsharp_sigma_range", (1.0, 3.0), "Gaussian sigma (pixels of the model input) of the unsharp mask.",
               "range", _positive, "> 0"),
         Param("unsharp_amount_range", (0.5, 2.0), "Amount: ``out = img + amount * (img - blurred)``.", "range",
               _nonneg, ">= 0")),
        _draw_unsharp, lambda img, d, rng, partner: unsharp_mask(img, *d)),
    Operation(
        "blur",
        (_p("blur", 0.35, "Gaussian blur probability."),
         Param("blur_sigma_range", (0.5, 1.5), "Blur sigma in pixels, >= 0.", "range", _nonneg, ">= 0")),
        _uniform("blur_sigma_range"), lambda img, s, rng, partner: gaussian_blur(img, s), study1=True),
    Operation(
        "down_up",
        (_p("down_up", 0.35, "Down-then-up sampling probability."),
         Param("down_up_scale_range", (0.5, 0.9), "Intermediate scale range, in (0, 1].", "range", _in_unit,
               "within (0, 1]")),
        _uniform("down_up_scale_range"), lambda img, s, rng, partner: down_up(img, s)),
    Operation(
        "noise",
        (_p("noise", 0.3, "Gaussian noise probability."),
         Param("noise_sigma_range", (0.01, 0.05), "Noise standard deviation on the [0, 1] intensity scale, >= 0.",
               "range", _nonneg, ">= 0")),
        _uniform("noise_sigma_range"), lambda img, s, rng, partner: gaussian_noise(img, s, rng), study1=True),
    Operation(
        "jpeg",
        (_p("jpeg", 0.3, "JPEG re-compression probability."),
         Param("jpeg_quality_range", (40, 95), "JPEG quality range, integers in [1, 100].", "int_range",
               lambda v: 1 <= v[0] and v[1] <= 100, "within [1, 100]")),
        lambda rng, cfg, h, w: int(rng.integers(cfg.jpeg_quality_range[0], cfg.jpeg_quality_range[1] + 1)),
        lambda img, q, rng, partner: jpeg(img, q)),
)
"""Every augmentation, in the order :func:`augment` applies them. Adding one is one entry here."""

_PARAMS: tuple[Param, ...] = tuple(p for op in OPERATIONS for p in op.params)
_TYPES = {"prob": float, "float": float, "bool": bool, "range": tuple[float, float],
          "int_range": tuple[int, int], "pair": tuple[float, float], "angles": tuple[float, ...]}


def _normalise(p: Param, value: Any) -> Any:
    """Lists (from JSON) become tuples so the config stays hashable and compares equal; shapes checked."""
    if p.kind == "angles":
        return tuple(float(a) for a in value)
    if p.kind == "pair":
        if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
                math.isfinite(float(x)) and x >= 0 for x in value):
            raise ValueError(f"AugmentConfig.{p.name} must be two finite numbers >= 0, got {value!r}")
        return (float(value[0]), float(value[1]))
    if p.kind in ("range", "int_range"):
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"AugmentConfig.{p.name} must be a (low, high) pair, got {value!r}")
        if p.kind == "int_range":
            if any(float(v) != int(v) for v in value):
                raise ValueError(f"AugmentConfig.{p.name} must hold integers, got {value!r}")
            value = (int(value[0]), int(value[1]))
        else:
            value = (float(value[0]), float(value[1]))
        if not all(math.isfinite(v) for v in value) or value[0] > value[1]:
            raise ValueError(f"AugmentConfig.{p.name} must be finite with low <= high, got {value!r}")
        return value
    return value


class _ConfigMethods:
    """Behaviour of :class:`AugmentConfig`; its fields come from :data:`OPERATIONS`."""

    def __post_init__(self) -> None:
        for p in _PARAMS:
            object.__setattr__(self, p.name, _normalise(p, getattr(self, p.name)))
        for p in _PARAMS:
            v = getattr(self, p.name)
            if p.kind == "prob" and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"AugmentConfig.{p.name} must be a probability in [0, 1], got {v!r}")
            if p.kind == "angles" and not (len(v) > 0 and all(math.isfinite(a) for a in v)):
                raise ValueError(f"AugmentConfig: {p.name} must hold at least one finite angle, got {v!r}")
            if p.check is not None and not p.check(v):  # NaN fails every check
                raise ValueError(f"AugmentConfig: {p.name} must be {p.rule}, got {v!r}")

    @classmethod
    def study1_only(cls) -> "AugmentConfig":
        """Config with only the Study 1 operations enabled (Study 2 and robustness ops at p = 0)."""
        return cls(**{op.prob: 0.0 for op in OPERATIONS if not op.study1})

    @classmethod
    def cross_lab(cls) -> "AugmentConfig":
        """Every operation of the full config, plus the cross-lab ones at strength.

        For tasks whose classes were imaged in different labs (pbs5): the lab's look (colour,
        sharpness both ways, resolution, noise, compression, crop tightness) is randomised so strongly, and
        swapped between classes by amplitude mixing, that it no longer predicts the class.

        `bench/style_leak.py` measures how well global style still tells the pbs5 labs apart after
        this recipe and after a lab-symmetric variant (every image mixed, weight uniform on [0, 1],
        partner from the other lab via :func:`augment_batch` ``label_groups``). The variant removes
        more of the style leak, but a model trained with it (same seed) scored 0.0-1.4 points lower
        on every simulated lab shift and the same on BCCD within two images
        (`bench/results/step_crosslab_compare.md`), so this preset keeps the milder mixing.
        """
        return cls(amp_mix_p=0.7, lab_jitter_p=1.0, tight_crop_p=0.4, unsharp_p=0.5, down_up_p=0.8,
                   down_up_scale_range=(0.2, 1.0), blur_p=0.6, blur_sigma_range=(0.5, 3.0), noise_p=0.5,
                   noise_sigma_range=(0.008, 0.04), jpeg_p=0.5, jpeg_quality_range=(30, 95), grayscale_p=0.2)

    @classmethod
    def none(cls) -> "AugmentConfig":
        """Config with every operation disabled: :func:`augment` returns an unchanged copy."""
        return cls(**{op.prob: 0.0 for op in OPERATIONS})

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists once dumped)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AugmentConfig":
        """Inverse of :meth:`to_dict`. Missing keys take their defaults.

        Raises:
            ValueError: On keys that are not fields, listing the valid ones.
        """
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown AugmentConfig keys {unknown}; valid keys are {sorted(valid)}")
        return cls(**data)


def _config_doc() -> str:
    lines = ["Probabilities and parameters of every augmentation operation (fields declared in :data:`OPERATIONS`).",
             "",
             "Each ``*_p`` field is the probability in [0, 1] that the operation is applied to an image. Range",
             "fields are ``(low, high)`` tuples (lists are accepted and converted, so JSON round-trips). The",
             "parameter defaults are the published Study 1 / Study 2 values; probabilities other than the flips",
             "(0.5, as published) are ours, chosen so that a typical image gets about four operations. The",
             "cross-lab operations are off by default and on in :meth:`cross_lab`.",
             "", "Attributes:"]
    lines += [f"    {p.name}: {p.doc}" for p in _PARAMS]
    return "\n".join(lines)


AugmentConfig = make_dataclass(
    "AugmentConfig", [(p.name, _TYPES[p.kind], field(default=p.default)) for p in _PARAMS],
    bases=(_ConfigMethods,), frozen=True, namespace={"__module__": __name__, "__doc__": _config_doc()})


# --------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------


def augment(
    img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig | None = None,
    partner: np.ndarray | None = None,
) -> np.ndarray:
    """Apply each enabled operation with its probability (training split only).

    Order: the registry's (:data:`OPERATIONS`): amplitude mixing with ``partner`` (if given); flips
    (exact); one resampling for crop, rotation, zoom, scale jitter, shift and elastic; tight crop; stain
    jitter, LAB jitter, channel shift, grayscale, contrast; sharpen, unsharp mask, blur; down-up; noise;
    JPEG last (it is what an image file goes through at the end of a real pipeline).

    Args:
        img: (H, W, 3) uint8 RGB, any H, W >= 1.
        rng: Random generator; the same generator state gives the same output.
        cfg: Operations and parameters; default :class:`AugmentConfig` ().
        partner: Optional image of the same shape (another class or lab) for amplitude mixing.

    Returns:
        A new (H, W, 3) uint8 RGB array (never the input object).

    Raises:
        TypeError / ValueError: If ``img`` is not (H, W, 3) uint8.
    """
    _check_image(img)
    cfg = AugmentConfig() if cfg is None else cfg
    h, w = img.shape[:2]
    out = img
    m, field_, geometry = np.eye(3), None, False
    for op in OPERATIONS:
        if op.needs_partner and partner is None:
            continue
        if not _fires(rng, getattr(cfg, op.prob)) or (op.when is not None and not op.when(cfg)):
            continue
        drawn = op.draw(rng, cfg, h, w)
        if op.stage == "affine":
            m, geometry = drawn @ m, True
            continue
        if op.stage == "field":
            field_, geometry = drawn, True
            continue
        if geometry:
            out, m, field_, geometry = _resample(out, m, field_), np.eye(3), None, False
        out = op.apply(out, drawn, rng, partner)
    if geometry:
        out = _resample(out, m, field_)
    return img.copy() if out is img else out


def augment_batch(
    images: np.ndarray, seed: int, cfg: AugmentConfig | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    pool: np.ndarray | None = None, pool_labels: Sequence[int] | np.ndarray | None = None,
    label_groups: Sequence[int] | np.ndarray | None = None,
    workers: int = 1,
) -> np.ndarray:
    """Augment a batch deterministically.

    Image ``i`` uses its own child stream of ``np.random.SeedSequence(seed)``, so its result depends
    only on ``(seed, i, image, cfg)`` (and the partner pool), not on the batch size or ``workers``.

    Args:
        images: (N, H, W, 3) uint8 RGB, N >= 0.
        seed: Non-negative integer seed.
        cfg: Operations and parameters; default :class:`AugmentConfig` ().
        labels: Class of each image; with ``cfg.amp_mix_p > 0`` each image draws an amplitude-mixing
            partner of another class from ``pool`` (default: the batch itself).
        pool, pool_labels: Partner images (M, H, W, 3) and their classes.
        label_groups: Source (lab) of each class, indexed by class: the partner is drawn from another
            source instead of another class. A partner of "another class" is often from the same lab
            (pbs5: 2 of 4 for a Barcelona class), so most images would keep their own lab's look.
        workers: threads sharing the images (OpenCV and NumPy release the GIL in the heavy operations).

    Returns:
        (N, H, W, 3) uint8, a new array.

    Raises:
        TypeError / ValueError: If ``images`` is not (N, H, W, 3) uint8 or ``seed`` is negative.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError(
            "images must be a numpy uint8 array (N, H, W, 3), got "
            f"{type(images).__name__} {getattr(images, 'dtype', '')}"
        )
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {images.shape}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    cfg = AugmentConfig() if cfg is None else cfg
    out = np.empty_like(images)
    children = np.random.SeedSequence(int(seed)).spawn(len(images))
    mixing = labels is not None and cfg.amp_mix_p > 0
    if mixing:
        labels = np.asarray(labels)
        if pool is None:
            pool, pool_labels = images, labels
        pool_labels = np.asarray(pool_labels)
        if len(labels) != len(images) or len(pool_labels) != len(pool):
            raise ValueError("labels / pool_labels must have one entry per image")
        if label_groups is not None:
            label_groups = np.asarray(label_groups)
            n_cls = int(max(labels.max(initial=-1), pool_labels.max(initial=-1))) + 1
            if label_groups.ndim != 1 or len(label_groups) < n_cls:
                raise ValueError(f"label_groups needs one source per class ({n_cls}), got {label_groups.shape}")
            labels, pool_labels = label_groups[labels], label_groups[pool_labels]
    def one(i):
        rng = np.random.default_rng(children[i])
        partner = None
        if mixing:
            others = np.flatnonzero(pool_labels != labels[i])
            if len(others):
                partner = pool[others[rng.integers(len(others))]]
        out[i] = augment(images[i], rng, cfg, partner=partner)

    if workers > 1 and len(images) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(one, range(len(images))))
    else:
        for i in range(len(images)):
            one(i)
    return out


def preview_grid(
    img: np.ndarray,
    cfg: AugmentConfig | None = None,
    n: int = 16,
    seed: int = 0,
    cols: int = 4,
    gap: int = 2,
) -> np.ndarray:
    """Grid of ``n`` tiles: the original first, then ``n - 1`` augmented versions (row-major).

    Args:
        img: (H, W, 3) uint8 RGB.
        cfg: Operations and parameters; default :class:`AugmentConfig` ().
        n: Number of tiles, >= 1.
        seed: Seed for :func:`augment_batch`.
        cols: Tiles per row, >= 1.
        gap: White pixels between tiles, >= 0.

    Returns:
        (rows*H + (rows-1)*gap, c*W + (c-1)*gap, 3) uint8 RGB with ``c = min(cols, n)`` and
        ``rows = ceil(n / c)``; unused cells are white.

    Raises:
        ValueError: If ``n``, ``cols`` or ``gap`` is out of range, or ``img`` is invalid.
    """
    _check_image(img)
    if n < 1 or cols < 1 or gap < 0:
        raise ValueError(f"need n >= 1, cols >= 1, gap >= 0; got n={n}, cols={cols}, gap={gap}")
    h, w = img.shape[:2]
    c = min(cols, n)
    rows = -(-n // c)
    tiles = np.concatenate(
        [img[None], augment_batch(np.repeat(img[None], n - 1, axis=0), seed, cfg)]
    )
    grid = np.full((rows * h + (rows - 1) * gap, c * w + (c - 1) * gap, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, q = divmod(k, c)
        y, x = r * (h + gap), q * (w + gap)
        grid[y : y + h, x : x + w] = tile
    return grid
