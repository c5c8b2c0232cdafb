"""The tools a call can use: loaded and checked once at startup, run with every failure contained.

Two sources: Python functions marked `@tool` in `TOOLS_MODULE` (a module name or a `.py` path),
and HTTP tools listed in `TOOLS_FILE` (JSON), which the bridge POSTs to, signed with
`TOOLS_SECRET`. Anything wrong with either stops startup with a `ConfigError` that names it.

At call time `Toolbox.run` never raises for a tool's failure (an exception, a result that is not
JSON, bad arguments from the model, an unknown name, no answer within `TOOL_TIMEOUT`): each
becomes a small JSON error the model can explain to the caller, plus one log line. Only
cancellation (the caller hung up) propagates.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import importlib
import importlib.util
import inspect
import json
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from server.models.session import ToolSpec
from server.settings import ConfigError, Settings
from server.tool_threads import ToolThreads
from server.tools import (
    CallContext,
    ToolError,
    ToolSchemaError,
    context_parameters,
    description_of,
    is_tool,
    tool_schema,
)

log = logging.getLogger("server.toolbox")

# Outcomes (ToolFinished.outcome); "cancelled" is the feature's, when the call ends first.
OK, ERROR, TIMEOUT, INVALID_ARGUMENTS, UNKNOWN_TOOL, CANCELLED = (
    "ok", "error", "timeout", "invalid_arguments", "unknown_tool", "cancelled")

BUILTIN_NAMES = frozenset({"end_call", "transfer_call"})
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what the Realtime API accepts as a function name
MAX_OUTPUT_CHARS = 32_000  # a bigger answer would crowd the model's context: reported as an error
SIGNATURE_HEADER = "X-Bridge-Signature"
_HTTP_KEYS = frozenset({"name", "description", "parameters", "url"})


def sign(secret: str, body: bytes) -> str:
    """The signature header value of an HTTP tool request: `sha256=<hex HMAC-SHA256(body)>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def error_output(message: str) -> str:
    return orjson.dumps({"error": message}).decode()


class _Failed(Exception):
    """A tool failed in a way the model is told about (`message`) and the log explains
    (`detail`)."""

    def __init__(self, outcome: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.outcome, self.message, self.detail = outcome, message, detail or message


Invoke = Callable[[dict[str, Any], CallContext, aiohttp.ClientSession | None, ToolThreads],
                  Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class _Tool:
    spec: ToolSpec
    source: str  # where it came from, for log lines and error messages
    invoke: Invoke


class Toolbox:
    """The tools every call offers (besides the built-ins), by name, and the threads that sync
    tools run on (`close()` them at shutdown)."""

    def __init__(self, tools: Mapping[str, _Tool] | None = None, timeout: float = 10.0,
                 log_pii: bool = False, threads: int = 8) -> None:
        self._tools = dict(tools or {})
        self.timeout = timeout
        self._log_pii = log_pii
        self.threads = ToolThreads(threads)

    def close(self) -> None:
        """Shutdown: sync tools still running are logged and left behind (never waited for)."""
        self.threads.close()

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def specs(self) -> list[ToolSpec]:
        return [t.spec for t in self._tools.values()]

    def describe(self) -> str:
        """One line for the startup log."""
        return ", ".join(f"{name} ({t.source})" for name, t in self._tools.items()) or "none"

    async def run(self, name: str, arguments: str, context: CallContext,
                  http: aiohttp.ClientSession | None = None) -> tuple[str, str]:
        """Run one function call: (outcome, output JSON text for the model). Never raises for
        the tool's own failures; cancellation propagates."""
        started = time.monotonic()
        try:
            output = await self._run(name, arguments, context, http)
        except _Failed as f:
            shown = f" arguments={arguments[:300]!r}" if self._log_pii else ""
            context.log.warning("tool %s: %s: %s (%.2f s)%s", name[:64], f.outcome, f.detail,
                                time.monotonic() - started, shown)
            return f.outcome, error_output(f.message)
        context.log.info("tool %s: ok (%.2f s, %d chars)", name, time.monotonic() - started,
                         len(output))
        return OK, output

    async def _run(self, name: str, arguments: str, context: CallContext,
                   http: aiohttp.ClientSession | None) -> str:
        tool = self._tools.get(name)
        if tool is None:
            raise _Failed(UNKNOWN_TOOL, f"there is no tool named {name[:64]!r}")
        args = parse_arguments(arguments)
        problem = check_arguments(tool.spec.parameters, args)
        if problem:
            raise _Failed(INVALID_ARGUMENTS, f"invalid arguments: {problem}")
        timeout = asyncio.timeout(self.timeout)
        try:
            async with timeout:
                result = await tool.invoke(args, context, http, self.threads)
        except TimeoutError:
            if not timeout.expired():
                raise _Failed(ERROR, f"{name} failed", "raised TimeoutError") from None
            raise _Failed(TIMEOUT, f"{name} did not answer within {self.timeout:g} seconds",
                          f"no result within TOOL_TIMEOUT={self.timeout:g} s") from None
        except _Failed:
            raise
        except ToolError as e:
            raise _Failed(ERROR, str(e) or f"{name} failed", f"ToolError: {e}") from None
        except Exception as e:
            context.log.warning("tool %s raised", name, exc_info=True)
            raise _Failed(ERROR, f"{name} failed", f"raised {type(e).__name__}") from None
        return encode_result(name, result)


def parse_arguments(arguments: str) -> dict[str, Any]:
    """The model's arguments string -> an object; `_Failed(INVALID_ARGUMENTS)` otherwise."""
    try:
        args = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        raise _Failed(INVALID_ARGUMENTS, "the arguments were not valid JSON",
                      f"arguments are not JSON ({len(arguments)} chars)") from None
    if not isinstance(args, dict):
        raise _Failed(INVALID_ARGUMENTS, "the arguments must be a JSON object",
                      f"arguments are a JSON {type(args).__name__}, not an object")
    return args


def encode_result(name: str, result: Any) -> str:
    """A tool's return value -> JSON text; None becomes {"ok": true} so the model knows it ran."""
    if result is None:
        result = {"ok": True}
    try:
        output = orjson.dumps(result).decode()
    except TypeError as e:
        raise _Failed(ERROR, f"{name} returned a result that could not be read",
                      f"result is not JSON-serialisable: {e}") from None
    if len(output) > MAX_OUTPUT_CHARS:
        raise _Failed(ERROR, f"{name} returned too much data",
                      f"result is {len(output)} chars, over {MAX_OUTPUT_CHARS}")
    return output


# --- a small JSON-schema check: the subset tool schemas use ---

_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def check_arguments(schema: Mapping[str, Any], value: Any, path: str = "") -> str | None:
    """The first way `value` breaks `schema` (type, enum, required, unknown properties, items,
    anyOf), or None. Keywords outside that subset are not checked."""
    where = path or "arguments"
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
            return f"{where} must be {' or '.join(str(k) for k in kinds)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {', '.join(json.dumps(v) for v in schema['enum'])}"
    if "anyOf" in schema and isinstance(schema["anyOf"], list) and all(
            check_arguments(s, value, path) for s in schema["anyOf"] if isinstance(s, dict)):
        return f"{where} does not match any allowed form"
    if isinstance(value, dict):
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        for name in schema.get("required") or ():
            if name not in value:
                return f"{name} is missing"
        if schema.get("additionalProperties") is False:
            extra = sorted(k for k in value if k not in props)
            if extra:
                return f"unknown argument {extra[0]!r}"
        for name, sub in props.items():
            if name in value and isinstance(sub, dict):
                problem = check_arguments(sub, value[name], f"{path}.{name}" if path else name)
                if problem:
                    return problem
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problem = check_arguments(schema["items"], item, f"{where}[{i}]")
            if problem:
                return problem
    return None


# --- loading ---


def load_toolbox(settings: Settings) -> Toolbox:
    """Everything in TOOLS_MODULE and TOOLS_FILE, checked; ConfigError names the first problem."""
    tools: dict[str, _Tool] = {}

    def add(tool: _Tool, variable: str) -> None:
        name = tool.spec.name
        if name in BUILTIN_NAMES:
            raise ConfigError(variable, f"{tool.source}: {name!r} is the name of a built-in tool")
        if name in tools:
            raise ConfigError(variable, f"{tool.source}: a tool named {name!r} is already "
                                        f"defined ({tools[name].source})")
        tools[name] = tool

    if settings.tools_module:
        for tool in python_tools(settings.tools_module):
            add(tool, "TOOLS_MODULE")
    if settings.tools_file is not None:
        http_tools = load_http_tools(settings.tools_file, settings.tools_secret or "")
        if http_tools and not settings.tools_secret:
            raise ConfigError("TOOLS_SECRET", f"is required to sign requests to the HTTP tools "
                                              f"in {settings.tools_file}")
        for tool in http_tools:
            add(tool, "TOOLS_FILE")
    return Toolbox(tools, settings.tool_timeout, settings.log_pii, settings.tool_threads)


def import_tools_module(spec: str) -> ModuleType:
    """A module name (`mycompany.tools`) or a path to a `.py` file."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError("TOOLS_MODULE", f"no file at {path}")
        module_name = f"bridge_tools_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError("TOOLS_MODULE", f"{path} cannot be imported as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise ConfigError("TOOLS_MODULE", f"importing {path} failed: "
                                              f"{type(e).__name__}: {e}") from None
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        if e.name and spec.startswith(e.name):
            raise ConfigError("TOOLS_MODULE", f"no module named {spec!r} (is it on PYTHONPATH? "
                                              "a file path must end in .py)") from None
        raise ConfigError("TOOLS_MODULE", f"importing {spec} failed: {e}") from None
    except Exception as e:
        raise ConfigError("TOOLS_MODULE", f"importing {spec} failed: "
                                          f"{type(e).__name__}: {e}") from None


def python_tools(spec: str) -> list[_Tool]:
    module = import_tools_module(spec)
    found: dict[int, Callable[..., Any]] = {}
    for obj in vars(module).values():
        if is_tool(obj):
            found.setdefault(id(obj), obj)
    if not found:
        raise ConfigError("TOOLS_MODULE", f"{spec} defines no functions marked @tool "
                                          "(from server.tools import tool)")
    return [python_tool(fn, spec) for fn in found.values()]


def python_tool(fn: Callable[..., Any], source: str = "") -> _Tool:
    """One `@tool` function as a tool; ConfigError if the model could not be told how to call
    it."""
    name = fn.__name__
    where = f"{source}: {name}" if source else name
    if not NAME.fullmatch(name):
        raise ConfigError("TOOLS_MODULE", f"{where}: a tool name may hold only letters, digits, "
                                          "_ and - (at most 64)")
    description = description_of(fn)
    if not description:
        raise ConfigError("TOOLS_MODULE", f"{where} has no docstring: the model reads it to "
                                          "know when to call the tool")
    try:
        parameters = tool_schema(fn)
        context_names = context_parameters(fn)
    except ToolSchemaError as e:
        raise ConfigError("TOOLS_MODULE", f"{where}: {e}") from None
    is_async = inspect.iscoroutinefunction(fn)

    async def invoke(args: dict[str, Any], context: CallContext,
                     http: aiohttp.ClientSession | None, threads: ToolThreads) -> Any:
        kwargs = {**args, **{n: context for n in context_names}}
        if is_async:
            return await fn(**kwargs)
        # On the tools' own threads (TOOL_THREADS), never the loop's default executor. A thread
        # cannot be cancelled: on a timeout or hang-up the call stops waiting for it, but the
        # function runs to its end. Sync tools should bound their own I/O.
        return await threads.run(functools.partial(fn, **kwargs), name)

    return _Tool(ToolSpec(name, description, parameters), f"module {source or fn.__module__}",
                 invoke)


def load_http_tools(path: Path, secret: str) -> list[_Tool]:
    """`{"tools": [{name, description, parameters, url}, ...]}` (or just the list)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("TOOLS_FILE", f"no file at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("TOOLS_FILE", f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError("TOOLS_FILE", f"{path} is not valid JSON: {e}") from None
    entries = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ConfigError("TOOLS_FILE", f'{path} must hold {{"tools": [...]}} or a list')
    return [_http_tool(entry, f"{path} tool #{i + 1}", secret) for i, entry in enumerate(entries)]


def _http_tool(entry: Any, where: str, secret: str) -> _Tool:
    def bad(problem: str) -> ConfigError:
        return ConfigError("TOOLS_FILE", f"{where}: {problem}")

    if not isinstance(entry, dict):
        raise bad("is not an object")
    unknown = sorted(set(entry) - _HTTP_KEYS)
    if unknown:
        raise bad(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_HTTP_KEYS))})")
    name, description, url = entry.get("name"), entry.get("description"), entry.get("url")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise bad("name must be letters, digits, _ or - (at most 64)")
    where = f"{where} ({name})"
    if not isinstance(description, str) or not description.strip():
        raise bad("description is required: the model reads it to know when to call the tool")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad("url must be an http:// or https:// URL")
    parameters = entry.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise bad('parameters must be a JSON schema object with "type": "object"')
    assert isinstance(url, str)
    return _Tool(ToolSpec(name, description.strip(), parameters), f"HTTP {parts.hostname}",
                 _http_invoke(name, url, secret))


def _http_invoke(name: str, url: str, secret: str) -> Invoke:
    async def invoke(args: dict[str, Any], context: CallContext,
                     http: aiohttp.ClientSession | None, threads: ToolThreads) -> Any:
        if http is None:
            raise _Failed(ERROR, f"{name} is not available", "no HTTP session for HTTP tools")
        body = orjson.dumps({"call_sid": context.call_sid, "caller": context.caller,
                             "called": context.called, "name": name, "arguments": args})
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body)}
        try:
            async with http.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                answer = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    answer += chunk
                    if len(answer) > MAX_OUTPUT_CHARS * 4:
                        raise _Failed(ERROR, f"{name} returned too much data",
                                      f"POST {_safe(url)} answered over "
                                      f"{MAX_OUTPUT_CHARS * 4} bytes")
        except aiohttp.ClientError as e:
            raise _Failed(ERROR, f"{name} could not be reached",
                          f"POST {_safe(url)} failed: {type(e).__name__}: {e}") from None
        if not 200 <= status < 300:
            raise _Failed(ERROR, f"{name} failed",
                          f"POST {_safe(url)} answered HTTP {status}")
        try:
            return orjson.loads(answer)
        except orjson.JSONDecodeError:
            raise _Failed(ERROR, f"{name} returned an answer that could not be read",
                          f"POST {_safe(url)} answered {len(answer)} bytes that are not JSON"
                          ) from None

    return invoke


def _safe(url: str) -> str:
    """A URL for a log line: scheme, host and path, never credentials or a query string."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
