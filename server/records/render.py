"""Records as text for people: the `Accept: text/plain` transcript and the CLI's output."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import orjson


def _clock(seconds: Any) -> str:
    s = float(seconds) if isinstance(seconds, (int, float)) else 0.0
    minutes, rest = divmod(s, 60)
    return f"{int(minutes):02d}:{rest:04.1f}"


def _json(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def transcript_text(doc: Mapping[str, Any]) -> str:
    """A readable transcript with the call's facts on top."""
    lines = [f"Call {doc.get('call_sid')}  {doc.get('direction') or 'inbound'}  "
             f"from {doc.get('from') or '?'} to {doc.get('to') or '?'}"]
    ended = doc.get("ended_at") or "(live, or not finished)"
    lines.append(f"Started {doc.get('started_at')}  ended {ended}  "
                 f"({doc.get('duration_seconds')} s)")
    if doc.get("end_reason"):
        lines.append(f"Ended: {doc.get('end_reason')} [{doc.get('end_kind')}]")
    if doc.get("status") or doc.get("answered_by"):  # an outbound call: Twilio's status, AMD
        answered = f", answered by {doc['answered_by']}" if doc.get("answered_by") else ""
        lines.append(f"Outcome: {doc.get('status') or '?'}{answered}")
    facts = []
    latencies = [x for x in doc.get("latencies_ms") or () if isinstance(x, (int, float))]
    if latencies:
        facts.append(f"response latency median {statistics.median(latencies):.0f} ms "
                     f"(max {max(latencies):.0f} ms, {len(latencies)} turns)")
    facts.append(f"barge-ins {doc.get('barge_ins', 0)}")
    usage = doc.get("usage") or {}
    if usage:
        facts.append(f"tokens in {usage.get('input_tokens', 0)} out "
                     f"{usage.get('output_tokens', 0)}")
    cost = doc.get("cost_usd")
    if isinstance(cost, (int, float)):
        facts.append(f"cost ≈ ${cost:.4f} ({doc.get('model')}, estimate)")
    lines.append("; ".join(facts))
    if doc.get("recording"):
        lines.append("Recording: yes")
    lines.append("")
    for entry in doc.get("timeline") or ():
        if isinstance(entry, Mapping):
            lines.append(f"[{_clock(entry.get('at'))}] {_entry(entry)}")
    return "\n".join(lines) + "\n"


def _entry(e: Mapping[str, Any]) -> str:
    kind = e.get("kind")
    if kind == "caller":
        return f"Caller: {e.get('text', '')}"
    if kind == "assistant":
        line = f"Assistant: {e.get('text', '')}"
        if e.get("interrupted"):
            line += f"  [interrupted: caller heard {int(e.get('heard_ms') or 0) / 1000:.1f} s]"
        return line
    if kind == "keypad":
        return f"Keypad: {e.get('digits', '')}"
    if kind == "operator":
        return f"Operator ({e.get('operator') or '?'}): {e.get('text', '')}"
    if kind == "whisper":
        return f"Whisper from {e.get('operator') or '?'} to the assistant: {e.get('text', '')}"
    if kind == "tool":
        outcome = e.get("outcome")
        value = e.get("result") if outcome == "ok" else e.get("error")
        return (f"Tool {e.get('name')}({_short(_json(e.get('arguments', '')), 200)}) -> "
                f"{outcome} in {e.get('seconds')} s: {_short(_json(value))}")
    if kind == "error":
        return f"OpenAI error {e.get('code')}: {e.get('message', '')}"
    rest = {k: v for k, v in e.items() if k not in ("at", "kind")}
    return f"{kind}: {_short(_json(rest))}"


def calls_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The `calls` listing: one line per call, newest first."""
    header = f"{'started (UTC)':<20} {'call sid':<36} {'from':<16} {'to':<16} " \
             f"{'secs':>7} {'cost $':>8}  end"
    lines = [header]
    for r in rows:
        started = str(r.get("started_at") or "")[:19].replace("T", " ")
        seconds = r.get("duration_seconds")
        cost = r.get("cost_usd")
        lines.append(
            f"{started:<20} {r.get('call_sid')!s:<36} {r.get('from')!s:<16} {r.get('to')!s:<16} "
            f"{seconds if seconds is not None else '':>7} "
            f"{f'{cost:.4f}' if isinstance(cost, (int, float)) else '':>8}  "
            f"{r.get('end_kind') or 'live'}")
    return "\n".join(lines) + "\n"
