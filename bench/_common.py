"""Helpers shared by the benchmarks in bench/: where results are named from
(commit, machine), how they are written (atomically), and how one call is
timed and its memory measured."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """Short hash of HEAD ("nogit" outside a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "nogit"
    except OSError:
        return "nogit"


def machine(device: str | None = None) -> str:
    """The GPU's name, or cpu-<cores>core (always for a bench run on ``device="cpu"``)."""
    if device != "cpu" and torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def write_atomic(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def write_csv(path: Path, rows: list, keys: list) -> None:
    """rows (dicts) as CSV with columns ``keys`` (missing values empty), written atomically."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in keys})
    write_atomic(path, buf.getvalue())


def rss() -> int:
    """Resident memory of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_once(fn):
    """(wall seconds, process CPU seconds, fn's result): CUDA events on a GPU, else host clocks."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3, float("nan"), out
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def peak_rss(fn, interval: float = 0.002):
    """(fn's result, wall seconds, peak resident bytes above the level at the
    call), the resident set sampled every ``interval`` seconds by a thread (on
    the CPU torch keeps no allocator statistics)."""
    start = rss()
    peak = [start]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        dt = time.perf_counter() - t0
        stop.set()
        t.join()
    return out, dt, max(peak[0], rss()) - start


def measure(fn, device: str = "cpu"):
    """(fn's result, seconds, peak bytes above the call's start): on ``cuda`` CUDA
    events and the allocator's high-water mark, on the CPU the host clock and the
    sampled resident set (:func:`peak_rss`)."""
    if device != "cuda":
        return peak_rss(fn)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dt, _, out = run_once(fn)
    return out, dt, torch.cuda.max_memory_allocated() - base

def extra_mib(fn):
    """(MiB the call needs beyond its inputs, fn's result): max_memory_allocated on a GPU;
    on CPU the resident-set high-water mark sampled every 0.1 ms, in an untimed run."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, out
    out, _, extra = peak_rss(fn, interval=0.0001)
    return max(0, extra) / 2**20, out


def switched_off(op: str, fn):
    """fn() with the AVX-512 path of the kncore op `op` ("rank1", "cov") off: a bench
    side for what a CPU without AVX-512 runs."""
    from kncore import _ext
    with _ext.avx512_off(op):
        return fn()
