"""`hingeloss-health`: a gRPC health probe for Docker HEALTHCHECK and scripts.

Exit status 0 when the service answers SERVING, 1 otherwise (NOT_SERVING,
unreachable, timeout), which is what Docker's HEALTHCHECK expects.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hingeloss._channel import serving_status


def check(
    target: str,
    service: str = "",
    timeout: float = 2.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> str:
    """Returns the health status name, or the gRPC error code name when the call fails."""
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            return str(error.code().name)
    return serving_status(response)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hingeloss-health", description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of the server")
    parser.add_argument("--service", default="", help='service name ("" = the whole server)')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA bundle: connect with TLS")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM client key (mTLS)")
    args = parser.parse_args(argv)
    credentials = None
    if args.tls_ca or args.tls_cert:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
            private_key=args.tls_key.read_bytes() if args.tls_key else None,
            certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
        )
    status = check(args.target, args.service, args.timeout, credentials)
    if not args.quiet:
        print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
