"""Opening a model's WebSocket, for any OpenAI voice API, with one readable reason when it
cannot be opened (never the key).

No aiohttp heartbeat and no autoping: aiohttp re-arms its heartbeat timer for every chunk
received, a per-frame cost; the call's watchdog pings a quiet socket instead, and the session's
reader sees pings and pongs itself. Frames come as bytes (`decode_text=False`) for orjson.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
from aiohttp import WSMsgType

from server.models.session import ModelFailed, ModelLost, ModelUnavailable

ModelSocket = aiohttp.ClientWebSocketResponse[Literal[False]]
MAX_MSG = 16 * 1024 * 1024
_WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0)
_HINTS = {401: "check OPENAI_API_KEY", 429: "rate limited or out of quota"}
_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)


async def open_socket(http: aiohttp.ClientSession, url: str, headers: Mapping[str, str], *,
                      what: str, hints: Mapping[int, str] = {}) -> ModelSocket:
    """The socket, or ModelUnavailable saying why: `what` names the service ("OpenAI",
    "GPT-Live"), `hints` add a word per HTTP status (e.g. which setting to check). The caller
    bounds the time it may take."""
    try:
        return await http.ws_connect(url, headers=dict(headers), timeout=_WS_TIMEOUT,
                                     max_msg_size=MAX_MSG, decode_text=False, autoclose=True,
                                     autoping=False)
    except aiohttp.WSServerHandshakeError as e:
        hint = {**_HINTS, **hints}.get(e.status, "OpenAI unavailable" if e.status >= 500 else "")
        why = f"{what} refused the session: HTTP {e.status}" + (f" ({hint})" if hint else "")
    except (aiohttp.ClientError, OSError) as e:
        why = f"could not reach {what} at {urlsplit(url).netloc}: {type(e).__name__}: {e}"
    raise ModelUnavailable(why)


def audio_sender(ws: ModelSocket, encode: Callable[[str], bytes]
                 ) -> Callable[[str], Awaitable[None]]:
    """The caller's audio to the model, per frame (`encode` wraps a base64 payload in the API's
    append event): a closure, so nothing is looked up on the fast path but its two locals, and
    a plain function returning the socket's own send, so no coroutine of ours per frame."""
    send = ws.send_frame
    text = WSMsgType.TEXT

    def send_audio(payload: str) -> Awaitable[None]:
        return send(encode(payload), text)

    return send_audio


async def send_text(ws: ModelSocket | None, frame: bytes) -> None:
    """An event to the model; nothing when the socket is gone (the model link replaces it)."""
    if ws is not None and not ws.closed:
        with contextlib.suppress(ConnectionError):
            await ws.send_frame(frame, WSMsgType.TEXT)


def why_lost(msg: Any, ws: ModelSocket | None, because: str | None, what: str) -> Exception:
    """Why a session's reader stops on a frame that is not text: `because` when the session
    itself gave up on the socket, else the close, the socket error or the odd frame."""
    if because is not None:
        return ModelLost(because)
    if msg.type in _CLOSED:
        code = ws.close_code if ws is not None else None
        return ModelLost(f"{what} closed the session (code {code})")
    if msg.type is WSMsgType.ERROR:
        return ModelLost(f"{what} socket error: {type(msg.data).__name__}: {msg.data}")
    return ModelFailed(f"{what} sent a non-text frame")
