"""The HTTP app: routes, authentication, body reading with timeouts, and the uvicorn server around it.

Built on Starlette + uvicorn (h11): small, pure Python, graceful shutdown (in-flight requests are answered), easy to
run in a thread for tests. Every route validates and renders in a request thread with the `PairRM` methods
themselves (so answers and error messages are the library's), over one shared `PairRM(QueueBackend(...))`: the
forward passes of all requests go through the fair batching queue (`batcher`), so the event loop never blocks on the
model and a large request cannot hold up a small one for more than about two batches.

A client cannot hold the server: request heads must arrive within `header_timeout_s` and bodies within
`body_timeout_s` (else 408 and the connection is closed), idle keep-alive connections close after `keep_alive_s`,
and only requests whose body has arrived count against `max_concurrency` (slow senders use up connections, capped
by `max_connections`, not compute slots).

Routes (all POST unless noted; JSON bodies; errors are `{"error": "..."}` with a 4xx/5xx status):
    /get_reward      OpenRLHF (see `openrlhf`) -> {"rewards": [...], "scores": [...], "extra_logs": {...}}
    /compare /probability /rank /rank_with_ref /compare_conversations   the `PairRM` methods -> {"result": ...}
    /judge           `PairRMJudge.judge` -> {"result": ...}
    /pair_logits     prepared triples -> {"logits": [...]} (single order, or two-order with "two_order": true)
    /truncation_rate prepared triples -> {"truncation_rate": x}
    GET /health      {"status": "ok", "identity": {...}, "template": ..., queue counters}
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..backends.remote import from_wire
from ..core import aggregation
from ..pairrm import PairRM
from ..trl.judge import PairRMJudge
from .batcher import QueueBackend, RequestTooLarge
from .config import ServeArguments
from .limits import ApiError, as_list, check_limits, dumps, fields, pair_lengths, reject_constant
from .openrlhf import QueryParser, ReferenceTable, RewardRequests

logger = logging.getLogger(__name__)


def json_response(content: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(content), status_code=status, headers=headers, media_type="application/json")


def error_response(status: int, message: str, headers: dict | None = None) -> Response:
    return json_response({"error": message}, status, headers)


class Service:
    """The routes' logic over one loaded `PairRM` (sync handlers run in request threads; see `build_app`)."""

    API = {  # route: (required fields, optional fields -> scalar type, or None for PairRM-validated values)
        "compare": (("inputs", "candidates_A", "candidates_B"), {"instructions": None, "return_logits": bool, "mode": str}),
        "probability": (("inputs", "candidates_A", "candidates_B"), {"instructions": None, "temperature": float}),
        "rank": (("inputs", "candidates"), {"instructions": None, "return_scores": bool}),
        "rank_with_ref": (("inputs", "candidates"), {"instructions": None, "return_scores": bool, "ref_mode": str, "ref_candidates": None}),
        "compare_conversations": (("conversations_a", "conversations_b"), {"return_logits": bool, "mode": str}),
    }

    def __init__(self, config: ServeArguments, model: PairRM, batch_size: int | None = None):
        self.config = config
        self.model = model
        self.token = config.resolved_token()
        self.rewards = RewardRequests(
            QueryParser(config.chat_format, config.separator, config.split_regex, config.strip_strings),
            ReferenceTable.from_file(config.reference_file, config.prompt_column, config.reference_column)
            if config.reference_file else None,
            config.reference, config.labels_as_reference,
        )
        self.queue = QueueBackend(
            model.backend, lengths=pair_lengths(model.backend), max_batch_pairs=config.max_batch_pairs,
            max_batch_tokens=config.max_batch_tokens, max_wait_ms=config.max_wait_ms, max_pairs=config.max_pairs,
            max_tokens=config.max_request_tokens, batch_size=batch_size,
        )
        self.pairrm = PairRM(self.queue, kind=model.kind, template=model.template)
        self.judge = PairRMJudge(self.pairrm)
        self.slots = threading.BoundedSemaphore(config.max_concurrency)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # the identity hashes every weight once (seconds for a large model): before serving, not on the event loop
        self.identity = await asyncio.get_running_loop().run_in_executor(None, self.model.backend.identity)
        self.queue.start()
        self.pool = concurrent.futures.ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="pairrm-request")
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, self.queue.stop)
            self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- sync handlers (request threads) ----
    def api(self, route: str, body: dict) -> dict:
        required, optional = self.API[route]
        kwargs = fields(body, required, optional)
        if route.startswith("rank") and kwargs["inputs"] == [] and kwargs["candidates"] == []:
            return {"result": []}  # no inputs, no rows (the library's rank/rank_with_ref fail on this edge)
        if route == "rank" and isinstance(kwargs["candidates"], list):  # N^2 pairs: check before building them
            pairs = sum(len(c) * (len(c) - 1) for c in kwargs["candidates"] if isinstance(c, list))
            if pairs > self.config.max_pairs:
                raise RequestTooLarge(f"the request needs {pairs} pair forwards; the limit is {self.config.max_pairs} (--max_pairs)")
        return {"result": getattr(self.pairrm, route)(**kwargs).tolist()}

    def judge_route(self, body: dict) -> dict:
        kwargs = fields(body, ("prompts", "completions"), {"shuffle_order": bool, "return_scores": bool, "temperature": float})
        return {"result": self.judge.judge(**kwargs)}

    def _triples(self, body: dict, optional: dict) -> tuple[list, dict]:
        kwargs = fields(body, ("triples",), optional)
        triples = []
        for i, triple in enumerate(as_list("triples", kwargs["triples"])):
            if not (isinstance(triple, list) and len(triple) == 3):
                raise ApiError(400, f"triples[{i}] must be a list of 3 texts [source, A, B]")
            triples.append(tuple(from_wire(f"triples[{i}][{k}]", text) for k, text in enumerate(triple)))
        return triples, kwargs

    def pair_logits(self, body: dict) -> dict:
        triples, kwargs = self._triples(body, {"two_order": bool})
        fn = self.pairrm.two_order_logits if kwargs.get("two_order", False) else self.pairrm.pair_logits
        return {"logits": fn(triples).tolist()}

    def truncation_rate(self, body: dict) -> dict:
        triples, _ = self._triples(body, {})
        if len(triples) > self.config.max_pairs:
            raise RequestTooLarge(f"the request has {len(triples)} triples; the limit is {self.config.max_pairs} (--max_pairs)")
        return {"truncation_rate": self.queue.truncation_rate(triples)}

    def get_reward(self, body: dict) -> dict:
        z = self.pairrm.two_order_logits(self.rewards.triples(body))
        rewards = aggregation.probability(z, self.config.temperature) if self.config.output == "probability" else z
        return RewardRequests.answer(rewards, z)

    def health(self) -> dict:
        pairs, tokens = self.queue.pending()
        return {"status": "ok", "identity": self.identity, "template": self.model.template,
                **self.queue.stats, "queued_pairs": pairs, "queued_tokens": tokens}

    # ---- async plumbing ----
    def authorized(self, request: Request) -> bool:
        """`Authorization: Bearer <token>`, or `?token=<token>` in the URL (OpenRLHF sends no headers)."""
        if self.token is None:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip() if scheme.lower() == "bearer" else request.query_params.get("token", "")
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    async def read_body(self, request: Request) -> bytes:
        """The raw body, within `max_body_bytes` (refused from Content-Length before reading, or as soon as a chunked
        stream passes it) and `body_timeout_s` (else 408)."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "invalid Content-Length")
            if int(length) > limit:
                raise ApiError(413, f"request body has {int(length)} bytes; the limit is {limit} (--max_body_bytes)")

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body exceeds {limit} bytes (--max_body_bytes)")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.config.body_timeout_s)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.config.body_timeout_s:g} s "
                                "(--body_timeout_s)") from None

    def handle(self, handler: Callable[[dict], dict], raw: bytes) -> bytes:
        """Parse, check limits, run the route, serialize: all in a request thread, off the event loop."""
        try:
            body = json.loads(raw, parse_constant=reject_constant)
        except RecursionError:
            raise ApiError(400, "malformed JSON: nested too deeply") from None
        except ValueError as error:  # JSONDecodeError, bad UTF-8, NaN/Infinity
            raise ApiError(400, f"malformed JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        check_limits(body, self.config.max_items, self.config.max_text_chars)
        result = handler(body)
        try:
            return dumps(result)
        except ValueError as error:  # a non-finite number: a server fault, not the request's
            raise RuntimeError(f"the result cannot be sent as JSON: {error}") from None

    def endpoint(self, handler: Callable[[dict], dict]) -> Callable:
        async def run(request: Request) -> Response:
            if not self.authorized(request):
                return error_response(401, "missing or wrong token (Authorization: Bearer, or ?token=)",
                                      {"WWW-Authenticate": "Bearer"})
            try:
                raw = await self.read_body(request)
                if not self.slots.acquire(blocking=False):
                    return error_response(503, f"the server is busy: {self.config.max_concurrency} requests are being "
                                               "computed (--max_concurrency); retry later", {"Retry-After": "1"})
                try:
                    body = await asyncio.get_running_loop().run_in_executor(self.pool, self.handle, handler, raw)
                finally:
                    self.slots.release()
            except ApiError as error:
                close = {"Connection": "close"} if error.status == 408 else None
                return error_response(error.status, str(error), close)
            except RequestTooLarge as error:
                return error_response(413, str(error))
            except (TypeError, ValueError) as error:  # the PairRM API's input checks
                logger.debug("bad request to %s: %s", request.url.path, error)
                return error_response(400, str(error))
            except Exception as error:  # noqa: BLE001
                logger.exception("error serving %s", request.url.path)
                return error_response(500, f"internal error: {type(error).__name__}: {error}")
            return Response(body, media_type="application/json")

        return run


def build_app(config: ServeArguments, model: PairRM, batch_size: int | None = None) -> Starlette:
    """The Starlette app serving `model` (already loaded) with `config`; `batch_size`: rows per forward."""
    service = Service(config, model, batch_size)

    async def health(request: Request) -> Response:
        return json_response(service.health())

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    routes = [Route("/health", health, methods=["GET"])]
    routes += [Route(f"/{name}", service.endpoint(functools.partial(service.api, name)), methods=["POST"]) for name in Service.API]
    routes += [
        Route("/judge", service.endpoint(service.judge_route), methods=["POST"]),
        Route("/pair_logits", service.endpoint(service.pair_logits), methods=["POST"]),
        Route("/truncation_rate", service.endpoint(service.truncation_rate), methods=["POST"]),
        Route("/get_reward", service.endpoint(service.get_reward), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=service.lifespan, exception_handlers={HTTPException: http_error})
    app.state.service = service
    return app


# ---- the HTTP server --------------------------------------------------------------------------------------
class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request heads: a connection that has not sent a complete request
    head `header_timeout` seconds after it opened (or after its first byte of a next request) gets 408 and is
    closed. uvicorn alone times out idle keep-alive connections only, so a client trickling its headers would hold
    its connection forever."""

    header_timeout = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

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
        body = dumps({"error": f"the request head did not arrive within {self.header_timeout:g} s (--header_timeout_s)"})
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()


