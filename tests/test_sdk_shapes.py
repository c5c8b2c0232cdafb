"""The stand-in and the bridge speak what openai-python's GA types describe, and nothing else.

`server.testing.sdk_check` validates an event as the `RealtimeServerEvent` / `RealtimeClientEvent`
member its `type` names and fails on keys the SDK does not know. The rig in conftest.py applies
it to every event of every test; these tests prove the checker itself can fail, and walk the
stand-in through every path other work relies on.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from server.testing.sdk_check import EventChecker, SdkViolation, check, event_types, problems
from server.testing.standin import (
    StandinOptions,
    StandinSession,
    create_standin_app,
    next_session,
    usage_for,
)
from tests.conftest import MakeRig, speak
from tests.test_standin import LOUD, PCMU_UPDATE, QUIET, Client

MakeServer = Callable[..., Awaitable[TestServer]]
Connect = Callable[..., Awaitable[tuple[Client, StandinSession]]]
TRANSCRIBED: dict[str, Any] = {"type": "session.update", "session": {
    "type": "realtime", "audio": {"input": {
        "format": {"type": "audio/pcmu"}, "transcription": {"model": "gpt-4o-mini-transcribe"},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 100}},
        "output": {"format": {"type": "audio/pcmu"}, "voice": "alloy"}}}}
SPEECH = LOUD * 6  # 120 ms
USAGE: dict[str, Any] = {"total_tokens": 1430, "input_tokens": 1180, "output_tokens": 250,
         "input_token_details": {"text_tokens": 900, "audio_tokens": 280, "cached_tokens": 1024,
                                 "cached_tokens_details": {"text_tokens": 832,
                                                           "audio_tokens": 192}},
         "output_token_details": {"text_tokens": 60, "audio_tokens": 190}}


# --- the checker itself ---

@pytest.mark.parametrize(("direction", "event"), [
    ("client", {"type": "session.update", "session": {
        "type": "realtime", "model": "gpt-realtime", "output_modalities": ["audio"],
        "instructions": "Be brief.",
        "audio": {"input": {"format": {"type": "audio/pcmu"},
                            "turn_detection": {"type": "semantic_vad", "eagerness": "low"},
                            "noise_reduction": {"type": "near_field"},
                            "transcription": {"model": "gpt-4o-mini-transcribe"}},
                  "output": {"format": {"type": "audio/pcmu"}, "voice": "marin", "speed": 1.0}},
        "tools": [{"type": "function", "name": "lookup_order", "description": "Find an order",
                   "parameters": {"type": "object", "properties": {"id": {"type": "string"}},
                                  "additionalProperties": False}}],
        "tool_choice": "auto"}}),
    ("client", {"type": "conversation.item.truncate", "item_id": "item_A1", "content_index": 0,
                "audio_end_ms": 1500}),
    ("client", {"type": "conversation.item.create", "item": {
        "type": "message", "role": "assistant",
        "content": [{"type": "output_text", "text": "Sure."}]}}),
    ("server", {"type": "response.done", "event_id": "e1", "response": {
        "id": "resp_1", "object": "realtime.response", "status": "cancelled",
        "status_details": {"type": "cancelled", "reason": "turn_detected"}, "output": [],
        "usage": USAGE}}),
    ("server", {"type": "response.function_call_arguments.done", "event_id": "e2",
                "response_id": "resp_2", "item_id": "item_F1", "output_index": 0,
                "call_id": "call_abc", "name": "lookup_order", "arguments": "{\"id\":\"A1\"}"}),
])
def test_ga_events_pass(direction: Any, event: dict[str, Any]) -> None:
    assert problems(direction, event) == []
    check(direction, event)


def test_missing_and_mistyped_fields_are_named() -> None:
    found = problems("server", {"type": "response.output_audio.delta", "event_id": "e",
                                "item_id": "i", "output_index": 0, "content_index": "0",
                                "delta": "AAAA"})
    assert "response_id: Field required" in found
    assert any(p.startswith("content_index: Input should be a valid integer") for p in found)
    assert problems("client", {"type": "response.create", "response": "now"})


def test_unknown_keys_anywhere_are_named() -> None:
    usage = {**USAGE, "input_token_details": {
        **USAGE["input_token_details"],
        "cached_tokens_details": {"text_tokens": 1, "video_tokens": 2}}}
    found = problems("server", {"type": "response.done", "event_id": "e",
                                "response": {"id": "r", "usage": usage}})
    assert len(found) == 1
    assert found[0].startswith(
        "response.usage.input_token_details.cached_tokens_details.video_tokens: key unknown")
    assert "CachedTokensDetails knows: audio_tokens, image_tokens, text_tokens" in found[0]
    # the beta shape: formats and voice at session level
    beta = problems("client", {"type": "session.update", "session": {
        "type": "realtime", "input_audio_format": "g711_ulaw", "voice": "alloy"}})
    assert [p.split(":")[0] for p in beta] == ["session.input_audio_format", "session.voice"]
    item = problems("client", {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "hi", "lang": "en"}]}})
    assert [p.split(":")[0] for p in item] == ["item.content[0].lang"]


def test_unknown_and_beta_event_types_fail() -> None:
    assert "response.output_audio.delta" in event_types("server")
    assert "response.audio.delta" not in event_types("server")  # the beta name
    with pytest.raises(SdkViolation, match=r"'response\.audio\.delta' is not a server event"):
        check("server", {"type": "response.audio.delta", "event_id": "e"})
    with pytest.raises(SdkViolation, match="not a client event type"):
        check("client", {"type": "session.created", "session": {"type": "realtime"}})


def test_checker_collects_once_per_problem_and_reports() -> None:
    checker = EventChecker()
    bad = {"type": "input_audio_buffer.speech_started", "event_id": "e", "item_id": "i"}
    for _ in range(3):
        checker("server", bad)
    checker("client", {"type": "response.cancel"})
    assert checker.checked == 4
    assert checker.seen["server", "input_audio_buffer.speech_started"] == 3
    assert len(checker.violations) == 1
    with pytest.raises(SdkViolation) as caught:
        checker.assert_clean()
    message = str(caught.value)
    assert "3 Realtime event(s) of 4 checked" in message
    assert "'input_audio_buffer.speech_started' (sent by the stand-in)" in message
    assert "audio_start_ms: Field required" in message
    assert "(seen 3 times)" in message
    assert len(checker.take()) == 1
    checker.assert_clean()


def test_the_product_and_the_standin_run_without_openai() -> None:
    code = ("import sys, server.testing.standin, server.testing.sdk_check; "
            "sys.exit('openai' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- the stand-in, every path, checked ---

@pytest.fixture
async def connect(aiohttp_server: MakeServer) -> AsyncIterator[Connect]:
    """A stand-in whose options carry `check_events`; the client sends `update` first."""
    http = aiohttp.ClientSession()

    async def open_(options: StandinOptions,
                    update: Mapping[str, Any] = TRANSCRIBED) -> tuple[Client, StandinSession]:
        server = await aiohttp_server(create_standin_app(options))
        client = Client(await http.ws_connect(server.make_url("/v1/realtime?model=gpt-realtime")))
        session = await next_session(server.app)
        await client.until("session.created")
        await client.send(dict(update))
        await client.until("session.updated")
        return client, session

    yield open_
    await http.close()


async def turn(client: Client, speech: bytes = SPEECH) -> dict[str, Any]:
    """One caller turn, then the echo response to its end."""
    await client.append(QUIET * 2 + speech + QUIET * 5)
    return await client.until("response.done")


def kinds(client: Client) -> list[str]:
    return [e["type"] for e in client.events]


async def test_every_standin_path_is_sdk_valid(connect: Connect) -> None:
    checker = EventChecker()
    client, session = await connect(StandinOptions(check_events=checker))
    await turn(client)
    await session.send({"type": "response.function_call_arguments.done", "response_id": "resp_x",
                        "item_id": "item_F1", "output_index": 0, "call_id": "call_abc",
                        "name": "lookup_order", "arguments": "{}"})
    for item in ({"type": "function_call_output", "call_id": "call_abc", "output": "{\"ok\":1}"},
                 {"type": "message", "role": "user",
                  "content": [{"type": "input_text", "text": "my order is A1"}]},
                 {"type": "message", "role": "assistant",
                  "content": [{"type": "output_text", "text": "Found it."}]}):
        await client.send({"type": "conversation.item.create", "item": item})
        await client.until("conversation.item.done")
    await client.send({"type": "response.create", "response": {"instructions": "Summarise."}})
    done = await client.until("response.done")
    reply = done["response"]["output"][0]["id"]
    await client.send({"type": "conversation.item.truncate", "item_id": reply,
                       "content_index": 0, "audio_end_ms": 40})
    await client.until("conversation.item.truncated")
    await client.send({"type": "response.cancel"})
    await client.until("error")
    checker.assert_clean()
    server_kinds = {kind for direction, kind in checker.seen if direction == "server"}
    assert server_kinds >= {
        "session.created", "session.updated", "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "conversation.item.added", "conversation.item.done",
        "conversation.item.input_audio_transcription.completed", "response.created",
        "response.output_item.added", "response.content_part.added",
        "response.output_audio_transcript.delta", "response.output_audio.delta",
        "response.output_audio.done", "response.output_audio_transcript.done",
        "response.content_part.done", "response.output_item.done", "response.done",
        "conversation.item.truncated", "error"}
    assert {kind for direction, kind in checker.seen if direction == "client"} == {
        "session.update", "input_audio_buffer.append", "conversation.item.create",
        "response.create", "conversation.item.truncate", "response.cancel"}
    assert checker.seen["client", "conversation.item.create"] == 3


async def test_transcripts_and_usage_are_deterministic(connect: Connect) -> None:
    checker = EventChecker()
    client, _ = await connect(StandinOptions(check_events=checker))
    first = await turn(client)
    await turn(client, LOUD * 10)
    caller = [e["transcript"] for e in client.events
              if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert caller == ["caller turn 1 (120 ms)", "caller turn 2 (200 ms)"]
    replies = [e for e in client.events if e["type"] == "response.output_audio_transcript.done"]
    assert [e["transcript"] for e in replies] == ["echo of 120 ms", "echo of 200 ms"]
    deltas = [e["delta"] for e in client.events
              if e["type"] == "response.output_audio_transcript.delta"
              and e["item_id"] == replies[0]["item_id"]]
    assert deltas == ["echo ", "of ", "120 ", "ms"]
    assert first["response"]["output"][0]["content"] == [
        {"type": "output_audio", "transcript": "echo of 120 ms"}]
    usage = first["response"]["usage"]
    assert usage == usage_for(120)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    details = usage["input_token_details"]
    assert details["cached_tokens"] == sum(details["cached_tokens_details"].values())

    def numbers(value: Any) -> list[Any]:
        return [n for v in value.values() for n in numbers(v)] if isinstance(value, dict) \
            else [value]

    assert all(n > 0 for n in numbers(usage))
    checker.assert_clean()


async def test_no_caller_transcript_without_transcription(connect: Connect) -> None:
    checker = EventChecker()
    client, _ = await connect(StandinOptions(check_events=checker), update=PCMU_UPDATE)
    await turn(client)
    assert "conversation.item.input_audio_transcription.completed" not in kinds(client)
    assert "response.output_audio_transcript.done" in kinds(client)  # the assistant's still
    # The committed turn is a conversation item before the response that answers it.
    committed = kinds(client).index("input_audio_buffer.committed")
    assert kinds(client)[committed + 1:committed + 3] == ["conversation.item.added",
                                                          "conversation.item.done"]
    assert kinds(client).index("response.created") > committed + 2
    checker.assert_clean()


async def test_a_cancelled_response_reports_its_partial_item(connect: Connect) -> None:
    checker = EventChecker()
    client, _ = await connect(StandinOptions(check_events=checker, pace=1.0, chunk_ms=20))
    await client.append(LOUD * 25 + QUIET * 5)
    delta = await client.until("response.output_audio.delta")
    await client.send({"type": "response.cancel"})
    done = await client.until("response.done")
    response = done["response"]
    assert response["status"] == "cancelled"
    assert response["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    [item] = response["output"]
    assert item["id"] == delta["item_id"]
    assert item["status"] == "incomplete"
    sent_ms = len(client.audio()) // 8
    assert response["usage"] == usage_for(sent_ms)
    checker.assert_clean()


async def test_tool_results_and_turns_become_items(connect: Connect) -> None:
    checker = EventChecker()
    client, session = await connect(StandinOptions(check_events=checker))
    call = {"type": "function_call", "id": "item_F1", "call_id": "call_9", "name": "lookup",
            "arguments": "{}", "status": "completed", "object": "realtime.item"}
    await session.send({"type": "response.output_item.done", "response_id": "resp_x",
                        "output_index": 0, "item": call})
    assert "call_9" in session.call_ids
    await client.send({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "call_9", "output": "{\"found\":true}"}})
    added = await client.until("conversation.item.added")
    done = await client.until("conversation.item.done")
    assert added["item"] == done["item"]
    assert added["item"]["type"] == "function_call_output"
    assert added["item"]["output"] == "{\"found\":true}"
    assert added["item"]["status"] == "completed"
    await client.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}})
    user = await client.until("conversation.item.added")
    assert user["previous_item_id"] == added["item"]["id"]
    assert user["item"]["content"] == [{"type": "input_text", "text": "hi"}]
    checker.assert_clean()


# The SDK cannot know which call_ids the model issued, and types a text part's `text` as optional.
SDK_CANNOT_TELL = {"item.call_id", "item.content[0].text"}


@pytest.mark.parametrize(("event", "code", "param"), [
    ({"type": "conversation.item.create"}, "missing_required_parameter", "item"),
    ({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "call_never", "output": "{}"}},
     "invalid_value", "item.call_id"),
    ({"type": "conversation.item.create", "item": {
        "type": "function_call_output", "call_id": "call_never"}},
     "missing_required_parameter", "item.output"),
    ({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "output_text", "text": "x"}]}},
     "invalid_value", "item.content[0].type"),
    ({"type": "conversation.item.create", "item": {
        "type": "message", "role": "assistant",
        "content": [{"type": "input_text", "text": "x"}]}},
     "invalid_value", "item.content[0].type"),
    ({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text"}]}},
     "missing_required_parameter", "item.content[0].text"),
    ({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [], "name": "x"}},
     "unknown_parameter", "item.name"),
    ({"type": "conversation.item.create", "item": {"type": "image"}},
     "invalid_value", "item.type"),
    ({"type": "response.create", "response": {"temperature": 0.8}},
     "unknown_parameter", "response.temperature"),
])
async def test_bad_client_items_are_refused_in_valid_errors(
    connect: Connect, event: dict[str, Any], code: str, param: str
) -> None:
    checker = EventChecker()

    def server_only(direction: Any, sent: Mapping[str, Any]) -> None:
        if direction == "server":  # the client event is bad on purpose
            checker(direction, sent)

    client, session = await connect(StandinOptions(check_events=server_only))
    await client.send({**event, "event_id": "evt_bad"})
    error = (await client.until("error"))["error"]
    assert (error["code"], error["param"], error["event_id"]) == (code, param, "evt_bad")
    assert "conversation.item.added" not in kinds(client)
    assert bool(problems("client", event)) is (param not in SDK_CANNOT_TELL)
    assert not session.closed.is_set()
    checker.assert_clean()


# --- the bridge, through the rig (conftest checks every event both ways) ---

async def test_the_bridge_sends_sdk_valid_events(make_rig: MakeRig) -> None:
    rig = await make_rig(noise_reduction="near_field", transcription_model="gpt-4o-transcribe")
    stream, session = await rig.place()
    await speak(stream, frames=10)
    await session.wait_for("input_audio_buffer.append", count=18)
    await stream.wait_for("mark")
    assert rig.events.seen["client", "session.update"] == 1
    assert rig.events.seen["client", "input_audio_buffer.append"] >= 18
    assert rig.events.seen["server", "conversation.item.input_audio_transcription.completed"]
    assert rig.events.violations == []
    semantic = await make_rig(turn_detection="semantic_vad", vad_eagerness="high")
    _, session = await semantic.place()
    update = await session.wait_for("session.update")
    assert update["session"]["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
    assert semantic.events.violations == []


async def test_a_bad_event_in_the_rig_is_caught(make_rig: MakeRig) -> None:
    rig = await make_rig()
    _, session = await rig.place()
    await session.send({"type": "rate_limits.updated", "rate_limits": [
        {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.01,
         "window": "1m"}]})
    await session.send({"type": "input_audio_buffer.speech_started", "item_id": "i"},
                       check=False)  # a test may malform an event on purpose
    [violation] = rig.events.take()
    assert "'rate_limits.updated' (sent by the stand-in)" in violation
    assert "rate_limits[0].window: key unknown to the SDK" in violation
