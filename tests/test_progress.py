"""The time estimate (numbers in, seconds out), the clock of a running run, the plan printed
before a suite, and the live progress display of runs, decoding and corruption generation."""

from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pytest
import torch
from helpers import invoke, tiny_suite
from rich.console import Console
from test_data import write_hub_parquet

from normbench import estimate, progress
from normbench import metrics as M
from normbench.corruptions.sets import generate
from normbench.data import load_cifar10
from normbench.estimate import Breakdown, Rates, RunClock
from normbench.metrics import MetricRow
from normbench.store import RunStatus, open_store
from normbench.suites import load_suite, plan
from runners.executor import LocalExecutor
from runners.suite import run_suite


def smoke_spec(suite: str = "cifar-c", budget: str = "smoke", **kw):
    return plan(load_suite(suite), budget, norms=["batchnorm"], optimizers=["sgd"], **kw)[0]


def terminal() -> tuple[Console, io.StringIO]:
    """A console that renders live displays as a terminal would, into a buffer."""
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=240), buffer


def plain(buffer: io.StringIO) -> str:
    """What the terminal showed, without colours and cursor movements, one render a line."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue()).replace("\r", "\n")


# --- the estimate, with numbers -------------------------------------------------------------------


def test_run_breakdown_counts_training_evaluation_corruptions_and_the_speed_check():
    spec = smoke_spec()  # 2 epochs of 4,096 images at batch 128; 1,000 test images; 100 per pair
    rates = Rates(train=1000.0, evaluation=5000.0)
    b = estimate.run_breakdown(spec, rates, train_size=50_000, test_size=10_000)
    assert b.train == pytest.approx(2 * 4096 / 1000)
    assert b.evaluation == pytest.approx(2 * 1000 / 5000)  # the test set after every epoch
    assert b.corruptions == pytest.approx(19 * 5 * 100 / 5000)
    # 3 pairs; a step (0.128 s) outlasts the 0.05 s repetition minimum: one step a repetition,
    # plus a warm-up and a sizing step for each of the two models
    assert b.speed_check == pytest.approx(4 * 0.128 + 2 * 3 * 0.128)
    assert b.total == pytest.approx(8.192 + 0.4 + 1.9 + 1.28)

    resumed = estimate.run_breakdown(spec, rates, 50_000, 10_000, epochs_done=1)
    assert resumed.train == pytest.approx(b.train / 2)
    assert resumed.evaluation == pytest.approx(b.evaluation / 2)
    assert (resumed.corruptions, resumed.speed_check) == (b.corruptions, b.speed_check)

    with_other = estimate.run_breakdown(spec, Rates(1000.0, 5000.0, other=3.0), 50_000, 10_000)
    assert with_other.total == pytest.approx(b.total + 3.0)


def test_attacks_and_test_time_adaptation_are_counted():
    """PGD-k and FGSM are forward and backward passes over the attacked subset, at about the
    training rate, plus three evaluations of it; BN adaptation evaluates the clean and corrupted
    images once more, TENT adds a forward and backward pass for each."""
    rates = Rates(train=1000.0, evaluation=5000.0)
    attacked = smoke_spec(suite="adversarial")  # 100 images, PGD-5
    a = attacked.settings["adversarial"]
    plain = dataclasses.replace(attacked, settings={**attacked.settings, "adversarial": None})
    extra = estimate.run_breakdown(attacked, rates, 50_000, 10_000).total
    extra -= estimate.run_breakdown(plain, rates, 50_000, 10_000).total
    n = a["subset"]
    assert extra == pytest.approx(n * (1 + a["steps"]) / 1000 + 3 * n / 5000)

    tta = smoke_spec(suite="cifar-c-tta")  # bn and tent
    assert set(tta.settings["adaptation"]["methods"]) == {"bn", "tent"}
    images = estimate.test_images(tta, 10_000) + estimate.corruption_images(tta, 10_000)
    bare = dataclasses.replace(tta, settings={**tta.settings, "adaptation": None})
    b, b0 = (estimate.run_breakdown(s, rates, 50_000, 10_000) for s in (tta, bare))
    assert b.corruptions - b0.corruptions == pytest.approx(images / 5000 + images / 1000)


def test_work_follows_the_budget():
    cpu = smoke_spec(budget="cpu")  # full training set at batch 256, last batch dropped
    assert estimate.train_images_per_epoch(cpu, 50_000) == 50_000 // 256 * 256
    assert estimate.test_images(cpu, 10_000) == 10_000
    assert estimate.corruption_images(cpu, 10_000) == 19 * 5 * 1000
    full = smoke_spec(budget="full")  # corruption_subset 0: all test images per pair
    assert estimate.corruption_images(full, 10_000) == 19 * 5 * 10_000
    clean = smoke_spec(suite="cifar10", budget="cpu")
    assert estimate.corruption_images(clean, 10_000) == 0
    # a subset larger than the dataset is the whole dataset
    assert estimate.train_images_per_epoch(smoke_spec(), 1000) == 1000 // 128 * 128


def test_speed_check_seconds():
    assert estimate.speed_check_seconds(0, 0.5) == 0
    assert estimate.speed_check_seconds(7, 0.5) == pytest.approx(4 * 0.5 + 2 * 7 * 0.5)
    # fast steps: each repetition runs ceil(0.05 / 0.01) = 5 steps
    assert estimate.speed_check_seconds(7, 0.01) == pytest.approx(4 * 0.01 + 2 * 7 * 0.05)


def test_suite_seconds_adds_runs_at_their_own_rates():
    a, b = smoke_spec(), smoke_spec(seeds=[1])
    clean = smoke_spec(suite="cifar10")
    rates = {
        a.key: Rates(1000.0, 5000.0),
        b.key: Rates(500.0, 2500.0),
        clean.key: Rates(1000.0, 5000.0, other=2.0),
    }
    sizes = {"cifar10": (50_000, 10_000)}
    one = estimate.run_breakdown(a, rates[a.key], *sizes["cifar10"]).total
    half_speed = estimate.run_breakdown(b, rates[b.key], *sizes["cifar10"]).total
    # at half the rates every phase takes twice as long
    assert half_speed == pytest.approx(2 * one)
    clean_total = 8.192 + 0.4 + 1.28 + 2.0  # no corruption set; 2 s from earlier runs
    total = estimate.suite_seconds([a, b, clean], rates, sizes, epochs_done={b.key: 1})
    resumed = estimate.run_breakdown(b, rates[b.key], *sizes["cifar10"], epochs_done=1).total
    assert total == pytest.approx(one + resumed + clean_total)


def test_makespan_gives_each_run_to_the_first_slot_to_come_free():
    assert estimate.makespan([10, 20, 30], slots=1) == 60
    # slot 1: 10 then 30 (ends at 40); slot 2: 20
    assert estimate.makespan([10, 20, 30], slots=2) == 40
    assert estimate.makespan([5, 5, 5, 5], slots=2) == 10
    assert estimate.makespan([7], slots=4) == 7
    assert estimate.makespan([], slots=2) == 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_run_clock_measures_training_and_scales_what_is_left_by_the_actual_rate():
    t = FakeClock()
    plan_ = Breakdown(train=10.0, evaluation=2.0, corruptions=8.0, speed_check=4.0)
    # estimated 100 images/s; the later runs were estimated at 60 s
    clock = RunClock(plan_, rate=100.0, batch_size=10, later=60.0, clock=t)

    def steps(n: int) -> None:
        for _ in range(n):
            clock.step()
            t.now += 0.2  # 10 images in 0.2 s: 50 images/s, half the estimated rate

    assert clock.run_left() == pytest.approx(24.0)  # before training: the whole estimate
    clock.start(epochs=2, steps_per_epoch=50)
    assert clock.run_left() == pytest.approx(100 * 10 / 100 + 2 + 8 + 4)
    steps(11)  # the first step holds the warm-up and is not timed
    assert clock.measured_rate == pytest.approx(50.0)
    assert clock.factor == pytest.approx(2.0)
    # 89 steps left at 50 images/s; evaluation, corruptions and speed check take twice as long
    assert clock.run_left() == pytest.approx(89 * 10 / 50 + 2 * (2 + 8 + 4))
    assert clock.suite_left() == pytest.approx(clock.run_left() + 2 * 60)

    steps(39)
    clock.evaluating(1, 2)  # half of the first epoch's evaluation is done
    assert clock.run_left() == pytest.approx(50 * 10 / 50 + 2 * (1.5 + 8 + 4))
    clock.evaluating(2, 2)
    steps(50)
    assert clock.measured_rate == pytest.approx(50.0)  # the pause for evaluation is not timed
    clock.evaluating(1, 1)
    clock.corruption(0, 95)
    t.now += 10.0
    clock.corruption(19, 95)  # 19 pairs in 10 s: 40 s for the other 76
    assert clock.run_left() == pytest.approx(40 + 2 * 4)
    t.now += 40.0
    clock.corruption(95, 95)
    clock.speed_check()
    t.now += 5.0
    assert clock.run_left() == pytest.approx(2 * 4 - 5)


def test_run_clock_without_an_estimate_shows_training_left_once_measured():
    t = FakeClock()
    clock = RunClock(None, rate=None, batch_size=10, clock=t)
    assert clock.run_left() is None
    clock.start(epochs=1, steps_per_epoch=10)
    assert clock.run_left() is None
    for _ in range(5):
        clock.step()
        t.now += 0.1
    assert clock.run_left() == pytest.approx(5 * 10 / 100)
    assert clock.factor == 1.0  # nothing to compare with


def test_estimate_from_earlier_runs_on_this_machine(tmp_path):
    """Runs with the same settings, finished on this device, give the estimate; a failed run,
    a run on another machine and a run of other settings do not."""
    store = open_store(f"sqlite:///{tmp_path / 'results.db'}")
    spec = smoke_spec()
    here = {"device": "cpu", "device_name": "Test CPU", "threads": 2}
    other_settings = dataclasses.replace(spec, settings={**spec.settings, "epochs": 3})

    def add(key, s, wall, status=RunStatus.finished, machine=here):
        store.begin_run(s.to_dict(), key, device="cpu", provenance=dict(machine),
                        config={**s.to_dict()}, reset=True)  # fmt: skip
        rows = [
            MetricRow(M.WALL_TIME, wall),
            MetricRow(M.TRAIN_THROUGHPUT, 1000.0, "train"),
            MetricRow(M.EVAL_THROUGHPUT, 5000.0, "test"),
        ]
        store.finish_run(key, status=status, metrics=rows, curves=[], epochs_done=2)

    assert estimate.from_history(store, spec, here, 50_000, 10_000) is None
    add("a", spec, 20.0)
    add("b", spec, 30.0)
    add("failed", spec, 900.0, status=RunStatus.failed)
    add("elsewhere", spec, 900.0, machine={**here, "device_name": "Another CPU"})
    add("fewer-threads", spec, 900.0, machine={**here, "threads": 1})
    add("other-settings", other_settings, 900.0)

    rates, n = estimate.from_history(store, spec, here, 50_000, 10_000)
    assert n == 2
    assert (rates.train, rates.evaluation) == (1000.0, 5000.0)
    measured = estimate.run_breakdown(spec, Rates(1000.0, 5000.0), 50_000, 10_000).total
    assert rates.other == pytest.approx(25.0 - measured)  # the median wall time, in full
    assert estimate.run_breakdown(spec, rates, 50_000, 10_000).total == pytest.approx(25.0)


def test_calibration_times_the_budgets_model_in_seconds():
    spec = plan(load_suite("cifar10"), "smoke", norms=["groupnorm"], optimizers=["adamw"])[0]
    rates = estimate.calibrate(spec, torch.device("cpu"), (3, 32, 32), 10, seconds=0.2)
    assert rates.train > 0 and rates.evaluation > 0
    # inference needs no backward pass and no optimizer step
    assert rates.evaluation > rates.train


def test_format_duration():
    assert progress.format_duration(None) == "?"
    assert progress.format_duration(42.4) == "42 s"
    assert progress.format_duration(370) == "6 min 10 s"
    assert progress.format_duration(12 * 60 + 5) == "12 min"
    assert progress.format_duration(3600 + 12 * 60) == "1 h 12 min"


# --- progress bars --------------------------------------------------------------------------------


@pytest.fixture
def tiny_mirror(tmp_path, fresh_cache):
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 10)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        write_hub_parquet(tmp_path / "mirror", split, images, [i % 10 for i in range(n)])
    return tmp_path / "mirror"


def test_decoding_and_generation_show_bars_in_the_open_display(tiny_mirror, fresh_cache):
    console, buffer = terminal()
    with progress.display(console):
        load_cifar10("test", tiny_mirror)
        generate(fresh_cache / "c", data_dir=tiny_mirror, corruptions=("gaussian_noise",))
    shown = plain(buffer)
    assert "decoding CIFAR-10 test" in shown
    assert "generating CIFAR-10-C" in shown and "/50" in shown  # 5 severities x 10 images


def test_a_bar_without_a_display_opens_its_own_and_leaves_no_display():
    with progress.task("work", total=3) as advance:
        assert progress._active is not None
        advance(3)
    assert progress._active is None


# --- real runs ------------------------------------------------------------------------------------


def test_the_plan_says_what_will_run_and_how_long_it_takes(cifar_dir, tmp_path):
    suite = tiny_suite(tmp_path)
    db = tmp_path / "plan.db"
    duration = r"~\d+ (s|min)[\d a-z]*"
    first = invoke("run", f"--suite={suite}", "--budget=smoke", f"--db={db}")
    assert first.exit_code == 0, first.output
    total = r"Plan: 1 run on cpu: 1 starts\. Estimated time on this machine: about \d+ (s|min)"
    assert re.search(total, first.output), first.output
    calibrated = r"calibrated: [\d,]+ training, [\d,]+ evaluation images/s"
    line = rf"run 1/1 +batchnorm \+ sgd \(seed 0\) +{duration} +{calibrated}"
    assert re.search(line, first.output), first.output
    assert re.search(r"done batchnorm \+ sgd \(seed 0\): .*\(estimated [^)]+\)", first.output)

    second = invoke("run", f"--suite={suite}", "--budget=smoke", f"--db={db}", "--seeds=0,1")
    assert second.exit_code == 0, second.output
    assert "Plan: 2 runs on cpu: 1 already finished (skipped), 1 starts." in second.output
    line = rf"run 2/2 +batchnorm \+ sgd \(seed 1\) +{duration} +from 1 earlier run\b"
    assert re.search(line, second.output), second.output

    again = invoke("run", f"--suite={suite}", "--budget=smoke", f"--db={db}", "--seeds=0,1")
    assert "Plan: 2 runs on cpu: 2 already finished (skipped); nothing to run." in again.output


def test_the_live_display_shows_run_k_of_n_epoch_rate_and_time_left(cifar_dir, tmp_path):
    suite = tiny_suite(tmp_path)
    suite.write_text(suite.read_text().replace("train_subset = 512", "train_subset = 2048"))
    specs = plan(load_suite(str(suite)), "smoke", seeds=[0, 1])
    store = open_store(f"sqlite:///{tmp_path / 'live.db'}")
    console, buffer = terminal()
    outcomes = run_suite(
        specs, store, LocalExecutor(), device=torch.device("cpu"), console=console
    ).outcomes
    assert [o.status for o in outcomes] == ["finished", "finished"]
    shown = plain(buffer)
    first = r"run 1/2 batchnorm \+ sgd \(seed 0\): epoch 1/1, evaluating 1/1 batches +━+ +"
    rate_and_left = r"16/16 +[\d,]+ training images/s +run ~\d+ (s|min)[^,]* left, suite ~\d+ "
    assert re.search(first + rate_and_left, shown), shown
    assert re.search(r"run 2/2 batchnorm \+ sgd \(seed 1\): epoch 1/1.* run ~\d+ (s|min)", shown)
    assert "speed check against BatchNorm" in shown
    assert "epoch 1/1: train loss" in shown  # the per-epoch log line stays
