"""Both model APIs seen one way by end-to-end tests: place a call, speak, and read what the
model's side was sent. The Realtime and GPT-Live stand-ins differ in their wire; a scenario
that applies to both asks these questions and gets the same kind of answer."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from server.testing import audio
from server.testing.dial import TwilioStream
from server.testing.live_standin import LiveStandinOptions, LiveStandinSession, next_live_session
from server.testing.standin import StandinOptions, StandinSession, next_session
from tests.conftest import API_KEY, LIVE_OPTIONS, Line, Rig, speak

AUDIBLE = 500  # mean |linear sample| of a 20 ms window above which it is not silence


def options(api: str, **kw: Any) -> StandinOptions | LiveStandinOptions:
    """The stand-in for this API with these options (the scripting ones have the same names:
    tool_calls, text_tool_calls, tool_reply_ms, greeting_ms, ...)."""
    if api == "live":
        from dataclasses import replace

        return replace(LIVE_OPTIONS, **kw)
    return StandinOptions(api_key=API_KEY, **kw)


def audible_bytes(data: bytes) -> int:
    """Bytes of `data` (mu-law) in 20 ms windows that are not silence."""
    return sum(len(data[i:i + 160]) for i in range(0, len(data), 160)
               if audio.level(data[i:i + 160]) > AUDIBLE)


def sent_audio(stream: TwilioStream) -> bytes:
    return b"".join(base64.b64decode(m["media"]["payload"])
                    for m in stream.received if m.get("event") == "media")


def audible(stream: TwilioStream) -> int:
    """Bytes of sound (not silence) the bridge sent to this stream: GPT-Live's output never
    stops, so "the caller hears something" means sound."""
    return audible_bytes(sent_audio(stream))


@dataclass
class Placed:
    """A call placed on a rig of either API: the caller's stream and line, the model's side."""

    api: str
    stream: TwilioStream
    session: StandinSession | LiveStandinSession
    line: Line | None

    async def say(self, frames: int = 10, variant: int = 0) -> bytes:
        """One caller turn (GPT-Live: on the line that never stops)."""
        if self.line is not None:
            return await self.line.say(frames, variant)
        return await speak(self.stream, frames, variant)

    def sent(self, kind: str) -> list[dict[str, Any]]:
        """Client events of this type the model's side got from the bridge, in order."""
        return [e for e in self.session.received if e.get("type") == kind]

    async def wait_sent(self, kind: str, count: int = 1, timeout: float = 8.0) -> dict[str, Any]:
        return await self.session.wait_for(kind, count, timeout)

    def output_events(self) -> list[dict[str, Any]]:
        """The tool results as the bridge sent them (Realtime: conversation items; GPT-Live:
        items for the backend)."""
        kind = "response.item.create" if self.api == "live" else "conversation.item.create"
        return [e for e in self.sent(kind) if e["item"]["type"] == "function_call_output"]

    @property
    def outputs(self) -> dict[str, str]:
        """Tool results the model got: call id -> output."""
        return self.session.tool_outputs

    def tool_names(self) -> list[str]:
        """The tools declared to the model (Realtime: the session; GPT-Live: its backend)."""
        if self.api == "live":
            start = self.sent("session.start")[0]["session"]
            return [t["name"] for t in start["delegation"]["responses"]["tools"]]
        return [t["name"] for t in self.sent("session.update")[0]["session"]["tools"]]

    def texts(self) -> list[str]:
        """What the bridge told the model in words as the caller's (keypad entries)."""
        if self.api == "live":
            return [e["content"] for e in self.sent("session.thinking.append")]
        return [e["item"]["content"][0]["text"] for e in self.sent("conversation.item.create")
                if e["item"]["type"] == "message" and e["item"]["role"] == "user"]

    def instructions(self) -> list[str]:
        """Instructions the bridge asked the model to act on (a greeting, a goodbye)."""
        if self.api == "live":
            return [e["content"] for e in self.sent("session.instructions.append")]
        return [e["response"]["instructions"] for e in self.sent("response.create")
                if e.get("response", {}).get("instructions")]

    def history(self) -> list[tuple[str, str]]:
        """The conversation a new session was given: (role, text), oldest first."""
        if self.api == "live":
            start = self.sent("session.start")[0]["session"]
            return [(m["role"], m["content"][0]["text"]) for m in start.get("input", [])]
        return [(e["item"]["role"], e["item"]["content"][0]["text"])
                for e in self.sent("conversation.item.create")
                if e["item"]["type"] == "message"]

    async def drop(self) -> None:
        """The model's socket dies mid-call."""
        if isinstance(self.session, LiveStandinSession):
            self.session.drop()
        else:
            await self.session.close(code=1011)


async def place(rig: Rig, marks: str = "immediate") -> Placed:
    if rig.api == "live":
        stream, live_session, line = await rig.place_live(marks)
        return Placed("live", stream, live_session, line)
    stream, session = await rig.place(marks)
    return Placed("realtime", stream, session, None)


async def next_model(rig: Rig, stream: TwilioStream, timeout: float = 8.0) -> Placed:
    """The next model session on this rig (a reconnect, a handover), on this stream."""
    if rig.api == "live":
        live_session = await next_live_session(rig.standin.app, timeout)
        await live_session.wait_for("session.start", timeout=timeout)
        return Placed("live", stream, live_session, rig.line(stream))
    session = await next_session(rig.standin.app, timeout)
    await session.wait_for("session.update", timeout=timeout)
    return Placed("realtime", stream, session, None)
