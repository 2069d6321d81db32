"""The Streamlit dashboard, page by page (``AppTest``), on a database written by real smoke runs:
a cifar-c run of two norms, and a cifar10 run whose learning rate makes it diverge."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import stat
from pathlib import Path

import pytest
from conftest import REPO, shared_data_dir, skip_or_fail
from helpers import invoke, tiny_suite
from sqlalchemy import text
from streamlit.testing.v1 import AppTest

from dashboard.data import DatabaseState, database_state, pareto_front, readonly_engine
from normbench.errors import NormbenchError

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def results_db(cifar_c_smoke_db, tmp_path_factory, session_cache) -> Path:
    """The shared cifar-c smoke database plus a real diverged cifar10-style run."""
    db = tmp_path_factory.mktemp("dashboard") / "results.db"
    copy_db(cifar_c_smoke_db, db)
    suite = tiny_suite(db.parent, name="diverge", lr=1e12)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NORMBENCH_CACHE_DIR", str(session_cache))
        result = invoke(
            "run", f"--suite={suite}", "--budget=smoke", f"--db={db}", "--norms=none",
            f"--data-dir={shared_data_dir()}",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    return db


def copy_db(source: Path, target: Path) -> None:
    """Copy an SQLite database with its write-ahead log (a file copy would miss the WAL)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    sqlite3.connect(target).execute("PRAGMA journal_mode=DELETE").connection.close()


def app(monkeypatch, db: Path | str) -> AppTest:
    monkeypatch.setenv("NORMBENCH_DB", str(db))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def open_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py")
    at.run()
    assert not at.exception, at.exception
    return at


def markdown(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("missing file", "No results database at"),
        ("empty file", "is an empty file (0 bytes)"),
        ("schema without runs", "has no runs yet"),
    ],
)
def test_empty_database_is_a_friendly_page(monkeypatch, tmp_path, kind, says):
    db = tmp_path / "none.db"
    if kind == "schema without runs":
        from normbench.store import open_store

        open_store(f"sqlite:///{db}").engine.dispose()
    elif kind == "empty file":
        db.touch()
    before = sorted(p.name for p in tmp_path.iterdir())
    at = app(monkeypatch, db)
    assert at.title[0].value == "normbench leaderboard"
    assert at.info and says in at.info[0].value and not at.error
    assert "normbench run --suite cifar-c" in markdown(at)
    if kind != "schema without runs":  # reading never creates or fills the file
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert not db.exists() or db.stat().st_size == 0


def test_leaderboard_page_ranks_filters_and_exports(monkeypatch, results_db):
    at = app(monkeypatch, results_db)
    assert at.title[0].value == "Leaderboard"
    assert at.selectbox(key="suite").value == "cifar-c"
    assert at.selectbox(key="ranking").value == "mean corruption accuracy"
    table = at.dataframe[0].value
    assert set(table.norm) == {"batchnorm", "layernorm"}
    assert list(table["rank"]) == ["1 🥇", "2 🥈"]
    assert "🥇 **" in markdown(at)
    assert set(table.seeds) == {1}
    corruption = [float(v) for v in table["corruption acc %"]]
    assert corruption == sorted(corruption, reverse=True)
    assert at.get("download_button")

    at.selectbox(key="ranking").set_value("clean accuracy").run()
    clean = [float(v) for v in at.dataframe[0].value["clean acc %"]]
    assert clean == sorted(clean, reverse=True)

    assert at.multiselect(key="optimizer").options == ["sgd"]  # what the suite has
    at.multiselect(key="optimizer").set_value(["sgd"]).run()
    assert len(at.dataframe[0].value) == 2

    at.selectbox(key="suite").set_value("diverge").run()
    table = at.dataframe[0].value
    assert list(table.norm) == ["none"] and list(table["rank"]) == ["-"]
    assert "diverged" in table.runs[0]


def test_robustness_page(monkeypatch, results_db):
    at = open_page(app(monkeypatch, results_db), "robustness")
    assert at.title[0].value == "Robustness"
    assert len(at.get("vega_lite_chart")) == 2  # heat map and severity curves
    worst = at.dataframe[0].value
    assert sorted(worst.pair) == ["batchnorm + sgd", "layernorm + sgd"]
    at.selectbox(key="severity_corruption").set_value("gaussian_noise").run()
    assert not at.exception

    at.selectbox(key="suite").set_value("diverge").run()
    assert "no corruption results" in at.info[0].value


