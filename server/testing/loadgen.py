"""The bench's load generator: Twilio callers and the OpenAI stand-in, each in its own processes.

    python -m server.testing.loadgen callers          # plays Twilio for the calls it is given
    python -m server.testing.loadgen standin PORT     # plays OpenAI (stand-in, stream mode)
                                                      # on /v1/realtime and /v1/live/sessions

One Python process playing both sides of hundreds of calls saturates a core before the bridge
does, so the bench (`server.testing.bench`) starts these as separate processes and drives them
over stdin/stdout, one JSON object per line: a command in, a reply out.

Every frame carries its send time (CLOCK_MONOTONIC: one clock for every process on the
machine) in its first 8 bytes; the receiving process measures relay latency on arrival. Only
frames sent inside the measuring window [t0, t1) count towards latency; every frame counts
towards sent/received. Calls send at phases spread over the 20 ms (as independent phones do),
on one 2 ms clock per caller process; each stand-in session streams on its own clock. Every
process reports how late its clocks ran, so a saturated generator shows in its own numbers.

The stand-in process plays both APIs on one port: Realtime (`/v1/realtime`, the stand-in's
stream mode: a 20 ms delta every 20 ms) and GPT-Live (`/v1/live/sessions`, lean: after
`session.started`, a 100 ms `session.output_audio.delta` every 100 ms, as GPT-Live streams, until
`session.close`). A frame is 20 ms of audio wherever it is counted: a 100 ms delta is five frames,
sent and received together (so the bench's CPU per relayed frame compares the two APIs per
20 ms of audio relayed).

Both sides are kept lean, because on a small machine the generator competes with the server
for CPU: the callers speak WebSocket through `LeanStream` (no reader task or coroutine per
frame), and the stand-in's stream mode keeps nothing per frame.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp import web

from server.testing.audio import BYTES_PER_MS, FRAME_BYTES, FRAME_MS, RATE, ULAW_SILENCE
from server.testing.dial import ACCOUNT_SID, dial_with
from server.testing.process import run_main
from server.testing.standin import STANDIN_SESSIONS, StandinOptions, create_standin_app

STAMP = struct.Struct("<d")
FILL = bytes([ULAW_SILENCE]) * (FRAME_BYTES - STAMP.size)
LIVE_DELTA_MS = 100  # GPT-Live streams its output about 100 ms a delta
LIVE_FILL = bytes([ULAW_SILENCE]) * (LIVE_DELTA_MS * BYTES_PER_MS - STAMP.size)
LIVE_FRAMES = LIVE_DELTA_MS // FRAME_MS  # frames in one GPT-Live delta
PERIOD = FRAME_MS / 1000
SLOT = 0.002  # the callers' clock tick: calls whose phase falls in one slot send together
SLOTS = round(PERIOD / SLOT)
STAMP_CHARS = 12  # base64 characters that hold the stamp's 8 bytes


def stamped_frame(now: float) -> bytes:
    """20 ms of mu-law whose first 8 bytes are the time it is sent."""
    return STAMP.pack(now) + FILL


def stamped_delta(now: float) -> bytes:
    """100 ms of mu-law (a GPT-Live delta) whose first 8 bytes are the time it is sent."""
    return STAMP.pack(now) + LIVE_FILL


def stamp_of(payload: str) -> float:
    """The send time in a base64 frame, decoding only the characters that hold it."""
    stamp: float = STAMP.unpack_from(base64.b64decode(payload[:STAMP_CHARS]))[0]
    return stamp


class Histogram:
    """Milliseconds in 10 us bins: cheap to add to, to merge across processes, to read."""

    def __init__(self) -> None:
        self.bins: Counter[int] = Counter()
        self.count = 0
        self.max_ms = 0.0

    def add(self, ms: float, n: int = 1) -> None:
        """`n` samples of this value (frames that arrived together)."""
        self.bins[int(ms * 100)] += n
        self.count += n
        if ms > self.max_ms:
            self.max_ms = ms

    def merge(self, other: Histogram) -> None:
        self.bins.update(other.bins)
        self.count += other.count
        self.max_ms = max(self.max_ms, other.max_ms)

    def percentile(self, p: float) -> float | None:
        """The value below which a share p of the samples fall (upper edge of its bin)."""
        if not self.count:
            return None
        rank, seen = max(int(self.count * p + 0.5), 1), 0
        for key in sorted(self.bins):
            seen += self.bins[key]
            if seen >= rank:
                return min((key + 1) / 100, round(self.max_ms, 2))
        return round(self.max_ms, 2)

    def to_json(self) -> dict[str, Any]:
        return {"bins": sorted(self.bins.items()), "max_ms": self.max_ms}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        h = cls()
        for key, n in data["bins"]:
            h.bins[int(key)] += int(n)
            h.count += int(n)
        h.max_ms = float(data["max_ms"])
        return h

    @classmethod
    def merged(cls, parts: Iterable[Histogram]) -> Histogram:
        total = cls()
        for part in parts:
            total.merge(part)
        return total


class Window:
    """The measuring window, in CLOCK_MONOTONIC seconds; empty until the bench sets it."""

    def __init__(self) -> None:
        self.t0 = self.t1 = 0.0

    def __contains__(self, t: float) -> bool:
        return self.t0 <= t < self.t1


# --- the callers: Twilio's side of many calls ---


ZERO_MASK = bytes(4)


class LeanStream(asyncio.Protocol):
    """Twilio's side of one media stream, for load: a bare WebSocket client on an asyncio
    Protocol, without a general client's per-message machinery (no reader task, no queue,
    no coroutine per frame; the mask key is zero, which RFC 6455 allows, so payloads go out
    as they are). It echoes marks as they arrive and hands each media payload (base64) to
    `on_media`. Frames from the server are taken to be unfragmented, as aiohttp sends them.
    TwilioStream is the general, checking client; this one only keeps the generator light."""

    def __init__(self, on_media: Callable[[str], None]) -> None:
        self._on_media = on_media
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._upgraded = asyncio.get_running_loop().create_future()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.marks_echoed = 0
        self.stream_sid = ""
        self._seq = self._chunk = self._media_ms = 0

    @classmethod
    async def connect(cls, url: str, on_media: Callable[[str], None]) -> LeanStream:
        u = urlsplit(url)
        if u.scheme != "ws" or u.hostname is None:
            raise ValueError(f"the lean client speaks plain ws:// only, not {url}")
        port = u.port or 80
        _, stream = await asyncio.get_running_loop().create_connection(
            lambda: cls(on_media), u.hostname, port)
        key = base64.b64encode(os.urandom(16)).decode()
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        assert stream._transport is not None
        stream._transport.write(
            f"GET {target} HTTP/1.1\r\nHost: {u.hostname}:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
        try:
            await asyncio.wait_for(asyncio.shield(stream._upgraded), 10.0)
        except BaseException:
            await stream.close()
            raise
        return stream

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._upgraded.done():
            self._upgraded.set_exception(ConnectionError("closed during the handshake"))
        self.close_code = self.close_code or 1006
        self.closed.set()

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        if not self._upgraded.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:buf.find(b"\r\n")]).decode(errors="replace")
            del buf[:end + 4]
            if not status.startswith("HTTP/1.1 101"):
                self._upgraded.set_exception(ConnectionError(f"stream refused: {status}"))
                assert self._transport is not None
                self._transport.close()
                return
            self._upgraded.set_result(None)
        pos, size = 0, len(buf)
        while size - pos >= 2:
            length, head = buf[pos + 1] & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if size - pos < head + length:
                break
            self._frame(buf[pos] & 0x0F, bytes(buf[pos + head:pos + head + length]))
            pos += head + length
        del buf[:pos]

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x1:
            message = orjson.loads(payload)
            event = message.get("event")
            if event == "media":
                self._on_media(message["media"]["payload"])
            elif event == "mark":
                self._send({"event": "mark", "streamSid": self.stream_sid,
                            "mark": {"name": message["mark"]["name"]}})
                self.marks_echoed += 1
        elif opcode == 0x8:  # close: answer it, then the server ends the connection
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._write(0x8, payload[:2])
            self.closed.set()
        elif opcode == 0x9:  # ping
            self._write(0xA, payload)

    # --- sending ---

    def _write(self, opcode: int, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("the stream is closed")
        n = len(data)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
        self._transport.write(head + ZERO_MASK + data)

    def _send(self, message: dict[str, Any]) -> None:
        self._seq += 1
        message["sequenceNumber"] = str(self._seq)
        self._write(0x1, orjson.dumps(message))

    async def send_connected(self) -> None:
        self._write(0x1, orjson.dumps(
            {"event": "connected", "protocol": "Call", "version": "1.0.0"}))

    async def send_start(self, call_sid: str, stream_sid: str,
                         custom_parameters: Mapping[str, str]) -> None:
        self.stream_sid = stream_sid
        self._send({"event": "start", "streamSid": stream_sid, "start": {
            "accountSid": ACCOUNT_SID, "streamSid": stream_sid, "callSid": call_sid,
            "tracks": ["inbound"], "customParameters": dict(custom_parameters),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1}}})

    def send_media(self, ulaw: bytes) -> None:
        """Synchronous: the hot path awaits nothing."""
        self._chunk += 1
        self._send({"event": "media", "streamSid": self.stream_sid, "media": {
            "track": "inbound", "chunk": str(self._chunk), "timestamp": str(self._media_ms),
            "payload": base64.b64encode(ulaw).decode()}})
        self._media_ms += FRAME_MS

    def send_stop(self) -> None:
        self._send({"event": "stop", "streamSid": self.stream_sid,
                    "stop": {"accountSid": ACCOUNT_SID, "callSid": ""}})

    async def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            with suppress(ConnectionError):
                self._write(0x8, (1000).to_bytes(2, "big"))
            self._transport.close()
        self.closed.set()


@dataclass
class _Call:
    stream: LeanStream
    dialled_at: float  # when its webhook was posted
    setup_ms: float | None = None  # webhook -> the model's first audio was sent (its stamp)


class Callers:
    """Twilio for the calls the bench gives this process: dial, talk, listen, hang up."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.calls: list[_Call] = []
        self.sent = self.received = 0
        self.latency = Histogram()  # model -> caller
        self.lateness = Histogram()  # how late each send ran behind its 20 ms clock
        self.window = Window()
        self.errors: Counter[str] = Counter()  # why callers stopped talking early
        self._talkers: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self._expected = self._heard_first = 0
        self._all_heard = asyncio.Event()

    def _listener(self, call_box: list[_Call]) -> Callable[[str], None]:
        window = self.window

        def heard(payload: str) -> None:
            now = time.monotonic()
            stamp = stamp_of(payload)
            frames = max(len(payload) * 3 // 4 // FRAME_BYTES, 1)  # 20 ms each
            self.received += frames
            if stamp in window:
                self.latency.add((now - stamp) * 1000, frames)
            call = call_box[0] if call_box else None
            if call is not None and call.setup_ms is None:
                call.setup_ms = (stamp - call.dialled_at) * 1000
                self._heard_first += 1
                if self._heard_first >= self._expected:
                    self._all_heard.set()

        return heard

    async def dial(self, base: str, calls: list[int], auth_token: str | None, ramp: float,
                   delay: float, timeout: float = 30.0) -> dict[str, Any]:
        """Dial these calls, one every `ramp` s after `delay` s; reply once every call has
        heard the model's first audio (that is its set-up time)."""
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._expected = len(calls)
        start = time.monotonic() + delay
        for i, n in enumerate(calls):
            await asyncio.sleep(max(start + i * ramp - time.monotonic(), 0))
            box: list[_Call] = []
            dialled_at = time.monotonic()
            placed = await dial_with(partial(LeanStream.connect, on_media=self._listener(box)),
                                     self._http, base, auth_token=auth_token,
                                     call_sid=f"CA{n:032x}")
            box.append(_Call(placed.stream, dialled_at))
            self.calls.append(box[0])
        if not calls:
            self._all_heard.set()
        try:
            await asyncio.wait_for(self._all_heard.wait(), timeout)
        except TimeoutError:
            silent = sum(c.setup_ms is None for c in self.calls)
            raise RuntimeError(f"{silent} of {len(self.calls)} calls heard no audio within "
                               f"{timeout:g} s") from None
        return {"dialled": len(self.calls)}

    def go(self, start: float, t0: float, t1: float, phases: list[float]) -> dict[str, Any]:
        """Start talking: call i sends a frame at start + phases[i], then every 20 ms."""
        self.window.t0, self.window.t1 = t0, t1
        slots: dict[int, list[LeanStream]] = {}
        for call, phase in zip(self.calls, phases, strict=True):
            slots.setdefault(int(phase / SLOT) % SLOTS, []).append(call.stream)
        self._talkers = [asyncio.get_running_loop().create_task(self._clock(start, slots))]
        return {}

    async def _clock(self, start: float, slots: dict[int, list[LeanStream]]) -> None:
        """One clock for every call of this process, ticking every SLOT: cheaper than a timer
        per call, and drift-free (a late tick is caught up, and its lateness recorded)."""
        window, lateness, monotonic = self.window, self.lateness, time.monotonic
        tick = 0
        while True:
            due = start + tick * SLOT
            delay = due - monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for stream in slots.get(tick % SLOTS, ()):
                now = monotonic()
                if now in window:
                    lateness.add((now - due) * 1000)
                if stream.closed.is_set():
                    continue
                try:
                    stream.send_media(stamped_frame(now))
                except ConnectionError as e:
                    self.errors[f"send failed: {type(e).__name__}"] += 1
                    continue
                self.sent += 1
            tick += 1

    async def quiet(self) -> dict[str, Any]:
        for task in self._talkers:
            task.cancel()
        await asyncio.gather(*self._talkers, return_exceptions=True)
        self._talkers = []
        return self.counts()

    def counts(self) -> dict[str, Any]:
        return {"sent": self.sent, "received": self.received}

    async def hangup(self) -> dict[str, Any]:
        """Hang up every call; the report of this run; ready for the next."""
        for call in self.calls:
            if call.stream.closed.is_set():
                self.errors[f"stream closed by the server (code {call.stream.close_code})"] += 1
                continue
            with suppress(ConnectionError):
                call.stream.send_stop()
        with suppress(TimeoutError):  # as Twilio does, let the server close each stream
            async with asyncio.timeout(5.0):
                for call in self.calls:
                    await call.stream.closed.wait()
        marks = sum(call.stream.marks_echoed for call in self.calls)
        for call in self.calls:
            await call.stream.close()
        if self._http is not None:
            await self._http.close()
        report = {**self.counts(), "latency": self.latency.to_json(),
                  "lateness": self.lateness.to_json(), "marks_echoed": marks,
                  "errors": dict(self.errors),
                  "setup_ms": [c.setup_ms for c in self.calls if c.setup_ms is not None]}
        self._reset()
        return report

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "dial":
            return await self.dial(command["base"], command["calls"], command["auth_token"],
                                   command["ramp"], command["delay"])
        if cmd == "go":
            return self.go(command["start"], command["t0"], command["t1"], command["phases"])
        if cmd == "quiet":
            return await self.quiet()
        if cmd == "counts":
            return self.counts()
        if cmd == "hangup":
            return await self.hangup()
        raise ValueError(f"unknown command {cmd!r}")


# --- the stand-in: OpenAI's side of many sessions ---


class Standin:
    """The Realtime stand-in in stream mode, and a lean GPT-Live one, keeping nothing per frame
    but counts and bins."""

    def __init__(self) -> None:
        self.window = Window()
        self.live_sessions = 0
        self.live_silent = 0  # GPT-Live sessions that never started (so never streamed)
        self._live_streams: set[asyncio.Task[None]] = set()
        self.reset()
        self.app = create_standin_app(StandinOptions(
            reply="stream", stream_frame=self._frame, on_audio=self._heard,
            stream_late=self._late, stream_keep_audio=False))
        self.app.router.add_get("/v1/live/sessions", self._live)

    def reset(self) -> dict[str, Any]:
        self.sent = self.received = 0
        self.errors: Counter[str] = Counter()
        self.latency = Histogram()  # caller -> model
        self.lateness = Histogram()
        self.window.t0 = self.window.t1 = 0.0
        return {}

    def _frame(self) -> bytes:
        self.sent += 1
        return stamped_frame(time.monotonic())

    def _heard(self, audio: bytes) -> None:
        now = time.monotonic()
        stamp: float = STAMP.unpack_from(audio)[0]
        self.received += 1
        if stamp in self.window:
            self.latency.add((now - stamp) * 1000)

    def _late(self, seconds: float) -> None:
        if time.monotonic() in self.window:
            self.lateness.add(seconds * 1000)

    # --- GPT-Live, lean ---

    async def _live(self, request: web.Request) -> web.WebSocketResponse:
        """One GPT-Live session: `session.started` for `session.start`, then a stamped 100 ms
        delta every 100 ms; caller audio is timed on arrival; `session.close` ends it."""
        ws = web.WebSocketResponse(compress=False, decode_text=False, max_msg_size=1 << 24)
        await ws.prepare(request)
        self.live_sessions += 1
        streamer: asyncio.Task[None] | None = None
        started = False
        try:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                event = orjson.loads(msg.data)
                kind = event.get("type")
                if kind == "session.input_audio.append":
                    self._heard(base64.b64decode(event["audio"][:STAMP_CHARS]))
                elif kind == "session.start" and not started:
                    started = True
                    await ws.send_frame(orjson.dumps({
                        "type": "session.started", "event_id": f"event_{self.live_sessions}",
                        "session": {"id": f"live_bench_{self.live_sessions}",
                                    "model": event["session"]["model"],
                                    "expires_at": int(time.time()) + 3600,
                                    "status": "active"}}), aiohttp.WSMsgType.TEXT)
                    streamer = asyncio.get_running_loop().create_task(self._live_stream(ws))
                    self._live_streams.add(streamer)
                    streamer.add_done_callback(self._live_streams.discard)
                elif kind == "session.close":
                    if streamer is not None:
                        streamer.cancel()
                    await ws.send_frame(orjson.dumps({
                        "type": "session.closed", "event_id": "event_closed",
                        "reason": "close_requested", "usage": {"seconds": 0.0}}),
                        aiohttp.WSMsgType.TEXT)
                    break
        finally:
            if streamer is not None:
                streamer.cancel()
            if not started:
                self.live_silent += 1
        return ws

    async def _live_stream(self, ws: web.WebSocketResponse) -> None:
        """A 100 ms delta every 100 ms, drift-free, the first at once, then at a random
        phase (as the Realtime stand-in's stream mode), each as ready-made JSON."""
        head = b'{"type":"session.output_audio.delta","delta":"'
        loop = asyncio.get_running_loop()
        due, sent = loop.time(), 0
        while not ws.closed:
            sent += 1
            self.sent += LIVE_FRAMES
            delta = base64.b64encode(stamped_delta(time.monotonic()))
            with suppress(ConnectionError):
                await ws.send_frame(head + delta + b'"}', aiohttp.WSMsgType.TEXT)
            due += LIVE_DELTA_MS / 1000 * (1 + random.random() if sent == 1 else 1)
            await asyncio.sleep(max(due - loop.time(), 0))
            self._late(max(loop.time() - due, 0.0))

    async def quiet(self) -> dict[str, Any]:
        for session in self.app[STANDIN_SESSIONS]:
            await session.stop_streaming()
        streams = list(self._live_streams)
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        return self.counts()

    def counts(self) -> dict[str, Any]:
        return {"sent": self.sent, "received": self.received}

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        cmd = command["cmd"]
        if cmd == "reset":
            self.app[STANDIN_SESSIONS].clear()  # ended sessions of earlier runs
            self.live_sessions = self.live_silent = 0
            return self.reset()
        if cmd == "window":
            self.window.t0, self.window.t1 = command["t0"], command["t1"]
            return {}
        if cmd == "quiet":
            return await self.quiet()
        if cmd == "counts":
            return self.counts()
        if cmd == "report":
            sessions = self.app[STANDIN_SESSIONS]
            silent = sum(s.updated_at is None for s in sessions)
            if silent:
                self.errors["sessions never updated (so never streamed)"] += silent
            if self.live_silent:
                self.errors["GPT-Live sessions never started (so never streamed)"] += \
                    self.live_silent
            return {**self.counts(), "latency": self.latency.to_json(),
                    "lateness": self.lateness.to_json(),
                    "sessions": len(sessions) + self.live_sessions,
                    "errors": dict(self.errors)}
        raise ValueError(f"unknown command {cmd!r}")


# --- the worker process: commands on stdin, replies on stdout ---


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
    sys.stdout.buffer.flush()


async def _commands(handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
    """Answer each command line until `exit` or the end of stdin (the bench is gone)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = orjson.loads(line)
        if command["cmd"] == "exit":
            return
        try:
            _reply(await handle(command))
        except Exception as e:  # the bench shows it and stops
            _reply({"error": f"{type(e).__name__}: {e}"})


async def _callers_main() -> None:
    callers = Callers()
    _reply({"ready": True})
    try:
        await _commands(callers.handle)
    finally:
        await callers.hangup()


async def _standin_main(port: int) -> None:
    standin = Standin()
    runner = web.AppRunner(standin.app, handle_signals=False, access_log=None,
                           shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
    _reply({"ready": True})
    try:
        await _commands(standin.handle)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["callers"]:
        run_main(_callers_main)
    elif args[:1] == ["standin"] and len(args) == 2:
        port = int(args[1])
        run_main(lambda: _standin_main(port))
    else:
        sys.exit("usage: python -m server.testing.loadgen callers | standin PORT")


if __name__ == "__main__":
    main()
