"""Training: Study 1's recipe by default, a fast frozen-feature path, optional fine-tuning, and the
post-training fits that make the output trustworthy (`bcc_core.trust`), as named stages on named,
disjoint data parts (train, val, cal_a, cal_b, test; `bcc_core.data.PARTS`).

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
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import calibration, evaluation, ood, review, shortcut
from .augment import AugmentConfig, augment_batch
from .backbones import get_spec
from .data import group_duplicates, list_imagefolder, list_sources, merge_group_file, save_split
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
    fractions: tuple = (0.625, 0.075, 0.075, 0.075, 0.15)  # train, val, cal_a, cal_b, test (data.PARTS)
    near_duplicate_distance: int = 4
    fine_tune_layers: int = 0
    fine_tune_epochs: int = 2
    fine_tune_lr: float = 1e-5
    swa_start: int = -1
    fine_tune_cached: bool = False
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
    """Train `model` on images augmented afresh every epoch (see `_fit_on_sequence`)."""
    from .train_seq import AugSequence

    seq = AugSequence(x_tr, np.eye(n_classes, dtype=np.float32)[y_tr], cfg.batch_size,
                      AugmentConfig.from_dict(cfg.augment), cfg.seed)
    return _fit_on_sequence(model, seq, y_tr, x_val, y_val, cfg, n_classes, lr, epochs, out_dir, progress)


def _fit_on_sequence(model, seq, y_tr, x_val, y_val, cfg: TrainConfig, n_classes, lr, epochs, out_dir, progress):
    """Train `model` on the batches of `seq`. Early stopping on validation loss restores the best epoch;
    with `cfg.swa_start >= 0` every epoch runs and the weights are averaged from that epoch on."""
    import keras

    from .train_seq import WeightAveraging

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
    hist = model.fit(seq, validation_data=(x_val.astype(np.float32), np.eye(n_classes, dtype=np.float32)[y_val]),
                     epochs=epochs, callbacks=cbs, verbose=2 if progress else 0,
                     class_weight=_class_weight(y_tr, n_classes) if cfg.class_weights else None)
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


def _top_layers(model, n_layers: int) -> list:
    """The last n weighted backbone layers (what fine-tuning may change), head excluded."""
    from .colour import COLOUR_LAYERS

    names_head = {"features", "head_dropout1", "head_dense", "head_dropout2", "logits", "probs", *COLOUR_LAYERS}
    backbone_layers = [l for l in model.layers
                       if l.name not in names_head and l.name not in FIXED_LAYERS and l.weights]
    return backbone_layers[-n_layers:] if n_layers > 0 else []


def _unfreeze_top(model, n_layers: int):
    """Unfreeze the last n backbone layers; batch-norm stays frozen (inference-mode statistics)."""
    import keras

    for l in _top_layers(model, n_layers):
        if not isinstance(l, keras.layers.BatchNormalization):
            l.trainable = True


def split_at_frozen_cut(model, n_layers: int):
    """Cut the model before the first layer that fine-tuning of the last n backbone layers changes.

    Returns:
        (bottom, top): Keras models sharing the model's layers; `bottom` maps images to the output of
        the last layer before the first fine-tuned one, `top` maps that tensor to the class
        probabilities. `top(bottom(x)) == model(x)`; training `top` trains `model`.

    Raises:
        ValueError: the top needs more than that one tensor from below (a skip connection crosses
            the cut): choose another number of layers.
    """
    import keras

    first = next(l for l in _top_layers(model, n_layers) if not isinstance(l, keras.layers.BatchNormalization))
    names = [l.name for l in model.layers]
    cut = model.layers[names.index(first.name) - 1].output
    try:
        top = keras.Model(cut, model.output, name="fine_tuned_top")
    except ValueError as e:
        raise ValueError(f"fine-tuning {n_layers} layers: a connection crosses the cut before "
                         f"{first.name!r}; choose another --fine-tune-layers ({e})") from None
    return keras.Model(model.input, cut, name="frozen_bottom"), top


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
    from .fit_guard import assert_fittable

    several = not isinstance(data, (str, os.PathLike)) or cfg.classes or cfg.class_map
    if not several:  # one ImageFolder root: the original behaviour, unchanged
        ds = list_imagefolder(data)
        assert_fittable(ds.paths, what="training")  # BCCD is measurement only
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
    assert_fittable(ms.dataset.paths, what="training")  # BCCD is measurement only
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


@lru_cache(maxsize=1)
def card_text() -> dict:
    """Model-card prose (limitations, grouping notes), kept as data in `card_text.json`."""
    return json.loads(Path(__file__).with_name("card_text.json").read_text(encoding="utf-8"))


def _limitations(cfg: TrainConfig, data_card: dict) -> list[str]:
    roots = [s["root"] for s in data_card.get("sources", [])] or [data_card["root"]]
    text = card_text()
    several = len(roots) > 1
    key = "with_others" if several else "alone"
    out = [text["general"][key].format(n_labs=len(roots)), text["general"]["exchangeable_" + key]]
    for r in roots:
        src = text["sources"].get(r, {})
        out += list(src.get("always", [])) + list(src.get(key, []))
    return out


def _grouping_text(cfg: TrainConfig, data_card: dict) -> str:
    roots = [s["root"] for s in data_card.get("sources", [])] or [data_card["root"]]
    g = card_text()["grouping"]
    return " ".join([g["default"].format(radius=cfg.near_duplicate_distance)]
                    + [g[r].format(radius=cfg.near_duplicate_distance) for r in roots if r in g])


# --------------------------------------------------------------------------- stages of train()
# prepare data -> fit network -> network outputs -> fit trust -> evaluate -> write card (-> export).
# Each stage takes only the parts it may use: the network sees train and val, the trust layer train
# (OOD statistics), cal_a and cal_b, and only `evaluate` reads the test part.


@dataclass
class Prepared:
    """Listed, grouped, split and decoded data (stage 1)."""

    ds: object
    classes: list
    labels: np.ndarray
    groups: np.ndarray
    sources: np.ndarray
    data_card: dict
    parts: dict            # {part name: (n,) int index array}
    split_card: dict       # sizes, sha256 per part
    x: np.ndarray          # (N, S, S, 3) uint8 model inputs
    raw_cues: dict
    problems: list
    pcfg: PreprocessConfig


def prepare_data(data_dir, out: Path, cfg: TrainConfig, limit_per_class=None, fold=None, cache=False,
                 progress=True) -> Prepared:
    """List the data, group duplicates, carve the named disjoint parts (split.json), decode the images."""
    from .data import PARTS, check_disjoint, kfold_grouped, split_parts

    ds, groups, strata, sources, data_card = _load_data(data_dir, cfg, limit_per_class, progress)
    if len(cfg.fractions) != len(PARTS):
        raise ValueError(f"fractions must give one value per part {PARTS}, got {cfg.fractions}")
    fr = dict(zip(PARTS, map(float, cfg.fractions)))
    if fold is None:
        parts = split_parts(strata, groups, fr, seed=cfg.seed)
    else:  # cross-validation: fold i is the test part; the other parts are carved from the rest, grouped
        rest, test_idx = kfold_grouped(strata, groups, k=fold[1], seed=cfg.seed)[fold[0]]
        inner = {k: v for k, v in fr.items() if k != "test"}
        total = sum(inner.values())
        sub = split_parts(strata[rest], groups[rest], {k: v / total for k, v in inner.items()}, seed=cfg.seed)
        parts = {**{k: tuple(int(rest[i]) for i in v) for k, v in sub.items()}, "test": tuple(int(i) for i in test_idx)}
    check_disjoint(parts, groups)
    info = save_split(out / "split.json", ds, parts, groups, meta={"seed": cfg.seed, "fractions": fr,
                                                                   **({"fold": list(fold)} if fold else {})})
    pcfg = PreprocessConfig.from_dict(cfg.preprocess)
    x, raw_cues, problems = load_images_cached(list(ds.paths), pcfg, cache, progress)
    return Prepared(ds, list(ds.classes), np.asarray(ds.labels), np.asarray(groups), np.asarray(sources), data_card,
                    {k: np.asarray(v, int) for k, v in parts.items()}, info, x, raw_cues, problems, pcfg)


def fit_network(x_train, y_train, x_val, y_val, n_classes: int, cfg: TrainConfig, out: Path, progress=True,
                timing: dict | None = None):
    """Build and train the network on the train part; the val part only chooses when to stop.

    `timing`, when given, receives the seconds of each sub-stage of the cached fine-tuning path.

    Returns:
        (model, history, epochs_run, fast) — `fast`: the frozen-feature path was used.
    """
    from .models import build_classifier

    model = build_classifier(cfg.backbone, n_classes, weights=cfg.weights, input_size=x_train.shape[1])
    fast = cfg.weights not in (None, "none") and cfg.backbone != "small_cnn"
    if fast and cfg.fine_tune_layers > 0 and cfg.fine_tune_cached:
        history = _fit_at_frozen_cut(model, x_train, y_train, x_val, y_val, n_classes, cfg, out, progress,
                                     {} if timing is None else timing)
        return model, history, len(history.get("loss", [])), fast
    if fast:
        from .models import feature_extractor

        fe = compiled(feature_extractor(model))
        f_tr = batched_predict(fe, x_train, progress=progress, desc="features (clean)")
        f_va = batched_predict(fe, x_val, progress=progress, desc="features (val)")
        f_aug, y_aug = [f_tr], [y_train]
        for v in range(1, cfg.aug_views + 1):
            f_aug.append(batched_predict(fe, _head_view(x_train, y_train, cfg, v), progress=progress,
                                         desc=f"features (aug view {v}/{cfg.aug_views})"))
            y_aug.append(y_train)
        history = _fit_head(model, np.concatenate(f_aug), np.concatenate(y_aug), f_va, y_val, cfg, n_classes,
                            out, progress)
        epochs_run = len(history.get("loss", []))
        if cfg.fine_tune_layers > 0:
            _unfreeze_top(model, cfg.fine_tune_layers)
            ft = _fit_end_to_end(model, x_train, y_train, x_val, y_val, cfg, n_classes, cfg.fine_tune_lr,
                                 cfg.fine_tune_epochs, out, progress)
            for k, v in ft.items():
                history.setdefault(k, []).extend(v)
            epochs_run += len(ft.get("loss", []))
    else:
        for layer in model.layers:
            layer.trainable = layer.name not in FIXED_LAYERS
        history = _fit_end_to_end(model, x_train, y_train, x_val, y_val, cfg, n_classes, cfg.learning_rate,
                                  cfg.epochs, out, progress)
        epochs_run = len(history.get("loss", []))
    return model, history, epochs_run, fast


def _head_view(x_train, y_train, cfg: TrainConfig, v: int) -> np.ndarray:
    """View v of the training images for the head stage: 0 the clean images, 1..aug_views augmented (fixed
    seeds, on every core; the same images whichever path uses them)."""
    if v == 0:
        return x_train
    return augment_batch(x_train, seed=cfg.seed * 1000 + v - 1, cfg=AugmentConfig.from_dict(cfg.augment),
                         labels=y_train, workers=os.cpu_count() or 1)


def _onnx_forward(model, size: int, early_layer: str | None = None, extra: dict | None = None):
    """`export.session_for`'s forward pass of the in-memory model, or None when it does not convert."""
    try:
        from .export import session_for

        return session_for(model, size, early_layer, extra)[0]
    except (ImportError, NotImplementedError):
        return None


