"""WORKERS=N: N processes serving one HOST:PORT, each a complete bridge.

Why SO_REUSEPORT and not gunicorn's aiohttp worker:
- no extra dependency, and no second way to start the server: each process runs the very same
  `serve()` as `make run` (same signals, same drain or handover, same shutdown order), where
  gunicorn would own the signals and its own graceful-timeout logic next to ours;
- every process opens its own listening socket on the same port (`web.TCPSite(...,
  reuse_port=True)`) and the kernel spreads new connections across them, so there is no
  accept lock, no shared socket handed over a fork, and one slow process does not hold others'
  accepts;
- a call is one long-lived WebSocket bound to the process that accepted it; what must be seen
  across processes (stream tokens, MAX_CALLS, decisions, handover context, admin actions) goes
  through the shared state (REDIS_URL), exactly as across machines. Each process is one fleet
  instance with its own lease.

This module only supervises: it forks, forwards SIGTERM/SIGINT to the children (which then
drain or hand over), and waits. It works where SO_REUSEPORT does (Linux, BSDs, macOS).

Metrics: a scrape of /metrics reaches one worker, so the supervisor makes a fresh directory
for prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, under TMPDIR), where every
worker keeps its metrics and from which any worker's /metrics sums them all; a worker that ends
stops counting towards the live gauge, and the directory is removed once all have exited.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from server.metrics import MULTIPROC_ENV

log = logging.getLogger("server.workers")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_Handler = Callable[[int, FrameType | None], Any] | int | None
_worker: int | None = None  # in a worker process: its index


def current_worker() -> int | None:
    """This process's index with WORKERS=N (0..N-1), or None when it is the only process: what
    names a worker's own files (its records spool)."""
    return _worker


def run_workers(n: int, serve_one: Callable[[int], object]) -> int:
    """Run `serve_one(index)` in `n` child processes; return the exit status for `sys.exit`.

    `serve_one` must build everything it uses (app, event loop, connections) itself, in the
    child, and listen with `reuse_port=True`. SIGTERM or SIGINT to this process is forwarded
    once to every child (a second one too: it hurries the drain, as in one process). If a child
    fails, or exits without being asked to, the others are stopped and the status is non-zero.
    Children sit in their own process groups so a terminal's Ctrl-C reaches them once, through
    here, and each one stops by itself if this process dies. The children share a metrics
    directory (PROMETHEUS_MULTIPROC_DIR), made here and removed when they are all gone."""
    if n < 1:
        raise ValueError("n must be at least 1")
    metrics_dir = tempfile.mkdtemp(prefix="phone-bridge-metrics-")
    earlier = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        return _supervise(n, serve_one, metrics_dir)
    finally:
        if earlier is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = earlier
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(n: int, serve_one: Callable[[int], object], metrics_dir: str) -> int:
    children: dict[int, int] = {}  # pid -> index
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            log.info("signal %s: stopping %d worker(s)", signal.Signals(signum).name,
                     len(children))
        stopping = True
        _signal_all(children, signum)

    previous: dict[int, _Handler] = {sig: signal.signal(sig, forward) for sig in _SIGNALS}
    parent = os.getpid()
    try:
        for index in range(n):
            if stopping:
                break
            # Block our signals across fork: the child must not run `forward`, and a signal
            # arriving now is handled (and forwarded to this child too) once its pid is known.
            signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
            try:
                pid = os.fork()
                if pid == 0:
                    _child(index, parent, previous, serve_one)  # never returns
                children[pid] = index
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        log.info("%d worker process(es) started: %s", len(children),
                 ", ".join(str(pid) for pid in children))
        return _reap(children, lambda: stopping, metrics_dir)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reap(children: dict[int, int], stopping: Callable[[], bool], metrics_dir: str) -> int:
    """Wait for every child; stop the rest when one ends unasked. The exit status."""
    status = 0
    while children:
        try:
            pid, raw = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]  # not live now
        code = os.waitstatus_to_exitcode(raw)
        if code == 0 and stopping():
            continue
        how = f"with status {code}" if code >= 0 else f"on signal {-code}"
        if stopping():
            log.warning("worker %d (pid %d) ended %s", index, pid, how)
        else:
            log.error("worker %d (pid %d) ended %s without being asked: stopping the others",
                      index, pid, how)
            _signal_all(children, signal.SIGTERM)
        if status == 0:
            status = code if code > 0 else 1
    return status


def _signal_all(children: dict[int, int], signum: int) -> None:
    for pid in list(children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _child(
    index: int, parent: int, previous: dict[int, _Handler], serve_one: Callable[[int], object]
) -> None:
    """The child's whole life: restore signal handling, serve, and exit without returning into
    the parent's stack (os._exit: no parent clean-up runs twice)."""
    global _worker
    _worker = index
    code = 1
    try:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        os.setpgid(0, 0)
        _watch_parent(parent)
        serve_one(index)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _watch_parent(parent: int, every: float = 0.5) -> None:
    """SIGTERM ourselves (a normal drain) if the supervisor disappears, e.g. after kill -9."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
