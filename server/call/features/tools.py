"""Function calling: run the model's tool calls, answer them, and let the model speak again.

The model's calls arrive as `response.function_call_arguments.done` while its response is still
going (it may be saying "let me check"). Each call runs in its own call-owned task, so the caller
can keep talking and a hang-up cancels it. Each output goes back as a `function_call_output` as
soon as it is ready; once the response that made the calls is done and every one of its calls has
an output, the call's response gate is asked for one response (it waits while another response
is active or the caller talks; a response the service starts on its own sees the outputs too).

A slow tool (over 1.5 s) gets hold audio once the model's own words have played; it is cleared
before the model speaks again. GPT-Live's calls come from its backend (Responses delegation):
the session answers them the same way, and the batch is complete when the backend response that
made them is (its `ResponseDone`); the model's continuous audio is held back while hold audio
plays, and an assistant word stops the hold as a response would.

Built-ins: `end_call` (the goodbye plays out, then `<Hangup/>`) and `transfer_call` (the
hand-off sentence plays out, then `<Dial>`), offered only when TRANSFER_TARGETS is set.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from server.call.conversation import json_or_text
from server.call.ending import Ending, EndKind
from server.call.events import ToolFinished, ToolStarted
from server.call.features.base import CallControl, Feature
from server.models import events as ev
from server.models.session import ToolSpec
from server.settings import Settings
from server.toolbox import (
    CANCELLED,
    INVALID_ARGUMENTS,
    OK,
    Toolbox,
    error_output,
    parse_arguments,
)
from server.tools import CallContext
from server.wire import twilio as tw

HOLD_AFTER = 1.5  # seconds a tool may take before the caller hears hold audio
HOLD_CHUNK_MS = 500  # hold audio is sent in pieces this long...
HOLD_AHEAD_MS = 1000  # ...staying at most this far ahead of real time (a clear stops it fast)
GOODBYE_WAIT = 5.0  # longest wait for the goodbye / hand-off sentence to finish playing

END_CALL = ToolSpec(
    "end_call",
    "Hang up the phone call. First say goodbye in the same turn; call this when the caller "
    "has nothing more to ask, or asks to end the call.",
    {"type": "object", "properties": {}, "additionalProperties": False},
)

FeatureFactory = Callable[[CallControl], Feature | None]


def transfer_spec(names: list[str]) -> ToolSpec:
    return ToolSpec(
        "transfer_call",
        "Transfer the caller to a person. First tell the caller, in the same turn, who you are "
        f"transferring them to. Targets: {', '.join(names)}.",
        {"type": "object",
         "properties": {"target": {"type": "string", "enum": names,
                                   "description": "who to transfer the caller to"}},
         "required": ["target"], "additionalProperties": False},
    )


@dataclass(frozen=True)
class ToolsConfig:
    """What every call's Tools feature shares; built once at startup."""

    toolbox: Toolbox
    transfer_targets: dict[str, str] = field(default_factory=dict)
    hold_chunks: tuple[tuple[str, int], ...] = ()  # (base64 mu-law, ms) pieces of the hold audio
    hold_after: float = HOLD_AFTER
    goodbye_wait: float = GOODBYE_WAIT

    def specs(self) -> list[ToolSpec]:
        specs = [*self.toolbox.specs(), END_CALL]
        if self.transfer_targets:
            specs.append(transfer_spec(list(self.transfer_targets)))
        return specs


