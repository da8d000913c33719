"""Every Triton kernel compiled ahead of time for A100 (sm_80) and H100 (sm_90), on the CPU.

Triton's own compiler (``triton.compile(ASTSource(...), target=GPUTarget(...))``)
and the ptxas of the Triton wheel need no GPU. Every configuration dispatch can
launch (kncore.kernels.aot.cases: each autotune configuration after the
kernel's own pruning, each dtype, the callers' flag sets) must compile, keep
within its registers (no spill) and within the target's shared memory.
Compiles run in two fresh processes with an empty Triton cache, so nothing
from an earlier run can make this pass. bench/bench_kernels_compile.py writes
the same figures as a table.
"""
import dataclasses

import pytest

triton = pytest.importorskip("triton")

from kncore.ops._kernels import kernel_module  # noqa: E402

A = kernel_module("aot")


def test_kernels_compile_for_sm80_and_sm90():
    selected = A.cases(full=False)
    kernels = {c.kernel for c, _ in selected}
    assert kernels == {"_mlp_capture_kernel", "_expand_kernel", "_segment_sum_kernel", "_project_kernel"}
    assert {c.variant.split()[0] for c, _ in selected} == {"fp32-ieee", "fp32-tf32", "fp16", "bf16"}
    rows = A.compile_all(selected, workers=2)
    bad = [f"{r['kernel']}[{r['config']}]({r['variant']}) {r['target']}: {'; '.join(A.problems(r))}"
           for r in rows if A.problems(r)]
    assert not bad, "\n".join(bad)
    assert all(r["registers"] > 0 for r in rows)


def _replace_config(case, **blocks):
    const = dict(case.constexprs)
    for name, v in blocks.items():
        const[(case.fn.arg_names.index(name),)] = v
    return dataclasses.replace(case, constexprs=const)


def test_compile_check_catches_spills_and_shared_memory(tmp_path, monkeypatch):
    """The checks can fail: configurations outside the lists are flagged."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    by_key = {(c.key, a): c for c, a in A.cases(full=False)}
    # a gated bf16 128x128 tile on 4 warps: 256 fp32 accumulators a thread
    mlp = next(c for (k, a), c in by_key.items() if a == 90 and c.variant == "bf16 all-flags")
    row = A.compile_case(_replace_config(mlp, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32), 90)
    assert any("spills" in p for p in A.problems(row)), row
    # the IG projection with 3 stages of fp32 64x128 and 128x256 tiles: ~480 KiB
    proj = next(c for (k, a), c in by_key.items() if a == 80 and c.kernel == "_project_kernel"
                and c.variant == "fp32-tf32")
    row = A.compile_case(_replace_config(proj, BLOCK_G=64, BLOCK_F=256, BLOCK_D=128), 80)
    assert any("shared memory" in p for p in A.problems(row)), row


def test_parse_ptxas_reads_the_report():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
           "ptxas info    : Function properties for k\n"
           "    144 bytes stack frame, 244 bytes spill stores, 140 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 144 bytes cumulative stack size\n")
    assert A.parse_ptxas(log) == dict(registers=255, stack=144, spill_stores=244, spill_loads=140, static_smem=1024)
    with pytest.raises(ValueError, match="registers"):
        A.parse_ptxas("ptxas fatal   : Unsupported .version 9.4")
