"""Random ``kill -9``s of orchestrators and workers during a suite, then checks that nothing was
lost, duplicated or changed.

1. Reference: the suite (by default a tiny cifar10 suite written to a temporary folder: the fast
   net at widths 16-32-32-32, 3 epochs on 1,024 training images, 3 norms x 2 optimizers = 6 runs, so
   kills land mid-run and between epochs) runs uninterrupted into database A, with one
   ``normbench run`` process.
2. Fuzzed: database B with its own checkpoint folder and ``NORMBENCH_LEASE_SECONDS=4`` (a dead
   process's claims go stale in seconds). Two ``normbench run`` processes work on it; at random
   intervals (1-10 s, from a seeded RNG) one target is killed with SIGKILL: an orchestrator, or a
   worker (a process running ``runners.worker`` whose parent is one of the orchestrators, found
   through /proc), drawn with even odds; when a worker is drawn and none runs, the kill waits for
   one (else, on a loaded machine, every kill would hit an orchestrator still starting), and an
   orchestrator that runs a worker is preferred, as its claim is what another must take over.
   This goes on until ``--kills`` kills are done. A killed orchestrator is restarted at once,
   and one that exited by itself (its run failed because its worker was killed) while kills are
   still to come. Then the orchestrators finish; if the suite is not complete when they have all
   exited, ``normbench run`` is started again until it is (at most 5 times).
3. Checks, printed as a table and as the exit status (0 only if all hold): ``PRAGMA
   integrity_check`` of both databases; every planned run has exactly one row, finished; no run
   lost or duplicated (rows, and ``done`` lines across every orchestrator's output); every run's
   reproducible metrics (accuracy, loss, ECE, corruption accuracies, parameter count, epochs:
   everything but times, throughputs, memory and speed ratios) and curves equal (==) to A's; no
   worker or orchestrator of the benchmark left running.

The dataset cache is a private temporary folder (``--cache-dir`` to reuse one); the first decode of
CIFAR-10 into it takes about 20 s.

    python bench/kill_fuzz.py --data-dir ../shared/data [--kills 20] [--seed 0]
        [--suite PATH --budget B] [--timeout S] [--cache-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from normbench.errors import NormbenchError

ORCHESTRATORS = 2
LEASE_SECONDS = "4"
KILL_INTERVAL = (1.0, 10.0)  # seconds between kills
RETRIES = 5  # sequential normbench runs at most, to complete the suite after the fuzzing
# Metrics that measure the machine, not the run's numbers: they may differ between A and B.
MEASURED = {
    "train_images_per_s",
    "eval_images_per_s",
    "train_time_s",
    "wall_time_s",
    "run_peak_memory_mb",
    "speed_vs_batchnorm",
    "speed_vs_batchnorm_iqr",
}
REQUIRED = {"accuracy", "loss", "ece", "param_count", "epochs"}

TINY = """
name = "{name}"
description = "A cifar10 suite of a few 3-epoch runs for the kill benchmark."
protocol_version = 1
task = "classify"
dataset = "cifar10"
norms = ["batchnorm", "groupnorm", "layernorm"]
optimizers = ["sgd", "adamw"]
seeds = [0]
reference = {{ norm = "batchnorm", optimizer = "sgd" }}

