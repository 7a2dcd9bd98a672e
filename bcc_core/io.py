"""Image input: bytes, paths, uploads, folders and zip archives -> RGB uint8 arrays.

Everything that enters the core as an image goes through :func:`read_image`, so that EXIF
orientation, alpha, 16-bit and palette images are handled once and the same way everywhere.
Batch inputs (files, folders, archives, uploads) are expanded by :func:`iter_image_sources` /
:func:`sources_from_uploads` into lazy :class:`ImageSource` objects; a source that cannot be read
still exists and raises :class:`ImageReadError` on ``load()``, so batch work can emit an error row
with the reason instead of crashing or silently dropping the input.
"""

from __future__ import annotations

import functools
import hashlib
import io as _io
import os
import threading
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MIN_SIDE",
    "MAX_PIXELS",
    "MAX_MEMBER_BYTES",
    "ImageReadError",
    "ImageSource",
    "read_image",
    "read_image_bytes",
    "content_hash",
    "encode_png",
    "iter_image_sources",
    "sources_from_uploads",
    "is_image_name",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
"""Accepted file name extensions (compared case-insensitively)."""

MIN_SIDE = 8
"""Smallest accepted width and height in pixels."""

MAX_PIXELS = 100_000_000
"""Largest accepted width * height; anything bigger is treated as a decompression bomb."""

MAX_MEMBER_BYTES = 512 * 1024 * 1024
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


# --------------------------------------------------------------------------- bytes / hashing


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """Read a file's raw bytes.

    Args:
        path: File path.

    Returns:
        The file content.

    Raises:
        ImageReadError: If the path does not exist, is a directory, or cannot be read.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p}: file does not exist; {_ACCEPTED}")
    if p.is_dir():
        raise ImageReadError(f"{p}: is a folder, not an image file; {_ACCEPTED}")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"{p}: cannot read file ({exc}); {_ACCEPTED}") from exc


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


def _source_bytes(src: Any) -> tuple[bytes, str]:
    """Return (bytes, display name) for a path, bytes or binary file-like."""
    if isinstance(src, (str, os.PathLike)):
        return read_image_bytes(src), str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), "<bytes>"
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
    return bytes(data), name


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a single-channel integer or float array to uint8.

    Integer data keep their relative intensities: the bit depth is inferred from the maximum
    (8-bit data stored in a 16-bit container stay as they are, 12-bit data are divided by 4095/255,
    16-bit by 65535/255). Float data in [0, 1] are multiplied by 255, other float ranges are
    min-max stretched (there is no natural white point).
    """
    if np.issubdtype(arr.dtype, np.floating):
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        elif hi > lo:
            a = (a - lo) * (255.0 / (hi - lo))
        else:
            a = np.zeros_like(a)
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    a = arr.astype(np.int64)
    a = np.clip(a, 0, None)
    hi = int(a.max()) if a.size else 0
    if hi <= 255:
        return a.astype(np.uint8)
    bits = int(hi).bit_length()
    scale = 255.0 / float((1 << bits) - 1)
    return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any common mode to an ``(H, W, 3)`` uint8 RGB array."""
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16") or mode.startswith("I;32"):
        gray = _to_uint8(np.asarray(img))
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


def read_image(src: Any) -> np.ndarray:
    """Decode an image to an RGB array.

    Handles EXIF orientation, modes 1/L/P/LA/PA/RGBA (alpha composited on white), CMYK/YCbCr,
    16-bit and 32-bit integer and float greyscale (scaled to 8-bit, see ``_to_uint8``). For
    multi-frame files (TIFF stacks, animated images) the first frame is used.

    Args:
        src: A file path (``str`` / ``Path``), ``bytes``, or a binary file-like object with
            ``.getvalue()`` or ``.read()`` (e.g. a Streamlit ``UploadedFile``).

    Returns:
        ``(H, W, 3)`` uint8 RGB array, values 0..255, with H, W >= 8.

    Raises:
        ImageReadError: Empty input, data that is not a decodable image, a truncated file, an
            image smaller than 8x8 or larger than 100 megapixels.
    """
    data, name = _source_bytes(src)
    if not data:
        raise ImageReadError(f"{name}: input is empty (0 bytes); {_ACCEPTED}")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb threshold (~89 MP) warns; we apply our own explicit limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(_io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageReadError(
                        f"{name}: image is {w}x{h} = {w * h / 1e6:.0f} megapixels, too large "
                        f"(possible decompression bomb); {_ACCEPTED}"
                    )
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                im.load()
                im = ImageOps.exif_transpose(im) or im
                arr = _pil_to_rgb(im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{name}: image is too large (possible decompression bomb); {_ACCEPTED}") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{name}: data is not a recognised image format; {_ACCEPTED}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError) as exc:
        # Pillow reports truncated / corrupt streams with a variety of exception types.
        raise ImageReadError(f"{name}: image data is corrupt or truncated ({exc}); {_ACCEPTED}") from exc
    h, w = arr.shape[:2]
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ImageReadError(f"{name}: image is {w}x{h} pixels, too small; {_ACCEPTED}")
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:  # pragma: no cover - defensive
        raise ImageReadError(f"{name}: could not convert to RGB (got {arr.shape} {arr.dtype}); {_ACCEPTED}")
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ImageSource:
    """One image input of a batch, read lazily.

    Attributes:
        name: Display name: the file path, ``"archive.zip:member/path.jpg"`` for archive members,
            or the upload's file name.
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

    def __init__(self, opener: Callable[[], Any], label: str):
        self._opener = opener
        self._label = label
        self._zf: zipfile.ZipFile | None = None
        self._lock = threading.Lock()

    def read(self, member: str) -> bytes:
        with self._lock:
            try:
                if self._zf is None:
                    self._zf = zipfile.ZipFile(self._opener())
                info = self._zf.getinfo(member)
                if info.file_size > MAX_MEMBER_BYTES:
                    raise ImageReadError(
                        f"{self._label}:{member}: member is {info.file_size / 2**20:.0f} MiB uncompressed, "
                        f"over the {MAX_MEMBER_BYTES // 2**20} MiB limit; {_ACCEPTED}"
                    )
                return self._zf.read(member)
            except (zipfile.BadZipFile, OSError, KeyError, EOFError, RuntimeError, NotImplementedError) as exc:
                # RuntimeError: encrypted member; NotImplementedError: unsupported compression.
                raise ImageReadError(f"{self._label}:{member}: cannot extract from archive ({exc})") from exc

    def __del__(self) -> None:  # pragma: no cover - best effort cleanup
        zf = self._zf
        if zf is not None:
            try:
                zf.close()
            except Exception:
                pass


