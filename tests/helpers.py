"""Helpers shared by the CLI-level tests."""

from __future__ import annotations

import functools
import json

import torch
from click.testing import Result
from typer.testing import CliRunner

from normbench.cli import app


def invoke(*args: str) -> Result:
    """Run the CLI in-process; whatever happens, the user never sees a traceback."""
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def smoke_run(*extra: str, suite="cifar10", norms="batchnorm", optimizers="sgd") -> Result:
    """``normbench run`` at the smoke budget (more options in ``extra``), with seed 0 only unless
    ``extra`` names the seeds: the smoke budgets' three seeds would triple the tests' time."""
    seeds = () if any(a.startswith("--seeds") for a in extra) else ("--seeds=0",)
    return invoke(
        "run", f"--suite={suite}", "--budget=smoke", f"--norms={norms}",
        f"--optimizers={optimizers}", *seeds, *extra,
    )  # fmt: skip


def leaderboard_json(db: str, suite: str = "cifar10") -> list[dict]:
    args = (f"--suite={suite}", "--budget=smoke", f"--db={db}", "--format=json")
    result = invoke("leaderboard", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # notes go to stderr


@functools.cache
def cifar_test_images(data_dir: str, n: int) -> torch.Tensor:
    """The first ``n`` real CIFAR-10 test images, decoded once per test session."""
    from normbench.data import load_cifar10

    return load_cifar10("test", data_dir).images[:n].contiguous()


TINY_SUITE = """
name = "{name}"
description = "a seconds-long cifar10 suite for tests"
protocol_version = 1
task = "classify"
dataset = "cifar10"
norms = ["batchnorm"]
optimizers = ["sgd"]
seeds = [0]
reference = {{ norm = "batchnorm", optimizer = "sgd" }}

[budgets.smoke]
model = "fastnet"
model_args = {{ widths = [8, 8, 8, 8] }}
epochs = 1
batch_size = 128
train_subset = 512
test_subset = 256
precision = "fp32"
speed_pairs = 2
optimizers.sgd = {{ lr = {lr}, momentum = 0.9 }}
"""


def tiny_suite(folder, name: str = "tiny", lr: float = 0.2):
    """A one-epoch, 512-image cifar10 suite file (``lr=1e12`` makes every run diverge)."""
    path = folder / f"{name}.toml"
    path.write_text(TINY_SUITE.format(name=name, lr=lr))
    return path
