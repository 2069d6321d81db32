"""The confined worker processes (normbench.sandbox), with real child processes trying real harm.

The child is ``tests/fixtures/sandbox_child.py``; its job names the hostile action and it reports
each attempt's outcome as an event. These tests run as root (CI too): only Landlock and seccomp,
not file permissions, stand between the worker and the files.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import skip_or_fail

from normbench import sandbox
from normbench.sandbox import Limits, Policy, Worker, launch

FIXTURES = Path(__file__).parent / "fixtures"
CHILD_ENV = {"PYTHONPATH": str(FIXTURES)}
PATIENCE = 120.0  # seconds a test waits for a child before it fails (never a timing assertion)


@pytest.fixture(autouse=True)
def kernel_confines() -> None:
    """These tests are about the kernel's mechanisms: without them they would pass vacuously."""
    if sandbox.landlock_abi() < 6:
        skip_or_fail(f"this kernel has Landlock ABI {sandbox.landlock_abi()}; the tests need >= 6")
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, OSError) as err:
        skip_or_fail(f"pyseccomp / libseccomp is not available ({err})")


def start(tmp_path: Path, job: dict, policy: Policy = Policy()) -> Worker:
    payload = {"job": job, "policy": policy.to_json()}
    return launch(
        "sandbox_child", payload, policy=policy, scratch=tmp_path / "scratch", env=CHILD_ENV
    )


def events(worker: Worker) -> list[dict]:
    """Every event up to the end of the channel."""
    out = []
    while True:
        try:
            event = worker.next_event(PATIENCE)
        except EOFError:
            return out
        assert event is not None, f"the worker said nothing for {PATIENCE} s"
        out.append(event)


def report(worker: Worker) -> dict:
    reports = [e["report"] for e in events(worker) if e["event"] == "report"]
    end = worker.wait(PATIENCE)
    assert end.returncode == 0, end
    assert len(reports) == 1, reports
    return reports[0]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def group_left(pgid: int) -> list[int]:
    """Live processes in group ``pgid``, read from /proc independently of the module."""
    left = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                left.append(int(entry.name))
    return left


def refused(outcome: dict) -> bool:
    return outcome["outcome"] == "PermissionError" and outcome["errno"] in (1, 13)


# --- the policy ---------------------------------------------------------------------------------


def test_policy_round_trips_through_json_and_refuses_unknown_keys() -> None:
    policy = Policy(("/data",), ("/ck",), Limits(memory_mb=512, cpu_seconds=9), cuda=True)
    assert Policy.from_json(json.loads(json.dumps(policy.to_json()))) == policy
    with pytest.raises(ValueError, match="readpaths"):
        Policy.from_json({"readpaths": ["/data"]})


# --- files, processes, signals, network -------------------------------------------------------


def test_files_outside_the_policy_cannot_be_touched(tmp_path) -> None:
    db = tmp_path / "results.db"
    db.write_bytes(b"SQLite format 3\x00 the results")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.parquet").write_text("the data")
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("a secret")
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    block = next((str(p) for p in Path("/dev").iterdir() if _is_block_device(p)), None)
    policy = Policy(read_paths=(str(data),), write_paths=(str(checkpoints),))
    job = {
        "action": "fs", "results_db": str(db), "data_file": str(data / "train.parquet"),
        "outside_file": str(secret), "checkpoint_dir": str(checkpoints), "block_device": block,
    }  # fmt: skip
    worker = start(tmp_path, job, policy)
    got = report(worker)

    assert worker.sandbox["landlock_abi"] == sandbox.landlock_abi()
    assert worker.sandbox["seccomp"] is True
    for name in ("write_results_db", "append_results_db", "delete_results_db", "rename_results_db"):
        assert refused(got[name]), (name, got[name])
    assert db.read_bytes() == b"SQLite format 3\x00 the results"
    assert got["write_scratch"]["outcome"] == "ok"
    assert got["read_scratch"]["value"] == "written by the worker"
    assert (tmp_path / "scratch" / "scratch.txt").read_text() == "written by the worker"
    assert got["write_checkpoint"]["outcome"] == "ok"
    assert (checkpoints / "state.pt").exists()
    assert got["read_data"]["value"] == "the data"
    assert refused(got["write_data"]), got["write_data"]
    assert (data / "train.parquet").read_text() == "the data"
    for name in ("read_outside", "list_outside", "symlink_escape", "mknod_in_scratch"):
        assert refused(got[name]), (name, got[name])
    assert got["write_dev_null"]["outcome"] == "ok"
    if block is not None:  # root could read the raw disk, results database and all
        assert refused(got["read_block_device"]), got["read_block_device"]


