"""Kernel dispatch, in one place: whether a call goes to a Triton kernel or to
its plain PyTorch reference, and the log line when it falls back.

``KNCORE_KERNELS`` (read here only): ``auto`` (default: the kernels on CUDA
tensors), ``off`` (never), ``force`` (CPU tensors too, through Triton's
interpreter, which needs ``TRITON_INTERPRET=1`` set before triton is first
imported: tests). On a GPU a fallback is a performance bug worth a warning,
once per reason; on the CPU the reference is the plan, so it is logged at
DEBUG only.
"""
from __future__ import annotations

import logging
import os

import torch

from ._kernels import kernel_module  # noqa: F401 - kncore.ops.dispatch.kernel_module is the public name

log = logging.getLogger("kncore.ops")

MODES = ("auto", "off", "force")
SUPPORTED_DEVICES = ("cuda",)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_logged: set = set()


def kernel_mode() -> str:
    """``KNCORE_KERNELS``: ``auto`` (default: kernels on CUDA), ``off`` or ``force``."""
    mode = os.environ.get("KNCORE_KERNELS") or "auto"
    if mode not in MODES:
        raise ValueError(f"KNCORE_KERNELS={mode!r}; expected one of {MODES}")
    return mode


def wants_kernels(device: torch.device) -> bool:
    """Whether tensors on ``device`` are offered to the Triton kernels at all:
    CUDA, or any device under ``KNCORE_KERNELS=force``."""
    return device.type == "cuda" or os.environ.get("KNCORE_KERNELS") == "force"


def triton_reasons(kernels, device_type: str, what: str = "the kernel runs") -> list[str]:
    """Why a Triton kernel module cannot run on ``device_type`` (empty: it can):
    kernels turned off, a device other than CUDA (unless forced), triton
    missing, or the interpreter where it is not wanted."""
    reasons = []
    mode = kernel_mode()
    if mode == "off":
        reasons.append("kernels turned off (KNCORE_KERNELS=off)")
    if device_type not in SUPPORTED_DEVICES and not (mode == "force" and device_type == "cpu"):
        reasons.append(f"device {device_type}: {what} on {SUPPORTED_DEVICES}")
    if not kernels.AVAILABLE:
        reasons.append("triton is not installed")
    elif kernels.INTERPRETED and mode != "force":
        reasons.append("triton runs in interpreter mode (TRITON_INTERPRET=1): far slower than the reference")
    elif device_type == "cpu" and not kernels.INTERPRETED:
        reasons.append("CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
    return reasons


def forget_fallbacks() -> None:
    """Forget which fallbacks were logged, so the next one warns again (tests)."""
    _logged.clear()


def log_fallback(op: str, reasons: list[str], device: torch.device) -> None:
    """Log that ``op`` uses the PyTorch reference on ``device`` and why."""
    key = (op, tuple(reasons))
    loud = device.type != "cpu" or kernel_mode() == "force"
    level = logging.WARNING if loud and key not in _logged else logging.DEBUG
    _logged.add(key)
    log.log(level, "%s: using the PyTorch reference on %s: %s", op, device, "; ".join(reasons))


__all__ = ["MODES", "SUPPORTED_DEVICES", "SUPPORTED_DTYPES", "kernel_mode", "wants_kernels", "triton_reasons",
           "log_fallback", "forget_fallbacks", "kernel_module"]