[budgets.smoke]
model = "fastnet"
model_args = {{ widths = [16, 32, 32, 32] }}
epochs = 3
batch_size = 128
eval_batch_size = 500
train_subset = 1024
test_subset = 500
precision = "fp32"
speed_pairs = 0
schedule = "onecycle"
warmup = 0.25
label_smoothing = 0.2
augment = {{ crop_padding = 2, flip = true }}
optimizers.sgd = {{ lr = 0.2, momentum = 0.9, nesterov = true, weight_decay = 5e-4 }}
optimizers.adamw = {{ lr = 3e-3, weight_decay = 0.05 }}
"""


# --- processes ------------------------------------------------------------------------------------


def normbench_command() -> list[str]:
    script = Path(sys.executable).with_name("normbench")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from normbench.cli import main; main()"]


@dataclass
class Proc:
    """A /proc entry: parent, command line, state."""

    ppid: int
    cmdline: bytes
    state: str


def processes() -> dict[int, Proc]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # The command name in parentheses may hold anything: parse after the last ")".
        fields = stat.rsplit(")", 1)[1].split()
        found[int(entry.name)] = Proc(int(fields[1]), cmdline, fields[0])
    return found


def has_environ(pid: int, entry: bytes) -> bool:
    try:
        return entry in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


class Runner:
    """Starts ``normbench run`` processes on one database, each with its own log."""

    def __init__(self, command: list[str], env: dict[str, str], logs: Path, name: str) -> None:
        self.command, self.env, self.logs, self.name = command, env, logs, name
        self.started: list[tuple[Path, subprocess.Popen]] = []

    def start(self) -> subprocess.Popen:
        log = self.logs / f"{self.name}-{len(self.started) + 1:02d}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(self.command, env=self.env, stdout=out, stderr=out)
        self.started.append((log, proc))
        return proc

    def outputs(self) -> list[str]:
        return [log.read_text(errors="replace") for log, _ in self.started]

    def kill_all(self) -> None:
        for _, proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- the database ---------------------------------------------------------------------------------


def connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)


def finished_keys(db: Path, keys: set[str]) -> set[str]:
    if not db.exists():
        return set()
    try:
        with connect(db) as conn:
            rows = conn.execute("SELECT run_key FROM runs WHERE status = 'finished'").fetchall()
    except sqlite3.Error:  # not created yet, or busy: not complete as far as we know
        return set()
    return {k for (k,) in rows} & keys


@dataclass
class RunRows:
    status: str
    metrics: dict[tuple, float] = field(default_factory=dict)
    curves: list[tuple] = field(default_factory=list)


def read_runs(db: Path) -> tuple[Counter, dict[str, RunRows]]:
    """Rows per run key, and each run's status, reproducible metrics and curves."""
    with connect(db) as conn:
        runs = conn.execute("SELECT id, run_key, status FROM runs").fetchall()
        metrics = conn.execute(
            "SELECT run_id, name, split, corruption, severity, value FROM metrics"
        ).fetchall()
        curves = conn.execute("SELECT run_id, epoch, name, value FROM curve_points").fetchall()
    per_key = Counter(key for _, key, _ in runs)
    by_id = {run_id: RunRows(status) for run_id, _, status in runs}
    for run_id, name, split, corruption, severity, value in metrics:
        if name not in MEASURED:
            by_id[run_id].metrics[name, split, corruption, severity] = value
    for run_id, epoch, name, value in curves:
        by_id[run_id].curves.append((epoch, name, value))
    for rows in by_id.values():
        rows.curves.sort()
    return per_key, {key: by_id[run_id] for run_id, key, _ in runs}


def integrity(db: Path) -> str:
    if not db.exists():
        return "no database"
    with connect(db) as conn:
        return ", ".join(row[0] for row in conn.execute("PRAGMA integrity_check").fetchall())


# --- the benchmark --------------------------------------------------------------------------------


@dataclass
class Fuzz:
    kills: Counter = field(default_factory=Counter)  # by kind of target
    exit_codes: list[int] = field(default_factory=list)  # of processes not killed by us
    retries: int = 0
    stopped_early: str = ""
    seconds: float = 0.0


