"""Probe suites and the schema they need: the suite format (``task = "probe"``), the plan (norms x
models x seeds, refusals), optimizer variants, metric rows with a layer and a step (migration
0005), the probe board, and existing run keys left unchanged."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect, text

from normbench import metrics as M
from normbench.errors import NormbenchError, SuiteError
from normbench.leaderboard import probe_board
from normbench.metrics import MetricRow
from normbench.optim import OPTIMIZERS, create_optimizer
from normbench.store import RunStatus, alembic_config, create_db_engine, open_store
from normbench.suites import load_suite, load_suite_file, plan

PROBE_SUITE = """
name = "p"
description = "probe suite for tests"
protocol_version = 1
task = "probe"
dataset = "cifar10"
norms = {norms}
optimizers = ["sgd"]
seeds = [0, 1]
reference = {{ norm = "batchnorm", optimizer = "sgd" }}

[budgets.smoke]
models = {models}
batch_size = 8
batches = 2
probe_steps = {steps}
optimizers.sgd = {{ lr = 0.1 }}
"""

MODELS = (
    '[{ model = "resnet20", model_args = { width = 4 } }, '
    '{ model = "vgg", model_args = { depth = 5, width = 4 } }]'
)


def write_suite(tmp_path, norms='["batchnorm", "layernorm"]', models=MODELS, steps="[0]"):
    path = tmp_path / "p.toml"
    path.write_text(PROBE_SUITE.format(norms=norms, models=models, steps=steps))
    return path


def test_existing_run_keys_are_unchanged():
    """A new budget option with a default (``landscape``) never changes existing runs' keys."""
    keys = {
        "cifar10": ["c3fac3804d3e27c9b085", "6bd4e2fa901f3525c5ae"],
        "cifar-c": ["1855ead347a41891ddb1", "60703ff1896c5292f4dd"],
        "sam-on": ["5d2e5f11108ed0662ff9", "fb95e45db54500135356"],
    }
    for suite, expected in keys.items():
        assert [s.key for s in plan(load_suite(suite), "smoke", seeds=[0])][:2] == expected


def test_probe_suite_plans_norms_by_models_by_seeds(tmp_path):
    suite = load_suite_file(write_suite(tmp_path))
    specs = plan(suite, "smoke")
    assert len(specs) == 2 * 2 * 2
    assert {s.task for s in specs} == {"probe"}
    labels = {s.settings["model_label"] for s in specs}
    assert labels == {"resnet20(width=4)", "vgg(depth=5, width=4)"}
    first = specs[0]
    assert first.settings["model"] == "resnet20" and first.settings["model_args"] == {"width": 4}
    assert first.settings["batches"] == 2 and first.settings["probe_steps"] == [0]
    assert "models" not in first.settings and "epochs" not in first.settings
    assert len({s.key for s in specs}) == len(specs)
    assert "Lubana" in first.protocol["probes"]


def test_builtin_probes_suite_covers_the_zoo_at_every_budget():
    suite = load_suite("probes")
    assert suite.spec.task == "probe"
    cpu = plan(suite, "cpu", seeds=[0])
    labels = sorted({s.settings["model_label"] for s in cpu})
    assert labels == sorted([
        "resnet56", "resnet56(skip_init=true)", "vgg(depth=10, width=16)",
        "vgg(depth=20, width=16)", "vgg(depth=40, width=16)",
    ])  # fmt: skip
    assert len({s.norm for s in cpu}) == 14
    full = plan(suite, "full", norms=["batchnorm"], seeds=[0])
    assert {s.settings["model_args"].get("width") for s in full} >= {32, 64, 128}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"models": '[{ model = "fastnet" }]'}, "does not list its blocks for the probes"),
        ({"models": '[{ model = "vgg", model_args = { depth = 3 } }]'}, "refuses"),
        ({"models": '[{ model = "vgg", model_args = { layers = 3 } }]'}, "unknown argument"),
        ({"models": '[{ model = "vggg" }]'}, "Did you mean 'vgg'"),
        ({"models": "[]"}, "at least 1"),
        ({"models": '[{ model = "vgg" }, { model = "vgg" }]'}, "vgg is listed twice"),
        ({"steps": "[5, 0]"}, "must ascend"),
        ({"steps": "[0, 0]"}, "must ascend"),
        ({"steps": "[-1]"}, "greater than or equal to 0"),
    ],
)
def test_bad_probe_suites_are_refused_naming_the_key(tmp_path, kwargs, message):
    path = write_suite(tmp_path, **kwargs)
    with pytest.raises(SuiteError, match=message) as err:
        load_suite_file(path)
    assert str(path) in str(err.value)


def test_a_probe_budget_rejects_training_keys(tmp_path):
    path = write_suite(tmp_path)
    path.write_text(path.read_text().replace("batches = 2", "batches = 2\nepochs = 3"))
    with pytest.raises(SuiteError, match="budgets.smoke.epochs: unknown key"):
        load_suite_file(path)


