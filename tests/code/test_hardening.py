"""Issue 13: hostile or unlucky inputs never reach what they should not, exhaust the machine, or vanish.

Property-based tests (Hypothesis) for the decoder and the archive reader, one test per limit, the server
folder allow-list, model files (hash, safe mode) and crash-safe screening.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# No example database: nothing is written into the checkout (.hypothesis/); each run draws new examples.
settings.register_profile("bcc_hardening", database=None)
settings.load_profile("bcc_hardening")
from PIL import Image

from bcc_core.io import (ArchiveLimits, DecodeLimits, FolderPolicy, ImageReadError, encode_png, iter_image_sources,
                         read_image, server_folder_policy, sources_from_uploads)

ROOT = Path(__file__).resolve().parents[2]


def _png(h=16, w=16, seed=0) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _zip(members, compression=zipfile.ZIP_DEFLATED) -> bytes:
    """members: list of (name, bytes); names may repeat (zipfile warns, writes both)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members:
            if name.endswith("/"):
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                with pytest.warns(UserWarning) if any(n == name for n, _ in members[:members.index((name, data))]) \
                        else _nullcontext():
                    zf.writestr(name, data)
    return buf.getvalue()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class Upload:
    def __init__(self, name, data):
        self.name, self._data = name, data

    def getvalue(self):
        return self._data


def _outcome(src):
    """('ok', shape) or ('error', message) for one source, as screening sees it."""
    try:
        return "ok", read_image(src.load()).shape
    except ImageReadError as e:
        return "error", str(e)


# ------------------------------------------------------------------------------------------------ decoder


SMALL_IMAGES = {
    "png": _encode(Image.new("RGB", (12, 10), (200, 30, 40)), "PNG"),
    "jpeg": _encode(Image.new("RGB", (16, 16), (20, 130, 40)), "JPEG"),
    "tiff16": _encode(Image.fromarray(np.full((9, 11), 1000, np.uint16)), "TIFF"),
    "bmp": _encode(Image.new("RGB", (10, 10), (1, 2, 3)), "BMP"),
    "webp": _encode(Image.new("RGB", (10, 10), (9, 9, 9)), "WEBP", lossless=True),
}


def _check_decoder_contract(data: bytes) -> None:
    """Any bytes: an (H, W, 3) uint8 image within the limits, or ImageReadError — nothing else."""
    try:
        out = read_image(data)
    except ImageReadError as e:
        assert str(e)
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[0] >= 8 and out.shape[1] >= 8 and out.shape[0] * out.shape[1] <= DecodeLimits().max_pixels


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_decoder_on_random_bytes_returns_image_or_reason(data):
    _check_decoder_contract(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(SMALL_IMAGES)), data=st.data())
def test_decoder_on_mutated_small_images_returns_image_or_reason(kind, data):
    raw = bytearray(SMALL_IMAGES[kind])
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "truncate":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    _check_decoder_contract(bytes(raw))


@pytest.mark.parametrize("fmt, kw", [("GIF", {}), ("ICO", {}), ("TGA", {}), ("PPM", {}), ("PCX", {}),
                                     ("EPS", None), ("PDF", {})])
def test_formats_outside_the_allow_list_are_refused_by_content(fmt, kw, tmp_path):
    img = Image.new("RGB", (16, 16), (200, 0, 0))
    if kw is None:  # writing EPS needs nothing external; reading it would hand off to Ghostscript
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    else:
        data = _encode(img, fmt, **kw)
    # The extension says PNG; the content decides, and only the allowed decoders are tried.
    p = tmp_path / "looks_like.png"
    p.write_bytes(data)
    with pytest.raises(ImageReadError, match="not a recognised image format|not accepted"):
        read_image(p)


def test_allowed_formats_decode_whatever_the_extension(tmp_path):
    for kind, data in SMALL_IMAGES.items():
        p = tmp_path / f"{kind}.bin.png"
        p.write_bytes(data)
        assert read_image(p).dtype == np.uint8, kind


