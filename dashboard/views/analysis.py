"""Analysis: why a norm wins. The initialization probes (Lubana et al. 2021: activation growth,
how alike the samples become, gradient norms per convolution) and the landscape probes during
training (Santurkar et al. 2018: loss and gradient change along the gradient, beta-smoothness,
internal covariate shift), each norm read against BatchNorm in a sentence computed from the rows.

Bands span the seeds (min to max) around their mean; diverged runs count with the rows they
stored before they blew up.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import common
from dashboard import data as D
from normbench import metrics as M
from normbench.leaderboard import REFERENCE_NORM, Selection

PROBES_SUITE = "normbench run --suite probes"
LANDSCAPE_SUITE = "normbench run --suite landscape"


# Cached like the other pages' queries (see dashboard/common.py).
@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def probe_runs(url: str, sel: Selection) -> pd.DataFrame:
    return D.probe_runs(common.engine(url), sel)


@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def probe_steps(url: str, sel: Selection, label: str) -> list[int]:
    return D.probe_steps(common.engine(url), sel, label)


@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def probe_profiles(url: str, sel: Selection, label: str, step: int) -> pd.DataFrame:
    return D.probe_profiles(common.engine(url), sel, label, step)


@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def probe_summaries(url: str, sel: Selection, step: int) -> pd.DataFrame:
    return D.probe_summaries(common.engine(url), sel, step)


@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def probe_divergences(url: str, sel: Selection) -> pd.DataFrame:
    return D.probe_divergences(common.engine(url), sel)


@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def landscape(url: str, sel: Selection) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    engine = common.engine(url)
    return (
        D.landscape_curves(engine, sel),
        D.ics_layers(engine, sel),
        D.landscape_summary(engine, sel),
    )


#: Twenty distinct hues (Tableau 10, then ColorBrewer Dark2 and two more): the theme's default
#: shades of two colours make four norms hard to tell apart, and the probes suite has fourteen.
PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
    "#a6761d", "#666666", "#17becf", "#bcbd22",
]  # fmt: skip


def colour(field: str, domain: list[str], legend: bool = True) -> alt.Color:
    """Colour by ``field``, each value of ``domain`` (every norm or run of the section) with the
    same hue on every chart, whichever values a chart has."""
    scale = alt.Scale(domain=domain, range=[PALETTE[i % len(PALETTE)] for i in range(len(domain))])
    if legend:
        return alt.Color(f"{field}:N", title=field, scale=scale)
    return alt.Color(f"{field}:N", scale=scale, legend=None)  # the lines' legend, not the bands'


#: An axis of whole numbers (blocks, layers, steps, depths): integer ticks only.
INDEX_AXIS = alt.Axis(tickMinStep=1, format="d")
STEP_AXIS = alt.X("step:Q", title="training step", axis=INDEX_AXIS)


def y_scale(log: bool) -> alt.Scale:
    return alt.Scale(type="log") if log else alt.Scale(zero=False)


def positive(df: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The rows a log scale can draw (a zero or negative value has no place on it)."""
    return df[(df[columns] > 0).all(axis=1)]


def band_chart(
    df: pd.DataFrame, x: str, x_title: str, y_title: str, title: str, *, domain: list[str],
    color: str = "norm", log: bool = False,
) -> alt.LayerChart:  # fmt: skip
    """The mean over seeds as a line with points, the min-max over seeds as a band. On a log
    scale, values of 0 (a SkipInit gate at zero blocks the gradient into its branch) have no
    place: the subtitle counts the points left off."""
    heading = alt.TitleParams(title)
    if log:
        drawable = positive(df, ["mean", "min", "max"])
        if left_off := len(df) - len(drawable):
            points = "point" if left_off == 1 else "points"
            heading = alt.TitleParams(
                title, subtitle=f"{left_off} {points} at 0 or below left off the log scale"
            )
        df = drawable
    base = alt.Chart(df).encode(x=alt.X(f"{x}:Q", title=x_title, axis=INDEX_AXIS))
    band = base.mark_area(opacity=0.2).encode(
        y=alt.Y("min:Q", title=y_title, scale=y_scale(log)), y2="max:Q",
        color=colour(color, domain, legend=False),
    )  # fmt: skip
    line = base.mark_line(point=True).encode(
        y=alt.Y("mean:Q", scale=y_scale(log)),
        color=colour(color, domain),
        tooltip=[color, x, alt.Tooltip("mean:Q", format=".4g"), alt.Tooltip("min:Q", format=".4g"),
                 alt.Tooltip("max:Q", format=".4g"), alt.Tooltip("n:Q", title="seeds")],
    )  # fmt: skip
    # the bands' colour legend is off: resolved apart, the lines' own legend stays
    return (band + line).resolve_legend(color="independent").properties(title=heading)


