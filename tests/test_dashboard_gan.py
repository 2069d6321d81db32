"""The dashboard's GAN views (``AppTest`` and a real browser): the Leaderboard page of a GAN suite
(the board by FID, one table per score protocol) and the GAN page (sample grids, FID over
training), on a database written through the store as GAN runs write it: three generator x
discriminator norm pairs with two seeds, one seed collapsed, one diverged before its scores, a
fourth pair that only diverged, a rerun scored with other sample counts, a run stored without
its grid and one whose grid is not an image; and a classification suite beside them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import stat
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, skip_or_fail
from PIL import Image
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from dashboard import data as D
from normbench import metrics as M
from normbench.metrics import MetricRow

APP = str(REPO / "dashboard" / "app.py")
SUITE, BUDGET = "gan-cifar10", "cpu"
GENERATED, REAL, PROGRESS = 2000, 5000, 500
NETWORK = "inception-v3-fid"


def grid_png(colours: list[tuple[int, int, int]], tile: int = 8) -> bytes:
    """A real PNG sample grid: 2 x 2 tiles of the given colours, 2 px apart."""
    image = Image.new("RGB", (2 * tile + 3 * 2, 2 * tile + 3 * 2))
    for i, colour in enumerate(colours):
        x, y = 2 + (i % 2) * (tile + 2), 2 + (i // 2) * (tile + 2)
        image.paste(colour, (x, y, x + tile, y + tile))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


RED, GREEN, BLUE, GREY = (200, 30, 30), (30, 180, 60), (40, 60, 220), (128, 128, 128)
#: (G norm, D norm, seed) -> its sample grid; the collapsed run's four samples are alike.
GRIDS = {
    ("batchnorm", "spectral_norm", 0): grid_png([RED, GREEN, BLUE, GREY]),
    ("layernorm", "spectral_norm", 0): grid_png([GREEN, BLUE, RED, GREY]),
    ("layernorm", "spectral_norm", 2): grid_png([BLUE, RED, GREEN, GREY]),
    ("none", "none", 0): grid_png([GREY] * 4),
}
BROKEN = b"\x89PNG\r\n\x1a\n but not an image"  # layernorm / spectral_norm, seed 1

# (G norm, D norm, seed) -> (FID, KID, sample diversity, FID over training at steps 500, 1000,
# 1500); a diverged run stores what it measured before (its FID over training), no scores.
SCORED = {
    ("batchnorm", "spectral_norm", 0): (40.0, 0.020, 0.30, [120.0, 80.0, 60.0]),
    ("batchnorm", "spectral_norm", 1): (50.0, 0.030, 0.32, [130.0, 90.0, 70.0]),
    ("layernorm", "spectral_norm", 0): (30.0, 0.010, 0.35, [100.0, 60.0, 40.0]),
    ("layernorm", "spectral_norm", 1): (34.0, 0.014, 0.34, [110.0, 70.0, 50.0]),
    ("none", "none", 0): (150.0, 0.200, 0.01, [200.0, 180.0, 170.0]),
}
DIVERGED = {  # (G, D, seed) -> (step it diverged at, its FID over training before)
    ("none", "none", 1): (700, [210.0]),
    ("batchnorm", "none", 0): (3, []),
    ("batchnorm", "none", 1): (5, []),
}
COLLAPSE_BELOW = 0.05  # sample diversity under which a run counts as collapsed
STEPS = (500, 1000, 1500)


def write_run(store, g, d, seed, status, rows, *, suite=SUITE, task="gan", grid=None, step=None):
    """A run as a GAN run stores it: its scores, FID over training, its sample grid."""
    settings = {"model": "dcgan", "d_norm": d, "fid_samples": GENERATED,
                "fid_real_samples": REAL, "fid_every_samples": PROGRESS}  # fmt: skip
    spec = {"suite": suite, "budget": BUDGET, "protocol_version": 1, "task": task,
            "dataset": "cifar10", "norm": g, "optimizer": "adam", "seed": seed,
            "settings": settings, "hparams": {"lr": 2e-4}}  # fmt: skip
    key = f"{suite}-{g}-{d}-{seed}"
    store.begin_run(spec, key, device="cpu", provenance={}, config=spec, reset=True)
    error = None if step is None else f"non-finite discriminator loss (nan) at step {step}"
    store.finish_run(
        key, status=status, metrics=rows, curves=[], epochs_done=int(step is None),
        diverged_step=step, error=error, provenance_update={"feature_network": NETWORK},
        artifacts=None if grid is None else {D.SAMPLES_ARTIFACT: grid},
    )  # fmt: skip


def progress(fids: list[float]) -> list[MetricRow]:
    return [
        MetricRow(M.GAN_FID_PROGRESS, f, "train", step=s) for s, f in zip(STEPS, fids, strict=False)
    ]


def scores(fid: float, kid: float, diversity: float, generated: int = GENERATED) -> list:
    return [
        MetricRow(M.GAN_FID, fid, "train"),
        MetricRow(M.GAN_KID, kid, "train"),
        MetricRow(M.GAN_KID_STD, kid / 10, "train"),
        MetricRow(M.GAN_GEN_SAMPLES, generated, "train"),
        MetricRow(M.GAN_REAL_SAMPLES, REAL, "train"),
        MetricRow(M.GAN_DIVERSITY, diversity),
        MetricRow(M.GAN_COLLAPSED, float(diversity < COLLAPSE_BELOW)),
        MetricRow(M.GAN_D_LOSS, 1.0),
        MetricRow(M.GAN_G_LOSS, 2.0),
    ]


def new_db(path: Path, write) -> Path:
    """A results database at ``path`` holding what ``write(store)`` wrote, as a plain file."""
    from normbench.store import open_store

    store = open_store(f"sqlite:///{path}")
    write(store)
    store.engine.dispose()
    sqlite3.connect(path).execute("PRAGMA journal_mode=DELETE").connection.close()
    return path


def classify_run(store) -> None:
    from normbench.store import RunStatus

    write_run(store, "batchnorm", "", 0, RunStatus.finished, [MetricRow(M.ACCURACY, 0.7, "test")],
              suite="cifar10", task="classify")  # fmt: skip


@pytest.fixture(scope="module")
def gan_db(tmp_path_factory) -> Path:
    from normbench.store import RunStatus

    def write(store):
        for (g, d, seed), (fid, kid, diversity, fids) in SCORED.items():
            grid = GRIDS.get((g, d, seed), BROKEN if (g, seed) == ("layernorm", 1) else None)
            write_run(store, g, d, seed, RunStatus.finished,
                      scores(fid, kid, diversity) + progress(fids), grid=grid)  # fmt: skip
        # a rerun scored with fewer generated images: ranked apart, never against the others
        write_run(store, "layernorm", "spectral_norm", 2, RunStatus.finished,
                  scores(36.0, 0.012, 0.33, generated=1000),
                  grid=GRIDS[("layernorm", "spectral_norm", 2)])  # fmt: skip
        for (g, d, seed), (step, fids) in DIVERGED.items():
            write_run(store, g, d, seed, RunStatus.diverged, progress(fids), step=step)
        classify_run(store)

    return new_db(tmp_path_factory.mktemp("gan") / "results.db", write)


def open_page(monkeypatch, db: Path, view: str, suite: str | None = SUITE) -> AppTest:
    """The app on ``db`` with ``suite`` chosen in the sidebar, on page ``view``."""
    monkeypatch.setenv("NORMBENCH_DB", str(db))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    if suite is not None:
        at.selectbox(key="suite").set_value(suite).run()
    if view != "leaderboard":
        at.switch_page(f"views/{view}.py")
        at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def media(monkeypatch) -> list[MemoryMediaFileStorage]:
    """The media stores of the app's script runs (one a run): what ``st.image`` was handed."""
    stores, init = [], MemoryMediaFileStorage.__init__

    def kept(self, *args, **kwargs):
        init(self, *args, **kwargs)
        stores.append(self)

    monkeypatch.setattr(MemoryMediaFileStorage, "__init__", kept)
    return stores