def test_pixel_limit_is_read_from_the_header_before_decoding():
    # A 16-bit PNG declaring 10000 x 10000 pixels in a few hundred bytes: refused from the header.
    img = Image.new("I;16", (10_000, 10_000))
    data = _encode(img, "PNG", optimize=True)
    assert len(data) < 400_000
    with pytest.raises(ImageReadError, match="megapixel limit"):
        read_image(data)
    small = _encode(Image.new("I;16", (2000, 2000)), "PNG", optimize=True)
    with pytest.raises(ImageReadError, match="megapixel limit"):
        read_image(small, DecodeLimits(max_pixels=2000 * 2000 - 1))
    assert read_image(small, DecodeLimits(max_pixels=2000 * 2000)).shape == (2000, 2000, 3)


def test_decode_memory_limit_counts_bytes_per_pixel():
    # Same pixel count: the 8-bit greyscale image fits the memory bound, the float one does not.
    lim = DecodeLimits(max_decode_bytes=100 * 100 * 13)
    assert read_image(_encode(Image.new("L", (100, 100), 7), "PNG"), lim).shape == (100, 100, 3)
    with pytest.raises(ImageReadError, match="would need about"):
        read_image(_encode(Image.fromarray(np.zeros((100, 100), np.float32), "F"), "TIFF"), lim)


def test_file_size_limit(tmp_path):
    data = _png(64, 64)
    p = tmp_path / "x.png"
    p.write_bytes(data)
    lim = DecodeLimits(max_file_bytes=len(data) - 1)
    for src in (p, data, Upload("x.png", data)):
        with pytest.raises(ImageReadError, match="larger than"):
            read_image(src, lim)
    assert read_image(p, DecodeLimits(max_file_bytes=len(data))).shape == (64, 64, 3)


def test_16bit_same_value_same_grey_in_every_image():
    a = np.full((10, 10), 1000, np.uint16)
    b = a.copy()
    b[0, 0] = 65535  # used to rescale everything else in this image
    va = read_image(_encode(Image.fromarray(a), "PNG"))[5, 5, 0]
    vb = read_image(_encode(Image.fromarray(b), "PNG"))[5, 5, 0]
    assert va == vb == 4  # round(1000 / 257)


def test_animated_webp_and_png_refused():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt in ("WEBP", "PNG"):
        data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:])
        with pytest.raises(ImageReadError, match="holds 3 images"):
            read_image(data)


# ------------------------------------------------------------------------------------------------ archives


def test_every_member_is_a_row_with_a_reason():
    members = [("./a.png", _png(seed=1)), ("../evil.png", _png(seed=2)), ("/abs.png", _png(seed=3)),
               (".hidden.png", _png(seed=4)), ("inner.zip", _zip([("x.png", _png())])), ("dir/", b""),
               ("notes.txt", b"hi"), ("dir/b.png", _png(seed=5))]
    srcs = sources_from_uploads([Upload("up.zip", _zip(members))])
    names = [s.name for s in srcs]
    assert len(srcs) == 7  # the folder entry is the only member without a row
    out = {n: _outcome(s) for n, s in zip(names, srcs)}
    assert out["up.zip:a.png"] == ("ok", (16, 16, 3))  # './' is harmless: read
    assert out["up.zip:dir/b.png"] == ("ok", (16, 16, 3))
    assert "unsafe path" in out["up.zip:../evil.png"][1]
    assert "unsafe path" in out["up.zip:abs.png"][1]
    assert "hidden" in out["up.zip:.hidden.png"][1]
    assert "inside the archive is not opened" in out["up.zip:inner.zip"][1]
    assert "unsupported file type '.txt'" in out["up.zip:notes.txt"][1]


def test_duplicate_member_names_are_disambiguated_and_read_their_own_bytes():
    one, two = _png(seed=1), _png(seed=2)
    srcs = sources_from_uploads([Upload("d.zip", _zip([("x.png", one), ("x.png", two)]))])
    assert [s.name for s in srcs] == ["d.zip:x.png", "d.zip:x (2).png"]
    assert srcs[0].load() == one and srcs[1].load() == two


def test_an_empty_archive_is_a_row():
    (src,) = sources_from_uploads([Upload("e.zip", _zip([("only/", b"")]))])
    assert src.name == "e.zip" and "holds no files" in _outcome(src)[1]


