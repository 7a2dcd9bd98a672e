"""Write assets/samples/: a few attributed sample cells per class of the bundled models, and a sample batch.

Only data sets whose licence allows redistribution are used: pbs5 (CC BY 4.0). LISC (research and
education, no redistribution licence), all4 (no licence stated in the shared data README) and BCCD
(measurement only) are not. The cells are the first files, in sorted order, of each class's *test* part
of ``models/pbs5-mobilenetv2/split.json`` (never training images, never chosen by result), re-encoded as
JPEG quality 80 without metadata at their original size (the quality gate needs the cell's pixels:
downscaling would make small nuclei fail its size check). The batch adds two generated images that must
be flagged (a blank frame and an out-of-focus copy of a sample cell) and a file that is not an image.

Usage (from the repository root)::

    .venv/bin/python scripts/make_samples.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "assets" / "samples"
PER_CLASS = 2      # single-image samples per class
BATCH_PER_CLASS = 2  # further cells per class in the sample batch
QUALITY = 80


def _write_jpeg(src: Path, dst: Path, blur: float = 0.0) -> None:
    img = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read {src}")
    if blur:
        img = cv2.GaussianBlur(img, (0, 0), blur * max(img.shape[:2]))
    dst.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
    assert ok
    dst.write_bytes(buf.tobytes())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    a = ap.parse_args(argv)
    split = json.loads((ROOT / "models" / "pbs5-mobilenetv2" / "split.json").read_text())
    test = sorted(r[0] for r in split["splits"]["test"])
    classes = split["classes"]
    if OUT.exists():
        for p in list(OUT.glob("*.jpg")) + list((OUT / "batch").glob("*")):
            p.unlink()
    rows = []
    for cls in classes:
        files = [r for r in test if r.startswith(cls + "/")][:PER_CLASS + BATCH_PER_CLASS]
        for k, rel in enumerate(files):
            single = k < PER_CLASS
            name = f"{cls}_{k + 1}.jpg" if single else f"{cls}_{k + 1 - PER_CLASS}.jpg"
            dst = OUT / name if single else OUT / "batch" / name
            _write_jpeg(a.data / "pbs5" / rel, dst)
            rows.append({"file": dst.relative_to(OUT).as_posix(), "class": cls, "source": "pbs5",
                         "original_file": rel, "changes": f"re-encoded JPEG q{QUALITY}, metadata removed"})
    # Inputs the gate must flag (generated here, or derived from a pbs5 sample above).
    first = a.data / "pbs5" / [r for r in test if r.startswith(classes[0] + "/")][0]
    _write_jpeg(first, OUT / "batch" / "zz_out_of_focus.jpg", blur=0.04)
    rows.append({"file": "batch/zz_out_of_focus.jpg", "class": "", "source": "pbs5",
                 "original_file": first.relative_to(a.data / "pbs5").as_posix(),
                 "changes": "Gaussian blur sigma 4% of the side (must be flagged blurred), JPEG q80"})
    cv2.imwrite(str(OUT / "batch" / "zz_blank.png"), np.full((300, 300, 3), 205, np.uint8))
    rows.append({"file": "batch/zz_blank.png", "class": "", "source": "generated", "original_file": "",
                 "changes": "uniform grey frame (must be flagged blank)"})
    (OUT / "batch" / "zz_not_an_image.jpg").write_bytes(b"This file is not an image: the batch shows it as an error row.\n")
    rows.append({"file": "batch/zz_not_an_image.jpg", "class": "", "source": "generated", "original_file": "",
                 "changes": "text, not an image (an error row)"})
    with (OUT / "samples.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{len(rows)} files, {size / 1024:.0f} KiB in {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
