"""Shared fixtures: synthetic cell images and paths to real data / bundled models."""

from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODELS = ROOT / "models"


def synthetic_cell(size=360, nucleus=60, seed=0, lobes=1) -> np.ndarray:
    """A Romanowsky-like single cell: pink red cells, lilac cytoplasm, purple nucleus, on a light background."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (235, 225, 230), np.uint8)
    for _ in range(12):
        c = tuple(int(v) for v in rng.integers(0, size, 2))
        cv2.circle(img, c, int(size * 0.08), (220, 170, 180), -1)
    c = (size // 2, size // 2)
    cv2.circle(img, c, int(nucleus * 1.5), (205, 180, 215), -1)
    for k in range(lobes):
        off = (int(c[0] + (k - (lobes - 1) / 2) * nucleus * 0.7), c[1])
        cv2.circle(img, off, nucleus if lobes == 1 else nucleus // 2, (110, 50, 150), -1)
    noise = rng.normal(0, 3, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _tree(root: Path) -> dict:
    """Every file under `root`: its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def bundled_models_untouched():
    """The bundled models are the product: a test that writes into models/ (an adapted model, an export, a
    rebuilt bank) would change what the next test and the user get. Fails the run if any file there was
    added, removed or rewritten."""
    before = _tree(MODELS) if MODELS.is_dir() else {}
    yield
    after = _tree(MODELS) if MODELS.is_dir() else {}
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the test run changed files under {MODELS}: {changed[:10]}"


@pytest.fixture
def cell_image():
    return synthetic_cell()


def require_shared():
    if not SHARED.is_dir():
        pytest.skip(f"real data not available at {SHARED}")
    return SHARED


def require_model(name="pbs5-mobilenetv2"):
    d = MODELS / name
    if not (d / "model.keras").is_file():
        pytest.skip(f"bundled model {d} not present")
    return d
