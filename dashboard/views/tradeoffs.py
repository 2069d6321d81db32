"""Trade-offs: accuracy vs training batch size (suites that sweep it), clean vs corruption
accuracy, accuracy vs speed (Pareto front), accuracy vs parameter overhead."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import common
from dashboard.data import pareto_front
from normbench import metrics as M

url, sel = common.db_url(), common.selection()
st.title("Trade-offs")
table = common.leaderboard(url, sel, "clean accuracy")
if table.empty:
    st.info("No runs match these filters. Widen them in the sidebar.")
    st.stop()
table["pair"] = common.pair_label(table)
table["clean acc %"] = 100 * table.accuracy_mean
tooltip = ["pair", alt.Tooltip("clean acc %:Q", format=".2f")]

by_batch = common.batch_size_accuracy(url, sel)
by_batch = by_batch[by_batch["mean"].notna()]
if by_batch.batch_size.nunique() > 1:
    st.subheader("Accuracy vs training batch size")
    st.caption(
        "Each batch size trained with the learning rate scaled linearly (lr x size / the budget's "
        "batch size), evaluated in eval mode: BatchNorm uses the running statistics it gathered "
        "from its training batches, which at very small batches no longer match. Mean over "
        "finished seeds; the batch size on a log2 axis."
    )
    by_batch = by_batch.assign(
        **{"accuracy %": 100 * by_batch["mean"], "line": common.pair_label(by_batch)}
    )
    # One line per norm; the pair (and any other variant) only where there is more than one.
    color = "norm:N" if by_batch.line.nunique() == by_batch.norm.nunique() else "line:N"
    sizes = sorted(int(b) for b in by_batch.batch_size.unique())
    st.altair_chart(
        alt.Chart(by_batch, title="Test accuracy vs batch size")
        .mark_line(point=True)
        .encode(
            x=alt.X(
                "batch_size:Q", title="training batch size",
                scale=alt.Scale(type="log", base=2), axis=alt.Axis(values=sizes),
            ),
            y=alt.Y("accuracy %:Q", title="test accuracy %", scale=alt.Scale(zero=False)),
            color=alt.Color(color, title="norm"),
            tooltip=["line", "batch_size:Q", alt.Tooltip("accuracy %:Q", format=".2f"), "n:Q"],
        ),  # fmt: skip
        width="stretch",
    )


def scatter(data, x: str, y: str, x_title: str, extra_tooltip=(), **encode):
    return (
        alt.Chart(data)
        .mark_circle(size=120)
        .encode(
            x=alt.X(x, title=x_title, scale=alt.Scale(zero=False)),
            y=alt.Y(y, title="clean accuracy %", scale=alt.Scale(zero=False)),
            tooltip=[*tooltip, *extra_tooltip],
            **encode,
        )
    )


if "corruption_accuracy_mean" in table and table.corruption_accuracy_mean.notna().any():
    st.subheader("Clean vs corruption accuracy")
    table["corruption acc %"] = 100 * table.corruption_accuracy_mean
    st.altair_chart(
        scatter(
            table,
            "corruption acc %:Q",
            "clean acc %:Q",
            "mean corruption accuracy %",
            [alt.Tooltip("corruption acc %:Q", format=".2f")],
            color="optimizer:N",
        ),  # fmt: skip
        width="stretch",
    )

st.subheader("Accuracy vs training speed")
st.caption(
    "Speed: training-step images/s relative to BatchNorm, each run's model timed side by side "
    "with the same model with BatchNorm in one process (interleaved repetitions, median; mean "
    "over seeds). The Pareto front (nothing is both faster and more accurate) is joined by a line."
)
table["speed vs BN"] = table[f"{M.SPEED_VS_BN}_mean"]
second_pass = table.get(f"{M.SPEED_VS_BASE_OPTIMIZER}_mean", pd.Series(dtype=float))
if second_pass.notna().any():
    # A two-pass optimizer's step costs its norm's step twice: the norm's ratio times the run's
    # side-by-side ratio to its base optimizer puts it where its cost is.
    table["speed vs BN"] *= second_pass.reindex(table.index).fillna(1.0)
    st.caption(
        "For a two-pass optimizer (sam, sam_on...) the norm's ratio is multiplied by the run's "
        "own side-by-side ratio to its base optimizer (about 0.5: a two-pass optimizer's second "
        "pass), so a SAM run sits where its cost puts it, against BatchNorm with a single-pass "
        "optimizer."
    )
table["pareto"] = pareto_front(table, "speed vs BN", "clean acc %")
points = scatter(
    table, "speed vs BN:Q", "clean acc %:Q", "training speed vs BatchNorm (side by side)",
    [alt.Tooltip("speed vs BN:Q", format=".2f")],
    color=alt.Color("pareto:N", title="Pareto front", scale=alt.Scale(range=["#bbb", "#d62728"])),
)  # fmt: skip
front = (
    alt.Chart(table[table.pareto].sort_values("speed vs BN"))
    .mark_line(color="#d62728")
    .encode(x="speed vs BN:Q", y="clean acc %:Q")
)
st.altair_chart(points + front, width="stretch")

st.subheader("Accuracy vs parameter overhead")
table["params vs BN %"] = 100 * table.param_overhead
st.altair_chart(
    scatter(
        table,
        "params vs BN %:Q",
        "clean acc %:Q",
        "parameters vs BatchNorm (%)",
        [alt.Tooltip("params vs BN %:Q", format=".2f")],
        color="optimizer:N",
    ),  # fmt: skip
    width="stretch",
)
