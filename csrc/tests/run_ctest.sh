#!/bin/sh
# Configure, build and run the C++ unit tests of csrc/ (CMakeLists.txt at the repo root).
#   csrc/tests/run_ctest.sh [build-dir]      default build dir: build/ctest (incremental)
# PYTHON picks the interpreter whose torch provides libtorch (default: python3).
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build/ctest}
python=${PYTHON:-python3}
generator=""
if command -v ninja >/dev/null 2>&1; then generator="-G Ninja"; fi
if [ ! -f "$build/CMakeCache.txt" ]; then
  # shellcheck disable=SC2086
  cmake -S "$root" -B "$build" $generator -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$python"
fi
cmake --build "$build" -j "${JOBS:-2}"
cd "$build" && ctest --output-on-failure
