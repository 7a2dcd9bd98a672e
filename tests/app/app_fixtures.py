"""Fixtures for the app tests: the model to test against, synthetic cell images, a private store with one
user per role, and a helper that logs an AppTest in.

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
PASSWORD = "test password 123"
# One account per role in every test's store: user name -> role.
TEST_USERS = {"ada": "admin", "sam": "signer", "rita": "reviewer", "vic": "viewer"}
REVIEWER = next(name for name, role in TEST_USERS.items() if role == "reviewer")


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


def make_users(data_dir: Path) -> None:
    """The store in `data_dir` with the TEST_USERS accounts (password PASSWORD)."""
    from bcc_core import store, users

    eng = store.open_store(str(data_dir / "bcc.sqlite"))
    for name, role in TEST_USERS.items():
        users.add_user(eng, name, PASSWORD, role, actor="test-setup")
    eng.dispose()


@pytest.fixture
def app_env(model_dir, tmp_path, monkeypatch):
    """Environment the app runs under in tests: the model's root and a throw-away data folder whose store
    (cases, users, trail) has one user per role."""
    monkeypatch.setenv("BCC_MODELS_DIR", str(model_dir.parent))
    monkeypatch.setenv("BCC_DATA_DIR", str(tmp_path / "data"))   # lab models, cases: never the user's ~/.bcc
    monkeypatch.delenv("BCC_DATABASE_URL", raising=False)
    make_users(tmp_path / "data")
    return {"model_dir": model_dir, "data_dir": tmp_path / "data", "db": tmp_path / "data" / "bcc.sqlite"}


def submit_login(page, name: str = REVIEWER, password: str = PASSWORD) -> None:
    """Fill a browser page's login form and submit it (the browser tests and `bench/perf.py`)."""
    page.get_by_role("textbox", name="User name").fill(name)
    page.get_by_role("textbox", name="Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def log_in(at, name: str, password: str = PASSWORD):
    """Log an AppTest in through the login form (as a user would); returns the AppTest after the run."""
    at.text_input(key="login_user").input(name)
    at.text_input(key="login_password").input(password)
    next(b for b in at.button if b.label == "Log in").click().run()
    return at


def finish_batch(at, timeout: float = 600):
    """After the click that started a batch run (a background job of bcc_core.jobs, not part of the script run):
    wait until every job has ended, then run the page again so that it shows the case."""
    from bcc_core import jobs

    assert jobs.wait_all(timeout), "the screening job did not end"
    return at.run()


@pytest.fixture
def cell_png() -> bytes:
    return png_bytes(synthetic_cell(0))


@pytest.fixture
def blank_png() -> bytes:
    """A flat pink field with no cell at all: the quality gate must flag it."""
    return png_bytes(np.full((360, 360, 3), (236, 214, 222), np.uint8))

