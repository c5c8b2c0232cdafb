"""Request shapes: the `POST /calls` body, campaign JSON and CSV, windows, the retry rule,
and the outbound settings."""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from server.outbound.spec import (
    BadRequest,
    CallSpec,
    CampaignSpec,
    Window,
    after_outcome,
    campaign_from_query,
    classify,
    parse_call_request,
    parse_campaign,
    parse_csv,
)
from server.settings import ConfigError, Settings

NY = ZoneInfo("America/New_York")


def at(zone: tzinfo, year: int, month: int, day: int, hour: int, minute: int) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=zone).timestamp()


# --- POST /calls ---


def test_a_full_call_request() -> None:
    request = parse_call_request({
        "to": "+1 555 000 1111", "from": "+15550009999",
        "prompt": {"id": "reminders", "version": 3}, "variables": {"name": "Ann", "n": 2},
        "greeting": "Hi Ann!", "voicemail": "Please call us back.",
        "metadata": {"order": "A1"}, "timeout_s": 20, "model_api": "live"})
    assert request.to == "+15550001111" and request.from_ == "+15550009999"
    assert (request.prompt_id, request.prompt_version) == ("reminders", "3")
    assert request.variables == {"name": "Ann", "n": "2"}
    assert request.voicemail == "Please call us back." and request.timeout_s == 20
    assert request.plan_fields() == {
        "direction": "outbound", "prompt_id": "reminders", "prompt_version": "3",
        "variables": {"name": "Ann", "n": "2"}, "greeting": "Hi Ann!", "model_api": "live",
        "metadata": {"order": "A1"}, "voicemail": "Please call us back."}


def test_call_request_defaults() -> None:
    request = parse_call_request({"to": "+15550001111"})
    assert request.from_ is None and request.prompt_id is None
    assert request.voicemail is None  # hang up on a machine
    assert (request.timeout_s, dict(request.variables)) == (30, {})
    assert request.model_api is None  # MODEL_API decides
    assert "model_api" not in request.plan_fields()
    assert parse_call_request({"to": "+15550001111", "voicemail": "hangup"}).voicemail is None


