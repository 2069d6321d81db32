"""Confined worker processes for untrusted code (submitted norms, the training runs that use them).

The orchestrator (the process that holds the results database) never imports submitted code: it
starts a worker with :func:`launch`, reads the worker's events and reaps it with
:meth:`Worker.wait`. The worker module calls, first thing in its main::

    payload = sandbox.read_job()                      # the JSON given to launch, from stdin
    sandbox.enter(sandbox.Policy.from_json(payload["policy"]))
    ...                                               # only now torch and submitted code
    sandbox.emit({"event": "result", ...})

By convention the caller puts ``policy.to_json()`` under ``"policy"`` in the job it launches, and
passes the same policy to :func:`launch` (which uses its limits to name an exit's cause).

Parent side (:func:`launch`): the worker gets its own session and process group, a cleaned
environment built from an allowlist (never the database URL or credentials), its stdout and stderr
in ``worker.log`` in its scratch directory (its cwd, ``HOME`` and ``TMPDIR``), and an event pipe.
Events are newline-delimited JSON objects, read with ``json.loads`` only: the worker is hostile
and unpickling its bytes would run its code here. A line that is not a JSON object, or one over
``MAX_EVENT_BYTES``, is a protocol error: the worker is killed and :meth:`Worker.next_event`
returns ``{"event": "protocol_error", "detail": ...}`` once, then raises ``EOFError``. The first
event must be the ``sandbox`` report of :func:`enter` (consumed into :attr:`Worker.sandbox`); a
worker that emits anything before it, or a second report, breaks the protocol. When the worker
ends, every process left in its group is killed.

Child side (:func:`enter`), before any untrusted code and before torch starts threads:

1. ``PR_SET_PDEATHSIG`` = SIGKILL, so a worker never outlives the thread that launched it (a
   ``kill -9`` of the orchestrator takes its workers along; launch from a long-lived thread).
2. Resource limits: RLIMIT_AS (not with CUDA), RLIMIT_CPU (SIGXCPU, SIGKILL 5 s later), no core.
3. Landlock: read only the system trees, Python's own trees, ``sys.path``, the packages already
   imported and ``read_paths``; write only the scratch directory and ``write_paths``; of ``/dev``
   only the harmless nodes (and the NVIDIA ones with CUDA): the tests run as root, and a writable
   ``/dev/vda`` or a ``mknod`` in scratch would undo everything else. No TCP bind or connect; no
   signals to, or abstract sockets of, processes outside the worker.
4. seccomp: no new processes (fork, vfork, clone without CLONE_THREAD: EPERM; clone3: ENOSYS so
   glibc falls back to clone), so threads work but helpers and fork bombs do not; no sockets but
   Unix ones and no ``connect`` at all (a Unix socket path, such as a local database's, is beyond
   Landlock); no ``io_uring`` (its operations bypass seccomp), no clearing of the death signal,
   and none of the calls root could use to leave the sandbox (modules, mounts, namespaces,
   ptrace, device nodes, file handles, keyrings, reboot).

Where the kernel lacks Landlock or seccomp (another OS, an old kernel) the worker still runs and
its report says ``landlock_abi: 0`` / ``seccomp: false``; the orchestrator logs a warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import resource
import select
import signal
import stat
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

log = logging.getLogger(__name__)

#: The longest event line the orchestrator accepts.
MAX_EVENT_BYTES = 64 * 2**20
#: How many lines of the worker's output an Exit keeps.
LOG_TAIL_LINES = 20
LOG_NAME = "worker.log"
EVENT_FD_VAR = "NORMBENCH_EVENT_FD"
PARENT_PID_VAR = "NORMBENCH_PARENT_PID"
#: What a worker inherits from the orchestrator's environment; nothing else (no NORMBENCH_DB, no
#: credentials).
ENV_ALLOWLIST = (
    "PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS",
    "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NORMBENCH_CACHE_DIR", "NORMBENCH_JPEG_CODEC",
)  # fmt: skip
#: Exit status of a worker whose orchestrator was gone before it could ask to die with it.
ORPHANED_STATUS = 71


@dataclass(frozen=True)
class Limits:
    """Resource limits of a worker (None: unlimited)."""

    memory_mb: int | None = None  # RLIMIT_AS of the worker (not applied when cuda is True)
    cpu_seconds: int | None = None  # RLIMIT_CPU (soft; hard = soft + 5 -> SIGKILL)


@dataclass(frozen=True)
class Policy:
    """What a worker may touch besides the system trees, its scratch directory and ``/dev/null``.
    Paths should be absolute (a relative one is taken from the worker's scratch directory)."""

    read_paths: tuple[str, ...] = ()  # readable trees besides the system ones (data dir, caches)
    write_paths: tuple[str, ...] = ()  # writable trees besides the scratch dir (checkpoints)
    limits: Limits = field(default_factory=Limits)
    cuda: bool = False  # the worker may use CUDA (no RLIMIT_AS; the NVIDIA devices stay rw)

    def to_json(self) -> dict:
        return {
            "read_paths": list(self.read_paths),
            "write_paths": list(self.write_paths),
            "limits": {"memory_mb": self.limits.memory_mb, "cpu_seconds": self.limits.cpu_seconds},
            "cuda": self.cuda,
        }

    @classmethod
    def from_json(cls, data: dict) -> Policy:
        unknown = set(data) - {"read_paths", "write_paths", "limits", "cuda"}
        if unknown:
            raise ValueError(f"unknown sandbox policy keys: {', '.join(sorted(unknown))}")
        limits = dict(data.get("limits") or {})
        if set(limits) - {"memory_mb", "cpu_seconds"}:
            raise ValueError(f"unknown sandbox limits: {', '.join(sorted(limits))}")
        return cls(
            read_paths=tuple(str(p) for p in data.get("read_paths", ())),
            write_paths=tuple(str(p) for p in data.get("write_paths", ())),
            limits=Limits(**limits),
            cuda=bool(data.get("cuda", False)),
        )


@dataclass(frozen=True)
class Exit:
    """How a worker ended."""

    returncode: int  # as subprocess has it: negative for the signal that killed it
    cause: str  # "" when 0, else a phrase such as "exited with status 3"
    log_tail: str  # the last lines (<= LOG_TAIL_LINES) of the worker's stdout and stderr


# --- parent side ----------------------------------------------------------------------------------


def launch(
    module: str,
    job: dict,
    *,
    policy: Policy,
    scratch: Path,
    env: dict[str, str] | None = None,
) -> Worker:
    """Start ``python -m <module>`` (this interpreter) as a confined worker in ``scratch``; ``job``
    is written to its stdin as JSON. ``env`` adds to the allowlisted environment."""
    scratch = Path(scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(job).encode()
    child_env = {k: os.environ[k] for k in ENV_ALLOWLIST if k in os.environ}
    child_env.update(HOME=str(scratch), TMPDIR=str(scratch), PYTHONDONTWRITEBYTECODE="1")
    child_env.update(env or {})
    # A fresh file, never through a link an earlier worker may have left in a reused scratch
    # directory (truncating its target here would be the orchestrator's doing). The parent reads
    # it through this descriptor only, for the same reason.
    log_path = scratch / LOG_NAME
    with contextlib.suppress(FileNotFoundError):
        log_path.unlink()
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    log_file = os.fdopen(os.open(log_path, flags, 0o600), "w+b")
    read_end, write_end = os.pipe()
    child_env[EVENT_FD_VAR] = str(write_end)
    child_env[PARENT_PID_VAR] = str(os.getpid())
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=scratch,
            env=child_env,
            start_new_session=True,
            close_fds=True,
            pass_fds=(write_end,),
        )
    except BaseException:
        os.close(read_end)
        log_file.close()
        raise
    finally:
        os.close(write_end)
    worker = Worker(process, read_end, log_file, policy)
    try:
        process.stdin.write(payload)
        process.stdin.close()
    except BrokenPipeError:
        pass  # it died before reading its job; wait() says why
    except BaseException:
        worker.kill()
        raise
    return worker


class Worker:
    """A running worker: its events, its end. Not thread-safe (one reader)."""

    def __init__(self, process: subprocess.Popen, events_fd: int, log_file, policy: Policy):
        self.pid = process.pid
        self._process = process
        self._fd: int | None = events_fd
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no newline
        self._log = log_file
        self._policy = policy
        self._sandbox: dict | None = None
        self._exit: Exit | None = None
        self._stopped: dict[int, str] = {}  # signal we sent -> the cause it stands for
        self._protocol_error: str | None = None
        self._closer = weakref.finalize(self, _close_all, [events_fd], log_file)

    @property
    def sandbox(self) -> dict:
        """What the worker reported it applied (``enter``'s dict), {} before its report."""
        return dict(self._sandbox or {})

    # events

    def next_event(self, timeout: float | None) -> dict | None:
        """The next event the worker emitted, or None when none came within ``timeout`` seconds
        (None: wait as long as it takes). Raises EOFError once the channel is closed and drained;
        a protocol error is returned once as ``{"event": "protocol_error", "detail": ...}``."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            line = self._take_line()
            if line is not None:
                event = self._parse(line)
                if event is not None:
                    return event
                continue
            if self._protocol_error is not None:
                detail, self._protocol_error = self._protocol_error, ""
                if detail:
                    return {"event": "protocol_error", "detail": detail}
            if self._fd is None:
                raise EOFError("the worker's event channel is closed")
            # A timeout of 0 (or one that ran out) still looks once, without waiting: a caller
            # that polls several workers in turn must see what each has sent.
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not _readable(self._fd, remaining):
                return None
            chunk = os.read(self._fd, 2**20)
            if not chunk:
                # A partial last line is what a worker killed mid-write leaves: not an error.
                self._close_events()
                self._buffer.clear()
                continue
            self._buffer += chunk

    def _take_line(self) -> bytes | None:
        if self._protocol_error is not None:
            return None
        end = self._buffer.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buffer)
            if len(self._buffer) > MAX_EVENT_BYTES:
                self._fail(f"it sent an event line longer than {MAX_EVENT_BYTES // 2**20} MiB")
            return None
        if end > MAX_EVENT_BYTES:
            self._fail(f"it sent an event line longer than {MAX_EVENT_BYTES // 2**20} MiB")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._scanned = 0
        return line

    def _parse(self, line: bytes) -> dict | None:
        """The event on ``line``; None for the sandbox report (kept) and after a protocol error."""
        if not line.strip():
            return None
        try:
            event = json.loads(line)
        except (ValueError, RecursionError) as err:
            return self._fail(f"it sent a line that is not JSON ({_shorten(str(err))})")
        if not isinstance(event, dict):
            return self._fail(f"it sent a JSON {type(event).__name__}, not an object")
        kind = event.get("event")
        if self._sandbox is None:
            if kind != "sandbox":
                return self._fail("it sent events before confining itself (no sandbox report)")
            self._sandbox = {k: v for k, v in event.items() if k != "event"}
            self._warn_if_unconfined()
            return None
        if kind in ("sandbox", "protocol_error"):
            return self._fail(f"it sent a second {kind!r} event")
        return event

    def _fail(self, detail: str) -> None:
        self._protocol_error = detail
        self._buffer.clear()
        self._close_events()
        self._kill(f"was killed for breaking the event protocol: {detail}")
        return None

    def _warn_if_unconfined(self) -> None:
        missing = []
        if not self._sandbox.get("landlock_abi"):
            missing.append("Landlock (file and network access)")
        if not self._sandbox.get("seccomp"):
            missing.append("seccomp (no new processes)")
        if missing:
            log.warning(
                "Worker %d runs without %s: this system does not provide it, so submitted code "
                "is confined less.",
                self.pid,
                " or ".join(missing),
            )

    def _close_events(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._closer.detach()
            self._closer = weakref.finalize(self, _close_all, [], self._log)
            self._fd = None

    # the end

    def wait(self, timeout: float | None = None) -> Exit:
        """Reap the worker and say how it ended; after ``timeout`` seconds it is killed (cause:
        "timed out after N s"). Every process left in its group is killed, whatever happened.
        Drain the events first: a worker blocked on a full event pipe never ends by itself."""
        if self._exit is not None:
            return self._exit
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        pause = 0.001
        while not _has_exited(self.pid):
            if deadline is not None and time.monotonic() >= deadline:
                self._stopped.setdefault(signal.SIGKILL, f"timed out after {timeout:g} s")
                self._signal_group(signal.SIGKILL)
                deadline = None  # now it ends promptly
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        # The exited main process is kept unreaped (a zombie) until its group is empty, so its
        # pid, which is also the group's id, cannot be reused by an unrelated process meanwhile.
        self._empty_group()
        _, status, usage = os.wait4(self.pid, 0)
        returncode = os.waitstatus_to_exitcode(status)
        self._process.returncode = returncode  # reaped here; keeps Popen from trying again
        tail = _log_tail(self._log)
        self._log.close()
        cause = self._cause(returncode, usage.ru_utime + usage.ru_stime, tail)
        self._exit = Exit(returncode, cause, tail)
        return self._exit

    def kill(self) -> None:
        """SIGKILL to the worker's whole process group, then reap it."""
        self._kill("was killed by normbench")

    def _kill(self, cause: str) -> None:
        if self._exit is None:
            self._stopped.setdefault(signal.SIGKILL, cause)
            self._signal_group(signal.SIGKILL)
            self.wait()

    def interrupt(self, grace: float = 5.0) -> None:
        """SIGTERM to the worker's group, SIGKILL after ``grace`` seconds; then reap it."""
        if self._exit is not None:
            return
        self._stopped[signal.SIGTERM] = "was interrupted (SIGTERM)"
        self._stopped[signal.SIGKILL] = f"was killed after ignoring SIGTERM for {grace:g} s"
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while not _has_exited(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._kill(self._stopped[signal.SIGKILL])

    def _signal_group(self, sig: int) -> None:
        # The worker leads its group (start_new_session), so the group id is its pid; it cannot
        # leave the group (setsid and setpgid fail for a session leader).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _empty_group(self) -> None:
        """SIGKILL what is left in the worker's group until nothing but zombies remain."""
        deadline = time.monotonic() + 10.0
        while True:
            self._signal_group(signal.SIGKILL)
            left = group_members(self.pid) - {self.pid}
            if not left:
                return
            if time.monotonic() > deadline:
                log.warning("Processes %s of worker %d do not die.", sorted(left), self.pid)
                return
            time.sleep(0.01)

    def _cause(self, returncode: int, cpu_seconds: float, tail: str) -> str:
        limits = self._policy.limits
        if returncode == 0:
            return ""
        if returncode > 0:
            last = tail.rstrip().rsplit("\n", 1)[-1]
            if returncode == 1 and last.startswith("MemoryError"):
                if limits.memory_mb is None or self._policy.cuda:
                    return "ran out of memory (a MemoryError)"
                return f"ran out of memory (a MemoryError at its limit of {limits.memory_mb} MB)"
            if returncode == ORPHANED_STATUS:
                return f"exited with status {returncode} (its orchestrator was gone)"
            return f"exited with status {returncode}"
        sig = -returncode
        if sig in self._stopped:
            return self._stopped[sig]
        over_cpu = limits.cpu_seconds is not None and cpu_seconds >= limits.cpu_seconds
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and over_cpu):
            return f"exceeded its CPU-time limit of {limits.cpu_seconds} s"
        if sig == signal.SIGKILL:
            return "was killed by SIGKILL (out of memory, or killed)"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            return f"was killed by signal {sig}"
        description = (signal.strsignal(sig) or "").lower()
        return f"was killed by {name} ({description})" if description else f"was killed by {name}"


def _close_all(fds: list[int], log_file) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    log_file.close()


def _readable(fd: int, timeout: float | None) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        try:
            return bool(poller.poll(None if timeout is None else timeout * 1000))
        except InterruptedError:  # pragma: no cover - retried by Python itself since PEP 475
            continue


def _has_exited(pid: int) -> bool:
    """Whether ``pid`` (our child) has exited, without reaping it."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None and info.si_pid == pid


def group_members(pgid: int) -> set[int]:
    """The live (not zombie) processes in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return set()
        return {pgid}  # cannot list them here; at least one is there
    members = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The name in parentheses is the worker's to choose: parse after the last ")".
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.add(int(entry.name))
    return members


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _log_tail(log_file, lines: int = LOG_TAIL_LINES, window: int = 64 * 1024) -> str:
    """The last ``lines`` lines of the log, with control characters (terminal escapes the worker
    may have printed) shown as ``?``."""
    size = os.fstat(log_file.fileno()).st_size
    data = os.pread(log_file.fileno(), window, max(0, size - window))
    text = _CONTROL.sub("?", data.decode("utf-8", errors="replace").replace("\r\n", "\n"))
    return "\n".join(text.rstrip("\n").split("\n")[-lines:]) if text.strip() else ""


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- child side -----------------------------------------------------------------------------------

_emit_lock = threading.Lock()


def read_job() -> dict:
    """The job the orchestrator launched this worker with (JSON on stdin)."""
    job = json.loads(sys.stdin.buffer.read())
    if not isinstance(job, dict):
        raise ValueError("the job on stdin is not a JSON object")
    return job


def emit(event: dict) -> None:
    """Send ``event`` to the orchestrator as one JSON line (written at once, safe from threads)."""
    data = (json.dumps(event) + "\n").encode()
    fd = int(os.environ[EVENT_FD_VAR])
    with _emit_lock:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def enter(policy: Policy) -> dict:
    """Confine this process as ``policy`` says (see the module's docstring) and report it on the
    event channel; returns the report. Call it before any untrusted code runs and before any
    thread starts. Raises if a mechanism the kernel has cannot be applied."""
    _die_with_parent()
    try:  # loaded before Landlock: finding libseccomp runs ldconfig
        import pyseccomp
    except (ImportError, OSError, AttributeError):
        pyseccomp = None
    limits = _apply_limits(policy)
    abi = _apply_landlock(policy)
    no_capabilities = _drop_capabilities()
    applied = _apply_seccomp(pyseccomp) if pyseccomp is not None else False
    report = {
        "event": "sandbox",
        "landlock_abi": abi,
        "seccomp": applied,
        "limits": limits,
        "capabilities_dropped": no_capabilities,
    }
    emit(report)
    return report


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
    libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    if libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may have died before the death signal was armed: then nobody would send it.
    expected = os.environ.get(PARENT_PID_VAR)
    if expected is not None and os.getppid() != int(expected):
        os._exit(ORPHANED_STATUS)


def _apply_limits(policy: Policy) -> dict:
    def cap(kind: int, soft: int, hard: int) -> None:
        _, current_hard = resource.getrlimit(kind)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(kind, (soft, hard))

    limits = policy.limits
    memory_mb = None if policy.cuda else limits.memory_mb
    if memory_mb is not None:
        cap(resource.RLIMIT_AS, memory_mb * 2**20, memory_mb * 2**20)
    if limits.cpu_seconds is not None:
        cap(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 5)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return {"memory_mb": memory_mb, "cpu_seconds": limits.cpu_seconds, "core": 0}


# Landlock (linux/landlock.h). The syscall numbers are the same on every architecture.
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
FS_MAKE_SYM, FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
#: The rights a rule on a file (not a directory) may carry.
_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
#: Writable trees get every right but making device nodes.
_WRITE_TREE = (1 << 16) - 1 & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK | FS_IOCTL_DEV)
_DEVICE = FS_READ_FILE | FS_WRITE_FILE | FS_IOCTL_DEV
SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/sys", "/opt")
#: Of /proc, the worker reads its own process and these system-wide entries, never another
#: process: /proc/<orchestrator>/environ or cmdline would show it the database URL.
PROC_ENTRIES = (
    "cpuinfo", "meminfo", "stat", "loadavg", "uptime", "version", "filesystems", "sys", "driver",
    "pressure", "swaps", "vmstat", "zoneinfo", "buddyinfo", "cgroups", "devices", "modules",
)  # fmt: skip
#: Device nodes every worker may use; /dev itself may only be listed.
SAFE_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
CUDA_DEVICES = ("/dev/nvidia*", "/dev/dri")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _syscall(libc, number: int, *args) -> int:
    result = libc.syscall(number, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"Landlock syscall {number}: {os.strerror(err)}")
    return result


