"""How every bench script leaves its result: the Markdown section and its JSON beside it."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out, lines: list[str], result, indent: int = 2, echo: bool = True) -> None:
    """Write `lines` to `out` (Markdown) and `result` to `out` with a .json suffix; print the lines."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=indent))
    if echo:
        print("\n".join(lines))
