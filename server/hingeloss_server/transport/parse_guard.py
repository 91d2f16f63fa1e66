"""Answers a request whose bytes do not parse with INVALID_ARGUMENT, not gRPC's UNKNOWN.

gRPC deserializes a message before any handler runs, and reports a parse failure
as UNKNOWN ("Unexpected DecodeError"), the code of a server bug. This interceptor
wraps each method's deserializer so that a message that is not valid protobuf (a
corrupt wire format, bad UTF-8 in a string) reaches a handler that refuses it
with the usual INVALID_ARGUMENT and BadRequest detail, never echoing its bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.transport.status import error_status

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class _Unparsable:
    """Stands in for a request message whose bytes did not parse."""


UNPARSABLE = _Unparsable()


def unparsable_error() -> InvalidInputError:
    """The refusal of a message that is not valid protobuf (its bytes are not echoed)."""
    return InvalidInputError("request", "is not a valid protobuf message of this method's type")


def _status() -> grpc.Status:
    return error_status(unparsable_error())


def _guard(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def guarded(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            return UNPARSABLE

    return guarded


class ParseGuardInterceptor(grpc.aio.ServerInterceptor):
    """Turns protobuf parse failures of unary and bidi-streaming calls into INVALID_ARGUMENT."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserializer = _guard(handler.request_deserializer)
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if request is UNPARSABLE:
                    await context.abort_with_status(_status())
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            stream = handler.stream_stream

            async def stream_stream(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                unparsable = False

                async def parsed() -> AsyncIterator[Any]:
                    nonlocal unparsable
                    async for request in requests:
                        if request is UNPARSABLE:
                            # The requests before it are answered; the stream ends with its error.
                            unparsable = True
                            return
                        yield request

                async for response in stream(parsed(), context):
                    yield response
                if unparsable:
                    await context.abort_with_status(_status())

            return grpc.stream_stream_rpc_method_handler(
                stream_stream,
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
