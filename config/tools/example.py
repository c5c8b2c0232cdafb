"""Example tools: `TOOLS_MODULE=config/tools/example.py make run`.

Each function marked `@tool` is offered to the model: its name, its docstring (the model reads it to
decide when to call), and its parameters' types. Return anything JSON can hold; raise
`ToolError("...")` to give the model a message it can pass on to the caller.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from server.tools import CallContext, ToolError, tool

_ORDERS = {
    "1234": {"status": "shipped", "carrier": "UPS", "expected": "tomorrow"},
    "5678": {"status": "being packed", "expected": "in three days"},
}


@tool
async def lookup_order(order_id: str, ctx: CallContext, include_items: bool = False) -> dict:
    """Look up an order by its number and tell its status and expected delivery."""
    ctx.log.info("looking up an order")  # the call's logger: the line carries the call's ids
    await asyncio.sleep(0.2)  # a real tool would ask a database or an API here
    order = _ORDERS.get(order_id.strip().replace(" ", ""))
    if order is None:
        raise ToolError(f"there is no order number {order_id}")
    result = {"order_id": order_id, **order}
    if include_items:
        result["items"] = ["blue mug", "tea sampler"]
    return result


@tool
def opening_hours(day: Literal["weekday", "saturday", "sunday"] | None = None) -> str:
    """Tell the shop's opening hours, for one kind of day or for the whole week."""
    hours = {"weekday": "9 am to 6 pm", "saturday": "10 am to 4 pm", "sunday": "closed"}
    if day is None:
        return "; ".join(f"{d}: {h}" for d, h in hours.items())
    return hours[day]  # a plain function runs in a thread, so it may block briefly
