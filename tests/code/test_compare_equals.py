"""The backbone comparison compares equals: one initialisation for every row, never pretrained vs scratch."""

import pytest

from bcc_core import compare


def test_every_backbone_gets_the_same_initialisation(monkeypatch, tmp_path):
    w = tmp_path / "mnv2.weights.h5"
    w.write_bytes(b"x")
    monkeypatch.setattr(compare, "default_weights_path", lambda: w)
    inits, why = compare.common_initialisation(["mobilenetv2"], None)
    assert inits == [str(w)] and "every backbone" in why
    inits, why = compare.common_initialisation(["small_cnn", "resnet50", "mobilenetv2"], None)
    assert inits == ["none"] * 3 and "small_cnn, resnet50" in why and "from scratch" in why


def test_mixed_initialisations_are_refused():
    with pytest.raises(ValueError, match="unequals"):
        compare.common_initialisation(["mobilenetv2", "resnet50"], ["a.h5", "none"])
    with pytest.raises(ValueError, match="one per backbone"):
        compare.common_initialisation(["mobilenetv2", "resnet50", "small_cnn"], ["a.h5", "b.h5"])
    assert compare.common_initialisation(["a", "b"], ["none"])[0] == ["none", "none"]