def step_label(step: int) -> str:
    return "0 (at initialization)" if step == 0 else f"{step}"


def probe_section(url: str, sel: Selection, runs: pd.DataFrame) -> None:
    labels = sorted(runs.model_label.unique())
    # the model probed most (the first in order among equals) is the one to start from
    most = runs.model_label.value_counts().sort_index().idxmax()
    label = st.selectbox("Model", labels, index=labels.index(most), key="analysis_model")
    steps = probe_steps(url, sel, label) or [0]
    step = steps[0]
    if len(steps) > 1:
        step = st.selectbox(
            "Training step probed", steps, index=steps.index(0) if 0 in steps else 0,
            format_func=step_label, key="analysis_step",
        )  # fmt: skip
    mine = runs[runs.model_label == label]
    st.caption(
        f"{label} at step {step_label(step)}: {len(mine)} probe runs, "
        f"{mine.seed.nunique()} seeds, norms {', '.join(sorted(mine.norm.unique()))}."
    )
    profiles = probe_profiles(url, sel, label, step)
    norms = sorted(runs.norm.unique())  # one hue per norm of the board, on every chart

    def profile(name: str) -> pd.DataFrame:
        return profiles[profiles.name == name]

    st.subheader("Activation variance per block")
    st.altair_chart(
        band_chart(
            profile(M.PROBE_ACT_VAR),
            "layer",
            "block",
            "activation variance",
            f"Activation variance vs block: {label}",
            domain=norms,
            log=True,
        ),
        width="stretch",
    )
    summaries = probe_summaries(url, sel, step).merge(
        runs, left_on="run_id", right_on="id", how="inner"
    )
    growth_vs_depth(runs, summaries, label, norms)

    st.subheader("Sample similarity per block")
    left, right = st.columns(2)
    with left:
        st.altair_chart(
            band_chart(
                profile(M.PROBE_COSINE),
                "layer",
                "block",
                "average cosine similarity",
                "Sample cosine similarity vs block",
                domain=norms,
            ),
            width="stretch",
        )
    with right:
        st.altair_chart(
            band_chart(
                profile(M.PROBE_STABLE_RANK),
                "layer",
                "block",
                "stable rank",
                "Stable rank of the samples' Gram matrix vs block",
                domain=norms,
            ),
            width="stretch",
        )
    st.caption(
        "Samples that look alike (cosine similarity near 1, stable rank near 1) leave the "
        "deeper layers little of the input to tell classes apart."
    )

    st.subheader("Gradient norm per convolution")
    st.altair_chart(
        band_chart(
            profile(M.PROBE_GRAD_NORM),
            "layer",
            "convolution",
            "gradient norm",
            "Gradient norm (dL/d conv output) vs convolution",
            domain=norms,
            log=True,
        ),
        width="stretch",
    )

    diverged = probe_divergences(url, sel)
    diverged = diverged[diverged.model_label == label]
    if not diverged.empty:
        st.subheader("Diverged probes")
        st.dataframe(
            diverged.rename(
                columns={"run_id": "run", "model_label": "model", "block": "non-finite at block"}
            ),
            hide_index=True,
        )

    st.subheader("Against BatchNorm")
    table = probe_table(profiles, summaries[summaries.model_label == label])
    if REFERENCE_NORM not in table.index:
        st.info(
            f"BatchNorm has no probes of {label} at step {step_label(step)} on this board, so "
            "there is nothing to compare against: each norm's own numbers follow."
        )
    readings = D.probe_readings(table)
    st.markdown("\n".join(f"- {r}" for r in readings.values()) or "Only BatchNorm was probed.")


