"""The OpenAI Realtime side of the wire, GA interface only.

No `OpenAI-Beta` header and no `temperature`: the GA service rejects both.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import orjson

from server.settings import Settings

SESSION_UPDATE_ID = "bridge_session_update"
PCMU = {"type": "audio/pcmu"}

# Error codes after which the session is of no further use to the caller.
FATAL_ERROR_CODES = frozenset(
    {
        "session_expired",
        "beta_api_shape_disabled",
        "invalid_api_key",
        "insufficient_quota",
        "model_not_found",
    }
)


def realtime_url(settings: Settings) -> str:
    return f"{settings.openai_realtime_url}?model={quote(settings.openai_model, safe='')}"


def auth_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.openai_api_key}"}


def turn_detection(settings: Settings) -> dict[str, Any]:
    common = {"create_response": True, "interrupt_response": True}
    if settings.turn_detection == "semantic_vad":
        return {"type": "semantic_vad", "eagerness": settings.vad_eagerness, **common}
    return {
        "type": "server_vad",
        "threshold": settings.vad_threshold,
        "prefix_padding_ms": settings.vad_prefix_padding_ms,
        "silence_duration_ms": settings.vad_silence_ms,
        **common,
    }


def session_update(settings: Settings, prompt_fields: dict[str, Any]) -> bytes:
    """The first event on every session: mu-law both ways, before any audio is appended."""
    audio_input: dict[str, Any] = {"format": PCMU, "turn_detection": turn_detection(settings)}
    if settings.noise_reduction != "off":
        audio_input["noise_reduction"] = {"type": settings.noise_reduction}
    if settings.transcription_model:
        audio_input["transcription"] = {"model": settings.transcription_model}
    session: dict[str, Any] = {
        "type": "realtime",
        "model": settings.openai_model,
        "output_modalities": ["audio"],
        "audio": {"input": audio_input, "output": {"format": PCMU, "voice": settings.voice}},
        **prompt_fields,
    }
    return orjson.dumps(
        {"type": "session.update", "event_id": SESSION_UPDATE_ID, "session": session}
    )


def append_audio(payload: str) -> bytes:
    return orjson.dumps({"type": "input_audio_buffer.append", "audio": payload})


def truncate(item_id: str, audio_end_ms: int) -> bytes:
    return orjson.dumps(
        {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": audio_end_ms,
        }
    )


def error_summary(event: dict[str, Any]) -> tuple[str, str]:
    """(code, readable message) of an `error` event, tolerant of missing fields."""
    error = event.get("error")
    if not isinstance(error, dict):
        return "unknown", "error event without details"
    code = str(error.get("code") or error.get("type") or "unknown")
    message = str(error.get("message") or "")
    param = error.get("param")
    if param:
        message = f"{message} (param {param})"
    return code, message


def is_fatal(event: dict[str, Any]) -> bool:
    """Fatal: a code that ends the session, or the rejection of our own session.update (the
    session would stay in PCM 24 kHz and the caller would hear noise)."""
    error = event.get("error")
    if not isinstance(error, dict):
        return False
    return error.get("code") in FATAL_ERROR_CODES or error.get("event_id") == SESSION_UPDATE_ID
