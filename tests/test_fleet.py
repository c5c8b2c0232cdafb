"""A fleet of bridges on real infrastructure: a real `redis-server` and two `python -m server`
processes behind one PUBLIC_URL, on loopback.

The test plays both Twilio and the load balancer: every request Twilio would send to
http://fleet.test is signed for that public URL and posted to whichever instance the test picks.
Both instances talk to one in-process Realtime stand-in. Each test has a Redis database of its
own (flushed first), so tests never see each other's tokens, slots or decisions.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from uuid import uuid4

import aiohttp
import pytest
from aiohttp import WSCloseCode
from aiohttp.test_utils import TestServer
from redis import Redis

from server.testing.dial import TwilioStream, action_form, call_form, post_webhook
from server.testing.process import ServerProcess, free_port, start_server
from server.testing.sdk_check import EventChecker
from server.testing.standin import (
    STANDIN_SESSIONS,
    StandinOptions,
    StandinSession,
    create_standin_app,
    next_session,
)
from server.testing.twiml import Twiml
from server.wire.twilio import compute_signature
from tests.conftest import API_KEY, AUTH_TOKEN, CALLED, CALLER, heard, loud, speak
from tests.redis_server import RedisServer, start_or_skip

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = "http://fleet.test"  # what Twilio knows: the load balancer in front of the fleet
PUBLIC_STREAM = "ws://fleet.test/media-stream"
ADMIN = "admin-token-0123456789abcdef"
WAIT = 10.0
LEASE = 1.0  # FLEET_LEASE_SECONDS in the kill -9 test
_DATABASES = count(1)  # db 0 belongs to the tests that keep apart by key prefix


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[str]:
    """A REDIS_URL with a database of this test's own, empty (the bridge has no key prefix
    setting, so a fleet's instances share the default prefix inside that database)."""
    db = next(_DATABASES) % 15 + 1
    url = f"redis://127.0.0.1:{redis_server.port}/{db}"
    client = Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()
    yield url


class StandinWatch:
    """The stand-in's `check_events` hook: checks every event against the SDK's types and
    notes when each `session.update` arrived (the end of a handover's gap)."""

    def __init__(self) -> None:
        self.checker = EventChecker()
        self.updates: list[float] = []  # monotonic arrival time of each session.update

    def __call__(self, direction: Literal["server", "client"],
                 event: Mapping[str, Any]) -> None:
        self.checker(direction, event)
        if direction == "client" and event.get("type") == "session.update":
            self.updates.append(time.monotonic())


@dataclass
class Fleet:
    standin: TestServer
    watch: StandinWatch
    http: aiohttp.ClientSession
    base_env: dict[str, str]
    tmp: Path
    instances: list[ServerProcess] = field(default_factory=list)
    streams: list[TwilioStream] = field(default_factory=list)

    async def start(self, *configs: Mapping[str, str]) -> list[ServerProcess]:
        """One bridge process per config (extra environment), started together, all ready."""
        first = len(self.instances)
        envs = []
        for n, extra in enumerate(configs, start=first):
            home = self.tmp / f"instance-{n}"
            home.mkdir()
            envs.append({**self.base_env, "PORT": str(free_port()),
                         "DATABASE_URL": f"sqlite:///{home}/calls.db",
                         "RECORDINGS_DIR": str(home / "recordings"), **extra})
        started = await asyncio.gather(
            *(start_server(env, name=f"instance {chr(65 + n)}")
              for n, env in enumerate(envs, start=first)),
            return_exceptions=True)
        for result in started:
            if isinstance(result, ServerProcess):
                self.instances.append(result)  # closed by the fixture, whatever happens next
        for result in started:
            if isinstance(result, BaseException):
                raise result
        return self.instances[first:]

    async def post(self, to: ServerProcess, path: str, form: dict[str, str]) -> Twiml:
        """A request Twilio makes to PUBLIC + path, which the load balancer sends to `to`."""
        return await post_webhook(self.http, to.url + path, form, AUTH_TOKEN,
                                  sign_url=PUBLIC + path, what=f"{path} on {to.name}")

    async def webhook(self, to: ServerProcess, call_sid: str) -> Twiml:
        return await self.post(to, "/incoming-call", call_form(call_sid, CALLER, CALLED))

    async def action(self, to: ServerProcess, call_sid: str) -> Twiml:
        return await self.post(to, "/connect-action", action_form(call_sid, CALLER, CALLED))

    async def stream(self, to: ServerProcess, call_sid: str, twiml: Twiml) -> TwilioStream:
        """Open the TwiML's stream on `to` (signed, as Twilio signs it) and send connected
        and start with its parameters."""
        assert twiml.stream_url is not None and twiml.stream_url.startswith(PUBLIC_STREAM), twiml
        signature = compute_signature(AUTH_TOKEN, twiml.stream_url, {})
        stream = await TwilioStream.connect(
            self.http, to.url.replace("http://", "ws://") + urlsplit(twiml.stream_url).path,
            headers={"X-Twilio-Signature": signature})
        self.streams.append(stream)
        await stream.send_connected()
        await stream.send_start(call_sid, "MZ" + uuid4().hex, twiml.parameters)
        return stream

    async def place(self, webhook_on: ServerProcess, stream_on: ServerProcess,
                    call_sid: str) -> tuple[TwilioStream, StandinSession, Twiml]:
        """A call relaying: webhook on one instance, stream on another (or the same)."""
        twiml = await self.webhook(webhook_on, call_sid)
        stream = await self.stream(stream_on, call_sid, twiml)
        session = await next_session(self.standin.app, WAIT)
        await session.wait_for("session.update", timeout=WAIT)
        return stream, session, twiml

    def sessions(self) -> int:
        return len(self.standin.app[STANDIN_SESSIONS])


