"""``normbench export``: a classify suite's board as CSV, JSON, LaTeX or Markdown, with the
protocol it was measured under, for papers and reports.

The board is :func:`normbench.leaderboard.leaderboard` (one protocol version, finished runs,
ranked by one metric with its 95% interval and the tie tests of :mod:`normbench.stats`). Suites
that evaluate corruptions also get the per-corruption table: each row's test accuracy per
corruption, averaged over the five severities and over seeds.

Formats:

- ``csv``: one table, one line per board row; the per-corruption accuracies are extra columns
  ``accuracy:<corruption>``. The metadata comes first as ``# key: value`` comment lines, so
  ``pandas.read_csv(path, comment="#")`` reads the table back (no sidecar file to lose).
- ``json``: ``{"metadata": {...}, "leaderboard": [...], "corruptions": [...]}``.
- ``latex``: booktabs tables (pandas ``Styler.to_latex``) in ``table`` floats, best value per
  column in bold, tied rows marked with a dagger the caption explains; the caption holds the
  protocol and the normbench version. Needs ``\\usepackage{booktabs,graphicx}``.
- ``markdown``: a heading, the protocol, pipe tables (``DataFrame.to_markdown``) and the legend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
from sqlalchemy import Engine, func, select

from normbench import __version__
from normbench import metrics as M
from normbench.corruptions import BENCHMARK, EXTRA
from normbench.errors import NormbenchError
from normbench.leaderboard import (
    LOWER_IS_BETTER,
    SUMMARY_METRICS,
    Selection,
    kept_apart_note,
    leaderboard,
    protocol_versions,
)
from normbench.robustness import CORRUPTION_ACCURACY, EXTRA_ACCURACY, MCE, RELATIVE_MCE
from normbench.stats import ALPHA, TIE_TEST
from normbench.store.models import Metric, Run
from normbench.suites import Suite

FORMATS = ("csv", "json", "latex", "markdown")
INTERVAL = "mean over seeds [95% Student-t confidence interval; none with one seed]"
#: The mark of a row tied with the row above, in LaTeX and in Markdown.
DAGGER_TEX, DAGGER = r"$^{\dagger}$", "†"
#: The board's columns in the human-readable formats, when measured: metric -> (header, scale,
#: decimals). Other summary metrics ending in "accuracy" are shown as percentages after these.
DISPLAY = {
    M.ACCURACY: ("clean acc. %", 100.0, 2),
    CORRUPTION_ACCURACY: ("corruption acc. %", 100.0, 2),
    EXTRA_ACCURACY: ("extra corr. acc. %", 100.0, 2),
    MCE: ("mCE", 1.0, 1),
    RELATIVE_MCE: ("rel. mCE", 1.0, 1),
    M.ECE: ("ECE", 1.0, 3),
    M.SPEED_VS_BN: ("speed vs BN", 1.0, 2),
}


@dataclass(frozen=True)
class Board:
    """What an export writes: the ranked board, the per-corruption accuracies (rows in the
    board's order, one column per corruption; None for a suite without corruptions) and the
    metadata."""

    table: pd.DataFrame
    corruptions: pd.DataFrame | None
    metadata: dict[str, Any]
    keys: list[str]  # the columns naming a row: norm, optimizer (and variant where swept)
    rank_by: str


def default_rank_by(suite: Suite) -> str:
    """The metric a suite's board ranks by unless told: mean corruption accuracy for suites
    that evaluate corruptions, else clean accuracy."""
    return CORRUPTION_ACCURACY if suite.spec.corruption_set else M.ACCURACY


def load_board(
    engine: Engine, suite: Suite, budget: str, rank_by: str | None = None, location: str = ""
) -> Board:
    """The board of ``suite`` at ``budget`` (its current protocol version), ready to render."""
    if suite.spec.task != "classify":
        raise NormbenchError(
            f"Suite {suite.name!r} is a {suite.spec.task} suite; export writes classify boards. "
            f"`normbench leaderboard --suite {suite.name} --format csv` writes its board."
        )
    suite.budget(budget)  # an unknown budget is refused with the suite's budgets
    rank_by = rank_by or default_rank_by(suite)
    if rank_by not in SUMMARY_METRICS:
        raise NormbenchError(
            f"--rank-by {rank_by!r} is not a board metric; choose one of "
            f"{', '.join(SUMMARY_METRICS)}."
        )
    version = suite.spec.protocol_version
    table = leaderboard(engine, suite.name, budget, rank_by=rank_by, protocol_version=version)
    where = f" in {location}" if location else ""
    if table.empty or not table["status"].str.contains("finished").any():
        raise NormbenchError(
            f"No finished runs of suite {suite.name!r} (protocol version {version}) at budget "
            f"{budget!r}{where}: nothing to export. Produce some with "
            f"`normbench run --suite {suite.name} --budget {budget}`."
        )
    if table[f"{rank_by}_mean"].isna().all():
        raise NormbenchError(
            f"No finished run of suite {suite.name!r} at budget {budget!r} has {rank_by!r}; "
            f"rank by a metric the runs measured (--rank-by {default_rank_by(suite)})."
        )
    keys = [k for k in ("norm", "optimizer", "variant") if k in table]
    if "variant" in keys and (table["variant"].fillna("") == "").all():
        keys.remove("variant")  # a suite that sweeps nothing: no variant column
    sel = Selection(suite.name, budget, protocol_version=version)
    corruptions = _corruption_table(engine, sel, table, keys)
    metadata = _metadata(engine, suite, budget, sel, table, keys, rank_by)
    note = kept_apart_note(protocol_versions(engine, suite.name, budget), version)
    if note:
        metadata["kept_apart"] = note
    return Board(table, corruptions, metadata, keys, rank_by)


def _corruption_table(
    engine: Engine, sel: Selection, table: pd.DataFrame, keys: list[str]
) -> pd.DataFrame | None:
    """Test accuracy per corruption, averaged over its severities and the finished seeds; rows
    in the board's order, corruptions in the benchmark's order (then the extra ones)."""
    columns = [getattr(Run, k) for k in keys]
    query = (
        select(*columns, Metric.corruption, func.avg(Metric.value))
        .join(Metric, Metric.run_id == Run.id)
        .where(
            *sel.finished_runs(),
            Metric.name == M.ACCURACY,
            Metric.split == "test",
            Metric.corruption != "",
            Metric.severity > 0,
            Metric.layer == -1,
            Metric.step == -1,
        )
        .group_by(*columns, Metric.corruption)
    )
    with engine.connect() as conn:
        df = pd.DataFrame(conn.execute(query).all(), columns=[*keys, "corruption", "accuracy"])
    if df.empty:
        return None
    wide = df.pivot_table(index=keys, columns="corruption", values="accuracy")
    known = [c for c in (*BENCHMARK, *EXTRA) if c in wide.columns]
    wide = wide[known + sorted(set(wide.columns) - set(known))]
    wide.columns.name = None
    return table[keys].merge(wide.reset_index(), on=keys, how="left")


def _metadata(
    engine: Engine,
    suite: Suite,
    budget: str,
    sel: Selection,
    table: pd.DataFrame,
    keys: list[str],
    rank_by: str,
) -> dict[str, Any]:
    with engine.connect() as conn:
        seeds = sorted(
            conn.execute(select(Run.seed).distinct().where(*sel.finished_runs())).scalars()
        )
    b = suite.budget(budget)
    dataset = b.dataset or suite.spec.dataset
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(b.model_args.items()))
    model = f"{b.model}({args})" if args else b.model
    train = f"{b.train_subset:,}" if b.train_subset else "all"
    test = f"{b.test_subset:,}" if b.test_subset else "all"
    data = f"{dataset} ({train} training images, {test} test images)"
    if suite.spec.corruption_set:
        data += f"; corruptions: {suite.spec.corruption_set}"
    summary = (
        f"{model}, {b.epochs} epochs, batch {b.batch_size}, {b.schedule} schedule, "
        f"{b.precision}; data: {data}; seeds: {', '.join(map(str, seeds)) or 'none finished'}"
    )
    return {
        "suite": suite.name,
        "description": suite.spec.description,
        "budget": budget,
        "protocol_version": suite.spec.protocol_version,
        "protocol": summary,
        "model": model,
        "epochs": b.epochs,
        "batch_size": b.batch_size,
        "data": data,
        "seeds": seeds,
        "normbench_version": __version__,
        "rank_by": rank_by,
        "lower_is_better": rank_by in LOWER_IS_BETTER,
        "interval": INTERVAL,
        "test": TIE_TEST,
        "alpha": ALPHA,
        "n_per_row": {_label(r, keys): int(r["n"]) for r in table.to_dict("records")},
    }


def _label(row: dict, keys: list[str]) -> str:
    return " + ".join(str(row[k]) for k in keys if row[k] not in ("", None))


# --- rendering -------------------------------------------------------------------------------


def render(board: Board, fmt: str) -> str:
    """The board as text in ``fmt`` (one of :data:`FORMATS`)."""
    writers = {"csv": _csv, "json": _json, "latex": _latex, "markdown": _markdown}
    if fmt not in writers:
        raise NormbenchError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    return writers[fmt](board)


def _data_columns(board: Board) -> pd.DataFrame:
    """The machine-readable board: rank, the row's names, n, the ranked metric with its interval
    and test, then ``<metric>_mean``/``_std`` of every summary metric measured on the board."""
    t, r = board.table, board.rank_by
    first = ["rank", *board.keys, "n", f"{r}_mean", f"{r}_ci_low", f"{r}_ci_high", "p_vs_above",
             "tied"]  # fmt: skip
    rest = [
        f"{m}_{s}"
        for m in SUMMARY_METRICS
        if m != r and f"{m}_mean" in t and t[f"{m}_mean"].notna().any()
        for s in ("mean", "std")
    ]
    out = t[first + rest + ["runs", "status"]].copy()
    out["rank"] = out["rank"].astype("Int64")
    return out


def _csv(board: Board) -> str:
    data = _data_columns(board)
    if board.corruptions is not None:
        extra = board.corruptions.drop(columns=board.keys).add_prefix("accuracy:")
        data = pd.concat([data.reset_index(drop=True), extra.reset_index(drop=True)], axis=1)
    lines = []
    for key, value in board.metadata.items():
        text = json.dumps(value) if isinstance(value, dict | list | bool) else str(value)
        lines.append(f"# {key}: {text}")
    return "\n".join(lines) + "\n" + data.to_csv(index=False)


def _json(board: Board) -> str:
    document = {
        "metadata": board.metadata,
        "leaderboard": json.loads(_data_columns(board).to_json(orient="records")),
    }
    if board.corruptions is not None:
        document["corruptions"] = json.loads(board.corruptions.to_json(orient="records"))
    return json.dumps(document, indent=1) + "\n"


def _display(board: Board, mark: str, escape) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The human-readable board (strings) and, aligned with it, each cell's number for finding
    the best per column (NaN where a column has no best: names, n)."""
    t, r = board.table, board.rank_by
    shown: dict[str, list[str]] = {}
    numbers: dict[str, list[float]] = {}
    shown["#"] = [
        ("-" if pd.isna(rank) else f"{int(rank)}") + (mark if tied else "")
        for rank, tied in zip(t["rank"], t["tied"].fillna(False), strict=True)
    ]
    for k in board.keys:
        shown[k] = [escape(str(v)) for v in t[k]]
    metrics = [r] + [m for m in DISPLAY if m != r]
    metrics += [m for m in SUMMARY_METRICS if m.endswith("accuracy") and m not in metrics]
    for m in metrics:
        if f"{m}_mean" not in t or t[f"{m}_mean"].isna().all():
            continue
        header, scale, digits = DISPLAY.get(m, (m.replace("_", " ") + " %", 100.0, 2))
        means = t[f"{m}_mean"]
        if m == r:
            header += " [95% CI]"
            cells = [
                _interval(mean, low, high, scale, digits)
                for mean, low, high in zip(means, t[f"{m}_ci_low"], t[f"{m}_ci_high"], strict=True)
            ]
        else:
            cells = ["-" if pd.isna(v) else f"{v * scale:.{digits}f}" for v in means]
        shown[header] = cells
        # Lower is better: negate, so the best is always the largest number.
        numbers[header] = list(-means if m in LOWER_IS_BETTER else means)
        if m == r:
            shown["n"] = [str(n) for n in t["n"]]
    view = pd.DataFrame(shown)
    best = pd.DataFrame({c: numbers.get(c, [math.nan] * len(view)) for c in view.columns})
    return view, best


def _interval(mean: float, low: float, high: float, scale: float, digits: int) -> str:
    if pd.isna(mean):
        return "-"
    ci = "" if pd.isna(low) else f" [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"
    return f"{mean * scale:.{digits}f}{ci}"


def _corruption_display(board: Board, escape) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per corruption (rows) the accuracy % of each board row (columns)."""
    c = board.corruptions
    names = [escape(_label(row, board.keys)) for row in c[board.keys].to_dict("records")]
    values = c.drop(columns=board.keys).T
    values.columns = names
    shown = values.map(lambda v: "-" if pd.isna(v) else f"{100 * v:.1f}")
    shown.insert(0, "corruption", [escape(str(n)) for n in values.index])
    best = values.copy()
    best.insert(0, "corruption", math.nan)
    return shown.reset_index(drop=True), best.reset_index(drop=True)


def _best_cells(best: pd.DataFrame, axis: int) -> pd.DataFrame:
    """True where a cell holds its column's (axis 0) or row's (axis 1) best number."""
    top = best.max(axis=axis)
    return best.eq(top, axis=1 - axis) & best.notna()


_TEX = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def _tabular(view: pd.DataFrame, bold: pd.DataFrame, align: str) -> str:
    """A booktabs tabular of ``view`` (already escaped), ``bold`` cells in \\textbf."""
    styler = view.style.hide(axis="index")
    css = bold.set_axis(view.columns, axis=1).map(lambda b: "textbf:--rwrap;" if b else "")
    styler = styler.apply(lambda _: css, axis=None)
    styler = styler.format_index(escape="latex", axis=1)
    return styler.to_latex(hrules=True, column_format=align)


def _caption(board: Board, what: str) -> str:
    m = board.metadata
    return (
        f"{what} {_tex(m['suite'])} suite, budget {_tex(m['budget'])} (protocol version "
        f"{m['protocol_version']}): {_tex(m['protocol'])}. "
        f"normbench {_tex(m['normbench_version'])}."
    )


def _latex(board: Board) -> str:
    view, numbers = _display(board, DAGGER_TEX, _tex)
    bold = _best_cells(numbers, axis=0)
    align = "r" + "l" * len(board.keys) + "r" * (len(view.columns) - 1 - len(board.keys))
    m = board.metadata
    legend = (
        f"Ranked by {_tex(m['rank_by'])}: {_tex(INTERVAL)}; best value per column in bold. "
        f"{DAGGER_TEX}: not significantly different from the row above ({_tex(TIE_TEST)})."
    )
    parts = [
        "% normbench export: needs \\usepackage{booktabs,graphicx} in the preamble",
        _float(_tabular(view, bold, align), f"{_caption(board, 'The')} {legend}", "board"),
    ]
    if board.corruptions is not None:
        view, numbers = _corruption_display(board, _tex)
        bold = _best_cells(numbers, axis=1)
        caption = (
            f"{_caption(board, 'Per corruption:')} Test accuracy (\\%) per corruption, mean over "
            "its five severities and the seeds; best per corruption in bold."
        )
        parts.append(_float(_tabular(view, bold, "l" + "r" * (len(view.columns) - 1)), caption,
                            "corruptions"))  # fmt: skip
    return "\n".join(parts)


def _float(tabular: str, caption: str, label: str) -> str:
    """A table float around ``tabular``, shrunk to the line width when it is wider."""
    return (
        "\\begin{table}[htbp]\n\\centering\n"
        f"\\caption{{{caption}}}\n\\label{{tab:normbench-{label}}}\n"
        f"\\resizebox{{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}}{{!}}{{%\n"
        f"{tabular}}}\n\\end{{table}}\n"
    )


def _markdown(board: Board) -> str:
    m = board.metadata
    view, _ = _display(board, f" {DAGGER}", lambda s: s.replace("|", "\\|"))
    lines = [
        f"## {m['suite']} / {m['budget']} (protocol version {m['protocol_version']})",
        "",
        f"Protocol: {m['protocol']}. normbench {m['normbench_version']}.",
        "",
        view.to_markdown(index=False, disable_numparse=True),
        "",
        f"Ranked by {m['rank_by']}: {INTERVAL}. {DAGGER}: not "
        f"significantly different from the row above ({TIE_TEST}).",
    ]
    if "kept_apart" in m:
        lines += ["", m["kept_apart"]]
    if board.corruptions is not None:
        view, _ = _corruption_display(board, lambda s: s.replace("|", "\\|"))
        lines += [
            "",
            "### Test accuracy % per corruption (mean over severities and seeds)",
            "",
            view.to_markdown(index=False, disable_numparse=True),
        ]
    return "\n".join(lines) + "\n"
