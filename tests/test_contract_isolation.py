"""The norm contract's verdict is the checker's: hostile norms in real, confined child processes.

Each fixture in ``tests/fixtures/hostile/`` (or written here, when it needs a path of the test)
acts against the checker: it forges a report, forges observations, attacks the results database,
kills the checker, starts processes or hangs. Every one is rejected, the database stays
byte-for-byte the same, and nothing it started is left running. Judging alone (no process) is
tested on damaged observations: every damage fails its check and none raises.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import struct
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import REPO, skip_or_fail
from helpers import invoke

import normbench.sandbox
from normbench.contract import (
    ContractReport,
    _isolation,
    _report,
    check_norm,
    judge,
    load_class,
    observe,
    run_contract,
)
from normbench.store import open_store

HOSTILE = REPO / "tests" / "fixtures" / "hostile"
EXAMPLE = REPO / "examples" / "channel_layernorm.py"
SHAPE_RULE = "forward keeps NCHW shape and dtype (train mode)"
UNUSABLE = "the check process sent no usable observation"


def confined() -> None:
    """Skip (fail in CI) where the kernel cannot confine the check process at all."""
    if normbench.sandbox.landlock_abi() < 6:
        skip_or_fail("this kernel lacks Landlock ABI 6 (file, network and signal scoping)")


@pytest.fixture
def workers(monkeypatch) -> list:
    """The workers ``run_contract`` launches, recorded so the test can look for what they left."""
    launched = []
    real_launch = normbench.sandbox.launch

    def launch(*args, **kwargs):
        worker = real_launch(*args, **kwargs)
        launched.append(worker)
        return worker

    monkeypatch.setattr(normbench.sandbox, "launch", launch)
    return launched


def survivors(workers: list, *markers: str) -> list[str]:
    """Live processes in a worker's session or process group, or whose command line is one of
    ``markers`` (what a fixture's helpers become), as "pid: command line"."""
    groups = {w.pid for w in workers}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue  # gone meanwhile
        state, _, group, session = stat[stat.rfind(")") + 2 :].split()[:4]
        if state in ("Z", "X"):
            continue
        if {int(group), int(session)} & groups or command in markers:
            found.append(f"{entry.name}: {command}")
    return found


@pytest.fixture
def results_db(tmp_path) -> Path:
    """A real, empty results database (SQLite), closed so its bytes are final."""
    path = tmp_path / "results.db"
    open_store(f"sqlite:///{path}").engine.dispose()
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- forged reports and observations --------------------------------------------------------------


def test_a_passing_report_printed_at_import_is_not_believed():
    report = run_contract(f"{HOSTILE / 'fake_report.py'}:FakeReport", timeout=60)
    assert not report.passed and not report.checks
    assert report.error.startswith("the check process exited before reporting (status 0)")


def test_forged_observations_without_tensors_are_rejected_by_the_judgement():
    report = run_contract(f"{HOSTILE / 'forge.py'}:Forge", timeout=60)
    assert not report.passed and not report.error
    failed = [c for c in report.checks if not c.passed]
    assert failed and all(c.message.startswith(UNUSABLE) for c in failed)
    assert SHAPE_RULE in [c.name for c in failed]
    assert report.param_overhead is None and report.time_ratio is None


def test_forged_observations_with_wrong_shapes_are_rejected_by_the_judgement():
    report = run_contract(f"{HOSTILE / 'forge_shapes.py'}:ForgeShapes", timeout=60)
    assert not report.passed and not report.error
    messages = {c.name: c.message for c in report.checks if not c.passed}
    assert messages[SHAPE_RULE] == "forward changed the shape (8, 16, 8, 8) -> (1, 1)"
    assert "eval with batch size 1" in messages


# --- the results database -------------------------------------------------------------------------

ATTACKS = {
    "delete": "os.remove(DB)",
    "overwrite": "Path(DB).write_bytes(b'not a database any more')",
    "open for writing": "open(DB, 'r+b').write(b'x')",
    "truncate": "os.truncate(DB, 0)",
    "rename": "os.rename(DB, DB + '.gone')",
    "drop a table with sqlite3": "sqlite3.connect(DB).execute('DROP TABLE submissions')",
}
ATTACK_HEADER = """\
import os
import sqlite3
from pathlib import Path

import torch
from torch import nn

DB = {db!r}
"""


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_norm_that_attacks_the_database_at_import_is_rejected_and_the_file_unchanged(
    attack, tmp_path, results_db
):
    confined()
    norm = tmp_path / "attack.py"
    norm.write_text(
        ATTACK_HEADER.format(db=str(results_db))
        + f"\n{ATTACKS[attack]}\n\n\nclass Attack(nn.Identity):\n    pass\n"
    )
    before = digest(results_db)
    report = run_contract(f"{norm}:Attack", timeout=60)
    assert not report.passed
    assert report.error.startswith(f"{norm} does not import: "), report.error
    assert digest(results_db) == before
    assert not Path(f"{results_db}.gone").exists()


def test_a_norm_that_attacks_the_database_in_forward_leaves_it_unchanged(tmp_path, results_db):
    confined()
    attempts = "".join(
        f"    try:\n        {code}\n    except Exception:\n        pass\n"
        for code in ATTACKS.values()
    )
    body = f"""
def attack():
{attempts}

class Sneaky(nn.Module):
    def __init__(self, num_channels):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x):
        attack()
        return x * self.weight.view(1, -1, 1, 1)
"""
    norm = tmp_path / "sneaky.py"
    norm.write_text(ATTACK_HEADER.format(db=str(results_db)) + body)
    before = digest(results_db)
    report = run_contract(f"{norm}:Sneaky", timeout=120)
    # Every attack failed and was swallowed: an otherwise good norm, and an untouched file.
    assert report.passed, report.failures()
    assert digest(results_db) == before


def test_a_norm_cannot_change_the_databases_permissions_or_times(tmp_path, results_db):
    """Landlock guards a file's bytes, not its metadata; the seccomp filter denies the calls."""
    confined()
    norm = tmp_path / "chmod.py"
    attacks = "\nfor attack in (lambda: os.chmod(DB, 0), lambda: os.utime(DB, (0, 0)),\n" \
        "               lambda: os.setxattr(DB, 'user.x', b'1')):\n" \
        "    try:\n        attack()\n    except OSError:\n        pass\n"
    norm.write_text(
        ATTACK_HEADER.format(db=str(results_db))
        + attacks + "\n\nclass Chmod(nn.Identity):\n    pass\n"
    )
    before = results_db.stat()
    report = run_contract(f"{norm}:Chmod", timeout=60)
    assert report.passed, report.failures()  # every attack failed and was swallowed
    after = results_db.stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)


