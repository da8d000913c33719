#!/usr/bin/env bash
# The GPU checks of the open issues, prepared for a session that is lent a
# device machine (15 minutes of device time in all, a start included; at most
# 10 per command). In two parts, each at most 9 minutes by its steps' limits
# and about 5-6 expected on an H100; call part 2 right after part 1, while the
# machine is warm and keeps the built extension:
#
#   bash bench/device_check.sh 1   # build kncore._C, op and kernel tests compiled on the GPU,
#                                  # bench_kernels (#4), the kernels' ptxas table with the image's
#                                  # Triton (#16), bench_cov + bench_rank1 (#5)
#   bash bench/device_check.sh 2   # bench_ig at LLaMA-2-7B shape in bf16 (#3), one ROME edit
#                                  # at GPT-2 XL shape (#6), bench_trace at GPT-2-medium and -XL shapes (#7)
#
# It needs nothing beyond the device image (torch, triton, transformers,
# pytest, numpy, scipy): no wheels to carry. It builds the extension in place
# and imports kncore from the checkout (PYTHONPATH), as `make` would through
# an editable install. Every step has its own time limit, so a step that hangs
# costs only its share; the log ends each step with its exit code and seconds.
# Logs and the result files of bench/results/ come back through $OUT
# (device_check_<part>.log, results_<part>.tar.gz).
#
# SMOKE=1 runs the same steps on tiny shapes on whatever machine this is (the
# CPU here: Triton in its interpreter) to check the script itself; its figures
# mean nothing and nothing is written to bench/results/.
set -u
PART=${1:-}
case "$PART" in 1|2) ;; *) echo "usage: bench/device_check.sh 1|2" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/kncore-device}
mkdir -p "$OUT"
LOG="$OUT/device_check_$PART.log"
: > "$LOG"
PY=${PY:-python3}
SMOKE=${SMOKE:-0}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" KNCORE_REQUIRE_EXT=1
if [ "$SMOKE" = 1 ]; then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
STAMP=$(mktemp)  # result files newer than this are this run's

step() {  # step NAME SECONDS CMD...: run with a time limit, log output and exit code
  local name=$1 limit=$2 t0 rc
  shift 2
  # the limits budget the device lease; a smoke run on a shared CPU (the test
  # suite's) gets four times as long, so a busy machine is not a failed step
  if [ "$SMOKE" = 1 ]; then limit=$((limit * 4)); fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $(($(date +%s) - t0))s" | tee -a "$LOG"
}

step environment 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null;
  $PY -c 'import sys, torch, triton, transformers; print(sys.version.split()[0], \"torch\", torch.__version__,
  \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"transformers\", transformers.__version__,
  \"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'"
# the C++ ops for this machine's torch (a CUDA torch builds the same ATen ops;
# the .so lands in kncore/, where kncore._ext finds it)
if ! ls kncore/_C*.so >/dev/null 2>&1; then
  step build 300 env MAX_JOBS="$(nproc)" "$PY" setup.py -q build_ext --inplace
fi
step info 60 "$PY" -m kncore.info

if [ "$PART" = 1 ]; then
  # compiled Triton kernels and the ops' CUDA paths (the *cuda* test ids), against their references
  step gpu-tests 180 "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda \
    tests/test_mlp_capture.py tests/test_ig_steps.py tests/test_cov_accumulate.py tests/test_rank1_update.py
  if [ "$SMOKE" = 1 ]; then
    step bench_kernels 300 "$PY" bench/bench_kernels.py --smoke
    step kernels_compile 120 "$PY" bench/bench_kernels_compile.py --kernel _expand_kernel --workers 1
    step bench_cov 120 "$PY" bench/bench_cov.py --d 256 --rows 512 --reps 2 --cases fp32 masked --no-write
    step bench_rank1 120 "$PY" bench/bench_rank1.py --shape 256 512 --quick --no-write
  else
    step bench_kernels 150 "$PY" bench/bench_kernels.py --quick
    # every kernel configuration compiled with this image's Triton: registers, spills, shared memory
    step kernels_compile 60 "$PY" bench/bench_kernels_compile.py --workers "$(nproc)"
    step bench_cov 90 "$PY" bench/bench_cov.py --d 4096 16384 --cases fp32 tf32 'bf16->fp32' masked
    step bench_rank1 60 "$PY" bench/bench_rank1.py --quick
  fi
else
  if [ "$SMOKE" = 1 ]; then
    step bench_ig 300 "$PY" bench/bench_ig.py --quick --shape llama-small --skip-completeness --out "$(mktemp -d)"
    step bench_rome 300 "$PY" bench/bench_rome.py --smoke
    step bench_trace 300 "$PY" bench/bench_trace.py --quick --naive-cells 6 --repeats 1 --machine smoke
    rm -f bench/results/trace_smoke_*
  else
    step bench_ig 180 "$PY" bench/bench_ig.py --device cuda --shape llama2-7b --dtype bf16 --prompts 8 \
      --repeats 2 --skip-completeness
    step bench_rome-xl 120 "$PY" bench/bench_rome.py --device cuda --runs 3
    step bench_trace-medium 90 "$PY" bench/bench_trace.py --device cuda --config medium
    step bench_trace-xl 150 "$PY" bench/bench_trace.py --device cuda --config xl
  fi
fi

find bench/results -type f -newer "$STAMP" > "$OUT/files_$PART.txt"
tar -czf "$OUT/results_$PART.tar.gz" -T "$OUT/files_$PART.txt"
rm -f "$STAMP" "$OUT/files_$PART.txt"
echo "=== done: $(grep -c '^=== .*: rc=0 ' "$LOG") steps passed, $(grep -Ec '^=== .*: rc=[1-9]' "$LOG") failed" | tee -a "$LOG"
