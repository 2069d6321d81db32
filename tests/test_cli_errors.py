"""Bad input: a one-paragraph error, exit status 2, never a traceback."""

import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from helpers import invoke, smoke_run

from normbench.suites import BUILTIN_DIR

SUITE_TEXT = (BUILTIN_DIR / "cifar10.toml").read_text()


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
            "Unknown norm 'batchnrom'. Did you mean 'batchnorm'?",
        ),
        (
            ["--suite", "cifar10", "--optimizers", "adamv"],
            "Unknown optimizer 'adamv'. Did you mean 'adamw'?",
        ),
        (
            ["--suite", "cifar10", "--seeds", "0,x"],
            "'0,x' is not a comma-separated list of integers",
        ),
        (["--suite", "cifar10", "--seeds", "-1"], "seeds must be non-negative"),
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
