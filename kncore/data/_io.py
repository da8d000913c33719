"""Reading the data files: JSON Lines and JSON lists, with errors that name
the file and the line (or list index) of a malformed record."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

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


def json_lines(path, bad_line: Callable[[int, json.JSONDecodeError], Exception]) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, value)`` for each non-blank line of a JSON Lines
    file (1-based). A line that is not JSON raises ``bad_line(n, error)``: the
    caller's exception, in its own words. The one JSON Lines parser of kncore."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise bad_line(n, e) from None
            yield n, value


def json_file(path, bad_json: Callable[[ValueError], Exception]) -> Any:
    """The value a JSON file holds. A file that is not JSON (or not UTF-8)
    raises ``bad_json(error)``: the caller's exception, in its own words."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise bad_json(e) from None


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line (1-based)."""
    path = Path(path)
    bad = lambda n, e: DataError(path, f"line {n}", f"invalid JSON ({e.msg} at column {e.colno})")  # noqa: E731
    for n, rec in json_lines(path, bad):
        if not isinstance(rec, dict):
            raise DataError(path, f"line {n}", f"expected a JSON object, got {type(rec).__name__}")
        yield n, rec


def _not_json(path: Path, e: ValueError) -> DataError:
    if isinstance(e, json.JSONDecodeError):
        return DataError(path, f"line {e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})")
    return DataError(path, None, f"not UTF-8 text ({e})")


def read_json_list(path) -> list[dict]:
    """A JSON file holding a list of objects."""
    path = Path(path)
    data = json_file(path, lambda e: _not_json(path, e))
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


class Fields:
    """One record of a data file and where it stands (``n``: its line number
    or list index; ``where``: ``"line 12"`` or ``"record 3"``; ``source``:
    ``"file.jsonl:12"`` or ``"file.json[3]"``), read field by field with
    :func:`field` and :func:`str_list`'s checks."""

    __slots__ = ("rec", "path", "n", "where", "source")

    def __init__(self, rec: dict, path: Path, n: int, where: str, source: str):
        self.rec, self.path, self.n, self.where, self.source = rec, path, n, where, source

    def __call__(self, key: str, typ=str, *, optional: bool = False, default: Any = None):
        return field(self.rec, key, typ, self.path, self.where, optional=optional, default=default)

    def strs(self, key: str, *, optional: bool = False) -> list[str]:
        return str_list(self.rec, key, self.path, self.where, optional=optional)

    def error(self, problem: str) -> DataError:
        return DataError(self.path, self.where, problem)


def jsonl_fields(path) -> Iterator[Fields]:
    """The records of a JSON Lines file, as :class:`Fields`."""
    path = Path(path)
    for n, rec in read_jsonl(path):
        yield Fields(rec, path, n, f"line {n}", f"{path.name}:{n}")


def json_list_fields(path) -> Iterator[Fields]:
    """The records of a JSON list file, as :class:`Fields`."""
    path = Path(path)
    for i, rec in enumerate(read_json_list(path)):
        yield Fields(rec, path, i, f"record {i}", f"{path.name}[{i}]")


class ItemsView:
    """Iterating, counting and indexing for a record holding its items in the
    list attribute named by ``ITEMS``."""

    ITEMS = "items"

    def __iter__(self):
        return iter(getattr(self, self.ITEMS))

    def __len__(self):
        return len(getattr(self, self.ITEMS))

    def __getitem__(self, i):
        return getattr(self, self.ITEMS)[i]