def test_tradeoffs_page(monkeypatch, results_db):
    at = open_page(app(monkeypatch, results_db), "tradeoffs")
    assert [s.value for s in at.subheader] == [
        "Clean vs corruption accuracy",
        "Accuracy vs training speed",
        "Accuracy vs parameter overhead",
    ]
    assert len(at.get("vega_lite_chart")) == 3


def test_norm_page_shows_registry_facts_and_runs(monkeypatch, results_db):
    at = app(monkeypatch, results_db)
    at.query_params["norm"] = "batchnorm"
    at = open_page(at, "norm")
    assert at.title[0].value == "batchnorm"
    facts = markdown(at)
    assert "uses batch statistics**: yes" in facts and "source SHA-256" in facts
    assert at.dataframe[0].value.suite.tolist() == ["cifar-c"]
    at.selectbox(key="norm_page").set_value("layernorm").run()
    assert at.title[0].value == "layernorm" and "uses batch statistics**: no" in markdown(at)


def test_run_page_shows_curves_config_and_the_reason_of_a_divergence(monkeypatch, results_db):
    at = open_page(app(monkeypatch, results_db), "run")
    assert at.success and "finished" in at.success[0].value
    assert at.get("vega_lite_chart")  # training curves
    assert len(at.json) == 2  # config and provenance

    at.selectbox(key="suite").set_value("diverge").run()
    assert at.error and "diverged at step" in at.error[0].value


def test_dashboard_never_writes(monkeypatch, results_db, tmp_path):
    db = tmp_path / "readonly.db"
    copy_db(results_db, db)
    db.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    before = hashlib.sha256(db.read_bytes()).hexdigest(), os.stat(db).st_mtime_ns
    at = app(monkeypatch, db)
    for page in ("robustness", "tradeoffs", "norm", "run"):
        open_page(at, page)
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), os.stat(db).st_mtime_ns) == before

    engine = readonly_engine(f"sqlite:///{db}")
    assert database_state(engine)[0] is DatabaseState.ready
    with engine.connect() as conn, pytest.raises(NormbenchError, match="is read-only"):
        conn.execute(text("DELETE FROM metrics"))


def test_pareto_front():
    import pandas as pd

    df = pd.DataFrame({"speed": [1.0, 0.5, 1.2, 0.9, None], "acc": [0.9, 0.95, 0.8, 0.85, 1.0]})
    assert pareto_front(df, "speed", "acc").tolist() == [True, True, True, False, False]


def test_dashboard_command_checks_its_arguments(tmp_path):
    import socket

    from normbench.store import open_store

    open_store(f"sqlite:///{tmp_path / 'x.db'}").engine.dispose()
    with socket.socket() as busy:
        busy.bind(("localhost", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = invoke("dashboard", f"--db={tmp_path / 'x.db'}", f"--port={port}")
    assert result.exit_code == 2 and "choose another --port" in result.output
    result = invoke("dashboard", "--db=nosuchdriver://x")
    assert result.exit_code == 2 and "Cannot use the database URL" in result.output


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process, seconds: float = 90) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "normbench dashboard exited early"
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the dashboard did not answer at {url} within {seconds} s")


def test_in_a_real_browser(results_db, tmp_path):
    if not CHROMIUM.exists():
        skip_or_fail("no Chromium at /usr/bin/chromium (apt-get install chromium chromium-driver)")
    try:
        from playwright import sync_api as playwright
    except ImportError:
        skip_or_fail("playwright is not installed (pip install playwright, or the dev extra)")
    import subprocess
    import sys

    port = free_port()
    url = f"http://localhost:{port}"
    command = [sys.executable, "-m", "normbench.cli", "dashboard", f"--db={results_db}",
               f"--port={port}"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, server)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.wait_for_selector('[data-testid="stDataFrame"]', timeout=90_000)
            page.get_by_text("batchnorm").first.wait_for(state="visible", timeout=30_000)
            shot = tmp_path / "leaderboard.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_dashboard_server_with_nothing_left_running(results_db, signum):
    """What a service manager (SIGTERM) or a user's Ctrl-C (SIGINT) does to the process it
    started. The server is that process (the command execs Streamlit), so stopping it frees the
    port."""
    import socket
    import subprocess
    import sys
    import time

    port = free_port()
    command = [sys.executable, "-m", "normbench.cli", "dashboard", f"--db={results_db}",
               f"--port={port}"]  # fmt: skip
    # A shell starts background jobs with SIGINT ignored; give the child the default disposition
    # an interactive user's Ctrl-C would meet.
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        wait_healthy(f"http://localhost:{port}", server)
        with open(f"/proc/{server.pid}/cmdline", "rb") as f:
            assert b"streamlit" in f.read()  # the started process is the server itself
        server.send_signal(signum)
        server.wait(timeout=30)
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                # Connections the server closed linger in TIME_WAIT; only a listener still
                # running should keep the port (SO_REUSEADDR binds past the former, never the
                # latter).
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("localhost", port))
                    break
                except OSError:
                    assert time.monotonic() < deadline, "a server still holds the port"
                    time.sleep(0.5)
    finally:
        if server.poll() is None:
            server.kill()


