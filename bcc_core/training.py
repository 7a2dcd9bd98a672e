"""Training: Study 1's recipe by default, a fast frozen-feature path, optional fine-tuning, and the
post-training fits that make the output trustworthy (temperature, OOD threshold, review rule).

Fast path (frozen backbone): the backbone runs once per image and per augmented view; the head is
trained on the cached features. The model is the same as end-to-end training with a frozen base, at
a fraction of the compute (Study 1 needed 343 CPU minutes; this needs a few).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import calibration, evaluation, ood, review, shortcut
from .augment import AugmentConfig, augment_batch
from .backbones import get_spec
from .data import group_duplicates, list_imagefolder, list_sources, merge_group_file, save_split, split_grouped
from .io import read_image
from .model_card import ModelCard, library_versions, use_statement
from .models import FIXED_LAYERS
from .preprocess import PreprocessConfig, preprocess

CACHE_DIR = Path(".cache") / "bcc"


@dataclass(frozen=True)
class TrainConfig:
    """Training settings, saved in the model card. Defaults follow Study 1 (+ Study 2's class weights)."""

    task: str = "pbs5"
    backbone: str = "mobilenetv2"
    weights: str = "imagenet"
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 5e-4
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    patience: int = 3
    class_weights: bool = True
    aug_views: int = 4
    seed: int = 42
    fractions: tuple = (0.7, 0.15, 0.15)
    near_duplicate_distance: int = 4
    fine_tune_layers: int = 0
    fine_tune_epochs: int = 2
    fine_tune_lr: float = 1e-5
    swa_start: int = -1
    ood_method: str = "union"
    ood_early_layer: str = "auto"
    ood_quantile: float = 0.95
    review_alpha: float = 0.02
    review_delta: float = 0.1
    conformal_alpha: float = 0.05
    classes: tuple = ()
    class_map: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=lambda: PreprocessConfig().to_dict())
    augment: dict = field(default_factory=lambda: AugmentConfig().to_dict())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fractions"] = list(self.fractions)
        d["classes"] = list(self.classes)
        return d


def _bar(it, total=None, desc="", progress=True):
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, disable=not progress, leave=False)


def load_images(paths, pcfg: PreprocessConfig, progress: bool = True, workers: int = 2):
    """Decode and preprocess images in parallel (OpenCV releases the GIL).

    Returns:
        (inputs (N, S, S, 3) uint8, raw_cues dict of trivial-cue arrays for the shortcut audit,
        problems list of (path, reason)).
    """
    n = len(paths)
    out = np.zeros((n, pcfg.size, pcfg.size, 3), np.uint8)
    border = np.zeros((n, 6), np.float32)
    hist = np.zeros((n, 24), np.float32)
    sizes = np.zeros((n, 2), np.float32)
    problems = []

    def work(i):
        try:
            img = read_image(paths[i])
        except Exception as e:  # an unreadable file is a reported problem, not a crash
            return i, None, str(e)
        out[i] = preprocess(img, pcfg)
        border[i] = shortcut.border_colour(img)
        hist[i] = shortcut.colour_histogram(img)
        sizes[i] = (img.shape[1], img.shape[0])
        return i, True, ""

    with ThreadPoolExecutor(workers) as ex:
        for i, ok, msg in _bar(ex.map(work, range(n)), total=n, desc="decode+preprocess", progress=progress):
            if not ok:
                problems.append((str(paths[i]), msg))
    return out, {"border_colour": border, "image_size": sizes, "colour_histogram": hist}, problems


def _cache_key(paths, pcfg: PreprocessConfig) -> str:
    h = hashlib.sha256(json.dumps(pcfg.to_dict(), sort_keys=True).encode())
    # A change to the preprocessing code must invalidate cached inputs, not silently reuse them.
    h.update((Path(__file__).with_name("preprocess.py")).read_bytes())
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load_images_cached(paths, pcfg, cache: bool, progress: bool):
    """`load_images` with an optional on-disk cache (for repeated experiments, never needed)."""
    if not cache:
        return load_images(paths, pcfg, progress)
    f = CACHE_DIR / f"inputs_{_cache_key(paths, pcfg)}.npz"
    if f.is_file():
        z = np.load(f, allow_pickle=False)
        return z["x"], {k: z[k] for k in ("border_colour", "image_size", "colour_histogram")}, []
    x, cues, problems = load_images(paths, pcfg, progress)
    f.parent.mkdir(parents=True, exist_ok=True)
    np.savez(f, x=x, **cues)
    return x, cues, problems