def test_a_model_that_cannot_host_a_norm_is_refused_by_the_plan(tmp_path):
    suite = load_suite_file(write_suite(tmp_path, norms='["batchnorm", "skipinit"]'))
    with pytest.raises(NormbenchError, match="'skipinit' cannot be used with model 'vgg'"):
        plan(suite, "smoke")
    assert len(plan(suite, "smoke", norms=["batchnorm"])) == 4


def test_optimizer_variants_are_one_optimizer_under_two_names(tmp_path):
    import torch

    assert OPTIMIZERS.info("sgd:lr0.5").name == "sgd:lr0.5"
    assert "sgd:lr0.5" in OPTIMIZERS and "sgd:" not in OPTIMIZERS and 3 not in OPTIMIZERS
    model = torch.nn.Linear(2, 2)
    opt = create_optimizer("sgd:lr0.5", model, lr=0.5)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(NormbenchError, match="tag after ':'"):
        OPTIMIZERS.get("sgd:a b")
    with pytest.raises(NormbenchError, match="Did you mean 'sgd'"):
        OPTIMIZERS.get("sgdd:lr0.5")

    text_ = tmp_path / "v.toml"
    from tests.helpers import TINY_SUITE

    body = TINY_SUITE.format(name="v", lr=0.1).replace(
        'optimizers = ["sgd"]', 'optimizers = ["sgd", "sgd:lr0.5"]'
    )
    text_.write_text(body + 'optimizers."sgd:lr0.5" = { lr = 0.5, momentum = 0.9 }\n')
    specs = plan(load_suite_file(text_), "smoke")
    assert [(s.optimizer, s.hparams["lr"]) for s in specs] == [("sgd", 0.1), ("sgd:lr0.5", 0.5)]
    text_.write_text(body)  # the variant has no hyper-parameter table
    with pytest.raises(NormbenchError, match=r"no hyper-parameters for optimizer 'sgd:lr0.5'"):
        plan(load_suite_file(text_), "smoke")
    text_.write_text(body + 'optimizers."sgd:lr0.5" = { lr = 0.5, rho = 1.0 }\n')
    with pytest.raises(SuiteError, match="rho: unknown hyper-parameter"):
        load_suite_file(text_)