def test_runs_of_an_older_protocol_version_are_kept_apart(monkeypatch, cifar_dir, tmp_path):
    """A run made before the suite's protocol version changed never joins the new board: the
    CLI and the dashboard show only the current version and say how many runs they left out."""
    db = tmp_path / "versions.db"
    suite = tiny_suite(tmp_path, name="versioned")

    def run(norm: str) -> None:
        result = invoke("run", f"--suite={suite}", "--budget=smoke", f"--norms={norm}",
                        f"--db={db}")  # fmt: skip
        assert result.exit_code == 0, result.output

    def board() -> tuple[list[dict], str]:
        result = invoke("leaderboard", f"--suite={suite}", "--budget=smoke", f"--db={db}",
                        "--format=json")  # fmt: skip
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout), " ".join(result.stderr.split())

    run("batchnorm")
    suite.write_text(suite.read_text().replace("protocol_version = 1", "protocol_version = 2"))
    rows, note = board()
    assert rows == []
    assert "1 run of protocol version 1 is kept apart" in note and "rerun to compare" in note
    run("layernorm")
    rows, note = board()
    assert [(r["norm"], r["protocol_version"], r["runs"]) for r in rows] == [("layernorm", 2, 1)]
    assert "1 run of protocol version 1 is kept apart" in note
    table = invoke("leaderboard", f"--suite={suite}", "--budget=smoke", f"--db={db}")
    assert "protocol version 2" in table.output and "batchnorm" not in table.stdout

    at = app(monkeypatch, db)
    assert list(at.dataframe[0].value.norm) == ["layernorm"]
    assert any("1 run of protocol version 1 is kept apart" in i.value for i in at.info)
    assert "protocol version **2**" in "\n".join(c.value for c in at.caption)


