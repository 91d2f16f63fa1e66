"""The stand-in for a request message whose bytes do not parse, and its refusal.

gRPC deserializes a message before any handler runs and reports a failure as
UNKNOWN, the code of a server bug; the call guard's deserializers return this
marker instead, and the handlers refuse it with INVALID_ARGUMENT and a BadRequest
detail, never echoing its bytes.
"""

from __future__ import annotations

import grpc

from hingeloss_server.engine.errors import InvalidInputError
from hingeloss_server.transport.status import error_status


class _Unparsable:
    """Stands in for a request message whose bytes did not parse."""


UNPARSABLE = _Unparsable()


def unparsable_error() -> InvalidInputError:
    """The refusal of a message that is not valid protobuf (its bytes are not echoed)."""
    return InvalidInputError("request", "is not a valid protobuf message of this method's type")


async def refuse_unparsable(context: grpc.aio.ServicerContext) -> None:
    await context.abort_with_status(error_status(unparsable_error()))
