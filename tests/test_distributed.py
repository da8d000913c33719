"""Scale-out: the helpers are the identity on one process, and two gloo
processes on loopback (launched by torch.distributed.run) give merged results
equal to one process's, for the helpers and for a whole CLI command."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kncore import distributed as D
from kncore.cli import main
from kncore.rundir import RunDir, run_items

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine
    spinning OpenMP threads made each tiny matmul ~200x slower (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _seed():
    return int(torch.randint(0, 1 << 30, ()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, n=2, timeout=420):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(n),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_shard_is_a_deterministic_strided_partition():
    rng = np.random.default_rng(_seed())
    items = list(rng.integers(0, 1000, int(rng.integers(1, 50))))
    for w in (1, 2, 3, 7):
        parts = [D.shard(items, rank=r, world=w) for r in range(w)]
        assert parts == [D.shard(items, rank=r, world=w) for r in range(w)]
        assert sorted(x for p in parts for x in p) == sorted(items)
        assert parts[0] == items[0::w]
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="outside world"):
        D.shard(items, rank=2, world=2)


def test_single_process_is_the_identity():
    assert D.rank() == 0 and D.world() == 1 and not D.is_distributed()
    rows = [{"a": 1}, {"a": 2}]
    assert D.gather_rows(rows) == rows
    t = torch.randn(5)
    ref = t.clone()
    assert D.all_reduce_(t) is t and torch.equal(t, ref)
    assert D.broadcast_object({"x": 3}) == {"x": 3}
    assert D.shard([1, 2, 3]) == [1, 2, 3]
    assert D.init("cpu") == torch.device("cpu")  # not launched: no process group
    assert not D.is_distributed()


_SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    from kncore import distributed as D
    from kncore.rundir import RunDir, run_items

    out, seed = sys.argv[1], int(sys.argv[2])
    D.init("cpu")
    r, w = D.rank(), D.world()
    g = torch.Generator().manual_seed(seed + r)
    t = torch.randn(6, generator=g, dtype=torch.float64)
    mine = t.clone()
    D.all_reduce_(t)
    m = mine.clone()
    D.all_reduce_(m, op="max")
    rows = D.gather_rows([{"rank": r, "i": i} for i in range(r + 2)])
    b = D.broadcast_object({"from": r, "seed": seed} if r == 0 else None)
    items = [(f"{i:03d}", i) for i in range(11)]
    rd = RunDir.open(out + "/run", {"seed": seed}) if r == 0 else None
    n = run_items(rd, items, lambda ch: {"t": [{"key": f"{i:03d}", "sq": i * i, "rank": r} for i in ch]},
                  table="t", chunk=2)
    json.dump({"rank": r, "world": w, "mine": mine.tolist(), "sum": t.tolist(), "max": m.tolist(),
               "rows": rows, "b": b, "n": n}, open(f"{out}/rank{r}.json", "w"))
    D.finalize()
''')


def test_two_gloo_processes(tmp_path):
    seed = _seed()
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT)
    res = _torchrun([str(script), str(tmp_path), str(seed)])
    assert res.returncode == 0, res.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["rank"] for g in got] == [0, 1] and all(g["world"] == 2 for g in got)
    mine = torch.tensor([g["mine"] for g in got], dtype=torch.float64)
    for g in got:
        assert torch.allclose(torch.tensor(g["sum"], dtype=torch.float64), mine.sum(0), rtol=0, atol=1e-12)
        assert torch.equal(torch.tensor(g["max"], dtype=torch.float64), mine.max(0).values)
        assert g["rows"] == [{"rank": 0, "i": 0}, {"rank": 0, "i": 1},
                             {"rank": 1, "i": 0}, {"rank": 1, "i": 1}, {"rank": 1, "i": 2}]
        assert g["b"] == {"from": 0, "seed": seed}
        assert g["n"] == 11
    t = RunDir.load(tmp_path / "run").read("t").to_pylist()
    assert [(x["key"], x["sq"]) for x in t] == [(f"{i:03d}", i * i) for i in range(11)]
    assert {x["rank"] for x in t} == {0, 1}  # both ranks did work; rank 0 wrote it all
    # the same items on one process give the same table, less the rank column
    rd = RunDir.open(tmp_path / "one", {"seed": seed})
    run_items(rd, [(f"{i:03d}", i) for i in range(11)],
              lambda ch: {"t": [{"key": f"{i:03d}", "sq": i * i, "rank": 0} for i in ch]}, table="t", chunk=2)
    assert [{k: v for k, v in x.items() if k != "rank"} for x in rd.read("t").to_pylist()] == \
        [{k: v for k, v in x.items() if k != "rank"} for x in t]
    rd.close()


def test_localise_under_torchrun_equals_one_process(tmp_path):
    rng = np.random.default_rng(_seed())
    subjects = [("canada", "ottawa"), ("france", "paris"), ("italy", "rome"), ("germany", "berlin"),
                ("japan", "tokyo")]
    templates = ["the capital of {} is", "{} has the capital", "the city of {} is", "in {} the capital is",
                 "{} has a capital city"]
    bags = []
    for s, o in subjects:
        k = int(rng.integers(2, len(templates) + 1))
        bags.append({"key": s, "relation": "capital", "subject": s, "target": o,
                     "prompts": [t.format(s) for t in rng.permutation(templates)[:k]]})
    data = tmp_path / "bags.jsonl"
    data.write_text("".join(json.dumps(b) + "\n" for b in bags))
    args = ["localise", "--model", f"tiny-llama:{int(rng.integers(100))}", "--data", str(data), "--steps", "5",
            "--chunk", "2", "--no-progress"]
    res = _torchrun(["-m", "kncore", *args, "--out", str(tmp_path / "two")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = RunDir.load(tmp_path / "two"), RunDir.load(tmp_path / "one")
    assert two.manifest["sessions"][0]["world"] == 2
    # every table: the same keys, rows and integers; floats equal to rounding
    # (the ranks batch different prompts together)
    for table in ("bags", "prompts", "coarse", "localisation", "kn", "effect"):
        a, b = two.read(table).to_pylist(), one.read(table).to_pylist()
        assert len(a) == len(b) and len(a) > 0, table
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys()
            for k in ra:
                if isinstance(ra[k], float):
                    assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-7), (table, k)
                else:
                    assert ra[k] == rb[k], (table, k)
    assert two.manifest["summary"]["facts"] == len(bags)