def images(at: AppTest, media: list[MemoryMediaFileStorage]) -> list[tuple[bytes, str]]:
    """Each image of the last run with its caption: the bytes it was served as."""
    return [
        (media[-1].get_file(url.rsplit("/", 1)[1]).content, caption)
        for element in at.image
        for url, caption in zip(element.value, element.captions, strict=True)
    ]


def captions(at: AppTest) -> list[str]:
    return [c.value for c in at.caption]


def infos(at: AppTest) -> str:
    return "\n".join(i.value for i in at.info)


def seed_box(at: AppTest, g: str, d: str):
    return at.selectbox(key=f"gan_seed:G {g} / D {d} + adam")


def test_the_leaderboard_of_a_gan_suite_ranks_pairs_by_fid_per_score_group(monkeypatch, gan_db):
    at = open_page(monkeypatch, gan_db, "leaderboard")
    assert "ranking" not in [s.key for s in at.selectbox]  # FID ranks a GAN board
    assert [s.value for s in at.subheader] == [
        "FID of 2,000 generated vs 5,000 real images",
        "FID of 1,000 generated vs 5,000 real images",
        "No scores yet",
    ]
    texts = captions(at)
    for generated in ("2,000", "1,000"):
        assert (
            f"FID/KID in inception-v3-fid features of {generated} generated vs 5,000 real images; "
            "lower is better." in texts
        )
    main, rerun, unscored = (t.value for t in at.dataframe)
    assert main.columns.tolist() == [
        "rank", "G norm", "D norm", "optimizer", "FID", "KID", "sample diversity",
        "collapsed seeds", "n", "runs",
    ]  # fmt: skip
    # lowest mean FID first: layernorm (30, 34), batchnorm (40, 50), none (150; seed 1 diverged)
    assert main.to_dict("records") == [
        {"rank": "1 🥇", "G norm": "layernorm", "D norm": "spectral_norm", "optimizer": "adam",
         "FID": "32.0 ± 2.8", "KID": "0.0120 ± 0.0028", "sample diversity": "0.345 ± 0.007",
         "collapsed seeds": 0, "n": 2, "runs": "3 finished"},
        {"rank": "2 🥈", "G norm": "batchnorm", "D norm": "spectral_norm", "optimizer": "adam",
         "FID": "45.0 ± 7.1", "KID": "0.0250 ± 0.0071", "sample diversity": "0.310 ± 0.014",
         "collapsed seeds": 0, "n": 2, "runs": "2 finished"},
        {"rank": "3 🥉", "G norm": "none", "D norm": "none", "optimizer": "adam",
         "FID": "150.0", "KID": "0.2000", "sample diversity": "0.010", "collapsed seeds": 1,
         "n": 1, "runs": "1 finished, 1 diverged"},
    ]  # fmt: skip
    # the rerun with 1,000 generated images has the lowest FID of all but is ranked on its own
    assert rerun[["rank", "G norm", "FID", "n"]].to_dict("records") == [
        {"rank": "1 🥇", "G norm": "layernorm", "FID": "36.0", "n": 1}
    ]
    assert unscored.to_dict("records") == [
        {"G norm": "batchnorm", "D norm": "none", "optimizer": "adam", "runs": "2 diverged"}
    ]


