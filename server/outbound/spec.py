"""What operators ask for, checked: one outbound call (`POST /calls`), a campaign (JSON or a
CSV upload), dialling windows, and what happens after each outcome (retries).

Every check raises `BadRequest` with one sentence that names the field, which the routes send
back as a 400. Numbers are checked here too, but a campaign's bad number is not a 400: it is
kept as a skipped entry (`invalid`), so one typo in a 5,000-row sheet does not refuse the rest.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import time as clock_time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from server.outbound.numbers import InvalidNumber, normalise

MAX_CAMPAIGN_CALLS = 100_000
MAX_VARIABLES = 50
MAX_VALUE = 1000  # characters of one variable's value
MAX_TEXT = 2000  # greeting, voicemail message
MAX_METADATA = 4096  # bytes of JSON
MODEL_APIS = ("realtime", "live")
DEFAULT_TIMEOUT_S = 30  # Twilio's default ring time
DEFAULT_CONCURRENCY = 5
DEFAULT_RETRY_AFTER_S = 600.0

# What a finished call was. `machine` and `fax` come from answering-machine detection on a
# call that Twilio reports `completed`.
OUTCOMES = ("completed", "machine", "fax", "busy", "no-answer", "failed", "canceled", "unknown")
RETRYABLE = ("busy", "no-answer", "failed", "canceled", "machine", "unknown")
# Why a number was never dialled.
SKIPPED = ("do-not-call", "invalid", "duplicate", "campaign-cancelled")
TWILIO_FINAL = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_PROMPT_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class BadRequest(ValueError):
    """A request that cannot be served as sent; `str()` is the 400's reason."""


# --- field checks (shared by calls and campaigns) ---


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be a JSON object")
    return value


def _text(value: Any, name: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{name} must be a non-empty string")
    if len(value) > limit:
        raise BadRequest(f"{name} is longer than {limit} characters")
    return value.strip()


def _optional_text(data: Mapping[str, Any], key: str, limit: int = MAX_TEXT) -> str | None:
    value = data.get(key)
    return None if value is None else _text(value, key, limit)


def _number(value: Any, name: str) -> str:
    try:
        return normalise(value)
    except InvalidNumber as e:
        raise BadRequest(f"{name} {e}") from None


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise BadRequest(f"{name} must be a whole number")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return int(value)


def _seconds(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name} must be a number of seconds")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g} seconds")
    return float(value)


def variables(value: Any, name: str = "variables") -> dict[str, str]:
    """`{"first_name": "Ann"}`: names usable as `{{first_name}}`, values strings (numbers and
    booleans are written out)."""
    if value is None:
        return {}
    data = _object(value, name)
    if len(data) > MAX_VARIABLES:
        raise BadRequest(f"{name} has more than {MAX_VARIABLES} entries")
    out: dict[str, str] = {}
    for key, item in data.items():
        if not _NAME.fullmatch(key):
            raise BadRequest(f"{name}: {key[:40]!r} is not a variable name (letters, digits "
                             "and _, not starting with a digit)")
        if isinstance(item, bool):
            item = "true" if item else "false"
        elif isinstance(item, (int, float)) and math.isfinite(item):
            item = str(item)
        if not isinstance(item, str):
            raise BadRequest(f"{name}.{key} must be a string or a number")
        if len(item) > MAX_VALUE:
            raise BadRequest(f"{name}.{key} is longer than {MAX_VALUE} characters")
        out[key] = item
    return out


def metadata(value: Any, name: str = "metadata") -> dict[str, Any]:
    """Any JSON object, kept with the call's record; at most 4 KiB."""
    if value is None:
        return {}
    data = _object(value, name)
    if len(orjson.dumps(data)) > MAX_METADATA:
        raise BadRequest(f"{name} is larger than {MAX_METADATA} bytes of JSON")
    return data


def timezone(value: Any, name: str = "timezone") -> str:
    """An IANA zone name (`America/New_York`)."""
    text = _text(value, name, 64)
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise BadRequest(f"{name} {text!r} is not a known time zone "
                         "(an IANA name such as America/New_York)") from None
    return text


