"""Run a server (`python -m server`, the bare relay) as a child process, for the bench and tests.

`server_process` starts it, waits until `GET /` answers 200, and fails loudly, with the child's
stderr, when it exits or never answers. Its stderr is collected line by line (an `Inbox`), so a
test can wait for a log line; on the way out the child is ended and reaped.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TypeVar

import aiohttp

from server.testing.inbox import Inbox

T = TypeVar("T")


class ServerFailed(RuntimeError):
    """The child never answered, or exited; the message carries its stderr."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_main(main: Callable[[], Awaitable[T]]) -> T:
    """Run a tool's asyncio entry point on uvloop when it is installed (as the product does),
    so a baseline or load generator never runs on a slower loop than the bridge."""
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return asyncio.run(_call(main))
    result: T = uvloop.run(_call(main))
    return result


def loop_name() -> str:
    """The event loop `run_main` uses here."""
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


async def _call(main: Callable[[], Awaitable[T]]) -> T:
    return await main()


class ServerProcess:
    """A running child server: its pid, base URL and stderr lines."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, name: str) -> None:
        self.proc = proc
        self.url = url  # e.g. http://127.0.0.1:5050
        self.name = name
        self.log: Inbox[str] = Inbox()
        self._reader = asyncio.get_running_loop().create_task(self._read_stderr())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """Everything it wrote to stderr so far."""
        return "".join(self.log.items)

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            while True:
                try:
                    line = await self.proc.stderr.readline()
                except ValueError:  # a line over the stream limit: keep going
                    self.log.add("<a line too long to keep>\n")
                    continue
                if not line:
                    return
                self.log.add(line.decode(errors="replace"))
        finally:
            self.log.close()

    async def wait_for_line(self, containing: str, timeout: float = 5.0) -> str:
        """The first stderr line containing this text, waiting for it; ServerFailed if the
        child's stderr ends (it exited) first."""
        try:
            return await self.log.wait_for(lambda line: containing in line, timeout=timeout,
                                           what=f"log line containing {containing!r}")
        except (EOFError, TimeoutError) as e:
            raise ServerFailed(f"{self.name}: {e}; its stderr:\n{self.output()}") from None

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 10.0) -> int:
        """Its exit status, once it has exited and its stderr is read to the end."""
        async with asyncio.timeout(timeout):
            status = await self.proc.wait()
            await asyncio.shield(self._reader)
        return status

    async def wait_until_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
            while True:
                if self.proc.returncode is not None:
                    with suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self._reader), 2.0)
                    raise ServerFailed(
                        f"{self.name} exited with status {self.proc.returncode} before "
                        f"answering on {self.url}; its stderr:\n{self.output()}")
                try:
                    async with http.get(self.url + "/") as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if loop.time() > deadline:
                    raise ServerFailed(f"{self.name} did not answer on {self.url} within "
                                       f"{timeout:g} s; its stderr:\n{self.output()}")
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        """End it (SIGTERM, then SIGKILL after 5 s) and reap it."""
        if self.proc.returncode is None:
            with suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5.0)
            except TimeoutError:
                with suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


async def start_server(env: Mapping[str, str], *, module: str = "server",
                       cwd: Path | None = None, ready_timeout: float = 15.0,
                       name: str | None = None) -> ServerProcess:
    """`python -m <module>` with exactly this environment (HOST and PORT say where it
    listens), ready to take requests; the caller must `close()` it. For tests that start
    several at once or end one mid-test; `server_process` is the same as a context manager.
    `name` (e.g. "instance A") labels it in failures."""
    host, port = env.get("HOST", "127.0.0.1"), env["PORT"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, env=dict(env), cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    server = ServerProcess(proc, f"http://{host}:{port}", name or f"`python -m {module}`")
    try:
        await server.wait_until_ready(ready_timeout)
    except BaseException:
        await server.close()
        raise
    return server


@asynccontextmanager
async def server_process(env: Mapping[str, str], *, module: str = "server",
                         cwd: Path | None = None, ready_timeout: float = 15.0,
                         ) -> AsyncIterator[ServerProcess]:
    """`python -m <module>` with exactly this environment (HOST and PORT say where it
    listens), ready to take requests; ended and reaped on the way out."""
    server = await start_server(env, module=module, cwd=cwd, ready_timeout=ready_timeout)
    try:
        yield server
    finally:
        await server.close()
