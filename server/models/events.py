"""What a model session tells the call, whatever OpenAI voice API is behind it.

Realtime and GPT-Live speak different protocols; their sessions (`server.models.realtime`,
`server.models.live`) turn them into these typed events, so the call and its features never
see either API's JSON. A model that decides its own turns (GPT-Live) never emits
`ResponseCreated` or `AudioDone`; it says what it can observe instead: the caller's speech from
the input transcript (`SpeechStarted` at a turn's first words, `SpeechStopped` at each word's
end, on the session timeline), a backend response that made tool calls (`ResponseDone`, keyed by
its delegation), and the model going quiet while the caller talks (`ModelYielded`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class AudioDelta:
    """Assistant audio: base64 mu-law, passed on untouched. The fast path: a lean class."""

    __slots__ = ("delta", "item_id", "response_id")

    def __init__(self, response_id: str | None, item_id: str, delta: str) -> None:
        self.response_id = response_id
        self.item_id = item_id
        self.delta = delta


@dataclass(frozen=True, slots=True)
class AudioDone:
    """An audio item is complete (playback marks its end)."""

    response_id: str
    item_id: str


@dataclass(frozen=True, slots=True)
class SessionReady:
    """The session is configured for mu-law both ways: audio may flow, the greeting may go."""


@dataclass(frozen=True, slots=True)
class ModelError:
    """A recoverable error from the model (fatal ones end the session before they get here).
    `event_id` names the client event it refused, when the API says."""

    code: str
    message: str
    event_id: str | None
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The model heard the caller start speaking (Realtime's VAD; GPT-Live: a caller turn's
    first transcribed words, later than the speech itself). Only Realtime's cuts playback."""

    item_id: str
    audio_start_ms: int | None


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """The caller stopped speaking; `audio_end_ms` is on the session's audio timeline."""

    item_id: str
    audio_end_ms: int | None


@dataclass(frozen=True, slots=True)
class ModelYielded:
    """GPT-Live stopped talking while the caller talked over it (its own barge-in): nothing is
    cleared or truncated; the call counts a barge-in with `heard_ms` of the turn said."""

    item_id: str
    heard_ms: int


@dataclass(frozen=True, slots=True)
class ResponseCreated:
    response_id: str


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """The model calls a tool. `response_id` groups the calls answered together."""

    call_id: str
    name: str
    arguments: str
    response_id: str = ""
    item_id: str = ""


@dataclass(frozen=True, slots=True)
class AssistantTranscript:
    """What the assistant said in one item, as text (complete)."""

    response_id: str
    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class ResponseDone:
    response_id: str
    status: str
    reason: str | None
    usage: dict[str, Any]
    function_calls: tuple[FunctionCall, ...] = ()
    transcripts: tuple[AssistantTranscript, ...] = ()  # assistant messages' words, as output


@dataclass(frozen=True, slots=True)
class CallerTranscript:
    """What the caller said in one turn, as text (complete)."""

    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class TranscriptDelta:
    """Words as they come, before the turn is complete. role: "caller" or "assistant"."""

    role: str
    item_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class Usage:
    """What the session used so far (`cumulative`: a snapshot to keep, not a part to add)."""

    usage: dict[str, Any]
    cumulative: bool = False


@dataclass(frozen=True, slots=True)
class Other:
    """Any event the bridge does not act on; kept for logging."""

    type: str
    summary: str = ""


ModelEvent = (
    AudioDelta | AudioDone | SessionReady | ModelError | SpeechStarted | SpeechStopped
    | ModelYielded | ResponseCreated | ResponseDone | FunctionCall | AssistantTranscript
    | CallerTranscript | TranscriptDelta | Usage | Other
)
