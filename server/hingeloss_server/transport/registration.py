"""Registers LossService's handlers, with the request and response types each method takes."""

from __future__ import annotations

from typing import Any

import grpc

from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.transport.call_guard import CallGuard
from hingeloss_server.transport.servicer import SERVICE_NAME, LossServicer


def _serialize(response: bytes | Any) -> bytes:
    """Compute answers come serialized already (wire.py); other messages do not."""
    if isinstance(response, bytes):
        return response
    serialized: bytes = response.SerializeToString()
    return serialized


def add_to_server(servicer: LossServicer, guard: CallGuard) -> None:
    """Registers the service, with responses that may come pre-serialized.

    The generated `add_LossServiceServicer_to_server` would serialize every answer
    itself, and so copy each gradient twice more.
    """
    handlers = {
        # A request stream of raw bytes (one message on the wire, as for any unary
        # call): see LossServicer.Compute.
        "Compute": grpc.stream_unary_rpc_method_handler(
            servicer.Compute, response_serializer=_serialize
        ),
        # Raw bytes too, parsed by the stream itself: an unparsable message is then
        # refused as its request, named by its index, and counted.
        "ComputeStream": grpc.stream_stream_rpc_method_handler(
            servicer.ComputeStream, response_serializer=_serialize
        ),
        # Raw parts, walked by upload.py without protobuf's copy of each part's bytes.
        "ComputeUpload": grpc.stream_unary_rpc_method_handler(
            servicer.ComputeUpload, response_serializer=_serialize
        ),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo,
            request_deserializer=pb.GetServerInfoRequest.FromString,
            response_serializer=_serialize,
        ),
    }
    guard.add_registered_method_handlers(SERVICE_NAME, handlers)
