"""The tamper-evident audit trail: every action is an entry chained by SHA-256 to the one before.

An entry records who did what to which row, with the row's content before and after as canonical JSON
(sorted keys, no spaces). Its hash is SHA-256 over the previous entry's hash and the entry's canonical
serialisation, so changing or deleting any entry breaks every later hash. Every write to a case,
result, decision or user row goes through `write()`, in one transaction with its trail entry; `verify()`
recomputes the chain and checks every row against the last entry that wrote it, so a row changed or
deleted behind the application's back (plain SQL, triggers dropped) is found and named too.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

from . import store

ENTITIES = {"case": store.cases, "result": store.results, "decision": store.decisions, "user": store.users}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def canonical(obj: Any) -> str:
    """The one serialisation every hash is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def entry_hash(prev_hash: str, entry: dict) -> str:
    body = {k: entry[k] for k in ("id", "at", "actor", "action", "entity", "entity_id", "before", "after")}
    return hashlib.sha256((prev_hash + canonical(body)).encode()).hexdigest()


def row_dict(row) -> dict:
    """A row as plain JSON-able values (booleans as bool, floats as repr-stable floats)."""
    return {k: (bool(v) if isinstance(v, bool) else v) for k, v in dict(row._mapping).items()}


def _lock_head(con) -> tuple[int, str]:
    con.execute(sa.update(store.trail_head).where(store.trail_head.c.id == 1)
                .values(writes=store.trail_head.c.writes + 1))
    head = con.execute(sa.select(store.trail_head).where(store.trail_head.c.id == 1)).one()
    return head.last_id, head.last_hash


def append(con, actor: str, action: str, entity: str, entity_id: int | None, before: dict | None,
           after: dict | None) -> dict:
    """Append one entry inside the caller's transaction (the chain head is locked first)."""
    last_id, last_hash = _lock_head(con)
    entry = {"id": last_id + 1, "at": now(), "actor": actor, "action": action, "entity": entity,
             "entity_id": entity_id, "before": None if before is None else canonical(before),
             "after": None if after is None else canonical(after)}
    entry["prev_hash"] = last_hash
    entry["hash"] = entry_hash(last_hash, entry)
    con.execute(sa.insert(store.trail).values(**entry))
    con.execute(sa.update(store.trail_head).where(store.trail_head.c.id == 1)
                .values(last_id=entry["id"], last_hash=entry["hash"]))
    return entry


def write(con, actor: str, action: str, entity: str, values: dict, row_id: int | None = None) -> int:
    """Insert (row_id None) or update one row of an entity table and record it in the trail, atomically.

    Returns:
        The row id.
    """
    table = ENTITIES[entity]
    _lock_head(con)   # lock before reading `before`, so no other writer changes the row in between
    if row_id is None:
        row_id = con.execute(sa.insert(table).values(**values).returning(table.c.id)).scalar_one()
        before = None
    else:
        before = row_dict(con.execute(sa.select(table).where(table.c.id == row_id)).one())
        con.execute(sa.update(table).where(table.c.id == row_id).values(**values))
    after = row_dict(con.execute(sa.select(table).where(table.c.id == row_id)).one())
    append(con, actor, action, entity, row_id, before, after)
    return row_id


def record(engine, actor: str, action: str, entity: str = "app", entity_id: int | None = None,
           details: dict | None = None) -> dict:
    """An action that changes no row (a view, an export, a login) as its own entry. `entity` names what
    it concerns ("login", "export", "case_view"…), never a row table: those are written by `write()`."""
    if entity in ENTITIES:
        raise ValueError(f"{entity!r} rows are written with trail.write(), which records their content")
    with engine.begin() as con:
        return append(con, actor, action, entity, entity_id, None, details)


def verify(engine) -> dict:
    """Recompute the chain and check every row against the trail.

    Returns:
        {"ok": bool, "entries": n, "problems": [{"entry" | "entity"…, "what"}], "first_broken": entry id or
        None}. Problems name the first broken entry and every row whose content no entry explains.
    """
    problems: list[dict] = []
    latest: dict[tuple[str, int], str | None] = {}
    with engine.connect() as con:
        prev, expected_id, first_broken = store.GENESIS, 1, None
        n = 0
        for e in con.execute(sa.select(store.trail).order_by(store.trail.c.id)):
            d = dict(e._mapping)
            n += 1
            if d["id"] != expected_id:
                problems.append({"entry": expected_id, "what": f"entry {expected_id} is missing (next is {d['id']})"})
                first_broken = first_broken or expected_id
            if d["prev_hash"] != prev:
                problems.append({"entry": d["id"], "what": "does not continue the chain (previous hash differs)"})
                first_broken = first_broken or d["id"]
            if entry_hash(d["prev_hash"], d) != d["hash"]:
                problems.append({"entry": d["id"], "what": "content does not match its hash (entry changed)"})
                first_broken = first_broken or d["id"]
            prev, expected_id = d["hash"], d["id"] + 1
            if d["entity"] in ENTITIES and d["entity_id"] is not None:
                latest[(d["entity"], d["entity_id"])] = d["after"]
        head = con.execute(sa.select(store.trail_head)).one()
        if head.last_id != n or head.last_hash != prev:
            problems.append({"entry": head.last_id, "what": "the chain's recorded end differs from its last entry "
                                                            "(entries removed from the end, or added outside the app)"})
            first_broken = first_broken or min(head.last_id, n) + 1
        for entity, table in ENTITIES.items():
            seen = set()
            for row in con.execute(sa.select(table)):
                r = row_dict(row)
                seen.add(r["id"])
                key = (entity, r["id"])
                if key not in latest:
                    problems.append({"entity": entity, "id": r["id"], "what": "row not recorded in the trail"})
                elif latest[key] != canonical(r):
                    problems.append({"entity": entity, "id": r["id"],
                                     "what": "row differs from the last trail entry that wrote it (changed)"})
            for (ent, rid), after in latest.items():
                if ent == entity and rid not in seen and after is not None:
                    problems.append({"entity": entity, "id": rid, "what": "row recorded in the trail is missing (deleted)"})
    return {"ok": not problems, "entries": n, "problems": problems, "first_broken": first_broken}