def test_the_gan_page_shows_each_pairs_sample_grid_best_first(monkeypatch, gan_db, media):
    at = open_page(monkeypatch, gan_db, "gan")
    assert at.title[0].value == "GAN"
    assert [m.value for m in at.markdown if m.value.startswith("**")] == [
        "**G layernorm / D spectral_norm + adam**",
        "**G batchnorm / D spectral_norm + adam**",
        "**G none / D none + adam**",
        "**G batchnorm / D none + adam**",
    ]
    counts = "(2,000 generated vs 5,000 real images)"
    assert images(at, media) == [  # the stored PNGs themselves, each seed 0's
        (GRIDS[("layernorm", "spectral_norm", 0)], f"seed 0: FID 30.0, KID 0.0100 {counts}"),
        (GRIDS[("batchnorm", "spectral_norm", 0)], f"seed 0: FID 40.0, KID 0.0200 {counts}"),
        (GRIDS[("none", "none", 0)], f"seed 0: FID 150.0, KID 0.2000 {counts}"),
    ]
    # only the collapsed run wears the badge
    badges = [m.value for m in at.markdown if "badge" in m.value]
    assert badges == [":red-badge[:material/warning: mode collapse]"]
    assert (
        "Seed 0 diverged at generator step 3: non-finite discriminator loss (nan) at step 3. "
        "No scores, no sample grid." in captions(at)
    )
    assert seed_box(at, "none", "none").options == ["0", "1 (diverged)"]
    assert seed_box(at, "layernorm", "spectral_norm").options == ["0", "1", "2"]


