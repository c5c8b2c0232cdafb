"""The conversation: the one typed record of what was said and done in a call.

Caller and assistant turns (a cut assistant turn keeps what the caller heard of it), tool calls
and their results, keypad entries, operator turns and whispers, and notes (model errors). It is
kept for every call, whatever the records configuration, and it is the one source of: the
record's `timeline` (`to_dicts`), the conversation a new model session is given after a
reconnect or a handover, and what the console shows. Only this module knows the timeline's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import orjson


@dataclass(slots=True)
class Entry:
    """One thing that happened, `at` seconds after the call started."""

    kind: ClassVar[str] = "entry"
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {"at": round(self.at, 3), "kind": self.kind, **self._fields()}

    def _fields(self) -> dict[str, Any]:
        return {}


@dataclass(slots=True)
class CallerTurn(Entry):
    kind: ClassVar[str] = "caller"
    text: str = ""
    item_id: str = ""

    def _fields(self) -> dict[str, Any]:
        return {"text": self.text, "item_id": self.item_id}


@dataclass(slots=True)
class AssistantTurn(Entry):
    kind: ClassVar[str] = "assistant"
    text: str = ""
    item_id: str = ""
    latency_ms: float | None = None
    interrupted: bool = False
    heard_ms: int | None = None  # what the caller heard of it, when cut

    def _fields(self) -> dict[str, Any]:
        data: dict[str, Any] = {"text": self.text, "item_id": self.item_id}
        if self.latency_ms is not None:
            data["latency_ms"] = self.latency_ms
        if self.interrupted:
            data["interrupted"] = True
            data["heard_ms"] = self.heard_ms or 0
        return data


@dataclass(slots=True)
class ToolCall(Entry):
    kind: ClassVar[str] = "tool"
    name: str = ""
    call_id: str = ""
    arguments: Any = None  # JSON value, or the exact text when it was not JSON
    outcome: str = ""
    seconds: float = 0.0
    result: Any = None  # the output given to the model (JSON value or text)

    def _fields(self) -> dict[str, Any]:
        return {"name": self.name, "call_id": self.call_id, "arguments": self.arguments,
                "outcome": self.outcome, "seconds": round(self.seconds, 3),
                "result" if self.outcome == "ok" else "error": self.result}


@dataclass(slots=True)
class Keypad(Entry):
    kind: ClassVar[str] = "keypad"
    digits: str = ""

    def _fields(self) -> dict[str, Any]:
        return {"digits": self.digits}


@dataclass(slots=True)
class OperatorTurn(Entry):
    """What an operator said to the caller while the call was taken over."""

    kind: ClassVar[str] = "operator"
    text: str = ""
    operator: str = ""
    item_id: str = ""

    def _fields(self) -> dict[str, Any]:
        return {"text": self.text, "operator": self.operator, "item_id": self.item_id}


@dataclass(slots=True)
class Whisper(Entry):
    """An operator's instruction to the assistant, never heard by the caller."""

    kind: ClassVar[str] = "whisper"
    text: str = ""
    operator: str = ""

    def _fields(self) -> dict[str, Any]:
        return {"text": self.text, "operator": self.operator}


@dataclass(slots=True)
class ModelNote(Entry):
    """An error the model reported (the call went on, or it ended the session)."""

    kind: ClassVar[str] = "error"
    code: str = ""
    message: str = ""
    fatal: bool = False

    def _fields(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "fatal": self.fatal}


_KINDS: dict[str, type[Entry]] = {cls.kind: cls for cls in (
    CallerTurn, AssistantTurn, ToolCall, Keypad, OperatorTurn, Whisper, ModelNote)}


def _entry(data: dict[str, Any]) -> Entry | None:
    """A saved timeline entry back as a typed one (None: not one this version knows)."""
    cls = _KINDS.get(str(data.get("kind")))
    at = data.get("at")
    if cls is None or not isinstance(at, (int, float)):
        return None
    if cls is ToolCall:
        ok = data.get("outcome") == "ok"
        return ToolCall(float(at), str(data.get("name", "")), str(data.get("call_id", "")),
                        data.get("arguments"), str(data.get("outcome", "")),
                        float(data.get("seconds") or 0.0),
                        data.get("result") if ok else data.get("error"))
    known = {f.name for f in fields(cls) if f.name != "at"}
    kwargs = {k: v for k, v in data.items() if k in known}
    try:
        return cls(float(at), **kwargs)
    except TypeError:
        return None


@dataclass(slots=True)
class Conversation:
    entries: list[Entry] = field(default_factory=list)
    version: int = 0  # bumped on every change (the records writer saves what changed)

    def add(self, entry: Entry) -> Entry:
        """Keep `entry` in time order (a caller's turn is transcribed after the assistant may
        have begun to answer it: it goes where the caller started speaking)."""
        entries = self.entries
        index = len(entries)
        while index > 0 and entries[index - 1].at > entry.at:
            index -= 1
        entries.insert(index, entry)
        self.version += 1
        return entry

    def changed(self) -> None:
        """An entry was edited in place (an assistant turn found cut)."""
        self.version += 1

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Any:
        return iter(self.entries)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [entry.to_dict() for entry in self.entries]

    @classmethod
    def from_dicts(cls, saved: Any) -> Conversation:
        """A saved timeline (another instance's record: a handed-over call)."""
        entries = [e for e in (_entry(d) for d in saved if isinstance(d, dict))
                   if e is not None] if isinstance(saved, list) else []
        return cls(entries)


def json_text(value: Any) -> str:
    """Arguments and results as the model saw them: JSON text (or the text itself)."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def json_or_text(text: str) -> Any:
    """Arguments and results are JSON text by convention; keep them readable as JSON values
    when they are, as the exact text when they are not."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
