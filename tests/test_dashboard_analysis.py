"""The dashboard's Analysis page (``AppTest`` and a real browser), on a database written through
the store as probe runs and landscape runs write it: initialization probes of four norms on two
VGG depths and a ResNet, two seeds, one diverged probe; classify runs with landscape probes of
BatchNorm and no norm with two optimizers, one diverged."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, skip_or_fail
from streamlit.testing.v1 import AppTest

from dashboard import data as D
from normbench import metrics as M
from normbench.metrics import MetricRow

APP = str(REPO / "dashboard" / "app.py")

# The probe values are simple functions of the norm, block, seed and step, so every number the
# page shows can be worked out by hand. Activation variance at block b: BASE**b * (1 + seed/10)
# (growth BASE**(blocks - 1)); average cosine similarity: COS + b/20 + seed/50, 0.1 higher after
# training; gradient norm of convolution c: GRAD0 * (1 + seed/10) / (c + 1).
BASE = {"batchnorm": 1.5, "groupnorm": 1.2, "layernorm": 2.0, "none": 4.0}
COS = {"batchnorm": 0.1, "groupnorm": 0.2, "layernorm": 0.12, "none": 0.5}
GRAD0 = {"batchnorm": 2.0, "groupnorm": 2.8, "layernorm": 2.0, "none": 20.0}
NONFINITE_BLOCK = 3  # where the diverged probe (none, vgg depth 6, seed 1) blew up


def probe_rows(
    norm: str, blocks: int, seed: int, step: int, blew_up: int | None, gated: bool = False
) -> list:
    """``gated``: the last convolution's gradient norm is 0, as behind a SkipInit gate at 0."""
    scale, later = 1 + seed / 10, 0.1 if step else 0.0
    rows = []
    for b in range(blocks):
        variance = float("inf") if blew_up is not None and b >= blew_up else BASE[norm] ** b
        grad = 0.0 if gated and b == blocks - 1 else GRAD0[norm] * scale / (b + 1)
        at = {"split": "train", "layer": b, "step": step}
        rows += [
            MetricRow(M.PROBE_ACT_VAR, variance * scale, **at),
            MetricRow(M.PROBE_ACT_VAR_STD, 0.01, **at),
            MetricRow(M.PROBE_COSINE, COS[norm] + later + b / 20 + seed / 50, **at),
            MetricRow(M.PROBE_STABLE_RANK, 8 / (b + 1), **at),
            MetricRow(M.PROBE_GRAD_NORM, grad, **at),
        ]
    whole = {"split": "train", "step": step}
    if blew_up is not None:
        return [*rows, MetricRow(M.PROBE_NONFINITE_LAYER, blew_up, **whole)]
    last = blocks - 1
    return rows + [
        MetricRow(M.PROBE_ACT_GROWTH, BASE[norm] ** last, **whole),
        MetricRow(M.PROBE_LAST_COSINE, COS[norm] + later + last / 20 + seed / 50, **whole),
        MetricRow(M.PROBE_LAST_STABLE_RANK, 8 / blocks, **whole),
        MetricRow(M.PROBE_GRAD_RATIO, float(blocks), **whole),
    ]


# Landscape runs: (norm, optimizer) -> the whole-run summaries each seed stores.
SUMMARIES = {
    ("batchnorm", "sgd"): {M.LANDSCAPE_BETA_MEAN: 2.0, M.LANDSCAPE_LOSS_RANGE_MEAN: 0.5,
                           M.LANDSCAPE_GRAD_PRED_MEAN: 1.0, M.ICS_L2_MEAN: 0.4,
                           M.ICS_COSINE_MEAN: 0.9},
    ("none", "sgd"): {M.LANDSCAPE_BETA_MEAN: 6.2, M.LANDSCAPE_LOSS_RANGE_MEAN: 1.0,
                      M.LANDSCAPE_GRAD_PRED_MEAN: 1.2, M.ICS_L2_MEAN: 0.1,
                      M.ICS_COSINE_MEAN: 0.5},
    ("batchnorm", "sgd:lr0.5"): {M.LANDSCAPE_BETA_MEAN: 3.0, M.LANDSCAPE_LOSS_RANGE_MEAN: 0.7,
                                 M.LANDSCAPE_GRAD_PRED_MEAN: 1.1, M.ICS_L2_MEAN: 0.5,
                                 M.ICS_COSINE_MEAN: 0.8},
}  # fmt: skip
WIDTH = {"batchnorm": 0.5, "none": 1.0}  # loss band width over the step sizes
LANDSCAPE_STEPS = (0, 5, 10)


