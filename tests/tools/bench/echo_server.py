"""Servers that stand in for hingeloss in benchmarks and tests: no math at all.

- `Echo`: the transport floor. Same service and methods, raw-bytes handlers; each
  request is answered with a ComputeResponse whose dense gradients have the byte
  size of the request's score tensors. Only the tags and lengths of the request
  are read (never its data), and the answer for a given shape is serialized once.
  Optionally it stalls once (`stall_after_s`, `stall_s`), for open-loop tests.
  With `as_service`, `Compute` is registered as hingeloss registers it (a request
  stream read with `context.read()` under an arrival limit, so that a call is
  accepted on its headers): the floor of what the service's contract costs.
- `Replay`: the floor for a given answer format. The first request of each shape
  and answer format goes to a real server; every later one is answered with that
  answer's bytes, unread and uncomputed: what a server that computed in no time
  would serve, factored answers included (their size and their decoding are real).
  Its `Compute` is registered as the service's is: at 4096x1000 with 8 in flight
  that served 1.16 times what a unary registration did (docs/benchmarks.md).
- `PerturbingProxy`: forwards to a real server and adds 1 to one element of
  every gradient, so that verification must catch it.

`python tests/tools/bench/echo_server.py --port-file F` serves an Echo until SIGTERM
(`--as-service`: registered as the service registers Compute; `--replay-port-file P`:
a Replay of the server whose port is in P).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hingeloss import _tensors as tensors
from hingeloss._requests import SCORE_FIELDS
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_bench.wire import fields, tensor_header
from hingeloss_server.config import ServerConfig
from hingeloss_server.engine.allocator import keep_freed_memory

SERVICE = "hingeloss.v1.LossService"


def _score_numbers(loss: str) -> tuple[int, ...]:
    """The field numbers of a loss's score tensors, in its message."""
    message = pb.ComputeRequest.DESCRIPTOR.fields_by_name[loss].message_type
    assert message is not None, f"{loss} holds no message"
    return tuple(message.fields_by_name[f].number for f in SCORE_FIELDS[loss])


_LOSS_FIELDS = {name: pb.ComputeRequest.DESCRIPTOR.fields_by_name[name] for name in SCORE_FIELDS}
_LOSS_BY_NUMBER = {field.number: name for name, field in _LOSS_FIELDS.items()}
_SCORE_NUMBERS = {name: _score_numbers(name) for name in _LOSS_FIELDS}
_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 1 << 30),
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.so_reuseport", 0),
]


# ComputeRequest's fields that choose the answer's format: reduction, gradient_format,
# return_per_sample.
_ANSWER_FORMAT_FIELDS = frozenset({8, 9, 10})


def score_shapes(request: bytes) -> tuple[str, tuple[tuple[int, tuple[int, ...]], ...]]:
    """The request's loss and the (dtype, shape) of each of its score tensors, read from
    tags and lengths only."""
    loss, headers = "", []
    for number, wire_type, start, end in fields(request):
        name = _LOSS_BY_NUMBER.get(number)
        if name is None or wire_type != 2:
            continue
        loss = name
        inner = {n: (s, e) for n, _, s, e in fields(request, start, end)}
        for field_number in _SCORE_NUMBERS[name]:
            span = inner.get(field_number)
            headers.append(tensor_header(request, *span) if span else (0, ()))
    return loss, tuple(headers)


