"""A call's plan: everything that may differ from one call to the next.

Direction, prompt (id, version, variables), greeting, voice, the tools allowed, the model API
and metadata. It is decided before the stream starts: at the webhook for an inbound call (by
the number dialled, from NUMBERS_FILE), or by the outbound API; it is kept in the shared state
under the CallSid (so the stream may land on any instance) and read when the stream starts.
The app's settings are the defaults of every field.

NUMBERS_FILE (JSON) maps the numbers this bridge answers to their plans, so one bridge can serve
several lines with different assistants:

    {"+15550002222": {"prompt": {"id": "support", "version": "3"},
                      "greeting": "Thanks for calling support.", "voice": "marin"},
     "+15550003333": {"prompt": {"id": "sales"}, "model_api": "realtime"}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.prompts import VARIABLES, Prompt, load_named_prompt, load_prompt, template
from server.settings import MODEL_APIS, VOICES, ConfigError, Settings

DIRECTIONS = frozenset({"inbound", "outbound"})
_PLAN_KEYS = frozenset({"prompt", "greeting", "voice", "model_api", "tools", "variables",
                        "metadata"})


@dataclass(frozen=True)
class CallPlan:
    direction: str = "inbound"
    prompt_id: str | None = None  # None: the app's prompt (PROMPT_ID, INSTRUCTIONS, default/)
    prompt_version: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)  # {{name}} in the prompt
    greeting: str | None = None  # None: GREETING (which may be unset: the caller speaks first)
    voice: str | None = None  # None: VOICE
    tools: tuple[str, ...] | None = None  # the tools allowed by name; None: all of them
    model_api: str = "realtime"  # Plans.default: MODEL_API
    metadata: Mapping[str, Any] = field(default_factory=dict)  # kept in the record
    voicemail: str | None = None  # outbound: the message to leave on a machine (None: hang up)

    def to_dict(self) -> dict[str, Any]:
        return {"direction": self.direction, "prompt_id": self.prompt_id,
                "prompt_version": self.prompt_version, "variables": dict(self.variables),
                "greeting": self.greeting, "voice": self.voice,
                "tools": list(self.tools) if self.tools is not None else None,
                "model_api": self.model_api, "metadata": dict(self.metadata),
                "voicemail": self.voicemail}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CallPlan:
        """A plan read back from the shared state; ValueError when it is not one."""
        def text(key: str) -> str | None:
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"plan {key} is not a string")
            return value

        variables = data.get("variables") or {}
        metadata = data.get("metadata") or {}
        tools = data.get("tools")
        if not isinstance(variables, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in variables.items()):
            raise ValueError("plan variables are not strings")
        if not isinstance(metadata, dict):
            raise ValueError("plan metadata is not an object")
        if tools is not None and not (isinstance(tools, list)
                                      and all(isinstance(t, str) for t in tools)):
            raise ValueError("plan tools are not a list of names")
        direction = text("direction") or "inbound"
        model_api = text("model_api") or "realtime"
        if direction not in DIRECTIONS or model_api not in MODEL_APIS:
            raise ValueError("plan direction or model_api is unknown")
        return cls(direction, text("prompt_id"), text("prompt_version"), dict(variables),
                   text("greeting"), text("voice"),
                   tuple(tools) if tools is not None else None, model_api, dict(metadata),
                   text("voicemail"))


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a plan means for one call's session: checked templates, ready to render."""

    prompt: Prompt
    greeting: Prompt | None
    voice: str
    model_api: str
    model: str  # the model the session uses: OPENAI_REALTIME_MODEL or OPENAI_LIVE_MODEL


def plan_model(settings: Settings, model_api: str) -> str:
    """The model a plan's API means, from the settings."""
    return settings.openai_live_model if model_api == "live" else settings.openai_model


