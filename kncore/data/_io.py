"""Reading the data files: JSON Lines and JSON lists, with errors that name
the file and the line (or list index) of a malformed record."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError


class DataError(InputError):
    """A data file or one of its records is malformed. ``path`` and ``where``
    (``"line 12"`` or ``"record 3"``) say which."""

    def __init__(self, path, where: str | None, problem: str):
        self.path = str(path)
        self.where = where
        self.problem = problem
        loc = f"{self.path}, {where}" if where else self.path
        super().__init__(f"{loc}: {problem}")


def default_data_dir() -> Path:
    """Where the data sets live: ``$KNCORE_DATA``, else ``../shared/data``
    beside the repository checkout."""
    env = os.environ.get("KNCORE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def resolve(path, default_rel: str, data_dir=None) -> Path:
    """A file path: ``path`` if given, else ``data_dir / default_rel``."""
    if path is not None:
        p = Path(path)
    else:
        p = Path(data_dir if data_dir is not None else default_data_dir()) / default_rel
    if not p.exists():
        hint = "" if path is not None else " (set KNCORE_DATA or pass data_dir=)"
        raise DataError(p, None, f"no such file{hint}")
    return p


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line (1-based)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"line {n}", f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(path, f"line {n}", f"expected a JSON object, got {type(rec).__name__}")
            yield n, rec


def read_json_list(path) -> list[dict]:
    """A JSON file holding a list of objects."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(path, None, f"expected a JSON list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(path, f"record {i}", f"expected a JSON object, got {type(rec).__name__}")
    return data


_TYPES = {str: "a string", int: "an integer", bool: "true/false", list: "a list", dict: "an object"}


def field(rec: dict, key: str, typ, path, where: str, *, optional: bool = False, default: Any = None):
    """``rec[key]`` checked against ``typ``; a missing or mistyped field is a
    :class:`DataError` naming the file, the record and the field."""
    if key not in rec or rec[key] is None:
        if optional:
            return default
        raise DataError(path, where, f"missing field {key!r}")
    v = rec[key]
    ok = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
    if not ok:
        want = _TYPES.get(typ, getattr(typ, "__name__", str(typ)))
        raise DataError(path, where, f"field {key!r} should be {want}, got {type(v).__name__} {v!r:.60}")
    return v


def str_list(rec: dict, key: str, path, where: str, *, optional: bool = False) -> list[str]:
    """A field holding a list of strings (a lone string is accepted as a list of one)."""
    v = rec.get(key)
    if v is None:
        if optional:
            return []
        raise DataError(path, where, f"missing field {key!r}")
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise DataError(path, where, f"field {key!r} should be a list of strings, got {v!r:.60}")
    return list(v)
