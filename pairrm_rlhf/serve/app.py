"""The HTTP app: routes, authentication, body reading with timeouts, and the uvicorn server around it.

Built on Starlette + uvicorn (h11): small, pure Python, graceful shutdown (in-flight requests are answered), easy to
run in a thread for tests. Every route validates and renders in a request thread with the `PairRM` methods
themselves (so answers and error messages are the library's), over one shared `PairRM(QueueBackend(...))`: the
forward passes of all requests go through the fair batching queue (`batcher`), so the event loop never blocks on the
model and a large request cannot hold up a small one for more than about two batches.

A client cannot hold the server: request heads must arrive within `header_timeout_s` and bodies within
`body_timeout_s` (else 408 and the connection is closed), idle keep-alive connections close after `keep_alive_s`,
connections are capped per client and in all (`http`), and only requests whose body has arrived count against
`max_concurrency` (slow senders use up connections, not compute slots). Memory is bounded before parsing: bodies
held at once are capped at `max_concurrency` x `max_body_bytes` bytes (503 above), and a body's JSON values are
counted on the raw bytes (`limits.count_json_values`) before `json.loads` builds any object.

Work dies with its client: a request whose client disconnects (or times out) has its queued pairs dropped
(`batcher.QueueBackend.cancel`), after `orphan_grace_s` in which a retry with the same `Idempotency-Key` header
(and the same body) joins the running computation instead of starting another; a finished one is kept as long for
such a retry. POST routes need `Content-Type: application/json` (415) and an allowed `Host` (403; DNS rebinding,
see `http.host_allowed`).

Routes (all POST unless noted; JSON bodies; errors are `{"error": "..."}` with a 4xx/5xx status):
    /get_reward      OpenRLHF (see `openrlhf`) -> {"rewards": [...], "scores": [...], "extra_logs": {...}}
    /compare /probability /rank /rank_with_ref /compare_conversations   the `PairRM` methods -> {"result": ...}
    /judge           `PairRMJudge.judge` -> {"result": ...}
    /pair_logits     prepared triples -> {"logits": [...]} (single order, or two-order with "two_order": true)
    /truncation_rate prepared triples -> {"truncation_rate": x}
    /reference_probability  prepared triples, temperature -> {"probabilities": [...] or null (the default rule)}
    GET /health      `backends.wire.ServerInfo`: identity, template, dtype, limits, probability rule, counters
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ..backends.wire import (
    DEFAULT_PROBABILITY,
    IDEMPOTENCY_HEADER,
    OWN_PROBABILITY,
    LogitsAnswer,
    ProbabilityAnswer,
    ServerInfo,
    TriplesRequest,
    TruncationAnswer,
)
from ..core import aggregation
from ..pairrm import PairRM
from ..trl.judge import PairRMJudge
from .batcher import QueueBackend, RequestCancelled, RequestTooLarge, Ticket
from .config import ServeArguments
from .http import bind, host_allowed, uvicorn_server
from .limits import ApiError, check_limits, count_json_values, dumps, fields, reject_constant
from .openrlhf import QueryParser, ReferenceTable, RewardRequests

__all__ = ["BackgroundServer", "Service", "announce", "bind", "build_app", "uvicorn_server"]

logger = logging.getLogger(__name__)


def json_response(content: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(content), status_code=status, headers=headers, media_type="application/json")


def error_response(status: int, message: str, headers: dict | None = None) -> Response:
    return json_response({"error": message}, status, headers)


class ClientGone(Exception):
    """The client disconnected (mid-body, or while its work was computed): nobody reads an answer."""


class Work:
    """One computation in a request thread, shared by the retries that send its `Idempotency-Key` (`waiters`)."""

    def __init__(self, future: asyncio.Future, ticket: Ticket):
        self.future, self.ticket, self.waiters = future, ticket, 0
        self.left_at = 0.0  # when the last waiter left


class Service:
    """The routes' logic over one loaded `PairRM` (sync handlers run in request threads; see `build_app`)."""

    API = {  # route: (required fields, optional fields -> scalar type, or None for PairRM-validated values)
        "compare": (
            ("inputs", "candidates_A", "candidates_B"),
            {"instructions": None, "return_logits": bool, "mode": str},
        ),
        "probability": (("inputs", "candidates_A", "candidates_B"), {"instructions": None, "temperature": float}),
        "rank": (("inputs", "candidates"), {"instructions": None, "return_scores": bool}),
        "rank_with_ref": (
            ("inputs", "candidates"),
            {"instructions": None, "return_scores": bool, "ref_mode": str, "ref_candidates": None},
        ),
        "compare_conversations": (("conversations_a", "conversations_b"), {"return_logits": bool, "mode": str}),
    }

    def __init__(self, config: ServeArguments, model: PairRM, batch_size: int | None = None):
        self.config = config
        self.model = model
        self.token = config.resolved_token()
        self.rewards = RewardRequests(
            QueryParser(config.chat_format, config.separator, config.split_regex, config.strip_strings),
            ReferenceTable.from_file(config.reference_file, config.prompt_column, config.reference_column)
            if config.reference_file
            else None,
            config.reference,
            config.labels_as_reference,
        )
        self.queue = QueueBackend(
            model.backend,
            max_batch_pairs=config.max_batch_pairs,
            max_batch_tokens=config.max_batch_tokens,
            max_wait_ms=config.max_wait_ms,
            max_pairs=config.max_pairs,
            max_tokens=config.request_token_limit(model.backend.device.type),
            batch_size=batch_size,
        )
        self.pairrm = PairRM(self.queue, kind=model.kind)
        self.judge = PairRMJudge(self.pairrm)
        self.slots = threading.BoundedSemaphore(config.max_concurrency)
        self.buffered = 0  # bytes of bodies being read or computed (at most config.body_budget())
        self.works: dict[tuple, Work] = {}  # (route, idempotency key, body digest) -> its computation

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # the identity hashes every weight once (seconds for a large model): before serving, not on the event loop
        self.identity = await asyncio.get_running_loop().run_in_executor(None, self.model.backend.identity)
        self.queue.start()
        self.pool = concurrent.futures.ThreadPoolExecutor(
            self.config.max_concurrency, thread_name_prefix="pairrm-request"
        )
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
                raise RequestTooLarge(
                    f"the request needs {pairs} pair forwards; the limit is {self.config.max_pairs} (--max_pairs)"
                )
        return {"result": getattr(self.pairrm, route)(**kwargs).tolist()}

    def judge_route(self, body: dict) -> dict:
        kwargs = fields(
            body, ("prompts", "completions"), {"shuffle_order": bool, "return_scores": bool, "temperature": float}
        )
        return {"result": self.judge.judge(**kwargs)}

    def pair_logits(self, body: dict) -> dict:
        request = TriplesRequest.from_fields(fields(body, ("triples",), {"two_order": bool}))
        fn = self.pairrm.two_order_logits if request.two_order else self.pairrm.pair_logits
        return LogitsAnswer(fn(request.triples).tolist()).to_json()

    def truncation_rate(self, body: dict) -> dict:
        request = TriplesRequest.from_fields(fields(body, ("triples",), {}))
        return TruncationAnswer(self.queue.truncation_rate(request.triples)).to_json()

    def reference_probability(self, body: dict) -> dict:
        request = TriplesRequest.from_fields(fields(body, ("triples",), {"temperature": float}))
        p = self.queue.reference_probability(
            request.triples, 1.0 if request.temperature is None else request.temperature
        )
        return ProbabilityAnswer(None if p is None else [float(x) for x in p]).to_json()

    def get_reward(self, body: dict) -> dict:
        z = self.pairrm.two_order_logits(self.rewards.triples(body))
        rewards = aggregation.probability(z, self.config.temperature) if self.config.output == "probability" else z
        return RewardRequests.answer(rewards, z)

    def health(self) -> dict:
        pairs, tokens = self.queue.pending()
        queue = self.queue
        return ServerInfo(
            self.identity,
            self.model.template,
            str(queue.dtype).removeprefix("torch."),
            queue.max_batch_tokens,
            self.config.max_pairs,
            queue.max_request_tokens,
            self.config.max_body_bytes,
            OWN_PROBABILITY if queue.own_probability else DEFAULT_PROBABILITY,
            {**queue.stats, "queued_pairs": pairs, "queued_tokens": tokens},
        ).to_json()

    # ---- async plumbing ----
    def authorized(self, request: Request) -> bool:
        """`Authorization: Bearer <token>`, or `?token=<token>` in the URL (OpenRLHF sends no headers)."""
        if self.token is None:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip() if scheme.lower() == "bearer" else request.query_params.get("token", "")
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    async def read_body(self, request: Request) -> bytearray:
        """The raw body, within `max_body_bytes` (refused from Content-Length before reading, or as soon as a chunked
        stream passes it), `body_timeout_s` (else 408) and the server's body budget (503). The caller releases the
        bytes reserved (`self.buffered`) with `release`."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "invalid Content-Length")
            if int(length) > limit:
                raise ApiError(413, f"request body has {int(length)} bytes; the limit is {limit} (--max_body_bytes)")
        reserved = 0

        def reserve(n: int) -> None:
            nonlocal reserved
            if self.buffered + n > self.config.body_budget():
                raise ApiError(
                    503,
                    f"the server holds {self.buffered} bytes of request bodies "
                    "(--max_concurrency x --max_body_bytes); retry later",
                )
            self.buffered += n
            reserved += n

        async def read() -> bytearray:
            body = bytearray()  # grown in place: no list of chunks joined into a second copy
            async for chunk in request.stream():
                if len(body) + len(chunk) > limit:
                    raise ApiError(413, f"request body exceeds {limit} bytes (--max_body_bytes)")
                if len(body) + len(chunk) > reserved:
                    reserve(len(body) + len(chunk) - reserved)
                body += chunk
            return body

        try:
            reserve(int(length or 0))
            request.state.reserved = reserved
            raw = await asyncio.wait_for(read(), self.config.body_timeout_s)
        except TimeoutError:
            raise ApiError(
                408, f"the request body did not arrive within {self.config.body_timeout_s:g} s (--body_timeout_s)"
            ) from None
        except ClientDisconnect:
            raise ClientGone("the client disconnected while sending its body") from None
        finally:
            request.state.reserved = reserved
        return raw

    def release(self, request: Request) -> None:
        self.buffered -= getattr(request.state, "reserved", 0)
        request.state.reserved = 0

    def handle(self, handler: Callable[[dict], dict], raw: bytearray, ticket: Ticket) -> bytes:
        """Count, parse, check limits, run the route, serialize: all in a request thread, off the event loop. The
        route's queue work is `ticket`'s (dropped when the client goes)."""
        values = count_json_values(raw)
        if values > self.config.max_json_values:
            raise ApiError(
                400,
                f"the body has {values} JSON values; the limit is {self.config.max_json_values} (--max_json_values)",
            )
        try:
            body = json.loads(raw, parse_constant=reject_constant)
        except RecursionError:
            raise ApiError(400, "malformed JSON: nested too deeply") from None
        except ValueError as error:  # JSONDecodeError, bad UTF-8, NaN/Infinity, an integer of too many digits
            if "int_max_str_digits" in str(error):  # Python's own hint is for the server's code, not its clients
                raise ApiError(400, "malformed JSON: an integer has too many digits") from None
            raise ApiError(400, f"malformed JSON: {error}") from None
        del raw
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        check_limits(body, self.config.max_items, self.config.max_text_chars)
        with self.queue.on_behalf(ticket):
            result = handler(body)
        try:
            return dumps(result)
        except ValueError as error:  # a non-finite number: a server fault, not the request's
            raise RuntimeError(f"the result cannot be sent as JSON: {error}") from None

    def refusal(self, request: Request) -> Response | None:
        """The answer to a request refused before its body is read: wrong Host, token or Content-Type."""
        host = request.headers.get("host")
        if not host_allowed(host, self.config.allowed_hosts):
            return error_response(
                403,
                f"Host {host[:100]!r} is not allowed: use the server's IP address or localhost, "
                "or start it with --allowed_hosts NAME",
            )
        if not self.authorized(request):
            return error_response(
                401, "missing or wrong token (Authorization: Bearer, or ?token=)", {"WWW-Authenticate": "Bearer"}
            )
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind != "application/json":
            return error_response(
                415,
                f"the body must be JSON sent as Content-Type: application/json, got {kind[:60] or 'no Content-Type'!r}",
            )
        return None

    async def compute(self, request: Request, handler: Callable[[dict], dict], raw: bytearray) -> bytes:
        """Run `handler` on `raw` in a request thread, or join the computation of an earlier attempt with the same
        `Idempotency-Key` and body; `ClientGone` when the client leaves first (its work is then dropped after
        `orphan_grace_s` unless a retry joins it)."""
        loop = asyncio.get_running_loop()
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and len(key) > 200:
            raise ApiError(400, f"the {IDEMPOTENCY_HEADER} header has {len(key)} characters; the limit is 200")
        ident = (request.url.path, key, hashlib.sha256(raw).digest()) if key else None
        work = self.works.get(ident) if ident else None
        if work is None or work.ticket.cancelled:
            if not self.slots.acquire(blocking=False):
                raise ApiError(
                    503,
                    f"the server is busy: {self.config.max_concurrency} requests are being computed "
                    "(--max_concurrency); retry later",
                )
            ticket = Ticket()
            future = loop.run_in_executor(self.pool, self.handle, handler, raw, ticket)
            work = Work(future, ticket)
            future.add_done_callback(self._finished)
            if ident:
                self.works[ident] = work
                future.add_done_callback(
                    lambda _: loop.call_later(self.config.orphan_grace_s, self._forget, ident, work)
                )
        work.waiters += 1
        gone = asyncio.ensure_future(self._disconnected(request))
        try:
            await asyncio.wait({work.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            work.waiters -= 1
            work.left_at = time.monotonic()
            gone.cancel()
        if work.future.done():
            return work.future.result()
        if work.waiters == 0:
            grace = self.config.orphan_grace_s if ident else 0.0
            loop.call_later(grace, self._abandon, work, grace)
        raise ClientGone("the client disconnected while its request was computed")

    def _finished(self, future: asyncio.Future) -> None:
        self.slots.release()
        if not future.cancelled():
            future.exception()  # marked as retrieved: a gone client's work may end with nobody waiting

    @staticmethod
    async def _disconnected(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def _abandon(self, work: Work, grace: float) -> None:
        """Drop `work` when nobody has waited for it for `grace` seconds (a retry that joined and left again
        scheduled its own check)."""
        if work.waiters == 0 and not work.future.done() and time.monotonic() - work.left_at >= grace - 1e-3:
            self.queue.cancel(work.ticket)

    def _forget(self, ident: tuple, work: Work) -> None:
        if self.works.get(ident) is work:
            del self.works[ident]

    def endpoint(self, handler: Callable[[dict], dict]) -> Callable:
        async def run(request: Request) -> Response:
            refused = self.refusal(request)
            if refused is not None:
                return refused
            try:
                raw = await self.read_body(request)
                body = await self.compute(request, handler, raw)
            except ClientGone as error:
                logger.info("%s %s: %s", request.client.host if request.client else "?", request.url.path, error)
                return Response(status_code=499)  # nobody reads it
            except ApiError as error:
                close = {"Connection": "close"} if error.status == 408 else None
                retry = {"Retry-After": "1"} if error.status == 503 else None
                return error_response(error.status, str(error), close or retry)
            except RequestCancelled:
                return Response(status_code=499)
            except RequestTooLarge as error:
                return error_response(413, str(error))
            except (TypeError, ValueError) as error:  # the PairRM API's input checks
                logger.debug("bad request to %s: %s", request.url.path, error)
                return error_response(400, str(error))
            except Exception as error:  # noqa: BLE001
                logger.exception("error serving %s", request.url.path)  # the details stay in the server's log
                return error_response(500, f"internal error ({type(error).__name__}); see the server's log")
            finally:
                self.release(request)
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
    routes += [
        Route(f"/{name}", service.endpoint(functools.partial(service.api, name)), methods=["POST"])
        for name in Service.API
    ]
    routes += [
        Route("/judge", service.endpoint(service.judge_route), methods=["POST"]),
        Route("/pair_logits", service.endpoint(service.pair_logits), methods=["POST"]),
        Route("/truncation_rate", service.endpoint(service.truncation_rate), methods=["POST"]),
        Route("/reference_probability", service.endpoint(service.reference_probability), methods=["POST"]),
        Route("/get_reward", service.endpoint(service.get_reward), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=service.lifespan, exception_handlers={HTTPException: http_error})
    app.state.service = service
    return app


def announce(config: ServeArguments, service: Service, name: str, port: int) -> None:
    if service.token is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without a token: anyone who can reach it can use it (--token)", config.host)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.allowed_hosts:
        logger.info("clients must reach it by IP address or localhost; to use a DNS name, pass --allowed_hosts NAME")
    logger.info("PairRM server on http://%s:%d (model %s on %s; batches of up to %d pairs / %d tokens / %.1f ms; "
                "auth %s)", config.host, port, name, service.model.device, config.max_batch_pairs,
                service.queue.max_batch_tokens, config.max_wait_ms, "on" if service.token else "off")


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
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True, name="pairrm-server"
        )

    @property
    def service(self) -> Service:
        return self.app.state.service

    def start(self, timeout: float = 30.0) -> BackgroundServer:
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

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
