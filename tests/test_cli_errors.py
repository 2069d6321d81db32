"""Bad input: a one-paragraph error, exit status 2, never a traceback; a failed run: exit 1."""

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import TINY_SUITE, invoke, smoke_run
from sqlalchemy import select

from normbench import runtime
from normbench.store import Run, RunStatus, open_store
from normbench.suites import BUILTIN_DIR, default_budget, default_budget_reason, load_suite_file

SUITE_TEXT = (BUILTIN_DIR / "cifar10.toml").read_text()


def flat(text: str) -> str:
    """Output as one line of words, without the frames rich draws around errors."""
    return " ".join(text.translate(str.maketrans("│╭╮╰╯─", "      ")).split())


def write_suite(tmp_path, text):
    path = tmp_path / "mysuite.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--suite", "cifar11"], "Unknown suite 'cifar11'. Did you mean 'cifar10'"),
        (
            ["--suite", "cifar10", "--norms", "batchnrom"],
            "Invalid value for '--norms': Unknown norm 'batchnrom'. Did you mean 'batchnorm' or "
            "'noisy_batchnorm'?",
        ),
        (
            ["--suite", "cifar10", "--optimizers", "adamv"],
            "Invalid value for '--optimizers': Unknown optimizer 'adamv'. Did you mean 'adam' or "
            "'adamw'",
        ),
        (
            ["--suite", "cifar10", "--seeds", "0,x"],
            "'0,x' is not a comma-separated list of integers",
        ),
        (["--suite", "cifar10", "--seeds", "-1"], "seeds must be integers from 0 to 2147483647"),
        (["--suite", "cifar10", "--budget", "huge"], "'huge' is not one of"),
        (["--suite", "cifar10", "--device", "tpu"], "Invalid device 'tpu'"),
        (
            ["--suite", "cifar10", "--norms", "batchnorm,skipinit"],
            "norm 'skipinit' cannot be used with model 'fastnet'",
        ),
    ],
)
def test_bad_run_arguments(args, expected):
    result = (
        invoke("run", *args, "--budget", "smoke")
        if "--budget" not in args
        else invoke("run", *args)
    )
    assert result.exit_code == 2
    assert expected in " ".join(result.output.split()), result.output


# Every option error names its option and leaves no database behind.
@pytest.mark.parametrize(
    "args, option, expected",
    [
        (["run", "--suite=cifar10", "--seeds=99999999999999999999"], "--seeds", "0 to 2147483647"),
        (["run", "--suite=cifar10", "--seeds=2147483648"], "--seeds", "0 to 2147483647"),
        (["run", "--suite=cifar10", "--seeds=0,1,0"], "--seeds", "a seed is repeated"),
        (["run", "--suite=cifar10", "--seeds=,"], "--seeds", "0 to 2147483647"),
        (
            ["run", "--suite=cifar10", "--norms=groupnorm(groups="],
            "--norms",
            "unclosed parenthesis",
        ),
        (
            ["run", "--suite=cifar10", "--norms=groupnorm(groups=8,eps=1e-3"],
            "--norms",
            "unclosed parenthesis",
        ),
        (["run", "--suite=cifar10", "--norms=batchnorm),frn"], "--norms", "')' without its '('"),
        (["run", "--suite=cifar10", "--norms=gn(groups=8)x"], "--norms", "misplaced parenthesis"),
        (["run", "--suite=cifar10", "--norms= , "], "--norms", "comma-separated list of names"),
        (
            ["run", "--suite=cifar10", "--norms=groupnorm(gruops=8)"],
            "--norms",
            "Norm 'groupnorm' has no option 'gruops'",
        ),
        (
            ["run", "--suite=cifar10", "--norms=batchnorm,frm"],
            "--norms",
            "Unknown norm 'frm'. Did you mean 'frn'?",
        ),
        (["run", "--suite=cifar10", "--budget=laptops"], "--budget", "'laptops' is not one of"),
        (["leaderboard", "--suite=cifar10", "--budget=huge"], "--budget", "is not one of"),
        (
            ["submit", "x.py:Norm", "--optimizers=sgd,adamv"],
            "--optimizers",
            "Unknown optimizer 'adamv'. Did you mean 'adam' or 'adamw'",
        ),
        (["submit", "x.py:Norm", "--seeds=-1"], "--seeds", "0 to 2147483647"),
        (["submit", "x.py:Norm", "--timeout=nan"], "--timeout", "less than or equal to 86400"),
        (["check", "x.py:Norm", "--timeout=0"], "--timeout", "greater than or equal to 1"),
        (["check", "x.py:Norm", "--timeout=inf"], "--timeout", "less than or equal to 86400"),
        (["bench", "norms", "--batch-size=0"], "--batch-size", "greater than or equal to 1"),
        (["bench", "norms", "--batch-size=10000000"], "--batch-size", "less than or equal"),
        (["bench", "norms", "--pairs=1"], "--pairs", "greater than or equal to 2"),
        (["bench", "norms", "--pairs=100000"], "--pairs", "less than or equal to 100"),
        (["bench", "norms", "--norms=batchnrom"], "--norms", "Did you mean 'batchnorm' or"),
        (["dashboard", "--port=0"], "--port", "greater than or equal to 1"),
        (["dashboard", "--port=99999999999999999999"], "--port", "less than or equal to 65535"),
        (["data", "prepare", "cifar10-c", "--seed=-1"], "--seed", "greater than or equal to 0"),
        (["data", "prepare", "cifar10-c", "--seed=2147483648"], "--seed", "less than or equal"),
    ],
)
def test_option_errors_name_the_option(tmp_path, args, option, expected):
    result = invoke(*args)
    text = flat(result.output)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in text and expected in text, text
    assert "Traceback" not in result.output
    assert not (tmp_path / "results.db").exists()  # NORMBENCH_DB of this test


