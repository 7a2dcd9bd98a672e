"""Calibration, OOD, review rule, metrics and shortcut audit on controlled synthetic numbers."""

import numpy as np
import pytest

from bcc_core import calibration, evaluation, ood, review, shortcut


def _overconfident(n=3000, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 2.0
    return logits * 4.0, y  # scaled up: overconfident by design


def test_temperature_reduces_ece_and_recovers_scale():
    logits, y = _overconfident()
    t = calibration.fit_temperature(logits[:1500], y[:1500])
    assert 1.5 < t < 6.0  # the logits were inflated 4x: T must undo most of it
    before = calibration.reliability(calibration.apply_temperature(logits[1500:], 1.0), y[1500:])["ece"]
    after = calibration.reliability(calibration.apply_temperature(logits[1500:], t), y[1500:])["ece"]
    assert after < before / 3 and after < 0.03


def test_reliability_bins_and_ece_of_perfectly_calibrated():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.5, 1.0, 20000)
    correct = rng.uniform(size=conf.size) < conf
    probs = np.stack([conf, 1 - conf], 1)
    y = np.where(correct, 0, 1)
    r = calibration.reliability(probs, y, 15)
    assert len(r["count"]) == 15 and sum(r["count"]) == 20000
    assert r["ece"] < 0.02


def test_ood_scores_separate_far_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 32))
    y = rng.integers(0, 3, 900)
    f = centres[y] + rng.normal(0, 1, (900, 32))
    stats = ood.fit(f, y, 3, k=5)
    far = rng.normal(0, 1, (100, 32)) + 30
    near = centres[rng.integers(0, 3, 100)] + rng.normal(0, 1, (100, 32))
    for m in ("mahalanobis", "knn"):
        s_in, s_out = ood.score(m, near, None, stats), ood.score(m, far, None, stats)
        assert ood.auroc(s_in, s_out) > 0.99, m
    thr = ood.fit_threshold(ood.score("mahalanobis", near, None, stats), 0.95)
    assert (ood.score("mahalanobis", near, None, stats) > thr).mean() <= 0.06


def test_ood_stats_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 16)).astype(np.float32)
    y = rng.integers(0, 2, 200)
    stats = ood.fit(f, y, 2)
    ood.save_stats(tmp_path / "s.npz", stats)
    back = ood.load_stats(tmp_path / "s.npz")
    np.testing.assert_allclose(ood.mahalanobis(f[:10], stats), ood.mahalanobis(f[:10], back), rtol=1e-2)


def test_energy_higher_for_flat_logits():
    peaked = np.array([[10.0, 0, 0]])
    flat = np.array([[0.1, 0, 0]])
    assert ood.energy(flat)[0] > ood.energy(peaked)[0]


def test_selective_threshold_holds_alpha_on_fresh_data():
    rng = np.random.default_rng(0)

    def draw(n):
        conf = rng.uniform(0.3, 1.0, n)
        correct = rng.uniform(size=n) < conf  # calibrated: P(correct) = conf
        return conf, correct

    c, k = draw(5000)
    rule = review.fit_selective_threshold(c, k, alpha=0.05, delta=0.1)
    assert rule["upper_bound"] <= 0.05
    assert 0.85 < rule["threshold"] < 1.0
    c2, k2 = draw(20000)
    m = review.evaluate_rule(c2, k2, np.zeros(len(c2), bool), rule["threshold"])
    assert m["selective_error"] <= 0.05
    assert 0 < m["ok_fraction"] < 1


def test_selective_threshold_refuses_when_nothing_is_safe():
    conf = np.full(200, 0.9)
    correct = np.zeros(200, bool)
    rule = review.fit_selective_threshold(conf, correct, 0.02, 0.1)
    assert rule["threshold"] is None and rule["accepted"] == 0  # said as data, no threshold above 1


