"""Issue 14's benchmark: the product's `screen` against the obvious pipeline, whole processes, same run.

    python bench/speed.py [--n 1000] [--runs 3] [--model models/pbs5-mobilenetv2] [--data ../shared/data/pbs5]

1. Whole-process wall time and peak memory for N pbs5 images (N/5 per class, the first by name):
   `python -m bcc_core screen DIR --out r.csv` vs `bench/_obvious.py` (cv2 decode + resize + Keras
   MobileNetV2 predict, batch 32, no safety work). The machine is shared with other jobs, so the two
   arms are interleaved (product, obvious, obvious, product, ...) within one run and the medians and
   the ratio come from the same run. Peak memory: the largest sum over the process tree (workers
   included) of proportional set size (PSS, shared pages counted once), sampled every 50 ms.
   Start-up: `screen` on one image as a whole process.
2. ms/image by stage, one core, in this process: decode, cell search, normalisation, quality gate,
   model (the exported runtime), trust (everything predict_inputs does after the forward pass),
   writing (CSV formatting + write).
3. The forward pass on each runtime (ONNX Runtime, OpenVINO, LiteRT, Keras), interleaved rounds of
   batch 32, with parity against Keras on real inputs and the bytes each adds to the model folder.
4. Explanations: single image, warm: predict only, and predict + Grad-CAM (the app's call).

Writes bench/results/speed.md and speed.json (every figure in them is measured by this script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def image_folder(data: Path, n: int) -> Path:
    """bench/_work/speed_<n>/: symlinks to the first n/5 images (by name) of each pbs5 class."""
    out = ROOT / "bench" / "_work" / f"speed_{n}"
    classes = sorted(p for p in data.iterdir() if p.is_dir())
    per = n // len(classes)
    want = {}
    for c in classes:
        for f in sorted(c.iterdir())[:per]:
            want[f"{c.name}__{f.name}"] = f
    if out.is_dir() and sorted(p.name for p in out.iterdir()) == sorted(want):
        return out
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        p.unlink()
    for name, f in want.items():
        (out / name).symlink_to(f.resolve())
    return out


def _pss_tree_mb(proc) -> float:
    total = 0.0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_full_info().pss
        except Exception:  # a worker that has just exited
            pass
    return total / 2**20


def run_process(cmd: list[str]) -> dict:
    """Wall time and peak PSS of the process tree of one command."""
    import psutil

    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(p.pid)
    peak = [0.0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _pss_tree_mb(ps))
            except psutil.NoSuchProcess:
                pass
            done.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = p.communicate()
    wall = time.perf_counter() - t
    done.set()
    th.join()
    if p.returncode:
        raise RuntimeError(f"{cmd} exited {p.returncode}: {err.decode()[-2000:]}")
    return {"wall_s": wall, "peak_pss_mb": peak[0]}


def whole_process(folder: Path, model: str, runs: int) -> dict:
    work = ROOT / "bench" / "_work"
    arms = {
        "product": [sys.executable, "-m", "bcc_core", "screen", str(folder), "--model", model,
                    "--out", str(work / "speed_product.csv"), "--quiet"],
        "obvious": [sys.executable, str(ROOT / "bench" / "_obvious.py"), str(folder), "--model", model,
                    "--out", str(work / "speed_obvious.csv")],
    }
    res = {k: [] for k in arms}
    for r in range(runs):
        order = ["product", "obvious"] if r % 2 == 0 else ["obvious", "product"]
        for arm in order:
            m = run_process(arms[arm])
            m["load_avg_1min"] = os.getloadavg()[0]
            res[arm].append(m)
            print(f"run {r + 1}/{runs} {arm}: {m['wall_s']:.1f} s, {m['peak_pss_mb']:.0f} MB", file=sys.stderr)
    n = len(list(folder.iterdir()))
    out = {"n_images": n, "runs": runs, "order": "interleaved, alternating which arm goes first"}
    for arm, ms in res.items():
        w = statistics.median(m["wall_s"] for m in ms)
        out[arm] = {"wall_s_median": w, "wall_s_all": [m["wall_s"] for m in ms], "images_per_s": n / w,
                    "ms_per_image": 1000 * w / n, "peak_pss_mb_max": max(m["peak_pss_mb"] for m in ms),
                    "load_avg_1min": [m["load_avg_1min"] for m in ms]}
    out["ratio_product_over_obvious"] = out["product"]["wall_s_median"] / out["obvious"]["wall_s_median"]
    out["ratio_per_run"] = [p["wall_s"] / o["wall_s"] for p, o in zip(res["product"], res["obvious"])]
    return out


def startup(folder: Path, model: str, runs: int = 5) -> dict:
    """Whole-process wall time of `screen` on one image: start-up (imports, model load) + one image."""
    one = ROOT / "bench" / "_work" / "speed_one"
    one.mkdir(parents=True, exist_ok=True)
    for p in one.iterdir():
        p.unlink()
    first = sorted(folder.iterdir())[0]
    (one / first.name).symlink_to(first.resolve())
    cmd = [sys.executable, "-m", "bcc_core", "screen", str(one), "--model", model,
           "--out", str(ROOT / "bench" / "_work" / "speed_one.csv"), "--quiet"]
    ms = [run_process(cmd) for _ in range(runs)]
    return {"one_image_wall_s_median": statistics.median(m["wall_s"] for m in ms),
            "one_image_wall_s_all": [m["wall_s"] for m in ms], "peak_pss_mb_max": max(m["peak_pss_mb"] for m in ms)}


def _median_ms(fn, n: int, repeats: int = 3) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts) / n


def stages(folder: Path, model: str, n: int = 200) -> dict:
    """ms/image of each stage on one core (OpenCV and BLAS single-threaded, as in screening's workers)."""
    import cv2
    from threadpoolctl import threadpool_limits

    from bcc_core.inference import Predictor
    from bcc_core.io import read_image
    from bcc_core.preprocess import find_cell, preprocess
    from bcc_core.quality import check_quality
    from bcc_core.report import results_to_csv
    from bcc_core.runtime import Runtime

    cv2.setNumThreads(1)
    pred = Predictor.load(model)
    files = sorted(folder.iterdir())[:: max(1, len(list(folder.iterdir())) // n)][:n]
    data = [f.read_bytes() for f in files]
    res = {"n_images": len(files)}
    with threadpool_limits(1, "blas"):
        imgs = [read_image(d) for d in data]
        res["decode"] = _median_ms(lambda: [read_image(d) for d in data], len(data))
        cells = [find_cell(im, pred.pcfg) for im in imgs]
        res["cell_search"] = _median_ms(lambda: [find_cell(im, pred.pcfg) for im in imgs], len(imgs))
        res["normalisation"] = _median_ms(lambda: [preprocess(im, pred.pcfg, c) for im, c in zip(imgs, cells)], len(imgs))
        res["quality_gate"] = _median_ms(lambda: [check_quality(im, pred.qcfg, c) for im, c in zip(imgs, cells)], len(imgs))
        prepared = [pred.prepare(im) for im in imgs]
        x = np.stack([p[0] for p in prepared])
        q = [p[1] for p in prepared]
        rt1 = Runtime(model, threads=1)
        rt1.forward(x[:8])
        res["model_1_thread"] = _median_ms(lambda: rt1.forward(x, 32), len(x))
        pred.forward(x[:8])
        res["model_default_threads"] = _median_ms(lambda: pred.forward(x, 32), len(x))
        out = pred.forward(x, 32)
        pred.forward = lambda inputs, batch_size=32: out  # trust alone: the forward pass answered from memory
        pred.predict_inputs(x, q)
        res["trust"] = _median_ms(lambda: pred.predict_inputs(x, q), len(x))
        from bcc_core.results import ScreenResult

        rows = [ScreenResult.from_prediction(f.name, p, "0" * 64).to_row() for f, p in zip(files, pred.predict_inputs(x, q))]
        for r in rows:
            r.pop("thumbnail")
        sink = ROOT / "bench" / "_work" / "speed_write.csv"

        def write():
            with open(sink, "wb") as fh:
                for r in rows:
                    fh.write(results_to_csv([r], pred.classes).split("\n", 1)[1].encode())
                    fh.flush()

        res["writing"] = _median_ms(write, len(rows))
    res["runtime_backend"] = pred.runtime_backend
    return res


def _litert_model(model_dir: str, tmp: Path) -> Path:
    """The same three-output forward pass converted to LiteRT (fp32; the weights are inside the file)."""
    import tensorflow as tf

    from bcc_core.models import load_model, trust_outputs_model

    m, card = load_model(model_dir)
    tm = trust_outputs_model(m, (card.ood or {}).get("early_layer"))
    saved = tmp / "forward_savedmodel"
    tm.export(str(saved), format="tf_saved_model", verbose=False)
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    path = tmp / "forward.tflite"
    path.write_bytes(conv.convert())
    return path


def runtimes(folder: Path, model: str, rounds: int = 3) -> dict:
    """ms/image of the forward pass (batch 32, default threads) per runtime, interleaved rounds."""
    from bcc_core.export import parity
    from bcc_core.inference import Predictor
    from bcc_core.io import read_image
    from bcc_core.runtime import Runtime

    keras_pred = Predictor.load(model, runtime="keras")
    files = sorted(folder.iterdir())[:: max(1, len(list(folder.iterdir())) // 32)][:32]
    x = np.stack([keras_pred.prepare(read_image(f))[0] for f in files])
    ref = keras_pred.forward(x, 32)
    fns = {"keras": lambda: keras_pred.forward(x, 32)}
    sizes = {"keras": 0}
    for b in ("onnxruntime", "openvino"):
        rt = Runtime(model, backend=b)
        fns[b] = (lambda r: lambda: r.forward(x, 32))(rt)
        sizes[b] = sum((Path(model) / f).stat().st_size for f in ("runtime.onnx", "runtime.json"))
    try:
        from ai_edge_litert.interpreter import Interpreter

        tfl = _litert_model(model, ROOT / "bench" / "_work")
        it = Interpreter(model_path=str(tfl), num_threads=os.cpu_count())
        inp = it.get_input_details()[0]
        it.resize_tensor_input(inp["index"], [len(x), *x.shape[1:]])
        it.allocate_tensors()
        outs = it.get_output_details()

        def lite():
            it.set_tensor(inp["index"], x.astype(np.float32))
            it.invoke()
            return [it.get_tensor(o["index"]) for o in outs]

        got = lite()
        # Match LiteRT's outputs to (features, logits, early) by width.
        widths = {t.shape[1]: t for t in got}
        lite_out = tuple(widths.get(r.shape[1]) for r in ref)
        fns["litert"] = lite
        sizes["litert"] = tfl.stat().st_size
    except Exception as e:  # LiteRT not installed or conversion failed: recorded, not fatal
        lite_out, fns_err = None, f"{type(e).__name__}: {e}"
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            f()
            t = time.perf_counter()
            f()
            times[k].append(1000 * (time.perf_counter() - t) / len(x))
    res = {}
    for k in fns:
        res[k] = {"ms_per_image": statistics.median(times[k]), "adds_to_model_folder_bytes": sizes[k]}
    for b in ("onnxruntime", "openvino"):
        res[b]["parity"] = parity(ref, Runtime(model, backend=b).forward(x, 32), keras_pred.card.temperature)
    if "litert" in res and lite_out is not None and all(t is not None for t in lite_out[:2]):
        res["litert"]["parity"] = parity(ref, lite_out, keras_pred.card.temperature)
    elif "litert" not in res:
        res["litert"] = {"error": fns_err}
    res["parity_inputs"] = f"{len(x)} real pbs5 images"
    return res


def explanations(model: str, repeats: int = 15) -> dict:
    from conftest import synthetic_cell

    from bcc_core.explain import explain
    from bcc_core.inference import Predictor

    img = synthetic_cell(360, 50, seed=1)
    res = {}
    for label, rt in (("export", "auto"), ("keras", "keras")):
        pred = Predictor.load(model, runtime=rt)

        def single():
            return pred.predict([img])[0]

        def with_cam():
            r = pred.predict([img])[0]
            return explain(pred, r.model_input, "gradcam", pred.classes.index(r.predicted_class))

        for f in (single, with_cam, with_cam):  # warm: the first calls build and compile
            f()
        res[f"{label}_single_predict_ms"] = statistics.median(_median_ms(single, 1, 1) for _ in range(repeats))
        res[f"{label}_single_predict_plus_gradcam_ms"] = statistics.median(_median_ms(with_cam, 1, 1) for _ in range(repeats))
    return res


def write(res: dict, out: Path) -> None:
    w, st, rt, ex = res["whole_process"], res["stages_ms_per_image"], res["runtimes"], res["explanations"]
    p, o = w["product"], w["obvious"]
    lines = [
        "# Speed — screening vs the obvious pipeline (issue 14)", "",
        f"Generated by `bench/speed.py` on {res['date']} (commit {res['commit']}). CPU: {res['cpu']['model']}, "
        f"{res['cpu']['cores']} cores, shared with other jobs (1-min load average {res['cpu']['load_avg_start']:.1f} at "
        f"start, {res['cpu']['load_avg_end']:.1f} at end). Medians of {w['runs']} runs; the two arms are interleaved in "
        f"the same run (alternating which goes first), so both meet the same load.", "",
        f"## Whole process, {w['n_images']} pbs5 images", "",
        "| | wall time (median) | all runs | images/s | ms/image | peak memory (PSS, process tree) |",
        "|---|---|---|---|---|---|",
        f"| product: `python -m bcc_core screen DIR --out r.csv` | {p['wall_s_median']:.1f} s | "
        f"{', '.join(f'{v:.1f}' for v in p['wall_s_all'])} | {p['images_per_s']:.1f} | {p['ms_per_image']:.1f} | "
        f"{p['peak_pss_mb_max']:.0f} MB |",
        f"| obvious: cv2 decode + resize + Keras MobileNetV2 predict (batch 32), no safety work | "
        f"{o['wall_s_median']:.1f} s | {', '.join(f'{v:.1f}' for v in o['wall_s_all'])} | {o['images_per_s']:.1f} | "
        f"{o['ms_per_image']:.1f} | {o['peak_pss_mb_max']:.0f} MB |", "",
        f"**Ratio product / obvious: {w['ratio_product_over_obvious']:.2f}** (per run: "
        f"{', '.join(f'{v:.2f}' for v in w['ratio_per_run'])}; target ≤ 0.50).", "",
        (f"Start-up: `screen` on one image, whole process, {res['startup']['one_image_wall_s_median']:.2f} s (median of "
         f"{len(res['startup']['one_image_wall_s_all'])}: {', '.join(f'{v:.2f}' for v in res['startup']['one_image_wall_s_all'])}"
         f"; peak {res['startup']['peak_pss_mb_max']:.0f} MB); TensorFlow is not imported "
         "(tests/model/test_runtime.py).") if res.get("startup") else "", "",
        f"## Stages, ms/image on one core (OpenCV/BLAS single-threaded; {st['n_images']} images)", "",
        "| decode | cell search | normalisation | quality gate | model (1 thread) | model (default threads) | trust | writing |",
        "|---|---|---|---|---|---|---|---|",
        "| " + " | ".join(f"{st[k]:.2f}" for k in ("decode", "cell_search", "normalisation", "quality_gate",
                                                    "model_1_thread", "model_default_threads", "trust", "writing")) + " |",
        "", f"The product runs decode + cell search + normalisation + quality gate in 2 worker processes, overlapping "
            f"the model ({st['runtime_backend']}) and trust in the main process.", "",
        "## Forward pass per runtime (batch 32, interleaved rounds; parity against Keras on "
        f"{rt['parity_inputs']})", "",
        "| runtime | ms/image | top-1 equal | max calibrated-probability difference | adds to the model folder |",
        "|---|---|---|---|---|"]
    for k in ("onnxruntime", "openvino", "litert", "keras"):
        r = rt.get(k, {})
        if "error" in r:
            lines.append(f"| {k} | not measured: {r['error']} | | | |")
            continue
        par = r.get("parity")
        lines.append(f"| {k} | {r['ms_per_image']:.2f} | "
                     + (f"{par['top1_equal']}/{par['n']} | {par['max_prob_diff']:.1e} | " if par else "reference | 0 | ")
                     + f"{r['adds_to_model_folder_bytes'] / 1e6:.2f} MB |")
    lines += ["", "ONNX Runtime and OpenVINO run the same `runtime.onnx`, whose weights are read from `model.keras` "
                  "(nothing copied); a LiteRT file carries its own copy of the weights.", "",
              "## Single image, warm (median of 15)", "",
              "| forward pass | predict | predict + Grad-CAM (all classes, app's call) |", "|---|---|---|",
              f"| exported runtime (Grad-CAM on Keras) | {ex['export_single_predict_ms']:.1f} ms | "
              f"{ex['export_single_predict_plus_gradcam_ms']:.1f} ms |",
              f"| Keras | {ex['keras_single_predict_ms']:.1f} ms | {ex['keras_single_predict_plus_gradcam_ms']:.1f} ms |", ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default="models/pbs5-mobilenetv2")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbs5"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "speed.md"))
    ap.add_argument("--skip", default="", help="comma-separated parts to skip (reuses them from --out's json)")
    a = ap.parse_args(argv)
    model = str((ROOT / a.model) if not Path(a.model).is_absolute() else a.model)
    folder = image_folder(Path(a.data), a.n)
    out = Path(a.out)
    old = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    skip = set(filter(None, a.skip.split(",")))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
           "cpu": {"model": cpu_model(), "cores": os.cpu_count(), "load_avg_start": os.getloadavg()[0]},
           "model": Path(model).name}
    print(f"CPU: {res['cpu']['model']}, {res['cpu']['cores']} cores", file=sys.stderr)
    res["whole_process"] = old["whole_process"] if "whole" in skip else whole_process(folder, model, a.runs)
    res["startup"] = old.get("startup") if "startup" in skip else startup(folder, model)
    res["stages_ms_per_image"] = old["stages_ms_per_image"] if "stages" in skip else stages(folder, model)
    res["runtimes"] = old["runtimes"] if "runtimes" in skip else runtimes(folder, model)
    res["explanations"] = old["explanations"] if "explain" in skip else explanations(model)
    res["cpu"]["load_avg_end"] = os.getloadavg()[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    write(res, out)
    print(out.read_text())


if __name__ == "__main__":
    main()
