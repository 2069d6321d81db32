"""The rule that keeps CI honest: a test that lacks its data or browser fails in CI and skips,
with its reason, only on a developer's machine."""

import pytest
from conftest import in_ci, skip_or_fail


@pytest.mark.parametrize(
    ("env", "ci"),
    [
        ({}, False),
        ({"CI": "false"}, False),
        ({"CI": "0"}, False),
        ({"CI": "true"}, True),
        ({"CI": "1"}, True),
        ({"NORMBENCH_TEST_DATA_DIR": "/data"}, True),
    ],
)
def test_a_missing_resource_fails_in_ci_and_skips_elsewhere(monkeypatch, env, ci):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("NORMBENCH_TEST_DATA_DIR", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert in_ci() == ci
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome, match="no CIFAR here"):
        skip_or_fail("no CIFAR here")
