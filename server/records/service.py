"""`Records`: the one app-wide object behind call records (store, writer, webhook, retention,
prices, recorder), built from Settings and wired into the app by a few lines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from server.call.events import CallEnded, CallEvent, CallStarted
from server.call.features.recording import Recorder
from server.console.auth import operators_for
from server.records import api, retention, spool
from server.records.pricing import PriceTable
from server.records.store import NullStore, RecordStore, StoreError, open_store
from server.records.webhook import CallWebhook
from server.records.writer import RecordWriter
from server.settings import ConfigError
from server.workers import current_worker

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    import aiohttp
    from aiohttp import web

    from server.call.call import Call
    from server.settings import Settings

log = logging.getLogger("server.records")


class Records:
    def __init__(self, settings: Settings, *, prices: PriceTable | None = None,
                 prices_path: Path | None = None, save_interval: float = 5.0) -> None:
        """Sync, for create_app: a bad DATABASE_URL is a ConfigError here, before serving."""
        self.settings = settings
        try:
            self.store: RecordStore = open_store(settings.database_url)
        except StoreError as e:
            raise ConfigError("DATABASE_URL", str(e)) from None
        self.enabled = not isinstance(self.store, NullStore)  # DATABASE_URL=off: False
        self.prices = prices if prices is not None else PriceTable.load(
            prices_path or settings.prices_file)
        self.recorder = Recorder(settings.recordings_dir) if settings.record_calls else None
        self.webhook: CallWebhook | None = None
        self.writer = RecordWriter(self.store, interval=save_interval,
                                   on_final=self._call_ended,
                                   pending_max=settings.records_pending_max,
                                   spool_path=settings.records_spool if self.enabled else None,
                                   worker=current_worker())
        self._retention: asyncio.Task[None] | None = None

    async def open(self, http: aiohttp.ClientSession) -> None:
        """Connect and migrate the store, start the writer, retention and the webhook sender.
        Raises StoreError when a SQLite file cannot be opened (the caller logs it and exits);
        a PostgreSQL server that does not answer is retried in the background instead."""
        s = self.settings
        try:
            await self.store.open()
            log.info("call records in %s", self.store.description)
        except StoreError as e:
            if not self.store.reconnects:
                raise
            # A database server that is down now may come back: calls go on, records are
            # kept in memory and their writes retried; /readyz says 503 meanwhile.
            log.error("records database unavailable (%s): serving anyway, saving records "
                      "once it answers", e)
        if self.writer.spool_path is not None:
            own = spool.own_spool(self.writer.spool_path, current_worker())
            problem = spool.unwritable(own)
            if problem:
                log.warning("RECORDS_SPOOL %s cannot be written (%s): records still unsaved at "
                            "shutdown (records store down) would be lost; point RECORDS_SPOOL "
                            "at a writable directory", own, problem)
            await self.writer.load_spool()
        self.writer.start()
        if s.call_webhook_url:
            self.webhook = CallWebhook(s.call_webhook_url, s.call_webhook_secret, http)
            if not s.call_webhook_secret:
                log.warning("CALL_WEBHOOK_URL is set without CALL_WEBHOOK_SECRET: call "
                            "webhooks are sent unsigned")
        if s.retention_days:
            self._retention = asyncio.get_running_loop().create_task(
                retention.run(self.store, s.retention_days,
                              s.recordings_dir if s.record_calls else None),
                name="records retention")
        if self.recorder is not None:
            log.info("recording calls to %s", self.recorder.directory.resolve())

    async def close(self) -> None:
        """Shutdown, after the calls have ended: write every record (live ones too), let the
        recordings finish, give webhooks a moment, close the store."""
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
            self._retention = None
        if self.recorder is not None:
            await self.recorder.close()
        await self.writer.close()
        if self.webhook is not None:
            await self.webhook.close()
        await self.store.close()

    def _call_ended(self, snapshot: Mapping[str, Any]) -> None:
        if self.webhook is not None:
            self.webhook.send(snapshot)

    @property
    def active_recorder(self) -> Recorder | None:
        """The recorder when calls are recorded and records kept (DATABASE_URL=off: never)."""
        return self.recorder if self.enabled else None

    def on_call_event(self, call: Call, event: CallEvent) -> None:
        """The app's lossless listener on every call: a started call's record is saved as it
        changes, an ended one's at once (a refused stream keeps nothing)."""
        if not self.enabled:
            return
        if isinstance(event, CallStarted):
            self.writer.track(call.record)
        elif isinstance(event, CallEnded) and event.refused is None:
            self.writer.finish(call.record)

    def add_routes(self, app: web.Application) -> None:
        """GET /calls..., /stats behind the operators' tokens (off, with a log line, when
        neither ADMIN_TOKEN nor OPERATOR_TOKENS is set)."""
        api.add_routes(app, lambda: self.store, operators_for(app, self.settings))
