"""What calls cost in memory: a long recorded call, and what each ended call leaves behind.

    python -m server.testing.memory [--minutes 60] [--calls 2000] [--only recording|calls]
        [--rss] [--baseline REV]

Recording (RECORD_CALLS=on): the Recording feature is fed `--minutes` of a conversation
directly, with no real time passing: the caller's 20 ms frames, the assistant's replies in
100 ms pieces sent ahead of playback (as the model does), and a barge-in every fourth turn.
Between turns it waits for the recorder's writes, as ten seconds of real time would. tracemalloc
counts the bytes the call holds at the end (before it ends) and at peak (during the call, and
while the file is finished), threads included.

Calls: `--calls` short calls (webhook, stream, half a second of audio, stop, then Twilio's
`<Connect action>` request) through a real app and the Realtime stand-in on loopback, after a
warm-up; tracemalloc snapshots before and after tell the bytes still held per ended call, and
where they were allocated (the stand-in's and this tool's own allocations left out). With
`--rss`, no tracemalloc: the process's resident memory before and after the calls instead (the
stand-in and Twilio's side run in the same process, so this is an upper bound).

`--baseline REV` also runs the same measurement on git revision REV of this repository (this
file copied into a temporary export of it), to print before and after. Not a test: it prints
numbers (tests/test_memory.py asserts the bounds).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from server.call.conversation import Conversation
from server.call.ending import Ending, EndKind
from server.call.events import CallEvent
from server.call.features.base import Feature
from server.call.features.recording import Recorder
from server.call.plan import CallPlan
from server.call.record import CallRecord
from server.logs import CallLog
from server.models.session import NO_SESSION, ModelSession
from server.settings import Settings

FRAME = 160  # bytes of one 20 ms caller frame
PIECE = 800  # bytes of one 100 ms piece of assistant audio
TURN_FRAMES = 250  # 5 s: the caller speaks, then the assistant answers for as long
AUTH_TOKEN = "memory-auth-token-0123456789"
API_KEY = "sk-memory-0123456789"


class QuietCall:
    """The `CallControl` a feature is given, doing nothing: enough to feed one feature."""

    def __init__(self, call_sid: str) -> None:
        self.call_sid = call_sid
        self.stream_sid = "MZmemory"
        self.caller = "+15550001111"
        self.called = "+15550002222"
        self.settings = Settings(openai_api_key=API_KEY)
        self.log = CallLog(logging.getLogger("server.testing.memory"), {"call_sid": call_sid})
        self.record = CallRecord(call_sid=call_sid, stream_sid=self.stream_sid)
        self.http: Any = None
        self.plan = CallPlan()
        self.greeting: str | None = None
        self.features: list[Feature] = []

    @property
    def conversation(self) -> Conversation:
        return self.record.conversation

    @property
    def model(self) -> ModelSession:
        model: ModelSession = NO_SESSION
        return model

    async def send_to_caller(self, frame: bytes) -> None:
        """Nothing to send to."""

    def publish(self, event: CallEvent) -> None:
        """Nobody listens."""

    async def request_response(self, reason: str, instructions: str | None = None) -> None:
        """No model to ask."""

    async def hold_assistant(self, held: bool) -> None:
        """Nothing is said, nothing held."""

    async def cut_assistant(self) -> None:
        """Nothing to cut."""

    async def listen_only(self, on: bool) -> None:
        """No model."""

    def warn(self, message: str) -> None:
        """Nothing to warn about."""

    def hold_playback(self, on: bool) -> None:
        """No hold audio plays here."""

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coro, name=name)

    def end(self, ending: Ending) -> None:
        """The feeder ends the call itself."""

    def clear(self) -> None:
        """What playback does at a barge-in: Twilio's buffer is cleared, listeners are told."""
        for feature in self.features:
            feature.on_clear()

    @property
    def playback_idle(self) -> bool:
        return True

    async def wait_played(self, timeout: float) -> bool:
        return True


@dataclass
class RecordingMemory:
    minutes: float
    held: int  # bytes held once all the audio is fed (before the call ends)
    peak: int  # the most held at any moment of the call, writes included
    finish_peak: int  # the most held while the call ends and its file is finished
    path: Path | None  # the WAV written
    seconds: float  # how long the run took (not real time)


def _frame(byte: int, size: int) -> str:
    """A fresh base64 payload, as each frame off the wire is its own string."""
    return base64.b64encode(bytes([byte]) * size).decode()


async def _settle(recorder: Recorder) -> None:
    """Let the writes started so far finish (real time between turns would)."""
    wait_idle: Callable[[], Awaitable[None]] | None = getattr(recorder, "wait_idle", None)
    if wait_idle is not None:  # a tree from before recordings were written as they go has none
        await wait_idle()
    else:
        await asyncio.sleep(0)


