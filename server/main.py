"""Process entry: read .env and the environment, check the settings, serve."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from dotenv import load_dotenv

from server import __version__
from server.app import PLANS, REGISTRY, TOOLS_DESCRIPTION, create_app, drain
from server.fleet.state import SharedStateError
from server.logs import setup_logging
from server.records.store import StoreError
from server.settings import ConfigError, Settings
from server.workers import run_workers

log = logging.getLogger("server")


def main() -> None:
    # From the working directory (where `make run`, the Docker image and a pip-installed bridge
    # are started), never from beside the source; real environment variables win.
    load_dotenv(Path.cwd() / ".env")
    try:
        settings = Settings.from_env(os.environ)
        setup_logging(settings.log_level, settings.log_format, settings.secrets)
        app = create_app(settings)  # checks prompts and tools once, before any worker starts
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    _announce(settings, app[PLANS].default_prompt.describe(), app[PLANS].default_prompt.hosted)
    log.info("your tools: %s (built in: end_call, and transfer_call with TRANSFER_TARGETS)",
             app[TOOLS_DESCRIPTION])
    if settings.workers > 1:
        log.info("starting %d worker processes on port %d (SO_REUSEPORT)", settings.workers,
                 settings.port)
        sys.exit(run_workers(settings.workers, lambda _index: _serve_process(settings, None)))
    _serve_process(settings, app)


def _serve_process(settings: Settings, app: web.Application | None) -> None:
    """Serve in this process until a signal; exit 1 with one line if it cannot start."""
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(app or create_app(settings), settings))
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, e.strerror or e)
        sys.exit(1)
    except (SharedStateError, StoreError) as e:
        log.error("cannot start: %s", e)
        sys.exit(1)
    except ConfigError as e:  # found while starting (the do-not-call list)
        print(f"configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    log.info("stopped")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (Linux/macOS CPython: a faster loop for the relay), else
    asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def serve(app: web.Application, settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; then stop taking new calls, drain or hand over the live
    ones, wait for Twilio to fetch what happens next, and shut down.

    The listener stays open until the very end: Twilio's `<Connect action>` request comes after
    each stream closes, and a transfer or the spoken fallback is lost if it finds no server.
    A second signal during the drain ends the remaining calls at once."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port,
                       reuse_port=settings.workers > 1 or None)
    signals = 0
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        (stop if signals == 1 else hurry).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await site.start()
        await stop.wait()
        registry = app[REGISTRY]
        # From now on /readyz answers 503, new calls hear the busy message and new streams get
        # 503 before their upgrade (a load balancer retries them elsewhere).
        registry.draining = True
        log.info("signal received: no longer accepting calls")
        if settings.shutdown_mode == "handover":
            log.info("handing %d live call(s) over to other instances", len(registry))
        else:
            await drain(app, settings.shutdown_drain_seconds, hurry)
        await registry.finish(settings.shutdown_action_grace, hurry)
    finally:
        await runner.cleanup()


def _announce(settings: Settings, prompt: str, hosted: bool) -> None:
    log.info("phone bridge %s on http://%s:%d, model %s, voice %s, prompt %s", __version__,
             settings.host, settings.port, settings.openai_model, settings.voice, prompt)
    if settings.public_url:
        log.info("Twilio voice webhook: %s/incoming-call (HTTP POST)", settings.public_url)
    else:
        log.info("Twilio voice webhook: https://<your public host>/incoming-call "
                 "(set PUBLIC_URL to print it)")
    if not settings.twilio_auth_token:
        log.warning("*** UNAUTHENTICATED: TWILIO_AUTH_TOKEN is not set, so webhooks and streams "
                    "are NOT checked: anyone who finds this server can place calls on your OpenAI "
                    "key (MAX_CALLS still holds). Set TWILIO_AUTH_TOKEN before exposing it. ***")
    if hosted:
        log.warning("PROMPT_ID %s is an OpenAI hosted prompt: hosted prompts are deprecated and "
                    "their API shuts down at the end of November 2026; move it to "
                    "config/prompts/<id>/<version>.md", settings.prompt_id)