@pytest.mark.parametrize(("body", "reason"), [
    ([], "the body must be a JSON object"),
    ({}, "to is required"),
    ({"to": "5550001111"}, "to must start with +"),
    ({"to": "+15550001111", "from": "nobody"}, "from must start with +"),
    ({"to": "+15550001111", "prompt": "support"}, "prompt must be a JSON object"),
    ({"to": "+15550001111", "prompt": {"version": "2"}}, "prompt.id must be"),
    ({"to": "+15550001111", "prompt": {"id": "x", "v": 1}}, "unknown field 'v'"),
    ({"to": "+15550001111", "variables": {"first name": "A"}}, "not a variable name"),
    ({"to": "+15550001111", "variables": {"a": {"b": 1}}}, "variables.a must be a string"),
    ({"to": "+15550001111", "variables": ["a"]}, "variables must be a JSON object"),
    ({"to": "+15550001111", "voicemail": ""}, "voicemail (a message, or \"hangup\")"),
    ({"to": "+15550001111", "metadata": {"x": "y" * 5000}}, "metadata is larger than"),
    ({"to": "+15550001111", "timeout_s": 2}, "timeout_s must be between 5 and 600"),
    ({"to": "+15550001111", "timeout_s": "30"}, "timeout_s must be a whole number"),
    ({"to": "+15550001111", "timeout_s": True}, "timeout_s must be a whole number"),
    ({"to": "+15550001111", "model_api": "gpt"}, "model_api must be one of realtime, live"),
    ({"to": "+15550001111", "greeting": 5}, "greeting must be a non-empty string"),
    ({"to": "+15550001111", "callerid": "+1"}, "unknown field 'callerid'"),
])
def test_call_request_reasons(body: Any, reason: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_call_request(body)
    assert reason in str(caught.value)


def test_an_unknown_prompt_is_a_bad_request() -> None:
    def check(pid: str, version: str | None) -> str | None:
        return None if pid == "support" else f"no prompt {pid!r}"

    assert parse_call_request({"to": "+15550001111", "prompt": {"id": "support"}},
                              check_prompt=check).prompt_id == "support"
    with pytest.raises(BadRequest, match="prompt: no prompt 'sales'"):
        parse_call_request({"to": "+15550001111", "prompt": {"id": "sales"}},
                           check_prompt=check)


# --- windows ---


def test_window_open_and_next_opening() -> None:
    w = Window.parse({"start": "09:00", "end": "18:00", "timezone": "America/New_York"})
    morning = at(NY, 2025, 3, 4, 7, 30)
    assert w.next_open(morning) == at(NY, 2025, 3, 4, 9, 0)
    noon = at(NY, 2025, 3, 4, 12, 0)
    assert w.next_open(noon) == noon
    evening = at(NY, 2025, 3, 4, 18, 0)  # the end is excluded
    assert w.next_open(evening) == at(NY, 2025, 3, 5, 9, 0)
    # a call's own time zone: noon in New York is 9:00 in Los Angeles, 7:30 is 4:30
    assert w.next_open(noon, "America/Los_Angeles") == noon  # 09:00 there: open
    assert w.next_open(morning, "America/Los_Angeles") == at(
        ZoneInfo("America/Los_Angeles"), 2025, 3, 4, 9, 0)


def test_window_across_midnight_and_dst() -> None:
    night = Window.parse({"start": "20:00", "end": "08:00", "timezone": "UTC"})
    assert night.next_open(at(UTC, 2025, 1, 1, 23, 0)) == at(UTC, 2025, 1, 1, 23, 0)
    assert night.next_open(at(UTC, 2025, 1, 1, 3, 0)) == at(UTC, 2025, 1, 1, 3, 0)
    assert night.next_open(at(UTC, 2025, 1, 1, 12, 0)) == at(UTC, 2025, 1, 1, 20, 0)
    # 02:30 does not exist in New York on 2025-03-09 (spring forward): still a future time
    early = Window.parse({"start": "02:30", "end": "05:00", "timezone": "America/New_York"})
    now = at(NY, 2025, 3, 9, 1, 0)
    assert now < early.next_open(now) <= now + 3 * 3600


@pytest.mark.parametrize(("window", "reason"), [
    ({"start": "9:00", "end": "18:00"}, "window.start must be a local time as HH:MM"),
    ({"start": "09:00", "end": "24:00"}, "window.end must be"),
    ({"start": "09:00", "end": "09:00"}, "must differ"),
    ({"start": "09:00", "end": "18:00", "timezone": "Mars/Olympus"}, "not a known time zone"),
    ({"start": "09:00", "end": "18:00", "days": "mon-fri"}, "unknown field 'days'"),
])
def test_bad_windows(window: dict[str, str], reason: str) -> None:
    with pytest.raises(BadRequest, match=reason.replace("(", r"\(")):
        Window.parse(window)


# --- campaigns ---


def test_campaign_json_with_every_setting() -> None:
    spec, calls = parse_campaign({
        "name": "March reminders",
        "calls": [{"to": "+15550001111", "variables": {"name": "Ann"},
                   "metadata": {"id": 1}, "timezone": "America/Chicago"},
                  {"to": "not a number"}],
        "concurrency": 3, "retries": {"busy": 2, "no-answer": 1, "failed": 0, "machine": 0},
        "retry_after_s": 60, "window": {"start": "09:00", "end": "18:00",
                                        "timezone": "America/New_York"},
        "voicemail": "Call us back", "model_api": "realtime", "from": "+15550009999",
        "prompt": {"id": "reminders"}, "greeting": "Hello!", "timeout_s": 25})
    assert spec.concurrency == 3 and spec.retries == {"busy": 2, "no-answer": 1, "failed": 0,
                                                      "machine": 0}
    assert spec.window == Window.parse({"start": "09:00", "end": "18:00",
                                        "timezone": "America/New_York"})
    assert calls[0] == CallSpec("+15550001111", {"name": "Ann"}, {"id": 1}, "America/Chicago")
    assert calls[1].to == "not a number"  # kept: skipped as invalid, not a 400
    assert CampaignSpec.from_dict(spec.to_dict()) == spec  # stored and read back


def test_campaign_defaults() -> None:
    spec, _ = parse_campaign({"name": "x", "calls": [{"to": "+15550001111"}]})
    assert (spec.concurrency, dict(spec.retries), spec.retry_after_s, spec.window,
            spec.voicemail) == (5, {}, 600.0, None, None)


@pytest.mark.parametrize(("body", "reason"), [
    ({"calls": [{"to": "+15550001111"}]}, "name is required"),
    ({"name": "x"}, "calls must be a non-empty list"),
    ({"name": "x", "calls": []}, "calls must be a non-empty list"),
    ({"name": "x", "calls": [{"number": "+1"}]}, "calls[0] has unknown field 'number'"),
    ({"name": "x", "calls": [{"to": 15550001111}]}, "calls[0].to is required"),
    ({"name": "x", "calls": [{"to": "+15550001111", "timezone": "Nowhere"}]},
     "calls[0].timezone 'Nowhere' is not a known time zone"),
    ({"name": "x", "calls": [{"to": "+1"}], "concurrency": 0}, "concurrency must be between"),
    ({"name": "x", "calls": [{"to": "+1"}], "retries": {"completed": 1}},
     "'completed' is not an outcome that can be retried"),
    ({"name": "x", "calls": [{"to": "+1"}], "retries": {"busy": 11}},
     "retries.busy must be between 0 and 10"),
    ({"name": "x", "calls": [{"to": "+1"}], "retry_after_s": -1}, "retry_after_s must be"),
])
def test_campaign_reasons(body: dict[str, Any], reason: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_campaign(body)
    assert reason in str(caught.value)


def test_csv_upload() -> None:
    calls = parse_csv("\ufeffTo,first_name,Timezone,order\r\n"
                      "+15550001111,Ann,America/Chicago,A1\r\n"
                      "\r\n"
                      "\"+1 555 000 2222\",\"Bob, Jr.\",,B2\r\n"
                      "+15550003333,Cy\r\n")
    assert calls == [
        CallSpec("+15550001111", {"first_name": "Ann", "order": "A1"}, {}, "America/Chicago"),
        CallSpec("+1 555 000 2222", {"first_name": "Bob, Jr.", "order": "B2"}, {}, None),
        CallSpec("+15550003333", {"first_name": "Cy", "order": ""}, {}, None),
    ]


@pytest.mark.parametrize(("text", "reason"), [
    ("", "the CSV is empty"),
    ("number,name\n+1555,Ann\n", "no `to` column"),
    ("to,to\n+1,+2\n", "names a column twice"),
    ("to,first name\n+1,Ann\n", "'first name' is not a variable name"),
    ("to,name\n+15550001111,Ann,extra\n", "CSV row 2 has 3 fields"),
    ("to,timezone\n+15550001111,Mars/Base\n", "CSV row 2 timezone 'Mars/Base'"),
    ("to\n", "no rows below its header"),
])
def test_csv_reasons(text: str, reason: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_csv(text)
    assert reason in str(caught.value)


def test_csv_settings_from_the_query_string() -> None:
    calls = [CallSpec("+15550001111")]
    spec, same = campaign_from_query({
        "name": "csv", "concurrency": "2", "retries": "busy:2, no-answer:1",
        "retry_after_s": "90", "window": "09:00-17:30", "timezone": "Europe/Paris",
        "voicemail": "hangup", "prompt_id": "reminders", "prompt_version": "2"}, calls)
    assert same is calls
    assert (spec.name, spec.concurrency, dict(spec.retries), spec.retry_after_s) == (
        "csv", 2, {"busy": 2, "no-answer": 1}, 90.0)
    assert spec.window == Window.parse({"start": "09:00", "end": "17:30",
                                        "timezone": "Europe/Paris"})
    assert (spec.prompt_id, spec.prompt_version, spec.voicemail) == ("reminders", "2", None)
    for query, reason in (({"name": "x", "retries": "busy=2"}, "retries must look like"),
                          ({"name": "x", "window": "9-5"}, "window.start must be"),
                          ({"name": "x", "timezone": "UTC"}, "give window="),
                          ({"name": "x", "concurrency": "lots"}, "concurrency must be a whole"),
                          ({"name": "x", "colour": "red"}, "unknown field 'colour'")):
        with pytest.raises(BadRequest, match=reason):
            campaign_from_query(query, calls)


# --- outcomes ---


def test_classify_uses_the_amd_result() -> None:
    assert classify("completed", "human") == "completed"
    assert classify("completed", None) == "completed"
    assert classify("completed", "machine_end_beep") == "machine"
    assert classify("completed", "machine_end_silence") == "machine"
    assert classify("completed", "fax") == "fax"
    assert classify("busy", "machine_end_beep") == "busy"
    assert classify("weird", None) == "unknown"


def test_retry_rule_counts_each_outcome() -> None:
    retries = {"busy": 2}
    first = after_outcome("busy", {}, retries, 60, now=100)
    assert (first.state, first.next_at, first.tries) == ("waiting", 160, {"busy": 1})
    second = after_outcome("busy", first.tries, retries, 60, now=200)
    assert second.state == "waiting" and second.tries == {"busy": 2}
    third = after_outcome("busy", second.tries, retries, 60, now=300)
    assert (third.state, third.outcome) == ("done", "busy")
    assert after_outcome("no-answer", second.tries, retries, 60, now=300).state == "done"


# --- settings ---


def test_outbound_settings() -> None:
    s = Settings.from_env({"OPENAI_API_KEY": "sk-x"})
    assert (s.twilio_account_sid, s.twilio_from_number, s.twilio_api_url) == (
        None, None, "https://api.twilio.com")
    assert (s.outbound_cps, s.amd_wait_s, s.do_not_call) == (1.0, 4.0, Path("do-not-call.txt"))
    s = Settings.from_env({"OPENAI_API_KEY": "sk-x", "TWILIO_ACCOUNT_SID": "AC123",
                           "TWILIO_FROM_NUMBER": "+15550009999",
                           "TWILIO_API_URL": "http://127.0.0.1:8099/", "OUTBOUND_CPS": "5",
                           "AMD_WAIT_S": "2.5", "DO_NOT_CALL": "/data/dnc.txt"})
    assert (s.twilio_account_sid, s.twilio_from_number, s.twilio_api_url) == (
        "AC123", "+15550009999", "http://127.0.0.1:8099")
    assert (s.outbound_cps, s.amd_wait_s, s.do_not_call) == (5.0, 2.5, Path("/data/dnc.txt"))


@pytest.mark.parametrize(("variable", "value"), [
    ("TWILIO_FROM_NUMBER", "5550009999"),
    ("TWILIO_API_URL", "api.twilio.com"),
    ("TWILIO_API_URL", "wss://api.twilio.com"),
    ("OUTBOUND_CPS", "0"),
    ("OUTBOUND_CPS", "fast"),
    ("AMD_WAIT_S", "-1"),
])
def test_bad_outbound_settings_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"OPENAI_API_KEY": "sk-x", variable: value})
    assert caught.value.variable == variable
