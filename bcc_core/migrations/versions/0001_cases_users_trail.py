"""Cases, results, decisions, users and the hash-chained audit trail.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("username", sa.String(120), nullable=False, unique=True),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
    )
    op.create_table(
        "cases",
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
    )
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("image_sha256", sa.String(64)),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("predicted_class", sa.String(120)),
        sa.Column("confidence", sa.Float),
        sa.Column("flags", sa.Text, nullable=False),
        sa.Column("probabilities", sa.Text),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.UniqueConstraint("case_id", "seq", name="uq_results_case_seq"),
    )
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), nullable=False),
        sa.Column("result_id", sa.Integer, sa.ForeignKey("results.id"), nullable=False),
        sa.Column("actor", sa.String(120), nullable=False),
        sa.Column("decided_at", sa.String(40), nullable=False),
        sa.Column("decision", sa.String(20), nullable=False),
        sa.Column("final_class", sa.String(120)),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("amendment", sa.Boolean, nullable=False),
    )
    op.create_index("ix_decisions_result", "decisions", ["result_id", "id"])
    op.create_table(
        "trail",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("at", sa.String(40), nullable=False),
        sa.Column("actor", sa.String(120), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("entity", sa.String(40), nullable=False),
        sa.Column("entity_id", sa.Integer),
        sa.Column("before", sa.Text),
        sa.Column("after", sa.Text),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_trail_entity", "trail", ["entity", "entity_id", "id"])
    op.create_table(
        "trail_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("last_id", sa.Integer, nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
        sa.Column("writes", sa.Integer, nullable=False),
    )
    op.bulk_insert(sa.table("trail_head", sa.column("id", sa.Integer), sa.column("last_id", sa.Integer),
                            sa.column("last_hash", sa.String), sa.column("writes", sa.Integer)),
                   [{"id": 1, "last_id": 0, "last_hash": "0" * 64, "writes": 0}])


def downgrade() -> None:
    for t in ("trail_head", "trail", "decisions", "results", "cases", "users"):
        op.drop_table(t)
