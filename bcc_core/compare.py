"""Train several backbones under identical conditions and write the comparison table (CSV + Markdown).

The same backbones as Study 2's Table 4 (small CNN vs ResNet50 vs MobileNetV2) and Study 1 (MobileNetV2 vs
EfficientNetB0), but every row gets the same initialisation and budget (see `common_initialisation`): the studies'
ImageNet-pretrained setting cannot be reproduced offline for backbones whose weights are not here, and a table
that pits a pretrained network against ones trained from scratch measures the initialisation, not the backbone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from .backbones import default_weights_path


def common_initialisation(backbones: list[str], requested: list[str] | None) -> tuple[list[str], str]:
    """One initialisation for every backbone, so the table compares equals.

    ImageNet for all when every backbone has ImageNet weights obtainable here (a file given with --weights, or
    the offline MobileNetV2 file); otherwise every backbone trains from scratch, and the reason says why.
    """
    if requested:
        w = list(requested) * (len(backbones) if len(requested) == 1 else 1)
        if len(w) != len(backbones):
            raise ValueError("give one --weights for all backbones or one per backbone")
        if len({x in ("none", None) for x in w}) > 1:
            raise ValueError("mixing pretrained and from-scratch backbones compares unequals: give weights for all or none")
        return w, "as requested"
    offline = {bb: str(default_weights_path()) for bb in backbones if bb == "mobilenetv2" and default_weights_path()}
    if len(offline) == len(backbones):
        return [offline[bb] for bb in backbones], "ImageNet weights are available here for every backbone"
    missing = [bb for bb in backbones if bb not in offline]
    return ["none"] * len(backbones), (f"no ImageNet weights are obtainable offline for {', '.join(missing)}, so every "
                                       "backbone trains from scratch with the same budget")


def compare(data_dir, backbones: list[str], weights: list[str] | None, out_dir, base_cfg, limit_per_class=None,
            progress=True) -> pd.DataFrame:
    """Train each backbone with the same split, preprocessing, augmentation, initialisation and budget.

    Returns:
        The comparison table (also written to out_dir/comparison.csv and comparison.md, whose first line says
        which initialisation every row used and why). Accuracy carries a Wilson 95% interval and macro-F1 a
        bootstrap 95% interval from the test confusion matrix.
    """
    from .evaluation import bootstrap_from_confusion, wilson
    from .training import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inits, why = common_initialisation(backbones, weights)
    rows = []
    for bb, w in zip(backbones, inits):
        cfg = dataclasses.replace(base_cfg, backbone=bb, weights=w)
        m = train(data_dir, out / bb, cfg, progress=progress, limit_per_class=limit_per_class)
        t = m["test"]
        cm = t["confusion_matrix"]
        n = int(sum(map(sum, cm)))
        lo, hi = wilson(int(sum(cm[i][i] for i in range(len(cm)))), n)
        f1_ci = bootstrap_from_confusion(cm)["macro_f1"]
        rows.append({
            "model": bb, "weights": "none (from scratch)" if w in ("none", None) else "ImageNet",
            "accuracy": round(t["accuracy"], 4), "accuracy_95ci": f"{lo:.3f}–{hi:.3f}",
            "macro_f1": round(t["macro_f1"], 4), "macro_f1_95ci": f"{f1_ci[0]:.3f}–{f1_ci[1]:.3f}",
            "kappa": round(t["kappa"], 4), "test_n": n,
            "params_total": m["parameters"]["total"], "epochs": m["epochs_run"],
            "train_time_s": round(m["timing_s"]["train"], 1),
            "ms_per_image_b32": round(m["latency"]["batch32_ms_per_image"], 1),
        })
    df = pd.DataFrame(rows)
    df.to_csv(out / "comparison.csv", index=False)
    (out / "comparison.md").write_text(f"Initialisation: {why}.\n\n" + _md(df))
    return df


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
