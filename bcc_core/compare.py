"""Train several backbones under identical conditions and write the comparison table (CSV + Markdown).

Reproduces Study 2's Table 4 (small CNN vs ResNet50 vs MobileNetV2) and Study 1's MobileNetV2 vs
EfficientNetB0 comparison, with each row saying which weights it used.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from .backbones import default_weights_path


def _weights_for(backbone: str, requested: str | None) -> str:
    if requested:
        return requested
    # Only MobileNetV2 has ImageNet weights obtainable offline here; the others train from scratch.
    if backbone == "mobilenetv2" and default_weights_path() is not None:
        return str(default_weights_path())
    return "none"


def compare(data_dir, backbones: list[str], weights: list[str] | None, out_dir, base_cfg, limit_per_class=None,
            progress=True) -> pd.DataFrame:
    """Train each backbone with the same split, preprocessing, augmentation and budget.

    Returns:
        The comparison table (also written to out_dir/comparison.csv and comparison.md).
    """
    from .training import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, bb in enumerate(backbones):
        w = _weights_for(bb, (weights[i] if weights and len(weights) > 1 else (weights[0] if weights else None)))
        cfg = dataclasses.replace(base_cfg, backbone=bb, weights=w)
        m = train(data_dir, out / bb, cfg, progress=progress, limit_per_class=limit_per_class)
        t = m["test"]
        label = "ImageNet (offline file)" if w not in ("none", "imagenet") else ("ImageNet (Keras download)" if w == "imagenet" else "none (from scratch)")
        rows.append({
            "model": bb, "weights": label,
            "training": "frozen backbone, head on cached features" if w != "none" and bb != "small_cnn" else "end-to-end from scratch",
            "accuracy": round(t["accuracy"], 4), "macro_f1": round(t["macro_f1"], 4), "kappa": round(t["kappa"], 4),
            "roc_auc": round(t["roc_auc"], 4) if t["roc_auc"] is not None else None,
            "ece": round(m["calibration"]["test_ece_after"], 4),
            "params_total": m["parameters"]["total"], "params_trainable": m["parameters"]["trainable"],
            "epochs": m["epochs_run"], "train_time_s": round(m["timing_s"]["train"], 1),
            "ms_per_image_b1": round(m["latency"]["batch1_ms_per_image"], 1),
            "ms_per_image_b32": round(m["latency"]["batch32_ms_per_image"], 1),
            "test_n": t["n"],
        })
    df = pd.DataFrame(rows)
    df.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(_md(df))
    return df


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