def _zip_sources(opener: Callable[[], Any], label: str) -> list[ImageSource]:
    """List image members of a zip archive as sources; a corrupt archive gives one error source."""
    try:
        with zipfile.ZipFile(opener()) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return [_error_source(label, f"{label}: not a readable zip archive ({exc}); {_ACCEPTED}, or a .zip of them")]
    members = sorted(
        i.filename
        for i in infos
        if not i.is_dir()
        and is_image_name(i.filename)
        and not _is_hidden_parts(i.filename.replace("\\", "/").split("/"))
    )
    reader = _ZipReader(opener, label)
    return [ImageSource(name=f"{label}:{m}", load=functools.partial(reader.read, m)) for m in members]


def _folder_files(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive, sorted by relative path, hidden entries skipped)."""
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Prune hidden dirs so we never descend into .git, .ipynb_checkpoints, __MACOSX, ...
        dirnames[:] = [d for d in dirnames if not _is_hidden_parts([d])]
        for fn in filenames:
            if fn.startswith(".") or not is_image_name(fn):
                continue
            p = Path(dirpath) / fn
            out.append((p.relative_to(folder).as_posix(), p))
    out.sort(key=lambda t: t[0])
    return [p for _, p in out]


def iter_image_sources(inputs: Sequence[str | os.PathLike]) -> Iterator[ImageSource]:
    """Expand files, folders and zip archives into image sources.

    * image file -> one source named by its path;
    * folder -> its image files, recursively, sorted, matched by extension (case-insensitive);
      hidden files/folders and ``__MACOSX`` are skipped, other extensions are ignored;
    * ``.zip`` -> its image members, sorted, named ``"<zip path>:<member>"``; a corrupt archive
      gives one source whose ``load()`` raises;
    * a path that does not exist, or an explicitly given file with another extension, gives one
      source whose ``load()`` raises :class:`ImageReadError` with the reason.

    Args:
        inputs: Paths, in the order they should be processed.

    Yields:
        :class:`ImageSource` objects; nothing is read until ``load()`` is called (zip archives
        have their member list read when reached).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    for item in inputs:
        p = Path(item)
        name = str(item)
        if not p.exists():
            yield _error_source(name, f"{name}: path does not exist; {_ACCEPTED}, a folder or a .zip of them")
        elif p.is_dir():
            for f in _folder_files(p):
                yield ImageSource(name=str(f), load=functools.partial(read_image_bytes, f))
        elif p.suffix.lower() == ".zip":
            yield from _zip_sources(functools.partial(open, p, "rb"), name)
        elif is_image_name(p.name):
            yield ImageSource(name=name, load=functools.partial(read_image_bytes, p))
        else:
            yield _error_source(
                name, f"{name}: unsupported file type '{p.suffix or '(none)'}'; {_ACCEPTED}, a folder or a .zip of them"
            )


def _upload_bytes(f: Any) -> bytes:
    data = f.getvalue()
    return bytes(data)


def sources_from_uploads(files: Iterable[Any]) -> list[ImageSource]:
    """Turn uploaded files (objects with ``.name`` and ``.getvalue()``) into image sources.

    A ``.zip`` upload expands to its image members (``"upload.zip:member.jpg"``); an upload with
    another non-image extension becomes a source whose ``load()`` raises :class:`ImageReadError`.

    Args:
        files: Uploaded file objects, e.g. Streamlit ``UploadedFile``; ``None`` entries are ignored.

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
            out.extend(_zip_sources(opener, name))
        elif is_image_name(name):
            out.append(ImageSource(name=name, load=functools.partial(_upload_bytes, f)))
        else:
            suffix = Path(name).suffix or "(none)"
            out.append(_error_source(name, f"{name}: unsupported file type '{suffix}'; {_ACCEPTED}, or a .zip of them"))
    return out
