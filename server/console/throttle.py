"""Wrong operator tokens, counted per client: a client that keeps guessing is refused for a while.

Tokens are long random strings, so guessing one is hopeless anyway; the throttle keeps a
guesser from costing us work and log lines, and says in one WARNING that someone is trying.
While a client is refused, a right token is refused too, so the answer tells a guesser nothing.

The client is the peer address. Behind a reverse proxy on loopback or a private network
(`_PROXY_NETWORKS`) the peer is the proxy, so the client is the last `X-Forwarded-For` entry:
the one our proxy added (a client can put anything in the entries before it, not in that one).
Counts are kept per instance; a fleet of N instances lets a guesser try N times as often.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import deque
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger("server.console")

FAILURES = 10  # wrong tokens a client may present...
WINDOW_S = 600.0  # ...within this many seconds
MAX_CLIENTS = 10_000  # clients remembered; the oldest are forgotten beyond it


class Throttle:
    """Failed credentials per client, over a sliding window."""

    def __init__(self, failures: int = FAILURES, window_s: float = WINDOW_S, *,
                 max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.window_s = window_s
        self._max_clients = max_clients
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}

    def retry_after(self, client: str) -> int:
        """Seconds until `client` may try again; 0 when it may try now."""
        times = self._recent(client)
        if times is None or len(times) < self.failures:
            return 0
        return max(1, math.ceil(times[0] + self.window_s - self._clock()))

    def failed(self, client: str) -> None:
        """`client` presented a wrong token."""
        times = self._recent(client)
        if times is None:
            if len(self._seen) >= self._max_clients:
                del self._seen[next(iter(self._seen))]
            times = self._seen[client] = deque(maxlen=self.failures)
        times.append(self._clock())
        if len(times) == self.failures:
            log.warning("console: %d wrong operator tokens from %s within %d s; refusing its "
                        "credentials for %d s", self.failures, client, self.window_s,
                        self.retry_after(client))

    def _recent(self, client: str) -> deque[float] | None:
        times = self._seen.get(client)
        if times is None:
            return None
        cutoff = self._clock() - self.window_s
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self._seen[client]
            return None
        return times


def client_of(request: web.Request) -> str:
    """The address a request came from, as far as we can trust it (see the module's docstring)."""
    peer = request.remote or "?"
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded and _behind_proxy(peer):
        nearest = forwarded.rsplit(",", 1)[-1].strip()
        if nearest:
            return nearest
    return peer


_PROXY_NETWORKS = tuple(ipaddress.ip_network(net) for net in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
    "::1/128", "fc00::/7"))


def _behind_proxy(peer: str) -> bool:
    """A peer on loopback or a private network (RFC 1918, carrier-grade NAT, IPv6 unique
    local) is taken for our proxy; anything else is a client."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer.startswith("/")  # a Unix socket: a local proxy
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in _PROXY_NETWORKS)

