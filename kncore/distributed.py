"""Scale-out under ``torchrun``: the same commands, one shard of the work per rank.

``torchrun --nproc-per-node N -m kncore localise ...`` (or
``python -m torch.distributed.run ...``) sets ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``...; :func:`init` joins the process group (gloo on CPU, nccl on
CUDA). Without those variables every helper is the single-process identity,
so code written against this module runs unchanged on one process.

The run-directory protocol (:func:`kncore.rundir.run_items`): rank 0 reads the
done keys and broadcasts what is left; each rank takes a strided shard of every
chunk; rank 0 gathers the rows and commits the chunk. Only rank 0 touches the
run directory, so resume works the same as with one process (and with a
different number of processes), and no shared file system is needed.
"""
from __future__ import annotations

import datetime as _dt
import os
from typing import Sequence

import torch

_OWNED = False  # True when init() created the process group (so finalize() destroys it)


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() else None


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    d = _dist()
    return d is not None and d.is_initialized() and d.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    d = _dist()
    if d is not None and d.is_initialized():
        return d.get_rank()
    return 0


def world() -> int:
    """Number of processes (1 without a process group)."""
    d = _dist()
    if d is not None and d.is_initialized():
        return d.get_world_size()
    return 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> bool:
    """True when started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | torch.device | None = None, timeout_s: float = 1800) -> torch.device | None:
    """Join the process group torchrun described in the environment.

    Backend: nccl when ``device`` is CUDA, gloo otherwise. On CUDA each rank
    takes GPU ``LOCAL_RANK``; the device to use is returned (None when not
    launched by torchrun, or when the device was given as CPU).
    """
    global _OWNED
    d = _dist()
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and launched():
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
    if not launched() or d is None or d.is_initialized():
        return dev
    backend = "nccl" if dev is not None and dev.type == "cuda" else "gloo"
    kw = {}
    if backend == "nccl":
        kw["device_id"] = dev
    d.init_process_group(backend=backend, timeout=_dt.timedelta(seconds=timeout_s), **kw)
    _OWNED = True
    return dev


def finalize() -> None:
    """Leave the process group :func:`init` created."""
    global _OWNED
    d = _dist()
    if _OWNED and d is not None and d.is_initialized():
        d.destroy_process_group()
    _OWNED = False


def shard(items: Sequence, *, rank: int | None = None, world: int | None = None) -> list:
    """This rank's share of ``items``: every ``world``-th item from ``rank``.

    Deterministic, and strided so that neighbouring (often similar-length)
    items spread over the ranks.
    """
    r = globals()["rank"]() if rank is None else rank
    w = globals()["world"]() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside world of {w}")
    return list(items[r::w])


def _comm_device() -> torch.device:
    d = _dist()
    if d is not None and d.is_initialized() and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(rows: list) -> list:
    """Concatenate every rank's list, in rank order.

    Every rank gets the merged list (``all_gather_object``), so rank 0 can
    write it and the others can check it; without a process group, ``rows``.
    """
    if not is_distributed():
        return list(rows)
    d = _dist()
    out = [None] * d.get_world_size()
    d.all_gather_object(out, list(rows))
    return [r for part in out for r in part]


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    d = _dist()
    box = [obj]
    d.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over the ranks in place (``op``: sum, max, min) and return it.

    With nccl a CPU tensor travels through the rank's GPU and is copied back.
    """
    if not is_distributed():
        return tensor
    d = _dist()
    ops = {"sum": d.ReduceOp.SUM, "max": d.ReduceOp.MAX, "min": d.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}")
    dev = _comm_device()
    if tensor.device == dev:
        d.all_reduce(tensor, op=ops[op])
        return tensor
    tmp = tensor.to(dev)
    d.all_reduce(tmp, op=ops[op])
    tensor.copy_(tmp)
    return tensor


def barrier() -> None:
    if is_distributed():
        _dist().barrier()
