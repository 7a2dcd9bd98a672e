"""Unit tests for bcc_core.flags."""

import json

import pytest

from bcc_core.flags import FLAG_CODES, SEVERITIES, Flag, next_step, status_for


def test_flag_codes_are_the_documented_three():
    assert FLAG_CODES == ("low_confidence", "out_of_distribution", "image_quality")
    assert SEVERITIES == ("info", "warning", "critical")


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