def test_a_seed_without_a_readable_grid_gets_a_caption(monkeypatch, gan_db, media):
    at = open_page(monkeypatch, gan_db, "gan")
    seed_box(at, "batchnorm", "spectral_norm").set_value(1)
    seed_box(at, "layernorm", "spectral_norm").set_value(1)
    seed_box(at, "none", "none").set_value(1).run()
    assert not at.exception, at.exception
    texts = captions(at)
    counts = "(2,000 generated vs 5,000 real images)"
    assert f"seed 1: FID 50.0, KID 0.0300 {counts}. This run stored no sample grid." in texts
    assert (
        f"seed 1: FID 34.0, KID 0.0140 {counts}. Its stored sample grid is not a readable image."
        in texts
    )
    assert (
        "Seed 1 diverged at generator step 700: non-finite discriminator loss (nan) at step 700. "
        "No scores, no sample grid." in texts
    )
    assert not images(at, media) and not [m for m in at.markdown if "badge" in m.value]
    seed_box(at, "layernorm", "spectral_norm").set_value(2).run()
    assert images(at, media) == [(
        GRIDS[("layernorm", "spectral_norm", 2)],
        "seed 2: FID 36.0, KID 0.0120 (1,000 generated vs 5,000 real images)",
    )]  # fmt: skip


def test_fid_over_training_is_the_mean_over_seeds_with_their_range(monkeypatch, gan_db):
    at = open_page(monkeypatch, gan_db, "gan")
    (chart,) = at.get("vega_lite_chart")
    assert json.loads(chart.proto.spec)["title"] == "FID over generator steps"
    drawn = charts(at)["FID over generator steps"].set_index(["pair", "step"])
    rows = drawn[["mean", "min", "max", "n"]]
    assert rows.loc[("G batchnorm / D spectral_norm + adam", 500)].tolist() == [125, 120, 130, 2]
    # the diverged seed's point before it diverged (210 at step 500) counts; later ones are seed 0's
    none = rows.loc["G none / D none + adam"]
    assert none.to_dict("index") == {
        500: {"mean": 205.0, "min": 200.0, "max": 210.0, "n": 2},
        1000: {"mean": 180.0, "min": 180.0, "max": 180.0, "n": 1},
        1500: {"mean": 170.0, "min": 170.0, "max": 170.0, "n": 1},
    }
    assert set(drawn.index.get_level_values("pair")) == {
        "G batchnorm / D spectral_norm + adam",
        "G layernorm / D spectral_norm + adam",
        "G none / D none + adam",
    }  # the pair that only diverged stored no point
    assert (
        "FID during training uses 500 generated images a point (the final FID: 1,000 and 2,000): "
        "it reads higher than the final FID and compares only with itself."
        in " ".join(captions(at))
    )


