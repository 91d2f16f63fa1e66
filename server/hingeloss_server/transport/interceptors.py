"""Server interceptors: per-RPC metrics for every method, and bearer-token authentication."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from hingeloss_server.metrics import Metrics

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

# Probes must work without credentials (Kubernetes and Docker health checks carry none).
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


def _split_method(method: str) -> tuple[str, str]:
    _, service, name = method.split("/", 2) if method.count("/") >= 2 else ("", "", method)
    return service, name


def _code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    if error is not None:
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and status code and times it until its last response."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        metrics = self._metrics

        def record(
            context: grpc.aio.ServicerContext, started: float, error: BaseException | None
        ) -> None:
            code = _code_of(context, error).name
            metrics.rpc_done(service, method, code, time.perf_counter() - started)

        # Unary responses, whether the request is one message or a stream of them.
        behaviour = handler.unary_unary or handler.stream_unary
        if behaviour is not None:

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                error: BaseException | None = None
                try:
                    return await behaviour(request, context)
                except BaseException as caught:
                    error = caught
                    raise
                finally:
                    record(context, started, error)

            make = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary is not None
                else grpc.stream_unary_rpc_method_handler
            )
            return make(
                unary_response,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            stream_behaviour = handler.stream_stream

            async def stream_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                started = time.perf_counter()
                error: BaseException | None = None
                try:
                    async for response in stream_behaviour(requests, context):
                        yield response
                except BaseException as caught:
                    error = caught
                    raise
                finally:
                    record(context, started, error)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def _deny(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")


async def _deny_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
    yield  # pragma: no cover - makes this an async generator


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC but health and reflection.

    A caller without the token is refused on its headers, before any of its
    message is read: the refusal handlers take a request *stream*, which gRPC
    hands over without reading it (a unary handler would wait for, and hold,
    the whole message first, however large it claims to be).
    """

    def __init__(self, token: str, metrics: Metrics) -> None:
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics
        self._deny = grpc.stream_unary_rpc_method_handler(_deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(_deny_stream)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        service, _ = _split_method(handler_call_details.method)
        if service in OPEN_SERVICES or self._authorized(handler_call_details):
            return await continuation(handler_call_details)
        self._metrics.request_rejected("unauthenticated")
        handler = await continuation(handler_call_details)
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny
