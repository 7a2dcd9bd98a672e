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
