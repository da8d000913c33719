"""What every computing command shares, for the command line (:mod:`kncore.cli`),
the demo (:mod:`kncore.demo`) and scripts that want the same behaviour: the
model (``--model``: an embedded name, a local folder or ``tiny-<arch>``), the
device, the seeds, progress bars, and the run directory with its process group
(:class:`Job`).

Every command that computes something writes a run directory
(:mod:`kncore.rundir`): re-running the same command after an interruption
resumes it, a different config pointed at the same ``--out`` is refused. Under
``torchrun`` each process takes a shard of the work (:mod:`kncore.distributed`)
and rank 0 writes.
"""
from __future__ import annotations

import importlib
import random
import re
import sys
from pathlib import Path

from .errors import InputError

# Options that never change results: left out of the run's config, so they can
# differ between the first run and a resumed one.
NOT_CONFIG = frozenset({"out", "device", "debug", "progress", "chunk", "func", "command", "data_dir", "max_tensor_gb",
                        "batch_size", "max_tokens", "open", "stats_cache", "batch_tokens", "profile"})


class BackendMissing(RuntimeError):
    """A command's backend module is not part of this build."""


class RankFailed(Exception):
    """An error already reported on another rank (rank 0)."""


def backend(module: str, command: str):
    """Import ``module`` for ``kncore command``; a module this build lacks is
    :class:`BackendMissing` (one line), not a traceback."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            raise BackendMissing(f"'kncore {command}' needs {module}, which this build does not have yet") from None
        raise


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def choose_device(spec: str | None):
    """``--device``: ``auto`` (CUDA when torch sees one), ``cpu``, ``cuda``, ``cuda:N``."""
    import torch

    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise InputError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {spec!r} asked for but this torch sees no CUDA device")
    return dev


def load_model(name: str, device=None, dtype: str | None = None):
    """``--model``: an embedded name, a local HF folder, or ``tiny-<arch>[:seed]``."""
    from . import loading

    m = re.fullmatch(r"tiny-(\w+)(?::(\d+))?", name)
    if m:
        from .testing import ARCHS, tiny_lm
        if m.group(1) not in ARCHS:
            raise InputError(f"unknown tiny model {name!r}; use tiny-<{'|'.join(ARCHS)}>[:seed]")
        lm = tiny_lm(m.group(1), seed=int(m.group(2) or 0), dtype=loading.torch_dtype(dtype))
        if device is not None:
            lm.model.to(device)
        return lm
    try:
        return loading.load(name, device=device, dtype=dtype)
    except ValueError as e:
        if isinstance(e, InputError):
            raise
        raise InputError(str(e)) from None


def parse_layers(spec: str | None, n_layers: int) -> list[int] | None:
    """``"all"``/None, or ``"3"``, ``"0-5,7"``: layer numbers, checked against the model."""
    if spec is None or spec == "all":
        return None
    out = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if not m:
            raise InputError(f"bad --layers {spec!r}: use e.g. 5, 0-5 or 0-5,7")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if a > b:
            raise InputError(f"bad layer range {part!r} in --layers")
        out += range(a, b + 1)
    bad = [L for L in out if not 0 <= L < n_layers]
    if bad:
        raise InputError(f"--layers {spec!r}: layer {bad[0]} outside 0..{n_layers - 1}")
    return sorted(set(out))


def split_list(s: str | None) -> list[str] | None:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; None stays None."""
    return None if s is None else [x.strip() for x in s.split(",") if x.strip()]