def test_member_count_limit():
    z = _zip([(f"{i}.png", _png(8, 8, seed=i)) for i in range(5)])
    srcs = sources_from_uploads([Upload("m.zip", z)], archive=ArchiveLimits(max_members=4))
    assert len(srcs) == 1 and "5 entries, over the limit of 4" in _outcome(srcs[0])[1]
    assert len(sources_from_uploads([Upload("m.zip", z)], archive=ArchiveLimits(max_members=5))) == 5


def test_total_uncompressed_size_limit():
    z = _zip([(f"{i}.png", _png(32, 32, seed=i)) for i in range(3)])
    total = sum(i.file_size for i in zipfile.ZipFile(io.BytesIO(z)).infolist())
    srcs = sources_from_uploads([Upload("t.zip", z)], archive=ArchiveLimits(max_total_bytes=total - 1))
    assert len(srcs) == 1 and "over the" in _outcome(srcs[0])[1]
    assert len(sources_from_uploads([Upload("t.zip", z)], archive=ArchiveLimits(max_total_bytes=total))) == 3


def test_compression_ratio_limit_refuses_a_zip_bomb_before_reading_it():
    # 64 MiB of zeros compress to ~64 KiB: ratio ~1000, refused from the directory, never inflated.
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("bomb.bmp", "w") as f:
            chunk = bytes(2**20)
            for _ in range(64):
                f.write(chunk)
    zf_bytes = bomb.getvalue()
    assert len(zf_bytes) < 1_000_000
    (src,) = sources_from_uploads([Upload("b.zip", zf_bytes)])
    assert "possible zip bomb" in _outcome(src)[1]
    (src,) = sources_from_uploads([Upload("b.zip", zf_bytes)], archive=ArchiveLimits(max_ratio=10**6))
    assert "possible zip bomb" not in _outcome(src)[1]  # (the zeros are then refused as not an image)


def test_member_size_limit_holds_even_when_the_header_lies():
    data = _png(64, 64)
    z = bytearray(_zip([("x.png", data)], compression=zipfile.ZIP_STORED))
    # Rewrite the declared uncompressed size in the central directory to 10 bytes.
    cd = z.rindex(b"PK\x01\x02")
    z[cd + 24:cd + 28] = (10).to_bytes(4, "little")
    (src,) = sources_from_uploads([Upload("l.zip", bytes(z))], archive=ArchiveLimits(max_member_bytes=100))
    kind, msg = _outcome(src)
    assert kind == "error" and ("larger than" in msg or "cannot extract" in msg)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_archive_reader_on_random_bytes_gives_rows_with_reasons(data):
    srcs = sources_from_uploads([Upload("r.zip", b"PK\x03\x04" + data)])
    assert len(srcs) >= 1
    for s in srcs:
        kind, _ = _outcome(s)
        assert kind in ("ok", "error")


ARCHIVE = _zip([("a.png", _png(seed=1)), ("b/c.png", _png(seed=2)), ("d.txt", b"x" * 50)])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_archive_reader_on_mutated_archives_gives_rows_with_reasons(data):
    raw = bytearray(ARCHIVE)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    srcs = sources_from_uploads([Upload("m.zip", bytes(raw))])
    assert 1 <= len(srcs) <= 3
    for s in srcs:
        assert _outcome(s)[0] in ("ok", "error")


# ------------------------------------------------------------------------------------------------ server folders


@pytest.fixture
def roots(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "a.png").write_bytes(_png(seed=1))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(_png(seed=2))
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "linkdir").symlink_to(outside, target_is_directory=True)
    return allowed, outside


def test_server_folders_off_unless_roots_are_configured(roots):
    allowed, _ = roots
    pol = server_folder_policy({})
    assert pol.roots == ()
    (src,) = list(iter_image_sources([str(allowed)], policy=pol))
    assert "turned off" in _outcome(src)[1]


