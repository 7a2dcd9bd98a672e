"""Fixtures for the app tests: the model to test against, synthetic cell images, a private audit DB."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pages import `pages._shared` and `bcc_core` from the repo root
    sys.path.insert(0, str(ROOT))

BUNDLED = "pbs5-mobilenetv2"


def _models_root() -> Path:
    return Path(os.environ.get("BCC_MODELS_DIR") or ROOT / "models")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The bundled model (models/pbs5-mobilenetv2); with $BCC_MODELS_DIR set, its first model."""
    root = _models_root()
    bundled = root / BUNDLED
    if (bundled / "model_card.json").is_file():
        return bundled
    if os.environ.get("BCC_MODELS_DIR"):
        found = sorted(p.parent for p in root.glob("*/model_card.json"))
        if found:
            return found[0]
    pytest.skip(f"no bundled model yet: {bundled}/model_card.json is missing (train it with "
                f"`python -m bcc_core train --data ../shared/data/pbs5 --out models/{BUNDLED}`)")


@pytest.fixture
def app_env(model_dir, tmp_path, monkeypatch):
    """Environment the app runs under in tests: the model's root and a throw-away audit database."""
    monkeypatch.setenv("BCC_MODELS_DIR", str(model_dir.parent))
    monkeypatch.setenv("BCC_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    return {"model_dir": model_dir, "audit_db": tmp_path / "audit.sqlite"}


def synthetic_cell(seed: int = 0, size: int = 360) -> np.ndarray:
    """A stained-smear-like single-cell image: (size, size, 3) uint8 RGB.

    Light pink background, a few pale pink red cells, a lilac cytoplasm disc in the centre with a
    purple nucleus inside it, plus mild noise so it is not flat.
    """
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (236, 214, 222), np.uint8)
    for _ in range(6):
        c = tuple(int(v) for v in rng.integers(20, size - 20, 2))
        r = int(rng.integers(28, 40))
        cv2.circle(img, c, r, (222, 170, 180), -1, lineType=cv2.LINE_AA)
        cv2.circle(img, c, max(r // 3, 4), (230, 195, 203), -1, lineType=cv2.LINE_AA)
    ctr = (size // 2 + int(rng.integers(-8, 9)), size // 2 + int(rng.integers(-8, 9)))
    cv2.circle(img, ctr, int(size * 0.17), (196, 170, 214), -1, lineType=cv2.LINE_AA)   # cytoplasm
    cv2.ellipse(img, ctr, (int(size * 0.1), int(size * 0.08)), float(rng.integers(0, 180)), 0, 360,
                (104, 52, 140), -1, lineType=cv2.LINE_AA)                                 # nucleus
    noise = rng.normal(0, 3, img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def cell_png() -> bytes:
    return png_bytes(synthetic_cell(0))


@pytest.fixture
def blank_png() -> bytes:
    """A flat pink field with no cell at all: the quality gate must flag it."""
    return png_bytes(np.full((360, 360, 3), (236, 214, 222), np.uint8))


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: drives the running app in a real headless browser (Chromium)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
