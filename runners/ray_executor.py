"""The ``ray`` executor: one Ray task per run, on a local Ray cluster or a running remote one.

Each run becomes one task of :func:`run_on_node`, scheduled by the CPUs and GPUs its job asks
for. On its node the task prepares the data the run needs (:func:`prepare_data`, trusted code)
and starts the same confined worker as the local executor
(:func:`runners.executor.run_isolated`); submitted code only ever runs inside that worker, so the
result dict Ray pickles back to the orchestrator comes from trusted code. A worker killed by a
signal (the CPU-time limit, the OOM killer, a segfault) raises :class:`WorkerCrashed`, which Ray
retries up to ``max_retries`` times; every other outcome, a failed run included, is returned and
not retried. Only the orchestrator writes to the database.

Progress is not streamed back from Ray tasks: the executor reports only each run's end
(:class:`~runners.executor.Done`), never :class:`~runners.executor.Event`.

With no address, ``ray.init`` starts a local cluster on this machine: offline, without the
dashboard or usage statistics, with a small object store (results are small dicts) and every core
of the machine. With an address (``HOST:PORT`` of the cluster's head, as ``ray start --head``
prints it) the GCS port is probed first with a short TCP connection and an HTTP/2 greeting, so an
unreachable or wrong address fails in seconds with a :class:`NormbenchError`, before Ray starts
anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

from normbench.errors import NormbenchError
from runners.executor import Done, Event, Job

INSTALL_HINT = "pip install 'normbench[ray]'"
DEFAULT_PORT = 6379
#: Seconds the TCP connect and the HTTP/2 greeting of the address probe may take each.
PROBE_TIMEOUT_S = 3.0
#: Attempts (about a second each) Ray makes to reach a GCS that the probe found listening; Ray's
#: own default (20) mostly prolongs the failure of a wrong authentication token.
#: ``RAY_gcs_server_port_wait_time_s`` overrides it, as it does for Ray.
CONNECT_ATTEMPTS = 5
#: The local cluster's object store: results are small dicts, so Ray's minimum (75 MiB) and a bit.
OBJECT_STORE_BYTES = 100 * 2**20
#: How long cancel_all waits for cancelled tasks to end (their workers die with them).
CANCEL_WAIT_S = 10.0
#: How long capacity() reuses what it learned of the cluster's nodes (they may join and leave).
NODES_TTL_S = 5.0
#: What a client sends first on an HTTP/2 connection: the preface and an empty SETTINGS frame.
HTTP2_GREETING = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
HTTP2_SETTINGS = 0x04
CHECKS = (
    "Check that the head runs (`ray status --address {address}` on a machine of the cluster), that "
    "no firewall blocks the port from here, and that every node and this machine run the same "
    "Ray and Python versions."
)


class WorkerCrashed(Exception):
    """The confined worker of a run died of a signal; Ray retries the task that raised it."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message, log_tail)  # both in args, so the exception pickles whole

    @property
    def log_tail(self) -> str:
        return self.args[1]

    def __str__(self) -> str:
        return self.args[0]


def run_on_node(job: dict[str, Any]) -> dict[str, Any]:
    """The body of a run's Ray task, on the node Ray placed it on: the run's outcome as
    :func:`runners.executor.run_isolated` returns it. A user error (data missing on this node)
    is returned as the run's error rather than raised, so it is not retried."""
    from runners.executor import run_isolated

    try:
        prepare_data(job)
    except NormbenchError as err:
        where = f" (on the Ray node {socket.gethostname()})"
        return {"result": None, "error": f"{err}{where}", "log_tail": "", "user_error": True}
    outcome = run_isolated(job)
    if outcome.get("signal"):
        attempt = _attempt()
        raise WorkerCrashed(
            f"the worker died of {_signal_name(outcome['signal'])} on the Ray node "
            f"{socket.gethostname()}{f' (attempt {attempt})' if attempt else ''}: "
            f"{outcome.get('error') or 'no error reported'}",
            outcome.get("log_tail") or "",
        )
    return outcome


def prepare_data(job: dict[str, Any]) -> None:
    """Decode the dataset and generate the corruption set the job's run needs into this node's
    cache, unless they are there already: the check the orchestrator makes before its first run
    (:func:`runners.suite.check_data`), made on the node, since the confined worker may only read
    the cache. A missing or damaged data file raises its NormbenchError."""
    if job["kind"] not in ("classify", "probe", "gan"):
        return  # a speed measurement needs no data
    from normbench.suites import RunSpec
    from runners.suite import check_data

    check_data([RunSpec(**job["spec"])], job["data_dir"])


