"""Executors: where the runs of a suite execute. The suite runner hands them jobs and gets back
progress events and results; it does not know which executor runs them.

- ``local`` (the default): each run in its own confined worker process on this machine
  (``normbench.sandbox``: a new session, a cleaned environment, resource limits, Landlock and
  seccomp where the kernel has them), running ``python -m runners.worker``. A worker gets its job
  (the run's spec, the data directory, its own checkpoint folder, the sources of the submitted
  norms it needs) and never the database URL; it streams progress and its result back as JSON
  lines; only the orchestrator writes to the database.
- ``ray``: one Ray task per run on a Ray cluster (``runners.ray_executor``); each task starts the
  same confined worker on its node through :func:`run_isolated`.

A worker that crashes (a segfault, the OOM killer, ``os._exit``) ends its job with the cause as
its error; the suite goes on. A result counts only when the worker also exited cleanly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from normbench import config
from normbench.errors import NormbenchError

EXECUTORS = ("local", "ray")


@dataclass
class Job:
    """One run for a worker: everything it needs and nothing more (never the database URL)."""

    id: str  # the run key
    kind: str  # "classify", "probe", "gan" or "normspeed"
    spec: dict[str, Any]
    data_dir: str | None
    checkpoint_dir: str  # this run's own checkpoint folder (the worker may write only here)
    submissions: list[dict[str, Any]] = field(default_factory=list)  # name, class_name, source...
    device: str = "cpu"
    limits: dict[str, int | None] = field(default_factory=dict)  # memory_mb, cpu_seconds
    resources: dict[str, float] = field(default_factory=lambda: {"num_cpus": 1, "num_gpus": 0})
    read_paths: list[str] = field(default_factory=list)  # besides the data dir and dataset cache
    # Modules outside normbench that registered the run's norm at import (a script's or a
    # plugin's own module): {"module", "file", "norms"}; the worker imports them from the file.
    norm_modules: list[dict[str, Any]] = field(default_factory=list)
    # The worker's compute threads (OMP_NUM_THREADS); None: torch's default, every core.
    threads: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(**data)


@dataclass
class Event:
    """Progress of a running job, as the worker reported it."""

    job_id: str
    data: dict[str, Any]


@dataclass
class Done:
    """A job that ended: its result, or why there is none."""

    job_id: str
    result: dict[str, Any] | None
    error: str | None = None
    log_tail: str = ""
    user_error: bool = False  # a NormbenchError (bad input or environment): stops the suite


class Executor(Protocol):
    name: str

    def capacity(self) -> int: ...

    def threads_per_job(self) -> int | None: ...

    def start(self, job: Job) -> None: ...

    def poll(self, timeout: float) -> list[Event | Done]: ...

    def cancel_all(self) -> list[str]: ...

    def close(self) -> None: ...


def create_executor(name: str, *, workers: int = 1, ray_address: str | None = None) -> Executor:
    """The executor called ``name``; set up completely (a Ray cluster reached) before it returns,
    so a bad address is reported before anything is written."""
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        from runners.ray_executor import RayExecutor

        return RayExecutor(ray_address)
    raise NormbenchError(f"Unknown executor {name!r}; known: {', '.join(EXECUTORS)}.")


# --- the confined worker of one job ---------------------------------------------------------------


def memory_limit_mb() -> int | None:
    """The address-space limit of a CPU worker: ``NORMBENCH_WORKER_MEMORY_MB``, else this machine's
    physical memory (a run that needs more would swap the machine to a halt anyway)."""
    value = os.environ.get("NORMBENCH_WORKER_MEMORY_MB")
    if value:
        return int(value)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):
        return None


def policy_for(job: Job):
    """What the worker of ``job`` may touch: read the data and the dataset cache, write its own
    checkpoint folder (and its scratch directory); nothing else of the cache, and never the
    results database."""
    from normbench.sandbox import Limits, Policy

    reads = [str(config.cache_dir() / "datasets"), *job.read_paths]
    reads += [str(Path(m["file"]).parent) for m in job.norm_modules if m.get("file")]
    if job.data_dir:
        reads.append(str(Path(job.data_dir).expanduser().resolve()))
    cuda = job.device.startswith("cuda")
    limits = Limits(
        memory_mb=None if cuda else job.limits.get("memory_mb"),
        cpu_seconds=job.limits.get("cpu_seconds"),
    )
    return Policy(
        read_paths=tuple(reads), write_paths=(job.checkpoint_dir,), limits=limits, cuda=cuda
    )


def launch_job(job: Job, scratch: Path):
    """Start the confined worker of ``job``; returns the ``normbench.sandbox.Worker``."""
    from normbench import sandbox

    Path(job.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    (config.cache_dir() / "datasets").mkdir(parents=True, exist_ok=True)
    policy = policy_for(job)
    payload = {"job": job.to_json(), "policy": policy.to_json()}
    # The worker's HOME is its scratch folder, so without this its default cache would be there:
    # it would decode the dataset again, and recompute the prepared real-image features, every run.
    env = {"NORMBENCH_CACHE_DIR": str(config.cache_dir())}
    if job.threads:
        env |= {"OMP_NUM_THREADS": str(job.threads), "MKL_NUM_THREADS": str(job.threads)}
    return sandbox.launch("runners.worker", payload, policy=policy, scratch=scratch, env=env)


SCRATCH_PREFIX = "normbench-worker-"


def remove_orphaned_scratch() -> int:
    """Remove the scratch folders of workers whose orchestrator died (a ``kill -9`` leaves them
    in the temporary directory); returns how many."""
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        pid = folder.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or not folder.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its orchestrator is alive (or the pid was reused): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


class _Running:
    """A job's worker, its scratch directory and what it reported so far."""

    def __init__(self, job: Job) -> None:
        self.job = job
        # The orchestrator's pid in the name lets a later one remove what a killed one left.
        prefix = f"{SCRATCH_PREFIX}{os.getpid()}-{job.id[:12]}-"
        self.scratch = Path(tempfile.mkdtemp(prefix=prefix))
        self.worker = launch_job(job, self.scratch)
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.user_error = False
        self.returncode: int | None = None

    def take(self, event: dict[str, Any]) -> Event | None:
        """Keep a result or error; return progress as an Event."""
        kind = event.get("event")
        if kind == "result" and isinstance(event.get("result"), dict):
            self.result = event["result"]
        elif kind == "error":
            self.error = str(event.get("message", "the worker reported an error"))
            self.user_error = bool(event.get("user_error"))
        elif kind == "protocol_error":
            self.error = f"the worker broke the result protocol: {event.get('detail', '')}"
        else:
            return Event(self.job.id, event)
        return None

    def finish(self, timeout: float | None = 30.0) -> Done:
        """Reap the worker; a result counts only if it also exited cleanly."""
        end = self.worker.wait(timeout)
        self.returncode = end.returncode
        shutil.rmtree(self.scratch, ignore_errors=True)
        if end.returncode == 0 and self.result is not None and self.error is None:
            return Done(self.job.id, self.result)
        error = self.error
        if end.returncode != 0 or error is None:
            cause = f"the worker {end.cause}" if end.cause else "the worker exited"
            error = f"{error} ({cause})" if error else f"{cause} before reporting a result"
        return Done(self.job.id, None, error, end.log_tail, self.user_error)


