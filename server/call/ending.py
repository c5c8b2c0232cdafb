"""How a call ends: one place decides, and the record, the metrics, the event stream and what
Twilio does next (the `<Connect action>` answer) all follow that one decision."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum

from aiohttp import WSCloseCode

from server.wire import twilio as tw


class EndKind(StrEnum):
    """The kinds of ending: the record's `end_kind` and the `end` label of bridge_calls_total."""

    CALLER_HUNG_UP = "caller_hung_up"
    ASSISTANT_ENDED = "assistant_ended"  # the model called end_call
    TRANSFERRED = "transferred"  # the model called transfer_call, or an operator transferred
    ADMIN_HUNG_UP = "admin_hung_up"  # an operator hung up (POST /calls/{sid}/hangup)
    TIME_LIMIT = "time_limit"  # MAX_CALL_SECONDS reached
    OPENAI_ERROR = "openai_error"  # the model could not be used (and no new session helped)
    BAD_INPUT = "bad_input"  # Twilio's side broke the protocol
    REJECTED = "rejected"  # the stream was refused (token, capacity, duplicate)
    IDLE = "idle"  # the stream went silent
    SHUTDOWN = "shutdown"  # the server stopped (drain over)
    HANDOVER = "handover"  # moved to another instance
    INTERNAL_ERROR = "internal_error"
    # Outbound calls (issue 15): an answering machine answered ...
    VOICEMAIL = "voicemail"  # the voicemail message was left, then the call hung up
    MACHINE = "machine"  # hung up on an answering machine (no message) or a fax
    # ... or the call never connected (recorded from Twilio's status callback; no stream)
    BUSY = "busy"
    NO_ANSWER = "no_answer"
    DIAL_FAILED = "dial_failed"  # Twilio could not place it (status `failed`)
    CANCELED = "canceled"  # hung up (by the API) while it was still ringing
    NO_STREAM = "no_stream"  # answered, but no media stream ever reached the bridge


@dataclass(frozen=True, slots=True)
class Ending:
    """How a call ends. `decision` is what Twilio does after the stream (None: the spoken
    fallback, then hang up); `code` closes the stream; `level` logs the summary line."""

    kind: EndKind
    reason: str
    decision: tw.Decision | None = None
    code: int = WSCloseCode.OK
    level: int = logging.INFO


@dataclass(frozen=True, slots=True)
class Refusal:
    """A webhook or stream turned away before the call started: the reason label of
    bridge_calls_refused_total (server.metrics.REFUSED_REASONS) and a line for the log."""

    reason: str
    message: str


def failed(kind: EndKind, reason: str, code: int = WSCloseCode.INTERNAL_ERROR,
           level: int = logging.ERROR) -> Ending:
    """An abnormal ending: Twilio speaks the fallback, then hangs up."""
    return Ending(kind, reason, None, code, level)


def hung_up(reason: str, code: int = WSCloseCode.OK) -> Ending:
    """The caller is gone: nothing left for Twilio to do."""
    return Ending(EndKind.CALLER_HUNG_UP, reason, tw.HANGUP, code)


class CallEnds(Exception):
    """Raised inside a call's tasks to end it now with this Ending (the relays turn it into the
    call's one decision)."""

    def __init__(self, ending: Ending) -> None:
        super().__init__(ending.reason)
        self.ending = ending
