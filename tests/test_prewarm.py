"""Sessions pre-warmed at the webhook: the stream's call adopts the ready session and its
greeting plays at once; a session no stream takes is closed; a stream on another instance opens
its own; a backend that does not allow it is not pre-warmed. Timings are printed by
`python -m server.testing.prewarm` (make bench), never asserted here: these tests check the
order of things."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from server.app import DEPS, METRICS, REGISTRY
from server.call.plan import CallPlan
from server.call.prewarm import Prewarmer
from server.fleet.state import MemoryState
from server.models.session import SessionConfig, prewarm_level
from server.testing.inbox import wait_until
from server.testing.prewarm import measure
from server.testing.standin import STANDIN_SESSIONS, StandinOptions, StandinSession, next_session
from tests.conftest import API_KEY, CALLED, CALLER, MakeRig, Rig, speak

GREETING = "Thanks for calling. How can I help?"


def gauge(rig: Rig) -> float:
    value = rig.app[METRICS].registry.get_sample_value("bridge_prewarmed_sessions")
    return value or 0.0


async def start_stream(rig: Rig, call_sid: str, url: str, params: dict[str, str],
                       ) -> Any:
    stream = await rig.open_stream(url)
    await stream.send_connected()
    await stream.send_start(call_sid=call_sid, stream_sid="MZ" + call_sid[2:],
                            custom_parameters=params)
    return stream


async def test_the_greeting_made_at_the_webhook_plays_when_the_stream_starts(
        make_rig: MakeRig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rig = await make_rig(StandinOptions(api_key=API_KEY, handshake_delay=0.2,
                                        first_audio_delay=0.1), greeting=GREETING)
    sid = "CA" + "1" * 32
    url, params = await rig.webhook(sid)
    assert gauge(rig) == 1  # counted from the webhook on
    session = await next_session(rig.standin.app)
    # Before any stream: configured, the greeting asked for and its audio made.
    create = await session.wait_for("response.create")
    assert GREETING in create["response"]["instructions"]
    await wait_until(lambda: rig.app[DEPS].prewarm is not None
                     and _first_audio_ready(rig), 5.0, "the greeting's audio")
    stream = await start_stream(rig, sid, url, params)
    media = await stream.wait_for("media")
    assert media["event"] == "media"
    assert gauge(rig) == 0
    await speak(stream, frames=4, variant=3)  # the call goes on with the same session
    await stream.wait_for("mark", count=3)
    sessions: list[StandinSession] = rig.standin.app[STANDIN_SESSIONS]
    assert sessions == [session]
    assert len([e for e in session.received if e["type"] == "session.update"]) == 1
    assert len([e for e in session.received if e["type"] == "response.create"]) == 1
    assert "adopted the model session pre-warmed at the webhook" in caplog.text
    (call,) = rig.live_calls()
    assert "pre-warmed" in call.record.sessions[0]["why"]
    assert call.gate.sent == 1  # the greeting, asked for once, before the stream


def _first_audio_ready(rig: Rig) -> bool:
    prewarm = rig.app[DEPS].prewarm
    assert prewarm is not None
    entries = getattr(prewarm, "_entries")  # noqa: B009  (the test peeks, the product does not)
    return any(e.session.first_audio_at is not None for e in entries.values())


async def test_an_unclaimed_prewarmed_session_is_closed(make_rig: MakeRig,
                                                        caplog: pytest.LogCaptureFixture,
                                                        ) -> None:
    caplog.set_level(logging.INFO)
    rig = await make_rig(stream_start_timeout=0.5, greeting=GREETING)
    await rig.webhook("CA" + "2" * 32)  # and no stream ever comes
    session = await next_session(rig.standin.app)
    assert gauge(rig) == 1
    await asyncio.wait_for(session.closed.wait(), 5.0)
    assert gauge(rig) == 0
    assert "no stream took it within 0.5 s" in caplog.text
    prewarm = rig.app[DEPS].prewarm
    assert prewarm is not None and (prewarm.expired, prewarm.adopted, len(prewarm)) == (1, 0, 0)


async def test_a_stream_on_another_instance_opens_its_own_and_the_unused_one_closes(
        make_rig: MakeRig) -> None:
    state = MemoryState()
    await state.start()
    try:
        a = await make_rig(state=state, stream_start_timeout=1.0, greeting=GREETING)
        b = await make_rig(state=state, stream_start_timeout=1.0, greeting=GREETING)
        sid = "CA" + "3" * 32
        url, params = await a.webhook(sid)
        unused = await next_session(a.standin.app)
        await unused.wait_for("session.update")
        stream = await start_stream(b, sid, url.replace(str(a.bridge.make_url("")).replace(
            "http", "ws", 1).rstrip("/"), str(b.bridge.make_url("")).replace(
            "http", "ws", 1).rstrip("/")), params)
        own = await next_session(b.standin.app)
        await own.wait_for("session.update")
        await stream.wait_for("media")  # B greets on its own session
        await asyncio.wait_for(unused.closed.wait(), 5.0)  # A's, within its 1 s
        assert gauge(a) == 0 and gauge(b) == 0
        assert not own.closed.is_set()
        await speak(stream, frames=4, variant=4)
        await stream.wait_for("mark", count=3)
        assert len(b.live_calls()) == 1 and a.live_calls() == []
    finally:
        await state.close()


async def test_an_outbound_prewarm_only_listens(make_rig: MakeRig) -> None:
    """A pre-warmed outbound session is told to only listen before anything is said."""
    rig = await make_rig()
    prewarm = rig.app[DEPS].prewarm
    assert prewarm is not None
    plan = CallPlan(direction="outbound", greeting="Hello")
    assert prewarm.start("CA" + "4" * 32, plan, CALLER, CALLED)
    session = await next_session(rig.standin.app)
    await session.wait_for("response.create")
    kinds = [e["type"] for e in session.received]
    assert kinds[:2] == ["session.update", "session.update"]
    detection = session.received[1]["session"]["audio"]["input"]["turn_detection"]
    assert (detection["create_response"], detection["interrupt_response"]) == (False, False)
    await rig.app[REGISTRY].close_all(1.0)


class _BilledPerSecond:
    """A backend that declares nothing (as GPT-Live): never opened ahead of its stream."""

    api = "realtime"
    decides_turns = True
    received = 0
    closed = True
    opened = False

    async def open(self, config: SessionConfig, conversation: Any) -> None:
        self.opened = True


async def test_a_backend_that_does_not_allow_it_is_not_prewarmed(make_rig: MakeRig) -> None:
    rig = await make_rig()
    fake = _BilledPerSecond()
    assert prewarm_level(fake) == "none"
    async with aiohttp.ClientSession() as http:
        prewarm = Prewarmer(rig.settings, http, rig.app[DEPS].plans,
                            lambda owner: lambda api: fake,  # type: ignore[arg-type, return-value]
                            offered=())
        assert prewarm.enabled
        assert not prewarm.start("CA" + "5" * 32, CallPlan(), CALLER, CALLED)
        assert len(prewarm) == 0 and not fake.opened
        await prewarm.close()


async def test_the_measurement_runs_both_ways() -> None:
    """`python -m server.testing.prewarm` (make bench), shortened: it places its calls and
    reports a time for each configuration (the numbers are the benchmark's, not asserted)."""
    results = await measure(calls=1, gaps=[0.1], handshake=0.05, first_audio=0.0)
    assert [(r.prewarm, r.gap, len(r.ms)) for r in results] == [(False, 0.1, 1), (True, 0.1, 1)]
    assert all(r.median > 0 for r in results)
    assert "pre-warm on " in results[1].row()
