"""What the sync and asyncio clients share: channel set-up, stubs, defaults, retry state.

The channel only load-balances (round_robin over every address of the target);
gRPC's own retries are off because the SDK retries itself (`_retry`). The two
clients differ only in the gRPC API their channel comes from and in how they wait.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hingeloss._errors import CancelledError, HingelossError
from hingeloss._requests import InputKind, build_request
from hingeloss._retry import CallAttempts, Retrier, RetryPolicy
from hingeloss._streams import CLIENT_TIMEOUT, StreamSettings, UseClientTimeout
from hingeloss._upload import COMPUTE_UPLOAD, Upload, UploadDefault, split_request
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 512 << 20
DEFAULT_TIMEOUT_S = 30.0

# round_robin over every resolved address; client-side health checking (the server's
# Health.Watch) takes a draining server out of rotation as soon as it says NOT_SERVING.
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "hingeloss.v1.LossService"},
    }
)


# After a server answers that it has no ComputeUpload, large requests go in one message
# for this long, then an upload is tried again: behind a load balancer, a rolling
# upgrade may have replaced that server since.
UPLOAD_REPROBE_S = 300.0

# gRPC waits longer and longer between reconnection attempts (1 s, then 1.6 times more
# each time, up to 120 s), failing every call at once meanwhile: a client came back
# 9 s after a server that had been down 15 s was serving again. Capped, a restarted
# server is found within this much.
RECONNECT_BACKOFF_MAX_MS = 2_000


def channel_options(
    max_message_bytes: int, extra: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    """Explicit size limits, keepalive above the server's minimum, round_robin, and
    reconnection at least every RECONNECT_BACKOFF_MAX_MS after an outage."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 0),
        *extra,
    ]


def with_token(
    credentials: grpc.ChannelCredentials | None, token: str | None, *, local_token: bool = False
) -> grpc.ChannelCredentials | None:
    """Channel credentials that also send `authorization: Bearer <token>` on every call.

    The token travels as gRPC call credentials (`access_token_call_credentials`),
    which gRPC sends only over a secure channel: with TLS `credentials`, or, with
    `local_token=True`, over a plaintext connection to this machine
    (`local_channel_credentials`: loopback or a Unix socket), meant for tests and
    local development. A token with neither is refused, never sent in the clear.

    Raises:
        ValueError: a token without TLS credentials and without `local_token`.
    """
    if not token:
        return credentials
    if credentials is None:
        if not local_token:
            raise ValueError(
                "a bearer token needs TLS credentials; for a server on this machine "
                "without TLS, pass local_token=True"
            )
        credentials = grpc.local_channel_credentials()
    return grpc.composite_channel_credentials(
        credentials, grpc.access_token_call_credentials(token)
    )


def open_channel(
    api: Any,
    target: str,
    credentials: grpc.ChannelCredentials | None,
    compression: grpc.Compression | None,
    max_message_bytes: int,
    options: Sequence[tuple[str, Any]],
) -> Any:
    """A channel from `api` (the `grpc` module or `grpc.aio`), TLS when credentials are given."""
    args = channel_options(max_message_bytes, options)
    if credentials is None:
        return api.insecure_channel(target, args, compression)
    return api.secure_channel(target, credentials, args, compression)


Stream = TypeVar("Stream")