def test_other_suites_and_empty_boards_say_what_to_do(monkeypatch, gan_db, tmp_path):
    at = open_page(monkeypatch, gan_db, "gan", suite=None)  # cifar10 comes first
    assert at.selectbox(key="suite").value == "cifar10"
    assert infos(at) == (
        "Suite **cifar10** is not a GAN suite. GAN suites with runs: `gan-cifar10`; choose one "
        "in the sidebar."
    )
    assert not at.image and not at.get("vega_lite_chart")

    no_gans = new_db(tmp_path / "classify.db", classify_run)
    at = open_page(monkeypatch, no_gans, "gan", suite=None)
    assert "No GAN runs in this database" in infos(at)
    assert "`normbench run --suite gan-cifar10 --budget smoke`" in infos(at)
    at.switch_page("views/leaderboard.py").run()  # an accuracy board looks as it did
    assert not at.exception, at.exception
    assert at.selectbox(key="ranking").value == "clean accuracy"

    def diverged_only(store):
        from normbench.store import RunStatus

        write_run(store, "none", "none", 0, RunStatus.diverged, [], step=2)

    unscored = new_db(tmp_path / "unscored.db", diverged_only)
    at = open_page(monkeypatch, unscored, "leaderboard")
    assert [s.value for s in at.subheader] == ["No scores yet"]
    assert at.dataframe[0].value.to_dict("records") == [
        {"G norm": "none", "D norm": "none", "optimizer": "adam", "runs": "1 diverged"}
    ]
    at.switch_page("views/gan.py").run()
    assert not at.exception, at.exception
    assert "No FID over training on this board" in infos(at)
    assert "Seed 0 diverged at generator step 2" in " ".join(captions(at))


def test_the_gan_views_never_write(monkeypatch, gan_db, tmp_path):
    db = tmp_path / "readonly.db"
    with sqlite3.connect(gan_db) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
    db.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    before = hashlib.sha256(db.read_bytes()).hexdigest(), os.stat(db).st_mtime_ns
    at = open_page(monkeypatch, db, "gan")
    at.switch_page("views/leaderboard.py").run()
    assert not at.exception, at.exception
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), os.stat(db).st_mtime_ns) == before


def test_board_view_and_captions_on_their_own(gan_db):
    from normbench.leaderboard import Selection
    from normbench.store import readonly_engine

    engine = readonly_engine(f"sqlite:///{gan_db}")
    sel = Selection(SUITE, BUDGET, protocol_version=1)
    assert D.is_gan_board(engine, sel) and D.gan_suites(engine) == [SUITE]
    assert not D.is_gan_board(engine, Selection("cifar10", BUDGET, protocol_version=1))
    board = D.gan_board_view(engine, sel)
    # each pair once per group it has scored seeds in, the unscored pair once
    assert sorted(zip(board.g_norm, board.d_norm, board.score_group, strict=True)) == [
        ("batchnorm", "none", ""),
        ("batchnorm", "spectral_norm", f"{NETWORK} / 2000.0 / 5000.0"),
        ("layernorm", "spectral_norm", f"{NETWORK} / 1000.0 / 5000.0"),
        ("layernorm", "spectral_norm", f"{NETWORK} / 2000.0 / 5000.0"),
        ("none", "none", f"{NETWORK} / 2000.0 / 5000.0"),
    ]
    assert D.score_groups(board) == [
        f"{NETWORK} / 2000.0 / 5000.0", f"{NETWORK} / 1000.0 / 5000.0", ""
    ]  # fmt: skip
    assert D.score_group_caption(f"{NETWORK} / 50000.0 / 50000.0") == (
        "FID/KID in inception-v3-fid features of 50,000 generated vs 50,000 real images; lower "
        "is better."
    )
    assert D.gan_board_view(engine, Selection(SUITE, BUDGET, optimizers=("sgd",),
                                              protocol_version=1)).empty  # fmt: skip
    engine.dispose()


