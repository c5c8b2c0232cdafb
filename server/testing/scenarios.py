"""The demo's scenarios. Each runs on loopback: the Realtime stand-in (or the GPT-Live one)
scripted for the scenario, the bridge (two for the handover) with webhook signatures on and a
records database, and one simulated call that must do what the scenario says.
`server.testing.demo` runs them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from server.app import REGISTRY, create_app
from server.fleet.state import MemoryState
from server.settings import Settings
from server.testing import audio
from server.testing.live_standin import (
    LIVE_SESSIONS,
    LiveStandinOptions,
    LiveStandinSession,
    create_live_standin_app,
)
from server.testing.simulator import CallResult, place_call, sample_wav
from server.testing.standin import (
    STANDIN_SESSIONS,
    StandinOptions,
    StandinSession,
    create_standin_app,
    tool_call,
)

AUTH_TOKEN = "demo-auth-token"  # not secrets: every end is on this machine
ADMIN_TOKEN = "demo-admin-token"
PUBLIC_URL = "https://phone.example.com"  # the fleet's one public URL: signed, never contacted
SALES = "+15550001111"
HANDOVER_TARGET_MS = 1500.0
_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_TOOLS = _ROOT / "config" / "tools" / "example.py"


@dataclass(frozen=True)
class Pace:
    """How long things take: `normal` for people watching, `fast` for the tests."""

    speech: bytes  # what the caller says each turn (mu-law)
    settle: float  # quiet after a reply before the caller speaks again
    vad_silence_ms: int
    say_ms: int  # "let me check", a goodbye, a hand-off sentence
    answer_ms: int  # the answer once a tool's result is in
    greeting_ms: int
    barge_in_ms: int  # the caller talks over the reply after this much of it
    checks_latency: bool = False  # the record's latencies must agree with the caller's

    @classmethod
    def normal(cls) -> Pace:
        speech = audio.ulaw_encode(audio.read_wav(sample_wav()))[: 1200 * audio.BYTES_PER_MS]
        return cls(speech, settle=0.4, vad_silence_ms=500, say_ms=700, answer_ms=900,
                   greeting_ms=900, barge_in_ms=500, checks_latency=True)

    @classmethod
    def fast(cls) -> Pace:
        return cls(audio.tone(300, 300.0, 12000), settle=0.2, vad_silence_ms=150, say_ms=200,
                   answer_ms=300, greeting_ms=300, barge_in_ms=100)


@dataclass
class Env:
    """What every scenario shares: where things go, the pace, the printer."""

    out_dir: Path
    pace: Pace
    echo: Callable[[str], None]
    http: aiohttp.ClientSession
    metrics: list[str] = field(default_factory=list)  # each bridge's /metrics, before it stops

    @property
    def database_url(self) -> str:
        return f"sqlite:///{(self.out_dir / 'demo-calls.db').resolve()}"

    def settings(self, standin: str, **overrides: Any) -> Settings:
        return Settings(
            openai_api_key="demo-key",
            openai_realtime_url=f"{standin.replace('http://', 'ws://')}/v1/realtime",
            twilio_auth_token=AUTH_TOKEN,
            admin_token=ADMIN_TOKEN,
            host="127.0.0.1",
            vad_silence_ms=self.pace.vad_silence_ms,
            database_url=self.database_url,
            recordings_dir=self.out_dir / "recordings",
            **overrides,
        )

    def say(self, text: str) -> None:
        self.echo(f"  * {text}")


@dataclass
class Outcome:
    """What one scenario did, and what it should have done but did not."""

    name: str
    result: CallResult | None = None
    record: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    def expect(self, condition: object, problem: str) -> None:
        if not condition:
            self.problems.append(problem)

    @property
    def ok(self) -> bool:
        return self.result is not None and not self.problems


@asynccontextmanager
async def serving(app: web.Application, port: int = 0) -> AsyncIterator[str]:
    """The app on a loopback port (a free one by default); yields its base URL, cleans it up
    on exit."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def fetch_record(env: Env, base: str, call_sid: str,
                       ready: Callable[[Mapping[str, Any]], bool] | None = None,
                       timeout: float = 5.0) -> dict[str, Any] | None:
    """GET /calls/{sid} until the stored record is final (the last write is in the
    background); None if it never is."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        async with env.http.get(f"{base}/calls/{call_sid}", headers=headers) as resp:
            record = await resp.json() if resp.status == 200 else None
        if record is not None and record.get("ended_at") and (ready is None or ready(record)):
            return dict(record)
        if loop.time() > deadline:
            return None
        await asyncio.sleep(0.05)


async def keep_metrics(env: Env, base: str) -> None:
    async with env.http.get(f"{base}/metrics") as resp:
        env.metrics.append(await resp.text())


def _json(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _call(env: Env, base: str, **options: Any) -> Awaitable[CallResult]:
    pace = env.pace
    options.setdefault("settle", pace.settle)
    return place_call(base, speech=pace.speech, auth_token=AUTH_TOKEN, echo=env.echo,
                      **options)


LATENCY_AGREES_MS = 20  # the record's per-turn latency and what the caller measured


def _common(env: Env, outcome: Outcome, result: CallResult,
            record: dict[str, Any] | None) -> None:
    outcome.result, outcome.record = result, record
    outcome.expect(result.ok, f"the call failed: {result.error}")
    outcome.expect(record is not None, "no final record was stored")
    recorded = (record or {}).get("latencies_ms") or []
    # At the normal pace (`make demo`, a machine not otherwise busy): the caller, in the same
    # process, reads the reply as soon as the bridge sends it. The fast pace runs in the test
    # suite beside other work, where the caller's own reading lags.
    if env.pace.checks_latency and record is not None \
            and len(recorded) == len(result.latencies_ms):
        apart = [abs(a - b) for a, b in zip(recorded, result.latencies_ms, strict=True)]
        outcome.expect(all(d <= LATENCY_AGREES_MS for d in apart),
                       f"the record's latencies {recorded} and the caller's "
                       f"{[round(x) for x in result.latencies_ms]} differ by more than "
                       f"{LATENCY_AGREES_MS} ms")


# --- a. greeting, a tool, and the assistant ends the call ---


async def tools(env: Env) -> Outcome:
    """GREETING and the example tools; the model checks an order on turn 1 and ends the call
    on turn 2: the goodbye plays, the bridge closes the stream, Twilio hangs up."""
    outcome = Outcome("tools")
    p = env.pace
    standin = create_standin_app(StandinOptions(
        greeting_ms=p.greeting_ms, tool_reply_ms=p.answer_ms,
        tool_calls={1: tool_call("lookup_order", {"order_id": "1234"}, say_ms=p.say_ms),
                    2: tool_call("end_call", say_ms=p.say_ms)}))
    async with serving(standin) as standin_base:
        settings = env.settings(standin_base, greeting="Thanks for calling, how can I help?",
                                tools_module=str(EXAMPLE_TOOLS))
        async with serving(create_app(settings)) as bridge:
            result = await _call(env, bridge, turns=2, listen_first=3.0)
            record = await fetch_record(env, bridge, result.call_sid)
            await keep_metrics(env, bridge)
        sessions: list[StandinSession] = standin[STANDIN_SESSIONS]
    _common(env, outcome, result, record)
    outcome.expect(result.greeting_ms is not None, "no greeting was heard")
    outcome.expect(len(result.latencies_ms) == 2, "a turn went unanswered")
    entries = [e for e in (record or {}).get("timeline", ()) if e.get("kind") == "tool"]
    for e in entries:
        value = e.get("result") if e.get("outcome") == "ok" else e.get("error")
        env.say(f"tool call {e.get('name')}({_json(e.get('arguments'))}) -> {e.get('outcome')} "
                f"in {e.get('seconds')} s: {_json(value)}")
    outputs = [o for s in sessions for o in s.tool_outputs.values()]
    if outputs:
        env.say(f"the model got back: {outputs[0]}")
    outcome.expect(any(e.get("name") == "lookup_order" and e.get("outcome") == "ok"
                       for e in entries), "no successful lookup_order in the record")
    outcome.expect(any('"shipped"' in o for o in outputs),
                   "the model never got the order's status")
    outcome.expect((result.hung_up_by, result.next_action) == ("bridge", "hangup"),
                   f"expected the bridge to end the call and Twilio to hang up, got "
                   f"{result.hung_up_by} / {result.next_action or 'nothing'}")
    outcome.expect((record or {}).get("end_kind") == "assistant_ended",
                   f"end_kind {(record or {}).get('end_kind')!r}, not assistant_ended")
    return outcome


# --- b. transfer ---


async def transfer(env: Env) -> Outcome:
    """TRANSFER_TARGETS=sales=+15550001111; on turn 1 the model hands the caller to sales."""
    outcome = Outcome("transfer")
    standin = create_standin_app(StandinOptions(tool_calls={
        1: tool_call("transfer_call", {"target": "sales"}, say_ms=env.pace.say_ms)}))
    async with serving(standin) as standin_base:
        settings = env.settings(standin_base, transfer_targets=(("sales", SALES),))
        async with serving(create_app(settings)) as bridge:
            result = await _call(env, bridge, turns=2)
            record = await fetch_record(env, bridge, result.call_sid)
            await keep_metrics(env, bridge)
    _common(env, outcome, result, record)
    env.say(f"record: end_reason {(record or {}).get('end_reason')!r}")
    outcome.expect((result.next_action, result.dialled) == ("dial", SALES),
                   f"expected Twilio to dial {SALES}, got {result.next_action or 'nothing'} "
                   f"{result.dialled or ''}".rstrip())
    outcome.expect((record or {}).get("end_reason") == "transferred to sales",
                   f"end_reason {(record or {}).get('end_reason')!r}")
    return outcome


# --- c. barge-in ---


async def barge_in(env: Env) -> Outcome:
    """The echo assistant answers; the caller talks over the answer; the bridge clears what
    was still to play and the assistant answers the interruption."""
    outcome = Outcome("barge-in")
    wav = env.out_dir / "caller-heard.wav"
    async with serving(create_standin_app(StandinOptions())) as standin_base, \
            serving(create_app(env.settings(standin_base))) as bridge:
        result = await _call(env, bridge, turns=1, barge_in_ms=env.pace.barge_in_ms, out=wav)
        record = await fetch_record(env, bridge, result.call_sid)
        await keep_metrics(env, bridge)
    _common(env, outcome, result, record)
    env.say(f"barge-ins handled: {result.clears}; marks echoed: {result.marks_echoed}; the "
            f"caller heard {result.heard_ms / 1000:.1f} s of audio (in {wav})")
    outcome.expect(result.clears >= 1, "the bridge never cleared the caller's playback")
    outcome.expect(len(result.latencies_ms) >= 2, "the interruption was not answered")
    outcome.expect((record or {}).get("barge_ins", 0) >= 1, "the record counts no barge-in")
    outcome.expect(result.hung_up_by == "caller", "the bridge ended the call")
    return outcome


# --- d. the model connection drops ---


async def model_drop(env: Env) -> Outcome:
    """After turn 1 the stand-in drops the session (close 1011); the bridge opens a new one
    with the conversation so far, and turn 2 is answered."""
    outcome = Outcome("model-drop")
    standin = create_standin_app(StandinOptions(reply="tone"))
    sessions: list[StandinSession] = standin[STANDIN_SESSIONS]

    async def drop(turn: int) -> None:
        if turn == 1:
            await sessions[-1].close(1011)

    async with serving(standin) as standin_base, \
            serving(create_app(env.settings(standin_base))) as bridge:
        env.say("after turn 1 the stand-in drops the model session (close 1011)")
        result = await _call(env, bridge, turns=2, after_turn=drop)
        record = await fetch_record(env, bridge, result.call_sid)
        await keep_metrics(env, bridge)
    _common(env, outcome, result, record)
    kept = (record or {}).get("sessions") or []
    gap = kept[1].get("gap_ms") if len(kept) > 1 else None
    if gap is not None and len(result.latencies_ms) > 1:
        env.say(f"new model session {gap:.0f} ms after the old one was lost (record "
                f"sessions[1].gap_ms); the next reply came {result.latencies_ms[1]:.0f} ms "
                f"after the caller stopped")
    outcome.expect(len(sessions) == 2, f"{len(sessions)} model session(s), expected 2")
    outcome.expect(gap is not None, "the record has no second session with its gap")
    outcome.expect(len(result.latencies_ms) == 2, "turn 2 was not answered")
    outcome.expect(result.hung_up_by == "caller", "the bridge ended the call")
    return outcome


# --- e. handover ---


async def handover(env: Env) -> Outcome:
    """Two bridges behind one public URL share their state; after turn 1 the old one gets what
    SIGTERM does in SHUTDOWN_MODE=handover. Twilio's <Connect action> reaches the new one,
    which opens a new stream, and the conversation goes on there."""
    outcome = Outcome("handover")
    standin = create_standin_app(StandinOptions(reply="tone"))
    sessions: list[StandinSession] = standin[STANDIN_SESSIONS]
    state = MemoryState()  # what Redis is to a real fleet
    await state.start()
    try:
        async with serving(standin) as standin_base:
            old_app = create_app(env.settings(standin_base, public_url=PUBLIC_URL,
                                              shutdown_mode="handover"), state=state)
            new_app = create_app(env.settings(standin_base, public_url=PUBLIC_URL),
                                 state=state)
            async with serving(new_app) as new, serving(old_app) as old:
                registry = old_app[REGISTRY]

                def load_balancer() -> str:  # sends nothing to an instance that is stopping
                    return new if registry.draining else old

                async def sigterm(turn: int) -> None:
                    if turn == 1:
                        registry.draining = True  # what SIGTERM does first
                        await registry.close_all(grace=5.0)

                env.say(f"old instance {old}, new instance {new}, both behind {PUBLIC_URL}; "
                        "after turn 1 the old one gets SIGTERM")
                result = await _call(env, old, turns=2, public_url=PUBLIC_URL,
                                     action_base=load_balancer, after_turn=sigterm)
                await keep_metrics(env, old)
                record = await fetch_record(
                    env, new, result.call_sid,
                    lambda r: r.get("end_kind") not in (None, "handover"))
                await keep_metrics(env, new)
    finally:
        await state.close()
    _common(env, outcome, result, record)
    gap = result.handover_gap_ms
    if gap is not None:
        met = "met" if gap < HANDOVER_TARGET_MS else "MISSED"
        reply, spoke = result.handover_reply_ms, len(env.pace.speech) // audio.BYTES_PER_MS
        env.say(f"handover gap: {gap:.0f} ms from the old stream's close to the new stream's "
                f"start (target < {HANDOVER_TARGET_MS / 1000:g} s: {met}); then "
                + (f"{reply:.0f} ms to the first reply audio, {spoke} ms of which the caller "
                   "was speaking" if reply is not None else "no reply"))
    kept = (record or {}).get("sessions") or []
    outcome.expect(result.actions == ["stream"] and result.streams == 2,
                   f"expected one handover to a new stream, got {result.actions}")
    outcome.expect(len(result.latencies_ms) == 2, "turn 2 was not answered after the handover")
    outcome.expect(len(sessions) == 2 and any(
        e.get("type") == "conversation.item.create" for e in sessions[-1].received),
        "the new instance's model session did not get the conversation so far")
    outcome.expect(len(kept) == 2 and kept[0].get("ended_because")
                   == "handed over to another instance",
                   "the record does not show the handover between its two sessions")
    outcome.expect(result.hung_up_by == "caller", "the bridge ended the call")
    return outcome


# --- f. GPT-Live ---


async def gpt_live(env: Env) -> Outcome:
    """The same line on GPT-Live (MODEL_API=live): the GPT-Live stand-in greets, checks an order
    through its backend on turn 1 (Responses delegation: the bridge runs the tool) and ends the
    call on turn 2. Its audio never stops (silence included), so the caller listens for sound."""
    outcome = Outcome("gpt-live")
    p = env.pace
    standin = create_live_standin_app(LiveStandinOptions(
        silence_ms=p.vad_silence_ms, greeting_ms=p.greeting_ms, tool_reply_ms=p.answer_ms,
        tool_calls={1: tool_call("lookup_order", {"order_id": "1234"}, say_ms=p.say_ms),
                    2: tool_call("end_call", say_ms=p.say_ms)}))
    async with serving(standin) as standin_base:
        settings = env.settings(
            standin_base, model_api="live", greeting="Thanks for calling, how can I help?",
            tools_module=str(EXAMPLE_TOOLS),
            openai_live_url=f"{standin_base.replace('http://', 'ws://')}/v1/live/sessions")
        async with serving(create_app(settings)) as bridge:
            # a caller who waits a moment after each reply (the bridge ends the call once
            # the model has been quiet for a moment and its goodbye has played)
            result = await _call(env, bridge, turns=2, listen_first=3.0, continuous=True,
                                 settle=max(p.settle, 1.0))
            record = await fetch_record(env, bridge, result.call_sid)
            await keep_metrics(env, bridge)
        sessions: list[LiveStandinSession] = standin[LIVE_SESSIONS]
    _common(env, outcome, result, record)
    usage = (record or {}).get("usage") or {}
    tools_ok = [e for e in (record or {}).get("timeline", ())
                if e.get("kind") == "tool" and e.get("outcome") == "ok"]
    env.say(f"GPT-Live session {sessions[0].id if sessions else '?'}: {usage.get('seconds')} s "
            f"billed, backend tokens in {usage.get('input_tokens')} out "
            f"{usage.get('output_tokens')}; cost ≈ ${(record or {}).get('cost_usd')}")
    outcome.expect(result.greeting_ms is not None, "no greeting was heard")
    outcome.expect(len(result.latencies_ms) == 2, "a turn went unanswered")
    outcome.expect(any(e.get("name") == "lookup_order" for e in tools_ok),
                   "no successful lookup_order in the record")
    outcome.expect(any('"shipped"' in o for s in sessions for o in s.tool_outputs.values()),
                   "the backend never got the order's status")
    outcome.expect((result.hung_up_by, result.next_action) == ("bridge", "hangup"),
                   f"expected the bridge to end the call and Twilio to hang up, got "
                   f"{result.hung_up_by} / {result.next_action or 'nothing'}")
    outcome.expect((record or {}).get("model") == "gpt-live-1",
                   f"model {(record or {}).get('model')!r} in the record, not gpt-live-1")
    outcome.expect(isinstance(usage.get("seconds"), (int, float)) and usage["seconds"] > 0
                   and (record or {}).get("cost_usd"), "no session seconds or cost recorded")
    return outcome


Scenario = Callable[[Env], Awaitable[Outcome]]
SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "tools": ("greeting, a tool, and the assistant ends the call", tools),
    "transfer": ("transfer", transfer),
    "barge-in": ("barge-in: the caller talks over the reply", barge_in),
    "model-drop": ("the model connection drops", model_drop),
    "handover": ("handover: a deploy moves the call to another instance", handover),
    "gpt-live": ("GPT-Live: greeting, a tool through its backend, the assistant ends the call",
                 gpt_live),
}


def _outbound() -> None:
    """The outbound scenarios (their module uses this one's helpers)."""
    from server.testing import outbound_scenarios as out

    SCENARIOS["outbound"] = ("outbound calls: a person, then an answering machine", out.outbound)
    SCENARIOS["campaign"] = ("a small campaign: two at a time, a retry, do-not-call",
                             out.campaign)


_outbound()
