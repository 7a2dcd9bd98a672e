"""Adapt a model to a lab from that lab's reviewed cells: the network's top learns the lab, trust refitted.

When the parent's replay bank holds activations at the cut below the backbone's top blocks
(`bcc_core.replay.add_cut`), those blocks and the head are fine-tuned on the lab's fitting cells (clean,
flipped / rotated and augmented views, computed once below the cut) together with the parent's replay rows
at the cut, so classes the lab did not label keep the parent's behaviour; the layers below the cut (and
the early-layer OOD detector's input) stay the parent's. Without cut activations only the head (Dense128 +
logits) is retrained, on the parent's frozen features. The trust layer (`bcc_core.trust.TrustModel`) is
refitted on data the network never fitted: the lab's calibration cells are split (grouped, per class)
into parts A and B; temperature and OOD thresholds are fitted on A pooled with the parent's calibration-A
replay, the review rule and conformal quantile on B pooled with the parent's calibration-B replay (both
through the adapted network). The result is a complete model folder whose card names its parent (id +
SHA-256), the lab, every cell used (content SHA-256 and part) and before/after figures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from . import calibration, evaluation, label_check, ood, review
from .colour import (N_FEATURES, STD_FLOOR, chroma_branch, chroma_histograms, has_colour, head_rows, scaled_head_input,
                     view_histograms)
from .data import alike_classes
from .preprocess import MAX_VIEWS, dihedral_views
from .replay import REPLAY_FILE, concat_banks, cut_meta, decode_cut, encode_cut, load_bank, save_bank
from .second_opinion import SecondOpinion

CELLS_FILE = "cells.json"


@dataclass(frozen=True)
class AdaptConfig:
    """Adaptation settings, saved in the new card (`lineage.config`).

    Attributes:
        lab: name of the lab whose cells these are.
        add_classes: a folder that is not a parent class becomes a new output class.
        class_map: {lab folder: class}: folders read as these classes (e.g. {"neutrophil": "seg_neutrophil"});
            folders not in it are read by their own name.
        min_new_class_cells: distinct cells (duplicate groups) needed to add a class.
        calibration_fraction: share of the lab's cells (per class, grouped) for calibration and the before/after
            figures: kept out of the fine-tuned top's fit, and out of the head's unless `cross_fit` (then scored by
            heads fitted without them).
        backbone_layers: backbone layers fine-tuned with the head (the parent's replay bank must hold activations
            at a cut at least that deep, `replay.add_cut`; else, or with 0, only the head is retrained on
            frozen features). 0 by default: the head alone, cross-fitted, named a new lab's cells better than
            the fine-tuned top (`CUT_LAYERS`, `adapt --fine-tune`), see `cross_fit`.
        backbone_aug_views: augmented views (`augment_batch`: stain, blur, scale, ...) of each fitting cell, on
            top of the clean image and its 7 flips / rotations, when the backbone is fine-tuned.
        backbone_aug_colour: those views include the colour operations (stain jitter, channel shift,
            greyscale); False keeps geometry, blur, noise and compression only (one lab, one stain).
            Measured against True (ten repeats on LISC) in
            bench/results/adapt_lab_lisc_views_8_no_colour_aug{,_r5-9}.md: mixed, so not the default.
        backbone_epochs, backbone_learning_rate: that fine-tuning (Adam, from the parent's weights).
        backbone_min_cells: distinct reviewed cells every labelled class needs for the fine-tuning; with
            fewer, only the head is retrained. Fine-tuned from 10 cells per class (6 fitting), the top of the
            network learnt those cells rather than BCCD (a third of its neutrophils named monocyte, up to 25%
            of the rest wrong and shown ok); from 18-20 per class on LISC it beat the head alone. 15 lies
            between the two and was not measured itself.
        replay_targets: "parent": the parent's replay rows are fitted to the parent's own output
            probabilities (distillation, keeps the parent's boundaries on its own data); "labels": to their labels.
        aug_views: flipped / 90°-rotated views of each fitting cell added to the head's training data and to
            the OOD statistics (0..7; when the top is fine-tuned it trains on all 7).
        lab_weight: total training weight of the lab's cells relative to the replay (each source is
            class-balanced within itself).
        epochs, batch_size, learning_rate: head training (Adam, from the parent head's weights).
        ood_components: "class_source": one Gaussian per (class, source), so the lab's own stain is
            in-distribution for the classes it labelled; "class": one per class.
        ood_covariance: "per_source": one shared covariance per source (lab) in the Mahalanobis
            detectors; "shared": one for all components.
        review_lab_no_errors: raise the review threshold above every wrong prediction that passed the other
            gates among the lab's calibration cells, parts A and B (and, with `lab_check_folds`, its fitting
            cells scored out of fold), on top of the pooled Clopper-Pearson rule (part B alone held too few of
            the lab's errors to keep them out of "ok").
        review_unlabelled_classes: a suggestion of a class the lab did not label is always sent to
            review (card `review_rule.review_classes`): nothing shows it holds on this lab's images.
        ood_quantile: each detector's threshold is the larger of this quantile on the parent's
            validation half A and on the lab's calibration part (both held out from every fit).
        review_alpha, review_delta, conformal_alpha: as in training (`TrainConfig`).
        test_time_views: the adapted model's logits are the mean over each image and its first
            test_time_views - 1 flips / 90° rotations (card `trust.views`; 1: the image alone, 8: every one,
            at 8x the forward-pass cost). The trust layer is fitted on the lab's cells scored the same way; the
            parent's replay rows hold one view of each image, so they enter its calibration as single views.
            Measured against 1 in bench/results/adapt_lab_lisc_views_{1,8}.md and adapt_lab_pb7_views_{1,8}.md.
        colour_features: the adapted head reads the image's chroma histogram (`bcc_core.colour`, part of the
            new model's graph) beside the pooled features, standardised on the head's fitting rows; needs
            the parent's replay bank to hold the histograms of its rows (`replay-bank` writes them). With the
            backbone fine-tuned, the head is then refitted on the fine-tuned features and the histogram.
            Measured against False: better on LISC at 20 cells a class, top fine-tuned
            (bench/results/adapt_lab_lisc_views_8_colour_r0-9.md against adapt_lab_lisc_views_8_r0-9.md).
        colour_min_cells: distinct reviewed cells every labelled class needs for the histogram to be read. 15
            until the second opinion: at 10 cells a class the head reading it named far more cells right but
            showed more of the lab's errors as ok (LISC, five repeats: bench/results/adapt_lab_lisc_n10_colour.md
            against adapt_lab_lisc_n10.md; BCCD: adapt_lab_bccd_colour.md against adapt_lab_bccd_colour_off.md).
            With the second opinion, 10: see `second_opinion`. Fewer than 10 were not measured.
        colour_gain: the standardised histogram is multiplied by this before the head reads it. The head has
            no weight penalty and Adam steps each weight by about the same amount, so a gain g lets the
            histogram's weights move the logits g times as fast: it sets how much the head leans on colour
            against the features it starts from. Measured 3 against 1 on LISC at 20 cells a class, top
            fine-tuned, ten repeats, the same draws (bench/results/adapt_lab_lisc_views_8_colour_gain3_r0-9.md
            against adapt_lab_lisc_views_8_colour_r0-9.md): better on both halves of the draws; the only
            other value tried, so the choice is mildly optimistic on LISC.
        colour_with_top: with the top fine-tuned, how the head comes to read the histogram: "refit": the top
            and a head on the features alone are trained together, then a head reading features and histogram
            is fitted on the fine-tuned features; "joint": the head trained with the top reads the histogram
            from the start (every training row, the augmented views included, with its own histogram).
        cross_fit: a head fitted on frozen features (the parent's with the head alone retrained; the fine-tuned
            top's when the head is refitted to read the histogram, the top having learnt from the fitting cells
            only) is fitted on every reviewed cell; the calibration cells are scored out of sample, part A by a
            head fitted without A, part B by one fitted without B, and the trust layer is fitted on those scores
            (the OOD statistics on the fitting part only, as without). Two more head fits (seconds each).
            Measured with the head alone on LISC, 20 cells a class, five classes taught, ten repeats, the same
            draws (bench/results/adapt_lab_lisc_head_only_cross_fit_r0-9.md against adapt_lab_lisc_head_only_r0-9.md
            and the fine-tuned top, adapt_lab_lisc_views_8_colour_gain3_r0-9.md): every class named right 91.6%
            of the time or more, more shown as ok in every repeat; the default, with the head alone.
        lab_check_folds: with cross-fitting, the fitting cells are scored out of sample too, in this many grouped,
            class-stratified folds (a head fitted without each fold), and the lab's no-errors check
            (`review_lab_no_errors`) also raises the review threshold above their confident errors: it then sees
            every reviewed cell's out-of-sample score, not the calibration share's alone. 0 or 1: calibration
            cells only. The OOD gate they pass was fitted on them, so more of their errors count (stricter). With
            the top fine-tuned, the folds' heads read features the fitting cells helped learn: fewer errors show.
            Measured against 0 on the same draws: LISC, 20 cells a class, ten repeats
            (bench/results/adapt_lab_lisc_lab_check_folds_3_r0-9.md against adapt_lab_lisc_head_only_cross_fit_r0-9.md):
            shown as ok 66.6% against 69.0%, wrong-and-ok 0.94% against 1.17% (the worst repeat 3.12% both); BCCD,
            10 a class, five repeats (adapt_lab_bccd_lab_check_folds_3.md against adapt_lab_bccd_cross_fit.md):
            13.4% against 32.1% shown as ok, wrong-and-ok 0.92% against 3.34% (worst 4.6% against 12.1%). The
            default: fewer of a lab's errors shown as ok where the reviewed cells show the lab is hard.
        second_opinion: when the refitted head reads the chroma histogram, a second head is fitted on the same
            rows without it (`bcc_core.second_opinion`; with cross-fitting, one per fold too, so the lab's cells
            are judged by second opinions that never saw them), and a result is ok only when both name the same
            class; the review rule and the lab's no-errors check read only the cells where they agree. Measured
            against none on the same draws: LISC, 20 cells a class, ten repeats
            (bench/results/adapt_lab_lisc_second_opinion_r0-9.md against adapt_lab_lisc_lab_check_folds_3_r0-9.md):
            the same head, so the same recall; shown as ok 63.7% against 66.6% (worst repeat 57.0% against 53.9%),
            wrong-and-ok 0.47% against 0.94% (worst 0.78% against 3.12%). LISC, 10 a class, five repeats, the head
            reading the histogram from 10 cells (adapt_lab_lisc_n10_second_opinion.md against
            adapt_lab_lisc_n10_colour.md and the features alone, adapt_lab_lisc_n10.md): ok 56.4% (58.0%, 38.1%),
            wrong-and-ok 0.57% (1.70%, 0.68%), worst 1.14% (4.55%, 1.14%). On BCCD the lab's check sets the
            threshold above every cell the two disagree on: little changes (adapt_lab_bccd_second_opinion.md
            against adapt_lab_bccd_colour_n10.md). Each fold's second head costs seconds.
        doubted_labels: what to do with the reviewed cells whose label the label check doubts (bcc_core.label_check:
            every cell scored by a head fitted without it). "leave_out" (the default): name them in the summary
            and the card for a reviewer, and adapt a second time without them (at most a quarter of a class, never
            below what the first pass's model needed; see `_may_leave_out`), which doubles the time when the check
            doubts any. "list": name them and learn them as given. LISC, N = 20, five classes, 2 of each class's
            reviewed cells filed under another class (bench/adapt_lab.py --flip 2): the check listed 48 of the 50;
            learnt as given they left 2.7% of the rest shown as ok, left out 55.5% (worst repeat 45.3%; wrong-and-ok
            0.47%, worst 1.56%; adapt_lab_lisc_flip2*.md). On clean LISC cells it leaves out ~1 cell a repeat: the
            same wrong-and-ok (0.62%, worst 0.78%), shown as ok 61.1% (64.5%), worst 50.8% (60.9%), monocytes
            90.4% (89.6%; adapt_lab_lisc_leave_out.md against adapt_lab_lisc_at_15bbd8e.md).
        seed: split, initialisation and shuffling seed.
    """

    lab: str = "lab"
    add_classes: bool = False
    class_map: dict = dataclasses.field(default_factory=dict)
    backbone_layers: int = 0
    backbone_aug_views: int = 8
    backbone_aug_colour: bool = True
    backbone_epochs: int = 15
    backbone_learning_rate: float = 3e-4
    backbone_min_cells: int = 15
    replay_targets: str = "parent"
    min_new_class_cells: int = 8
    calibration_fraction: float = 0.4
    aug_views: int = 7
    lab_weight: float = 1.0
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 5e-4
    ood_components: str = "class_source"
    ood_covariance: str = "per_source"
    review_lab_no_errors: bool = True
    review_unlabelled_classes: bool = True
    ood_quantile: float = 0.95
    review_alpha: float = 0.02
    review_delta: float = 0.1
    conformal_alpha: float = 0.05
    test_time_views: int = 8
    colour_features: bool = True
    colour_min_cells: int = 10
    colour_gain: float = 3.0
    colour_with_top: str = "refit"
    cross_fit: bool = True
    lab_check_folds: int = 3
    second_opinion: bool = True
    doubted_labels: str = "leave_out"
    seed: int = 0

    def __post_init__(self):
        if self.colour_with_top not in ("refit", "joint"):
            raise ValueError(f"colour_with_top must be 'refit' or 'joint', not {self.colour_with_top!r}")
        if not self.colour_gain > 0:
            raise ValueError(f"colour_gain must be positive, not {self.colour_gain}")
        if self.doubted_labels not in ("list", "leave_out"):
            raise ValueError(f"doubted_labels must be 'list' or 'leave_out', not {self.doubted_labels!r}")
        if not 1 <= self.test_time_views <= MAX_VIEWS:
            raise ValueError(f"test_time_views must be 1..{MAX_VIEWS} (the image and its flips / rotations), "
                             f"not {self.test_time_views}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LEFT_OUT = "its label was doubted by the label check: left out (doubted_labels = 'leave_out')"


def _may_leave_out(doubted: list[dict], files: list[str], y_lab: np.ndarray, groups: np.ndarray, n_old: int,
                   cfg: AdaptConfig, keep: int = 0) -> tuple[str, ...]:
    """The doubted cells a second pass leaves out, most doubted first: never more than a quarter of a class's
    distinct cells (when the model doubts more, the lab's class and the model's differ, and the cells are kept and
    listed), and never below the cells a class needs (two; an added class min_new_class_cells; `keep`: what the
    first pass's model needed, e.g. colour_min_cells when its head read the histogram, so that leaving cells out
    never turns the second pass into a lesser kind of model)."""
    row = {f: i for i, f in enumerate(files)}
    out: list[str] = []
    for d in doubted:
        c = y_lab[row[d["file"]]]
        members = np.flatnonzero(y_lab == c)
        need = max(2, keep, cfg.min_new_class_cells if c >= n_old else 2,
                   int(np.ceil(0.75 * len(np.unique(groups[members])))))
        gone = set(out) | {d["file"]}
        if len({groups[i] for i in members if files[i] not in gone}) >= need:
            out.append(d["file"])
    return tuple(out)


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lab_features(pred, raw: list[bytes], shas: list[str], fit_i: np.ndarray, n_views: int, cache: dict | None = None):
    """The parent's forward pass on the lab's cells (clean) and on dihedral views of the fitting cells.

    Returns:
        (features (N, D), parent logits (N, C), early (N, E) or None, quality-flagged (N,) bool,
        view features (V*F, D) view-major over fit_i, view early activations or None).
    """
    from .io import read_image

    cache = {} if cache is None else cache
    n_views = max(0, min(n_views, 7))
    keys = [(shas[i], 0) for i in range(len(raw))] + [(shas[i], v) for v in range(1, n_views + 1) for i in fit_i]
    todo = sorted({k for k in keys if k not in cache})
    if todo:
        need = sorted({s for s, _ in todo})
        at = {s: i for i, s in enumerate(shas)}
        prepared = {s: pred.prepare(read_image(raw[at[s]])) for s in need}
        batch = []
        for s, v in todo:
            x = prepared[s][0][None]
            batch.append(x if v == 0 else dihedral_views(x, v)[v - 1])
        f, lg, e = pred.forward(np.concatenate(batch))
        for j, (s, v) in enumerate(todo):
            cache[(s, v)] = (f[j], lg[j], None if e is None else e[j], bool(prepared[s][1]))
    got = [cache[k] for k in keys]
    n = len(raw)
    f_all = np.stack([g[0] for g in got])
    has_e = got[0][2] is not None if got else False
    e_all = np.stack([g[2] for g in got]) if has_e else None
    lg = np.stack([g[1] for g in got[:n]])
    q = np.array([g[3] for g in got[:n]])
    return (f_all[:n], lg, None if e_all is None else e_all[:n], q, f_all[n:],
            None if e_all is None else e_all[n:])


def check_classes(lab_classes: list[str], model_classes: list[str], add_classes: bool,
                  others: dict[str, list[str]] | None = None) -> list[str]:
    """The new model's classes; refuses lab folders that are not model classes unless `add_classes`, naming
    any model among `others` ({folder: classes}) that knows every one of the lab's folders. A folder that
    looks like a model class under another spelling is refused even with `add_classes`: a new class beside
    the model's own would split one cell type in two (map it with `AdaptConfig.class_map`)."""
    unknown = [c for c in lab_classes if c not in model_classes]
    alike = {c: alike_classes(c, model_classes) for c in unknown}
    alike = {c: m for c, m in alike.items() if m}
    if alike:
        said = "; ".join(f"{c!r} looks like {' or '.join(map(repr, m))}" for c, m in alike.items())
        pairs = " ".join(f"--class-map {c}={m[0]}" for c, m in alike.items())
        raise ValueError(f"lab folder names that are not this model's classes: {said}. Rename the folder(s) to the "
                         f"model's class names, or map them (CLI: {pairs}; on the Your lab page: tick the box that "
                         f"reads them as the model's classes); a new class beside the model's own would split one "
                         f"cell type in two")
    if unknown and not add_classes:
        fits = [d for d, cls in (others or {}).items() if set(lab_classes) <= set(cls)]
        hint = (f"; the model {Path(fits[0]).name} knows all of them (CLI: --model {fits[0]}; in the app, choose it "
                f"in the sidebar)" if fits else "")
        raise ValueError(f"lab folder(s) {unknown} are not classes of this model {list(model_classes)}; rename "
                         f"them to a model class, remove them, or add them as new classes (CLI: --add-classes; on "
                         f"the Your lab page: Allow new classes){hint}")
    return list(model_classes) + unknown


# The five white-cell types of every normal peripheral smear (their names as the bundled models spell them).
WHITE_CELL_TYPES = ("seg_neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
UNTAUGHT_TYPES_MEASURED = "bench/results/adapt_lab_lisc_head_only_cross_fit_3_classes.md"


def untaught_white_cells(classes: list[str]) -> list[str]:
    """The normal white-cell types a white-cell model (one naming any of them) cannot name at all: a smear's
    cells of those types are named as one of its classes, and some are shown as ok. Measured: pbs5 adapted to
    LISC from three classes, 74 of 425 eosinophils and lymphocytes were shown as ok, 12-25% per repeat
    (UNTAUGHT_TYPES_MEASURED). Empty for a model of other classes (e.g. leukaemia stages)."""
    if not set(classes) & set(WHITE_CELL_TYPES):
        return []
    return [c for c in WHITE_CELL_TYPES if c not in classes]


def untaught_warning(missing: list[str]) -> str:
    """What a lab is told when its adapted model cannot name some normal white-cell types."""
    one = len(missing) == 1
    return (f"This model cannot name {', '.join(missing)}: a smear's cells of {'that type' if one else 'those types'} "
            f"will be named as one of its classes, and some shown as ok (measured when a lab taught three types: "
            f"{UNTAUGHT_TYPES_MEASURED}). Teach {'it' if one else 'them'}: add a folder of each, with new classes "
            f"allowed (CLI: --add-classes; Your lab page: Allow new classes)")


def describe_review(rule: dict) -> str:
    """One sentence on an adapted model's review threshold and the lab's check behind it (`summary["review_rule"]`)."""
    if not rule.get("certified") or rule.get("threshold") is None:
        return "No review threshold could be certified: every cell goes to review."
    t, wrong = rule["threshold"], rule.get("no_errors_wrong_seen")
    said = f"Cells are shown as ok from confidence {t:.3f}"
    if wrong is None:
        return said + "."
    items = rule.get("no_errors_items")
    among = (f"{sum(items.values())} of your reviewed cells, each scored by a model fitted without it" if items
             else "your calibration cells")
    errors = f"error{'s' if wrong > 1 else ''} among {among}{',' if items else ''}"
    if wrong and t > rule["guarantee_threshold"]:
        return (f"{said}: the guarantee alone gave {rule['guarantee_threshold']:.3f}; {wrong} confident {errors} "
                f"raised it above them.")
    if wrong:
        return f"{said} (the guarantee's): {wrong} {errors} passed the other gates, all below it."
    return f"{said} (the guarantee's): no confident error among {among}{',' if items else ''} passed the other gates."


def _bundled_classes() -> dict[str, list[str]]:
    """{model folder: classes} of the bundled models."""
    from .inference import card_classes, list_models

    return {str(d): cls for d in list_models() if (cls := card_classes(d))}


def lab_figures(y: np.ndarray, probs: np.ndarray, ok: np.ndarray, classes: list[str]) -> dict:
    """Per-class recall (suggested class, whatever the status), shown-as-ok and wrong-and-ok rates."""
    pred = probs.argmax(1)
    right = pred == y
    rec = {classes[c]: float(right[y == c].mean()) for c in np.unique(y)}
    return {"n": int(len(y)), "recall": rec, "ok_fraction": float(ok.mean()) if len(y) else 0.0,
            "wrong_ok_of_all": float((ok & ~right).mean()) if len(y) else 0.0,
            "wrong_ok": int((ok & ~right).sum())}


def _macro_f1(y, probs, n):
    from sklearn.metrics import f1_score

    return float(f1_score(y, probs.argmax(1), labels=list(range(n)), average="macro", zero_division=0))


def _head_layers(parent_model, n_classes: int) -> list:
    """New head layers (dropout1, dense, dropout2, logits) shaped like the parent's; `_init_head` sets
    their weights once they are built."""
    import keras

    from .models import LOGITS_LAYER

    return [keras.layers.Dropout(parent_model.get_layer("head_dropout1").rate, name="head_dropout1"),
            keras.layers.Dense(parent_model.get_layer("head_dense").units, activation="relu", name="head_dense"),
            keras.layers.Dropout(parent_model.get_layer("head_dropout2").rate, name="head_dropout2"),
            keras.layers.Dense(n_classes, name=LOGITS_LAYER)]


def _init_head(layers: list, parent_model) -> None:
    """The parent head's weights; an added class's logit row starts at zero weights and the average old
    class's bias, so it is neither favoured nor excluded. A head input the parent's head does not read (the
    chroma histogram) starts at zero weights; one the new head does not read is dropped."""
    from .models import LOGITS_LAYER

    k_par, b_par = parent_model.get_layer("head_dense").get_weights()
    k_dense = np.zeros_like(layers[1].get_weights()[0])
    rows = min(len(k_par), len(k_dense))  # the pooled features come first in either
    k_dense[:rows] = k_par[:rows]
    layers[1].set_weights([k_dense, b_par])
    k_old, b_old = parent_model.get_layer(LOGITS_LAYER).get_weights()
    k_new, b_new = layers[3].get_weights()
    n_old = k_old.shape[1]
    k_new[:, :n_old], b_new[:n_old] = k_old, b_old
    b_new[n_old:] = b_old.mean()
    layers[3].set_weights([k_new, b_new])


def _wire(layers: list, features_tensor):
    import keras

    h = features_tensor
    for layer in layers:
        h = layer(h)
    return keras.layers.Activation("softmax", name="probs", dtype="float32")(h)


def _train_head(parent_model, n_classes: int, x, y, w, cfg: AdaptConfig):
    """A Study-1 head initialised from the parent's (extra logits rows for added classes), fitted on
    features x (N, D) with per-sample weights. Returns the head layers (dropout1, dense, dropout2, logits)."""
    import keras

    keras.utils.set_random_seed(cfg.seed)
    layers = _head_layers(parent_model, n_classes)
    inp = keras.Input((x.shape[1],), name="features_in")
    head = keras.Model(inp, _wire(layers, inp))
    _init_head(layers, parent_model)
    head.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate), loss="categorical_crossentropy")
    head.fit(x, np.eye(n_classes, dtype=np.float32)[y], sample_weight=w, epochs=cfg.epochs,
             batch_size=cfg.batch_size, shuffle=True, verbose=0)
    return layers


def lab_inputs(pred, raw: list[bytes], shas: list[str], idx, cache: dict) -> np.ndarray:
    """The parent's model inputs (its preprocessing) for lab cells `idx`, cached by content hash."""
    from .io import read_image

    for i in idx:
        if ("input", shas[i]) not in cache:
            cache[("input", shas[i])] = pred.prepare(read_image(raw[i]))[0]
    return np.stack([cache[("input", shas[i])] for i in idx])


def can_fine_tune(bank: dict, early_layer: str | None, cfg: AdaptConfig, model=None,
                  cells_per_class: dict | None = None) -> str:
    """Why the backbone cannot be fine-tuned ("" when it can). `cells_per_class`: distinct reviewed cells of
    each class the lab labelled."""
    meta = cut_meta(bank)
    if cfg.backbone_layers <= 0:
        return "the default (adapt --fine-tune also fine-tunes the top of the network)"
    few = {c: k for c, k in (cells_per_class or {}).items() if k < cfg.backbone_min_cells}
    if few:
        return (f"fewer than {cfg.backbone_min_cells} distinct reviewed cells in {few}: the top of the network "
                f"would learn those few cells rather than the lab; only the head was retrained")
    if meta is None:
        return ("the parent's replay bank holds no activations at the cut (rebuild it: python -m bcc_core "
                "replay-bank); only the head was retrained")
    if meta["fine_tune_layers"] < cfg.backbone_layers:
        return (f"the replay bank's cut is below the top {meta['fine_tune_layers']} layers, fewer than "
                f"{cfg.backbone_layers}; only the head was retrained")
    if model is not None and early_layer:
        from .training import split_at_frozen_cut

        from .models import feature_extractor

        top = split_at_frozen_cut(feature_extractor(model), meta["fine_tune_layers"])[1]
        if early_layer in {l.name for l in top.layers}:
            return f"the early-layer OOD detector's layer {early_layer} is above the cut; only the head was retrained"
    return ""


COLOUR_OPS = ("stain_p", "channel_shift_p", "grayscale_p")
"""The augmentation's colour operations, left out of the fine-tuning's views with `backbone_aug_colour=False`."""


def backbone_augment(cfg: AdaptConfig):
    """The augmentation of the fine-tuning's augmented views: the training default, without its colour
    operations when `cfg.backbone_aug_colour` is False."""
    from .augment import AugmentConfig

    return AugmentConfig() if cfg.backbone_aug_colour else dataclasses.replace(
        AugmentConfig(), **{k: 0.0 for k in COLOUR_OPS})


def _fine_tune_top(pred, bank: dict, raw, shas, fit_i, y_lab, n_cls: int, n_views: int, lab_src: int,
                   sources: list, cfg: AdaptConfig, cache: dict, say, with_colour: bool = False):
    """Fine-tune the backbone's top `cfg.backbone_layers` layers and a new head (initialised from the
    parent's) on the parent's replay rows at the cut and the lab's fitting cells (clean, flipped / rotated
    and augmented views), everything below the cut computed once. `with_colour`: the head trained with the
    top also reads each row's standardised chroma histogram (the bank's for replay rows; computed for the
    lab's views, augmented ones included), and the returned model holds the histogram branch.

    Returns:
        (model, bank_new, bank_parent, lab features (N, D), lab flip/rotation view features (n_views * F, D)
        view-major over fit_i, lab cut codes (N, ...), features of every lab cell's first
        max(cfg.test_time_views - 1, n_views) views [(N, D), ...]: the test-time mean's, and a cross-fitted
        head's training views). The banks hold the replay rows that have cut
        activations (renumbered), with the adapted network's and the parent's features respectively, both
        computed from the stored (compressed) activations, so before/after differ only by the training.
    """
    import os

    import keras

    from .augment import augment_batch
    from .models import FEATURES_LAYER
    from .training import _unfreeze_top, batched_predict, compiled, split_at_frozen_cut

    keras.utils.set_random_seed(cfg.seed)
    base = keras.models.clone_model(pred.model)
    base.set_weights(pred.model.get_weights())
    layers = _head_layers(pred.model, n_cls)
    feats_t = base.get_layer(FEATURES_LAYER).output
    cut = cut_meta(bank)["fine_tune_layers"]  # the bank's cut
    if not with_colour:
        model = keras.Model(base.input, _wire(layers, feats_t), name=pred.model.name)
        _init_head(layers, pred.model)
        bottom, train = split_at_frozen_cut(model, cut)
        top_features = keras.Model(bottom.outputs[0], feats_t)
    else:  # trained on (cut activations, standardised histogram); the model is wired once its scale is known
        bottom, top_features = split_at_frozen_cut(keras.Model(base.input, feats_t), cut)
        cut_in, z_in = keras.Input(bottom.outputs[0].shape[1:]), keras.Input((N_FEATURES,))
        train = keras.Model([cut_in, z_in], _wire(layers, keras.layers.Concatenate()([top_features(cut_in), z_in])))
        _init_head(layers, pred.model)
    for layer in base.layers:
        layer.trainable = False
    _unfreeze_top(base, cfg.backbone_layers)
    for layer in layers:
        layer.trainable = True
    below = compiled(bottom)
    features = compiled(top_features)

    def cut_of(keys_views):
        """Cut activations of (cell index, dihedral view) pairs, cached by (content hash, view)."""
        todo = [(i, v) for i, v in keys_views if ("cut", shas[i], v) not in cache]
        if todo:
            idx = sorted({i for i, _ in todo})
            x = dict(zip(idx, lab_inputs(pred, raw, shas, idx, cache)))
            batch = np.stack([x[i] if v == 0 else dihedral_views(x[i][None], v)[v - 1][0] for i, v in todo])
            for (i, v), c in zip(todo, batched_predict(below, batch)):
                cache[("cut", shas[i], v)] = c.astype(np.float16)
        return np.stack([cache[("cut", shas[i], v)] for i, v in keys_views]).astype(np.float32)

    say(0.3, f"below the cut: {len(raw)} cells and {7 + cfg.backbone_aug_views} views of {len(fit_i)} fitting cells")
    c_lab = cut_of([(i, 0) for i in range(len(raw))])
    c_flip = [cut_of([(i, v) for i in fit_i]) for v in range(1, 8)]
    x_fit = lab_inputs(pred, raw, shas, fit_i, cache)
    acfg = backbone_augment(cfg)
    c_aug, h_aug = [], []
    for v in range(cfg.backbone_aug_views):
        x_aug = augment_batch(x_fit, seed=cfg.seed * 1000 + v, cfg=acfg, labels=y_lab[fit_i],
                              workers=os.cpu_count() or 1)
        c_aug.append(batched_predict(below, x_aug))
        if with_colour:
            h_aug.append(chroma_histograms(x_aug))
    codec = {k: bank[k] for k in ("cut_basis", "cut_mean", "cut_lo", "cut_hi")}
    rows = np.asarray(bank["cut_rows"])
    c_bank = decode_cut(bank["cut_codes"], codec)
    f_bank_parent = batched_predict(features, c_bank)  # before training: the parent's network on the same rows
    rep = np.isin(bank["part"][rows], ("train", "lab_fit"))
    src_rep = np.array([sources.index(s) for s in bank["source"][rows]])
    # The lab's activations pass through the same code as the replay's: trained on decoded replay rows and
    # exact lab rows, the top could tell the two apart by the detail the code drops (a shortcut to "lab").
    views = [decode_cut(encode_cut(c, codec), codec) for c in [c_lab[fit_i]] + c_flip + c_aug]
    x_tr = np.concatenate([c_bank[rep]] + views)
    y_tr = np.concatenate([bank["labels"][rows][rep]] + [y_lab[fit_i]] * len(views))
    # Replay rows learn the parent's own output probabilities (distillation: what the parent made of each of
    # its images, not only the label), so the parent's classes keep their boundaries on its own data; the
    # lab's cells learn their reviewed labels.
    t_tr = np.eye(n_cls, dtype=np.float32)[y_tr]
    if cfg.replay_targets == "parent":
        from .models import LOGITS_LAYER, head_only

        lg_rep = batched_predict(compiled(head_only(pred.model, LOGITS_LAYER)),
                                 head_rows(pred.model, f_bank_parent[rep], bank["colour"][rows][rep] if "colour" in bank
                                           else None))
        p_rep = np.exp(lg_rep - lg_rep.max(1, keepdims=True))
        t_tr[: int(rep.sum())] = 0
        t_tr[: int(rep.sum()), : lg_rep.shape[1]] = p_rep / p_rep.sum(1, keepdims=True)
    s_tr = np.concatenate([src_rep[rep], np.full(len(fit_i) * len(views), lab_src)])
    w = _sample_weights(y_tr, s_tr, lab_src, cfg.lab_weight)

    class Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            say(0.35 + 0.25 * (epoch + 1) / cfg.backbone_epochs,
                f"fine-tuning the top of the network: epoch {epoch + 1}/{cfg.backbone_epochs}")

    if with_colour:  # the histograms of the same rows, in the same order as x_tr
        h_tr = np.concatenate([np.asarray(bank["colour"][rows][rep], np.float32), chroma_histograms(x_fit)]
                              + view_histograms(x_fit, 7) + h_aug)
        c_mean, c_scale = h_tr.mean(0), cfg.colour_gain / np.maximum(h_tr.std(0), STD_FLOOR)
        x_tr = [x_tr, ((h_tr - c_mean) * c_scale).astype(np.float32)]
    train.compile(optimizer=keras.optimizers.Adam(cfg.backbone_learning_rate), loss="categorical_crossentropy")
    train.fit(x_tr, t_tr, sample_weight=w, epochs=cfg.backbone_epochs,
              batch_size=32, shuffle=True, verbose=0, callbacks=[Progress()])
    if with_colour:
        head_in = scaled_head_input(feats_t, chroma_branch(base.input), c_mean, c_scale)
        model = keras.Model(base.input, _wire(layers, head_in), name=pred.model.name)
    sub = {k: bank[k][rows] for k in ("features", "labels", "part", "source", "early", "colour") if k in bank}
    sub.update({k: bank[k] for k in ("classes", "meta", "cut_meta", *codec)},
               cut_codes=bank["cut_codes"], cut_rows=np.arange(len(rows), dtype=np.int32))
    bank_new = {**sub, "features": batched_predict(features, c_bank)}
    # Before/after compare like with like: the parent's and the adapted network on the same decoded rows.
    sub["features"] = f_bank_parent
    f_lab = batched_predict(features, c_lab)
    f_views = (np.concatenate([batched_predict(features, c) for c in c_flip[:n_views]]) if n_views
               else np.zeros((0, f_lab.shape[1]), np.float32))
    f_all_views = [batched_predict(features, cut_of([(i, v) for i in range(len(raw))]))
                   for v in range(1, 1 + max(cfg.test_time_views - 1, n_views))]
    return model, bank_new, sub, f_lab, f_views, encode_cut(c_lab, codec), f_all_views


def _sample_weights(y: np.ndarray, src: np.ndarray, lab_src: int, lab_weight: float) -> np.ndarray:
    """Class-balanced within each source; the lab's rows together weigh `lab_weight` x the replay's."""
    w = np.zeros(len(y))
    for s in np.unique(src):
        m = src == s
        total = lab_weight if s == lab_src else 1.0
        cls = np.unique(y[m])
        for c in cls:
            mc = m & (y == c)
            w[mc] = total / (len(cls) * mc.sum())
    return w * len(w) / w.sum()


def adapt(parent_dir, labelled_dir, out_dir, cfg: AdaptConfig = AdaptConfig(),
          progress: Callable[[float, str], None] | None = None, reproduce: str = "",
          cache: dict | None = None, left_out: tuple[str, ...] = (), first_pass_s: float = 0.0) -> dict:
    """Adapt a model to a lab and write a complete new model folder.

    Args:
        parent_dir: model folder with model.keras, model_card.json, ood_stats.npz and replay.npz.
        labelled_dir: ImageFolder of the lab's reviewed cells (`<dir>/<class>/<image>`); folder names
            must be the model's classes unless `cfg.add_classes`.
        out_dir: new model folder (must not be the parent's).
        cfg: settings.
        progress: `on_progress(fraction in [0, 1], message)` callback.
        reproduce: command line recorded in the card.
        cache: optional dict reused between calls (benchmarks adapting the same cells repeatedly): the
            parent's outputs and cut activations per (content SHA-256, view): the layers below the cut are
            the parent's, so results are identical.
        left_out: files (relative to `labelled_dir`) not to learn from: with `cfg.doubted_labels == "leave_out"`,
            the second pass leaves out the cells whose label the first pass's check doubted.
        first_pass_s: the first pass's time, counted into the second's `time_s`.

    Returns:
        Summary: cell counts, before/after figures on the lab's calibration part, parent test
        macro-F1 before/after (replay), time.

    Raises:
        ValueError: unknown class folders (without add_classes), too few cells, no replay bank.
    """
    import keras

    from .data import check_disjoint, group_duplicates, list_imagefolder, split_parts
    from .inference import Predictor
    from .io import content_hash, read_image_bytes, read_image
    from .model_card import ModelCard
    from .models import FEATURES_LAYER, LOGITS_LAYER, head_only, save_model
    from .training import _export_stage, batched_predict, compiled, model_version

    report = progress or (lambda f, m: None)
    two_pass = cfg.doubted_labels == "leave_out"  # progress: the first pass fills half the bar, the second the rest

    def say(f: float, m: str) -> None:
        report(f if not two_pass else 0.5 + f / 2 if left_out else f / 2, m)

    cache = {} if cache is None else cache
    t0 = time.perf_counter() - first_pass_s
    parent, out = Path(parent_dir), Path(out_dir)
    if out.resolve() == parent.resolve():
        raise ValueError("the adapted model needs its own folder (--out must differ from --model)")
    from .fit_guard import assert_bundle_fittable
    from .inference import models_root

    assert_bundle_fittable([labelled_dir], out, models_root())  # BCCD may be adapted on, never into models/
    if not (parent / REPLAY_FILE).is_file():
        raise ValueError(f"{parent}: no {REPLAY_FILE}; build it first: python -m bcc_core replay-bank --model "
                         f"{parent} --data <the dataset it was trained on>")
    say(0.02, "loading the parent model")
    pred = Predictor.load(parent)
    bank = load_bank(parent / REPLAY_FILE)
    if list(bank["classes"]) != pred.classes:
        raise ValueError(f"{parent}/{REPLAY_FILE} lists classes {list(bank['classes'])}, the model {pred.classes}")

    say(0.08, "listing the lab's cells")
    ds = list_imagefolder(labelled_dir)
    if left_out:
        root, leave = Path(ds.root), set(left_out)
        keep = [i for i, p in enumerate(ds.paths) if str(Path(p).relative_to(root)) not in leave]
        ds = dataclasses.replace(ds, paths=tuple(ds.paths[i] for i in keep), labels=tuple(ds.labels[i] for i in keep),
                                 problems=ds.problems + tuple((str(root / f), LEFT_OUT) for f in left_out))
    stray = sorted(set(cfg.class_map) - set(ds.classes))
    if stray:
        raise ValueError(f"the class map names folder(s) {stray} that {labelled_dir} does not have (its folders: "
                         f"{list(ds.classes)})")
    folder_class = [cfg.class_map.get(f, f) for f in ds.classes]
    classes = check_classes(list(dict.fromkeys(folder_class)), pred.classes, cfg.add_classes, _bundled_classes())
    n_old, n_cls = len(pred.classes), len(classes)
    y_lab = np.array([classes.index(folder_class[l]) for l in ds.labels])
    groups = group_duplicates(ds.paths, progress=False)
    for c in classes[n_old:]:
        distinct = len(np.unique(groups[y_lab == classes.index(c)]))
        if distinct < cfg.min_new_class_cells:
            raise ValueError(f"new class {c!r} has {distinct} distinct cells; adding a class needs at least "
                             f"{cfg.min_new_class_cells}")
    for c in np.unique(y_lab):
        if len(np.unique(groups[y_lab == c])) < 2:
            raise ValueError(f"class {classes[c]!r} has fewer than 2 distinct cells: one is needed to fit and "
                             f"one to calibrate")
    # Three disjoint, grouped, class-stratified parts of the lab's cells: the head is fitted on `fit`;
    # calibration A (temperature, OOD thresholds) and B (review rule, conformal) split the calibration share.
    half = cfg.calibration_fraction / 2
    sp = split_parts(y_lab, groups, {"fit": 1 - cfg.calibration_fraction, "cal_a": half, "cal_b": half}, seed=cfg.seed)
    check_disjoint(sp, groups)
    fit_i, cal_a_i, cal_b_i = (np.asarray(sp[k], int) for k in ("fit", "cal_a", "cal_b"))
    cal_i = np.concatenate([cal_a_i, cal_b_i])

    say(0.15, f"preprocessing and the parent's features of {len(ds.paths)} cells")
    raw = [read_image_bytes(p) for p in ds.paths]
    shas = [content_hash(b) for b in raw]
    f_lab, lg_parent_lab, e_lab, quality_bad, f_views, e_views = lab_features(
        pred, raw, shas, fit_i, cfg.aug_views, cache)
    has_early = e_lab is not None and "early" in bank
    n = len(raw)
    n_views = len(f_views) // max(len(fit_i), 1)
    sources = list(dict.fromkeys(list(bank["source"]) + [cfg.lab]))
    lab_src = sources.index(cfg.lab)
    cells_per_class = {classes[c]: len(np.unique(groups[y_lab == c])) for c in np.unique(y_lab)}  # distinct cells
    why_not = can_fine_tune(bank, pred.card.ood.get("early_layer"), cfg, pred.model, cells_per_class)
    # The chroma histogram of every lab cell (and of the views the head and the test-time mean use): the
    # lab's rows join the bank with theirs; the new head reads them beside the features.
    h_lab, h_views = None, []
    if "colour" in bank:
        x_all = lab_inputs(pred, raw, shas, range(n), cache)
        h_lab = chroma_histograms(x_all)
        h_views = view_histograms(x_all, max(n_views, cfg.test_time_views - 1))
    few = {c: k for c, k in cells_per_class.items() if k < cfg.colour_min_cells}
    colour_why_not = (
        "switched off (colour_features = False)" if not cfg.colour_features else
        "the parent's replay bank holds no chroma histograms (rebuild it: python -m bcc_core replay-bank)"
        if h_lab is None else
        f"fewer than {cfg.colour_min_cells} distinct reviewed cells in {few}: a head reading the histogram was "
        f"measured from {cfg.colour_min_cells} cells a class only" if few else "")
    codes_lab = None
    if not why_not:
        # The adapted network's features replace the parent's: for the replay rows kept at the cut (the
        # others' features would be the parent's, so they leave the bank) and for the lab's cells.
        model, bank, bank_parent, f_lab, f_views, codes_lab, f_all_views = _fine_tune_top(
            pred, bank, raw, shas, fit_i, y_lab, n_cls, n_views, lab_src, sources, cfg, cache, say,
            with_colour=not colour_why_not and cfg.colour_with_top == "joint")
    else:
        bank_parent = bank
        n_all = max(cfg.test_time_views - 1, n_views)  # the frozen backbone: the parent's features of the views
        f_all_views = list(lab_features(pred, raw, shas, np.arange(n), n_all, cache)[4]
                           .reshape(n_all, n, f_lab.shape[1]))
    f_tta = f_all_views[:cfg.test_time_views - 1]  # every cell's views the adapted model averages over

    # Rows: replay (fit = train + earlier labs' fitting cells), then lab cells and their views.
    part = bank["part"]
    rep_fit = np.isin(part, ("train", "lab_fit"))
    src_rep = np.array([sources.index(s) for s in bank["source"]])
    # Cross-fitting: a head fitted on frozen features (the parent's, or the fine-tuned top's, which only the
    # fitting cells trained) learns from every reviewed cell.
    refit_head = bool(why_not) or not (colour_why_not or has_colour(model))
    cross_fit = cfg.cross_fit and refit_head
    v_lab = np.zeros((n_views, n, f_lab.shape[1]), np.float32)  # view-major features of the lab's cells' views
    v_lab[:, fit_i] = f_views.reshape(n_views, len(fit_i), f_lab.shape[1])
    if cross_fit:
        v_lab = np.stack(f_all_views[:n_views]) if n_views else v_lab

    def head_data(idx):
        """The replay's training rows, then lab cells `idx` and their views: features, labels, sources,
        histograms (None without) and training weights."""
        x = np.concatenate([bank["features"][rep_fit], f_lab[idx]] + list(v_lab[:, idx])).astype(np.float32)
        y = np.concatenate([bank["labels"][rep_fit]] + [y_lab[idx]] * (1 + n_views))
        src = np.concatenate([src_rep[rep_fit], np.full(len(idx) * (1 + n_views), lab_src)])
        h = (None if h_lab is None else
             np.concatenate([bank["colour"][rep_fit], h_lab[idx]] + [hv[idx] for hv in h_views[:n_views]]))
        return x, y, src, h, _sample_weights(y, src, lab_src, cfg.lab_weight)

    X, Y, S = head_data(fit_i)[:3]  # the OOD statistics' rows
    folds = []  # cross-fitting: (calibration cells, the head fitted without them, its second opinion)
    check_folds = []  # (fitting cells, the head fitted without them, its second opinion), the lab's no-errors check
    second = None  # a head on the features alone that must agree for a result to be ok (bcc_core.second_opinion)
    if refit_head:
        # A head on frozen features: the parent's (backbone not fine-tuned), or the fine-tuned network's
        # (its head, trained with the top on the features alone, is refitted to read the histogram too).
        start = pred.model if why_not else model
        feats_t = start.get_layer(FEATURES_LAYER).output
        xs, ys, _, hs, ws = head_data(np.arange(n) if cross_fit else fit_i)
        if colour_why_not:
            head_in = feats_t
        else:
            c_mean, c_scale = hs.mean(0), cfg.colour_gain / np.maximum(hs.std(0), STD_FLOOR)
            head_in = scaled_head_input(feats_t, chroma_branch(start.input), c_mean, c_scale)

        with_second = cfg.second_opinion and not colour_why_not

        def fit_head(x, y, h, w):
            xh = x if colour_why_not else np.concatenate([x, (h - c_mean) * c_scale], 1).astype(np.float32)
            return keras.Model(start.input, _wire(_train_head(start, n_cls, xh, y, w, cfg), head_in),
                               name=pred.model.name)

        def fit_second(x, y, w):
            """The second opinion fitted on the same rows as a head, features alone (None when not used)."""
            return SecondOpinion.from_layers(_train_head(start, n_cls, x, y, w, cfg)) if with_second else None

        on = "the parent's frozen features" if why_not else "the fine-tuned network's features"
        say(0.45 if why_not else 0.62, f"training the head on {len(xs)} rows ({on}"
                                       f"{'' if colour_why_not else ' and the chroma histogram'})")
        model = fit_head(xs, ys, hs, ws)
        if with_second:
            say(0.47 if why_not else 0.62, "training the second opinion: the same rows, the features alone")
        second = fit_second(xs, ys, ws)
        if cross_fit:
            for held, other in ((cal_a_i, cal_b_i), (cal_b_i, cal_a_i)):
                say(0.5 if why_not else 0.63,
                    f"cross-fitting: a head without {len(held)} calibration cells, to score them")
                x, y, _, h, w = head_data(np.concatenate([fit_i, other]))
                folds.append((held, fit_head(x, y, h, w), fit_second(x, y, w)))
            if cfg.review_lab_no_errors and cfg.lab_check_folds > 1:
                # The fitting cells scored out of sample too, for the lab's no-errors check only.
                k = cfg.lab_check_folds
                parts = split_parts(y_lab[fit_i], groups[fit_i], {str(j): 1 / k for j in range(k)}, seed=cfg.seed)
                for j in range(k):
                    held = fit_i[np.asarray(parts[str(j)], int)]
                    if not len(held):  # too few fitting cells for k folds
                        continue
                    say(0.55 if why_not else 0.64, f"the lab check: a head without fitting fold {j + 1} of {k}")
                    x, y, _, h, w = head_data(np.setdiff1d(np.arange(n), held))
                    check_folds.append((held, fit_head(x, y, h, w), fit_second(x, y, w)))
    parent_logits = compiled(head_only(pred.model, LOGITS_LAYER))

    say(0.65, "refitting the trust layer (temperature, OOD statistics and thresholds, review rule)")
    from .replay import CAL_A, CAL_B
    from .trust import Part, TrustConfig, TrustModel

    def lab_logits(mdl):
        """The lab's cells scored as the adapted model scores images: logits averaged over the views."""
        fn = compiled(head_only(mdl, LOGITS_LAYER))
        lg = batched_predict(fn, head_rows(mdl, f_lab, h_lab), batch_size=1024)
        if f_tta:
            lg = (lg + sum(batched_predict(fn, head_rows(mdl, f, None if h_lab is None else h_views[v]),
                                           batch_size=1024) for v, f in enumerate(f_tta))) / (1 + len(f_tta))
        return lg

    lg_bank = batched_predict(compiled(head_only(model, LOGITS_LAYER)),
                              head_rows(model, bank["features"], bank.get("colour")), batch_size=1024)
    lg_lab = lab_logits(model)
    # The second opinion's logits for the lab's cells (the image's own features, as the adapted model reads them),
    # scored out of sample wherever the head's logits are.
    sl_lab = None if second is None else second.logits(f_lab)
    for held, fold_model, fold_second in folds:  # each calibration cell scored by a head that never saw it
        lg_lab[held] = lab_logits(fold_model)[held]
        if fold_second is not None:
            sl_lab[held] = fold_second.logits(f_lab[held])
    check_part = None
    lg_out_of_sample = None  # every reviewed cell scored by a head fitted without it (the label check)
    if check_folds:  # the fitting cells, each scored by a head that never saw it (the lab check only)
        lg_check = np.zeros_like(lg_lab)
        sl_check = None if second is None else np.zeros_like(sl_lab)
        for held, fold_model, fold_second in check_folds:
            lg_check[held] = lab_logits(fold_model)[held]
            if fold_second is not None:
                sl_check[held] = fold_second.logits(f_lab[held])
        if folds:
            lg_out_of_sample = lg_lab.copy()
            lg_out_of_sample[fit_i] = lg_check[fit_i]
        check_part = Part("lab_fit_out_of_fold", np.array([f"lab:{shas[i]}" for i in fit_i]), y_lab[fit_i],
                          f_lab[fit_i], lg_check[fit_i], None if e_lab is None else e_lab[fit_i],
                          np.full(len(fit_i), cfg.lab, dtype=object), quality_bad[fit_i],
                          None if sl_check is None else sl_check[fit_i])
    # Calibration A / B: the parent's own calibration parts (replay) pooled with the lab's parts A / B;
    # a bank from an older adapted model lists its lab's calibration cells as "lab_cal" (kept in A).
    rep_a = np.isin(part, CAL_A + ("lab_cal_a", "lab_cal"))
    rep_b = np.isin(part, CAL_B + ("lab_cal_b",))
    test = part == "test"
    y_bank = bank["labels"]
    y_cal = y_lab[cal_i]

    # OOD: one Gaussian component per (class, source) (or per class), on clean replay training rows plus
    # this lab's fitting cells and their views; never on a calibration row.
    comp_src = S if cfg.ood_components == "class_source" else np.zeros_like(S)
    comp_key = Y * len(sources) + comp_src
    uniq, comp = np.unique(comp_key, return_inverse=True)
    E = (np.concatenate([bank["early"][rep_fit], e_lab[fit_i], e_views]) if has_early else None)
    # One covariance per source: the lab's few cells vary differently (and less) than the training data.
    cov_groups = (uniq % len(sources)) if cfg.ood_covariance == "per_source" else None
    if cov_groups is not None:
        cov_groups = np.unique(cov_groups, return_inverse=True)[1]
    stats = ood.fit(X, comp, len(uniq), seed=cfg.seed, max_bank=4000, early=E, cov_groups=cov_groups)
    early_bank = bank.get("early") if has_early else None

    def rows(name, bank_mask, lab_idx):
        """A trust part: replay rows (source "parent") and lab cells (source = the lab), ids kept apart."""
        eb = None if early_bank is None else early_bank[bank_mask]
        el = None if e_lab is None else e_lab[lab_idx]
        n_bank = int(bank_mask.sum())
        return Part(name, np.r_[[f"bank:{i}" for i in np.flatnonzero(bank_mask)], [f"lab:{shas[i]}" for i in lab_idx]],
                    np.r_[y_bank[bank_mask], y_lab[lab_idx]],
                    np.concatenate([bank["features"][bank_mask], f_lab[lab_idx]]),
                    np.concatenate([lg_bank[bank_mask], lg_lab[lab_idx]]),
                    None if eb is None or el is None else np.concatenate([eb, el]),
                    np.r_[np.full(n_bank, "parent", dtype=object), np.full(len(lab_idx), cfg.lab, dtype=object)],
                    np.r_[np.zeros(n_bank, bool), quality_bad[lab_idx]],
                    None if second is None else
                    np.concatenate([second.logits(bank["features"][bank_mask]), sl_lab[lab_idx]]))

    train_part = Part("fit", np.r_[[f"bank:{i}" for i in np.flatnonzero(rep_fit)], [f"lab:{shas[i]}" for i in fit_i]],
                      np.r_[y_bank[rep_fit], y_lab[fit_i]], np.concatenate([bank["features"][rep_fit], f_lab[fit_i]]))
    part_a, part_b = rows("cal_a", rep_a, cal_a_i), rows("cal_b", rep_b, cal_b_i)
    review_classes = [classes[c] for c in range(n_cls) if c not in set(y_lab)] if cfg.review_unlabelled_classes else []
    tcfg = TrustConfig(ood_method=ood.COMBINED, ood_quantile=cfg.ood_quantile, review_alpha=cfg.review_alpha,
                       review_delta=cfg.review_delta, conformal_alpha=cfg.conformal_alpha)
    pc = pred.card
    trust = TrustModel.fit(
        classes, train_part, part_a, part_b, tcfg, early_layer=pc.ood.get("early_layer") if has_early else None,
        ood_stats=stats, no_errors_source=cfg.lab if cfg.review_lab_no_errors else None, no_errors_extra=check_part,
        review_classes=review_classes,
        lab=cfg.lab, shortcut_audit=pc.shortcut_audit,
        part_info={"fit": f"parent replay training rows ({int(rep_fit.sum())}) + the lab's {len(fit_i)} fitting cells "
                          f"and their views",
                   "cal_a": f"parent calibration A replay ({int(rep_a.sum())}) + the lab's calibration part A "
                            f"({len(cal_a_i)} cells); each OOD threshold is the larger of the two sources' "
                            f"{cfg.ood_quantile:.0%} quantiles",
                   "cal_b": f"parent calibration B replay ({int(rep_b.sum())}) + the lab's calibration part B "
                            f"({len(cal_b_i)} cells)",
                   **({"views": f"the lab's cells scored by logits averaged over {1 + len(f_tta)} flips / 90° "
                                f"rotations, as the adapted model scores images; the parent's replay rows by "
                                f"their one stored view"} if f_tta else {})},
        seed=cfg.seed, views=1 + len(f_tta), second_opinion=second)
    T = trust.temperature
    rule = trust.review
    scales = {m: (v["median"], v["threshold"]) for m, v in trust.detectors.items()}
    comparison = {}
    for m, det in trust.detectors.items():
        s_bank = ood.score(m, bank["features"], lg_bank, stats, T, early=early_bank)
        comparison[m] = {"threshold": det["threshold"], **({"quantile_per_source": det["quantile_per_source"]}
                                                            if "quantile_per_source" in det else {}),
                         "parent_cal_b_flag_rate": float((s_bank[rep_b] > det["threshold"]).mean()),
                         "test_flag_rate": float((s_bank[test] > det["threshold"]).mean())}
    d_bank = trust.decide(lg_bank, bank["features"], early_bank)
    d_lab = trust.decide(lg_lab, f_lab, e_lab, quality_bad, second_logits=sl_lab)
    p_bank, p_lab = d_bank.probs, d_lab.probs

    say(0.8, "before/after figures")
    root = Path(ds.root)
    files = [str(Path(p).relative_to(root)) for p in ds.paths]
    doubted = (None if lg_out_of_sample is None else
               label_check.doubted_labels(y_lab, lg_out_of_sample, T, classes, files))
    # what the first pass's model needed a class to keep: the histogram's cells, the fine-tuning's
    floor = max(0 if colour_why_not else cfg.colour_min_cells, 0 if why_not else cfg.backbone_min_cells)
    leave = (_may_leave_out(doubted, files, y_lab, groups, n_old, cfg, floor) if two_pass and doubted and not left_out
             else ())
    if leave:
        say(1.0, f"the model doubts {len(doubted)} reviewed label(s): adapting again without {len(leave)} of them")
        return adapt(parent_dir, labelled_dir, out_dir, cfg, progress, reproduce, cache, left_out=leave,
                     first_pass_s=time.perf_counter() - t0)
    parent_trust = TrustModel.from_card(pc, parent, pred.ood_stats)
    d_par_lab = parent_trust.decide(lg_parent_lab, f_lab, e_lab, quality_bad)
    p_par_lab = d_par_lab.probs
    # Before/after on all of the lab's calibration cells (A + B): held out from the head's fit, not from
    # the trust fits (a lab has too few cells for a fourth part).
    before = lab_figures(y_cal, np.pad(p_par_lab[cal_i], ((0, 0), (0, n_cls - n_old))), d_par_lab.ok[cal_i], classes)
    after = lab_figures(y_cal, p_lab[cal_i], d_lab.ok[cal_i], classes)
    lg_par_bank = batched_predict(parent_logits,
                                  head_rows(pred.model, bank_parent["features"], bank_parent.get("colour")),
                                  batch_size=1024)
    par_test_before = _macro_f1(y_bank[test], lg_par_bank[test], n_old)
    # Over the parent classes only: a parent test cell suggested as an added class counts as a miss.
    par_test_after = _macro_f1(y_bank[test], lg_bank[test], n_old)
    unlabelled = [c for c in range(n_old) if c not in set(y_lab)]
    keep = test & np.isin(y_bank, unlabelled)
    kept_same = float((lg_bank[keep].argmax(1) == lg_par_bank[keep].argmax(1)).mean()) if keep.any() else None
    gated = d_bank.ood_flag[test] | d_bank.disagree[test]  # the gates the review rule was fitted behind
    ok_test = ~gated & ~d_bank.below_threshold[test]
    rule_test = review.evaluate_rule(d_bank.confidence[test], d_bank.pred[test] == y_bank[test],
                                     gated, rule["threshold"] if trust.certified else np.inf)

    try:
        m_test = evaluation.classification_metrics(y_bank[test], p_bank[test], classes)
        test_metrics = {"test": evaluation.summary_line(m_test),
                        "per_class_f1": {c: v["f1"] for c, v in m_test["per_class"].items()}}
    except ValueError:  # added classes have no parent test images: some metrics are undefined
        test_metrics = {"test": {"macro_f1": par_test_after, "n": int(test.sum())}}

    say(0.88, "writing the new model folder")
    out.mkdir(parents=True, exist_ok=True)
    trust.save_stats(out)  # the OOD statistics and the second opinion (its hash goes into the card)
    lab_rows = np.concatenate([fit_i, cal_a_i, cal_b_i])
    lab_bank = {"features": f_lab[lab_rows].astype(np.float16), "labels": y_lab[lab_rows].astype(np.int16),
                # cross-fitted, the head was fitted on every cell: none may calibrate a child adapted from it
                "part": np.array(["lab_fit"] * len(lab_rows) if cross_fit else
                                 ["lab_fit"] * len(fit_i) + ["lab_cal_a"] * len(cal_a_i) + ["lab_cal_b"] * len(cal_b_i),
                                 dtype="U16"),
                "source": np.array([cfg.lab] * len(lab_rows), dtype="U64"), "classes": np.array(classes, dtype="U64"),
                "meta": bank["meta"]}
    if has_early:
        lab_bank["early"] = e_lab[lab_rows].astype(np.float16)
    if h_lab is not None:
        lab_bank["colour"] = h_lab[lab_rows].astype(np.float16)
    if codes_lab is not None:  # the cut is the parent's (nothing below it changed): a child can fine-tune again
        lab_bank.update(cut_codes=codes_lab[lab_rows], cut_rows=np.arange(len(lab_rows), dtype=np.int32))
    old = {k: (v.astype(np.float16) if k in ("features", "early", "colour") else v) for k, v in bank.items()}
    save_bank(out / REPLAY_FILE, concat_banks(old, lab_bank))
    if (parent / "split.json").is_file():
        shutil.copy2(parent / "split.json", out / "split.json")
    part_of = ({int(i): "fit" for i in fit_i} | {int(i): "calibration_a" for i in cal_a_i}
               | {int(i): "calibration_b" for i in cal_b_i})
    cells = [{"file": files[i], "class": classes[y_lab[i]],
              "sha256": shas[i], "part": part_of[i], "group": int(groups[i])} for i in range(n)]
    parent_sha = _sha256_file(parent / "model.keras")
    lineage = {
        "parent": {"model_id": pc.model_id, "model_sha256": parent_sha, "classes": pred.classes},
        "lab": cfg.lab, "added_classes": classes[n_old:], "config": cfg.to_dict(),
        "files_not_used": [{"file": str(f), "reason": r} for f, r in ds.problems],
        "cells_file": CELLS_FILE, "cells": cells,
        "n_cells": {"fit": int(len(fit_i)), "calibration": int(len(cal_i)), "calibration_a": int(len(cal_a_i)),
                    "calibration_b": int(len(cal_b_i)),
                    "per_class": {classes[c]: int((y_lab == c).sum()) for c in np.unique(y_lab)}},
        "what_was_refitted": (
            f"the backbone's top {cfg.backbone_layers} layers and the head, from the activations at "
            f"{cut_meta(bank)['layer']} (computed once; everything below is the parent's), on the parent's replay "
            f"training rows there ({int(rep_fit.sum())}; stored compressed, features reproduced with mean cosine "
            f"{cut_meta(bank)['feature_cosine_mean']:.3f}; the lab's activations pass through the same code) and the lab's "
            f"{len(fit_i)} fitting cells with 7 flipped/rotated and {cfg.backbone_aug_views} augmented views each "
            f"(class-balanced per source, lab weight {cfg.lab_weight}); layers below the cut are the parent's"
            if not why_not else
            f"head (Dense128 + logits) on the parent's replay training features ({int(rep_fit.sum())} rows) and the "
            f"lab's {f'{n} reviewed' if cross_fit else f'{len(fit_i)} fitting'} cells with {n_views} flipped/rotated "
            f"views each (class-balanced per source, "
            f"lab weight {cfg.lab_weight}); backbone frozen (identical to the parent's): {why_not}") + (
            f"; cross-fitted: the head was fitted on all {n} reviewed cells and their views; each calibration cell "
            f"(A, B) was scored by a head fitted without its part, so the trust layer is fitted on out-of-sample "
            f"scores of a head fitted on fewer cells than the one shipped; the OOD statistics use the "
            f"{len(fit_i)} fitting cells only" if cross_fit else "") + (
            f"; the lab's no-errors check also saw the {len(fit_i)} fitting cells, each scored by a head fitted "
            f"without its fold ({cfg.lab_check_folds} grouped folds"
            + (")" if why_not else "; on the fine-tuned features, which those cells helped learn)")
            if check_folds else "") + (
            "; the head also reads the image's chroma histogram (bcc_core.colour; standardised on the head's "
            "fitting rows; " + ("trained with the top, every row with its own histogram" if not why_not and
                                cfg.colour_with_top == "joint" else
                                "refitted on the fine-tuned features" if not why_not else "on the frozen features")
            + ")" if not colour_why_not else f"; no chroma histogram: {colour_why_not}") + (
            "; a second opinion (a head on the features alone, fitted on the same rows, and per fold when "
            "cross-fitted) must name the same class for a result to be ok; the review rule and the lab's check "
            "read only the cells where the two agree" if second is not None else ""),
        "labels_to_recheck": (
            {"not_checked": "needs cross-fitting and the lab check's folds (every cell scored by a head fitted "
                            "without it)"} if doubted is None else
            {"method": label_check.METHOD, "checked": n, "cells": doubted, "left_out": list(left_out),
             "note": ("the cells in left_out were doubted by a first pass over all the reviewed cells and were not "
                      "learnt from (doubted_labels = 'leave_out'); `cells` lists the doubts among the others, learnt "
                      "as labelled"
                      if left_out else "advice for a reviewer: the model was fitted on the labels as given")}),
        "pooled_calibration": (
            f"temperature and OOD thresholds (calibration A): {trust.fitted_on['temperature']}. Review rule and "
            f"conformal quantile (calibration B, disjoint from A): {trust.fitted_on['review_rule']}."),
        "before_after": {"lab_calibration_part": {"before": before, "after": after},
                         "parent_test_macro_f1": {"before": par_test_before, "after": par_test_after,
                                                  "n": int(test.sum()), "on": "parent test replay features"},
                         "unlabelled_classes_same_prediction_on_parent_test": kept_same},
    }
    guarantee = (
        f"Among images shown as ok, the error rate is at most {cfg.review_alpha:.0%} with probability at least "
        f"{1 - cfg.review_delta:.0%} for images exchangeable with the pooled calibration set B: {int(rep_b.sum())} "
        f"calibration images of the parent's training data and {len(cal_b_i)} cells of lab {cfg.lab!r}. The lab's cells "
        f"are {len(cal_b_i) / max(len(cal_b_i) + int(rep_b.sum()), 1):.1%} of that set, so for this lab's images alone the "
        f"guarantee does not follow; measured on the lab's calibration part: {after['wrong_ok']} wrong and ok of "
        f"{after['n']} ({after['wrong_ok_of_all']:.1%}). It does not hold for other labs. Suggestions of classes the "
        f"lab did not review ({', '.join(review_classes) or 'none'}) are always sent to review."
        + (" The rule was fitted on the images where the second opinion names the same class, the only ones shown "
           "as ok." if second is not None else ""))
    card = pc.to_dict()
    missing = untaught_white_cells(classes)
    legacy = trust.legacy_sections()
    now = datetime.now(timezone.utc)
    card.update(
        model_id=out.name, classes=classes, version=model_version(now), trust=trust.to_card(), model_sha256="",
        calibration={**pc.calibration, **legacy["calibration"],
                     "method": "temperature scaling (Guo et al. 2017), refitted after adaptation by NLL on calibration A",
                     "fitted_on": trust.fitted_on["temperature"]},
        ood={**pc.ood, **legacy["ood"], "comparison": comparison, "quantile": cfg.ood_quantile,
             "components": cfg.ood_components, "sources": sources,
             "fitted_on": ("statistics: parent replay training features + the lab's fitting cells (and views), one "
                           "Gaussian per " + ("(class, source)" if cfg.ood_components == "class_source" else "class")
                           + "; thresholds: " + trust.fitted_on["ood_thresholds"] + ", in-distribution only")},
        review_rule={**pc.review_rule, **legacy["review_rule"], "guarantee": guarantee, "calibration": rule,
                     "measured_on_test": rule_test, "review_classes": review_classes,
                     "fitted_on": trust.fitted_on["review_rule"]},
        metrics={**test_metrics, "test_on": ("the parent's test split: replay rows kept at the cut, through the adapted "
                                             "top (stored activations, compressed)" if not why_not else
                                             "the parent's test split (replay features; backbone frozen, so the same "
                                             "outputs as on the images)"),
                 "parent_test_replay": {"macro_f1": par_test_after, "macro_f1_parent": par_test_before},
                 "lab_calibration_part": after},
        limitations=list(pc.limitations) + [
            f"Adapted to lab {cfg.lab!r} from {n} reviewed cells ({len(fit_i)} fitting, {len(cal_a_i)} + {len(cal_b_i)} "
            f"calibration A + B); "
            f"per-class figures on that lab rest on a handful of cells each.",
            "Cell types the lab did not label keep the parent model's behaviour; on this lab's images they are only "
            "as reliable as the parent model was on another lab."] + ([untaught_warning(missing) + "."] if missing else []),
        lineage=lineage, created=now.isoformat(timespec="seconds"),
        reproduce=reproduce or card.get("reproduce", ""))
    card["training"] = {**pc.training, "adaptation": cfg.to_dict()}
    t1 = time.perf_counter()
    summary = {"n_cells": {"fit": int(len(fit_i)), "calibration": int(len(cal_i)), "calibration_a": int(len(cal_a_i)),
                           "calibration_b": int(len(cal_b_i))}, "before": before, "after": after,
               "parent_test_macro_f1": {"before": par_test_before, "after": par_test_after},
               "unlabelled_classes_same_prediction": kept_same, "review_rule": rule, "temperature": T,
               "ood": comparison, "time_s": t1 - t0, "backbone_fine_tuned": not why_not, "head_only_because": why_not,
               "colour_features": not colour_why_not, "colour_not_used_because": colour_why_not,
               "cross_fitted": cross_fit, "untaught_white_cells": missing, "second_opinion": second is not None,
               "labels_to_recheck": doubted, "labels_left_out": list(left_out), "classes": classes,
               "parent_ok_on_test": float(ok_test.mean())}
    save_model(model, ModelCard.from_dict(card), out,
               extra={"metrics.json": summary, CELLS_FILE: {"lab": cfg.lab, "cells": cells}})
    exp = _export_stage(out)  # the fast runtime, when bcc_core.export exists
    if exp is not None:
        summary["export"] = exp
        (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    report(1.0, "done")
    return summary
