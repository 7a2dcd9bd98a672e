"""Background screening jobs: a batch screened into its case by a thread of the server process, so that the run
outlives the page run that started it (a widget click reruns a Streamlit script; a closed tab ends its session).

A job is keyed by its store and case id; at most one runs per case (a second start is refused). Every row is
stored in the case as it arrives (bcc_core.cases), errors of single images are error rows (bcc_core.screening),
and an exception that ends the run is recorded on the job; the case is then finished (complete, or incomplete
and resumable). Progress is read from the store: rows stored over the case's inputs. Nothing here imports
Streamlit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

__all__ = ["Job", "JobRefused", "get", "latest", "progress", "start", "wait_all"]


class JobRefused(RuntimeError):
    """A job was asked for a case that is being screened already."""


@dataclass(eq=False)
class Job:
    """One screening run into a case.

    Attributes:
        case_id: The case the rows go to.
        username: Who started it (rows and the case's finish are recorded as this user).
        sources: The run's inputs (`bcc_core.io.ImageSource`, input order = the case's seq); kept so that a
            page opened later can show the cells. Their `load()` must not depend on a page session.
        todo: The input positions this job screens (a resumed case skips the ones already stored).
        model_dir: The model folder it screens with (for the page; None if unknown).
        state: "running", "done" (every todo screened) or "failed" (see `error`).
        done: Rows this job has stored so far.
        status: The case's status once the job ended ("complete" or "incomplete").
        error: Why the run stopped early ("ExceptionType: message"), else None.
    """

    store: str
    case_id: int
    username: str
    sources: list
    todo: tuple[int, ...]
    model_dir: str | None = None
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    state: str = "running"
    done: int = 0
    status: str | None = None
    error: str | None = None
    _ended: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def running(self) -> bool:
        return not self._ended.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has ended (True) or `timeout` seconds passed (False)."""
        return self._ended.wait(timeout)


_lock = threading.Lock()
_jobs: dict[tuple[str, int], Job] = {}


def _store_key(engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def start(engine, user, case_id: int, sources, predictor, todo=None, model_dir: str | None = None,
          cfg=None) -> Job:
    """Screen `sources` into case `case_id` in a background thread and return its job at once.

    Args:
        engine: The store (bcc_core.store.open_store).
        user: The bcc_core.users.User the rows are recorded as (needs "screen").
        case_id: A running or incomplete case.
        sources: `ImageSource` items of the whole case, in input order (their bytes must outlive the caller:
            copy uploads first).
        predictor: A loaded Predictor (shared, never mutated).
        todo: Input positions to screen (default: all).
        model_dir: Recorded on the job for whoever shows it.
        cfg: bcc_core.screening.ScreeningConfig (default settings if None).

    Raises:
        JobRefused: the case is being screened by a job that has not ended.
    """
    user.require("screen")
    sources = list(sources)
    todo = tuple(range(len(sources))) if todo is None else tuple(int(k) for k in todo)
    key = (_store_key(engine), int(case_id))
    with _lock:
        old = _jobs.get(key)
        if old is not None and old.running:
            raise JobRefused(f"case #{case_id} is being screened already ({old.done} of {len(old.todo)} image(s) "
                             f"done, started by {old.username})")
        # A user's ended jobs are let go (and their inputs with them) when that user starts another.
        for k, j in list(_jobs.items()):
            if k[0] == key[0] and j.username == user.username and not j.running:
                del _jobs[k]
        job = Job(key[0], int(case_id), user.username, sources, todo, model_dir)
        _jobs[key] = job
        threading.Thread(target=_run, args=(job, engine, user, predictor, cfg), daemon=True,
                         name=f"bcc-screen-case-{case_id}").start()
    return job


def _run(job: Job, engine, user, predictor, cfg) -> None:
    from . import cases
    from .screening import ScreeningConfig, iter_screen

    rows = iter_screen([job.sources[k] for k in job.todo], predictor, cfg or ScreeningConfig())
    try:
        for seq, row in zip(job.todo, rows):
            # Stored first: a crash or a stopped server keeps every row screened so far ("incomplete" case).
            cases.add_result(engine, user, job.case_id, seq, row)
            if row["status"] == "review":   # kept so that the reopened case shows what the model saw
                try:
                    cases.keep_image(engine, job.sources[seq].load())
                except OSError:
                    pass
            job.done += 1
    except Exception as e:  # recorded on the job: nobody is there to catch it
        job.error = f"{type(e).__name__}: {e}"
    finally:
        rows.close()
        try:
            job.status = cases.finish(engine, user, job.case_id)
        except Exception as e:
            job.error = job.error or f"{type(e).__name__}: {e}"
        job.state = "failed" if job.error else "done"
        job.ended_at = time.time()
        job._ended.set()


def get(engine, case_id: int) -> Job | None:
    """The latest job of a case in this process (running or ended), or None."""
    with _lock:
        return _jobs.get((_store_key(engine), int(case_id)))


def latest(engine, username: str) -> Job | None:
    """The job a user started last in this process (running or ended), or None."""
    store = _store_key(engine)
    with _lock:
        mine = [j for k, j in _jobs.items() if k[0] == store and j.username == username]
    return max(mine, key=lambda j: j.started_at, default=None)


def progress(engine, case_id: int) -> tuple[int, int]:
    """(rows stored, inputs) of a case, read from the store (true whichever process screens it)."""
    import sqlalchemy as sa

    from . import store

    with engine.connect() as con:
        n = con.execute(sa.select(store.cases.c.n_inputs).where(store.cases.c.id == case_id)).scalar_one()
        stored = con.execute(sa.select(sa.func.count()).select_from(store.results)
                             .where(store.results.c.case_id == case_id)).scalar_one()
    return int(stored), int(n)


def wait_all(timeout: float | None = None) -> bool:
    """Block until every job of this process has ended (True), or `timeout` seconds passed (False)."""
    end = None if timeout is None else time.monotonic() + timeout
    with _lock:
        jobs = list(_jobs.values())
    for j in jobs:
        if not j.wait(None if end is None else max(0.0, end - time.monotonic())):
            return False
    return True
