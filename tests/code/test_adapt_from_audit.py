"""`adapt --from-audit`: reviewers' confirmed and corrected cells from signed cases, matched to their images by
content hash, become the lab's adaptation set; the new card names the decisions it learnt from."""

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import synthetic_cell

SHAPES = {"mono": 1, "bilobed": 2, "trilobed": 3}
PASSWORD = "correct horse battery"


def _write(path: Path, img: np.ndarray) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img[..., ::-1])
    return path.read_bytes()


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    from bcc_core.augment import AugmentConfig
    from bcc_core.preprocess import PreprocessConfig
    from bcc_core.training import TrainConfig, train

    tmp = tmp_path_factory.mktemp("from_audit")
    for k, (name, lobes) in enumerate(SHAPES.items()):
        for i in range(14):
            _write(tmp / "data" / name / f"{name}_{i}.png", synthetic_cell(160, 26 + 2 * (i % 5), seed=100 * k + i, lobes=lobes))
    cfg = TrainConfig(task="synthetic", backbone="small_cnn", weights="none", epochs=3, aug_views=0, batch_size=8,
                      preprocess=PreprocessConfig(size=64).to_dict(), augment=AugmentConfig.none().to_dict())
    train(tmp / "data", tmp / "parent", cfg, progress=False)
    return tmp / "parent"


@pytest.fixture
def reviewed_store(tmp_path):
    """A signed case of 30 lab cells (10 per class; half confirmed, half corrected; one amended after sign-off),
    an unsigned case with one decision, and a decided cell whose image the lab no longer has."""
    from bcc_core import cases, store, users

    engine = store.open_store(str(tmp_path / "bcc.sqlite"))
    users.add_user(engine, "rita", PASSWORD, "reviewer")
    users.add_user(engine, "sam", PASSWORD, "signer")
    rita, sam = users.login(engine, "rita", PASSWORD), users.login(engine, "sam", PASSWORD)
    images = tmp_path / "lab_images"
    truth = {}
    cid = cases.create_case(engine, rita, "SLIDE-1", "synthetic", "ab" * 32, 31)
    names = list(SHAPES)
    seq = 0
    for name, lobes in SHAPES.items():
        for i in range(10):
            img = synthetic_cell(160, 22 + i % 4, seed=1000 + 37 * lobes + i, lobes=lobes)
            data = _write(images / "slide1" / f"cell_{seq:03d}.png", img)
            shown = name if i % 2 == 0 else names[(names.index(name) + 1) % 3]
            rid = cases.add_result(engine, rita, cid, seq, {
                "file": f"cell_{seq:03d}.png", "status": "review", "predicted_class": shown, "confidence": 0.6,
                "flags": [], "reason": "", "probabilities": {n: 1 / 3 for n in names},
                "sha256": hashlib.sha256(data).hexdigest()})
            if shown == name:
                cases.decide(engine, rita, rid, "confirm")
            else:
                cases.decide(engine, rita, rid, "correct", name)
            truth[hashlib.sha256(data).hexdigest()] = name
            seq += 1
    lost = cases.add_result(engine, rita, cid, seq, {"file": "gone.png", "status": "review", "predicted_class": "mono",
                                                     "confidence": 0.5, "flags": [], "reason": "", "sha256": "ee" * 32})
    cases.decide(engine, rita, lost, "confirm")
    assert cases.finish(engine, rita, cid) == "complete"
    cases.sign(engine, sam, cid)
    # After sign-off a signer amends cell 0 (mono → bilobed): the amendment is the decision that counts.
    first = cases.case_rows(engine, cid)[1][0]
    cases.decide(engine, sam, first["id"], "correct", "bilobed", reason="second look")
    truth[first["image_sha256"]] = "bilobed"
    other = cases.create_case(engine, rita, "SLIDE-2", "synthetic", "ab" * 32, 1)
    img = synthetic_cell(160, 24, seed=5, lobes=1)
    data = _write(tmp_path / "elsewhere" / "x.png", img)  # not under lab_images: the case keeps the original
    assert cases.keep_image(engine, data) == hashlib.sha256(data).hexdigest()
    rid = cases.add_result(engine, rita, other, 0, {"file": "x.png", "status": "review", "predicted_class": "mono",
                                                    "confidence": 0.5, "flags": [], "reason": "",
                                                    "sha256": hashlib.sha256(data).hexdigest()})
    cases.decide(engine, rita, rid, "confirm")
    return engine, images, truth, str(tmp_path / "bcc.sqlite")


