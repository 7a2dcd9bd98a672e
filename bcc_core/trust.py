"""The trust layer: one fitted object that turns a forward pass into calibrated, flagged results.

A :class:`TrustModel` holds everything fitted after the network (temperature, OOD detectors, the review
rule, the conformal quantile, and for an adapted model the classes its lab did not review). It is fitted
on named, disjoint data parts and applied by one method:

- **train part**: OOD statistics (class means, covariance, kNN bank) — the network was fitted here too;
- **calibration A**: temperature (NLL) and each OOD detector's threshold;
- **calibration B**: the review rule (Clopper-Pearson, fixed sequence) and the conformal quantile.

An adapted model may carry a second opinion (`bcc_core.second_opinion`): a head reading the features alone. A
result is ok only when it names the same class; the review rule is fitted on the items where it does.

The guarantee of the review rule rests on calibration B being untouched by every earlier fit, which
:meth:`TrustModel.fit` checks (it refuses overlapping item ids). "No certified threshold" is data
(``review.certified = False``), never a threshold above 1.

``apply`` needs numpy only (no TensorFlow, no scipy), so an exported runtime (ONNX / LiteRT) that
produces (logits, features, early) can call it. Fitting imports scipy/scikit-learn lazily.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import ood, review
from .flags import Flag
from .second_opinion import FILE as SECOND_OPINION_FILE
from .second_opinion import READS as SECOND_OPINION_READS
from .second_opinion import SecondOpinion

TRUST_FORMAT = "bcc_trust/1"
STATS_FILE = "ood_stats.npz"
UNION = ood.COMBINED
# The union score rescales each detector so that its own validation median is 0 and its own threshold
# is 1; the union flags an image when any detector exceeds its threshold, i.e. when the score is > 1.
# A property of the rescaling, not a fitted value.
UNION_FIRES_ABOVE = 1.0


def softmax_t(logits: np.ndarray, temperature: float) -> np.ndarray:
    """(N, C) float64 probabilities softmax(logits / T), numpy only."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class TrustConfig:
    """What to fit (saved in the card beside the fitted values)."""

    ood_method: str = UNION
    ood_quantile: float = 0.95
    review_alpha: float = 0.02
    review_delta: float = 0.1
    conformal_alpha: float = 0.05
    min_accepted: int = 30


@dataclass
class Part:
    """One named data part given to a fit: the network's outputs and labels of its items.

    Attributes:
        name: e.g. "calibration_a".
        ids: (N,) item ids (dataset indices, or content hashes); parts must not share any.
        labels: (N,) int true classes (OOD components for the train part of an adapted model).
        logits: (N, C) pre-softmax scores (not needed for the train part).
        features: (N, D) penultimate features.
        early: (N, E) pooled early-layer activations, or None.
        source: (N,) source / lab name per item, or None (one source).
        quality_bad: (N,) bool, the image-quality gate fired (those never pass the review rule).
        second_logits: (N, C) the second opinion's logits for these items when they must not come from the
            model's own second opinion (an adapting lab's cells, each scored by a second head fitted without
            it), or None (computed from `features`).
    """

    name: str
    ids: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    logits: np.ndarray | None = None
    early: np.ndarray | None = None
    source: np.ndarray | None = None
    quality_bad: np.ndarray | None = None
    second_logits: np.ndarray | None = None

    def __post_init__(self):
        self.ids = np.asarray(self.ids)
        self.labels = np.asarray(self.labels)
        n = len(self.ids)
        for k in ("labels", "features", "logits", "early", "source", "quality_bad", "second_logits"):
            v = getattr(self, k)
            if v is not None and len(v) != n:
                raise ValueError(f"part {self.name!r}: {k} has {len(v)} rows, ids {n}")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Decisions:
    """Vectorised outcome of the trust layer for N items (what `apply` turns into flags)."""

    probs: np.ndarray          # (N, C) calibrated
    pred: np.ndarray           # (N,) argmax
    confidence: np.ndarray     # (N,) calibrated max probability
    ood_score: np.ndarray      # (N,)
    ood_flag: np.ndarray       # (N,) bool
    below_threshold: np.ndarray  # (N,) bool (all True when the rule is not certified)
    unreviewed_class: np.ndarray  # (N,) bool: suggested class not reviewed in the adapting lab
    sets: np.ndarray | None    # (N, C) bool conformal membership, or None
    ok: np.ndarray             # (N,) bool: no flag at all (quality included when given)
    disagree: np.ndarray       # (N,) bool: the second opinion names another class (all False without one)
    second_pred: np.ndarray | None = None  # (N,) the second opinion's class, or None without one


