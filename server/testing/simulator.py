"""Plays Twilio against a running bridge: a phone call without a phone.

    python -m server.testing.simulator --url http://127.0.0.1:5050 \
        [--wav my.wav] [--barge-in-ms 600] [--keys 1234# --keys-at-turn 1] \
        [--listen-first 2] [--action-base http://127.0.0.1:5051 ...]

`place_call` is a whole call: it dials like Twilio (`server.testing.dial`: the signed webhook,
the TwiML, the stream), then a caller speaks in real time while a player plays what the bridge
sends on a real-time clock and echoes marks as Twilio does. It can press keys (`dtmf`). After its
turns the caller hangs up (`stop`). If the bridge closes the stream first (the assistant ended
the call, a transfer, a handover, a failure), the simulator does what Twilio does: it asks the
`<Connect action>` URL what next and prints it: hang up, dial, say something and hang up, or open
a new stream (a handover), on which the conversation goes on. `TwilioStream` (the media-stream
half of Twilio, which tests drive directly) lives in `server.testing.dial` and is re-exported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit
from uuid import uuid4

import aiohttp

from server.testing import audio
from server.testing.dial import ALLOWED, TwilioStream, action_form, dial, post_webhook
from server.testing.twiml import Twiml

__all__ = ["ALLOWED", "CallResult", "TwilioStream", "balancer", "place_call", "rebase",
           "sample_wav"]

SILENCE = bytes([audio.ULAW_SILENCE]) * audio.FRAME_BYTES
SPEECH_LEVEL = 500  # mean |sample| of a 20 ms frame above which it is speech (the stand-in's)
KEY_GAP_FRAMES = 5  # 100 ms between two key presses
MAX_STREAMS = 8  # a bridge that hands a call over forever is a failure, not a loop
HOOK_WAIT = 10.0  # longest wait, after the call, for after-turn work still running
AfterTurn = Callable[[int], Awaitable[None] | None]


def sample_wav() -> Path:
    return Path(str(resources.files("server.testing") / "samples" / "hello.wav"))


# --- where Twilio's requests go ---


def rebase(url: str, base: str) -> str:
    """`url` sent to `base`'s host instead (what a load balancer does): scheme and host from
    `base` (ws/wss for a WebSocket URL), path and query from `url`."""
    target, where = urlsplit(url), urlsplit(base)
    scheme = where.scheme
    if target.scheme in ("ws", "wss"):
        scheme = "wss" if where.scheme in ("https", "wss") else "ws"
    return urlunsplit((scheme, where.netloc, target.path, target.query, target.fragment))


def balancer(bases: str | Sequence[str] | Callable[[], str]) -> Callable[[], str]:
    """A load balancer's pick: a callable as is, or the base URLs in turn (round robin)."""
    if callable(bases):
        return bases
    pool = itertools.cycle([bases] if isinstance(bases, str) else list(bases))
    return lambda: next(pool)


# --- a whole call ---


@dataclass
class CallResult:
    ok: bool = False
    error: str = ""
    call_sid: str = ""
    timeline: list[tuple[float, str]] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    clears: int = 0
    marks_echoed: int = 0
    heard_ms: int = 0
    greeting_ms: float | None = None  # first audio after `start`, before the caller spoke
    keys: str = ""  # keys pressed, sent as dtmf events
    keys_reply_ms: float | None = None  # first reply audio after the last key
    hung_up_by: str = ""  # "caller" (stop after its turns) or "bridge" (it closed the stream)
    actions: list[str] = field(default_factory=list)  # each <Connect action> answer followed
    next_action: str = ""  # the last one: hangup, dial, say or stream ("" if none followed)
    dialled: str | None = None  # the <Dial> target of a transfer
    said: str = ""  # what Twilio says before hanging up (the bridge's fallback)
    streams: int = 0  # streams the call used (more than one after a handover)
    handover_gap_ms: float | None = None  # old stream closed -> the new stream's start sent
    handover_reply_ms: float | None = None  # new stream's start -> its first reply audio

    def summary(self) -> str:
        """One line for people: how the call went and what Twilio did at the end."""
        replies = ", ".join(f"{ms:.0f}" for ms in self.latencies_ms) or "none"
        parts = [f"call {'OK' if self.ok else 'FAILED'}", f"replies: {replies} ms after speech"]
        if self.keys:
            parts.append(f"keys {self.keys}")
        if self.handover_gap_ms is not None:
            parts.append(f"handover gap {self.handover_gap_ms:.0f} ms")
        parts.append("caller hung up" if self.hung_up_by == "caller"
                     else f"bridge ended it, Twilio: {describe_action(self)}")
        if self.error:
            parts.append(self.error)
        return "; ".join(parts)


