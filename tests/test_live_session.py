"""LiveSession, the GPT-Live side of the model boundary, against the GPT-Live stand-in over a
real socket: what it sends to open a session, how it turns GPT-Live's events into the
boundary's (audio, turns, the caller's speech, barge-in, tool calls, usage, errors, the end),
and what each call-side request becomes on the wire. Every event both ways is checked against
openai-python's GPT-Live types (unknown keys fail)."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.call.conversation import (
    AssistantTurn,
    CallerTurn,
    Entry,
    Keypad,
    OperatorTurn,
    ToolCall,
    Whisper,
)
from server.models import events as ev
from server.models.live import APPEND_TOKENS, LiveSession, chunks, history
from server.models.session import ModelFailed, ModelLost, ModelUnavailable, SessionConfig, ToolSpec
from server.settings import Settings
from server.testing.inbox import Inbox, wait_until
from server.testing.live_standin import (
    LiveStandinOptions,
    LiveStandinSession,
    backend_usage,
    create_live_standin_app,
    next_live_session,
)
from server.testing.sdk_check import EventChecker
from server.testing.standin import ToolCallScript, tool_call
from server.wire import live

MakeServer = Callable[..., Awaitable[TestServer]]
KEY = "sk-live-test-0123456789"
LOUD = bytes([0x80, 0x00] * 80)
QUIET = b"\xff" * 160
FAST = LiveStandinOptions(api_key=KEY, pace=0, silence_ms=200)
LOOKUP = ToolSpec("lookup_order", "Find an order", {
    "type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]})
CONFIG = SessionConfig("gpt-live-1", "You answer the phone for Example Shop.", "marin",
                       (LOOKUP,))
log = logging.getLogger("test.live")


def b64(frame: bytes) -> str:
    return base64.b64encode(frame).decode()


@dataclass
class Opened:
    """A LiveSession relaying from a stand-in session, and everything it emitted."""

    session: LiveSession
    standin: LiveStandinSession
    events: Inbox[ev.ModelEvent] = field(default_factory=Inbox)
    audio: list[ev.AudioDelta] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        async def on_audio(delta: ev.AudioDelta) -> None:
            self.audio.append(delta)

        async def on_event(event: ev.ModelEvent) -> None:
            self.events.add(event)

        self.task = asyncio.get_running_loop().create_task(
            self.session.run(on_audio, on_event))

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events.items if isinstance(e, kind)]

    async def until(self, kind: type, count: int = 1, timeout: float = 5.0) -> Any:
        return await self.events.wait_for(lambda e: isinstance(e, kind), count, timeout,
                                          kind.__name__)

    async def speak(self, loud: int, quiet: int, paced: bool = False) -> None:
        """Caller audio, as the call's relay sends it: a frame at a time, unpaced, or (`paced`)
        in real time, as a phone line delivers it."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n, frame in enumerate([LOUD] * loud + [QUIET] * quiet):
            if paced:
                await asyncio.sleep(max(start + n * 0.02 - loop.time(), 0))
            await self.session.send_audio(b64(frame))

    def sent(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.standin.received if e.get("type") == kind]

    async def ended(self) -> BaseException | None:
        """How `run` ended (None: it returned)."""
        assert self.task is not None
        try:
            await asyncio.wait_for(self.task, 5)
        except (ModelLost, ModelFailed) as e:
            return e
        return None


Open = Callable[..., Awaitable[Opened]]


@pytest.fixture
def checker() -> EventChecker:
    return EventChecker("live")


@pytest.fixture
async def open_live(aiohttp_server: MakeServer,
                    checker: EventChecker) -> AsyncIterator[Open]:
    http = aiohttp.ClientSession()
    opened: list[Opened] = []

    async def open_(options: LiveStandinOptions = FAST, config: SessionConfig = CONFIG,
                    conversation: list[Entry] | None = None, run: bool = True,
                    **overrides: Any) -> Opened:
        server = await aiohttp_server(create_live_standin_app(
            replace(options, check_events=checker)))
        settings = Settings(openai_api_key=KEY, openai_connect_timeout=3.0,
                            openai_live_url=str(server.make_url("/v1/live/sessions")).replace(
                                "http://", "ws://"), **overrides)
        session = LiveSession(settings, http, log)
        await session.open(config, conversation or [])
        it = Opened(session, await next_live_session(server.app))
        opened.append(it)
        if run:
            it.start()
        return it

    yield open_
    for it in opened:
        if it.task is not None:
            it.task.cancel()
            await asyncio.gather(it.task, return_exceptions=True)
        await it.session.close()
    await http.close()
    checker.assert_clean()