def test_reviewed_cells_are_matched_by_content_and_the_latest_decision_counts(reviewed_store, tmp_path):
    from bcc_core.lab_models import reviewed_from_store

    engine, images, truth, _ = reviewed_store
    # Renaming or moving a file does not matter; changing its bytes does.
    (images / "slide1" / "cell_005.png").rename(images / "moved.png")
    tampered = images / "slide1" / "cell_006.png"
    tampered.write_bytes(tampered.read_bytes() + b"\0")
    cells, summary = reviewed_from_store(engine, [images])
    assert summary["reviewed"] == 31 and summary["images_missing"] == 2  # the lost image, the tampered one
    assert summary["images_kept_in_store"] == 0 and summary["images_found"] == 29
    assert summary["cells_used"] == 29 and len(cells) == 29
    assert all(truth[c["sha256"]] == c["class"] for c in cells)
    assert all(hashlib.sha256(c["data"]).hexdigest() == c["sha256"] for c in cells)
    assert sum(c["class"] == "bilobed" for c in cells) == 11  # the amended cell moved class
    everything, s2 = reviewed_from_store(engine, [images], signed_only=False)
    assert s2["reviewed"] == 32 and len(everything) == 30  # the unsigned case's cell too
    only2, s3 = reviewed_from_store(engine, [], signed_only=False, sample_labels=["SLIDE-2"])
    assert [c["class"] for c in only2] == ["mono"] and s3["images_kept_in_store"] == 1  # no folder needed


def test_cli_adapt_from_audit_writes_a_card_naming_the_decisions(parent, reviewed_store, tmp_path, capsys):
    from bcc_core.cli import main
    from bcc_core.inference import Predictor

    engine, images, truth, url = reviewed_store
    out = tmp_path / "adapted"
    rc = main(["adapt", "--model", str(parent), "--from-audit", url, "--images", str(images), "--out", str(out),
               "--lab", "Lab Z", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "reviewed cells: 31 (signed cases)" in printed and "missing: 1" in printed and "used: 30" in printed
    assert "images kept with their case: 0, found under --images: 30" in printed
    card = json.loads((out / "model_card.json").read_text())
    rd = card["lineage"]["reviewed_decisions"]
    every = rd["cells"] + rd["not_learnt"]  # the decisions learnt from, and those left out (a doubted label)
    assert len(every) == 30 and all(c["decision_id"] > 0 and len(c["sha256"]) == 64 for c in every)
    assert {c["sha256"] for c in rd["cells"]} == {c["sha256"] for c in card["lineage"]["cells"]}
    assert all(truth[c["sha256"]] == c["class"] for c in every)
    left_out = card["lineage"]["labels_to_recheck"]["left_out"]
    assert rd["not_learnt"] and len(rd["not_learnt"]) == len(left_out)  # these synthetic cells leave some out
    assert all("doubted" in c["why"] for c in rd["not_learnt"])
    assert sorted(f.split("/")[0] for f in left_out) == sorted(c["class"] for c in rd["not_learnt"])
    assert card["lineage"]["lab"] == "Lab Z"
    Predictor.load(out)  # the card with its review source still validates and loads


def test_cli_from_audit_without_matching_images_is_a_usage_error(parent, reviewed_store, tmp_path, capsys):
    from bcc_core.cli import main

    _, _, _, url = reviewed_store
    assert main(["adapt", "--model", str(parent), "--from-audit", url, "--out", str(tmp_path / "a")]) != 0
    assert "give --images DIR" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["adapt", "--model", str(parent), "--from-audit", url, "--images", str(empty),
                 "--out", str(tmp_path / "b")]) != 0
    assert "no reviewed cell" in capsys.readouterr().err
