"""Real runs on real CIFAR-10 at the smoke budget: store, rank, reproduce, diverge, fail, resume."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from helpers import invoke, leaderboard_json, smoke_run, tiny_suite
from sqlalchemy import select

from normbench import metrics as M
from normbench.corruptions.sets import ENGINE_VERSION
from normbench.store import CurvePoint, Metric, Run, RunStatus, open_store
from normbench.suites import BUILTIN_DIR, load_suite, plan
from runners.suite import checkpoint_path

SUITE_TEXT = (BUILTIN_DIR / "cifar10.toml").read_text()


def runs(db: str) -> dict[str, Run]:
    with open_store(f"sqlite:///{db}").session() as s:
        return {f"{r.norm}+{r.optimizer}+{r.seed}": r for r in s.scalars(select(Run))}


def metric(db: str, run: Run, name: str, split: str = "") -> float:
    query = select(Metric.value).where(
        Metric.run_id == run.id, Metric.name == name, Metric.split == split
    )
    with open_store(f"sqlite:///{db}").session() as s:
        return s.scalars(query).one()


def integrity(db: str) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.fixture
def db(tmp_path) -> str:
    return str(tmp_path / "results.db")


def test_smoke_suite_trains_stores_and_ranks(cifar_dir, db):
    result = smoke_run(f"--db={db}", norms="batchnorm,layernorm")
    assert result.exit_code == 0, result.output
    found = runs(db)
    assert {r.status for r in found.values()} == {RunStatus.finished}
    bn = found["batchnorm+sgd+0"]
    accuracy = metric(db, bn, M.ACCURACY, "test")
    assert 0.25 < accuracy <= 1.0  # well above the 10% of chance after two short epochs
    assert metric(db, bn, M.TRAIN_THROUGHPUT, "train") > 0
    assert metric(db, bn, M.EVAL_THROUGHPUT, "test") > 0
    assert metric(db, bn, M.PARAM_COUNT) > 0 and 0 <= metric(db, bn, M.ECE, "test") <= 1
    assert bn.provenance["torch"] == torch.__version__ and bn.provenance["device"] == "cpu"
    assert bn.config["protocol"]["weight_decay_rule"].startswith("decay conv/linear weights only")
    with open_store(f"sqlite:///{db}").session() as s:
        curves = s.scalars(select(CurvePoint).where(CurvePoint.run_id == bn.id)).all()
    assert {(c.epoch, c.name) for c in curves} >= {(2, "test_accuracy"), (1, "train_loss")}

    rows = leaderboard_json(db)
    assert [r["rank"] for r in rows] == [1, 2]
    assert {r["norm"] for r in rows} == {"batchnorm", "layernorm"}
    assert rows[0]["accuracy_mean"] >= rows[1]["accuracy_mean"]
    by_norm = {r["norm"]: r for r in rows}
    assert by_norm["batchnorm"]["accuracy_mean"] == pytest.approx(accuracy)
    for norm, run in (("batchnorm", bn), ("layernorm", found["layernorm+sgd+0"])):
        # The board's speed is the ratio each run measured side by side, not a division of two
        # runs' own throughputs; those stay a property of each run.
        speed = metric(db, run, M.SPEED_VS_BN, "train")
        assert by_norm[norm]["speed_vs_batchnorm_mean"] == pytest.approx(speed) and speed > 0
        assert by_norm[norm]["speed_vs_batchnorm_iqr_mean"] >= 0
        own = metric(db, run, M.TRAIN_THROUGHPUT, "train")
        assert by_norm[norm]["train_images_per_s_mean"] == pytest.approx(own)
        assert by_norm[norm]["protocol_version"] == load_suite("cifar10").spec.protocol_version
    csv = invoke("leaderboard", "--suite=cifar10", "--budget=smoke", f"--db={db}", "--format=csv")
    assert csv.output.splitlines()[0].startswith("rank,norm,optimizer")
    table = invoke("leaderboard", "--suite=cifar10", "--budget=smoke", f"--db={db}")
    assert "batchnorm" in table.output and "layernorm" in table.output
    caption = " ".join(table.output.split())
    assert "in interleaved repetitions" in caption and "own throughput, measured during" in caption

    again = smoke_run(f"--db={db}")  # a finished run key is skipped unless forced
    assert "already finished" in again.output and "1 skipped" in again.output


def test_each_run_measures_its_own_peak_memory_and_its_speed_side_by_side(cifar_dir, tmp_path, db):
    """A small run after a big one in the same process reports its own, smaller peak (a
    process-wide peak would repeat the big run's); and a norm known to be slower than BatchNorm
    (ConvNorm preconditions every convolution with FFTs) measures slower side by side."""
    big = tiny_suite(tmp_path, name="big-batches")
    text = big.read_text().replace("batch_size = 128", "batch_size = 512")
    big.write_text(text.replace("widths = [8, 8, 8, 8]", "widths = [16, 16, 16, 16]"))
    small = tiny_suite(tmp_path, name="small")
    for suite, norm in ((big, "batchnorm"), (small, "convnorm")):
        result = invoke("run", f"--suite={suite}", "--budget=smoke", f"--norms={norm}",
                        f"--db={db}")  # fmt: skip
        assert result.exit_code == 0, result.output
    found = runs(db)
    big_run, small_run = found["batchnorm+sgd+0"], found["convnorm+sgd+0"]
    # 512 images x 16 channels x 32 x 32 float32 is 32 MB per activation of the big run.
    assert 0 < metric(db, small_run, M.PEAK_MEMORY) < metric(db, big_run, M.PEAK_MEMORY) - 32
    speed = metric(db, small_run, M.SPEED_VS_BN, "train")
    assert speed < 1 and metric(db, small_run, M.SPEED_VS_BN_IQR, "train") >= 0
    (row,) = leaderboard_json(db, suite=str(small))
    assert row["speed_vs_batchnorm_mean"] == pytest.approx(speed)


def test_same_seed_gives_same_numbers_and_seeds_aggregate(cifar_dir, db):
    assert smoke_run(f"--db={db}", "--seeds=0,1").exit_code == 0
    first = {k: metric(db, r, M.LOSS, "test") for k, r in runs(db).items()}
    assert smoke_run(f"--db={db}", "--seeds=0", "--force").exit_code == 0
    rerun = runs(db)["batchnorm+sgd+0"]
    assert metric(db, rerun, M.LOSS, "test") == first["batchnorm+sgd+0"]
    assert first["batchnorm+sgd+0"] != first["batchnorm+sgd+1"]
    rows = leaderboard_json(db)
    assert rows[0]["n"] == 2 and rows[0]["accuracy_std"] > 0


def test_diverged_and_failed_runs_are_recorded_and_the_suite_goes_on(cifar_dir, db, tmp_path):
    suite = tmp_path / "hot.toml"
    suite.write_text(SUITE_TEXT.replace("lr = 0.2, momentum", "lr = 1.0e12, momentum", 1))

    import fixtures.failing_norms  # noqa: F401 - registers test-broken (the workers import it too)

    result = smoke_run(
        f"--db={db}", suite=str(suite), norms="test-broken,batchnorm", optimizers="sgd,adamw"
    )
    assert result.exit_code == 1, result.output  # a crashed run fails the command, after the rest

    found = runs(db)
    assert found["test-broken+sgd+0"].status is RunStatus.failed
    assert "broken on purpose" in found["test-broken+sgd+0"].error
    assert found["batchnorm+sgd+0"].status is RunStatus.diverged
    assert found["batchnorm+sgd+0"].diverged_step is not None
    assert found["batchnorm+adamw+0"].status is RunStatus.finished  # the suite went on
    by_pair = {(r["norm"], r["optimizer"]): r for r in leaderboard_json(db)}
    assert by_pair[("batchnorm", "sgd")]["status"] == "1 diverged"
    assert by_pair[("batchnorm", "sgd")]["rank"] is None
    assert by_pair[("batchnorm", "adamw")]["rank"] == 1


def _six_epoch_run(tmp_path, db) -> tuple[list[str], subprocess.Popen]:
    """The command of a 6-epoch smoke run, and that run started and past its first checkpoint."""
    suite = tmp_path / "long.toml"
    longer = SUITE_TEXT.replace("epochs = 2\n", "epochs = 6\n", 1)
    suite.write_text(longer.replace("train_subset = 4096", "train_subset = 8192", 1))
    cmd = [sys.executable, "-m", "normbench.cli", "run", f"--suite={suite}", "--budget=smoke",
           "--norms=batchnorm", "--optimizers=sgd", "--seeds=0"]  # fmt: skip
    spec = plan(load_suite(str(suite)), "smoke", norms=["batchnorm"], optimizers=["sgd"])[0]
    checkpoint = checkpoint_path(spec.key)
    shutil.rmtree(checkpoint.parent, ignore_errors=True)  # another test's interrupted run
    # A shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it;
    # give the child the default disposition an interactive user's Ctrl-C would meet.
    proc = subprocess.Popen(
        [*cmd, f"--db={db}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    # Interrupt only once the first epoch's checkpoint exists, however loaded the machine is
    # (the deadline only guards against a run that never gets there).
    deadline = time.monotonic() + 1800
    while not checkpoint.exists():
        assert proc.poll() is None, proc.communicate()[0]
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint after 30 minutes:\n{proc.communicate()[0]}")
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    return cmd, proc


def test_sigterm_stops_a_suite_like_ctrl_c(cifar_dir, tmp_path, db):
    """SIGTERM (a batch scheduler's stop, ``timeout``, ``docker stop``) stops the workers and
    marks the run interrupted, as Ctrl-C does, instead of leaving a claimed run behind."""
    _, proc = _six_epoch_run(tmp_path, db)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    assert "Terminated (SIGTERM)" in output and "Traceback" not in output
    run = runs(db)["batchnorm+sgd+0"]
    assert run.status is RunStatus.interrupted and 1 <= run.epochs_done < 6
    assert integrity(db) == "ok"


def test_sigint_mid_epoch_then_resume(cifar_dir, tmp_path, db):
    """Kill a run with SIGINT after its first checkpoint, re-run it, and compare with a run that
    was never interrupted: the resumed run must finish with the same numbers."""
    cmd, proc = _six_epoch_run(tmp_path, db)
    env = dict(os.environ)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "Traceback" not in output and "resume" in output
    run = runs(db)["batchnorm+sgd+0"]
    assert run.status is RunStatus.interrupted and 1 <= run.epochs_done < 6
    assert integrity(db) == "ok"

    resumed = subprocess.run([*cmd, f"--db={db}"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resume batchnorm + sgd" in resumed.stderr
    run = runs(db)["batchnorm+sgd+0"]
    assert run.status is RunStatus.finished and run.epochs_done == 6
    assert run.provenance["resumed_from_epoch"] >= 1
    assert integrity(db) == "ok"

    straight_db = str(tmp_path / "straight.db")
    straight_cmd = [*cmd, f"--db={straight_db}"]
    straight = subprocess.run(straight_cmd, env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    reference = runs(straight_db)["batchnorm+sgd+0"]
    assert reference.provenance["resumed_from_epoch"] == 0
    assert metric(straight_db, reference, M.LOSS, "test") == metric(db, run, M.LOSS, "test")


def test_damaged_checkpoint_is_discarded_and_the_run_starts_afresh(cifar_dir, db):
    spec = plan(load_suite("cifar10"), "smoke", norms=["batchnorm"], optimizers=["sgd"])[0]
    ckpt = checkpoint_path(spec.key)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"not a checkpoint")
    result = smoke_run(f"--db={db}")
    assert result.exit_code == 0, result.output
    run = runs(db)["batchnorm+sgd+0"]
    assert run.status is RunStatus.finished and run.provenance["resumed_from_epoch"] == 0
    assert not ckpt.exists()


def test_cifar_c_smoke_suite_evaluates_every_corruption_and_ranks(cifar_c_smoke_db):
    db = str(cifar_c_smoke_db)
    found = runs(db)
    bn = found["batchnorm+sgd+0"]
    with open_store(f"sqlite:///{db}").session() as s:
        rows = s.execute(
            select(Metric.name, Metric.corruption, Metric.severity, Metric.value).where(
                Metric.run_id == bn.id
            )
        ).all()
    pairs = {(c, sev) for name, c, sev, _ in rows if name == M.ACCURACY and sev > 0}
    assert len(pairs) == 19 * 5  # every corruption at every severity, extras included
    values = {(name, c): v for name, c, sev, v in rows if sev == 0}
    benchmark = [v for name, c, sev, v in rows if name == M.ACCURACY and sev > 0 and c not in
                 ("speckle_noise", "gaussian_blur", "spatter", "saturate")]  # fmt: skip
    assert values["corruption_accuracy", ""] == pytest.approx(sum(benchmark) / 75)
    assert {c for name, c in values if name == "family_accuracy"} == {
        "noise",
        "blur",
        "weather",
        "digital",
    }
    # mCE of the other pair, recomputed from the stored accuracies of both runs (CE_c = sum over
    # severities of its errors / the reference's, averaged over the 15 benchmark corruptions)
    ln = found["layernorm+sgd+0"]
    with open_store(f"sqlite:///{db}").session() as s:
        accuracy = {
            (run_id, c, sev): v
            for run_id, c, sev, v in s.execute(
                select(Metric.run_id, Metric.corruption, Metric.severity, Metric.value).where(
                    Metric.name == M.ACCURACY, Metric.severity > 0
                )
            )
        }
        ln_mce = s.scalar(select(Metric.value).where(Metric.run_id == ln.id, Metric.name == "mce"))
    corruptions = {c for _, c, _ in accuracy} - {"speckle_noise", "gaussian_blur", "spatter",
                                                 "saturate"}  # fmt: skip

    def errors(run_id, c):
        return sum(1 - accuracy[run_id, c, sev] for sev in range(1, 6))

    expected = 100 * sum(errors(ln.id, c) / errors(bn.id, c) for c in corruptions) / 15
    assert len(corruptions) == 15 and ln_mce == pytest.approx(expected)
    assert ln_mce != pytest.approx(100.0)  # a different pair, not the reference restated
    assert bn.provenance["mce_reference"] == "batchnorm + sgd, seeds [0]"
    assert bn.provenance["corruption_images_per_pair"] == 100
    assert bn.provenance["corruption_engine"] == ENGINE_VERSION  # old caches are never mixed in

    board = leaderboard_json(db, suite="cifar-c")
    assert [r["rank"] for r in board] == [1, 2]
    assert board[0]["corruption_accuracy_mean"] >= board[1]["corruption_accuracy_mean"]
    assert all(r["worst_corruption"] and r["mce_mean"] > 0 for r in board)
    table = invoke("leaderboard", "--suite=cifar-c", "--budget=smoke", f"--db={db}")
    assert "worst corruption" in table.output and "mCE" in table.output
