"""Process entry: read .env and the environment, check the settings, serve."""

from __future__ import annotations

import logging
import os
import sys

from aiohttp import web
from dotenv import load_dotenv

from server import __version__
from server.app import PROMPT, create_app
from server.logs import setup_logging
from server.settings import ConfigError, Settings

log = logging.getLogger("server")


def main() -> None:
    load_dotenv()
    try:
        settings = Settings.from_env(os.environ)
        setup_logging(settings.log_level, settings.log_format, settings.secrets)
        app = create_app(settings)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    _announce(settings, app[PROMPT].describe(), app[PROMPT].hosted)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        shutdown_timeout=settings.shutdown_drain_seconds + 5.0,
        print=None,
        access_log=None,
    )
    log.info("stopped")


def _announce(settings: Settings, prompt: str, hosted: bool) -> None:
    log.info("phone bridge %s on http://%s:%d, model %s, voice %s, prompt %s", __version__,
             settings.host, settings.port, settings.openai_model, settings.voice, prompt)
    if settings.public_url:
        log.info("Twilio voice webhook: %s/incoming-call (HTTP POST)", settings.public_url)
    else:
        log.info("Twilio voice webhook: https://<your public host>/incoming-call "
                 "(set PUBLIC_URL to print it)")
    if not settings.twilio_auth_token:
        log.warning("TWILIO_AUTH_TOKEN is not set: webhooks and streams are NOT authenticated; "
                    "anyone who finds this server can run calls on your OpenAI key")
    if hosted:
        log.warning("PROMPT_ID %s is an OpenAI hosted prompt: hosted prompts are deprecated and "
                    "their API shuts down at the end of November 2026; move it to "
                    "config/prompts/<id>/<version>.md", settings.prompt_id)