def describe_action(result: CallResult) -> str:
    return {"hangup": "hangs up", "dial": f"dials {result.dialled}",
            "say": f"says {result.said!r}, hangs up", "stream": "opens a new stream",
            }.get(result.next_action, "nothing")


class _Timeline:
    def __init__(self, result: CallResult, echo: Callable[[str], None]) -> None:
        self._t0 = time.monotonic()
        self._result = result
        self._echo = echo

    def __call__(self, text: str, at: float | None = None) -> None:
        """Note `text` as happening now, or `at` (monotonic) if it happened a moment ago."""
        elapsed = (time.monotonic() if at is None else at) - self._t0
        self._result.timeline.append((elapsed, text))
        self._echo(f"  {elapsed:7.3f} s  {text}")


class _Closed(Exception):
    """The bridge closed the stream: Twilio's `<Connect>` is over."""


class _HookFailed(Exception):
    pass


@dataclass(frozen=True)
class _Script:
    """What the caller does: the turns, the keys, the barge-in, and a hook between turns."""

    speech: bytes
    turns: int
    barge_in_ms: int | None
    keys: str
    keys_at_turn: int
    listen_first: float
    reply_wait: float
    settle: float
    after_turn: AfterTurn | None
    continuous: bool = False  # the bridge's audio never stops (GPT-Live): a reply is sound


