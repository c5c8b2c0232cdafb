"""OpenAI GPT-Live behind the `ModelSession` interface.

GPT-Live (`OPENAI_LIVE_URL`) is a full-duplex voice model: it listens while it speaks and takes
its own turns, so it gets no `create_response` and no `truncate`. The session:

- opens the WebSocket (Authorization only), sends `session.start` (the model, the rendered
  prompt, mu-law 8 kHz both ways, the voice, the conversation so far as `input` trimmed to the
  API's limits, Responses delegation of the call's tools to LIVE_BACKEND_MODEL) and returns once
  `session.started` came, all within OPENAI_CONNECT_TIMEOUT;
- relays audio both ways, base64 untouched; its output is one continuous track, silence
  included, tagged with the assistant turn it belongs to (a new item id when a turn begins, so
  playback reports the reply's start and latency);
- groups the transcript deltas into turns (`TranscriptGrouper`) and says what it can observe:
  words as they come, completed turns (stable ids: the session's id, the speaker, a number),
  the caller's speech on the session timeline (`SpeechStarted` / `SpeechStopped`, for latency),
  and the model going quiet while the caller talks over it (`ModelYielded`);
- hands the backend's function calls to the call (`FunctionCall`, then a `ResponseDone` keyed by
  the delegation once the backend response that made them is complete) and sends each result
  back; once every call of that response has its output, one `response.create`;
- reports usage as cumulative snapshots (`session.usage.updated`, then `session.closed`'s
  seconds) and each backend response's tokens;
- ends as GPT-Live ends: `session.closed` for `expired` or a lost connection, or a dropped
  socket, is a lost session (`ModelLost`: a new one continues the call); a content close or a
  fatal error ends the call (`ModelFailed`). At the end of the call `finish` sends
  `session.close` and waits (bounded) for `session.closed` and its final usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import WSMsgType

from server.call.conversation import (
    AssistantTurn,
    CallerTurn,
    Entry,
    Keypad,
    OperatorTurn,
    ToolCall,
    Whisper,
    json_text,
)
from server.models import events as ev
from server.models.session import (
    AudioHandler,
    EventHandler,
    ModelFailed,
    ModelLost,
    ModelUnavailable,
    SessionConfig,
)
from server.models.socket import ModelSocket, audio_sender, open_socket, send_text, why_lost
from server.settings import Settings
from server.wire import live

TEXT = WSMsgType.TEXT
BYTES_PER_MS = 8  # mu-law at 8 kHz
CLOSE_WAIT = 1.0  # after session.close, the longest wait for session.closed (its final usage)
APPEND_TOKENS = 450  # an append takes at most 500 tokens; our count is an estimate: a margin
RENEWABLE_ERRORS = frozenset({"session_expired"})  # a new session continues the call
FAILED_CLOSES = frozenset({"content"})  # closed for what was said: no new session
_HANDSHAKE_HINTS = {403: "the key has no access to GPT-Live", 404: "check OPENAI_LIVE_URL"}
BACKEND_PREAMBLE = (
    "You are the backend of a phone assistant: the voice model talking with the caller hands "
    "you tasks; use the tools to do them and answer briefly, for the voice model to say. The "
    "assistant's instructions follow.\n\n")
TAKEN_OVER = ("A person from the business has taken over this call and is talking with the "
              "caller now. Stay silent and only listen until you are told the call is yours "
              "again.")
HANDED_BACK = "The person from the business handed the call back to you: carry on helping."


def history(entries: Iterable[Entry]) -> list[tuple[str, str]]:
    """The conversation so far as (role, text) messages for `session.start` `input`, oldest
    first: turns as user and assistant messages, what the bridge knows besides (keypad entries,
    tool calls and results, an operator's words and whispers) as developer notes. GPT-Live takes
    text messages only; audio is never replayed."""
    out: list[tuple[str, str]] = []
    for entry in entries:
        if isinstance(entry, CallerTurn) and entry.text:
            out.append(("user", entry.text))
        elif isinstance(entry, AssistantTurn) and entry.text:
            text = entry.text
            if entry.interrupted:
                text += f" [the caller interrupted after {entry.heard_ms or 0} ms]"
            out.append(("assistant", text))
        elif isinstance(entry, Keypad) and entry.digits:
            out.append(("user", f"The caller typed {' '.join(entry.digits)} on the keypad."))
        elif isinstance(entry, ToolCall) and entry.name:
            args = json_text(entry.arguments if entry.arguments is not None else {})
            if entry.outcome == "ok":
                said = f"returned {json_text(entry.result)}"
            else:
                said = f"failed ({entry.outcome}): {json_text(entry.result)}"
            out.append(("developer", f"The tool {entry.name}({args}) {said}"))
        elif isinstance(entry, OperatorTurn) and entry.text:
            out.append(("developer", f"A person from the business, {entry.operator}, said to "
                                     f"the caller: {entry.text}"))
        elif isinstance(entry, Whisper) and entry.text:
            out.append(("developer", entry.text))
    return out


def chunks(text: str, max_tokens: int = APPEND_TOKENS) -> list[str]:
    """Text cut into appends GPT-Live accepts (at most 500 tokens each, by `estimate_tokens`):
    at spaces where it can, in order, nothing lost."""
    room = max((max_tokens - live.MESSAGE_TOKENS) * 4 - 3, 16)  # UTF-8 bytes per append
    out: list[str] = []
    rest = text.strip()
    while len(rest.encode("utf-8")) > room:
        cut = rest.encode("utf-8")[:room].decode("utf-8", "ignore")
        space = cut.rfind(" ")
        if space > len(cut) // 2:
            cut = cut[:space]
        out.append(cut.strip())
        rest = rest[len(cut):].strip()
    if rest or not out:
        out.append(rest)
    return out


@dataclass
class _Round:
    """The function calls of one backend response: `response.create` once it is complete and
    every call has its output."""

    calls: set[str] = field(default_factory=set)  # call ids still without an output
    answered: int = 0
    done: bool = False


class LiveSession:
    api = "live"
    decides_turns = True

    def __init__(self, settings: Settings, http: aiohttp.ClientSession,
                 log: logging.LoggerAdapter[logging.Logger] | logging.Logger) -> None:
        self._settings = settings
        self._http = http
        self._log = log
        self._logged = settings.log_event_types
        self._ws: ModelSocket | None = None
        self._lost_because: str | None = None
        self.received = 0
        # The caller's audio to the model: a closure over the socket once it is open.
        self.send_audio: Callable[[str], Awaitable[None]] = self._not_open
        self.session_id = ""
        self.expires_at: int | None = None
        self._grouper = live.TranscriptGrouper()
        self._audio_item = ""  # the assistant turn the output belongs to ("": none yet)
        self._out_chars = 0  # base64 characters of output so far: where the output is
        self._caller: tuple[str, int, int] | None = None  # latest caller turn: id, start, end
        self._rounds: dict[str, _Round] = {}  # delegation id -> its calls awaiting outputs
        self._delegation_of: dict[str, str] = {}  # call id -> delegation id
        self._on_event: EventHandler | None = None
        self._running = False
        self._finishing = False
        self._closed_seen = asyncio.Event()
        self._full_warned = False

    # --- opening ---

    async def open(self, config: SessionConfig, conversation: Sequence[Entry]) -> None:
        s = self._settings
        if config.instructions is None:
            raise ModelUnavailable("GPT-Live needs the prompt's text: a hosted prompt (pmpt_…) "
                                   "is Realtime's only")
        start = live.session_start(
            config.model, config.instructions, config.voice,
            live.history_input(history(conversation)), tools=config.tools,
            backend_model=s.live_backend_model,
            backend_instructions=BACKEND_PREAMBLE + config.instructions)
        try:
            async with asyncio.timeout(s.openai_connect_timeout):
                ws = self._ws = await self._connect()
                await ws.send_frame(start, TEXT)
                await self._started(ws)
        except TimeoutError:
            await self._drop()
            raise ModelUnavailable(f"GPT-Live did not start the session within "
                                   f"{s.openai_connect_timeout:g} s") from None
        except ModelUnavailable:
            await self._drop()
            raise
        except (ConnectionError, aiohttp.ClientError) as e:
            await self._drop()
            raise ModelUnavailable(f"the GPT-Live session closed at once: {e}") from None
        self.send_audio = audio_sender(ws, live.append_audio)
        self._grouper = live.TranscriptGrouper(id_prefix=f"{self.session_id or 'live'}_")

    async def _connect(self) -> ModelSocket:
        """The WebSocket (Authorization only: no model in the URL, no beta header). The
        call's watchdog pings a quiet socket (GPT-Live is never quiet for long: its output
        flows all the time)."""
        s = self._settings
        return await open_socket(self._http, s.openai_live_url,
                                 live.auth_headers(s.openai_api_key), what="GPT-Live",
                                 hints=_HANDSHAKE_HINTS)

    async def _started(self, ws: ModelSocket) -> None:
        """Read until `session.started`; what comes instead says why there is no session."""
        while True:
            msg = await ws.receive()
            self.received += 1
            if msg.type is not TEXT:
                if msg.type is WSMsgType.PING:
                    await ws.pong(msg.data)
                    continue
                if msg.type is WSMsgType.PONG:
                    continue
                raise ModelUnavailable(f"GPT-Live closed the socket before the session started "
                                       f"(code {ws.close_code})")
            try:
                event = live.decode(msg.data)
            except live.LiveProtocolError as e:
                raise ModelUnavailable(f"GPT-Live sent a malformed event: {e}") from None
            if isinstance(event, live.SessionStarted):
                self.session_id, self.expires_at = event.session_id, event.expires_at
                self._log.info("GPT-Live session %s started (model %s)", event.session_id,
                               event.model)
                return
            if isinstance(event, live.Error):
                param = f" ({event.param})" if event.param else ""
                raise ModelUnavailable(f"GPT-Live refused the session: {event.code}: "
                                       f"{event.message}{param}")

    @staticmethod
    async def _not_open(payload: str) -> None:
        raise ConnectionError("the session is not open")

    # --- the model's side of the relay ---

    async def run(self, on_audio: AudioHandler, on_event: EventHandler) -> None:
        """Relay until the session ends: ModelLost or ModelFailed, or a normal return once
        `session.closed` answered our `session.close` (`finish`)."""
        ws = self._ws
        assert ws is not None
        self._running, self._on_event = True, on_event
        try:
            await on_event(ev.SessionReady())  # session.started came before open() returned
            receive = ws.receive
            decode = live.decode
            wire_delta, make = live.AudioDelta, ev.AudioDelta
            while True:
                msg = await receive()
                self.received += 1
                if msg.type is not TEXT:
                    if msg.type is WSMsgType.PONG:
                        continue
                    if msg.type is WSMsgType.PING:
                        await ws.pong(msg.data)
                        continue
                    await self._flush()
                    raise self._lost(msg)
                try:
                    event = decode(msg.data)
                except live.LiveProtocolError as e:
                    raise ModelFailed(f"malformed event from GPT-Live: {e}") from None
                if type(event) is wire_delta:
                    delta = event.delta
                    self._out_chars += len(delta)
                    await on_audio(make(None, self._audio_item, delta))
                    continue
                if await self._handle(event, on_event):
                    return
        finally:
            self._running = False

    async def _handle(self, event: live.LiveEvent, on_event: EventHandler) -> bool:
        """One event other than audio; True once the session closed at our request."""
        kind = live.type_of(event)
        if kind in self._logged and kind != "error":
            self._log.info("openai %s %s", kind, live.describe(event))
        if isinstance(event, (live.InputTranscriptDelta, live.OutputTranscriptDelta)):
            for out in self._grouper.add(event):
                await self._turn_event(out, on_event)
        elif isinstance(event, live.FunctionCall):
            delegation = event.delegation_id or ""
            if event.call_id:
                self._rounds.setdefault(delegation, _Round()).calls.add(event.call_id)
                self._delegation_of[event.call_id] = delegation
            await on_event(ev.FunctionCall(event.call_id, event.name, event.arguments,
                                           delegation, event.item_id))
        elif isinstance(event, live.BackendDone):
            delegation = event.delegation_id or ""
            work = self._rounds.get(delegation)
            if work is not None and not work.done:
                work.done = True
                await self._answer(delegation)
            await on_event(ev.ResponseDone(delegation, event.status or "completed", None,
                                           dict(event.usage)))
        elif isinstance(event, live.UsageUpdated):
            if event.seconds is not None:
                await on_event(ev.Usage({"seconds": event.seconds}, cumulative=True))
                # the timeline has reached both the input (billed seconds) and the output
                # (its words come with it): turns quiet for long enough there are over
                out_ms = self._out_chars * 3 // 4 // BYTES_PER_MS
                for out in self._grouper.advance(min(int(event.seconds * 1000), out_ms)):
                    await self._turn_event(out, on_event)
            if event.usage_ratio is not None and event.usage_ratio >= 0.9 \
                    and not self._full_warned:
                self._full_warned = True
                self._log.warning("GPT-Live's context window is %.0f %% full",
                                  event.usage_ratio * 100)
        elif isinstance(event, live.Error):
            error = ev.ModelError(event.code, event.message, event.client_event_id,
                                  event.fatal and event.code not in RENEWABLE_ERRORS)
            await on_event(error)  # features see it first (metrics, the conversation)
            if event.code in RENEWABLE_ERRORS:
                raise ModelLost(f"GPT-Live error {event.code}: {event.message}")
            if error.fatal:
                raise ModelFailed(f"GPT-Live error {event.code}: {event.message}")
            param = f" ({event.param})" if event.param else ""
            self._log.warning("GPT-Live error %s: %s%s", event.code, event.message, param)
        elif isinstance(event, live.SessionClosed):
            if event.seconds is not None:
                await on_event(ev.Usage({"seconds": event.seconds}, cumulative=True))
            await self._flush()
            self._closed_seen.set()
            if self._finishing:
                return True
            if event.reason in FAILED_CLOSES:
                raise ModelFailed(f"GPT-Live closed the session ({event.reason})")
            raise ModelLost(f"GPT-Live closed the session ({event.reason or 'no reason'})")
        return False

    async def _turn_event(self, out: live.TurnDelta | live.TurnDone,
                          on_event: EventHandler) -> None:
        """A grouped transcript piece as the boundary's events."""
        if isinstance(out, live.TurnDelta):
            if out.speaker == "caller":
                if self._caller is None or self._caller[0] != out.turn_id:
                    self._caller = (out.turn_id, out.start_ms, out.end_ms)
                    await on_event(ev.SpeechStarted(out.turn_id, out.start_ms))
                turn_id, start, end = self._caller
                self._caller = (turn_id, min(start, out.start_ms), max(end, out.end_ms))
                await on_event(ev.TranscriptDelta("caller", out.turn_id, out.delta))
                await on_event(ev.SpeechStopped(out.turn_id, out.end_ms))
            else:
                self._audio_item = out.turn_id  # the output from now on is this turn's
                await on_event(ev.TranscriptDelta("assistant", out.turn_id, out.delta))
            return
        if out.speaker == "caller":
            await on_event(ev.CallerTranscript(out.turn_id, out.text))
            return
        caller = self._caller
        if caller is not None and caller[1] < out.end_ms < caller[2]:
            # the caller was talking when the model went quiet: it yielded to them
            await on_event(ev.ModelYielded(out.turn_id, max(out.end_ms - out.start_ms, 0)))
        if out.text:
            await on_event(ev.AssistantTranscript("", out.turn_id, out.text))

    async def _flush(self) -> None:
        """The session ends: its open turns are complete."""
        on_event = self._on_event
        if on_event is None:
            return
        for out in self._grouper.flush():
            await self._turn_event(out, on_event)

    def _lost(self, msg: Any) -> Exception:
        because, self._lost_because = self._lost_because, None
        return why_lost(msg, self._ws, because, "GPT-Live")

    # --- what the call tells the model ---

    async def _send(self, frame: bytes) -> None:
        await send_text(self._ws, frame)

    async def add_tool_result(self, call_id: str, output: str) -> None:
        """The output to the backend; once every call of its response has one, the backend
        goes on (`response.create`)."""
        await self._send(live.function_call_output(call_id, output))
        delegation = self._delegation_of.pop(call_id, None)
        work = self._rounds.get(delegation) if delegation is not None else None
        if work is not None and call_id in work.calls:
            work.calls.discard(call_id)
            work.answered += 1
            await self._answer(delegation or "")

    async def _answer(self, delegation: str) -> None:
        work = self._rounds.get(delegation)
        if work is not None and work.done and not work.calls and work.answered:
            del self._rounds[delegation]
            await self._send(live.response_create())

    async def add_text(self, role: str, text: str) -> None:
        """A keypad entry ("user"): silent context (`session.thinking.append`); an operator's
        whisper ("system"): an instruction (`session.instructions.append`)."""
        encode = live.instructions_append if role == "system" else live.thinking_append
        for part in chunks(text):
            await self._send(encode(part))

    async def create_response(self, instructions: str | None, event_id: str) -> None:
        """The gate passes only requests with instructions (the greeting, the time limit's
        goodbye): said to the model as an instruction, which makes it speak."""
        if instructions is None:
            return
        parts = chunks(instructions)
        for n, part in enumerate(parts):
            await self._send(live.instructions_append(
                part, event_id=event_id if n == len(parts) - 1 else None))

    async def truncate(self, item_id: str, heard_ms: int) -> None:
        """GPT-Live knows what it said and when it was interrupted: nothing to tell it."""

    async def listen_only(self, on: bool) -> None:
        """An operator takes the call over (the call mutes the model's audio): tell the model
        in words, since nothing else stops it from answering."""
        await self._send(live.instructions_append(TAKEN_OVER if on else HANDED_BACK))

    # --- the end ---

    async def lose(self, reason: str) -> None:
        """The watchdog gave up on this socket: close it; `run` then raises ModelLost(reason)."""
        self._lost_because = reason
        await self._drop()

    async def ping(self) -> None:
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                await ws.ping()  # if the socket is gone, `run` sees it close

    async def finish(self) -> None:
        """`session.close` while `run` still relays; it returns at `session.closed` (with the
        final usage), or the wait ends after CLOSE_WAIT and the open turns are flushed."""
        ws = self._ws
        if ws is None or ws.closed or not self._running or self._closed_seen.is_set():
            return
        self._finishing = True
        await self._send(live.session_close())
        try:
            async with asyncio.timeout(CLOSE_WAIT):
                await self._closed_seen.wait()
        except TimeoutError:
            self._log.info("GPT-Live sent no session.closed within %g s", CLOSE_WAIT)
            await self._flush()

    async def close(self) -> None:
        """Close the socket; a session nobody relays any more (a replaced one) is asked to
        close first, and read until `session.closed` (bounded)."""
        ws = self._ws
        if ws is None or ws.closed:
            return
        if not (self._running or self._finishing or self._closed_seen.is_set()) \
                and self.session_id:
            with contextlib.suppress(TimeoutError, ConnectionError, aiohttp.ClientError):
                async with asyncio.timeout(CLOSE_WAIT):
                    await ws.send_frame(live.session_close(), TEXT)
                    while (msg := await ws.receive()).type is TEXT:
                        with contextlib.suppress(live.LiveProtocolError):
                            if isinstance(live.decode(msg.data), live.SessionClosed):
                                self._closed_seen.set()
                                break
        await self._drop()

    async def _drop(self) -> None:
        ws = self._ws
        if ws is None:
            return
        try:
            async with asyncio.timeout(CLOSE_WAIT):
                await ws.close()
        except (TimeoutError, ConnectionError, aiohttp.ClientError):
            pass

    @property
    def closed(self) -> bool:
        return self._ws is None or self._ws.closed
