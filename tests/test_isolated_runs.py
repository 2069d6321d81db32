"""Runs execute in confined worker processes: a submitted norm that passes the contract and then
turns hostile while training is contained, its run is recorded as failed with the cause, the
suite goes on, and the results database is unchanged by it.

One submitted norm (``HOSTILE``, a BatchNorm) behaves during the contract check and does its
``mode`` once it sees a 32x32 training batch, which only a real run gives it. Each mode is one
run of one suite, so a single ``normbench run`` shows every containment and that the suite goes
on after each.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest
from helpers import invoke, tiny_suite

HOSTILE = '''
import os, signal, subprocess, sys, ctypes
from torch import nn

DB = {db!r}


class Hostile(nn.BatchNorm2d):
    """A BatchNorm that turns hostile in training."""

    def __init__(self, num_channels, mode="none"):
        super().__init__(num_channels)
        self.mode = mode

    def forward(self, x):
        if self.training and x.shape[-1] == 32 and self.mode != "none":
            act(self.mode)
        return super().forward(x)


def act(mode):
    if mode == "delete_db":
        os.remove(DB)
    elif mode == "overwrite_db":
        with open(DB, "r+b") as f:
            f.write(b"not a database any more")
    elif mode == "kill_parent":
        os.kill(os.getppid(), signal.SIGKILL)
    elif mode == "helper":
        subprocess.Popen(["sleep", "300"], start_new_session=True)
    elif mode == "fork_bomb":
        while True:
            os.fork()
    elif mode == "exit0":
        os._exit(0)
    elif mode == "segfault":
        ctypes.string_at(0)
    elif mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "spin":
        while True:
            pass
'''

MODES = {
    # mode: what the stored error of its run must say
    "delete_db": "PermissionError",
    "overwrite_db": "PermissionError",
    "kill_parent": "PermissionError",
    "helper": "PermissionError",
    "fork_bomb": "PermissionError",
    "exit0": "exited before reporting a result",
    "segfault": "SIGSEGV",
    "sigkill": "SIGKILL",
    "spin": "CPU-time limit",
}


def _sleepers() -> set[int]:
    """Every ``sleep 300`` on the machine (the helper process the norm tries to start)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"sleep\x00300"):
            found.add(int(entry.name))
    return found


@pytest.fixture
def hostile(tmp_path) -> tuple[Path, Path]:
    """A results database with one finished run, and the hostile norm submitted to it."""
    db = tmp_path / "results.db"
    norm = tmp_path / "hostile.py"
    norm.write_text(HOSTILE.format(db=str(db)))
    return db, norm


@pytest.mark.skipif(sys.platform != "linux", reason="worker confinement is Linux's")
def test_a_hostile_submitted_norm_is_contained_and_the_suite_goes_on(
    cifar_dir, hostile, tmp_path, monkeypatch
):
    db, norm = hostile
    suite = tiny_suite(tmp_path)
    first = invoke("run", f"--suite={suite}", "--budget=smoke", f"--db={db}")
    assert first.exit_code == 0, first.output
    submitted = invoke("submit", f"{norm}:Hostile", f"--suite={suite}", "--budget=smoke",
                       f"--db={db}", "--timeout=120")  # fmt: skip
    # mode "none" behaves: its run finishes like any other
    assert submitted.exit_code == 0, submitted.output
    assert "recorded as submission/hostile/v1" in submitted.output

    monkeypatch.setenv("NORMBENCH_WORKER_CPU_SECONDS", "20")  # the spinning norm's limit
    norms = ",".join(f"submission/hostile/v1(mode={mode!r})" for mode in MODES)
    before = _sleepers()
    result = invoke("run", f"--suite={suite}", "--budget=smoke", f"--db={db}", f"--norms={norms}")
    assert result.exit_code == 1, result.output  # runs failed: scripts must notice
    assert f"{len(MODES)} run(s) failed" in result.output
    assert _sleepers() <= before, "a helper process was left running"

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = dict(conn.execute("SELECT norm, status || ': ' || COALESCE(error, '') FROM runs"))
    assert rows.pop("batchnorm").startswith("finished")
    assert rows.pop("submission/hostile/v1").startswith("finished")
    for mode, cause in MODES.items():
        stored = rows[f"submission/hostile/v1(mode={mode!r})"]
        assert stored.startswith("failed: "), (mode, stored)
        assert cause in stored, (mode, stored)

    board = invoke("leaderboard", f"--suite={suite}", "--budget=smoke", f"--db={db}",
                   "--format=json")  # fmt: skip
    assert board.exit_code == 0, board.output
    rows = {row["norm"]: row for row in json.loads(board.stdout)}
    for mode in MODES:  # counted as failed, with no number on the board
        row = rows[f"submission/hostile/v1(mode={mode!r})"]
        assert row["status"] == "1 failed", row
        assert row.get("accuracy_mean") is None, row
    assert rows["batchnorm"]["accuracy_mean"] > 0.1


