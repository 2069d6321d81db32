"""Leaderboard: norm x optimizer pairs ranked by a chosen metric, mean ± std over seeds. A GAN
suite's board instead ranks generator x discriminator norm pairs by FID, one table per score
protocol (feature network and sample counts): FIDs of other counts are never ranked together."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import common
from dashboard import data as D
from dashboard.data import RANKINGS
from normbench import metrics as M
from normbench.leaderboard import Selection, tie_legend

MEDALS = {1: "🥇", 2: "🥈", 3: "🥉"}

url, sel = common.db_url(), common.selection()
st.title("Leaderboard")
st.caption(
    f"Suite **{sel.suite}**, budget **{sel.budget}**, protocol version **{sel.protocol_version}**:"
    " finished runs, mean ± std over seeds."
)


@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner=False)
def is_gan_board(url: str, sel: Selection) -> bool:
    return D.is_gan_board(common.engine(url), sel)


@st.cache_data(ttl=common.CACHE_SECONDS, show_spinner="Ranking...")
def gan_board(url: str, sel: Selection) -> pd.DataFrame:
    return D.gan_board_view(common.engine(url), sel)


def mean_std_of(table: pd.DataFrame, metric: str, scale: float, digits: int) -> pd.Series:
    """``<metric>_mean`` ± ``<metric>_std`` of ``table`` as text ("-" where not measured)."""
    mean = table.get(f"{metric}_mean", pd.Series(float("nan"), index=table.index)) * scale
    std = table.get(f"{metric}_std", pd.Series(float("nan"), index=table.index)) * scale
    return pd.Series(
        [
            "-" if pd.isna(m) else f"{m:.{digits}f}" + ("" if pd.isna(s) else f" ± {s:.{digits}f}")
            for m, s in zip(mean, std, strict=True)
        ],
        index=table.index,
    )


def rank_label(rank) -> str:
    return f"{int(rank)} {MEDALS.get(int(rank), '')}".strip() if pd.notna(rank) else "-"


def show_gan_board(table: pd.DataFrame) -> None:
    """One table per score group (the caption says which scores), pairs without scores last."""
    st.caption(
        "Generator (G) x discriminator (D) norm pairs ranked by FID, lower is better. Only scores "
        "of the same feature network and sample counts are ranked together. Sample grids and "
        "FID over training: the GAN page."
    )
    for group in D.score_groups(table):
        rows = table[table.score_group == group]
        st.subheader(D.score_group_title(group))
        st.caption(D.score_group_caption(group))
        view = pd.DataFrame({"rank": rows["rank"].map(rank_label)}) if group else pd.DataFrame()
        view["G norm"] = rows.g_norm
        view["D norm"] = rows.d_norm
        view["optimizer"] = rows.optimizer
        if group:
            view["FID"] = mean_std_of(rows, M.GAN_FID, 1.0, 1)
            view["KID"] = mean_std_of(rows, M.GAN_KID, 1.0, 4)
            view["sample diversity"] = mean_std_of(rows, M.GAN_DIVERSITY, 1.0, 3)
            view["collapsed seeds"] = rows.collapsed
            view["n"] = rows.n
        view["runs"] = rows.status
        st.dataframe(
            view,
            hide_index=True,
            width="stretch",
            key=f"gan_board:{group}",
            column_config={
                "FID": st.column_config.TextColumn(
                    help="Fréchet inception distance, mean ± std over seeds; lower is better."
                ),
                "KID": st.column_config.TextColumn(
                    help="Kernel inception distance (unbiased MMD², cubic kernel), mean ± std "
                    "over seeds; lower is better."
                ),
                "sample diversity": st.column_config.TextColumn(
                    help="Mean pairwise distance between generated images; near 0: collapse."
                ),
                "collapsed seeds": st.column_config.NumberColumn(
                    help="Seeds whose samples collapsed (diversity under the threshold)."
                ),
                "n": st.column_config.NumberColumn(help="finished seeds behind the mean"),
                "runs": st.column_config.TextColumn(help="every run of the pair on this board"),
            },
        )
    st.download_button(
        "Download CSV",
        table.to_csv(index=False).encode(),
        file_name=f"normbench-{sel.suite}-{sel.budget}.csv",
        mime="text/csv",
    )


if is_gan_board(url, sel):
    board = gan_board(url, sel)
    if board.empty:
        st.info("No runs match these filters. Widen them in the sidebar.")
    else:
        show_gan_board(board)
    st.stop()

rankings = list(RANKINGS)
robust = common.has_corruption_results(url, sel)
ranking = st.selectbox(
    "Rank by", rankings, index=1 if robust else 0, key="ranking",
    help="mCE and relative mCE: lower is better (100 = the suite's reference pair).",
)  # fmt: skip
table = common.leaderboard(url, sel, ranking)
if table.empty:
    st.info("No runs match these filters. Widen them in the sidebar.")
    st.stop()


def mean_std(metric: str, scale: float = 100.0, digits: int = 2) -> pd.Series:
    return mean_std_of(table, metric, scale, digits)


ranked = table[table["rank"].notna()]
podium = [
    f"{MEDALS[int(r['rank'])]} **{r['norm']}** + {r['optimizer']}"
    + (f" ({r['variant']})" if r.get("variant") else "")
    for _, r in ranked.head(3).iterrows()
]
if podium:
    st.markdown(" &nbsp; ".join(podium))

view = pd.DataFrame(
    {
        "rank": table["rank"].map(rank_label),
        "norm": table.norm + table.submission.map({True: " (submission)", False: ""}),
        "optimizer": table.optimizer,
        "clean acc %": mean_std("accuracy"),
    }
)
# Only a suite that sweeps a setting within a pair (label noise, batch size) has variants.
if "variant" in table and (table.variant.fillna("") != "").any():
    view.insert(3, "variant", table.variant)
if robust:
    view["corruption acc %"] = mean_std("corruption_accuracy")
    view["mCE"] = table.get("mce_mean")
    view["rel. mCE"] = table.get("relative_mce_mean")
    view["worst corruption"] = table.get("worst_corruption")
# Only boards of suites with the adversarial option get the attack columns.
if table.get(f"{M.PGD_ACCURACY}_mean", pd.Series(dtype=float)).notna().any():
    view["adv. subset clean %"] = mean_std(M.ADV_CLEAN_ACCURACY)
    view["FGSM acc %"] = mean_std(M.FGSM_ACCURACY)
    view["PGD acc %"] = mean_std(M.PGD_ACCURACY)
    st.caption(
        "FGSM / PGD acc %: accuracy under white-box L-infinity attacks in pixel space, the model "
        "in eval mode, on a fixed subset of the test images (adv. subset clean %: the same "
        "images unattacked); eps, steps and subset size are on each run's page. A cheap "
        "indicator of robustness, not an AutoAttack evaluation."
    )
view["speed vs BN"] = table.speed_vs_batchnorm_mean
view["speed IQR"] = table.get("speed_vs_batchnorm_iqr_mean")
# Only boards with a two-pass optimizer (sam...) get its cost; other boards look as they did.
two_pass = table.get(f"{M.SPEED_VS_BASE_OPTIMIZER}_mean", pd.Series(dtype=float))
if two_pass.notna().any():
    view["train speed vs base optimizer"] = two_pass
    view["vs base IQR"] = table.get(f"{M.SPEED_VS_BASE_OPTIMIZER_IQR}_mean")
    st.caption(
        "train speed vs base optimizer: a two-pass optimizer (sam...) timed against its base "
        "optimizer (sgd, adamw) on the run's model in the run's process, in interleaved "
        "repetitions (median), mean over seeds; about 0.5x, the second forward/backward pass."
    )
view["own images/s"] = table.train_images_per_s_mean
view["params vs BN"] = table.param_overhead
view["seeds"] = table.n
# The ranked metric's 95% interval over seeds and the tie tests against the row above
# (normbench.stats); a board ranked by speed has neither: the tests compare the ranked metric.
ranked_metric = RANKINGS[ranking][0].removesuffix("_mean")
if f"{ranked_metric}_ci_low" in table:
    scale = 100.0 if ranked_metric.endswith("accuracy") else 1.0
    header = {"accuracy": "clean acc %", "corruption_accuracy": "corruption acc %",
              "mce": "mCE", "relative_mce": "rel. mCE"}.get(ranked_metric)  # fmt: skip
    at = view.columns.get_loc(header) + 1 if header in view else len(view.columns)
    view.insert(at, "95% CI low", table[f"{ranked_metric}_ci_low"] * scale)
    view.insert(at + 1, "95% CI high", table[f"{ranked_metric}_ci_high"] * scale)
    view["rank"] += table.tied.fillna(False).map({True: " =", False: ""})
    st.caption(tie_legend(table) + " 95% CI: Student-t interval of the mean over seeds.")
view["runs"] = table.status
st.dataframe(
    view,
    hide_index=True,
    width="stretch",
    column_config={
        "mCE": st.column_config.NumberColumn(format="%.1f"),
        "rel. mCE": st.column_config.NumberColumn(format="%.1f"),
        "speed vs BN": st.column_config.NumberColumn(
            format="%.2fx",
            help="Training-step images/s relative to BatchNorm: each run's model timed against "
            "the same model with BatchNorm in its own process, in interleaved repetitions "
            "(median), mean over seeds. Independent of what else the machine was doing.",
        ),
        "speed IQR": st.column_config.NumberColumn(
            format="%.2f", help="Interquartile range of the interleaved pairs' ratios."
        ),
        "train speed vs base optimizer": st.column_config.NumberColumn(
            format="%.2fx",
            help="Training images/s with the two-pass optimizer relative to its base optimizer: "
            "the same model timed both ways side by side in the run's process (median of "
            "interleaved repetitions), mean over seeds. Empty for single-pass optimizers.",
        ),
        "vs base IQR": st.column_config.NumberColumn(
            format="%.2f", help="Interquartile range of the interleaved pairs' ratios."
        ),
        "own images/s": st.column_config.NumberColumn(
            format="%.0f",
            help="Own throughput, images/s, measured during training: a property of each run "
            "that depends on the machine's load at the time; not a comparison between norms.",
        ),
        "params vs BN": st.column_config.NumberColumn(format="percent"),
        "seeds": st.column_config.NumberColumn(help="finished seeds behind the mean"),
        "95% CI low": st.column_config.NumberColumn(
            format="%.2f", help="Ranked metric: 95% Student-t interval over seeds (none with one)."
        ),
        "95% CI high": st.column_config.NumberColumn(format="%.2f"),
    },
)
st.download_button(
    "Download CSV",
    table.to_csv(index=False).encode(),
    file_name=f"normbench-{sel.suite}-{sel.budget}.csv",
    mime="text/csv",
)
if table.submission.any():
    st.caption("(submission): added with `normbench submit`; its source is on the Norm page.")
