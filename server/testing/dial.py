"""Dial like Twilio: the one helper for placing a call on a bridge.

`dial` does what Twilio does when a call comes in: the (signed) voice webhook, the TwiML, the
media stream to the TwiML's `<Stream url>`, then `connected` and `start` carrying the TwiML's
`<Parameter>`s. `TwilioStream` is Twilio's side of that stream. The simulator, the bench and the
tests all dial through here.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar
from uuid import uuid4

import aiohttp
import orjson
from aiohttp import WSMsgType

from server.testing.audio import BYTES_PER_MS, RATE, level
from server.testing.inbox import Inbox
from server.testing.twiml import Twiml, parse_twiml
from server.wire.twilio import compute_signature

TEXT = WSMsgType.TEXT
ALLOWED = {  # exactly what Twilio accepts from a server (anything else is error 31951)
    "media": ({"event", "streamSid", "media"}, "media", {"payload"}),
    "mark": ({"event", "streamSid", "mark"}, "mark", {"name"}),
    "clear": ({"event", "streamSid"}, None, set()),
}
ACCOUNT_SID = "AC" + "0" * 32
AUDIBLE = 500  # mean |linear sample| above which a piece of audio is sound, not silence


def audible(chunk: bytes) -> bool:
    """Sound, not silence (GPT-Live's output never stops: a reply is what can be heard)."""
    return level(chunk) > AUDIBLE


class TwilioStream:
    """Twilio's side of one bidirectional media stream.

    Marks: "manual" (the test echoes them), "immediate" (echoed on arrival: load tests) or
    "playback" (echoed once their audio has played on a real-time clock, as Twilio does)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, marks: str = "manual",
                 listener: Callable[[dict[str, Any]], None] | None = None) -> None:
        """`listener`, if given, sees each message instead of it being kept (long runs)."""
        if marks not in ("manual", "immediate", "playback"):
            raise ValueError(f"marks must be manual, immediate or playback, not {marks!r}")
        self._ws = ws
        self._marks = marks
        self._listener = listener
        self._inbox: Inbox[dict[str, Any]] = Inbox()
        self.received = self._inbox.items  # every message from the server, in order
        self.arrivals: list[float] = []  # monotonic time each message in `received` arrived
        self.violations: list[str] = []
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.closed_at: float | None = None  # monotonic time the stream was seen closed
        self.stream_sid = ""
        self.marks_echoed = 0
        self.counts: Counter[str] = Counter()  # messages received, by event
        self.heard = bytearray()  # playback mode: the audio the caller heard, in order
        self.played_at: float | None = None  # playback mode: when audio last finished playing
        # playback mode, sound only (not silence): what matters when the audio never stops
        self.voice_heard = 0  # bytes of sound played
        self.voice_played_at: float | None = None  # when sound last finished playing
        self.voice_arrived_at: float | None = None  # when sound last arrived
        self.voice_queued = 0  # pieces of sound waiting to play
        self._seq = 0
        self._chunk = 0
        self._media_ms = 0
        self._queue: deque[bytes | str] = deque()  # playback: audio chunks and mark names
        self._queued = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read())
        self._player = loop.create_task(self._play()) if marks == "playback" else None

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, url: str,
                      headers: dict[str, str] | None = None, marks: str = "manual",
                      listener: Callable[[dict[str, Any]], None] | None = None,
                      ) -> TwilioStream:
        ws = await session.ws_connect(url, headers=headers, autoping=True)
        return cls(ws, marks, listener)

    # --- Twilio -> server ---

    async def _send(self, message: dict[str, Any]) -> None:
        self._seq += 1
        message["sequenceNumber"] = str(self._seq)
        await self._ws.send_frame(orjson.dumps(message), TEXT)

    async def send_connected(self) -> None:
        await self._ws.send_frame(orjson.dumps(
            {"event": "connected", "protocol": "Call", "version": "1.0.0"}), TEXT)

    async def send_start(self, call_sid: str, stream_sid: str,
                         custom_parameters: Mapping[str, str],
                         account_sid: str = ACCOUNT_SID) -> None:
        self.stream_sid = stream_sid
        await self._send({"event": "start", "streamSid": stream_sid, "start": {
            "accountSid": account_sid, "streamSid": stream_sid, "callSid": call_sid,
            "tracks": ["inbound"], "customParameters": dict(custom_parameters),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1}}})

    async def send_media(self, ulaw: bytes) -> None:
        self._chunk += 1
        await self._send({"event": "media", "streamSid": self.stream_sid, "media": {
            "track": "inbound", "chunk": str(self._chunk), "timestamp": str(self._media_ms),
            "payload": base64.b64encode(ulaw).decode()}})
        self._media_ms += len(ulaw) // BYTES_PER_MS

    async def send_mark(self, name: str) -> None:
        await self._send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})
        self.marks_echoed += 1

    async def send_dtmf(self, digit: str) -> None:
        await self._send({"event": "dtmf", "streamSid": self.stream_sid,
                          "dtmf": {"track": "inbound_track", "digit": digit}})

    async def send_stop(self) -> None:
        await self._send({"event": "stop", "streamSid": self.stream_sid,
                          "stop": {"accountSid": ACCOUNT_SID, "callSid": ""}})

    async def send_raw(self, data: str | bytes) -> None:
        """Anything at all, for malformed-input tests."""
        if isinstance(data, bytes):
            await self._ws.send_bytes(data)
        else:
            await self._ws.send_str(data)

    async def close(self) -> None:
        for task in (self._player, self._reader):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._player, self._reader) if t),
                             return_exceptions=True)
        await self._ws.close()
        self.close_code = self.close_code or self._ws.close_code
        self.closed_at = self.closed_at or time.monotonic()
        self.closed.set()

    # --- server -> Twilio ---

    async def wait_for(self, event: str, count: int = 1, timeout: float = 5.0) -> dict[str, Any]:
        """The count-th message of this event type from the server, waiting if need be;
        ConnectionError if the stream closes first."""
        try:
            return await self._inbox.wait_for(lambda m: m.get("event") == event, count,
                                              timeout, what=f"{event!r} message")
        except EOFError as e:
            raise ConnectionError(f"stream closed (code {self.close_code}): {e}") from None

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type is not TEXT:
                    self.violations.append(f"{msg.type.name} frame")
                    continue
                message = orjson.loads(msg.data)
                if self._listener is not None:
                    self._listener(message)
                    await self._on_message(message)
                    continue
                self._check(message)
                self.counts[str(message.get("event"))] += 1
                self.arrivals.append(time.monotonic())
                self._inbox.add(message)
                await self._on_message(message)
        finally:
            self.close_code = self._ws.close_code
            self.closed_at = self.closed_at or time.monotonic()
            self.closed.set()
            self._inbox.close()

    def _check(self, message: Any) -> None:
        shape = ALLOWED.get(str(message.get("event"))) if isinstance(message, dict) else None
        if shape is None:
            self.violations.append(f"unknown message {message!r:.80}")
            return
        keys, inner, inner_keys = shape
        if set(message) != keys or (inner and (not isinstance(message[inner], dict)
                                               or set(message[inner]) != inner_keys)):
            self.violations.append(f"keys Twilio rejects (31951): {message!r:.120}")

    async def _on_message(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if self._marks == "immediate" and event == "mark":
            await self.send_mark(message["mark"]["name"])
        elif self._marks == "playback":
            if event == "media":
                chunk = base64.b64decode(message["media"]["payload"])
                if audible(chunk):
                    self.voice_queued += 1
                    self.voice_arrived_at = time.monotonic()
                self._queue.append(chunk)
            elif event == "mark":
                self._queue.append(str(message["mark"]["name"]))
            elif event == "clear":
                await self._clear()
            self._queued.set()

    # --- playback: Twilio's player, on a real-time clock ---

    async def _clear(self) -> None:
        """Empty the buffer and echo every pending mark at once, as Twilio does."""
        assert self._player is not None
        self._player.cancel()
        await asyncio.gather(self._player, return_exceptions=True)
        pending = [item for item in self._queue if isinstance(item, str)]
        self._queue.clear()
        self.voice_queued = 0
        for name in pending:
            await self.send_mark(name)
        self._player = asyncio.get_running_loop().create_task(self._play())

    async def _play(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._queued.clear()
                await self._queued.wait()
            item = self._queue[0]
            if isinstance(item, str):
                self._queue.popleft()
                await self.send_mark(item)
                continue
            started = loop.time()
            sound = audible(item)
            try:
                await asyncio.sleep(len(item) / RATE)
            except asyncio.CancelledError:
                played = item[: int((loop.time() - started) * RATE)]
                self.heard += played
                if sound:
                    self.voice_heard += len(played)
                raise
            self._queue.popleft()
            self.heard += item
            self.played_at = time.monotonic()
            if sound:
                self.voice_queued -= 1
                self.voice_heard += len(item)
                self.voice_played_at = self.played_at

    @property
    def playing(self) -> bool:
        return any(isinstance(item, bytes) for item in self._queue)

    def first_media_after(self, index: int, sound: bool = False) -> float | None:
        """When the first media message after `index` arrived (`sound`: the first that is
        not silence)."""
        for message, at in zip(self.received[index:], self.arrivals[index:], strict=True):
            if message.get("event") == "media" and (not sound or audible(
                    base64.b64decode(message["media"]["payload"]))):
                return at
        return None


# --- the webhook, then the stream ---


def call_form(call_sid: str, caller: str = "+15550100001", called: str = "+15550100002",
              account_sid: str = ACCOUNT_SID) -> dict[str, str]:
    """The form Twilio POSTs to the voice webhook for an incoming call."""
    return {"CallSid": call_sid, "AccountSid": account_sid, "From": caller, "To": called,
            "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01"}


def action_form(call_sid: str, caller: str = "+15550100001", called: str = "+15550100002",
                account_sid: str = ACCOUNT_SID) -> dict[str, str]:
    """The form Twilio POSTs to a `<Connect action>` URL once the stream has ended."""
    return {**call_form(call_sid, caller, called, account_sid), "CallStatus": "in-progress"}


async def post_webhook(http: aiohttp.ClientSession, url: str, form: Mapping[str, str],
                       auth_token: str | None = None, *, sign_url: str | None = None,
                       what: str = "webhook") -> Twiml:
    """POST the voice webhook (signed when there is a token) and parse the TwiML answer;
    ValueError, with the status and body, unless it answers 200. `sign_url`: the URL Twilio
    signs when `url` is where a load balancer sent the request (default `url`)."""
    headers = {"X-Twilio-Signature": compute_signature(auth_token, sign_url or url, form)} \
        if auth_token else {}
    async with http.post(url, data=dict(form), headers=headers) as resp:
        body = await resp.text()
        if resp.status != 200:
            raise ValueError(f"{what} answered HTTP {resp.status}: {body.strip()[:200]}")
    return parse_twiml(body)


class MediaStream(Protocol):
    """What `dial` needs of a stream client: TwilioStream, or the bench's lean one."""

    async def send_connected(self) -> None: ...

    async def send_start(self, call_sid: str, stream_sid: str,
                         custom_parameters: Mapping[str, str]) -> None: ...

    async def close(self) -> None: ...


S = TypeVar("S", bound=MediaStream)


@dataclass
class Dialled(Generic[S]):
    """A call that is streaming: `start` has been sent."""

    stream: S
    call_sid: str
    stream_sid: str
    twiml: Twiml
    webhook_ms: float  # how long the webhook took to answer


async def dial(http: aiohttp.ClientSession, base_url: str, *, auth_token: str | None = None,
               call_sid: str | None = None, caller: str = "+15550100001",
               called: str = "+15550100002", marks: str = "manual",
               listener: Callable[[dict[str, Any]], None] | None = None,
               parameters: Mapping[str, str] | None = None,
               route: Callable[[str], str] | None = None) -> Dialled[TwilioStream]:
    """Place a call as Twilio does, up to and including `start`, on a TwilioStream.

    `parameters` replaces the TwiML's `<Parameter>`s in `start` (tests of forged streams).
    `route(url)`: where a request Twilio makes to `url` actually goes (a load balancer in front
    of a fleet: `base_url` is then the public URL, which signatures cover).
    ValueError when the webhook refuses or its TwiML opens no stream; the caller owns the
    returned stream (close it)."""
    async def open_stream(url: str) -> TwilioStream:
        return await TwilioStream.connect(http, url, marks=marks, listener=listener)

    return await dial_with(open_stream, http, base_url, auth_token=auth_token,
                           call_sid=call_sid, caller=caller, called=called,
                           parameters=parameters, route=route)


async def dial_with(open_stream: Callable[[str], Awaitable[S]], http: aiohttp.ClientSession,
                    base_url: str, *, auth_token: str | None = None,
                    call_sid: str | None = None, caller: str = "+15550100001",
                    called: str = "+15550100002",
                    parameters: Mapping[str, str] | None = None,
                    route: Callable[[str], str] | None = None) -> Dialled[S]:
    """`dial`, with the stream opened by `open_stream(url)` (the bench's lean client)."""
    call_sid = call_sid or "CA" + uuid4().hex
    started = time.monotonic()
    url = base_url.rstrip("/") + "/incoming-call"
    twiml = await post_webhook(http, route(url) if route else url,
                               call_form(call_sid, caller, called), auth_token, sign_url=url)
    webhook_ms = (time.monotonic() - started) * 1000
    if twiml.stream_url is None:
        raise ValueError(f"TwiML has no <Connect><Stream>; it says {twiml.say!r}"
                         + (" and hangs up" if twiml.hangs_up else ""))
    stream = await open_stream(route(twiml.stream_url) if route else twiml.stream_url)
    stream_sid = "MZ" + uuid4().hex
    try:
        await stream.send_connected()
        await stream.send_start(call_sid, stream_sid,
                                twiml.parameters if parameters is None else parameters)
    except BaseException:
        await stream.close()
        raise
    return Dialled(stream, call_sid, stream_sid, twiml, webhook_ms)