def charts(at: AppTest) -> dict[str, pd.DataFrame]:
    """Each vega-lite chart of the page by its title, with the rows it draws."""
    from test_dashboard_analysis import charts as analysis_charts

    return analysis_charts(at)


def test_the_gan_views_in_a_real_browser(gan_db, tmp_path):
    from test_dashboard_analysis import CHROMIUM, CHROMIUM_ARGS, choose_suite

    if not CHROMIUM.exists():
        skip_or_fail("no Chromium at /usr/bin/chromium (apt-get install chromium chromium-driver)")
    try:
        from playwright import sync_api as playwright
    except ImportError:
        skip_or_fail("playwright is not installed (pip install playwright, or the dev extra)")
    import subprocess
    import sys

    from test_dashboard import free_port, wait_healthy

    shots = Path(os.environ.get("NORMBENCH_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://localhost:{port}"
    command = [sys.executable, "-m", "normbench.cli", "dashboard", f"--db={gan_db}",
               f"--port={port}"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, server)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            # tall enough for the whole page: Streamlit scrolls inside its main block
            page = browser.new_page(viewport={"width": 1400, "height": 2600})
            page.goto(f"{url}/gan")
            page.get_by_role("heading", name="GAN").first.wait_for(timeout=90_000)
            choose_suite(page, SUITE)
            page.get_by_text(f"Suite {SUITE}").first.wait_for(timeout=30_000)
            # the three grids decoded and the chart drawn
            page.wait_for_function(
                "() => [...document.querySelectorAll('[data-testid=\"stImage\"] img')]"
                ".filter(i => i.complete && i.naturalWidth > 0).length >= 3"
                " && document.querySelector('[data-testid=\"stVegaLiteChart\"] .marks')",
                timeout=60_000,
            )
            page.wait_for_timeout(1_000)  # the chart's last frames
            page_text = page.inner_text("body")
            assert "Traceback" not in page_text and "mode collapse" in page_text
            assert page.locator('[data-testid="stException"]').count() == 0
            # the browser gets the grids exactly as the runs stored them
            sources = page.eval_on_selector_all(
                '[data-testid="stImage"] img', "images => images.map(i => i.src)"
            )
            served = [page.request.get(source).body() for source in sources]
            best_first = [("layernorm", "spectral_norm", 0), ("batchnorm", "spectral_norm", 0),
                          ("none", "none", 0)]  # fmt: skip
            assert served == [GRIDS[k] for k in best_first]
            page.screenshot(path=str(shots / "gan.png"), full_page=True)

            # the same session, its suite still chosen
            page.locator('[data-testid="stSidebarNavLink"]').filter(has_text="Leaderboard").click()
            page.get_by_role("heading", name="Leaderboard").wait_for(timeout=30_000)
            page.get_by_text("FID of 2,000 generated vs 5,000 real images").wait_for(timeout=30_000)
            page.locator('[data-testid="stDataFrame"] canvas').nth(2).wait_for(timeout=30_000)
            page.wait_for_timeout(1_000)  # the tables draw into their canvases
            page_text = page.inner_text("body")
            assert "Traceback" not in page_text and "No scores yet" in page_text
            assert "Rank by" not in page_text
            page.screenshot(path=str(shots / "leaderboard-gan.png"), full_page=True)
            browser.close()
        for name in ("gan.png", "leaderboard-gan.png"):
            image = Image.open(shots / name).convert("RGB")
            colours = image.getcolors(maxcolors=1 << 20) or []
            assert image.height >= 2600 and len(colours) > 50, (name, len(colours))
            print(f"screenshot: {shots / name}")
    finally:
        server.terminate()
        server.wait(timeout=30)
