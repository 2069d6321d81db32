"""Several `normbench run` processes on one database divide a suite: every run exactly once; a
run whose orchestrator was killed is taken over by another and resumed from its checkpoint."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_suite


def _cli(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "normbench.cli", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _rows(db: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT run_key, status, epochs_done FROM runs").fetchall()


def test_two_orchestrators_divide_a_suite_and_run_each_run_once(cifar_dir, tmp_path):
    """From an empty cache, so both also decode the dataset into it at the same time."""
    suite = tiny_suite(tmp_path)
    db = tmp_path / "shared.db"
    env = {**os.environ, "NORMBENCH_DATA_DIR": str(cifar_dir),
           "NORMBENCH_CACHE_DIR": str(tmp_path / "empty-cache")}  # fmt: skip
    args = ("run", f"--suite={suite}", "--budget=smoke", f"--db={db}", "--seeds=0,1",
            "--norms=batchnorm,layernorm")  # fmt: skip
    procs = [_cli(*args, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    done = [line for out in outputs for line in out.splitlines() if line.startswith("done ")]
    assert len(done) == 4, outputs  # four runs, each executed by one process only
    assert all(out.count("done ") >= 1 for out in outputs), outputs  # both took a share
    rows = _rows(db)
    assert len(rows) == 4 and {status for _, status, _ in rows} == {"finished"}
    assert "locked" not in "".join(outputs)


@pytest.mark.slow  # bench/kill_fuzz.py does this ten times over
def test_a_killed_orchestrators_run_is_taken_over_and_resumed(cifar_dir, tmp_path):
    suite = tiny_suite(tmp_path)
    suite.write_text(suite.read_text().replace("epochs = 1", "epochs = 3"))
    db = tmp_path / "shared.db"
    env = {**os.environ, "NORMBENCH_DATA_DIR": str(cifar_dir), "NORMBENCH_LEASE_SECONDS": "3"}
    args = ("run", f"--suite={suite}", "--budget=smoke", f"--db={db}")
    first = _cli(*args, env=env)
    deadline = time.monotonic() + 900
    for line in first.stdout:
        if "epoch 1/3:" in line:  # its first checkpoint is written
            first.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "no epoch finished"
    first.wait(timeout=60)
    [(_, status, epochs)] = _rows(db)
    assert (status, epochs) == ("running", 1)  # a dead owner's claim, not yet stale

    second = _cli(*args, env=env)
    out = second.communicate(timeout=900)[0]
    assert second.returncode == 0, out
    assert "take over" in out and "resume" in out, out
    [(_, status, epochs)] = _rows(db)
    assert (status, epochs) == ("finished", 3)


def test_one_orchestrator_with_two_workers_collects_both_results(cifar_dir, tmp_path):
    """``--workers 2``: the executor polls each worker in turn without waiting, and still reads
    every event and result each has sent. The two workers share the cores: each computes with
    half of this process's threads (at least one), which the runs record, and the plan's total
    is the time until the later of the two parallel runs ends."""
    import json

    import torch
    from helpers import invoke

    suite = tiny_suite(tmp_path)
    db = tmp_path / "two-workers.db"
    result = invoke("run", f"--suite={suite}", "--budget=smoke", "--seeds=0,1", "--workers=2",
                    f"--db={db}")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Summary: 2 finished" in result.output
    assert "with 2 runs at once" in result.output
    assert sorted(status for _, status, _ in _rows(db)) == ["finished", "finished"]
    half = max(1, torch.get_num_threads() // 2)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        recorded = [json.loads(p) for (p,) in conn.execute("SELECT provenance FROM runs")]
    assert [p["threads"] for p in recorded] == [half, half]
    assert all(p["device_name"].endswith(f" x{half} threads") for p in recorded)