def recorded_call(recorder: Recorder, call_sid: str = "CAmemory") -> tuple[Feature, QuietCall]:
    """A Recording feature on a call that does nothing else."""
    call = QuietCall(call_sid)
    feature = recorder.feature()(call)
    call.features.append(feature)
    return feature, call


async def feed_recorded_call(recorder: Recorder, feature: Feature, call: QuietCall,
                             minutes: float) -> None:
    """Feed a Recording `minutes` of conversation: turns of 5 s of caller speech, then 5 s of
    reply sent ahead at once (the caller's frames go on meanwhile), every fourth reply cut
    halfway by a barge-in. After each 5 s of caller audio the recorder's writes are let finish,
    as 5 s of real time would (a write takes milliseconds)."""
    turns = round(minutes * 60 / 10)
    for turn in range(turns):
        for i in range(TURN_FRAMES):
            feature.on_caller_audio(_frame(0x10 + i % 64, FRAME))
        await _settle(recorder)
        for i in range(TURN_FRAMES * FRAME // PIECE):
            feature.on_assistant_audio(_frame(0x90 + i % 64, PIECE))
        barge_at = TURN_FRAMES // 2 if turn % 4 == 3 else -1
        for i in range(TURN_FRAMES):
            if i == barge_at:
                call.clear()
            feature.on_caller_audio(_frame(0xFF - i % 2, FRAME))
        await _settle(recorder)


async def measure_recording(directory: Path, minutes: float) -> RecordingMemory:
    """Feed a recorded call `minutes` of audio and count what it holds (tracemalloc)."""
    started = time.monotonic()
    recorder = Recorder(directory)
    feature, call = recorded_call(recorder)
    await asyncio.to_thread(gc.collect)  # the thread pool the writes use, started beforehand
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        await feed_recorded_call(recorder, feature, call, minutes)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        await feature.on_end(Ending(EndKind.CALLER_HUNG_UP, "caller hung up"))
        await recorder.close()
        finish_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    path = Path(call.record.recording) if call.record.recording else None
    return RecordingMemory(minutes, held, peak, finish_peak, path, time.monotonic() - started)


@dataclass
class CallsMemory:
    calls: int
    kept: int  # bytes still allocated after the calls, beyond what was before them (traced)
    rss: tuple[int, int]  # the process's resident memory before and after the calls
    sources: list[tuple[str, int, int]]  # (where allocated, bytes, blocks), largest first
    seconds: float


def _rss() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _where(trace: tracemalloc.StatisticDiff) -> str:
    """The innermost frame in the bridge's own code (else the innermost at all)."""
    frames = list(reversed(trace.traceback))  # most recent call first
    for frame in frames:
        name = frame.filename.replace(os.sep, "/")
        if "/server/" in name and "/server/testing/" not in name:
            return f"{name.rsplit('/server/', 1)[1]}:{frame.lineno}"
    first = frames[0]
    return f"{Path(first.filename).name}:{first.lineno}"


async def measure_calls(calls: int, warmup: int = 200, concurrency: int = 20,
                        trace: bool = True, settle: float = 6.0) -> CallsMemory:
    """Place `calls` short calls through a real app (after `warmup` others) and count the
    bytes they leave behind (`trace`: with tracemalloc, else only the process's RSS, which
    tracemalloc's own bookkeeping would inflate). `settle`: seconds given after each batch for
    the records writer's periodic save (every 5 s), so its pending snapshots are not counted."""
    from server.app import REGISTRY, create_app
    from server.testing.dial import action_form, dial, post_webhook
    from server.testing.standin import (
        STANDIN_SESSIONS,
        StandinOptions,
        create_standin_app,
        next_session,
    )

    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="bridge-memory-"))
    standin = TestServer(create_standin_app(StandinOptions(api_key=API_KEY)))
    await standin.start_server()
    settings = Settings(
        openai_api_key=API_KEY,
        openai_realtime_url=str(standin.make_url("/v1/realtime")).replace("http://", "ws://"),
        twilio_auth_token=AUTH_TOKEN,
        database_url=f"sqlite:///{scratch}/calls.db",
        recordings_dir=scratch / "recordings",
    )
    app = create_app(settings)
    bridge = TestServer(app)
    await bridge.start_server()
    base_url = str(bridge.make_url(""))
    action_url = base_url + "/connect-action"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # thousands of calls' start and end lines are not the point
    try:
        async with aiohttp.ClientSession() as http:
            async def one() -> None:
                placed = await dial(http, base_url, auth_token=AUTH_TOKEN, marks="immediate")
                stream = placed.stream
                try:
                    session = await next_session(standin.app, timeout=30)
                    await session.wait_for("session.update", timeout=30)
                    for _ in range(25):
                        await stream.send_media(b"\xff" * FRAME)
                    await stream.send_stop()
                    await asyncio.wait_for(stream.closed.wait(), 30)
                finally:
                    await stream.close()
                await post_webhook(http, action_url, action_form(placed.call_sid),
                                   AUTH_TOKEN, what="connect action")
                standin.app[STANDIN_SESSIONS].remove(session)

            async def batch(n: int) -> None:
                left = [n]  # `concurrency` workers, not n tasks: the tool's memory stays flat

                async def worker() -> None:
                    while left[0] > 0:
                        left[0] -= 1
                        await one()

                await asyncio.gather(*(worker() for _ in range(concurrency)))
                while len(app[REGISTRY]):
                    await asyncio.sleep(0.05)  # a tool: the calls' clean-up has no event here
                await asyncio.sleep(settle)

            await batch(warmup)
            gc.collect()
            rss_before = _rss()
            if trace:
                tracemalloc.start(30)
                before = tracemalloc.take_snapshot()
            await batch(calls)
            gc.collect()
            rss = (rss_before, _rss())
            if trace:
                after = tracemalloc.take_snapshot()
                tracemalloc.stop()
    finally:
        root.setLevel(level)
        await bridge.close()
        await standin.close()
        shutil.rmtree(scratch, ignore_errors=True)
    if not trace:
        return CallsMemory(calls, 0, rss, [], time.monotonic() - started)
    # The harness's own allocations (Twilio's side, the stand-in) are not the bridge's.
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__),
              *(tracemalloc.Filter(False, f"*/server/testing/{name}.py", all_frames=True)
                for name in ("standin", "dial", "twiml", "inbox", "sdk_check"))]
    diff = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "traceback")
    by_place: dict[str, list[int]] = {}
    for stat in diff:
        totals = by_place.setdefault(_where(stat), [0, 0])
        totals[0] += stat.size_diff
        totals[1] += stat.count_diff
    sources = sorted(((w, b, n) for w, (b, n) in by_place.items()), key=lambda s: -s[1])
    kept = sum(stat.size_diff for stat in diff)
    return CallsMemory(calls, kept, rss, sources, time.monotonic() - started)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


