"""The normbench dashboard: a Streamlit app over the results database, read-only.

Start it with ``normbench dashboard [--db URL] [--port N]`` (or ``streamlit run dashboard/app.py``
with ``NORMBENCH_DB`` set). The sidebar picks the suite, budget and filters every page shares. A
database that cannot be read (missing, empty, damaged, at another schema revision, or gone bad
while the app runs) is shown as a message on the page, never as a traceback.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import common
from dashboard.data import DatabaseState
from normbench.errors import NormbenchError

VIEWS = Path(__file__).parent / "views"

st.set_page_config(
    page_title="normbench leaderboard", page_icon=":material/leaderboard:", layout="wide"
)

url, problem = common.safe_db_url()
db_state, message = (DatabaseState.unusable, problem) if url is None else common.state(url)
if db_state is not DatabaseState.ready:
    st.title("normbench leaderboard")
    if db_state is DatabaseState.outdated:
        st.warning(message)
    elif db_state is DatabaseState.unusable:
        st.error(message)
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

pages = [
    st.Page(VIEWS / "leaderboard.py", title="Leaderboard", icon=":material/trophy:", default=True),
    st.Page(VIEWS / "robustness.py", title="Robustness", icon=":material/foggy:"),
    st.Page(VIEWS / "tradeoffs.py", title="Trade-offs", icon=":material/balance:"),
    st.Page(VIEWS / "analysis.py", title="Analysis", icon=":material/insights:"),
    st.Page(VIEWS / "gan.py", title="GAN", icon=":material/palette:"),
    st.Page(VIEWS / "norm.py", title="Norm", icon=":material/science:"),
    st.Page(VIEWS / "run.py", title="Run", icon=":material/show_chart:"),
]
try:
    common.sidebar_selection(url)
    st.sidebar.caption(f"Database: `{message}`")
    if note := common.kept_apart():
        st.info(note)
    st.navigation(pages).run()
except NormbenchError as err:  # the database went bad (damaged, removed) while the app runs
    st.error(str(err))