def test_migration_gives_old_rows_layer_and_step_minus_one_and_downgrades(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_db_engine(url)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
        conn.execute(text(
            "INSERT INTO runs (id, run_key, suite, budget, protocol_version, task, dataset, model,"
            " norm, optimizer, seed, status, epochs_done, config, provenance, created_at,"
            " updated_at) VALUES (1, 'k', 's', 'smoke', 1, 'classify', 'cifar10', 'fastnet',"
            " 'batchnorm', 'sgd', 0, 'finished', 1, '{}', '{}', '2026-01-01', '2026-01-01')"
        ))  # fmt: skip
        conn.execute(text("INSERT INTO metrics (run_id, name, split, corruption, severity, value)"
                          " VALUES (1, 'accuracy', 'test', '', 0, 0.5)"))  # fmt: skip
        command.upgrade(cfg, "0005")
        row = conn.execute(text("SELECT layer, step, value FROM metrics")).one()
        assert tuple(row) == (-1, -1, 0.5)
        # The same metric at two layers and two steps are four rows.
        for layer, step in ((0, 0), (1, 0), (0, 5), (1, 5)):
            conn.execute(text(
                "INSERT INTO metrics (run_id, name, split, corruption, severity, layer, step,"
                f" value) VALUES (1, 'probe_grad_norm', 'train', '', 0, {layer}, {step}, 1.0)"
            ))  # fmt: skip
        command.downgrade(cfg, "0004")
        assert conn.execute(text("SELECT name, value FROM metrics")).all() == [("accuracy", 0.5)]
    assert "layer" not in {c["name"] for c in inspect(engine).get_columns("metrics")}
    engine.dispose()


def _probe_run(store, key, norm, label, seed, status, rows):
    spec = {
        "suite": "p", "budget": "smoke", "protocol_version": 1, "task": "probe",
        "dataset": "cifar10", "norm": norm, "optimizer": "sgd", "seed": seed,
        "settings": {"model": label.split("(")[0], "model_label": label}, "hparams": {},
    }  # fmt: skip
    store.begin_run(spec, key, device="cpu", provenance={}, config=spec, reset=True)
    store.finish_run(key, status=status, metrics=rows, curves=[], epochs_done=1)


def test_probe_board_summarises_per_model_and_norm(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")

    def summaries(growth, cosine, step=0):
        return [
            MetricRow(M.PROBE_ACT_GROWTH, growth, "train", step=step),
            MetricRow(M.PROBE_LAST_COSINE, cosine, "train", step=step),
            MetricRow(M.PROBE_ACT_VAR, 99.0, "train", layer=3, step=step),  # per-layer: not here
        ]

    _probe_run(store, "a", "batchnorm", "vgg(depth=10)", 0, RunStatus.finished, summaries(2.0, 0.1))
    _probe_run(store, "b", "batchnorm", "vgg(depth=10)", 1, RunStatus.finished,
               summaries(4.0, 0.3) + summaries(8.0, 0.5, step=7))  # fmt: skip
    _probe_run(store, "c", "none", "vgg(depth=10)", 0, RunStatus.diverged,
               [MetricRow(M.PROBE_NONFINITE_LAYER, 6.0, "train", step=0)])  # fmt: skip
    _probe_run(store, "d", "none", "vgg(depth=2)", 0, RunStatus.finished, summaries(1.5, 0.2))
    table = probe_board(store.engine, "p", "smoke", protocol_version=1)
    rows = {(r["model"], r["norm"]): r for r in table.to_dict("records")}
    # Natural order of model labels: depth 2 before depth 10.
    assert list(table.model) == ["vgg(depth=2)", "vgg(depth=10)", "vgg(depth=10)"]
    bn = rows[("vgg(depth=10)", "batchnorm")]
    assert bn[f"{M.PROBE_ACT_GROWTH}_mean"] == pytest.approx(3.0)
    assert bn[f"{M.PROBE_ACT_GROWTH}_std"] == pytest.approx(2**0.5)  # sample std of 2 and 4
    assert bn[f"{M.PROBE_LAST_COSINE}_mean"] == pytest.approx(0.2)
    assert bn["n"] == 2 and bn["status"] == "2 finished"
    diverged = rows[("vgg(depth=10)", "none")]
    assert diverged["nonfinite_block"] == 6 and diverged["status"] == "1 diverged"
    later = probe_board(store.engine, "p", "smoke", protocol_version=1, step=7)
    bn7 = later[later.norm == "batchnorm"].iloc[0]
    assert bn7[f"{M.PROBE_ACT_GROWTH}_mean"] == 8.0 and bn7["n"] == 1
    assert probe_board(store.engine, "p", "smoke", protocol_version=2).empty


# --- end to end: normbench run / leaderboard on real CIFAR-10 ------------------------------------

E2E_SUITE = """
name = "probe-e2e"
description = "probe suite for tests"
protocol_version = 1
task = "probe"
dataset = "cifar10"
norms = ["batchnorm", "none"]
optimizers = ["sgd"]
seeds = [0]
reference = { norm = "batchnorm", optimizer = "sgd" }

[budgets.smoke]
models = [{ model = "vgg", model_args = { depth = 5, width = 4 } }]
batch_size = 8
batches = 2
train_subset = 256
optimizers.sgd = { lr = 0.1 }
"""


def test_probe_suite_runs_end_to_end_and_a_diverged_probe_is_a_finding(cifar_dir, tmp_path):
    import json

    import fixtures.failing_norms  # noqa: F401 - registers test-explodes (workers import it too)

    from tests.helpers import invoke

    path = tmp_path / "probe-e2e.toml"
    path.write_text(E2E_SUITE)
    db = tmp_path / "probes.db"
    result = invoke("run", f"--suite={path}", "--budget=smoke", f"--db={db}", "--device=cpu",
                    "--norms=batchnorm,none,test-explodes")  # fmt: skip
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "Summary: 2 finished, 1 diverged" in text, text
    assert "batchnorm in vgg(depth=5, width=4) (seed 0): activation growth" in text
    assert "non-finite activations at block 1" in text, text

    store = open_store(f"sqlite:///{db}", readonly=True)
    with store.session() as s:
        from sqlalchemy import select

        from normbench.store.models import Metric, Run

        runs = {r.norm: r for r in s.scalars(select(Run))}
        assert runs["test-explodes"].status is RunStatus.diverged
        assert runs["test-explodes"].diverged_step == 0
        rows = s.execute(
            select(Metric.name, Metric.layer, Metric.step, Metric.value).where(
                Metric.run_id == runs["batchnorm"].id
            )
        ).all()
    per_block = sorted(layer for name, layer, step, _ in rows if name == M.PROBE_ACT_VAR)
    assert per_block == [0, 1, 2, 3]  # VGG-5: four conv blocks, probed at step 0
    assert {step for name, _, step, _ in rows if name.startswith("probe_")} == {0}
    assert sorted(layer for name, layer, _, _ in rows if name == M.PROBE_GRAD_NORM) == [0, 1, 2, 3]

    board = invoke("leaderboard", f"--suite={path}", "--budget=smoke", f"--db={db}",
                   "--format=json")  # fmt: skip
    assert board.exit_code == 0, board.output
    table = {r["norm"]: r for r in json.loads(board.stdout)}
    assert table["test-explodes"]["nonfinite_block"] == 1
    assert table["test-explodes"]["status"] == "1 diverged"
    assert table["batchnorm"][f"{M.PROBE_ACT_GROWTH}_mean"] > 0 and table["batchnorm"]["n"] == 1
    shown = invoke("leaderboard", f"--suite={path}", "--budget=smoke", f"--db={db}")
    assert "similarity" in shown.output and "probes at step 0" in shown.output
    assert "vgg(depth=5" in shown.output and "test-explodes" in shown.output
