"""The label check (bcc_core.label_check): reviewed cells whose label out-of-sample probabilities doubt."""

import numpy as np

from bcc_core.label_check import doubted_labels

CLASSES = ["basophil", "eosinophil", "monocyte", "neutrophil"]


def _scores(labels, seed=0, margin=4.0):
    """Logits of a head that names each cell's class with a clear margin, plus noise."""
    rng = np.random.default_rng(seed)
    lg = rng.normal(0, 1, (len(labels), len(CLASSES)))
    lg[np.arange(len(labels)), labels] += margin
    return lg


def test_clean_labels_are_not_doubted():
    y = np.repeat([1, 2, 3], 12)
    assert doubted_labels(y, _scores(y), 1.0, CLASSES, [f"c{i}.png" for i in range(len(y))]) == []


def test_a_cell_that_looks_like_another_labelled_class_is_listed_with_it_most_doubted_first():
    y = np.repeat([1, 2, 3], 12)
    lg = _scores(y)
    lg[4] = [0, 0, 0, 7]   # filed as eosinophil, scored as a clear neutrophil
    lg[20] = [0, 0, 1, 5]  # filed as monocyte, scored as a neutrophil less surely
    files = [f"c{i}.png" for i in range(len(y))]
    out = doubted_labels(y, lg, 1.0, CLASSES, files)
    assert [d["file"] for d in out] == ["c4.png", "c20.png"]
    assert out[0] == {"file": "c4.png", "label": "eosinophil", "suggested": "neutrophil",
                      "p_label": round(float(np.exp(0) / (2 + np.exp(7))), 3),
                      "p_suggested": round(float(np.exp(7) / (2 + np.exp(7))), 3)}


def test_a_class_the_lab_did_not_label_neither_raises_nor_suggests_a_doubt():
    """Probabilities are read over the labelled classes only: a cell the head gives to an unlabelled class
    (basophil here) is not called mislabelled for it."""
    y = np.repeat([1, 3], 12)
    lg = _scores(y)
    lg[3, 0] = 12.0  # the head's top class is basophil, which the lab did not label
    out = doubted_labels(y, lg, 1.0, CLASSES, [f"c{i}.png" for i in range(len(y))])
    assert all(d["suggested"] in ("eosinophil", "neutrophil") for d in out) and "c3.png" not in [d["file"] for d in out]


def test_one_labelled_class_has_nothing_to_compare():
    y = np.full(10, 2)
    assert doubted_labels(y, _scores(y), 1.0, CLASSES, [str(i) for i in range(10)]) == []


def test_the_temperature_scales_the_probabilities_it_reports():
    y = np.repeat([1, 3], 10)
    lg = _scores(y)
    lg[0] = [0, 0, 0, 6]
    files = [str(i) for i in range(len(y))]
    hot, cold = (doubted_labels(y, lg, t, CLASSES, files)[0] for t in (1.0, 3.0))
    assert hot["file"] == cold["file"] == "0" and cold["p_suggested"] < hot["p_suggested"]


def test_no_process_pool_is_forked(monkeypatch):
    """The check runs inside the app's server, beside TensorFlow's threads: a forked pool there can hang (the
    browser test once waited ten minutes on it). It must stay in-process."""
    import multiprocessing

    def no_pool(*a, **k):
        raise AssertionError("the label check started a process pool")

    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    # cleanlab picks its pool size from the core count: on a one-core machine it would never start a pool, and this
    # test could not fail there; say there are four.
    monkeypatch.setattr(multiprocessing, "cpu_count", lambda: 4)
    import cleanlab.filter

    if getattr(cleanlab.filter, "psutil_exists", False):  # cleanlab asks psutil first when it has it
        monkeypatch.setattr(cleanlab.filter.psutil, "cpu_count", lambda logical=True: 4)
    y = np.repeat([1, 2, 3], 12)
    lg = _scores(y)
    lg[4] = [0, 0, 0, 7]
    assert [d["file"] for d in doubted_labels(y, lg, 1.0, CLASSES, [f"c{i}.png" for i in range(len(y))])] == ["c4.png"]
