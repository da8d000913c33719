"""The Triton kernels compiled ahead of time for A100 (sm_80) and H100 (sm_90), without a GPU.

:func:`cases` lists what dispatch can launch: for each kernel, every autotune
configuration (the kernel module's own list, after its own pruning), every
dtype the op accepts (fp32 with and without tf32, fp16, bf16) and the flag
sets its callers produce. The arguments and constexprs of each case come from
the kernel module's ``_*_launch`` function, the same code the launch runs,
called on meta tensors at LLaMA-2-7B sizes; the signature and the divisibility
attributes come from Triton's own argument specialization, as the JIT would
derive them (every CUDA allocation is at least 16-byte aligned, as a meta
tensor's null data pointer is).

:func:`compile_case` runs ``triton.compile(ASTSource(...), target=GPUTarget(
"cuda", arch, 32))`` and reads the ``ptxas -v`` report of the ptxas that ships
in the Triton wheel (Triton's own cubin step runs it with ``-v``; its log is
captured rather than assembling the PTX a second time): registers, spill
stores and loads, stack, and shared memory (Triton's dynamic allocation plus
ptxas' static). :func:`problems` says what is wrong with a result. The test
tests/test_kernels_compile.py and bench/bench_kernels_compile.py both use
these functions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import itertools
import os
import re
import subprocess
import time
from dataclasses import dataclass, field

import torch

from kncore.ops._kernels import kernel_module

# Shared memory one block may use, opt-in maximum (CUDA C Programming Guide,
# compute capability table): 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = tuple(SMEM_LIMIT)

# LLaMA-2-7B sizes: every supported model's widths are multiples of 16, so the
# divisibility the JIT sees on a real model is the one seen here.
ROWS, D_MODEL, D_FF, GROUPS = 640, 4096, 11008, 32


@dataclass
class Case:
    kernel: str          # kernel function name
    config: str          # autotune configuration (or the fixed block sizes)
    variant: str         # dtype and flags
    fn: object = field(repr=False)
    signature: dict = field(repr=False)
    constexprs: dict = field(repr=False)
    attrs: dict = field(repr=False)
    num_warps: int = 4
    num_stages: int = 3

    @property
    def key(self) -> str:
        return f"{self.kernel}[{self.config}]({self.variant})"


def _config_name(cfg) -> str:
    kw = "_".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in cfg.kwargs.items())
    return f"{kw}_w{cfg.num_warps}_s{cfg.num_stages}"


@functools.lru_cache(maxsize=None)
def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


def _specialize(fn, args, flags, arch=90):
    """(signature, constexprs, attrs) the JIT derives for ``fn(*args, **flags)``
    (the CUDA backend specializes arguments the same way on sm_80 and sm_90)."""
    from triton.runtime.jit import native_specialize_impl

    backend = _backend(arch)
    names = fn.arg_names
    runtime = [n for i, n in enumerate(names) if not fn.params[i].is_constexpr]
    if len(runtime) != len(args):
        raise ValueError(f"{fn.__name__}: {len(args)} launch arguments for {len(runtime)} parameters")
    signature, constexprs, attrs = {}, {}, {}
    values = dict(zip(runtime, args), **flags)
    for i, name in enumerate(names):
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = values[name]
            continue
        ty, spec = native_specialize_impl(type(backend), values[name], False, True, True)
        signature[name] = ty
        if ty == "constexpr":  # None, or an integer equal to 1
            constexprs[(i,)] = spec
        elif isinstance(spec, str) and spec:
            attrs[(i,)] = backend.parse_attr(spec)
    return signature, constexprs, attrs


def _meta(*shape, dtype):
    return torch.empty(*shape, device="meta", dtype=dtype)


@contextlib.contextmanager
def _allow_tf32(on: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def dtype_modes():
    """(name, dtype, allow_tf32) for every dtype the ops accept; fp32 once per tf32 setting."""
    modes = []
    for dt in kernel_module("mlp_capture").DTYPES:
        name = str(dt).replace("torch.", "").replace("float", "fp").replace("bfp", "bf")
        if dt == torch.float32:
            modes += [(f"{name}-ieee", dt, False), (f"{name}-tf32", dt, True)]
        else:
            modes.append((name, dt, False))
    return modes


def _mlp_variants(dtype):
    """(name, kwargs of _launch) of the fused MLP: the runtime's calls per
    architecture (return_pre, and store_up under grad) and the op's every flag at once."""
    MC = kernel_module("mlp_capture")
    x = _meta(ROWS, D_MODEL, dtype=dtype)
    linear = _meta(D_FF, D_MODEL, dtype=dtype).t()   # nn.Linear weight, as the runtime passes it
    conv1d = _meta(D_MODEL, D_FF, dtype=dtype)       # GPT-2 Conv1D weight
    bias = _meta(D_FF, dtype=dtype)
    none = dict(b=None, w_up=None, b_up=None, neuron_scale=None, neuron_rows=None)
    out = {
        "llama": dict(none, x=x, w=linear, w_up=linear, act="silu", store_pre=True, store_up=True),
        "gpt2": dict(none, x=x, w=conv1d, b=bias, act="gelu_tanh", store_pre=True, store_up=False),
        "all-flags": dict(x=x, w=linear, b=bias, w_up=linear, b_up=bias, act="gelu",
                          neuron_scale=_meta(D_FF, dtype=torch.float32), neuron_rows=_meta(ROWS, dtype=torch.bool),
                          store_pre=True, store_up=True),
        "relu-none": dict(none, x=x, w=linear, act="relu", store_pre=False, store_up=False),
    }
    assert set(MC.ACTIVATIONS) <= {v["act"] for v in out.values()}
    return out


