"""Image input: bytes, paths, uploads, folders and zip archives -> RGB uint8 arrays.

Everything that enters the core as an image goes through :func:`read_image`, so that EXIF
orientation, alpha, 16-bit and palette images are handled once and the same way everywhere.
Batch inputs (files, folders, archives, uploads) are expanded by :func:`iter_image_sources` /
:func:`sources_from_uploads` into lazy :class:`ImageSource` objects; a source that cannot be read
still exists and raises :class:`ImageReadError` on ``load()``, so batch work can emit an error row
with the reason instead of crashing or silently dropping the input.

Hostile or unlucky input is bounded before it costs anything: :class:`DecodeLimits` (formats allowed by
content, pixels and decode memory read from the header, file size), :class:`ArchiveLimits` (member count,
total and per-member size, compression ratio, from the zip directory) and, for the app only,
:class:`FolderPolicy` (server paths inside administrator-allowed roots, ``BCC_IMAGE_ROOTS``).
"""

from __future__ import annotations

import functools
import hashlib
import io as _io
import logging
import os
import struct
import threading
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "MIN_SIDE",
    "MAX_PIXELS",
    "MAX_MEMBER_BYTES",
    "DecodeLimits",
    "ArchiveLimits",
    "FolderPolicy",
    "ImageReadError",
    "ImageSource",
    "read_image",
    "read_image_bytes",
    "content_hash",
    "encode_png",
    "iter_image_sources",
    "sources_from_uploads",
    "server_folder_policy",
    "is_image_name",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
"""Accepted file name extensions (compared case-insensitively)."""

IMAGE_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")
"""Pillow decoders allowed to run, whatever the file name says: the format is recognised from the content
and no other plugin (EPS/Ghostscript, PDF, PSD, ICO, ...) is ever tried."""

MIN_SIDE = 8
"""Smallest accepted width and height in pixels."""


@dataclass(frozen=True)
class DecodeLimits:
    """Limits on one image, checked from the file header before any pixel is decoded.

    Attributes:
        max_pixels: Largest width * height (a decompression bomb declares a huge size in a tiny file).
        max_file_bytes: Largest encoded file read into memory (from a path, an upload or an archive member).
        max_decode_bytes: Largest estimated peak memory of decoding one image (raw pixels in the file's
            mode, the RGB result and the conversions in between); 16-bit and float images cost more per
            pixel than 8-bit ones, so this bound is reached before ``max_pixels`` for them.
        formats: Pillow format names allowed to decode (see :data:`IMAGE_FORMATS`).
    """

    max_pixels: int = 40_000_000
    max_file_bytes: int = 256 * 2**20
    max_decode_bytes: int = 512 * 2**20
    formats: tuple[str, ...] = IMAGE_FORMATS


@dataclass(frozen=True)
class ArchiveLimits:
    """Limits on one zip archive, checked from its central directory before any member is extracted.

    Attributes:
        max_members: Most entries (files and folders) an archive may list; above it the whole archive is
            one error row (a million-member archive would otherwise be a million rows held in memory).
        max_total_bytes: Largest sum of the members' declared uncompressed sizes; above it the whole
            archive is one error row.
        max_member_bytes: Largest uncompressed size of one member (it is read into memory); a bigger
            member is an error row. Extraction also stops at this size if the header lies.
        max_ratio: Largest uncompressed / compressed size of a member larger than ``ratio_min_bytes``
            (image formats barely compress; a ratio of 1000 is a zip bomb). Such a member is an error row.
        ratio_min_bytes: Members up to this uncompressed size are never refused for their ratio.
    """

    max_members: int = 10_000
    max_total_bytes: int = 2 * 2**30
    max_member_bytes: int = 256 * 2**20
    max_ratio: float = 100.0
    ratio_min_bytes: int = 2**20


DEFAULT_DECODE = DecodeLimits()
DEFAULT_ARCHIVE = ArchiveLimits()

MAX_PIXELS = DEFAULT_DECODE.max_pixels
"""Largest accepted width * height; anything bigger is treated as a decompression bomb."""