def fuzz(runner: Runner, db: Path, keys: set[str], kills: int, seed: int, timeout: float) -> Fuzz:
    """Keep the orchestrators going while killing targets; then let them finish and complete the
    suite. A slot is None once its orchestrator exited by itself and is not restarted."""
    rng = random.Random(seed)
    result = Fuzz()
    start = time.monotonic()
    deadline = start + timeout
    slots: list[subprocess.Popen | None] = [runner.start() for _ in range(ORCHESTRATORS)]
    killed: set[int] = set()  # orchestrators killed by us: restarted at once
    next_kill = start + rng.uniform(*KILL_INTERVAL)
    drawn: str | None = None  # the kind of the next target, drawn once per kill
    checked, complete = 0.0, False

    def note(text: str) -> None:
        print(f"{time.monotonic() - start:7.1f} s  {text}", flush=True)

    def restart_killed(i: int, proc: subprocess.Popen) -> None:
        killed.discard(proc.pid)
        slots[i] = runner.start()
        note(f"restart orchestrator {i + 1}")

    while time.monotonic() < deadline:
        if time.monotonic() - checked > 1.0:
            complete, checked = finished_keys(db, keys) == keys, time.monotonic()
        kills_left = sum(result.kills.values()) < kills
        for i, proc in enumerate(slots):
            if proc is None or proc.poll() is None:
                continue
            if proc.pid in killed:
                restart_killed(i, proc)
                continue
            result.exit_codes.append(proc.returncode)
            if kills_left and not complete:
                slots[i] = runner.start()
                note(f"orchestrator {i + 1} exited ({proc.returncode}); restart it")
            else:
                slots[i] = None
        if not kills_left:
            break
        if all(p is None for p in slots):
            result.stopped_early = "the suite completed before every kill was done"
            break
        if time.monotonic() < next_kill:
            time.sleep(0.1)
            continue
        live = {p.pid: i for i, p in enumerate(slots) if p is not None and p.poll() is None}
        table = processes()
        workers = sorted(
            pid
            for pid, p in table.items()
            if p.ppid in live and b"runners.worker" in p.cmdline and p.state != "Z"
        )
        if drawn is None:
            drawn = rng.choice(["orchestrator", "worker"])
        if not (workers if drawn == "worker" else live):
            time.sleep(0.1)  # wait for a target of the kind drawn (a worker: until a run starts)
            continue
        if drawn == "orchestrator":
            # One that runs a worker when there is one: its claim is what another must take over.
            busy = sorted({table[w].ppid for w in workers}) or sorted(live)
            pid = rng.choice(busy)
            busy = any(table[w].ppid == pid for w in workers)
            what = f"orchestrator {live[pid] + 1} (pid {pid}, {'with' if busy else 'no'} worker)"
            kind = "orchestrator with a worker" if busy else "orchestrator without one"
            killed.add(pid)
        else:
            pid = rng.choice(workers)
            what = f"worker {pid} of orchestrator {live[table[pid].ppid] + 1}"
            kind = "worker"
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile: draw again
            killed.discard(pid)
            continue
        result.kills[kind] += 1
        note(f"kill -9 #{sum(result.kills.values())}: {what}")
        next_kill = time.monotonic() + rng.uniform(*KILL_INTERVAL)
        drawn = None
    else:
        result.stopped_early = f"timed out after {timeout:.0f} s"

    # Let the orchestrators finish (restarting the ones killed last), then complete the suite.
    for i, proc in enumerate(slots):
        if proc is not None and proc.pid in killed:
            proc.wait()
            restart_killed(i, proc)

    def wait(proc: subprocess.Popen) -> None:
        try:
            result.exit_codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            result.stopped_early = f"timed out after {timeout:.0f} s"
            runner.kill_all()

    for proc in slots:
        if proc is not None and not result.stopped_early:
            wait(proc)
    while not result.stopped_early and finished_keys(db, keys) != keys and result.retries < RETRIES:
        result.retries += 1
        note("suite incomplete: normbench run again")
        wait(runner.start())
    result.seconds = time.monotonic() - start
    return result


def shown(cmdline: bytes) -> str:
    return cmdline.replace(b"\0", b" ").decode(errors="replace")[:80]