# --- the checker's process and the machine --------------------------------------------------------


def test_a_norm_that_kills_the_checker_is_rejected_and_the_checker_lives_on():
    confined()
    # The checker runs in a process of its own here: should the signal arrive, that process
    # dies with a clear status instead of the whole test session.
    checker = (
        "import json, sys\nfrom dataclasses import asdict\n"
        "from normbench.contract import run_contract\n"
        "print(json.dumps(asdict(run_contract(sys.argv[1], timeout=60))))\n"
    )
    target = f"{HOSTILE / 'kill_parent.py'}:KillParent"
    done = subprocess.run(
        [sys.executable, "-c", checker, target], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    report = ContractReport.from_json(json.loads(done.stdout.splitlines()[-1]))
    assert not report.passed
    assert "does not import: PermissionError" in report.error, report.error


@pytest.mark.parametrize(
    "target, marker",
    [("helper_process.py:HelperProcess", "sleep 30137"), ("fork_bomb.py:ForkBomb", "sleep 30139")],
)
def test_a_norm_cannot_start_processes(target, marker, workers):
    confined()
    assert not survivors([], marker)  # none from elsewhere, or the test would prove nothing
    report = run_contract(f"{HOSTILE / target}", timeout=60)
    assert not report.passed
    assert "does not import: PermissionError: [Errno 1] Operation not permitted" in report.error
    assert len(workers) == 1
    assert survivors(workers, marker) == []


def test_a_hanging_forward_is_stopped_after_the_timeout(workers):
    report = run_contract(f"{HOSTILE / 'hang.py'}:Hang", timeout=20)
    assert not report.passed and not report.checks
    assert report.error == (
        "the checks did not finish within 20 s (does the constructor or forward hang?)"
    )
    assert len(workers) == 1 and survivors(workers) == []


# --- as a user would: the command line ------------------------------------------------------------


def test_submitting_a_forged_norm_fails_and_writes_no_database(tmp_path, results_db):
    db = tmp_path / "r.db"
    result = invoke("submit", f"{HOSTILE / 'forge.py'}:Forge", f"--db={db}")
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "rejected" in text and SHAPE_RULE in text and UNUSABLE in text
    assert not db.exists()
    before = digest(results_db)
    result = invoke("submit", f"{HOSTILE / 'fake_report.py'}:FakeReport", f"--db={results_db}")
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "exited before reporting (status 0)" in text, result.output
    assert digest(results_db) == before


def test_a_good_norm_still_passes_and_its_report_names_the_bytes_checked(tmp_path):
    target = f"{EXAMPLE}:ChannelLayerNorm"
    result = invoke("check", target)
    assert result.exit_code == 0 and "Contract holds" in result.output, result.output
    report = run_contract(target)
    assert report.passed and report.source_sha256 == digest(EXAMPLE)
    assert report.time_ratio > 0 and report.param_overhead == 0.0
    # Given the source, the file is not read at all: the hash is the source's.
    changed = EXAMPLE.read_text().replace("eps: float = 1e-6", "eps: float = 1e-5")
    report = run_contract(f"{tmp_path / 'nowhere.py'}:ChannelLayerNorm", source=changed)
    assert report.passed
    assert report.source_sha256 == hashlib.sha256(changed.encode()).hexdigest()


# --- judging damaged observations (no process) ----------------------------------------------------


@pytest.fixture(scope="module")
def good_observations() -> dict:
    cls, _ = load_class(f"{EXAMPLE}:ChannelLayerNorm")
    return observe(cls, measure_costs=False)


def tensor(observations: dict) -> dict:
    return observations["checks"]["train"]["steps"][0]["y"]


DAMAGE = {
    "no checks": lambda o: o.pop("checks"),
    "checks not an object": lambda o: o.update(checks=[1, 2]),
    "a check missing": lambda o: o["checks"].pop("train"),
    "steps missing": lambda o: o["checks"]["train"].pop("steps"),
    "a step short, no exception": lambda o: o["checks"]["train"]["steps"].pop(),
    "a step too many": lambda o: o["checks"]["train"]["steps"].append({}),
    "a step not an object": lambda o: o["checks"]["train"]["steps"].__setitem__(0, "y"),
    "no data": lambda o: tensor(o).pop("data"),
    "data not base64": lambda o: tensor(o).update(data="***"),
    "too few bytes": lambda o: tensor(o).update(data=tensor(o)["data"][:-8]),
    "shape of floats": lambda o: tensor(o).update(shape=[8.0, 16.0, 8.0, 8.0]),
    "shape of a boolean": lambda o: tensor(o).update(shape=[True] * 4),
    "a huge shape": lambda o: tensor(o).update(shape=[2**20] * 4),
    "a negative size": lambda o: tensor(o).update(shape=[-8, -16, 8, 8]),
    "NaN in the shape": lambda o: tensor(o).update(shape=[math.nan] * 4),
    "a tensor without data": lambda o: tensor(o).clear(),
    "a strange dtype": lambda o: tensor(o).update(dtype="../../etc"),
    "an exception without a type": lambda o: o["checks"]["train"].update(raised={"message": 1}),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_observations_fail_their_check_without_raising(damage, good_observations):
    assert all(c.passed for c in judge(good_observations))
    observations = copy.deepcopy(good_observations)
    DAMAGE[damage](observations)
    checks = judge(observations)
    failed = [c for c in checks if not c.passed]
    assert failed, damage
    assert all(c.message.startswith(UNUSABLE) for c in failed), failed
    # the same through the text a child would send
    assert [asdict(c) for c in judge(json.loads(json.dumps(observations)))] == [
        asdict(c) for c in checks
    ]


@pytest.mark.parametrize(
    "observations", [None, [], "observations", 3, {"checks": None}, {"load": "nonsense"}]
)
def test_observations_of_the_wrong_kind_are_a_failure(observations):
    report = _report("x.py:X", observations)
    assert not report.passed and report.failures()


def test_nan_in_the_data_fails_the_checks_that_read_it(good_observations):
    observations = copy.deepcopy(good_observations)
    nan = base64.b64encode(struct.pack("8f", *[math.nan] * 8)).decode()
    for step in observations["checks"]["batch_independence"]["steps"]:
        step["together"] = step["alone"] = {"dtype": "float32", "shape": [8, 1], "data": nan}
    failed = {c.name: c.message for c in judge(observations) if not c.passed}
    assert list(failed) == ["eval output of a sample does not depend on its batch"]
    assert "not finite" in failed["eval output of a sample does not depend on its batch"]


@pytest.mark.parametrize(
    "costs, expected",
    [
        ({"param_overhead": 0.5, "time_ratio": 1.5}, (0.5, 1.5)),
        ({"param_overhead": math.nan, "time_ratio": 1.5}, (None, 1.5)),
        ({"param_overhead": 0.0, "time_ratio": -1.0}, (0.0, None)),
        ({"param_overhead": -2.0, "time_ratio": math.inf}, (None, None)),
        ({"param_overhead": "0", "time_ratio": True}, (None, None)),
        ("fast", (None, None)),
    ],
)
def test_implausible_measurements_are_reported_as_not_measured(costs, expected, good_observations):
    report = _report("x.py:X", {**good_observations, "costs": costs})
    assert report.passed and (report.param_overhead, report.time_ratio) == expected


def test_check_norm_is_observe_then_judge_in_this_process():
    cls, source = load_class(f"{EXAMPLE}:ChannelLayerNorm")
    report = check_norm(cls, "example", source, measure_costs=False)
    assert report.passed and report.source_sha256 == digest(EXAMPLE)
    assert [asdict(c) for c in report.checks] == [
        asdict(c) for c in judge(observe(cls, measure_costs=False))
    ]


def test_missing_confinement_is_noted_in_the_report():
    assert _isolation({}) == "" and _isolation({"landlock_abi": 7, "seccomp": True}) == ""
    note = _isolation({"landlock_abi": 0, "seccomp": False})
    assert "without Landlock" in note and "without seccomp" in note


def test_the_checks_run_confined_here():
    confined()
    report = run_contract(f"{EXAMPLE}:ChannelLayerNorm", timeout=120)
    assert report.passed and report.isolation == ""


def test_the_hash_is_of_the_files_bytes_as_they_are(tmp_path):
    norm = textwrap.dedent(
        """
        from torch import nn

        class Plain(nn.Identity):
            def __init__(self, num_channels):
                super().__init__()
        """
    )
    path = tmp_path / "plain.py"
    path.write_bytes(norm.replace("\n", "\r\n").encode())  # hashed as bytes, line ends and all
    report = run_contract(f"{path}:Plain", timeout=60)
    assert report.passed and report.source_sha256 == digest(path)