class ClientBase(Generic[Stream]):
    """A client's channel, its stubs, its default timeout and its retry state.

    Subclasses name the gRPC API their channel comes from (`grpc` or `grpc.aio`)
    and the stream they open; the arguments are documented on LossClient.
    """

    _grpc_api: ClassVar[Any]
    # Where requests start to go up in parts unless the caller says (upload_min_bytes).
    _default_upload_min_bytes: ClassVar[int]

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        compression: grpc.Compression | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] = (),
        local_token: bool = False,
        upload_min_bytes: int | None | UploadDefault = UploadDefault.CLIENT,
    ) -> None:
        self._channel = open_channel(
            self._grpc_api,
            target,
            with_token(credentials, token, local_token=local_token),
            compression,
            max_message_bytes,
            options,
        )
        self._stub = pb_grpc.LossServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout
        self._retrier = Retrier(retry or RetryPolicy())
        self._closed = False
        if upload_min_bytes is UploadDefault.CLIENT:
            upload_min_bytes = self._default_upload_min_bytes
        if upload_min_bytes is not None and upload_min_bytes < 0:
            raise ValueError(f"upload_min_bytes must be >= 0 or None, got {upload_min_bytes}")
        self._upload_min_bytes = upload_min_bytes
        # When a server last answered that it has no ComputeUpload (an older one).
        self._upload_refused_at: float | None = None
        self._upload = self._upload_method(
            self._channel.stream_unary(
                COMPUTE_UPLOAD, response_deserializer=pb.ComputeResponse.FromString
            )
        )

    @staticmethod
    def _upload_method(multicallable: Any) -> Any:
        """What a ComputeUpload call goes through: gRPC's own call, given the parts."""
        return multicallable

    def _ensure_open(self) -> None:
        """A closed client takes no new call (RuntimeError, as a closed stream does)."""
        if self._closed:
            raise RuntimeError("the client is closed")

    @staticmethod
    def _closed_under() -> CancelledError:
        """The error of a call that closing the client cut short (never retried)."""
        return CancelledError("the client was closed while the call was in flight")

    def _prepare(
        self, loss: str, inputs: Mapping[str, Any], options: dict[str, Any]
    ) -> tuple[pb.ComputeRequest | Upload, InputKind, float | None]:
        """The request of a unary call (one message, or an Upload in parts), what its
        answer decodes into, and its timeout."""
        self._ensure_open()
        timeout = options.pop("timeout", self._timeout)
        apart: list[tuple[str, memoryview]] = []
        request, kind = build_request(loss, inputs, options, scores_apart=apart)
        threshold = None if self._uploads_refused() else self._upload_min_bytes
        return split_request(request, apart, threshold), kind, timeout

    def _uploads_refused(self) -> bool:
        """Whether a server refused ComputeUpload within the last UPLOAD_REPROBE_S."""
        refused = self._upload_refused_at
        return refused is not None and time.monotonic() - refused < UPLOAD_REPROBE_S

    def _invocation(self, request: pb.ComputeRequest | Upload) -> tuple[Any, Any]:
        """The method that sends `request` and its argument (a fresh iterator of the
        parts for each attempt of an upload)."""
        if not isinstance(request, Upload):
            return self._stub.Compute, request
        if self._uploads_refused():
            return self._stub.Compute, request.whole
        return self._upload, iter(request.parts)

    def _resend_whole(
        self, method: Any, request: Any, error: HingelossError
    ) -> tuple[Any, Any] | None:
        """What to send, in one message, after an upload failed with `error`; None when
        the error stands. A server older than ComputeUpload refused it (UNIMPLEMENTED):
        its request, and the large requests of the next UPLOAD_REPROBE_S, go in one
        message. A client closed meanwhile raises the error close() promises."""
        if method is not self._upload or error.code is not grpc.StatusCode.UNIMPLEMENTED:
            return None
        self._upload_refused_at = time.monotonic()
        if self._closed:
            raise self._closed_under() from error
        return self._stub.Compute, request.whole

    @staticmethod
    def _left(timeout: float | None, since: float, now: float) -> float | None:
        """What remains of an attempt's timeout, `now - since` into it."""
        return None if timeout is None else max(0.0, timeout - (now - since))

    def _attempts(self, timeout: float | None, clock: Callable[[], float]) -> CallAttempts:
        """The retry bookkeeping of one unary call, on this client's shared throttle."""
        return CallAttempts(self._retrier, timeout, clock)

    def stream(
        self,
        max_in_flight: int = 16,
        timeout: float | None | UseClientTimeout = CLIENT_TIMEOUT,
        *,
        stream_timeout: float | None = None,
    ) -> Stream:
        """Opens a ComputeStream: methods return futures, answered in order.

        Use it as a context manager (`async with` on the asyncio client).

        Args:
            max_in_flight: futures unresolved at once. On LossStream a further
                call blocks until one resolves; on AsyncLossStream later
                requests wait, queued in call order, for a slot.
            timeout: seconds each request may wait for its answer (default: the
                client's timeout); its future then fails with
                DeadlineExceededError and the stream goes on. None: no limit.
            stream_timeout: deadline of the whole call (default: none, so a
                stream may live as long as the training run).
        """
        self._ensure_open()
        per_request = self._timeout if timeout is CLIENT_TIMEOUT else timeout
        return self._open_stream(StreamSettings(max_in_flight, per_request, stream_timeout))

    def _open_stream(self, settings: StreamSettings) -> Stream:
        raise NotImplementedError


def health_request(service: str) -> health_pb2.HealthCheckRequest:
    """A Health.Check request for `service` ("" asks about the whole server)."""
    return health_pb2.HealthCheckRequest(service=service)


def serving_status(response: health_pb2.HealthCheckResponse) -> str:
    """The name of a health answer's status, e.g. "SERVING" ("unknown(N)" for a value
    added to the health contract after this SDK)."""
    try:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    except ValueError:
        return f"unknown({response.status})"