def test_server_folder_allow_list_resolves_symlinks(roots, tmp_path):
    allowed, outside = roots
    pol = server_folder_policy({"BCC_IMAGE_ROOTS": f"{allowed}{os.pathsep}{tmp_path / 'missing'}"})
    assert pol.roots == (str(allowed.resolve()),)
    names = [s.name for s in iter_image_sources([str(allowed)], policy=pol)]
    assert names == [str(allowed.resolve() / "sub" / "a.png")]  # link.png leads outside: not listed
    msgs = [_outcome(s)[1] for s in iter_image_sources(
        [str(outside), str(allowed / "link.png"), str(allowed / "linkdir"), str(allowed / "../outside"),
         str(allowed / "nope"), "/"], policy=pol)]
    assert len(msgs) == 6
    # One message for "not allowed" and "does not exist": the reply does not say which paths exist.
    assert len({m.split(": ", 1)[1] for m in msgs}) == 1 and "not found, or not inside" in msgs[0]


def test_server_folder_file_count_cap(roots):
    allowed, _ = roots
    for i in range(5):
        (allowed / f"{i}.png").write_bytes(_png(8, 8, seed=i))
    pol = FolderPolicy(roots=(str(allowed.resolve()),), max_files=3)
    srcs = list(iter_image_sources([str(allowed)], policy=pol))
    assert len(srcs) == 4 and "more than 3 image files" in _outcome(srcs[-1])[1]


def test_cli_reads_any_path_its_user_can_read(roots):
    _, outside = roots
    (src,) = list(iter_image_sources([str(outside / "secret.png")]))
    assert _outcome(src)[0] == "ok"


# ------------------------------------------------------------------------------------------------ models


def _write_model_dir(d: Path, model, card: dict | None = None) -> None:
    from bcc_core.models import HASH_KEY, file_sha256

    d.mkdir(parents=True, exist_ok=True)
    model.save(d / "model.keras")
    card = dict(card or json.loads((ROOT / "models" / "pbs5-mobilenetv2" / "model_card.json").read_text()))
    card[HASH_KEY] = file_sha256(d / "model.keras")
    (d / "model_card.json").write_text(json.dumps(card))


def test_lambda_model_is_refused_and_its_code_never_runs(tmp_path):
    import keras

    from bcc_core.models import load_model

    marker = tmp_path / "pwned.txt"

    inp = keras.Input((4,))
    # A Python lambda is stored as bytecode in model.keras and runs when the model is rebuilt on load.
    # (Built with eval so the path is a constant of its code: Keras stores no closures or defaults.)
    payload = eval(f'lambda x: (open({str(marker)!r}, "w").write("ran"), x)[1]')  # noqa: S307 - the test's own code
    out = keras.layers.Lambda(payload)(inp)
    _write_model_dir(tmp_path / "evil", keras.Model(inp, out))
    marker.unlink(missing_ok=True)  # building the model ran it once, here in the test
    with pytest.raises(ValueError, match="refusing to load"):
        load_model(tmp_path / "evil")
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it (so the check above can fail).
    keras.models.load_model(tmp_path / "evil" / "model.keras", compile=False, safe_mode=False)
    assert marker.exists()


def test_model_hash_mismatch_refused_missing_hash_loads_with_warning(tmp_path, caplog):
    import shutil

    from bcc_core.models import HASH_KEY, check_model_hash

    d = tmp_path / "m"
    shutil.copytree(ROOT / "models" / "pbs5-mobilenetv2", d, ignore=shutil.ignore_patterns("replay.npz", "external"))
    card = json.loads((d / "model_card.json").read_text())
    assert check_model_hash(d) == card[HASH_KEY]
    card[HASH_KEY] = "0" * 64
    (d / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="Refusing to load"):
        check_model_hash(d)
    del card[HASH_KEY]
    (d / "model_card.json").write_text(json.dumps(card))
    with caplog.at_level("WARNING"):
        assert check_model_hash(d) is None
    assert "records no model_sha256" in caplog.text


def test_bundled_model_cards_record_their_hash():
    from bcc_core.models import HASH_KEY, check_model_hash

    for name in ("pbs5-mobilenetv2", "all4-mobilenetv2"):
        d = ROOT / "models" / name
        if not (d / "model.keras").is_file():
            pytest.skip(f"{d} not present")
        assert json.loads((d / "model_card.json").read_text()).get(HASH_KEY)
        assert check_model_hash(d)