class _Line:
    """The caller's side of one stream: a 20 ms frame every 20 ms, speech or silence, like a
    phone. Raises `_Closed` once the bridge has closed the stream."""

    def __init__(self, stream: TwilioStream, script: _Script, note: _Timeline,
                 result: CallResult, handed_over_at: float | None = None) -> None:
        self.stream = stream
        self._script = script
        self._note = note
        self._result = result
        self._handed_over_at = handed_over_at  # a handover's stream: when its start went out
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._sent = 0
        self._clears = 0

    async def _checked(self, sending: Awaitable[None]) -> None:
        try:
            await sending
        except (ConnectionError, aiohttp.ClientError):
            try:  # a socket that fails to send is closing: wait for the close to be read
                await asyncio.wait_for(self.stream.closed.wait(), 1.0)
            except TimeoutError:
                raise ConnectionError("the stream failed without closing") from None
            raise _Closed from None

    async def send(self, frame: bytes) -> None:
        if self.stream.closed.is_set():
            raise _Closed
        await asyncio.sleep(max(self._t0 + self._sent * audio.FRAME_MS / 1000
                                - self._loop.time(), 0))
        if self.stream.closed.is_set():
            raise _Closed
        await self._checked(self.stream.send_media(frame))
        self._sent += 1
        if self.stream.counts["clear"] > self._clears:
            self._clears = self.stream.counts["clear"]
            self._note("bridge cleared the caller's playback (barge-in handled)")

    async def say(self, label: str) -> float:
        """Send one turn; the moment its speech really ended (the last frame loud enough to be
        speech, as a voice detector hears it: a recording's quiet tail is not speech), which
        is where the bridge measures response latency from too."""
        speech = self._script.speech
        self._note(f"caller speaks ({label}, {len(speech) // audio.BYTES_PER_MS} ms)")
        frames = list(audio.frames(speech))
        last_loud = max((i for i, f in enumerate(frames) if audio.level(f) > SPEECH_LEVEL),
                        default=len(frames) - 1)
        ended = time.monotonic()
        for i, frame in enumerate(frames):
            if i == last_loud:  # when that frame is due on the call's 20 ms clock (a loaded
                # machine may send it late, then catch up: the audio's time is the clock's)
                due = self._t0 + self._sent * audio.FRAME_MS / 1000
                ended = time.monotonic() - (self._loop.time() - due)
            await self.send(frame)
        self._note("caller stopped speaking", at=ended)  # where replies are timed from
        return ended

    async def press(self, keys: str) -> float:
        self._note(f"caller presses {' '.join(keys)}")
        pressed = time.monotonic()
        for digit in keys:
            if self.stream.closed.is_set():
                raise _Closed
            await self._checked(self.stream.send_dtmf(digit))
            pressed = time.monotonic()
            for _ in range(KEY_GAP_FRAMES):
                await self.send(SILENCE)
        return pressed

    def mark(self) -> int:
        """Where in the received messages a reply would start from now on."""
        return len(self.stream.received)

    def replied(self, since: int) -> bool:
        return self._first_after(since) is not None

    def _first_after(self, since: int) -> float | None:
        return self.stream.first_media_after(since, sound=self._script.continuous)

    def _heard(self) -> int:
        return self.stream.voice_heard if self._script.continuous else len(self.stream.heard)

    def _done_playing(self, now: float) -> bool:
        """The reply has played: nothing of it is queued, the last of it played `settle` ago,
        and nothing new arrived since (with continuous audio: sound only)."""
        stream, settle = self.stream, self._script.settle
        if self._script.continuous:
            played, arrived = stream.voice_played_at, stream.voice_arrived_at
            return (stream.voice_queued == 0 and played is not None and now - played > settle
                    and arrived is not None and now - arrived > settle)
        quiet = stream.played_at is not None and now - stream.played_at > settle
        return not stream.playing and quiet and now - stream.arrivals[-1] > settle

    async def listen(self, since: int, ended: float, after: str, wait: float,
                     latencies: list[float], barge_in_ms: int | None = None,
                     what: str = "reply") -> None:
        """Silence until a reply has played, or `wait` passes without one. Appends the latency
        of each reply (ms after `ended`) as it comes: one, or two when the caller talks over the
        first."""
        stream, note = self.stream, self._note
        deadline = self._loop.time() + wait
        heard_before = self._heard()
        first: float | None = None
        while self._loop.time() < deadline:
            await self.send(SILENCE)
            if first is None:
                first = self._first_after(since)
                if first is not None:
                    latencies.append((first - ended) * 1000)
                    note(f"first {what} audio: {latencies[-1]:.0f} ms after {after}", at=first)
                    deadline = max(deadline, self._loop.time() + self._script.reply_wait)
                    self._after_handover()
                continue
            if barge_in_ms is not None and \
                    self._heard() - heard_before >= barge_in_ms * audio.BYTES_PER_MS:
                note(f"caller talks over the reply after {barge_in_ms} ms of it")
                barge_in_ms = None
                since = self.mark()
                ended, after, first = await self.say("interruption"), "the caller stopped", None
                what = "reply"
                deadline = self._loop.time() + self._script.reply_wait
                continue
            if self._done_playing(time.monotonic()):
                note(f"reply finished playing ({stream.marks_echoed} marks echoed so far)")
                break
        else:
            if first is None:
                note(f"no {what} within {wait:g} s")

    def _after_handover(self) -> None:
        """On a handover's stream, the first audio: how long after its start it came."""
        started, result = self._handed_over_at, self._result
        if started is None or result.handover_reply_ms is not None:
            return
        first = self._first_after(0)
        if first is not None:
            result.handover_reply_ms = (first - started) * 1000
            self._note(f"first reply audio on the new stream: {result.handover_reply_ms:.0f} "
                       f"ms after its start")