def _mlp_cases():
    MC = kernel_module("mlp_capture")
    fn = MC._mlp_capture_kernel
    for (dname, dtype, tf32), (vname, kw) in itertools.product(dtype_modes(), _mlp_variants(torch.float32).items()):
        kw = _mlp_variants(dtype)[vname]
        with _allow_tf32(tf32):
            _, args, flags = MC._launch(**kw)
        configs = MC._prune_configs(MC._AUTOTUNE_CONFIGS, dtype.itemsize, flags)
        for cfg in configs:
            sig, const, attrs = _specialize(fn, args, dict(flags, **cfg.kwargs))
            yield Case(fn.__name__, _config_name(cfg), f"{dname} {vname}", fn, sig, const, attrs,
                       cfg.num_warps, cfg.num_stages)


def _ig_cases():
    IG = kernel_module("ig_steps")
    R = ROWS
    for dname, dtype, tf32 in dtype_modes():
        index = _meta(R, dtype=torch.long)
        alphas = _meta(R, dtype=torch.float32)
        with _allow_tf32(tf32):
            if not tf32:  # expand and segment_sum have no dot: once per dtype
                plain = dname.split("-")[0]
                base = _meta(GROUPS, D_MODEL, dtype=dtype)
                for bname, bias in (("no bias", None), ("bias [D]", _meta(D_MODEL, dtype=dtype)),
                                    ("bias [G, D]", _meta(GROUPS, D_MODEL, dtype=dtype))):
                    _, _, args, flags = IG._expand_launch(base, index, alphas, bias)
                    fn = IG._expand_kernel
                    sig, const, attrs = _specialize(fn, args, flags)
                    yield Case(fn.__name__, f"D{flags['BLOCK_D']}", f"{plain} {bname}", fn, sig, const, attrs)
                rows = _meta(R, D_MODEL, dtype=dtype)
                for wname, w in (("weights", alphas), ("no weights", None)):
                    _, _, args, flags = IG._segment_sum_launch(rows, index, GROUPS, w)
                    fn = IG._segment_sum_kernel
                    sig, const, attrs = _specialize(fn, args, flags)
                    yield Case(fn.__name__, f"D{flags['BLOCK_D']}", f"{plain} {wname}", fn, sig, const, attrs)
            gs = _meta(GROUPS, D_MODEL, dtype=torch.float32)
            act = _meta(GROUPS, D_FF, dtype=dtype)
            # adapters' down_weight [d_ff, d_model]: nn.Linear's weight.t(), GPT-2's Conv1D weight
            for lname, w_down in (("linear", _meta(D_MODEL, D_FF, dtype=dtype).t()),
                                  ("conv1d", _meta(D_FF, D_MODEL, dtype=dtype))):
                _, _, args, flags = IG._project_launch(gs, w_down, act)
                fn = IG._project_kernel
                for cfg in IG._PROJECT_CONFIGS:
                    sig, const, attrs = _specialize(fn, args, dict(flags, **cfg.kwargs))
                    yield Case(fn.__name__, _config_name(cfg), f"{dname} {lname}", fn, sig, const, attrs,
                               cfg.num_warps, cfg.num_stages)


