"""The ray executor: a wrong address fails fast with nothing started; on a real local Ray cluster
runs come back as results, a run whose confined worker is killed is retried and then reported
failed, and cancelling stops the task together with its worker.

One local cluster serves the module (starting one costs seconds). Its executor retries a crashed
run once (``max_retries=1``), so the crash test sees two attempts.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import shared_data_dir, skip_or_fail
from helpers import tiny_suite

from normbench.errors import NormbenchError
from runners.executor import Done, Job

try:
    import ray  # noqa: F401
except ImportError:
    ray = None

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="worker confinement is Linux's")

#: Deadlines that only keep a broken test from hanging; no test asserts a time.
RUN_DEADLINE_S = 900.0


@pytest.fixture(autouse=True)
def needs_ray() -> None:
    if ray is None:
        skip_or_fail("Ray is not installed: pip install 'normbench[ray]'")


def _ray_processes() -> set[int]:
    """Ray's own processes anywhere on this machine (GCS, raylet, workers, its agents)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if any(part in cmdline for part in (b"gcs_server", b"raylet", b"ray::", b"/ray/")):
            found.add(int(entry.name))
    return found


def _descendants(pid: int) -> dict[int, bytes]:
    """The live processes below ``pid`` (children, grandchildren...), with their command lines."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z":  # a zombie is gone, only not yet reaped
            parents[int(stat.parent.name)] = int(fields[1])
    below, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - below
        below |= frontier
    out = {}
    for child in below:
        with contextlib.suppress(OSError):
            out[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ")
    return out


def _wait_until(condition, what: str, deadline_s: float = RUN_DEADLINE_S):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


# --- reaching a cluster ---------------------------------------------------------------------------


@pytest.fixture
def not_ray() -> Iterator[str]:
    """A TCP server that answers like a web server, not like a Ray head."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("address", ["127.0.0.1:1", "10.255.255.1:6379", "not-ray"])
def test_an_unreachable_address_fails_with_what_to_check_and_starts_nothing(address, request):
    from runners.ray_executor import RayExecutor

    if address == "not-ray":
        address = request.getfixturevalue("not_ray")
    before = _ray_processes()
    with pytest.raises(NormbenchError) as caught:
        RayExecutor(address)
    message = str(caught.value)
    assert address in message
    assert f"ray status --address {address}" in message
    assert "same Ray and Python versions" in message
    assert not ray.is_initialized()
    assert _ray_processes() - before == set()


def test_without_ray_the_executor_says_how_to_install_it(monkeypatch):
    from runners.ray_executor import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(NormbenchError, match=r"pip install 'normbench\[ray\]'"):
        RayExecutor(None)


# --- a local cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(session_cache) -> Iterator:
    """A local Ray cluster on this machine for the module's tests; gone again afterwards."""
    from runners.ray_executor import RayExecutor

    with pytest.MonkeyPatch.context() as mp:
        # Ray's workers keep the environment the cluster started with.
        mp.setenv("NORMBENCH_CACHE_DIR", str(session_cache))
        executor = RayExecutor(None, max_retries=1)
    started = _descendants(os.getpid())
    assert any(b"gcs_server" in cmd for cmd in started.values()), started
    yield executor
    executor.close()
    assert not ray.is_initialized()
    # nothing of the cluster outlives it: GCS, raylet, Ray's workers, the confined workers
    _wait_until(lambda: not set(started) & set(_descendants(os.getpid())),
                "the cluster's processes to end", 30.0)  # fmt: skip


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    return tiny_suite(tmp_path_factory.mktemp("ray-suite"))


def _job(suite: Path, tmp_path: Path, seed: int = 0, **limits) -> Job:
    from normbench.suites import load_suite, plan

    data = shared_data_dir()
    if data is None:
        skip_or_fail("real CIFAR-10 mirror not found (see tests/conftest.py)")
    (spec,) = plan(
        load_suite(suite), "smoke", norms=["batchnorm"], optimizers=["sgd"], seeds=[seed]
    )
    return Job(
        id=spec.key,
        kind=spec.task,
        spec=spec.to_dict(),
        data_dir=str(data),
        checkpoint_dir=str(tmp_path / "checkpoints" / spec.key),
        device="cpu",
        limits=dict(limits),
        resources={"num_cpus": 1, "num_gpus": 0},
    )


def _finish(executor, count: int) -> dict[str, Done]:
    done: dict[str, Done] = {}
    end = time.monotonic() + RUN_DEADLINE_S
    while len(done) < count and time.monotonic() < end:
        for item in executor.poll(1.0):
            assert isinstance(item, Done), item  # Ray tasks stream no progress
            done[item.job_id] = item
    assert len(done) == count, f"only {len(done)} of {count} runs ended"
    return done


def test_two_runs_on_a_local_cluster_come_back_with_their_results(cluster, suite, tmp_path):
    jobs = [_job(suite, tmp_path, seed=0), _job(suite, tmp_path, seed=1)]
    cluster.start(jobs[0])
    # one core per run: the cluster (every core of this machine) holds that many at once
    assert cluster.capacity() == os.cpu_count()
    cluster.start(jobs[1])
    done = _finish(cluster, 2)
    assert set(done) == {job.id for job in jobs}
    for item in done.values():
        assert item.error is None, f"{item.error}\n{item.log_tail}"
        assert item.result["status"] == "finished"
        assert item.result["epochs_done"] == 1
        assert any(name == "accuracy" for name, *_ in item.result["metrics"])


def test_a_run_asks_no_more_than_the_largest_node_has(cluster):
    # a CPU run asks for every core of the orchestrator's machine, which may be larger
    assert cluster.fit({"num_cpus": 4096, "num_gpus": 0}) == {
        "num_cpus": os.cpu_count(),
        "num_gpus": 0,
    }
    if not any(node["num_gpus"] for node in cluster.nodes()):
        with pytest.raises(NormbenchError, match="no node of the Ray cluster"):
            cluster.fit({"num_cpus": 1, "num_gpus": 1})


def test_a_run_whose_worker_is_killed_is_retried_then_reported_failed(cluster, suite, tmp_path):
    # One CPU second: the worker dies of its CPU-time limit (SIGXCPU, SIGKILL if it lingers)
    # while still starting up, on every attempt.
    job = _job(suite, tmp_path, seed=2, cpu_seconds=1)
    cluster.start(job)
    (done,) = _finish(cluster, 1).values()
    assert done.result is None
    assert "died of SIG" in done.error
    assert "(attempt 2)" in done.error  # the first attempt and the one retry
    assert "retried the run 1 time(s)" in done.error
    assert not done.user_error


def test_cancelling_stops_the_task_and_its_confined_worker(cluster, suite, tmp_path):
    job = _job(suite, tmp_path, seed=3)
    cluster.start(job)

    def worker() -> int | None:
        found = [p for p, cmd in _descendants(os.getpid()).items() if b"runners.worker" in cmd]
        return found[0] if found else None

    pid = _wait_until(worker, "the run's confined worker to start")
    assert cluster.cancel_all() == [job.id]
    _wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), "the worker to die", 30)
    assert cluster.poll(0.1) == []


def _zombie(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return text[text.rindex(")") + 2] == "Z"
