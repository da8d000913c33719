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
import pytest

triton = pytest.importorskip("triton")

from kncore.ops._kernels import kernel_module  # noqa: E402

A = kernel_module("aot")


def test_kernels_compile_for_sm80_and_sm90():
    rows = A.compile_all(workers=2)
    assert {r["kernel"] for r in rows} == {"_mlp_capture_kernel", "_expand_kernel", "_segment_sum_kernel",
                                           "_project_kernel"}
    for kernel in ("_mlp_capture_kernel", "_project_kernel"):
        assert {r["variant"].split()[0] for r in rows if r["kernel"] == kernel} == {"fp32-ieee", "fp32-tf32", "fp16",
                                                                                  "bf16"}
    assert {r["target"] for r in rows} == {"sm_80", "sm_90"}
    bad = [f"{r['kernel']}[{r['config']}]({r['variant']}) {r['target']}: {'; '.join(A.problems(r))}"
           for r in rows if A.problems(r)]
    assert not bad, "\n".join(bad)
    assert all(r["registers"] > 0 for r in rows)


def test_compile_check_catches_spills_and_shared_memory():
    """The checks can fail: block sizes outside the lists are flagged."""
    proj = "_project_kernel[G16_F64_D64_w4_s4](fp32-tf32 linear)"
    jobs = [(proj, 90, dict(BLOCK_G=128, BLOCK_F=128, BLOCK_D=16)),  # 128 accumulators a thread, and operands
            (proj, 80, dict(BLOCK_G=16, BLOCK_F=64, BLOCK_D=512))]   # 2 stages of 16x512 and 512x64 fp32 tiles
    spill, smem = A.compile_all(jobs=jobs, workers=2)
    assert any("spills" in p for p in A.problems(spill)), spill
    assert any("shared memory" in p for p in A.problems(smem)), smem


def test_parse_ptxas_reads_the_report():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
           "ptxas info    : Function properties for k\n"
           "    144 bytes stack frame, 244 bytes spill stores, 140 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 144 bytes cumulative stack size\n")
    assert A.parse_ptxas(log) == dict(registers=255, stack=144, spill_stores=244, spill_loads=140, static_smem=1024)
    with pytest.raises(ValueError, match="registers"):
        A.parse_ptxas("ptxas fatal   : Unsupported .version 9.4")
