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
    assert review.fit_selective_threshold(conf, correct, 0.02, 0.1)["threshold"] > 1.0


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
