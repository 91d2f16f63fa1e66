"""What every call passes through, decided on its headers: its method, the bearer token,
per-RPC metrics, and requests that do not parse.

The server's one generic handler, in place of grpc.aio interceptors: an interceptor
chain runs a coroutine per interceptor and builds new handler objects on every call.
Here each method's guarded handler is built once, when it is registered, and a call
costs a dict lookup (with a token, one constant-time compare more).

- **Token.** A call without `authorization: Bearer <token>` (health and reflection
  excepted) is refused on its headers, before any of its message is read: the refusal
  handlers take a request *stream*, which gRPC hands over without reading it (a unary
  handler would wait for, and hold, the whole message first, however large it claims
  to be). Health and reflection answer without the token, for probes, but only so
  many such calls at once, counted from their headers (tokenless.py).
- **Metrics.** Every call is counted by method and status code and timed until its
  last response (`Metrics.rpc_done`).
- **Parse failures.** The deserializers return a marker for a message that does not
  parse, which the handlers refuse with INVALID_ARGUMENT (unparsable.py).
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from hingeloss_server.metrics import Metrics
from hingeloss_server.transport.status import gave_up_code
from hingeloss_server.transport.tokenless import TokenlessCalls
from hingeloss_server.transport.unparsable import UNPARSABLE, refuse_unparsable

# Probes must work without credentials (Kubernetes and Docker health checks carry none).
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)

_DENIED = "missing or invalid bearer token"
# The metric labels of a refused call to a method that does not exist.
UNKNOWN_METHOD = "/unknown/unknown"

Record = Callable[[grpc.aio.ServicerContext, float, "BaseException | None"], None]


class CallGuard(grpc.GenericRpcHandler):
    """Holds every service's handlers, guarded; register services here, then this on the server.

    It offers the registration methods of `grpc.aio.Server` that generated
    `add_*Servicer_to_server` functions (health and reflection included) call.
    """

    def __init__(
        self, metrics: Metrics, token: str | None = None, *, max_without_token: int
    ) -> None:
        self._metrics = metrics
        self._expected = None if token is None else f"Bearer {token}".encode()
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._denials: dict[str, grpc.RpcMethodHandler] = {}
        # The open services' methods as a call without the token gets them: counted.
        self._tokenless: dict[str, grpc.RpcMethodHandler] = {}
        self._tokenless_calls = TokenlessCalls(max_without_token, metrics)

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        for name, handler in handlers.items():
            self._register(f"/{service}/{name}", handler)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        handler = self._handlers.get(method) or self._resolve(handler_call_details)
        if self._expected is None or self._has_token(handler_call_details):
            return handler
        if _split_method(method)[0] in OPEN_SERVICES:
            return self._tokenless.get(method)  # None where not served: UNIMPLEMENTED
        self._metrics.request_rejected("unauthenticated")
        return self._denial(method if handler is not None else UNKNOWN_METHOD, handler)

    def _register(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """Keeps the method's guarded handler, and for an open service's method the one
        that calls without the token get."""
        guarded = self._handlers[method] = self._guarded(method, handler)
        if _split_method(method)[0] in OPEN_SERVICES:
            self._tokenless[method] = self._guarded(method, self._tokenless_calls.counted(handler))
        return guarded

    def _denial(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
        """The refusal of a call without the token, built once per method.

        Only methods that exist are keys (and metric labels): a caller without the
        token must not grow either with made-up paths.
        """
        denial = self._denials.get(method)
        if denial is None:
            if handler is not None and handler.response_streaming:
                refusal = grpc.stream_stream_rpc_method_handler(_deny_stream)
            else:
                refusal = grpc.stream_unary_rpc_method_handler(_deny)
            denial = self._denials[method] = self._guarded(method, refusal)
        return denial

    def _resolve(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """A method registered only through a generic handler: guarded once, then kept."""
        for generic in self._generic:
            handler = generic.service(details)
            if handler is not None:
                return self._register(details.method, handler)
        return None

    def _has_token(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected or b"")
        return False

    def _guarded(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler timed and counted, with a deserializer that cannot raise."""
        record = _recorder(self._metrics, *_split_method(method))
        deserializer = handler.request_deserializer
        options = {
            "request_deserializer": None if deserializer is None else _guard(deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary_response(handler.unary_unary, record, check=True), **options
            )
        if handler.stream_unary is not None:
            behaviour = handler.stream_unary
            if deserializer is not None:  # its messages may be UNPARSABLE: refuse the call
                behaviour = _refusing_unparsable(behaviour)
            return grpc.stream_unary_rpc_method_handler(
                _unary_response(behaviour, record, check=False), **options
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _stream_response(handler.unary_stream, record, check=True), **options
            )
        return grpc.stream_stream_rpc_method_handler(
            _stream_response(handler.stream_stream, record, check=False), **options
        )


def _split_method(method: str) -> tuple[str, str]:
    _, service, name = method.split("/", 2) if method.count("/") >= 2 else ("", "", method)
    return service, name


def _recorder(metrics: Metrics, service: str, method: str) -> Record:
    def record(
        context: grpc.aio.ServicerContext, started: float, error: BaseException | None
    ) -> None:
        metrics.rpc_done(service, method, _code_of(context, error), time.perf_counter() - started)

    return record


def _code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(error, asyncio.CancelledError):
        return str(gave_up_code(context).name)
    if error is not None:
        return "UNKNOWN"
    return "OK"


class _Timed:
    """Times a call until its last response and records it with its status, on any exit."""

    __slots__ = ("_context", "_record", "_started")

    def __init__(self, record: Record, context: grpc.aio.ServicerContext) -> None:
        self._record = record
        self._context = context
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, kind: object, error: BaseException | None, trace: object) -> None:
        self._record(self._context, self._started, error)