def landscape_rows(norm: str, optimizer: str, seed: int, steps) -> list:
    rows = []
    for step in steps:
        low = 2.3 - step / 50
        at = {"split": "train", "step": step}
        rows += [
            MetricRow(M.LANDSCAPE_LOSS_MIN, low, **at),
            MetricRow(M.LANDSCAPE_LOSS_MAX, low + WIDTH[norm] * (1 + seed / 5), **at),
            MetricRow(M.LANDSCAPE_GRAD_CHANGE_MIN, 0.1 * WIDTH[norm], **at),
            MetricRow(M.LANDSCAPE_GRAD_CHANGE_MAX, WIDTH[norm], **at),
            MetricRow(M.LANDSCAPE_BETA, 4 * WIDTH[norm] * (1 + step / 10), **at),
        ]
        for layer in range(3):
            rows += [
                MetricRow(M.ICS_L2, WIDTH[norm] * (layer + 1) * (1 + step / 10), layer=layer,
                          **at),
                MetricRow(M.ICS_COSINE, 1 - WIDTH[norm] * layer / 10, layer=layer, **at),
            ]  # fmt: skip
    summary = SUMMARIES.get((norm, optimizer), {})
    return rows + [MetricRow(name, value, "train") for name, value in summary.items()]


@pytest.fixture(scope="module")
def analysis_db(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """The probes, landscape and plain cifar10 boards; returns the file and the ids of the
    diverged probe and landscape runs."""
    from normbench.store import RunStatus, open_store

    path = tmp_path_factory.mktemp("analysis") / "results.db"
    store, ids = open_store(f"sqlite:///{path}"), {}

    def write(key, suite, task, norm, optimizer, seed, settings, metrics, status, error=None):
        spec = {"suite": suite, "budget": "smoke", "protocol_version": 1, "task": task,
                "dataset": "cifar10", "norm": norm, "optimizer": optimizer, "seed": seed,
                "settings": settings, "hparams": {"lr": 0.1}}  # fmt: skip
        ids[key] = store.begin_run(spec, key, device="cpu", provenance={}, config=spec, reset=True)
        store.finish_run(key, status=status, metrics=metrics, curves=[], epochs_done=1,
                         diverged_step=0 if error else None, error=error)  # fmt: skip

    models = [  # (model, model_args, label, blocks, probe steps, norms)
        ("vgg", {"depth": 4}, "vgg(depth=4)", 4, [0, 10], list(BASE)),
        ("vgg", {"depth": 6}, "vgg(depth=6)", 6, [0], list(BASE)),
        ("resnet20", {}, "resnet20", 3, [0], ["groupnorm"]),
    ]
    for model, args, label, blocks, steps, norms in models:
        settings = {"model": model, "model_args": args, "batch_size": 8, "batches": 2,
                    "probe_steps": steps, "precision": "fp32", "train_subset": 0,
                    "augment": {"crop_padding": 0, "flip": False},
                    "model_label": label}  # fmt: skip
        for norm in norms:
            for seed in (0, 1) if model == "vgg" else (0,):
                diverges = (label, norm, seed) == ("vgg(depth=6)", "none", 1)
                blew_up = NONFINITE_BLOCK if diverges else None
                gated = model == "resnet20"
                rows = [r for s in steps for r in probe_rows(norm, blocks, seed, s, blew_up, gated)]
                key = f"probe-{label}-{norm}-{seed}"
                if blew_up is None:
                    write(key, "probes", "probe", norm, "sgd", seed, settings, rows,
                          RunStatus.finished)  # fmt: skip
                else:
                    reason = f"activations non-finite at block {blew_up}"
                    write(key, "probes", "probe", norm, "sgd", seed, settings, rows,
                          RunStatus.diverged, reason)  # fmt: skip
                    ids["diverged probe"] = ids[key]

    landscape = {"every": 5, "step_sizes": [0.1, 0.5, 1.0], "ics": True}
    settings = {"model": "fastnet", "landscape": landscape}
    for norm, optimizer, seeds in (("batchnorm", "sgd", (0, 1)), ("none", "sgd", (0, 1)),
                                   ("batchnorm", "sgd:lr0.5", (0,))):  # fmt: skip
        for seed in seeds:
            rows = landscape_rows(norm, optimizer, seed, LANDSCAPE_STEPS)
            accuracy = {"batchnorm": 0.8, "none": 0.6}[norm] + seed / 50
            accuracy -= 0.02 if optimizer != "sgd" else 0.0
            rows.append(MetricRow(M.ACCURACY, accuracy, "test"))
            write(f"landscape-{norm}-{optimizer}-{seed}", "landscape", "classify", norm,
                  optimizer, seed, settings, rows, RunStatus.finished)  # fmt: skip
    rows = landscape_rows("none", "sgd:lr0.5", 0, (0, 5))  # blew up before step 10
    write("landscape-none-lr0.5", "landscape", "classify", "none", "sgd:lr0.5", 0, settings, rows,
          RunStatus.diverged, "non-finite loss")  # fmt: skip
    ids["diverged landscape"] = ids["landscape-none-lr0.5"]

    write("plain", "cifar10", "classify", "batchnorm", "sgd", 0, {"model": "fastnet"},
          [MetricRow(M.ACCURACY, 0.7, "test")], RunStatus.finished)  # fmt: skip
    store.engine.dispose()
    sqlite3.connect(path).execute("PRAGMA journal_mode=DELETE").connection.close()
    return path, ids


def analysis_page(monkeypatch, db: Path, suite: str | None = None) -> AppTest:
    monkeypatch.setenv("NORMBENCH_DB", str(db))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    if suite is not None:
        at.selectbox(key="suite").set_value(suite).run()
    at.switch_page("views/analysis.py")
    at.run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Analysis"
    return at


def charts(at: AppTest) -> dict[str, pd.DataFrame]:
    """Each vega-lite chart of the page by its title, with the rows it draws."""
    import pyarrow as pa

    found = {}
    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        frames = [pa.ipc.open_stream(d.data.data).read_all().to_pandas()
                  for d in chart.proto.datasets]  # fmt: skip
        title = spec["title"] if isinstance(spec["title"], str) else spec["title"]["text"]
        found[title] = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return found


def readings(at: AppTest) -> list[str]:
    return [line.removeprefix("- ") for m in at.markdown for line in m.value.splitlines()
            if line.startswith("- ")]  # fmt: skip


def infos(at: AppTest) -> str:
    return "\n".join(i.value for i in at.info)


def test_probe_charts_show_each_norm_over_blocks_with_seed_bands(monkeypatch, analysis_db):
    db, _ = analysis_db
    at = analysis_page(monkeypatch, db, "probes")
    model = at.selectbox(key="analysis_model")
    assert model.options == ["resnet20", "vgg(depth=4)", "vgg(depth=6)"]
    assert model.value == "vgg(depth=4)"  # the model probed most
    found = charts(at)
    assert list(found) == [
        "Activation variance vs block: vgg(depth=4)",
        "Activation growth vs depth: vgg",
        "Sample cosine similarity vs block",
        "Stable rank of the samples' Gram matrix vs block",
        "Gradient norm (dL/d conv output) vs convolution",
    ]
    variance = found["Activation variance vs block: vgg(depth=4)"].set_index(["norm", "layer"])
    assert sorted(set(variance.index.get_level_values("norm"))) == sorted(BASE)
    # batchnorm, block 3: 1.5**3 = 3.375 at seed 0, x1.1 at seed 1
    row = variance.loc[("batchnorm", 3)]
    assert (row["min"], row["max"], row["mean"], row["n"]) == pytest.approx(
        (3.375, 3.7125, 3.54375, 2)
    )
    # growth vs depth: last block / first at depths 4 and 6; the diverged seed stored none
    growth = found["Activation growth vs depth: vgg"].set_index(["norm", "depth"])
    assert growth.loc[("batchnorm", 4), "mean"] == pytest.approx(3.375)
    assert growth.loc[("batchnorm", 6), "mean"] == pytest.approx(1.5**5)
    assert growth.loc[("none", 6), ["mean", "n"]].tolist() == pytest.approx([1024.0, 1])
    grads = found["Gradient norm (dL/d conv output) vs convolution"].set_index(["norm", "layer"])
    assert grads.loc[("groupnorm", 1), "mean"] == pytest.approx(2.8 * 1.05 / 2)
    spec = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    assert spec["layer"][0]["encoding"]["y"]["scale"]["type"] == "log"


def test_probe_readings_against_batchnorm(monkeypatch, analysis_db):
    db, _ = analysis_db
    at = analysis_page(monkeypatch, db, "probes")
    # vgg depth 4 at initialization: BatchNorm's growth 1.5**3 = 3.375, last-block similarity
    # 0.1 + 3/20 + (0 + 1/50)/2 = 0.26, first-layer gradient norm 2 * 1.05
    assert readings(at) == [
        "groupnorm: activation growth 1.7x over 4 blocks vs BatchNorm's 3.4x (slower growth); "
        "last-block sample similarity 0.36 vs 0.26 (less informative); "
        "first-layer gradient norm 1.4x BatchNorm's",
        "layernorm: activation growth 8x over 4 blocks vs BatchNorm's 3.4x (faster growth); "
        "last-block sample similarity 0.28 vs 0.26 (about the same); "
        "first-layer gradient norm 1x BatchNorm's",
        "none: activation growth 64x over 4 blocks vs BatchNorm's 3.4x (faster growth); "
        "last-block sample similarity 0.66 vs 0.26 (less informative); "
        "first-layer gradient norm 10x BatchNorm's",
    ]
    assert not at.dataframe  # the diverged probe is of the other depth

    step = at.selectbox(key="analysis_step")  # probed at two steps: init first
    assert step.options == ["0 (at initialization)", "10"] and step.value == 0
    step.set_value(10).run()
    assert not at.exception, at.exception
    assert "last-block sample similarity 0.46 vs 0.36 (less informative)" in readings(at)[0]


def test_a_diverged_probe_is_listed_with_its_block(monkeypatch, analysis_db):
    db, ids = analysis_db
    at = analysis_page(monkeypatch, db, "probes")
    at.selectbox(key="analysis_model").set_value("vgg(depth=6)").run()
    assert not at.exception, at.exception
    assert "analysis_step" not in [s.key for s in at.selectbox]  # probed at one step
    diverged = at.dataframe[0].value
    assert diverged.to_dict("records") == [{
        "run": ids["diverged probe"], "model": "vgg(depth=6)", "norm": "none", "seed": 1,
        "step": 0, "non-finite at block": NONFINITE_BLOCK,
        "reason": f"activations non-finite at block {NONFINITE_BLOCK}",
    }]  # fmt: skip
    # the other seed's growth alone: 4**5 over six blocks (the diverged one stored three)
    none = next(r for r in readings(at) if r.startswith("none:"))
    assert none.startswith("none: activation growth 1024x over 6 blocks vs BatchNorm's 7.6x")


def test_without_batchnorm_each_norm_gets_its_own_numbers(monkeypatch, analysis_db):
    db, _ = analysis_db
    at = analysis_page(monkeypatch, db, "probes")
    at.selectbox(key="analysis_model").set_value("resnet20").run()
    assert not at.exception, at.exception
    assert "BatchNorm has no probes of resnet20 at step 0 (at initialization)" in infos(at)
    assert readings(at) == [
        "groupnorm: activation growth 1.4x over 3 blocks; last-block sample similarity 0.30; "
        "first-layer gradient norm 2.8"
    ]
    assert "the board has 0 depth(s) of resnet20 probed" in "\n".join(c.value for c in at.caption)
    assert len(at.get("vega_lite_chart")) == 4  # no growth vs depth for one model
    # the gradient into the gated last convolution is 0: not on a log scale, and said so
    chart = at.get("vega_lite_chart")[-1]
    title = json.loads(chart.proto.spec)["title"]
    assert title == {
        "text": "Gradient norm (dL/d conv output) vs convolution",
        "subtitle": "1 point at 0 or below left off the log scale",
    }
    assert charts(at)[title["text"]].layer.tolist() == [0, 1]


def test_landscape_charts_summaries_and_readings(monkeypatch, analysis_db):
    db, _ = analysis_db
    at = analysis_page(monkeypatch, db, "landscape")
    assert "`normbench run --suite probes`" in infos(at)  # this board has no probe runs
    found = charts(at)
    assert list(found) == [
        "Loss along the gradient (min to max over step sizes)",
        "Gradient change along the gradient (min to max)",
        "Effective beta-smoothness over training",
        "ICS ||G - G'|| (l2) per layer, mean over probe steps",
        "ICS cos(G, G') per layer, mean over probe steps",
    ]
    loss = found["Loss along the gradient (min to max over step sizes)"].set_index(["run", "step"])
    # none + sgd at step 5: min 2.3 - 0.1 = 2.2, max 2.2 + 1.0 (seed 0) or + 1.2 (seed 1)
    assert loss.loc[("none + sgd", 5), ["low", "high"]].tolist() == pytest.approx([2.2, 3.3])
    assert sorted(set(loss.index.get_level_values("run"))) == [
        "batchnorm + sgd", "batchnorm + sgd:lr0.5", "none + sgd", "none + sgd:lr0.5"
    ]  # fmt: skip
    assert loss.loc["none + sgd:lr0.5"].index.tolist() == [0, 5]  # diverged before step 10
    beta = found["Effective beta-smoothness over training"].set_index(["run", "step"])
    assert beta.loc[("batchnorm + sgd", 10), "mean"] == pytest.approx(4 * 0.5 * 2)
    ics = found["ICS ||G - G'|| (l2) per layer, mean over probe steps"].set_index(["run", "layer"])
    # layer 2 of none: 1.0 * 3 * (1 + step/10), mean over steps 0, 5, 10 = 3 * 1.5
    assert ics.loc[("none + sgd", 2), "mean"] == pytest.approx(4.5)

    table = at.dataframe[0].value.set_index("run")
    assert table.loc["none + sgd", ["seeds", "diverged"]].tolist() == [2, 0]
    assert table.loc["none + sgd", "beta-smoothness"] == pytest.approx(6.2)
    assert table.loc["none + sgd", "test acc %"] == pytest.approx(61.0)
    assert table.loc["none + sgd:lr0.5", ["seeds", "diverged"]].tolist() == [1, 1]
    assert table.loc["none + sgd:lr0.5", ["beta-smoothness", "test acc %"]].isna().all()
    assert readings(at) == [
        "none + sgd: beta-smoothness 3.1x BatchNorm's (rougher landscape); "
        "loss range 2x BatchNorm's (wider loss variation); "
        "gradient change 1.2x BatchNorm's (about the same); "
        "ICS (l2) 0.25x BatchNorm's (less covariate shift)",
        "none + sgd:lr0.5: no summary to compare",
    ]


def test_boards_without_probes_name_the_suites_that_make_them(monkeypatch, analysis_db):
    db, _ = analysis_db
    at = analysis_page(monkeypatch, db)  # the plain cifar10 board comes first
    assert at.selectbox(key="suite").value == "cifar10"
    assert "`normbench run --suite probes`" in infos(at)
    assert "`normbench run --suite landscape`" in infos(at)
    assert not at.get("vega_lite_chart") and not at.dataframe
    at.selectbox(key="suite").set_value("probes").run()
    assert "`normbench run --suite landscape`" in infos(at)
    assert "`normbench run --suite probes`" not in infos(at)


def test_the_analysis_page_never_writes(monkeypatch, analysis_db, tmp_path):
    db = tmp_path / "readonly.db"
    with sqlite3.connect(analysis_db[0]) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    db.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    before = hashlib.sha256(db.read_bytes()).hexdigest(), os.stat(db).st_mtime_ns
    at = analysis_page(monkeypatch, db, "probes")
    at.selectbox(key="suite").set_value("landscape").run()
    assert not at.exception, at.exception
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), os.stat(db).st_mtime_ns) == before