def test_seed_beyond_the_database_range_in_a_suite_file(tmp_path):
    path = write_suite(tmp_path, SUITE_TEXT.replace("seeds = [0]", "seeds = [0, 4294967296]", 1))
    result = invoke("run", "--suite", path, "--budget", "smoke")
    text = flat(result.output)
    assert result.exit_code == 2
    assert path in text and "seeds.1" in text and "less than or equal to 2147483647" in text


def test_unknown_model_in_suite_file_names_file_key_and_match(tmp_path):
    path = write_suite(tmp_path, SUITE_TEXT.replace('model = "resnet20"', 'model = "resnet21"'))
    result = invoke("run", "--suite", path, "--budget", "smoke")
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert path in text and "budgets.full.model" in text and "Did you mean 'resnet20'" in text


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("epochs = 2", "epochz = 2"), ["budgets.smoke.epochz", "unknown key"]),
        (("epochs = 2", 'epochs = "two"'), ["budgets.smoke.epochs", "integer"]),
        (("warmup = 0.25", "warmup = 1.5"), ["budgets.smoke.warmup", "less than 1"]),
        (
            ('task = "classify"', "task = 'classify'\ncolour = 'red'"),
            ["colour", "unknown key"],
        ),
        (
            ("lr = 0.2, momentum", "lr = 0.2, momentun"),
            ["budgets.smoke.optimizers.sgd.momentun", "allowed: lr, momentum"],
        ),
        (
            ("lr = 0.2, momentum", "lr = 'fast', momentum"),
            ["budgets.smoke.optimizers.sgd.lr", "number"],
        ),
        (("[budgets.smoke]", "[budgets.smoke"), ["not valid TOML"]),
        (
            ('norms = ["batchnorm",', 'norms = ["batchnorn",'),
            ["norms[0]", "Did you mean 'batchnorm'"],
        ),
    ],
)
def test_invalid_suite_files(tmp_path, edit, expected):
    old, new = edit
    assert old in SUITE_TEXT
    path = write_suite(tmp_path, SUITE_TEXT.replace(old, new, 1))
    result = invoke("run", "--suite", path, "--budget", "smoke")
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert path in text, text
    for piece in expected:
        assert piece in text, text


