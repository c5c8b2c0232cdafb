"""A stream's start: everything between Twilio's WebSocket opening and the relay running.

Twilio's `start` frame (within STREAM_START_TIMEOUT), admission (the stream token, capacity,
one live stream per call), the call's plan (what a handed-over call brings, what the webhook or
the outbound API decided, or its line's from NUMBERS_FILE) and what it resolves to: the model
session's configuration and the greeting. Each way this can fail is an `Ending` (`CallEnds`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, WSMsgType, web

from server.call.ending import CallEnds, EndKind, Refusal, failed, hung_up
from server.call.plan import CallPlan, Resolved
from server.metrics import REFUSED_BAD_TOKEN
from server.models.session import SessionConfig, ToolSpec
from server.settings import ConfigError, Settings
from server.wire import twilio as tw

if TYPE_CHECKING:
    from server.call.call import Call, CallDeps

TEXT = WSMsgType.TEXT
_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
BUILTIN_TOOLS = frozenset({"end_call"})  # offered whatever the plan's tool list says


def bad_input(what: str) -> CallEnds:
    return CallEnds(failed(EndKind.BAD_INPUT, f"bad frame from Twilio: {what}",
                           WSCloseCode.POLICY_VIOLATION, logging.WARNING))


def decode_frame(msg: Any, twilio: web.WebSocketResponse) -> tw.TwilioEvent:
    """One frame from Twilio as a typed event; anything else ends the call (a close is the
    caller hanging up, anything malformed is bad input)."""
    if msg.type is not TEXT:
        if msg.type in _CLOSED:
            raise CallEnds(hung_up(f"Twilio closed the stream (code {twilio.close_code})"))
        if msg.type is WSMsgType.ERROR:
            raise CallEnds(failed(EndKind.BAD_INPUT, f"Twilio socket error: {msg.data}",
                                  WSCloseCode.POLICY_VIOLATION, logging.WARNING))
        raise bad_input(f"{msg.type.name.lower()} frame (Twilio sends only text)")
    try:
        return tw.decode(msg.data)
    except tw.TwilioProtocolError as e:
        raise bad_input(str(e)) from None


async def receive_start(twilio: web.WebSocketResponse, timeout: float) -> tw.Start:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            msg = await twilio.receive(timeout=max(remaining, 0.001))
        except TimeoutError:
            raise CallEnds(failed(EndKind.BAD_INPUT, "no 'start' from Twilio in time",
                                  WSCloseCode.POLICY_VIOLATION, logging.WARNING)) from None
        event = decode_frame(msg, twilio)
        if isinstance(event, tw.Start):
            return event
        if isinstance(event, str):  # a tw.Media payload
            raise bad_input("media before 'start'")
        if isinstance(event, tw.Stop):
            raise CallEnds(hung_up("stream stopped before it started"))


async def admit(call: Call, deps: CallDeps, start: tw.Start) -> None:
    """The stream token (minted for this call, unexpired, single use), capacity and one live
    stream per call; a refused stream touches nothing of the call it names."""
    tokens = deps.tokens
    token = start.parameters.get("token")
    if tokens is not None:
        problem = tokens.verify(token, start.call_sid)
        if problem:
            refuse(call, Refusal(REFUSED_BAD_TOKEN, problem))
    if deps.hooks is not None:
        refusal = await deps.hooks.admit(call, token if tokens is not None else None)
        if refusal is not None:
            refuse(call, refusal)


def refuse(call: Call, refusal: Refusal) -> None:
    call.refusal = refusal
    raise CallEnds(failed(EndKind.REJECTED, f"rejected stream: {refusal.message}",
                          WSCloseCode.POLICY_VIOLATION, logging.WARNING))


async def decide_plan(call: Call, deps: CallDeps, resume: bool) -> Resolved:
    """This call's plan: what a handed-over call brings, what was decided before the stream
    (the webhook, the outbound API), else its line's; applied to the record."""
    hooks = deps.hooks
    plan: CallPlan | None = None
    if resume and hooks is not None:
        context = await hooks.resume(call)
        call.resumed = context is not None
        saved = context.get("plan") if context else None
        if isinstance(saved, dict):
            with contextlib.suppress(ValueError):
                plan = CallPlan.from_dict(saved)
    if plan is None and hooks is not None:
        plan = await hooks.plan(call)
    call.plan = plan or deps.plans.inbound(call.called)
    try:
        resolved = deps.plans.resolve(call.plan)
    except ConfigError as e:  # a plan made elsewhere that this instance cannot follow
        raise CallEnds(failed(EndKind.INTERNAL_ERROR, f"the call's plan: {e}")) from None
    record = call.record
    record.direction = call.plan.direction
    record.metadata = {**record.metadata, **call.plan.metadata}
    record.prompt = resolved.prompt.describe()
    record.model = session_model(deps.settings, resolved)
    return resolved


def session_model(settings: Settings, resolved: Resolved) -> str:
    """The model a plan's session uses, its API's (Realtime's or GPT-Live's); also for a
    session pre-warmed at the webhook."""
    return resolved.model


def values(call: Call) -> dict[str, str]:
    """What a prompt or a greeting may say: the call's numbers and sid, and the plan's
    variables."""
    return plan_values(call.plan, call.caller, call.called, call.call_sid)


def plan_values(plan: CallPlan, caller: str, called: str, call_sid: str) -> dict[str, str]:
    """`values` before the call exists (a session pre-warmed at the webhook)."""
    return {"caller": caller or "unknown", "called": called or "unknown",
            "call_sid": call_sid, **plan.variables}


def session_config(call: Call, resolved: Resolved) -> SessionConfig:
    """The model session's configuration for this call: its plan's model, prompt (rendered),
    voice, and the tools its features offer that the plan allows."""
    offered = [spec for feature in call.features for spec in feature.tools()]
    return build_config(call.plan, resolved, values(call), call.record.model, offered)


def build_config(plan: CallPlan, resolved: Resolved, filled: dict[str, str], model: str,
                 offered: Iterable[ToolSpec]) -> SessionConfig:
    """`session_config` from its parts: the one way a configuration is made, so a session
    pre-warmed at the webhook is configured exactly as the stream's call would be."""
    allowed = plan.tools
    tools = tuple(spec for spec in offered
                  if allowed is None or spec.name in allowed or spec.name in BUILTIN_TOOLS)
    fields = resolved.prompt.session_fields(filled)
    return SessionConfig(model, fields.get("instructions"), resolved.voice, tools,
                         fields.get("prompt"))


def greeting(call: Call, resolved: Resolved | None) -> str | None:
    """The plan's greeting, rendered for this call (None: the caller speaks first)."""
    if resolved is None or resolved.greeting is None:
        return None
    return resolved.greeting.render(values(call))
