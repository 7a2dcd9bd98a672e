"""screen --shard i/n + merge, and screen --ray on a local Ray instance, give exactly the single-process CSV."""

import cv2
import pytest

from conftest import require_model, synthetic_cell

from bcc_core.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i in range(21):
        cv2.imwrite(str(d / f"c{i:02d}.png"), synthetic_cell(180, 24 + i, seed=i, lobes=1 + i % 3)[..., ::-1])
    (d / "c05_broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    return d


@pytest.fixture(scope="module")
def single(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "r.csv"
    assert main(["screen", str(images), "--model", str(require_model()), "--out", str(out), "--quiet",
                 "--batch-size", "4"]) == 0
    return out


def test_shards_merged_equal_the_single_process_run(images, single, tmp_path):
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i}.csv"
        assert main(["screen", str(images), "--model", str(require_model()), "--out", str(p), "--quiet",
                     "--batch-size", "4", "--shard", f"{i}/3"]) == 0
        parts.append(str(p))
    assert main(["merge", *parts[::-1], "--out", str(tmp_path / "all.csv")]) == 0
    assert (tmp_path / "all.csv").read_bytes() == single.read_bytes()
    assert len(single.read_text().splitlines()) == 23
    assert main(["merge", parts[0], parts[2], "--out", str(tmp_path / "x.csv")]) == 2


# Ray Data's DataContext reads its own deprecated options when it starts (third party; we set none of them).
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
def test_ray_run_equals_the_single_process_run(images, single, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        out = tmp_path / "ray.csv"
        assert main(["screen", str(images), "--model", str(require_model()), "--out", str(out), "--quiet",
                     "--batch-size", "4", "--ray"]) == 0
    finally:
        ray.shutdown()
    assert out.read_bytes() == single.read_bytes()
