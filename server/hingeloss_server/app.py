"""Assembles and runs one server: config -> engine -> servicer -> grpc.aio server.

Start-up order: metrics, batcher and worker pool, servicer, health (NOT_SERVING)
and reflection behind the call guard, bind, start, warm every worker up, then health
SERVING: the port answers health checks during warm-up. Shutdown runs the other
way: health NOT_SERVING, optional delay for load balancers, refuse new calls,
answer every accepted one and wait for its answer's delivery (within the drain
time), stop the gRPC server, then the queue and the workers.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from hingeloss_server.config import ServerConfig, read_token
from hingeloss_server.drain import wait_until_delivered
from hingeloss_server.engine.batch_queue import Batcher
from hingeloss_server.engine.device_worker import FaultHook
from hingeloss_server.engine.errors import DrainingError
from hingeloss_server.engine.workers import WorkerPool
from hingeloss_server.metrics import Metrics, NoMetrics
from hingeloss_server.prometheus import PrometheusMetrics, default_registry, serve_metrics
from hingeloss_server.transport.budget import ByteBudget
from hingeloss_server.transport.call_guard import CallGuard
from hingeloss_server.transport.registration import add_to_server
from hingeloss_server.transport.request_codec import decode_request
from hingeloss_server.transport.server_info import server_info
from hingeloss_server.transport.servicer import SERVICE_NAME, LossServicer
from hingeloss_server.warmup import gpu_warm_up_requests, warm_up_requests

logger = logging.getLogger(__name__)

WATCHDOG_PERIOD_S = 1.0


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments: explicit message limits, keepalive policy, connection age."""
    limit = config.limits.max_message_bytes
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Never share a port silently with another process.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            int(config.keepalive_min_ping_interval_seconds * 1000),
        ),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if config.max_connection_age_seconds > 0:
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.drain_seconds * 1000)),
        ]
    return options


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    security = config.security
    if security.tls_cert is None or security.tls_key is None:
        return None
    client_ca = security.tls_client_ca.read_bytes() if security.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(security.tls_key.read_bytes(), security.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class HingelossServer:
    """One server process's gRPC server, engine and metrics endpoint.

    Args:
        config: the whole configuration.
        registry: where metrics go; a fresh one with process collectors by default. With
            neither a registry nor a metrics port, nothing is recorded (NoMetrics) and
            no margins are sampled.
        fault_hook: test-only failure injection on the worker thread (see engine/device_worker.py).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        registry: CollectorRegistry | None = None,
        fault_hook: FaultHook | None = None,
    ) -> None:
        self.config = config
        workers = config.workers
        self._registry: CollectorRegistry | None = None
        if config.metrics_port == 0 and registry is None:
            self.metrics: Metrics = NoMetrics()
            # Margins feed a histogram only: none are computed when nothing records them.
            workers = replace(workers, margin_sample_rows=0)
        else:
            self._registry = registry or default_registry()
            self.metrics = PrometheusMetrics(self._registry)
        self.batcher = Batcher(config.batching, on_drop=self._on_drop)
        self.budget = ByteBudget(config.batching.max_inflight_bytes)
        self.pool = WorkerPool(workers, self.batcher, self.metrics, fault_hook, config.batching)
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_http: object | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._servicer: LossServicer | None = None
        self.port = 0
        self.metrics_port = 0

    def _on_drop(self, job: object, reason: str) -> None:
        self.metrics.request_rejected(reason)

    async def start(self) -> int:
        """Warms up, binds and starts serving; returns the bound gRPC port."""
        config = self.config
        self.metrics.describe_build(self.pool.device_names)
        self.metrics.watch_queue(
            lambda: float(self.batcher.stats.requests), lambda: float(self.batcher.stats.rows)
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

        token_file = config.security.auth_token_file
        guard = CallGuard(
            self.metrics,
            None if token_file is None else read_token(token_file),
            max_without_token=config.calls_without_token,
        )
        server = grpc.aio.server(
            options=grpc_options(config),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        servicer = LossServicer(
            config.limits,
            self.batcher,
            self.budget,
            self.metrics,
            lambda: server_info(
                self.pool.device_names, len(self.pool.workers), config.limits, config.batching
            ),
            arrival_seconds=config.request_arrival_seconds,
        )
        add_to_server(servicer, guard)
        self._servicer = servicer
        health_pb2_grpc.add_HealthServicer_to_server(self.health, guard)
        if config.reflection:
            # The asyncio servicer by name: enable_server_reflection picks by server type.
            names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                reflection.aio.ReflectionServicer(names), guard
            )
        # Every service through the guard: no interceptor runs on any call.
        server.add_generic_rpc_handlers((guard,))
        address = f"{config.host}:{config.port}"
        credentials = _credentials(config)
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        self._server = server
        if config.metrics_port and self._registry is not None:
            self._metrics_http, self.metrics_port = serve_metrics(
                self._registry, config.metrics_host, config.metrics_port
            )
        await server.start()
        # Health stays NOT_SERVING until every worker has run every kernel once.
        warm = [decode_request(r, config.limits) for r in warm_up_requests()]
        gpu_warm = []
        if any(device.type == "cuda" for device in self.pool.devices):
            gpu_warm = [
                decode_request(r, config.limits) for r in gpu_warm_up_requests(config.batching)
            ]
        await self.pool.start(warm, gpu_warm)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._watchdog = asyncio.create_task(self._watch_workers())
        if config.port_file is not None:
            _write_atomically(config.port_file, f"{self.port}\n")
        logger.info(
            "serving hingeloss.v1 on %s (port %d), devices %s, metrics port %s",
            config.host,
            self.port,
            ",".join(self.pool.device_names),
            self.metrics_port or "off",
        )
        return self.port

    async def _watch_workers(self) -> None:
        """Reports NOT_SERVING while a worker is stuck on one batch or its device has failed."""
        healthy = True
        period = min(WATCHDOG_PERIOD_S, self.config.workers.watchdog_seconds / 2)
        while True:
            await asyncio.sleep(period)
            stuck = self.pool.stuck_workers() + self.pool.broken_workers()
            if stuck and healthy:
                logger.error("workers stuck: %s; reporting NOT_SERVING", ", ".join(stuck))
                await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
                await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
            elif not stuck and not healthy:
                logger.info("workers recovered; reporting SERVING")
                for name in ("", SERVICE_NAME):
                    await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            healthy = not stuck

    def stop(self) -> asyncio.Task[None]:
        """Starts a graceful shutdown once (idempotent); returns its task."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        config = self.config
        logger.info("shutting down: draining for up to %.1fs", config.drain_seconds)
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.health.enter_graceful_shutdown()
        if config.shutdown_delay_seconds > 0:
            await asyncio.sleep(config.shutdown_delay_seconds)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.drain_seconds
        if self._servicer is not None:
            # New calls are refused from here; every accepted one (its request still
            # arriving included) is computed and answered, and its answer delivered,
            # before gRPC closes the connections (see drain.py).
            self._servicer.drain()
            await self._servicer.calls.wait_idle(deadline - loop.time())
            await wait_until_delivered(self.port, deadline - loop.time())
        if self._server is not None:
            await self._server.stop(max(0.0, deadline - loop.time()))
        self.batcher.close()
        self.batcher.fail_all(DrainingError("the server stopped before this request was computed"))
        await self.pool.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()  # type: ignore[attr-defined]
            self._metrics_http.server_close()  # type: ignore[attr-defined]
        logger.info("stopped")

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
        if self._stopping is not None:
            await self._stopping


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def serve(config: ServerConfig) -> None:
    """Runs a server until SIGTERM or SIGINT, then shuts it down gracefully."""
    server = HingelossServer(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    await server.start()
    await server.wait_for_termination()
