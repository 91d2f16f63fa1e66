"""Calls without the bearer token to the open services (health, reflection), kept few.

Probes carry no credentials, so health and reflection answer without the token.
But every call holds one of the server's concurrent calls (--max-concurrent-rpcs)
while open: a health Watch or a reflection stream for as long as its caller likes,
any call until its message arrives (gRPC counts a call from its headers, and hands
a unary one to its handler only once the message has come). So such calls are
taken on their headers (a request stream), share at most `limit` places, and get
ARRIVAL_WITHOUT_TOKEN_S for their message: whatever callers without the token do,
those with it keep the other calls.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator
from typing import Any

import grpc

from hingeloss_server.engine.errors import ArrivalTimeoutError
from hingeloss_server.metrics import Metrics
from hingeloss_server.transport.arrival import arrival_limit
from hingeloss_server.transport.status import error_status, status_mapping
from hingeloss_server.transport.unparsable import UNPARSABLE, refuse_unparsable

# How long a call without the token has for its request message (probes send it at once).
ARRIVAL_WITHOUT_TOKEN_S = 5.0

_TOO_MANY_OPEN = "too many calls without a token are open; send the bearer token"


class TokenlessCalls:
    """The places calls without the token share; `counted` makes a method's handler for them."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.taken = 0
        self._metrics = metrics

    def counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler with a request stream, started on the call's headers, each call
        holding a place while open; a method of one request reads it in time first."""
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._holding(handler.unary_unary, one_request=True), **options
            )
        if handler.unary_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._holding(handler.unary_stream, one_request=True), **options
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._holding(handler.stream_unary, one_request=False), **options
            )
        return grpc.stream_stream_rpc_method_handler(
            self._holding(handler.stream_stream, one_request=False), **options
        )

    def _holding(self, behaviour: Any, *, one_request: bool) -> Any:
        """`behaviour` run while holding a place, in its own style: an async generator,
        or a coroutine (that may write with `context.write`)."""

        async def requests_of(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await self._one_request(context) if one_request else requests

        if inspect.isasyncgenfunction(behaviour):

            async def stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                async with self._held(context):
                    request = await requests_of(requests, context)
                    async for response in behaviour(request, context):
                        yield response

            return stream

        async def call(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._held(context):
                return await behaviour(await requests_of(requests, context), context)

        return call

    @contextlib.asynccontextmanager
    async def _held(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        if self.taken >= self.limit:
            self._metrics.request_rejected("tokenless_full")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _TOO_MANY_OPEN)
        self.taken += 1
        try:
            yield
        finally:
            self.taken -= 1

    async def _one_request(self, context: grpc.aio.ServicerContext) -> Any:
        """The call's one request message, within ARRIVAL_WITHOUT_TOKEN_S; refusals abort,
        a late message as a Compute's does (REQUEST_ARRIVAL_TIMEOUT, counted)."""
        try:
            async with arrival_limit(ARRIVAL_WITHOUT_TOKEN_S):
                request = await context.read()
        except ArrivalTimeoutError as late:
            rejected = status_mapping(late).rejected
            if rejected is not None:
                self._metrics.request_rejected(rejected)
            await context.abort_with_status(error_status(late))
        if request is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request")
        if request is UNPARSABLE:
            await refuse_unparsable(context)
        return request
