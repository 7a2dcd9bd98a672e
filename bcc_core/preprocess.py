"""Turn any RGB cell image into the model's input: cell-centred crop, stain normalisation, resize.

One function, `preprocess`, serves training, evaluation, the CLI and the app; its parameters are a
`PreprocessConfig` stored in the model card, so a model is always fed the way it was trained.

Why cell-centred: the pbs5 classes come from two labs imaging at different magnifications, and other
labs crop tighter or looser again. Cropping to a box proportional to the stained nucleus removes the
magnification cue; per-image stain normalisation removes most of the stain/background colour cue.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np

MODES = ("cell", "letterbox")


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a model input.

    Attributes:
        size: side of the square model input in pixels.
        mode: "cell" crops a square centred on the stained cell, sized `cell_margin` times the
            nucleus extent (scale-normalised); "letterbox" resizes the whole image preserving aspect
            ratio and pads (Study 1's contract).
        cell_margin: crop side as a multiple of the stained region's larger extent.
        min_crop_fraction: the crop side is at least this fraction of the image's shorter side.
        stain_norm: "none" | "reinhard" (per-image LAB mean/std mapped to a fixed reference).
        clahe: apply CLAHE on the L channel (Study 1's contrast enhancement).
        clahe_clip: CLAHE clip limit.
        background: "keep" | "flatten" (pixels far from the cell are blended to neutral grey).
        locate: "normalised" finds the cell on a Reinhard-normalised copy of the image, so a stain
            that makes red cells or background bluish (another lab's) does not enlarge the crop to
            the whole field; "raw" finds it on the image as given (models trained before this option;
            cards without the field load as "raw").
    """

    size: int = 224
    mode: str = "cell"
    cell_margin: float = 1.6
    min_crop_fraction: float = 0.25
    stain_norm: str = "reinhard"
    clahe: bool = False
    clahe_clip: float = 2.0
    background: str = "keep"
    locate: str = "normalised"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.stain_norm not in ("none", "reinhard"):
            raise ValueError(f"stain_norm must be 'none' or 'reinhard', got {self.stain_norm!r}")
        if self.background not in ("keep", "flatten"):
            raise ValueError(f"background must be 'keep' or 'flatten', got {self.background!r}")
        if self.locate not in ("normalised", "raw"):
            raise ValueError(f"locate must be 'normalised' or 'raw', got {self.locate!r}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32, got {self.size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        # Cards written before `locate` existed were trained on crops found on the raw image.
        kw.setdefault("locate", "raw")
        return cls(**kw)


# Reference LAB statistics (OpenCV 8-bit LAB) of a typical well-stained cell crop; the target of
# Reinhard normalisation. Chosen as the median over both pbs5 labs so neither lab is "home".
_REF_MEAN = np.array([185.0, 140.0, 122.0], np.float32)
_REF_STD = np.array([40.0, 10.0, 10.0], np.float32)
_LEVELS = np.arange(256, dtype=np.float64)[:, None]


NUCLEUS_FLOOR = 45.0
"""Lowest nucleus-score threshold (blue minus green), whatever Otsu says: keeps red cells and background
out when an image has no nucleus."""
WORK_SIDE = 128
"""Longer side (px) of the copy the nucleus is searched on."""


def nucleus_score(img: np.ndarray) -> np.ndarray:
    """Nucleus-likeness per pixel: blue minus green, high for haematoxylin/azure-stained chromatin.

    The one nucleus score of the project: the model crops and the quality gate both use it
    (through :func:`find_nuclei`).

    Args:
        img: (H, W, 3) uint8 RGB.

    Returns:
        (H, W) float32, roughly in [-255, 255]; nuclei are high, red cells and background low.
    """
    f = img.astype(np.float32)
    return f[..., 2] - f[..., 1]


stain_score = nucleus_score  # the earlier name


@dataclass(frozen=True)
class Nuclei:
    """Where the stained nuclei are, on a small working copy of the image (:func:`find_nuclei`).

    Attributes:
        scale: working-copy pixels per original pixel.
        score: (h, w) float32 nucleus score of the working copy, Gaussian-smoothed (σ = 1 px).
        threshold: score above which a pixel is nucleus (Otsu, at least `NUCLEUS_FLOOR` or the given floor).
        mask: (h, w) uint8 0/1 nucleus mask after a 2×2 opening (specks removed).
    """

    scale: float
    score: np.ndarray
    threshold: float
    mask: np.ndarray


def find_nuclei(img: np.ndarray, normalise: bool = True, floor: float = NUCLEUS_FLOOR) -> Nuclei:
    """The one nucleus finder: score, threshold and mask on a copy whose longer side is `WORK_SIDE`.

    Args:
        img: (H, W, 3) uint8 RGB.
        normalise: search a Reinhard-normalised copy (see `PreprocessConfig.locate`); the quality gate
            judges the image as given (False).
        floor: lowest threshold on the score (blue minus green).

    Returns:
        :class:`Nuclei`.
    """
    h, w = img.shape[:2]
    scale = WORK_SIDE / max(h, w)
    small = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    if normalise:
        small = reinhard(small)
    score = cv2.GaussianBlur(nucleus_score(small), (0, 0), 1.0)
    s8 = np.clip(score + 128, 0, 255).astype(np.uint8)
    thr, _ = cv2.threshold(s8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Otsu on an image with no nucleus picks noise; a floor keeps red cells and background out.
    thr = max(thr, 128 + floor)
    mask = (s8 > thr).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    return Nuclei(scale, score, float(thr - 128), mask)


def locate_cell(img: np.ndarray, normalise: bool = True) -> tuple[float, float, float]:
    """Find the stained cell nearest the image centre (on :func:`find_nuclei`'s mask).

    Args:
        img: (H, W, 3) uint8 RGB.
        normalise: search a Reinhard-normalised copy (see `PreprocessConfig.locate`). The nucleus
            threshold is on blue minus green; under another lab's stain red cells and background can
            pass it on the raw image (measured: a Munich-like stain on Barcelona cells made the found
            extent 3.4x the nucleus, median), while normalising first removes the global colour cast.

    Returns:
        (cx, cy, extent): centre in pixels and the larger side of the stained region's bounding box.
        Falls back to the image centre and shorter side when nothing stained is found.
    """
    h, w = img.shape[:2]
    nuc = find_nuclei(img, normalise)
    scale = nuc.scale
    # Lobes of a segmented neutrophil or granules of a basophil belong to one cell: close gaps.
    mask = cv2.morphologyEx(nuc.mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    n, labels, stats, cents = cv2.connectedComponentsWithStats(mask, connectivity=8)
    sh, sw = mask.shape[:2]
    if n <= 1:
        return w / 2.0, h / 2.0, float(min(h, w))
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float32)
    d = np.hypot(cents[1:, 0] - sw / 2.0, cents[1:, 1] - sh / 2.0) / (0.5 * np.hypot(sw, sh))
    # Prefer big blobs near the centre: single-cell crops are centred on their cell.
    best = int(np.argmax(areas * (1.0 - 0.8 * np.clip(d, 0, 1)) ** 2))
    if areas[best] < 0.002 * sh * sw:
        return w / 2.0, h / 2.0, float(min(h, w))
    x, y, bw, bh = stats[1 + best, :4]
    # Merge nearby fragments of the same cell (e.g. lobes not joined by closing).
    keep = np.zeros(n, bool)
    keep[1 + best] = True
    cx0, cy0 = x + bw / 2.0, y + bh / 2.0
    reach = 0.8 * max(bw, bh)
    for i in range(1, n):
        if i == 1 + best or stats[i, cv2.CC_STAT_AREA] < 0.1 * areas[best]:
            continue
        if np.hypot(cents[i, 0] - cx0, cents[i, 1] - cy0) < reach:
            keep[i] = True
    ys, xs = np.nonzero(keep[labels])
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cx, cy = (x0 + x1) / 2.0 / scale, (y0 + y1) / 2.0 / scale
    extent = max(x1 - x0, y1 - y0) / scale
    return float(cx), float(cy), float(extent)


def find_cell(img: np.ndarray, cfg: PreprocessConfig) -> tuple[float, float, float]:
    """`locate_cell` with the search the model card configures (`PreprocessConfig.locate`)."""
    return locate_cell(img, cfg.locate == "normalised")


def background_colour(img: np.ndarray) -> np.ndarray:
    """The slide background's RGB colour: the median of the brightest 30 % of pixels, (3,) float."""
    grey = img.mean(axis=2)
    return np.median(img[grey >= np.percentile(grey, 70)], axis=0)


def crop_cell(img: np.ndarray, cfg: PreprocessConfig, cell: tuple[float, float, float] | None = None) -> np.ndarray:
    """Square crop centred on the cell, side proportional to its stained extent (background-padded).

    `cell` is `find_cell(img, cfg)` when the caller has already measured it (the quality gate needs
    it too).
    """
    h, w = img.shape[:2]
    cx, cy, extent = cell if cell is not None else find_cell(img, cfg)
    side = max(cfg.cell_margin * extent, cfg.min_crop_fraction * min(h, w), 16.0)
    half = side / 2.0
    x0, y0 = int(round(cx - half)), int(round(cy - half))
    x1, y1 = int(round(cx + half)), int(round(cy + half))
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        # Tight crops from other labs need padding; a mirror would invent cells, so pad with the
        # slide background colour.
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT,
                                 value=[float(v) for v in background_colour(img)])
        x0, x1, y0, y1 = x0 + pad, x1 + pad, y0 + pad, y1 + pad
    return img[y0:y1, x0:x1]


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """Resize preserving aspect ratio and pad with the border colour to (size, size)."""
    h, w = img.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    r = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    top, left = (size - nh) // 2, (size - nw) // 2
    return cv2.copyMakeBorder(r, top, size - nh - top, left, size - nw - left, cv2.BORDER_REPLICATE)


def reinhard(img: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None,
             max_gain: float = 4.0) -> np.ndarray:
    """Map the image's LAB mean/std onto a target (Reinhard et al. 2001).

    Args:
        img: (H, W, 3) uint8 RGB.
        mean, std: target LAB (OpenCV 8-bit) statistics; default the fixed reference the models use.
        max_gain: per-channel std gain is clipped to [1/max_gain, max_gain] so a nearly uniform image
            is not blown up into noise.
    """
    mean_t = _REF_MEAN if mean is None else np.asarray(mean, np.float64)
    std_t = _REF_STD if std is None else np.asarray(std, np.float64)
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
    mu, sd = cv2.meanStdDev(lab)
    mu, sd = mu.ravel(), sd.ravel() + 1e-3
    gain = np.clip(std_t / sd, 1.0 / max_gain, max_gain)
    # LAB is 8-bit, so the per-channel affine map is a 256-entry lookup table: one pass over the
    # pixels instead of float32 arithmetic on a copy (4.2 -> 0.8 ms on a 224 px image, measured).
    lut = np.clip((_LEVELS - mu) * gain + mean_t, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.LUT(lab, lut.reshape(256, 1, 3)), cv2.COLOR_LAB2RGB)


def apply_clahe(img: np.ndarray, clip: float) -> np.ndarray:
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
    clahe = cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8))
    lab[..., 0] = clahe.apply(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def flatten_background(img: np.ndarray) -> np.ndarray:
    """Blend pixels outside a central disc towards neutral grey (soft edge)."""
    n = img.shape[0]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    r = np.hypot(xx - n / 2, yy - n / 2) / (n / 2)
    alpha = np.clip((r - 0.75) / 0.2, 0, 1)[..., None]
    return (img * (1 - alpha) + 200.0 * alpha).astype(np.uint8)


def preprocess(img: np.ndarray, cfg: PreprocessConfig = PreprocessConfig(),
               cell: tuple[float, float, float] | None = None) -> np.ndarray:
    """Make the model input from one image.

    Args:
        img: (H, W, 3) uint8 RGB, any size >= 8 px.
        cfg: the model card's preprocessing.
        cell: `find_cell(img, cfg)` if already computed (cell mode only; saves a second search).

    Returns:
        (cfg.size, cfg.size, 3) uint8 RGB. The model itself scales [0, 255] as its backbone expects.
    """
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")
    if cfg.mode == "cell":
        crop = crop_cell(img, cfg, cell)
        interp = cv2.INTER_AREA if crop.shape[0] > cfg.size else cv2.INTER_LINEAR
        out = cv2.resize(crop, (cfg.size, cfg.size), interpolation=interp)
    else:
        out = letterbox(img, cfg.size)
    if cfg.stain_norm == "reinhard":
        out = reinhard(out)
    if cfg.clahe:
        out = apply_clahe(out, cfg.clahe_clip)
    if cfg.background == "flatten":
        out = flatten_background(out)
    return out


def preprocess_batch(images, cfg: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Preprocess a sequence of images into (N, size, size, 3) uint8."""
    out = np.empty((len(images), cfg.size, cfg.size, 3), np.uint8)
    for i, im in enumerate(images):
        out[i] = preprocess(im, cfg)
    return out


MAX_VIEWS = 8  # an image and its 7 flips / 90° rotations (the dihedral group of the square)


def clamp_views(views) -> int:
    """A views count (the image itself included) within 1..MAX_VIEWS."""
    return max(1, min(int(views), MAX_VIEWS))


def dihedral_views(x: np.ndarray, n: int) -> list[np.ndarray]:
    """Up to 7 non-identity flips / 90° rotations of a batch (N, S, S, 3): the cell's class does not
    depend on orientation, and these views change no pixel statistics (stain, blur) of the lab."""
    ops = [lambda a: a[:, :, ::-1], lambda a: a[:, ::-1], lambda a: np.rot90(a, 1, (1, 2)),
           lambda a: np.rot90(a, 3, (1, 2)), lambda a: np.rot90(a, 2, (1, 2)),
           lambda a: np.swapaxes(a, 1, 2), lambda a: np.rot90(a, 2, (1, 2)).swapaxes(1, 2)]
    return [np.ascontiguousarray(op(x)) for op in ops[: max(0, min(n, len(ops)))]]
