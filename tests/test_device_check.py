"""bench/device_check.sh, the GPU checks prepared for a session with a device
machine, runs through on this machine with SMOKE=1 (tiny shapes, Triton in its
interpreter): every step's command line is valid and exits 0, and its logs and
result archive land in $OUT. A bench whose flags change breaks this test, not
the device lease."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("part", ["1", "2"])
def test_device_check_smoke(part, tmp_path):
    env = dict(os.environ, SMOKE="1", PY=sys.executable, OUT=str(tmp_path))
    r = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), part], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    log = (tmp_path / f"device_check_{part}.log").read_text()
    assert r.returncode == 0, r.stderr[-2000:]
    codes = re.findall(r"^=== (\S+): rc=(\d+) in", log, flags=re.M)
    assert len(codes) >= 4, log[-3000:]
    failed = [name for name, rc in codes if rc != "0"]
    assert not failed, f"steps failed: {failed}\n{log[-4000:]}"
    assert log.rstrip().endswith("0 failed")
    assert (tmp_path / f"results_{part}.tar.gz").is_file()


def test_device_check_refuses_a_bad_part():
    r = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "usage" in r.stderr
