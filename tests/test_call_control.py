"""An operator hangs up a live call: POST /calls/{sid}/hangup, bearer ADMIN_TOKEN."""

from __future__ import annotations

import asyncio

from server.app import STATE
from tests.conftest import MakeRig

WAIT = 10.0


async def test_admin_hangup_ends_the_call_with_a_hangup(make_rig: MakeRig) -> None:
    rig = await make_rig(admin_token="admin-secret-123")
    stream, session = await rig.place()
    (call,) = rig.live_calls()
    path = f"/calls/{call.call_sid}/hangup"
    assert (await rig.bridge.post(path)).status == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await rig.bridge.post(path, headers=wrong)).status == 401
    good = {"Authorization": "Bearer admin-secret-123"}
    assert (await rig.bridge.post("/calls/CA404/hangup", headers=good)).status == 404
    resp = await rig.bridge.post(path, headers=good)
    assert resp.status == 202
    await asyncio.wait_for(stream.closed.wait(), WAIT)
    await asyncio.wait_for(session.closed.wait(), WAIT)
    assert call.ending is not None and call.ending.kind == "admin_hung_up"
    decision = await rig.app[STATE].get_decision(call.call_sid)
    assert decision is not None and decision["action"] == "hangup"


async def test_hangup_route_is_off_without_admin_token(make_rig: MakeRig) -> None:
    rig = await make_rig()
    assert (await rig.bridge.post("/calls/CA1/hangup")).status in (404, 405)