class _Caller:
    """The caller across every stream of the call; remembers which turn comes next."""

    def __init__(self, script: _Script, note: _Timeline, result: CallResult) -> None:
        self._script = script
        self._note = note
        self._result = result
        self.next_turn = 1
        self.hooks: list[asyncio.Future[None]] = []  # after-turn work, awaited at the end

    async def talk(self, line: _Line, first_stream: bool) -> None:
        """The caller's turns on this stream (from `next_turn`); `_Closed` if the bridge closes
        it first."""
        s = self._script
        if first_stream and s.listen_first > 0:
            await self._greeting(line)
        if first_stream and s.keys and s.keys_at_turn == 0:
            await self._keys(line)
        while self.next_turn <= s.turns:
            turn = self.next_turn
            since: int | None = None
            try:
                ended = await line.say(f"turn {turn}")
                since = line.mark()  # a reply is what comes once the caller has spoken
                await line.listen(since, ended, "the caller stopped", s.reply_wait,
                                  self._result.latencies_ms,
                                  s.barge_in_ms if turn == 1 else None)
                self.next_turn = turn + 1  # answered (or given up on): the next one is due
                if s.keys and s.keys_at_turn == turn:
                    await self._keys(line)
                await self._after_turn(line, turn)
            except _Closed:
                if since is not None and line.replied(since):
                    self.next_turn = turn + 1
                raise

    async def _greeting(self, line: _Line) -> None:
        """The caller listens first: to the greeting, if the assistant speaks first."""
        since, started = line.mark(), time.monotonic()
        heard: list[float] = []
        try:
            await line.listen(since, started, "the stream started", self._script.listen_first,
                              heard, what="greeting")
        finally:
            self._result.greeting_ms = heard[0] if heard else None

    async def _keys(self, line: _Line) -> None:
        since, heard = line.mark(), list[float]()
        pressed = await line.press(self._script.keys)
        self._result.keys += self._script.keys
        try:
            await line.listen(since, pressed, "the last key", self._script.reply_wait, heard)
        finally:
            self._result.keys_reply_ms = heard[0] if heard else None

    async def _after_turn(self, line: _Line, turn: int) -> None:
        """The hook's work runs while the caller stays on the line, silent."""
        hook = self._script.after_turn
        pending = hook(turn) if hook is not None else None
        if pending is None:
            return
        task = asyncio.ensure_future(pending)
        self.hooks.append(task)
        while not task.done():
            await line.send(SILENCE)
        if task.cancelled() or task.exception() is not None:
            raise _HookFailed(f"the after-turn hook failed: {_failure(task)}")


def _failure(task: asyncio.Future[None]) -> str:
    return "cancelled" if task.cancelled() else repr(task.exception())