def test_missing_data_offline(tmp_path, fresh_cache, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = smoke_run(f"--data-dir={empty}")
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "CIFAR-10 is not available" in text and "--data-dir" in text


def test_real_entry_point_exits_2_without_traceback():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "normbench.cli",
            "run",
            "--suite",
            "cifar10",
            "--norms",
            "groupnrom",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Did you mean 'groupnorm'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_list_commands():
    for kind, name in (
        ("norms", "groupnorm"),
        ("optimizers", "adamw"),
        ("models", "resnet56"),
        ("suites", "cifar-c"),
        ("corruptions", "glass_blur"),
    ):
        result = invoke("list", kind)
        assert result.exit_code == 0 and name in result.output
    assert invoke("list", "widgets").exit_code == 2


# --- the default budget --------------------------------------------------------------------------


def budget_suite(folder, budgets: tuple[str, ...], name: str = "budgets") -> str:
    """The tiny test suite with its one budget table copied under each of ``budgets``."""
    text = TINY_SUITE.format(name=name, lr=0.2)
    head, table = text.split("[budgets.smoke]")
    path = folder / f"{name}.toml"
    path.write_text(head + "".join(f"[budgets.{b}]{table}" for b in budgets))
    return str(path)


@pytest.mark.parametrize(
    "budgets, device, amx, expected, hint",
    [
        (("smoke", "cpu", "gpu", "full"), "cuda", False, "gpu", "--budget full is the longer"),
        (("smoke", "laptop", "cpu", "full"), "cuda", False, "full", "--budget cpu is the shorter"),
        (("smoke", "laptop", "cpu"), "cuda", False, "cpu", "--budget laptop is the shorter"),
        (("smoke", "laptop", "cpu", "full"), "cpu", True, "cpu", "--budget laptop is the shorter"),
        (("smoke", "laptop", "cpu", "full"), "cpu", False, "laptop", "--budget cpu is the longer"),
        (("smoke", "cpu", "full"), "cpu", False, "cpu", "without bfloat16"),
        (("smoke", "laptop"), "cpu", True, "laptop", "with bfloat16 matrix units"),
        (("smoke",), "cpu", False, "smoke", "the suite's first budget"),
    ],
)
def test_default_budget_follows_the_device(
    tmp_path, monkeypatch, budgets, device, amx, expected, hint
):
    monkeypatch.setattr(runtime, "fast_bf16", lambda dev: amx)
    suite = load_suite_file(Path(budget_suite(tmp_path, budgets)))
    name, why = default_budget_reason(suite, torch.device(device))
    assert name == expected and hint in why, why
    assert default_budget(suite, torch.device(device)) == name


def test_leaderboard_without_budget_uses_the_default(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "fast_bf16", lambda dev: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    suite = budget_suite(tmp_path, ("smoke", "laptop", "cpu"))
    assert invoke("db", "upgrade").exit_code == 0
    result = invoke("leaderboard", f"--suite={suite}")
    assert result.exit_code == 0, result.output
    assert "at budget 'laptop'" in flat(result.output)


# --- exit status of run ------------------------------------------------------------------------

BROKEN = "test-raises-in-forward"


@pytest.fixture
def broken_norm():
    import fixtures.failing_norms  # noqa: F401 - registers it (the workers import it too)

    return BROKEN


def test_run_exits_1_after_its_summary_when_a_run_failed(
    cifar_dir, tmp_path, monkeypatch, broken_norm
):
    monkeypatch.setattr(runtime, "fast_bf16", lambda dev: False)
    suite = budget_suite(tmp_path, ("laptop", "cpu"))
    db = tmp_path / "exit.db"
    args = ("run", f"--suite={suite}", f"--norms={broken_norm},batchnorm", "--device=cpu",
            f"--db={db}")  # fmt: skip
    result = invoke(*args)
    text = flat(result.output)
    assert result.exit_code == 1, result.output
    start = (
        "budget laptop (the default on a CPU without bfloat16 matrix units; --budget cpu is the "
        "longer recipe), on cpu"
    )
    assert start in text, text
    assert "Summary: 1 failed, 1 finished" in text and "1 run(s) failed" in text
    with open_store(f"sqlite:///{db}").session() as s:
        status = {r.norm: r.status for r in s.scalars(select(Run))}
    assert status == {broken_norm: RunStatus.failed, "batchnorm": RunStatus.finished}

    again = invoke(*args)  # the finished run is skipped, the failed one fails again
    assert again.exit_code == 1 and "1 skipped" in flat(again.output)
    finished = invoke(*args[:2], "--norms=batchnorm", *args[3:])
    assert finished.exit_code == 0 and "Summary: 1 skipped" in flat(finished.output)
