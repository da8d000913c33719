"""Resumable run directories.

A run directory holds everything one command produced::

    RUN/
      manifest.json            config, versions, model fingerprint, git commit
      tables/<table>/part-r000-000012.parquet
      commits/r000-000012.json the done-keys index: which keys and parts are in
      tensors/<name>.safetensors
      plots/*.png              extra figures a report picks up

Work is split into items, each named by a key (a string). A chunk of finished
items is *committed* at once: its Parquet parts (and tensors) are written under
temporary names and ``os.replace``'d into place, then the commit record naming
those parts and keys is written the same way. Readers only see parts that a
commit names, so a process killed at any instant (Ctrl-C, ``kill -9``) leaves
either the whole chunk or nothing: re-running the same command skips the
committed keys and redoes the rest, with no lost and no duplicated rows.

A directory made with one config refuses a different one (the error names the
differing keys) rather than mixing results.

Every file is checksummed at commit (:mod:`kncore.atomic`): the commit record
holds the SHA-256 of each part and tensor file it names and of itself, the
manifest holds its own. Opening a directory to resume verifies every commit;
a damaged, truncated or missing file is named in a warning, its whole commit
is set aside under ``corrupt/`` and its keys count as not done, so the run
recomputes them. A corrupt manifest is rebuilt when every commit says it was
made by the same config (each records a hash of it), and refused otherwise.
Read-only opens (reports) refuse a damaged file, naming it.

Commits happen every ``chunk`` items or every ``commit_seconds`` of work,
whichever comes first (:func:`run_items`), so an interrupted run loses at
most that much.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .atomic import (CorruptFile, atomic_write, atomic_write_text, dumps_checked,  # noqa: F401 (re-exported)
                     read_json_checked, read_verified, sha256_bytes, verify)
from .lm import InputError

log = logging.getLogger("kncore")

FORMAT = 1
# Seconds of work between commits (run_items): an interrupted run loses at most
# about this much (issue: a localise chunk of 8 bags took 55 s and a kill at 70%
# lost it all), while a commit costs a few ms of Parquet writes.
DEFAULT_COMMIT_SECONDS = 30.0
# Dense tensors above this many bytes are refused unless the caller raises the
# limit (``--max-tensor-gb`` on the CLI): a full IG attribution of every prompt
# of PARAREL over SmolLM2's 30 x 1536 neurons is 27k x 46k fp32 = 5 GB.
DEFAULT_TENSOR_LIMIT = 2 << 30
_COMMIT_RE = re.compile(r"^r(\d{3,})-(\d{6,})\.json$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class RunDirMismatch(InputError):
    """The run directory was made by a different config or model."""


def _jsonable(x):
    """The config as JSON would give it back (tuples become lists, paths strings)."""
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(f"bad {kind} name {name!r}: use letters, digits, '_', '-' and '.'")
    return name


def versions() -> dict:
    """Versions of Python and the libraries whose behaviour the numbers depend on."""
    out = {"python": platform.python_version()}
    for mod in ("kncore", "torch", "transformers", "pyarrow", "numpy", "safetensors"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "unknown")
        except ImportError:
            out[mod] = None
    return out


def git_commit(where: Path | None = None) -> dict | None:
    """The git commit of the kncore checkout (None outside a git checkout)."""
    where = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return None


def config_diff(old: Mapping, new: Mapping) -> list[str]:
    """Human-readable differences between two configs, one entry per key."""
    old, new = _jsonable(dict(old)), _jsonable(dict(new))
    out = []
    for k in sorted(set(old) | set(new)):
        if k not in old:
            out.append(f"{k}: (absent) -> {new[k]!r}")
        elif k not in new:
            out.append(f"{k}: {old[k]!r} -> (absent)")
        elif old[k] != new[k]:
            out.append(f"{k}: {old[k]!r} -> {new[k]!r}")
    return out


def config_id(command, config: Mapping, fingerprint) -> str:
    """What every commit records of the config that made it (to rebuild a lost manifest)."""
    return sha256_bytes(json.dumps({"command": command, "config": _jsonable(dict(config)),
                                    "fingerprint": fingerprint}, sort_keys=True).encode())[:16]


def model_info(lm) -> dict:
    return {"name": lm.name, "fingerprint": lm.fingerprint(), "arch": lm.arch, "n_layers": lm.n_layers,
            "d_model": lm.d_model, "d_ff": lm.d_ff}


class RunDir:
    """A run directory. Build one with :meth:`RunDir.open`."""

    def __init__(self, path: Path, manifest: dict, *, rank: int = 0, writable: bool = True,
                 tensor_limit: int = DEFAULT_TENSOR_LIMIT):
        self.path = Path(path)
        self.manifest = manifest
        self.rank = int(rank)
        self.writable = writable
        self.tensor_limit = int(tensor_limit)
        self._lock_fd = None
        self._seq = None
        self._verified: dict[str, dict] = {}  # commit records checked since opening, by file name

    # -- opening ---------------------------------------------------------------
    @classmethod
    def open(cls, path, config: Mapping, lm=None, *, command: str | None = None, rank: int = 0,
             extra: Mapping | None = None, tensor_limit: int = DEFAULT_TENSOR_LIMIT) -> "RunDir":
        """Create the run directory, or reopen it to resume.

        ``config`` is everything that determines the results (JSON-able); a
        directory made with a different config, command or model is refused
        with :class:`RunDirMismatch` naming the differences. ``lm`` records
        the model fingerprint. ``rank`` names this process's part files (each
        writing process needs its own rank). ``extra`` is recorded in the
        manifest but never compared (device, world size...).
        """
        if not isinstance(config, Mapping):
            raise TypeError("config must be a mapping")
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"run directory {path} exists and is not a directory")
        config = _jsonable(dict(config))
        model = model_info(lm) if lm is not None else None
        man_path = path / "manifest.json"
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        session = {"started": now, "host": platform.node(), "pid": os.getpid(), **_jsonable(dict(extra or {}))}
        path.mkdir(parents=True, exist_ok=True)
        rd = cls(path, {}, rank=rank, tensor_limit=tensor_limit)
        rd._lock()  # before reading the manifest: two processes cannot both create it
        try:
            man = None
            if man_path.exists():
                try:
                    man = cls._read_manifest(path)
                except CorruptFile as e:
                    rd._recover_manifest(e, command, config, model)
            elif (path / "commits").is_dir() and any(_COMMIT_RE.match(p.name) for p in (path / "commits").iterdir()):
                # results without their manifest: only this run's config may adopt them
                rd._recover_manifest(CorruptFile(man_path, "is missing"), command, config, model)
            if man is not None:
                problems = []
                if command is not None and man.get("command") not in (None, command):
                    problems.append(f"command: {man.get('command')!r} -> {command!r}")
                problems += config_diff(man.get("config", {}), config)
                old_fp = (man.get("model") or {}).get("fingerprint")
                if model is not None and old_fp is not None and old_fp != model["fingerprint"]:
                    problems.append(f"model fingerprint: {old_fp} ({(man.get('model') or {}).get('name')}) -> "
                                    f"{model['fingerprint']} ({model['name']})")
                if problems:
                    raise RunDirMismatch(f"run directory {path} was made with a different config; refusing to "
                                         f"mix results (use another --out, or delete it): " + "; ".join(problems))
                now_v = versions()
                if man.get("versions") != now_v:
                    changed = [k for k in now_v if (man.get("versions") or {}).get(k) != now_v[k]]
                    log.warning("resuming %s with different library versions (%s)", path, ", ".join(changed))
                    session["versions"] = now_v
                if model is not None and man.get("model") is None:
                    man["model"] = model
                man.setdefault("sessions", []).append(session)
            else:
                man = {"kncore_rundir": FORMAT, "command": command, "config": config, "model": model,
                       "versions": versions(), "git": git_commit(), "created": now, "sessions": [session]}
            rd.manifest = man
            if rank == 0 or not man_path.exists():
                rd._write_manifest()
        except BaseException:
            rd.close()
            raise
        rd._clean_tmp()
        try:
            # Verify every commit now, so damaged ones are set aside before work starts. This
            # reads every part once: SHA-256 ran at 480 MB/s here (256 MB, shared 2-core box),
            # so a resume of a run with 5 GB of dense tensors spends ~10 s on it.
            rd._commits()
        except BaseException:
            rd.close()
            raise
        return rd

    @classmethod
    def load(cls, path) -> "RunDir":
        """Open an existing run directory read-only (for reports and analysis)."""
        path = Path(path)
        if not (path / "manifest.json").exists():
            raise InputError(f"{path} is not a kncore run directory (no manifest.json)")
        try:
            man = cls._read_manifest(path)
        except CorruptFile as e:
            raise CorruptFile(e.path, e.problem, "run the command that made it again with the same --out to "
                                                 "rebuild it") from None
        return cls(path, man, writable=False)

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        # a manifest without a checksum was written by an older kncore: accepted, and
        # rewritten with one by the next writer
        man = read_json_checked(path / "manifest.json", required=False)
        if man.get("kncore_rundir") != FORMAT:
            raise InputError(f"{path / 'manifest.json'} is not a kncore run manifest (format {FORMAT})")
        return man

    def _recover_manifest(self, err: CorruptFile, command, config: dict, model) -> None:
        """A corrupt manifest: rebuilt (by the caller) when every commit records this
        config, refused when any commit says otherwise."""
        from .atomic import set_aside
        want = config_id(command, config, (model or {}).get("fingerprint"))
        others = [name for name, rec in self._scan_records() if rec.get("config_id") != want]
        if others:
            raise InputError(f"{err}; its commits ({others[0]}...) were made with another config, so it cannot be "
                             f"rebuilt: use another --out, or delete {self.path} to start over") from None
        dest = set_aside(err.path, self.path / "corrupt")
        log.warning("%s%s; rebuilt from this run's config (every commit records it)", err,
                    f"; set aside as {dest}" if dest else "")

    def _write_manifest(self) -> None:
        atomic_write_text(self.path / "manifest.json", dumps_checked(self.manifest, indent=1))

    def _lock(self) -> None:
        """One writer per rank: a second process on the same directory and rank is refused."""
        lock = self.path / f".lock-r{self.rank:03d}"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"run directory {self.path} is in use by another process (rank {self.rank}); "
                             f"wait for it or use another --out") from None
        self._lock_fd = fd

    def close(self) -> None:
        """Release the writer lock (also released when the process exits)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _clean_tmp(self) -> None:
        """Remove temporary files a killed writer of this rank left behind
        (rank 0 also takes those of no rank: tensors saved outside commits)."""
        tag = f"r{self.rank:03d}-"
        for sub in ("commits", "tables", "tensors"):
            d = self.path / sub
            if d.is_dir():
                for p in d.rglob(".tmp-*"):
                    if tag in p.name or (self.rank == 0 and not re.search(r"r\d{3}-\d{6}", p.name)):
                        try:
                            p.unlink()
                        except OSError:
                            pass

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    def update_manifest(self, **fields) -> None:
        """Record extra JSON-able fields (e.g. a summary) in the manifest."""
        self._need_writable()
        self.manifest.update(_jsonable(fields))
        self._write_manifest()

    def _need_writable(self):
        if not self.writable:
            raise InputError(f"run directory {self.path} was opened read-only")

    # -- commits -----------------------------------------------------------------
    def _scan_records(self) -> list[tuple[str, dict]]:
        """(name, record) of every commit record that reads back whole (no file checks)."""
        d = self.path / "commits"
        out = []
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if _COMMIT_RE.match(p.name):
                    try:
                        out.append((p.name, read_json_checked(p)))
                    except CorruptFile:
                        pass
        return out

    def _verify_commit(self, p: Path) -> dict:
        """The record of commit ``p`` once it and every file it names check out
        against their recorded SHA-256 (CorruptFile naming the first that does not)."""
        rec = read_json_checked(p)
        files = rec.get("files")
        if not isinstance(files, dict):
            raise CorruptFile(p, "names no file checksums")
        for rel in self._commit_files(rec):
            if rel not in files:
                raise CorruptFile(p, f"has no checksum for {rel}")
            verify(self.path / rel, files[rel])
        return rec

    @staticmethod
    def _commit_files(rec: dict) -> list[str]:
        out = [f"tables/{t}/{info['part']}" for t, info in rec.get("tables", {}).items()]
        return out + [f"tensors/{f}" for f in rec.get("tensors", {}).values()]

    def _set_aside_commit(self, p: Path, err: CorruptFile) -> None:
        """Move a damaged commit (its record and every file of its stem) into
        ``corrupt/<stem>/``, so its keys count as not done and are recomputed."""
        from .atomic import set_aside
        stem = p.stem
        dest = self.path / "corrupt" / stem
        n_keys = None
        try:
            n_keys = len({k for ks in json.loads(p.read_text()).get("keys", {}).values() for k in ks})
        except (OSError, ValueError, AttributeError):
            pass
        for f in list((self.path / "tables").glob(f"*/part-{stem}.parquet")):
            set_aside(f, dest / "tables" / f.parent.name)
        for f in list((self.path / "tensors").glob(f"*.{stem}.safetensors")):
            set_aside(f, dest / "tensors")
        set_aside(p, dest)
        dest.mkdir(parents=True, exist_ok=True)  # also marks the gap in the sequence as known
        what = f"its {n_keys} items" if n_keys is not None else "its items"
        log.warning("%s; commit %s set aside in %s, %s will be recomputed", err, stem, dest, what)

    def _commits(self) -> list[tuple[int, int, dict]]:
        """Every verified commit, in order. A commit that fails verification is
        set aside (writable) or refused naming the file (read-only)."""
        d = self.path / "commits"
        out = []
        if not d.is_dir():
            return out
        verified = self._verified
        for p in sorted(d.iterdir()):
            m = _COMMIT_RE.match(p.name)
            if not m:
                continue
            rec = verified.get(p.name)
            if rec is None:
                try:
                    rec = self._verify_commit(p)
                except CorruptFile as e:
                    if not self.writable:
                        raise CorruptFile(e.path, e.problem, f"run the command that made {self.path} again with "
                                                             "the same --out to recompute it") from None
                    self._set_aside_commit(p, e)
                    continue
                verified[p.name] = rec
            out.append((int(m.group(1)), int(m.group(2)), rec))
        out.sort(key=lambda t: (t[0], t[1]))
        self._check_gaps(out)
        return out

    def _check_gaps(self, commits) -> None:
        """A commit record missing from the middle of a rank's sequence (one
        that was not set aside) was deleted: its files are set aside too
        (writable) or the directory is refused (read-only). A missing last
        record looks like a kill before the commit and is simply redone."""
        aside = {p.name for p in (self.path / "corrupt").iterdir()} if (self.path / "corrupt").is_dir() else set()
        by_rank: dict[int, set[int]] = {}
        for r, q, _ in commits:
            by_rank.setdefault(r, set()).add(q)
        for r, seqs in by_rank.items():
            for q in sorted(set(range(max(seqs))) - seqs):
                stem = f"r{r:03d}-{q:06d}"
                if stem in aside:
                    continue
                err = CorruptFile(self.path / "commits" / f"{stem}.json", "is missing (later commits exist)")
                if not self.writable:
                    raise CorruptFile(err.path, err.problem, f"run the command that made {self.path} again with "
                                                             "the same --out to recompute it")
                self._set_aside_commit(err.path, err)

    def _next_seq(self) -> int:
        if self._seq is None:
            self._seq = 1 + max((s for r, s, _ in self._commits() if r == self.rank), default=-1)
        return self._seq

    def done_keys(self, table: str | None = None) -> set[str]:
        """Keys already committed (to ``table``, or to any table when None)."""
        keys: set[str] = set()
        for _, _, rec in self._commits():
            for t, ks in rec.get("keys", {}).items():
                if table is None or t == table:
                    keys.update(ks)
        return keys

    def append(self, table: str, rows, *, keys: Iterable[str] | None = None) -> None:
        """Atomically add rows to a table and mark their keys done.

        ``rows``: a list of dicts (or a ``pyarrow.Table``). ``keys`` defaults
        to the distinct values of the rows' ``key`` column; pass it explicitly
        when an item may produce no rows.
        """
        self.commit({table: rows}, keys=keys)

    def commit(self, tables: Mapping[str, object], *, keys: Iterable[str] | Mapping[str, Iterable[str]] | None = None,
               tensors: Mapping[str, Mapping] | None = None, info: Mapping | None = None) -> None:
        """Atomically add rows to several tables (and tensors), one commit.

        ``keys``: the work items this commit completes; a list applies to
        every table, a mapping gives them per table; None takes each table's
        ``key`` column. ``info``: JSON-able notes kept in the commit record.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._need_writable()
        seq = self._next_seq()
        stem = f"r{self.rank:03d}-{seq:06d}"
        rec = {"tables": {}, "keys": {}, "tensors": {}, "files": {},
               "config_id": config_id(self.manifest.get("command"), self.config,
                                      (self.manifest.get("model") or {}).get("fingerprint"))}
        if info:
            rec["info"] = _jsonable(dict(info))
        for t, rows in tables.items():
            _check_name("table", t)
            tab = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
            if keys is None:
                if tab.num_rows and "key" not in tab.column_names:
                    raise ValueError(f"rows for table {t!r} have no 'key' column; pass keys=")
                ks = sorted(set(map(str, tab.column("key").to_pylist()))) if tab.num_rows else []
            elif isinstance(keys, Mapping):
                ks = sorted(set(map(str, keys.get(t, ()))))
            else:
                ks = sorted(set(map(str, keys)))
            if tab.num_rows:
                part = f"part-{stem}.parquet"
                rec["files"][f"tables/{t}/{part}"] = atomic_write(self.path / "tables" / t / part,
                                                                  lambda tmp, tab=tab: pq.write_table(tab, tmp))
                rec["tables"][t] = {"part": part, "rows": tab.num_rows}
            rec["keys"][t] = ks
        for name, tens in (tensors or {}).items():
            fname = f"{_check_name('tensor', name)}.{stem}.safetensors"
            rec["files"][f"tensors/{fname}"] = self._write_tensors(self.path / "tensors" / fname, tens)
            rec["tensors"][name] = fname
        # the record last: until it is in place, none of this commit's files count
        atomic_write_text(self.path / "commits" / f"{stem}.json", dumps_checked(rec))
        self._verified[f"{stem}.json"] = _jsonable(rec)
        self._seq = seq + 1

    def block_size(self, table: str) -> int | None:
        """The block size :func:`run_items` chose for ``table`` (None before its first commit)."""
        for _, _, rec in reversed(self._commits()):
            b = (rec.get("info") or {}).get("block", {}).get(table)
            if b is not None:
                return int(b)
        return None

    def tables(self) -> list[str]:
        """Names of the tables that hold committed rows."""
        names = set()
        for _, _, rec in self._commits():
            names.update(rec.get("tables", {}))
        return sorted(names)

    def read(self, table: str, *, sort: bool = True):
        """All committed rows of a table as a ``pyarrow.Table``.

        With ``sort`` (default) rows are ordered by their ``key`` column (a
        stable sort), so the result does not depend on chunking, ranks or
        interruptions; without it, in commit order.
        """
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        _check_name("table", table)
        parts = []
        for _, _, rec in self._commits():
            if table in rec.get("tables", {}):
                rel = f"tables/{table}/{rec['tables'][table]['part']}"
                parts.append(pq.read_table(pa.BufferReader(self._read_checked(rel, rec))))
        if not parts:
            return pa.table({})
        tab = pa.concat_tables(parts, promote_options="permissive")
        if sort and "key" in tab.column_names and tab.num_rows:
            # by key, then commit order (the row index breaks ties, so the order is total)
            keys = pa.table({"k": tab.column("key"), "i": pa.array(np.arange(tab.num_rows))})
            tab = tab.take(pc.sort_indices(keys, sort_keys=[("k", "ascending"), ("i", "ascending")]))
        return tab

    def _read_checked(self, rel: str, rec: dict) -> bytes:
        """The bytes of a committed file, checked again as they are read (it may
        have been damaged since the directory was opened)."""
        try:
            return read_verified(self.path / rel, rec["files"][rel])
        except CorruptFile as e:
            raise CorruptFile(e.path, e.problem, f"run the command that made {self.path} again with the same "
                                                 "--out to recompute it") from None

    # -- tensors -------------------------------------------------------------------
    @staticmethod
    def tensor_bytes(tensors: Mapping) -> int:
        """Bytes a safetensors file of these tensors takes (data plus header estimate)."""
        data = sum(t.numel() * t.element_size() for t in tensors.values())
        return data + 128 * len(tensors) + 64

    def _write_tensors(self, path: Path, tensors: Mapping, *, sidecar: bool = False) -> str:
        from safetensors.torch import save_file

        if not tensors:
            raise ValueError("no tensors to save")
        size = self.tensor_bytes(tensors)
        if size > self.tensor_limit:
            raise InputError(f"dense tensors {path.name} would take {size / 2**30:.2f} GiB, above the limit of "
                             f"{self.tensor_limit / 2**30:.2f} GiB; raise it (--max-tensor-gb) or do not save "
                             f"dense tensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if size > free:
            raise InputError(f"dense tensors {path.name} need {size / 2**30:.2f} GiB but only "
                             f"{free / 2**30:.2f} GiB is free at {path.parent}")
        if size > self.tensor_limit // 2:
            warnings.warn(f"writing {size / 2**30:.2f} GiB of dense tensors to {path}", stacklevel=3)
        clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        return atomic_write(path, lambda tmp: save_file(clean, tmp), sidecar=sidecar)

    def save_tensors(self, name: str, tensors: Mapping) -> Path:
        """Write a dict of tensors as ``tensors/<name>.safetensors`` (atomic).

        The size is estimated first: above the run's ``tensor_limit`` (or the
        free disk space) it raises :class:`InputError` and writes nothing.
        """
        self._need_writable()
        path = self.path / "tensors" / f"{_check_name('tensor', name)}.safetensors"
        self._write_tensors(path, tensors, sidecar=True)
        return path

    def load_tensors(self, name: str) -> dict:
        """Tensors saved under ``name``: by :meth:`save_tensors`, or merged from
        every commit that carried tensors of that name."""
        from safetensors.torch import load

        path = self.path / "tensors" / f"{_check_name('tensor', name)}.safetensors"
        if path.exists():
            try:
                return load(read_verified(path))
            except CorruptFile as e:
                raise CorruptFile(e.path, e.problem, "run the command that saved it again to rewrite it") from None
        out = {}
        for _, _, rec in self._commits():
            if name in rec.get("tensors", {}):
                out.update(load(self._read_checked(f"tensors/{rec['tensors'][name]}", rec)))
        if not out:
            raise InputError(f"no tensors named {name!r} in {self.path}")
        return out

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    def summary(self) -> dict:
        """Rows and keys per table, for progress messages and reports."""
        out = {}
        for _, _, rec in self._commits():
            for t, ks in rec.get("keys", {}).items():
                d = out.setdefault(t, {"rows": 0, "keys": 0})
                d["keys"] += len(ks)
                d["rows"] += rec.get("tables", {}).get(t, {}).get("rows", 0)
        return out


def chunks(items: Sequence, size: int):
    """Consecutive slices of ``items`` of at most ``size``."""
    if size < 1:
        raise InputError(f"chunk size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run_items(rd: RunDir, items: Sequence, work, *, table: str, chunk: int = 16, progress=None,
              dist=None, commit_seconds: float | None = DEFAULT_COMMIT_SECONDS, clock=time.monotonic) -> int:
    """Drive ``work`` over the items of a run directory that are not done yet.

    ``items``: a sequence of ``(key, payload)``. ``work(payloads_chunk)``
    returns ``{table: rows}`` (rows carry a ``key``) or ``({table: rows},
    tensors)``. Each block of work is committed at once; ``table`` is the
    table whose done keys decide what is left. ``progress(keys)`` is called
    after each block with the keys it finished. Under ``torch.distributed``
    every rank computes its strided shard of each block and rank 0 commits
    the gathered rows. Returns the number of items this call completed.

    Blocks hold at most ``chunk`` items per rank, and with ``commit_seconds``
    at most as many as fit in that many seconds of work: the first item is
    timed alone and fixes the block size ``s`` for the run (recorded in every
    commit, so a resumed run reuses it), so an interrupted run loses at most
    about ``commit_seconds`` of work. ``commit_seconds=None``: ``s = chunk``.
    Blocks are cells of a fixed grid over the items (item i is in cell
    ``i // (s * world)``), so a resumed run batches the remaining items
    exactly as the uninterrupted run would have: work that batches its items
    together gives bit-identical tables. (Batching itself moves the numbers
    by float rounding: IG scores of 6 tiny-model prompts batched together vs
    one by one differ by at most 1.1e-8.)
    """
    from . import distributed as D

    dist = D if dist is None else dist
    if chunk < 1:
        raise InputError(f"chunk size must be >= 1, got {chunk}")
    if commit_seconds is not None and not commit_seconds > 0:
        raise InputError(f"commit_seconds must be > 0 (or None), got {commit_seconds}")
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise InputError(f"work items must have distinct keys; {dup!r} repeats")
    todo = size = None
    if dist.rank() == 0:
        done = rd.done_keys(table)
        todo = [i for i, k in enumerate(keys) if k not in done]
        size = chunk if commit_seconds is None else rd.block_size(table)
        size = None if size is None else min(size, chunk)
    todo, size = dist.broadcast_object((todo, size))
    W = dist.world()
    n_done = 0
    pos = 0
    while pos < len(todo):
        if size is None:  # time one item per rank to size the blocks
            block = todo[pos:pos + W]
        else:
            cell = todo[pos] // (size * W)
            block = [i for i in todo[pos:pos + size * W] if i // (size * W) == cell]
        pos += len(block)
        t0 = clock()
        mine = D.shard(block, rank=dist.rank(), world=W)
        result = work([items[i][1] for i in mine]) if mine else {}
        tensors = None
        if isinstance(result, tuple):
            result, tensors = result
        block_keys = [keys[i] for i in block]
        if W > 1:
            gathered = dist.gather_rows([(result, tensors)])
            result, tensors = {}, {}
            for res, ten in gathered:
                for t, rows in res.items():
                    result.setdefault(t, []).extend(rows)
                for name, tens in (ten or {}).items():
                    tensors.setdefault(name, {}).update(tens)
            tensors = tensors or None
        if size is None:
            per_item = max(clock() - t0, 1e-9) / max(1, -(-len(block) // W))
            size = max(1, min(chunk, int(commit_seconds / per_item)))
            if W > 1:
                size = dist.broadcast_object(size)  # rank 0's clock decides for every rank
        if dist.rank() == 0:
            result = dict(result)
            result.setdefault(table, [])
            rd.commit(result, keys=block_keys, tensors=tensors, info={"block": {table: size}})
        n_done += len(block)
        if progress is not None:
            progress(block_keys)
    return n_done
