"""Run directories: atomic commits, done keys, resume after SIGKILL with no lost
and no duplicated rows, refusal of a different config, bounded dense tensors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from kncore import InputError
from kncore.cli import main
from kncore.rundir import RunDir, RunDirMismatch, run_items
from kncore.testing import tiny_lm

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


def _rows(rng, keys, per=3):
    return [{"key": k, "layer": int(rng.integers(0, 30)), "neuron": int(rng.integers(0, 5000)),
             "score": float(rng.normal())} for k in keys for _ in range(int(rng.integers(0, per + 1)))]


def test_commit_read_done_keys(tmp_path):
    rng = np.random.default_rng(_seed())
    rd = RunDir.open(tmp_path / "r", {"x": 1})
    keys = [f"k{i:03d}" for i in rng.permutation(40)]
    want = []
    for i in range(0, 40, 7):
        chunk = keys[i:i + 7]
        rows = _rows(rng, chunk)
        want += rows
        # every key of the chunk is done, also those that gave no row
        rd.commit({"kn": rows, "meta": [{"key": k, "n": 1} for k in chunk]}, keys=chunk)
    assert rd.done_keys("kn") == set(keys) == rd.done_keys("meta") == rd.done_keys()
    got = rd.read("kn").to_pylist()
    order = sorted(range(len(want)), key=lambda i: want[i]["key"])  # stable: rows of a key keep their order
    assert got == [want[i] for i in order]
    assert rd.read("kn", sort=False).num_rows == len(want)
    assert rd.tables() == ["kn", "meta"]
    assert rd.summary()["meta"] == {"rows": 40, "keys": 40}
    assert rd.read("absent").num_rows == 0
    rd.close()


def test_append_keys_from_rows_and_explicit(tmp_path):
    rd = RunDir.open(tmp_path / "r", {})
    rd.append("t", [{"key": "a", "v": 1}, {"key": "a", "v": 2}, {"key": "b", "v": 3}])
    rd.append("t", [], keys=["c"])
    assert rd.done_keys("t") == {"a", "b", "c"}
    with pytest.raises(ValueError, match="no 'key' column"):
        rd.append("t", [{"v": 1}])
    with pytest.raises(InputError, match="bad table name"):
        rd.append("../evil", [{"key": "x"}])
    rd.close()


def test_reopen_resumes_and_refuses_other_config(tmp_path):
    seed = _seed() % 1000
    lm = tiny_lm("llama", seed=seed)
    cfg = {"steps": 20, "layers": [1, 2], "data": "pararel"}
    rd = RunDir.open(tmp_path / "r", cfg, lm, command="localise")
    rd.append("t", [{"key": "a", "v": 1.5}])
    rd.close()
    man = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert man["model"]["fingerprint"] == lm.fingerprint()
    assert {"python", "torch", "transformers", "kncore"} <= set(man["versions"])
    assert man["config"] == {"steps": 20, "layers": [1, 2], "data": "pararel"}
    assert "git" in man
    # the same config (tuples are lists in JSON) reopens, with what was done
    rd = RunDir.open(tmp_path / "r", {"steps": 20, "layers": (1, 2), "data": "pararel"}, lm, command="localise")
    assert rd.done_keys("t") == {"a"} and len(rd.manifest["sessions"]) == 2
    rd.close()
    with pytest.raises(RunDirMismatch) as e:
        RunDir.open(tmp_path / "r", {"steps": 30, "layers": [1, 2], "seed": 0}, lm, command="localise")
    msg = str(e.value)
    assert "steps: 20 -> 30" in msg and "data: 'pararel' -> (absent)" in msg and "seed: (absent) -> 0" in msg
    assert "layers" not in msg
    with pytest.raises(RunDirMismatch, match="command: 'localise' -> 'trace'"):
        RunDir.open(tmp_path / "r", cfg, lm, command="trace")
    other = tiny_lm("llama", seed=seed + 1)
    with pytest.raises(RunDirMismatch, match="model fingerprint"):
        RunDir.open(tmp_path / "r", cfg, other, command="localise")
    assert RunDir.load(tmp_path / "r").read("t").num_rows == 1  # nothing was mixed in


def test_second_writer_refused(tmp_path):
    # flock() treats each open() separately, so a second open in this process
    # stands for another process.
    rd = RunDir.open(tmp_path / "r", {})
    with pytest.raises(InputError, match="in use by another process"):
        RunDir.open(tmp_path / "r", {})
    RunDir.open(tmp_path / "r", {}, rank=1).close()  # another rank has its own lock
    rd.close()
    RunDir.open(tmp_path / "r", {}).close()


def test_uncommitted_parts_are_invisible_and_replaced(tmp_path):
    """A writer killed between a part and its commit record leaves an orphan; it is never read."""
    import pyarrow.parquet as pq

    rd = RunDir.open(tmp_path / "r", {})
    rd.append("t", [{"key": "a", "v": 1}])
    orphan = tmp_path / "r" / "tables" / "t" / "part-r000-000001.parquet"
    pq.write_table(pa.Table.from_pylist([{"key": "zz", "v": 99}]), orphan)
    (tmp_path / "r" / "tables" / "t" / ".tmp-part-r000-000002.parquet.x").write_bytes(b"half")
    rd.close()
    rd = RunDir.open(tmp_path / "r", {})
    assert not list((tmp_path / "r" / "tables" / "t").glob(".tmp-*"))  # temp files cleaned on open
    assert rd.read("t").to_pylist() == [{"key": "a", "v": 1}]
    rd.append("t", [{"key": "b", "v": 2}])  # takes sequence 1 and replaces the orphan
    assert rd.read("t").to_pylist() == [{"key": "a", "v": 1}, {"key": "b", "v": 2}]
    rd.close()


def test_tensors_bounded_and_atomic(tmp_path):
    rd = RunDir.open(tmp_path / "r", {}, tensor_limit=4096)
    t = {"a": torch.randn(7, 11), "b": torch.randint(0, 9, (5,))}
    p = rd.save_tensors("small", t)
    back = rd.load_tensors("small")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"]) and p.exists()
    with pytest.raises(InputError, match=r"would take .* GiB, above the limit"):
        rd.save_tensors("big", {"x": torch.randn(40, 40)})
    assert not list((tmp_path / "r" / "tensors").glob("big*"))
    # tensors travel with a commit and merge on load
    rd.commit({"t": [{"key": "k1"}]}, tensors={"dense": {"k1": torch.ones(3)}})
    rd.commit({"t": [{"key": "k2"}]}, tensors={"dense": {"k2": torch.zeros(2)}})
    d = rd.load_tensors("dense")
    assert set(d) == {"k1", "k2"} and torch.equal(d["k1"], torch.ones(3))
    rd.close()


def test_run_items_resumes_without_duplicates(tmp_path):
    """run_items skips committed keys; an exception mid-way loses only the chunk in flight."""
    rng = np.random.default_rng(_seed())
    items = [(f"{i:04d}", float(v)) for i, v in enumerate(rng.normal(size=23))]
    calls = []

    def work(chunk, fail_at=None):
        calls.append(len(chunk))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return {"t": [{"key": f"{i:04d}", "v": v * 2} for i, v in chunk]}

    items_idx = [(k, (int(k), v)) for k, v in items]
    rd = RunDir.open(tmp_path / "r", {})
    with pytest.raises(KeyboardInterrupt):
        run_items(rd, items_idx, lambda c: work(c, fail_at=3), table="t", chunk=5, commit_seconds=None)
    assert len(rd.done_keys("t")) == 10
    calls.clear()
    assert run_items(rd, items_idx, work, table="t", chunk=5, commit_seconds=None) == 13
    assert calls == [5, 5, 3]
    got = rd.read("t").to_pylist()
    assert [r["key"] for r in got] == [k for k, _ in items]
    assert [r["v"] for r in got] == [v * 2 for _, v in items]
    with pytest.raises(InputError, match="distinct keys"):
        run_items(rd, [("a", 1), ("a", 2)], work, table="t")
    rd.close()


# -- a real command killed with SIGKILL, then resumed --------------------------------------------
def _cli(args, out: Path, **popen_kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "kncore", *args, "--out", str(out), "--no-progress"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen_kw)


def _commits(out: Path) -> int:
    d = out / "commits"
    return len(list(d.glob("r*.json"))) if d.is_dir() else 0


def test_kill9_then_resume_equals_uninterrupted(tmp_path):
    words = "the capital of canada is france paris italy rome city country big small red blue".split()
    rng = np.random.default_rng(_seed())
    recs = [{"prompt": " ".join(rng.choice(words, int(rng.integers(2, 7)))),
             "target": str(rng.choice(["ottawa", "paris", "rome", "berlin"]))} for _ in range(14)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    model = f"tiny-gpt2:{int(rng.integers(100))}"
    args = ["attribute", "--model", model, "--data", str(data), "--steps", "6", "--chunk", "1", "--save-dense",
            "--batch-size", "4"]

    killed = tmp_path / "killed"
    p = _cli(args, killed)
    t0 = time.time()
    while _commits(killed) < 2 and p.poll() is None and time.time() - t0 < 240:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    n_before = len(RunDir.load(killed).done_keys("attribution"))
    assert 2 <= n_before < len(recs), "the run was not interrupted mid-way"

    p = _cli(args, killed)
    # the uninterrupted run, here (one thread, as the subprocess), while the resumed one runs
    whole = tmp_path / "whole"
    assert main([*args, "--out", str(whole), "--no-progress"]) == 0
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err

    a, b = RunDir.load(killed), RunDir.load(whole)
    assert len(a.manifest["sessions"]) == 2
    for table in ("attribution", "kn"):
        ta, tb = a.read(table), b.read(table)
        assert ta.num_rows == tb.num_rows and ta.num_rows > 0
        assert ta.equals(tb), table
    keys = a.read("attribution").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == len(recs)
    da, db = a.load_tensors("scores"), b.load_tensors("scores")
    assert set(da) == set(db) == set(keys)
    for k in keys:
        assert torch.equal(da[k], db[k])
