"""The run device, its numeric precision, and the provenance recorded with every run."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

import normbench
from normbench.errors import NormbenchError


def resolve_device(name: str | None = None) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:1", ...) or the best available device."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NormbenchError(f"Invalid device {name!r}; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NormbenchError(
            f"Device {name!r} was asked for but CUDA is not available here; the device found is "
            f"{device_name(torch.device('cpu'))} (use --device cpu)."
        )
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise NormbenchError(
                f"Device {name!r} was asked for but this machine has {count} CUDA device(s) "
                f"(cuda:0..cuda:{count - 1})."
            )
    if device.type not in ("cpu", "cuda"):
        raise NormbenchError(f"Device type {device.type!r} is not supported; use 'cpu' or 'cuda'.")
    return device


def fast_bf16(device: torch.device) -> bool:
    """Whether the device has bfloat16 matrix units (CUDA with bf16, or a CPU with Intel AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx and amx())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a budget's ``precision`` ("fp32", "bf16" or "auto"); None = fp32."""
    if precision == "bf16" or (precision == "auto" and fast_bf16(device)):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``; no autocast (fp32) when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a timer reads finished work; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configure_kernels(device: torch.device, benchmark: bool) -> dict[str, Any]:
    """Let cuDNN time its convolution algorithms and keep the fastest (``benchmark``) on CUDA.

    The algorithm chosen can differ between processes, so with it a resumed run is not
    bit-identical to an uninterrupted one (it still trains the same recipe); on the CPU, and on
    CUDA without it, resuming is bit-identical. Returns what the run records."""
    if device.type != "cuda":
        return {"cudnn_benchmark": False}
    torch.backends.cudnn.benchmark = benchmark
    return {"cudnn_benchmark": benchmark}


def compiled_for_training(
    model: torch.nn.Module, budget: dict[str, Any], device: torch.device, info: dict[str, Any]
) -> torch.nn.Module:
    """The module the training steps call: ``torch.compile(model)`` where the budget asks for it
    and the device can compile, else ``model`` itself. Parameters are shared, so the run keeps
    saving, evaluating and checkpointing ``model``. Compilation is off on the CPU (it takes
    longer there than the small budgets train); where it is unavailable on CUDA (no Triton), a
    warning says so and the run trains eagerly. ``info["compile"]`` records what happened."""
    if not budget.get("compile"):
        info["compile"] = "off"
        return model
    if device.type != "cuda":
        info["compile"] = "off on cpu"
        return model
    reason = _compile_unavailable()
    if reason is not None:
        warnings.warn(f"torch.compile is unavailable ({reason}); training eagerly.", stacklevel=2)
        info["compile"] = f"unavailable ({reason}); eager"
        return model
    info["compile"] = "on"
    return torch.compile(model)


def _compile_unavailable() -> str | None:
    """Why torch.compile cannot build CUDA kernels here, or None when it can."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return "this torch has no Triton check"
    return None if has_triton() else "Triton is not installed"


@contextlib.contextmanager
def torch_threads(count: int | None):
    """torch's compute threads set to ``count`` inside the block, restored after it (None:
    unchanged). The plan times a run with the threads its worker will have."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} x{torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


class RunMemory:
    """The peak memory of one run above what the process held when the run started.

    A process runs many runs one after another, so a process-wide peak would give every later
    run the maximum of all earlier ones. Each run therefore measures its own:

    - CUDA: the peak of memory allocated by tensors (``max_memory_allocated``, its statistics
      reset at the start) minus what was allocated at the start.
    - CPU (Linux): the peak resident set size of the process (``VmHWM``, reset at the start
      through ``/proc/self/clear_refs``) minus the resident set at the start. Heap memory that
      earlier work freed is handed back to the system first (glibc ``malloc_trim``); otherwise
      a run could reuse it without the resident set growing and report too little. Where the
      kernel refuses the reset, a thread samples the resident set every few milliseconds (a
      peak shorter than that can be missed). Without ``/proc`` nothing is measured (NaN).

    Use as a context manager; :meth:`peak_mb` reads the peak so far, and after the block the
    peak of the block (the kernel's record is process-wide, so the next run resets it).
    """

    SAMPLE_SECONDS = 0.005

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._baseline = 0
        self._sampled_peak = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._kernel_peak = False
        self._final: float | None = None

    def __enter__(self) -> RunMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            return self
        _release_freed_heap()
        self._baseline = _resident_bytes() or 0
        self._kernel_peak = _reset_peak_resident()
        if not self._kernel_peak and _resident_bytes() is not None:
            self._sampled_peak = self._baseline
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._final = self.peak_mb()
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.SAMPLE_SECONDS):
            self._sampled_peak = max(self._sampled_peak, _resident_bytes() or 0)

    def peak_mb(self) -> float:
        """MB above the start at the run's peak so far (NaN where it cannot be measured)."""
        if self._final is not None:
            return self._final
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._kernel_peak:
            peak = _status_bytes("VmHWM") or 0
        elif self._sampler is not None:
            peak = max(self._sampled_peak, _resident_bytes() or 0)
        else:
            return float("nan")
        return max(peak - self._baseline, 0) / 2**20


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (given there in kB), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_resident() -> bool:
    """Reset the kernel's record of the process's peak resident set; whether that worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
    except OSError:
        return False
    return _status_bytes("VmHWM") is not None


def _resident_bytes() -> int | None:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _release_freed_heap() -> None:
    """Give the heap memory that glibc keeps after a free back to the system (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).malloc_trim(0)


@functools.cache
def git_revision() -> str | None:
    """The git revision of normbench's source tree, with "+dirty" for local changes, if any.

    Read once per process: that is the code this process imported and runs."""
    root = Path(normbench.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(device: torch.device) -> dict[str, Any]:
    return {
        "normbench": normbench.__version__,
        "git_revision": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