def test_save_model_records_the_hash(tmp_path):
    import keras

    from bcc_core.model_card import ModelCard
    from bcc_core.models import HASH_KEY, file_sha256, save_model

    card = json.loads((ROOT / "models" / "pbs5-mobilenetv2" / "model_card.json").read_text())
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    save_model(model, ModelCard.from_dict(card), tmp_path)
    saved = json.loads((tmp_path / "model_card.json").read_text())
    assert saved[HASH_KEY] == file_sha256(tmp_path / "model.keras")


# ------------------------------------------------------------------------------------------------ screening


class _FakePrediction:
    def __init__(self, v):
        self.status, self.predicted_class, self.confidence = "ok", "a", float(v)
        self.flags, self.probabilities, self.ood_score, self.prediction_set = [], {"a": 1.0}, 0.0, None


class _FakePredictor:
    """prepare() fails on images whose top-left red value is 13; predict_inputs fails on its 2nd call."""

    classes = ["a"]

    def __init__(self):
        self.calls = 0

    def prepare(self, img):
        if img[0, 0, 0] == 13:
            raise RuntimeError("stain normalisation blew up")
        return np.zeros((4, 4, 3), np.uint8) + img[0, 0, 0], []

    def predict_inputs(self, x, quality, batch_size):
        self.calls += 1
        if self.calls == 2:
            raise MemoryError("out of memory in the model")
        return [_FakePrediction(v) for v in x[:, 0, 0, 0]]


def test_screen_never_loses_a_batch():
    from bcc_core.io import ImageSource
    from bcc_core.screening import ROW_KEYS, ScreeningConfig, screen

    def src(i, v):
        data = encode_png(np.full((8, 8, 3), v, np.uint8))
        return ImageSource(name=f"{i}.png", load=lambda d=data: d)

    sources = [src(i, 13 if i == 1 else 100 + i) for i in range(10)]
    rows = screen(sources, _FakePredictor(), ScreeningConfig(batch_size=4, workers=1, thumbnail=0))
    assert [r["file"] for r in rows] == [f"{i}.png" for i in range(10)]
    assert all(tuple(r) == ROW_KEYS for r in rows)
    st_ = [r["status"] for r in rows]
    assert st_[1] == "error" and "could not be prepared" in rows[1]["reason"] and "blew up" in rows[1]["reason"]
    assert st_[4:8] == ["error"] * 4 and all("model failed on this batch" in r["reason"] for r in rows[4:8])
    assert st_[0] == st_[2] == st_[3] == st_[8] == st_[9] == "ok"
    assert rows[9]["confidence"] == 109.0  # the run went on after the failed batch


