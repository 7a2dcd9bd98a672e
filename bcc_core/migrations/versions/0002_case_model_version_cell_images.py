"""Cases record the model's version; results keep a small image of their cell for review and reports.

`cases.model_version` is the model card's creation stamp (with the id and the weights SHA-256 it says
exactly which model made every result). `results.thumb_sha256` is the SHA-256 of the cell's PNG
thumbnail kept in `cell_images` (content-addressed: the trail covers the hash in the result row, so a
swapped image is detected when it is shown).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases") as b:
        b.add_column(sa.Column("model_version", sa.String(40)))
    with op.batch_alter_table("results") as b:
        b.add_column(sa.Column("thumb_sha256", sa.String(64)))
    op.create_table(
        "cell_images",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("png", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("cell_images")
    with op.batch_alter_table("results") as b:
        b.drop_column("thumb_sha256")
    with op.batch_alter_table("cases") as b:
        b.drop_column("model_version")