def test_submitted_code_never_runs_in_the_orchestrator(cifar_dir, hostile, tmp_path):
    """The submission is registered by name only in this (the CLI's) process: its module is never
    imported here, at registration or while its run executes."""
    from normbench.norms import NORMS
    from normbench.submissions import SubmittedNorm

    db, norm = hostile
    suite = tiny_suite(tmp_path)
    submitted = invoke("submit", f"{norm}:Hostile", f"--suite={suite}", "--budget=smoke",
                       f"--db={db}")  # fmt: skip
    assert submitted.exit_code == 0, submitted.output
    again = invoke("run", f"--suite={suite}", "--budget=smoke", f"--db={db}",
                   "--norms=submission/hostile/v1", "--force")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert not [m for m in sys.modules if m.startswith("normbench_user_hostile")]
    assert not [m for m in sys.modules if "norm_" in m and "hostile" in m]
    assert issubclass(NORMS.get("submission/hostile/v1").obj, SubmittedNorm)


def test_a_stored_source_that_no_longer_matches_its_hash_is_never_run(cifar_dir, hostile, tmp_path):
    db, norm = hostile
    suite = tiny_suite(tmp_path)
    submitted = invoke("submit", f"{norm}:Hostile", f"--suite={suite}", "--budget=smoke",
                       f"--db={db}")  # fmt: skip
    assert submitted.exit_code == 0, submitted.output
    with sqlite3.connect(db) as conn:  # someone edits the stored code behind normbench's back
        conn.execute("UPDATE submissions SET source = source || '\nprint(\"tampered\")\n'")
    runs_before = _runs(db)
    result = invoke("run", f"--suite={suite}", "--budget=smoke", f"--db={db}",
                    "--norms=submission/hostile/v1", "--force")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "does not match its recorded SHA-256" in result.output
    assert _runs(db) == runs_before


def _runs(db: Path) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT run_key, status, error, epochs_done FROM runs").fetchall()


@pytest.mark.slow  # bench/kill_fuzz.py kills workers 10 times over and checks the same
def test_a_crashed_worker_keeps_its_checkpoint_and_the_same_command_resumes_it(
    cifar_dir, tmp_path, monkeypatch
):
    """A worker killed after its first epoch: the run is failed with the signal as its cause;
    the next `normbench run` resumes it from the epoch checkpoint and finishes it."""
    import signal
    import subprocess
    import time

    suite = tiny_suite(tmp_path)
    suite.write_text(suite.read_text().replace("epochs = 1", "epochs = 3"))
    db = tmp_path / "r.db"
    env = {**os.environ, "NORMBENCH_DATA_DIR": str(cifar_dir)}
    cmd = [sys.executable, "-m", "normbench.cli", "run", f"--suite={suite}", "--budget=smoke",
           f"--db={db}"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    worker = None
    deadline = time.monotonic() + 600
    for line in proc.stderr:
        if "epoch 1/3:" in line:
            worker = _worker_pid(proc.pid)
            os.kill(worker, signal.SIGKILL)
            break
        assert time.monotonic() < deadline
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 1, rest
    assert worker is not None
    (status, error, epochs), = [(s, e, n) for _, s, e, n in _runs(db)]
    assert (status, epochs) == ("failed", 1) and "SIGKILL" in error, (status, error, epochs)

    again = invoke("run", f"--suite={suite}", "--budget=smoke", f"--db={db}")
    assert again.exit_code == 0, again.output
    assert "resume" in again.output
    [(status, _, epochs)] = [(s, e, n) for _, s, e, n in _runs(db)]
    assert (status, epochs) == ("finished", 3)


def _worker_pid(parent: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"runners.worker" in cmdline:
                return int(entry.name)
    raise AssertionError("no worker process found")
