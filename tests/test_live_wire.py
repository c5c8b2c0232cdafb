"""server.wire.live: GPT-Live events decoded (odd shapes too), client events encoded as the SDK
describes them, the history trimmed to the API's limits, transcript deltas grouped into turns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, get_args

import orjson
import pytest

from server.testing.sdk_check import EventChecker, SdkViolation, check, event_types, problems
from server.wire import live


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)


LOOKUP = Tool("lookup_order", "Find an order", {"type": "object", "properties": {
    "order_id": {"type": "string"}}, "required": ["order_id"], "additionalProperties": False})
USAGE = {"input_tokens": 1200, "input_tokens_details": {"cached_tokens": 1000,
                                                        "cache_write_tokens": 0},
         "output_tokens": 80, "output_tokens_details": {"reasoning_tokens": 30},
         "total_tokens": 1280}


def wrap(nested: dict[str, Any], delegation_id: str | None = "deleg_1") -> dict[str, Any]:
    return {"type": "response.event", "event_id": "e9", "delegation_id": delegation_id,
            "event": {"sequence_number": 3, **nested}}


def response(status: str, **more: Any) -> dict[str, Any]:
    return {"id": "resp_7", "object": "response", "created_at": 1_800_000_000,
            "model": "gpt-5-mini", "status": status, "output": [], "tools": [],
            "tool_choice": "auto", "parallel_tool_calls": True, **more}


# Each: a server event as GPT-Live sends it (valid for the SDK), and what it decodes to.
DECODED: list[tuple[dict[str, Any], live.LiveEvent]] = [
    ({"type": "session.started", "event_id": "e1", "session": {
        "id": "live_abc", "expires_at": 1_800_003_600, "model": "gpt-live-1.1",
        "status": "active", "audio": {"format": live.PCMU_8K, "output": {"voice": "marin"}}}},
     live.SessionStarted("live_abc", 1_800_003_600, "gpt-live-1.1")),
    ({"type": "session.updated", "event_id": "e2", "session": {
        "id": "live_abc", "expires_at": 1, "model": "gpt-live-1", "status": "active"}},
     live.SessionUpdated("live_abc")),
    ({"type": "session.input_transcript.delta", "event_id": "e3", "delta": " my order",
      "start_ms": 1200, "end_ms": 1650}, live.InputTranscriptDelta(" my order", 1200, 1650)),
    ({"type": "session.output_transcript.delta", "event_id": "e4", "delta": "Sure",
      "start_ms": 2100, "end_ms": 2300}, live.OutputTranscriptDelta("Sure", 2100, 2300)),
    (wrap({"type": "response.output_item.done", "output_index": 0, "item": {
        "type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "lookup_order",
        "arguments": "{\"order_id\":\"42\"}", "status": "completed"}}),
     live.FunctionCall("call_1", "lookup_order", "{\"order_id\":\"42\"}", "fc_1", "deleg_1")),
    (wrap({"type": "response.completed", "response": response("completed", usage=USAGE)}),
     live.BackendDone("resp_7", "completed", USAGE, "deleg_1")),
    (wrap({"type": "response.incomplete", "response": response("incomplete", usage=USAGE)},
          None), live.BackendDone("resp_7", "incomplete", USAGE, None)),
    (wrap({"type": "response.created", "response": response("in_progress")}),
     live.BackendEvent("response.created", "deleg_1", "sequence_number=3")),
    (wrap({"type": "response.output_item.added", "output_index": 0, "item": {
        "type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "lookup_order",
        "arguments": "", "status": "in_progress"}}),
     live.BackendEvent("response.output_item.added", "deleg_1",
                       "sequence_number=3 output_index=0")),
    ({"type": "session.delegation.created", "event_id": "e5", "offset_ms": 4600,
      "delegation": {"id": "deleg_1", "target": "responses", "type": "delegation",
                     "response_id": "resp_7"}},
     live.DelegationCreated("deleg_1", "responses", "resp_7", 4600)),
    ({"type": "session.usage.updated", "event_id": "e6", "usage": {"seconds": 61.5},
      "context_window": {"usage_ratio": 0.25}}, live.UsageUpdated(61.5, 0.25)),
    ({"type": "session.usage.updated", "event_id": "e6", "usage": {"seconds": 7}},
     live.UsageUpdated(7.0, None)),
    ({"type": "session.closed", "event_id": "e7", "reason": "expired", "usage": {"seconds": 3600},
      "session": {"id": "live_abc", "expires_at": 1, "model": "gpt-live-1", "status": "active"}},
     live.SessionClosed("expired", 3600.0)),
    ({"type": "error", "event_id": "e8", "client_event_id": "u1", "error": {
        "type": "invalid_request_error", "code": "immutable_field_update",
        "message": "no", "param": "session.instructions", "client_event_id": "u1"}},
     live.Error("immutable_field_update", "invalid_request_error", "no",
                "session.instructions", "u1", False)),
    ({"type": "error", "event_id": "e8", "error": {
        "type": "invalid_request_error", "code": "unknown_parameter", "message": "no",
        "client_event_id": live.SESSION_START_ID}},
     live.Error("unknown_parameter", "invalid_request_error", "no", None,
                live.SESSION_START_ID, True)),
    ({"type": "error", "event_id": "e8", "error": {
        "type": "invalid_request_error", "code": "insufficient_quota", "message": "pay"}},
     live.Error("insufficient_quota", "invalid_request_error", "pay", None, None, True)),
    ({"type": "session.instructions.appended", "event_id": "e9", "start_ms": 10, "end_ms": 10,
      "client_event_id": "g1"},
     live.Appended("session.instructions.appended", 10, 10, "g1")),
    ({"type": "session.thinking.appended", "event_id": "e9", "start_ms": 5, "end_ms": 6},
     live.Appended("session.thinking.appended", 5, 6, None)),
    ({"type": "session.commentary.appended", "event_id": "e9", "start_ms": 5, "end_ms": 6},
     live.Appended("session.commentary.appended", 5, 6, None)),
    ({"type": "info", "event_id": "e10", "code": "slow", "message": "backend is slow"},
     live.Other("info", "code=slow message=backend is slow")),
]


@pytest.mark.parametrize(("event", "expected"), DECODED,
                         ids=[f"{e['type']}-{n}" for n, (e, _) in enumerate(DECODED)])
def test_every_server_event_decodes(event: dict[str, Any], expected: live.LiveEvent) -> None:
    check("server", event, "live")  # the examples themselves are what GPT-Live sends
    decoded = live.decode(orjson.dumps(event))
    assert decoded == expected
    assert live.decode(orjson.dumps(event).decode()) == expected  # str as well as bytes
    assert live.type_of(decoded) == event["type"]
    assert isinstance(live.describe(decoded), str)


def test_audio_is_decoded_on_the_fast_path() -> None:
    event = live.decode(b'{"type":"session.output_audio.delta","delta":"/////w=="}')
    assert isinstance(event, live.AudioDelta) and event.delta == "/////w=="
    assert not hasattr(event, "__dict__")  # slots only: one per 100 ms of every call
    assert live.type_of(event) == "session.output_audio.delta"
    assert live.describe(event) == "bytes=6"


@pytest.mark.parametrize("data", [
    b"{not json", b"", b"[1, 2]", b'"session.started"', b"{}", b'{"type": 7}',
    b'{"type": null}', b'{"type":"session.output_audio.delta"}',
    b'{"type":"session.output_audio.delta","delta":42}',
])
def test_malformed_events_raise_a_loggable_error(data: bytes) -> None:
    with pytest.raises(live.LiveProtocolError) as caught:
        live.decode(data)
    assert str(caught.value) in {"event is not JSON", "event is not a JSON object",
                                 "event without a type", "audio delta without a delta string"}


@pytest.mark.parametrize(("event", "expected"), [
    ({"type": "session.started"}, live.SessionStarted("", None, "")),
    ({"type": "session.started", "session": [1]}, live.SessionStarted("", None, "")),
    ({"type": "session.started", "session": {"id": 5, "expires_at": "soon", "model": None}},
     live.SessionStarted("", None, "")),
    ({"type": "session.input_transcript.delta", "delta": None, "start_ms": True, "end_ms": 1.5},
     live.InputTranscriptDelta("", None, None)),
    ({"type": "session.usage.updated", "usage": {"seconds": "12"}, "context_window": 3},
     live.UsageUpdated(None, None)),
    ({"type": "session.usage.updated", "usage": {"seconds": True}}, live.UsageUpdated(None, None)),
    ({"type": "session.closed", "reason": 3, "usage": None}, live.SessionClosed("", None)),
    ({"type": "error"}, live.Error("unknown", "", "error event without details", None, None,
                                   False)),
    ({"type": "error", "error": "boom", "client_event_id": "x"},
     live.Error("unknown", "", "error event without details", None, "x", False)),
    ({"type": "error", "error": {"type": "server_error"}},
     live.Error("server_error", "server_error", "", None, None, False)),
    ({"type": "response.event"},
     live.BackendEvent("", None, "response.event without a nested event")),
    ({"type": "response.event", "delegation_id": 5, "event": "x"},
     live.BackendEvent("", None, "response.event without a nested event")),
    ({"type": "response.event", "event": {"type": "response.output_item.done", "item": {
        "type": "function_call", "call_id": "c", "name": "n", "arguments": "{",
        "status": "incomplete"}}},  # cut off: not a call to run
     live.BackendEvent("response.output_item.done", None, "")),
    ({"type": "response.event", "event": {"type": "response.output_item.done", "item": {
        "type": "function_call", "call_id": "c", "name": "n", "arguments": "{}"}}},
     live.FunctionCall("c", "n", "{}", "", None)),  # no status: done is done
    ({"type": "response.event", "event": {"type": "response.output_item.done", "item": 7}},
     live.BackendEvent("response.output_item.done", None, "item=7")),
    ({"type": "response.event", "event": {"type": "response.failed", "response": None}},
     live.BackendDone("", "", {}, None)),
    ({"type": "session.delegation.created", "delegation": "x", "offset_ms": "1"},
     live.DelegationCreated("", "", None, None)),
    ({"type": "session.thinking.appended", "start_ms": "1"},
     live.Appended("session.thinking.appended", None, None, None)),
    ({"type": "transport.ringing", "session_id": "live_1", "audio": "A" * 1000},
     live.Other("transport.ringing", "session_id=live_1")),
])
def test_odd_shapes_decode_without_raising(event: dict[str, Any],
                                           expected: live.LiveEvent) -> None:
    assert live.decode(orjson.dumps(event)) == expected


def test_describe_never_logs_words_or_audio() -> None:
    secret = "my card number is 4111"
    for event in (live.InputTranscriptDelta(secret, 1, 2),
                  live.OutputTranscriptDelta(secret, 1, 2),
                  live.decode(orjson.dumps(wrap({"type": "response.output_text.delta",
                                                 "delta": secret, "item_id": "m",
                                                 "output_index": 0, "content_index": 0}))),
                  live.decode(orjson.dumps({"type": "mystery", "text": secret,
                                            "transcript": secret, "content": secret}))):
        assert secret not in live.describe(event)
    call = live.FunctionCall("call_1", "lookup_order", '{"card": "4111"}', "fc_1", None)
    assert live.describe(call) == "name=lookup_order call_id=call_1 delegation_id=None"
    done = live.BackendDone("resp_1", "completed", USAGE, "deleg_1")
    assert live.describe(done) == "response_id=resp_1 status=completed tokens in=1200 out=80"
    error = live.Error("unknown_parameter", "invalid_request_error", "Unknown parameter",
                       "session.x", "e1", False)
    assert "code=unknown_parameter" in live.describe(error)
    assert "param=session.x" in live.describe(error)


def test_type_of_covers_every_decoded_class() -> None:
    for event, expected in DECODED:
        assert live.type_of(expected) == event["type"]
    classes = {type(expected) for _, expected in DECODED} | {live.AudioDelta}
    assert classes == set(get_args(live.LiveEvent))


# --- client events ---

def start(**kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"model": "gpt-live-1", "instructions": "Be brief.",
                            "voice": "marin", **kwargs}
    event: dict[str, Any] = orjson.loads(live.session_start(**args))
    return event


def test_session_start_carries_what_the_call_needs() -> None:
    history = live.history_input([("user", "Hi"), ("assistant", "Hello.")])
    event = start(history=history, tools=[LOOKUP], backend_model="gpt-5-mini",
                  backend_instructions="Use the tools.")
    assert event == {"type": "session.start", "event_id": live.SESSION_START_ID, "session": {
        "model": "gpt-live-1", "instructions": "Be brief.",
        "audio": {"format": {"type": "audio/pcmu", "rate": 8000},
                  "output": {"voice": "marin"}},
        "input": [
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Hi"}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Hello."}]}],
        "delegation": {"type": "responses", "responses": {
            "model": "gpt-5-mini", "instructions": "Use the tools.",
            "tools": [{"type": "function", "name": "lookup_order",
                       "description": "Find an order",
                       "parameters": LOOKUP.parameters}]}}}}
    bare = start()
    assert set(bare["session"]) == {"model", "instructions", "audio"}  # client delegation
    backend_only = start(backend_model="gpt-5-mini")
    assert backend_only["session"]["delegation"] == {"type": "responses",
                                                     "responses": {"model": "gpt-5-mini"}}
    empty = start(tools=[Tool("ping", "Ping")], backend_model="m")
    assert empty["session"]["delegation"]["responses"]["tools"][0]["parameters"] == {
        "type": "object", "properties": {}}
    with pytest.raises(ValueError, match="backend model"):
        live.session_start("gpt-live-1", "x", "marin", tools=[LOOKUP])


def test_every_encoder_is_valid_for_the_sdk() -> None:
    checker = EventChecker("live")
    encoded = [
        live.session_start("gpt-live-1", "Be brief.", "marin",
                           live.history_input([("system", "Caller is a customer."),
                                               ("user", "Hi"), ("assistant", "Hello.")]),
                           tools=[LOOKUP, Tool("end_call", "Hang up")],
                           backend_model="gpt-5-mini", backend_instructions="Be exact."),
        live.session_start("gpt-live-1.1", "", "cedar"),
        live.session_update(backend_model="gpt-5", backend_instructions="x", tools=[LOOKUP]),
        live.session_update(tools=[]),
        live.append_audio("/////w=="),
        live.instructions_append("Greet the caller now, then listen."),
        live.instructions_append("An operator says: offer a refund.", event_id="w1"),
        live.thinking_append("The caller pressed 1 2 3 4."),
        live.thinking_append("Still looking.", "deleg_1", "t1"),
        live.commentary_append("Your order shipped.", "deleg_1"),
        live.commentary_append("One moment."),
        live.function_call_output("call_1", '{"status":"shipped"}'),
        live.function_call_output("call_2", "not json at all", event_id="o2"),
        live.response_create(),
        live.response_create("r1"),
        live.session_close(),
        live.session_close("c1"),
    ]
    for data in encoded:
        assert isinstance(data, bytes)
        checker("client", orjson.loads(data))
    checker.assert_clean()
    assert checker.checked == len(encoded)
    assert {kind for _, kind in checker.seen} == {
        "session.start", "session.update", "session.input_audio.append",
        "session.instructions.append", "session.thinking.append", "session.commentary.append",
        "response.item.create", "response.create", "session.close"}


def test_client_event_shapes() -> None:
    assert orjson.loads(live.append_audio("AAAA")) == {
        "type": "session.input_audio.append", "audio": "AAAA"}
    assert orjson.loads(live.instructions_append("Greet.")) == {
        "type": "session.instructions.append", "content": "Greet.", "delegation_id": None}
    assert orjson.loads(live.commentary_append("Done.", "deleg_2", "x")) == {
        "type": "session.commentary.append", "content": "Done.", "delegation_id": "deleg_2",
        "event_id": "x"}
    assert orjson.loads(live.function_call_output("call_1", "{}")) == {
        "type": "response.item.create",
        "item": {"type": "function_call_output", "call_id": "call_1", "output": "{}"}}
    assert orjson.loads(live.response_create()) == {"type": "response.create"}
    assert orjson.loads(live.session_close()) == {"type": "session.close"}
    assert orjson.loads(live.session_update(backend_instructions="Be exact.")) == {
        "type": "session.update", "event_id": live.SESSION_UPDATE_ID, "session": {
            "delegation": {"type": "responses",
                           "responses": {"instructions": "Be exact."}}}}
    assert live.auth_headers("sk-1") == {"Authorization": "Bearer sk-1"}
    # a payload with a quote cannot break out of its string
    assert orjson.loads(live.append_audio('A","x":"y'))["audio"] == 'A","x":"y'


# --- the SDK checker for GPT-Live ---

def test_the_checker_catches_live_mistakes() -> None:
    assert "session.output_audio.delta" in event_types("server", "live")
    assert "session.start" in event_types("client", "live")
    assert "session.start" not in event_types("client")  # Realtime's union stays as it was
    found = problems("client", {"type": "session.start", "session": {
        "model": "gpt-live-1", "audio": {"format": {"type": "audio/pcmu", "rate": 8000,
                                                    "channels": 1}}}}, "live")
    assert [p.split(":")[0] for p in found] == ["session.audio.format.channels"]
    assert problems("server", {"type": "session.output_audio.delta", "delta": "A",
                               "event_id": "e"}, "live") == [
        "event_id: key unknown to the SDK "
        "(OutputAudioDeltaEvent knows: delta, end_ms, start_ms, type)"]
    assert problems("server", {"type": "session.closed", "event_id": "e", "reason": "expired",
                               "usage": {"seconds": 1}}, "live") == ["session: Field required"]
    nested = problems("server", wrap({"type": "response.output_item.done", "output_index": 0,
                                      "item": {"type": "function_call", "call_id": "c",
                                               "name": "n", "arguments": "{}",
                                               "color": "red"}}), "live")
    assert [p.split(":")[0] for p in nested] == ["event.item.color"]
    assert problems("server", wrap({"type": "response.made_up"}), "live") == [
        "event.type: 'response.made_up' is not a Responses stream event type of the SDK"]
    with pytest.raises(SdkViolation, match="GPT-Live types"):
        check("client", {"type": "input_audio_buffer.append", "audio": "A"}, "live")
    checker = EventChecker("live")
    checker("client", {"type": "session.update", "session": {"instructions": "x"}})
    with pytest.raises(SdkViolation, match=r"1 GPT-Live event\(s\) of 1 checked"):
        checker.assert_clean()


# --- the history given to a new session ---

def texts(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"][0]["text"] for m in messages]


def test_history_within_the_limits_is_kept_whole() -> None:
    entries = [("user", "Where is my order?"), ("assistant", "Let me look."),
               ("developer", "Tool lookup_order said: shipped"), ("user", "  "),
               ("system", "An operator joined.")]
    messages = live.history_input(entries)
    assert texts(messages) == ["Where is my order?", "Let me look.",
                               "Tool lookup_order said: shipped", "An operator joined."]
    assert [m["role"] for m in messages] == ["user", "assistant", "developer", "developer"]
    assert live.history_input([]) == []
    with pytest.raises(ValueError, match="caller"):
        live.history_input([("caller", "hi")])


def test_history_of_129_messages_drops_the_oldest_with_a_note() -> None:
    entries = [("user" if n % 2 else "assistant", f"message {n}") for n in range(129)]
    messages = live.history_input(entries)
    assert len(messages) == 128
    assert messages[0] == {"type": "message", "role": "developer", "content": [{
        "type": "input_text",
        "text": "Earlier in this call: 2 older messages left out here to fit the context "
                "limit."}]}
    assert texts(messages)[1:] == [f"message {n}" for n in range(2, 129)]
    assert len(live.history_input(entries[:128])) == 128  # exactly at the limit: all kept


def test_history_too_long_in_tokens_drops_the_oldest() -> None:
    big = "word " * 2000  # about 2,500 tokens each
    entries = [("user", f"{n}: {big}") for n in range(5)] + [("assistant", "Short.")]
    messages = live.history_input(entries)
    total = sum(live.estimate_tokens(t) for t in texts(messages))
    assert total <= live.HISTORY_MAX_TOKENS
    assert texts(messages)[0].startswith("Earlier in this call: 2 older messages")
    assert [t[:2] for t in texts(messages)[1:]] == ["2:", "3:", "4:", "Sh"]
    # the newest alone too long: its end is kept
    huge = "a" * 40_000 + "THE END"
    (note, only) = live.history_input([("user", "before"), ("user", huge)])
    assert texts([note])[0].startswith("Earlier in this call: 1 older message left")
    assert texts([only])[0].startswith("… ") and texts([only])[0].endswith("THE END")
    assert live.estimate_tokens(texts([note])[0]) + live.estimate_tokens(
        texts([only])[0]) <= live.HISTORY_MAX_TOKENS
    # multi-byte text is not undercounted
    assert live.estimate_tokens("é" * 400) > live.estimate_tokens("e" * 400)


def test_history_limits_are_parameters() -> None:
    entries = [("user", f"m{n}") for n in range(10)]
    assert texts(live.history_input(entries, max_messages=4)) == [
        "Earlier in this call: 7 older messages left out here to fit the context limit.",
        "m7", "m8", "m9"]


# --- transcript deltas -> turns ---

def caller(text: str, start: int | None, end: int | None) -> live.InputTranscriptDelta:
    return live.InputTranscriptDelta(text, start, end)


def model(text: str, start: int | None, end: int | None) -> live.OutputTranscriptDelta:
    return live.OutputTranscriptDelta(text, start, end)


def run(grouper: live.TranscriptGrouper,
        deltas: list[live.Transcript]) -> list[live.TurnDelta | live.TurnDone]:
    out: list[live.TurnDelta | live.TurnDone] = []
    for delta in deltas:
        out += grouper.add(delta)
    return out


def done(out: list[Any]) -> list[tuple[str, str, str, int, int]]:
    return [(d.speaker, d.turn_id, d.text, d.start_ms, d.end_ms) for d in out
            if isinstance(d, live.TurnDone)]


def test_a_speaker_change_ends_a_turn() -> None:
    grouper = live.TranscriptGrouper(gap_ms=1200, settle_ms=400)
    out = run(grouper, [caller("Where is", 0, 400), caller(" my order?", 400, 900),
                        model("Let me", 1300, 1500), model(" check.", 1500, 1800)])
    assert [type(o).__name__ for o in out] == [
        "TurnDelta", "TurnDelta", "TurnDelta", "TurnDone", "TurnDelta"]
    assert out[0] == live.TurnDelta("caller", "caller_1", "Where is", 0, 400)
    assert done(out) == [("caller", "caller_1", "Where is my order?", 0, 900)]
    # the caller answers: the model's turn ends once the caller has spoken settle_ms past it
    out = run(grouper, [caller("Thanks", 2000, 2100), caller(" a lot", 2100, 2300)])
    assert done(out) == [("assistant", "assistant_2", "Let me check.", 1300, 1800)]
    assert done(grouper.flush()) == [("caller", "caller_3", "Thanks a lot", 2000, 2300)]
    assert grouper.flush() == []


def test_a_time_gap_ends_a_turn() -> None:
    grouper = live.TranscriptGrouper(gap_ms=1000)
    out = run(grouper, [caller("One.", 0, 300), caller(" Two.", 500, 800),
                        caller("Three.", 2000, 2300)])
    assert done(out) == [("caller", "caller_1", "One. Two.", 0, 800)]
    assert [o.turn_id for o in out if isinstance(o, live.TurnDelta)] == [
        "caller_1", "caller_1", "caller_2"]
    assert grouper.advance(3000) == []  # 700 ms after: not yet
    assert done(grouper.advance(3400)) == [("caller", "caller_2", "Three.", 2000, 2300)]
    # the other side's words move the timeline too
    grouper.add(model("Yes.", 4000, 4200))
    assert done(run(grouper, [caller("Hm", 9000, 9100)])) == [
        ("assistant", "assistant_3", "Yes.", 4000, 4200)]


def test_deltas_out_of_order_join_their_turn_in_timeline_order() -> None:
    grouper = live.TranscriptGrouper(settle_ms=400)
    out = run(grouper, [caller(" is it", 600, 900), caller("What time", 0, 600),
                        model("It is", 1000, 1200),
                        caller("?", 900, 950),  # late: the model's words came first
                        model(" noon.", 1200, 1500)])
    assert done(out) == [("caller", "caller_1", "What time is it?", 0, 950)]
    assert [o.turn_id for o in out if isinstance(o, live.TurnDelta)] == [
        "caller_1", "caller_1", "assistant_2", "caller_1", "assistant_2"]
    assert done(grouper.flush()) == [("assistant", "assistant_2", "It is noon.", 1000, 1500)]


def test_talking_over_each_other_keeps_both_turns_open() -> None:
    grouper = live.TranscriptGrouper(settle_ms=400)
    out = run(grouper, [model("Your order will", 0, 800), caller("Wait", 700, 900),
                        model(" arrive", 800, 1000), caller(" no, the other one", 900, 1600)])
    assert done(out) == [("assistant", "assistant_1", "Your order will arrive", 0, 1000)]
    assert done(grouper.flush()) == [
        ("caller", "caller_2", "Wait no, the other one", 700, 1600)]


def test_the_other_side_in_between_starts_a_new_turn() -> None:
    grouper = live.TranscriptGrouper(settle_ms=10_000)  # no settling: only the floor change
    out = run(grouper, [caller("Hello", 0, 300), model("Hi", 400, 500),
                        caller("Are you there", 600, 900)])
    assert done(out) == [("caller", "caller_1", "Hello", 0, 300)]
    assert [o.turn_id for o in out if isinstance(o, live.TurnDelta)] == [
        "caller_1", "assistant_2", "caller_3"]


def test_missing_times_follow_the_turn() -> None:
    grouper = live.TranscriptGrouper(id_prefix="s1_")
    out = run(grouper, [caller("One", 100, 200), caller(" two", None, None),
                        model("Ok", None, 50)])
    deltas = [o for o in out if isinstance(o, live.TurnDelta)]
    assert [(d.turn_id, d.start_ms, d.end_ms) for d in deltas] == [
        ("s1_caller_1", 100, 200), ("s1_caller_1", 200, 200), ("s1_assistant_2", 200, 200)]