def test_clopper_pearson_known_value():
    # zero errors in n: upper bound = 1 - delta**(1/n)
    assert review.clopper_pearson_upper(0, 100, 0.1) == pytest.approx(1 - 0.1 ** (1 / 100), rel=1e-6)


def test_conformal_coverage():
    rng = np.random.default_rng(3)
    logits, y = _overconfident(6000, 5, 3)
    p = calibration.apply_temperature(logits, 4.0)
    q = review.conformal_qhat(p[:3000], y[:3000], 0.1)
    sets = review.prediction_sets(p[3000:], q)
    cov = sets[np.arange(3000), y[3000:]].mean()
    assert 0.88 <= cov <= 0.93


def test_classification_metrics_match_confusion():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.eye(3)[[0, 1, 1, 1, 2, 0]] * 0.9 + 0.1 / 3
    m = evaluation.classification_metrics(y, p, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["a"]["specificity"] == pytest.approx(3 / 4)
    assert m["per_class"]["b"]["recall"] == 1.0
    assert -1 <= m["kappa"] <= 1 and m["roc_auc"] is not None


def test_shortcut_audit_detects_border_cue():
    rng = np.random.default_rng(0)
    imgs, labels = [], []
    for i in range(60):
        lab = i % 2
        im = rng.integers(100, 200, (48, 48, 3), dtype=np.uint8)
        im[:8] = im[-8:] = im[:, :8] = im[:, -8:] = (250, 200, 180) if lab else (230, 230, 240)
        imgs.append(im)
        labels.append(lab)
    res = shortcut.audit(shortcut.cue_features(imgs), np.array(labels), 2)
    assert res["border_colour"]["warning"] and res["border_colour"]["balanced_accuracy"] > 0.95
    assert not res["image_size"]["warning"]  # all the same size: no cue
    assert shortcut.warnings_text(res, "raw")


def test_early_layer_detector_catches_what_the_top_features_miss(tmp_path):
    """Top features identical for in- and out-of-distribution images (a lab-invariant top), early
    activations far apart: only the early-layer detector can flag them, and the union does."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    top = rng.normal(0, 5, (3, 16))[y] + rng.normal(0, 1, (600, 16))
    early_centres = rng.normal(0, 3, (3, 8))
    early = early_centres[y] + rng.normal(0, 1, (600, 8))
    stats = ood.fit(top, y, 3, early=early)
    assert ood.methods_for(stats) == ood.METHODS + (ood.EARLY,)
    assert ood.methods_for(ood.fit(top, y, 3)) == ood.METHODS
    new_y = rng.integers(0, 3, 100)
    new_top = top[:100]  # the same top features as training images
    early_in = early_centres[new_y] + rng.normal(0, 1, (100, 8))
    early_out = early_in + 12.0  # another lab / cell type: the early statistics moved
    s_in = ood.score(ood.EARLY, new_top, None, stats, early=early_in)
    s_out = ood.score(ood.EARLY, new_top, None, stats, early=early_out)
    assert ood.auroc(s_in, s_out) > 0.99
    logits = np.zeros((100, 3))
    scales = {}
    for m in ood.methods_for(stats):
        sv = ood.score(m, new_top, logits, stats, early=early_in)
        scales[m] = (float(np.median(sv)), ood.fit_threshold(sv, 0.95))
    # The top-feature detectors alone let the moved images through (about their 5 % false-alarm rate)...
    top_only = {m: scales[m] for m in ood.METHODS}
    assert (ood.score(ood.COMBINED, new_top, logits, stats, scales=top_only, early=early_out) > 1).mean() <= 0.1
    # ...the union with the early-layer detector flags every one of them.
    u_out = ood.score(ood.COMBINED, new_top, logits, stats, scales=scales, early=early_out)
    assert (u_out > 1).all()
    with pytest.raises(ValueError, match="early"):
        ood.score(ood.EARLY, new_top, None, stats)
    ood.save_stats(tmp_path / "s.npz", stats)
    back = ood.load_stats(tmp_path / "s.npz")
    np.testing.assert_allclose(ood.score(ood.EARLY, new_top, None, back, early=early_out), s_out, rtol=1e-3)


# --------------------------------------------------------------------------- the trust layer (bcc_core.trust)

CLASSES = ["a", "b", "c"]


def _stub_trust(**kw):
    """A TrustModel with hand-set parameters (a stub predictor's trust layer): one detector on the logits
    (energy), so fixed logits drive every branch."""
    from bcc_core.trust import TrustModel

    base = dict(classes=CLASSES, temperature=2.0, ood_method="energy",
                detectors={"energy": {"median": -5.0, "threshold": -3.0}},
                review={"certified": True, "threshold": 0.9}, conformal={"alpha": 0.05, "qhat": 0.7})
    return TrustModel(**{**base, **kw})


def _codes(r):
    return [(f.code, f.detail) for f in r.flags]


def test_apply_drives_every_flag_branch():
    from bcc_core.flags import Flag

    t = _stub_trust()
    feats = np.zeros((4, 2))
    logits = np.array([[12.0, 0, 0],    # confident (p ~ 1 at T=2), energy -12: ok
                       [1.0, 0.6, 0],   # energy ~ -2.1 > -3: out of distribution, and below 0.9
                       [6.0, 5.0, 0],   # energy ~ -6.9 (in distribution), p = 0.62 < 0.9: below threshold
                       [0, 12.0, 0]])   # confident b
    res = t.apply(logits, feats)
    assert [r.status for r in res] == ["ok", "review", "review", "ok"]
    assert _codes(res[0]) == [] and res[0].predicted_class == "a" and res[0].prediction_set == ["a"]
    assert _codes(res[1]) == [("out_of_distribution", "ood_score"), ("low_confidence", "below_threshold")]
    assert "> -3.00" in res[1].flags[0].message
    assert _codes(res[2]) == [("low_confidence", "below_threshold")] and "below the review threshold 90%" in res[2].flags[0].message
    # conformal set {c : p_c >= 1 - qhat = 0.3}: a alone for a confident item, a and b for the unsure one
    assert res[2].prediction_set == ["a", "b"]
    # calibrated: softmax(logits / T)
    z = logits[2] / 2.0
    np.testing.assert_allclose(res[2].probabilities, np.exp(z) / np.exp(z).sum())
    # quality flags come first and make the item review
    q = Flag("image_quality", "critical", "Image is blank.", "blank")
    res_q = t.apply(logits[:1], feats[:1], quality_flags=[[q]])
    assert _codes(res_q[0]) == [("image_quality", "blank")] and res_q[0].status == "review"
    # no certified threshold (data, not a sentinel): every item flagged, with its own reason
    u = _stub_trust(review={"certified": False, "threshold": None})
    assert all(_codes(r)[-1] == ("low_confidence", "no_certified_threshold") for r in u.apply(logits, feats))
    # an adapted model: classes its lab did not review always go to review, naming the lab
    a = _stub_trust(review_classes=["b"], lab="lab B")
    rb = a.apply(logits, feats)[3]
    assert _codes(rb) == [("low_confidence", "class_not_reviewed_in_lab")] and "(lab B)" in rb.flags[0].message
    # a model whose card's shortcut audit finds a colour cue: every result carries the cue flag
    c = _stub_trust(shortcut_audit={"model_inputs": {"colour_histogram": 0.96}, "chance": 1 / 3})
    rc = c.apply(logits[:1], feats[:1])[0]
    assert _codes(rc) == [("shortcut_cue", "colour_histogram")] and rc.status == "review"
    # no OOD detector: nothing is flagged out of distribution
    n = _stub_trust(ood_method=None, detectors={})
    assert [r.status for r in n.apply(logits, feats)] == ["ok", "review", "review", "ok"]
    assert all(r.ood_score == 0 for r in n.apply(logits, feats))


def test_union_flags_when_any_detector_fires():
    from bcc_core.trust import TrustModel

    rng = np.random.default_rng(0)
    f = rng.normal(size=(300, 4))
    y = rng.integers(0, 3, 300)
    stats = ood.fit(f, y, 3, k=5)
    t = TrustModel(classes=CLASSES, temperature=1.0, ood_method="union", ood_stats=stats,
                   detectors={"mahalanobis": {"median": 2.0, "threshold": 4.0}, "energy": {"median": -8.0, "threshold": -6.0}},
                   review={"certified": True, "threshold": 0.0})
    logits = np.array([[10.0, 0, 0], [10.0, 0, 0], [1.0, 0, 0]])
    feats = np.array([np.zeros(4), np.full(4, 50.0), np.zeros(4)])  # 2nd: far features; 3rd: flat logits
    d = t.decide(logits, feats)
    assert d.ood_flag.tolist() == [False, True, True]
    maha = ood.mahalanobis(feats, stats)
    np.testing.assert_allclose(d.ood_score, np.maximum((maha - 2) / 2, (ood.energy(logits) + 8) / 2))


def _parts(n=600, seed=0, shift=0):
    from bcc_core.trust import Part

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    feats = np.eye(3)[y] * 4 + rng.normal(0, 1, (n, 3))
    logits = feats * 3  # overconfident: T > 1
    ids = np.arange(n) + shift
    return y, feats, logits, ids, Part


def test_fit_uses_each_part_for_its_own_fit_and_refuses_overlap():
    from bcc_core.trust import TrustConfig, TrustModel

    y, f, lg, ids, Part = _parts(1500)
    tr, a, b = Part("train", ids[:600], y[:600], f[:600]), \
        Part("cal_a", ids[600:1000], y[600:1000], f[600:1000], lg[600:1000]), \
        Part("cal_b", ids[1000:], y[1000:], f[1000:], lg[1000:])
    t = TrustModel.fit(CLASSES, tr, a, b, TrustConfig(ood_method="mahalanobis"))
    assert t.temperature == pytest.approx(calibration.fit_temperature(lg[600:1000], y[600:1000]))
    s_a = ood.mahalanobis(f[600:1000], t.ood_stats)
    assert t.detectors["mahalanobis"]["threshold"] == pytest.approx(np.quantile(s_a, 0.95), rel=1e-5)
    p_b = calibration.apply_temperature(lg[1000:], t.temperature)
    assert t.conformal["qhat"] == pytest.approx(review.conformal_qhat(p_b, y[1000:], 0.05))
    assert t.certified and t.review["n_calibration"] <= 500 and 0 < t.review["threshold"] <= 1
    assert t.fitted_on["review_rule"].startswith("cal_b") and t.fitted_on["temperature"].startswith("cal_a")
    with pytest.raises(ValueError, match="'cal_a' is empty"):
        TrustModel.fit(CLASSES, tr, Part("cal_a", [], [], np.zeros((0, 3)), np.zeros((0, 3))), b)
    with pytest.raises(ValueError, match="share 1 items"):
        TrustModel.fit(CLASSES, tr, a, Part("cal_b", np.r_[ids[1000:], ids[700]], np.r_[y[1000:], y[700]],
                                            np.r_[f[1000:], f[700:701]], np.r_[lg[1000:], lg[700:701]]))


def test_a_labs_confident_error_in_either_calibration_part_raises_the_threshold():
    """An adapting lab's wrong predictions that pass the other gates are kept out of "ok", whether they sit in
    calibration A or B (both are held out from the network's fit); another source's errors do not count."""
    from bcc_core.trust import TrustConfig, TrustModel

    y, f, lg, ids, Part = _parts(1500)
    src = np.array(["parent"] * 1500, dtype=object)
    lab_a, lab_b = np.arange(600, 620), np.arange(1000, 1020)
    src[lab_a], src[lab_b] = "lab", "lab"
    wrong_a = lab_a[0]
    lg = lg.copy()
    lg[wrong_a] = 0
    lg[wrong_a, (y[wrong_a] + 1) % len(CLASSES)] = 30.0  # a confident error of the lab's, in calibration A only
    tr = Part("train", ids[:600], y[:600], f[:600])

    def fit(no_errors_source, source_a):
        a = Part("cal_a", ids[600:1000], y[600:1000], f[600:1000], lg[600:1000], source=source_a)
        b = Part("cal_b", ids[1000:], y[1000:], f[1000:], lg[1000:], source=src[1000:])
        return TrustModel.fit(CLASSES, tr, a, b, TrustConfig(ood_method=None), no_errors_source=no_errors_source)

    plain = fit(None, src[600:1000])
    lab = fit("lab", src[600:1000])
    conf = calibration.apply_temperature(lg[wrong_a:wrong_a + 1], lab.temperature).max()
    assert plain.certified and plain.review["threshold"] <= conf
    assert lab.review["threshold"] > conf and lab.review["guarantee_threshold"] == plain.review["threshold"]
    assert lab.review["no_errors_wrong_seen"] >= 1
    other = src[600:1000].copy()
    other[wrong_a - 600] = "parent"  # the same error, but the parent's: the guarantee covers it
    assert fit("lab", other).review["threshold"] == pytest.approx(plain.review["threshold"])


def test_a_labs_confident_error_among_its_out_of_fold_fitting_cells_raises_the_threshold():
    """`no_errors_extra` (an adapted model's fitting cells, each scored by a head fitted without it): the lab's
    confident error there keeps the threshold above it too, the extra part may share ids with the train part, and
    nothing else of the trust layer moves."""
    from bcc_core.trust import TrustConfig, TrustModel

    y, f, lg, ids, Part = _parts(1500, seed=3)
    src = np.array(["parent"] * 1500, dtype=object)
    src[1000:1020] = "lab"
    tr = Part("train", ids[:600], y[:600], f[:600])
    a = Part("cal_a", ids[600:1000], y[600:1000], f[600:1000], lg[600:1000], source=src[600:1000])
    b = Part("cal_b", ids[1000:], y[1000:], f[1000:], lg[1000:], source=src[1000:])
    fit_lg = lg[:20].copy()
    fit_lg[3] = 0
    fit_lg[3, (y[3] + 1) % len(CLASSES)] = 30.0  # a confident error among the fitting cells, scored out of fold
    extra = Part("lab_fit_out_of_fold", ids[:20], y[:20], f[:20], fit_lg, source=np.full(20, "lab", dtype=object))
    cfg = TrustConfig(ood_method=None)
    base = TrustModel.fit(CLASSES, tr, a, b, cfg, no_errors_source="lab")
    more = TrustModel.fit(CLASSES, tr, a, b, cfg, no_errors_source="lab", no_errors_extra=extra)
    conf = calibration.apply_temperature(fit_lg[3:4], more.temperature).max()
    assert base.review["threshold"] <= conf < more.review["threshold"]
    assert more.review["no_errors_wrong_seen"] == base.review["no_errors_wrong_seen"] + 1
    assert more.review["no_errors_items"] == {"cal_b": 20, "cal_a": 0, "lab_fit_out_of_fold": 20}
    assert more.temperature == base.temperature and more.conformal == base.conformal
    assert more.review["guarantee_threshold"] == base.review["guarantee_threshold"]


def test_trust_card_round_trip_and_a_card_without_trust_section_refused(tmp_path):
    import json

    from bcc_core.trust import STATS_FILE, TrustConfig, TrustModel

    y, f, lg, ids, Part = _parts(1500, seed=1)
    t = TrustModel.fit(CLASSES, Part("train", ids[:600], y[:600], f[:600]),
                       Part("cal_a", ids[600:1000], y[600:1000], f[600:1000], lg[600:1000]),
                       Part("cal_b", ids[1000:], y[1000:], f[1000:], lg[1000:]), TrustConfig())
    t.save_stats(tmp_path)
    card = {"classes": CLASSES, "trust": json.loads(json.dumps(t.to_card()))}
    back = TrustModel.from_card(card, tmp_path)
    t.ood_stats = ood.load_stats(tmp_path / STATS_FILE)  # the file keeps the kNN bank in float16
    a, b = t.decide(lg[:50], f[:50]), back.decide(lg[:50], f[:50])
    np.testing.assert_allclose(a.probs, b.probs)
    np.testing.assert_allclose(a.ood_score, b.ood_score, rtol=1e-3, atol=1e-4)
    assert (a.ok == b.ok).all()
    # A card from before the trust section (union scales under ood, review threshold 1.01 meaning "accept
    # nothing"): refused with what to do, never read through the old sentinel.
    old = {"classes": CLASSES, "model_id": "old", "calibration": {"temperature": 1.5},
           "ood": {"method": "union", "threshold": 1.0, "stats_file": STATS_FILE,
                   "scales": {m: [v["median"], v["threshold"]] for m, v in t.detectors.items()}},
           "review_rule": {"threshold": 1.01, "conformal_qhat": 0.2, "conformal_alpha": 0.05}}
    with pytest.raises(ValueError, match="no trust section.*retrain or re-adapt"):
        TrustModel.from_card(old, tmp_path)
    (tmp_path / STATS_FILE).unlink()
    with pytest.raises(ValueError, match="missing"):
        TrustModel.from_card(card, tmp_path)


def test_trust_apply_runs_without_tensorflow_or_scipy():
    """The exported runtime calls apply with numpy only: importing and applying must not load TF or scipy."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from bcc_core.trust import TrustModel\n"
        "t = TrustModel(classes=['a','b'], temperature=1.0, ood_method='energy',"
        " detectors={'energy': {'median': -5.0, 'threshold': -3.0}}, review={'certified': True, 'threshold': 0.9})\n"
        "r = t.apply(np.array([[9.0, 0.0]]), np.zeros((1, 2)))\n"
        "assert r[0].status == 'ok', r\n"
        "bad = [m for m in ('tensorflow', 'keras', 'scipy', 'sklearn') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _second(feature_dim: int, favours: list[int]):
    """A SecondOpinion whose logits follow the features' first channels: item i is named favours-style by the
    argmax of its first len(CLASSES) features (identity dense layer, identity logits)."""
    from bcc_core.second_opinion import SecondOpinion

    k = len(CLASSES)
    dense = np.zeros((feature_dim, k), np.float32)
    dense[:k, :k] = np.eye(k)
    return SecondOpinion(dense, np.zeros(k, np.float32), np.eye(k, dtype=np.float32)[:, favours],
                         np.zeros(k, np.float32))


def test_a_second_opinion_that_names_another_class_keeps_the_result_out_of_ok(tmp_path):
    """The features-only head must name the model's class: otherwise review, with its class named; the card
    records its file and hash, and a changed file is refused."""
    import json

    from bcc_core.second_opinion import FILE, SecondOpinion

    logits = np.array([[12.0, 0, 0], [12.0, 0, 0]])  # both confidently "a", in distribution (energy -12)
    feats = np.array([[5.0, 0, 0], [0, 0, 5.0]])      # the second opinion: "a" for the first, "c" for the second
    t = _stub_trust(second_opinion=_second(3, [0, 1, 2]))
    res = t.apply(logits, feats)
    assert [r.status for r in res] == ["ok", "review"]
    assert _codes(res[1]) == [("low_confidence", "second_opinion_disagrees")]
    assert "names it c, not a" in res[1].flags[0].message
    d = t.decide(logits, feats)
    assert d.disagree.tolist() == [False, True] and d.ok.tolist() == [True, False]
    # given out-of-sample logits stand in for the model's own second opinion
    assert t.decide(logits, feats, second_logits=np.array([[0, 9.0, 0], [9.0, 0, 0]])).disagree.tolist() == [True, False]
    assert not _stub_trust().decide(logits, feats).disagree.any()  # no second opinion: nothing disagrees
    # card round trip (the file beside it, its hash in the card): no card before the file exists
    with pytest.raises(ValueError, match="save_stats"):
        t.to_card()
    t.save_stats(tmp_path)
    card = {"classes": CLASSES, "trust": json.loads(json.dumps(t.to_card()))}
    assert card["trust"]["second_opinion"]["file"] == FILE and len(card["trust"]["second_opinion"]["sha256"]) == 64
    back = _stub_trust().from_card(card, tmp_path)
    assert back.decide(logits, feats).disagree.tolist() == [False, True]
    so = SecondOpinion.load(tmp_path, None)
    np.testing.assert_allclose(so.logits(feats), t.second_opinion.logits(feats))
    with pytest.raises(ValueError, match="give model_dir"):
        type(t).from_card(card)
    np.savez(tmp_path / FILE, dense_kernel=so.dense_kernel * 2, dense_bias=so.dense_bias,
             logits_kernel=so.logits_kernel, logits_bias=so.logits_bias)
    with pytest.raises(ValueError, match="differs from the card"):
        type(t).from_card(card, tmp_path)
    (tmp_path / FILE).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        type(t).from_card(card, tmp_path)


def test_second_opinion_is_the_keras_head_in_numpy():
    """`SecondOpinion.from_layers` reproduces the trained Keras head's logits (dropout inactive at inference)."""
    import keras

    from bcc_core.models import build_head
    from bcc_core.second_opinion import SecondOpinion

    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    m = keras.Model(inp, build_head(inp, 3))
    layers = [m.get_layer(n) for n in ("head_dropout1", "head_dense", "head_dropout2", "logits")]
    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    want = keras.Model(inp, m.get_layer("logits").output).predict(x, verbose=0)
    np.testing.assert_allclose(SecondOpinion.from_layers(layers).logits(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reads 16 features"):
        SecondOpinion.from_layers(layers).logits(x[:, :8])


def test_the_labs_check_reads_only_cells_the_second_opinion_agrees_on():
    """A lab's confident error on which the second opinion (out of sample) disagrees never shows as ok, so it
    does not raise the threshold; the same error where the second opinion agrees does."""
    from bcc_core.trust import TrustConfig, TrustModel

    y, f, lg, ids, Part = _parts(1500, seed=5)
    src = np.array(["parent"] * 1500, dtype=object)
    src[600:620] = "lab"
    lg = lg.copy()
    lg[600] = 0
    lg[600, (y[600] + 1) % len(CLASSES)] = 30.0  # the lab's confident error, in calibration A
    so = _second(3, [0, 1, 2])  # names each item by its features: the truth, mostly
    tr = Part("train", ids[:600], y[:600], f[:600])
    b = Part("cal_b", ids[1000:], y[1000:], f[1000:], lg[1000:], source=src[1000:])

    def fit(second_a):
        a = Part("cal_a", ids[600:1000], y[600:1000], f[600:1000], lg[600:1000], source=src[600:1000],
                 second_logits=second_a)
        return TrustModel.fit(CLASSES, tr, a, b, TrustConfig(ood_method=None), no_errors_source="lab",
                              second_opinion=so)

    disagrees = fit(None)  # computed from the features: it names the true class, not the error's
    agrees = so.logits(f[600:1000]).copy()
    agrees[0] = lg[600]  # out of sample it made the same error
    raised = fit(agrees)
    conf = calibration.apply_temperature(lg[600:601], raised.temperature).max()
    assert disagrees.certified and disagrees.review["threshold"] <= conf < raised.review["threshold"]
    assert raised.review["no_errors_wrong_seen"] == disagrees.review["no_errors_wrong_seen"] + 1
    assert raised.review["guarantee_threshold"] == disagrees.review["guarantee_threshold"]
