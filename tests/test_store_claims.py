"""Claims on runs shared by several orchestrators: who may take a run, heartbeats, writes by an
owner that lost its claim, and real processes racing for the same runs and mCE rows, on SQLite
files and a real PostgreSQL server."""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import sys
import time
import traceback
import types

import pytest
from sqlalchemy import select, text

from normbench.metrics import MetricRow
from normbench.store import Claim, ClaimLost, Metric, Run, RunStatus, Skip, open_store

LEASE = 60.0
SPEC = {
    "suite": "s", "budget": "smoke", "protocol_version": 1, "task": "classify",
    "dataset": "cifar10", "norm": "batchnorm", "optimizer": "sgd", "seed": 0,
    "settings": {"model": "fastnet"},
}  # fmt: skip
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(autouse=True)
def plain_main_module(monkeypatch):
    """Spawned children import the parent's ``__main__`` first; a Streamlit test earlier in the
    session leaves a dashboard page there, which must not run in them."""
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))


def claim(store, key: str, owner: str, *, spec=SPEC, reset: bool = False, **kwargs):
    return store.claim_run(
        spec, key, owner=owner,
        lease_seconds=kwargs.pop("lease_seconds", LEASE), device="cpu",
        provenance={"owner": owner}, config=spec, reset=reset, **kwargs,
    )  # fmt: skip


def finish(store, key: str, owner: str, value: float = 0.5, rows=None) -> None:
    store.finish_run(
        key, owner=owner, status=RunStatus.finished,
        metrics=rows or [MetricRow("accuracy", value, "test")], curves=[(1, "loss", 1.0)],
        epochs_done=1,
    )  # fmt: skip


def age(store, key: str, seconds: float) -> None:
    """Move the run's heartbeat ``seconds`` into the past (an owner that stopped beating)."""
    with store.engine.begin() as conn:
        conn.execute(
            text("UPDATE runs SET heartbeat = heartbeat - :s WHERE run_key = :k"),
            {"s": seconds, "k": key},
        )


def snapshot(store) -> list[tuple]:
    with store.engine.connect() as conn:
        return conn.execute(
            select(Run.run_key, Run.status, Run.owner, Run.epochs_done, Metric.name, Metric.value)
            .outerjoin(Metric)
            .order_by(Run.run_key, Metric.name, Metric.corruption, Metric.severity)
        ).all()


@pytest.fixture
def store(db_url):
    store = open_store(db_url)
    yield store
    store.engine.dispose()


def test_a_new_key_is_claimed_and_a_finished_run_is_skipped(store):
    got = claim(store, "k", "a")
    assert got == Claim("k", got.run_id, None, None, 0, False)
    run = store.get_run("k")
    assert (run.status, run.owner, run.provenance) == (RunStatus.running, "a", {"owner": "a"})
    finish(store, "k", "a")
    for owner in ("a", "b"):
        skip = claim(store, "k", owner)
        assert isinstance(skip, Skip) and skip.reason == "finished", skip
        assert skip.detail.startswith("finished at ")
    assert store.get_run("k").status is RunStatus.finished


def test_a_live_claim_of_another_owner_is_skipped_with_who_holds_it(store):
    claim(store, "k", "host-a:1234")
    skip = claim(store, "k", "host-b:99")
    assert skip.key == "k" and skip.reason == "claimed"
    assert re.fullmatch(r"claimed by host-a:1234 \(heartbeat \d+ s ago\)", skip.detail)
    assert store.get_run("k").owner == "host-a:1234"


def test_the_same_owner_claims_its_own_run_again(store):
    claim(store, "k", "a")
    assert store.record_epoch("k", 3, owner="a")
    again = claim(store, "k", "a")
    assert again == Claim("k", again.run_id, RunStatus.running, "a", 3, taken_over=False)
    assert store.get_run("k").epochs_done == 3  # no reset: a resumed run keeps its epochs


def test_a_stale_claim_is_taken_over_and_its_old_owner_can_no_longer_write(store):
    claim(store, "k", "a")
    store.record_epoch("k", 2, owner="a")
    age(store, "k", LEASE + 5)
    got = claim(store, "k", "b")
    assert got == Claim("k", got.run_id, RunStatus.running, "a", 2, taken_over=True)
    before = snapshot(store)
    with pytest.raises(ClaimLost, match="no longer held by a .b holds it now"):
        finish(store, "k", "a", 0.9)
    assert not store.record_epoch("k", 5, owner="a")
    assert not store.mark("k", RunStatus.failed, "gone", owner="a")
    assert store.heartbeat("a", ["k"]) == set()
    assert snapshot(store) == before  # nothing the old owner did was written
    finish(store, "k", "b", 0.7)
    assert snapshot(store)[0][:2] == ("k", RunStatus.finished)