def _attempt() -> int | None:
    """Which attempt of its task this is (1 for the first), where this Ray tells."""
    try:
        import ray

        worker = ray._private.worker.global_worker
        return int(worker.core_worker.get_current_task_attempt_number()) + 1  # counts retries
    except Exception:  # noqa: BLE001 - a private call; the message only loses the number
        return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class RayExecutor:
    """Runs each job as one Ray task (see the module docstring). ``address`` None starts a local
    cluster here (shut down again by :meth:`close`); ``HOST:PORT`` joins a running cluster
    (left again by :meth:`close`). ``max_retries``: how often Ray retries a run whose worker
    died of a signal, or whose node or Ray worker failed."""

    name = "ray"

    def __init__(self, address: str | None = None, max_retries: int = 2) -> None:
        ray = import_ray()
        if ray.is_initialized():
            raise RuntimeError("Ray is already initialised in this process; one executor at a time")
        self.address = address
        self.max_retries = max_retries
        if address is None:
            self.context = start_local_cluster(ray)
        else:
            self.context = connect(ray, address)
        self.running: dict[Any, str] = {}  # ObjectRef -> job id
        self.asks: dict[str, float] = {"num_cpus": float(os.cpu_count() or 1), "num_gpus": 0.0}
        self._nodes: list[dict[str, float]] = []
        self._nodes_at = float("-inf")
        # max_calls=1: a fresh Ray worker process per run, so nothing of one run stays in memory.
        self.task = ray.remote(
            max_retries=max_retries, retry_exceptions=[WorkerCrashed], max_calls=1
        )(run_on_node)
        self.closed = False

    # --- scheduling -----------------------------------------------------------------------------

    def nodes(self) -> list[dict[str, float]]:
        """The CPUs and GPUs of each live node of the cluster (refreshed every few seconds)."""
        if time.monotonic() - self._nodes_at > NODES_TTL_S:
            import ray

            self._nodes = [
                {
                    "num_cpus": n["Resources"].get("CPU", 0.0),
                    "num_gpus": n["Resources"].get("GPU", 0.0),
                }
                for n in ray.nodes()
                if n.get("Alive")
            ]
            self._nodes_at = time.monotonic()
        return self._nodes

    def fit(self, resources: dict[str, float]) -> dict[str, float]:
        """What a run asking ``resources`` asks of Ray: its CPUs capped at the largest node's
        (a CPU run asks for every core of the orchestrator's machine, which a smaller node lacks,
        and Ray would hold an infeasible task forever). A GPU no node has is an error."""
        nodes = self.nodes()
        cpus = float(resources.get("num_cpus", 1))
        gpus = float(resources.get("num_gpus", 0))
        most_gpus = max((n["num_gpus"] for n in nodes), default=0.0)
        if gpus > most_gpus:
            raise NormbenchError(
                f"The run asks for {gpus:g} GPU(s), but no node of the Ray cluster at "
                f"{self.where()} has {'that many' if most_gpus else 'any'}. Start the GPU "
                "machines with `ray start --address=HEAD:PORT --num-gpus=N`, or run on the CPU "
                "with --device cpu."
            )
        most_cpus = max((n["num_cpus"] for n in nodes), default=cpus)
        return {"num_cpus": max(min(cpus, most_cpus), 0.0), "num_gpus": gpus}

    def capacity(self) -> int:
        """Runs the cluster can hold at once: per node, its CPUs (and GPUs) divided by what one
        run asks (the last run started; before that, a CPU run like this machine's), at least 1."""
        asks = self.fit(self.asks)
        total = 0
        for node in self.nodes():
            fits = [node[k] // asks[k] for k in ("num_cpus", "num_gpus") if asks[k] > 0]
            total += int(min(fits)) if fits else 0
        return max(total, 1)

    def threads_per_job(self) -> int | None:
        """None: a CPU run asks Ray for every core of a node (``runners.suite.resources``), so
        its worker keeps torch's default threads."""
        return None

    def start(self, job: Job) -> None:
        asks = self.fit(job.resources)
        self.asks = dict(job.resources)
        ref = self.task.options(**asks).remote(job.to_json())
        self.running[ref] = job.id

    def poll(self, timeout: float) -> list[Event | Done]:
        """The runs that ended, waiting up to ``timeout`` seconds for the first one."""
        import ray

        if not self.running:
            time.sleep(timeout)
            return []
        refs = list(self.running)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return [self._done(self.running.pop(ref), ref) for ref in ready]

    def _done(self, job_id: str, ref: Any) -> Done:
        import ray

        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause
            if isinstance(cause, WorkerCrashed):
                return Done(job_id, None, f"{cause}; Ray retried the run {self.max_retries} "
                            "time(s) and gave up", cause.log_tail)  # fmt: skip
            return Done(job_id, None, f"the Ray task failed: {one_line(cause or err)}")
        except ray.exceptions.RayError as err:
            return Done(job_id, None, f"Ray could not run the task: {one_line(err)}")
        return Done(
            job_id,
            outcome.get("result"),
            outcome.get("error"),
            outcome.get("log_tail") or "",
            bool(outcome.get("user_error")),
        )

    # --- stopping -------------------------------------------------------------------------------

    def cancel_all(self) -> list[str]:
        """Stop every running task (force: its Ray worker is killed, and the confined worker dies
        with it) and wait briefly until they are gone."""
        import ray

        refs = list(self.running)
        for ref in refs:
            with contextlib.suppress(Exception):  # already ended: nothing to cancel
                ray.cancel(ref, force=True)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)
        keys = [self.running[ref] for ref in refs]
        self.running.clear()
        return keys

    def close(self) -> None:
        """Stop what still runs, then shut down the local cluster or leave the remote one."""
        if self.closed:
            return
        import ray

        self.closed = True
        try:
            self.cancel_all()
        finally:
            ray.shutdown()

    def where(self) -> str:
        return self.address or "this machine (a local cluster)"