def _frozen_pass(model, bottom, size: int):
    """x → (the frozen bottom's output in float16, pooled features) for the still-frozen model: in ONNX
    Runtime when the model converts (faster than Keras on a CPU), else Keras."""
    run = _onnx_forward(model, size, extra={"cut": bottom.layers[-1].name})
    if run is not None:
        def ort_pass(x):
            features, _, cut = run(x)
            return cut.astype(np.float16), features

        return ort_pass
    import keras
    import tensorflow as tf

    both = keras.Model(model.input, [bottom.output, model.get_layer("features").output])

    @tf.function(reduce_retracing=True)
    def keras_pass(x):
        cut, features = both(x, training=False)
        return tf.cast(cut, tf.float16), features

    return keras_pass


def _fit_at_frozen_cut(model, x_train, y_train, x_val, y_val, n_classes, cfg: TrainConfig, out: Path,
                       progress, timing: dict) -> dict:
    """Head on frozen features, then fine-tuning of the top layers, both from one cached pass.

    The network is cut where the fine-tuned layers begin (`split_at_frozen_cut`). The frozen bottom
    runs once per training image and view: the clean image and `cfg.aug_views` augmented views (the
    head stage's views, `_head_view`), in ONNX Runtime when the model converts. Its output is kept in
    float16; the head is trained on the pooled features computed from it, then only the top is trained
    on it, every image meeting its views in turn over `cfg.fine_tune_epochs` epochs. Compared with fresh
    augmentation each epoch, fine-tuning sees `aug_views + 1` views of an image instead of `fine_tune_epochs` new ones,
    and the frozen bottom (most of the compute) runs `aug_views + 1` times per image instead of
    `aug_views + 1 + fine_tune_epochs` times.
    """
    from .train_seq import CachedViews

    bottom, top = split_at_frozen_cut(model, cfg.fine_tune_layers)
    cut_and_features = _frozen_pass(model, bottom, x_train.shape[1])

    # Each view is augmented on every core, then run through the network on every core: one after the
    # other, because a runtime's threads wait for each other, and so for the slowest core.
    t0 = time.perf_counter()
    cuts, feats = [], []
    for v in range(cfg.aug_views + 1):
        c, f = batched_predict(cut_and_features, _head_view(x_train, y_train, cfg, v), progress=progress,
                               desc="frozen pass (clean)" if v == 0 else f"frozen pass (view {v}/{cfg.aug_views})")
        cuts.append(c)
        feats.append(f)
    c_val, f_val = batched_predict(cut_and_features, x_val, progress=progress, desc="frozen pass (val)")
    t1 = time.perf_counter()
    history = _fit_head(model, np.concatenate(feats), np.tile(y_train, len(feats)), f_val, y_val, cfg, n_classes,
                        out, progress)
    del feats
    t2 = time.perf_counter()
    _unfreeze_top(model, cfg.fine_tune_layers)
    seq = CachedViews(cuts, np.eye(n_classes, dtype=np.float32)[y_train], cfg.batch_size, cfg.seed)
    ft = _fit_on_sequence(top, seq, y_train, c_val, y_val, cfg, n_classes, cfg.fine_tune_lr, cfg.fine_tune_epochs,
                          out, progress)
    timing.update(frozen_pass_and_augmentation=t1 - t0, head=t2 - t1, fine_tune=time.perf_counter() - t2)
    for k, v in ft.items():
        history.setdefault(k, []).extend(v)
    return history


