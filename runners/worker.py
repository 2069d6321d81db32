"""The worker process of one job: ``python -m runners.worker``, started by an executor.

It reads its job, confines itself (``normbench.sandbox.enter``: resource limits, Landlock and
seccomp where the kernel has them) before it imports torch or any submitted code, registers the
submitted norms the job carries (each source re-hashed against its recorded SHA-256 first), runs
the job and reports as JSON lines on the event channel: progress while it runs, then one
``result`` or ``error`` event. It never holds the database URL; the orchestrator writes the
results. Exit status 0 after a result, 1 after an error.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any

#: Progress events per second at most (a step event per training step would flood the channel).
EVENTS_PER_SECOND = 10


def main() -> None:
    from normbench import sandbox

    payload = sandbox.read_job()
    sandbox.enter(sandbox.Policy.from_json(payload["policy"]))
    job = payload["job"]
    from normbench.errors import NormbenchError

    try:
        result = run_job(job, sandbox.emit)
    except NormbenchError as err:
        sandbox.emit({"event": "error", "message": str(err), "user_error": True})
        sys.exit(1)
    except Exception:  # noqa: BLE001 - reported to the orchestrator, which records it
        sandbox.emit({"event": "error", "message": traceback.format_exc().strip()})
        sys.exit(1)
    sandbox.emit({"event": "result", "result": result})


def run_job(job: dict[str, Any], emit) -> dict[str, Any]:
    """Run ``job`` in this process (already confined) and return its JSON result."""
    from normbench.submissions import load_entry_point_norms, register_source

    load_entry_point_norms()
    _import_norm_modules(job.get("norm_modules", []))
    for submission in job.get("submissions", []):
        register_source(**submission, folder=Path.cwd())
    if job["kind"] in ("classify", "probe", "gan"):
        return _run(job, emit)
    if job["kind"] == "normspeed":
        return _normspeed(job)
    raise ValueError(f"unknown job kind {job['kind']!r}")


def _import_norm_modules(modules: list[dict[str, Any]]) -> None:
    """Import the modules that registered the job's norms outside normbench (already run by the
    orchestrator, so trusted): by name where this process finds it, else from its file."""
    import importlib
    import importlib.util

    from normbench.norms import NORMS

    for entry in modules:
        if all(name in NORMS for name in entry.get("norms", [])):
            continue
        name, file = entry["module"], entry.get("file")
        if importlib.util.find_spec(name.split(".")[0]) is not None or not file:
            importlib.import_module(name)
            continue
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def _run(job: dict[str, Any], emit) -> dict[str, Any]:
    """A classify, probe or GAN run: the runners take the same arguments and return the same
    result (artifacts as base64 text, the channel carrying JSON)."""
    import base64
    import importlib

    import torch

    from normbench import runtime
    from normbench.errors import NormbenchError
    from normbench.suites import RunSpec

    spec = RunSpec(**job["spec"])
    if spec.key != job["id"]:
        raise NormbenchError(f"The job's spec hashes to {spec.key}, not to its run {job['id']}.")
    if spec.task != job["kind"]:
        raise NormbenchError(f"The job is a {job['kind']} job, but its spec's task is {spec.task}.")
    runner = importlib.import_module(f"runners.{spec.task}")
    result = runner.run(
        spec,
        device=torch.device(job["device"]),
        data_dir=job["data_dir"],
        checkpoint=Path(job["checkpoint_dir"]) / "state.pt",
        progress=_progress(emit),
    )
    return {
        "status": result.status,
        "metrics": [
            [m.name, m.value, m.split, m.corruption, m.severity, m.layer, m.step]
            for m in result.metrics
        ],
        "curves": [list(point) for point in result.curves],
        "epochs_done": result.epochs_done,
        "diverged_step": result.diverged_step,
        "reason": result.reason,
        # What this worker computed with (the run's claim recorded the orchestrator's view).
        "info": {**result.info, "threads": torch.get_num_threads(),
                 "device_name": runtime.device_name(torch.device(job["device"]))},  # fmt: skip
        "artifacts": {
            name: base64.b64encode(data).decode("ascii") for name, data in result.artifacts.items()
        },
    }


def _progress(emit):
    """classify's progress callbacks as events; steps and evaluation batches at most
    ``EVENTS_PER_SECOND`` a second (and always the last of each phase)."""
    from runners.classify import Progress

    last = [0.0]

    def throttled(event: dict[str, Any], final: bool) -> None:
        now = time.monotonic()
        if final or now - last[0] >= 1 / EVENTS_PER_SECOND:
            last[0] = now
            emit(event)

    state = {"steps_per_epoch": 1}

    def on_start(epochs: int, steps_per_epoch: int) -> None:
        state["steps_per_epoch"] = steps_per_epoch
        emit({"event": "start", "epochs": epochs, "steps_per_epoch": steps_per_epoch})

    return Progress(
        on_start=on_start,
        on_step=lambda step: throttled(
            {"event": "step", "step": step}, step % state["steps_per_epoch"] == 0
        ),
        on_epoch=lambda epoch, values: emit({"event": "epoch", "epoch": epoch, "values": values}),
        on_eval_batch=lambda done, total: throttled(
            {"event": "eval", "done": done, "total": total}, done == total
        ),
        on_corruption=lambda done, total: emit(
            {"event": "corruption", "done": done, "total": total}
        ),
        on_speed_check=lambda: emit({"event": "speed_check"}),
    )


def _normspeed(job: dict[str, Any]) -> dict[str, Any]:
    """``normbench bench norms``: each norm's training-step speed beside BatchNorm, and whether
    it holds the norm contract."""
    import torch

    from normbench import runtime
    from normbench.contract import check_norm
    from normbench.norms import NORMS
    from normbench.normspeed import speed_table

    s = job["spec"]
    device = torch.device(job["device"])
    dtype = runtime.autocast_dtype(s["precision"], device)
    rows = speed_table(s["names"], s["batch_size"], s["pairs"], device, dtype)
    out = []
    for r in rows:
        report = check_norm(NORMS.get(r.norm).obj, r.norm, measure_costs=False)
        out.append({
            "norm": r.norm, "images_per_s": r.images_per_s, "ratio": r.ratio, "iqr": r.iqr,
            "memory_mb": r.memory_mb, "params": r.params, "error": r.error,
            "contract": "holds" if report.passed else "; ".join(report.failures()),
        })  # fmt: skip
    return {
        "rows": out,
        "precision": "bf16" if dtype is torch.bfloat16 else "fp32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    main()
