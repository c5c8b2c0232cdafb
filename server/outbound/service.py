"""Placing outbound calls and following them to their end: what `POST /calls` and the campaign
scheduler place through, and what Twilio's status and answering-machine callbacks reach.

Placing one call (`place`):
1. the number is checked against the do-not-call list (409) and the plan against this
   instance's prompts (400); a turn is awaited (OUTBOUND_CPS, shared with campaigns);
2. a slot is reserved under a fresh placement id (429 at MAX_CALLS), because Twilio may fetch
   the call's TwiML (`Url` = `/incoming-call?plan=<placement id>`) before the create request
   has answered with the CallSid; the plan is stored under that id;
3. Twilio's REST API places the call (502 with Twilio's code and message when it refuses);
4. slot and plan are kept under the CallSid too (the slot is held while it rings; it ends with
   the stream, or with a busy / no-answer / failed / canceled status), and the call's record
   starts (`queued`).
The TwiML request (`answered`) moves slot and plan to the CallSid whichever came first.

Callbacks (signature-checked by the app, on any instance): `on_status` moves the record through
queued, ringing, in-progress and its end, releases the slot of a call that never connected,
writes the final record of such a call (the call webhook and the metrics count it) and tells the
campaign scheduler; `on_amd` tells the scheduler and delivers the result to the instance holding
the call (the shared state's control channel, as the operator's hang-up is), retried while the
stream is still on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Coroutine, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from server.call.ending import EndKind
from server.call.plan import CallPlan, Plans
from server.call.record import CallRecord, iso, stamp
from server.fleet.state import Expiring
from server.logs import mask_number
from server.metrics import REFUSED_CAPACITY, REFUSED_DRAINING
from server.outbound.campaigns import PlaceDeferred, PlaceFailed, PlaceResult
from server.outbound.numbers import DoNotCall
from server.outbound.pacing import Pacer
from server.outbound.spec import CallRequest
from server.outbound.twilio_rest import CallbackUrls, TwilioError, TwilioRest
from server.prompts import load_named_prompt
from server.settings import ConfigError, Settings

if TYPE_CHECKING:
    from server.fleet.registry import CallRegistry
    from server.fleet.state import SharedState
    from server.metrics import Metrics
    from server.outbound.campaigns import CampaignScheduler
    from server.outbound.store import Campaign, Entry
    from server.records.service import Records

log = logging.getLogger("server.outbound")

STATUSES = frozenset({"queued", "initiated", "ringing", "in-progress", "completed", "busy",
                      "no-answer", "failed", "canceled"})
# Twilio's final statuses of a call that never connected: what the record and metric say.
UNANSWERED: dict[str, tuple[EndKind, str]] = {
    "busy": (EndKind.BUSY, "the line was busy"),
    "no-answer": (EndKind.NO_ANSWER, "nobody answered"),
    "failed": (EndKind.DIAL_FAILED, "Twilio could not place the call"),
    "canceled": (EndKind.CANCELED, "hung up while it was still ringing"),
}
# Before the answer: each status a snapshot that a later one (and the stream's record) replaces
RANK = {"queued": 1, "initiated": 2, "ringing": 3, "in-progress": 4}
ANSWERED_BY = frozenset({"human", "machine_start", "machine_end_beep", "machine_end_silence",
                         "machine_end_other", "fax", "unknown"})
RING_MARGIN_S = 120.0  # a placed call's slot: its ring time plus this (queueing at Twilio)
PLAN_KEEP_S = 900.0  # its plan, beyond that: until the stream has read it
DELIVER_EVERY = 0.2  # seconds between tries to hand an AMD result to the call's instance
NO_STREAM_AFTER = 5.0  # a completed call without a stream's record by then never had one
DEFERRED_RETRY_S = 5.0  # a campaign call not placed for a reason of ours is tried again then


class PlaceRefused(Exception):
    """The call was not placed: `status` is the HTTP answer (400, 409, 429, 502, 503)."""

    def __init__(self, status: int, message: str, twilio: TwilioError | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.twilio = twilio

    def to_dict(self) -> dict[str, Any]:
        return self.twilio.to_dict() if self.twilio is not None else {"error": self.message}


def unavailable_reason(settings: Settings) -> str | None:
    """Why this instance cannot place calls (the variables to set), or None."""
    missing = [name for name, value in (("TWILIO_ACCOUNT_SID", settings.twilio_account_sid),
                                        ("TWILIO_AUTH_TOKEN", settings.twilio_auth_token),
                                        ("PUBLIC_URL", settings.public_url)) if not value]
    if missing:
        return f"outbound calling is not configured: set {', '.join(missing)}"
    return None


def _event_time(fields: Mapping[str, str]) -> datetime:
    """When Twilio says the event happened (its `Timestamp`), else now."""
    raw = fields.get("Timestamp")
    if raw:
        try:
            moment = parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            moment = None
        if moment is not None and moment.tzinfo is not None:
            return moment.astimezone(UTC)
    return datetime.now(UTC)


class Outbound:
    """Outbound calling for one app instance; `close()` ends the work it owns."""

    def __init__(self, settings: Settings, *, rest: TwilioRest | None, state: SharedState,
                 registry: CallRegistry, plans: Plans, records: Records | None,
                 metrics: Metrics | None, do_not_call: DoNotCall, pacer: Pacer) -> None:
        self.settings = settings
        self.rest = rest
        self.state = state
        self.registry = registry
        self.plans = plans
        self.records = records
        self.metrics = metrics
        self.do_not_call = do_not_call
        self.pacer = pacer
        self.scheduler: CampaignScheduler | None = None  # set once campaigns run here
        self.unavailable = unavailable_reason(settings) or (
            None if rest is not None else "outbound calling is not configured")
        self._ended: Expiring[bool] = Expiring(limit=10_000)  # final statuses handled here
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: set[asyncio.Task[None]] = set()
        self._closing = False
        self.placed = 0  # calls this instance placed, since it started

    # --- placing ---

    def check_prompt(self, prompt_id: str, version: str | None) -> str | None:
        """Why a prompt named by a request cannot be used, or None."""
        try:
            load_named_prompt(self.settings.prompts_dir, prompt_id, version)
        except ConfigError as e:
            return str(e)
        return None

    async def place(self, request: CallRequest, *, paced: bool = True,
                    operator: str = "") -> str:
        """Place one call; its CallSid (status `queued`). PlaceRefused says why not."""
        rest, public = self.rest, self.settings.public_url
        if rest is None or public is None or self.unavailable:
            raise PlaceRefused(503, self.unavailable or "outbound calling is not configured")
        await self.do_not_call.refresh()
        if request.to in self.do_not_call:
            raise PlaceRefused(409, "the number is on the do-not-call list")
        from_ = request.from_ or self.settings.twilio_from_number
        if from_ is None:
            raise PlaceRefused(400, "from is required (or set TWILIO_FROM_NUMBER)")
        plan = dataclasses.replace(self.plans.default, **request.plan_fields())
        try:
            self.plans.resolve(plan)
        except ConfigError as e:
            raise PlaceRefused(400, f"the call's plan: {e}") from None
        if paced:
            await self.pacer.wait_turn()
        placement = "pl_" + uuid4().hex
        hold = request.timeout_s + RING_MARGIN_S
        if not await self.registry.reserve(placement, hold):
            draining = self.registry.draining
            if self.metrics is not None:
                self.metrics.call_refused(REFUSED_DRAINING if draining else REFUSED_CAPACITY)
            raise PlaceRefused(503, "this instance is shutting down") if draining else \
                PlaceRefused(429, f"all lines are busy (MAX_CALLS={self.settings.max_calls})")
        stored = {**plan.to_dict(), "outbound": {
            "to": request.to, "from": from_, "placed_at": iso(datetime.now(UTC)),
            "timeout_s": request.timeout_s}}
        try:
            await self.state.put_plan(placement, stored, hold + PLAN_KEEP_S)
            placed = await rest.place_call(to=request.to, from_=from_,
                                           urls=CallbackUrls.for_plan(public, placement),
                                           ring_timeout=request.timeout_s)
        except TwilioError as e:
            await self.state.release(placement)
            raise PlaceRefused(502, e.message, e) from None
        except BaseException:
            await self.state.release(placement)
            raise
        sid = placed.sid
        self.placed += 1
        # The slot and the plan under the CallSid (the TwiML request may have done it already)
        await self.state.reserve(sid, 0, hold)
        await self.state.release(placement)
        await self.state.put_plan(sid, stored, hold + PLAN_KEEP_S)
        log.info("placed call %s to %s from %s%s", sid,
                 mask_number(request.to, self.settings.log_pii),
                 mask_number(from_, self.settings.log_pii),
                 f" for {operator}" if operator else "")
        self._spawn(self._progress(sid, "queued", stored, {}), "outbound-record")
        return sid

    async def place_for_campaign(self, campaign: Campaign, entry: Entry) -> PlaceResult:
        """The campaign scheduler's `place`: the same placement as POST /calls (its pacer has
        given the turn already)."""
        spec = campaign.spec
        request = CallRequest(
            to=entry.to, from_=spec.from_, prompt_id=spec.prompt_id,
            prompt_version=spec.prompt_version, variables=dict(entry.variables),
            greeting=spec.greeting, voicemail=spec.voicemail,
            metadata={**entry.metadata, "campaign": {
                "id": campaign.id, "name": spec.name, "entry": entry.seq,
                "attempt": entry.attempt}},
            timeout_s=spec.timeout_s, model_api=spec.model_api)
        try:
            return await self.place(request, paced=False, operator=f"campaign {campaign.id}")
        except PlaceRefused as e:
            if e.status == 429:  # at MAX_CALLS: in a while
                return PlaceDeferred(e.message, DEFERRED_RETRY_S)
            if e.status == 503:  # this instance is stopping: another may take it now
                return PlaceDeferred(e.message, 0.0)
            code = f" (Twilio code {e.twilio.code})" if e.twilio and e.twilio.code else ""
            return PlaceFailed(f"{e.message}{code}")

    async def answered(self, call_sid: str, placement: str) -> CallPlan | None:
        """The TwiML request of a call placed here (`/incoming-call?plan=<placement>`): its
        slot (no limit: it was counted when placed) and plan under the CallSid, whether the
        create request has answered yet or not; the plan, or None when the placement is
        unknown (expired, or not one of ours)."""
        stored = await self.state.get_plan(placement)
        if stored is None or not call_sid:
            return None
        try:
            plan = CallPlan.from_dict(stored)
        except ValueError as e:
            log.warning("call %s: its stored plan is not one: %s", call_sid, e)
            return None
        await self.state.reserve(call_sid, 0, self.settings.stream_token_ttl)
        await self.state.release(placement)
        await self.state.put_plan(call_sid, stored, PLAN_KEEP_S)
        return plan

    # --- Twilio's callbacks ---

    async def on_status(self, fields: Mapping[str, str]) -> None:
        """A status callback: CallSid and CallStatus (plus From, To, Timestamp…)."""
        sid, status = fields.get("CallSid", ""), fields.get("CallStatus", "")
        if not sid.startswith("CA") or len(sid) > 64 or status not in STATUSES:
            log.warning("status callback ignored: CallSid %r, CallStatus %r", sid[:40],
                        status[:20])
            return
        final = status == "completed" or status in UNANSWERED
        if final:
            if sid in self._ended:
                return  # Twilio repeats a callback it thinks failed
            self._ended.put(sid, True, PLAN_KEEP_S)
            if status in UNANSWERED or self.registry.find(sid) is None:
                await self.state.release(sid)  # its slot: it never connected, or is over
            log.info("call %s ended: %s", sid, status)
        if self.scheduler is not None and final:
            try:
                await self.scheduler.outcome(sid, status)
            except Exception as e:  # the campaign store is down: its lease settles it
                log.warning("campaign outcome of %s not recorded: %s: %s", sid,
                            type(e).__name__, e)
        stored = await self.state.get_plan(sid)
        if status in UNANSWERED:
            self._unanswered(sid, status, stored, fields)
        elif status == "completed":
            if self.registry.find(sid) is None:
                self._spawn(self._completed(sid, stored, fields), "outbound-completed",
                            finish=False)
        elif self.registry.find(sid) is None:  # before the stream: its record does the rest
            await self._progress(sid, "queued" if status == "initiated" else status, stored,
                                 fields)

    async def on_amd(self, fields: Mapping[str, str]) -> None:
        """The asynchronous answering-machine result: CallSid and AnsweredBy."""
        sid, answered_by = fields.get("CallSid", ""), fields.get("AnsweredBy", "")
        if not sid.startswith("CA") or len(sid) > 64 or answered_by not in ANSWERED_BY:
            log.warning("AMD callback ignored: CallSid %r, AnsweredBy %r", sid[:40],
                        answered_by[:24])
            return
        log.info("call %s answered by %s (after %s ms)", sid, answered_by,
                 fields.get("MachineDetectionDuration", "?"))
        if self.scheduler is not None:
            try:
                await self.scheduler.answered_by(sid, answered_by)
            except Exception as e:
                log.warning("campaign: AMD result of %s not recorded: %s: %s", sid,
                            type(e).__name__, e)
        self._spawn(self._deliver(sid, {"action": "amd", "answered_by": answered_by}),
                    "outbound-amd", finish=False)

    def hang_up_later(self, call_sid: str) -> None:
        """Ask Twilio to end the call (`Status=completed`), in the background."""
        if self.rest is not None and not self._closing:
            self._spawn(self._hang_up(call_sid), "outbound-hang-up")

    async def close(self) -> None:
        """Stop: hang-ups and record writes under way are given a moment; waiting work
        (deliveries to a stream still to come, checks on calls that ended) is dropped."""
        self._closing = True
        for task in self._waiting:
            task.cancel()
        tasks = self._tasks | self._waiting
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- the work behind them ---

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str, finish: bool = True) -> None:
        """A task this service owns; `finish`: given a moment at close, else cancelled."""
        if self._closing:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(self._guarded(coro, name), name=name)
        owner = self._tasks if finish else self._waiting
        owner.add(task)
        task.add_done_callback(owner.discard)

    @staticmethod
    async def _guarded(coro: Coroutine[Any, Any, None], name: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("outbound: %s failed", name)

    async def _deliver(self, call_sid: str, action: dict[str, Any]) -> None:
        """To the instance holding the call; the stream may still be on its way, so tried
        again until STREAM_START_TIMEOUT (the call then acts on it as it starts)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.stream_start_timeout + 2.0
        while not await self.state.publish(call_sid, action):
            if loop.time() >= deadline or self._closing:
                log.info("AMD result for %s reached no live call (it ended, or never "
                         "streamed)", call_sid)
                return
            await asyncio.sleep(DELIVER_EVERY)

    async def _hang_up(self, call_sid: str) -> None:
        assert self.rest is not None
        try:
            await self.rest.hang_up(call_sid)
        except TwilioError as e:
            log.warning("hanging up %s through the REST API failed: %s", call_sid, e)

    def _record(self, call_sid: str, status: str, stored: Mapping[str, Any] | None,
                fields: Mapping[str, str]) -> CallRecord:
        """A record of a call from what Twilio said and what was stored when it was placed."""
        placed = (stored or {}).get("outbound")
        placed = placed if isinstance(placed, dict) else {}
        record = CallRecord(
            call_sid=call_sid, direction="outbound", status=status,
            caller=fields.get("From") or str(placed.get("from") or ""),
            called=fields.get("To") or str(placed.get("to") or ""),
            model=self.settings.openai_model, prompt=self.plans.default_prompt.describe())
        if stored is not None:
            try:
                plan = CallPlan.from_dict(stored)
            except ValueError:
                plan = CallPlan()
            record.metadata = dict(plan.metadata)
            if plan.prompt_id is not None:
                try:
                    record.prompt = self.plans.prompt(plan.prompt_id, plan.prompt_version,
                                                      plan.variables).describe()
                except ConfigError:
                    record.prompt = plan.prompt_id
        started = placed.get("placed_at")
        if isinstance(started, str):
            with contextlib.suppress(ValueError):
                record.started_at = datetime.fromisoformat(started.replace("Z", "+00:00"))
        return record

    async def _progress(self, call_sid: str, status: str, stored: Mapping[str, Any] | None,
                        fields: Mapping[str, str]) -> None:
        """Queued, ringing, in-progress: a snapshot dated when Twilio says it happened (plus
        the status's rank, so their order holds), which the stream's own record replaces."""
        records = self.records
        if records is None or not records.enabled:
            return
        snapshot = self._record(call_sid, status, stored, fields).to_dict()
        # Dated to the second (as Twilio's Timestamp is), plus the status's rank: so queued
        # (placed here) < ringing < in-progress whatever order the writes land in, and the
        # stream's own record (dated to the microsecond, later) replaces them all.
        at = (_event_time(fields) if fields else datetime.now(UTC)).replace(microsecond=0)
        snapshot["updated_at"] = stamp(at + timedelta(microseconds=RANK.get(status, 0)))
        snapshot["ended_at"] = None
        try:
            await records.store.save(snapshot)
        except Exception as e:
            log.warning("record of %s (%s) not saved: %s: %s", call_sid, status,
                        type(e).__name__, e)

    def _unanswered(self, call_sid: str, status: str, stored: Mapping[str, Any] | None,
                    fields: Mapping[str, str]) -> None:
        kind, why = UNANSWERED[status]
        self._final(self._record(call_sid, status, stored, fields), kind, why, fields)

    async def _completed(self, call_sid: str, stored: Mapping[str, Any] | None,
                         fields: Mapping[str, str]) -> None:
        """An answered call ended while no stream of it is live here: the stream's record is
        the call's (wherever it ran); only a call that never streamed gets one from here."""
        records = self.records
        if records is None or not records.enabled:
            return
        await asyncio.sleep(NO_STREAM_AFTER)
        try:
            saved = await records.store.get(call_sid)
        except Exception as e:
            log.warning("record of %s not checked: %s: %s", call_sid, type(e).__name__, e)
            return
        if saved is not None and (saved.get("stream_sid") or saved.get("ended_at")):
            return
        self._final(self._record(call_sid, "completed", stored, fields), EndKind.NO_STREAM,
                    "answered, but no media stream reached the bridge", fields)

    def _final(self, record: CallRecord, kind: EndKind, why: str,
               fields: Mapping[str, str]) -> None:
        record.ended_at = max(_event_time(fields), record.started_at)
        record.end_kind, record.end_reason = str(kind), why
        log.info("call %s to %s did not connect: %s", record.call_sid,
                 mask_number(record.called, self.settings.log_pii), why)
        if self.records is not None and self.records.enabled:
            self.records.writer.finish(record)  # saved, and the call webhook sent
        if self.metrics is not None:
            self.metrics.call_ended(record, str(kind))