def leftovers(cache: Path, runner_pids: set[int]) -> list[str]:
    """Workers or orchestrators of this benchmark still running (waiting a few seconds for the
    death signal of workers whose orchestrator just died): our processes, workers whose parent
    is one of them, and any worker or normbench process with this benchmark's cache directory in
    its environment (a worker whose orchestrator died has another parent)."""
    marker = f"NORMBENCH_CACHE_DIR={cache}".encode()
    deadline = time.monotonic() + 10
    while True:
        left = [
            f"{pid} {shown(p.cmdline)}"
            for pid, p in processes().items()
            if p.state != "Z"
            and (
                pid in runner_pids
                or b"runners.worker" in p.cmdline
                and p.ppid in runner_pids
                or (b"runners.worker" in p.cmdline or b"normbench" in p.cmdline)
                and has_environ(pid, marker)
            )
        ]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("NORMBENCH_DATA_DIR"))
    parser.add_argument("--suite", type=Path, help="another suite file")
    parser.add_argument("--budget", help="the budget of --suite (default smoke)")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the fuzzed part")
    parser.add_argument("--cache-dir", help="dataset cache to use (default: a private one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and logs")
    args = parser.parse_args()
    if args.kills < 0:
        parser.error("--kills must not be negative")

    work = Path(tempfile.mkdtemp(prefix="normbench-killfuzz-"))
    cache = Path(args.cache_dir).resolve() if args.cache_dir else work / "cache"
    os.environ["NORMBENCH_CACHE_DIR"] = str(cache)
    try:
        return bench(args, work, cache)
    except NormbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"\nwork folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench(args, work: Path, cache: Path) -> int:
    from normbench.suites import load_suite, plan
    from runners.suite import check_data, label

    total_start = time.monotonic()
    suite_path = args.suite
    if suite_path is None:
        suite_path = work / "killfuzz.toml"
        suite_path.write_text(TINY.format(name=f"killfuzz-{uuid.uuid4().hex[:8]}"))
    budget = args.budget or "smoke"
    specs = plan(load_suite(str(suite_path)), budget)
    keys = {s.key for s in specs}
    labels = {label(s): s.key for s in specs}
    print(
        f"Suite {specs[0].suite} at budget {budget}: {len(specs)} runs of "
        f"{specs[0].settings['epochs']} epochs; {args.kills} kills, seed {args.seed}"
    )
    t = time.monotonic()
    check_data(specs, args.data_dir)
    print(
        f"Data: loaded into the cache {cache} in {time.monotonic() - t:.1f} s (a first decode "
        "of CIFAR-10 takes about 20 s)",
        flush=True,
    )

    command = [
        *normbench_command(),
        "run",
        f"--suite={suite_path}",
        f"--budget={budget}",
        "--device=cpu",
    ] + ([f"--data-dir={args.data_dir}"] if args.data_dir else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    db_a, db_b = work / "a.db", work / "b.db"
    reference = Runner(
        [*command, f"--db={db_a}"],
        {**env, "NORMBENCH_CHECKPOINT_DIR": str(work / "checkpoints-a")},
        work,
        "reference",
    )
    t = time.monotonic()
    code = reference.start().wait()
    reference_seconds = time.monotonic() - t
    print(
        f"Reference: one uninterrupted normbench run into A, {reference_seconds:.0f} s, exit "
        f"status {code}",
        flush=True,
    )
    if code != 0:
        print(reference.outputs()[-1][-3000:])
        print("The reference run failed; nothing to compare against.")
        return 1

    fuzzed = Runner(
        [*command, f"--db={db_b}"],
        {
            **env,
            "NORMBENCH_CHECKPOINT_DIR": str(work / "checkpoints-b"),
            "NORMBENCH_LEASE_SECONDS": LEASE_SECONDS,
        },
        work,
        "fuzzed",
    )
    print(
        f"Fuzzed: {ORCHESTRATORS} normbench run processes on B, NORMBENCH_LEASE_SECONDS="
        f"{LEASE_SECONDS}",
        flush=True,
    )
    try:
        f = fuzz(fuzzed, db_b, keys, args.kills, args.seed, args.timeout)
    finally:
        fuzzed.kill_all()
    print(f"Fuzzed part: {f.seconds:.0f} s{'; ' + f.stopped_early if f.stopped_early else ''}")

    outputs = fuzzed.outputs()
    lines = [line for output in outputs for line in output.splitlines()]
    done = Counter(line[5:].split(":", 1)[0] for line in lines if line.startswith("done "))
    take_overs = sum(line.startswith("take over ") for line in lines)
    resumes = sum(line.startswith("resume ") for line in lines)
    tracebacks = sum("Traceback" in line for line in lines)

    checks: list[tuple[str, bool, str]] = []
    for name, db in (("A", db_a), ("B", db_b)):
        verdict = integrity(db)
        checks.append((f"PRAGMA integrity_check of {name}", verdict == "ok", verdict))
    rows_a, runs_a = read_runs(db_a)
    rows_b, runs_b = read_runs(db_b)
    one_row = [k for k in keys if rows_b.get(k) == 1 and runs_b[k].status == "finished"]
    checks.append(
        (
            "every planned run: one row, finished",
            len(one_row) == len(keys),
            f"{len(one_row)} of {len(keys)}",
        )
    )
    lost = sorted(k for k in keys if k not in runs_b or runs_b[k].status != "finished")
    checks.append(("no run lost", not lost, " ".join(lost) or "none"))
    dup_rows = {k: n for k, n in rows_b.items() if n > 1}
    dup_done = {lb: n for lb, n in done.items() if n > 1}
    extra = sorted(set(rows_b) - keys)
    checks.append(
        (
            "no run duplicated (rows, done lines)",
            not dup_rows and not dup_done and not extra,
            f"rows {dup_rows or 0}, done lines {dup_done or 0}, unplanned rows {len(extra)}",
        )
    )
    bad_metrics, bad_curves, missing = [], [], []
    for key in sorted(keys):
        a, b = runs_a.get(key), runs_b.get(key)
        if a is None or b is None:
            continue
        present = {name for name, *_ in a.metrics}
        if missed := REQUIRED - present:
            missing.append(f"{key}: no {', '.join(sorted(missed))}")
        if a.metrics != b.metrics:
            differ = sorted(set(a.metrics.items()) ^ set(b.metrics.items()))[:3]
            bad_metrics.append(f"{key}: {differ}")
        if a.curves != b.curves:
            differ = sorted(set(a.curves) ^ set(b.curves))[:3]
            bad_curves.append(f"{key}: {differ}")
    names = sorted({n for r in runs_a.values() for n, *_ in r.metrics})
    checks.append(
        (
            "reproducible metrics == A's",
            not bad_metrics and not missing,
            "; ".join(bad_metrics + missing) or f"identical ({', '.join(names)})",
        )
    )
    checks.append(("curves == A's", not bad_curves, "; ".join(bad_curves) or "identical"))
    runner_pids = {p.pid for _, p in [*reference.started, *fuzzed.started]}
    left = leftovers(cache, runner_pids)
    checks.append(("no worker or orchestrator left", not left, "; ".join(left) or "none"))
    checks.append(("no traceback in the outputs", not tracebacks, str(tracebacks)))

    print("\nCheck                                    Result  Detail")
    for name, ok, detail in checks:
        print(f"{name:40} {'ok' if ok else 'FAILED':6}  {detail}")
    orchestrators = f.kills["orchestrator with a worker"] + f.kills["orchestrator without one"]
    print(
        f"\nKills: {sum(f.kills.values())} ({orchestrators} orchestrators, "
        f"{f.kills['orchestrator with a worker']} of them running a worker; "
        f"{f.kills['worker']} workers); orchestrator processes started: "
        f"{len(fuzzed.started)}; normbench run again after they all exited: {f.retries}"
    )
    print(
        f'Take-overs ("take over" lines): {take_overs}; resumed runs ("resume" lines): '
        f"{resumes}; exit statuses of processes not killed: "
        f"{' '.join(map(str, f.exit_codes)) or '-'}"
    )
    leftover = [p.name for p in (work / "checkpoints-b").glob("*") if p.is_dir()]
    print(f"Checkpoint folders left in B's checkpoint dir: {len(leftover)}")
    print(f'Runs done ("done" lines per run): {", ".join(f"{lb}: {done[lb]}" for lb in labels)}')
    print(
        f"Total time: {time.monotonic() - total_start:.0f} s (reference {reference_seconds:.0f} "
        f"s, fuzzed {f.seconds:.0f} s)"
    )
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