class Echo:
    """Answers with zero gradients of the right sizes; optionally stalls once."""

    def __init__(
        self, stall_after_s: float | None = None, stall_s: float = 0.0, as_service: bool = False
    ) -> None:
        self.as_service = as_service
        self._cache: dict[tuple[Any, ...], bytes] = {}
        self._stall_after_s = stall_after_s
        self._stall_s = stall_s
        self._first: float | None = None
        self._stall_until: float | None = None
        self.requests = 0

    def answer(self, request: bytes) -> bytes:
        """The serialized response for a serialized request."""
        loss, headers = key = score_shapes(request)
        cached = self._cache.get(key)
        if cached is None:
            response = pb.ComputeResponse()
            for field_name, (dtype, shape) in zip(SCORE_FIELDS.get(loss, ()), headers, strict=True):
                size = tensors.expected_nbytes(pb.Tensor(dtype=dtype, shape=shape)) if dtype else 0  # type: ignore[arg-type]
                response.gradients.add(
                    input=field_name,
                    dense=pb.Tensor(dtype=dtype, shape=shape, data=bytes(size)),  # type: ignore[arg-type]
                )
            cached = response.SerializeToString()
            if len(self._cache) < 64:
                self._cache[key] = cached
        return cached

    async def _maybe_stall(self) -> None:
        if self._stall_after_s is None:
            return
        now = asyncio.get_running_loop().time()
        if self._first is None:
            self._first = now
        if self._stall_until is None and now - self._first >= self._stall_after_s:
            self._stall_until = now + self._stall_s
        if self._stall_until is not None and now < self._stall_until:
            await asyncio.sleep(self._stall_until - now)

    async def compute(self, request: bytes, context: Any) -> bytes:
        self.requests += 1
        await self._maybe_stall()
        return self.answer(request)

    async def compute_stream(
        self, requests: AsyncIterator[bytes], context: Any
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            self.requests += 1
            await self._maybe_stall()
            yield self.answer(request)


def _read_as_the_service_does(
    compute: Callable[[bytes, Any], Awaitable[bytes]],
) -> Callable[[AsyncIterator[bytes], Any], Awaitable[bytes]]:
    """`compute` behind hingeloss's reading of a Compute call: a request stream, its one
    message read with `context.read()` under the arrival limit."""
    arrival_s = ServerConfig().request_arrival_seconds

    async def handle(requests: AsyncIterator[bytes], context: Any) -> bytes:
        async with asyncio.timeout(arrival_s):
            request = await context.read()
        if request is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
        return await compute(request, context)

    return handle


def _handler(service: Echo | _Forwarder) -> grpc.GenericRpcHandler:
    # No (de)serializers: the handlers see and return raw bytes.
    compute = (
        grpc.stream_unary_rpc_method_handler(_read_as_the_service_does(service.compute))
        if service.as_service
        else grpc.unary_unary_rpc_method_handler(service.compute)
    )
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Compute": compute,
            "ComputeStream": grpc.stream_stream_rpc_method_handler(service.compute_stream),
        },
    )


