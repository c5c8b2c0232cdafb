"""Operators' credentials: OPERATOR_TOKENS, the session cookie, the same-origin check, and the
console's own routes, over real loopback HTTP (the app as create_app builds it)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from unittest import mock

import pytest
from aiohttp import WSServerHandshakeError, web
from aiohttp.test_utils import TestClient, make_mocked_request
from yarl import URL

from server.app import create_app
from server.console.auth import COOKIE, Operators, operator_of, operator_route
from server.console.throttle import FAILURES, WINDOW_S, Throttle, client_of
from server.settings import ConfigError, Settings
from tests.conftest import MakeRig
from tests.console_fake import ADMIN, ANN, BOB, console_settings

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- the setting ---


def test_operator_tokens_are_parsed_and_secret() -> None:
    s = Settings.from_env({"OPENAI_API_KEY": "sk-x", "ADMIN_TOKEN": ADMIN,
                           "OPERATOR_TOKENS": f" ann={ANN} , bob={BOB},"})
    assert s.operator_tokens == (("ann", ANN), ("bob", BOB))
    assert {ANN, BOB, ADMIN} <= set(s.secrets)
    assert ANN not in repr(s)
    assert Operators.from_settings(s).names == ("admin", "ann", "bob")


@pytest.mark.parametrize(("value", "problem"), [
    ("ann", "not name=token"),
    ("a n=" + ANN, "not name=token"),
    ("ann=tiny-token", "shorter than 16"),
    (f"ann={ANN},ann={BOB}", "listed twice"),
    (f"admin={ANN}", "ADMIN_TOKEN's operator"),
    (f"ann={ANN},bob={ANN}", "also another operator's"),
    (f"ann={ADMIN}", "also another operator's"),
])
def test_bad_operator_tokens_name_the_problem_not_the_token(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"OPENAI_API_KEY": "sk-x", "ADMIN_TOKEN": ADMIN,
                           "OPERATOR_TOKENS": value})
    message = str(raised.value)
    assert message.startswith("OPERATOR_TOKENS: ") and problem in message
    for token in (ANN, BOB, ADMIN, "tiny-token"):
        assert token not in message


# --- tokens and the session value ---


def test_tokens_name_their_operator_and_nothing_else_does() -> None:
    operators = Operators({"admin": ADMIN, "ann": ANN})
    assert operators.by_token(ANN) == "ann" and operators.by_token(ADMIN) == "admin"
    for wrong in ("", ANN[:-1], ANN + "x", ANN.upper(), f" {ANN}"):
        assert operators.by_token(wrong) is None
    assert not Operators({}).enabled


def test_the_session_cookie_is_signed_expires_and_ends_with_the_token() -> None:
    now = [1_000_000.0]
    operators = Operators({"ann": ANN, "bob": BOB}, session_seconds=60, clock=lambda: now[0])
    value = operators.session_value("ann")
    assert ANN not in value
    assert operators.session_operator(value) == "ann"
    _, expires, mac = value.split(".")
    other = "B" if mac.endswith("A") else "A"
    for forged in (f"bob.{expires}.{mac}", f"ann.{int(expires) + 3600}.{mac}",
                   f"ann.{expires}.{mac[:-1]}{other}", f"ann.{expires}", "ann", "", "..",
                   f"eve.{expires}.{mac}", f"ann.-1.{mac}"):
        assert operators.session_operator(forged) is None, forged
    now[0] += 61
    assert operators.session_operator(value) is None  # expired
    now[0] -= 61
    rotated = Operators({"ann": ANN + "-new", "bob": BOB}, clock=lambda: now[0])
    assert rotated.session_operator(value) is None  # a new token ends old sessions
    # Another instance of the fleet with the same tokens accepts it: nothing is shared.
    assert Operators({"ann": ANN, "bob": BOB}, clock=lambda: now[0]).session_operator(
        value) == "ann"


def test_a_client_that_keeps_guessing_is_refused_for_a_while() -> None:
    now = [5_000.0]
    throttle = Throttle(failures=3, window_s=60, max_clients=2, clock=lambda: now[0])
    for _ in range(2):
        throttle.failed("203.0.113.9")
        now[0] += 10
    assert throttle.retry_after("203.0.113.9") == 0  # two wrong tokens: still welcome
    throttle.failed("203.0.113.9")  # the third, at 5020
    assert throttle.retry_after("203.0.113.9") == 40  # until the first one (5000) ages out
    assert throttle.retry_after("198.51.100.7") == 0  # nobody else is refused
    now[0] += 40
    assert throttle.retry_after("203.0.113.9") == 0  # a sliding window: one more try now
    throttle.failed("203.0.113.9")
    assert throttle.retry_after("203.0.113.9") == 10
    # Bounded: a third client pushes out the one seen first.
    throttle.failed("198.51.100.7")
    throttle.failed("192.0.2.1")
    assert set(throttle._seen) == {"198.51.100.7", "192.0.2.1"}


def test_the_client_is_the_peer_or_what_our_own_proxy_says() -> None:
    def request(peer: str, forwarded: str | None = None) -> web.Request:
        transport = mock.Mock()
        transport.get_extra_info.side_effect = (
            lambda key, default=None: (peer, 443) if key == "peername" else default)
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        return make_mocked_request("POST", "/console/login", headers=headers,
                                   transport=transport)

    assert client_of(request("198.51.100.7")) == "198.51.100.7"
    # From the internet, a client's own X-Forwarded-For is ignored...
    assert client_of(request("198.51.100.7", "203.0.113.1")) == "198.51.100.7"
    # ...behind our proxy, the entry it added (the last) is the client, not the ones before it.
    assert client_of(request("10.0.0.5", "203.0.113.1, 198.51.100.7")) == "198.51.100.7"
    assert client_of(request("127.0.0.1", "203.0.113.1")) == "203.0.113.1"
    assert client_of(request("10.0.0.5")) == "10.0.0.5"


# --- over HTTP, the app as it runs ---


@pytest.fixture
async def console(aiohttp_client: MakeClient) -> Client:
    settings = console_settings(database_url="off")
    app = create_app(settings)
    app.router.add_get("/test/socket", socket_route)
    return await aiohttp_client(app)


@operator_route
async def socket_route(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str(operator_of(request))
    await ws.close()
    return ws


async def session_cookie(client: Client, token: str = ANN, **headers: str) -> str:
    response = await client.post("/console/login", data={"token": token, "next": "/console"},
                                 allow_redirects=False, headers=headers)
    assert response.status == 303, await response.text()
    assert response.headers["Location"] == "/console"
    client.session.cookie_jar.clear()  # each request below says which cookie it sends
    return response.cookies[COOKIE].value


async def test_login_sets_a_strict_http_only_cookie(console: Client) -> None:
    response = await console.post("/console/login", data={"token": ANN, "next": "/console"},
                                  allow_redirects=False)
    assert response.status == 303
    header = response.headers["Set-Cookie"]
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/" in header
    assert "Secure" not in header  # plain http, no proxy
    assert ANN not in header
    behind_tls = await console.post("/console/login", data={"token": ANN},
                                    headers={"X-Forwarded-Proto": "https"},
                                    allow_redirects=False)
    assert "Secure" in behind_tls.headers["Set-Cookie"]
    wrong = await console.post("/console/login", data={"token": "nope"}, allow_redirects=False)
    assert wrong.status == 401 and "not valid" in await wrong.text()
    assert COOKIE not in wrong.cookies
    logout = await console.post("/console/logout", allow_redirects=False)
    assert logout.status == 303 and 'bridge_console=""' in logout.headers["Set-Cookie"]
    assert "Max-Age=0" in logout.headers["Set-Cookie"]


async def test_login_goes_back_only_to_a_console_page(console: Client) -> None:
    for given, expected in (("/console/history?number=%2B1555", "/console/history?number=%2B1555"),
                            ("//evil.example/console", "/console"),
                            ("https://evil.example/", "/console"),
                            ("/console/\\evil", "/console"), ("/calls", "/console")):
        response = await console.post("/console/login", data={"token": ANN, "next": given},
                                      allow_redirects=False)
        assert response.headers["Location"] == expected, given


async def test_pages_need_a_session_and_carry_a_strict_policy(console: Client) -> None:
    response = await console.get("/console/calls/CA1", allow_redirects=False)
    assert response.status == 303
    assert response.headers["Location"] == "/console/login?next=/console/calls/CA1"
    cookie = await session_cookie(console)
    page = await console.get("/console/calls/CA1", cookies={COOKIE: cookie})
    assert page.status == 200 and '<script type="module"' in await page.text()
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    config = await (await console.get("/console/config", cookies={COOKIE: cookie})).json()
    assert config["operator"] == "ann" and config["transfer_targets"] == ["sales", "support"]
    script = await console.get("/console/static/js/main.js")  # public: no data in it
    assert script.status == 200 and script.content_type == "text/javascript"
    for path in ("/console/static/%2e%2e/auth.py", "/console/static/js/..%2f..%2fauth.py",
                 "/console/static/nope.js", "/console/static/js", "/console/static/.hidden"):
        response = await console.session.get(URL(str(console.make_url("")) + path,
                                                 encoded=True))
        assert response.status == 404, path
        assert "Operators" not in await response.text()


async def test_every_operator_route_takes_a_bearer_or_the_cookie(console: Client) -> None:
    cookie = await session_cookie(console, BOB)
    for path in ("/calls", "/stats", "/console/config"):
        assert (await console.get(path)).status == 401, path
        assert (await console.get(path, headers=bearer("wrong-token-0123456789"))).status == 401
        assert (await console.get(path, headers=bearer(ANN))).status == 200, path
        assert (await console.get(path, headers=bearer(ADMIN))).status == 200, path
        assert (await console.get(path, cookies={COOKIE: cookie})).status == 200, path
        forged = cookie.replace("bob.", "ann.", 1)
        assert (await console.get(path, cookies={COOKIE: forged})).status == 401, path


async def test_a_cookie_that_changes_state_must_come_from_this_site(console: Client) -> None:
    cookie = {COOKIE: await session_cookie(console)}
    path = "/calls/CAnone/hangup"
    host = f"{console.host}:{console.port}"
    # No Origin, or another site's: refused before anything happens.
    assert (await console.post(path, cookies=cookie)).status == 403
    for origin in ("https://evil.example", f"http://{host}.evil.example", "null",
                   f"http://evil@{host}", f"ftp://{host}"):
        response = await console.post(path, cookies=cookie, headers={"Origin": origin})
        assert response.status == 403, origin
        assert "error" in await response.json()
    # This site, as the browser reached it (directly, or behind a proxy): through (no call).
    assert (await console.post(path, cookies=cookie,
                               headers={"Origin": f"http://{host}"})).status == 404
    proxied = {"Origin": "https://bridge.example", "X-Forwarded-Host": "bridge.example"}
    assert (await console.post(path, cookies=cookie, headers=proxied)).status == 404
    with_port = {"Origin": "https://bridge.example", "Host": "bridge.example:443"}
    assert (await console.post(path, cookies=cookie, headers=with_port)).status == 404
    # A bearer token is never sent by a browser on its own: no Origin needed.
    assert (await console.post(path, headers=bearer(ANN))).status == 404


async def test_socket_upgrades_check_the_origin(console: Client) -> None:
    cookie = await session_cookie(console)
    host = f"{console.host}:{console.port}"
    console.session.cookie_jar.update_cookies({COOKIE: cookie})
    ws = await console.ws_connect("/test/socket", origin=f"http://{host}")
    assert await ws.receive_str() == "ann"
    await ws.close()
    for headers in ({"Origin": "https://evil.example"}, {}):
        with pytest.raises(WSServerHandshakeError) as refused:
            await console.ws_connect("/test/socket", headers=headers)
        assert refused.value.status == 403, headers
    console.session.cookie_jar.clear()
    with pytest.raises(WSServerHandshakeError) as refused:
        await console.ws_connect("/test/socket", origin=f"http://{host}")
    assert refused.value.status == 401
    ws = await console.ws_connect("/test/socket", headers=bearer(BOB))  # a tool: no Origin
    assert await ws.receive_str() == "bob"
    await ws.close()


async def test_no_token_no_console(aiohttp_client: MakeClient,
                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "server"):
        app = create_app(Settings(openai_api_key="sk-x", database_url="off"))
    assert "the operator console is off" in caplog.text
    client = await aiohttp_client(app)
    for path in ("/console", "/console/login", "/console/config", "/calls", "/stats"):
        assert (await client.get(path, headers=bearer(ANN))).status == 404, path


async def test_a_named_operator_hangs_up_a_live_call(make_rig: MakeRig) -> None:
    """POST /calls/{sid}/hangup took ADMIN_TOKEN only; any operator may now."""
    rig = await make_rig(admin_token=None, operator_tokens=(("ann", ANN),))
    stream, _ = await rig.place()
    (call,) = rig.live_calls()
    path = f"/calls/{call.call_sid}/hangup"
    assert (await rig.bridge.post(path, headers=bearer(BOB))).status == 401
    response = await rig.bridge.post(path, headers=bearer(ANN))
    assert response.status == 202, await response.text()
    await asyncio.wait_for(stream.closed.wait(), 10)
    assert call.ending is not None and call.ending.kind == "admin_hung_up"


def test_every_static_file_is_package_data() -> None:
    """An installed bridge (`pip install .`, the Docker image) serves the console too."""
    import configparser
    from fnmatch import fnmatch

    from server.console.routes import STATIC
    from tests.conftest import ROOT

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    globs = [g.strip() for g in config["options.package_data"]["server.console"].split(",")]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert len(files) > 15
    missing = [f for f in files
               if not any(fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert missing == []


async def test_wrong_tokens_from_one_address_lock_that_address_out(
        console: Client, caplog: pytest.LogCaptureFixture) -> None:
    guesser, neighbour = {"X-Forwarded-For": "203.0.113.9"}, {"X-Forwarded-For": "203.0.113.10"}
    with caplog.at_level(logging.WARNING, "server.console"):
        for attempt in range(FAILURES - 1):
            wrong = await console.post("/console/login", data={"token": f"guess-{attempt}"},
                                       headers=guesser, allow_redirects=False)
            assert wrong.status == 401
        # The last guess it is allowed, as a bearer token on the API.
        wrong = await console.get("/calls", headers={**guesser, **bearer("guess-on-the-api")})
        assert wrong.status == 401
        # Now even the right token is refused from there, with when to come back.
        refused = await console.post("/console/login", data={"token": ANN}, headers=guesser,
                                     allow_redirects=False)
        assert refused.status == 429 and COOKIE not in refused.cookies
        assert 0 < int(refused.headers["Retry-After"]) <= WINDOW_S
        assert "Too many wrong tokens" in await refused.text()
        api = await console.get("/calls", headers={**guesser, **bearer(ANN)})
        assert api.status == 429 and "too many" in (await api.json())["error"]
        assert api.headers["Retry-After"]
    assert caplog.text.count("wrong operator tokens from 203.0.113.9") == 1
    assert ANN not in caplog.text and "guess-" not in caplog.text
    # Another address, and a session already open, are not affected.
    assert (await console.get("/calls", headers={**neighbour, **bearer(ANN)})).status == 200
    cookie = await session_cookie(console, ANN, **neighbour)
    assert (await console.get("/calls", cookies={COOKIE: cookie}, headers=guesser)).status == 200