def network_outputs(model, x, early_layer, progress=True) -> dict:
    """Features, logits and early-layer activations of clean images, one pass per batch (no fit): in ONNX
    Runtime when the model converts (the graph screening will run), else Keras."""
    from .models import trust_outputs_model

    forward = _onnx_forward(model, x.shape[1], early_layer) or compiled(trust_outputs_model(model, early_layer))
    outs = batched_predict(forward, x, progress=progress, desc="outputs")
    return {"features": outs[0], "logits": outs[1], "early": outs[2] if early_layer else None}


def _part(name, idx, labels, outs, sources=None):
    from .trust import Part

    e = outs["early"]
    return Part(name, idx, labels[idx], outs["features"][idx], outs["logits"][idx],
                None if e is None else e[idx], None if sources is None else sources[idx])


def fit_trust(train_part, cal_a, cal_b, classes, cfg: TrainConfig, early_layer, shortcut_audit: dict,
              part_info: dict):
    """Temperature and OOD thresholds on calibration A, OOD statistics on train, review rule and conformal
    quantile on calibration B (`bcc_core.trust.TrustModel.fit`)."""
    from .trust import TrustConfig, TrustModel

    tcfg = TrustConfig(ood_method=cfg.ood_method, ood_quantile=cfg.ood_quantile, review_alpha=cfg.review_alpha,
                       review_delta=cfg.review_delta, conformal_alpha=cfg.conformal_alpha)
    return TrustModel.fit(classes, train_part, cal_a, cal_b, tcfg, early_layer=early_layer,
                          shortcut_audit=shortcut_audit, part_info=part_info, seed=cfg.seed)


