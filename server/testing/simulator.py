"""Plays Twilio against a running bridge: a phone call without a phone.

    python -m server.testing.simulator --url http://127.0.0.1:5050 \
        [--wav my.wav] [--barge-in-ms 600]

`TwilioStream` is the media-stream half of Twilio (tests drive it directly); `place_call` is a
whole call: the signed webhook, the TwiML, the stream, a caller speaking in real time, a player
that plays what the bridge sends on a real-time clock and echoes marks as Twilio does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiohttp
import orjson
from aiohttp import WSMsgType

from server.testing import audio
from server.twilio_protocol import compute_signature

TEXT = WSMsgType.TEXT
ALLOWED = {  # exactly what Twilio accepts from a server (anything else is error 31951)
    "media": ({"event", "streamSid", "media"}, "media", {"payload"}),
    "mark": ({"event", "streamSid", "mark"}, "mark", {"name"}),
    "clear": ({"event", "streamSid"}, None, set()),
}


def sample_wav() -> Path:
    return Path(str(resources.files("server.testing") / "samples" / "hello.wav"))


class TwilioStream:
    """Twilio's side of one bidirectional media stream."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, marks: str = "manual",
                 listener: Callable[[dict[str, Any]], None] | None = None) -> None:
        """`listener`, if given, sees each message instead of it being kept (long runs)."""
        if marks not in ("manual", "immediate", "playback"):
            raise ValueError(f"marks must be manual, immediate or playback, not {marks!r}")
        self._ws = ws
        self._marks = marks
        self._listener = listener
        self.received: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # monotonic time each message in `received` arrived
        self.violations: list[str] = []
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.stream_sid = ""
        self.marks_echoed = 0
        self.counts: Counter[str] = Counter()  # messages received, by event
        self.heard = bytearray()  # playback mode: the audio the caller heard, in order
        self.played_at: float | None = None  # playback mode: when audio last finished playing
        self._changed = asyncio.Condition()
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
                         custom_parameters: dict[str, str],
                         account_sid: str = "AC" + "0" * 32) -> None:
        self.stream_sid = stream_sid
        await self._send({"event": "start", "streamSid": stream_sid, "start": {
            "accountSid": account_sid, "streamSid": stream_sid, "callSid": call_sid,
            "tracks": ["inbound"], "customParameters": custom_parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})

    async def send_media(self, ulaw: bytes) -> None:
        self._chunk += 1
        await self._send({"event": "media", "streamSid": self.stream_sid, "media": {
            "track": "inbound", "chunk": str(self._chunk), "timestamp": str(self._media_ms),
            "payload": base64.b64encode(ulaw).decode()}})
        self._media_ms += len(ulaw) // 8

    async def send_mark(self, name: str) -> None:
        await self._send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})
        self.marks_echoed += 1

    async def send_dtmf(self, digit: str) -> None:
        await self._send({"event": "dtmf", "streamSid": self.stream_sid,
                          "dtmf": {"track": "inbound_track", "digit": digit}})

    async def send_stop(self) -> None:
        await self._send({"event": "stop", "streamSid": self.stream_sid,
                          "stop": {"accountSid": "AC" + "0" * 32, "callSid": ""}})

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
        self.closed.set()

    # --- server -> Twilio ---

    async def wait_for(self, event: str, count: int = 1, timeout: float = 5.0) -> dict[str, Any]:
        """The count-th message of this event type from the server, waiting if need be."""
        def found() -> list[dict[str, Any]]:
            return [m for m in self.received if m.get("event") == event]

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(found()) >= count or self.closed.is_set())
        matches = found()
        if len(matches) < count:
            raise ConnectionError(f"stream closed (code {self.close_code}) before {count} "
                                  f"{event!r} message(s); got {len(matches)}")
        return matches[count - 1]

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
                async with self._changed:
                    self.counts[str(message.get("event"))] += 1
                    self.received.append(message)
                    self.arrivals.append(time.monotonic())
                    self._changed.notify_all()
                await self._on_message(message)
        finally:
            self.close_code = self._ws.close_code
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

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
                self._queue.append(base64.b64decode(message["media"]["payload"]))
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
            try:
                await asyncio.sleep(len(item) / 8000)
            except asyncio.CancelledError:
                self.heard += item[: int((loop.time() - started) * 8000)]
                raise
            self._queue.popleft()
            self.heard += item
            self.played_at = time.monotonic()

    @property
    def playing(self) -> bool:
        return any(isinstance(item, bytes) for item in self._queue)


