"""Database fixtures: a throw-away SQLite file, and a real PostgreSQL server started for the test run
from Debian's `postgresql` binaries (skipped, with the reason, where they are not installed)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest


def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(found[-1]) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """postgresql+psycopg URL of a fresh server on a free local port (stopped at the end)."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql; .ci/run does)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: use the package's system user
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a 'postgres' system user to start the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = tempfile.mkdtemp(prefix="bcc-pg-")
    os.chmod(base, 0o777)
    data, port = os.path.join(base, "data"), _free_port()
    run = lambda *cmd: subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True)  # noqa: E731
    run(f"{bindir}/initdb", "-D", data, "-U", "bcc", "--auth=trust", "-E", "UTF8")
    run(f"{bindir}/pg_ctl", "-D", data, "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "-l",
        os.path.join(base, "log"), "-w", "start")
    try:
        for _ in range(50):
            if subprocess.run([f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(port)]).returncode == 0:
                break
            time.sleep(0.2)
        run(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "bcc", "bcc_test")
        yield f"postgresql+psycopg://bcc@127.0.0.1:{port}/bcc_test"
    finally:
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
