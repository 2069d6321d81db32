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
    """``normbench run`` at the smoke budget (more options in ``extra``)."""
    return invoke(
        "run", f"--suite={suite}", "--budget=smoke", f"--norms={norms}",
        f"--optimizers={optimizers}", *extra,
    )  # fmt: skip


def leaderboard_json(db: str, suite: str = "cifar10") -> list[dict]:
    args = (f"--suite={suite}", "--budget=smoke", f"--db={db}", "--format=json")
    result = invoke("leaderboard", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@functools.cache
def cifar_test_images(data_dir: str, n: int) -> torch.Tensor:
    """The first ``n`` real CIFAR-10 test images, decoded once per test session."""
    from normbench.data import load_cifar10

    return load_cifar10("test", data_dir).images[:n].contiguous()
