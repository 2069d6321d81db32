"""A throwaway PostgreSQL server for the tests, run from the installed binaries.

``start(folder)`` makes a cluster in ``folder`` (trust authentication, superuser ``postgres``),
starts it on 127.0.0.1 at a free port with its unix socket in the folder, and returns the admin
URL; ``stop(folder)`` stops it. As root, the server runs as the ``postgres`` user (PostgreSQL
refuses to run as root), which then owns the folder.

    python tests/pgserver.py start DIR   # prints postgresql+psycopg://postgres@127.0.0.1:PORT/postgres
    python tests/pgserver.py stop DIR
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ADMIN = "postgres"
PORT_FILE = "port"


def binaries() -> Path | None:
    """The folder of the newest installed PostgreSQL server binaries, if any."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", ADMIN, "--", *args] if os.geteuid() == 0 else args


def _run(args: list[str]) -> None:
    done = subprocess.run(_as_server_user(args), capture_output=True, text=True)
    if done.returncode:
        output = f"{done.stdout}{done.stderr}"
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{output}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url(folder: Path, database: str = ADMIN) -> str:
    port = (Path(folder) / PORT_FILE).read_text().strip()
    return f"postgresql+psycopg://{ADMIN}@127.0.0.1:{port}/{database}"


def start(folder: str | Path) -> str:
    """Create and start a cluster in ``folder`` (made if missing); returns the admin URL."""
    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    folder = Path(folder).resolve()
    data = folder / "data"
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(folder, ADMIN, ADMIN)
        # The server user must reach the folder through every parent (mktemp makes it 0700).
        folder.chmod(0o755)
    _run([str(bin_dir / "initdb"), "-D", str(data), "-U", ADMIN, "--auth=trust",
          "--encoding=UTF8", "--no-sync"])  # fmt: skip
    # The port is picked just before the server binds it; another process could take it in
    # between, which makes pg_ctl fail with the reason in the log (then start again).
    port = _free_port()
    options = f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off -c max_connections=100"
    _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"),
          "-o", options, "-w", "-t", "60", "start"])  # fmt: skip
    (folder / PORT_FILE).write_text(str(port))
    return url(folder)


def stop(folder: str | Path) -> None:
    """Stop the server of ``folder`` (fast shutdown: open connections are closed)."""
    bin_dir = binaries()
    data = Path(folder).resolve() / "data"
    if bin_dir is None or not (data / "postmaster.pid").exists():
        return
    _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/pgserver.py start|stop DIR", file=sys.stderr)
        return 2
    command, folder = argv
    if command == "start":
        print(start(folder))
    else:
        stop(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
