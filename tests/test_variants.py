"""Variants: settings a suite sweeps within one norm and optimizer (label noise, batch sizes).
The plan's expansion and learning-rate scaling, suite validation through the command line, the
``variant`` column (migration 0007) and the leaderboard's grouping by it, from a real label-noise
smoke run; the batch-size board and its dashboard chart from runs written through the store."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch
from alembic import command
from conftest import REPO
from helpers import invoke, leaderboard_json
from sqlalchemy import inspect, select, text
from streamlit.testing.v1 import AppTest

from normbench import metrics as M
from normbench.data import load_dataset
from normbench.errors import NormbenchError
from normbench.leaderboard import batch_size_board, leaderboard
from normbench.metrics import MetricRow
from normbench.store import Metric, Run, RunStatus, alembic_config, create_db_engine, open_store
from normbench.suites import BUILTIN_DIR, RunSpec, load_suite, load_suite_file, plan

APP = str(REPO / "dashboard" / "app.py")
LABEL_NOISE_TEXT = (BUILTIN_DIR / "label-noise.toml").read_text()
BATCH_SIZE_TEXT = (BUILTIN_DIR / "batch-size.toml").read_text()


def flat(text: str) -> str:
    """Output as one line of words, without the frames rich draws around errors."""
    return " ".join(text.translate(str.maketrans("│╭╮╰╯─", "      ")).split())


def write(tmp_path: Path, text: str, name: str = "variants.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- plan expansion ------------------------------------------------------------------------------


def test_each_label_noise_entry_is_a_variant_of_each_norm():
    specs = plan(load_suite("label-noise"), "smoke", norms=["batchnorm", "groupnorm"])
    assert [(s.norm, s.settings["variant"]) for s in specs] == [
        ("batchnorm", "symmetric 40%"), ("batchnorm", "asymmetric 40%"),
        ("groupnorm", "symmetric 40%"), ("groupnorm", "asymmetric 40%"),
    ]  # fmt: skip
    first = specs[0]
    # A run holds its own noise setting, not the budget's list.
    assert first.settings["label_noise"] == {"type": "symmetric", "rate": 0.4, "seed": 0}
    assert first.settings["batch_sizes"] == [] and first.hparams["lr"] == 0.2
    assert len({s.key for s in specs}) == 4
    assert first.protocol["label"] == "batchnorm + sgd (symmetric 40%)"
    assert "symmetric noise on 40% of the training labels" in first.protocol["label_noise"]
    assert [len(plan(load_suite("label-noise"), b)) for b in ("cpu", "full")] == [4, 4 * 5 * 3]


def test_each_batch_size_trains_with_the_learning_rate_scaled_linearly():
    specs = plan(load_suite("batch-size"), "smoke", norms=["batchnorm"])
    # smoke: lr 0.1 at batch 32
    assert [(s.settings["variant"], s.settings["batch_size"], s.hparams["lr"]) for s in specs] == [
        ("batch 2", 2, 0.1 * 2 / 32), ("batch 8", 8, 0.1 * 8 / 32), ("batch 32", 32, 0.1),
    ]  # fmt: skip
    assert specs[0].hparams["momentum"] == 0.9  # only the learning rate changes
    assert specs[0].settings["lr_scaling"] == {"base_batch_size": 32, "factor": 2 / 32}
    assert specs[0].protocol["batch_size"] == (
        "batch 2, learning rate scaled linearly: lr * 2 / 32 (the budget's batch size)"
    )
    cpu = plan(load_suite("batch-size"), "cpu")
    assert len(cpu) == 4 * 4 and {s.hparams["lr"] for s in cpu} == {0.003125, 0.0125, 0.05, 0.2}


def test_a_budget_that_sweeps_nothing_keeps_its_run_keys():
    spec = plan(load_suite("cifar10"), "smoke", norms=["batchnorm"], optimizers=["sgd"])[0]
    assert "variant" not in spec.settings
    # The new options at their defaults are not hashed: the key is the one of a spec without them.
    settings = {k: v for k, v in spec.settings.items() if k not in ("label_noise", "batch_sizes")}
    older = RunSpec(**{**spec.to_dict(), "settings": settings})
    assert older.key == spec.key


def test_adding_a_batch_size_leaves_the_other_variants_keys_alone(tmp_path):
    def keys(sizes: str) -> dict[str, str]:
        text = BATCH_SIZE_TEXT.replace("batch_sizes = [2, 8, 32]", f"batch_sizes = {sizes}", 1)
        suite = load_suite_file(write(tmp_path, text))
        return {s.settings["variant"]: s.key for s in plan(suite, "smoke", norms=["batchnorm"])}

    two, three = keys("[2, 8]"), keys("[2, 8, 16]")
    assert three == {**two, "batch 16": three["batch 16"]}


def test_label_noise_and_batch_sizes_together_cross(tmp_path):
    text = BATCH_SIZE_TEXT.replace(
        "batch_sizes = [2, 8, 32]",
        'batch_sizes = [2, 8]\nlabel_noise = [{ type = "symmetric", rate = 0.2, seed = 3 }]',
        1,
    )
    specs = plan(load_suite_file(write(tmp_path, text)), "smoke", norms=["groupnorm"])
    assert [s.settings["variant"] for s in specs] == [
        "symmetric 20% (noise seed 3), batch 2", "symmetric 20% (noise seed 3), batch 8",
    ]  # fmt: skip
    assert specs[1].settings["label_noise"]["seed"] == 3 and specs[1].hparams["lr"] == 0.025


def test_asymmetric_noise_on_another_dataset_is_refused_by_the_plan(tmp_path):
    text = LABEL_NOISE_TEXT.replace(
        "[budgets.smoke]\n", '[budgets.smoke]\ndataset = "cifar100"\n', 1
    )
    suite = load_suite_file(write(tmp_path, text))
    with pytest.raises(NormbenchError, match="dataset 'cifar100' has no such map"):
        plan(suite, "smoke")
    result = invoke("run", "--suite", str(suite.path), "--budget", "smoke")
    assert result.exit_code == 2
    assert "Use symmetric noise there" in flat(result.output)


# --- suite validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "old", "new", "says"),
    [
        (LABEL_NOISE_TEXT, '{ type = "symmetric", rate = 0.4 },',
         '{ type = "symmetric", rate = 1.0 },',
         "budgets.smoke.label_noise.0.rate: Input should be less than 1"),
        (LABEL_NOISE_TEXT, '{ type = "symmetric", rate = 0.4 },',
         '{ type = "symmetric", rate = -0.1 },',
         "budgets.smoke.label_noise.0.rate: Input should be greater than or equal to 0"),
        (LABEL_NOISE_TEXT, '{ type = "asymmetric", rate = 0.4 },',
         '{ type = "pairflip", rate = 0.4 },',
         "budgets.smoke.label_noise.1.type: Input should be 'symmetric' or 'asymmetric'"),
        (LABEL_NOISE_TEXT, '{ type = "asymmetric", rate = 0.4 },',
         '{ type = "symmetric", rate = 0.4 },',
         "budgets.smoke.label_noise: symmetric 40% is listed twice"),
        (BATCH_SIZE_TEXT, "batch_sizes = [2, 8, 32]", "batch_sizes = [1, 8]",
         "budgets.smoke.batch_sizes.0: Input should be greater than or equal to 2"),
        (BATCH_SIZE_TEXT, "batch_sizes = [2, 8, 32]", "batch_sizes = [2, 8, 2]",
         "budgets.smoke.batch_sizes: 2 is listed twice"),
    ],
)  # fmt: skip
def test_bad_label_noise_or_batch_sizes_in_a_suite_file_are_exit_2_naming_file_and_key(
    tmp_path, text, old, new, says
):
    assert old in text
    path = write(tmp_path, text.replace(old, new, 1))
    result = invoke("run", "--suite", str(path), "--budget", "smoke")
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert str(path) in text and says in text


# --- migration -----------------------------------------------------------------------------------


def spec_dict(norm: str, seed: int, variant: str, batch_size: int, suite: str) -> dict:
    settings = {"model": "fastnet", "batch_size": batch_size}
    if variant:
        settings["variant"] = variant
    version = load_suite(suite).spec.protocol_version
    return {
        "suite": suite, "budget": "cpu", "protocol_version": version, "task": "classify",
        "dataset": "cifar10", "norm": norm, "optimizer": "sgd", "seed": seed,
        "settings": settings, "hparams": {"lr": 0.2},
    }  # fmt: skip


def test_migration_0007_adds_the_variant_and_older_runs_get_none(tmp_path):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    store = open_store(url)
    spec = spec_dict("batchnorm", 0, "batch 8", 8, "batch-size")
    store.begin_run(spec, "k8", device="cpu", provenance={}, config=spec, reset=True)
    with store.session() as s:
        assert s.scalar(select(Run.variant).where(Run.run_key == "k8")) == "batch 8"
    store.engine.dispose()

    engine = create_db_engine(url)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0006")
        assert "variant" not in {c["name"] for c in inspect(conn).get_columns("runs")}
        command.upgrade(cfg, "0007")
        # A run written before the column has the empty variant: it swept nothing.
        assert conn.execute(text("SELECT run_key, variant FROM runs")).all() == [("k8", "")]
    engine.dispose()


# --- the leaderboard groups by variant, from a real smoke run -----------------------------------


def test_a_label_noise_smoke_run_stores_its_noise_and_ranks_each_variant(cifar_dir, tmp_path):
    db = str(tmp_path / "results.db")
    result = invoke(
        "run", "--suite=label-noise", "--budget=smoke", "--norms=batchnorm", f"--db={db}"
    )
    assert result.exit_code == 0, result.output
    with open_store(f"sqlite:///{db}").session() as s:
        runs = {r.variant: r for r in s.scalars(select(Run))}
        rates = dict(
            s.execute(
                select(Run.variant, Metric.value)
                .join(Metric, Metric.run_id == Run.id)
                .where(Metric.name == M.LABEL_NOISE_RATE_ACTUAL, Metric.split == "train")
            ).all()
        )
    assert set(runs) == {"symmetric 40%", "asymmetric 40%"}
    assert {r.status for r in runs.values()} == {RunStatus.finished}
    # The smoke budget trains on a fixed 2,048-image subset: symmetric noise flips round(0.4 *
    # 2048) = 819 labels; asymmetric noise round(0.4 * n_c) of each of its five source classes.
    labels = load_dataset("cifar10", "train", cifar_dir).subset(2048, seed=0).labels
    n = torch.bincount(labels, minlength=10)
    asymmetric = sum(round(0.4 * int(n[c])) for c in (9, 2, 3, 5, 4))
    for variant, kind, flipped in (
        ("symmetric 40%", "symmetric", 819), ("asymmetric 40%", "asymmetric", asymmetric),
    ):  # fmt: skip
        info = runs[variant].provenance["label_noise"]
        assert info == {"type": kind, "rate": 0.4, "seed": 0, "flipped": flipped,
                        "examples": 2048, "rate_actual": flipped / 2048}  # fmt: skip
        assert rates[variant] == pytest.approx(flipped / 2048)
        assert runs[variant].provenance["test_examples"] == 500
        assert runs[variant].config["protocol"]["label"] == f"batchnorm + sgd ({variant})"

    rows = leaderboard_json(db, suite="label-noise")
    assert sorted((r["norm"], r["variant"], r["n"]) for r in rows) == [
        ("batchnorm", "asymmetric 40%", 1), ("batchnorm", "symmetric 40%", 1),
    ]  # fmt: skip
    assert {r["rank"] for r in rows} == {1, 2}
    for r in rows:
        assert r[f"{M.LABEL_NOISE_RATE_ACTUAL}_mean"] == pytest.approx(rates[r["variant"]])
    table = invoke("leaderboard", "--suite=label-noise", "--budget=smoke", f"--db={db}")
    assert table.exit_code == 0 and "variant" in table.output
    assert "symmetric 40%" in table.output and "asymmetric 40%" in table.output


# --- the batch-size board ------------------------------------------------------------------------

#: (norm, batch size, seed) -> test accuracy; layernorm's batch-8 run failed.
ACCURACY = {
    ("batchnorm", 2, 0): 0.20, ("batchnorm", 2, 1): 0.30,
    ("batchnorm", 8, 0): 0.60, ("batchnorm", 8, 1): 0.62,
    ("groupnorm", 2, 0): 0.55, ("groupnorm", 8, 0): 0.57,
    ("layernorm", 2, 0): 0.50,
}  # fmt: skip


@pytest.fixture(scope="module")
def board_db(tmp_path_factory) -> Path:
    """Batch-size runs written through the store as runs write them, a failed one among them,
    and a cifar10 board without variants beside them."""
    path = tmp_path_factory.mktemp("batch-size") / "results.db"
    store = open_store(f"sqlite:///{path}")

    def write_run(spec: dict, key: str, status: RunStatus, accuracy: float | None) -> None:
        store.begin_run(spec, key, device="cpu", provenance={}, config=spec, reset=True)
        rows = [] if accuracy is None else [MetricRow(M.ACCURACY, accuracy, "test")]
        store.finish_run(key, status=status, metrics=rows, curves=[], epochs_done=1)

    for (norm, size, seed), accuracy in ACCURACY.items():
        spec = spec_dict(norm, seed, f"batch {size}", size, "batch-size")
        write_run(spec, f"{norm}-{size}-{seed}", RunStatus.finished, accuracy)
    spec = spec_dict("layernorm", 0, "batch 8", 8, "batch-size")
    write_run(spec, "layernorm-8-0", RunStatus.failed, None)
    for norm, accuracy in (("batchnorm", 0.7), ("groupnorm", 0.65)):
        write_run(spec_dict(norm, 0, "", 128, "cifar10"), f"c10-{norm}", RunStatus.finished,
                  accuracy)  # fmt: skip
    store.engine.dispose()
    sqlite3.connect(path).execute("PRAGMA journal_mode=DELETE").connection.close()
    return path


def test_batch_size_board_has_one_accuracy_column_per_batch_size(board_db):
    engine = open_store(f"sqlite:///{board_db}", readonly=True).engine
    board = batch_size_board(engine, "batch-size", "cpu", 1)
    assert board.norm.tolist() == ["groupnorm", "batchnorm", "layernorm"]  # by worst accuracy
    assert board["rank"].tolist()[:2] == [1, 2] and board["rank"].isna().tolist()[2]
    bn = board.set_index("norm").loc["batchnorm"]
    assert bn["batch 2"] == pytest.approx(0.25) and bn["batch 8"] == pytest.approx(0.61)
    # sample std of (0.2, 0.3) and of (0.6, 0.62)
    assert bn["batch 2 std"] == pytest.approx(math.sqrt(0.005))
    assert bn["batch 8 std"] == pytest.approx(math.sqrt(0.0002))
    assert bn["worst"] == pytest.approx(0.25) and bn["spread"] == pytest.approx(0.36)
    assert bn["n"] == 2 and bn["runs"] == 4
    ln = board.set_index("norm").loc["layernorm"]
    assert ln["batch 2"] == pytest.approx(0.5) and math.isnan(ln["batch 8"])
    assert math.isnan(ln["worst"]) and ln["n"] == 0
    assert ln["status"] == "batch 2: 1 finished, batch 8: 1 failed"

    # The leaderboard itself ranks each (norm, optimizer, variant) on its own.
    rows = leaderboard(engine, "batch-size", "cpu", protocol_version=1)
    means = {(r.norm, r.variant): r.accuracy_mean for r in rows.itertuples()}
    assert means[("batchnorm", "batch 2")] == pytest.approx(0.25)
    assert means[("batchnorm", "batch 8")] == pytest.approx(0.61)
    assert len(rows) == 6 and rows.iloc[0].variant == "batch 8" and rows.iloc[0].norm == "batchnorm"
    engine.dispose()


def test_cli_prints_the_batch_size_board_and_a_variant_column_only_where_there_are_variants(
    board_db,
):
    result = invoke("leaderboard", "--suite=batch-size", "--budget=cpu", f"--db={board_db}")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "test accuracy % by training batch size" in text
    assert "batch 2" in text and "batch 8" in text
    assert "25.00 ± 7.07" in text and "61.00 ± 1.41" in text and "55.00" in text
    plain = invoke("leaderboard", "--suite=cifar10", "--budget=cpu", f"--db={board_db}")
    assert plain.exit_code == 0, plain.output
    assert "batchnorm" in plain.output and "variant" not in plain.output


def dashboard(monkeypatch, db: Path, suite: str) -> AppTest:
    monkeypatch.setenv("NORMBENCH_DB", str(db))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.selectbox(key="suite").set_value(suite).run()
    assert not at.exception, at.exception
    return at


def test_dashboard_shows_variants_and_accuracy_vs_batch_size(monkeypatch, board_db):
    import pyarrow as pa

    at = dashboard(monkeypatch, board_db, "batch-size")
    view = at.dataframe[0].value
    assert "variant" in view.columns
    assert set(zip(view.norm, view.variant, strict=True)) >= {
        ("batchnorm", "batch 2"), ("batchnorm", "batch 8"), ("groupnorm", "batch 2"),
    }  # fmt: skip

    at.switch_page("views/tradeoffs.py").run()
    assert not at.exception, at.exception
    charts = {}
    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        charts[spec.get("title")] = (spec, chart)
    spec, chart = charts["Test accuracy vs batch size"]
    x = spec["encoding"]["x"]
    assert x["field"] == "batch_size" and x["scale"] == {"type": "log", "base": 2}
    assert spec["encoding"]["color"]["field"] == "norm"
    frames = [pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in chart.proto.datasets]
    drawn = {(r.norm, r.batch_size): r["accuracy %"] for _, r in frames[0].iterrows()}
    assert drawn == pytest.approx({
        ("batchnorm", 2): 25.0, ("batchnorm", 8): 61.0, ("groupnorm", 2): 55.0,
        ("groupnorm", 8): 57.0, ("layernorm", 2): 50.0,
    })  # fmt: skip

    plain = dashboard(monkeypatch, board_db, "cifar10")
    assert "variant" not in plain.dataframe[0].value.columns
    plain.switch_page("views/tradeoffs.py").run()
    titles = [json.loads(c.proto.spec).get("title") for c in plain.get("vega_lite_chart")]
    assert "Test accuracy vs batch size" not in titles