def test_readings_formats_and_thresholds():
    assert [D.times(v) for v in (27.2, 1.44, 0.031, 3.2e7)] == ["27x", "1.4x", "0.031x", "3.2e+07x"]
    table = pd.DataFrame(
        {"growth": [27.0, 21.0, float("nan")], "blocks": [28, 28, 5],
         "last_cosine": [0.31, 0.42, 0.33], "first_grad_norm": [1.0, 1.4, 0.5]},
        index=pd.Index(["batchnorm", "groupnorm", "none"], name="norm"),
    )  # fmt: skip
    assert D.probe_readings(table) == {
        "groupnorm": "groupnorm: activation growth 21x over 28 blocks vs BatchNorm's 27x (about "
        "the same); last-block sample similarity 0.42 vs 0.31 (less informative); first-layer "
        "gradient norm 1.4x BatchNorm's",
        "none": "none: activation growth not measured; last-block sample similarity 0.33 vs "
        "0.31 (about the same); first-layer gradient norm 0.5x BatchNorm's",
    }
    summary = pd.DataFrame({"norm": ["groupnorm"], "optimizer": ["adamw"]})
    for column in D.LANDSCAPE_SUMMARIES:
        summary[column] = 1.0
    assert D.landscape_readings(summary) == {
        "groupnorm + adamw": "groupnorm + adamw: no BatchNorm + adamw landscape run to compare"
    }


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


