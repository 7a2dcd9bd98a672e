"""Unit tests for bcc_core.flags."""

import json

import pytest

from bcc_core.flags import FLAG_CODES, SEVERITIES, Flag, next_step, status_for, verdict
from bcc_core.shortcut import cue_flag


def test_flag_codes_are_the_documented_four():
    assert FLAG_CODES == ("low_confidence", "out_of_distribution", "image_quality", "shortcut_cue")
    assert SEVERITIES == ("info", "warning", "critical")


def test_verdict_reads_the_most_severe_flag_first():
    low = Flag("low_confidence", "warning", "Unsure.")
    ood = Flag("out_of_distribution", "warning", "Unlike the training images.")
    crit = Flag("image_quality", "critical", "The image is nearly uniform: no cell is visible. Re-capture it.")
    assert verdict([]).level == "ok" and verdict([]).trust_suggestion
    assert verdict([low]).level == "review" and verdict([low]).trust_suggestion
    assert verdict([low, ood]) == verdict([ood, low])
    assert verdict([ood]).headline == "Not recognised — classify it yourself" and not verdict([ood]).trust_suggestion
    v = verdict([low, ood, crit])
    assert v.level == "do_not_use" and not v.trust_suggestion
    assert v.headline == "Do not use — the image is nearly uniform: no cell is visible"


def test_shortcut_cue_caps_a_model_whose_colour_predicts_the_class():
    audit = {"model_inputs": {"border_colour": 0.75, "colour_histogram": 0.958}, "chance": 0.25}
    f = cue_flag(audit)
    assert f.code == "shortcut_cue" and f.severity == "warning" and f.detail == "colour_histogram"
    assert "96%" in f.message and "chance 25%" in f.message and status_for([f]) == "review"
    assert cue_flag({"model_inputs": {"colour_histogram": 0.84}, "chance": 0.2}) is None
    assert cue_flag(None) is None and cue_flag({}) is None


def test_flag_to_dict_round_trip_and_json():
    f = Flag("image_quality", "critical", "Image is blank. Re-capture it.", detail="blank")
    d = f.to_dict()
    assert d == {"code": "image_quality", "severity": "critical",
                 "message": "Image is blank. Re-capture it.", "detail": "blank"}
    assert Flag.from_dict(json.loads(json.dumps(d))) == f


def test_flag_detail_defaults_to_empty_and_is_frozen():
    f = Flag("low_confidence", "warning", "Top two classes are close.")
    assert f.detail == ""
    with pytest.raises(AttributeError):
        f.code = "image_quality"  # type: ignore[misc]


@pytest.mark.parametrize("kwargs", [
    {"code": "bogus", "severity": "info", "message": "m"},
    {"code": "low_confidence", "severity": "severe", "message": "m"},
    {"code": "low_confidence", "severity": "info", "message": "  "},
])
def test_flag_rejects_invalid_values(kwargs):
    with pytest.raises(ValueError):
        Flag(**kwargs)


def test_status_for():
    assert status_for([]) == "ok"
    assert status_for(None) == "ok"
    assert status_for(()) == "ok"
    assert status_for([Flag("low_confidence", "warning", "m")]) == "review"
    assert status_for(iter([Flag("image_quality", "critical", "m")])) == "review"
    assert status_for(iter([])) == "ok"


def test_next_step_for_every_code_and_unknown():
    steps = {c: next_step(c) for c in FLAG_CODES}
    assert all(isinstance(s, str) and len(s) > 20 for s in steps.values())
    assert len(set(steps.values())) == len(FLAG_CODES)  # each code gets its own advice
    with pytest.raises(ValueError, match="low_confidence"):
        next_step("nope")
