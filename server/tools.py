"""Write your own tools: mark a function with `@tool`, and the assistant can call it.

    from server.tools import CallContext, tool

    @tool
    async def lookup_order(order_id: str, include_items: bool = False) -> dict:
        \"\"\"Look up an order by its number.\"\"\"

The model sees the function's name, its docstring as the description, and a JSON schema made from
the type hints: str, int, float, bool, `Literal[...]` (an enum), `list[...]`, `X | None`;
parameters with defaults are optional. A parameter annotated `CallContext` is filled in by the
bridge (who is calling, the call's logger) and never shown to the model. Raise `ToolError("…")`
to give the model a message it can pass on. Sync functions run in a
thread so they cannot stall the calls' audio. Standard library only: this is what users import.
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "__bridge_tool__"


@dataclass(frozen=True, slots=True)
class CallContext:
    """The call a tool runs in. The caller's number is real here (tools look people up by it);
    mask it yourself before logging it."""

    caller: str
    called: str
    call_sid: str
    log: logging.Logger | logging.LoggerAdapter[logging.Logger]


class ToolError(Exception):
    """Raise it from a tool to tell the model what went wrong, in words it can pass on
    ("no order with that number"). Any other exception is reported to the model only as a
    failure, so internals never reach the caller."""


class ToolSchemaError(TypeError):
    """A tool's signature cannot be described to the model; the message names the parameter."""


def tool(fn: F) -> F:
    """Mark `fn` as a tool. The function itself is returned unchanged, so it stays callable."""
    if not callable(fn) or not hasattr(fn, "__name__"):
        raise TypeError("@tool marks a function")
    setattr(fn, _MARK, True)
    return fn


def is_tool(obj: object) -> bool:
    return callable(obj) and getattr(obj, _MARK, False) is True


def description_of(fn: Callable[..., Any]) -> str:
    """The docstring, cleaned of indentation: what the model reads to decide when to call."""
    return inspect.getdoc(fn) or ""


def context_parameters(fn: Callable[..., Any]) -> tuple[str, ...]:
    """Names of the parameters the bridge fills with the `CallContext`."""
    hints = _hints(fn)
    return tuple(name for name in inspect.signature(fn).parameters
                 if hints.get(name) is CallContext)


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of `fn`'s parameters (without the CallContext ones).

    Raises ToolSchemaError for `*args`, `**kwargs`, a missing or unsupported annotation."""
    hints = _hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolSchemaError(f"parameter {name!r}: *args and **kwargs cannot be described")
        if param.kind is param.POSITIONAL_ONLY:
            raise ToolSchemaError(f"parameter {name!r}: positional-only parameters are not "
                                  "supported (the model passes arguments by name)")
        if name not in hints:
            raise ToolSchemaError(f"parameter {name!r} has no type annotation")
        hint = hints[name]
        if hint is CallContext:
            continue
        try:
            schema = _schema(hint)
        except ToolSchemaError as e:
            raise ToolSchemaError(f"parameter {name!r}: {e}") from None
        if param.default is param.empty:
            required.append(name)
        elif _jsonable(param.default):
            schema["default"] = param.default
        properties[name] = schema
    result: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        result["required"] = required
    result["additionalProperties"] = False
    return result


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return get_type_hints(fn)
    except Exception as e:  # a NameError in a string annotation, or worse
        raise ToolSchemaError(f"cannot resolve its type hints: {type(e).__name__}: {e}") from None


_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema(hint: Any) -> dict[str, Any]:
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is Literal:
        if not args or not all(type(a) in (str, int, float, bool) for a in args):
            raise ToolSchemaError("Literal values must be str, int, float or bool")
        kinds = {_SCALARS[type(a)] for a in args}
        schema: dict[str, Any] = {"enum": list(args)}
        if len(kinds) == 1:
            schema["type"] = kinds.pop()
        return schema
    if hint is list or origin is list:
        if not args:
            raise ToolSchemaError("list needs an item type, e.g. list[str]")
        return {"type": "array", "items": _schema(args[0])}
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) != 1 or len(args) != 2:
            raise ToolSchemaError(f"only `X | None` unions are supported, not {hint!r}")
        inner = _schema(members[0])
        if "type" in inner and "enum" not in inner:
            return {**inner, "type": [inner["type"], "null"]}
        return {"anyOf": [inner, {"type": "null"}]}
    raise ToolSchemaError(f"unsupported annotation {getattr(hint, '__name__', hint)!r} "
                          "(use str, int, float, bool, Literal[...], list[...] or X | None)")


def _jsonable(value: object) -> bool:
    if value is None or type(value) in (str, int, float, bool):
        return True
    if isinstance(value, list | tuple):
        return all(_jsonable(v) for v in value)
    return False