@pytest.fixture
async def fleet(aiohttp_server: Callable[..., Awaitable[TestServer]], redis_db: str,
                tmp_path: Path) -> AsyncIterator[Fleet]:
    watch = StandinWatch()
    standin = await aiohttp_server(create_standin_app(
        StandinOptions(api_key=API_KEY, check_events=watch)))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "HOST": "127.0.0.1",
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_REALTIME_URL": str(standin.make_url("/v1/realtime")).replace("http", "ws", 1),
        "REDIS_URL": redis_db,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "PUBLIC_URL": PUBLIC,
        "ADMIN_TOKEN": ADMIN,
        "LOG_LEVEL": "INFO",
        "VAD_SILENCE_MS": "100",
        "STREAM_START_TIMEOUT": "2",
        # Sessions are opened when streams start: each test knows which instance's session
        # it holds (pre-warming across instances: tests/test_prewarm.py)
        "PREWARM": "off",
    }
    async with aiohttp.ClientSession() as http:
        rig = Fleet(standin, watch, http, env, tmp_path)
        try:
            yield rig
        finally:
            for stream in rig.streams:
                await stream.close()
            await asyncio.gather(*(p.close() for p in rig.instances))
    for instance in rig.instances:
        text = instance.output()
        assert API_KEY not in text and AUTH_TOKEN not in text and ADMIN not in text, text
        assert "Traceback" not in text, f"{instance.name}:\n{text}"
    watch.checker.assert_clean()


def new_sid() -> str:
    return "CA" + uuid4().hex


def report(line: str) -> None:
    """A measured number, shown with `pytest -s` (timings are printed, never asserted)."""
    print(f"\n[fleet] {line}", file=sys.stderr)


async def test_webhook_on_one_instance_stream_on_another(fleet: Fleet) -> None:
    a, b = await fleet.start({}, {})
    sid = new_sid()
    stream, session, twiml = await fleet.place(a, b, sid)
    assert twiml.action == PUBLIC + "/connect-action"
    await b.wait_for_line("call started", WAIT)
    assert "call started" not in a.output()

    await speak(stream, frames=10, variant=2)  # caller -> B -> stand-in ...
    await stream.wait_for("mark", timeout=WAIT)  # ... -> stand-in's echo -> B -> caller
    assert session.audio_bytes_received >= 10 * 160
    assert loud(2) in heard(stream)

    await stream.send_stop()
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert stream.close_code == WSCloseCode.OK
    # B's decision (the caller hung up) is read by A, where Twilio's action request lands.
    after = await fleet.action(a, sid)
    assert after.hangs_up and after.stream_url is None and not after.says, after


async def test_a_token_replayed_on_another_instance_is_refused(fleet: Fleet) -> None:
    a, b = await fleet.start({"MAX_CALLS": "1"}, {"MAX_CALLS": "1"})
    sid = new_sid()
    stream, _, twiml = await fleet.place(a, a, sid)

    replay = await fleet.stream(b, sid, twiml)  # the same token, on the other instance
    await asyncio.wait_for(replay.closed.wait(), WAIT)
    assert replay.close_code == WSCloseCode.POLICY_VIOLATION
    await b.wait_for_line("stream token already used", WAIT)
    assert fleet.sessions() == 1  # the replay never reached OpenAI

    # Replayed on the instance holding the call, the refused stream must not free its slot.
    again = await fleet.stream(a, sid, twiml)
    await asyncio.wait_for(again.closed.wait(), WAIT)
    assert again.close_code == WSCloseCode.POLICY_VIOLATION
    assert (await fleet.webhook(b, new_sid())).stream_url is None  # still one live call

    await speak(stream, frames=6, variant=3)  # the real call goes on, untouched
    await stream.wait_for("mark", timeout=WAIT)
    assert loud(3) in heard(stream)
    assert fleet.sessions() == 1


