"""Run page: configuration, provenance, status (with the reason of failed or diverged runs), what
a two-pass optimizer's second pass changed and cost, training curves and every stored metric."""

from __future__ import annotations

import altair as alt
import streamlit as st

from dashboard import common
from dashboard.data import TwoPass

NOT_MEASURED = "not measured"
#: What each ``second_pass_stats`` mode does to batch-statistics norms' running statistics.
STATS_MODES = {
    "update": "update (the perturbed pass also moves the running statistics)",
    "freeze": "freeze (the running statistics see only the unperturbed weights)",
}


def number(value: float | int | None, spec: str, missing: str = NOT_MEASURED) -> str:
    return missing if value is None else format(value, spec)


def percent(fraction: float | None) -> str:
    return NOT_MEASURED if fraction is None else f"{100 * fraction:.2f}%"


def two_pass_facts(tp: TwoPass) -> str:
    """The section's bullet points; every missing piece says so."""
    base = tp.base or "the base optimizer"
    rho = number(tp.rho, "g", "not recorded") + (", adaptive (ASAM)" if tp.adaptive else "")
    share = number(tp.perturbed_parameters, ",", "count not recorded") + " parameters"
    if tp.perturbed_fraction is not None:
        share += f", {100 * tp.perturbed_fraction:.3g}% of the trainable ones"
    if tp.speed is None:
        why = (tp.speed_note or "").removeprefix(f"{NOT_MEASURED}: ")  # as the runner words it
        cost = NOT_MEASURED + (f" ({why})" if why else "")
    else:
        iqr = "" if tp.speed_iqr is None else f"IQR {tp.speed_iqr:.2f}; "
        cost = f"trains at {tp.speed:.2f}x the rate of {base} ({iqr}side by side in this run's "
        cost += "process)"
    stats = STATS_MODES.get(tp.second_pass_stats, tp.second_pass_stats or "not recorded")
    return (
        f"- **base optimizer**: {tp.base or 'not recorded'}\n"
        f"- **rho**: {rho}\n"
        f"- **perturbed**: {tp.perturbed or 'not recorded'} ({share})\n"
        f"- **second pass, running statistics**: {stats}\n"
        f"- **cost**: {cost}"
    )


def base_comparison(tp: TwoPass) -> str:
    """This run against the finished run of its base optimizer, if there is one."""
    if tp.base_run is None:
        return (f"- **{tp.base or 'base optimizer'} run**: {NOT_MEASURED} (no finished run of "
                "this suite, budget, dataset, model, norm and seed)")  # fmt: skip
    other = tp.base_run
    speeds = f"{number(tp.images_per_s, ',.0f')} images/s here, "
    speeds += f"{number(other.images_per_s, ',.0f')} in run #{other.id}"
    if tp.images_per_s and other.images_per_s:
        speeds += f" ({tp.images_per_s / other.images_per_s:.2f}x)"
    return (
        f"- **{tp.base} run**: #{other.id}, clean accuracy {percent(other.accuracy)} "
        f"(this run: {percent(tp.accuracy)})\n"
        f"- **own throughput, measured in different runs (noisy)**: {speeds}"
    )


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

if (tp := common.two_pass(url, run_id)) is not None:
    st.subheader("Two passes per step")
    st.markdown(two_pass_facts(tp) + "\n" + base_comparison(tp))
    if tp.base_run is not None and tp.base_run.id in labels:
        st.button(f"Open run #{tp.base_run.id}", key="open_base_run",
                  on_click=lambda: st.session_state.update(run_page=tp.base_run.id))  # fmt: skip

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
