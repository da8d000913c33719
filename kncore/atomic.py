"""Checksummed atomic writes: the one way kncore writes a file it reads back.

Every such file is written to a temporary name beside its final one,
fsync'd, hashed (SHA-256 of the bytes on disk) and renamed into place, so a
reader sees the old file or the whole new one. The digest is recorded where
the reader will look for it before it trusts the file:

* run-directory parts and tensors: in the commit record that names them
  (:mod:`kncore.rundir`);
* a file that stands alone (statistics, their checkpoints, tensors saved
  outside commits): in a sidecar ``<file>.sha256`` written after it, in the
  format ``sha256sum -c`` reads;
* small JSON records (commit records, manifests, trace records): inside the
  record itself, as the digest of its canonical JSON (:func:`dumps_checked`).

A reader verifies before it trusts: a missing, truncated or altered file
gives a :class:`CorruptFile` that names it; callers that can recompute set
the file aside (:func:`set_aside`) and do so.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .lm import InputError

log = logging.getLogger("kncore")

SIDECAR = ".sha256"
CHECKSUM_KEY = "kncore_sha256"
_BLOCK = 1 << 22


class CorruptFile(InputError):
    """A file kncore wrote is missing, truncated or altered since it was written."""

    def __init__(self, path, problem: str, action: str | None = None):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" + (f"; {action}" if action else ""))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write, *, sidecar: bool = False) -> str:
    """Call ``write(tmp_path)``, fsync, hash and move the finished file onto
    ``path``; returns the file's SHA-256. With ``sidecar`` the digest is also
    written (atomically) to ``<path>.sha256``, after the file.

    A reader (or a resumed run) sees the old file or the whole new one, never
    a partial one; a crash between the two renames leaves a file whose sidecar
    does not match it, which :func:`verify` reports as corrupt.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)  # the bytes as the file system gives them back
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sidecar:
        atomic_write_bytes(sidecar_path(path), f"{digest}  {path.name}\n".encode())
    else:
        fsync_dir(path.parent)
    return digest


def replace_dir(tmp, dest) -> None:
    """Move the finished folder ``tmp`` (made beside ``dest``, on the same file
    system) onto ``dest``: two renames, the old folder aside and the new one
    in, so a reader finds the old folder or the whole new one (or, between
    the renames, none), never a partial one. The old folder is then deleted."""
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(dest.name + f".old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path, data: bytes, *, sidecar: bool = False) -> str:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), sidecar=sidecar)


def atomic_write_text(path, text: str, *, sidecar: bool = False) -> str:
    return atomic_write_bytes(path, text.encode("utf-8"), sidecar=sidecar)


# -- verification ----------------------------------------------------------------------------
def sidecar_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR)


def recorded_digest(path) -> str:
    """The digest the sidecar of ``path`` records (CorruptFile when it has none)."""
    sc = sidecar_path(path)
    try:
        text = sc.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        raise CorruptFile(path, f"has no readable checksum record ({sc.name})") from None
    digest = text.split(" ", 1)[0].strip()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise CorruptFile(path, f"its checksum record {sc.name} is damaged")
    return digest


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CorruptFile(path, "is missing") from None
    except OSError as e:
        raise CorruptFile(path, f"cannot be read ({e.strerror})") from None


def check_bytes(path, data: bytes, digest: str) -> bytes:
    if sha256_bytes(data) != digest:
        raise CorruptFile(path, f"checksum mismatch ({len(data)} bytes on disk): the file was truncated or "
                                "altered after kncore wrote it")
    return data


def read_verified(path, digest: str | None = None) -> bytes:
    """The bytes of ``path`` after checking them against ``digest`` (default:
    its sidecar's). Raises :class:`CorruptFile` naming the file."""
    path = Path(path)
    if digest is None:
        if not path.exists():
            raise CorruptFile(path, "is missing")
        digest = recorded_digest(path)
    return check_bytes(path, _read(path), digest)


def verify(path, digest: str | None = None) -> None:
    """Check ``path`` against ``digest`` (default: its sidecar's) without
    holding it in memory. Raises :class:`CorruptFile` naming the file."""
    path = Path(path)
    if not path.exists():
        raise CorruptFile(path, "is missing")
    if digest is None:
        digest = recorded_digest(path)
    try:
        found = sha256_file(path)
    except OSError as e:
        raise CorruptFile(path, f"cannot be read ({e.strerror})") from None
    if found != digest:
        raise CorruptFile(path, f"checksum mismatch ({path.stat().st_size} bytes on disk): the file was "
                                "truncated or altered after kncore wrote it")


def set_aside(path, where: Path | None = None) -> Path | None:
    """Move a corrupt file (and its sidecar) out of the way: into ``where``
    (a folder) or beside it as ``<name>.corrupt-<UTC time>``. Returns the new
    path (None when there was nothing to move)."""
    path = Path(path)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    moved = None
    for p in (path, sidecar_path(path)):
        if not p.exists():
            continue
        dest = (Path(where) / p.name) if where is not None else p.with_name(f"{p.name}.corrupt-{stamp}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        base = dest
        while dest.exists():
            dest = base.with_name(f"{base.name}.{n}")
            n += 1
        try:
            os.replace(p, dest)
        except FileNotFoundError:  # another process (a rank) set it aside first
            continue
        moved = moved or dest
    return moved


# -- self-checksummed JSON -----------------------------------------------------------------
def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")


def dumps_checked(obj: dict, *, indent=None) -> str:
    """JSON of a dict with the SHA-256 of its canonical form under
    ``kncore_sha256`` (see :func:`loads_checked`)."""
    if CHECKSUM_KEY in obj:
        raise ValueError(f"{CHECKSUM_KEY!r} is reserved")
    body = json.loads(_canonical(obj))
    return json.dumps({**body, CHECKSUM_KEY: sha256_bytes(_canonical(body))}, indent=indent, sort_keys=True) + "\n"


def loads_checked(path, text: str | bytes, *, required: bool = True) -> dict:
    """Parse a :func:`dumps_checked` record and verify it (the checksum key is
    removed). ``required=False`` accepts a record without one (older kncore)."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFile(path, f"is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CorruptFile(path, "is not a JSON object")
    digest = obj.pop(CHECKSUM_KEY, None)
    if digest is None:
        if required:
            raise CorruptFile(path, "has no checksum (written by an older kncore, or damaged)")
        return obj
    if sha256_bytes(_canonical(obj)) != digest:
        raise CorruptFile(path, "checksum mismatch: the record was altered after kncore wrote it")
    return obj


def read_json_checked(path, *, required: bool = True) -> dict:
    return loads_checked(path, _read(Path(path)), required=required)


def write_json_checked(path, obj: dict, *, indent=None) -> str:
    return atomic_write_text(path, dumps_checked(obj, indent=indent))