def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers, 0 when it has none."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(
        ctypes.c_long(_SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
        ctypes.c_uint32(_CREATE_RULESET_VERSION),
    )  # fmt: skip
    return max(int(result), 0)


def _read_trees(policy: Policy) -> list[str]:
    trees = [*SYSTEM_READ_PATHS, sys.prefix, sys.base_prefix, sys.exec_prefix]
    executable = os.path.realpath(sys.executable)
    trees += [os.path.dirname(executable), os.path.dirname(os.path.dirname(executable))]
    trees += [p for p in sys.path if p and os.path.isdir(p)]
    # Editable installs map packages from outside sys.path: keep every package already imported
    # (the worker's own, normbench) readable, for the submodules it imports later.
    for name, module in list(sys.modules.items()):
        if "." not in name:
            trees += [p for p in getattr(module, "__path__", None) or () if isinstance(p, str)]
    return trees + list(policy.read_paths)


def _apply_landlock(policy: Policy) -> int:
    abi = landlock_abi()
    if abi <= 0:
        return 0
    fs = (1 << 13) - 1  # ABI 1
    if abi >= 2:
        fs |= FS_REFER
    if abi >= 3:
        fs |= FS_TRUNCATE
    if abi >= 5:
        fs |= FS_IOCTL_DEV
    attr = _RulesetAttr(handled_access_fs=fs)
    size = 8
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP  # and no rule grants either
        size = 16
    if abi >= 6:
        attr.scoped = SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET
        size = 24
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    ruleset = _syscall(
        libc, ctypes.c_long(_SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
        ctypes.c_uint32(0),
    )  # fmt: skip
    try:
        rules = [(path, _READ) for path in _read_trees(policy)]
        rules += [(f"/proc/{name}", _READ) for name in PROC_ENTRIES]
        rules += [(path, _WRITE_TREE) for path in (os.getcwd(), *policy.write_paths)]
        rules.append(("/dev", FS_READ_DIR))
        devices = list(SAFE_DEVICES)
        if policy.cuda:
            devices += [p for pattern in CUDA_DEVICES for p in sorted(glob(pattern))]
        rules += [(path, _DEVICE | FS_READ_DIR) for path in devices]
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except (FileNotFoundError, NotADirectoryError):
                continue  # only existing paths get rules
            try:
                _add_rule_beneath(libc, ruleset, fd, rights & fs)
            finally:
                os.close(fd)
        # The rule on /proc/<pid> holds on to that directory's inode, but procfs makes a new one
        # when an unused /proc/<pid> is looked up again: keeping it open keeps it in use.
        _pinned.append(os.open(f"/proc/{os.getpid()}", os.O_PATH | os.O_CLOEXEC))
        _add_rule_beneath(libc, ruleset, _pinned[-1], _READ & fs)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _syscall(libc, ctypes.c_long(_SYS_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return abi


_pinned: list[int] = []


def _add_rule_beneath(libc, ruleset: int, fd: int, rights: int) -> None:
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        rights &= _FILE_RIGHTS
    rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
    _syscall(
        libc, ctypes.c_long(_SYS_ADD_RULE), ctypes.c_int(ruleset),
        ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0),
    )  # fmt: skip


PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]


def _drop_capabilities() -> bool:
    """Give up every capability, for good (bounding set too). As root the worker would otherwise
    raise its own resource limits again, or renice and re-limit the orchestrator."""
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    with contextlib.suppress(OSError):  # kernels before 4.3 have no ambient set
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    cap = 0
    while True:
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError as err:
            if err.errno == errno.EINVAL:
                break  # past the last capability this kernel knows
            if err.errno != errno.EPERM:  # EPERM: not root, nothing to drop
                raise
        cap += 1
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")
    return True


#: Calls a worker never needs and root could use to leave the sandbox: EPERM.
DENIED_SYSCALLS = (
    "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2",
    "pivot_root", "chroot", "unshare", "setns", "mknod", "mknodat", "open_by_handle_at",
    "name_to_handle_at", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "reboot", "swapon", "swapoff", "bpf", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key", "acct", "syslog", "iopl", "ioperm", "quotactl",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "fanotify_init", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "fsopen", "fsmount", "fsconfig", "move_mount", "open_tree", "mount_setattr", "connect",
    "migrate_pages", "move_pages", "kcmp", "get_robust_list",
    # File metadata: Landlock guards a file's bytes, not its mode, owner, times or extended
    # attributes, so a worker could otherwise chmod 000 the results database it cannot write.
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "utime", "utimes", "futimesat", "utimensat", "setxattr", "lsetxattr", "fsetxattr",
    "removexattr", "lremovexattr", "fremovexattr", "setxattrat", "removexattrat",
)  # fmt: skip
#: Calls that are harmless on the worker itself (pid 0) but, as the orchestrator's uid, would let
#: it re-limit or slow down other processes: (name, index of the pid argument).
SELF_ONLY_SYSCALLS = (
    ("prlimit64", 0), ("setpriority", 1), ("ioprio_set", 1), ("sched_setscheduler", 0),
    ("sched_setparam", 0), ("sched_setattr", 0),
)  # fmt: skip
CLONE_THREAD = 0x00010000
AF_UNIX = 1


def _apply_seccomp(seccomp) -> bool:
    """Load the filter; False when the kernel or libseccomp cannot."""
    try:
        flt = seccomp.SyscallFilter(seccomp.ALLOW)
    except OSError:
        return False
    eperm = seccomp.ERRNO(errno.EPERM)
    with contextlib.suppress(OSError):  # older libseccomp: the worker has no threads yet anyway
        flt.set_attr(seccomp.Attr.CTL_TSYNC, 1)
    for name in DENIED_SYSCALLS:
        _add_rule(seccomp, flt, eperm, name)
    _add_rule(seccomp, flt, seccomp.ERRNO(errno.ENOSYS), "clone3")
    _add_rule(seccomp, flt, eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_THREAD, 0))
    _add_rule(seccomp, flt, eperm, "socket", seccomp.Arg(0, seccomp.NE, AF_UNIX))
    _add_rule(seccomp, flt, eperm, "prctl", seccomp.Arg(0, seccomp.EQ, PR_SET_PDEATHSIG))
    for name, pid_arg in SELF_ONLY_SYSCALLS:
        _add_rule(seccomp, flt, eperm, name, seccomp.Arg(pid_arg, seccomp.NE, 0))
    try:
        flt.load()
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.ENOSYS):
            return False  # no seccomp filters in this kernel
        raise
    return True


def _add_rule(seccomp, flt, action: int, name: str, *args) -> None:
    try:
        number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
    except (OSError, ValueError):
        return
    if number < 0:
        return  # not a call of this architecture (or this libseccomp does not know it)
    flt.add_rule(action, number, *args)