@pytest.mark.slow
def test_screen_killed_and_resumed_equals_an_uninterrupted_run(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    if not (ROOT / "models" / "pbs5-mobilenetv2" / "model.keras").is_file():
        pytest.skip("bundled model missing")
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import synthetic_cell

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(120):
        (imgs / f"c{i:03d}.png").write_bytes(encode_png(synthetic_cell(size=160, nucleus=25 + i % 15, seed=i,
                                                                        lobes=1 + i % 3)))
    (imgs / "c050_bad.png").write_bytes(b"not an image")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def cmd(out, *extra):
        return [sys.executable, "-m", "bcc_core", "screen", str(imgs), "--out", str(out), "--batch-size", "8",
                "--quiet", *extra]

    full = tmp_path / "full.csv"
    subprocess.run(cmd(full), cwd=ROOT, env=env, check=True, capture_output=True)

    out = tmp_path / "killed.csv"
    partial = tmp_path / "killed.csv.partial"
    p = subprocess.Popen(cmd(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while p.poll() is None and (not partial.is_file() or partial.read_bytes().count(b"\n") < 30):
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait()
    assert not out.exists(), "the run finished before it could be killed"
    n_written = partial.read_bytes().count(b"\n") - 1
    assert 0 < n_written < 121
    with open(partial, "ab") as f:  # as if killed in the middle of writing a row
        f.write(b"/half/written.png,rev")
    r = subprocess.run(cmd(out, "--resume"), cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming after" in r.stderr
    assert out.read_text().splitlines() == full.read_text().splitlines()
    assert not partial.exists()


def test_a_hostile_batch_gives_one_row_per_input_with_reasons(tmp_path):
    """The awkward inputs of issue 13 and before, screened together: nothing crashes, nothing vanishes."""
    from bcc_core.screening import ScreeningConfig, screen

    d = tmp_path / "in"
    d.mkdir()
    jpeg = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)), "JPEG")
    files = {
        "empty.png": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "png_named.jpg": _png(seed=7),  # wrong extension, fine content: read
        "text.png": b"hello, not an image",
        "sixteen.png": _encode(Image.fromarray(np.full((12, 12), 30000, np.uint16)), "PNG"),
        "cmyk.jpg": _encode(Image.new("CMYK", (16, 16), (0, 100, 100, 0)), "JPEG"),
        "bomb16.png": _encode(Image.new("I;16", (9000, 9000)), "PNG", optimize=True),
        "tiny.png": _png(2, 2),
        "pages.tiff": _encode(Image.new("RGB", (16, 16)), "TIFF", save_all=True,
                              append_images=[Image.new("RGB", (16, 16), (9, 9, 9))]),
        "eps.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n",
        "gif.png": _encode(Image.new("RGB", (16, 16)), "GIF"),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    z = tmp_path / "mixed.zip"
    z.write_bytes(_zip([("../slip.png", _png(seed=1)), (".DS_Store", b"x"), ("inner.zip", b"PK"),
                        ("a.png", _png(seed=2)), ("a.png", _png(seed=3)), ("notes.txt", b"x")]))
    inputs = [d, z, tmp_path / "missing.png", tmp_path / "readme.md"]
    (tmp_path / "readme.md").write_text("x")
    sources = list(iter_image_sources(inputs))
    rows = screen(sources, _FakePredictor(), ScreeningConfig(batch_size=64, workers=2, thumbnail=0))
    assert len(rows) == len(files) + 6 + 2
    by = {Path(r["file"].split(":", 1)[-1] if ".zip:" in r["file"] else r["file"]).name: r for r in rows}
    ok = {"png_named.jpg", "sixteen.png", "cmyk.jpg", "a.png", "a (2).png"}
    assert {n for n, r in by.items() if r["status"] == "ok"} == ok
    assert all(r["reason"] for r in rows if r["status"] == "error")


def test_unknown_layer_type_is_refused_with_a_clear_message(tmp_path):
    import keras

    from bcc_core.models import HASH_KEY, file_sha256, load_model

    inp = keras.Input((4,))
    _write_model_dir(tmp_path / "m", keras.Model(inp, keras.layers.Dense(2, name="d")(inp)))
    # Rewrite the saved config so the Dense layer claims to be a class from some other package.
    src = tmp_path / "m" / "model.keras"
    with zipfile.ZipFile(src) as zin:
        parts = {n: zin.read(n) for n in zin.namelist()}
    cfg = json.loads(parts["config.json"])
    layer = next(l for l in cfg["config"]["layers"] if l["config"].get("name") == "d")
    layer.update({"module": "evil_pkg.layers", "class_name": "Backdoor", "registered_name": "evil_pkg>Backdoor"})
    parts["config.json"] = json.dumps(cfg).encode()
    with zipfile.ZipFile(src, "w") as zout:
        for n, b in parts.items():
            zout.writestr(n, b)
    card = json.loads((tmp_path / "m" / "model_card.json").read_text())
    card[HASH_KEY] = file_sha256(src)
    (tmp_path / "m" / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="refusing to load model.keras"):
        load_model(tmp_path / "m")


def test_resume_refuses_an_unfinished_run_with_other_settings(tmp_path):
    from bcc_core.cli import main

    if not (ROOT / "models" / "pbs5-mobilenetv2" / "model.keras").is_file():
        pytest.skip("bundled model missing")
    img = tmp_path / "a.png"
    img.write_bytes(_png(seed=1))
    out = tmp_path / "r.csv"
    (tmp_path / "r.csv.partial").write_text("file\n")
    (tmp_path / "r.csv.partial.json").write_text(json.dumps({"inputs": ["elsewhere"], "batch_size": 32}))
    assert main(["screen", str(img), "--out", str(out), "--resume", "--quiet"]) == 2
    assert not out.exists()
    assert main(["screen", str(img), "--out", str(out), "--quiet"]) == 0  # without --resume: starts again
    assert out.read_text().count("\n") == 2 and not (tmp_path / "r.csv.partial").exists()
