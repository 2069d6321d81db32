"""The normbench dashboard: a Streamlit app over the results database, read-only.

Start it with ``normbench dashboard [--db URL] [--port N]`` (or ``streamlit run dashboard/app.py``
with ``NORMBENCH_DB`` set). The sidebar picks the suite, budget and filters every page shares.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import common
from dashboard.data import DatabaseState

VIEWS = Path(__file__).parent / "views"

st.set_page_config(
    page_title="normbench leaderboard", page_icon=":material/leaderboard:", layout="wide"
)

url = common.db_url()
db_state, message = common.state(url)
if db_state is not DatabaseState.ready:
    st.title("normbench leaderboard")
    if db_state is DatabaseState.outdated:
        st.warning(message)
    else:
        st.info(message)
        st.markdown(
            "Produce results with a suite run, then reload this page:\n\n"
            "```bash\n"
            "normbench run --suite cifar-c           # train + corruption robustness\n"
            "normbench run --suite cifar10 --budget smoke   # a quick first look\n"
            "```\n\n"
            "`normbench list suites` shows the suites; `normbench dashboard --db PATH` opens "
            "another results database."
        )
    st.stop()

common.sidebar_selection(url)
st.sidebar.caption(f"Database: `{message}`")
if note := common.kept_apart():
    st.info(note)

pages = [
    st.Page(VIEWS / "leaderboard.py", title="Leaderboard", icon=":material/trophy:", default=True),
    st.Page(VIEWS / "robustness.py", title="Robustness", icon=":material/foggy:"),
    st.Page(VIEWS / "tradeoffs.py", title="Trade-offs", icon=":material/balance:"),
    st.Page(VIEWS / "norm.py", title="Norm", icon=":material/science:"),
    st.Page(VIEWS / "run.py", title="Run", icon=":material/show_chart:"),
]
st.navigation(pages).run()
