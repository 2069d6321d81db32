"""What every dashboard page shares: the database URL, the cached read-only queries and the
sidebar selection (suite, budget, dataset, model, optimizer). Pages show the newest protocol
version of the chosen suite and budget; runs of older versions are counted, never mixed in."""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from dashboard import data as D
from normbench import config
from normbench.errors import NormbenchError
from normbench.leaderboard import Selection, kept_apart_note

#: Seconds a query result is reused; a running suite shows up on the next refresh after this.
CACHE_SECONDS = 30


def db_url() -> str:
    """``NORMBENCH_DB`` (set by ``normbench dashboard --db``) or the default results database."""
    return config.db_url(os.environ.get("NORMBENCH_DB"), create_parent=False)


def safe_db_url() -> tuple[str | None, str]:
    """(the URL, "") or (None, why ``NORMBENCH_DB`` cannot be used)."""
    try:
        return db_url(), ""
    except NormbenchError as err:
        return None, str(err)


@st.cache_resource(show_spinner=False)
def engine(url: str):
    return D.readonly_engine(url)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def state(url: str) -> tuple[D.DatabaseState, str]:
    try:
        checked = engine(url)  # opening checks the file and its schema revision
    except Exception as err:  # noqa: BLE001 - shown on the page, not as a traceback
        return D.error_state(err)
    return D.database_state(checked)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def choices(url: str) -> pd.DataFrame:
    return D.choices(engine(url))


@st.cache_data(ttl=CACHE_SECONDS, show_spinner="Ranking...")
def leaderboard(url: str, sel: Selection, ranking: str) -> pd.DataFrame:
    return D.leaderboard_view(engine(url), sel, ranking)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def corruption_accuracy(url: str, sel: Selection) -> pd.DataFrame:
    return D.corruption_accuracy(engine(url), sel)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def has_corruption_results(url: str, sel: Selection) -> bool:
    return D.has_corruption_results(engine(url), sel)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def runs(url: str, norm: str | None = None, sel: Selection | None = None) -> pd.DataFrame:
    return D.runs(engine(url), norm=norm, sel=sel)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def norms(url: str) -> list[str]:
    return D.norms(engine(url))


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def run_detail(url: str, run_id: int) -> D.RunDetail | None:
    return D.run_detail(engine(url), run_id)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def two_pass(url: str, run_id: int) -> D.TwoPass | None:
    detail = run_detail(url, run_id)
    return None if detail is None else D.two_pass(engine(url), detail)


def sidebar_selection(url: str) -> Selection:
    """The sidebar filters; every page reads the same selection."""
    options = choices(url)
    st.sidebar.header("Results")
    suites = sorted(options.suite.unique())
    default = suites.index("cifar-c") if "cifar-c" in suites else 0
    suite = st.sidebar.selectbox("Suite", suites, index=default, key="suite")
    options = options[options.suite == suite]
    budgets = sorted(options.budget.unique())
    budget = st.sidebar.selectbox("Budget", budgets, key="budget")
    options = options[options.budget == budget]
    versions = options.groupby("protocol_version").runs.sum().to_dict()
    version = int(max(versions))
    st.session_state["kept_apart"] = kept_apart_note(versions, version)
    st.sidebar.caption(f"Protocol version {version}")
    options = options[options.protocol_version == version]

    def narrow(label: str, column: str) -> tuple[str, ...]:
        values = sorted(options[column].unique())
        picked = st.sidebar.multiselect(label, values, key=column, placeholder="all")
        return tuple(picked)

    sel = Selection(
        suite,
        budget,
        datasets=narrow("Dataset", "dataset"),
        models=narrow("Model", "model"),
        optimizers=narrow("Optimizer", "optimizer"),
        protocol_version=version,
    )
    st.session_state["selection"] = sel
    return sel


def selection() -> Selection:
    return st.session_state["selection"]


def kept_apart() -> str | None:
    """The sentence about runs of other protocol versions left off these pages, if any."""
    return st.session_state.get("kept_apart")


def pair_label(df: pd.DataFrame) -> pd.Series:
    """``norm + optimizer``, with the variant in parentheses where a suite sweeps one."""
    label = df.norm + " + " + df.optimizer
    if "variant" in df:
        variant = df.variant.fillna("")
        label = label + variant.map(lambda v: f" ({v})" if v else "")
    return label


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def batch_size_accuracy(url: str, sel: Selection) -> pd.DataFrame:
    """Test accuracy per norm, optimizer, other variant and training batch size (see
    ``normbench.leaderboard.batch_size_accuracy``), for the sidebar's optimizers."""
    from normbench.leaderboard import batch_size_accuracy as query

    table = query(engine(url), sel.suite, sel.budget, protocol_version=sel.protocol_version)
    if sel.optimizers:
        table = table[table.optimizer.isin(sel.optimizers)]
    return table.reset_index(drop=True)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def norm_info(url: str, name: str) -> D.NormInfo:
    return D.norm_info(name, engine(url))


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def norm_speed(url: str, name: str) -> pd.DataFrame:
    return D.norm_speed(engine(url), name)
