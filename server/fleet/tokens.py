"""Per-call stream tokens: proof that a media stream came from a webhook Twilio signed.

The token is an HMAC over the callSid and an expiry, keyed from the Twilio auth token, so any
machine holding the same auth token can check it (webhook and stream may land on different
machines). Single use is enforced per process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

MAX_TOKEN_CHARS = 128  # ours are ~70; anything longer is not one


class StreamTokens:
    def __init__(
        self, auth_token: str, ttl: float, clock: Callable[[], float] = time.time
    ) -> None:
        label = b"phone-bridge stream token v2"
        self._key = hmac.new(auth_token.encode(), label, "sha256").digest()
        self._ttl = ttl
        self._clock = clock
        self._used: dict[str, float] = {}

    def mint(self, call_sid: str) -> str:
        """`<expires>.<nonce>.<mac>`: the nonce makes every token distinct, even two minted for
        the same call in the same second (a call handed over to another instance)."""
        expires = int(self._clock() + self._ttl)
        nonce = secrets.token_urlsafe(6)
        return f"{expires}.{nonce}.{self._mac(call_sid, expires, nonce)}"

    def verify(self, token: str | None, call_sid: str) -> str | None:
        """None when the token was minted for this call and is unexpired; otherwise why not.
        Single use is the shared state's job (`claim_token`), so it holds across a fleet."""
        if not token:
            return "no stream token"
        if len(token) > MAX_TOKEN_CHARS or not token.isascii():
            return "malformed stream token"
        expires_text, nonce, mac = [*token.split(".", 2), "", ""][:3]
        if not (expires_text.isdigit() and len(expires_text) <= 12) or not nonce or not mac:
            return "malformed stream token"
        expires = int(expires_text)
        if not hmac.compare_digest(mac, self._mac(call_sid, expires, nonce)):
            return "stream token does not match this call"
        if expires < self._clock():
            return "stream token expired"
        return None

    @staticmethod
    def expires_at(token: str) -> float:
        """The expiry (epoch seconds) written in a verified token."""
        return float(token.partition(".")[0])

    def check(self, token: str | None, call_sid: str) -> str | None:
        """`verify` plus single use within this process (no shared state)."""
        problem = self.verify(token, call_sid)
        if problem or token is None:
            return problem
        now = self._clock()
        self._forget_expired(now)
        if token in self._used:
            return "stream token already used"
        self._used[token] = self.expires_at(token)
        return None

    def _mac(self, call_sid: str, expires: int, nonce: str) -> str:
        message = f"{call_sid}|{expires}|{nonce}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def _forget_expired(self, now: float) -> None:
        if len(self._used) > 1024:
            self._used = {t: e for t, e in self._used.items() if e >= now}
