"""What a run's speed and memory figures measure: the side-by-side speed ratio to BatchNorm, the
norm speed table, and each run's own peak memory."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import invoke
from torch import nn

from normbench import runtime
from normbench.normspeed import side_by_side, training_batch
from normbench.runtime import RunMemory

CPU = torch.device("cpu")


class SimulatedClock:
    """A clock that only the models below advance: each forward pass costs its model's seconds
    times the machine load at that moment, so a load can be applied exactly when wanted."""

    def __init__(self, load_from: float, load: float) -> None:
        self.now, self.load_from, self.load = 0.0, load_from, load

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds * (self.load if self.now >= self.load_from else 1.0)


class Costed(nn.Module):
    """A real linear classifier whose forward pass takes ``cost`` simulated seconds."""

    def __init__(self, clock: SimulatedClock, cost: float) -> None:
        super().__init__()
        self.clock, self.cost = clock, cost
        self.head = nn.Linear(3 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.spend(self.cost)
        return self.head(x.flatten(1))


def test_side_by_side_ratio_holds_when_the_machine_gets_loaded_midway():
    """A norm twice as slow as BatchNorm measures 0.5x even though the machine becomes five
    times slower partway through; timing one model after the other would give about 0.1x."""
    clock = SimulatedClock(load_from=0.3, load=5.0)
    slow, reference = Costed(clock, 0.02), Costed(clock, 0.01)
    x, y = training_batch(8, (3, 4, 4), 10, CPU)
    speed = side_by_side(slow, reference, x, y, pairs=7, min_seconds=0.05, clock=clock)
    assert speed.steps == 3  # a repetition lasts at least min_seconds of the slower model
    assert clock.now > 1.0  # the load did hit the measurement
    assert speed.ratio == pytest.approx(0.5)
    assert speed.iqr == pytest.approx(0.0, abs=1e-9)  # at most one pair straddles the change
    # The reverse comparison is the reciprocal: the ratio is images/s of the first over the second.
    clock = SimulatedClock(load_from=0.3, load=5.0)
    fast, reference = Costed(clock, 0.01), Costed(clock, 0.02)
    assert side_by_side(fast, reference, x, y, clock=clock).ratio == pytest.approx(2.0)


def test_side_by_side_refuses_what_cannot_give_a_ratio():
    clock = SimulatedClock(load_from=1.0, load=1.0)
    model = Costed(clock, 0.01)
    x, y = training_batch(2, (3, 4, 4), 10, CPU)
    with pytest.raises(ValueError, match="distinct models"):
        side_by_side(model, model, x, y, clock=clock)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        side_by_side(model, Costed(clock, 0.01), x, y, pairs=1, clock=clock)


def test_bench_norms_times_a_slower_norm_below_batchnorm(tmp_path):
    """ConvNorm preconditions every convolution with FFTs: side by side with BatchNorm in the
    training configuration it must come out slower."""
    db = tmp_path / "speed.db"
    result = invoke("bench", "norms", "--norms=convnorm", "--batch-size=8", "--pairs=3",
                    "--precision=fp32", f"--db={db}")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fp32, channels_last" in result.output and "3 interleaved pairs" in result.output
    from dashboard.data import norm_speed, readonly_engine

    engine = readonly_engine(f"sqlite:///{db}")
    convnorm, batchnorm = norm_speed(engine, "convnorm"), norm_speed(engine, "batchnorm")
    assert convnorm["vs BatchNorm"][0] < 1 and convnorm["IQR"][0] >= 0
    assert convnorm["precision"][0] == "fp32" and convnorm["memory MB"][0] > 0
    # BatchNorm's row is a second BatchNorm model timed against the first: a measured number.
    assert len(batchnorm) == 1 and batchnorm["images/s"][0] > 0


def _hold(megabytes: int) -> None:
    block = torch.ones(megabytes * 2**20 // 4)
    time.sleep(0.05)  # long enough for the sampling fallback to see it
    del block


@pytest.mark.parametrize("kernel_peak", [True, False], ids=["kernel peak", "sampling"])
def test_run_memory_is_each_runs_own_peak(monkeypatch, kernel_peak):
    if not kernel_peak:
        monkeypatch.setattr(runtime, "_reset_peak_resident", lambda: False)
    with RunMemory(CPU) as big:
        _hold(200)
    with RunMemory(CPU) as small:
        _hold(20)
    assert 190 <= big.peak_mb() < 300
    assert 19 <= small.peak_mb() < 100  # not the 200 MB of the run before


def test_a_budget_with_a_single_speed_pair_is_refused(tmp_path):
    from helpers import tiny_suite

    from normbench.errors import SuiteError
    from normbench.suites import load_suite_file

    suite = tiny_suite(tmp_path)
    suite.write_text(suite.read_text().replace("speed_pairs = 2", "speed_pairs = 1"))
    with pytest.raises(SuiteError, match="budgets.smoke.speed_pairs: a ratio needs at least 2"):
        load_suite_file(suite)
