"""Check Realtime and GPT-Live events against openai-python's types: keep the stand-ins and the
bridge honest.

The stand-ins are only useful if they speak what OpenAI speaks; the bridge is only correct if
OpenAI would accept what it sends. openai-python ships pydantic models of every GA Realtime event
(`openai.types.realtime`) and of every GPT-Live event (`openai.types.live`), so a test can hold
both sides to the same contract:

- the event must validate (strictly, as JSON text) as the member of the API's server / client
  event union that its `type` names;
- no model anywhere inside it may carry keys the SDK does not know: the SDK's models accept
  unknown keys into `model_extra`, which would hide a typo or a beta-era field;
- GPT-Live only: the Responses event nested in a `response.event` (the SDK types it as a plain
  dict) must validate the same way as the `ResponseStreamEvent` member its `type` names.

`openai` is a test dependency only: it is imported on first use, never by the product, and
`python -m server.testing.standin` runs without it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import orjson

Direction = Literal["server", "client"]
Api = Literal["realtime", "live"]
_API_NAMES = {"realtime": "GA", "live": "GPT-Live"}


class SdkViolation(AssertionError):
    """An event the official SDK rejects, or with keys it does not know."""


def _union(direction: Direction | Literal["nested"], api: Api) -> Any:
    """The SDK's event union: server or client events of an API, or ("nested") the Responses
    stream events that GPT-Live wraps in `response.event`."""
    if direction == "nested":
        from openai.types.responses import ResponseStreamEvent
        return ResponseStreamEvent
    if api == "live":
        from openai.types.live import ClientEvent, ServerEvent
        return ServerEvent if direction == "server" else ClientEvent
    from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
    return RealtimeServerEvent if direction == "server" else RealtimeClientEvent


@cache
def _adapter(direction: Direction | Literal["nested"], api: Api = "realtime") -> Any:
    """A discriminated-by-`type` TypeAdapter over the SDK's event union.

    The SDK tags its unions with its own marker, which pydantic ignores; tagging them for pydantic
    makes it validate only the member the event's `type` names, so errors are about that member.
    """
    from pydantic import Field, TypeAdapter

    members = tuple(_members(_union(direction, api)))
    tagged: Any = Annotated[Union[members], Field(discriminator="type")]  # noqa: UP007
    return TypeAdapter(tagged)


def _members(alias: Any) -> list[Any]:
    """The model classes of an `Annotated[Union[...], ...]` alias."""
    if get_origin(alias) is Annotated:
        alias = get_args(alias)[0]
    return list(get_args(alias))


@cache
def event_types(direction: Direction | Literal["nested"], api: Api = "realtime") -> frozenset[str]:
    """Every event `type` the SDK knows for this direction of this API."""
    kinds: set[str] = set()
    for member in _members(_union(direction, api)):
        kinds.update(get_args(member.model_fields["type"].annotation))
    return frozenset(kinds)


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(event)"


def _extras(value: Any, path: str) -> Iterator[str]:
    """Paths of keys the SDK's models put into `model_extra`, at any depth."""
    if hasattr(value, "model_extra"):  # a pydantic model
        for key in value.model_extra or {}:
            yield f"{path}.{key}" if path else key
        for name in type(value).model_fields:
            yield from _extras(getattr(value, name), f"{path}.{name}" if path else name)
    elif isinstance(value, list | tuple):
        for index, inner in enumerate(value):
            yield from _extras(inner, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, inner in value.items():
            yield from _extras(inner, f"{path}.{key}" if path else str(key))


def problems(direction: Direction, event: Mapping[str, Any],
             api: Api = "realtime") -> list[str]:
    """What the SDK finds wrong with this event (empty when it is a valid event of the API)."""
    found = _problems(direction, event, api)
    if api == "live" and direction == "server" and event.get("type") == "response.event" \
            and not found:
        nested = event.get("event")
        if isinstance(nested, Mapping):
            found = [f"event.{p}" for p in _problems("nested", nested, api)]
    return found


def _problems(direction: Direction | Literal["nested"], event: Mapping[str, Any],
              api: Api) -> list[str]:
    from pydantic import ValidationError

    kind = event.get("type")
    if not isinstance(kind, str) or kind not in event_types(direction, api):
        if direction == "nested":
            return [f"type: {kind!r} is not a Responses stream event type of the SDK"]
        return [f"type: {kind!r} is not a {direction} event type of the {_API_NAMES[api]} SDK"]
    try:
        model = _adapter(direction, api).validate_json(orjson.dumps(event), strict=True)
    except ValidationError as error:
        found = []
        for detail in error.errors(include_url=False):
            loc = tuple(detail["loc"])
            if loc and loc[0] == kind:  # the discriminator's tag
                loc = loc[1:]
            got = "" if detail["type"] == "missing" else f" (got {_short(detail.get('input'))})"
            found.append(f"{_path(loc)}: {detail['msg']}{got}")
        return found
    return [f"{path}: key unknown to the SDK ({_model_at(model, path)})"
            for path in _extras(model, "")]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _model_at(model: Any, path: str) -> str:
    """The SDK class that owns the unknown key at `path`, to say what it expects instead."""
    from pydantic import BaseModel

    owner: Any = model
    parts = path.replace("[", ".[").split(".")[:-1]
    try:
        for part in parts:
            if part.startswith("["):
                owner = owner[int(part[1:-1])]
            elif isinstance(owner, BaseModel):
                owner = getattr(owner, part)
            else:
                owner = owner[part]
    except (LookupError, AttributeError, ValueError, TypeError):  # a dict key with "." or "["
        return "see the SDK's model"
    if not isinstance(owner, BaseModel):
        return "see the SDK's model"
    known = ", ".join(sorted(type(owner).model_fields))
    return f"{type(owner).__name__} knows: {known}"


def check(direction: Direction, event: Mapping[str, Any], api: Api = "realtime") -> None:
    """Raise SdkViolation naming the event and the bad keys, unless the SDK accepts it whole."""
    found = problems(direction, event, api)
    if found:
        raise SdkViolation(describe(direction, event, found, api))


def describe(direction: Direction, event: Mapping[str, Any], found: list[str],
             api: Api = "realtime") -> str:
    who = "sent by the stand-in" if direction == "server" else "sent to OpenAI by the client"
    sdk = "the GA SDK" if api == "realtime" else "the SDK's GPT-Live types"
    head = f"{direction} event {event.get('type')!r} ({who}) is not valid for {sdk}:"
    return "\n  ".join([head, *found, f"event: {_short(dict(event))}"])


class EventChecker:
    """A `StandinOptions.check_events` hook that collects violations instead of raising.

    Raising inside the stand-in would break the very session under test in confusing ways;
    collecting lets the test run on and then fail at the end with every bad event named.
    The same problem on many events (say, every audio delta) is reported once, with a count.
    """

    def __init__(self, api: Api = "realtime") -> None:
        self.api: Api = api
        self.violations: list[str] = []  # one per distinct problem, with an example event
        self.checked = 0
        self.seen: Counter[tuple[Direction, str]] = Counter()  # (direction, type) -> events
        self._counts: dict[tuple[str, ...], int] = {}

    def __call__(self, direction: Direction, event: Mapping[str, Any]) -> None:
        self.checked += 1
        self.seen[direction, str(event.get("type"))] += 1
        found = problems(direction, event, self.api)
        if not found:
            return
        key = (direction, str(event.get("type")), *found)
        if key not in self._counts:
            self._counts[key] = 0
            self.violations.append(describe(direction, event, found, self.api))
        self._counts[key] += 1

    def take(self) -> list[str]:
        """The violations so far, forgotten: for a test that provokes one on purpose."""
        taken, self.violations = self.violations, []
        self._counts.clear()
        return taken

    def assert_clean(self) -> None:
        """Raise SdkViolation listing every distinct problem seen, if there was any."""
        if not self.violations:
            return
        lines = [f"{message}\n  (seen {count} time{'s' if count > 1 else ''})"
                 for message, count in zip(self.violations, self._counts.values(), strict=True)]
        name = "Realtime" if self.api == "realtime" else "GPT-Live"
        types = "GA types" if self.api == "realtime" else "GPT-Live types"
        raise SdkViolation(f"{sum(self._counts.values())} {name} event(s) of "
                           f"{self.checked} checked are not valid for openai-python's {types}:\n"
                           + "\n".join(lines))
