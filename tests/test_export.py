"""Board statistics (95% intervals, ties) and ``normbench export`` in its four formats, on real
SQLite databases written through the store as runs write them; the LaTeX compiled by pdflatex."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import skip_or_fail
from helpers import invoke

from normbench.corruptions import BENCHMARK
from normbench.leaderboard import leaderboard
from normbench.metrics import MetricRow
from normbench.stats import holm, mean_ci, paired_test
from normbench.store import RunStatus, open_store

# Accuracy per (norm, seed): batchnorm and groupnorm are close and noisy (tied); layernorm is
# far below groupnorm on every seed (not tied); "none" ran one seed (no interval, not tested).
ACCURACY = {
    "batchnorm": {0: 0.81, 1: 0.78, 2: 0.80},
    "groupnorm": {0: 0.79, 1: 0.80, 2: 0.785},
    "layernorm": {0: 0.60, 1: 0.62, 2: 0.61},
    "none": {0: 0.40},
}
CORRUPTED = {"batchnorm": 0.55, "groupnorm": 0.60, "layernorm": 0.45, "none": 0.30}


def write_board(path: Path, suite: str = "cifar10", version: int = 2) -> Path:
    """A results database holding the runs of :data:`ACCURACY` (suite ``suite``, budget smoke),
    each with clean accuracy and ECE, and per-corruption accuracies at two severities."""
    store = open_store(f"sqlite:///{path}")
    for norm, seeds in ACCURACY.items():
        for seed, accuracy in seeds.items():
            spec = {"suite": suite, "budget": "smoke", "protocol_version": version,
                    "task": "classify", "dataset": "cifar10", "norm": norm, "optimizer": "sgd",
                    "seed": seed, "settings": {"model": "fastnet"}}  # fmt: skip
            key = f"{norm}-{seed}"
            store.begin_run(spec, key, device="cpu", provenance={}, config=spec, reset=True)
            rows = [MetricRow("accuracy", accuracy, "test"), MetricRow("ece", 0.1 - seed / 100)]
            for i, corruption in enumerate(BENCHMARK[:2]):
                for severity in (1, 5):  # mean over severities: CORRUPTED[norm] + i / 10
                    shift = (severity - 3) / 100
                    value = CORRUPTED[norm] + i / 10 + shift
                    rows.append(MetricRow("accuracy", value, "test", corruption, severity))
            store.finish_run(key, status=RunStatus.finished, metrics=rows, curves=[],
                             epochs_done=1)  # fmt: skip
    store.engine.dispose()
    return path


@pytest.fixture
def board_db(tmp_path) -> Path:
    return write_board(tmp_path / "board.db")


def test_the_board_has_intervals_and_holm_corrected_ties(board_db):
    engine = open_store(f"sqlite:///{board_db}", readonly=True).engine
    table = leaderboard(engine, "cifar10", "smoke").set_index("norm")
    assert list(table.index) == ["batchnorm", "groupnorm", "layernorm", "none"]
    for norm, seeds in ACCURACY.items():
        mean, low, high = mean_ci(list(seeds.values()))
        assert table.loc[norm, "accuracy_mean"] == pytest.approx(mean)
        if len(seeds) > 1:
            assert table.loc[norm, "accuracy_ci_low"] == pytest.approx(low)
            assert table.loc[norm, "accuracy_ci_high"] == pytest.approx(high)
    assert math.isnan(table.loc["none", "accuracy_ci_low"])
    raw = [
        paired_test(ACCURACY["batchnorm"], ACCURACY["groupnorm"]),
        paired_test(ACCURACY["groupnorm"], ACCURACY["layernorm"]),
    ]
    expected = holm(raw)  # two tested comparisons; none vs layernorm shares one seed
    assert table.loc["groupnorm", "p_vs_above"] == pytest.approx(expected[0])
    assert table.loc["layernorm", "p_vs_above"] == pytest.approx(expected[1])
    assert pd.isna(table.loc["batchnorm", "tied"])  # nothing above the first row
    assert bool(table.loc["groupnorm", "tied"]) and not bool(table.loc["layernorm", "tied"])
    assert pd.isna(table.loc["none", "tied"]) and pd.isna(table.loc["none", "p_vs_above"])


def test_the_cli_board_shows_intervals_ties_and_no_interval_for_one_seed(board_db):
    result = invoke("leaderboard", "--suite=cifar10", "--budget=smoke", f"--db={board_db}")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    lines = {line.split("│")[2].strip(): line for line in result.output.splitlines()
             if line.count("│") > 4}  # fmt: skip
    _, low, high = mean_ci(list(ACCURACY["batchnorm"].values()))
    assert f"79.67 [{100 * low:.2f}, {100 * high:.2f}] n=3" in lines["batchnorm"]
    assert "2 =" in lines["groupnorm"] and "=" not in lines["layernorm"].split("│")[1]
    assert "40.00 n=1" in lines["none"] and "[" not in lines["none"] and "±" not in lines["none"]
    assert "paired t-test over shared seeds" in text and "Holm-Bonferroni" in text
    assert "1 of 3 adjacent comparisons not tested" in text


def test_the_cli_board_ranks_by_another_metric_with_its_interval(board_db):
    # ECE is 0.1 - seed / 100: every three-seed row has mean 0.09, "none" (seed 0 only) 0.1;
    # lower is better, so "none" goes last and the ECE column comes first with its interval.
    result = invoke("leaderboard", "--suite=cifar10", "--budget=smoke", f"--db={board_db}",
                    "--rank-by=ece", "--format=json")  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["norm"] for r in rows][-1] == "none"
    assert all(r["ece_mean"] == pytest.approx(0.09) for r in rows[:3])
    table = invoke("leaderboard", "--suite=cifar10", "--budget=smoke", f"--db={board_db}",
                   "--rank-by=ece")  # fmt: skip
    assert "ranked by ece" in table.output and "ece [95% CI]" in table.output
    assert "0.09 [0.06516, 0.1148] n=3" in table.output
    for bad, says in (("nope", "is not a board metric"), ("ece", "ranks classify boards")):
        suite = "probes" if bad == "ece" else "cifar10"
        result = invoke("leaderboard", f"--suite={suite}", "--budget=smoke",
                        f"--db={board_db}", f"--rank-by={bad}")  # fmt: skip
        assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output


def test_export_csv_reads_back_with_its_metadata(board_db, tmp_path):
    out = tmp_path / "board.csv"
    result = invoke("export", "--suite=cifar10", "--budget=smoke", f"--db={board_db}",
                    "--format=csv", f"--output={out}")  # fmt: skip
    assert result.exit_code == 0, result.output
    text = out.read_text()
    meta = dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("# "))
    assert meta["suite"] == "cifar10" and meta["budget"] == "smoke"
    assert json.loads(meta["seeds"]) == [0, 1, 2] and "fastnet" in meta["protocol"]
    assert "paired t-test" in meta["test"] and meta["normbench_version"]
    table = pd.read_csv(io.StringIO(text), comment="#")
    assert table.norm.tolist() == ["batchnorm", "groupnorm", "layernorm", "none"]
    assert table.n.tolist() == [3, 3, 3, 1]
    assert table.tied.tolist()[1:3] == [True, False]
    first = f"accuracy:{BENCHMARK[0]}"
    assert table[first].tolist() == pytest.approx(list(CORRUPTED.values()))


def test_export_json_has_metadata_rows_and_corruptions(board_db):
    result = invoke("export", "--suite=cifar10", "--budget=smoke", f"--db={board_db}",
                    "--format=json")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    meta = doc["metadata"]
    assert meta["protocol_version"] == 2 and meta["rank_by"] == "accuracy"
    assert meta["n_per_row"] == {"batchnorm + sgd": 3, "groupnorm + sgd": 3,
                                 "layernorm + sgd": 3, "none + sgd": 1}  # fmt: skip
    assert "Holm-Bonferroni" in meta["test"] and meta["alpha"] == 0.05
    rows = doc["leaderboard"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["accuracy_ci_low"] is None and rows[3]["tied"] is None
    corruptions = {r["norm"]: r for r in doc["corruptions"]}
    assert corruptions["groupnorm"][BENCHMARK[1]] == pytest.approx(0.70)


def test_export_latex_bolds_the_best_and_marks_ties(board_db):
    result = invoke("export", "--suite=cifar10", "--budget=smoke", f"--db={board_db}",
                    "--format=latex")  # fmt: skip
    assert result.exit_code == 0, result.output
    tex = result.stdout
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "\\textbf{79.67 [" in tex  # the best clean accuracy: batchnorm's
    assert "\\textbf{60.0}" in tex  # per corruption: groupnorm's 60% on the first
    assert "2$^{\\dagger}$" in tex and "$^{\\dagger}$: not significantly different" in tex
    assert "normbench 0.1.0" in tex and "seeds: 0, 1, 2" in tex


def test_export_markdown_is_a_pipe_table_with_legend(board_db):
    result = invoke("export", "--suite=cifar10", "--budget=smoke", f"--db={board_db}",
                    "--format=markdown")  # fmt: skip
    assert result.exit_code == 0, result.output
    md = result.stdout
    header = next(line for line in md.splitlines() if line.startswith("| #"))
    assert "clean acc. % [95% CI]" in header and "| n " in header
    assert "| 2 †" in md and "† : not" not in md and "†: not significantly different" in md
    assert "### Test accuracy % per corruption" in md


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--budget=full"], "No finished runs of suite 'cifar10'"),
        (["--format=pdf"], "Invalid value for '--format'"),
        (["--rank-by=accuracyy"], "is not a board metric"),
        (["--suite=probes"], "export writes classify boards"),
        (["--output=/no/such/folder/x.csv"], "does not exist"),
    ],
)
def test_export_errors_exit_2(board_db, args, says):
    base = {"--suite": "--suite=cifar10", "--budget": "--budget=smoke", "--format": "--format=csv"}
    for arg in args:
        base[arg.split("=")[0]] = arg
    result = invoke(
        "export",
        *base.values(),
        f"--db={board_db}",
        *(a for a in args if a.split("=")[0] not in ("--suite", "--budget", "--format")),
    )
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split())


def test_export_of_an_empty_database_exits_2(tmp_path):
    db = tmp_path / "empty.db"
    open_store(f"sqlite:///{db}").engine.dispose()
    result = invoke("export", "--suite=cifar10", "--budget=smoke", f"--db={db}", "--format=json")
    assert result.exit_code == 2 and "nothing to export" in result.output


# --- the LaTeX compiled -----------------------------------------------------------------------


def test_the_exported_latex_compiles(board_db, tmp_path):
    if shutil.which("pdflatex") is None:
        skip_or_fail("pdflatex not on PATH (apt-get install texlive-latex-recommended)")
    result = invoke("export", "--suite=cifar10", "--budget=smoke", f"--db={board_db}",
                    "--format=latex")  # fmt: skip
    assert result.exit_code == 0, result.output
    document = tmp_path / "board.tex"
    document.write_text(
        "\\documentclass{article}\n\\usepackage{booktabs,graphicx}\n\\begin{document}\n"
        f"{result.stdout}\n\\end{{document}}\n"
    )
    done = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", document.name],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "board.pdf").stat().st_size > 1000


# --- the dashboard's board ----------------------------------------------------------------------


def test_the_dashboard_board_shows_intervals_ties_and_the_legend(monkeypatch, board_db):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("NORMBENCH_DB", str(board_db))
    at = AppTest.from_file(str(Path(__file__).parents[1] / "dashboard" / "app.py"),
                           default_timeout=60)  # fmt: skip
    at.run()
    assert not at.exception, at.exception
    at.selectbox(key="ranking").set_value("clean accuracy").run()
    table = at.dataframe[0].value.set_index("norm")
    _, low, high = mean_ci(list(ACCURACY["layernorm"].values()))
    assert table.loc["layernorm", ["95% CI low", "95% CI high"]].tolist() == pytest.approx(
        [100 * low, 100 * high]
    )
    assert pd.isna(table.loc["none", "95% CI low"]) and table.loc["none", "clean acc %"] == "40.00"
    assert table["rank"].tolist() == ["1 🥇", "2 🥈 =", "3 🥉", "4"]
    captions = " ".join(c.value for c in at.caption)
    assert "not significantly different from the row above" in captions
    assert "1 of 3 adjacent comparisons not tested" in captions
    # Ranked by speed, the tests (of accuracy) would compare other neighbours: not shown.
    at.selectbox(key="ranking").set_value("speed vs BatchNorm (side by side)").run()
    assert "95% CI low" not in at.dataframe[0].value