async def place_call(
    base_url: str,
    *,
    wav: Path | None = None,
    speech: bytes | None = None,
    turns: int = 2,
    barge_in_ms: int | None = None,
    out: Path | None = None,
    auth_token: str | None = None,
    caller: str = "+15550100001",
    called: str = "+15550100002",
    reply_wait: float = 10.0,
    settle: float = 0.6,
    echo: Callable[[str], None] = print,
    keys: str | None = None,
    keys_at_turn: int = 1,
    listen_first: float = 0.0,
    follow_actions: bool = True,
    action_base: str | Sequence[str] | Callable[[], str] | None = None,
    public_url: str | None = None,
    after_turn: AfterTurn | None = None,
    call_sid: str | None = None,
    on_stream: Callable[[TwilioStream], None] | None = None,
    continuous: bool = False,
) -> CallResult:
    """Place one simulated call; never raises for a failed call, the result says why.

    `speech`: what the caller says each turn (mu-law), else `wav`, else the sample. `keys` are
    pressed after the reply to turn `keys_at_turn` (0: before the first turn); `listen_first`:
    seconds the caller listens before speaking (a greeting). `after_turn(n)` runs once turn n
    is answered; if it returns an awaitable, the caller stays silent on the line until it is
    done (the demo drops a model session or shuts an instance down there). `on_stream` is told
    each stream as it opens (a test watches what the caller hears).

    Routing: `base_url` is the instance the webhook and the first stream reach. `public_url`,
    when the bridge has PUBLIC_URL, is the URL Twilio knows and signs. `action_base` is the load
    balancer for what follows (the `<Connect action>` request and any stream it opens): one base
    URL, a list (round robin) or a callable; by default, the URL written in the TwiML (or
    `base_url` when `public_url` is given).

    `continuous`: the bridge's audio never stops (GPT-Live streams silence too), so a reply is
    the first sound after the caller spoke, and it has played once no sound has come or played
    for `settle`."""
    result = CallResult()
    note = _Timeline(result, echo)
    script = _Script(
        speech=speech if speech is not None
        else audio.ulaw_encode(audio.read_wav(wav or sample_wav())),
        turns=turns, barge_in_ms=barge_in_ms, keys=keys or "", keys_at_turn=keys_at_turn,
        listen_first=listen_first, reply_wait=reply_wait, settle=settle, after_turn=after_turn,
        continuous=continuous)
    public = (public_url or base_url).rstrip("/")
    pick = balancer(action_base) if action_base is not None else \
        (lambda: base_url) if public_url else None
    person = _Caller(script, note, result)
    streams: list[TwilioStream] = []
    async with aiohttp.ClientSession() as http:
        try:
            call = await dial(http, public, auth_token=auth_token, caller=caller, called=called,
                              marks="playback", call_sid=call_sid,
                              route=(lambda url: rebase(url, base_url)) if public_url else None)
        except (ValueError, aiohttp.ClientError, OSError) as e:
            result.error = str(e)
            note(f"call failed: {e}")
            return result
        result.call_sid = call.call_sid
        if on_stream is not None:
            on_stream(call.stream)
        note(f"webhook answered in {call.webhook_ms:.0f} ms")
        note(f"stream started ({call.twiml.stream_url}, call {call.call_sid})")
        streams.append(call.stream)
        twiml, doc_url, started = call.twiml, public + "/incoming-call", None
        follow = _Follower(http, auth_token, action_form(call.call_sid, caller, called), pick,
                           note, result)
        try:
            while True:
                stream = streams[-1]
                with contextlib.suppress(_Closed):  # the bridge closed it: see below
                    await person.talk(_Line(stream, script, note, result, started),
                                      len(streams) == 1)
                if not stream.closed.is_set():
                    await stream.send_stop()
                    note("caller hung up (stop)")
                    result.hung_up_by = "caller"
                    async with asyncio.timeout(2.0):
                        await stream.closed.wait()
                    note(f"stream closed by the bridge (code {stream.close_code})")
                    result.ok = bool(result.latencies_ms)
                    if not result.ok:
                        result.error = "no reply audio"
                    break
                result.hung_up_by = "bridge"
                note(f"the bridge closed the stream (code {stream.close_code})",
                     at=stream.closed_at)  # seen between frames: stamped when it happened
                if not follow_actions:
                    raise ConnectionError(
                        f"the bridge closed the stream (code {stream.close_code})")
                twiml, doc_url = await follow.ask(twiml, doc_url)
                if twiml.stream_url is None:
                    result.ok = result.next_action in ("hangup", "dial")
                    if not result.ok:
                        result.error = f"the bridge gave up on the call: Twilio says " \
                                       f"{result.said!r}"
                    break
                if len(streams) >= MAX_STREAMS:
                    raise ConnectionError(f"handed over {len(streams)} times: giving up")
                streams.append(await follow.open_stream(twiml, call.call_sid))
                if on_stream is not None:
                    on_stream(streams[-1])
                started = time.monotonic()
                result.handover_reply_ms = None
                closed_at = stream.closed_at or started
                result.handover_gap_ms = (started - closed_at) * 1000
                note(f"new stream started (same call): its start went out "
                     f"{result.handover_gap_ms:.0f} ms after the old stream closed")
        except (OSError, TimeoutError, ValueError, aiohttp.ClientError, _HookFailed) as e:
            result.ok = False
            result.error = str(e) or type(e).__name__
            note(f"call failed: {result.error}")
        finally:
            for stream in streams:
                await stream.close()
            if person.hooks:  # work that outlived the stream it was for (a handover)
                _, late = await asyncio.wait(person.hooks, timeout=HOOK_WAIT)
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
                failed = [_failure(t) for t in person.hooks
                          if t.cancelled() or t.exception() is not None]
                if failed and result.ok:
                    result.ok, result.error = False, f"the after-turn hook failed: {failed[0]}"
                    note(f"call failed: {result.error}")
            result.streams = len(streams)
            result.clears = sum(s.counts["clear"] for s in streams)
            result.marks_echoed = sum(s.marks_echoed for s in streams)
            heard = b"".join(bytes(s.heard) for s in streams)
            result.heard_ms = len(heard) // audio.BYTES_PER_MS
            if out is not None:
                audio.write_wav(out, audio.ulaw_decode(heard))
                note(f"wrote what the caller heard ({result.heard_ms} ms) to {out}")
    return result