async def test_max_calls_holds_for_the_whole_fleet(fleet: Fleet) -> None:
    a, b = await fleet.start({"MAX_CALLS": "1"}, {"MAX_CALLS": "1"})
    stream, _, _ = await fleet.place(a, a, new_sid())

    second = new_sid()
    busy = await fleet.webhook(b, second)
    assert busy.hangs_up and "Connect" not in busy.verbs and busy.stream_url is None, busy
    await b.wait_for_line("at MAX_CALLS=1", WAIT)

    await stream.send_stop()
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    answer = await accepted_within(fleet, b, second, WAIT)
    # The slot is really B's now: the call runs there.
    again = await fleet.stream(b, second, answer)
    session = await next_session(fleet.standin.app, WAIT)
    await session.wait_for("session.update", timeout=WAIT)
    await again.send_stop()
    await asyncio.wait_for(again.closed.wait(), WAIT)


async def accepted_within(fleet: Fleet, to: ServerProcess, call_sid: str,
                          seconds: float) -> Twiml:
    """Post the webhook until it opens a stream (busy answers take no slot); fail after
    `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        twiml = await fleet.webhook(to, call_sid)
        if twiml.stream_url is not None:
            return twiml
        assert twiml.hangs_up, twiml
        if time.monotonic() > deadline:
            pytest.fail(f"{to.name} still busy after {seconds:g} s")
        await asyncio.sleep(0.02)


async def test_kill_9_frees_the_capacity_within_the_lease(fleet: Fleet) -> None:
    lease = {"MAX_CALLS": "1", "FLEET_LEASE_SECONDS": f"{LEASE:g}"}
    a, b = await fleet.start(lease, lease)
    stream, session, _ = await fleet.place(a, a, new_sid())
    await a.wait_for_line(f"lease {LEASE:g} s", WAIT)
    second = new_sid()
    assert (await fleet.webhook(b, second)).stream_url is None  # A's call holds the only slot

    a.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert await a.wait(WAIT) == -signal.SIGKILL
    await accepted_within(fleet, b, second, LEASE + 2.0)
    freed = time.monotonic() - killed
    report(f"kill -9: capacity free again {freed * 1000:.0f} ms after the kill "
           f"(lease {LEASE:g} s)")
    assert freed < LEASE + 2.0
    await asyncio.wait_for(stream.closed.wait(), WAIT)  # the dead instance's sockets are gone
    await asyncio.wait_for(session.closed.wait(), WAIT)


async def test_handover_to_another_instance_keeps_the_conversation(fleet: Fleet) -> None:
    a, b = await fleet.start({"SHUTDOWN_MODE": "handover"}, {})
    sid = new_sid()
    stream, first, twiml = await fleet.place(b, a, sid)  # the webhook may land anywhere

    # One caller turn, answered and transcribed on A (response.done comes after both
    # transcripts, and A handles the session's events in order).
    await speak(stream, frames=10, variant=1)
    await stream.wait_for("mark", count=2, timeout=WAIT)
    await a.wait_for_line("openai response.done", WAIT)

    a.send_signal(signal.SIGTERM)  # a deploy
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    assert stream.close_code == WSCloseCode.OK
    assert stream.closed_at is not None
    await asyncio.wait_for(first.closed.wait(), WAIT)

    # Twilio asks <Connect action> what next; the load balancer sends it to B.
    again = await fleet.action(b, sid)
    assert again.stream_url == PUBLIC_STREAM + "/resume", again  # taken while draining
    assert again.parameters["resume"] == "1"
    assert again.parameters["token"] != twiml.parameters["token"]
    resumed = await fleet.stream(b, sid, again)
    second = await next_session(fleet.standin.app, WAIT)
    await second.wait_for("session.update", timeout=WAIT)
    gap = fleet.watch.updates[-1] - stream.closed_at
    report(f"handover gap: {gap * 1000:.0f} ms from A's stream closing to B's new "
           f"session.update")

    # The new session knows what was said on A.
    said = await second.wait_for("conversation.item.create", count=1, timeout=WAIT)
    assert said["item"]["role"] == "user"
    assert said["item"]["content"][0]["text"].startswith("caller turn 1"), said
    answered = await second.wait_for("conversation.item.create", count=2, timeout=WAIT)
    assert answered["item"]["role"] == "assistant", answered
    await b.wait_for_line("resuming a handed-over call", WAIT)

    await speak(resumed, frames=6, variant=4)  # audio flows on B
    await resumed.wait_for("mark", timeout=WAIT)
    assert loud(4) in heard(resumed)
    assert await a.wait(WAIT) == 0
    assert "handing 1 live call(s) over" in a.output()
    await resumed.send_stop()
    await asyncio.wait_for(resumed.closed.wait(), WAIT)


async def test_admin_hang_up_reaches_the_instance_holding_the_call(fleet: Fleet) -> None:
    a, b = await fleet.start({}, {})
    sid = new_sid()
    stream, session, _ = await fleet.place(a, a, sid)
    url = f"{b.url}/calls/{sid}/hangup"

    async with fleet.http.post(url, headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    async with fleet.http.post(f"{b.url}/calls/{new_sid()}/hangup",
                               headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
        assert resp.status == 404  # no live call by that sid anywhere
    async with fleet.http.post(url, headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
        assert resp.status == 202, await resp.text()

    await asyncio.wait_for(stream.closed.wait(), WAIT)  # A ended it, told through Redis
    assert stream.close_code == WSCloseCode.OK
    await a.wait_for_line("hanging up on an operator's request", WAIT)
    await asyncio.wait_for(session.closed.wait(), WAIT)
    for instance in (b, a):
        after = await fleet.action(instance, sid)
        assert after.hangs_up and after.stream_url is None and not after.says, after


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to freeze without touching other tests."""
    server = start_or_skip()
    try:
        yield server
    finally:
        server.cleanup()


