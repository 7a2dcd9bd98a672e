"""The reviewer's worklist: order, stepping, next undecided cell, labels and their audit decisions."""

import pytest

from bcc_core.worklist import DEFAULT_EXTRA_LABELS, Worklist, decision_for, review_labels

ROWS = [{"status": s} for s in ("ok", "review", "error", "review", "ok", "review")]


def test_flagged_cells_only_unless_every_cell_is_verified():
    assert Worklist.from_rows(ROWS).order == (1, 3, 5)
    assert Worklist.from_rows(ROWS, include_ok=True).order == (0, 1, 3, 4, 5)   # never the error row


def test_step_wraps_and_steps_from_a_cell_outside_the_worklist():
    w = Worklist.from_rows(ROWS)
    assert [w.step(1, 1), w.step(3, 1), w.step(5, 1)] == [3, 5, 1]
    assert [w.step(1, -1), w.step(5, -1)] == [5, 3]
    assert w.step(None, 1) == 1 and w.step(None, -1) == 5
    # Cell 4 (ok, opened from the table) is between 3 and 5.
    assert w.step(4, 1) == 5 and w.step(4, -1) == 3
    assert w.step(0, 1) == 1 and w.step(0, -1) == 5
    assert Worklist(()).step(2, 1) is None


def test_next_pending_skips_decided_cells_and_wraps():
    w = Worklist.from_rows(ROWS, decided=[3])
    assert w.pending == [1, 5]
    assert w.next_pending(1) == 5 and w.next_pending(5) == 1 and w.next_pending(None) == 1
    assert Worklist.from_rows(ROWS, decided=[1, 3, 5]).next_pending(1) is None


def test_labels_model_classes_first_then_other_cell_types(monkeypatch):
    monkeypatch.delenv("BCC_REVIEW_LABELS", raising=False)
    labels = review_labels(["basophil", "monocyte"])
    assert labels[:2] == ["basophil", "monocyte"] and labels[2:] == list(DEFAULT_EXTRA_LABELS)
    assert "lymphocyte" in labels and "not_a_cell" in labels
    monkeypatch.setenv("BCC_REVIEW_LABELS", "lymphocyte, smudge_cell,monocyte")
    assert review_labels(["basophil", "monocyte"]) == ["basophil", "monocyte", "lymphocyte", "smudge_cell"]


def test_decision_for_a_label():
    assert decision_for("monocyte", "monocyte") == ("confirm", "monocyte")
    assert decision_for("lymphocyte", "monocyte") == ("correct", "lymphocyte")
    with pytest.raises(ValueError):
        decision_for("", "monocyte")