MAX_MEMBER_BYTES = DEFAULT_ARCHIVE.max_member_bytes
"""Largest uncompressed archive member read into memory (zip bombs are refused before extraction)."""

_ACCEPTED = (
    f"accepted: PNG, JPEG, TIFF, BMP or WebP images ({', '.join(IMAGE_EXTENSIONS)}), "
    f"at least {MIN_SIDE}x{MIN_SIDE} and at most {MAX_PIXELS // 1_000_000} megapixels"
)


class ImageReadError(ValueError):
    """An input could not be turned into an RGB image; the message says why and what is accepted."""


def is_image_name(name: str) -> bool:
    """Return True if ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- bytes / hashing


def read_image_bytes(path: str | os.PathLike, limits: DecodeLimits = DEFAULT_DECODE) -> bytes:
    """Read a file's raw bytes.

    Args:
        path: File path.
        limits: ``max_file_bytes`` bounds what is read into memory.

    Returns:
        The file content.

    Raises:
        ImageReadError: If the path does not exist, is a directory, is larger than
            ``limits.max_file_bytes`` or cannot be read.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: file does not exist; {_ACCEPTED}")
    if p.is_dir():
        raise ImageReadError(f"{p}: is a folder, not an image file; {_ACCEPTED}")
    try:
        with open(p, "rb") as f:
            # Read one byte past the limit instead of trusting stat(): /proc files and FIFOs report 0.
            data = f.read(limits.max_file_bytes + 1)
    except OSError as exc:
        raise ImageReadError(f"{p}: cannot read file ({exc}); {_ACCEPTED}") from exc
    if len(data) > limits.max_file_bytes:
        raise ImageReadError(f"{p}: file is larger than {_mib(limits.max_file_bytes)}, the limit for one image; "
                             f"{_ACCEPTED}")
    return data


def content_hash(data: bytes) -> str:
    """SHA-256 hex digest (64 lowercase hex characters) of ``data``."""
    return hashlib.sha256(data).hexdigest()


def encode_png(img: np.ndarray) -> bytes:
    """Encode an RGB image as PNG bytes (lossless).

    Args:
        img: ``(H, W, 3)`` uint8 RGB array, values 0..255.

    Returns:
        PNG file content.

    Raises:
        ValueError: If ``img`` is not an ``(H, W, 3)`` uint8 array.
    """
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(
            f"encode_png expects an (H, W, 3) uint8 RGB array, got shape {arr.shape} dtype {arr.dtype}"
        )
    buf = _io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- decoding


def _source_bytes(src: Any, limits: DecodeLimits) -> tuple[bytes, str]:
    """Return (bytes, display name) for a path, bytes or binary file-like."""
    if isinstance(src, (str, os.PathLike)):
        return read_image_bytes(src, limits), str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), "<bytes>"
    else:
        name = str(getattr(src, "name", "<upload>"))
        if hasattr(src, "getvalue"):
            data = src.getvalue()
        elif hasattr(src, "read"):
            # Uploaded files may have been read already; rewind so we see the whole content.
            if hasattr(src, "seek"):
                try:
                    src.seek(0)
                except (OSError, ValueError):
                    pass
            data = src.read()
        else:
            raise ImageReadError(
                f"unsupported input of type {type(src).__name__}; pass a file path (str/Path), bytes, "
                "or a binary file-like object with .read()/.getvalue()"
            )
        if isinstance(data, str):
            raise ImageReadError(f"{name}: file was opened in text mode; open it in binary mode ('rb')")
        data = bytes(data)
    if len(data) > limits.max_file_bytes:
        raise ImageReadError(f"{name}: file is larger than {_mib(limits.max_file_bytes)}, the limit for one image; "
                             f"{_ACCEPTED}")
    return data, name


# 16-bit samples -> 8 bit by the bit depth (round(v / 257)): the same stored value gives the same grey in
# every image. A table lookup costs one byte per pixel, no float or int64 temporaries.
_LUT16 = None


