"""Fixtures for the app tests: the model to test against, synthetic cell images, a private audit DB.

Not a conftest.py on purpose: other test folders do `from conftest import ...`, and a second
conftest module here would shadow theirs. Test modules import these fixtures explicitly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # pages import `pages._shared` and `bcc_core` from the repo root
    sys.path.insert(0, str(ROOT))

from app_test_images import png_bytes, synthetic_cell  # noqa: E402  (after the sys.path set-up)

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
    monkeypatch.setenv("BCC_DATA_DIR", str(tmp_path / "data"))   # lab models, cases: never the user's ~/.bcc
    return {"model_dir": model_dir, "audit_db": tmp_path / "audit.sqlite", "data_dir": tmp_path / "data"}


@pytest.fixture
def cell_png() -> bytes:
    return png_bytes(synthetic_cell(0))


@pytest.fixture
def blank_png() -> bytes:
    """A flat pink field with no cell at all: the quality gate must flag it."""
    return png_bytes(np.full((360, 360, 3), (236, 214, 222), np.uint8))

