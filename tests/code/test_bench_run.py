"""`make bench` as one run: an interrupted full run continues only while the code is that run's (commits that
land only bench outputs between its parts are allowed), never from a tree with uncommitted changes, and its
record lists the steps it finished."""

import importlib.util
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def run_all(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "WORK", tmp_path)
    monkeypatch.setattr(mod, "RUN_RECORD", tmp_path / "bench_run.json")
    return mod


def test_resume_continues_the_same_commit_only(run_all):
    now = datetime(2026, 12, 2, 8, 0, tzinfo=timezone.utc)
    rec = run_all._run_record("abc1234", now, resume=False)
    assert rec == {"commit": "abc1234", "started": now.isoformat(), "resumed": 0, "done": {}}
    rec["done"]["evaluate"] = "2026-12-02 08:00 UTC"
    run_all.RUN_RECORD.write_text(json.dumps(rec))
    later = datetime(2026, 12, 3, 9, 0, tzinfo=timezone.utc)
    again = run_all._run_record("abc1234", later, resume=True)
    assert again["done"] == {"evaluate": "2026-12-02 08:00 UTC"} and again["resumed"] == 1
    assert again["started"] == now.isoformat()  # the run began when its first part began
    other = run_all._run_record("def5678", later, resume=True)  # another commit: a new run
    assert other["done"] == {} and other["started"] == later.isoformat()
    assert json.loads(run_all.RUN_RECORD.read_text())["commit"] == "def5678"


def test_uncommitted_changes_never_resume_and_leave_no_record(run_all):
    now = datetime(2026, 12, 2, 8, 0, tzinfo=timezone.utc)
    run_all._run_record("abc1234", now, resume=False)
    dirty = run_all._run_record("abc1234 with uncommitted changes", now, resume=True)
    assert dirty["done"] == {} and json.loads(run_all.RUN_RECORD.read_text())["commit"] == "abc1234"


@pytest.fixture()
def repo(run_all, tmp_path, monkeypatch):
    """A throwaway git repository (one committed code file and bench/results/step_x.md) as the bench's ROOT;
    returns (path, git command prefix)."""
    import subprocess

    repo = tmp_path / "repo"
    (repo / "bench" / "results").mkdir(parents=True)
    (repo / "bench" / "results" / "step_x.md").write_text("old\n")
    (repo / "code.py").write_text("x = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git[:5] + ["init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "code"], check=True)
    monkeypatch.setattr(run_all, "ROOT", repo)
    monkeypatch.setattr(run_all, "RUN_RECORD", repo / "bench" / "results" / "bench_run.json")
    return repo, git


def test_the_benchs_own_outputs_do_not_make_the_tree_dirty(run_all, repo):
    repo, _ = repo
    (repo / "bench" / "results" / "step_x.md").write_text("new section\n")  # a finished step
    assert "uncommitted" not in run_all._commit()
    (repo / "code.py").write_text("x = 2\n")
    assert run_all._commit().endswith("with uncommitted changes")


def test_a_commit_that_only_lands_bench_outputs_keeps_the_run(run_all, repo):
    """A run outlasts a working session: landing its finished part (outputs only) must not end it, while a code
    change must."""
    import subprocess

    repo, git = repo
    first = run_all._commit()
    rec = run_all._run_record(first, datetime(2026, 12, 2, 8, 0, tzinfo=timezone.utc), resume=False)
    rec["done"]["evaluate"] = "2026-12-02 08:00 UTC"
    run_all.RUN_RECORD.write_text(json.dumps(rec))
    (repo / "bench" / "results" / "step_evaluate.md").write_text("section\n")
    (repo / "bench" / "RESULTS.md").write_text("partial\n")
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "land the finished part"], check=True)
    later = datetime(2026, 12, 3, 9, 0, tzinfo=timezone.utc)
    again = run_all._run_record(run_all._commit(), later, resume=True)
    assert again["commit"] == first and again["done"] == {"evaluate": "2026-12-02 08:00 UTC"}
    (repo / "code.py").write_text("x = 2\n")
    subprocess.run(git + ["commit", "-qam", "change the code"], check=True)
    fresh = run_all._run_record(run_all._commit(), later, resume=True)
    assert fresh["done"] == {} and fresh["commit"] != first