class _Follower:
    """Twilio after a `<Connect>` ends: the action request, and the stream a handover opens."""

    def __init__(self, http: aiohttp.ClientSession, auth_token: str | None,
                 form: dict[str, str], pick: Callable[[], str] | None, note: _Timeline,
                 result: CallResult) -> None:
        self._http, self._auth_token, self._form = http, auth_token, form
        self._pick, self._note, self._result = pick, note, result

    def _route(self, url: str) -> str:
        return rebase(url, self._pick()) if self._pick is not None else url

    async def ask(self, twiml: Twiml, doc_url: str) -> tuple[Twiml, str]:
        """What Twilio does next: the action's answer (or, without an action, the rest of the
        document that opened the stream); notes it and returns it with its URL."""
        note, result = self._note, self._result
        if twiml.action is None:
            note("the TwiML has no <Connect action>: Twilio runs what follows <Connect>")
            answer, url = Twiml(says=twiml.says, hangs_up=twiml.hangs_up, dials=twiml.dials,
                                verbs=twiml.verbs), doc_url
        else:
            url = urljoin(doc_url, twiml.action)
            target = self._route(url)
            via = f" (sent to {urlsplit(target).netloc})" if target != url else ""
            note(f"Twilio asks the <Connect action> {url} what next{via}")
            answer = await post_webhook(self._http, target, self._form, self._auth_token,
                                        sign_url=url, what="connect action")
        if answer.stream_url is not None:
            result.actions.append("stream")
            note(f"Twilio opens a new stream (handover): {answer.stream_url}")
        elif answer.dials:
            result.actions.append("dial")
            result.dialled = answer.dials[0]
            note(f"Twilio dials {answer.dials[0]} (transfer)")
        elif answer.says:
            result.actions.append("say")
            result.said = answer.say
            note(f"Twilio says {answer.say!r} then hangs up")
        else:
            result.actions.append("hangup")
            note("Twilio hangs up")
        result.next_action = result.actions[-1]
        return answer, url

    async def open_stream(self, twiml: Twiml, call_sid: str) -> TwilioStream:
        """The new stream of a handover: same call, new streamSid, the new parameters."""
        assert twiml.stream_url is not None
        stream = await TwilioStream.connect(self._http, self._route(twiml.stream_url),
                                            marks="playback")
        try:
            await stream.send_connected()
            await stream.send_start(call_sid, "MZ" + uuid4().hex, twiml.parameters)
        except BaseException:
            await stream.close()
            raise
        return stream


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server.testing.simulator",
                                     description="Place a simulated Twilio call on a bridge.")
    parser.add_argument("--url", default="http://127.0.0.1:5050",
                        help="the bridge instance the call reaches")
    parser.add_argument("--public-url", default=None,
                        help="the bridge's PUBLIC_URL, if set (Twilio signs URLs under it)")
    parser.add_argument("--wav", type=Path, default=None, help="what the caller says (PCM WAV)")
    parser.add_argument("--out", type=Path, default=Path("out/caller-heard.wav"))
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--barge-in-ms", type=int, default=None,
                        help="talk over the first reply after this many ms of it")
    parser.add_argument("--keys", default=None, help="keys to press, e.g. 1234#")
    parser.add_argument("--keys-at-turn", type=int, default=1,
                        help="press them after the reply to this turn (0: before the first)")
    parser.add_argument("--listen-first", type=float, default=0.0,
                        help="seconds to listen before speaking (for a greeting)")
    parser.add_argument("--no-follow", action="store_true",
                        help="do not follow <Connect action> when the bridge ends the stream")
    parser.add_argument("--action-base", action="append", default=None,
                        help="where the <Connect action> request and its streams go (repeat "
                             "for round robin over a fleet); default: the TwiML's host")
    parser.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN"))
    parser.add_argument("--from", dest="caller", default="+15550100001")
    parser.add_argument("--to", dest="called", default="+15550100002")
    args = parser.parse_args(argv)
    result = asyncio.run(place_call(
        args.url, wav=args.wav, turns=args.turns, barge_in_ms=args.barge_in_ms, out=args.out,
        auth_token=args.auth_token, caller=args.caller, called=args.called, keys=args.keys,
        keys_at_turn=args.keys_at_turn, listen_first=args.listen_first,
        follow_actions=not args.no_follow, action_base=args.action_base,
        public_url=args.public_url))
    print(result.summary())
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
