"""Record the SHA-256 of model.keras in the card of models saved before save_model did it (run once).

    .venv/bin/python scripts/add_model_hashes.py models/pbs5-mobilenetv2 models/all4-mobilenetv2

A card that already records a hash is left alone (load_model checks it); nothing is retrained and no other
key of the card changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bcc_core.models import HASH_KEY, file_sha256  # noqa: E402


def add_hash(model_dir: Path) -> str:
    card_path = model_dir / "model_card.json"
    text = card_path.read_text()
    card = json.loads(text)
    if card.get(HASH_KEY):
        return f"{model_dir}: already records {HASH_KEY}, left alone"
    card[HASH_KEY] = file_sha256(model_dir / "model.keras")
    card_path.write_text(json.dumps(card, indent=2) + ("\n" if text.endswith("\n") else ""))
    return f"{model_dir}: {HASH_KEY} = {card[HASH_KEY]}"


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        print(add_hash(Path(arg)))