class _Forwarder:
    """A stand-in that asks a real server (`upstream()`, a host:port, on first use)."""

    as_service = False

    def __init__(self, upstream: Callable[[], str]) -> None:
        self._upstream = upstream
        self._call: Any = None

    async def _forward(self, request: bytes) -> bytes:
        if self._call is None:
            channel = grpc.aio.insecure_channel(self._upstream(), options=_SERVER_OPTIONS[:2])
            self._call = channel.unary_unary(f"/{SERVICE}/Compute")
        answer: bytes = await self._call(request)
        return answer

    async def compute(self, request: bytes, context: Any) -> bytes:
        raise NotImplementedError

    async def compute_stream(
        self, requests: AsyncIterator[bytes], context: Any
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield await self.compute(request, context)


class Replay(_Forwarder):
    """Forwards the first request of each shape and answer format upstream and answers
    every later one with that answer.

    Later requests are not read past their tags and lengths, and their answers are
    another request's: the load generator must not verify them, and the Timing they
    carry is the service's, for the request it answered.
    """

    # A floor for the service: its Compute registered, and read, as the service's is.
    as_service = True

    def __init__(self, upstream: Callable[[], str]) -> None:
        super().__init__(upstream)
        self._cache: dict[tuple[Any, ...], bytes] = {}
        self.forwarded = 0
        self.requests = 0

    @staticmethod
    def _key(request: bytes) -> tuple[Any, ...]:
        # Varints (these fields are) give their value where a span would start.
        answer_format = tuple(
            (number, value)
            for number, _, value, _ in fields(request)
            if number in _ANSWER_FORMAT_FIELDS
        )
        return (score_shapes(request), answer_format)

    async def compute(self, request: bytes, context: Any) -> bytes:
        self.requests += 1
        key = self._key(request)
        cached = self._cache.get(key)
        if cached is None:
            self.forwarded += 1
            cached = await self._forward(request)
            if len(self._cache) < 64:
                self._cache[key] = cached
        return cached


class PerturbingProxy(_Forwarder):
    """Forwards to `upstream` and adds 1.0 to element 0 of every gradient it returns.

    Element 0 of what travels: of a factored gradient, the value of row 0.
    """

    def __init__(self, upstream: str) -> None:
        super().__init__(lambda: upstream)

    def _perturb(self, payload: bytes) -> bytes:
        response = pb.ComputeResponse.FromString(payload)
        for gradient in response.gradients:
            tensor = {
                "row_sparse": gradient.row_sparse.values,
                "factored": gradient.factored.row_values,
            }.get(str(gradient.WhichOneof("value")), gradient.dense)
            values = np.array(tensors.to_numpy(tensor))
            if values.size:
                values.reshape(-1)[0] += 1.0
                tensor.data = values.astype(values.dtype.newbyteorder("<")).tobytes()
        return response.SerializeToString()

    async def compute(self, request: bytes, context: Any) -> bytes:
        return self._perturb(await self._forward(request))


async def add_health(server: grpc.aio.Server) -> None:
    """The standard health service, SERVING: clients that health-check their channels
    (the SDK's do) need it, and log an error for a channel without it."""
    health_servicer = health.aio.HealthServicer()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)


async def start(
    service: Echo | _Forwarder, host: str = "127.0.0.1", port: int = 0
) -> tuple[Any, int]:
    """Starts a grpc.aio server for `service`; returns (server, bound port)."""
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    server.add_generic_rpc_handlers((_handler(service),))
    await add_health(server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


class BackgroundServer:
    """Runs one of these servers on a private event loop in a thread (for tests)."""

    def __init__(self, service: Echo | _Forwarder) -> None:
        self.service = service
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-test-server", daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server, self.port = await start(self.service)
        self._ready.set()
        await self._stop.wait()
        await server.stop(0)

    def _run(self) -> None:
        # asyncio.run also finishes gRPC's own tasks before it closes the loop.
        asyncio.run(self._main())

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the test server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


async def serve_until_signalled(server: grpc.aio.Server, port: int, port_file: Path) -> None:
    """Publishes the bound port (atomically: readers never see half a file), serves until
    SIGTERM or SIGINT. Shared by the benchmark's stand-in servers."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop(0)))
    tmp = port_file.with_name(port_file.name + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(port_file)
    await server.wait_for_termination()


async def _serve(service: Echo | Replay, port_file: Path, port: int) -> None:
    server, bound = await start(service, port=port)
    await serve_until_signalled(server, bound, port_file)


def main() -> None:
    parser = argparse.ArgumentParser(description="The transport floor: an echo LossService.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, required=True)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--as-service", action="store_true", help="register Compute as hingeloss does"
    )
    kind.add_argument(
        "--replay-port-file",
        type=Path,
        help="serve a Replay of the server whose port this file holds (read on first use)",
    )
    args = parser.parse_args()
    # As hingeloss-server does: a floor's speed must not hang on where glibc's moving
    # mmap threshold settles (docs/benchmarks.md, "One caller, without the load generator").
    keep_freed_memory()
    replayed: Path | None = args.replay_port_file
    service: Echo | Replay = (
        Replay(lambda: f"127.0.0.1:{replayed.read_text().strip()}")
        if replayed is not None
        else Echo(as_service=args.as_service)
    )
    asyncio.run(_serve(service, args.port_file, args.port))


if __name__ == "__main__":
    main()