def audit_shortcuts(raw_cues: dict, x_seen: np.ndarray, labels: np.ndarray, n_cls: int, seed: int) -> dict:
    """Trivial cues on the raw images and on the model inputs (train part only: a model behaviour — every
    result flagged when a cue predicts the class — is decided from it)."""
    # Cross-validated within the train part: at most 5 folds, never more than the rarest class has images.
    folds = int(min(5, np.bincount(np.asarray(labels), minlength=n_cls).min()))
    if folds < 2:
        return {"raw_images": {}, "model_inputs": {}, "warnings": [],
                "note": "not measured: a class has fewer than 2 training images"}
    audit_raw = shortcut.audit(raw_cues, labels, n_cls, folds=folds, seed=seed)
    # Model inputs all have one size, so only the colour cues can carry a shortcut there.
    seen = {"border_colour": np.stack([shortcut.border_colour(im) for im in x_seen]),
            "colour_histogram": np.stack([shortcut.colour_histogram(im) for im in x_seen])}
    audit_seen = shortcut.audit(seen, labels, n_cls, folds=folds, seed=seed)
    warnings = shortcut.warnings_text(audit_raw, "raw images") + shortcut.warnings_text(audit_seen, "model inputs")
    return {"raw_images": audit_raw, "model_inputs": audit_seen, "warnings": warnings}