@dataclass(frozen=True)
class TrustResult:
    """One item's trust output."""

    probabilities: np.ndarray
    predicted_index: int
    predicted_class: str
    confidence: float
    ood_score: float
    flags: list
    status: str
    prediction_set: list


def _lab_errors(part: Part, dec: "Decisions", source: str) -> np.ndarray:
    """Confidences of `source`'s wrong predictions in `part` that the OOD, quality and second-opinion gates
    let through."""
    if part.source is None:
        return np.zeros(0)
    bad = part.quality_bad if part.quality_bad is not None else np.zeros(len(part), bool)
    return dec.confidence[~dec.ood_flag & ~bad & ~dec.disagree & (dec.pred != part.labels) & (part.source == source)]


@dataclass
class TrustModel:
    """Temperature, OOD detectors, review rule and conformal sets, fitted on disjoint parts.

    Attributes:
        classes: output class names.
        temperature: T > 0 (probabilities = softmax(logits / T)).
        ood_method: "union", one of `ood.METHODS` / `ood.EARLY`, or None (no OOD detector).
        detectors: {method: {"median": m, "threshold": t}} fitted on calibration A.
        ood_stats: arrays from `ood.fit` (saved as ood_stats.npz beside the card), or None.
        early_layer: the mid-network layer whose pooled activations `early` holds, or None.
        review: {"certified": bool, "threshold": float | None, "alpha", "delta", "upper_bound", "accepted",
            "errors", "n_calibration", ...}: results with confidence ≥ threshold (and no other flag) are ok.
        conformal: {"alpha": a, "qhat": q or None}.
        review_classes: classes whose suggestion always goes to review (adapted model: not reviewed in the lab).
        lab: the adapting lab's name, for the message.
        shortcut_audit: the card's shortcut audit (a cue ≥ 90% on model inputs flags every result).
        config: TrustConfig as a dict.
        fitted_on: {what: part description} (sizes, hashes), for the card.
        views: the logits this layer was fitted on and is applied to are the mean over the image and its
            first views - 1 flips / 90° rotations (`Predictor.forward`); 1: the image alone.
        second_opinion: a head on the features alone (`bcc_core.second_opinion`) that must name the same class
            for a result to be ok, or None.
        second_opinion_sha256: the SHA-256 of its file, recorded in the card.
    """

    classes: list
    temperature: float = 1.0
    ood_method: str | None = None
    detectors: dict = field(default_factory=dict)
    ood_stats: dict | None = None
    early_layer: str | None = None
    review: dict = field(default_factory=lambda: {"certified": False, "threshold": None})
    conformal: dict = field(default_factory=lambda: {"alpha": None, "qhat": None})
    review_classes: list = field(default_factory=list)
    lab: str | None = None
    shortcut_audit: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    fitted_on: dict = field(default_factory=dict)
    views: int = 1
    second_opinion: SecondOpinion | None = None
    second_opinion_sha256: str | None = None

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit(cls, classes, train: Part, calibration_a: Part, calibration_b: Part, cfg: TrustConfig = TrustConfig(),
            *, early_layer: str | None = None, ood_stats: dict | None = None, stats_kwargs: dict | None = None,
            no_errors_source: str | None = None, no_errors_extra: Part | None = None, review_classes=(),
            lab: str | None = None,
            shortcut_audit: dict | None = None, part_info: dict | None = None, seed: int = 0,
            views: int = 1, second_opinion: SecondOpinion | None = None) -> "TrustModel":
        """Fit every trust part on its own data part.

        Args:
            classes: output class names.
            train: the network's training part (features, labels[, early]): OOD statistics only.
            calibration_a: temperature (logits, labels) and OOD thresholds (in-distribution scores).
                With `source`, each detector's threshold is the largest per-source quantile (a lab's own
                cells are not flagged more often than the training data's).
            calibration_b: review rule (among items the OOD and quality gates pass) and conformal quantile.
            cfg: quantile, α, δ.
            early_layer: name recorded for the early detector (needs `early` in every part).
            ood_stats: already fitted statistics (else fitted here on `train`).
            stats_kwargs: extra arguments to `ood.fit` (e.g. cov_groups, max_bank).
            no_errors_source: a source (an adapting lab) among whose passing items of calibration A and B no
                wrong prediction may be accepted: the threshold is raised above them (an empirical check on
                top of the guarantee). Both parts count: both are held out from the network's fit, and a lab
                has too few cells for part B alone to show its errors.
            no_errors_extra: more of that source's items, scored out of sample, checked the same way (an
                adapted model's fitting cells, each scored by a head fitted without it). Used for nothing else,
                so it may share ids with `train`.
            review_classes: classes always sent to review.
            lab: adapting lab name (messages).
            shortcut_audit: the card's shortcut audit.
            part_info: {part name: description} recorded in `fitted_on` (sizes, hashes).
            views: recorded: the parts' logits are means over this many views (see the attribute).
            second_opinion: a features-only head that must agree for a result to be ok: the review rule and
                the no-errors check read only the items where it agrees (a part's `second_logits`, when given,
                stand for its predictions on that part).

        Raises:
            ValueError: two parts share an item id (the guarantee would not hold).
        """
        from . import calibration

        for p in (calibration_a, calibration_b):
            if len(p) == 0:
                raise ValueError(f"part {p.name!r} is empty: too few images for the calibration parts (give the "
                                 "run more images or larger calibration fractions)")
        for p, q in ((train, calibration_a), (train, calibration_b), (calibration_a, calibration_b)):
            shared = np.intersect1d(p.ids.astype(str), q.ids.astype(str))
            if len(shared):
                raise ValueError(f"parts {p.name!r} and {q.name!r} share {len(shared)} items (e.g. {shared[0]}); "
                                 "trust parts must be fitted on disjoint data")
        n_cls = len(classes)
        T = calibration.fit_temperature(calibration_a.logits, calibration_a.labels)
        use_early = early_layer is not None and (train.early is not None if ood_stats is None
                                                 else "early_means" in ood_stats)
        stats = ood_stats
        if stats is None and cfg.ood_method:
            n_comp = int(train.labels.max()) + 1 if len(train) else n_cls
            stats = ood.fit(train.features, train.labels, max(n_comp, n_cls), seed=seed,
                            early=train.early if use_early else None, **(stats_kwargs or {}))
        detectors = {}
        if cfg.ood_method:
            methods = ood.methods_for(stats) if cfg.ood_method == UNION else (cfg.ood_method,)
            for m in methods:
                s = ood.score(m, calibration_a.features, calibration_a.logits, stats, T, early=calibration_a.early)
                if calibration_a.source is None:
                    per_source = {"all": float(np.quantile(s, cfg.ood_quantile))}
                else:
                    per_source = {str(k): float(np.quantile(s[calibration_a.source == k], cfg.ood_quantile))
                                  for k in np.unique(calibration_a.source)}
                detectors[m] = {"median": float(np.median(s)), "threshold": max(per_source.values()),
                                **({"quantile_per_source": per_source} if len(per_source) > 1 else {})}
        tm = cls(classes=list(classes), temperature=float(T), ood_method=cfg.ood_method or None, detectors=detectors,
                 ood_stats=stats, early_layer=early_layer if use_early else None,
                 review_classes=list(review_classes), lab=lab, shortcut_audit=dict(shortcut_audit or {}),
                 config=dataclasses.asdict(cfg), views=int(views), second_opinion=second_opinion)
        # Review rule and conformal quantile: calibration B only, with T, the OOD gate and the second opinion
        # already fixed.
        b = calibration_b
        d = tm.decide(b.logits, b.features, b.early, b.quality_bad, use_review=False, second_logits=b.second_logits)
        correct = d.pred == b.labels
        passed = ~d.ood_flag & ~d.disagree & ~(b.quality_bad if b.quality_bad is not None else np.zeros(len(b), bool))
        rule = review.fit_selective_threshold(d.confidence[passed], correct[passed], cfg.review_alpha,
                                              cfg.review_delta, cfg.min_accepted)
        certified = rule["accepted"] > 0
        threshold = float(rule["threshold"]) if certified else None
        extra = {}
        if certified and no_errors_source is not None and b.source is not None:
            # Calibration A too, decided with the same temperature and OOD gate (its own fits are done).
            da = tm.decide(calibration_a.logits, calibration_a.features, calibration_a.early,
                           calibration_a.quality_bad, use_review=False, second_logits=calibration_a.second_logits)
            checked = [(b, d), (calibration_a, da)]
            if no_errors_extra is not None:
                e = no_errors_extra
                checked.append((e, tm.decide(e.logits, e.features, e.early, e.quality_bad, use_review=False,
                                             second_logits=e.second_logits)))
                extra["no_errors_items"] = {p.name: int((p.source == no_errors_source).sum()) for p, _ in checked}
            wrong_conf = np.concatenate([_lab_errors(p, dp, no_errors_source) for p, dp in checked])
            extra["guarantee_threshold"] = threshold
            if len(wrong_conf):
                threshold = max(threshold, float(np.nextafter(wrong_conf.max(), 2)))
            extra["no_errors_source"] = no_errors_source
            extra["no_errors_wrong_seen"] = int(len(wrong_conf))
        tm.review = {"certified": bool(certified), "threshold": threshold, "alpha": cfg.review_alpha,
                     "delta": cfg.review_delta, "upper_bound": rule["upper_bound"], "accepted": rule["accepted"],
                     "errors": rule["errors"], "coverage": rule["coverage"], "n_calibration": rule["n_calibration"],
                     **extra}
        qhat = review.conformal_qhat(d.probs, b.labels, cfg.conformal_alpha) if len(b) else None
        tm.conformal = {"alpha": cfg.conformal_alpha, "qhat": qhat}
        info = part_info or {}
        tm.fitted_on = {
            "ood_statistics": info.get(train.name, f"{train.name} ({len(train)} items)"),
            "temperature": info.get(calibration_a.name, f"{calibration_a.name} ({len(calibration_a)} items)"),
            "ood_thresholds": info.get(calibration_a.name, f"{calibration_a.name} ({len(calibration_a)} items)"),
            "review_rule": info.get(calibration_b.name, f"{calibration_b.name} ({len(calibration_b)} items)"),
            "conformal": info.get(calibration_b.name, f"{calibration_b.name} ({len(calibration_b)} items)"),
            **({"views": info["views"]} if "views" in info else {}),
        }
        return tm

    # ------------------------------------------------------------------ apply
    @property
    def certified(self) -> bool:
        return bool(self.review.get("certified")) and self.review.get("threshold") is not None

    def ood_scores(self, logits, features, early=None) -> tuple[np.ndarray, float]:
        """(N,) OOD score and the threshold above which it flags (inf without detectors)."""
        n = len(logits)
        if not self.ood_method or (self.ood_stats is None and self.ood_method != "energy"):
            return np.zeros(n), np.inf
        if self.ood_method == UNION:
            scales = {m: (v["median"], v["threshold"]) for m, v in self.detectors.items()}
            return ood.score(UNION, features, logits, self.ood_stats, self.temperature, scales, early=early), \
                UNION_FIRES_ABOVE
        return (ood.score(self.ood_method, features, logits, self.ood_stats, self.temperature, early=early),
                float(self.detectors[self.ood_method]["threshold"]))

    def decide(self, logits, features, early=None, quality_bad=None, use_review: bool = True,
               second_logits=None) -> Decisions:
        """Vectorised trust outcome for N items (numpy only). `second_logits`: the second opinion's logits when
        they must not be computed from `features` by the model's own (a fit's out-of-sample scores)."""
        logits = np.asarray(logits)
        n = len(logits)
        probs = softmax_t(logits, self.temperature)
        pred = probs.argmax(1)
        conf = probs[np.arange(n), pred]
        score, thr = self.ood_scores(logits, features, early)
        ood_flag = score > thr
        if not use_review:
            below = np.zeros(n, bool)
        elif self.certified:
            below = conf < float(self.review["threshold"])
        else:
            below = np.ones(n, bool)
        unrev = np.isin(np.asarray(self.classes)[pred], list(self.review_classes)) if self.review_classes \
            else np.zeros(n, bool)
        qhat = self.conformal.get("qhat")
        sets = review.prediction_sets(probs, qhat) if qhat is not None else None
        bad = np.zeros(n, bool) if quality_bad is None else np.asarray(quality_bad, bool)
        second = None
        if self.second_opinion is not None:
            second = np.asarray(self.second_opinion.logits(features) if second_logits is None else second_logits)
            second = second.argmax(1) if n else np.zeros(0, int)
        disagree = np.zeros(n, bool) if second is None else second != pred
        ok = ~ood_flag & ~below & ~unrev & ~bad & ~disagree & (self.cue_flag() is None)
        return Decisions(probs, pred, conf, score, ood_flag, below, unrev, sets, ok, disagree, second)

    def cue_flag(self) -> Flag | None:
        from .shortcut import cue_flag

        return cue_flag(self.shortcut_audit)

    def apply(self, logits, features, early=None, quality_flags=None) -> list[TrustResult]:
        """Per-item trust output.

        Args:
            logits: (N, C) pre-softmax scores.
            features: (N, D) penultimate features.
            early: (N, E) pooled early-layer activations, or None.
            quality_flags: per item, the image-quality gate's flags (kept first in each item's list).

        Returns:
            N TrustResult: calibrated probabilities, OOD score, flags, status, prediction set.
        """
        from .flags import status_for

        d = self.decide(logits, features, early)
        thr = UNION_FIRES_ABOVE if self.ood_method == UNION else (
            float(self.detectors[self.ood_method]["threshold"]) if self.ood_method in self.detectors else np.inf)
        cue = self.cue_flag()
        lab = self.lab or "the lab"
        out = []
        for i in range(len(d.pred)):
            k = int(d.pred[i])
            p = d.probs[i]
            flags = list(quality_flags[i]) if quality_flags else []
            if cue is not None:
                flags.append(cue)
            if d.ood_flag[i]:
                flags.append(Flag("out_of_distribution", "warning",
                                  f"This image is unlike the images the model was trained on (OOD score "
                                  f"{d.ood_score[i]:.2f} > {thr:.2f}): another cell type, stain, scanner or an "
                                  f"artefact. Do not rely on the suggested class; review the cell yourself.", "ood_score"))
            if not self.certified:
                flags.append(Flag("low_confidence", "warning",
                                  "This model's review rule could not certify any confidence level on its calibration "
                                  "data, so every suggestion needs review.", "no_certified_threshold"))
            elif d.below_threshold[i]:
                flags.append(Flag("low_confidence", "warning",
                                  f"Calibrated confidence {p[k]:.0%} is below the review threshold "
                                  f"{float(self.review['threshold']):.0%}; the model is unsure between classes. "
                                  f"Review the cell.", "below_threshold"))
            if d.disagree[i]:
                flags.append(Flag("low_confidence", "warning",
                                  f"A second head, reading the cell's network features without its colour "
                                  f"histogram, names it {self.classes[int(d.second_pred[i])]}, not "
                                  f"{self.classes[k]}. When the two disagree the suggestion is not shown as ok. "
                                  f"Review the cell.", "second_opinion_disagrees"))
            if d.unreviewed_class[i]:
                flags.append(Flag("low_confidence", "warning",
                                  f"{self.classes[k]} was not among the reviewed cells this model was adapted on "
                                  f"({lab}), so this suggestion is not validated for these images. Review the cell.",
                                  "class_not_reviewed_in_lab"))
            pset = ([self.classes[j] for j in np.flatnonzero(d.sets[i])] if d.sets is not None
                    else [self.classes[k]])
            out.append(TrustResult(p, k, self.classes[k], float(p[k]), float(d.ood_score[i]), flags,
                                   status_for(flags), pset))
        return out

    # ------------------------------------------------------------------ card
    def to_card(self) -> dict:
        """The card's `trust` section (JSON; the OOD statistics go to `STATS_FILE`)."""
        return {"format": TRUST_FORMAT, "temperature": self.temperature,
                "ood": {"method": self.ood_method, "detectors": self.detectors, "early_layer": self.early_layer,
                        "stats_file": STATS_FILE if self.ood_stats is not None else None,
                        "flags_when": ("any detector's score exceeds its own threshold" if self.ood_method == UNION
                                       else "the score exceeds the threshold")},
                "review": self.review, "conformal": self.conformal, "review_classes": list(self.review_classes),
                "lab": self.lab, "config": self.config, "fitted_on": self.fitted_on,
                **({"views": self.views} if self.views > 1 else {}),
                **({"second_opinion": {"file": SECOND_OPINION_FILE, "sha256": self._second_opinion_hash(),
                                       "reads": SECOND_OPINION_READS,
                                       "ok_only_when": "it names the same class as the model"}}
                   if self.second_opinion is not None else {})}

    def _second_opinion_hash(self) -> str:
        """The second opinion file's SHA-256 for the card: known once `save_stats` wrote the file (or the card
        was read); a card without it could not refuse a changed file."""
        if self.second_opinion_sha256 is None:
            raise ValueError("the second opinion has no file yet: call save_stats(model_dir) before to_card()")
        return self.second_opinion_sha256

    def save_stats(self, model_dir) -> None:
        """Write the fitted arrays beside the card: the OOD statistics and the second opinion's weights (its
        hash is kept for `to_card`)."""
        if self.ood_stats is not None:
            ood.save_stats(Path(model_dir) / STATS_FILE, self.ood_stats)
        if self.second_opinion is not None:
            self.second_opinion_sha256 = self.second_opinion.save(model_dir)

    @classmethod
    def from_card(cls, card, model_dir=None, stats: dict | None = None) -> "TrustModel":
        """Read the trust section of a card (a ModelCard or its dict).

        Args:
            card: ModelCard or dict.
            model_dir: folder holding the OOD statistics file (None: `stats` or no statistics).
            stats: already loaded statistics.

        Raises:
            ValueError: the card has no trust section, or its OOD statistics file is missing.
        """
        d = card if isinstance(card, dict) else card.to_dict()
        classes = list(d["classes"])
        t = d.get("trust")
        audit = d.get("shortcut_audit") or {}

        def load(name):
            if stats is not None:
                return stats
            if model_dir is None or not name:
                return None
            f = Path(model_dir) / name
            return ood.load_stats(f) if f.is_file() else None

        if not t:
            raise ValueError(f"{model_dir or d.get('model_id')}: the card has no trust section (written before the "
                             "trust layer was fitted on disjoint calibration parts); retrain or re-adapt the model "
                             "with this version")
        o = t.get("ood") or {}
        st = load(o.get("stats_file"))
        if o.get("method") and o["method"] != "energy" and st is None:
            raise ValueError(f"{model_dir}: the card's OOD detectors need {o.get('stats_file')}, which is missing")
        so = t.get("second_opinion")
        if so and model_dir is None:
            raise ValueError(f"{d.get('model_id')}: the card's second opinion is a file beside it; give model_dir")
        return cls(classes=classes, temperature=float(t["temperature"]), ood_method=o.get("method"),
                   detectors=o.get("detectors") or {}, ood_stats=st, early_layer=o.get("early_layer"),
                   review=dict(t.get("review") or {}), conformal=dict(t.get("conformal") or {}),
                   review_classes=list(t.get("review_classes") or []), lab=t.get("lab"),
                   shortcut_audit=audit, config=t.get("config") or {}, fitted_on=t.get("fitted_on") or {},
                   views=int(t.get("views", 1)),
                   second_opinion=SecondOpinion.load(model_dir, so.get("sha256")) if so else None,
                   second_opinion_sha256=so.get("sha256") if so else None)

    def legacy_sections(self) -> dict:
        """The card's `calibration` / `ood` / `review_rule` keys that pages and reports read (display only:
        `apply` reads the `trust` section)."""
        return {
            "calibration": {"temperature": self.temperature},
            "ood": {"method": self.ood_method, "early_layer": self.early_layer,
                    "stats_file": STATS_FILE if self.ood_stats is not None else None,
                    **({"threshold": UNION_FIRES_ABOVE if self.ood_method == UNION else
                        self.detectors[self.ood_method]["threshold"]} if self.ood_method else {}),
                    "scales": {m: [v["median"], v["threshold"]] for m, v in self.detectors.items()}},
            "review_rule": {"certified": self.certified, "threshold": self.review.get("threshold"),
                            "alpha": self.review.get("alpha"), "delta": self.review.get("delta"),
                            "conformal_qhat": self.conformal.get("qhat"),
                            "conformal_alpha": self.conformal.get("alpha"),
                            **({"review_classes": list(self.review_classes)} if self.review_classes else {})},
        }