def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False


def test_the_worker_cannot_reach_its_parent_or_lift_its_limits(tmp_path) -> None:
    received = []
    previous = signal.signal(signal.SIGTERM, lambda *_: received.append(True))
    try:
        job = {
            "action": "neighbours",
            "parent_core": list(resource.getrlimit(resource.RLIMIT_CORE)),
            "parent_nice": os.getpriority(os.PRIO_PROCESS, 0),
        }
        got = report(start(tmp_path, job, Policy(limits=Limits(cpu_seconds=60))))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert refused(got["kill_parent"]), got["kill_parent"]
    assert received == []
    # The orchestrator's environment and command line may hold the database URL.
    for name in ("parent_environ", "parent_cmdline", "list_processes"):
        assert refused(got[name]), (name, got[name])
    assert got["own_status"]["value"] == "Name:"
    assert got["cpuinfo"]["value"] is True
    # Root keeps no capability: it could raise its own hard limits again (CAP_SYS_RESOURCE).
    assert got["capabilities"]["value"] == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"), 0
    )
    for name in ("prlimit_parent", "renice_parent", "clear_death_signal", "raise_cpu_limit"):
        assert refused(got[name]), (name, got[name])


def test_no_new_processes_but_threads_and_torch_work(tmp_path) -> None:
    got = report(start(tmp_path, {"action": "processes", "torch": True}))
    for name in ("fork", "popen", "fork_bomb"):
        assert got[name] == {"outcome": "PermissionError", "errno": 1}, (name, got[name])
    assert got["thread"]["value"] == sum(range(1000))
    assert got["torch"]["value"] == 1000.0**3
    assert got["torch"]["threads"] == 2


def test_no_tcp_connections_or_listening(tmp_path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0)
        got = report(start(tmp_path, {"action": "network", "port": server.getsockname()[1]}))
        assert refused(got["connect"]), got["connect"]
        assert refused(got["bind"]), got["bind"]
        with pytest.raises(BlockingIOError):
            server.accept()


# --- the end of a worker ------------------------------------------------------------------------


def test_timeout_kills_the_worker_and_its_group(tmp_path) -> None:
    worker = start(tmp_path, {"action": "sleep"})
    assert worker.next_event(PATIENCE) == {"event": "sleeping"}
    assert alive(worker.pid)
    end = worker.wait(timeout=2)
    assert end.returncode == -signal.SIGKILL
    assert end.cause == "timed out after 2 s"
    assert group_left(worker.pid) == []
    assert worker.wait() is end  # reaped once; the answer stays


def test_processes_left_in_the_group_are_killed(tmp_path) -> None:
    # Unconfined, so that it can leave a grandchild behind (a confined one cannot start one).
    worker = start(tmp_path, {"action": "spawn_unconfined", "confine": False})
    end = worker.wait(PATIENCE)
    assert end.returncode == 0, end
    grandchild = int((tmp_path / "scratch" / "grandchild.pid").read_text())
    assert not alive(grandchild)
    assert group_left(worker.pid) == []


