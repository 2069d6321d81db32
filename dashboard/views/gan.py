"""GAN: what each generator x discriminator norm pair of a GAN suite draws, and how its FID fell
during training.

The sample grids are the ones finished runs stored (``samples.png``), one seed at a time, with the
run's FID and KID and a badge where its samples collapsed. FID over training comes from the runs'
``fid_progress`` rows, scored with fewer generated images than the final FID: it reads higher
and compares only with itself. Its lines are means over seeds, its bands their range; a diverged
run counts with the points it stored before it blew up.
"""

from __future__ import annotations

import io

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import common
from dashboard import data as D
from normbench import metrics as M
from normbench.leaderboard import Selection

FIRST_LOOK = "normbench run --suite gan-cifar10 --budget smoke"
#: Pairs side by side in the sample grids section.
PER_ROW = 3
#: Ten distinct hues (Tableau 10): a GAN suite crosses three by three norms.
PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
]  # fmt: skip


# Cached like the other pages' queries (see dashboard/common.py).
@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def is_gan_board(url: str, sel: Selection) -> bool:
    return D.is_gan_board(common.engine(url), sel)


@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def gan_suites(url: str) -> list[str]:
    return D.gan_suites(common.engine(url))


@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def gan_runs(url: str, sel: Selection) -> pd.DataFrame:
    return D.gan_runs(common.engine(url), sel)


@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def fid_progress(url: str, sel: Selection) -> pd.DataFrame:
    return D.fid_progress(common.engine(url), sel)


@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def sample_grid(url: str, run_key: str) -> bytes | None:
    return D.gan_sample_grid(common.engine(url), run_key)


def readable_image(data: bytes) -> bool:
    """Whether ``data`` decodes as an image (a damaged artifact gets a caption, not an error)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False
    return True


def counts(values: pd.Series) -> str:
    """Image counts for a sentence: "500", "500 and 1,000"."""
    found = sorted({int(v) for v in values.dropna()})
    return " and ".join(f"{v:,}" for v in found)


def scores(run) -> str:
    """A run's final scores for a caption, with the sample counts behind them."""
    if pd.isna(run[M.GAN_FID]):
        return f"seed {run.seed}: no scores"
    text = f"seed {run.seed}: FID {run[M.GAN_FID]:.1f}"
    if pd.notna(run[M.GAN_KID]):
        text += f", KID {run[M.GAN_KID]:.4f}"
    if pd.notna(run[M.GAN_GEN_SAMPLES]) and pd.notna(run[M.GAN_REAL_SAMPLES]):
        text += (
            f" ({run[M.GAN_GEN_SAMPLES]:,.0f} generated vs "
            f"{run[M.GAN_REAL_SAMPLES]:,.0f} real images)"
        )
    return text


def seed_label(mine: pd.DataFrame):
    """The seed selectbox's label of each seed: its status when it did not finish."""
    status = dict(zip(mine.seed, mine.status, strict=True))
    return lambda seed: f"{seed}" if status[seed] == "finished" else f"{seed} ({status[seed]})"


def show_run(url: str, run) -> None:
    """One run's sample grid captioned with its scores, or a caption saying why there is none."""
    if run.status != "finished":
        where = f" at generator step {run.diverged_step}" if pd.notna(run.diverged_step) else ""
        reason = f": {run.error}" if run.error else ""
        st.caption(f"Seed {run.seed} {run.status}{where}{reason}. No scores, no sample grid.")
        return
    data = sample_grid(url, run.run_key) if run.has_samples else None
    if data is None:
        st.caption(f"{scores(run)}. This run stored no sample grid.")
    elif not readable_image(data):
        st.caption(f"{scores(run)}. Its stored sample grid is not a readable image.")
    else:
        # PNG as stored: "auto" would re-encode an image without alpha as a lossy JPEG
        st.image(data, caption=scores(run), width="stretch", output_format="PNG")


def pair_order(runs: pd.DataFrame) -> list[str]:
    """The pairs, lowest mean FID first (of the sample counts most runs were scored with); pairs
    without such a score last, by name."""
    scored = runs.dropna(subset=[M.GAN_FID])
    fid = pd.Series(dtype=float)
    if not scored.empty:
        protocol = scored.groupby([M.GAN_GEN_SAMPLES, M.GAN_REAL_SAMPLES]).size().idxmax()
        main = scored[
            (scored[M.GAN_GEN_SAMPLES] == protocol[0]) & (scored[M.GAN_REAL_SAMPLES] == protocol[1])
        ]
        fid = main.groupby("pair")[M.GAN_FID].mean()
    pairs = sorted(runs.pair.unique())
    return sorted(pairs, key=lambda p: (fid.get(p, float("inf")), p))


