"""What kncore runs on: versions, the C++ extension, Triton's mode, CUDA devices.

    python -m kncore.info            # readable summary
    python -m kncore.info --json     # the same as JSON
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _triton_mode(triton_version: str, cuda_available: bool) -> tuple[str, str]:
    if triton_version == "not installed":
        return "unavailable", "triton is not installed; the Triton kernels' references run instead"
    if os.environ.get("TRITON_INTERPRET", "") == "1":
        return "interpreted", "TRITON_INTERPRET=1"
    if not cuda_available:
        return "interpreted", "no CUDA device (kernels run under TRITON_INTERPRET)"
    return "compiled", "CUDA device present"


def info() -> dict:
    """The facts ``python -m kncore.info`` prints, as a dict."""
    import torch

    from . import _ext

    cuda_ok = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_ok else []
    triton_version = _version("triton")
    mode, why = _triton_mode(triton_version, cuda_ok)
    built = _ext.load()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": triton_version,
        "kncore": _version("kncore"),
        "extension": {
            "built": built,
            "error": None if built else _ext.load_error(),
            "build_info": _ext.build_info() if built else None,
            "required": _ext.required(),
            # the ops' fp32 AVX-512 paths, on where this CPU has AVX-512
            "avx512": {op: bool(getattr(torch.ops.kncore, f"{op}_avx512")()) for op in _ext.AVX512_OPS}
            if built else None,
        },
        "triton_mode": mode,
        "triton_mode_reason": why,
        "cuda": {"available": cuda_ok, "torch_cuda": torch.version.cuda, "devices": devices},
        "cpu_threads": torch.get_num_threads(),
    }


def _format(d: dict) -> str:
    ext = d["extension"]
    if ext["built"]:
        b = ext["build_info"]
        avx = ext["avx512"]
        ext_line = (f"built (torch {b['torch']}, OpenMP {'on' if b['openmp'] else 'off'}, "
                    f"CUDA sources {'yes' if b['cuda_sources'] else 'no'}, compiler {b['compiler']}); "
                    f"AVX-512 paths: cov_accumulate_ {'on' if avx['cov'] else 'off'}, "
                    f"rank1_update_ {'on' if avx['rank1'] else 'off'}")
    else:
        ext_line = f"NOT built: {ext['error']}"
    cuda = d["cuda"]
    dev = ", ".join(f"{i}: {n}" for i, n in enumerate(cuda["devices"])) or "none"
    rows = [
        ("python", f"{d['python']} ({d['platform']})"),
        ("torch", d["torch"]),
        ("transformers", d["transformers"]),
        ("triton", d["triton"]),
        ("kncore", d["kncore"]),
        ("C++ extension", ext_line + ("  [KNCORE_REQUIRE_EXT=1]" if ext["required"] else "")),
        ("Triton kernels", f"{d['triton_mode']} ({d['triton_mode_reason']})"),
        ("CUDA", f"torch built with CUDA {cuda['torch_cuda']}" if cuda["torch_cuda"] else "torch built without CUDA"),
        ("CUDA devices", dev),
        ("CPU threads", str(d["cpu_threads"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kncore.info", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    d = info()
    print(json.dumps(d, indent=2) if args.json else _format(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
