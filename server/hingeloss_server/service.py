"""The gRPC servicer: decode, submit, encode; errors become statuses through status.py.

Thin on purpose: batching, devices and math live below it and know no gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import torch

from hingeloss import __version__, tensors
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc
from hingeloss_server.batching import Batcher
from hingeloss_server.budget import ByteBudget
from hingeloss_server.config import BatchingConfig, LimitsConfig
from hingeloss_server.decode import FLOAT_WIRE_DTYPES, decode_request
from hingeloss_server.errors import ComputeFailedError, HingelossError, OverloadedError
from hingeloss_server.jobs import (
    GradientFormat,
    JobResult,
    LossJob,
    LossKind,
    Reduction,
    SparseRows,
    WireArray,
)
from hingeloss_server.metrics import Metrics
from hingeloss_server.status import error_status, status_mapping

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossService"].full_name
# Suggested wait when the in-flight byte budget is spent (answers drain in milliseconds).
INFLIGHT_RETRY_S = 0.05
# Requests a ComputeStream call may have in flight at once.
STREAM_WINDOW = 64


def fill_tensor(message: pb.Tensor, array: WireArray) -> None:
    """Writes an array into a message in place.

    Building sub-messages and then appending them copies their bytes again at each
    level (24 ms for a 16 MB gradient); filling fields in place copies them once.
    """
    message.dtype = array.dtype  # type: ignore[assignment]
    message.shape.extend(array.shape)
    message.data = array.data


def _resolved(job: LossJob, result: JobResult) -> pb.ResolvedOptions:
    params = job.key.params
    kind = params.kind
    options = job.options
    resolved = pb.ResolvedOptions(
        loss=kind.value,
        reduction=f"REDUCTION_{options.reduction.name}",
        gradient_format=f"GRADIENT_FORMAT_{options.gradient_format.name}",
    )
    resolved.compute_dtype = tensors.wire_dtype_of_torch(  # type: ignore[assignment]
        result.compute_dtype
    )
    if kind is not LossKind.GAN_GENERATOR:
        resolved.kink_subgradient = (
            pb.KINK_SUBGRADIENT_ONE if params.kink_one else pb.KINK_SUBGRADIENT_ZERO
        )
    if kind in (
        LossKind.BINARY_HINGE,
        LossKind.MULTICLASS_HINGE,
        LossKind.CRAMMER_SINGER,
        LossKind.MARGIN_RANKING,
        LossKind.GAN_DISCRIMINATOR,
    ):
        resolved.margin = params.margin
    if kind in (
        LossKind.BINARY_HINGE,
        LossKind.MULTICLASS_HINGE,
        LossKind.CRAMMER_SINGER,
        LossKind.GAN_DISCRIMINATOR,
        LossKind.MARGIN_RANKING,
    ):
        resolved.power = params.power
    if kind is LossKind.BINARY_HINGE:
        resolved.label_encoding = (
            pb.LABEL_ENCODING_ZERO_ONE
            if options.label_zero_one
            else pb.LABEL_ENCODING_PLUS_MINUS_ONE
        )
    if kind is LossKind.MULTICLASS_HINGE:
        resolved.class_normalization = (
            pb.CLASS_NORMALIZATION_DIVIDE_BY_NUM_CLASSES
            if params.divide_by_num_classes
            else pb.CLASS_NORMALIZATION_SUM_OVER_CLASSES
        )
    if kind is LossKind.CRAMMER_SINGER:
        resolved.tie_break = (
            pb.TIE_BREAK_SPLIT_EVENLY if params.split_ties else pb.TIE_BREAK_FIRST_INDEX
        )
    if kind is LossKind.GAN_DISCRIMINATOR:
        resolved.gan_combine = (
            pb.GAN_COMBINE_POOLED_MEAN if options.pooled_mean else pb.GAN_COMBINE_SUM_OF_MEANS
        )
    return resolved


def encode_response(job: LossJob, result: JobResult) -> pb.ComputeResponse:
    """Builds the response message of a computed job."""
    response = pb.ComputeResponse(
        request_id=job.request_id,
        loss=result.loss,
        sparsity=pb.Sparsity(samples=result.samples, active_samples=result.active),
        timing=pb.Timing(
            queue_us=int(result.queue_s * 1e6),
            compute_us=int(result.batch.compute_s * 1e6),
            batch_rows=result.batch.rows,
            batch_requests=result.batch.requests,
            device=result.batch.device,
        ),
        resolved=_resolved(job, result),
    )
    for name, grad in zip(job.input_fields, result.grads, strict=False):
        gradient = response.gradients.add(input=name)
        if isinstance(grad, SparseRows):
            gradient.row_sparse.dense_shape.extend(grad.dense_shape)
            fill_tensor(gradient.row_sparse.indices, grad.indices)
            fill_tensor(gradient.row_sparse.values, grad.values)
        else:
            fill_tensor(gradient.dense, grad)
    for per_sample in result.per_sample:
        fill_tensor(response.per_sample_losses.add(), per_sample)
    return response


def _payload_bytes(result: JobResult) -> int:
    total = sum(len(p.data) for p in result.per_sample)
    for grad in result.grads:
        if isinstance(grad, SparseRows):
            total += len(grad.indices.data) + len(grad.values.data)
        else:
            total += len(grad.data)
    return total


class LossServicer(pb_grpc.LossServiceServicer):
    """Implements hingeloss.v1.LossService over the Batcher."""

    def __init__(
        self,
        limits: LimitsConfig,
        batcher: Batcher,
        budget: ByteBudget,
        metrics: Metrics,
        server_info: Callable[[], pb.ServerInfo],
    ) -> None:
        self._limits = limits
        self._batcher = batcher
        self._budget = budget
        self._metrics = metrics
        self._server_info = server_info

    async def _compute_one(
        self, request: pb.ComputeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ComputeResponse:
        """Decodes, queues and encodes one request; raises HingelossError on failure."""
        started = time.perf_counter()
        loss = request.WhichOneof("loss") or "none"
        self._metrics.inflight.inc()
        charge = 0
        try:
            job = decode_request(request, self._limits)
            self._metrics.received_bytes.inc(job.nbytes)
            if not self._budget.try_acquire(2 * job.nbytes):
                raise OverloadedError(
                    "inflight_full",
                    INFLIGHT_RETRY_S,
                    f"the server holds {self._budget.used} bytes for requests in flight; "
                    f"retry in {INFLIGHT_RETRY_S}s",
                )
            charge = 2 * job.nbytes
            remaining = context.time_remaining()
            if remaining is not None:
                job.deadline = asyncio.get_running_loop().time() + remaining
            result = await self._batcher.submit(job)
            response = encode_response(job, result)
            self._metrics.sent_bytes.inc(_payload_bytes(result))
            self._metrics.request_sparsity(loss, result.samples, result.active, result.queue_s)
            self._metrics.request_done(loss, grpc.StatusCode.OK, time.perf_counter() - started)
            return response
        except HingelossError as error:
            mapping = status_mapping(error)
            self._metrics.request_done(loss, mapping.code, None)
            # Deadline expiries are counted once, by the batcher that drops them.
            if mapping.rejected is not None:
                self._metrics.rejected.labels(mapping.rejected).inc()
            raise
        except asyncio.CancelledError:
            self._metrics.request_done(loss, grpc.StatusCode.CANCELLED, None)
            raise
        except Exception as error:
            # A bug, never the caller's fault: INTERNAL, logged here with the request id.
            logger.exception("request %r failed", _short(request.request_id))
            self._metrics.request_done(loss, grpc.StatusCode.INTERNAL, None)
            raise ComputeFailedError(
                f"internal error in request {_short(request.request_id)!r}"
            ) from error
        finally:
            self._budget.release(charge)
            self._metrics.inflight.dec()

    async def Compute(  # noqa: N802 - gRPC method name
        self, request: pb.ComputeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ComputeResponse:
        try:
            return await self._compute_one(request, context)
        except HingelossError as error:
            await _abort(context, error, {"requestId": _short(request.request_id)})
            raise  # unreachable: abort raises

    async def ComputeStream(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ComputeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ComputeResponse]:
        """Submits requests as they arrive and answers them in order.

        A window bounds how many one stream keeps in flight. The first failing
        request ends the stream with its status, whose ErrorInfo names it
        (`streamIndex`, `requestId`); the answers before it are all sent first.
        """
        window = asyncio.Semaphore(STREAM_WINDOW)
        pending: asyncio.Queue[_StreamItem | None] = asyncio.Queue()
        read_error: list[BaseException] = []

        async def read() -> None:
            try:
                index = 0
                async for request in request_iterator:
                    await window.acquire()  # before the task exists: nothing is orphaned
                    task = asyncio.create_task(self._compute_one(request, context))
                    pending.put_nowait(_StreamItem(index, request.request_id, task))
                    index += 1
            except Exception as error:  # the request stream itself broke
                read_error.append(error)
            finally:
                pending.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await pending.get()) is not None:
                try:
                    response = await item.task
                except HingelossError as error:
                    metadata = {
                        "streamIndex": str(item.index),
                        "requestId": _short(item.request_id),
                    }
                    await _abort(context, error, metadata)
                finally:
                    window.release()
                yield response
            if read_error:
                logger.error("request stream failed: %s", read_error[0])
                await _abort(context, ComputeFailedError("the request stream failed"), {})
        finally:
            reader.cancel()
            while not pending.empty():
                leftover = pending.get_nowait()
                if leftover is not None:
                    leftover.task.cancel()

    async def GetServerInfo(  # noqa: N802 - gRPC method name
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfo:
        return self._server_info()


@dataclass(frozen=True)
class _StreamItem:
    index: int
    request_id: str
    task: asyncio.Task[pb.ComputeResponse]


# Request ids are the caller's: at most this much of one goes into a log or a status.
REQUEST_ID_ECHO_CHARS = 64


def _short(request_id: str) -> str:
    return request_id[:REQUEST_ID_ECHO_CHARS]


async def _abort(
    context: grpc.aio.ServicerContext, error: HingelossError, metadata: dict[str, str]
) -> None:
    status = error_status(error, metadata)
    if status.code is grpc.StatusCode.INTERNAL:
        logger.error("request %r: %s", metadata.get("requestId", ""), error)
    await context.abort_with_status(status)


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
            max_dims=limits.max_dims,
            max_request_bytes=limits.max_request_bytes,
            max_batch_bytes=batching.max_batch_bytes,
        ),
        torch_version=torch.__version__,
        grpc_version=grpc.__version__,
    )


__all__ = [
    "SERVICE_NAME",
    "GradientFormat",
    "LossServicer",
    "Reduction",
    "encode_response",
    "error_status",
    "server_info",
]
