"""Norm page: what a norm is (registry description, family, capability flags, source and its
hash) and all its runs."""

from __future__ import annotations

import streamlit as st

from dashboard import common
from dashboard.data import SUBMISSION_PREFIX

url = common.db_url()
names = common.norms(url)
wanted = st.query_params.get("norm")
index = names.index(wanted) if wanted in names else 0
name = st.selectbox("Norm", names, index=index, key="norm_page")
st.query_params["norm"] = name
st.title(name)

info = common.norm_info(url, name)
if info.registered:
    st.write(info.description)
    flags = ", ".join(info.capabilities) or "none"
    uses_batch = "yes" if "batch_stats" in info.capabilities else "no"
    st.markdown(
        f"- **family**: {info.family or '-'}\n"
        f"- **uses batch statistics**: {uses_batch}\n"
        f"- **capability flags**: {flags}\n"
        f"- **source SHA-256**: `{info.source_sha256 or 'unavailable'}`"
    )
    if info.source:
        label = "Submitted source" if name.startswith(SUBMISSION_PREFIX) else "Source"
        with st.expander(label):
            st.code(info.source, language="python")
else:
    st.warning(f"{name!r} is not registered in this installation; only its stored runs are shown.")

speed = common.norm_speed(url, name)
if not speed.empty:
    st.subheader("Speed")
    st.caption("Training-step throughput (forward + backward, channels_last) in a fixed "
               "network, relative to BatchNorm timed in the same process in interleaved "
               "repetitions: median, and the interquartile range of the pairs' ratios "
               "(`normbench bench norms`).")  # fmt: skip
    st.dataframe(
        speed,
        hide_index=True,
        column_config={
            "images/s": st.column_config.NumberColumn(format="%.0f"),
            "vs BatchNorm": st.column_config.NumberColumn(format="%.2fx"),
            "IQR": st.column_config.NumberColumn(format="%.2f"),
            "memory MB": st.column_config.NumberColumn(format="%.1f"),
        },
    )

st.subheader("Runs")
runs = common.runs(url, norm=name)
runs["accuracy %"] = 100 * runs.accuracy
st.dataframe(
    runs.drop(columns=["accuracy", "norm"]),
    hide_index=True,
    column_config={"accuracy %": st.column_config.NumberColumn(format="%.2f")},
)
st.caption("Open one on the Run page by its id.")
