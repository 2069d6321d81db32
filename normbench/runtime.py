"""The run device, its numeric precision, and the provenance recorded with every run."""

from __future__ import annotations

import functools
import platform
import resource
import subprocess
import sys
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
        raise NormbenchError(f"Device {name!r} was asked for but CUDA is not available here.")
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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux (bytes on macOS); it is the process peak, not the run's.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


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
