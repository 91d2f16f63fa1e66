"""The call guard around a method shape the service does not use yet: client streaming
with a deserializer. Bad bytes must refuse the call, never reach the method."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from hingeloss._errors import InvalidArgumentError, from_rpc_error
from hingeloss_server.metrics import NoMetrics
from hingeloss_server.transport.call_guard import CallGuard

SERVICE = "guard.test.Counter"
METHOD = f"/{SERVICE}/Count"


async def _count(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> bytes:
    """Counts the messages; records what it saw, so a test can tell it never saw the marker."""
    seen = [message async for message in requests]
    _count.seen = seen  # type: ignore[attr-defined]
    return str(len(seen)).encode()


async def test_an_unparsable_message_in_a_client_stream_refuses_the_call() -> None:
    guard = CallGuard(NoMetrics(), max_without_token=1)
    handler = grpc.stream_unary_rpc_method_handler(
        _count,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=lambda answer: answer,
    )
    guard.add_registered_method_handlers(SERVICE, {"Count": handler})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((guard,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            count = channel.stream_unary(METHOD)
            good = health_pb2.HealthCheckRequest(service="a").SerializeToString()
            assert await count(iter([good, good]), timeout=10) == b"2"
            _count.seen = None  # type: ignore[attr-defined]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await count(iter([good, b"\xff\xff\xff", good]), timeout=10)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            typed = from_rpc_error(info.value)
            assert isinstance(typed, InvalidArgumentError)
            assert typed.field_violations[0].field == "request"
            assert _count.seen is None  # type: ignore[attr-defined]  # never answered
    finally:
        await server.stop(None)
