"""Plays Twilio against a running bridge: a phone call without a phone.

    python -m server.testing.simulator --url http://127.0.0.1:5050 \
        [--wav my.wav] [--barge-in-ms 600]

`place_call` is a whole call: it dials like Twilio (`server.testing.dial`: the signed webhook,
the TwiML, the stream), then a caller speaks in real time while a player plays what the bridge
sends on a real-time clock and echoes marks as Twilio does. `TwilioStream` (the media-stream
half of Twilio, which tests drive directly) lives in `server.testing.dial` and is re-exported.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import aiohttp

from server.testing import audio
from server.testing.dial import ALLOWED, TwilioStream, dial

__all__ = ["ALLOWED", "CallResult", "TwilioStream", "place_call", "sample_wav"]


def sample_wav() -> Path:
    return Path(str(resources.files("server.testing") / "samples" / "hello.wav"))


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
            call = await dial(http, base_url, auth_token=auth_token, caller=caller,
                              called=called, marks="playback")
        except (ValueError, aiohttp.ClientError, OSError) as e:
            result.error = str(e)
            note(f"call failed: {e}")
            return result
        note(f"webhook answered in {call.webhook_ms:.0f} ms")
        note(f"stream started ({call.twiml.stream_url}, call {call.call_sid})")
        stream = call.stream
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
            result.heard_ms = len(stream.heard) // audio.BYTES_PER_MS
            if out is not None:
                audio.write_wav(out, audio.ulaw_decode(bytes(stream.heard)))
                note(f"wrote what the caller heard ({result.heard_ms} ms) to {out}")
    return result


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
        await asyncio.sleep(max(t0 + sent * audio.FRAME_MS / 1000 - loop.time(), 0))
        await stream.send_media(frame)
        sent += 1
        if stream.counts["clear"] > clears:
            clears = stream.counts["clear"]
            note("bridge cleared the caller's playback (barge-in handled)")

    async def say(label: str) -> float:
        note(f"caller speaks ({label}, {len(speech) // audio.BYTES_PER_MS} ms)")
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
                    and len(stream.heard) >= barge_in_ms * audio.BYTES_PER_MS):
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
