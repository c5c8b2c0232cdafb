"""A throwaway PostgreSQL server for the store tests: Debian's binaries, a temporary directory,
127.0.0.1 on a free port, run as an unprivileged user when the tests run as root."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

UNPRIVILEGED = 65534  # nobody


class Unavailable(Exception):
    """Why PostgreSQL tests are skipped (one line)."""


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).parent
    raise Unavailable("PostgreSQL is not installed (apt-get install postgresql)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields the URL of a superuser connection to the `postgres` database (trust auth)."""
    bindir = _bindir()
    root = Path(tempfile.mkdtemp(prefix="bridge-pg-"))
    data, sockets, logfile = root / "data", root / "sock", root / "log"
    sockets.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        for path in (root, sockets):
            os.chown(path, UNPRIVILEGED, UNPRIVILEGED)
        prefix = ["setpriv", f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}",
                  "--clear-groups", "--"]
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    port = _free_port()

    def run(*args: str) -> None:
        result = subprocess.run([*prefix, *args], env=env, cwd=root, capture_output=True,
                                text=True, timeout=60, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
            raise Unavailable(f"{Path(args[0]).name} failed: {tail[0]}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-w", "-t", "30",
            "-o", f"-h 127.0.0.1 -p {port} -k {sockets} -c fsync=off "
                  "-c full_page_writes=off -c synchronous_commit=off",
            "start")
    except (Unavailable, OSError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(root, ignore_errors=True)
        raise Unavailable(str(e) if isinstance(e, Unavailable)
                          else f"cannot start PostgreSQL: {e}") from None
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        with suppress(Unavailable, subprocess.TimeoutExpired):
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