def growth_vs_depth(
    runs: pd.DataFrame, summaries: pd.DataFrame, label: str, norms: list[str]
) -> None:
    """Activation growth against depth across the chosen model's family (the runs whose model
    and arguments other than depth are the chosen model's)."""
    family = runs.loc[runs.model_label == label, "family"].iloc[0]
    growth = summaries[
        (summaries.family == family)
        & summaries.depth.notna()
        & (summaries.name == M.PROBE_ACT_GROWTH)
    ]
    depths = growth.depth.nunique()
    if depths < 2:
        st.caption(
            f"Activation growth vs depth: the board has {depths} depth(s) of {family} probed "
            "(model argument `depth`); it takes two or more."
        )
        return
    by_depth = (
        growth.groupby(["norm", "depth"])
        .value.agg(["mean", "min", "max", "count"])
        .rename(columns={"count": "n"})
        .reset_index()
    )
    by_depth["depth"] = by_depth.depth.astype(int)
    st.altair_chart(
        band_chart(
            by_depth,
            "depth",
            "depth",
            "activation growth (last block / first)",
            f"Activation growth vs depth: {family}",
            domain=norms,
            log=True,
        ),
        width="stretch",
    )


def probe_table(profiles: pd.DataFrame, summaries: pd.DataFrame) -> pd.DataFrame:
    """Per norm, what its reading quotes: growth, blocks, last_cosine, first_grad_norm."""
    means = summaries.groupby(["norm", "name"]).value.mean().unstack()
    act = profiles[profiles.name == M.PROBE_ACT_VAR]
    first_conv = profiles[(profiles.name == M.PROBE_GRAD_NORM) & (profiles.layer == 0)]
    norms = sorted(set(profiles.norm) | set(summaries.norm))
    table = pd.DataFrame(index=pd.Index(norms, name="norm"))
    table["growth"] = means.get(M.PROBE_ACT_GROWTH)
    table["blocks"] = act.groupby("norm").layer.max() + 1
    table["last_cosine"] = means.get(M.PROBE_LAST_COSINE)
    table["first_grad_norm"] = first_conv.set_index("norm")["mean"]
    return table