def hold_chunks(ulaw: bytes, chunk_ms: int = HOLD_CHUNK_MS) -> tuple[tuple[str, int], ...]:
    """Cut mu-law audio into base64 pieces once, so a call only sends strings."""
    size = chunk_ms * 8
    return tuple((base64.b64encode(ulaw[i:i + size]).decode(), len(ulaw[i:i + size]) // 8)
                 for i in range(0, len(ulaw), size))


def factory(settings: Settings, toolbox: Toolbox, *, hold_after: float = HOLD_AFTER,
            goodbye_wait: float = GOODBYE_WAIT) -> FeatureFactory:
    """The Tools feature for every call. Loads HOLD_AUDIO now: ConfigError if it is bad."""
    chunks: tuple[tuple[str, int], ...] = ()
    if settings.hold_audio is not None:
        from server.sounds import load_ulaw

        chunks = hold_chunks(load_ulaw(settings.hold_audio))
    config = ToolsConfig(toolbox, dict(settings.transfer_targets), chunks, hold_after,
                         goodbye_wait)
    return functools.partial(ToolsFeature, config=config)


@dataclass
class _Batch:
    """The function calls of one response."""

    response_id: str
    outputs: dict[str, str | None] = field(default_factory=dict)  # call_id -> output; None: running
    done: bool = False  # its response.done arrived
    started: float = 0.0  # when its first tool started (monotonic)
    status: str = ""
    action: Ending | None = None  # end_call / transfer_call: how the call ends after it
    action_call: ev.FunctionCall | None = None
    finished: bool = False  # outputs all sent and the follow-up decided

    @property
    def ready(self) -> bool:
        return self.done and not self.finished and all(
            o is not None for o in self.outputs.values())


class ToolsFeature(Feature):
    name = "tools"
    model_events: ClassVar[tuple[type, ...]] = (
        ev.FunctionCall, ev.ResponseCreated, ev.ResponseDone, ev.SpeechStarted,
        ev.SpeechStopped, ev.TranscriptDelta)

    def __init__(self, call: CallControl, config: ToolsConfig) -> None:
        super().__init__(call)
        self._config = config
        self._batches: dict[str, _Batch] = {}
        self._started: set[str] = set()  # call_ids already run
        self._active: str | None = None  # the response in progress (no hold audio meanwhile)
        self._speaking = False
        self._ending = False
        self._hold_stop: asyncio.Event | None = None  # set: the hold audio stops
        self._holding = False  # hold audio was sent and not cleared yet
        self._context = CallContext(call.caller, call.called, call.call_sid, call.log)

    def tools(self) -> list[ToolSpec]:
        return self._config.specs()

    # --- events ---

    async def on_model(self, event: ev.ModelEvent) -> None:
        if isinstance(event, ev.FunctionCall):
            await self._on_call(event)
        elif isinstance(event, ev.ResponseCreated):
            self._active = event.response_id
            await self._stop_hold()  # the model is about to speak
        elif isinstance(event, ev.ResponseDone):
            if self._active == event.response_id:
                self._active = None
            if event.status == "completed":  # calls whose `.done` event we did not see
                for call in event.function_calls:
                    await self._on_call(call)
            batch = self._batches.get(event.response_id)
            if batch is not None:
                batch.done, batch.status = True, event.status
                await self._progress(batch)
                if not batch.finished:
                    self._start_hold(batch)
        elif isinstance(event, ev.SpeechStarted):
            self._speaking = True
            await self._stop_hold()
        elif isinstance(event, ev.SpeechStopped):
            self._speaking = False
        elif isinstance(event, ev.TranscriptDelta) and event.role == "assistant" \
                and self._holding:  # GPT-Live speaks on its own
            await self._stop_hold()

    async def on_end(self, ending: Ending) -> None:
        self._ending = True  # running tools and hold audio are cancelled by the call

    # --- running calls ---

    async def _on_call(self, fc: ev.FunctionCall) -> None:
        if not fc.call_id or fc.call_id in self._started or self._ending:
            return
        self._started.add(fc.call_id)
        batch = self._batches.get(fc.response_id)
        if batch is None:
            # No response id: nothing to wait for (a malformed event); answer when ready.
            batch = self._batches[fc.response_id] = _Batch(fc.response_id,
                                                           done=not fc.response_id)
        if fc.name == "end_call":
            self._builtin(batch, fc, Ending(EndKind.ASSISTANT_ENDED, "assistant ended the call",
                                            tw.HANGUP))
        elif fc.name == "transfer_call" and self._config.transfer_targets:
            await self._transfer(batch, fc)
        else:
            batch.outputs[fc.call_id] = None
            batch.started = batch.started or time.monotonic()
            self.call.spawn(self._run(batch, fc), f"tool-{fc.name[:40]}")

    def _builtin(self, batch: _Batch, fc: ev.FunctionCall, ending: Ending) -> None:
        self.call.publish(ToolStarted(fc.call_id, fc.name, json_or_text(fc.arguments)))
        if batch.action is None:
            batch.action, batch.action_call = ending, fc
            self.call.log.info("%s: %s once the response has played", fc.name, ending.reason)
        self.call.publish(ToolFinished(fc.name, fc.call_id, fc.arguments, OK, '{"ok":true}', 0.0))

    async def _transfer(self, batch: _Batch, fc: ev.FunctionCall) -> None:
        targets = self._config.transfer_targets
        try:
            target = parse_arguments(fc.arguments).get("target")
        except Exception:
            target = None
        if isinstance(target, str) and target in targets:
            self._builtin(batch, fc, Ending(EndKind.TRANSFERRED, f"transferred to {target}",
                                            tw.dial(targets[target])))
            return
        output = error_output(f"target must be one of {', '.join(targets)}")
        self.call.log.warning("transfer_call: invalid target (%d chars of arguments)",
                              len(fc.arguments))
        batch.outputs[fc.call_id] = output
        await self.call.model.add_tool_result(fc.call_id, output)
        self.call.publish(ToolFinished(fc.name, fc.call_id, fc.arguments, INVALID_ARGUMENTS,
                                      output, 0.0))

    async def _run(self, batch: _Batch, fc: ev.FunctionCall) -> None:
        started = time.monotonic()
        self.call.publish(ToolStarted(fc.call_id, fc.name, json_or_text(fc.arguments)))
        try:
            outcome, output = await self._config.toolbox.run(
                fc.name, fc.arguments, self._context, self.call.http)
        except asyncio.CancelledError:
            self.call.log.info("tool %s: cancelled (the call ended)", fc.name[:64])
            self.call.publish(ToolFinished(fc.name, fc.call_id, fc.arguments, CANCELLED, "",
                                          time.monotonic() - started))
            raise
        batch.outputs[fc.call_id] = output
        await self.call.model.add_tool_result(fc.call_id, output)
        self.call.publish(ToolFinished(fc.name, fc.call_id, fc.arguments, outcome, output,
                                      time.monotonic() - started))
        await self._progress(batch)

    async def _progress(self, batch: _Batch) -> None:
        """Once the response is done and every call has its output: end the call (end_call /
        transfer) or ask the model to answer."""
        if not batch.ready:
            return
        batch.finished = True
        del self._batches[batch.response_id]
        await self._stop_hold()
        if batch.action is not None and batch.action_call is not None:
            if batch.status != "cancelled":
                self._ending = True
                self.call.spawn(self._end_after_playback(batch.action), "tools-end")
                return
            # The caller talked over the goodbye: the call goes on; tell the model so.
            fc = batch.action_call
            output = error_output("not done: the caller spoke before you finished; the call "
                                  "continues")
            self.call.log.info("%s: not done, the caller interrupted", fc.name)
            await self.call.model.add_tool_result(fc.call_id, output)
        await self.call.request_response("tool results")

    async def _end_after_playback(self, ending: Ending) -> None:
        if not await self.call.wait_played(self._config.goodbye_wait):
            self.call.log.info("the last words did not finish playing within %g s; ending anyway",
                               self._config.goodbye_wait)
        self.call.end(ending)

    # --- hold audio ---

    def _start_hold(self, batch: _Batch) -> None:
        """The response that made the calls is done (its words all sent) and a tool still runs:
        hold audio once the tool has run HOLD_AFTER and those words have played."""
        if not self._config.hold_chunks or self._hold_stop is not None or not batch.started:
            return
        self._hold_stop = stop = asyncio.Event()
        delay = self._config.hold_after - (time.monotonic() - batch.started)
        self.call.spawn(self._hold_when_slow(batch, stop, delay), "tools-hold")

    async def _hold_when_slow(self, batch: _Batch, stop: asyncio.Event, delay: float) -> None:
        """Stopped by setting `stop` (never cancelled before it starts, so no coroutine is left
        un-awaited); it checks `stop` before every send."""
        try:
            if await _stopped(stop, delay) or not await self.call.wait_played(30.0):
                return
            if (stop.is_set() or batch.finished or self._active is not None or self._speaking
                    or self._ending):
                return
            self.call.log.info("tool still running after %g s: hold audio",
                               self._config.hold_after)
            loop = asyncio.get_running_loop()
            start, sent_ms = loop.time(), 0
            for payload, ms in itertools.cycle(self._config.hold_chunks):
                if stop.is_set():
                    return
                if not self._holding:
                    self._holding = True
                    self.call.hold_playback(True)
                await self.call.send_to_caller(tw.media_frame(self.call.stream_sid, payload))
                sent_ms += ms
                if await _stopped(stop, start + (sent_ms - HOLD_AHEAD_MS) / 1000 - loop.time()):
                    return
        finally:
            if self._hold_stop is stop:
                self._hold_stop = None

    async def _stop_hold(self) -> None:
        """Stop the hold audio and clear what Twilio still has of it."""
        stop, self._hold_stop = self._hold_stop, None
        if stop is not None:
            stop.set()
        if self._holding:
            self._holding = False
            await self.call.send_to_caller(tw.clear_frame(self.call.stream_sid))
            self.call.hold_playback(False)


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True if `stop` was set meanwhile (or already)."""
    if stop.is_set() or seconds <= 0:
        return stop.is_set()
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True
