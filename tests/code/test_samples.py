"""The bundled sample cells (assets/samples) and bcc_core.samples: attributed, small, from a redistributable set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np

from bcc_core.samples import sample_batch_paths, sample_images, samples_dir

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_samples_are_attributed_small_and_only_from_pbs5():
    root = samples_dir()
    assert root == ROOT / "assets" / "samples"
    assert (root / "LICENSE").is_file() and "CC BY 4.0" in (root / "LICENSE").read_text()
    assert "Acevedo" in (root / "ATTRIBUTION.md").read_text() and "Matek" in (root / "ATTRIBUTION.md").read_text()
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 1_000_000, total  # well under the 2 MB budget
    with (root / "samples.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    listed = {r["file"] for r in rows}
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*")
               if p.is_file() and p.name not in ("LICENSE", "ATTRIBUTION.md", "samples.csv")}
    assert listed == on_disk  # every image is listed with its source
    assert {r["source"] for r in rows} <= {"pbs5", "generated"}  # never LISC, all4 or BCCD
    # pbs5 samples come from the test part of the bundled model's split, never from its training part.
    split = json.loads((ROOT / "models" / "pbs5-mobilenetv2" / "split.json").read_text())["splits"]
    test, train = {r[0] for r in split["test"]}, {r[0] for r in split["train"]}
    for r in rows:
        if r["source"] == "pbs5":
            assert r["original_file"] in test and r["original_file"] not in train


def test_every_pbs5_class_has_a_sample_and_other_classes_none():
    pbs5 = ["basophil", "erythroblast", "monocyte", "myeloblast", "seg_neutrophil"]
    got = sample_images(pbs5)
    assert {s.label for s in got} == set(pbs5)
    assert [s.label for s in got] == sorted((s.label for s in got), key=pbs5.index)  # in the model's order
    assert sample_images(["Benign", "Early", "Pre", "Pro"]) == []  # all4: no redistributable source
    assert {s.label for s in sample_images(["eosinophil", "monocyte"])} == {"monocyte"}
    for s in got:
        img = cv2.imread(str(s.path))
        assert img is not None and min(img.shape[:2]) >= 64


def test_sample_batch_has_cells_and_inputs_that_must_be_flagged():
    paths = sample_batch_paths()
    names = [p.name for p in paths]
    assert names == sorted(names) and len(paths) >= 10
    assert {"zz_blank.png", "zz_out_of_focus.jpg", "zz_not_an_image.jpg"} <= set(names)
    assert cv2.imread(str(paths[names.index("zz_not_an_image.jpg")])) is None


def test_samples_folder_can_be_elsewhere_or_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("BCC_SAMPLES_DIR", str(tmp_path / "none"))
    assert sample_images(["basophil"]) == [] and sample_batch_paths() == []
    (tmp_path / "s" / "batch").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "s" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "s" / "samples.csv").write_text("file,class,source,original_file,changes\na.png,basophil,pbs5,x,\n"
                                                "gone.png,basophil,pbs5,y,\n")
    monkeypatch.setenv("BCC_SAMPLES_DIR", str(tmp_path / "s"))
    assert [s.path.name for s in sample_images(["basophil"])] == ["a.png"]  # listed but missing: left out


def test_the_sample_batch_screens_with_every_kind_of_row():
    """Screening the sample batch gives a row per file, in order; the file that is not an image is an error row."""
    from bcc_core.flags import Flag
    from bcc_core.inference import Prediction
    from bcc_core.samples import sample_batch_sources
    from bcc_core.screening import ScreeningConfig, screen

    class Stub:  # no model needed to check the sources: prepare as the card would, fixed prediction
        def prepare(self, img):
            return np.zeros((8, 8, 3), np.uint8), []

        def predict_inputs(self, x, q=None, bs=32):
            return [Prediction("basophil", 0.9, {"basophil": 0.9}, [Flag("low_confidence", "warning", "m", "d")], "review")
                    for _ in x]

    sources = sample_batch_sources()
    rows = screen(sources, Stub(), ScreeningConfig(batch_size=4, thumbnail=0))
    assert [r["file"] for r in rows] == [f"sample batch/{p.name}" for p in sample_batch_paths()]
    errors = [r["file"] for r in rows if r["status"] == "error"]
    assert errors == ["sample batch/zz_not_an_image.jpg"]