def _guard(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def guarded(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            return UNPARSABLE

    return guarded


def _unary_response(behaviour: Any, record: Record, *, check: bool) -> Any:
    """A handler with one response; `check`: its one request may be UNPARSABLE."""

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with _Timed(record, context):
            if check and request is UNPARSABLE:
                await refuse_unparsable(context)
            return await behaviour(request, context)

    return handle


def _refusing_unparsable(behaviour: Any) -> Any:
    """A client-streaming behaviour whose request stream refuses the call at an unparsable
    message: with one response, an answer from the messages before it would be wrong."""

    async def handle(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async def parsed() -> AsyncIterator[Any]:
            async for message in requests:
                if message is UNPARSABLE:
                    await refuse_unparsable(context)
                yield message

        return await behaviour(parsed(), context)

    return handle


def _stream_response(behaviour: Any, record: Record, *, check: bool) -> Any:
    """A handler with a response stream; `check`: its one request may be UNPARSABLE.

    Written in the behaviour's own style, as gRPC tells them apart: an async generator,
    or a coroutine that writes with `context.write` (health's Watch). With a request
    stream, the requests before an unparsable one are answered, then the call ends
    with its error.
    """

    def requests_of(request: Any, unparsable: list[bool]) -> Any:
        if check:
            return request

        async def parsed() -> AsyncIterator[Any]:
            async for message in request:
                if message is UNPARSABLE:
                    unparsable.append(True)
                    return
                yield message

        return parsed()

    if not inspect.isasyncgenfunction(behaviour):

        async def handle_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            unparsable: list[bool] = []
            with _Timed(record, context):
                if check and request is UNPARSABLE:
                    await refuse_unparsable(context)
                await behaviour(requests_of(request, unparsable), context)
                if unparsable:
                    await refuse_unparsable(context)

        return handle_writer

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        unparsable: list[bool] = []
        with _Timed(record, context):
            if check and request is UNPARSABLE:
                await refuse_unparsable(context)
            async for response in behaviour(requests_of(request, unparsable), context):
                yield response
            if unparsable:
                await refuse_unparsable(context)

    return handle


async def _deny(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)


async def _deny_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
    yield  # pragma: no cover - makes this an async generator
