"""Twilio's REST API (2010-04-01) for outbound calls: place a call, hang up, redirect.

Why plain aiohttp and not the `twilio` package's `AsyncTwilioHttpClient`: that client builds its
own ClientSession (one more pool to own and close), ignores its constructor's timeout, wraps
retries through aiohttp-retry (a create retried after a timeout can place the same call twice),
and its base URL is Twilio's own domain. A form POST on the app's shared ClientSession, aimed at
TWILIO_API_URL, serves Twilio, Twilio-compatible providers and the tests' fake alike, with a real
bound on every request (`ClientTimeout(total=…)`) and no second connection pool.

Wire details, per Twilio's Call resource: HTTP basic auth (account SID, auth token); form
fields; `StatusCallbackEvent` sent as one repeated field per event ("specify each one in a
separate status_callback_event parameter", as the resource's reference says and as twilio-python
sends a list), which Twilio-compatible providers accept too. An error answer is JSON with `code`,
`message`, `more_info` and `status`; it becomes a `TwilioError`.

Nothing here logs the auth token or a full number (`mask_number`); errors carry Twilio's own
code and message, which never contain the token.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import orjson

from server.logs import mask_number
from server.settings import ConfigError, Settings

log = logging.getLogger("server.outbound")

API_VERSION = "2010-04-01"
DEFAULT_TIMEOUT = 10.0  # seconds for one request, connect to last byte
STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
AMD_DETECT_MESSAGE_END = "DetectMessageEnd"
RING_TIMEOUT_DEFAULT = 30  # Twilio's default ring time
RING_TIMEOUT_MAX = 600  # Twilio's upper bound for `Timeout`
ALREADY_OVER = frozenset({20404, 21220})  # no such call / call not in progress


class TwilioError(Exception):
    """Twilio refused a request, or did not answer in time.

    `status`: the HTTP status (None: no answer: timeout or connection failure); `code`:
    Twilio's error code (21211 invalid To, 20003 bad credentials, 20429 too many requests…) or
    None; `message`: Twilio's message, or what went wrong. Safe to log and to show an operator."""

    def __init__(self, status: int | None, code: int | None, message: str,
                 more_info: str | None = None) -> None:
        where = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"Twilio {where}" + (f" (code {code})" if code is not None else "")
                         + f": {message}")
        self.status = status
        self.code = code
        self.message = message
        self.more_info = more_info

    def to_dict(self) -> dict[str, Any]:
        """For a 502 answer: `{"error": …, "twilio_status": …, "twilio_code": …}`."""
        return {"error": self.message, "twilio_status": self.status, "twilio_code": self.code}


@dataclass(frozen=True)
class CallbackUrls:
    """Where Twilio reaches us about one outbound call (absolute, public URLs)."""

    twiml: str  # /incoming-call?plan=<id>: fetched when the callee answers
    status: str  # /call-status
    amd: str  # /amd-status

    @classmethod
    def for_plan(cls, public_url: str, plan_id: str, *, twiml_path: str = "/incoming-call",
                 status_path: str = "/call-status", amd_path: str = "/amd-status",
                 ) -> CallbackUrls:
        """The plan's id rides on the TwiML URL: Twilio may fetch it before the create request
        has returned the CallSid, so the plan cannot be looked up by CallSid alone."""
        base = public_url.rstrip("/")
        return cls(f"{base}{twiml_path}?{urlencode({'plan': plan_id})}",
                   f"{base}{status_path}", f"{base}{amd_path}")


@dataclass(frozen=True)
class PlacedCall:
    sid: str  # CA…
    status: str  # "queued" from Twilio