class Progress:
    """A tqdm bar (ETA and throughput) on rank 0 only."""

    def __init__(self, total: int, unit: str, desc: str, enabled: bool):
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, smoothing=0.1)

    def __call__(self, n: int = 1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Job:
    """What every computing command shares: the model, the run directory and
    the process group. Only rank 0 opens (and writes) the run directory.

    A run directory exists only once its job has really started: when a job
    fails before its first commit, :meth:`discard_unstarted` removes what its
    :meth:`open` created (the directory, or the files it added to an existing
    one), so that a corrected command is not refused as "a different config"."""

    _opened: list = []  # jobs of this process whose run directory is open

    def __init__(self, args, command: str):
        from . import distributed

        self.args, self.command, self.dist = args, command, distributed
        dev = choose_device(args.device)
        dev = distributed.init(dev) or dev
        self.rank, self.world = distributed.rank(), distributed.world()
        seed_everything(args.seed)
        self.lm = load_model(args.model, device=dev, dtype=args.dtype)
        self.rd = None
        self.out = Path(args.out or f"runs/{command}")

    @property
    def progress_on(self) -> bool:
        return self.args.progress and self.rank == 0

    def config(self, **extra) -> dict:
        from .data.records import DATA_SETS

        cfg = {k: v for k, v in vars(self.args).items() if k not in NOT_CONFIG}
        data = cfg.get("data")
        if data and data not in DATA_SETS and Path(data).exists():
            cfg["data"] = str(Path(data).resolve())  # the same file from another working directory
        cfg.update(extra)
        return cfg

    def open(self, **extra):
        """Open the run directory on rank 0; every rank learns whether that worked."""
        from .rundir import DEFAULT_TENSOR_LIMIT, RunDir

        err = None
        if self.rank == 0:
            # what was there before: a failure before the first commit restores exactly that
            self._before = (set(p.name for p in self.out.iterdir()) if self.out.is_dir()
                            else None if not self.out.exists() else set())
            # the topmost folder this open creates (runs/ of runs/<command> too)
            self._root = [p for p in (self.out, *self.out.absolute().parents) if not p.exists()][-1:] or None
            Job._opened.append(self)
            try:
                limit = int(self.args.max_tensor_gb * 2**30) if self.args.max_tensor_gb else DEFAULT_TENSOR_LIMIT
                self.rd = RunDir.open(self.out, self.config(**extra), self.lm, command=self.command,
                                      extra={"device": str(self.lm.device), "world": self.world,
                                             "argv": sys.argv[1:]}, tensor_limit=limit)
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                err = e
        self.sync(err)
        return self.rd

    def _started(self) -> bool:
        commits = self.out / "commits"
        return commits.is_dir() and any(commits.iterdir())

    @classmethod
    def discard_unstarted(cls) -> None:
        """After a failure: remove the run directory (or the files added to an existing
        one) of every open job that committed nothing."""
        import shutil

        for job in cls._opened:
            if job.rd is not None:
                job.rd.close()
            if not job.out.is_dir() or job._started() or (job._before is not None and "manifest.json" in job._before):
                continue  # results to resume, or a run directory that was there before: kept as it is
            if job._before is None:
                shutil.rmtree(job._root[0] if job._root else job.out, ignore_errors=True)
            else:
                for p in job.out.iterdir():
                    if p.name not in job._before:
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
        cls._opened = []

    @classmethod
    def forget(cls) -> None:
        cls._opened = []

    def sync(self, err: Exception | None = None):
        """Raise on every rank when one rank (rank 0) failed, instead of hanging."""
        msg = self.dist.broadcast_object(None if err is None else f"{err}") if self.world > 1 else None
        if err is not None:
            raise err
        if msg is not None:
            raise RankFailed(msg)

    def on_rank0(self, fn):
        """Run ``fn()`` on rank 0 only; an error there is raised on every rank."""
        err = None
        if self.rank == 0:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - re-raised on every rank
                err = e
        self.sync(err)

    def run(self, items, work, *, table: str, unit: str, desc: str, weight=None):
        """Resumable, sharded loop over ``(key, payload)`` items (see :func:`kncore.rundir.run_items`)."""
        from .rundir import run_items

        done = self.rd.done_keys(table) if self.rank == 0 else set()
        todo = [p for k, p in items if k not in done]
        total = sum(weight(p) for p in todo) if weight else len(todo)
        if self.rank == 0 and done:
            print(f"kncore {self.command}: resuming {self.out} ({desc}): {len(items) - len(todo)} of {len(items)} "
                  f"items already done", file=sys.stderr)
        bar = Progress(total, unit, desc, self.progress_on)
        wmap = {k: (weight(p) if weight else 1) for k, p in items}
        try:
            n = run_items(self.rd, items, work, table=table, chunk=self.args.chunk,
                          progress=lambda keys: bar(sum(wmap[k] for k in keys)))
        finally:
            bar.close()
        return n

    def done(self, summary: dict | None = None):
        if self.rank == 0:
            if summary:
                self.rd.update_manifest(summary=summary)
            self.rd.close()
            if self in Job._opened:
                Job._opened.remove(self)
            print(f"kncore {self.command}: results in {self.out}  (kncore report {self.out})")
        self.dist.barrier()


__all__ = ["Job", "Progress", "BackendMissing", "RankFailed", "backend", "seed_everything", "choose_device",
           "load_model", "parse_layers", "split_list", "NOT_CONFIG"]