async def test_a_stalled_redis_costs_a_call_about_a_second(fleet: Fleet,
                                                           own_redis: RedisServer) -> None:
    """Redis frozen (SIGSTOP: connections open, nothing answers). The webhook, the stream's
    start and the `<Connect action>` each spend at most about a second on Redis, then the
    instance goes on alone; once Redis answers again it is used again, the calls held through
    the stall counted fleet-wide."""
    config = {"REDIS_URL": own_redis.url, "MAX_CALLS": "1", "FLEET_LEASE_SECONDS": "1"}
    a, b = await fleet.start(config, config)

    sid = new_sid()
    with own_redis.stalled():
        started = time.monotonic()
        twiml = await fleet.webhook(a, sid)
        webhook = time.monotonic() - started
        assert twiml.stream_url == PUBLIC_STREAM, twiml  # admitted on A's own count

        started = time.monotonic()
        stream = await fleet.stream(a, sid, twiml)
        session = await next_session(fleet.standin.app, WAIT)
        await session.wait_for("session.update", timeout=WAIT)
        setup = fleet.watch.updates[-1] - started
        await a.wait_for_line("call started", WAIT)

        # B goes local too (its heartbeat finds Redis frozen); the frozen server then sees
        # every lease lapse, so recovery must re-assert A's slot.
        for instance in (a, b):
            await instance.wait_for_line("Redis is not answering", WAIT)

        ending = new_sid()  # a second call, ended during the stall: its <Connect action>
        other = await fleet.webhook(b, ending)
        other_stream = await fleet.stream(b, ending, other)
        await next_session(fleet.standin.app, WAIT)
        await other_stream.send_stop()
        await asyncio.wait_for(other_stream.closed.wait(), WAIT)
        started = time.monotonic()
        after = await fleet.action(b, ending)
        action = time.monotonic() - started
        assert after.hangs_up and after.stream_url is None, after

    report(f"Redis stalled: webhook {webhook * 1000:.0f} ms, stream start to session.update "
           f"{setup * 1000:.0f} ms, <Connect action> {action * 1000:.0f} ms")
    assert webhook < 1.5, f"the webhook took {webhook:.2f} s with Redis stalled"

    for instance in (a, b):  # each probes, finds Redis answering and re-registers
        await instance.wait_for_line("Redis answers again", WAIT)
    # The call held through the stall counts fleet-wide again: MAX_CALLS=1 is reached.
    busy = await fleet.webhook(b, new_sid())
    assert busy.stream_url is None and busy.hangs_up, busy
    await stream.send_stop()
    await asyncio.wait_for(stream.closed.wait(), WAIT)

    # Tokens are fleet-wide again: claimed on A, refused when replayed on B.
    fresh = new_sid()
    answer = await accepted_within(fleet, b, fresh, WAIT)
    live = await fleet.stream(a, fresh, answer)
    await next_session(fleet.standin.app, WAIT)
    replay = await fleet.stream(b, fresh, answer)
    await asyncio.wait_for(replay.closed.wait(), WAIT)
    assert replay.close_code == WSCloseCode.POLICY_VIOLATION
    await b.wait_for_line("stream token already used", WAIT)
    await live.send_stop()
    await asyncio.wait_for(live.closed.wait(), WAIT)