class TwilioRest:
    """The three requests outbound calling needs, on a ClientSession the caller owns."""

    def __init__(self, http: aiohttp.ClientSession, *, account_sid: str, auth_token: str,
                 api_url: str = "https://api.twilio.com",
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        if not account_sid or not auth_token:
            raise ValueError("an account SID and an auth token are required")
        self._http = http
        self._headers = {"Authorization": aiohttp.encode_basic_auth(account_sid, auth_token)}
        self._calls = (f"{api_url.rstrip('/')}/{API_VERSION}/Accounts/"
                       f"{quote(account_sid, safe='')}/Calls")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.account_sid = account_sid

    def __repr__(self) -> str:  # never the token (it is inside the Authorization header)
        return f"TwilioRest({self._calls!r})"

    @classmethod
    def from_settings(cls, settings: Settings, http: aiohttp.ClientSession,
                      timeout: float = DEFAULT_TIMEOUT) -> TwilioRest:
        """ConfigError naming the missing variable when outbound calling is not configured."""
        if not settings.twilio_account_sid:
            raise ConfigError("TWILIO_ACCOUNT_SID", "is required to place outbound calls")
        if not settings.twilio_auth_token:
            raise ConfigError("TWILIO_AUTH_TOKEN", "is required to place outbound calls")
        return cls(http, account_sid=settings.twilio_account_sid,
                   auth_token=settings.twilio_auth_token, api_url=settings.twilio_api_url,
                   timeout=timeout)

    async def place_call(self, *, to: str, from_: str, urls: CallbackUrls,
                         ring_timeout: int = RING_TIMEOUT_DEFAULT,
                         machine_detection: str | None = AMD_DETECT_MESSAGE_END,
                         extra: Mapping[str, str] | None = None) -> PlacedCall:
        """Ask Twilio to dial `to` from `from_`; the CallSid and status (`queued`).

        With `machine_detection` (default DetectMessageEnd) the result comes asynchronously to
        `urls.amd` (`AsyncAmd=true`): the TwiML fetch does not wait for it, so the assistant can
        listen from the first moment. `extra`: more Twilio fields (MachineDetectionTimeout…)."""
        form: list[tuple[str, str]] = [
            ("To", to), ("From", from_), ("Url", urls.twiml), ("Method", "POST"),
            ("StatusCallback", urls.status), ("StatusCallbackMethod", "POST"),
            *(("StatusCallbackEvent", event) for event in STATUS_EVENTS),
            ("Timeout", str(max(1, min(int(ring_timeout), RING_TIMEOUT_MAX)))),
        ]
        if machine_detection:
            form += [("MachineDetection", machine_detection), ("AsyncAmd", "true"),
                     ("AsyncAmdStatusCallback", urls.amd),
                     ("AsyncAmdStatusCallbackMethod", "POST")]
        form += list((extra or {}).items())
        body = await self._post(f"{self._calls}.json", form, what=f"call to {mask_number(to)}")
        sid = body.get("sid")
        if not isinstance(sid, str) or not sid:
            raise TwilioError(201, None, "the answer has no call sid")
        status = body.get("status")
        return PlacedCall(sid, status if isinstance(status, str) else "queued")

    async def hang_up(self, call_sid: str) -> bool:
        """End the call (`Status=completed`, in progress or still ringing). False when it was
        already over (Twilio: no such call, or not in progress); TwilioError otherwise."""
        try:
            await self._update(call_sid, [("Status", "completed")], "hang-up")
        except TwilioError as e:
            if e.status == 404 or e.code in ALREADY_OVER:
                return False
            raise
        return True

    async def redirect(self, call_sid: str, twiml: str) -> str:
        """Replace what the call is doing with this TwiML (≤ 4000 characters); the call's status.

        A live `<Connect><Stream>` ends (its socket gets `stop`: not a hang-up)."""
        if len(twiml) > 4000:
            raise ValueError(f"TwiML is {len(twiml)} characters; Twilio takes at most 4000")
        body = await self._update(call_sid, [("Twiml", twiml)], "redirect")
        status = body.get("status")
        return status if isinstance(status, str) else ""

    # --- the wire ---

    async def _update(self, call_sid: str, form: Sequence[tuple[str, str]],
                      what: str) -> dict[str, Any]:
        return await self._post(f"{self._calls}/{quote(call_sid, safe='')}.json", form,
                                what=f"{what} of {call_sid}")

    async def _post(self, url: str, form: Sequence[tuple[str, str]], *,
                    what: str) -> dict[str, Any]:
        try:
            async with self._http.post(url, data=list(form), headers=self._headers,
                                       timeout=self._timeout, allow_redirects=False) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            log.warning("Twilio REST: %s: no answer within %g s", what, self._timeout.total)
            raise TwilioError(None, None, f"no answer within {self._timeout.total:g} s") from None
        except aiohttp.ClientError as e:
            log.warning("Twilio REST: %s: %s", what, type(e).__name__)
            raise TwilioError(None, None, f"cannot reach the API ({type(e).__name__})") from None
        body = _json(raw)
        if 200 <= status < 300:
            if body is None:
                raise TwilioError(status, None, "the answer is not a JSON object")
            return body
        error = _error(status, body, raw)
        # Not Twilio's message: it may quote the number in full (21211 "The 'To' number …").
        log.warning("Twilio REST: %s refused: HTTP %d, code %s", what, status, error.code)
        raise error


def _json(raw: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _error(status: int, body: dict[str, Any] | None, raw: bytes) -> TwilioError:
    if body is None:  # a proxy's HTML page, an empty body: say what it was, briefly
        kind = "an empty answer" if not raw.strip() else "an answer that is not JSON"
        return TwilioError(status, None, kind)
    code = body.get("code")
    message = body.get("message") or body.get("detail") or "no message"
    more = body.get("more_info")
    return TwilioError(status, code if isinstance(code, int) else None, str(message)[:500],
                       more if isinstance(more, str) else None)