def evaluate(test: "Part", trust, classes, sources_test, cfg: TrainConfig, cal_a=None, cal_b=None) -> dict:
    """Everything measured on the test part (the only stage that reads it); calibration A/B appear only
    as the NLL the temperature was fitted to and the OOD flag rate on B (a held-out in-distribution check)."""
    y = test.labels
    d = trust.decide(test.logits, test.features, test.early)
    probs = d.probs
    m = evaluation.classification_metrics(y, probs, classes)
    uncal = evaluation.classification_metrics(y, calibration.apply_temperature(test.logits, 1.0), classes)
    before = calibration.reliability(calibration.apply_temperature(test.logits, 1.0), y, 15)
    after = calibration.reliability(probs, y, 15)
    calib = {"temperature": trust.temperature, "n_bins": 15,
             "method": "temperature scaling (Guo et al. 2017), fitted on calibration A by NLL",
             "test_ece_before": before["ece"], "test_ece_after": after["ece"],
             "reliability_before": before, "reliability_after": after}
    if cal_a is not None:
        calib.update(cal_a_nll_before=calibration.nll(cal_a.logits, cal_a.labels),
                     cal_a_nll_after=calibration.nll(cal_a.logits, cal_a.labels, trust.temperature))
    comparison = {}
    for name, det in trust.detectors.items():
        s_te = ood.score(name, test.features, test.logits, trust.ood_stats, trust.temperature, early=test.early)
        comparison[name] = {"threshold": det["threshold"], "test_flag_rate": float((s_te > det["threshold"]).mean())}
        if cal_b is not None:
            s_b = ood.score(name, cal_b.features, cal_b.logits, trust.ood_stats, trust.temperature, early=cal_b.early)
            comparison[name]["cal_b_flag_rate"] = float((s_b > det["threshold"]).mean())
    correct = d.pred == y
    rule_test = review.evaluate_rule(d.confidence, correct, d.ood_flag | d.unreviewed_class,
                                     trust.review["threshold"] if trust.certified else np.inf)
    if d.sets is not None:
        rule_test["conformal_coverage"] = float(d.sets[np.arange(len(y)), y].mean())
        rule_test["conformal_mean_set_size"] = float(d.sets.sum(1).mean())
        rule_test["singleton_fraction"] = float((d.sets.sum(1) == 1).mean())
    rule_test["ok_fraction_all_flags"] = float(d.ok.mean())  # shortcut-cue flag included
    by_source = per_source_metrics(y, probs, sources_test, classes) if len(set(sources_test.tolist())) > 1 else {}
    return {"test": m, "test_uncalibrated": {k: uncal[k] for k in ("accuracy", "macro_f1", "log_loss")},
            **({"test_per_source": by_source} if by_source else {}), "calibration": calib,
            "ood": {"method": trust.ood_method, "quantile": cfg.ood_quantile, "comparison": comparison,
                    "test_flag_rate": float(d.ood_flag.mean())},
            "review": {"rule": trust.review, "test": rule_test, "conformal_qhat": trust.conformal.get("qhat")}}