def test_the_backbone_table_says_when_it_ranks_nothing(run_all, tmp_path):
    head = "model,weights,accuracy,kappa\n"
    at_chance = tmp_path / "chance.csv"
    at_chance.write_text(head + "a,none,0.25,0.0\nb,none,0.25,0.01\n")
    assert "ranks nothing" in run_all._chance_note(at_chance)
    mixed = tmp_path / "mixed.csv"
    mixed.write_text(head + "a,none,0.25,0.0\nb,none,0.71,0.6\n")
    assert run_all._chance_note(mixed).startswith("At chance (kappa ~0) at this budget: a;")
    learned = tmp_path / "learned.csv"
    learned.write_text(head + "a,none,0.8,0.7\n")
    assert "above chance" in run_all._chance_note(learned)


def test_refresh_puts_a_rerun_section_in_place_and_names_it_with_what_changed_under_models(run_all, repo, monkeypatch):
    """`--only adapt --refresh`: RESULTS.md is the full run's sections with the re-run one in its place, and the
    header says which section came later, at which commit, and what under models/ differs since the full run."""
    import subprocess

    repo, git = repo
    res = repo / "bench" / "results"
    monkeypatch.setattr(run_all, "RES", res)
    monkeypatch.setattr(run_all, "STEPS", {"x": None, "y": None})
    (repo / "models").mkdir()
    (repo / "models" / "bank.npz").write_text("v1")
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "model"], check=True)
    full = run_all._commit()

    def step(name, title, commit):  # as run_all writes a step file
        when = datetime(2026, 12, 3, 17, 59, tzinfo=timezone.utc)
        return f"# {title}\n\n{run_all._stamp(name, when, 60.0, commit)}\nbody {name}\n"

    for n in ("x", "y"):
        (res / f"step_{n}.md").write_text(step(n, n.upper(), full))
    head = (f"One run of `bench/run_all.py` (`make bench`) on a 2-core CPU at commit {full}, from 2026-12-03 08:22 to "
            f"2026-12-03 18:36 UTC. {run_all.ONE_RUN}; each says when and how long it took.")
    whole = run_all.refresh_results(head, full)
    assert run_all._full_run_header(whole) == (head, full)
    assert "re-run" not in whole and whole.index("## X") < whole.index("## Y")  # nothing re-run: the full run as it was

    (repo / "models" / "bank.npz").write_text("v2")
    subprocess.run(git + ["commit", "-qam", "bank rebuilt"], check=True)
    later = run_all._commit()
    (res / "step_y.md").write_text(step("y", "Y again", later))
    rebuilt = run_all.refresh_results(*run_all._full_run_header(whole))
    assert "Every other section below was generated in that run" in rebuilt
    assert f"- `y`: re-run 2026-12-03 17:59 UTC at commit {later}" in rebuilt
    assert "under models/ since " + full + ": models/bank.npz." in rebuilt
    assert "## Y again" in rebuilt and "## X" in rebuilt and "`x`: re-run" not in rebuilt
    with pytest.raises(ValueError, match="full run"):
        run_all._full_run_header("# Benchmark results\n\nsomething else\n")


def test_refresh_is_refused_from_a_dirty_tree_before_anything_runs(run_all, repo, tmp_path, capsys):
    repo, _ = repo
    (repo / "code.py").write_text("x = 2\n")
    assert run_all.main(["--only", "adapt", "--refresh", "--data", str(tmp_path)]) == 2
    assert "clean tree" in capsys.readouterr().out


def test_refresh_without_a_full_runs_results_is_refused_before_anything_runs(run_all, repo, tmp_path, capsys,
                                                                            monkeypatch):
    repo, _ = repo
    ran = []
    monkeypatch.setattr(run_all, "STEPS", {"x": lambda data: ran.append(data) or ["# X"], "y": None})
    assert run_all.main(["--only", "x", "--refresh", "--data", str(tmp_path)]) == 2  # no RESULTS.md at all
    assert "make bench" in capsys.readouterr().out and not ran


def test_a_partial_run_leaves_the_full_runs_record_alone(run_all, repo, monkeypatch, tmp_path):
    repo, _ = repo
    res = repo / "bench" / "results"
    monkeypatch.setattr(run_all, "RES", res)
    monkeypatch.setattr(run_all, "STEPS", {"x": lambda data: ["# X", "body"], "y": lambda data: ["# Y", "body"]})
    record = {"commit": "abc1234", "started": "2026-12-02T08:00:00+00:00", "resumed": 0, "done": {"y": "earlier"}}
    run_all.RUN_RECORD.write_text(json.dumps(record))
    assert run_all.main(["--only", "x", "--data", str(tmp_path)]) == 0
    assert (res / "step_x.md").read_text().startswith("# X\n\n_Section `x`: generated")
    assert json.loads(run_all.RUN_RECORD.read_text()) == record
