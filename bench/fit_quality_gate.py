"""Fit the quality gate's data-driven thresholds on training parts only; write bcc_core/quality_fit.json.

Images: the valid single-cell crops that are in the *training* part of every bundled model that uses
them — pbs5 files in the train part of both ``models/pbs5-mobilenetv2/split.json`` and
``models/pb7-mobilenetv2/split.json``, and LISC files in the pb7 train part. No validation or test
image, no all4 field (the fitted limits are single-cell limits) and never BCCD (measurement only; the
fit refuses it through ``bcc_core.fit_guard``). The fitting rules are in
``bcc_core.quality.thresholds_from_measures``; the rates on held-out images and on BCCD are measured
afterwards by ``bench/quality_gate.py``.

Usage (from the repository root)::

    .venv/bin/python bench/fit_quality_gate.py --data ../shared/data

If a bundled model's split changes, re-run it: the file records the SHA-256 of the split files used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bcc_core import quality  # noqa: E402

# (model folder, source prefix inside its split file or "" for a single-source split, data folder)
TRAIN_PARTS = {
    "pbs5": [("pbs5-mobilenetv2", ""), ("pb7-mobilenetv2", "pbs5/")],
    "lisc": [("pb7-mobilenetv2", "lisc/")],
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_files(data: Path, models: Path) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Per source, the files in the train part of every split that lists the source; split digests."""
    out, digests = {}, {}
    for source, uses in TRAIN_PARTS.items():
        keep: set[str] | None = None
        for model, prefix in uses:
            split = models / model / "split.json"
            doc = json.loads(split.read_text(encoding="utf-8"))
            digests[f"models/{model}/split.json"] = _sha256(split)
            rel = {r[0][len(prefix):] for r in doc["splits"]["train"] if r[0].startswith(prefix)}
            keep = rel if keep is None else keep & rel
        out[source] = sorted(data / source / r for r in (keep or ()))
    return out, digests


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder holding pbs5/ and lisc/")
    ap.add_argument("--models", type=Path, default=ROOT / "models", help="bundled models (their split.json)")
    ap.add_argument("--out", type=Path, default=quality.FIT_FILE, help="where to write the fit")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    files, digests = train_files(args.data, args.models)
    t0 = time.perf_counter()
    thresholds, _ = quality.fit_quality_thresholds(files)
    digest = hashlib.sha256("\n".join(sorted(f"{s}/{p.relative_to(args.data / s).as_posix()}"
                                             for s, ps in files.items() for p in ps)).encode()).hexdigest()
    provenance = {
        "images": {s: len(ps) for s, ps in files.items()},
        "image_list_sha256": digest,
        "parts": "train parts only: pbs5 in the train part of both the pbs5 and the pb7 split, LISC in the pb7 "
                 "train part; no validation/test image, no BCCD (measurement only)",
        "split_files_sha256": digests,
        "commit": _commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    quality.write_fit(thresholds, provenance, args.out)
    print(json.dumps({"thresholds": thresholds, **provenance, "seconds": round(time.perf_counter() - t0, 1)},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
