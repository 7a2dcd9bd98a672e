"""The replay bank: a model's own penultimate features (and early-layer activations) for a stratified
subset of its training split, its validation split (halves A/B as in training) and its test split.

Adapting a model to a new lab (`bcc_core.adapt`) retrains the head on these features, or, when the bank
also holds the network's activations at the cut below its top blocks (`add_cut`), fine-tunes those
blocks; replaying the parent's rows keeps the classes the lab did not label as they were (no
forgetting), refits the OOD statistics and measures the parent test macro-F1 before/after, all
without the original images. Stored as `replay.npz` beside the model: float16 features, the cut
activations compressed (PCA over channels, 8-bit codes), small enough to bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPLAY_FILE = "replay.npz"
PARTS = ("train", "val", "cal_a", "cal_b", "test", "lab_fit", "lab_cal_a", "lab_cal_b",
         "val_a", "val_b", "lab_cal")  # the last three: banks written before calibration A/B were their own parts
CAL_A = ("cal_a", "val_a")  # temperature and OOD thresholds were fitted on these rows
CAL_B = ("cal_b", "val_b")  # review rule and conformal quantile
TRAIN_PER_CLASS = 150
# Backbone layers the adaptation may fine-tune (MobileNetV2: blocks 14-16 and Conv_1, above a 7x7x160 cut
# no skip connection crosses), and how much of the bank keeps activations at that cut: cal_a and cal_b
# whole (the trust refit needs every calibration row through the new top), train and test per class.
CUT_LAYERS = 21
CUT_COMPONENTS = 32
CUT_PER_CLASS = {"train": 100, "test": 50}
CUT_KEYS = ("cut_codes", "cut_rows", "cut_basis", "cut_mean", "cut_lo", "cut_hi", "cut_meta")


def val_halves(n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the validation list) of halves A and B, exactly as `training.train` draws them."""
    perm = np.random.default_rng(seed).permutation(n_val)
    return perm[: n_val // 2], perm[n_val // 2:]


def _stratified(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, int)


def bank_index(labels: np.ndarray, parts: dict, per_class_train: int = TRAIN_PER_CLASS, seed: int = 0):
    """(rows of the dataset kept in the bank, in bank order; their part names) for `make_bank`."""
    rows, names = [], []
    for name in parts:
        idx = np.asarray(parts[name], int)
        if name == "train" and per_class_train:
            idx = idx[_stratified(np.asarray(labels)[idx], per_class_train, seed)]
        rows.append(idx)
        names += [name] * len(idx)
    return np.concatenate(rows).astype(int), names


def make_bank(features: np.ndarray, early: np.ndarray | None, labels: np.ndarray, parts: dict, classes: list[str],
              source: str, per_class_train: int = TRAIN_PER_CLASS, seed: int = 0, meta: dict | None = None,
              colour: np.ndarray | None = None) -> dict:
    """Assemble a bank from features of a whole dataset and its split.

    Args:
        features: (N, D) float penultimate features of clean images.
        early: (N, E) pooled early-layer activations or None.
        colour: (N, H) chroma histograms of the images (`bcc_core.colour`) or None; an adaptation's head
            reads them beside the features.
        labels: (N,) int class indices.
        parts: {part name: idx} integer index arrays into the N rows (`training.train`: train, val, cal_a,
            cal_b, test); only the train part is subsampled.
        classes: class names (index order).
        source: name of the images' source (dataset / lab), kept per row.
        per_class_train: training rows kept per class (stratified random subset).
        seed: subset seed.

    Returns:
        dict of arrays (see `save_bank`).
    """
    labels = np.asarray(labels)
    idx, names = bank_index(labels, parts, per_class_train, seed)
    bank = {"features": np.asarray(features)[idx].astype(np.float16), "labels": labels[idx].astype(np.int16),
            "part": np.array(names, dtype="U16"), "source": np.array([source] * len(idx), dtype="U64"),
            "classes": np.array(classes, dtype="U64"),
            "meta": np.array(json.dumps({"per_class_train": per_class_train, "seed": seed, **(meta or {})}))}
    if early is not None:
        bank["early"] = np.asarray(early)[idx].astype(np.float16)
    if colour is not None:
        bank["colour"] = np.asarray(colour)[idx].astype(np.float16)
    return bank


def fit_codec(c: np.ndarray, k: int = CUT_COMPONENTS) -> dict:
    """A per-position code for activations (M, H, W, C): the first k principal directions over channels,
    each coefficient in 8 bits between its minimum and maximum on these activations."""
    flat = c.reshape(-1, c.shape[-1]).astype(np.float64)
    mean = flat.mean(0)
    basis = np.linalg.svd(flat - mean, full_matrices=False)[2][:k]
    coef = (flat - mean) @ basis.T
    return {"cut_basis": basis.astype(np.float32), "cut_mean": mean.astype(np.float32),
            "cut_lo": coef.min(0).astype(np.float32), "cut_hi": coef.max(0).astype(np.float32)}


def encode_cut(c: np.ndarray, codec: dict) -> np.ndarray:
    """(M, H, W, C) activations -> (M, H, W, k) uint8 codes."""
    lo, hi = codec["cut_lo"], codec["cut_hi"]
    coef = (c.astype(np.float32) - codec["cut_mean"]) @ codec["cut_basis"].T
    return np.clip(np.round((coef - lo) / np.maximum(hi - lo, 1e-12) * 255), 0, 255).astype(np.uint8)


def decode_cut(codes: np.ndarray, codec: dict) -> np.ndarray:
    """(M, H, W, k) uint8 codes -> (M, H, W, C) float32 activations (approximate)."""
    lo, hi = codec["cut_lo"], codec["cut_hi"]
    return (codes.astype(np.float32) / 255 * (hi - lo) + lo) @ codec["cut_basis"] + codec["cut_mean"]


def cut_rows(bank: dict, per_class: dict | None = None, seed: int = 0) -> np.ndarray:
    """Bank rows that keep cut activations: calibration A and B whole (`val_a`/`val_b` in banks from before the
    five-part split), train and test stratified per class."""
    per_class = CUT_PER_CLASS if per_class is None else per_class
    out = []
    for part in ("train", *CAL_A, *CAL_B, "test"):
        idx = np.flatnonzero(bank["part"] == part)
        if part in per_class:
            idx = idx[_stratified(np.asarray(bank["labels"])[idx], per_class[part], seed)]
        out.append(idx)
    return np.sort(np.concatenate(out)).astype(np.int32)


def cut_meta(bank: dict) -> dict | None:
    return json.loads(str(bank["cut_meta"])) if "cut_codes" in bank else None


def add_cut(bank: dict, model, inputs, layers: int = CUT_LAYERS, k: int = CUT_COMPONENTS, seed: int = 0) -> dict:
    """Add the model's activations at the cut below its top `layers` backbone layers for `cut_rows(bank)`.

    Args:
        bank: a bank from `make_bank` (features are the model's own).
        model: the Keras classifier.
        inputs: callable, bank row indices -> model inputs (M, S, S, 3) uint8.
        layers, k: fine-tunable layers above the cut; principal components kept per position.

    Returns:
        The bank with CUT_KEYS added; unchanged when the cut is crossed by a skip connection or the model
        is too small for it (adaptation then retrains the head only). `cut_meta` records the layer, the
        explained variance and how well the decoded activations reproduce the stored features.
    """
    from .models import FEATURES_LAYER
    from .training import _top_layers, batched_predict, compiled, split_at_frozen_cut

    if len(_top_layers(model, 10 ** 6)) <= layers:  # the cut would be the input: the bank would hold images
        return bank
    try:
        bottom, _ = split_at_frozen_cut(model, layers)
    except (ValueError, StopIteration):
        return bank
    if bottom.output.shape[1] * 8 > model.input.shape[1]:  # not a deep cut: activations too large to bundle
        return bank
    import keras

    rows = cut_rows(bank, seed=seed)
    c = batched_predict(compiled(bottom), inputs(rows))
    codec = fit_codec(c, k)
    codes = encode_cut(c, codec)
    top_features = keras.Model(bottom.outputs[0], model.get_layer(FEATURES_LAYER).output)
    f_dec = batched_predict(compiled(top_features), decode_cut(codes, codec))
    f = np.asarray(bank["features"], np.float32)[rows]
    cos = np.sum(f * f_dec, 1) / np.maximum(np.linalg.norm(f, axis=1) * np.linalg.norm(f_dec, axis=1), 1e-12)
    flat = c.reshape(-1, c.shape[-1])
    resid = flat - decode_cut(codes, codec).reshape(flat.shape)
    meta = {"layer": bottom.layers[-1].name, "fine_tune_layers": layers, "components": k, "shape": list(c.shape[1:]),
            "explained_variance": float(1 - resid.var(0).sum() / flat.var(0).sum()),
            "feature_cosine_mean": float(cos.mean()), "feature_cosine_min": float(cos.min()),
            "rows_per_part": {p: int((bank["part"][rows] == p).sum()) for p in np.unique(bank["part"][rows])}}
    return {**bank, "cut_codes": codes, "cut_rows": rows, **codec, "cut_meta": np.array(json.dumps(meta))}


def concat_banks(a: dict, b: dict) -> dict:
    """Rows of `a` then `b` (same classes list, `b`'s classes may extend `a`'s at the end). Cut activations:
    `a`'s codec; `b`'s codes (encoded with it) follow `a`'s, their rows shifted."""
    ca, cb = list(a["classes"]), list(b["classes"])
    if cb[: len(ca)] != ca:
        raise ValueError(f"replay banks disagree on classes: {ca} vs {cb}")
    out = {k: np.concatenate([a[k], b[k]]) for k in ("features", "labels", "part", "source")}
    out["part"] = out["part"].astype("U16")
    out["source"] = out["source"].astype("U64")
    for k in ("early", "colour"):
        if k in a and k in b:
            out[k] = np.concatenate([a[k], b[k]])
    out["classes"] = np.array(cb, dtype="U64")
    out["meta"] = b.get("meta", a["meta"])
    if "cut_codes" in a:
        out.update({k: a[k] for k in CUT_KEYS})
        if "cut_codes" in b:
            out["cut_codes"] = np.concatenate([a["cut_codes"], b["cut_codes"]])
            out["cut_rows"] = np.concatenate([a["cut_rows"], np.asarray(b["cut_rows"]) + len(a["labels"])]).astype(np.int32)
    return out


def save_bank(path, bank: dict) -> None:
    """Write `replay.npz`: features (N, D) float16, early (N, E) float16 (optional), colour (N, H) float16
    (optional; chroma histograms, `bcc_core.colour`), labels (N,) int16,
    part (N,) one of PARTS, source (N,) str, classes (C,) str, meta JSON string."""
    np.savez_compressed(path, **bank)


def load_bank(path) -> dict:
    z = np.load(path, allow_pickle=False)
    bank = {k: z[k] for k in z.files}
    bank["features"] = bank["features"].astype(np.float32)
    for k in ("early", "colour"):
        if k in bank:
            bank[k] = bank[k].astype(np.float32)
    bank["labels"] = bank["labels"].astype(int)
    return bank


def build_for_model(model_dir, data_root, per_class_train: int = TRAIN_PER_CLASS, progress: bool = True) -> dict:
    """Build (and write) `replay.npz` for an existing model from its split.json and the dataset root.

    One compiled forward pass per batch (the model's own `Predictor.forward`), the same decoding and
    preprocessing as training. Returns a summary (rows per part, file size).
    """
    from .data import load_split
    from .inference import Predictor
    from .training import load_images

    from .fit_guard import assert_fittable

    assert_fittable([data_root], what="a replay bank")
    d = Path(model_dir)
    pred = Predictor.load(d)
    sp = load_split(d / "split.json", data_root)
    seed = int(pred.card.split.get("seed", pred.card.training.get("seed", 42)))
    if "cal_a" in sp:  # named parts: every part as it is
        names = [k for k in sp if sp[k]]
        items = [it for k in names for it in sp[k]]
        labels = np.array([l for _, l in items])
        n_tr = len(sp["train"])
        keep_tr = np.arange(n_tr)[_stratified(labels[:n_tr], per_class_train, seed)]
        parts, start = {"train": np.arange(len(keep_tr))}, len(keep_tr)
        for k in names[1:]:
            parts[k] = start + np.arange(len(sp[k]))
            start += len(sp[k])
        rows = np.concatenate([keep_tr, n_tr + np.arange(len(items) - n_tr)])
    else:  # an old split: validation halves A/B drawn as the old training did
        items = sp["train"] + sp["val"] + sp["test"]
        labels = np.array([l for _, l in items])
        n_tr, n_va = len(sp["train"]), len(sp["val"])
        tr = np.arange(n_tr)
        keep_tr = tr[_stratified(labels[tr], per_class_train, seed)]
        a, b = val_halves(n_va, seed)
        parts = {"train": np.arange(len(keep_tr)), "val_a": len(keep_tr) + a, "val_b": len(keep_tr) + b,
                 "test": len(keep_tr) + n_va + np.arange(len(sp["test"]))}
        rows = np.concatenate([keep_tr, n_tr + np.arange(n_va + len(sp["test"]))])
    x, _, problems = load_images([items[i][0] for i in rows], pred.pcfg, progress)
    if problems:
        raise ValueError(f"{len(problems)} split images could not be read, e.g. {problems[0]}")
    feats, _, early = pred.forward(x, views=1)  # features only: the image itself
    from .colour import chroma_histograms

    bank = make_bank(feats, early, labels[rows], parts, pred.classes, source=pred.card.data.get("name", "training"),
                     per_class_train=0, seed=seed, colour=chroma_histograms(x),
                     meta={"model_id": pred.card.model_id, "per_class_train": per_class_train,
                           "built_from": "split.json + dataset root"})
    bank = add_cut(bank, pred.model, lambda r: x[r], seed=seed)  # bank rows are x's rows
    save_bank(d / REPLAY_FILE, bank)
    return {"file": str(d / REPLAY_FILE), "bytes": (d / REPLAY_FILE).stat().st_size,
            "rows": {p: int((bank["part"] == p).sum()) for p in PARTS if (bank["part"] == p).any()},
            "cut": cut_meta(bank)}