@pytest.mark.parametrize(
    ("job", "limits", "returncode", "cause"),
    [
        ({"action": "segfault"}, Limits(), -11, "was killed by SIGSEGV (segmentation fault)"),
        ({"action": "exit", "status": 3}, Limits(), 3, "exited with status 3"),
        (
            {"action": "busy"}, Limits(cpu_seconds=1), -signal.SIGXCPU,
            "exceeded its CPU-time limit of 1 s",
        ),
        (
            {"action": "allocate", "mb": 1024}, Limits(memory_mb=256), 1,
            "ran out of memory (a MemoryError at its limit of 256 MB)",
        ),
    ],
    ids=["segfault", "exit-3", "cpu-limit", "memory-limit"],
)  # fmt: skip
def test_exit_causes(tmp_path, job, limits, returncode, cause) -> None:
    worker = start(tmp_path, job, Policy(limits=limits))
    assert events(worker) == []
    end = worker.wait(PATIENCE)
    assert (end.returncode, end.cause) == (returncode, cause), end.log_tail
    if job["action"] == "allocate":
        assert end.log_tail.splitlines()[-1].startswith("MemoryError")
    assert group_left(worker.pid) == []


def test_log_tail_keeps_the_last_lines_without_terminal_escapes(tmp_path) -> None:
    worker = start(tmp_path, {"action": "noisy"})
    end = worker.wait(PATIENCE)
    assert (end.returncode, end.cause) == (2, "exited with status 2")
    lines = end.log_tail.splitlines()
    assert len(lines) == sandbox.LOG_TAIL_LINES
    assert lines[0] == "line 80"
    assert lines[-1] == "line 99?[2J"


@pytest.mark.parametrize(
    ("ignore", "returncode", "cause"),
    [
        (False, -signal.SIGTERM, "was interrupted (SIGTERM)"),
        (True, -signal.SIGKILL, "was killed after ignoring SIGTERM for 1 s"),
    ],
    ids=["stops", "ignores-sigterm"],
)
def test_interrupt(tmp_path, ignore, returncode, cause) -> None:
    worker = start(tmp_path, {"action": "sleep", "ignore_sigterm": ignore})
    assert worker.next_event(PATIENCE) == {"event": "sleeping"}
    worker.interrupt(grace=1.0)
    end = worker.wait()
    assert (end.returncode, end.cause) == (returncode, cause)
    assert group_left(worker.pid) == []


# --- what reaches the worker --------------------------------------------------------------------


def test_the_worker_sees_a_cleaned_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NORMBENCH_DB", "postgresql+psycopg://user:hunter2@db/normbench")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    worker = start(tmp_path, {"action": "environ"})
    (event,) = events(worker)
    assert worker.wait(PATIENCE).returncode == 0
    environ = event["environ"]
    assert "hunter2" not in json.dumps(environ)
    assert "NORMBENCH_DB" not in environ
    scratch = str((tmp_path / "scratch").resolve())
    assert environ["HOME"] == environ["TMPDIR"] == event["cwd"] == scratch
    assert environ["PYTHONDONTWRITEBYTECODE"] == "1"
    assert environ["OMP_NUM_THREADS"] == "1"
    assert environ["NORMBENCH_CACHE_DIR"] == os.environ["NORMBENCH_CACHE_DIR"]
    assert environ["PYTHONPATH"] == str(FIXTURES)  # the caller's env= wins
    allowed = {*sandbox.ENV_ALLOWLIST, "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE"}
    allowed |= {sandbox.EVENT_FD_VAR, sandbox.PARENT_PID_VAR}
    assert set(environ) <= allowed, set(environ) - allowed


