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