def samples_section(url: str, runs: pd.DataFrame) -> None:
    st.header("Samples")
    st.caption(
        "The sample grid each finished run stored, from the same noise for every run; "
        "pairs with the lowest FID first. Choose the seed where a pair has several."
    )
    pairs = pair_order(runs)
    for start in range(0, len(pairs), PER_ROW):
        for column, pair in zip(st.columns(PER_ROW), pairs[start : start + PER_ROW], strict=False):
            with column:
                mine = runs[runs.pair == pair].sort_values("seed")
                st.markdown(f"**{pair}**")
                seeds = mine.seed.tolist()
                seed = seeds[0]
                if len(seeds) > 1:
                    with_grid = mine.seed[mine.has_samples].tolist()
                    seed = st.selectbox(
                        "Seed", seeds, index=seeds.index(with_grid[0]) if with_grid else 0,
                        format_func=seed_label(mine), key=f"gan_seed:{pair}",
                    )  # fmt: skip
                run = mine[mine.seed == seed].iloc[0]
                show_run(url, run)
                if run[M.GAN_COLLAPSED] == 1:  # under the grid: the grids of a row stay level
                    st.badge("mode collapse", icon=":material/warning:", color="red")


def progress_chart(progress: pd.DataFrame, domain: list[str]) -> alt.LayerChart:
    """FID over generator steps: the mean over seeds as a line with points, the min-max over
    seeds as a band, one colour per pair."""
    scale = alt.Scale(domain=domain, range=[PALETTE[i % len(PALETTE)] for i in range(len(domain))])
    base = alt.Chart(progress).encode(
        x=alt.X("step:Q", title="generator step", axis=alt.Axis(tickMinStep=1, format="d"))
    )
    band = base.mark_area(opacity=0.2).encode(
        y=alt.Y("min:Q", title="FID (lower is better)", scale=alt.Scale(zero=False)),
        y2="max:Q",
        color=alt.Color("pair:N", scale=scale, legend=None),  # the lines' legend, not the bands'
    )
    line = base.mark_line(point=True).encode(
        y="mean:Q",
        color=alt.Color(
            "pair:N", title="pair", scale=scale,
            legend=alt.Legend(labelLimit=0),  # pair names are long: never cut them
        ),
        tooltip=["pair", "step", alt.Tooltip("mean:Q", format=".1f"),
                 alt.Tooltip("min:Q", format=".1f"), alt.Tooltip("max:Q", format=".1f"),
                 alt.Tooltip("n:Q", title="seeds")],
    )  # fmt: skip
    chart = (band + line).resolve_legend(color="independent")
    return chart.properties(title="FID over generator steps", height=320)


def progress_section(runs: pd.DataFrame, progress: pd.DataFrame) -> None:
    st.header("FID over training")
    if progress.empty:
        st.info(
            "No FID over training on this board: its budget scores only at the end "
            "(`fid_every` unset)."
        )
        return
    progress = progress.assign(pair=D.gan_pair_label(progress))
    drawn = set(progress.pair)  # a pair that diverged before its first point has no line
    domain = [p for p in pair_order(runs) if p in drawn]
    st.altair_chart(progress_chart(progress, domain), width="stretch")
    during = counts(runs.progress_samples)
    final = counts(runs[M.GAN_GEN_SAMPLES])
    sizes = f"{during} generated images a point" if during else "fewer generated images"
    versus = f" (the final FID: {final})" if final else ""
    st.caption(
        f"FID during training uses {sizes}{versus}: it reads higher than the final FID and "
        "compares only with itself. Mean over seeds, the band their range; a diverged run counts "
        "with the points before it diverged."
    )


url, sel = common.db_url(), common.selection()
st.title("GAN")
st.caption(
    f"Suite **{sel.suite}**, budget **{sel.budget}**, protocol version **{sel.protocol_version}**:"
    " generator (G) x discriminator (D) norm pairs, their samples and FID over training."
)
if not is_gan_board(url, sel):
    suites = gan_suites(url)
    if suites:
        names = ", ".join(f"`{s}`" for s in suites)
        st.info(
            f"Suite **{sel.suite}** is not a GAN suite. GAN suites with runs: {names}; choose one "
            "in the sidebar."
        )
    else:
        st.info(
            "No GAN runs in this database. A GAN suite trains a generator and a discriminator "
            f"with a norm each and ranks the pairs by FID: `{FIRST_LOOK}` for a first look, then "
            "choose that suite in the sidebar."
        )
    st.stop()

runs = gan_runs(url, sel)
if runs.empty:
    st.info("No runs match these filters. Widen them in the sidebar.")
    st.stop()
runs = runs.assign(pair=D.gan_pair_label(runs))
# A grid's images are a few dozen pixels each: scaled up, they keep their pixels sharp.
st.html("<style>[data-testid='stImage'] img {image-rendering: pixelated;}</style>")
samples_section(url, runs)
progress_section(runs, fid_progress(url, sel))
