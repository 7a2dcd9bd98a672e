"""Which classes come from which lab (TrainConfig.class_sources): parsing and validation."""

import pytest

from bcc_core.cli import _class_sources
from bcc_core.training import TrainConfig, label_groups

CLASSES = ["basophil", "erythroblast", "monocyte", "myeloblast", "seg_neutrophil"]


def test_cli_text_parses_into_sources():
    assert _class_sources("basophil, erythroblast,monocyte|myeloblast,seg_neutrophil") == [
        ["basophil", "erythroblast", "monocyte"], ["myeloblast", "seg_neutrophil"]]
    assert _class_sources(None) is None and _class_sources("") is None


def test_label_groups_maps_each_class_to_its_source():
    g = label_groups([["myeloblast", "seg_neutrophil"], ["basophil", "erythroblast", "monocyte"]], CLASSES)
    assert g.tolist() == [1, 1, 1, 0, 0]
    assert label_groups(None, CLASSES) is None


@pytest.mark.parametrize("sources, message", [
    ([CLASSES], "at least two"),
    ([["basophil", "erythroblast", "monocyte"], ["myeloblast"]], "misses seg_neutrophil"),
    ([["basophil", "erythroblast", "monocyte", "myeloblast"], ["myeloblast", "seg_neutrophil"]], "twice"),
    ([["basophil", "erythroblast", "monocyte"], ["myeloblast", "neutrophil"]], "not a class"),
])
def test_label_groups_rejects_bad_sources(sources, message):
    with pytest.raises(ValueError, match=message):
        label_groups(sources, CLASSES)


def test_sources_are_recorded_in_the_training_config():
    cfg = TrainConfig(class_sources=[["a"], ["b"]])
    assert cfg.to_dict()["class_sources"] == [["a"], ["b"]]
    assert TrainConfig().to_dict()["class_sources"] is None