def model_version(now: datetime | None = None) -> str:
    """Date-based model version (UTC, to the minute): `YYYY.MM.DD.HHMM`."""
    return (now or datetime.now(timezone.utc)).strftime("%Y.%m.%d.%H%M")


def _export_stage(out: Path) -> dict | None:
    """Export the model folder to the fast runtime when `bcc_core.export` exists (optional: training
    works without it, and a failed export never loses the trained model)."""
    try:
        from . import export
    except ImportError:
        return None
    fn = next((getattr(export, n) for n in ("export_runtime", "export_model_dir", "export_model") if
               callable(getattr(export, n, None))), None)
    if fn is None:
        return {"ok": False, "error": "bcc_core.export has no export_runtime function"}
    try:
        res = fn(out)
        keep = ("format", "file", "sha256", "model_sha256", "backend", "parity_atol")  # not the weight map
        return {"ok": True, "result": {k: res[k] for k in keep if k in res} if isinstance(res, dict) else str(res)}
    except Exception as e:  # the trained model stays usable without its export
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


def train(data_dir, out_dir, cfg: TrainConfig = TrainConfig(), progress: bool = True, cache: bool = False,
          limit_per_class: int | None = None, reproduce: str = "", fold: tuple[int, int] | None = None) -> dict:
    """Train, calibrate, evaluate and save a model with its card, in named stages.

    Args:
        data_dir: ImageFolder root (`<root>/<class>/<image>`), or a list of sources (paths, `NAME=PATH`
            strings or `data.Source`): merged with `cfg.classes` / `cfg.class_map`, grouped per source
            (plus each source's groups.csv), split stratified by class x source, measured per source.
        out_dir: model directory to write (model.keras, model_card.json, metrics.json, split.json,
            ood_stats.npz, replay.npz).
        cfg: training configuration (`cfg.fractions`: train, val, cal_a, cal_b, test).
        progress: show progress bars.
        cache: reuse decoded/preprocessed inputs from `.cache/bcc` (experiments only).
        limit_per_class: train on a per-class subset (tests and quick checks).
        reproduce: the command line, recorded in the card.
        fold: (i, k) — use fold i of a grouped stratified k-fold as the test part (cross-validation);
            the other parts are carved from the remaining folds with the same grouping.

    Returns:
        The metrics dict written to metrics.json.
    """
    import keras

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

    # Everything the later stages import, imported now: a long run must not fail at its last stage
    # because a module it imports then was being edited (or is broken) in the meantime.
    from . import replay as _replay, trust as _trust  # noqa: F401
    from .models import count_params, save_model, trust_outputs_model  # noqa: F401

    quality_cfg = _quality_config(PreprocessConfig.from_dict(cfg.preprocess))
    try:
        from . import export  # noqa: F401  (optional stage 7)
    except Exception:
        pass

    # 1. prepare data: list, group, carve the disjoint parts, decode
    prep = prepare_data(data_dir, out, cfg, limit_per_class, fold, cache, progress)
    P, y, n_cls = prep.parts, prep.labels, len(prep.classes)
    t_data = time.perf_counter()

    # 2. fit the network: train part, val part for stopping only. The shortcut audit reads the train part's
    # images and raw cues only (no network): it runs beside the training.
    fit_timing: dict = {}
    with ThreadPoolExecutor(1) as beside:
        audit_job = beside.submit(audit_shortcuts, {k: v[P["train"]] for k, v in prep.raw_cues.items()},
                                  prep.x[P["train"]], y[P["train"]], n_cls, cfg.seed)
        model, history, epochs_run, fast = fit_network(prep.x[P["train"]], y[P["train"]], prep.x[P["val"]],
                                                       y[P["val"]], n_cls, cfg, out, progress, fit_timing)
        audit = audit_job.result()
    t_train = time.perf_counter()

    # 3. the network's outputs on every clean image (a forward pass; nothing is fitted here)
    spec = get_spec(cfg.backbone)
    early_layer = spec.early_layer if cfg.ood_early_layer == "auto" else cfg.ood_early_layer
    early_layer = None if early_layer in (None, "", "none") else early_layer
    outs = network_outputs(model, prep.x, early_layer, progress)

    # 4. fit trust: OOD statistics on train, temperature + OOD thresholds on cal_a, review rule + conformal on cal_b
    src = prep.sources if len(set(prep.sources.tolist())) > 1 else None
    parts = {k: _part(k, P[k], y, outs, src) for k in ("train", "cal_a", "cal_b", "test")}
    part_info = {k: f"{k} ({prep.split_card['sizes'][k]} images, sha256 {prep.split_card['sha256'][k][:16]}…)"
                 for k in ("train", "cal_a", "cal_b")}
    audit_card = {"raw_images": {k: v["balanced_accuracy"] for k, v in audit["raw_images"].items()},
                  "model_inputs": {k: v["balanced_accuracy"] for k, v in audit["model_inputs"].items()},
                  "chance": 1.0 / n_cls, "warnings": audit["warnings"], "fitted_on": "train part (cross-validated)"}
    trust = fit_trust(parts["train"], parts["cal_a"], parts["cal_b"], prep.classes, cfg, early_layer, audit_card,
                      part_info)

    # 5. evaluate: the only stage that reads the test part
    ev = evaluate(parts["test"], trust, prep.classes, prep.sources[P["test"]], cfg, parts["cal_a"], parts["cal_b"])
    full = compiled(model)
    lat = evaluation.latency(lambda b: full(b), (prep.pcfg.size, prep.pcfg.size, 3))
    t_end = time.perf_counter()

    # 6. write the model folder and its card
    metrics = write_model(out, model, prep, trust, ev, audit, audit_card, cfg, history, epochs_run, fast, early_layer,
                          outs, lat, reproduce, quality_cfg,
                          timing={"data": t_data - t_start, "train": t_train - t_data, "post": t_end - t_train,
                                  "total": t_end - t_start, **{f"train.{k}": v for k, v in fit_timing.items()}})
    # 7. export to the fast runtime, when that module exists
    exp = _export_stage(out)
    if exp is not None:
        metrics["export"] = exp
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def write_model(out, model, prep: Prepared, trust, ev, audit, audit_card, cfg, history, epochs_run, fast, early_layer,
                outs, lat, reproduce, quality_cfg, timing) -> dict:
    """Save model.keras, the card (trust section, parts and what was fitted on each), metrics.json,
    ood_stats.npz and the replay bank."""
    from .data import PART_USE
    from .models import count_params, save_model
    from .replay import REPLAY_FILE, add_cut, bank_index, make_bank, save_bank

    spec = get_spec(cfg.backbone)
    classes, n_cls, P = prep.classes, len(prep.classes), prep.parts
    test_metrics, by_source = ev["test"], ev.get("test_per_source", {})
    params = count_params(model)
    rule_test = ev["review"]["test"]
    metrics = {**ev, "shortcut_audit": audit, "latency": lat, "parameters": params, "timing_s": timing,
               "epochs_run": epochs_run, "history": history,
               "split_sizes": dict(prep.split_card["sizes"]),
               "data_problems": prep.problems + list(prep.ds.problems)}
    trust.save_stats(out)
    from .colour import N_FEATURES as N_COLOUR, chroma_histograms

    rows = bank_index(prep.labels, P, seed=cfg.seed)[0]
    colour = np.zeros((len(prep.labels), N_COLOUR), np.float32)
    colour[rows] = chroma_histograms(prep.x[rows])  # only the rows the bank keeps
    bank = make_bank(outs["features"], outs["early"], prep.labels, P, classes, source=prep.data_card["name"],
                     seed=cfg.seed, colour=colour)
    save_bank(out / REPLAY_FILE, add_cut(bank, model, lambda r: prep.x[rows[r]], seed=cfg.seed))
    legacy = trust.legacy_sections()
    sizes, hashes = prep.split_card["sizes"], prep.split_card["sha256"]
    split_card = {"file": "split.json", "seed": cfg.seed, "fractions": dict(zip(P, cfg.fractions)),
                  "sizes": sizes,
                  "parts": {k: {"n": sizes[k], "sha256": hashes[k], "used_for": PART_USE.get(k, "")} for k in P},
                  "disjoint": "by image and by duplicate group (checked when the split is made)",
                  "grouping": _grouping_text(cfg, prep.data_card),
                  "near_duplicate_distance": cfg.near_duplicate_distance,
                  "stratified_by": "class x source" if by_source else "class",
                  "test_part_use": "evaluation only, once per training run; no fit, threshold or choice reads it"}
    now = datetime.now(timezone.utc)
    card = ModelCard(
        model_id=out.name, version=model_version(now), task=cfg.task, classes=classes, backbone=cfg.backbone,
        weights=("imagenet (offline file)" if cfg.weights not in ("imagenet", "none", None) else str(cfg.weights)),
        preprocessing=prep.pcfg.to_dict(), gradcam_layer=spec.gradcam_layer,
        input={"size": prep.pcfg.size, "channels": 3, "dtype": "float32", "range": [0, 255], "colour": "RGB"},
        training={**cfg.to_dict(), "fast_path_frozen_features": fast, "epochs_run": epochs_run,
                  "fitted_on": {"network": "train (weights); val (early stopping / checkpoint only)"},
                  "training_time_s": round(timing["train"], 1), "total_time_s": round(timing["total"], 1)},
        data={**prep.data_card, "problems": len(metrics["data_problems"])},
        split=split_card,
        metrics={"test": evaluation.summary_line(test_metrics), "measured_on": f"test part ({sizes['test']} images)",
                 "per_class_f1": {c: v["f1"] for c, v in test_metrics["per_class"].items()},
                 **({"per_source": {s: {k: v[k] for k in ("n", "accuracy", "macro_f1", "per_class_recall")}
                                    for s, v in by_source.items()}} if by_source else {})},
        calibration={**legacy["calibration"], "method": ev["calibration"]["method"],
                     "test_ece_before": ev["calibration"]["test_ece_before"],
                     "test_ece_after": ev["calibration"]["test_ece_after"], "n_bins": 15,
                     "fitted_on": trust.fitted_on["temperature"]},
        ood={**legacy["ood"], "quantile": cfg.ood_quantile, "comparison": ev["ood"]["comparison"],
             "fitted_on": f"statistics: {trust.fitted_on['ood_statistics']}; thresholds: "
                          f"{trust.fitted_on['ood_thresholds']}, in-distribution only"},
        review_rule={**legacy["review_rule"],
                     "kind": "selective classification with risk control (Clopper-Pearson, fixed-sequence)",
                     "guarantee": review.guarantee_text(cfg.review_alpha, cfg.review_delta) if trust.certified else
                     "No confidence threshold could be certified on calibration B: every result needs review.",
                     "calibration": trust.review, "measured_on_test": rule_test,
                     "fitted_on": trust.fitted_on["review_rule"]},
        trust=trust.to_card(),
        quality=quality_cfg,
        shortcut_audit=audit_card,
        parameters=params, versions=library_versions(),
        intended_use=use_statement(prep.pcfg.mode)[0], not_for=use_statement(prep.pcfg.mode)[1],
        limitations=_limitations(cfg, prep.data_card),
        created=now.isoformat(timespec="seconds"),
        reproduce=reproduce,
    )
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
