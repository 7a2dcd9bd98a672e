"""The running app: model load time, start-up to the first page drawn in a browser, and the server's memory.

Screening and single-image speed against the obvious pipeline are measured by bench/speed.py.

Usage: python bench/perf.py --model models/pbs5-mobilenetv2 --out bench/results/perf.md [--app]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _report import write_report  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def app_startup(repeats=3):
    """Median seconds from `streamlit run app.py` to the first page drawn in headless Chromium (the login
    page: the app shows nothing else until someone has logged in), median seconds from pressing "Log in" to
    the image uploader, and the server's peak memory after a real prediction with Grad-CAM through the
    browser. The app runs over a throw-away store holding one reviewer account."""
    import os
    import tempfile

    import cv2
    from playwright.sync_api import expect, sync_playwright

    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "app")]  # the tests' synthetic cell and accounts
    from app_fixtures import REVIEWER, make_users, submit_login
    from conftest import synthetic_cell

    img = ROOT / "bench" / "_work" / "perf_cell.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(img), synthetic_cell(360, 50, seed=2)[..., ::-1])
    args = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    first, uploader, rss = [], [], []
    with tempfile.TemporaryDirectory() as data, sync_playwright() as p:
        make_users(Path(data))
        env = {**os.environ, "BCC_DATA_DIR": data}
        env.pop("BCC_DATABASE_URL", None)
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args, headless=True)
        for _ in range(repeats):
            port = free_port()
            t = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                                     "--server.port", str(port), "--browser.gatherUsageStats", "false"], cwd=ROOT,
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                while time.perf_counter() - t < 120:
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
                        break
                    except Exception:
                        time.sleep(0.1)
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}", wait_until="domcontentloaded")
                expect(page.get_by_role("heading", name="Log in")).to_be_visible(timeout=120_000)
                first.append(time.perf_counter() - t)
                t_login = time.perf_counter()
                submit_login(page, REVIEWER)
                page.locator("input[type=file]").first.wait_for(state="attached", timeout=120_000)
                uploader.append(time.perf_counter() - t_login)
                page.set_input_files("input[type=file]", str(img))
                expect(page.get_by_text("Grad-CAM explanation").first).to_be_visible(timeout=120_000)
                page.wait_for_timeout(1000)
                rss.append(_rss_mb(proc.pid))
                page.close()
            finally:
                proc.terminate()
                proc.wait(10)
        browser.close()
    return statistics.median(first), statistics.median(uploader), max(rss)


def _rss_mb(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/pbs5-mobilenetv2")
    ap.add_argument("--out", default="bench/results/perf.md")
    ap.add_argument("--app", action="store_true", help="also measure app start-up")
    ap.add_argument("--repeats", type=int, default=3, help="app start-ups measured (median)")
    a = ap.parse_args(argv)
    from bcc_core.inference import Predictor

    t = time.perf_counter()
    Predictor.load(ROOT / a.model)
    res = {"model_load_s": time.perf_counter() - t}
    if a.app:
        s, up, rss = app_startup(a.repeats)
        res.update({f"app_first_page_in_browser_s_median{a.repeats}": s,
                    f"app_uploader_after_login_s_median{a.repeats}": up,
                    "app_server_rss_after_prediction_mb_max": rss})
    lines = [f"# The running app — `{Path(a.model).name}` (2-core CPU, medians)", "", "Generated by `bench/perf.py`; "
             "screening and single-image speed are in the speed section (`bench/speed.py`).", "",
             "| measure | value |", "|---|---|"]
    for k, v in res.items():
        lines.append(f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |")
    write_report(a.out, lines, res)


if __name__ == "__main__":
    main()