# --- reaching Ray ---------------------------------------------------------------------------------


def import_ray():
    try:
        import ray
    except ImportError:
        raise NormbenchError(
            f"The ray executor needs Ray, which is not installed here: {INSTALL_HINT} (on every "
            "machine of the cluster too, with the same Python and Ray versions)."
        ) from None
    return ray


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables that are not set already, for the duration of the block (the
    processes ``ray.init`` starts inherit them)."""
    added = [k for k in values if k not in os.environ]
    for key in added:
        os.environ[key] = values[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def start_local_cluster(ray):
    """Start a Ray cluster on this machine, quietly and offline."""
    # Token authentication is Ray's default for a new local cluster, announced with a warning on
    # every start; it stays on, the warning is muted. (Setting RAY_AUTH_MODE=token instead would
    # not do: Ray reads it once, when it is imported.)
    announcer = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = announcer.level
    announcer.setLevel(logging.ERROR)
    try:
        with environment(RAY_USAGE_STATS_ENABLED="0"):
            return ray.init(
                num_cpus=os.cpu_count(),
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
    finally:
        announcer.setLevel(level)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``HOST`` alone: port 6379; ``[::1]:6379`` for IPv6) as (host, port)."""
    text = address.strip()
    if "://" in text:
        raise NormbenchError(
            f"Ray address {address!r}: give the address of the cluster's head as HOST:PORT (the "
            "GCS address `ray start --head` prints, e.g. 10.0.0.5:6379), not a URL; a Ray Client "
            "address (ray://...) is not supported."
        )
    host, sep, port = text.rpartition(":")
    if not sep or text.endswith("]") or ":" in host and not host.startswith("["):
        host, port = text, str(DEFAULT_PORT)  # no port, or a bare IPv6 address
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NormbenchError(
            f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.5:6379, the address "
            "`ray start --head` prints)."
        )
    return host, int(port)


def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why a Ray GCS cannot be reached at ``host:port``, or None when a gRPC server answers
    there: a TCP connection, then an HTTP/2 greeting that a gRPC server answers with SETTINGS."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return None  # a TLS server waits for a TLS handshake, not for a greeting
            sock.sendall(HTTP2_GREETING)
            head = sock.recv(9)
    except socket.gaierror as err:
        return f"the host name {host!r} does not resolve ({err.strerror})"
    except ConnectionRefusedError:
        return "the connection was refused: nothing listens on that port"
    except TimeoutError:
        return (
            f"no answer within {timeout:g} s: the host is down or unreachable from here, or a "
            "firewall drops the packets"
        )
    except OSError as err:
        return f"it cannot be reached: {err.strerror or err}"
    if len(head) < 9 or head[3] != HTTP2_SETTINGS:
        return "something listens on that port, but it is not a Ray head (it does not speak gRPC)"
    return None


def connect(ray, address: str):
    """Join the running cluster at ``address``; a NormbenchError, with nothing started, when it
    cannot be reached."""
    host, port = parse_address(address)
    why = probe(host, port)
    if why is not None:
        raise NormbenchError(
            f"Cannot reach the Ray cluster at {address}: {why}. {CHECKS.format(address=address)}"
        )
    with environment(RAY_gcs_server_port_wait_time_s=str(CONNECT_ATTEMPTS)):
        try:
            return ray.init(
                address=f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        except Exception as err:  # noqa: BLE001 - Ray raises several kinds; each is reported
            ray.shutdown()
            raise NormbenchError(connect_failure(address, err)) from None


def connect_failure(address: str, err: BaseException) -> str:
    """The paragraph for a ``ray.init`` that found the GCS port open but could not join."""
    chain = []
    while err is not None and len(chain) < 10:
        chain.append(err)
        err = err.__cause__ or err.__context__
    refused = (
        "InvalidAuthToken" in str(e) or type(e).__name__ == "AuthenticationError" for e in chain
    )
    if any(refused):
        return (
            f"The Ray cluster at {address} refused this machine's authentication token. The "
            "cluster uses Ray's token authentication: set RAY_AUTH_MODE=token here and give this "
            "machine the cluster's token (copy ~/.ray/auth_token from the head, or set "
            "RAY_AUTH_TOKEN)."
        )
    return (
        f"Cannot join the Ray cluster at {address}: {one_line(chain[-1])}. "
        f"{CHECKS.format(address=address)}"
    )


def one_line(err: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, shortened to ``limit`` characters; of a message that
    carries a formatted traceback (Ray's often do), its last line, the innermost error."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if any("Traceback (most recent call last)" in line for line in lines):
        return lines[-1] if len(lines[-1]) <= limit else lines[-1][: limit - 3] + "..."
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
