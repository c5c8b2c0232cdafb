"""The call-ended webhook: POST each final record to CALL_WEBHOOK_URL, signed, retried.

Each delivery is its own task, owned here and cancelled at shutdown; nothing waits for it.
The receiver checks `X-Bridge-Signature: sha256=<hex HMAC-SHA256 of the raw body>` with the
shared CALL_WEBHOOK_SECRET (constant-time compare on its side too).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from server import NAME, __version__

log = logging.getLogger("server.records")

SIGNATURE_HEADER = "X-Bridge-Signature"
# Worth another try: the receiver may come back. Any other 4xx is final.
_RETRY_STATUSES = frozenset({408, 425, 429})


def sign(secret: str, body: bytes) -> str:
    """The X-Bridge-Signature value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """What a receiver does (here for tests and as a reference)."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


class CallWebhook:
    def __init__(self, url: str, secret: str | None, http: aiohttp.ClientSession, *,
                 give_up_after: float = 300.0, first_delay: float = 1.0,
                 max_delay: float = 60.0, timeout: float = 10.0) -> None:
        self.url = url
        self._secret = secret
        self._http = http
        self._give_up_after = give_up_after
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def send(self, record: Mapping[str, Any]) -> None:
        """Queue one delivery and return at once (the body is serialized now)."""
        body = orjson.dumps(record)
        call_sid = str(record.get("call_sid") or "")
        task = asyncio.get_running_loop().create_task(self._deliver(body, call_sid),
                                                      name=f"call-webhook {call_sid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, body: bytes, call_sid: str) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": f"{NAME}/{__version__}",
                   "X-Bridge-Call-Sid": call_sid}
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, body)
        deadline = time.monotonic() + self._give_up_after
        delay, attempt = self._first_delay, 0
        while True:
            attempt += 1
            problem = await self._attempt(body, headers)
            if problem is None:
                self.delivered += 1
                log.debug("call webhook delivered for %s (attempt %d)", call_sid, attempt)
                return
            final = problem.startswith("HTTP 4") and not any(
                problem.startswith(f"HTTP {s}") for s in _RETRY_STATUSES)
            wait = delay * random.uniform(0.8, 1.2)
            if final or time.monotonic() + wait > deadline:
                self.failed += 1
                log.warning("call webhook for %s failed after %d attempt(s): %s; giving up",
                            call_sid, attempt, problem)
                return
            log.info("call webhook for %s failed (%s); retrying in %.0f s", call_sid, problem,
                     wait)
            await asyncio.sleep(wait)
            delay = min(delay * 2, self._max_delay)

    async def _attempt(self, body: bytes, headers: dict[str, str]) -> str | None:
        """None on a 2xx, else a short, loggable reason."""
        try:
            async with self._http.post(self.url, data=body, headers=headers,
                                       timeout=self._timeout, allow_redirects=False) as resp:
                await resp.read()
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except TimeoutError:
            return "timed out"
        except aiohttp.ClientError as e:
            return f"{type(e).__name__}"

    async def close(self, grace: float = 2.0) -> None:
        """At shutdown: give deliveries in flight up to `grace` seconds (the calls ended by
        the shutdown were queued just now), then cancel the rest and wait for them to stop."""
        if self._tasks and grace > 0:
            await asyncio.wait(list(self._tasks), timeout=grace)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            log.info("shutting down: %d call webhook delivery(ies) abandoned", len(tasks))
            await asyncio.gather(*tasks, return_exceptions=True)