class Plans:
    """The app's plans: its defaults, the numbers map, and the prompts they name (loaded and
    checked once, at startup; a prompt named later, by the outbound API, when first used)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.default_prompt = load_prompt(settings)
        self.default_greeting = (template("greeting", None, "GREETING", settings.greeting,
                                          "GREETING") if settings.greeting else None)
        self._prompts: dict[tuple[str, str | None], Prompt] = {}
        # every plan's defaults (a line's, an outbound call's): MODEL_API chooses the API
        self.default = CallPlan(model_api=settings.model_api)
        if self.default.model_api == "live" and self.default_prompt.hosted:
            raise ConfigError("PROMPT_ID", f"{settings.prompt_id} is a hosted prompt (pmpt_…), "
                              "which GPT-Live (MODEL_API=live) does not take: use a prompt file")
        self._numbers: dict[str, CallPlan] = {}
        if settings.numbers_file is not None:
            self._numbers = self._load_numbers(settings.numbers_file)

    def inbound(self, called: str) -> CallPlan:
        """The plan of a call to `called`: its line's, else the app's defaults."""
        return self._numbers.get(called.strip(), self.default)

    def resolve(self, plan: CallPlan) -> Resolved:
        """The prompt, greeting and voice of a plan; ConfigError names what is wrong."""
        prompt = self.prompt(plan.prompt_id, plan.prompt_version, plan.variables)
        greeting = self.default_greeting
        if plan.greeting is not None:
            greeting = template("greeting", None, "the plan's greeting", plan.greeting,
                                "GREETING", VARIABLES | set(plan.variables))
        voice = plan.voice or self._settings.voice
        if voice not in VOICES:
            raise ConfigError("VOICE", f"{voice!r} is not one of {', '.join(sorted(VOICES))}")
        if plan.model_api == "live" and prompt.hosted:
            raise ConfigError("PROMPT_ID", f"{prompt.describe()} is a hosted prompt (pmpt_…), "
                              "which GPT-Live does not take: use a prompt file")
        return Resolved(prompt, greeting, voice, plan.model_api,
                        plan_model(self._settings, plan.model_api))

    def prompt(self, prompt_id: str | None, version: str | None,
               variables: Mapping[str, str] = {}) -> Prompt:
        if prompt_id is None:
            prompt = self.default_prompt
        else:
            key = (prompt_id, version)
            cached = self._prompts.get(key)
            if cached is None:
                cached = self._prompts[key] = load_named_prompt(
                    self._settings.prompts_dir, prompt_id, version)
            prompt = cached
        missing = sorted(set(prompt.placeholders) - VARIABLES - set(variables))
        if missing:
            raise ConfigError("variables", f"prompt {prompt.describe()} needs "
                              f"{', '.join('{{' + m + '}}' for m in missing)}")
        return prompt

    def _load_numbers(self, path: Path) -> dict[str, CallPlan]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("NUMBERS_FILE", f"no file at {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError("NUMBERS_FILE", f"cannot read {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError("NUMBERS_FILE", f"{path} must map numbers to plans")
        numbers: dict[str, CallPlan] = {}
        for number, entry in data.items():
            plan = self._number_plan(str(number), entry)
            try:
                self.resolve(plan)  # every prompt and voice checked now, not mid-call
            except ConfigError as e:
                raise ConfigError("NUMBERS_FILE", f"{number}: {e}") from None
            numbers[str(number).strip()] = plan
        return numbers

    def _number_plan(self, number: str, entry: Any) -> CallPlan:
        def bad(problem: str) -> ConfigError:
            return ConfigError("NUMBERS_FILE", f"{number}: {problem}")

        if not isinstance(entry, dict):
            raise bad("is not an object")
        unknown = sorted(set(entry) - _PLAN_KEYS)
        if unknown:
            raise bad(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_PLAN_KEYS))})")
        prompt = entry.get("prompt") or {}
        if not isinstance(prompt, dict) or not isinstance(prompt.get("id", ""), str):
            raise bad('prompt must be {"id": "...", "version": "..."}')
        version = prompt.get("version")
        data = {"prompt_id": prompt.get("id"),
                "prompt_version": str(version) if version is not None else None,
                "model_api": self.default.model_api,
                **{k: entry[k] for k in ("greeting", "voice", "model_api", "tools",
                                         "variables", "metadata") if k in entry}}
        try:
            return CallPlan.from_dict(data)
        except ValueError as e:
            raise bad(str(e)) from None
