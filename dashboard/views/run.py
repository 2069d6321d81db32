"""Run page: configuration, provenance, status (with the reason of failed or diverged runs),
training curves and every stored metric."""

from __future__ import annotations

import altair as alt
import streamlit as st

from dashboard import common

url, sel = common.db_url(), common.selection()
runs = common.runs(url, sel=sel)
if runs.empty:
    st.info("No runs match the sidebar filters.")
    st.stop()
labels = {
    int(r.id): f"#{r.id} {r.norm} + {r.optimizer}, seed {r.seed} ({r.status})"
    for r in runs.itertuples()
}
wanted = st.query_params.get("run")
ids = list(labels)
index = ids.index(int(wanted)) if wanted and wanted.isdigit() and int(wanted) in ids else 0
run_id = st.selectbox("Run", ids, index=index, format_func=labels.get, key="run_page")
st.query_params["run"] = str(run_id)
detail = common.run_detail(url, run_id)
run = detail.run

st.title(f"{run['norm']} + {run['optimizer']}, seed {run['seed']}")
st.caption(f"run key `{run['run_key']}` · {run['suite']} / {run['budget']} · {run['model']} on "
           f"{run['dataset']}")  # fmt: skip
status = run["status"]
if status == "finished":
    st.success(f"finished after {run['epochs_done']} epochs on {run['device']}")
elif status == "diverged":
    st.error(f"diverged at step {run['diverged_step']}: {run['error'] or 'non-finite loss'}")
elif status == "failed":
    st.error(f"failed: {run['error']}")
else:
    st.warning(f"{status} after {run['epochs_done']} epochs")

st.subheader("Training curves")
curves = detail.curves
if curves.empty:
    st.write("No curve points were stored for this run.")
else:
    st.altair_chart(
        alt.Chart(curves)
        .mark_line(point=True)
        .encode(
            x="epoch:Q",
            y=alt.Y("value:Q", scale=alt.Scale(zero=False)),
            color=alt.Color("name:N", title=None),
            tooltip=["name", "epoch", alt.Tooltip("value:Q", format=".4f")],
        )
        .facet(facet=alt.Facet("name:N", title=None), columns=3)
        .resolve_scale(y="independent"),
    )

left, right = st.columns(2)
with left:
    st.subheader("Configuration")
    st.json(run["config"], expanded=False)
with right:
    st.subheader("Provenance")
    st.json(run["provenance"], expanded=False)

st.subheader("Metrics")
st.dataframe(detail.metrics, hide_index=True)
