"""The bench's baseline: the smallest aiohttp Twilio <-> OpenAI Realtime relay.

    HOST=127.0.0.1 PORT=5051 OPENAI_REALTIME_URL=ws://127.0.0.1:8765/v1/realtime \
        python -m server.testing.bare_relay

Parse, re-wrap, send; nothing else: no signatures, tokens, marks, barge-in, prompts, limits,
timeouts or checks. `make bench` runs it beside the real bridge, on the same machine and load,
so the bridge's cost per relayed frame can be read as a ratio to this floor. It answers the
same webhook form and stream `start` as the bridge (it ignores the token), and uses the same
cheap idioms (orjson, bytes frames, no text decoding), so the ratio measures features, not
idioms. Never a product: it lives in server/testing/.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Literal

import aiohttp
import orjson
from aiohttp import WSMsgType, web

from server.testing.process import run_main

TEXT = WSMsgType.TEXT
OpenAISocket = aiohttp.ClientWebSocketResponse[Literal[False]]  # frames as bytes, never decoded
HTTP = web.AppKey("http", aiohttp.ClientSession)
URL = web.AppKey("url", str)  # the Realtime URL, with ?model=
KEY = web.AppKey("key", str)  # the API key, sent as a Bearer token
SESSION_UPDATE = orjson.dumps({"type": "session.update", "session": {
    "type": "realtime", "output_modalities": ["audio"],
    "audio": {"input": {"format": {"type": "audio/pcmu"}},
              "output": {"format": {"type": "audio/pcmu"}}}}})


async def incoming_call(request: web.Request) -> web.Response:
    await request.post()  # the same form as the bridge gets, read and ignored
    url = f"ws://{request.host}/media-stream"
    return web.Response(content_type="text/xml", text=(
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<Response><Connect><Stream url="{url}" /></Connect></Response>'))


async def media_stream(request: web.Request) -> web.WebSocketResponse:
    twilio = web.WebSocketResponse(compress=False, decode_text=False)
    await twilio.prepare(request)
    openai: OpenAISocket | None = None
    pump: asyncio.Task[None] | None = None
    try:
        async for msg in twilio:
            if msg.type is not TEXT:
                break
            event = orjson.loads(msg.data)
            kind = event["event"]
            if kind == "media" and openai is not None:
                await openai.send_frame(orjson.dumps(
                    {"type": "input_audio_buffer.append", "audio": event["media"]["payload"]}),
                    TEXT)
            elif kind == "start" and openai is None:
                openai = await request.app[HTTP].ws_connect(
                    request.app[URL], headers={"Authorization": f"Bearer {request.app[KEY]}"},
                    decode_text=False)
                await openai.send_frame(SESSION_UPDATE, TEXT)
                pump = asyncio.get_running_loop().create_task(
                    _to_twilio(openai, twilio, event["start"]["streamSid"]))
            elif kind == "stop":
                break
    finally:
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
        if openai is not None:
            await openai.close()
        await twilio.close()
    return twilio


async def _to_twilio(openai: OpenAISocket, twilio: web.WebSocketResponse,
                     stream_sid: str) -> None:
    async for msg in openai:
        if msg.type is not TEXT:
            break
        event = orjson.loads(msg.data)
        if event["type"] == "response.output_audio.delta":
            await twilio.send_frame(orjson.dumps(
                {"event": "media", "streamSid": stream_sid, "media": {"payload": event["delta"]}}),
                TEXT)
    await twilio.close()


async def status(request: web.Request) -> web.Response:
    return web.json_response({"name": "bare-relay"})


async def _client(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        app[HTTP] = http
        yield


def create_app(realtime_url: str, api_key: str = "", model: str = "gpt-realtime",
               ) -> web.Application:
    app = web.Application()
    app[URL] = f"{realtime_url}?model={model}"
    app[KEY] = api_key
    app.cleanup_ctx.append(_client)
    app.router.add_get("/", status)
    app.router.add_post("/incoming-call", incoming_call)
    app.router.add_get("/media-stream", media_stream)
    return app


async def serve() -> None:
    """Serve until SIGTERM or SIGINT."""
    app = create_app(os.environ.get("OPENAI_REALTIME_URL", "ws://127.0.0.1:8765/v1/realtime"),
                     os.environ.get("OPENAI_API_KEY", ""),
                     os.environ.get("OPENAI_REALTIME_MODEL", "gpt-realtime"))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, os.environ.get("HOST", "127.0.0.1"),
                      int(os.environ.get("PORT", "5051"))).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    run_main(serve)


if __name__ == "__main__":
    main()
