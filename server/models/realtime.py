"""Opening the WebSocket to OpenAI Realtime, with one readable reason when it cannot be opened.

Kept apart from the call so the call reads as orchestration: it asks for a socket and gets one,
or gets `ModelUnavailable` with a line an operator can act on (never the key)."""

from __future__ import annotations

import asyncio
from typing import Literal
from urllib.parse import urlsplit

import aiohttp

from server.settings import Settings
from server.wire import realtime as oai

OpenAISocket = aiohttp.ClientWebSocketResponse[Literal[False]]  # frames as bytes (orjson)
OPENAI_MAX_MSG = 16 * 1024 * 1024
_WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0)
_HANDSHAKE_HINTS = {
    401: "check OPENAI_API_KEY",
    403: "the key has no access to the Realtime API",
    404: "check OPENAI_REALTIME_URL and OPENAI_REALTIME_MODEL",
    429: "rate limited or out of quota",
}


class ModelUnavailable(Exception):
    """The Realtime session could not be opened; `str()` says why, with a hint."""


async def open_model_socket(settings: Settings, http: aiohttp.ClientSession) -> OpenAISocket:
    """A Realtime WebSocket (GA: Authorization only); ModelUnavailable when it cannot be had.

    No aiohttp heartbeat and no autoping: aiohttp re-arms its heartbeat timer for every chunk
    received, a per-frame cost; the call's watchdog pings a quiet socket instead, and the relay
    sees pings and pongs itself."""
    s = settings
    try:
        async with asyncio.timeout(s.openai_connect_timeout):
            return await http.ws_connect(
                oai.realtime_url(s),
                headers=oai.auth_headers(s),
                timeout=_WS_TIMEOUT,
                max_msg_size=OPENAI_MAX_MSG,
                decode_text=False,
                autoclose=True,
                autoping=False,
            )
    except aiohttp.WSServerHandshakeError as e:
        hint = _HANDSHAKE_HINTS.get(e.status, "OpenAI unavailable" if e.status >= 500 else "")
        why = f"OpenAI refused the session: HTTP {e.status}" + (f" ({hint})" if hint else "")
    except TimeoutError:
        why = f"OpenAI did not accept the session within {s.openai_connect_timeout:g} s"
    except (aiohttp.ClientError, OSError) as e:
        host = urlsplit(s.openai_realtime_url).netloc
        why = f"could not reach OpenAI at {host}: {type(e).__name__}: {e}"
    raise ModelUnavailable(why)