def _lut16() -> np.ndarray:
    global _LUT16
    if _LUT16 is None:
        _LUT16 = np.rint(np.arange(65536, dtype=np.float64) / 257.0).astype(np.uint8)
    return _LUT16


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a single-channel integer or float array to uint8.

    Integer data are scaled by their container's bit depth, never by the image's own maximum: 8-bit data
    stay as they are, 16-bit (and 32-bit integer, read as 16-bit data with values above 65535 clipped)
    become ``round(v / 257)``. Float data in [0, 1] are multiplied by 255, other float ranges are min-max
    stretched (there is no natural white point for them).
    """
    if np.issubdtype(arr.dtype, np.floating):
        a = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            a *= 255.0
        elif hi > lo:
            a = (a - lo) * (255.0 / (hi - lo))
        else:
            a = np.zeros_like(a)
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.itemsize == 1:
        return np.clip(arr, 0, 255).astype(np.uint8)
    if arr.dtype != np.uint16:
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
    return _lut16()[arr]


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any common mode to an ``(H, W, 3)`` uint8 RGB array."""
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16") or mode.startswith("I;32"):
        arr = np.asarray(img)
        if mode.startswith("I;16") and arr.dtype != np.uint16:
            arr = arr.astype(np.uint16)  # big-endian / signed 16-bit containers
        gray = _to_uint8(arr)
        return np.repeat(gray[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    ) or (mode in ("L", "RGB") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        # Transparent pixels become white, like a slide background, not black.
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode == "RGB":
        return np.asarray(img)
    return np.asarray(img.convert("RGB"))


# Bytes per pixel of the decoded file in each Pillow mode (anything else: 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
               "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}


def _decode_bytes_estimate(mode: str, pixels: int) -> int:
    """Peak memory of decoding one image: the raw pixels, an RGBA/RGB conversion, the RGB result and its
    EXIF-rotated copy; float and 32-bit integer images add a float32 / uint16 working copy."""
    raw = 2 if mode.startswith("I;16") else _MODE_BYTES.get(mode, 4)
    extra = 4 if mode in ("F", "I") or mode.startswith("I;") else 0
    return pixels * (raw + 4 + 3 + 3 + extra)


def read_image(src: Any, limits: DecodeLimits = DEFAULT_DECODE) -> np.ndarray:
    """Decode an image to an RGB array.

    The format is recognised from the content and must be one of ``limits.formats`` (PNG, JPEG, TIFF,
    BMP, WebP); the size, mode and frame count are read from the header and checked before any pixel is
    decoded. Handles EXIF orientation, modes 1/L/P/LA/PA/RGBA (alpha composited on white), CMYK/YCbCr,
    16-bit (``round(v / 257)``, by bit depth) and float greyscale (see ``_to_uint8``). Multi-frame files
    (multi-page TIFF, animated PNG/WebP/GIF-like) are refused: using one frame would silently drop the
    others, and which page holds the cell is not knowable here.

    Args:
        src: A file path (``str`` / ``Path``), ``bytes``, or a binary file-like object with
            ``.getvalue()`` or ``.read()`` (e.g. a Streamlit ``UploadedFile``).
        limits: Pixel, file-size, decode-memory and format limits (:class:`DecodeLimits`).

    Returns:
        ``(H, W, 3)`` uint8 RGB array, values 0..255, with H, W >= 8.

    Raises:
        ImageReadError: Empty input, a format outside the allow-list, data that is not a decodable image,
            a truncated file, a multi-frame file, an image smaller than 8x8 or over a limit.
    """
    data, name = _source_bytes(src, limits)
    if not data:
        raise ImageReadError(f"{name}: input is empty (0 bytes); {_ACCEPTED}")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb threshold warns; we apply our own explicit limits below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(_io.BytesIO(data), formats=list(limits.formats)) as im:
                fmt = im.format or "?"
                if fmt not in limits.formats:  # e.g. a plugin registering a sub-format (MPO is JPEG's)
                    if not (fmt == "MPO" and "JPEG" in limits.formats):
                        raise ImageReadError(f"{name}: format {fmt} is not accepted; {_ACCEPTED}")
                w, h = im.size
                if w * h > limits.max_pixels:
                    raise ImageReadError(
                        f"{name}: image is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the "
                        f"{limits.max_pixels / 1e6:.0f} megapixel limit (possible decompression bomb); {_ACCEPTED}"
                    )
                need = _decode_bytes_estimate(im.mode, w * h)
                if need > limits.max_decode_bytes:
                    raise ImageReadError(
                        f"{name}: decoding this {w}x{h} {im.mode} image would need about {_mib(need)}, over the "
                        f"{_mib(limits.max_decode_bytes)} limit for one image; {_ACCEPTED}"
                    )
                n_frames = getattr(im, "n_frames", 1)
                if n_frames > 1:
                    raise ImageReadError(
                        f"{name}: file holds {n_frames} images (multi-page or animated {fmt}); save the one "
                        f"cell image as its own file; {_ACCEPTED}"
                    )
                im.load()
                im = ImageOps.exif_transpose(im) or im
                arr = _pil_to_rgb(im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{name}: image is too large (possible decompression bomb); {_ACCEPTED}") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{name}: data is not a recognised image format; {_ACCEPTED}") from exc
    except MemoryError as exc:
        raise ImageReadError(f"{name}: not enough memory to decode this image; {_ACCEPTED}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError, ZeroDivisionError,
            struct.error, OverflowError) as exc:
        # Pillow reports truncated / corrupt streams with a variety of exception types.
        raise ImageReadError(f"{name}: image data is corrupt or truncated ({exc}); {_ACCEPTED}") from exc
    h, w = arr.shape[:2]
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ImageReadError(f"{name}: image is {w}x{h} pixels, too small; {_ACCEPTED}")
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:  # pragma: no cover - defensive
        raise ImageReadError(f"{name}: could not convert to RGB (got {arr.shape} {arr.dtype}); {_ACCEPTED}")
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------- sources

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSource:
    """One image input of a batch, read lazily.

    Attributes:
        name: Display name: the file path, ``"archive.zip:member/path.jpg"`` for archive members
            (``"archive.zip:x (2).png"`` for the second member named ``x.png``), or the upload's file name.
        load: Returns the raw file bytes; raises :class:`ImageReadError` (with the reason) if the
            input cannot be read. Decode the bytes with :func:`read_image`.
    """

    name: str
    load: Callable[[], bytes]


def _raise(msg: str) -> bytes:
    raise ImageReadError(msg)


def _error_source(name: str, msg: str) -> ImageSource:
    return ImageSource(name=name, load=functools.partial(_raise, msg))


def _is_hidden_parts(parts: Iterable[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts if p)


class _ZipReader:
    """Shares one open ZipFile between the members of an archive (opened on first use).

    Re-opening the archive per member would re-parse the central directory each time, which is
    quadratic for archives with thousands of images.
    """

    def __init__(self, opener: Callable[[], Any], label: str, max_bytes: int):
        self._opener = opener
        self._label = label
        self._max = max_bytes
        self._zf: zipfile.ZipFile | None = None
        self._lock = threading.Lock()

    def read(self, info: zipfile.ZipInfo, shown: str) -> bytes:
        with self._lock:
            try:
                if self._zf is None:
                    self._zf = zipfile.ZipFile(self._opener())
                # Read by ZipInfo (two members may share a name) and never more than the limit, whatever
                # the header declares.
                with self._zf.open(info) as f:
                    data = f.read(self._max + 1)
            except (zipfile.BadZipFile, zlib.error, OSError, KeyError, EOFError, RuntimeError, NotImplementedError,
                    ValueError, struct.error, OverflowError) as exc:
                # RuntimeError: encrypted member; NotImplementedError: unsupported compression.
                raise ImageReadError(f"{self._label}:{shown}: cannot extract from archive ({exc})") from exc
        if len(data) > self._max:
            raise ImageReadError(f"{self._label}:{shown}: member is larger than {_mib(self._max)} uncompressed, "
                                 f"the limit for one image (its header said less); {_ACCEPTED}")
        return data

    def __del__(self) -> None:  # pragma: no cover - best effort cleanup
        zf = self._zf
        if zf is not None:
            try:
                zf.close()
            except Exception:
                pass


def _dedupe(name: str, seen: dict[str, int]) -> str:
    """``x.png``, then ``x (2).png``, ``x (3).png``… for members that share a name."""
    k = seen.get(name, 0) + 1
    seen[name] = k
    if k == 1:
        return name
    stem, dot, ext = name.rpartition(".")
    candidate = f"{stem} ({k}).{ext}" if dot and "/" not in ext else f"{name} ({k})"
    if candidate in seen:  # a member really named "x (2).png" came first
        return _dedupe(candidate, seen)
    seen[candidate] = 1
    return candidate


def _member_problem(info: zipfile.ZipInfo, parts: list[str], limits: ArchiveLimits, decode: DecodeLimits) -> str | None:
    """Why a member is not read (None: read it), from the central directory only."""
    raw = info.filename.replace("\\", "/")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":") or ".." in parts:
        return "unsafe path in the archive (absolute or with '..'); not read"
    if _is_hidden_parts(p for p in parts if p != "."):
        return "hidden file or macOS metadata (name starting with '.' or __MACOSX); not read"
    if raw.lower().endswith(".zip"):
        return "a .zip inside the archive is not opened; unzip it and add its images or the inner .zip directly"
    if not is_image_name(raw):
        return f"unsupported file type '{Path(raw).suffix or '(none)'}'; {_ACCEPTED}"
    if info.flag_bits & 0x1:
        return "encrypted member; add the images unencrypted"
    cap = min(limits.max_member_bytes, decode.max_file_bytes)
    if info.file_size > cap:
        return f"member is {_mib(info.file_size)} uncompressed, over the {_mib(cap)} limit for one image"
    if info.file_size > limits.ratio_min_bytes and info.file_size > limits.max_ratio * max(info.compress_size, 1):
        ratio = info.file_size / max(info.compress_size, 1)
        return (f"member expands {ratio:.0f}x ({_mib(info.file_size)} from {info.compress_size} bytes), over the "
                f"{limits.max_ratio:.0f}x limit (possible zip bomb); not read")
    return None


def _zip_sources(opener: Callable[[], Any], label: str, limits: ArchiveLimits = DEFAULT_ARCHIVE,
                 decode: DecodeLimits = DEFAULT_DECODE) -> list[ImageSource]:
    """One source per member of a zip archive (folders aside), from its central directory.

    Members that are not read (unsafe or hidden names, nested archives, other file types, encrypted,
    over a limit) are error sources with the reason; members sharing a name get ``" (2)"``… A corrupt
    archive, or one over ``limits.max_members`` / ``limits.max_total_bytes``, is one error source.
    """
    try:
        with zipfile.ZipFile(opener()) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, struct.error, OverflowError) as exc:
        return [_error_source(label, f"{label}: not a readable zip archive ({exc}); {_ACCEPTED}, or a .zip of them")]
    if len(infos) > limits.max_members:
        return [_error_source(label, f"{label}: archive lists {len(infos)} entries, over the limit of "
                                     f"{limits.max_members}; split it into smaller archives")]
    total = sum(i.file_size for i in infos)
    if total > limits.max_total_bytes:
        return [_error_source(label, f"{label}: archive expands to {_mib(total)}, over the "
                                     f"{_mib(limits.max_total_bytes)} limit; split it into smaller archives")]
    reader = _ZipReader(opener, label, min(limits.max_member_bytes, decode.max_file_bytes))
    listed = []
    for info in infos:
        if info.is_dir():
            continue
        parts = info.filename.replace("\\", "/").split("/")
        # "./x.png" is x.png: drop empty and "." segments for display, keep ".." to refuse it.
        shown = "/".join(p for p in parts if p not in ("", ".")) or info.filename
        listed.append((shown, info, parts))
    if not listed:  # an empty archive (or one whose directory lists none) is still a row
        return [_error_source(label, f"{label}: the archive holds no files; {_ACCEPTED}, or a .zip of them")]
    listed.sort(key=lambda t: t[0])  # stable: members sharing a name keep their archive order
    seen: dict[str, int] = {}
    out = []
    for shown, info, parts in listed:
        name = f"{label}:{_dedupe(shown, seen)}"
        problem = _member_problem(info, parts, limits, decode)
        if problem:
            out.append(_error_source(name, f"{name}: {problem}"))
        else:
            out.append(ImageSource(name=name, load=functools.partial(reader.read, info, name[len(label) + 1:])))
    return out


@dataclass(frozen=True)
class FolderPolicy:
    """Which server paths the app may read (the CLI passes no policy: it reads what its user can read).

    Attributes:
        roots: Resolved folders under which paths may lie; empty means server paths are turned off.
        max_files: Most image files listed from one input folder; the rest become one error row.
    """

    roots: tuple[str, ...] = ()
    max_files: int = 10_000


ROOTS_ENV = "BCC_IMAGE_ROOTS"


def server_folder_policy(environ: Any = None) -> FolderPolicy:
    """The app's policy for server paths, from ``BCC_IMAGE_ROOTS`` (folders separated by ``os.pathsep``).

    Unset or empty: server paths are off. Each root is resolved (symlinks followed); a root that does
    not exist is ignored with a log line.
    """
    env = os.environ if environ is None else environ
    roots = []
    for r in (env.get(ROOTS_ENV) or "").split(os.pathsep):
        if not r.strip():
            continue
        try:
            roots.append(str(Path(r.strip()).resolve(strict=True)))
        except (OSError, RuntimeError):
            _log.warning("%s: %r does not exist or cannot be resolved; ignored", ROOTS_ENV, r)
    return FolderPolicy(roots=tuple(roots))


def _not_allowed(name: str, policy: FolderPolicy) -> ImageSource:
    if not policy.roots:
        return _error_source(name, f"{name}: reading folders on the server is turned off; upload the images, or "
                                   f"ask an administrator to allow folders ({ROOTS_ENV})")
    # One message for "not allowed" and "does not exist": the reply must not tell which paths exist.
    return _error_source(name, f"{name}: not found, or not inside a folder the administrator allowed "
                               f"({', '.join(policy.roots)})")


def _inside(p: Path, policy: FolderPolicy) -> bool:
    return any(p == Path(r) or p.is_relative_to(r) for r in policy.roots)


def _folder_files(folder: Path, policy: FolderPolicy | None = None) -> tuple[list[Path], bool]:
    """Image files below ``folder`` (recursive, sorted by relative path, hidden entries skipped) and whether
    the listing stopped at ``policy.max_files``. Under a policy, files whose real path leaves the roots
    (symlinks) are left out."""
    cap = policy.max_files if policy else None
    out: list[tuple[str, Path]] = []
    cut = False
    for dirpath, dirnames, filenames in os.walk(folder):
        # Prune hidden dirs so we never descend into .git, .ipynb_checkpoints, __MACOSX, ...
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden_parts([d]))
        for fn in sorted(filenames):
            if fn.startswith(".") or not is_image_name(fn):
                continue
            p = Path(dirpath) / fn
            if policy is not None:
                try:
                    if not _inside(p.resolve(strict=True), policy):
                        continue
                except (OSError, RuntimeError):
                    continue
            if cap is not None and len(out) >= cap:
                cut = True
                break
            out.append((p.relative_to(folder).as_posix(), p))
        if cut:
            break
    out.sort(key=lambda t: t[0])
    return [p for _, p in out], cut


