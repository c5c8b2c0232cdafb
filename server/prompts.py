"""Prompts kept with us, by id and version: `config/prompts/<id>/<version>.md`.

OpenAI's hosted prompt objects are deprecated (their API shuts down at the end of November 2026),
so a prompt is a file we version ourselves. A `PROMPT_ID` starting with `pmpt_` is still passed
through to OpenAI as `session.prompt` for those who have one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.settings import DEFAULT_INSTRUCTIONS, ConfigError, Settings

VARIABLES = frozenset({"caller", "called", "call_sid"})
HOSTED_PREFIX = "pmpt_"
DEFAULT_PROMPT_ID = "default"

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True, slots=True)
class Prompt:
    """A resolved prompt: either a local template or a hosted OpenAI prompt reference."""

    id: str
    version: str | None
    source: str
    # Alternating literal text and variable names, split once at startup so a call only joins.
    parts: tuple[str, ...] = ()
    hosted: bool = False

    def render(self, values: dict[str, str]) -> str:
        return "".join(
            values.get(p, "unknown") if i % 2 else p for i, p in enumerate(self.parts)
        )

    def session_fields(self, values: dict[str, str]) -> dict[str, Any]:
        """What this prompt contributes to `session.update`."""
        if self.hosted:
            ref: dict[str, Any] = {"id": self.id}
            if self.version:
                ref["version"] = self.version
            return {"prompt": ref}
        return {"instructions": self.render(values)}

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The {{names}} this prompt fills in."""
        return self.parts[1::2]

    def describe(self) -> str:
        version = f" version {self.version}" if self.version else ""
        return f"{self.id}{version} ({self.source})"


def load_prompt(settings: Settings) -> Prompt:
    """Resolve the configured prompt once at startup, or raise ConfigError."""
    if settings.prompt_id:
        if settings.prompt_id.startswith(HOSTED_PREFIX):
            return Prompt(
                settings.prompt_id, settings.prompt_version, "OpenAI hosted prompt", hosted=True
            )
        return _load_file(settings.prompts_dir, settings.prompt_id, settings.prompt_version)
    if settings.prompt_version:
        raise ConfigError("PROMPT_VERSION", "is set but PROMPT_ID is not")
    if settings.instructions:
        return template("INSTRUCTIONS", None, "environment", settings.instructions, "INSTRUCTIONS")
    if (settings.prompts_dir / DEFAULT_PROMPT_ID).is_dir():
        return _load_file(settings.prompts_dir, DEFAULT_PROMPT_ID, None)
    where = settings.prompts_dir.resolve()
    return template("built-in", None,
                     f"built-in: no {DEFAULT_PROMPT_ID}/ prompt in {where}; set PROMPTS_DIR",
                     DEFAULT_INSTRUCTIONS, "INSTRUCTIONS")


def load_named_prompt(prompts_dir: Path, prompt_id: str, version: str | None) -> Prompt:
    """A prompt a plan names (the numbers map, an outbound call). Its placeholders may be the
    plan's own variables: the plan is checked against them when it is made."""
    if prompt_id.startswith(HOSTED_PREFIX):
        return Prompt(prompt_id, version, "OpenAI hosted prompt", hosted=True)
    return _load_file(prompts_dir, prompt_id, version, allowed=None)


def versions(prompts_dir: Path, prompt_id: str) -> list[str]:
    """Versions of a prompt, oldest first (natural order: 2 < 10)."""
    names = [p.stem for p in (prompts_dir / prompt_id).glob("*.md") if p.is_file()]
    return sorted(names, key=_natural_key)


def _load_file(prompts_dir: Path, prompt_id: str, version: str | None,
               allowed: frozenset[str] | None = VARIABLES) -> Prompt:
    if not _SAFE_ID.fullmatch(prompt_id):
        raise ConfigError("PROMPT_ID", f"{prompt_id!r} is not a valid prompt id")
    available = versions(prompts_dir, prompt_id)
    if not available:
        raise ConfigError(
            "PROMPT_ID",
            f"no prompt {prompt_id!r} in {prompts_dir.resolve()} (expected {prompt_id}/1.md; "
            "PROMPTS_DIR sets the folder)",
        )
    if version is None or version == "latest":
        version = available[-1]
    elif version not in available:
        raise ConfigError(
            "PROMPT_VERSION",
            f"prompt {prompt_id!r} has no version {version!r} (has {', '.join(available)})",
        )
    path = prompts_dir / prompt_id / f"{version}.md"
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise ConfigError("PROMPT_ID", f"{path} is empty")
    return template(prompt_id, version, str(path), text, "PROMPT_ID", allowed)


def template(
    prompt_id: str, version: str | None, source: str, text: str, variable: str,
    allowed: frozenset[str] | set[str] | None = VARIABLES,
) -> Prompt:
    """Split once; `allowed` (None: any) are the placeholders it may use."""
    parts = tuple(_PLACEHOLDER.split(text))
    unknown = sorted({p for p in parts[1::2] if allowed is not None and p not in allowed})
    if unknown:
        raise ConfigError(
            variable,
            f"{source} uses unknown placeholder(s) {', '.join('{{' + u + '}}' for u in unknown)}"
            f"; known: {', '.join(sorted(allowed or VARIABLES))}",
        )
    return Prompt(prompt_id, version, source, parts)


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    return tuple(
        (0, int(chunk)) if chunk.isdigit() else (1, chunk)
        for chunk in re.split(r"(\d+)", name)
        if chunk
    )
