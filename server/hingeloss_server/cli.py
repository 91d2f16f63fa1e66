"""`hingeloss-server`: flags and HINGELOSS_* variables -> one ServerConfig -> serve."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hingeloss import __version__
from hingeloss_server.config import (
    MIB,
    BatchingConfig,
    LimitsConfig,
    SecurityConfig,
    ServerConfig,
    WorkerConfig,
    read_token,
)

ENV_PREFIX = "HINGELOSS_"


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _devices(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


class _Parser:
    """argparse where each flag's default comes from its HINGELOSS_* variable if set."""

    def __init__(self) -> None:
        self.parser = argparse.ArgumentParser(
            prog="hingeloss-server",
            description="Serve hinge-family losses and gradients over gRPC. Every flag can "
            "also be set as an environment variable: --max-batch-rows is "
            "HINGELOSS_MAX_BATCH_ROWS.",
        )
        self.parser.add_argument("--version", action="version", version=__version__)

    def add(self, flag: str, kind: Callable[[str], Any], default: Any, help_text: str) -> None:
        env = _env_name(flag)
        value = default
        if env in os.environ:
            try:
                value = kind(os.environ[env])
            except (ValueError, argparse.ArgumentTypeError) as error:
                self.parser.error(f"{env}: {error}")
        self.parser.add_argument(
            flag, type=kind, default=value, help=f"{help_text} [env {env}; default {default}]"
        )


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    limits, batching, workers = LimitsConfig(), BatchingConfig(), WorkerConfig()
    p = _Parser()
    p.add("--host", str, defaults.host, "address to listen on")
    p.add("--port", int, defaults.port, "gRPC port (0: any free port)")
    p.add("--port-file", Path, None, "write the bound gRPC port to this file once serving")
    p.add("--metrics-host", str, defaults.metrics_host, "address of the /metrics endpoint")
    p.add("--metrics-port", int, defaults.metrics_port, "Prometheus /metrics port (0: off)")
    p.add("--devices", _devices, ",".join(workers.devices), "auto, cpu, or cuda:0,cuda:1,...")
    p.add("--workers-per-device", int, workers.workers_per_device, "worker threads per device")
    p.add(
        "--watchdog-seconds",
        float,
        workers.watchdog_seconds,
        "a batch running longer than this marks the server NOT_SERVING",
    )
    p.add("--max-batch-rows", int, batching.max_batch_rows, "rows per batch at most")
    p.add("--max-batch-bytes", int, batching.max_batch_bytes, "tensor bytes per batch at most")
    p.add(
        "--max-batch-delay-us",
        int,
        batching.max_batch_delay_us,
        "wait this long for more requests when a batch is not full (0: never wait)",
    )
    p.add("--max-queue-rows", int, batching.max_queue_rows, "queued rows before shedding load")
    p.add("--max-queue-bytes", int, batching.max_queue_bytes, "queued bytes before shedding load")
    p.add(
        "--max-inflight-bytes",
        int,
        batching.max_inflight_bytes,
        "bytes held for requests (message, result and answer: about 3x their tensors) "
        "before shedding load",
    )
    p.add("--max-request-rows", int, limits.max_request_rows, "rows per request at most")
    p.add("--max-request-elements", int, limits.max_request_elements, "elements per tensor at most")
    p.add(
        "--max-request-bytes",
        int,
        limits.max_request_bytes,
        "tensor bytes per request at most, checked from the shapes before any data is read",
    )
    p.add(
        "--max-message-bytes",
        int,
        limits.max_message_bytes,
        f"gRPC message size limit, both directions (default {limits.max_message_bytes // MIB} MiB)",
    )
    p.add(
        "--max-concurrent-rpcs",
        int,
        defaults.max_concurrent_rpcs,
        "concurrent RPCs before RESOURCE_EXHAUSTED",
    )
    p.add(
        "--shutdown-delay-seconds",
        float,
        defaults.shutdown_delay_seconds,
        "on SIGTERM, report NOT_SERVING this long before refusing new requests",
    )
    p.add(
        "--drain-seconds",
        float,
        defaults.drain_seconds,
        "on SIGTERM, time given to in-flight requests",
    )
    p.add(
        "--max-connection-age-seconds",
        float,
        defaults.max_connection_age_seconds,
        "close connections after this age so clients re-resolve (0: never)",
    )
    p.add("--reflection", _bool, defaults.reflection, "enable gRPC server reflection")
    p.add("--tls-cert", Path, None, "PEM certificate chain (enables TLS)")
    p.add("--tls-key", Path, None, "PEM private key")
    p.add("--tls-client-ca", Path, None, "PEM CA bundle; requires client certificates (mTLS)")
    p.add("--auth-token-file", Path, None, "require 'authorization: Bearer <token>' from this file")
    p.add(
        "--request-arrival-seconds",
        float,
        defaults.request_arrival_seconds,
        "refuse a Compute request (DEADLINE_EXCEEDED) whose message takes longer to arrive",
    )
    p.add("--log-level", str, defaults.log_level, "DEBUG, INFO, WARNING or ERROR")
    p.add("--log-format", str, defaults.log_format, "text or json")
    return p.parser


def config_from_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """Parses flags (and HINGELOSS_* variables) into a validated ServerConfig."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            port_file=args.port_file,
            metrics_host=args.metrics_host,
            metrics_port=args.metrics_port,
            reflection=args.reflection,
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            shutdown_delay_seconds=args.shutdown_delay_seconds,
            drain_seconds=args.drain_seconds,
            max_connection_age_seconds=args.max_connection_age_seconds,
            log_level=args.log_level.upper(),
            log_format=args.log_format,
            limits=LimitsConfig(
                max_message_bytes=args.max_message_bytes,
                max_request_rows=args.max_request_rows,
                max_request_elements=args.max_request_elements,
                max_request_bytes=args.max_request_bytes,
            ),
            batching=BatchingConfig(
                max_batch_rows=args.max_batch_rows,
                max_batch_bytes=args.max_batch_bytes,
                max_batch_delay_us=args.max_batch_delay_us,
                max_queue_rows=args.max_queue_rows,
                max_queue_bytes=args.max_queue_bytes,
                max_inflight_bytes=args.max_inflight_bytes,
            ),
            workers=WorkerConfig(
                devices=args.devices,
                workers_per_device=args.workers_per_device,
                watchdog_seconds=args.watchdog_seconds,
            ),
            security=SecurityConfig(
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                tls_client_ca=args.tls_client_ca,
                auth_token_file=args.auth_token_file,
            ),
            request_arrival_seconds=args.request_arrival_seconds,
        )
        if config.security.auth_token_file is not None:
            read_token(config.security.auth_token_file)  # refuse to start on an empty token
        return config
    except (ValueError, OSError) as error:
        parser.error(str(error))
        raise  # unreachable: error() exits


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    configure_logging(config.log_level, config.log_format)
    from hingeloss_server.app import serve  # torch loads here, after the flags are checked
    from hingeloss_server.engine.allocator import keep_freed_memory

    keep_freed_memory()
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
