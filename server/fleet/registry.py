"""Live calls: reserved at the webhook, claimed at the stream, counted, drained and closed.

The registry is the app's `CallHooks`: it admits a stream (single-use token, capacity, one live
stream per call), keeps calls' plans, and writes each call's decision for the `<Connect action>`
request into the shared state, which may be read by another instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode

from server.call.ending import Ending, EndKind, Refusal
from server.call.events import MachineDetection
from server.call.plan import CallPlan
from server.call.record import iso, utc_now
from server.fleet.state import SharedState
from server.fleet.tokens import StreamTokens
from server.metrics import REFUSED_BAD_TOKEN, REFUSED_CAPACITY, REFUSED_DUPLICATE
from server.wire import twilio as tw

if TYPE_CHECKING:
    from server.call.call import Call
    from server.settings import Settings

log = logging.getLogger("server.fleet")

DECISION_TTL = 120.0  # Twilio asks for the action within seconds of the stream closing
CONTEXT_TTL = 300.0  # a handed-over call's conversation, until the new stream takes it
PLAN_TTL = 600.0  # a call's plan, from the webhook (or placing the call) to its stream
_CLOSE_GRACE = 2.0  # for live calls' sockets to close once ended
ControlAction = Callable[[str, "Call | None", dict[str, Any]], Awaitable[None]]
"""Handles a control action by name: (call_sid, the live call here or None, the action)."""
ACTION_WINDOW = 30.0  # an ended call's decision not fetched by then never will be


class CallRegistry:
    def __init__(self, settings: Settings, state: SharedState) -> None:
        self._settings = settings
        self.state = state
        self.calls: set[Call] = set()
        # Streams whose token was good: only they may free their call_sid's slot at the end.
        self._admitted: set[Call] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        # What a call's shutdown ending should be (drain: the fallback; handover: reconnect).
        self.shutdown_ending: Callable[[Call], Awaitable[Ending]] | None = None
        # Calls that ended with a decision Twilio will ask for, and when (monotonic): a stopping
        # process waits for those to be fetched. Ordered by time; older than ACTION_WINDOW
        # ones are dropped (Twilio asks within seconds, or never: the caller is gone).
        self._awaiting: dict[str, float] = {}
        # Control actions by name that others handle (the console's operator actions).
        self.controls: dict[str, ControlAction] = {}
        # Handed-over calls' context, from the handover to the end of their stream.
        self._handing_over: dict[Call, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.calls)

    def find(self, call_sid: str) -> Call | None:
        for call in self.calls:
            if call.call_sid == call_sid:
                return call
        return None

    # --- the webhook ---

    async def reserve(self, call_sid: str, ttl: float | None = None) -> bool:
        """Hold a slot for a call about to stream; False at MAX_CALLS (fleet-wide with Redis).
        The reservation lapses if no stream claims it within `ttl` (default: the stream
        token's lifetime; an outbound call's covers its ringing)."""
        if self.draining:
            return False
        if ttl is None:
            ttl = self._settings.stream_token_ttl
        return await self.state.reserve(call_sid, self._settings.max_calls, ttl)

    # --- CallHooks ---

    def add(self, call: Call) -> None:
        self.calls.add(call)
        self._idle.clear()

    def discard(self, call: Call) -> None:
        # Not from _admitted: the call's clean-up (shielded) may still be on its way to `ended`
        # when a cancelled handler gets here, and `ended` must know the call was admitted.
        self.calls.discard(call)
        if not self.calls:
            self._idle.set()

    async def admit(self, call: Call, token: str | None) -> Refusal | None:
        """Claim the stream token (single use, fleet-wide), the call's slot (MAX_CALLS, also
        when webhooks are not authenticated) and the call itself (one live stream per call).
        Nothing of the call is touched when the stream is refused."""
        if token is not None and not await self.state.claim_token(
                token, StreamTokens.expires_at(token)):
            return Refusal(REFUSED_BAD_TOKEN, "stream token already used")
        s = self._settings
        # A webhook reserved the slot already (then this counts nothing twice); a stream that
        # no webhook announced (no TWILIO_AUTH_TOKEN) must find a free slot here.
        if not await self.state.reserve(call.call_sid, s.max_calls, s.stream_token_ttl):
            return Refusal(REFUSED_CAPACITY, f"at MAX_CALLS={s.max_calls}")
        if not await self.state.claim(call.call_sid):
            return Refusal(REFUSED_DUPLICATE, "another stream is live for this call")
        self._admitted.add(call)
        return None

    async def resume(self, call: Call) -> dict[str, Any] | None:
        context = await self.state.take_context(call.call_sid)
        if context is None:
            call.log.warning("a handed-over stream has no saved context: starting afresh")
            return None
        saved = context.get("record")
        if isinstance(saved, dict):
            call.record.restore(saved)
        seq = context.get("events_seq")
        if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
            call.events.carry_on(seq, (utc_now() - call.record.started_at).total_seconds())
        call.log.info("resuming a handed-over call (%d timeline entries)",
                      len(call.record.timeline))
        return context

    async def plan(self, call: Call) -> CallPlan | None:
        """The plan the webhook (or the outbound API) decided for this call, if any."""
        saved = await self.state.get_plan(call.call_sid)
        if saved is None:
            return None
        try:
            return CallPlan.from_dict(saved)
        except ValueError as e:
            call.log.warning("ignoring the call's saved plan: %s", e)
            return None

    async def decide(self, call_sid: str, plan: CallPlan, ttl: float = PLAN_TTL) -> None:
        """Keep a call's plan where the instance that takes its stream can read it."""
        await self.state.put_plan(call_sid, plan.to_dict(), ttl)

    async def hand_over(self, call: Call) -> Ending:
        """SHUTDOWN_MODE=handover: save the conversation where any instance can read it and end
        the stream with a "reconnect" decision: Twilio's <Connect action> then opens a new
        stream, which the load balancer sends to a live instance."""
        reason = "handed over to another instance"
        record = call.record.to_dict()
        if record["sessions"]:
            record["sessions"] = [*record["sessions"][:-1], {
                **record["sessions"][-1], "ended_at": iso(utc_now()), "ended_because": reason}]
        # Written when the stream has closed (`ended`), with the last event's number.
        self._handing_over[call] = {"record": record, "plan": call.plan.to_dict()}
        # The new stream's slot, held from now: the old stream's release must not let another
        # caller take it in between (no limit check: the call holds a slot already).
        await self.state.reserve(call.call_sid, 0, CONTEXT_TTL)
        return Ending(EndKind.HANDOVER, reason, tw.Decision("reconnect"))

    async def ended(self, call: Call, ending: Ending) -> None:
        context = self._handing_over.pop(call, None)
        admitted = call in self._admitted
        self._admitted.discard(call)
        if not admitted:
            # A refused stream (forged, replayed or expired token) may carry a live call's sid:
            # it must not free that call's slot, write its decision or touch its record.
            return
        if context is not None and ending.kind == EndKind.HANDOVER:
            context["events_seq"] = call.events.seq
            await self.state.put_context(call.call_sid, context, CONTEXT_TTL)
        decision = ending.decision
        if decision is None:
            decision = tw.say(self._settings.fallback_message)
        if ending.kind != EndKind.CALLER_HUNG_UP:  # Twilio asks what next: wait for it at exit
            self._expect_action(call.call_sid)
        # Released before the decision is readable: Twilio opens a handover's new stream only
        # after reading it, and that stream must not look like a duplicate.
        await self.state.release(call.call_sid)
        await self.state.put_decision(call.call_sid, decision.to_dict(), DECISION_TTL)

    async def on_control(self, call_sid: str, action: dict[str, Any]) -> None:
        """An action published for a call this instance holds (admin hang-up, an operator's
        action from the console on any instance)."""
        call = self.find(call_sid)
        handler = self.controls.get(str(action.get("action")))
        if handler is not None:
            await handler(call_sid, call, action)
            return
        if call is None:
            log.warning("control %r for %s: no such call here", action.get("action"), call_sid)
            return
        if action.get("action") == "hangup":
            call.log.info("hanging up on an operator's request")
            call.end(Ending(EndKind.ADMIN_HUNG_UP, "an operator hung up the call", tw.HANGUP))
        elif action.get("action") == "amd" and isinstance(action.get("answered_by"), str):
            answered_by = str(action["answered_by"])[:32]  # outbound: answering-machine result
            if call.record.answered_by is None:
                call.record.answered_by = answered_by
                call.record.touch()
                call.publish(MachineDetection(answered_by))
        else:
            call.log.warning("ignored unknown control action %r", action.get("action"))

    # --- shutdown ---

    async def finish(self, grace: float, interrupt: asyncio.Event) -> None:
        """End every live call (the fallback, or a handover) and wait until Twilio has fetched
        each ended call's decision, or `grace` seconds after the last call ended. The listener
        stays open meanwhile, so `<Connect action>` requests are still answered."""
        for _ in range(3):  # handed-over streams may land here again while we wait
            await self.close_all(_CLOSE_GRACE)
            await self.wait_actions(grace, interrupt)
            if not self.calls or interrupt.is_set():
                return

    def _expect_action(self, call_sid: str) -> None:
        now = time.monotonic()
        awaiting = self._awaiting
        awaiting.pop(call_sid, None)
        awaiting[call_sid] = now
        while awaiting:
            oldest = next(iter(awaiting))
            if now - awaiting[oldest] < ACTION_WINDOW:
                break
            del awaiting[oldest]

    def action_fetched(self, call_sid: str) -> None:
        """This instance answered the call's `<Connect action>`."""
        self._awaiting.pop(call_sid, None)

    async def wait_actions(self, grace: float, interrupt: asyncio.Event) -> None:
        """Until every recently ended call's decision was fetched (here or on another instance)
        or `grace` seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._awaiting:
            log.info("waiting up to %g s for Twilio to ask what next for %d ended call(s)",
                     grace, len(self._awaiting))
        while self._awaiting and not interrupt.is_set():
            for call_sid in list(self._awaiting):
                if await self.state.fetched(call_sid):
                    self._awaiting.pop(call_sid, None)
            remaining = deadline - loop.time()
            if not self._awaiting or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.05, remaining)):
                    await interrupt.wait()
        if self._awaiting:
            log.warning("exiting with %d call decision(s) not fetched by Twilio",
                        len(self._awaiting))

    async def wait_idle(self, seconds: float, interrupt: asyncio.Event) -> None:
        """Let live calls finish on their own, for up to `seconds` or until `interrupt`."""
        if not self.calls or seconds <= 0:
            return
        log.info("shutting down: waiting up to %g s for %d call(s) to end", seconds,
                 len(self.calls))
        waiters = [asyncio.ensure_future(self._idle.wait()),
                   asyncio.ensure_future(interrupt.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def close_all(self, grace: float) -> None:
        """End every live call (GOING_AWAY and the fallback, or a handover) and wait for them."""
        if not self.calls:
            return
        log.info("shutting down: ending %d call(s)", len(self.calls))
        for call in list(self.calls):
            ending = None
            if self.shutdown_ending is not None:
                try:
                    ending = await self.shutdown_ending(call)
                except Exception:
                    log.exception("preparing the handover of %s failed", call.call_sid)
            call.shutdown(ending or Ending(EndKind.SHUTDOWN, "server shutting down", None,
                                           WSCloseCode.GOING_AWAY))
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            log.warning("%d call(s) did not end within %g s", len(self.calls), grace)
