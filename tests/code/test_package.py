"""The core is an installed package (make setup: pip install -e .): the CLI works from any folder."""

import subprocess
import sys


def test_cli_runs_from_any_folder(tmp_path):
    for cmd in ([sys.executable, "-m", "bcc_core", "--help"], [str((__import__("pathlib").Path(sys.executable)
                                                                    .parent / "bcc")), "--help"]):
        r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "adapt" in r.stdout and "audit" in r.stdout and "screen" in r.stdout


def test_package_data_ships_the_card_schema_and_migrations():
    from importlib.resources import files

    root = files("bcc_core")
    assert root.joinpath("model_card.schema.json").is_file()
    assert root.joinpath("migrations", "env.py").is_file()
    assert any(p.name.endswith(".py") for p in root.joinpath("migrations", "versions").iterdir())


def test_the_package_declares_the_runtime_pins_of_requirements_txt():
    """`pip install .` alone must give a working `bcc`: pyproject's dependencies are requirements.txt's
    runtime pins (everything above its `# tests` line), the same versions."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    runtime = []
    for line in (root / "requirements.txt").read_text().splitlines():
        if line.strip().startswith("# tests"):
            break
        if line.strip() and not line.lstrip().startswith("#"):
            runtime.append(line.strip())
    assert sorted(declared) == sorted(runtime)
    assert all("==" in d for d in declared)
