"""``normbench check`` / ``normbench submit`` and norms from entry points.

The worked example goes from ``normbench submit`` to a leaderboard row; every kind of bad
submission is rejected with its reason, and the database is left byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO
from helpers import invoke, leaderboard_json, tiny_suite

from normbench.contract import check_norm, load_class
from normbench.norms import NORMS
from normbench.store import open_store

EXAMPLE = REPO / "examples" / "channel_layernorm.py"
#: BatchNorm with the test batch's statistics in eval mode: breaks only the batch-independence rule.
ADAPTS_TO_ITS_BATCH = REPO / "tests" / "fixtures" / "batch_stats_in_eval.py"
EVAL_RULE = "eval output of a sample does not depend on its batch"
HEADER = "import torch\nfrom torch import nn\n\n\n"


def norm_file(tmp_path: Path, body: str, name: str = "bad.py") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + textwrap.dedent(body))
    return path


BAD = {
    "does not import": ("import no_such_module_anywhere\n", "does not import"),
    "raises in __init__": (
        """
        class Bad(nn.Module):
            def __init__(self, num_channels):
                raise ValueError("no channels for you")
        """,
        "ValueError: no channels for you",
    ),
    "raises in forward": (
        """
        class Bad(nn.Module):
            def __init__(self, num_channels):
                super().__init__()
            def forward(self, x):
                raise RuntimeError("forward is broken")
        """,
        "RuntimeError: forward is broken",
    ),
    "changes the shape": (
        """
        class Bad(nn.Module):
            def __init__(self, num_channels):
                super().__init__()
            def forward(self, x):
                return x[:, :1]
        """,
        "changed the shape",
    ),
    "returns NaN": (
        """
        class Bad(nn.Module):
            def __init__(self, num_channels):
                super().__init__()
                self.scale = nn.Parameter(torch.ones(num_channels))
            def forward(self, x):
                return x * self.scale.view(1, -1, 1, 1) * float("nan")
        """,
        "non-finite",
    ),
    "hangs": (
        """
        import time

        class Bad(nn.Module):
            def __init__(self, num_channels):
                super().__init__()
            def forward(self, x):
                while True:
                    time.sleep(1)
        """,
        "did not finish within 5 s",
    ),
}


@pytest.fixture
def db(tmp_path) -> Path:
    path = tmp_path / "results.db"
    # closing the connections checkpoints the write-ahead log, so the file's bytes are final
    open_store(f"sqlite:///{path}").engine.dispose()
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_submissions_are_rejected_and_the_database_is_unchanged(case, tmp_path, db):
    body, reason = BAD[case]
    target = f"{norm_file(tmp_path, body)}:Bad"
    before = digest(db)
    timeout = 5 if case == "hangs" else 120
    result = invoke("submit", target, "--suite=cifar10", "--budget=smoke", f"--db={db}",
                    f"--timeout={timeout}")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "rejected" in result.output or "does not import" in result.output
    assert reason in result.output.replace("\n", " "), result.output
    assert digest(db) == before


def test_missing_file_and_existing_name_are_rejected_without_running_anything(tmp_path, db):
    before = digest(db)
    result = invoke("submit", f"{tmp_path / 'nope.py'}:Nope", f"--db={db}")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = invoke("submit", f"{EXAMPLE}:ChannelLayerNorm", "--name=batchnorm", f"--db={db}")
    assert result.exit_code == 2 and "already exists" in result.output
    result = invoke("submit", "no-colon-here", f"--db={db}")
    assert result.exit_code == 2 and "FILE:CLASS" in result.output
    assert digest(db) == before
    result = invoke("submit", f"{EXAMPLE}:ChannelLayerNorm", f"--db={tmp_path / 'new.db'}",
                    "--suite=cifar11")  # fmt: skip
    assert result.exit_code == 2 and not (tmp_path / "new.db").exists()


def test_check_reports_each_rule(tmp_path):
    result = invoke("check", f"{EXAMPLE}:ChannelLayerNorm")
    assert result.exit_code == 0, result.output
    assert "Contract holds" in result.output and "time vs BatchNorm" in result.output
    target = f"{norm_file(tmp_path, BAD['changes the shape'][0])}:Bad"
    result = invoke("check", target)
    assert result.exit_code == 2 and "FAIL" in result.output
    assert "changed the shape" in result.output
    result = invoke("check", "rmsnorm")  # a registered norm, by name
    assert result.exit_code == 0 and "Contract holds" in result.output
    result = invoke("check", "rmsnrom")
    assert result.exit_code == 2 and "Did you mean 'rmsnorm'?" in result.output


def test_a_norm_that_uses_batch_statistics_in_eval_mode_is_rejected(db):
    target = f"{ADAPTS_TO_ITS_BATCH}:BatchAdaptedNorm"
    report = check_norm(load_class(target)[0], target, measure_costs=False)
    assert [c.name for c in report.checks if not c.passed] == [EVAL_RULE]  # all else holds
    result = invoke("check", target)
    assert result.exit_code == 2 and EVAL_RULE in " ".join(result.output.split()), result.output
    before = digest(db)
    result = invoke("submit", target, "--suite=cifar10", "--budget=smoke", f"--db={db}")
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "rejected" in text and EVAL_RULE in text, result.output
    assert "batch statistics at test time" in text and "not allowed silently" in text
    assert digest(db) == before


def test_contract_holds_for_every_registered_norm():
    for name in NORMS.names():
        if name.startswith(("submission/", "test-")):
            continue
        report = check_norm(NORMS.get(name).obj, name, measure_costs=False)
        assert report.passed, (name, report.failures())


def test_worked_example_goes_from_submit_to_a_leaderboard_row(cifar_dir, tmp_path, db):
    suite = tiny_suite(tmp_path)
    args = (f"--suite={suite}", "--budget=smoke", f"--db={db}")
    result = invoke("submit", f"{EXAMPLE}:ChannelLayerNorm", *args)
    assert result.exit_code == 0, result.output
    assert "recorded as submission/channellayernorm/v1" in result.output
    rows = {r["norm"]: r for r in leaderboard_json(str(db), suite=str(suite))}
    row = rows["submission/channellayernorm/v1"]
    assert row["rank"] == 1 and row["status"] == "1 finished" and row["accuracy_mean"] > 0

    from dashboard.data import leaderboard_view, norm_info, readonly_engine
    from normbench.leaderboard import Selection

    engine = readonly_engine(f"sqlite:///{db}")
    view = leaderboard_view(engine, Selection("tiny", "smoke"), "clean accuracy")
    assert view.submission.tolist() == [True]
    info = norm_info("submission/channellayernorm/v1", engine)
    assert info.source == EXAMPLE.read_text() and len(info.source_sha256) == 64

    before = digest(db)
    again = invoke("submit", f"{EXAMPLE}:ChannelLayerNorm", *args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert digest(db) == before  # the same source is the same submission: a no-op

    changed = tmp_path / "channel_layernorm.py"
    shutil.copy(EXAMPLE, changed)
    changed.write_text(changed.read_text().replace("eps: float = 1e-6", "eps: float = 1e-5"))
    result = invoke("check", f"{changed}:ChannelLayerNorm")
    assert result.exit_code == 0
    from normbench.submissions import submit

    name, new = submit(f"sqlite:///{db}", f"{changed}:ChannelLayerNorm", None, timeout=120)
    assert (name, new) == ("submission/channellayernorm/v2", True)

    # submitting never registers the code in this process; a run names it from the database
    assert name not in NORMS
    result = invoke("run", f"--suite={suite}", "--budget=smoke", f"--norms={name}", f"--db={db}")
    assert result.exit_code == 0, result.output
    rows = {r["norm"]: r for r in leaderboard_json(str(db), suite=str(suite))}
    assert rows[name]["status"] == "1 finished"


def test_entry_point_norms_are_registered(tmp_path, monkeypatch):
    package = tmp_path / "site"
    (package / "extranorm").mkdir(parents=True)
    (package / "extranorm" / "__init__.py").write_text(EXAMPLE.read_text())
    info = package / "extranorm-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extranorm\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[normbench.norms]\nchannel_ln = extranorm:ChannelLayerNorm\n"
    )
    monkeypatch.syspath_prepend(str(package))
    from normbench.submissions import load_entry_point_norms

    try:
        assert load_entry_point_norms() == ["channel_ln"]
        entry = NORMS.get("channel_ln")
        assert entry.info.family == "group" and "affine" in entry.info.capabilities
        assert entry.info.description.startswith("LayerNorm over channels")
        assert check_norm(entry.obj).passed
    finally:
        NORMS._entries.pop("channel_ln", None)
        sys.modules.pop("extranorm", None)


def test_bench_norms_measures_and_stores_a_speed_table(db, monkeypatch):
    result = invoke("bench", "norms", "--norms=batchnorm,frn,sws", "--batch-size=4", "--pairs=2",
                    f"--db={db}")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "vs BatchNorm" in result.output
    assert result.output.count("holds") == 3  # the contract column
    from dashboard.data import norm_speed, readonly_engine

    engine = readonly_engine(f"sqlite:///{db}")
    for name in ("batchnorm", "frn", "sws"):
        rows = norm_speed(engine, name)
        assert len(rows) == 1 and rows["images/s"][0] > 0 and rows["memory MB"][0] > 0
    result = invoke("bench", "norms", "--norms=batchnorn", f"--db={db}")
    assert result.exit_code == 2 and "batchnorm" in result.output
