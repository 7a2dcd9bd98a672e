"""Speed and memory: single-image result incl. Grad-CAM (warm), batch throughput vs the naive loop,
app start-up time and the running app's memory.

Usage: python bench/perf.py --model models/pbs5-mobilenetv2 --out bench/results/perf.md [--app]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def median_ms(fn, repeats=7, warmup=2):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def app_startup(repeats=3):
    """Median seconds from `streamlit run app.py` to the first page drawn in headless Chromium, and the
    server's peak memory after a real prediction with Grad-CAM through the browser."""
    import cv2
    from playwright.sync_api import expect, sync_playwright

    from conftest import synthetic_cell

    img = ROOT / "bench" / "_work" / "perf_cell.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(img), synthetic_cell(360, 50, seed=2)[..., ::-1])
    args = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    ready, rss = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args, headless=True)
        for _ in range(repeats):
            port = free_port()
            t = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                                     "--server.port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            try:
                while time.perf_counter() - t < 120:
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
                        break
                    except Exception:
                        time.sleep(0.1)
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}", wait_until="domcontentloaded")
                page.locator("input[type=file]").first.wait_for(state="attached", timeout=120000)
                ready.append(time.perf_counter() - t)
                page.set_input_files("input[type=file]", str(img))
                expect(page.get_by_text("Grad-CAM explanation").first).to_be_visible(timeout=120000)
                page.wait_for_timeout(1000)
                rss.append(_rss_mb(proc.pid))
                page.close()
            finally:
                proc.terminate()
                proc.wait(10)
        browser.close()
    return statistics.median(ready), max(rss)


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
    a = ap.parse_args(argv)
    import resource

    from conftest import synthetic_cell

    from bcc_core.explain import explain
    from bcc_core.inference import Predictor

    t = time.perf_counter()
    pred = Predictor.load(ROOT / a.model)
    load_s = time.perf_counter() - t
    img = synthetic_cell(360, 50, seed=1)

    def single():
        r = pred.predict([img])[0]
        explain(pred, r.model_input, "gradcam")

    res = {"model_load_s": load_s,
           "single_predict_ms": median_ms(lambda: pred.predict([img])),
           "single_predict_plus_gradcam_ms": median_ms(single),
           "gradcam_pp_ms": median_ms(lambda: explain(pred, pred.predict([img])[0].model_input, "gradcam++"), 5),
           "scorecam_ms": median_ms(lambda: explain(pred, pred.predict([img])[0].model_input, "scorecam"), 3, 1)}
    imgs = [synthetic_cell(360, 40 + i % 20, seed=i) for i in range(64)]
    batch = median_ms(lambda: pred.predict(imgs), 3, 1) / 64
    x = np.stack([r.model_input for r in pred.predict(imgs[:16])]).astype(np.float32)
    naive = median_ms(lambda: [pred.model(x[i:i + 1], training=False) for i in range(16)], 3, 1) / 16
    res.update({"batch64_ms_per_image_full_pipeline": batch, "naive_eager_loop_ms_per_image": naive,
                "speedup_vs_naive_loop": naive / batch,
                "peak_rss_mb_core": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    if a.app:
        s, rss = app_startup()
        res.update({"app_first_page_in_browser_s_median3": s, "app_server_rss_after_prediction_mb_max": rss})
    lines = [f"# Performance — `{Path(a.model).name}` (2-core CPU, medians)", "", "Generated by `bench/perf.py`.", "",
             "| measure | value |", "|---|---|"]
    for k, v in res.items():
        lines.append(f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