# --- a whole call ---


@dataclass
class CallResult:
    ok: bool = False
    error: str = ""
    timeline: list[tuple[float, str]] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    clears: int = 0
    marks_echoed: int = 0
    heard_ms: int = 0


class _Timeline:
    def __init__(self, result: CallResult, echo: Callable[[str], None]) -> None:
        self._t0 = time.monotonic()
        self._result = result
        self._echo = echo

    def __call__(self, text: str) -> None:
        elapsed = time.monotonic() - self._t0
        self._result.timeline.append((elapsed, text))
        self._echo(f"  {elapsed:7.3f} s  {text}")


async def place_call(
    base_url: str,
    *,
    wav: Path | None = None,
    turns: int = 2,
    barge_in_ms: int | None = None,
    out: Path | None = None,
    auth_token: str | None = None,
    caller: str = "+15550100001",
    called: str = "+15550100002",
    reply_wait: float = 10.0,
    settle: float = 0.6,
    echo: Callable[[str], None] = print,
) -> CallResult:
    """Place one simulated call; never raises for a failed call, the result says why."""
    result = CallResult()
    note = _Timeline(result, echo)
    speech = audio.ulaw_encode(audio.read_wav(wav or sample_wav()))
    async with aiohttp.ClientSession() as http:
        try:
            stream = await _dial(http, base_url.rstrip("/"), auth_token, caller, called, note)
        except (ValueError, aiohttp.ClientError, OSError) as e:
            result.error = str(e)
            note(f"call failed: {e}")
            return result
        try:
            await _converse(stream, speech, turns, barge_in_ms, reply_wait, settle, note, result)
            if stream.closed.is_set():
                raise ConnectionError(f"the bridge closed the stream (code {stream.close_code})")
            await stream.send_stop()
            note("caller hung up (stop)")
            async with asyncio.timeout(2.0):
                await stream.closed.wait()
            note(f"stream closed by the bridge (code {stream.close_code})")
            result.ok = bool(result.latencies_ms)
            if not result.ok:
                result.error = "no reply audio"
        except (ConnectionError, TimeoutError, aiohttp.ClientError) as e:
            result.error = str(e) or type(e).__name__
            note(f"call failed: {result.error}")
        finally:
            await stream.close()
            result.clears = stream.counts["clear"]
            result.marks_echoed = stream.marks_echoed
            result.heard_ms = len(stream.heard) // 8
            if out is not None:
                audio.write_wav(out, audio.ulaw_decode(bytes(stream.heard)))
                note(f"wrote what the caller heard ({result.heard_ms} ms) to {out}")
    return result


async def _dial(http: aiohttp.ClientSession, base: str, auth_token: str | None, caller: str,
                called: str, note: _Timeline) -> TwilioStream:
    call_sid = "CA" + uuid4().hex
    form = {"CallSid": call_sid, "AccountSid": "AC" + uuid4().hex, "From": caller,
            "To": called, "CallStatus": "ringing", "Direction": "inbound",
            "ApiVersion": "2010-04-01"}
    url = f"{base}/incoming-call"
    headers = {"X-Twilio-Signature": compute_signature(auth_token, url, form)} if auth_token \
        else {}
    started = time.monotonic()
    async with http.post(url, data=form, headers=headers) as resp:
        body = await resp.text()
        if resp.status != 200:
            raise ValueError(f"webhook answered HTTP {resp.status}: {body.strip()[:200]}")
    note(f"webhook answered in {(time.monotonic() - started) * 1000:.0f} ms")
    root = ET.fromstring(body)
    stream_el = root.find("./Connect/Stream")
    if stream_el is None:
        said = " ".join((el.text or "").strip() for el in root.iter("Say"))
        hung_up = root.find("./Hangup") is not None
        raise ValueError(f"TwiML has no <Connect><Stream>; it says {said!r}"
                         + (" and hangs up" if hung_up else ""))
    params = {p.get("name", ""): p.get("value", "") for p in stream_el.findall("Parameter")}
    stream = await TwilioStream.connect(http, stream_el.get("url", ""), marks="playback")
    await stream.send_connected()
    await stream.send_start(call_sid, "MZ" + uuid4().hex, params)
    note(f"stream started ({stream_el.get('url')}, call {call_sid})")
    return stream


