"""ScreenResult: one typed result whose to_row() is the row every consumer reads, with the model's identity."""

import numpy as np

from bcc_core.flags import Flag
from bcc_core.inference import Prediction
from bcc_core.report import result_to_json, results_to_csv, results_to_fhir_bundle
from bcc_core.results import ROW_KEYS, ModelIdentity, ScreenResult

CARD = {"model_id": "m1", "version": "2026.12.01.1200", "model_sha256": "ab" * 32, "classes": ["a", "b"]}


def _pred():
    f = Flag("low_confidence", "warning", "Calibrated confidence 60% is below the review threshold.", "below_threshold")
    return Prediction("a", 0.6, {"a": 0.6, "b": 0.4}, [f], "review", 1.25, ["a", "b"])


def test_to_row_is_the_row_screening_produced_before():
    thumb = np.zeros((4, 4, 3), np.uint8)
    p = _pred()
    r = ScreenResult.from_prediction("x.png", p, "cd" * 32, thumb, ModelIdentity.from_card(CARD))
    row = r.to_row()
    # The dict screening.py built by hand until now, key for key and in this order.
    old = {"file": "x.png", "status": p.status, "predicted_class": p.predicted_class, "confidence": p.confidence,
           "flags": p.flags, "reason": " ".join(f.message for f in p.flags), "probabilities": p.probabilities,
           "sha256": "cd" * 32, "ood_score": p.ood_score, "prediction_set": p.prediction_set, "thumbnail": thumb}
    assert list(row) == list(ROW_KEYS) == list(old)
    assert {k: v for k, v in row.items() if k != "thumbnail"} == {k: v for k, v in old.items() if k != "thumbnail"}
    assert row["thumbnail"] is thumb


def test_error_row_has_every_key_and_none_where_there_is_no_value():
    row = ScreenResult.error("bad.jpg", "bad.jpg: not an image").to_row()
    assert row == dict.fromkeys(ROW_KEYS) | {"file": "bad.jpg", "status": "error", "flags": [],
                                             "reason": "bad.jpg: not an image"}


def test_rows_feed_the_existing_exports_unchanged():
    rows = [ScreenResult.from_prediction("x.png", _pred()).to_row(), ScreenResult.error("y.png", "unreadable").to_row()]
    for r in rows:
        r.pop("thumbnail")
    csv_text = results_to_csv(rows, ["a", "b"])
    assert csv_text.splitlines()[0].startswith("file,status,predicted_class,confidence,flags,reason,p_a,p_b")
    assert "low_confidence" in csv_text.splitlines()[1] and ",error," in csv_text.splitlines()[2]
    assert '"predicted_class": "a"' in result_to_json(rows[0], CARD)
    assert len(results_to_fhir_bundle(rows, CARD)["entry"]) == 1


def test_identity_from_card_and_to_dict_carries_it():
    ident = ModelIdentity.from_card(CARD)
    assert ident == ModelIdentity("m1", "2026.12.01.1200", "ab" * 32)
    d = ScreenResult.from_prediction("x.png", _pred(), model=ident).to_dict()
    assert (d["model_id"], d["model_version"], d["model_sha256"]) == ("m1", "2026.12.01.1200", "ab" * 32)
    assert d["flags"][0]["code"] == "low_confidence" and "thumbnail" not in d
    # A card written before versions and hashes were kept: empty strings, not a crash.
    assert ModelIdentity.from_card({"model_id": "old"}) == ModelIdentity("old", "", "")


def test_screening_yields_typed_results_with_the_predictors_identity():
    from bcc_core.io import ImageSource
    from bcc_core.screening import ScreeningConfig, iter_results

    class Card:
        def to_dict(self):
            return CARD

    class P:
        card = Card()

        def prepare(self, img):
            return img[:4, :4], []

        def predict_inputs(self, x, quality, batch_size):
            return [_pred() for _ in x]

    import cv2

    ok, png = cv2.imencode(".png", np.full((8, 8, 3), 7, np.uint8))
    res = list(iter_results([ImageSource("a.png", lambda: png.tobytes()), ImageSource("b.png", lambda: b"nope")], P(),
                            ScreeningConfig(batch_size=2, workers=1, thumbnail=0)))
    assert [type(r) for r in res] == [ScreenResult, ScreenResult]
    assert [r.status for r in res] == ["review", "error"]
    assert all(r.model == ModelIdentity.from_card(CARD) for r in res)