def stored_runs_db(path: Path) -> Path:
    """A database in rollback-journal mode (each read checks the file's header) holding two
    finished runs, written through the store as runs write them."""
    from normbench.metrics import MetricRow
    from normbench.store import RunStatus, open_store

    store = open_store(f"sqlite:///{path}")
    for norm in ("batchnorm", "layernorm"):
        spec = {"suite": "cifar10", "budget": "smoke", "protocol_version": 2, "task": "classify",
                "dataset": "cifar10", "norm": norm, "optimizer": "sgd", "seed": 0,
                "settings": {"model": "fastnet"}}  # fmt: skip
        store.begin_run(spec, norm, device="cpu", provenance={}, config=spec, reset=True)
        store.finish_run(norm, status=RunStatus.finished, metrics=[MetricRow("accuracy", 0.5,
                         "test")], curves=[(1, "train_loss", 1.0)], epochs_done=1)  # fmt: skip
    store.engine.dispose()
    sqlite3.connect(path).execute("PRAGMA journal_mode=DELETE").connection.close()
    return path


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("text file", "is not a normbench results database: it is not an SQLite file"),
        ("truncated", "is damaged: it holds only"),
        ("one-slash URL", "has no // after the scheme"),
    ],
)
def test_a_bad_database_is_an_error_message_on_the_page(monkeypatch, tmp_path, kind, says):
    db = tmp_path / "results.db"
    if kind == "text file":
        db.write_text("norm,accuracy\nbatchnorm,0.91\n")
    elif kind == "truncated":
        data = stored_runs_db(tmp_path / "real.db").read_bytes()
        db.write_bytes(data[: len(data) // 2])
    monkeypatch.chdir(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    at = app(monkeypatch, f"sqlite:{db}" if kind == "one-slash URL" else db)
    assert at.error and says in at.error[0].value
    assert kind == "one-slash URL" or str(db) in at.error[0].value
    assert not at.info and not at.dataframe
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_older_schema_is_a_warning_on_the_page(monkeypatch, tmp_path):
    from alembic import command
    from sqlalchemy import create_engine

    from normbench.store import alembic_config

    db = tmp_path / "old.db"
    engine, cfg = create_engine(f"sqlite:///{db}"), alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    engine.dispose()
    before = db.read_bytes()
    at = app(monkeypatch, db)
    assert at.warning and f"Run `normbench db upgrade --db {db}`" in at.warning[0].value
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["old.db"]


def test_a_database_that_goes_bad_while_the_app_runs_is_an_error_message(monkeypatch, tmp_path):
    from dashboard import common

    db = stored_runs_db(tmp_path / "results.db")
    at = app(monkeypatch, db)
    assert set(at.dataframe[0].value.norm) == {"batchnorm", "layernorm"}
    db.write_bytes(b"overwritten by something else " * 200)
    # The next queries after the cache's 30 s; the database's state stays cached a little longer.
    for cached in (common.choices, common.leaderboard):
        cached.clear()
    at.run()
    assert not at.exception, at.exception
    assert at.error and f"The results database {db} is damaged" in at.error[0].value
    common.state.clear()  # and once the state is checked again, the start page says it
    at.run()
    assert not at.exception and f"The results database {db} is damaged" in at.error[0].value
    assert at.title[0].value == "normbench leaderboard"


# --- two-pass (sharpness-aware) optimizers --------------------------------------------------

SPEED_VS_BASE = "train speed vs base optimizer"
SAM_ON = {"lr": 0.2, "momentum": 0.9, "rho": 0.5}


def sam_on_record(norm: str) -> dict:
    """What a sam_on run records of its optimizer: the real optimizer's own description."""
    import torch

    from normbench.normspeed import build_model
    from normbench.optim import create_optimizer

    model = build_model("fastnet", norm, 10, torch.device("cpu"), widths=[8, 8, 8, 8])
    return create_optimizer("sam_on", model, **SAM_ON).describe()


@pytest.fixture(scope="module")
def two_pass_db(tmp_path_factory) -> tuple[Path, dict[str, int], dict]:
    """A sam-on board written through the store as runs write it: batchnorm with sgd and with
    sam_on (its speed vs sgd measured), layernorm with sam_on whose speed check ran out of memory
    and no sgd run; and a cifar10 board of sgd only, whose batchnorm run is newer and more
    accurate than the sam-on board's. Returns the file, the run ids and sam_on's record."""
    from normbench import metrics as M
    from normbench.metrics import MetricRow
    from normbench.store import RunStatus, open_store

    path = tmp_path_factory.mktemp("two-pass") / "results.db"
    record = sam_on_record("batchnorm")
    runs = {
        "sgd": ("sam-on", "batchnorm", "sgd", {}, [(M.ACCURACY, 0.6012, "test"),
                (M.TRAIN_THROUGHPUT, 2000.0, "train"), (M.SPEED_VS_BN, 1.0, "train")]),
        "sam_on": ("sam-on", "batchnorm", "sam_on", {"two_pass": record}, [
                   (M.ACCURACY, 0.6234, "test"), (M.TRAIN_THROUGHPUT, 1100.0, "train"),
                   (M.SPEED_VS_BN, 1.0, "train"), (M.SPEED_VS_BASE_OPTIMIZER, 0.52, "train"),
                   (M.SPEED_VS_BASE_OPTIMIZER_IQR, 0.03, "train")]),
        "unmeasured": ("sam-on", "layernorm", "sam_on", {
                       "two_pass": sam_on_record("layernorm"),
                       M.SPEED_VS_BASE_OPTIMIZER: "not measured: out of memory"},
                       [(M.ACCURACY, 0.55, "test"), (M.TRAIN_THROUGHPUT, 900.0, "train")]),
        "other suite": ("cifar10", "batchnorm", "sgd", {}, [(M.ACCURACY, 0.7, "test"),
                        (M.TRAIN_THROUGHPUT, 3000.0, "train"), (M.SPEED_VS_BN, 1.0, "train")]),
    }  # fmt: skip
    store, ids = open_store(f"sqlite:///{path}"), {}
    for key, (suite, norm, optimizer, provenance, metrics) in runs.items():
        hparams = SAM_ON if optimizer == "sam_on" else {"lr": 0.2, "momentum": 0.9}
        spec = {"suite": suite, "budget": "smoke", "protocol_version": 1, "task": "classify",
                "dataset": "cifar10", "norm": norm, "optimizer": optimizer, "seed": 0,
                "settings": {"model": "fastnet"}, "hparams": hparams}  # fmt: skip
        ids[key] = store.begin_run(spec, key, device="cpu", provenance={}, config=spec, reset=True)
        store.finish_run(key, status=RunStatus.finished, metrics=[MetricRow(*m) for m in metrics],
                         curves=[(1, "train_loss", 1.0)], epochs_done=1,
                         provenance_update=provenance)  # fmt: skip
    store.engine.dispose()
    sqlite3.connect(path).execute("PRAGMA journal_mode=DELETE").connection.close()
    return path, ids, record


def two_pass_app(monkeypatch, db: Path) -> AppTest:
    at = app(monkeypatch, db)
    at.selectbox(key="suite").set_value("sam-on").run()
    assert not at.exception, at.exception
    return at


def test_leaderboard_shows_a_second_pass_cost_only_where_there_is_one(monkeypatch, two_pass_db):
    db, _, _ = two_pass_db

    def explained(at: AppTest) -> bool:
        return any(c.value.startswith(f"{SPEED_VS_BASE}:") for c in at.caption)

    at = app(monkeypatch, db)
    assert at.selectbox(key="suite").value == "cifar10"  # sgd only: the board as before
    assert SPEED_VS_BASE not in at.dataframe[0].value and not explained(at)

    at.selectbox(key="suite").set_value("sam-on").run()
    assert at.multiselect(key="optimizer").options == ["sam_on", "sgd"]
    table = at.dataframe[0].value.set_index(["norm", "optimizer"])
    assert table.loc[("batchnorm", "sam_on"), SPEED_VS_BASE] == pytest.approx(0.52)
    assert table.loc[("batchnorm", "sam_on"), "vs base IQR"] == pytest.approx(0.03)
    assert table[SPEED_VS_BASE].drop(("batchnorm", "sam_on")).isna().all()
    assert explained(at)

    at.multiselect(key="optimizer").set_value(["sgd"]).run()
    assert list(at.dataframe[0].value.optimizer) == ["sgd"]
    assert SPEED_VS_BASE not in at.dataframe[0].value and not explained(at)


def test_run_page_of_a_two_pass_run_states_its_second_pass(monkeypatch, two_pass_db):
    db, ids, record = two_pass_db
    at = open_page(two_pass_app(monkeypatch, db), "run")
    at.selectbox(key="run_page").set_value(ids["sam_on"]).run()
    assert at.title[0].value == "batchnorm + sam_on, seed 0"
    assert "Two passes per step" in [s.value for s in at.subheader]
    facts = markdown(at)
    count, share = record["perturbed_parameters"], 100 * record["perturbed_fraction"]
    assert "**base optimizer**: sgd" in facts and "**rho**: 0.5\n" in facts
    assert f"the norms' affine parameters ({count:,} parameters, {share:.3g}% of" in facts
    assert "**second pass, running statistics**: update" in facts
    assert "trains at 0.52x the rate of sgd (IQR 0.03; side by side in this run's process)" in facts
    # the sgd run of the same board, not the newer one of another suite
    assert f"**sgd run**: #{ids['sgd']}, clean accuracy 60.12% (this run: 62.34%)" in facts
    assert (
        "**own throughput, measured in different runs (noisy)**: 1,100 images/s here, "
        f"2,000 in run #{ids['sgd']} (0.55x)"
    ) in facts

    at.button(key="open_base_run").click().run()  # the sgd run's page has no such section
    assert not at.exception, at.exception
    assert at.title[0].value == "batchnorm + sgd, seed 0"
    assert "Two passes per step" not in [s.value for s in at.subheader]
    assert "base optimizer" not in markdown(at)


def test_run_page_says_what_a_two_pass_run_did_not_measure(monkeypatch, two_pass_db):
    db, ids, _ = two_pass_db
    at = open_page(two_pass_app(monkeypatch, db), "run")
    at.selectbox(key="run_page").set_value(ids["unmeasured"]).run()
    assert not at.exception, at.exception
    facts = markdown(at)
    assert "**cost**: not measured (out of memory)" in facts
    assert "**sgd run**: not measured (no finished run of this suite" in facts
    assert "images/s here" not in facts and not at.button


def test_tradeoffs_page_places_two_pass_runs_by_their_cost(monkeypatch, two_pass_db):
    db, _, _ = two_pass_db
    at = open_page(two_pass_app(monkeypatch, db), "tradeoffs")
    charts = at.get("vega_lite_chart")
    assert len(charts) == 2  # no corruption results: speed and parameters
    # batchnorm + sam_on: the norm's 1.0 x the run's 0.52 to sgd; batchnorm + sgd stays at 1.0
    import pyarrow as pa

    frames = [
        pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in charts[0].proto.datasets
    ]
    points = next(f for f in frames if len(f) == 2)  # the two pairs (the front is a subset)
    speed = dict(zip(points.optimizer, points["speed vs BN"], strict=True))
    assert speed == pytest.approx({"sgd": 1.0, "sam_on": 0.52})
    note = "a two-pass optimizer's second pass"
    assert any(note in c.value for c in at.caption)
    at.selectbox(key="suite").set_value("cifar10").run()
    assert not any(note in c.value for c in at.caption)
