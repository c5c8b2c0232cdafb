"""The tool API (`@tool`, schemas from hints), loading (TOOLS_MODULE / TOOLS_FILE) and running
(every failure becomes an error output, never an exception), HTTP tools over loopback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.settings import ConfigError, Settings, parse_transfer_targets
from server.testing.inbox import wait_until
from server.tool_threads import ToolThreads
from server.toolbox import (
    INVALID_ARGUMENTS,
    MAX_OUTPUT_CHARS,
    OK,
    SIGNATURE_HEADER,
    TIMEOUT,
    UNKNOWN_TOOL,
    Toolbox,
    check_arguments,
    load_toolbox,
    python_tool,
)
from server.tools import CallContext, ToolError, ToolSchemaError, is_tool, tool, tool_schema

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = CallContext("+15550001111", "+15550002222", "CA123",
                      logging.getLogger("test.tools"))


def settings(**overrides: Any) -> Settings:
    return Settings(openai_api_key="sk-test", **overrides)


def toolbox_of(*fns: Callable[..., Any], timeout: float = 10.0) -> Toolbox:
    tools = [python_tool(fn, "test") for fn in fns]
    return Toolbox({t.spec.name: t for t in tools}, timeout)


# --- schemas ---


def test_schema_from_hints() -> None:
    @tool
    async def book(
        name: str,
        seats: int,
        price: float,
        vip: bool,
        kind: Literal["table", "bar"],
        tags: list[str],
        ctx: CallContext,
        note: str | None = None,
        level: Literal[1, 2] = 1,
        extras: list[int] | None = None,
    ) -> dict[str, Any]:
        """Book a table."""
        return {}

    assert is_tool(book)
    assert tool_schema(book) == {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "seats": {"type": "integer"},
            "price": {"type": "number"},
            "vip": {"type": "boolean"},
            "kind": {"type": "string", "enum": ["table", "bar"]},
            "tags": {"type": "array", "items": {"type": "string"}},
            "note": {"type": ["string", "null"], "default": None},
            "level": {"type": "integer", "enum": [1, 2], "default": 1},
            "extras": {"type": ["array", "null"], "items": {"type": "integer"}, "default": None},
        },
        "required": ["name", "seats", "price", "vip", "kind", "tags"],
        "additionalProperties": False,
    }
    spec = python_tool(book, "test").spec
    assert spec.name == "book"
    assert spec.description == "Book a table."
    assert "ctx" not in spec.parameters["properties"]


def test_optional_enum_is_any_of() -> None:
    def pick(day: Literal["mon", "tue"] | None = None) -> str:
        """Pick."""
        return ""

    assert tool_schema(pick)["properties"]["day"] == {
        "anyOf": [{"enum": ["mon", "tue"], "type": "string"}, {"type": "null"}],
        "default": None,
    }


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("def f(x: dict) -> None: ...", "unsupported annotation 'dict'"),
        ("def f(x) -> None: ...", "no type annotation"),
        ("def f(*args: int) -> None: ...", "*args"),
        ("def f(x: int | str) -> None: ...", "only `X | None`"),
        ("def f(x: list) -> None: ...", "item type"),
        ("def f(x: 'Missing') -> None: ...", "cannot resolve"),
    ],
)
def test_unsupported_signatures(source: str, problem: str) -> None:
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    with pytest.raises(ToolSchemaError, match=problem.replace("*", r"\*").replace("|", r"\|")):
        tool_schema(namespace["f"])


# --- loading ---


def write_module(tmp_path: Path, body: str, name: str = "mytools.py") -> Path:
    path = tmp_path / name
    path.write_text("from server.tools import CallContext, ToolError, tool\n"
                    + textwrap.dedent(body))
    return path


async def test_module_by_path(tmp_path: Path) -> None:
    path = write_module(tmp_path, '''
        @tool
        def add(a: int, b: int = 2) -> int:
            """Add."""
            return a + b

        def helper() -> None:
            """Not a tool."""
    ''')
    box = load_toolbox(settings(tools_module=str(path)))
    assert [s.name for s in box.specs()] == ["add"]
    assert await box.run("add", '{"a": 1}', CONTEXT) == (OK, "3")


async def test_module_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, '''
        @tool
        async def hello(ctx: CallContext) -> str:
            """Say hello to the caller."""
            return f"hello {ctx.caller}"
    ''', "bridge_test_tools_by_name.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        box = load_toolbox(settings(tools_module="bridge_test_tools_by_name"))
        assert await box.run("hello", "", CONTEXT) == (OK, '"hello +15550001111"')
    finally:
        sys.modules.pop("bridge_test_tools_by_name", None)


def test_shipped_example_module_loads() -> None:
    box = load_toolbox(settings(tools_module=str(ROOT / "config" / "tools" / "example.py")))
    assert {s.name for s in box.specs()} == {"lookup_order", "opening_hours"}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("raise RuntimeError('boom')", "importing .* failed: RuntimeError: boom"),
        ("x = 1", "defines no functions marked @tool"),
        ('@tool\ndef f(x: set[int]) -> None:\n    """F."""', "f: parameter 'x': unsupported"),
        ("@tool\ndef f() -> None:\n    pass", "f has no docstring"),
        ('@tool\ndef end_call() -> None:\n    """E."""', "name of a built-in tool"),
    ],
)
def test_bad_module_is_a_config_error(tmp_path: Path, body: str, problem: str) -> None:
    path = write_module(tmp_path, body + "\n")
    with pytest.raises(ConfigError, match=problem) as e:
        load_toolbox(settings(tools_module=str(path)))
    assert e.value.variable == "TOOLS_MODULE"


def test_missing_module_and_file() -> None:
    with pytest.raises(ConfigError, match="no module named 'no_such_tools_module'"):
        load_toolbox(settings(tools_module="no_such_tools_module"))
    with pytest.raises(ConfigError, match="no file at"):
        load_toolbox(settings(tools_module="/nowhere/tools.py"))
    with pytest.raises(ConfigError, match="TOOLS_FILE: no file at"):
        load_toolbox(settings(tools_file=Path("/nowhere/tools.json")))


def write_json(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(data))
    return path


HTTP_TOOL = {"name": "check", "description": "Check a thing.", "url": "http://127.0.0.1:9/x",
             "parameters": {"type": "object", "properties": {"code": {"type": "string"}},
                            "required": ["code"]}}


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"tools": [{**HTTP_TOOL, "urll": "x"}]}, "unknown key 'urll'"),
        ({"tools": [{**HTTP_TOOL, "url": "ftp://x"}]}, "url must be an http"),
        ({"tools": [{**HTTP_TOOL, "name": "bad name"}]}, "name must be"),
        ({"tools": [{**HTTP_TOOL, "description": ""}]}, "description is required"),
        ({"tools": [{**HTTP_TOOL, "parameters": {"type": "string"}}]}, "parameters must be"),
        ({"tools": [HTTP_TOOL, HTTP_TOOL]}, "already defined"),
        ({"tool": []}, "must hold"),
    ],
)
def test_bad_tools_file(tmp_path: Path, data: Any, problem: str) -> None:
    path = write_json(tmp_path, data)
    with pytest.raises(ConfigError, match=problem):
        load_toolbox(settings(tools_file=path, tools_secret="s3cret-key"))


def test_tools_file_needs_a_secret_and_valid_json(tmp_path: Path) -> None:
    path = write_json(tmp_path, [HTTP_TOOL])
    with pytest.raises(ConfigError, match="TOOLS_SECRET: is required"):
        load_toolbox(settings(tools_file=path))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_toolbox(settings(tools_file=path, tools_secret="k"))


def test_duplicate_across_module_and_file(tmp_path: Path) -> None:
    module = write_module(tmp_path, '@tool\ndef check(code: str) -> str:\n    """C."""\n'
                                    "    return code\n")
    path = write_json(tmp_path, [HTTP_TOOL])
    with pytest.raises(ConfigError, match="'check' is already defined"):
        load_toolbox(settings(tools_module=str(module), tools_file=path, tools_secret="k"))


def test_settings_from_env() -> None:
    base = {"OPENAI_API_KEY": "sk-x"}
    s = Settings.from_env({**base, "TOOL_TIMEOUT": "3", "KEYPAD": "off", "GREETING": "Hi",
                           "TRANSFER_TARGETS": "sales=+15550001111, support=sip:desk@example.com",
                           "TOOLS_SECRET": "hush-hush", "HOLD_AUDIO": ""})
    assert s.tool_timeout == 3.0 and s.keypad is False and s.greeting == "Hi"
    assert s.transfer_targets == (("sales", "+15550001111"), ("support", "sip:desk@example.com"))
    assert s.hold_audio is None
    assert "hush-hush" in s.secrets
    assert Settings.from_env(base).hold_audio == Settings(openai_api_key="x").hold_audio
    assert Settings.from_env({**base, "HOLD_AUDIO": "off"}).hold_audio is None
    assert Settings.from_env({**base, "TOOLS_FILE": "off"}).tools_file is None
    for bad in ("sales", "sales=5550001111", "a=+15550001111,a=+15550001112", "x y=+1555000111"):
        with pytest.raises(ConfigError, match="TRANSFER_TARGETS"):
            parse_transfer_targets(bad)
    with pytest.raises(ConfigError, match="KEYPAD"):
        Settings.from_env({**base, "KEYPAD": "maybe"})


# --- running: every failure is an error output ---


async def test_run_failures_become_error_outputs(caplog: pytest.LogCaptureFixture) -> None:
    @tool
    async def boom() -> None:
        """Fail."""
        raise KeyError("secret internals")

    @tool
    async def told() -> None:
        """Fail politely."""
        raise ToolError("no order with that number")

    @tool
    def odd() -> object:
        """Return something JSON cannot hold."""
        return {1, 2}

    @tool
    async def huge() -> str:
        """Too much."""
        return "x" * (MAX_OUTPUT_CHARS + 1)

    @tool
    def needs(n: int, kind: Literal["a", "b"] = "a") -> int:
        """Needs n."""
        return n

    @tool
    async def nothing() -> None:
        """Return nothing."""

    box = toolbox_of(boom, told, odd, huge, needs, nothing)
    caplog.set_level(logging.INFO, "test.tools")

    async def run(name: str, args: str = "{}") -> tuple[str, Any]:
        outcome, output = await box.run(name, args, CONTEXT)
        return outcome, orjson.loads(output)

    assert await run("boom") == ("error", {"error": "boom failed"})
    assert "secret internals" not in json.dumps(await run("boom"))
    assert await run("told") == ("error", {"error": "no order with that number"})
    assert await run("odd") == ("error", {"error": "odd returned a result that could not be read"})
    assert await run("huge") == ("error", {"error": "huge returned too much data"})
    assert await run("nope") == (UNKNOWN_TOOL, {"error": "there is no tool named 'nope'"})
    assert await run("needs", "{not json") == (
        INVALID_ARGUMENTS, {"error": "the arguments were not valid JSON"})
    assert await run("needs", "[1]") == (
        INVALID_ARGUMENTS, {"error": "the arguments must be a JSON object"})
    assert await run("needs", "{}") == (INVALID_ARGUMENTS, {"error": "invalid arguments: n is "
                                                                     "missing"})
    assert (await run("needs", '{"n": "3"}'))[0] == INVALID_ARGUMENTS
    assert (await run("needs", '{"n": 3, "kind": "c"}'))[1] == {
        "error": 'invalid arguments: kind must be one of "a", "b"'}
    assert (await run("needs", '{"n": 3, "m": 1}'))[1] == {
        "error": "invalid arguments: unknown argument 'm'"}
    assert await run("needs", '{"n": 3}') == (OK, 3)
    assert await run("nothing") == (OK, {"ok": True})
    lines = [r.getMessage() for r in caplog.records]
    assert any("tool boom: error: raised KeyError" in line for line in lines)
    assert any("tool nope: unknown_tool" in line for line in lines)
    assert any("tool needs: invalid_arguments" in line for line in lines)


async def test_timeout_async_and_sync() -> None:
    release = threading.Event()

    @tool
    async def slow_async() -> str:
        """Slow."""
        await asyncio.sleep(30)
        return "late"

    @tool
    def slow_sync() -> str:
        """Slow, in a thread."""
        release.wait(5)
        return "late"

    @tool
    async def own_timeout() -> str:
        """Raises its own TimeoutError: a failure, not TOOL_TIMEOUT."""
        raise TimeoutError

    box = toolbox_of(slow_async, slow_sync, own_timeout, timeout=0.1)
    assert await box.run("slow_async", "{}", CONTEXT) == (
        TIMEOUT, '{"error":"slow_async did not answer within 0.1 seconds"}')
    try:
        outcome, _ = await box.run("slow_sync", "{}", CONTEXT)
        assert outcome == TIMEOUT
    finally:
        release.set()  # the thread cannot be cancelled: let it finish
    assert (await box.run("own_timeout", "{}", CONTEXT))[0] == "error"


async def test_sync_tools_run_in_a_thread() -> None:
    loop_thread = threading.get_ident()

    @tool
    def where() -> bool:
        """Which thread."""
        return threading.get_ident() != loop_thread

    assert await toolbox_of(where).run("where", "", CONTEXT) == (OK, "true")


async def test_cancellation_propagates() -> None:
    started = asyncio.Event()

    @tool
    async def forever() -> None:
        """Never ends."""
        started.set()
        await asyncio.Event().wait()

    task = asyncio.ensure_future(toolbox_of(forever).run("forever", "{}", CONTEXT))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_check_arguments_subset() -> None:
    schema = {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "integer"}},
        "when": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
    assert check_arguments(schema, {"items": [1, 2], "when": None}) is None
    assert check_arguments(schema, {"items": [1, True]}) == "items[1] must be integer"
    assert check_arguments(schema, {"when": 3}) == "when does not match any allowed form"


# --- HTTP tools, over a real loopback server ---


async def test_http_tool_signed_post(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    seen: list[tuple[bytes, str]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append((body, request.headers.get(SIGNATURE_HEADER, "")))
        if request.path == "/fail":
            return web.Response(status=500)
        if request.path == "/text":
            return web.Response(text="not json")
        return web.json_response({"appointment": "Tuesday 10:00"})

    app = web.Application()
    app.router.add_post("/{name}", handle)
    server = await aiohttp_server(app)
    path = write_json(tmp_path, {"tools": [
        {**HTTP_TOOL, "name": name, "url": str(server.make_url(f"/{route}"))}
        for name, route in (("check", "ok"), ("broken", "fail"), ("texty", "text"))]})
    secret = "tools-secret-0123"
    box = load_toolbox(settings(tools_file=path, tools_secret=secret))
    async with aiohttp.ClientSession() as http:
        assert await box.run("check", '{"code": "A1"}', CONTEXT, http) == (
            OK, '{"appointment":"Tuesday 10:00"}')
        assert await box.run("broken", '{"code": "A1"}', CONTEXT, http) == (
            "error", '{"error":"broken failed"}')
        assert await box.run("texty", '{"code": "A1"}', CONTEXT, http) == (
            "error", '{"error":"texty returned an answer that could not be read"}')
        assert (await box.run("check", "{}", CONTEXT, http))[0] == INVALID_ARGUMENTS
    assert len(seen) == 3
    body, signature = seen[0]
    assert orjson.loads(body) == {"call_sid": "CA123", "caller": "+15550001111",
                                  "called": "+15550002222", "name": "check",
                                  "arguments": {"code": "A1"}}
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert signature == f"sha256={expected}"


async def test_http_tool_unreachable_and_slow(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]],
    unused_tcp_port: int,
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/slow", slow)
    server = await aiohttp_server(app)
    path = write_json(tmp_path, [
        {**HTTP_TOOL, "name": "down", "url": f"http://127.0.0.1:{unused_tcp_port}/x"},
        {**HTTP_TOOL, "name": "slow", "url": str(server.make_url("/slow"))}])
    box = load_toolbox(settings(tools_file=path, tools_secret="k", tool_timeout=5.0))
    async with aiohttp.ClientSession() as http:
        assert await box.run("down", '{"code": "1"}', CONTEXT, http) == (
            "error", '{"error":"down could not be reached"}')
        box.timeout = 0.2
        assert (await box.run("slow", '{"code": "1"}', CONTEXT, http))[0] == TIMEOUT


# --- sync tools on their own threads ---


async def test_hung_sync_tools_starve_neither_other_tools_nor_the_default_executor() -> None:
    """As many hung sync tools as asyncio's default executor has threads: other sync tools
    still run (TOOL_THREADS is larger), and so does everything else on the default executor
    (recordings, the records writer)."""
    release = threading.Event()
    hung = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default size

    @tool
    def stuck() -> str:
        """Never answers (until the test ends)."""
        release.wait()
        return "late"

    @tool
    def quick() -> str:
        """Answers at once."""
        return "fine"

    box = Toolbox({t.spec.name: t for t in (python_tool(stuck), python_tool(quick))}, 1.0,
                  threads=hung + 2)
    ctx = CallContext("+1", "+2", "CA1", logging.getLogger("test"))
    try:
        stuck_calls = [asyncio.ensure_future(box.run("stuck", "{}", ctx))
                       for _ in range(hung)]
        await wait_until(lambda: len(box.threads.busy) == hung, 5.0, "every stuck tool running")
        assert await box.run("quick", "{}", ctx) == (OK, '"fine"')
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 5.0) == 42
        assert [outcome for outcome, _ in await asyncio.gather(*stuck_calls)] == \
            [TIMEOUT] * hung
    finally:
        release.set()
        box.close()


async def test_tool_threads_are_bounded_and_left_behind_at_close(
        caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    threads = ToolThreads(2)
    try:
        running = [asyncio.ensure_future(threads.run(release.wait, f"stuck{i}"))
                   for i in range(3)]
        await wait_until(lambda: len(threads.busy) == 2, 5.0, "two threads busy")
        assert not running[2].done()  # the third waits for a free thread: the pool is bounded
        threads.close()
        assert "2 tool thread(s) still running at shutdown, left behind: stuck" in caplog.text
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("tool-"))
    finally:
        release.set()
    for task in running[:2]:
        assert await asyncio.wait_for(task, 5.0) is True
    running[2].cancel()
