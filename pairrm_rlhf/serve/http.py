"""The HTTP server around the app: uvicorn's h11 protocol with deadlines and connection caps, binding, Host checks.

A client cannot hold the server: request heads must arrive within `header_timeout_s` (else 408 and the connection
is closed; uvicorn alone times out idle keep-alive connections only, so a client trickling its headers would hold
its connection forever), and connections are capped per client address (`max_connections_per_client`) and in all
(`max_connections`). At a cap the oldest *idle* connection (no request in progress: still sending its head, or
waiting between keep-alive requests) is closed to make room, so a flood of idle sockets cannot lock out a new
request (a load balancer's `/health` included); only when every connection is busy is the new one refused, with
a JSON 503 and `Retry-After` (uvicorn's own cap answers plain text, so it is off).

DNS rebinding: a web page can make a browser send requests to `localhost` under the page's own host name; such a
request carries that name in `Host`. `host_allowed` accepts IP literals, `localhost` and `--allowed_hosts` only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import ServeArguments
from .limits import dumps

logger = logging.getLogger(__name__)


def raw_response(status: str, message: str, headers: tuple[str, ...] = ()) -> bytes:
    """A complete JSON error response that closes the connection, for answers written below the app."""
    body = dumps({"error": message})
    head = [
        f"HTTP/1.1 {status}",
        "content-type: application/json",
        "connection: close",
        f"content-length: {len(body)}",
        *headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request heads and per-client and total connection caps (module
    docstring). Class attributes are set per server by `uvicorn_server`."""

    header_timeout = 10.0
    max_connections = 512
    max_per_client = 64
    _head_timer: asyncio.TimerHandle | None = None
    opened = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.opened = time.monotonic()
        peer = self.client[0] if self.client else None
        if not self._make_room(peer):
            logger.warning("refused a connection from %s: %d connections open, all busy", peer, len(self.connections))
            transport.write(
                raw_response(
                    "503 Service Unavailable",
                    "the server has too many connections "
                    "(--max_connections, --max_connections_per_client); retry later",
                    ("retry-after: 1",),
                )
            )
            transport.close()
            return
        self._arm()

    def _make_room(self, peer: str | None) -> bool:
        """Close the oldest idle connection of `peer` when it is at its cap (then of anyone at the total cap);
        False when there is no room and nothing idle to close."""
        for mine_only, cap in ((True, self.max_per_client), (False, self.max_connections)):
            others = [
                c
                for c in self.connections
                if c is not self and (not mine_only or (c.client[0] if c.client else None) == peer)
            ]
            if len(others) < cap:
                continue
            idle = [c for c in others if isinstance(c, GuardedH11) and c.idle() and not c.transport.is_closing()]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c.opened)
            oldest.transport.close()
            oldest.connections.discard(oldest)
        return True

    def idle(self) -> bool:
        """No request in progress: the head has not all arrived, or the last response is complete."""
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request head has arrived: the app's body timeout takes over
        elif self._head_timer is None and not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return
        if self.timeout_keep_alive_task is not None:
            return  # idle after a response: uvicorn's keep-alive timeout closes it
        self.transport.write(
            raw_response(
                "408 Request Timeout",
                f"the request head did not arrive within {self.header_timeout:g} s (--header_timeout_s)",
            )
        )
        self.transport.close()


def uvicorn_server(config: ServeArguments, app: Any) -> uvicorn.Server:
    protocol = type(
        "PairRMH11",
        (GuardedH11,),
        {
            "header_timeout": config.header_timeout_s,
            "max_connections": config.max_connections,
            "max_per_client": config.max_connections_per_client,
        },
    )
    return uvicorn.Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=config.access_log,
            lifespan="on",
            http=protocol,
            ws="none",
            limit_concurrency=None,
            timeout_keep_alive=config.keep_alive_s,
            timeout_graceful_shutdown=config.graceful_timeout_s,
            server_header=False,
        )
    )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def host_allowed(host_header: str | None, allowed: list[str]) -> bool:
    """Whether a request's `Host` may be served: an IP literal (no DNS name can be rebound to it), `localhost`, a
    name in `allowed`, or anything when `allowed` holds `*`. A request without `Host` (HTTP/1.0) is allowed."""
    if host_header is None or "*" in allowed:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".")
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host == "localhost" or host in (name.lower() for name in allowed)
