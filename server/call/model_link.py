"""Carrying a conversation into a new model session: after a lost socket, `session_expired`, or
a handover to another instance.

A Realtime session starts empty. The call's record already holds the conversation as text (the
transcript feature writes caller and assistant turns, keypad entries and tool calls into the
timeline), so a new session gets the same `session.update` and then the conversation recreated
as items: user and assistant messages as text, tool calls with their outputs. Audio is never
replayed. While the new session is being opened, the caller's audio is kept (bounded) and sent
to it once it is ready, so what they said in the gap is heard.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import orjson
from aiohttp import WSMsgType

from server.wire import realtime as oai

MAX_ITEMS = 200  # the most recent timeline entries carried over; older ones are left out


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def conversation_items(timeline: list[dict[str, Any]], limit: int = MAX_ITEMS) -> list[bytes]:
    """Client events that recreate the conversation so far in a new session, oldest first."""
    items: list[bytes] = []
    for entry in timeline[-limit:]:
        kind = entry.get("kind")
        if kind == "caller" and entry.get("text"):
            items.append(oai.user_text(str(entry["text"])))
        elif kind == "assistant" and entry.get("text"):
            text = str(entry["text"])
            if entry.get("interrupted"):
                text += f" [the caller interrupted after {entry.get('heard_ms', 0)} ms]"
            items.append(oai.assistant_text(text))
        elif kind == "keypad" and entry.get("digits"):
            digits = " ".join(str(entry["digits"]))
            items.append(oai.user_text(f"The caller typed {digits} on the keypad."))
        elif kind == "tool" and entry.get("call_id") and entry.get("name"):
            call_id = str(entry["call_id"])
            items.append(oai.function_call_item(call_id, str(entry["name"]),
                                                _json_text(entry.get("arguments", {}))))
            output = entry.get("result") if "result" in entry else {"error": entry.get("error")}
            items.append(oai.function_call_output(call_id, _json_text(output)))
    return items


class GapBuffer:
    """Caller audio while no model session is open: the newest `max_frames` frames are kept."""

    def __init__(self, max_frames: int) -> None:
        self._frames: deque[bytes] = deque(maxlen=max(max_frames, 1))
        self.received = 0
        self.dropped = 0

    async def send(self, frame: bytes, kind: WSMsgType = WSMsgType.TEXT) -> None:
        """Stands in for the socket's send_frame on the media fast path during the gap."""
        if len(self._frames) == self._frames.maxlen:
            self.dropped += 1
        self._frames.append(frame)
        self.received += 1

    def __len__(self) -> int:
        return len(self._frames)

    def drain(self) -> list[bytes]:
        frames = list(self._frames)
        self._frames.clear()
        return frames
