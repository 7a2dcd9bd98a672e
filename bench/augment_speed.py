"""Augmentation cost per image (ms, median of several runs) for each preset and each cross-lab op.

Runs on real pbs5 model inputs when ../shared/data is present, otherwise on synthetic 224 px images.
Usage: python bench/augment_speed.py --out bench/results/augment_speed.md [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bcc_core import augment as A  # noqa: E402
from bcc_core.augment import AugmentConfig  # noqa: E402


def inputs(data: Path, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    root = data / "pbs5"
    if root.is_dir():
        from bcc_core.data import list_imagefolder, subset
        from bcc_core.preprocess import PreprocessConfig
        from bcc_core.training import load_images

        ds = subset(list_imagefolder(root, verify=False), n // 5, seed=0)
        x = load_images(list(ds.paths), PreprocessConfig(), progress=False)[0]
        return x, np.asarray(ds.labels), f"{len(x)} real pbs5 model inputs"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8), np.arange(n) % 5, f"{n} synthetic images"


def median_ms(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times) / n_images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    x, y, what = inputs(Path(a.data), a.n)
    n = len(x)
    lines = ["# Augmentation speed", "", f"`bench/augment_speed.py`: {what}, 224 px, one thread, median of {a.repeats} runs.",
             "The frozen-feature path augments each training image once per view; end-to-end fine-tuning augments "
             "every image every epoch in 2 worker threads while the model trains.", "",
             "| preset / operation | ms per image |", "|---|---|"]
    presets = {"none (copy)": AugmentConfig.none(), "study1": AugmentConfig.study1_only(), "full (default)": AugmentConfig(),
               "cross_lab (pbs5 recipe)": AugmentConfig.cross_lab()}
    for name, cfg in presets.items():
        ms = median_ms(lambda: A.augment_batch(x, 0, cfg, labels=y), n, a.repeats)
        lines.append(f"| {name} | {ms:.2f} |")
    rng = np.random.default_rng(0)
    partners = x[rng.permutation(n)]
    ops = {"amplitude_mix": lambda: [A.amplitude_mix(x[i], partners[i], 0.5) for i in range(n)],
           "lab_jitter": lambda: [A.lab_jitter(x[i], (5, 3, -3), (1.2, 0.9, 1.1)) for i in range(n)],
           "tight_crop": lambda: [A.tight_crop(x[i], 0.7, 0.8) for i in range(n)],
           "unsharp_mask sigma 2": lambda: [A.unsharp_mask(x[i], 2.0, 1.0) for i in range(n)],
           "gaussian_blur sigma 2": lambda: [A.gaussian_blur(x[i], 2.0) for i in range(n)],
           "down_up 0.4": lambda: [A.down_up(x[i], 0.4) for i in range(n)],
           "jpeg q50": lambda: [A.jpeg(x[i], 50) for i in range(n)]}
    for name, fn in ops.items():
        lines.append(f"| op: {name} | {median_ms(fn, n, a.repeats):.2f} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
