"""train() on two synthetic sources: class map, skipped folders, groups.csv, per-source metrics, card sources.

MobileNetV2 with random weights saved to a file (no download, no ../shared): checks the contract, not accuracy.
"""

import csv
import json
from pathlib import Path

import cv2
import pytest

from conftest import synthetic_cell

pytestmark = pytest.mark.slow


def _source(root: Path, folders: dict, seed0: int, copies: int = 1):
    rows = [("file", "cell_group")]
    k = seed0
    for name, lobes in folders.items():
        (root / name).mkdir(parents=True)
        for i in range(8):
            base = synthetic_cell(200, 30 + 2 * (i % 5), seed=k, lobes=lobes)
            k += 1
            for j in range(copies):  # shifted copies of one cell, as in LISC
                img = cv2.warpAffine(base, cv2.getRotationMatrix2D((100, 100), 0, 1.0) + [[0, 0, 7 * j], [0, 0, 5 * j]],
                                     (200, 200), borderMode=cv2.BORDER_REFLECT)
                f = f"{name}/{name}_{i}_{j}.png"
                cv2.imwrite(str(root / f), img[..., ::-1])
                rows.append((f, f"{name}_{i}"))
    if copies > 1:
        with (root / "groups.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows(rows)


def test_two_sources_train_and_card(tmp_path):
    import keras

    from bcc_core.backbones import get_spec
    from bcc_core.model_card import load_card
    from bcc_core.training import TrainConfig, train

    _source(tmp_path / "labA", {"mono": 1, "bilobed": 2, "trilobed": 3}, seed0=0)
    _source(tmp_path / "labB", {"mono": 1, "three": 3, "other": 2}, seed0=500, copies=3)
    inp = keras.Input((224, 224, 3))
    wfile = tmp_path / "random.weights.h5"
    get_spec("mobilenetv2").build(inp, None).save_weights(wfile)
    # Eight cells per class and source: parts of 15% each so every calibration part gets cells of each stratum.
    cfg = TrainConfig(task="synthetic2", weights=str(wfile), epochs=1, aug_views=1, batch_size=8,
                      classes=("bilobed", "mono", "trilobed"), class_map={"three": "trilobed"},
                      fractions=(0.4, 0.15, 0.15, 0.15, 0.15))
    m = train([str(tmp_path / "labA"), f"B={tmp_path / 'labB'}"], tmp_path / "model", cfg, progress=False)

    card = load_card(tmp_path / "model")  # validates against the schema
    assert card.classes == ["bilobed", "mono", "trilobed"]
    src = {s["name"]: s for s in card.data["sources"]}
    assert set(src) == {"labA", "B"}
    assert src["B"]["skipped_folders"] == ["other"] and src["B"]["class_counts"] == {"mono": 24, "trilobed": 24}
    assert card.data["class_counts"] == {"bilobed": 8, "mono": 32, "trilobed": 32}
    assert set(m["test_per_source"]) == {"labA", "B"} and set(card.metrics["per_source"]) == {"labA", "B"}
    assert card.split["stratified_by"] == "class x source"

    split = json.loads((tmp_path / "model" / "split.json").read_text())
    side = {}
    for part, rows in split["splits"].items():
        for rel, _, _ in rows:
            if rel.startswith("labB/"):
                cell = rel.rsplit("_", 1)[0]
                assert side.setdefault(cell, part) == part, f"copies of {cell} on two sides"
    assert len(side) == 16  # every B cell listed, each on one side
    # Every class of every source reaches the test split.
    tests = {(r[0].split("/")[0], split["classes"][r[1]]) for r in split["splits"]["test"]}
    assert tests == {("labA", "bilobed"), ("labA", "mono"), ("labA", "trilobed"), ("labB", "mono"), ("labB", "trilobed")}