def iter_image_sources(inputs: Sequence[str | os.PathLike], policy: FolderPolicy | None = None,
                       archive: ArchiveLimits = DEFAULT_ARCHIVE,
                       decode: DecodeLimits = DEFAULT_DECODE) -> Iterator[ImageSource]:
    """Expand files, folders and zip archives into image sources.

    * image file -> one source named by its path;
    * folder -> its image files, recursively, sorted, matched by extension (case-insensitive);
      hidden files/folders and ``__MACOSX`` are skipped, other extensions are ignored;
    * ``.zip`` -> one source per member (see ``_zip_sources``), named ``"<zip path>:<member>"``;
    * a path that does not exist, or an explicitly given file with another extension, gives one
      source whose ``load()`` raises :class:`ImageReadError` with the reason.

    Args:
        inputs: Paths, in the order they should be processed.
        policy: ``None`` (the CLI: any path its user can read) or the app's :class:`FolderPolicy`: every
            path, resolved with symlinks, must lie inside one of ``policy.roots`` (none: all refused), and
            a folder lists at most ``policy.max_files`` images (then one error row says so).
        archive: Zip limits.
        decode: Per-image limits (``max_file_bytes`` bounds what a source reads).

    Yields:
        :class:`ImageSource` objects; nothing is read until ``load()`` is called (zip archives
        have their member list read when reached).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    read = functools.partial(read_image_bytes, limits=decode)
    for item in inputs:
        p = Path(item)
        name = str(item)
        if policy is not None:
            try:
                p = p.resolve(strict=True)
            except (OSError, RuntimeError):
                yield _not_allowed(name, policy)
                continue
            if not _inside(p, policy):
                yield _not_allowed(name, policy)
                continue
        if not p.exists():
            yield _error_source(name, f"{name}: path does not exist; {_ACCEPTED}, a folder or a .zip of them")
        elif p.is_dir():
            files, cut = _folder_files(p, policy)
            for f in files:
                yield ImageSource(name=str(f), load=functools.partial(read, f))
            if cut:
                yield _error_source(name, f"{name}: more than {policy.max_files} image files; only the first "
                                          f"{policy.max_files} were listed. Screen its subfolders separately")
        elif p.suffix.lower() == ".zip":
            yield from _zip_sources(functools.partial(open, p, "rb"), name, archive, decode)
        elif is_image_name(p.name):
            yield ImageSource(name=name, load=functools.partial(read, p))
        else:
            yield _error_source(
                name, f"{name}: unsupported file type '{p.suffix or '(none)'}'; {_ACCEPTED}, a folder or a .zip of them"
            )


def _upload_bytes(f: Any) -> bytes:
    data = f.getvalue()
    return bytes(data)


def sources_from_uploads(files: Iterable[Any], archive: ArchiveLimits = DEFAULT_ARCHIVE,
                         decode: DecodeLimits = DEFAULT_DECODE) -> list[ImageSource]:
    """Turn uploaded files (objects with ``.name`` and ``.getvalue()``) into image sources.

    A ``.zip`` upload expands to one source per member (``"upload.zip:member.jpg"``, see
    ``_zip_sources``); an upload with another non-image extension becomes a source whose ``load()``
    raises :class:`ImageReadError`.

    Args:
        files: Uploaded file objects, e.g. Streamlit ``UploadedFile``; ``None`` entries are ignored.
        archive: Zip limits.
        decode: Per-image limits.

    Returns:
        Sources in upload order (archive members sorted within their archive).
    """
    out: list[ImageSource] = []
    for f in files or []:
        if f is None:
            continue
        name = str(getattr(f, "name", "<upload>"))
        if name.lower().endswith(".zip"):
            opener = lambda f=f: _io.BytesIO(_upload_bytes(f))  # noqa: E731 - bind f now
            out.extend(_zip_sources(opener, name, archive, decode))
        elif is_image_name(name):
            out.append(ImageSource(name=name, load=functools.partial(_upload_bytes, f)))
        else:
            suffix = Path(name).suffix or "(none)"
            out.append(_error_source(name, f"{name}: unsupported file type '{suffix}'; {_ACCEPTED}, or a .zip of them"))
    return out
