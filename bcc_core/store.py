"""The database behind cases, users and the audit trail (SQLAlchemy Core).

SQLite is the embedded default: a file `bcc.sqlite` in the data folder `$BCC_DATA_DIR` (default
`~/.bcc`), created on first use. A lab with several workstations points `$BCC_DATABASE_URL` at
PostgreSQL (`postgresql+psycopg://user:pass@host/db`). The schema is versioned by Alembic migrations
(`bcc_core/migrations`); `open_store()` brings a database to the latest version before it is used.

Nothing happens at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa

metadata = sa.MetaData()

ROLES = ("viewer", "reviewer", "signer", "admin")
CASE_STATUSES = ("running", "incomplete", "complete", "signed")

users = sa.Table(
    "users", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(120), nullable=False, unique=True),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("role", sa.String(20), nullable=False),
    sa.Column("active", sa.Boolean, nullable=False, default=True),
    sa.Column("created_at", sa.String(40), nullable=False),
)

cases = sa.Table(
    "cases", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("uid", sa.String(36), nullable=False, unique=True),
    sa.Column("sample_label", sa.String(200), nullable=False),
    sa.Column("created_by", sa.String(120), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("model_id", sa.String(200), nullable=False),
    sa.Column("model_sha256", sa.String(64), nullable=False),
    sa.Column("n_inputs", sa.Integer, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("signed_by", sa.String(120)),
    sa.Column("signed_at", sa.String(40)),
    sa.Column("model_version", sa.String(40)),             # the card's creation stamp (migration 0002)
)

results = sa.Table(
    "results", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("name", sa.Text, nullable=False),            # relative to the case, never a server path
    sa.Column("image_sha256", sa.String(64)),
    sa.Column("status", sa.String(10), nullable=False),
    sa.Column("predicted_class", sa.String(120)),
    sa.Column("confidence", sa.Float),
    sa.Column("flags", sa.Text, nullable=False),           # JSON list of flag dicts
    sa.Column("probabilities", sa.Text),                   # JSON {class: p}
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("thumb_sha256", sa.String(64)),              # the cell's PNG thumbnail in cell_images (0002)
    sa.UniqueConstraint("case_id", "seq", name="uq_results_case_seq"),
)

decisions = sa.Table(
    "decisions", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), nullable=False),
    sa.Column("result_id", sa.Integer, sa.ForeignKey("results.id"), nullable=False),
    sa.Column("actor", sa.String(120), nullable=False),
    sa.Column("decided_at", sa.String(40), nullable=False),
    sa.Column("decision", sa.String(20), nullable=False),  # confirm | correct | reject_image
    sa.Column("final_class", sa.String(120)),
    sa.Column("comment", sa.Text, nullable=False),
    sa.Column("amendment", sa.Boolean, nullable=False),    # made after sign-off
)

trail = sa.Table(
    "trail", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("actor", sa.String(120), nullable=False),
    sa.Column("action", sa.String(40), nullable=False),
    sa.Column("entity", sa.String(40), nullable=False),
    sa.Column("entity_id", sa.Integer),
    sa.Column("before", sa.Text),                          # canonical JSON of the row before, or null
    sa.Column("after", sa.Text),                           # canonical JSON of the row after, or null
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

# One row: the end of the chain. Every transaction that appends to the trail first UPDATEs it, which
# takes the write lock on SQLite and the row lock on PostgreSQL, so two processes never fork the chain.
trail_head = sa.Table(
    "trail_head", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("last_id", sa.Integer, nullable=False),
    sa.Column("last_hash", sa.String(64), nullable=False),
    sa.Column("writes", sa.Integer, nullable=False),
)

# Content-addressed cell images: thumbnails (PNG, at most 96 px; shown when a case is reopened and printed in
# its report) and the original files of flagged cells (under their image_sha256; the column is named `png`
# but holds the original's bytes). Not trail rows: each result row records the SHA-256s, which the trail
# covers, and bytes are used only while they still hash to that value.
cell_images = sa.Table(
    "cell_images", metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("png", sa.LargeBinary, nullable=False),
)

GENESIS = "0" * 64


def database_url(url: str | None = None) -> str:
    """`url`, else `$BCC_DATABASE_URL`, else SQLite in `$BCC_DATA_DIR` (default ~/.bcc), created on use.

    A plain file path is accepted as SQLite.
    """
    url = url or os.environ.get("BCC_DATABASE_URL")
    if url and "://" in url:
        return url
    if url:
        path = Path(url).expanduser()
    else:
        path = Path(os.environ.get("BCC_DATA_DIR") or "~/.bcc").expanduser() / "bcc.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _sqlite_pragmas(dbapi_con, _):
    cur = dbapi_con.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def open_store(url: str | None = None) -> sa.Engine:
    """An engine on the database, migrated to the latest schema (Alembic `upgrade head`)."""
    engine = sa.create_engine(database_url(url), future=True)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    migrate(engine)
    return engine


def migrate(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` with the migrations in bcc_core/migrations."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    with engine.begin() as con:
        cfg.attributes["connection"] = con
        command.upgrade(cfg, revision)