def voicemail(value: Any) -> str | None:
    """The message to leave on an answering machine; None (absent or `"hangup"`): hang up."""
    if value is None or value == "hangup":
        return None
    return _text(value, "voicemail (a message, or \"hangup\")")


def model_api(value: Any) -> str | None:
    """None when not given: the app's MODEL_API decides, as for an inbound call."""
    if value is None:
        return None
    if value not in MODEL_APIS:
        raise BadRequest(f"model_api must be one of {', '.join(MODEL_APIS)}")
    return str(value)


def prompt(value: Any) -> tuple[str | None, str | None]:
    """`{"id": "support", "version": "3"}` (version optional) -> (id, version)."""
    if value is None:
        return None, None
    data = _object(value, "prompt")
    extra = set(data) - {"id", "version"}
    if extra:
        raise BadRequest(f"prompt has unknown field {sorted(extra)[0]!r} (only id, version)")
    pid = data.get("id")
    if not isinstance(pid, str) or not _PROMPT_ID.fullmatch(pid):
        raise BadRequest("prompt.id must be a prompt name (letters, digits, _ . -)")
    version = data.get("version")
    if version is None:
        return pid, None
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or not _PROMPT_ID.fullmatch(version):
        raise BadRequest("prompt.version must be a version name such as \"3\"")
    return pid, version


def _known_fields(data: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    extra = sorted(set(data) - set(allowed))
    if extra:
        raise BadRequest(f"{what} has unknown field {extra[0]!r}")


# --- one call: POST /calls ---


CALL_FIELDS = ("to", "from", "prompt", "variables", "greeting", "voicemail", "metadata",
               "timeout_s", "model_api")
PromptCheck = Callable[[str, str | None], str | None]  # (id, version) -> why not, or None


@dataclass(frozen=True)
class CallRequest:
    """A checked `POST /calls` body. `from_` None: TWILIO_FROM_NUMBER; `voicemail` None: hang
    up on a machine; the rest maps onto the call's plan."""

    to: str
    from_: str | None = None
    prompt_id: str | None = None
    prompt_version: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)
    greeting: str | None = None
    voicemail: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    timeout_s: int = DEFAULT_TIMEOUT_S
    model_api: str | None = None  # None: MODEL_API

    def plan_fields(self) -> dict[str, Any]:
        """The CallPlan's fields this request decides, over the app's defaults
        (`dataclasses.replace(plans.default, **request.plan_fields())`)."""
        fields = {"direction": "outbound", "prompt_id": self.prompt_id,
                  "prompt_version": self.prompt_version, "variables": dict(self.variables),
                  "greeting": self.greeting, "metadata": dict(self.metadata),
                  "voicemail": self.voicemail}
        if self.model_api is not None:
            fields["model_api"] = self.model_api
        return fields


def parse_call_request(data: Any, *, check_prompt: PromptCheck | None = None) -> CallRequest:
    """The body of `POST /calls`, checked; BadRequest with the reason otherwise.

    `check_prompt(id, version)` returns why a prompt cannot be used (unknown id or version),
    or None; without it the prompt is not looked up here. The do-not-call list (409) and
    capacity (429) are the handler's, since they are not about the body."""
    body = _object(data, "the body")
    _known_fields(body, CALL_FIELDS, "the body")
    if "to" not in body:
        raise BadRequest("to is required (the number to call, +E.164)")
    to = _number(body["to"], "to")
    from_ = _number(body["from"], "from") if body.get("from") is not None else None
    prompt_id, prompt_version = prompt(body.get("prompt"))
    if prompt_id is not None and check_prompt is not None:
        why = check_prompt(prompt_id, prompt_version)
        if why:
            raise BadRequest(f"prompt: {why}")
    timeout_s = body.get("timeout_s")
    return CallRequest(
        to=to, from_=from_, prompt_id=prompt_id, prompt_version=prompt_version,
        variables=variables(body.get("variables")), greeting=_optional_text(body, "greeting"),
        voicemail=voicemail(body.get("voicemail")), metadata=metadata(body.get("metadata")),
        timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else _int(timeout_s, "timeout_s", 5, 600),
        model_api=model_api(body.get("model_api")))