def test_a_killed_owner_stops_beating_and_its_run_is_taken_over(store):
    """A real process claims a run and is killed; once its lease runs out, another owner takes
    the run over."""
    child = SPAWN.Process(target=claim_and_hang, args=(str(store.engine.url.render_as_string(
        hide_password=False)), "k"))  # fmt: skip
    child.start()
    try:
        deadline = time.monotonic() + 120
        while store.get_run("k") is None:
            assert time.monotonic() < deadline and child.is_alive(), "the child never claimed"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        while not isinstance(got := claim(store, "k", "b", lease_seconds=0.5), Claim):
            assert got.reason == "claimed" and time.monotonic() < deadline, got
            time.sleep(0.1)
    finally:
        child.kill()
        child.join()
    assert got.taken_over and got.previous_owner == "doomed"


def claim_and_hang(url: str, key: str) -> None:
    store = open_store(url)
    claim(store, key, "doomed")
    while True:  # beats for a while, as a live owner does, until it is killed
        store.heartbeat("doomed", [key])
        time.sleep(0.1)


def test_a_failed_or_interrupted_run_is_claimed_by_anyone(store):
    for i, status in enumerate((RunStatus.failed, RunStatus.interrupted, RunStatus.diverged)):
        key = f"k{i}"
        claim(store, key, "a")
        store.record_epoch(key, 4, owner="a")
        assert store.mark(key, status, "why", owner="a")
        got = claim(store, key, "b")
        assert got == Claim(key, got.run_id, status, "a", 4, taken_over=False)
        run = store.get_run(key)
        assert (run.status, run.owner, run.error) == (RunStatus.running, "b", None)


def test_reset_drops_the_results_of_the_run_it_takes(store):
    claim(store, "k", "a")
    finish(store, "k", "a")
    claim(store, "k", "b", reset=True, rerun_finished_before=store.db_now() + 1)
    run = store.get_run("k")
    assert (run.epochs_done, run.finished_at) == (0, None)
    assert [row[4] for row in snapshot(store)] == [None]  # no metric rows left


def test_rerun_finished_before_takes_only_runs_finished_earlier(store):
    claim(store, "old", "a")
    finish(store, "old", "a")
    time.sleep(0.01)  # the database clock has millisecond steps on SQLite
    since = store.db_now()
    time.sleep(0.01)
    claim(store, "new", "a")
    finish(store, "new", "a")
    assert claim(store, "new", "b", rerun_finished_before=since).reason == "finished"
    got = claim(store, "old", "b", rerun_finished_before=since)
    assert isinstance(got, Claim) and got.previous is RunStatus.finished


def test_heartbeat_refreshes_and_returns_only_the_runs_the_owner_holds(store):
    for key in ("k1", "k2", "done"):
        claim(store, key, "a")
    claim(store, "k3", "b")
    finish(store, "done", "a")
    for key in ("k1", "k2", "k3"):
        age(store, key, 30)
    held = store.heartbeat("a", ["k1", "k2", "k3", "done", "missing"])
    assert held == {"k1", "k2"}
    now = store.db_now()
    beats = {k: store.get_run(k).heartbeat for k in ("k1", "k2", "k3")}
    assert now - beats["k1"] < 25 and now - beats["k2"] < 25 and now - beats["k3"] >= 30
    assert store.heartbeat("a", []) == set()


def test_a_finish_by_an_owner_that_never_held_the_run_writes_nothing(store):
    with pytest.raises(ClaimLost, match="no such run"):
        finish(store, "nope", "a")
    claim(store, "k", "a")
    with pytest.raises(ClaimLost):
        finish(store, "k", "b")
    finish(store, "k", "a")
    with pytest.raises(ClaimLost, match="it is finished"):
        finish(store, "k", "a", 0.1)  # twice: the second finish is no longer a claim
    assert snapshot(store) == [("k", RunStatus.finished, "a", 1, "accuracy", 0.5)]


# --- processes racing ------------------------------------------------------------------------

KEYS = [f"key-{i:02d}" for i in range(20)]


def claim_all(url: str, owner: str, start, results) -> None:
    """Try to claim every key in a random order and finish the ones claimed, recording the
    owner's number as the result."""
    try:
        store = open_store(url)
        order = random.Random(owner).sample(KEYS, len(KEYS))
        start.wait()
        got = []
        for key in order:
            if isinstance(claim(store, key, owner), Claim):
                assert store.record_epoch(key, 1, owner=owner)
                finish(store, key, owner, float(owner[1:]))
                got.append(key)
        results.put((owner, got, None))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((owner, [], traceback.format_exc()))