def cases(archs=ARCHS) -> list[tuple[Case, int]]:
    """Every (case, arch) dispatch can launch. No variant stands for another:
    ptxas spilled in the flag-free ReLU variant and in LLaMA's where the variant
    with every flag did not."""
    if kernel_module("mlp_capture").INTERPRETED:
        raise RuntimeError("kncore.kernels.aot.cases needs Triton out of interpreter mode "
                           "(TRITON_INTERPRET unset before triton is imported); compile_all runs it in such workers")
    out = []
    for c in itertools.chain(_mlp_cases(), _ig_cases()):
        out += [(c, a) for a in archs]
    return out


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict:
    """Registers, stack, spill stores/loads and static shared memory from ``ptxas -v``."""
    if "Used" not in log:
        raise ValueError(f"no 'Used N registers' line in the ptxas -v output:\n{log}")
    return {k: int(m.group(1)) if (m := rx.search(log)) else 0 for k, rx in _PTXAS.items()}


def ptxas_path(arch: int) -> str:
    """The ptxas of the Triton wheel that Triton itself uses for ``arch``."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def compile_case(case: Case, arch: int) -> dict:
    """Compile one case for sm_<arch>; the ptxas figures, shared bytes and seconds, or ``error``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(kernel=case.kernel, config=case.config, variant=case.variant, target=f"sm_{arch}")
    t0 = time.perf_counter()
    log = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # Triton's cubin step runs ptxas -v; print its log
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(case.fn, case.signature, case.constexprs, case.attrs),
                               target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    except Exception as e:  # noqa: BLE001 -- a failed compile is a result, reported by problems()
        row.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
                   seconds=round(time.perf_counter() - t0, 2))
        return row
    finally:
        knobs.nvidia.dump_ptxas_log = old
    text = log.getvalue()
    if "Used" not in text:  # a Triton that does not print the log: assemble the PTX with -v here
        text = _run_ptxas(k.asm["ptx"], arch)
    row.update(parse_ptxas(text))
    row["shared"] = int(k.metadata.shared) + row["static_smem"]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _run_ptxas(ptx: str, arch: int) -> str:
    import tempfile

    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                            "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {r.stderr.strip()}")
    return r.stderr + r.stdout


def problems(row: dict) -> list[str]:
    """What disqualifies a compiled case: a failed compile, spills, too much shared memory."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded "
                   f"({row['registers']} registers)")
    limit = SMEM_LIMIT[int(row["target"][3:])]
    if row["shared"] > limit:
        out.append(f"needs {row['shared']} B of shared memory; {row['target']} has {limit}")
    return out


def _worker_init(cache_dir: str):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    torch.set_num_threads(1)


_CASES = None


def _all_cases() -> dict:
    global _CASES
    if _CASES is None:
        _CASES = {(c.key, a): c for c, a in cases()}
    return _CASES


def _keys() -> list:
    return [(c.key, a) for c, a in cases()]


def _compile_job(job):
    """job: (key, arch) or (key, arch, {constexpr name: value}) to compile the case with other block sizes."""
    key, arch, *blocks = job
    case = _all_cases()[(key, arch)]
    if blocks and blocks[0]:
        const = dict(case.constexprs)
        for name, v in blocks[0].items():
            const[(case.fn.arg_names.index(name),)] = v
        case = dataclasses.replace(case, constexprs=const, config="+".join(f"{k}={v}" for k, v in blocks[0].items()))
    return compile_case(case, arch)


@contextlib.contextmanager
def _pool(workers: int):
    """Worker processes that compile (Triton not in interpreter mode, whatever
    this process runs in) with a Triton cache that starts empty, so that every
    case is really compiled."""
    import multiprocessing as mp
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    interp = os.environ.pop("TRITON_INTERPRET", None)  # spawned workers copy the environment
    try:
        with tempfile.TemporaryDirectory(prefix="kncore-aot-") as cache_dir, \
                ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                    initargs=(cache_dir,)) as ex:
            ex.submit(int).result()  # start the workers while the variable is unset
            yield ex
    finally:
        if interp is not None:
            os.environ["TRITON_INTERPRET"] = interp


def compile_all(workers: int = 2, jobs=None, kernels=None) -> list[dict]:
    """Compile :func:`cases` (those of the kernel functions named in ``kernels``,
    or ``jobs``, see :func:`_compile_job`) in ``workers`` fresh processes; one
    row per case and target, in order."""
    with _pool(workers) as ex:
        if jobs is None:
            jobs = [k for k in ex.submit(_keys).result() if not kernels or k[0].split("[")[0] in kernels]
        return list(ex.map(_compile_job, jobs))