# --- dialling windows ---


@dataclass(frozen=True)
class Window:
    """Local hours in which a number may be dialled: [start, end) in `timezone`; an end before
    the start wraps past midnight (20:00 to 08:00)."""

    start: clock_time
    end: clock_time
    timezone: str = "UTC"

    def next_open(self, now: float, timezone: str | None = None) -> float:
        """`now` when the window is open (in the call's own `timezone`, else the window's);
        otherwise the epoch second it next opens."""
        zone = ZoneInfo(timezone or self.timezone)
        local = datetime.fromtimestamp(now, zone)
        t = local.time().replace(tzinfo=None)
        inside = (self.start <= t < self.end) if self.start < self.end else (
            t >= self.start or t < self.end)
        if inside:
            return now
        day = local.date() if t < self.start else local.date() + timedelta(days=1)
        opens = datetime.combine(day, self.start, tzinfo=zone).timestamp()
        return max(opens, now + 1.0)  # a start time skipped by a DST change: never "now"

    def to_dict(self) -> dict[str, str]:
        return {"start": self.start.strftime("%H:%M"), "end": self.end.strftime("%H:%M"),
                "timezone": self.timezone}

    @classmethod
    def parse(cls, value: Any) -> Window:
        data = _object(value, "window")
        _known_fields(data, ("start", "end", "timezone"), "window")
        times: list[clock_time] = []
        for key in ("start", "end"):
            raw = data.get(key)
            match = _HHMM.fullmatch(raw) if isinstance(raw, str) else None
            if match is None:
                raise BadRequest(f"window.{key} must be a local time as HH:MM (24 h)")
            times.append(clock_time(int(match[1]), int(match[2])))
        if times[0] == times[1]:
            raise BadRequest("window.start and window.end must differ")
        zone = timezone(data["timezone"], "window.timezone") if data.get(
            "timezone") is not None else "UTC"
        return cls(times[0], times[1], zone)


# --- campaigns ---


@dataclass(frozen=True)
class CallSpec:
    """One row of a campaign, as given (`to` not yet checked: a bad one is skipped, not a 400)."""

    to: str
    variables: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    timezone: str | None = None


@dataclass(frozen=True)
class CampaignSpec:
    """A campaign's settings (everything but its numbers)."""

    name: str
    concurrency: int = DEFAULT_CONCURRENCY
    retries: Mapping[str, int] = field(default_factory=dict)
    retry_after_s: float = DEFAULT_RETRY_AFTER_S
    window: Window | None = None
    voicemail: str | None = None
    model_api: str | None = None  # None: MODEL_API when each call is placed
    from_: str | None = None
    prompt_id: str | None = None
    prompt_version: str | None = None
    greeting: str | None = None
    timeout_s: int = DEFAULT_TIMEOUT_S

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "concurrency": self.concurrency,
                "retries": dict(self.retries), "retry_after_s": self.retry_after_s,
                "window": self.window.to_dict() if self.window else None,
                "voicemail": self.voicemail if self.voicemail is not None else "hangup",
                "model_api": self.model_api, "from": self.from_,
                "prompt": {"id": self.prompt_id, "version": self.prompt_version}
                if self.prompt_id else None,
                "greeting": self.greeting, "timeout_s": self.timeout_s}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CampaignSpec:
        """From `to_dict()` (stored in the database); BadRequest if it is not one."""
        return parse_campaign_settings(data)


CAMPAIGN_SETTINGS = ("name", "concurrency", "retries", "retry_after_s", "window", "voicemail",
                     "model_api", "from", "prompt", "greeting", "timeout_s")


