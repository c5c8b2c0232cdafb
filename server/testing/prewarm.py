"""How soon a greeting reaches the caller once the stream starts, with and without pre-warm.

`make bench` runs it after the load benchmark: `python -m server.testing.prewarm`.

On loopback the Realtime stand-in is given a real network's delays: `--handshake` seconds to
accept a session (TLS and the WebSocket upgrade to OpenAI; default 0.4) and `--first-audio`
seconds from a response's start to its first audio (default 0.15). The simulated Twilio signs
and posts the webhook, then opens the media stream `--gap` seconds later (Twilio fetching the
TwiML and opening a secure WebSocket to the public URL; by default 1.0, 0.5 and 0, the worst
case for pre-warming), and measures from sending `start` to the first greeting audio it
receives. Each configuration places `--calls` calls, one at a time; the median, lowest and
highest are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

import aiohttp

from server.app import create_app
from server.settings import Settings
from server.testing.dial import TwilioStream, call_form, post_webhook
from server.testing.scenarios import serving
from server.testing.standin import StandinOptions, create_standin_app

TOKEN = "prewarm-bench-token"
GREETING = "Thanks for calling. How can I help?"
PROMPTS = Path(__file__).resolve().parents[2] / "config" / "prompts"


@dataclass
class Result:
    prewarm: bool
    gap: float
    ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    def row(self) -> str:
        mode = "pre-warm on " if self.prewarm else "pre-warm off"
        return (f"{mode}  stream {self.gap * 1000:4.0f} ms after the webhook: first greeting "
                f"audio {self.median:4.0f} ms after `start` (median of {len(self.ms)}; "
                f"{min(self.ms):.0f}-{max(self.ms):.0f})")


async def one_call(http: aiohttp.ClientSession, base: str, gap: float) -> float:
    """A call as Twilio places it; ms from sending `start` to the first media received."""
    sid = "CA" + uuid4().hex
    twiml = await post_webhook(http, base + "/incoming-call", call_form(sid), TOKEN)
    assert twiml.stream_url is not None
    await asyncio.sleep(gap)
    stream = await TwilioStream.connect(http, twiml.stream_url, marks="immediate")
    try:
        await stream.send_connected()
        started = time.monotonic()
        await stream.send_start(sid, "MZ" + uuid4().hex, twiml.parameters)
        await stream.wait_for("media", timeout=10.0)
        index = next(i for i, m in enumerate(stream.received) if m.get("event") == "media")
        return (stream.arrivals[index] - started) * 1000
    finally:
        await stream.send_stop()
        await stream.close()


async def measure(calls: int, gaps: Sequence[float], handshake: float,
                  first_audio: float) -> list[Result]:
    standin = create_standin_app(StandinOptions(handshake_delay=handshake,
                                                first_audio_delay=first_audio))
    results: list[Result] = []
    async with serving(standin) as standin_base, aiohttp.ClientSession() as http:
        for prewarm in (False, True):
            settings = Settings(
                openai_api_key="bench-key",
                openai_realtime_url=standin_base.replace("http://", "ws://") + "/v1/realtime",
                twilio_auth_token=TOKEN, greeting=GREETING, prewarm=prewarm,
                database_url="off", prompts_dir=PROMPTS, host="127.0.0.1")
            async with serving(create_app(settings)) as base:
                for gap in gaps:
                    result = Result(prewarm, gap)
                    for _ in range(calls):
                        result.ms.append(await one_call(http, base, gap))
                    results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.testing.prewarm",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--gap", type=float, action="append", default=None,
                        help="seconds from the webhook's answer to the stream (repeatable)")
    parser.add_argument("--handshake", type=float, default=0.4)
    parser.add_argument("--first-audio", type=float, default=0.15)
    args = parser.parse_args(argv)
    gaps = args.gap or [1.0, 0.5, 0.0]
    print(f"pre-warm: the stand-in takes {args.handshake * 1000:.0f} ms to accept a session "
          f"and {args.first_audio * 1000:.0f} ms to a response's first audio; greeting on")
    for result in asyncio.run(measure(args.calls, gaps, args.handshake, args.first_audio)):
        print("  " + result.row())


if __name__ == "__main__":
    main()