def run_isolated(job: dict[str, Any], on_event: Callable[[dict], None] | None = None) -> dict:
    """Run one job in a confined worker on this machine, to its end. Returns ``{"result",
    "error", "log_tail", "user_error", "signal"}`` (``signal``: the signal that killed the
    worker, if one did). Ray tasks call this on their node."""
    running = _Running(Job.from_json(job))
    try:
        while True:
            try:
                event = running.worker.next_event(timeout=1.0)
            except EOFError:
                break
            if event is not None:
                progress = running.take(event)
                if progress is not None and on_event is not None:
                    on_event(progress.data)
        done = running.finish()
    except BaseException:
        running.worker.kill()
        shutil.rmtree(running.scratch, ignore_errors=True)
        raise
    code = running.returncode
    return {
        "result": done.result,
        "error": done.error,
        "log_tail": done.log_tail,
        "user_error": done.user_error,
        "signal": -code if isinstance(code, int) and code < 0 else None,
    }


class LocalExecutor:
    """Each job in its own confined worker process on this machine, ``workers`` at once."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise NormbenchError(f"--workers must be at least 1, not {workers}.")
        self.workers = workers
        self.running: dict[str, _Running] = {}
        remove_orphaned_scratch()

    def capacity(self) -> int:
        return self.workers

    def threads_per_job(self) -> int | None:
        """Each worker's share of this process's threads (torch's default: every core, or
        OMP_NUM_THREADS), so that parallel workers do not oversubscribe the cores: two workers
        of two threads each on two cores trained several times slower than two of one
        (``bench/worker_threads.py``). None with one worker: it keeps the default."""
        if self.workers == 1:
            return None
        import torch

        return max(1, torch.get_num_threads() // self.workers)

    def start(self, job: Job) -> None:
        self.running[job.id] = _Running(job)

    def poll(self, timeout: float) -> list[Event | Done]:
        """Progress and ended jobs; waits up to ``timeout`` seconds when there is nothing yet."""
        out: list[Event | Done] = []
        deadline = time.monotonic() + timeout
        while True:
            for key, running in list(self.running.items()):
                wait = 0.0 if len(self.running) > 1 else max(0.0, deadline - time.monotonic())
                try:
                    while (event := running.worker.next_event(timeout=wait)) is not None:
                        progress = running.take(event)
                        if progress is not None:
                            out.append(progress)
                        wait = 0.0
                except EOFError:
                    out.append(running.finish())
                    del self.running[key]
            if out or not self.running or time.monotonic() >= deadline:
                return out
            if len(self.running) > 1:
                time.sleep(0.05)

    def cancel_all(self) -> list[str]:
        """Stop every worker (SIGTERM to its process group, SIGKILL after a grace period)."""
        keys = list(self.running)
        for running in self.running.values():
            running.worker.interrupt(grace=5.0)
            shutil.rmtree(running.scratch, ignore_errors=True)
        self.running.clear()
        return keys

    def close(self) -> None:
        for running in self.running.values():
            running.worker.kill()
            shutil.rmtree(running.scratch, ignore_errors=True)
        self.running.clear()