def parse_campaign_settings(data: Mapping[str, Any],
                            check_prompt: PromptCheck | None = None) -> CampaignSpec:
    if "name" not in data:
        raise BadRequest("name is required")
    retries: dict[str, int] = {}
    raw_retries = data.get("retries")
    if raw_retries is not None:
        for key, count in _object(raw_retries, "retries").items():
            if key not in RETRYABLE:
                raise BadRequest(f"retries: {key[:40]!r} is not an outcome that can be retried "
                                 f"({', '.join(RETRYABLE)})")
            retries[key] = _int(count, f"retries.{key}", 0, 10)
    prompt_id, prompt_version = prompt(data.get("prompt"))
    if prompt_id is not None and check_prompt is not None:
        why = check_prompt(prompt_id, prompt_version)
        if why:
            raise BadRequest(f"prompt: {why}")
    window = data.get("window")
    concurrency, retry_after, timeout_s = (data.get(k) for k in (
        "concurrency", "retry_after_s", "timeout_s"))
    return CampaignSpec(
        name=_text(data["name"], "name", 200),
        concurrency=DEFAULT_CONCURRENCY if concurrency is None
        else _int(concurrency, "concurrency", 1, 1000),
        retries=retries,
        retry_after_s=DEFAULT_RETRY_AFTER_S if retry_after is None
        else _seconds(retry_after, "retry_after_s", 0, 7 * 86400),
        window=None if window is None else Window.parse(window),
        voicemail=voicemail(data.get("voicemail")),
        model_api=model_api(data.get("model_api")),
        from_=_number(data["from"], "from") if data.get("from") is not None else None,
        prompt_id=prompt_id, prompt_version=prompt_version,
        greeting=_optional_text(data, "greeting"),
        timeout_s=DEFAULT_TIMEOUT_S if timeout_s is None else _int(timeout_s, "timeout_s", 5, 600))


def _call_spec(value: Any, where: str) -> CallSpec:
    row = _object(value, where)
    _known_fields(row, ("to", "variables", "metadata", "timezone"), where)
    to = row.get("to")
    if not isinstance(to, str):
        raise BadRequest(f"{where}.to is required (a +E.164 number as a string)")
    zone = row.get("timezone")
    return CallSpec(to=to, variables=variables(row.get("variables"), f"{where}.variables"),
                    metadata=metadata(row.get("metadata"), f"{where}.metadata"),
                    timezone=None if zone is None else timezone(zone, f"{where}.timezone"))


def parse_campaign(data: Any, *, check_prompt: PromptCheck | None = None,
                   ) -> tuple[CampaignSpec, list[CallSpec]]:
    """A JSON `POST /campaigns` body: `{"name", "calls": [...], ...settings}`."""
    body = _object(data, "the body")
    _known_fields(body, (*CAMPAIGN_SETTINGS, "calls"), "the body")
    spec = parse_campaign_settings(body, check_prompt)
    calls = body.get("calls")
    if not isinstance(calls, list) or not calls:
        raise BadRequest("calls must be a non-empty list of {\"to\": …}")
    if len(calls) > MAX_CAMPAIGN_CALLS:
        raise BadRequest(f"a campaign holds at most {MAX_CAMPAIGN_CALLS} calls")
    return spec, [_call_spec(row, f"calls[{i}]") for i, row in enumerate(calls)]