def test_the_analysis_page_in_a_real_browser(analysis_db, tmp_path):
    if not CHROMIUM.exists():
        skip_or_fail("no Chromium at /usr/bin/chromium (apt-get install chromium chromium-driver)")
    try:
        from playwright import sync_api as playwright
    except ImportError:
        skip_or_fail("playwright is not installed (pip install playwright, or the dev extra)")
    import subprocess
    import sys

    from PIL import Image
    from test_dashboard import free_port, wait_healthy

    shots = Path(os.environ.get("NORMBENCH_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://localhost:{port}"
    command = [sys.executable, "-m", "normbench.cli", "dashboard", f"--db={analysis_db[0]}",
               f"--port={port}"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, server)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            # tall enough for the whole page: Streamlit scrolls inside its main block, so a
            # full-page screenshot would show only the viewport
            page = browser.new_page(viewport={"width": 1400, "height": 4200})
            saved = []
            for suite, expected in (("probes", 5), ("landscape", 5)):
                page.goto(f"{url}/analysis")
                page.get_by_role("heading", name="Analysis").wait_for(timeout=90_000)
                choose_suite(page, suite)
                page.get_by_text(f"Suite {suite}").first.wait_for(timeout=30_000)
                # every chart drawn: vega renders each into an svg (or a canvas) of class marks
                page.wait_for_function(
                    "n => document.querySelectorAll('[data-testid=\"stVegaLiteChart\"] .marks')"
                    ".length >= n",
                    arg=expected,
                    timeout=60_000,
                )
                if suite == "landscape":  # the summary table draws into its canvas when shown
                    page.locator('[data-testid="stDataFrame"] canvas').first.wait_for()
                page.wait_for_timeout(2_000)  # the last frames of the charts and the table
                text = page.inner_text("body")
                assert "Traceback" not in text and "Error" not in text.split("Analysis", 1)[1]
                assert page.locator('[data-testid="stException"]').count() == 0
                shot = shots / f"analysis-{suite}.png"
                page.screenshot(path=str(shot), full_page=True)
                saved.append(shot)
            browser.close()
        for shot in saved:
            image = Image.open(shot).convert("RGB")
            colours = image.getcolors(maxcolors=1 << 20) or []
            assert image.height >= 4200 and len(colours) > 50, (shot, len(colours))
            print(f"screenshot: {shot}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def choose_suite(page, suite: str) -> None:
    """Pick ``suite`` in the sidebar's Suite selectbox."""
    box = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(
        has_text="Suite"
    )
    box.first.click()
    page.get_by_role("option", name=suite, exact=True).click()
