"""The command line answers at once: help, argument errors and ``list suites`` import neither torch
nor the database and data libraries; norms from installed packages are loaded only by the
commands that look norms up; help shows the environment variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO
from helpers import invoke

HEAVY = ("torch", "sqlalchemy", "pandas", "torchmetrics", "scipy")

#: Runs each command line through ``normbench.cli.main`` in one fresh interpreter and reports,
#: per command, its exit status, its output and the heavy modules imported so far.
PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys

    HEAVY = {heavy!r}
    report = {{"after_import": None, "commands": []}}
    from normbench.cli import main
    report["after_import"] = sorted(m for m in HEAVY if m in sys.modules)
    for argv in {commands!r}:
        sys.argv = ["normbench", *argv]
        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            try:
                main()
                code = 0
            except SystemExit as stop:
                code = stop.code
        report["commands"].append({{
            "argv": argv, "code": code, "output": output.getvalue(),
            "heavy": sorted(m for m in HEAVY if m in sys.modules),
        }})
    print(json.dumps(report))
    """
)


def probe(commands: list[list[str]], **env: str) -> dict:
    script = PROBE.format(heavy=HEAVY, commands=commands)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "200", **env},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def flat(text: str) -> str:
    """Output as one line of words, without the frames rich draws around help and errors."""
    return " ".join(text.translate(str.maketrans("│╭╮╰╯─", "      ")).split())


LIGHT_COMMANDS = [
    (["--help"], 0, "Commands"),
    (["run", "--help"], 0, "--suite"),
    (["check", "--help"], 0, "FILE:CLASS"),
    (["submit", "--help"], 0, "FILE:CLASS"),
    (["list", "--help"], 0, "What to list"),
    (["leaderboard", "--help"], 0, "--format"),
    (["dashboard", "--help"], 0, "--port"),
    (["bench", "norms", "--help"], 0, "--batch-size"),
    (["data", "prepare", "--help"], 0, "cifar10-c"),
    (["db", "upgrade", "--help"], 0, "--db"),
    (["list", "suites"], 0, "cifar-c"),
    (["run", "--suite", "cifar10", "--no-such-option"], 2, "No such option"),
    (["run", "--suite", "cifar10", "--budget", "huge"], 2, "Invalid value for '--budget'"),
    (["run", "--suite", "cifar10", "--seeds", "0,x"], 2, "Invalid value for '--seeds'"),
    (["run", "--suite", "cifar10", "--norms", "gn(groups="], 2, "Invalid value for '--norms'"),
    (["bench", "norms", "--pairs", "1"], 2, "Invalid value for '--pairs'"),
    (["run"], 2, "Missing option '--suite'"),
]


def test_import_and_light_commands_load_no_heavy_library():
    report = probe([argv for argv, _, _ in LIGHT_COMMANDS])
    assert report["after_import"] == []
    for (argv, code, expected), done in zip(LIGHT_COMMANDS, report["commands"], strict=True):
        assert done["code"] == code, (argv, done["output"])
        assert expected in flat(done["output"]), (argv, done["output"])
        assert "Traceback" not in done["output"], (argv, done["output"])
        # Modules stay imported, so the first command that needs one is the one named here.
        assert done["heavy"] == [], f"`normbench {' '.join(argv)}` imported {done['heavy']}"


@pytest.fixture
def broken_plugin(tmp_path) -> dict[str, str]:
    """An installed package whose ``normbench.norms`` entry point cannot be imported."""
    info = tmp_path / "site" / "brokennorm-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokennorm\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[normbench.norms]\nbrokennorm = no_such_module_here:Norm\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}


def test_plugin_norms_load_only_when_norms_are_looked_up(broken_plugin):
    report = probe([["list", "suites"], ["run", "--help"], ["list", "norms"]], **broken_plugin)
    suites, run_help, norms = report["commands"]
    assert suites["code"] == 0 and "cifar10" in suites["output"]
    assert run_help["code"] == 0 and suites["heavy"] == run_help["heavy"] == []
    assert norms["code"] == 2, norms["output"]
    text = flat(norms["output"])
    assert "Error: The norm entry point 'brokennorm' (no_such_module_here:Norm) does not load" in (
        text
    )
    assert "ModuleNotFoundError" in text and "Traceback" not in norms["output"]


DB, DATA = "NORMBENCH_DB", "NORMBENCH_DATA_DIR"


@pytest.mark.parametrize(
    "command, variables",
    [
        (["run"], {DB, DATA}),
        (["submit"], {DB, DATA}),
        (["leaderboard"], {DB}),
        (["dashboard"], {DB}),
        (["bench", "norms"], {DB}),
        (["db", "upgrade"], {DB}),
        (["data", "prepare"], {DATA}),
    ],
)
def test_help_shows_the_environment_variables_of_its_options(command, variables):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    text = flat(result.output)
    for variable in (DB, DATA):
        assert (f"[env var: {variable}]" in text) is (variable in variables), text
    # rich used to take "[env: ...]" for markup and leave "directory ." behind
    assert "directory ." not in text and "path ." not in text


def test_top_level_help_lists_every_environment_variable():
    text = flat(invoke("--help").output)
    for variable, what in (
        ("NORMBENCH_DB", "results database"),
        ("NORMBENCH_DATA_DIR", "dataset mirrors"),
        ("NORMBENCH_CACHE_DIR", "checkpoints"),
    ):
        assert f"{variable}:" in text and what in text.split(f"{variable}:", 1)[1], text


def test_environment_variable_and_option_name_the_same_database(tmp_path, monkeypatch):
    by_env, by_option = tmp_path / "env.db", tmp_path / "option.db"
    monkeypatch.setenv("NORMBENCH_DB", str(by_env))
    assert invoke("db", "upgrade").exit_code == 0
    assert by_env.exists()
    assert invoke("db", "upgrade", f"--db={by_option}").exit_code == 0
    assert by_option.exists()
    result = invoke("leaderboard", "--suite=cifar10", "--budget=smoke")
    assert result.exit_code == 0 and str(by_env) in flat(result.output)