def landscape_section(curves: pd.DataFrame, ics: pd.DataFrame, summary: pd.DataFrame) -> None:
    curves = curves.assign(run=common.pair_label(curves))
    ics = ics.assign(run=common.pair_label(ics))
    # one hue per run of the board, on every chart
    run_labels = sorted(set(curves.run) | set(ics.run) | set(common.pair_label(summary)))
    st.caption(
        "Along the gradient g at each probed training step, the points w - eta g over the "
        "budget's grid of step sizes: bands span that grid (mean over seeds)."
    )

    def band(low: str, high: str, y_title: str, title: str) -> alt.LayerChart:
        pivot = curves[curves.name.isin([low, high])].pivot_table(
            index=["run", "step"], columns="name", values="mean"
        )
        df = pivot.rename(columns={low: "low", high: "high"}).reset_index()
        base = alt.Chart(df).encode(x=STEP_AXIS)
        area = base.mark_area(opacity=0.25).encode(
            y=alt.Y("low:Q", title=y_title, scale=alt.Scale(zero=False)), y2="high:Q",
            color=colour("run", run_labels, legend=False),
        )  # fmt: skip
        top = base.mark_line(strokeWidth=1).encode(
            y="high:Q", color=colour("run", run_labels),
            tooltip=["run", "step", alt.Tooltip("low:Q", format=".4g"),
                     alt.Tooltip("high:Q", format=".4g")],
        )  # fmt: skip
        bottom = base.mark_line(strokeWidth=1).encode(
            y="low:Q", color=colour("run", run_labels, legend=False)
        )
        layers = area + top + bottom
        return layers.resolve_legend(color="independent").properties(title=title)

    if not curves.empty:
        st.subheader("Loss landscape over training")
        left, right = st.columns(2)
        with left:
            st.altair_chart(
                band(
                    M.LANDSCAPE_LOSS_MIN,
                    M.LANDSCAPE_LOSS_MAX,
                    "loss",
                    "Loss along the gradient (min to max over step sizes)",
                ),
                width="stretch",
            )
        with right:
            st.altair_chart(
                band(
                    M.LANDSCAPE_GRAD_CHANGE_MIN,
                    M.LANDSCAPE_GRAD_CHANGE_MAX,
                    "||grad L(w - eta g) - grad L(w)||",
                    "Gradient change along the gradient (min to max)",
                ),
                width="stretch",
            )
        beta = positive(curves[curves.name == M.LANDSCAPE_BETA], ["mean"])
        st.altair_chart(
            alt.Chart(beta)
            .mark_line(point=True)
            .encode(
                x=STEP_AXIS,
                y=alt.Y("mean:Q", title="effective beta-smoothness", scale=y_scale(True)),
                color=colour("run", run_labels),
                tooltip=[
                    "run",
                    "step",
                    alt.Tooltip("mean:Q", format=".4g"),
                    alt.Tooltip("n:Q", title="seeds"),
                ],
            )
            .properties(title="Effective beta-smoothness over training"),
            width="stretch",
        )

    if not ics.empty:
        st.subheader("Internal covariate shift per layer")
        left, right = st.columns(2)
        for column, name, y_title in (
            (left, M.ICS_L2, "||G - G'|| (l2)"),
            (right, M.ICS_COSINE, "cos(G, G')"),
        ):
            with column:
                st.altair_chart(
                    alt.Chart(ics[ics.name == name])
                    .mark_line(point=True)
                    .encode(
                        x=alt.X("layer:Q", title="weight layer", axis=INDEX_AXIS),
                        y=alt.Y("mean:Q", title=y_title, scale=alt.Scale(zero=False)),
                        color=colour("run", run_labels),
                        tooltip=["run", "layer", alt.Tooltip("mean:Q", format=".4g")],
                    )
                    .properties(title=f"ICS {y_title} per layer, mean over probe steps"),
                    width="stretch",
                )
        st.caption(
            "G: a layer's weight gradient; G': the same after the earlier layers took their "
            "gradient step on the same batch. Cosine near 1 and a small l2: little shift."
        )

    if not summary.empty:
        st.subheader("Whole-run summaries")
        view = pd.DataFrame({
            "run": common.pair_label(summary),
            "seeds": summary.seeds,
            "diverged": summary.diverged,
            "loss range": summary[M.LANDSCAPE_LOSS_RANGE_MEAN],
            "gradient predictiveness": summary[M.LANDSCAPE_GRAD_PRED_MEAN],
            "beta-smoothness": summary[M.LANDSCAPE_BETA_MEAN],
            "ICS l2": summary[M.ICS_L2_MEAN],
            "ICS cosine": summary[M.ICS_COSINE_MEAN],
            "test acc %": 100 * summary[M.ACCURACY],
        })  # fmt: skip
        number = st.column_config.NumberColumn(format="%.4g")
        st.dataframe(
            view,
            hide_index=True,
            key="landscape_summary",
            column_config={c: number for c in view.columns[3:-1]}
            | {"test acc %": st.column_config.NumberColumn(format="%.2f")},
        )
        st.subheader("Against BatchNorm")
        if not (summary.norm == REFERENCE_NORM).any():
            st.info("BatchNorm has no landscape runs on this board: there is nothing to compare.")
        else:
            readings = D.landscape_readings(summary)
            st.markdown(
                "\n".join(f"- {r}" for r in readings.values())
                or "Only BatchNorm has landscape runs."
            )


url, sel = common.db_url(), common.selection()
st.title("Analysis")
st.caption(
    f"Suite **{sel.suite}**, budget **{sel.budget}**, protocol version **{sel.protocol_version}**:"
    " why a norm wins. Finished and diverged runs; lines are means over seeds, bands their range."
)

st.header("Initialization probes")
runs = probe_runs(url, sel)
if runs.empty:
    st.info(
        "No initialization probes on this board. Probe runs (activation growth, sample "
        f"similarity, gradient norms per layer) come from `{PROBES_SUITE}`; then choose that "
        "suite in the sidebar."
    )
else:
    probe_section(url, sel, runs)

st.header("Loss landscape")
curves, ics, summary = landscape(url, sel)
if curves.empty and ics.empty and summary.empty:
    st.info(
        "No landscape probes on this board. Training runs with landscape and internal "
        f"covariate shift probes come from `{LANDSCAPE_SUITE}`; then choose that suite in the "
        "sidebar."
    )
else:
    landscape_section(curves, ics, summary)
