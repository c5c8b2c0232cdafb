"""The Twilio side of the wire: TwiML, webhook signatures, Media Streams frames."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

# Base64 as Twilio sends it, checked before a payload is relayed (3x cheaper than a stricter
# pattern; with the length check it admits exactly the well-formed strings).
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}").fullmatch


def is_base64(text: str) -> bool:
    return not len(text) % 4 and _BASE64(text) is not None

STREAM_PARAMETER_MAX = 500


class TwilioProtocolError(ValueError):
    """A frame that breaks the Media Streams protocol; the message is safe to log."""


@dataclass(frozen=True, slots=True)
class StreamStart:
    stream_sid: str
    call_sid: str
    account_sid: str
    parameters: dict[str, str]


def parse_start(message: Mapping[str, Any]) -> StreamStart:
    start = message.get("start")
    if not isinstance(start, dict):
        raise TwilioProtocolError("'start' event without a start object")
    stream_sid = start.get("streamSid") or message.get("streamSid")
    call_sid = start.get("callSid")
    if not isinstance(stream_sid, str) or not stream_sid:
        raise TwilioProtocolError("'start' event without a streamSid")
    if not isinstance(call_sid, str) or not call_sid:
        raise TwilioProtocolError("'start' event without a callSid")
    media_format = start.get("mediaFormat")
    if isinstance(media_format, dict):
        encoding = media_format.get("encoding")
        if encoding is not None and encoding != "audio/x-mulaw":
            raise TwilioProtocolError(f"unsupported media encoding {encoding!r}")
    params = start.get("customParameters") or {}
    if not isinstance(params, dict):
        raise TwilioProtocolError("customParameters is not an object")
    account_sid = start.get("accountSid")
    return StreamStart(
        stream_sid=stream_sid,
        call_sid=call_sid,
        account_sid=account_sid if isinstance(account_sid, str) else "",
        parameters={str(k): str(v) for k, v in params.items()},
    )


# --- frames we send: exactly the keys Twilio accepts (any extra key is error 31951) ---


def media_frame(stream_sid: str, payload: str) -> bytes:
    return orjson.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}})


def mark_frame(stream_sid: str, name: str) -> bytes:
    return orjson.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_frame(stream_sid: str) -> bytes:
    return orjson.dumps({"event": "clear", "streamSid": stream_sid})


# --- TwiML ---


def connect_twiml(stream_url: str, parameters: Mapping[str, str], fallback: str) -> str:
    """`<Connect><Stream>` then a spoken fallback, which Twilio reaches only if the stream ends."""
    response = VoiceResponse()
    connect = response.connect()
    stream = connect.stream(url=stream_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value[:STREAM_PARAMETER_MAX])
    response.say(fallback)
    return str(response.to_xml())


def busy_twiml(message: str) -> str:
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response.to_xml())


# --- signatures ---


def signature_valid(
    auth_token: str, url: str, params: Mapping[str, str], signature: str | None
) -> bool:
    if not signature:
        return False
    return bool(RequestValidator(auth_token).validate(url, dict(params), signature))


def compute_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """What Twilio puts in X-Twilio-Signature; used by the simulator and tests."""
    return str(RequestValidator(auth_token).compute_signature(url, dict(params)))
