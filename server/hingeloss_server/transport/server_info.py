"""The server's description for GetServerInfo: version, losses, devices and limits."""

from __future__ import annotations

import grpc
import torch

from hingeloss import __version__
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_server.config import BatchingConfig, LimitsConfig
from hingeloss_server.engine.jobs import LossKind
from hingeloss_server.transport.request_codec import FLOAT_WIRE_DTYPES, MAX_DIMS


def server_info(
    devices: list[str], workers: int, limits: LimitsConfig, batching: BatchingConfig
) -> pb.ServerInfo:
    """Describes the server for GetServerInfo."""
    return pb.ServerInfo(
        version=__version__,
        losses=[kind.value for kind in LossKind],
        score_dtypes=list(FLOAT_WIRE_DTYPES),
        devices=devices,
        workers=workers,
        limits=pb.ServerLimits(
            max_message_bytes=limits.max_message_bytes,
            max_request_rows=limits.max_request_rows,
            max_request_elements=limits.max_request_elements,
            max_batch_rows=batching.max_batch_rows,
            max_queue_rows=batching.max_queue_rows,
            max_queue_bytes=batching.max_queue_bytes,
            max_dims=MAX_DIMS,
            max_request_bytes=limits.max_request_bytes,
            max_batch_bytes=batching.max_batch_bytes,
        ),
        torch_version=torch.__version__,
        grpc_version=grpc.__version__,
    )
