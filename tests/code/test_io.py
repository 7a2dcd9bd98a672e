"""Unit tests for bcc_core.io (synthetic images generated in the test)."""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bcc_core.io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    ImageSource,
    content_hash,
    encode_png,
    iter_image_sources,
    read_image,
    read_image_bytes,
    sources_from_uploads,
)


def _pattern(h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    """Random RGB image (H, W, 3) uint8 with distinct pixels, so orientation/crop errors show."""
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _halves(h: int = 20, w: int = 40) -> np.ndarray:
    """Left half red, right half blue (H, W, 3) uint8."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    return a


class FakeUpload:
    """Stands in for a Streamlit UploadedFile: .name, .getvalue(), .read()."""

    def __init__(self, name: str, data: bytes):
        self.name = name
        self._data = data
        self._pos = 0

    def getvalue(self) -> bytes:
        return self._data

    def read(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out


# --------------------------------------------------------------------------- read_image


def test_png_roundtrip_is_lossless_and_rgb_uint8():
    a = _pattern()
    out = read_image(encode_png(a))
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3)
    np.testing.assert_array_equal(out, a)


def test_path_str_bytes_and_filelike_give_same_pixels(tmp_path):
    a = _pattern(seed=1)
    p = tmp_path / "x.png"
    p.write_bytes(encode_png(a))
    for src in (p, str(p), p.read_bytes(), bytearray(p.read_bytes()), FakeUpload("x.png", p.read_bytes())):
        np.testing.assert_array_equal(read_image(src), a)


def test_filelike_already_read_is_rewound():
    a = _pattern(seed=2)
    bio = io.BytesIO(encode_png(a))
    bio.read()  # position at end, as after a previous consumer
    np.testing.assert_array_equal(read_image(bio), a)

    class ReadOnly:  # only .read()/.seek(), no .getvalue()
        def __init__(self, data):
            self._b = io.BytesIO(data)

        def read(self):
            return self._b.read()

        def seek(self, pos):
            return self._b.seek(pos)

    ro = ReadOnly(encode_png(a))
    ro.read()
    np.testing.assert_array_equal(read_image(ro), a)


def test_jpeg_decodes_close_to_original():
    a = np.zeros((32, 32, 3), np.uint8)
    a[:] = (200, 100, 50)
    out = read_image(_encode(Image.fromarray(a), "JPEG", quality=95))
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - a).max() <= 3


@pytest.mark.parametrize("orientation, shape, top_color", [(6, (40, 20, 3), "red"), (8, (40, 20, 3), "blue"), (3, (20, 40, 3), None)])
def test_exif_orientation_applied(orientation, shape, top_color):
    img = Image.fromarray(_halves())  # 40 wide x 20 tall, red left, blue right
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = read_image(_encode(img, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == shape
    if top_color is not None:
        # 6 = rotate 90 deg clockwise for display: the left (red) edge ends up on top; 8 the reverse.
        top, bottom = out[2, :, :].mean(axis=0), out[-3, :, :].mean(axis=0)
        red, blue = (top, bottom) if top_color == "red" else (bottom, top)
        assert red[0] > 200 and red[2] < 60
        assert blue[2] > 200 and blue[0] < 60
    else:
        # 3 = rotate 180: red is now on the right.
        assert out[:, -3, 0].mean() > 200 and out[:, 2, 2].mean() > 200


def test_rgba_composited_on_white():
    a = np.zeros((16, 16, 4), np.uint8)
    a[:8, :, :] = (255, 0, 0, 255)  # opaque red
    a[8:, :8, :] = (0, 0, 0, 0)  # fully transparent -> white
    a[8:, 8:, :] = (0, 0, 0, 128)  # half transparent black -> mid grey
    out = read_image(_encode(Image.fromarray(a, "RGBA"), "PNG"))
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(out[12, 2], (255, 255, 255))
    assert abs(int(out[12, 12, 0]) - 127) <= 2


def test_la_and_palette_transparency_composited_on_white():
    la = Image.fromarray(np.stack([np.full((10, 10), 50, np.uint8), np.zeros((10, 10), np.uint8)], axis=2), "LA")
    np.testing.assert_array_equal(read_image(_encode(la, "PNG"))[5, 5], (255, 255, 255))

    p = Image.new("P", (10, 10), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.paste(1, (0, 0, 5, 10))  # left half palette index 1 = green
    out = read_image(_encode(p, "PNG", transparency=0))  # index 0 transparent
    np.testing.assert_array_equal(out[5, 2], (0, 255, 0))
    np.testing.assert_array_equal(out[5, 8], (255, 255, 255))


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK"])
def test_other_modes_become_rgb(mode):
    base = Image.fromarray(_halves())
    img = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = read_image(_encode(img, fmt))
    assert out.shape == (20, 40, 3) and out.dtype == np.uint8
    if mode in ("L", "1"):
        np.testing.assert_array_equal(out[..., 0], out[..., 1])
    if mode in ("P", "CMYK"):
        assert out[10, 2, 0] > 200 and out[10, -3, 2] > 200


def test_16bit_full_range_scaled_to_8bit():
    a = np.zeros((10, 12), np.uint16)
    a[:, :4] = 0
    a[:, 4:8] = 32896  # 128 * 257
    a[:, 8:] = 65535
    img = Image.fromarray(a)
    assert img.mode.startswith("I;16")
    out = read_image(_encode(img, "PNG"))
    assert out.shape == (10, 12, 3)
    assert out[0, 0, 0] == 0 and out[0, 6, 0] == 128 and out[0, 10, 0] == 255
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_16bit_scaled_by_bit_depth_not_by_each_images_maximum():
    # The same stored value must give the same grey in every image (it used to be stretched by each
    # image's own maximum: 1000 became 249 in one image and 62 in another).
    a = np.zeros((10, 10), np.uint16)
    a[:, 5:] = 1000
    b = a.copy()
    b[0, 0] = 4095
    out_a = read_image(_encode(Image.fromarray(a), "TIFF"))
    out_b = read_image(_encode(Image.fromarray(b), "TIFF"))
    assert out_a[5, 9, 0] == out_b[5, 9, 0] == round(1000 / 257)
    assert out_b[0, 0, 0] == round(4095 / 257)


def test_float_tiff_in_unit_range_scaled():
    a = np.zeros((10, 10), np.float32)
    a[:, 5:] = 1.0
    a[:, :5] = 0.5
    img = Image.fromarray(a, "F")
    out = read_image(_encode(img, "TIFF"))
    assert out[0, 9, 0] == 255 and out[0, 0, 0] in (127, 128)


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "WEBP"])
def test_multiframe_images_refused_not_silently_cut(fmt):
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    blue = Image.new("RGB", (16, 16), (0, 0, 255))
    data = _encode(red, fmt, save_all=True, append_images=[blue])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    with pytest.raises(ImageReadError, match="holds 2 images"):
        read_image(data)
    assert read_image(_encode(red, fmt, save_all=True)).shape == (16, 16, 3)  # one frame is fine


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty"),
        (b"this is not an image at all" * 10, "not a recognised image"),
        (np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes(), "not a recognised image"),
    ],
)
def test_bad_bytes_raise_with_reason_and_accepted_list(data, fragment):
    with pytest.raises(ImageReadError) as ei:
        read_image(data)
    msg = str(ei.value)
    assert fragment in msg
    assert ".png" in msg and "accepted" in msg


def test_truncated_jpeg_raises():
    data = _encode(Image.fromarray(_pattern(64, 64)), "JPEG", quality=90)
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        read_image(data[: len(data) // 2])


def test_too_small_raises():
    with pytest.raises(ImageReadError, match="too small"):
        read_image(encode_png(_pattern(4, 20)))
    assert read_image(encode_png(_pattern(8, 8))).shape == (8, 8, 3)


def _bmp_with_header_size(w: int, h: int) -> bytes:
    """A tiny BMP whose header claims w x h pixels (only the header is read before we refuse)."""
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "BMP"))
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


@pytest.mark.parametrize("w, h", [(12_000, 10_000), (20_000, 20_000)])
def test_huge_images_refused_without_decoding(w, h):
    # 120 MP is above our 40 MP limit but below Pillow's own bomb error; 400 MP trips Pillow's.
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(_bmp_with_header_size(w, h))


def test_missing_path_and_folder_raise(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="folder"):
        read_image(tmp_path)
    with pytest.raises(ImageReadError, match="unsupported input"):
        read_image(12345)


def test_image_read_error_is_value_error():
    assert issubclass(ImageReadError, ValueError)


# --------------------------------------------------------------------------- helpers


def test_content_hash_is_sha256():
    assert content_hash(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert content_hash(b"abc") != content_hash(b"abd")
    assert len(content_hash(b"")) == 64


def test_read_image_bytes(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"xyz")
    assert read_image_bytes(p) == b"xyz"
    with pytest.raises(ImageReadError):
        read_image_bytes(tmp_path / "missing.png")


def test_encode_png_validates_input():
    with pytest.raises(ValueError):
        encode_png(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError):
        encode_png(np.zeros((8, 8, 4), np.uint8))
    assert encode_png(np.zeros((8, 8, 3), np.uint8))[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- sources


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A folder with images at several depths, mixed-case extensions, hidden and non-image files."""
    root = tmp_path / "in"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden_dir").mkdir()
    (root / "b.png").write_bytes(encode_png(_pattern(seed=1)))
    (root / "A.JPG").write_bytes(_encode(Image.fromarray(_pattern(seed=2)), "JPEG"))
    (root / "sub" / "c.TIFF").write_bytes(_encode(Image.fromarray(_pattern(seed=3)), "TIFF"))
    (root / "sub" / "deeper" / "d.webp").write_bytes(_encode(Image.fromarray(_pattern(seed=4)), "WEBP", lossless=True))
    (root / "z.png").write_bytes(encode_png(_pattern(seed=6)))  # os.walk lists it before sub/
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\0\0")
    (root / "._b.png").write_bytes(b"resource fork junk")
    (root / ".hidden_dir" / "e.png").write_bytes(encode_png(_pattern(seed=5)))
    return root


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            if name.endswith("/"):
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(name, data)
    return buf.getvalue()


def _zip_members() -> dict[str, bytes]:
    return {
        "z/2.png": encode_png(_pattern(seed=12)),
        "z/": b"",
        "1.PNG": encode_png(_pattern(seed=11)),
        "__MACOSX/z/._2.png": b"junk",
        "z/.hidden.png": encode_png(_pattern(seed=13)),
        "readme.txt": b"hello",
    }


def test_folder_expansion_recursive_sorted_case_insensitive_hidden_skipped(tree):
    names = [s.name for s in iter_image_sources([tree])]
    rel = [Path(n).relative_to(tree).as_posix() for n in names]
    assert rel == ["A.JPG", "b.png", "sub/c.TIFF", "sub/deeper/d.webp", "z.png"]
    for s in iter_image_sources([tree]):
        img = read_image(s.load())
        assert img.shape == (24, 40, 3)


def test_zip_members_listed_sorted_and_readable(tmp_path):
    zp = tmp_path / "batch.zip"
    zp.write_bytes(_zip_bytes(_zip_members()))
    srcs = list(iter_image_sources([zp]))
    # Every member but the folder is a row; the ones not read say why when loaded.
    assert [s.name for s in srcs] == [f"{zp}:1.PNG", f"{zp}:__MACOSX/z/._2.png", f"{zp}:readme.txt",
                                      f"{zp}:z/.hidden.png", f"{zp}:z/2.png"]
    np.testing.assert_array_equal(read_image(srcs[0].load()), _pattern(seed=11))
    np.testing.assert_array_equal(read_image(srcs[4].load()), _pattern(seed=12))
    for s, why in zip(srcs[1:4], ["hidden", "unsupported file type '.txt'", "hidden"]):
        with pytest.raises(ImageReadError, match=why):
            s.load()


def test_missing_path_non_image_file_and_corrupt_zip_become_error_sources(tmp_path, tree):
    bad_zip = tmp_path / "broken.zip"
    bad_zip.write_bytes(b"PK\x03\x04 definitely not a zip")
    img = tree / "b.png"
    inputs = [tmp_path / "missing.png", tree / "notes.txt", bad_zip, img]
    srcs = list(iter_image_sources(inputs))
    assert [s.name for s in srcs] == [str(p) for p in inputs]
    reasons = []
    for s in srcs[:3]:
        with pytest.raises(ImageReadError) as ei:
            s.load()
        reasons.append(str(ei.value))
    assert "does not exist" in reasons[0]
    assert "unsupported file type '.txt'" in reasons[1]
    assert "zip" in reasons[2]
    assert srcs[3].load() == img.read_bytes()


def test_mixed_inputs_keep_order_and_single_path_accepted(tmp_path, tree):
    zp = tmp_path / "m.zip"
    zp.write_bytes(_zip_bytes({"q.png": encode_png(_pattern(seed=20))}))
    names = [s.name for s in iter_image_sources([zp, tree / "sub"])]
    assert names[0] == f"{zp}:q.png"
    assert names[1:] == [str(tree / "sub" / "c.TIFF"), str(tree / "sub" / "deeper" / "d.webp")]
    assert [s.name for s in iter_image_sources(tree / "b.png")] == [str(tree / "b.png")]


def test_sources_are_lazy(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(encode_png(_pattern()))
    (src,) = list(iter_image_sources([p]))
    assert isinstance(src, ImageSource)
    p.unlink()  # nothing was read at listing time, so the failure only shows on load()
    with pytest.raises(ImageReadError, match="does not exist"):
        src.load()


def test_zip_members_share_one_archive_handle(tmp_path):
    # Many members; loading all of them must work through the shared reader and stay correct.
    members = {f"img_{i:03d}.png": encode_png(_pattern(8, 8, seed=i)) for i in range(60)}
    zp = tmp_path / "many.zip"
    zp.write_bytes(_zip_bytes(members))
    srcs = list(iter_image_sources([zp]))
    assert len(srcs) == 60
    for i, s in enumerate(srcs):
        np.testing.assert_array_equal(read_image(s.load()), _pattern(8, 8, seed=i))


def test_sources_from_uploads_images_zip_and_errors():
    ups = [
        FakeUpload("cell.png", encode_png(_pattern(seed=30))),
        FakeUpload("batch.zip", _zip_bytes(_zip_members())),
        FakeUpload("report.pdf", b"%PDF-1.4"),
        FakeUpload("bad.zip", b"nope"),
        None,
        FakeUpload("empty.jpg", b""),
    ]
    srcs = sources_from_uploads(ups)
    assert [s.name for s in srcs] == ["cell.png", "batch.zip:1.PNG", "batch.zip:__MACOSX/z/._2.png",
                                      "batch.zip:readme.txt", "batch.zip:z/.hidden.png", "batch.zip:z/2.png",
                                      "report.pdf", "bad.zip", "empty.jpg"]
    np.testing.assert_array_equal(read_image(srcs[0].load()), _pattern(seed=30))
    np.testing.assert_array_equal(read_image(srcs[5].load()), _pattern(seed=12))
    with pytest.raises(ImageReadError, match="unsupported file type '.pdf'"):
        srcs[6].load()
    with pytest.raises(ImageReadError, match="zip"):
        srcs[7].load()
    with pytest.raises(ImageReadError, match="empty"):
        read_image(srcs[8].load())


def test_extensions_constant():
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def test_zip_member_size_limit_and_bad_crc(tmp_path):
    from bcc_core.io import ArchiveLimits

    png = encode_png(_pattern(seed=40))
    zp = tmp_path / "a.zip"
    with zipfile.ZipFile(zp, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("ok.png", png)
    (src,) = list(iter_image_sources([zp], archive=ArchiveLimits(max_member_bytes=len(png) - 1)))
    with pytest.raises(ImageReadError, match="limit"):
        src.load()
    assert read_image(next(iter(iter_image_sources([zp], archive=ArchiveLimits(max_member_bytes=len(png))))).load()).shape == (24, 40, 3)

    raw = bytearray(zp.read_bytes())
    k = raw.index(png[100:120])  # stored member data: flip a byte so the CRC no longer matches
    raw[k] ^= 0xFF
    zp.write_bytes(bytes(raw))
    (src,) = list(iter_image_sources([zp]))
    with pytest.raises(ImageReadError, match="cannot extract"):
        src.load()
