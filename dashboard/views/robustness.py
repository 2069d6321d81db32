"""Robustness: accuracy per norm x corruption (heat map), severity curves, worst corruptions;
with test-time adaptation, plain and adapted accuracy side by side per severity and corruption."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st
from sqlalchemy import func, select

from dashboard import common
from normbench import metrics as M
from normbench.corruptions import BENCHMARK, EXTRA
from normbench.leaderboard import Selection
from normbench.store.models import Metric, Run

url, sel = common.db_url(), common.selection()
st.title("Robustness")
df = common.corruption_accuracy(url, sel)
if df.empty:
    st.info(
        f"Suite {sel.suite!r} has no corruption results. Run a robustness suite, e.g. "
        "`normbench run --suite cifar-c`."
    )
    st.stop()
df["pair"] = common.pair_label(df)
df["accuracy %"] = 100 * df.accuracy

means = df[df.severity == 0]
st.subheader("Accuracy per corruption (mean over severities 1-5)")
order = list(dict.fromkeys(means.sort_values(["family", "corruption"]).corruption))
heat = (
    alt.Chart(means)
    .mark_rect()
    .encode(
        x=alt.X("corruption:N", sort=order, title=None),
        y=alt.Y("pair:N", title=None),
        color=alt.Color("accuracy %:Q", scale=alt.Scale(scheme="viridis")),
        tooltip=["pair", "corruption", "family", alt.Tooltip("accuracy %:Q", format=".1f"), "n"],
    )
)
text = heat.mark_text(fontSize=10).encode(
    text=alt.Text("accuracy %:Q", format=".0f"),
    color=alt.condition("datum['accuracy %'] > 60", alt.value("black"), alt.value("white")),
)
st.altair_chart(heat + text, width="stretch")

st.subheader("Severity curves")
per_severity = df[df.severity > 0]
corruptions = ["all (mean)", *order]
picked = st.selectbox("Corruption", corruptions, key="severity_corruption")
if picked == "all (mean)":
    curve = per_severity.groupby(["pair", "severity"], as_index=False)["accuracy %"].mean()
else:
    curve = per_severity[per_severity.corruption == picked]
st.altair_chart(
    alt.Chart(curve)
    .mark_line(point=True)
    .encode(
        x=alt.X("severity:O", title="severity"),
        y=alt.Y("accuracy %:Q", scale=alt.Scale(zero=False)),
        color=alt.Color("pair:N", title=None),
        tooltip=["pair", "severity", alt.Tooltip("accuracy %:Q", format=".1f")],
    ),
    width="stretch",
)

st.subheader("Worst corruption per pair")
worst = means.loc[means.groupby("pair")["accuracy %"].idxmin()]
st.dataframe(
    worst[["pair", "corruption", "family", "accuracy %"]].sort_values("accuracy %"),
    hide_index=True,
    column_config={"accuracy %": st.column_config.NumberColumn(format="%.1f")},
)


# --- Test-time adaptation: plain vs adapted accuracy, when the runs have adapted rows -----------
#: The adapted accuracies (normbench.adaptation) beside the plain one, as the page names them.
METHODS = {M.ACCURACY: "plain", M.ACCURACY_BN_ADAPT: "BN-adapt", M.ACCURACY_TENT: "TENT"}


@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def accuracy_by_method(url: str, sel: Selection) -> pd.DataFrame:
    """Mean plain and adapted accuracy per (norm, optimizer, method, corruption, severity) over
    finished seeds; severity 0 is the mean over the five severities."""
    query = (
        select(
            Run.norm,
            Run.optimizer,
            Metric.name,
            Metric.corruption,
            Metric.severity,
            func.avg(Metric.value),
        )
        .join(Metric, Metric.run_id == Run.id)
        .where(
            *sel.finished_runs(),
            Metric.name.in_(METHODS),
            Metric.split == "test",
            Metric.corruption.in_(BENCHMARK + EXTRA),
        )
        .group_by(Run.norm, Run.optimizer, Metric.name, Metric.corruption, Metric.severity)
    )
    with common.engine(url).connect() as conn:
        rows = conn.execute(query).all()
    columns = ["norm", "optimizer", "method", "corruption", "severity", "accuracy"]
    out = pd.DataFrame(rows, columns=columns)
    out["method"] = out.method.map(METHODS)
    return out


by_method = accuracy_by_method(url, sel)
if (by_method.method != "plain").any():
    st.subheader("Test-time adaptation: plain vs adapted accuracy")
    st.caption(
        "BN-adapt: each test batch normalized with its own statistics (Schneider et al. 2020). "
        "TENT: the same, plus one entropy-minimising Adam step per batch on the norms' affine "
        "parameters, each batch predicted before its step, restarted from the trained model "
        "for each corruption and severity (Wang et al. 2021). Plain: eval mode, running "
        "statistics. Pairs without adapted rows show their plain accuracy only."
    )
    by_method["pair"] = common.pair_label(by_method)
    by_method["accuracy %"] = 100 * by_method.accuracy
    methods = [m for m in METHODS.values() if m in set(by_method.method)]
    if picked == "all (mean)":
        severities = by_method[by_method.severity > 0]
        severities = severities.groupby(["pair", "method", "severity"], as_index=False)[
            "accuracy %"
        ].mean()
    else:
        severities = by_method[(by_method.severity > 0) & (by_method.corruption == picked)]
    st.markdown(f"Per severity ({picked}, as picked above)")
    st.altair_chart(
        alt.Chart(severities)
        .mark_line(point=True)
        .encode(
            x=alt.X("severity:O", title="severity"),
            y=alt.Y("accuracy %:Q", scale=alt.Scale(zero=False)),
            color=alt.Color("pair:N", title=None),
            strokeDash=alt.StrokeDash("method:N", sort=methods, title=None),
            tooltip=["pair", "method", "severity", alt.Tooltip("accuracy %:Q", format=".1f")],
        ),
        width="stretch",
    )
    st.markdown("Per corruption (mean over severities 1-5)")
    side = by_method[by_method.severity == 0].pivot_table(
        index=["pair", "corruption"], columns="method", values="accuracy %"
    )
    side = side.reindex(columns=methods).reset_index()
    side.columns.name = None
    for method in methods[1:]:
        side[f"{method} gain"] = side[method] - side["plain"]
    side["corruption"] = pd.Categorical(side.corruption, categories=order, ordered=True)
    st.dataframe(
        side.sort_values(["pair", "corruption"]),
        hide_index=True,
        column_config={c: st.column_config.NumberColumn(format="%.1f") for c in side.columns[2:]},
        key="adaptation_per_corruption",
    )