# --- opening ---


async def test_session_start_carries_the_call_and_its_conversation(open_live: Open) -> None:
    conversation: list[Entry] = [
        CallerTurn(1.0, "Where is my order?", "c1"),
        AssistantTurn(2.0, "Let me check.", "a1", interrupted=True, heard_ms=400),
        Keypad(3.0, "1234"),
        ToolCall(4.0, "lookup_order", "call_1", {"order_id": "1234"}, "ok", 0.2,
                 {"status": "shipped"}),
        ToolCall(5.0, "lookup_order", "call_2", "{broken", "invalid_arguments", 0.0,
                 {"error": "the arguments were not valid JSON"}),
        OperatorTurn(6.0, "I can help with that.", "Ana", "o1"),
        Whisper(7.0, "Offer a discount.", "Ana"),
    ]
    it = await open_live(conversation=conversation, run=False,
                         live_backend_model="gpt-5.4-mini")
    assert it.session.session_id == it.standin.id  # open() returned after session.started
    [start] = it.sent("session.start")
    session = start["session"]
    assert session["model"] == "gpt-live-1"
    assert session["instructions"] == "You answer the phone for Example Shop."
    assert session["audio"] == {"format": {"type": "audio/pcmu", "rate": 8000},
                                "output": {"voice": "marin"}}
    responses = session["delegation"]["responses"]
    assert session["delegation"]["type"] == "responses"
    assert responses["model"] == "gpt-5.4-mini"
    assert responses["instructions"].endswith("You answer the phone for Example Shop.")
    assert [t["name"] for t in responses["tools"]] == ["lookup_order"]
    assert [(m["role"], m["content"][0]["text"]) for m in session["input"]] == [
        ("user", "Where is my order?"),
        ("assistant", "Let me check. [the caller interrupted after 400 ms]"),
        ("user", "The caller typed 1 2 3 4 on the keypad."),
        ("developer", 'The tool lookup_order({"order_id":"1234"}) returned {"status":"shipped"}'),
        ("developer", "The tool lookup_order({broken) failed (invalid_arguments): "
                      '{"error":"the arguments were not valid JSON"}'),
        ("developer", "A person from the business, Ana, said to the caller: I can help with "
                      "that."),
        ("developer", "Offer a discount."),
    ]
    await it.session.send_audio(b64(QUIET))  # the audio path is open now
    await it.standin.wait_for("session.input_audio.append")


async def test_a_long_conversation_is_trimmed_to_what_the_api_takes(open_live: Open) -> None:
    conversation: list[Entry] = []
    for n in range(150):
        conversation += [CallerTurn(n, f"question {n} " + "word " * 20, f"c{n}"),
                         AssistantTurn(n + 0.5, f"answer {n} " + "word " * 20, f"a{n}")]
    it = await open_live(conversation=conversation, run=False)
    inputs = it.sent("session.start")[0]["session"]["input"]
    texts = [m["content"][0]["text"] for m in inputs]
    assert len(inputs) <= live.HISTORY_MAX_MESSAGES
    assert sum(live.estimate_tokens(t) for t in texts) <= live.HISTORY_MAX_TOKENS
    assert inputs[0]["role"] == "developer" and texts[0].startswith("Earlier in this call: ")
    assert texts[-1].startswith("answer 149 ")  # the newest kept, oldest dropped
    assert it.standin.started  # and the service took it


