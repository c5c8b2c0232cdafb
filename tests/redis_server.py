"""A real `redis-server` for tests: on a free loopback port, in a temp dir, nothing persisted.

`redis_server` is a session fixture (one server for the whole run; tests keep apart by key
prefix). `RedisServer` starts extra short-lived ones, e.g. to stop one under a client.
Without `redis-server` on PATH (Debian package `redis-server`) the tests that ask for it skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import uuid4

import pytest

NOT_INSTALLED = "redis-server not on PATH (apt-get install redis-server)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process. `start()` waits until it answers PING; `stop()` ends it.

    The port is kept across stop/start, so a client can watch the same address come back."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError(NOT_INSTALLED)
        self.binary = binary
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="redis-test-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self._proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._dir.name, "--protected-mode", "yes"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._proc.poll() is not None:
                out = self._proc.stdout.read().decode(errors="replace") if self._proc.stdout else ""
                self._close_pipe()
                raise RuntimeError(f"redis-server exited ({self._proc.returncode}): {out[-500:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @contextmanager
    def stalled(self) -> Iterator[None]:
        """The server frozen with SIGSTOP (connections stay open, nothing answers: a hung
        Redis), and always thawed with SIGCONT on the way out."""
        proc = self._proc
        assert proc is not None, "not running"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def _close_pipe(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def cleanup(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def start_or_skip(port: int | None = None) -> RedisServer:
    """A started server, or skip the test with one line saying why."""
    if shutil.which("redis-server") is None:
        pytest.skip(NOT_INSTALLED)
    for attempt in range(3):  # a free port can be taken between choosing and binding it
        server = RedisServer(port)
        try:
            server.start()
        except RuntimeError:
            server.cleanup()
            if port is not None or attempt == 2:
                raise
            continue
        except BaseException:
            server.cleanup()
            raise
        return server
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the test session (skips when it is not installed)."""
    server = start_or_skip()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own, so tests sharing the server never see each other."""
    return f"test-{uuid4().hex[:12]}:"


__all__ = ["NOT_INSTALLED", "RedisServer", "free_port", "redis_prefix", "redis_server",
           "start_or_skip"]
