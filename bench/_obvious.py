"""The obvious pipeline issue 14 compares the product with: cv2 decode + resize to 224 + batched Keras
MobileNetV2 `predict` (batch 32) + a CSV of the top class, no safety work. Run as its own process by
bench/speed.py (whole-process wall time). Same weights as the product (the model folder's model.keras).

    python bench/_obvious.py IMAGE_DIR --model models/pbs5-mobilenetv2 --out obvious.csv
"""

import argparse
import csv
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("images")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import cv2
    import keras
    import numpy as np

    files = sorted(p for p in Path(a.images).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    model = keras.models.load_model(Path(a.model) / "model.keras", compile=False)
    size = model.input_shape[1]
    x = np.empty((len(files), size, size, 3), np.uint8)
    for i, f in enumerate(files):
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        x[i] = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_AREA)
    probs = model.predict(x.astype(np.float32), batch_size=32, verbose=0)
    with open(a.out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "class", "p"])
        for f, p in zip(files, probs):
            w.writerow([str(f), int(p.argmax()), f"{p.max():.6f}"])
    print(f"obvious: {len(files)} images", file=sys.stderr)


if __name__ == "__main__":
    main()
