"""Robustness: accuracy per norm x corruption (heat map), severity curves, worst corruptions."""

from __future__ import annotations

import altair as alt
import streamlit as st

from dashboard import common

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