def uvicorn_server(config: ServeArguments, app: Starlette) -> uvicorn.Server:
    protocol = type("PairRMH11", (HeaderTimeoutH11,), {"header_timeout": config.header_timeout_s})
    return uvicorn.Server(uvicorn.Config(
        app, log_config=None, access_log=config.access_log, lifespan="on", http=protocol, ws="none",
        limit_concurrency=config.max_connections, timeout_keep_alive=config.keep_alive_s,
        timeout_graceful_shutdown=config.graceful_timeout_s, server_header=False,
    ))


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def announce(config: ServeArguments, service: Service, name: str, port: int) -> None:
    if service.token is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without a token: anyone who can reach it can use it (--token)", config.host)
    logger.info(
        "PairRM server on http://%s:%d (model %s on %s; batches of up to %d pairs / %d tokens / %.1f ms; auth %s)",
        config.host, port, name, service.model.device, config.max_batch_pairs, service.queue.max_batch_tokens,
        config.max_wait_ms, "on" if service.token else "off",
    )


class BackgroundServer:
    """The server in a background thread (tests, notebooks, the load benchmark).

    Args:
        config: the server's settings.
        model: the loaded `PairRM` to serve.
        batch_size: rows per forward (default: the engine's token budget).

    Example:
        >>> with BackgroundServer(ServeArguments(port=0), PairRM.from_pretrained("tiny")) as server:
        ...     PairRM(RemoteBackend(server.url)).rank(["hi"], [["a", "b"]])

    `stop()` shuts down gracefully: in-flight requests are answered first.
    """

    def __init__(self, config: ServeArguments, model: PairRM, batch_size: int | None = None):
        self.config = config
        self.app = build_app(config, model, batch_size)
        self._sock = bind(config.host, config.port)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{config.host}:{self.port}"
        self.server = uvicorn_server(config, self.app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True, name="pairrm-server")

    @property
    def service(self) -> Service:
        return self.app.state.service

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        announce(self.config, self.service, "(in process)", self.port)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the PairRM server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float | None = None) -> None:
        self.server.should_exit = True
        self.thread.join(timeout if timeout is not None else self.config.graceful_timeout_s + 10)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