async def _main(args: argparse.Namespace) -> None:
    if args.only in (None, "recording"):
        with tempfile.TemporaryDirectory(prefix="bridge-recording-") as scratch:
            rec = await measure_recording(Path(scratch), args.minutes)
            size = rec.path.stat().st_size if rec.path and rec.path.exists() else 0
            print(f"recording, {rec.minutes:g} min of audio fed: held {_mb(rec.held)} at the "
                  f"end, peak {_mb(rec.peak)} during the call, peak {_mb(rec.finish_peak)} "
                  f"while finishing the file ({_mb(size)} WAV; {rec.seconds:.1f} s)")
    if args.only in (None, "calls") and args.rss:
        res = await measure_calls(args.calls, args.warmup, args.concurrency, trace=False)
        before, after = res.rss
        print(f"calls, {res.calls} short calls after {args.warmup} warm-up (no tracemalloc): "
              f"RSS {_mb(before)} -> {_mb(after)}, {(after - before) / res.calls:.0f} bytes "
              f"per call ({res.seconds:.0f} s)")
    elif args.only in (None, "calls"):
        res = await measure_calls(args.calls, args.warmup, args.concurrency)
        print(f"calls, {res.calls} short calls after {args.warmup} warm-up: "
              f"{res.kept / res.calls:.0f} bytes kept per ended call "
              f"({res.kept} in all, tracemalloc; {res.seconds:.0f} s)")
        for where, size, blocks in res.sources[:args.top]:
            if size > 0:
                print(f"  {size / res.calls:7.0f} B/call  {blocks / res.calls:5.2f} blocks/call"
                      f"  {where}")


def _baseline(rev: str, argv: list[str]) -> None:
    """Run this tool, as it is here, on the code of `rev`."""
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="bridge-baseline-") as tree:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        shutil.copy(Path(__file__), Path(tree, "server", "testing", "memory.py"))
        print(f"--- baseline: {rev}", flush=True)
        subprocess.run([sys.executable, "-m", "server.testing.memory", *argv], cwd=tree,
                       env={**os.environ, "PYTHONPATH": tree}, check=True)
    print("--- this tree", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.testing.memory",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="allocation sites to list")
    parser.add_argument("--only", choices=("recording", "calls"))
    parser.add_argument("--rss", action="store_true",
                        help="calls: measure the process's RSS instead, without tracemalloc")
    parser.add_argument("--baseline", metavar="REV",
                        help="first run the same measurement on git revision REV")
    args = parser.parse_args(argv)
    if args.baseline:
        rest = list(sys.argv[1:] if argv is None else argv)
        i = rest.index("--baseline") if "--baseline" in rest else -1
        rest = rest[:i] + rest[i + 2:] if i >= 0 else [
            a for a in rest if not a.startswith("--baseline=")]
        _baseline(args.baseline, rest)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
