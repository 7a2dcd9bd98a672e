"""The running app in a real headless browser: upload one image, see the suggestion and the Grad-CAM.

Starts `streamlit run app.py` on a free port, drives it with Playwright in Debian's Chromium, and saves
a full-page screenshot (copied to bench/results/screenshots/single_image.png for the docs when
BCC_UPDATE_SCREENSHOT=1, so a plain test run leaves the checkout clean).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from app_fixtures import app_env, blank_png, cell_png, model_dir  # noqa: F401  (pytest fixtures)
from app_test_images import png_bytes, synthetic_cell

ROOT = Path(__file__).resolve().parents[2]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = ROOT / "bench" / "results" / "screenshots" / "single_image.png"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


@pytest.fixture
def server(model_dir, tmp_path):
    port = _free_port()
    env = {**os.environ, "BCC_MODELS_DIR": str(model_dir.parent), "BCC_AUDIT_DB": str(tmp_path / "audit.sqlite"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(f"http://127.0.0.1:{port}/_stcore/health", proc)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")
def test_single_image_in_browser(server, model_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    classes = json.loads((model_dir / "model_card.json").read_text())["classes"]
    img = tmp_path / "cell.png"
    img.write_bytes(png_bytes(synthetic_cell(1)))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(server, wait_until="domcontentloaded")
            expect(page.get_by_role("heading", name="Single image")).to_be_visible(timeout=60_000)
            expect(page.get_by_text("Decision support, not a diagnosis").first).to_be_visible()

            page.set_input_files("input[type=file]", str(img))
            # Model loading on first use and TF warm-up can take a while on a shared 2-core machine.
            label = page.get_by_test_id("stMetricLabel").filter(has_text="Suggested class")
            expect(label).to_be_visible(timeout=180_000)
            value = page.get_by_test_id("stMetric").filter(has_text="Suggested class").get_by_test_id("stMetricValue")
            suggested = value.inner_text().strip()
            assert suggested in classes, suggested

            heading = page.get_by_role("heading", name="Grad-CAM explanation")
            expect(heading).to_be_visible()
            cam = page.get_by_test_id("stImage").filter(has_text="Grad-CAM for").locator("img")
            expect(cam.first).to_be_visible(timeout=120_000)
            # The overlay sits below its heading and has really loaded (non-zero natural size).
            assert cam.first.bounding_box()["y"] > heading.bounding_box()["y"]
            assert cam.first.evaluate("el => el.complete && el.naturalWidth") > 0
            expect(page.get_by_test_id("stException")).to_have_count(0)

            # Streamlit scrolls an inner container, so a "full page" shot of the document would only
            # show the viewport: grow the viewport to the content's height first.
            height = page.evaluate("""() => Math.max(document.body.scrollHeight, ...Array.from(
                document.querySelectorAll('[data-testid=stMain], [data-testid=stAppViewContainer], '
                                          + '[data-testid=stSidebarContent]')).map(e => e.scrollHeight))""")
            page.set_viewport_size({"width": 1400, "height": min(int(height) + 40, 12000)})
            page.wait_for_timeout(1500)  # let charts re-layout and finish drawing
            shot = tmp_path / "single_image.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("BCC_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
