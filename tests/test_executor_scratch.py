"""Scratch folders a killed orchestrator's workers left behind are removed by the next local
executor; those of a live orchestrator are kept."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from runners.executor import SCRATCH_PREFIX, LocalExecutor


def test_scratch_of_a_dead_orchestrator_is_removed_and_a_live_ones_kept():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    root = Path(tempfile.gettempdir())
    orphan = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{dead.stdout.strip()}-abc-", dir=root))
    (orphan / "worker.log").write_text("left by a killed orchestrator")
    live = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-abc-"))
    try:
        LocalExecutor()
        assert not orphan.exists()
        assert live.exists()
    finally:
        live.rmdir()


def test_a_worker_uses_the_orchestrators_cache_even_when_no_variable_names_it(
    tmp_path, monkeypatch
):
    """Without NORMBENCH_CACHE_DIR a worker's default cache would sit in its scratch HOME: every
    run would decode its dataset again and recompute the real-image features of GAN scores."""
    from normbench import config, sandbox
    from runners.executor import Job, launch_job

    monkeypatch.delenv("NORMBENCH_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    seen = {}
    monkeypatch.setattr(sandbox, "launch", lambda *a, **kw: seen.update(kw))
    job = Job(id="k", kind="classify", spec={}, data_dir=None,
              checkpoint_dir=str(tmp_path / "ckpt"))  # fmt: skip
    launch_job(job, tmp_path / "scratch")
    assert seen["env"] == {"NORMBENCH_CACHE_DIR": str(config.cache_dir())}
    assert config.cache_dir() == (tmp_path / "xdg" / "normbench").resolve()
    assert str(config.cache_dir() / "datasets") in seen["policy"].read_paths
