"""One call's record: who, when, how it ended, what was said, how fast, what it used.

The call owns one `CallRecord`; its `conversation` is the call's one typed account of what was
said and done (the record's `timeline` is its JSON form); features add latencies and usage; the
records store (server/records/) saves `to_dict()`. Counters that the relay bumps per frame are
plain ints on the record so the hot path pays one attribute increment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from server.call.conversation import Conversation


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z") if moment else None


def stamp(moment: datetime) -> str:
    """A snapshot's `updated_at`: microseconds, so two snapshots of one call order strictly."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_stamp(value: Any) -> datetime | None:
    """A record's `updated_at` (or None when it has none, or not one this code wrote)."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def add_usage(total: dict[str, Any], usage: dict[str, Any]) -> None:
    """Sum OpenAI's usage object into `total`, keeping its field names and nesting."""
    for key, value in usage.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            total[key] = int(total.get(key, 0)) + value
        elif isinstance(value, dict):
            inner = total.get(key)
            if not isinstance(inner, dict):
                inner = total[key] = {}
            add_usage(inner, value)


@dataclass
class CallRecord:
    call_sid: str = ""
    stream_sid: str = ""
    caller: str = ""
    called: str = ""
    direction: str = "inbound"
    # Outbound calls: Twilio's call status (queued, ringing, in-progress, completed, busy,
    # no-answer, failed, canceled) and the answering-machine result (human, machine_end_beep…)
    status: str | None = None
    answered_by: str | None = None
    model: str = ""
    prompt: str = ""
    started_at: datetime = field(default_factory=utc_now)
    ended_at: datetime | None = None
    end_kind: str | None = None  # metric label: caller_hung_up, assistant_ended, ...
    end_reason: str | None = None  # the readable line
    frames_in: int = 0
    frames_out: int = 0  # deltas relayed to the caller (dropped ones are not counted)
    barge_ins: int = 0
    session_ready_ms: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    cost_usd: float | None = None
    conversation: Conversation = field(default_factory=Conversation)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    recording: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # the plan's (an outbound call's)
    # what operators did on the console: {"time", "at", "operator", "action", "detail"}
    operator_actions: list[dict[str, Any]] = field(default_factory=list)
    _t0: float = field(default_factory=time.monotonic, repr=False)
    _changes: int = field(default=0, repr=False)
    # The wall-clock time of the latest snapshot (`to_dict`): stores keep the newest state of a
    # call, so a retried or spooled old snapshot never replaces a newer one (handover).
    _updated_at: datetime | None = field(default=None, repr=False)

    def elapsed(self) -> float:
        """Seconds since the call started (monotonic)."""
        return time.monotonic() - self._t0

    @property
    def timeline(self) -> list[dict[str, Any]]:
        """The conversation as the record keeps it (JSON objects, in time order)."""
        return self.conversation.to_dicts()

    @property
    def version(self) -> int:
        """Bumped on every change a store should write."""
        return self._changes + self.conversation.version

    def add_operator_action(self, operator: str, action: str,
                            detail: Any = None) -> dict[str, Any]:
        """Who did what to this call from the console (listen, whisper, takeover, handback,
        transfer, hangup), and when: kept in the record for good."""
        entry = {"time": iso(utc_now()), "at": round(self.elapsed(), 3), "operator": operator,
                 "action": action, "detail": detail}
        self.operator_actions.append(entry)
        self._changes += 1
        return entry

    def touch(self) -> None:
        """Mark the record changed (after editing a counter in place)."""
        self._changes += 1

    def add_usage(self, usage: dict[str, Any]) -> None:
        add_usage(self.usage, usage)
        self._changes += 1

    @property
    def duration(self) -> float:
        end = self.ended_at or utc_now()
        return round((end - self.started_at).total_seconds(), 3)

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue a record another instance started (a call handed over to us)."""
        started = saved.get("started_at")
        if isinstance(started, str):
            self.started_at = datetime.fromisoformat(started.replace("Z", "+00:00"))
            self._t0 = time.monotonic() - (utc_now() - self.started_at).total_seconds()
        self.conversation = Conversation.from_dicts(saved.get("timeline"))
        for key in ("sessions", "latencies_ms", "operator_actions"):
            value = saved.get(key)
            if isinstance(value, list):
                setattr(self, key, list(value))
        for key in ("usage", "metadata"):
            value = saved.get(key)
            if isinstance(value, dict):
                setattr(self, key, dict(value))
        if saved.get("direction") in ("inbound", "outbound"):
            self.direction = str(saved["direction"])
        for key in ("status", "answered_by"):
            if isinstance(saved.get(key), str):
                setattr(self, key, saved[key])
        for key in ("frames_in", "frames_out", "barge_ins"):
            value = saved.get(key)
            if isinstance(value, int):
                setattr(self, key, value)
        if isinstance(saved.get("session_ready_ms"), (int, float)):
            self.session_ready_ms = float(saved["session_ready_ms"])
        # Our snapshots are newer than the one we continue, even if our clock is a little behind.
        before = parse_stamp(saved.get("updated_at"))
        if before is not None and (self._updated_at is None or before > self._updated_at):
            self._updated_at = before
        self._changes += 1

    def _stamp(self) -> str:
        """Now, but never earlier than (and always after) the previous snapshot's time."""
        now = utc_now()
        if self._updated_at is not None and now <= self._updated_at:
            now = self._updated_at + timedelta(microseconds=1)
        self._updated_at = now
        return stamp(now)

    def to_dict(self) -> dict[str, Any]:
        return {
            "call_sid": self.call_sid,
            "stream_sid": self.stream_sid,
            "from": self.caller,
            "to": self.called,
            "direction": self.direction,
            "status": self.status,
            "answered_by": self.answered_by,
            "model": self.model,
            "prompt": self.prompt,
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "duration_seconds": self.duration,
            "end_kind": self.end_kind,
            "end_reason": self.end_reason,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "barge_ins": self.barge_ins,
            "session_ready_ms": (round(self.session_ready_ms, 1)
                                 if self.session_ready_ms is not None else None),
            "latencies_ms": [round(x, 1) for x in self.latencies_ms],
            "usage": self.usage,
            "cost_usd": self.cost_usd,
            "timeline": self.timeline,
            "sessions": self.sessions,
            "recording": self.recording,
            "metadata": self.metadata,
            "operator_actions": self.operator_actions,
            "updated_at": self._stamp(),
        }