def batched_predict(fn, x: np.ndarray, batch_size: int = 32, progress: bool = False, desc: str = ""):
    """Run a compiled function over x in batches, concatenating (tuple) outputs."""
    outs = []
    for s in _bar(range(0, len(x), batch_size), total=(len(x) + batch_size - 1) // batch_size, desc=desc,
                  progress=progress):
        r = fn(x[s:s + batch_size].astype(np.float32))
        outs.append([np.asarray(t) for t in (r if isinstance(r, (list, tuple)) else [r])])
    res = [np.concatenate(parts) for parts in zip(*outs)]
    return res if len(res) > 1 else res[0]


def compiled(model):
    """A compiled inference-mode forward pass (never call the model per image eagerly)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def f(x):
        return model(x, training=False)

    return f


def _set_seeds(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)


def _class_weight(labels, n):
    from sklearn.utils.class_weight import compute_class_weight

    w = compute_class_weight("balanced", classes=np.arange(n), y=labels)
    return {i: float(v) for i, v in enumerate(w)}


def _fit_head(model, f_train, y_train, f_val, y_val, cfg: TrainConfig, n_classes, out_dir: Path, progress):
    import keras

    from .models import head_only

    head = head_only(model)
    head.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate, beta_1=cfg.beta_1, beta_2=cfg.beta_2,
                                                 epsilon=cfg.epsilon),
                 loss="categorical_crossentropy", metrics=["accuracy"])
    ckpt = out_dir / "checkpoints" / "head_best.weights.h5"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    cbs = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True),
           keras.callbacks.ModelCheckpoint(str(ckpt), monitor="val_loss", save_best_only=True, save_weights_only=True)]
    eye = np.eye(n_classes, dtype=np.float32)
    hist = head.fit(f_train, eye[y_train], validation_data=(f_val, eye[y_val]), epochs=cfg.epochs,
                    batch_size=cfg.batch_size, shuffle=True, callbacks=cbs, verbose=2 if progress else 0,
                    class_weight=_class_weight(y_train, n_classes) if cfg.class_weights else None)
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


def _fit_end_to_end(model, x_tr, y_tr, x_val, y_val, cfg: TrainConfig, n_classes, lr, epochs, out_dir, progress):
    """Train `model` on augmented images. Early stopping on validation loss restores the best epoch;
    with `cfg.swa_start >= 0` every epoch runs and the weights are averaged from that epoch on."""
    import keras

    from .train_seq import AugSequence, WeightAveraging

    eye = np.eye(n_classes, dtype=np.float32)
    model.compile(optimizer=keras.optimizers.Adam(lr, beta_1=cfg.beta_1, beta_2=cfg.beta_2, epsilon=cfg.epsilon),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    if cfg.swa_start >= 0:
        cbs = [WeightAveraging(cfg.swa_start)]
    else:
        ckpt = out_dir / "checkpoints" / "best.weights.h5"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        cbs = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True),
               keras.callbacks.ModelCheckpoint(str(ckpt), monitor="val_loss", save_best_only=True,
                                               save_weights_only=True)]
    seq = AugSequence(x_tr, eye[y_tr], cfg.batch_size, AugmentConfig.from_dict(cfg.augment), cfg.seed)
    hist = model.fit(seq, validation_data=(x_val.astype(np.float32), eye[y_val]), epochs=epochs, callbacks=cbs,
                     verbose=2 if progress else 0,
                     class_weight=_class_weight(y_tr, n_classes) if cfg.class_weights else None)
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


def _unfreeze_top(model, n_layers: int):
    """Unfreeze the last n backbone layers; batch-norm stays frozen (inference-mode statistics)."""
    import keras

    names_head = {"features", "head_dropout1", "head_dense", "head_dropout2", "logits", "probs"}
    backbone_layers = [l for l in model.layers
                       if l.name not in names_head and l.name not in FIXED_LAYERS and l.weights]
    for l in backbone_layers[-n_layers:]:
        if not isinstance(l, keras.layers.BatchNormalization):
            l.trainable = True


def _quality_config(pcfg: PreprocessConfig) -> dict:
    from .quality import QualityConfig

    # A letterbox model sees whole fields (all4): several cells per image are expected there.
    return QualityConfig(expect_single_cell=pcfg.mode == "cell").to_dict()


def _load_data(data, cfg: TrainConfig, limit_per_class, progress):
    """List the data (one ImageFolder root, or several sources), group duplicates, describe it for the card.

    Returns:
        (dataset, groups (N,), strata (N,) labels to stratify the split on (class, or class|source),
        sources (N,) source name per image, card's data section without `problems`).
    """
    from .data import GROUPS_FILE, subset, subset_sources

    several = not isinstance(data, (str, os.PathLike)) or cfg.classes or cfg.class_map
    if not several:  # one ImageFolder root: the original behaviour, unchanged
        ds = list_imagefolder(data)
        if limit_per_class:
            ds = subset(ds, limit_per_class, seed=cfg.seed)
        groups = group_duplicates(ds.paths, max_distance=cfg.near_duplicate_distance, progress=progress)
        groups = merge_group_file(ds.paths, groups, Path(ds.root) / GROUPS_FILE)
        sources = np.full(len(ds), Path(data).name)
        n_groups = int(len(np.unique(groups)))
        card = {"name": Path(data).name, "root": Path(data).name, "n_images": len(ds.paths),
                "class_counts": ds.counts(), "file_list_sha256": ds.digest(), "duplicate_groups": n_groups,
                "images_in_duplicate_groups": int(len(groups) - n_groups)}
        return ds, groups, np.asarray(ds.labels), sources, card
    ms = list_sources([data] if isinstance(data, (str, os.PathLike)) else data, cfg.classes or None, cfg.class_map)
    if limit_per_class:
        ms = subset_sources(ms, limit_per_class, seed=cfg.seed)
    groups = ms.groups(max_distance=cfg.near_duplicate_distance, progress=progress)
    n_groups = int(len(np.unique(groups)))
    ds = ms.dataset
    card = {"name": "+".join(ms.names()), "root": Path(ds.root).name, "n_images": len(ds.paths),
            "class_counts": ds.counts(), "file_list_sha256": ds.digest(), "duplicate_groups": n_groups,
            "images_in_duplicate_groups": int(len(groups) - n_groups), "class_map": dict(ms.class_map),
            "sources": ms.card_sources()}
    return ds, groups, ms.strata(), np.asarray(ms.sources), card


def per_source_metrics(labels, probs, sources, classes) -> dict:
    """Accuracy, macro-F1 (over the classes the source has), per-class recall and n, per source.

    Args:
        labels: (N,) int true classes.
        probs: (N, C) probabilities.
        sources: (N,) source name per image.
        classes: C class names.
    """
    from sklearn.metrics import f1_score, recall_score

    pred = np.asarray(probs).argmax(1)
    out = {}
    for name in sorted(set(np.asarray(sources).tolist())):
        m = np.asarray(sources) == name
        if not m.any():
            continue
        y, p = np.asarray(labels)[m], pred[m]
        present = sorted(set(y.tolist()))
        rec = recall_score(y, p, labels=present, average=None, zero_division=0)
        out[name] = {"n": int(m.sum()), "accuracy": float((y == p).mean()),
                     "macro_f1": float(f1_score(y, p, labels=present, average="macro", zero_division=0)),
                     "per_class_recall": {classes[c]: float(r) for c, r in zip(present, rec)},
                     "per_class_n": {classes[c]: int((y == c).sum()) for c in present}}
    return out


def _limitations(cfg: TrainConfig, data_card: dict) -> list[str]:
    roots = [s["root"] for s in data_card.get("sources", [])] or [data_card["root"]]
    several = len(roots) > 1
    out = [("Trained on public datasets from " + str(len(roots)) + " labs' collections" if several else
            "Trained on one public dataset") + "; accuracy on images from other labs, stains and scanners is lower "
           "than the test figure.",
           "The review rule's guarantee assumes images exchangeable with the calibration data (same source" + ("s" if several else "") + ")."]
    if "pbs5" in roots:
        out.append("pbs5: each class comes from a single lab (basophil, erythroblast, monocyte: Barcelona; myeloblast, "
                   "seg_neutrophil: Munich); cell-centred cropping and stain normalisation reduce, but cannot prove the "
                   "absence of, lab shortcuts.")
        if several:
            out.append("Other sources give some classes a second lab (see data.sources); classes seen in one lab "
                       "only (e.g. erythroblast, myeloblast) can still be suggested from the lab's look; measured "
                       "on one external lab in bench/results/multisource.md.")
        else:
            out.append("pbs5: no class was imaged in both labs, so on another lab's images a monocyte can be suggested "
                       "as myeloblast (the Munich class nearest in morphology); measured on one external lab in "
                       "bench/results/crosslab.md. Such images are flagged out_of_distribution; a suggested myeloblast "
                       "on an image from a lab the model was not trained on always needs a human look.")
    return out


def train(data_dir, out_dir, cfg: TrainConfig = TrainConfig(), progress: bool = True, cache: bool = False,
          limit_per_class: int | None = None, reproduce: str = "", fold: tuple[int, int] | None = None) -> dict:
    """Train, evaluate, calibrate and save a model with its card.

    Args:
        data_dir: ImageFolder root (`<root>/<class>/<image>`), or a list of sources (paths, `NAME=PATH`
            strings or `data.Source`): merged with `cfg.classes` / `cfg.class_map`, grouped per source
            (plus each source's groups.csv), split stratified by class x source, measured per source.
        out_dir: model directory to write (model.keras, model_card.json, metrics.json, split.json, ood_stats.npz).
        cfg: training configuration.
        progress: show progress bars.
        cache: reuse decoded/preprocessed inputs from `.cache/bcc` (experiments only).
        limit_per_class: train on a per-class subset (tests and quick checks).
        reproduce: the command line, recorded in the card.
        fold: (i, k) — use fold i of a grouped stratified k-fold as the test set (cross-validation);
            validation is carved from the remaining folds with the same grouping.

    Returns:
        The metrics dict written to metrics.json.
    """
    import keras

    from .models import build_classifier, count_params, trust_outputs_model

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _set_seeds(cfg.seed)
    try:
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            keras.mixed_precision.set_global_policy("mixed_float16")
    except Exception:
        pass

    ds, groups, strata, sources, data_card = _load_data(data_dir, cfg, limit_per_class, progress)
    classes = list(ds.classes)
    n_cls = len(classes)
    labels = np.asarray(ds.labels)
    if fold is None:
        split = split_grouped(strata, groups, tuple(cfg.fractions), seed=cfg.seed)
    else:
        from .data import Split, kfold_grouped

        rest, test_idx = kfold_grouped(strata, groups, k=fold[1], seed=cfg.seed)[fold[0]]
        inner = split_grouped(strata[rest], groups[rest], (0.85, 0.15, 0.0), seed=cfg.seed)
        split = Split(tuple(int(rest[i]) for i in inner.train), tuple(int(rest[i]) for i in inner.val),
                      tuple(int(i) for i in test_idx))
    save_split(out / "split.json", ds, split, groups)
    tr, va, te = (np.asarray(s, int) for s in (split.train, split.val, split.test))

    pcfg = PreprocessConfig.from_dict(cfg.preprocess)
    x, raw_cues, problems = load_images_cached(list(ds.paths), pcfg, cache, progress)
    t_data = time.perf_counter()

    spec = get_spec(cfg.backbone)
    model = build_classifier(cfg.backbone, n_cls, weights=cfg.weights, input_size=pcfg.size)
    fast = cfg.weights not in (None, "none") and cfg.backbone != "small_cnn"
    aug_cfg = AugmentConfig.from_dict(cfg.augment)

    if fast:
        from .models import feature_extractor

        fe = compiled(feature_extractor(model))
        feats = batched_predict(fe, x, progress=progress, desc="features (clean)")
        f_aug, y_aug = [feats[tr]], [labels[tr]]
        for v in range(cfg.aug_views):
            xa = augment_batch(x[tr], seed=cfg.seed * 1000 + v, cfg=aug_cfg, labels=labels[tr])
            f_aug.append(batched_predict(fe, xa, progress=progress, desc=f"features (aug view {v + 1}/{cfg.aug_views})"))
            y_aug.append(labels[tr])
        history = _fit_head(model, np.concatenate(f_aug), np.concatenate(y_aug), feats[va], labels[va], cfg, n_cls,
                            out, progress)
        epochs_run = len(history.get("loss", []))
        if cfg.fine_tune_layers > 0:
            _unfreeze_top(model, cfg.fine_tune_layers)
            ft = _fit_end_to_end(model, x[tr], labels[tr], x[va], labels[va], cfg, n_cls, cfg.fine_tune_lr,
                                 cfg.fine_tune_epochs, out, progress)
            for k, v in ft.items():
                history.setdefault(k, []).extend(v)
            epochs_run += len(ft.get("loss", []))
    else:
        for layer in model.layers:
            layer.trainable = layer.name not in FIXED_LAYERS
        history = _fit_end_to_end(model, x[tr], labels[tr], x[va], labels[va], cfg, n_cls, cfg.learning_rate,
                                  cfg.epochs, out, progress)
        epochs_run = len(history.get("loss", []))
    t_train = time.perf_counter()

    # Features and logits for every clean image: metrics, calibration and OOD. With a frozen backbone
    # the clean features are already known and only the head runs again (plus the backbone up to the
    # early OOD layer).
    early_layer = spec.early_layer if cfg.ood_early_layer == "auto" else cfg.ood_early_layer
    early_layer = None if early_layer in (None, "", "none") else early_layer
    early = None
    if fast and cfg.fine_tune_layers == 0:
        from .models import LOGITS_LAYER, early_pooled, head_only

        logits = batched_predict(compiled(head_only(model, LOGITS_LAYER)), feats, batch_size=1024)
        if early_layer:
            early = batched_predict(compiled(keras.Model(model.input, early_pooled(model, early_layer))), x,
                                    progress=progress, desc="early-layer activations")
    else:
        outs = batched_predict(compiled(trust_outputs_model(model, early_layer)), x, progress=progress, desc="evaluate")
        feats, logits = outs[0], outs[1]
        early = outs[2] if early_layer else None
    rng = np.random.default_rng(cfg.seed)
    va_perm = rng.permutation(va)
    va_a, va_b = va_perm[: len(va) // 2], va_perm[len(va) // 2:]

    calib = calibration.calibration_report(logits[va_a], labels[va_a], logits[te], labels[te])
    T = calib["temperature"]
    probs = calibration.apply_temperature(logits, T)

    stats = ood.fit(feats[tr], labels[tr], n_cls, seed=cfg.seed, early=None if early is None else early[tr])
    ood.save_stats(out / "ood_stats.npz", stats)
    from .replay import REPLAY_FILE, make_bank, save_bank  # features to replay when adapting to a lab

    save_bank(out / REPLAY_FILE, make_bank(feats, early, labels, {"train": tr, "val_a": va_a, "val_b": va_b, "test": te},
                                           classes, source=data_card["name"], seed=cfg.seed))
    ood_cmp, scales = {}, {}
    for m in ood.methods_for(stats):
        s = ood.score(m, feats, logits, stats, T, early=early)
        thr = ood.fit_threshold(s[va_a], cfg.ood_quantile)
        scales[m] = (float(np.median(s[va_a])), thr)
        ood_cmp[m] = {"threshold": thr, "val_b_flag_rate": float((s[va_b] > thr).mean()),
                      "test_flag_rate": float((s[te] > thr).mean())}
    ood_scores = ood.score(cfg.ood_method, feats, logits, stats, T, scales, early=early)
    ood_thr = 1.0 if cfg.ood_method == ood.COMBINED else ood_cmp[cfg.ood_method]["threshold"]
    flagged = ood_scores > ood_thr

    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    # The risk rule is fitted on the whole validation split, among images the OOD gate lets through.
    # (Temperature is a monotone rescaling fitted on half A; it barely changes the confidence ranking.)
    keep_b = va[~flagged[va]]
    rule = review.fit_selective_threshold(conf[keep_b], correct[keep_b], cfg.review_alpha, cfg.review_delta)
    qhat = review.conformal_qhat(probs[va_b], labels[va_b], cfg.conformal_alpha)
    sets_te = review.prediction_sets(probs[te], qhat)
    rule_test = review.evaluate_rule(conf[te], correct[te], flagged[te], rule["threshold"])
    rule_test["conformal_coverage"] = float(sets_te[np.arange(len(te)), labels[te]].mean())
    rule_test["conformal_mean_set_size"] = float(sets_te.sum(1).mean())
    rule_test["singleton_fraction"] = float((sets_te.sum(1) == 1).mean())

    test_metrics = evaluation.classification_metrics(labels[te], probs[te], classes)
    uncal = evaluation.classification_metrics(labels[te], calibration.apply_temperature(logits[te], 1.0), classes)
    by_source = per_source_metrics(labels[te], probs[te], sources[te], classes) if len(set(sources)) > 1 else {}

    # Shortcut audit: trivial cues on the raw images and on what the model actually sees.
    audit_raw = shortcut.audit(raw_cues, labels, n_cls, seed=cfg.seed)
    # Model inputs all have one size, so only the colour cues can carry a shortcut there.
    seen = {"border_colour": np.stack([shortcut.border_colour(im) for im in x]),
            "colour_histogram": np.stack([shortcut.colour_histogram(im) for im in x])}
    audit_seen = shortcut.audit(seen, labels, n_cls, seed=cfg.seed)
    warnings = shortcut.warnings_text(audit_raw, "raw images") + shortcut.warnings_text(audit_seen, "model inputs")

    full = compiled(model)
    lat = evaluation.latency(lambda b: full(b), (pcfg.size, pcfg.size, 3))
    params = count_params(model)
    t_end = time.perf_counter()

    metrics = {
        "test": test_metrics,
        "test_uncalibrated": {k: uncal[k] for k in ("accuracy", "macro_f1", "log_loss")},
        **({"test_per_source": by_source} if by_source else {}),
        "history": history,
        "calibration": calib,
        "ood": {"method": cfg.ood_method, "quantile": cfg.ood_quantile, "comparison": ood_cmp,
                "test_flag_rate": float(flagged[te].mean())},
        "review": {"rule": rule, "test": rule_test, "conformal_qhat": qhat},
        "shortcut_audit": {"raw_images": audit_raw, "model_inputs": audit_seen, "warnings": warnings},
        "latency": lat,
        "parameters": params,
        "timing_s": {"data": t_data - t_start, "train": t_train - t_data, "post": t_end - t_train,
                     "total": t_end - t_start},
        "epochs_run": epochs_run,
        "split_sizes": {"train": len(tr), "val": len(va), "test": len(te)},
        "data_problems": problems + list(ds.problems),
    }
    card = ModelCard(
        model_id=out.name, task=cfg.task, classes=classes, backbone=cfg.backbone,
        weights=("imagenet (offline file)" if cfg.weights not in ("imagenet", "none", None) else str(cfg.weights)),
        preprocessing=pcfg.to_dict(), gradcam_layer=spec.gradcam_layer,
        input={"size": pcfg.size, "channels": 3, "dtype": "float32", "range": [0, 255], "colour": "RGB"},
        training={**cfg.to_dict(), "fast_path_frozen_features": fast, "epochs_run": epochs_run,
                  "training_time_s": round(t_train - t_data, 1), "total_time_s": round(t_end - t_start, 1)},
        data={**data_card, "problems": len(metrics["data_problems"])},
        split={"file": "split.json", "fractions": list(cfg.fractions), "seed": cfg.seed,
               "sizes": metrics["split_sizes"],
               "grouping": "exact (md5) + near-duplicate (pHash) groups, and a source's groups.csv, kept on one side",
               **({"stratified_by": "class x source"} if by_source else {})},
        metrics={"test": evaluation.summary_line(test_metrics),
                 "per_class_f1": {c: v["f1"] for c, v in test_metrics["per_class"].items()},
                 **({"per_source": {s: {k: v[k] for k in ("n", "accuracy", "macro_f1", "per_class_recall")}
                                    for s, v in by_source.items()}} if by_source else {})},
        calibration={"temperature": T, "method": calib["method"], "test_ece_before": calib["test_ece_before"],
                     "test_ece_after": calib["test_ece_after"], "n_bins": 15},
        ood={"method": cfg.ood_method, "threshold": ood_thr, "quantile": cfg.ood_quantile, "stats_file": "ood_stats.npz",
             "early_layer": early_layer,
             "scales": {m: list(v) for m, v in scales.items()},
             "comparison": ood_cmp,
             "fitted_on": "training features (statistics) and validation half A (threshold), in-distribution only"},
        review_rule={"kind": "selective classification with risk control (Clopper-Pearson, fixed-sequence)",
                     "threshold": rule["threshold"], "alpha": cfg.review_alpha, "delta": cfg.review_delta,
                     "guarantee": review.guarantee_text(cfg.review_alpha, cfg.review_delta),
                     "calibration": rule, "measured_on_test": rule_test, "conformal_qhat": qhat,
                     "conformal_alpha": cfg.conformal_alpha},
        quality=_quality_config(pcfg),
        shortcut_audit={"raw_images": {k: v["balanced_accuracy"] for k, v in audit_raw.items()},
                        "model_inputs": {k: v["balanced_accuracy"] for k, v in audit_seen.items()},
                        "chance": 1.0 / n_cls, "warnings": warnings},
        parameters=params, versions=library_versions(),
        intended_use=use_statement(pcfg.mode)[0], not_for=use_statement(pcfg.mode)[1],
        limitations=_limitations(cfg, data_card),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        reproduce=reproduce,
    )
    from .models import save_model

    save_model(model, card, out, extra={"metrics.json": metrics})
    return metrics


def cross_validate(data_dir, out_dir, cfg: TrainConfig = TrainConfig(), k: int = 5, progress: bool = True,
                   limit_per_class: int | None = None) -> dict:
    """Grouped, stratified k-fold cross-validation; reports mean ± standard deviation over folds.

    Each fold trains a full model (same recipe) into out_dir/fold_<i>; decoded inputs are cached
    between folds. Writes out_dir/cv.json.
    """
    keys = ("accuracy", "macro_f1", "kappa", "roc_auc", "log_loss")
    per_fold = []
    for i in range(k):
        m = train(data_dir, Path(out_dir) / f"fold_{i}", cfg, progress=progress, cache=True,
                  limit_per_class=limit_per_class, fold=(i, k))
        per_fold.append({**{key: m["test"][key] for key in keys}, "ece": m["calibration"]["test_ece_after"],
                         "n_test": m["test"]["n"]})
    summary = {key: {"mean": float(np.mean([f[key] for f in per_fold])), "std": float(np.std([f[key] for f in per_fold], ddof=1))}
               for key in (*keys, "ece")}
    res = {"k": k, "folds": per_fold, "summary": summary, "config": cfg.to_dict(), "limit_per_class": limit_per_class}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "cv.json").write_text(json.dumps(res, indent=2))
    return res