def test_killing_the_orchestrator_kills_its_worker(tmp_path) -> None:
    orchestrator = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from normbench.sandbox import Policy, launch
        worker = launch(
            "sandbox_child", {{"job": {{"action": "sleep"}}, "policy": Policy().to_json()}},
            policy=Policy(), scratch=Path({str(tmp_path / "scratch")!r}),
            env={{"PYTHONPATH": {str(FIXTURES)!r}}},
        )
        assert worker.next_event({PATIENCE}) == {{"event": "sleeping"}}
        print(worker.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", orchestrator], stdout=subprocess.PIPE)
    pid = None
    try:
        line = parent.stdout.readline()
        assert line, "the orchestrator did not start its worker"
        pid = int(line)
        assert alive(pid)
        parent.kill()  # kill -9: no cleanup of its own runs
        parent.wait()
        deadline = time.monotonic() + PATIENCE
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid)
    finally:
        parent.kill()
        parent.wait()
        if pid is not None and alive(pid):  # the test failed: leave nothing running
            os.kill(pid, signal.SIGKILL)


# --- the event channel --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "detail"),
    [
        ("text", "it sent a line that is not JSON"),
        ("list", "it sent a JSON list, not an object"),
        ("deep", "it sent a line that is not JSON"),
        ("huge", "it sent an event line longer than 64 MiB"),
        ("spoof", "it sent a second 'sandbox' event"),
        ("pickle", "it sent a line that is not JSON"),
    ],
)
def test_garbage_on_the_event_channel_is_a_protocol_error(tmp_path, kind, detail) -> None:
    marker = tmp_path / "unpickled"
    worker = start(tmp_path, {"action": "garbage", "kind": kind, "marker": str(marker)})
    got = events(worker)
    assert len(got) == 1, got
    assert got[0]["event"] == "protocol_error"
    assert got[0]["detail"].startswith(detail), got[0]
    with pytest.raises(EOFError):
        worker.next_event(0)
    end = worker.wait()
    assert end.returncode == -signal.SIGKILL
    assert end.cause == f"was killed for breaking the event protocol: {got[0]['detail']}"
    assert worker.sandbox["seccomp"] is True  # its report still counts
    assert not marker.exists()  # nothing it sent was unpickled
    assert group_left(worker.pid) == []


def test_events_before_the_sandbox_report_are_a_protocol_error(tmp_path) -> None:
    worker = start(tmp_path, {"action": "emit_unconfined", "confine": False})
    assert events(worker) == [
        {
            "event": "protocol_error",
            "detail": "it sent events before confining itself (no sandbox report)",
        }
    ]
    assert worker.sandbox == {}
    assert worker.wait().cause.startswith("was killed for breaking the event protocol")


def test_a_worker_that_never_writes_does_not_hang_the_parent(tmp_path) -> None:
    worker = start(tmp_path, {"action": "sleep"})
    assert worker.next_event(PATIENCE) == {"event": "sleeping"}
    assert worker.next_event(0.2) is None
    assert worker.next_event(0) is None
    worker.kill()
    assert worker.wait().cause == "was killed by normbench"
    with pytest.raises(EOFError):
        worker.next_event(PATIENCE)


def test_a_worker_without_landlock_or_seccomp_is_reported(tmp_path, caplog) -> None:
    worker = start(tmp_path, {"action": "report_unconfined", "confine": False})
    with caplog.at_level("WARNING", logger="normbench.sandbox"):
        assert events(worker) == [{"event": "result"}]
    assert worker.sandbox == {"landlock_abi": 0, "seccomp": False, "limits": {}}
    assert worker.wait(PATIENCE).returncode == 0
    (record,) = caplog.records
    assert "without Landlock (file and network access) or seccomp" in record.getMessage()


def test_a_link_left_in_a_reused_scratch_directory_is_not_followed(tmp_path) -> None:
    db = tmp_path / "results.db"
    db.write_text("the results")
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / sandbox.LOG_NAME).symlink_to(db)
    end = start(tmp_path, {"action": "noisy"}).wait(PATIENCE)
    assert end.log_tail.splitlines()[-1] == "line 99?[2J"
    assert db.read_text() == "the results"
    assert not (tmp_path / "scratch" / sandbox.LOG_NAME).is_symlink()
