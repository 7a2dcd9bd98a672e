"""A fresh checkout with no ../shared data shows a sample result with one click (issue 11 item 8).

The app, the core package, the bundled pbs5 model and assets/ are copied to a temporary folder that has no
`shared/` beside it, and the single-image page is driven there in a separate Python process (so nothing is
imported from, or read beside, this checkout): log in, click "Try a sample", get a result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app_fixtures import BUNDLED, PASSWORD, ROOT

pytestmark = pytest.mark.slow  # loads TensorFlow and the model in a second process

_DRIVER = r"""
import json, sys
from streamlit.testing.v1 import AppTest
from bcc_core import store, users

eng = store.open_store(sys.argv[1])
users.add_user(eng, "rita", sys.argv[2], "reviewer", actor="test-setup")
eng.dispose()
at = AppTest.from_file("app.py", default_timeout=300)
at.run()
at.text_input(key="login_user").input("rita")
at.text_input(key="login_password").input(sys.argv[2])
next(b for b in at.button if b.label == "Log in").click().run()
at.switch_page("pages/single_image.py").run()
before = "single" in at.session_state and at.session_state["single"] is not None
at.button(key="single_try_sample").click().run()
res = at.session_state["single"]
print(json.dumps({
    "exceptions": [str(e.value) for e in at.exception],
    "result_before_click": before,
    "name": res["name"] if res else None,
    "predicted_class": res["pred"].predicted_class if res else None,
    "status": res["pred"].status if res else None,
    "subheaders": [s.value for s in at.subheader],
    "sample_file": at.session_state["single_sample"],
}))
"""


def _copy_checkout(dst: Path) -> None:
    dst.mkdir(parents=True)
    for name in ("app.py", "bcc_core", "pages", "assets", ".streamlit"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy2(src, dst / name)
    shutil.copytree(ROOT / "models" / BUNDLED, dst / "models" / BUNDLED)


def test_fresh_checkout_without_shared_data_shows_a_sample_result_in_one_click(tmp_path):
    if not (ROOT / "models" / BUNDLED / "model_card.json").is_file():
        pytest.skip(f"no bundled model {BUNDLED}")
    clone = tmp_path / "checkout"
    _copy_checkout(clone)
    assert not (tmp_path / "shared").exists()  # no ../shared beside this checkout
    env = {k: v for k, v in os.environ.items() if not k.startswith("BCC_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(clone), BCC_DATA_DIR=str(tmp_path / "data"), HOME=str(tmp_path / "home"))
    (tmp_path / "data").mkdir()
    out = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path / "data" / "bcc.sqlite"), PASSWORD],
                         cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["exceptions"] == []
    assert r["result_before_click"] is False
    # The sample shown is the checkout's own file, of a class of the model, and it has a result on the page.
    assert Path(r["sample_file"]).is_relative_to(clone / "assets" / "samples")
    card = json.loads((clone / "models" / BUNDLED / "model_card.json").read_text())
    assert r["name"] == Path(r["sample_file"]).name and r["predicted_class"] in card["classes"]
    assert r["status"] in ("ok", "review") and "Result" in r["subheaders"]