async def test_a_session_that_cannot_be_opened_says_why(aiohttp_server: MakeServer) -> None:
    async def silent(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:  # takes session.start, never answers
            pass
        return ws

    app = web.Application()
    app.router.add_get("/v1/live/sessions", silent)
    mute = await aiohttp_server(app)
    refusing = await aiohttp_server(create_live_standin_app(
        LiveStandinOptions(api_key=KEY, models=("gpt-live-1",))))

    def url(server: TestServer) -> str:
        return str(server.make_url("/v1/live/sessions")).replace("http://", "ws://")

    async with aiohttp.ClientSession() as http:
        cases = [
            (Settings(openai_api_key="sk-wrong", openai_live_url=url(refusing)), CONFIG,
             "GPT-Live refused the session: HTTP 401 (check OPENAI_API_KEY)"),
            (Settings(openai_api_key=KEY, openai_live_url=url(refusing)),
             replace(CONFIG, model="gpt-live-9"),
             "GPT-Live refused the session: model_not_found: The model 'gpt-live-9' does "
             "not exist. (session.model)"),
            (Settings(openai_api_key=KEY, openai_live_url=url(mute),
                      openai_connect_timeout=0.3), CONFIG,
             "GPT-Live did not start the session within 0.3 s"),
            (Settings(openai_api_key=KEY, openai_live_url="ws://127.0.0.1:9/v1/live/sessions"),
             CONFIG, "could not reach GPT-Live at 127.0.0.1:9"),
            (Settings(openai_api_key=KEY, openai_live_url=url(refusing)),
             replace(CONFIG, instructions=None, prompt={"id": "pmpt_1"}),
             "GPT-Live needs the prompt's text"),
        ]
        for settings, config, why in cases:
            session = LiveSession(settings, http, log)
            with pytest.raises(ModelUnavailable) as caught:
                await session.open(config, [])
            assert str(caught.value).startswith(why), str(caught.value)
            assert KEY not in str(caught.value) and session.closed


# --- what it relays ---


async def test_turns_audio_and_the_callers_speech_become_boundary_events(
        open_live: Open) -> None:
    it = await open_live(replace(FAST, usage_interval_ms=500))
    assert isinstance(await it.until(ev.SessionReady), ev.SessionReady)
    # 200 ms of speech, then quiet: echoed, and the reply's turn over 1.2 s after its end
    await it.speak(loud=10, quiet=100, paced=True)
    reply = await it.until(ev.AssistantTranscript, timeout=8)
    caller = it.of(ev.CallerTranscript)[0]
    prefix = it.standin.id + "_"
    assert caller == ev.CallerTranscript(prefix + "caller_1", "caller turn 1 (200 ms)")
    assert reply == ev.AssistantTranscript("", prefix + "assistant_2",
                                           "echo of caller turn 1 (200 ms)")
    events = it.events.items
    started = it.of(ev.SpeechStarted)
    stopped = it.of(ev.SpeechStopped)
    assert started == [ev.SpeechStarted(prefix + "caller_1", 0)]
    assert stopped[-1] == ev.SpeechStopped(prefix + "caller_1", 200)  # the speech's end
    assert events.index(started[0]) < events.index(stopped[0]) < events.index(caller)
    deltas = it.of(ev.TranscriptDelta)
    assert "".join(d.delta for d in deltas if d.role == "caller") == "caller turn 1 (200 ms)"
    assert {d.item_id for d in deltas if d.role == "assistant"} == {prefix + "assistant_2"}
    # the output before the reply has no turn; from the reply's first words on, it is its
    items = [a.item_id for a in it.audio]
    assert items[0] == "" and items[-1] == prefix + "assistant_2"
    assert items.index(prefix + "assistant_2") > 0
    assert all(a.response_id is None for a in it.audio)
    assert it.of(ev.ModelYielded) == []
    usage = it.of(ev.Usage)
    assert usage and all(u.cumulative for u in usage)
    assert [u.usage["seconds"] for u in usage][:2] == [0.5, 1.0]


async def test_the_model_going_quiet_under_the_caller_is_a_barge_in(open_live: Open) -> None:
    it = await open_live(replace(FAST, reply="tone", barge_in_ms=100))
    await it.speak(loud=10, quiet=20)  # a turn; the tone reply (400-1000 ms) begins
    await wait_until(lambda: any(d.role == "assistant" for d in it.of(ev.TranscriptDelta)),
                     5, "the reply began")
    await it.speak(loud=25, quiet=30)  # the caller talks over it
    yielded = await it.until(ev.ModelYielded, timeout=8)
    said = await it.until(ev.AssistantTranscript)
    assert yielded.item_id == said.item_id
    assert 0 < yielded.heard_ms < 600
    assert it.events.items.index(yielded) < it.events.items.index(said)
    assert it.standin.barge_ins  # the stand-in did yield


async def test_tool_calls_then_one_response_create_once_all_are_answered(
        open_live: Open) -> None:
    script = ToolCallScript((("lookup_order", {"order_id": "1"}),
                             ("lookup_order", {"order_id": "2"})))
    it = await open_live(replace(FAST, text_tool_calls={"1 2": script}))
    await it.speak(loud=0, quiet=5)
    await it.session.add_text("user", "The caller typed 1 2 on the keypad.")
    done = await it.until(ev.ResponseDone)
    calls = it.of(ev.FunctionCall)
    [delegation] = it.standin.delegations
    assert [c.name for c in calls] == ["lookup_order", "lookup_order"]
    assert {c.response_id for c in calls} == {delegation} == {done.response_id}
    assert done.status == "completed" and done.usage == backend_usage(2)
    assert it.events.items.index(calls[-1]) < it.events.items.index(done)
    assert it.sent("session.thinking.append")[0]["content"] == \
        "The caller typed 1 2 on the keypad."
    await it.session.add_tool_result(calls[0].call_id, '{"status": "shipped"}')
    await it.standin.wait_for("response.item.create")
    assert it.sent("response.create") == []  # one call still without an output
    await it.session.add_tool_result(calls[1].call_id, '{"status": "lost"}')
    await it.standin.wait_for("response.create")
    answer = await it.until(ev.ResponseDone, count=2)  # the backend's answer
    assert answer.response_id == delegation and answer.usage == backend_usage(0)
    assert len(it.sent("response.create")) == 1
    assert it.standin.tool_outputs == {calls[0].call_id: '{"status": "shipped"}',
                                       calls[1].call_id: '{"status": "lost"}'}


async def test_what_the_call_says_to_the_model(open_live: Open) -> None:
    it = await open_live()
    await it.speak(loud=0, quiet=5)
    await it.session.create_response("Greet the caller now, then listen.", "bridge_response_7")
    await it.session.create_response(None, "bridge_response_8")  # nothing: it takes its turns
    await it.session.add_text("system", "Offer the caller a discount.")
    await it.session.truncate("item", 100)  # nothing: it knows what it said
    await it.session.listen_only(True)
    await it.session.listen_only(False)
    long = "word " * 1500  # over GPT-Live's 500-token limit for one append
    await it.session.add_text("user", long)
    await it.standin.wait_for("session.thinking.append", count=len(chunks(long)))
    greet, whisper, taken, back = it.sent("session.instructions.append")
    assert (greet["content"], greet["event_id"]) == ("Greet the caller now, then listen.",
                                                     "bridge_response_7")
    assert whisper["content"] == "Offer the caller a discount."
    assert "taken over" in taken["content"] and "handed the call back" in back["content"]
    parts = [e["content"] for e in it.sent("session.thinking.append")]
    assert len(parts) > 1 and " ".join(parts).split() == long.split()
    assert all(live.estimate_tokens(p) <= APPEND_TOKENS for p in parts)
    kinds = {e["type"] for e in it.standin.received}
    assert "conversation.item.truncate" not in kinds and "response.create" not in kinds
    assert not [e for e in it.standin.sent if e["type"] == "error"]  # all taken
    assert [e for e in it.events.items if isinstance(e, ev.ModelError)] == []


# --- the end ---


@pytest.mark.parametrize(("how", "outcome"), [
    ("expired", ModelLost), ("connection_lost", ModelLost), ("content", ModelFailed),
    ("drop", ModelLost), ("fatal error", ModelFailed), ("lose", ModelLost)])
async def test_how_a_session_ends(open_live: Open, how: str, outcome: type) -> None:
    it = await open_live()
    await it.speak(loud=0, quiet=10)
    await wait_until(lambda: it.standin.timeline_ms == 200, 5, "the audio taken")
    if how == "drop":
        it.standin.drop()
    elif how == "fatal error":
        await it.standin.send({"type": "error", "error": {
            "type": "invalid_request_error", "code": "insufficient_quota",
            "message": "You exceeded your quota.", "param": None, "client_event_id": None}})
    elif how == "lose":
        await it.session.lose("no pong within 10 s")
    else:
        await it.standin.end(how)
    ended = await it.ended()
    assert isinstance(ended, outcome), ended
    if how in ("expired", "connection_lost", "content"):
        assert str(ended) == f"GPT-Live closed the session ({how})"
        assert it.of(ev.Usage)[-1] == ev.Usage({"seconds": 0.2}, cumulative=True)
    if how == "fatal error":
        assert it.of(ev.ModelError) == [ev.ModelError(
            "insufficient_quota", "You exceeded your quota.", None, True)]
    if how == "lose":
        assert str(ended) == "no pong within 10 s"


async def test_a_recoverable_error_is_reported_and_the_session_goes_on(
        open_live: Open, caplog: pytest.LogCaptureFixture) -> None:
    it = await open_live()
    await it.session.add_text("system", "")  # an empty append: refused, nothing else
    await it.speak(loud=0, quiet=5)
    await it.standin.send({"type": "error", "error": {
        "type": "invalid_request_error", "code": "immutable_field_update",
        "message": "'session.model' cannot change.", "param": "session.model",
        "client_event_id": None}})
    error = await it.until(ev.ModelError)
    assert (error.code, error.fatal) == ("immutable_field_update", False)
    assert "GPT-Live error immutable_field_update" in caplog.text
    await it.speak(loud=10, quiet=30)
    await wait_until(lambda: any(d.role == "assistant" for d in it.of(ev.TranscriptDelta)),
                     5, "an answer")  # still answering
    assert not it.task or not it.task.done()


async def test_finish_asks_for_the_close_and_its_final_usage(open_live: Open) -> None:
    it = await open_live()
    await it.speak(loud=10, quiet=15)  # 500 ms; the turn is still open when the call ends
    await it.until(ev.TranscriptDelta, timeout=8)
    assert it.of(ev.CallerTranscript) == []
    await it.session.finish()
    assert await it.ended() is None  # run returned: closed at our request
    assert it.sent("session.close")
    assert it.of(ev.Usage)[-1] == ev.Usage({"seconds": 0.5}, cumulative=True)
    assert it.standin.close_reason == "close_requested"
    # the turns still open are complete now: the record has them
    assert [e.transcript for e in it.of(ev.CallerTranscript)] == ["caller turn 1 (200 ms)"]


async def test_closing_a_session_nobody_relays_waits_for_session_closed(
        open_live: Open) -> None:
    it = await open_live(run=False)
    await it.session.send_audio(b64(QUIET))
    await it.session.close()
    assert it.sent("session.close") and it.standin.close_reason == "close_requested"
    assert it.session.closed


# --- the pure parts ---


def test_history_skips_what_has_no_words() -> None:
    assert history([CallerTurn(0, "", "c"), AssistantTurn(1, "", "a"), Keypad(2, ""),
                    Whisper(3, "", "Ana")]) == []


def test_chunks_keep_every_word_within_the_limit() -> None:
    assert chunks("short") == ["short"]
    assert chunks("") == [""]
    text = "é" * 5000  # two UTF-8 bytes a character, no spaces
    parts = chunks(text)
    assert "".join(parts) == text
    assert all(live.estimate_tokens(p) <= APPEND_TOKENS for p in parts)


async def test_tool_call_script_works_on_a_caller_turn(open_live: Open) -> None:
    it = await open_live(replace(FAST, tool_calls={1: tool_call("lookup_order",
                                                                {"order_id": "9"})}))
    await it.speak(loud=10, quiet=15)
    call = await it.until(ev.FunctionCall, timeout=8)
    assert (call.name, call.arguments) == ("lookup_order", '{"order_id":"9"}')