def parse_csv(text: str) -> list[CallSpec]:
    """A CSV upload: a header row with a `to` column; a `timezone` column, if any, is each
    call's own time zone; every other column is a variable (its header is the name).

    Blank lines are skipped; BadRequest names the row (1 = the header) of anything else."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        header = next(reader, None)
        if header is None:
            raise BadRequest("the CSV is empty (it needs a header row with a `to` column)")
        names = [h.strip() for h in header]
        lowered = [n.lower() for n in names]
        if "to" not in lowered:
            raise BadRequest("the CSV has no `to` column in its header row")
        if len(set(lowered)) != len(lowered):
            raise BadRequest("the CSV header names a column twice")
        for n in names:
            if n.lower() not in ("to", "timezone") and not _NAME.fullmatch(n):
                raise BadRequest(f"CSV column {n[:40]!r} is not a variable name (letters, "
                                 "digits and _, not starting with a digit)")
        if len(names) - 1 > MAX_VARIABLES:
            raise BadRequest(f"the CSV has more than {MAX_VARIABLES} variable columns")
        calls: list[CallSpec] = []
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(names):
                raise BadRequest(f"CSV row {line} has {len(row)} fields; the header has "
                                 f"{len(names)}")
            if len(calls) >= MAX_CAMPAIGN_CALLS:
                raise BadRequest(f"a campaign holds at most {MAX_CAMPAIGN_CALLS} calls")
            cells = dict(zip(lowered, (c.strip() for c in row), strict=False))
            values = {name: cells.get(low, "") for name, low in zip(names, lowered, strict=True)
                      if low not in ("to", "timezone")}
            for name, value in values.items():
                if len(value) > MAX_VALUE:
                    raise BadRequest(f"CSV row {line}: {name} is longer than {MAX_VALUE} "
                                     "characters")
            zone = cells.get("timezone") or None
            calls.append(CallSpec(
                to=cells.get("to", ""), variables=values,
                timezone=None if zone is None else timezone(zone, f"CSV row {line} timezone")))
    except csv.Error as e:
        raise BadRequest(f"the CSV cannot be read: {e}") from None
    if not calls:
        raise BadRequest("the CSV has no rows below its header")
    return calls


def campaign_from_query(query: Mapping[str, str], calls: list[CallSpec],
                        check_prompt: PromptCheck | None = None,
                        ) -> tuple[CampaignSpec, list[CallSpec]]:
    """A CSV upload's settings come in the query string: `name`, `concurrency`,
    `retry_after_s`, `timeout_s`, `voicemail`, `model_api`, `from`, `greeting`, `prompt_id`,
    `prompt_version`, `retries=busy:2,no-answer:1`, `window=09:00-18:00`, `timezone`."""
    allowed = ("name", "concurrency", "retry_after_s", "timeout_s", "voicemail", "model_api",
               "from", "greeting", "prompt_id", "prompt_version", "retries", "window",
               "timezone")
    _known_fields(query, allowed, "the query string")
    data: dict[str, Any] = {k: query[k] for k in ("name", "voicemail", "model_api", "from",
                                                 "greeting") if k in query}
    for key in ("concurrency", "timeout_s"):
        if key in query:
            try:
                data[key] = int(query[key])
            except ValueError:
                raise BadRequest(f"{key} must be a whole number") from None
    if "retry_after_s" in query:
        try:
            data["retry_after_s"] = float(query["retry_after_s"])
        except ValueError:
            raise BadRequest("retry_after_s must be a number of seconds") from None
    if "prompt_id" in query:
        data["prompt"] = {"id": query["prompt_id"], "version": query.get("prompt_version")}
    if "retries" in query:
        retries: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in query["retries"].split(","))):
            key, sep, count = part.partition(":")
            if not sep or not count.strip().isdigit():
                raise BadRequest("retries must look like busy:2,no-answer:1")
            retries[key.strip()] = int(count)
        data["retries"] = retries
    if "window" in query:
        start, sep, end = query["window"].partition("-")
        if not sep:
            raise BadRequest("window must look like 09:00-18:00")
        data["window"] = {"start": start.strip(), "end": end.strip(),
                          "timezone": query.get("timezone")}
    elif "timezone" in query:
        raise BadRequest("timezone applies to a window: give window=HH:MM-HH:MM too")
    return parse_campaign_settings(data, check_prompt), calls


# --- after a call ---


def classify(status: str, answered_by: str | None) -> str:
    """A finished call's outcome from Twilio's final CallStatus and the AMD result."""
    if status == "completed" and answered_by:
        if answered_by.startswith("machine_"):
            return "machine"
        if answered_by == "fax":
            return "fax"
    return status if status in OUTCOMES else "unknown"


@dataclass(frozen=True)
class Next:
    """What becomes of an entry after an outcome: done, or waiting to be dialled again."""

    state: str  # "done" | "waiting"
    outcome: str
    next_at: float
    tries: dict[str, int]


def after_outcome(outcome: str, tries: Mapping[str, int], retries: Mapping[str, int],
                  retry_after_s: float, now: float) -> Next:
    """Count this outcome; retry while the campaign allows that many of it."""
    counted = dict(tries)
    counted[outcome] = counted.get(outcome, 0) + 1
    if counted[outcome] <= retries.get(outcome, 0):
        return Next("waiting", outcome, now + retry_after_s, counted)
    return Next("done", outcome, now, counted)