async def _converse(stream: TwilioStream, speech: bytes, turns: int, barge_in_ms: int | None,
                    reply_wait: float, settle: float, note: _Timeline,
                    result: CallResult) -> None:
    """The caller talks in real time: every 20 ms a frame, speech or silence, like a phone."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    sent = clears = 0

    async def send(frame: bytes) -> None:
        nonlocal sent, clears
        if stream.closed.is_set():
            raise ConnectionError(f"the bridge closed the stream (code {stream.close_code})")
        await asyncio.sleep(max(t0 + sent * 0.02 - loop.time(), 0))
        await stream.send_media(frame)
        sent += 1
        if stream.counts["clear"] > clears:
            clears = stream.counts["clear"]
            note("bridge cleared the caller's playback (barge-in handled)")

    async def say(label: str) -> float:
        note(f"caller speaks ({label}, {len(speech) // 8} ms)")
        for frame in audio.frames(speech):
            await send(frame)
        note("caller stopped speaking")
        return time.monotonic()

    silence = bytes([audio.ULAW_SILENCE]) * audio.FRAME_BYTES
    for turn in range(1, turns + 1):
        ended = await say(f"turn {turn}")
        seen = len(stream.received)
        deadline = loop.time() + reply_wait
        first_reply: float | None = None
        interrupted = False
        while loop.time() < deadline:
            await send(silence)
            if first_reply is None:
                first_reply = _first_media_after(stream, seen)
                if first_reply is not None:
                    latency = (first_reply - ended) * 1000
                    result.latencies_ms.append(latency)
                    note(f"first reply audio: {latency:.0f} ms after the caller stopped")
                continue
            if (barge_in_ms is not None and turn == 1 and not interrupted
                    and len(stream.heard) >= barge_in_ms * 8):
                interrupted = True
                note(f"caller talks over the reply after {barge_in_ms} ms of it")
                ended = await say("interruption")
                seen, first_reply = len(stream.received), None
                deadline = loop.time() + reply_wait
                continue
            now = time.monotonic()
            quiet = stream.played_at is not None and now - stream.played_at > settle
            if not stream.playing and quiet and now - stream.arrivals[-1] > settle:
                note(f"reply finished playing ({stream.marks_echoed} marks echoed so far)")
                break
        else:
            note(f"no reply within {reply_wait:g} s")


def _first_media_after(stream: TwilioStream, index: int) -> float | None:
    for message, at in zip(stream.received[index:], stream.arrivals[index:], strict=True):
        if message.get("event") == "media":
            return at
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.testing.simulator",
                                     description="Place a simulated Twilio call on a bridge.")
    parser.add_argument("--url", default="http://127.0.0.1:5050", help="the bridge's base URL")
    parser.add_argument("--wav", type=Path, default=None, help="what the caller says (PCM WAV)")
    parser.add_argument("--out", type=Path, default=Path("out/caller-heard.wav"))
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--barge-in-ms", type=int, default=None,
                        help="talk over the first reply after this many ms of it")
    parser.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN"))
    parser.add_argument("--from", dest="caller", default="+15550100001")
    parser.add_argument("--to", dest="called", default="+15550100002")
    args = parser.parse_args(argv)
    result = asyncio.run(place_call(
        args.url, wav=args.wav, turns=args.turns, barge_in_ms=args.barge_in_ms, out=args.out,
        auth_token=args.auth_token, caller=args.caller, called=args.called))
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