def run_processes(target, argsets: list[tuple], start) -> list:
    results = SPAWN.Queue()
    processes = [SPAWN.Process(target=target, args=(*a, start, results)) for a in argsets]
    for p in processes:
        p.start()
    try:
        got = [results.get(timeout=300) for _ in processes]
    finally:
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [f"{who}:\n{err}" for who, _, err in got if err]
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in processes)
    return got


def test_four_processes_claiming_the_same_runs_finish_each_exactly_once(store):
    url = store.engine.url.render_as_string(hide_password=False)
    start = SPAWN.Barrier(4)
    got = run_processes(claim_all, [(url, f"w{i}") for i in range(4)], start)
    claimed = [key for _, keys, _ in got for key in keys]
    assert sorted(claimed) == KEYS  # every key once, none twice
    by_owner = {key: owner for owner, keys, _ in got for key in keys}
    rows = snapshot(store)
    assert [(k, s, o, e) for k, s, o, e, _, _ in rows] == [
        (key, RunStatus.finished, by_owner[key], 1) for key in KEYS
    ]
    assert all(value == float(by_owner[key][1:]) for key, *_, value in rows)


REFERENCE = ("batchnorm", "sgd")


def corruption_rows(error: float) -> list[MetricRow]:
    from normbench.corruptions import BENCHMARK, SEVERITIES  # imports torch: only where needed

    return [MetricRow("accuracy", 0.9, "test")] + [
        MetricRow("accuracy", 1 - error * (1 + s / 10), "test", c, s)
        for c in BENCHMARK
        for s in SEVERITIES
    ]


def finisher(url: str, runs: list[tuple[str, str, int, float]], start, results) -> None:
    """Finish ``runs`` one by one, each followed by an mCE update, as a runner does."""
    try:
        store = open_store(url)
        start.wait()
        for key, norm, seed, error in runs:
            spec = {**SPEC, "norm": norm, "seed": seed}
            store.claim_run(spec, key, owner="finisher", lease_seconds=LEASE, device="cpu",
                            provenance={}, config=spec, reset=True)  # fmt: skip
            finish(store, key, "finisher", rows=corruption_rows(error))
            store.update_mce("s", "smoke", REFERENCE, protocol_version=1)
        results.put(("finisher", [], None))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put(("finisher", [], traceback.format_exc()))


def updater(url: str, name: str, done, start, results) -> None:
    """Recompute mCE rows over and over while runs finish, and once more after."""
    try:
        store = open_store(url)
        start.wait()
        while not done.is_set():
            store.update_mce("s", "smoke", REFERENCE, protocol_version=1)
        store.update_mce("s", "smoke", REFERENCE, protocol_version=1)
        results.put((name, [], None))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((name, [], traceback.format_exc()))


def test_concurrent_mce_updates_while_runs_finish_give_the_rows_of_one_update(store):
    url = store.engine.url.render_as_string(hide_password=False)
    runs = [(f"r{i}", "batchnorm" if i % 3 == 0 else "layernorm", i, 0.1 + 0.02 * i)
            for i in range(9)]  # fmt: skip
    start, done = SPAWN.Barrier(3), SPAWN.Event()
    results = SPAWN.Queue()
    processes = [SPAWN.Process(target=finisher, args=(url, runs, start, results))] + [
        SPAWN.Process(target=updater, args=(url, f"u{i}", done, start, results)) for i in range(2)
    ]
    for p in processes:
        p.start()
    try:
        first = results.get(timeout=300)  # the finisher, unless an updater failed first
        done.set()
        got = [first] + [results.get(timeout=300) for _ in processes[1:]]
    finally:
        done.set()
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    errors = [f"{who}:\n{err}" for who, _, err in got if err]
    assert not errors, "\n".join(errors)

    def mce_rows():
        with store.engine.connect() as conn:
            return conn.execute(
                select(Run.run_key, Metric.name, Metric.value, Run.provenance)
                .join(Metric)
                .where(Metric.name.in_(("mce", "relative_mce")))
                .order_by(Run.run_key, Metric.name)
            ).all()

    concurrent = mce_rows()
    assert store.update_mce("s", "smoke", REFERENCE, protocol_version=1) == len(runs)
    assert mce_rows() == concurrent
    assert [(k, n) for k, n, _, _ in concurrent] == [
        (key, name) for key, *_ in sorted(runs) for name in ("mce", "relative_mce")
    ]
    seeds = [seed for _, norm, seed, _ in runs if norm == "batchnorm"]
    assert {p["mce_reference"] for *_, p in concurrent} == {f"batchnorm + sgd, seeds {seeds}"}
