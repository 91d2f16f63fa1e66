"""Security: TLS, mutual TLS and bearer tokens with certificates made here; errors echo little.

Certificates come from a throwaway CA (trustme), written to a temporary folder and
handed to the server as its --tls-cert, --tls-key and --tls-client-ca files.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers.calls import compute_without_a_request
from helpers.faults import FaultHook
from helpers.servers import server_config, spawn_server
from helpers.system import memory_kib
from prometheus_client import CollectorRegistry

from hingeloss import (
    NO_RETRY,
    AsyncLossClient,
    InternalError,
    InvalidArgumentError,
    LossClient,
    UnauthenticatedError,
    UnavailableError,
)
from hingeloss._errors import from_rpc_error
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss.v1 import loss_service_pb2_grpc as pb_grpc
from hingeloss_server.cli import config_from_args
from hingeloss_server.config import SecurityConfig
from hingeloss_server.transport import tokenless
from hingeloss_server.transport.servicer import SERVICE_NAME

SCORES = np.array([0.5, -1.0, 2.0, 0.0])
LABELS = np.array([1, -1, 1, 1])
EXPECTED = float(np.maximum(0.0, 1.0 - LABELS * SCORES).mean())
TOKEN = "s3cr3t-token-for-tests"
SERVING = health_pb2.HealthCheckResponse.SERVING
_LIST_SERVICES = reflection_pb2.ServerReflectionRequest(list_services="")


@dataclass
class Pki:
    """A CA, the server's certificate, and client certificates from this CA and another."""

    ca_pem: bytes
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_key_pem: bytes
    client_chain_pem: bytes
    stranger_key_pem: bytes
    stranger_chain_pem: bytes


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("trainer.example")
    stranger = other_ca.issue_cert("trainer.example")
    server.private_key_pem.write_to_path(str(folder / "server.key"))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(folder / "server.pem"), append=True)
    ca.cert_pem.write_to_path(str(folder / "clients-ca.pem"))
    return Pki(
        ca_pem=ca.cert_pem.bytes(),
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_ca=folder / "clients-ca.pem",
        client_key_pem=client.private_key_pem.bytes(),
        client_chain_pem=b"".join(b.bytes() for b in client.cert_chain_pems),
        stranger_key_pem=stranger.private_key_pem.bytes(),
        stranger_chain_pem=b"".join(b.bytes() for b in stranger.cert_chain_pems),
    )


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "token"
    path.write_text(TOKEN + "\n")  # a trailing newline, as editors leave it
    return path


def _call(target: str, **client_args: Any) -> float:
    with LossClient(target, retry=NO_RETRY, timeout=5, **client_args) as client:
        return client.binary_hinge(SCORES, LABELS).loss


def _health(target: str, credentials: grpc.ChannelCredentials | None = None) -> str:
    with LossClient(target, retry=NO_RETRY, timeout=5, credentials=credentials) as client:
        return client.health(SERVICE_NAME)


# ---- TLS ---------------------------------------------------------------------------------


def test_tls(make_server: Callable[..., Any], pki: Pki) -> None:
    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key)
    server = make_server(server_config(security=security))
    trusted = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
    assert _call(server.target, credentials=trusted) == pytest.approx(EXPECTED)
    assert _call(f"localhost:{server.server.port}", credentials=trusted) == pytest.approx(EXPECTED)
    # Plaintext, and a client that trusts another CA, are both refused at the handshake.
    with pytest.raises(UnavailableError):
        _call(server.target)
    untrusted = grpc.ssl_channel_credentials(root_certificates=trustme.CA().cert_pem.bytes())
    with pytest.raises(UnavailableError):
        _call(server.target, credentials=untrusted)


async def test_tls_with_the_asyncio_client(make_server: Callable[..., Any], pki: Pki) -> None:
    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key)
    server = make_server(server_config(security=security))
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
    async with AsyncLossClient(server.target, credentials=credentials, timeout=5) as client:
        result = await client.binary_hinge(SCORES, LABELS)
    assert result.loss == pytest.approx(EXPECTED)


def test_mutual_tls_refuses_a_client_without_a_certificate(
    make_server: Callable[..., Any], pki: Pki
) -> None:
    security = SecurityConfig(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.client_ca
    )
    server = make_server(server_config(security=security))
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_pem,
        private_key=pki.client_key_pem,
        certificate_chain=pki.client_chain_pem,
    )
    assert _call(server.target, credentials=with_cert) == pytest.approx(EXPECTED)
    assert _health(server.target, with_cert) == "SERVING"

    without_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
    with pytest.raises(UnavailableError):
        _call(server.target, credentials=without_cert)
    with pytest.raises(UnavailableError):
        _health(server.target, without_cert)  # the handshake comes before any service
    stranger = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_pem,
        private_key=pki.stranger_key_pem,
        certificate_chain=pki.stranger_chain_pem,
    )
    with pytest.raises(UnavailableError):
        _call(server.target, credentials=stranger)


# ---- bearer tokens -----------------------------------------------------------------------


def test_token_auth(make_server: Callable[..., Any], token_file: Path) -> None:
    registry = CollectorRegistry()
    server = make_server(
        server_config(security=SecurityConfig(auth_token_file=token_file)), registry=registry
    )
    assert _call(server.target, token=TOKEN, local_token=True) == pytest.approx(EXPECTED)
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1], ""):
        with pytest.raises(UnauthenticatedError):
            _call(server.target, token=token, local_token=True)
    with LossClient(server.target, retry=NO_RETRY, timeout=5) as client:
        with pytest.raises(UnauthenticatedError):
            client.server_info()
        with client.stream() as stream:
            streamed = stream.binary_hinge(SCORES, LABELS)
        assert isinstance(streamed.exception(5), UnauthenticatedError)
        # Probes carry no credentials: health stays open.
        assert client.health() == "SERVING"
        assert client.health(SERVICE_NAME) == "SERVING"
    with LossClient(server.target, token=TOKEN, timeout=5, local_token=True) as client:
        assert client.server_info().version
    # A request sent in parts (ComputeUpload) is refused the same way, and served with it.
    for token, refused in ((None, True), (TOKEN, False)):
        with LossClient(
            server.target, token=token, local_token=True, retry=NO_RETRY, upload_min_bytes=0
        ) as client:
            if refused:
                with pytest.raises(UnauthenticatedError):
                    client.binary_hinge(SCORES, LABELS)
            else:
                assert client.binary_hinge(SCORES, LABELS).loss == pytest.approx(EXPECTED)
    rejected = registry.get_sample_value(
        "hingeloss_requests_rejected_total", {"reason": "unauthenticated"}
    )
    assert rejected is not None
    assert rejected >= 7


def test_calls_without_the_token_cannot_take_every_concurrent_call(
    make_server: Callable[..., Any], token_file: Path
) -> None:
    """Health and reflection answer without the token, but only so many such calls at once,
    counted from their headers: the token's holders still find room among
    --max-concurrent-rpcs, whether those calls stream or never send their message."""
    max_calls, limit = 24, 5
    security = SecurityConfig(auth_token_file=token_file, max_calls_without_token=limit)
    registry = CollectorRegistry()
    server = make_server(
        server_config(security=security, max_concurrent_rpcs=max_calls), registry=registry
    )
    watch = health_pb2.HealthCheckRequest(service="")
    authorized = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        # As many Watch streams as the server takes calls, each opened and answered in turn.
        held = [health.Watch(watch, timeout=60) for _ in range(max_calls)]
        firsts = [_first_answer(call) for call in held]
        assert firsts.count(grpc.StatusCode.OK) == limit, firsts
        assert firsts.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == max_calls - limit, firsts
        refused = registry.get_sample_value(
            "hingeloss_requests_rejected_total", {"reason": "tokenless_full"}
        )
        assert refused == max_calls - limit
        # While they are open the token's holders are served, and not counted.
        assert _call(server.target, token=TOKEN, local_token=True) == pytest.approx(EXPECTED)
        assert next(health.Watch(watch, timeout=10, metadata=authorized)).status == SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            list(reflection.ServerReflectionInfo(iter([_LIST_SERVICES]), timeout=10))
        assert excinfo.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in held:
            call.cancel()
        assert _watch_answered_within(health, watch, seconds=10)  # places come back

        # Calls that never send their message: counted too, from their headers.
        silent = threading.Event()
        pending = [
            channel.stream_unary(method).future(_silent_until(silent), timeout=60)
            for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
            for _ in range(max_calls)
        ]
        try:
            assert _call(server.target, token=TOKEN, local_token=True) == pytest.approx(EXPECTED)
            assert _first_answer(health.Watch(watch, timeout=10)) is (
                grpc.StatusCode.RESOURCE_EXHAUSTED
            )
        finally:
            silent.set()
        assert _watch_answered_within(health, watch, seconds=10)
        assert all(call.exception(10) is not None for call in pending)


def test_a_call_without_the_token_has_seconds_for_its_message(
    make_server: Callable[..., Any], token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe sends its message at once; one that does not is refused as a late Compute
    request is (REQUEST_ARRIVAL_TIMEOUT, counted), its place freed."""
    monkeypatch.setattr(tokenless, "ARRIVAL_WITHOUT_TOKEN_S", 0.3)
    security = SecurityConfig(auth_token_file=token_file, max_calls_without_token=1)
    registry = CollectorRegistry()
    server = make_server(server_config(security=security), registry=registry)
    with grpc.insecure_channel(server.target) as channel:
        started = time.monotonic()
        call = channel.stream_unary("/grpc.health.v1.Health/Check").future(
            _silent_until(threading.Event(), seconds=30), timeout=30
        )
        late = from_rpc_error(call.exception(10))
        assert late.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert late.reason == "REQUEST_ARRIVAL_TIMEOUT"
        assert time.monotonic() - started < 5
        counted = registry.get_sample_value(
            "hingeloss_requests_rejected_total", {"reason": "arrival_timeout"}
        )
        assert counted == 1
        probe = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert probe.status == SERVING


def _silent_until(done: threading.Event, seconds: float = 60) -> Iterator[bytes]:
    """A request stream that sends nothing, and ends once `done` is set."""
    done.wait(seconds)
    yield from ()


def test_an_open_service_not_served_is_unimplemented_without_the_token_too(
    make_server: Callable[..., Any], token_file: Path
) -> None:
    """Reflection turned off: a call without the token learns that, as one with it does."""
    security = SecurityConfig(auth_token_file=token_file)
    server = make_server(server_config(security=security, reflection=False))
    with grpc.insecure_channel(server.target) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            list(reflection.ServerReflectionInfo(iter([_LIST_SERVICES]), timeout=10))
    assert excinfo.value.code() is grpc.StatusCode.UNIMPLEMENTED


def _first_answer(call: Any) -> grpc.StatusCode:
    """OK once a Watch call has said SERVING; else the code it ended with."""
    try:
        assert next(call).status == SERVING
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _watch_answered_within(
    health: health_pb2_grpc.HealthStub, request: health_pb2.HealthCheckRequest, seconds: float
) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        call = health.Watch(request, timeout=10)
        code = _first_answer(call)
        call.cancel()
        if code is grpc.StatusCode.OK:
            return True
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, code
        time.sleep(0.05)
    return False


def test_refused_calls_to_made_up_methods_add_no_metric_series(
    make_server: Callable[..., Any], token_file: Path
) -> None:
    """A caller without the token cannot grow /metrics with paths of its own making."""
    registry = CollectorRegistry()
    server = make_server(
        server_config(security=SecurityConfig(auth_token_file=token_file)), registry=registry
    )
    made_up = [f"/made.up.Service{i}/Method{i}" for i in range(20)]
    with grpc.insecure_channel(server.target) as channel:
        for path in made_up:
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(path)(b"", timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    labels = {
        (sample.labels.get("grpc_service"), sample.labels.get("grpc_method"))
        for metric in registry.collect()
        if metric.name.startswith("hingeloss_grpc_server_handled")
        for sample in metric.samples
    }
    assert ("unknown", "unknown") in labels
    assert not any(service and service.startswith("made.up") for service, _ in labels)


async def test_the_sdk_sends_a_token_only_over_tls_or_to_this_machine_when_asked(
    make_server: Callable[..., Any], token_file: Path
) -> None:
    """The token goes as call credentials, which gRPC refuses to send in plaintext."""
    server = make_server(server_config(security=SecurityConfig(auth_token_file=token_file)))
    for client_type in (LossClient, AsyncLossClient):
        with pytest.raises(ValueError, match="a bearer token needs TLS credentials"):
            client_type(server.target, token=TOKEN)
    async with AsyncLossClient(server.target, token=TOKEN, local_token=True) as client:
        assert (await client.binary_hinge(SCORES, LABELS)).loss == pytest.approx(EXPECTED)
        async with client.stream() as stream:
            streamed = stream.binary_hinge(SCORES, LABELS)
        assert (await streamed).loss == pytest.approx(EXPECTED)
    # By name too: gRPC's local credentials accept any loopback peer.
    with LossClient(
        f"localhost:{server.server.port}", token=TOKEN, local_token=True, retry=NO_RETRY
    ) as client:
        assert client.binary_hinge(SCORES, LABELS).loss == pytest.approx(EXPECTED)


def test_token_is_checked_exactly(make_server: Callable[..., Any], token_file: Path) -> None:
    """Only `authorization: Bearer <token>`: no other scheme, header or spelling."""
    server = make_server(server_config(security=SecurityConfig(auth_token_file=token_file)))
    request = pb.ComputeRequest(
        binary_hinge=pb.BinaryHinge(
            scores=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[1], data=np.zeros(1).tobytes()),
            labels=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[1], data=np.ones(1, "<i8").tobytes()),
        )
    )
    refused = [
        (("authorization", TOKEN),),
        (("authorization", f"Basic {TOKEN}"),),
        (("authorization", f"Bearer  {TOKEN}"),),
        (("x-api-key", TOKEN),),
        (("authorization", "Bearer wrong"), ("authorization", f"Bearer {TOKEN}")),
    ]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
        for metadata in refused:
            with pytest.raises(grpc.RpcError) as info:
                stub.Compute(request, metadata=metadata, timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED, metadata
        assert stub.Compute(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5)
        # Reflection is open too (grpcurl works without a token); it lists names only.
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = [s.name for a in answers for s in a.list_services_response.service]
        assert SERVICE_NAME in names


def _unauthenticated_upload(target: str, megabytes: int) -> grpc.StatusCode:
    request = pb.ComputeRequest(
        gan_generator=pb.GanGenerator(
            fake_scores=pb.Tensor(
                dtype=pb.DTYPE_FLOAT32, shape=[megabytes << 18], data=bytes(megabytes << 20)
            )
        )
    )
    options = [("grpc.max_send_message_length", 1 << 30)]
    with grpc.insecure_channel(target, options=options) as channel:
        try:
            pb_grpc.LossServiceStub(channel).Compute(request, timeout=60)  # type: ignore[no-untyped-call]
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_no_token_is_refused_on_the_headers_before_the_body_is_read(
    tmp_path: Path, token_file: Path
) -> None:
    """No token: UNAUTHENTICATED before the message arrives; the server holds none of it."""
    with spawn_server(tmp_path, "--auth-token-file", str(token_file)) as (process, port):
        target = f"127.0.0.1:{port}"
        with grpc.insecure_channel(target) as channel:
            error = compute_without_a_request(channel, timeout=20)
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED, error.details()
        # Four 100 MB uploads at once: the server's peak RSS does not move.
        before = memory_kib(process.pid)
        codes: list[grpc.StatusCode] = []
        uploads = [
            threading.Thread(target=lambda: codes.append(_unauthenticated_upload(target, 100)))
            for _ in range(4)
        ]
        for upload in uploads:
            upload.start()
        for upload in uploads:
            upload.join(120)
        after = memory_kib(process.pid)
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert after["VmHWM"] - before["VmHWM"] < 64 << 10, (before, after)


def test_token_over_tls_and_mutual_tls(
    make_server: Callable[..., Any], pki: Pki, token_file: Path
) -> None:
    security = SecurityConfig(
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.client_ca,
        auth_token_file=token_file,
    )
    server = make_server(server_config(security=security))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_pem,
        private_key=pki.client_key_pem,
        certificate_chain=pki.client_chain_pem,
    )
    assert _call(server.target, credentials=credentials, token=TOKEN) == pytest.approx(EXPECTED)
    with pytest.raises(UnauthenticatedError):
        _call(server.target, credentials=credentials)
    assert _health(server.target, credentials) == "SERVING"


def test_security_flags_and_environment(
    pki: Pki, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_from_args(
        [
            "--tls-cert",
            str(pki.server_cert),
            "--tls-key",
            str(pki.server_key),
            "--tls-client-ca",
            str(pki.client_ca),
        ]
    )
    assert config.security.tls_client_ca == pki.client_ca
    monkeypatch.setenv("HINGELOSS_AUTH_TOKEN_FILE", str(token_file))
    assert config_from_args([]).security.auth_token_file == token_file
    with pytest.raises(SystemExit):
        config_from_args(["--tls-cert", str(pki.server_cert)])  # no key
    with pytest.raises(SystemExit):
        config_from_args(["--tls-client-ca", str(pki.client_ca)])  # mTLS without TLS


@pytest.mark.parametrize("content", ["", "\n", "  \t\n  \n"])
def test_a_token_file_of_whitespace_refuses_to_start(
    make_server: Callable[..., Any], tmp_path: Path, content: str
) -> None:
    """An empty token would make `authorization: Bearer ` a valid credential."""
    blank = tmp_path / "token"
    blank.write_text(content)
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "hingeloss_server",
            *("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--devices", "cpu"),
            *("--auth-token-file", str(blank)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert process.returncode == 2, process.stderr
    assert "auth_token_file must be a file holding a token, not only whitespace" in process.stderr
    # Built in-process (no flags), the server refuses too, before it binds.
    with pytest.raises(ValueError, match="auth_token_file"):
        make_server(server_config(security=SecurityConfig(auth_token_file=blank)))


# ---- what errors may say -----------------------------------------------------------------


def _refusal(target: str, call: Callable[[LossClient], Any]) -> InvalidArgumentError:
    with (
        LossClient(target, retry=NO_RETRY, timeout=30) as client,
        pytest.raises(InvalidArgumentError) as info,
    ):
        call(client)
    return info.value


def _numbers(text: str) -> list[str]:
    return re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)


def test_errors_echo_the_first_bad_index_and_value_only(shared_server: Any) -> None:
    rng = np.random.default_rng(5)
    scores = rng.normal(size=1_000_000)
    scores[654_321] = np.nan
    scores[900_000] = np.inf
    error = _refusal(shared_server.target, lambda c: c.binary_hinge(scores, np.ones(1_000_000)))
    assert error.field_violations[0].field == "binary_hinge.scores[654321]"
    assert len(str(error)) < 120
    assert "nan" in str(error)
    assert _numbers(str(error)) == ["654321"]  # the index, and no value from the data

    labels = np.full(500_000, 3)
    labels[:7] = 1
    error = _refusal(shared_server.target, lambda c: c.binary_hinge(np.zeros(500_000), labels))
    assert error.field_violations[0].field == "binary_hinge.labels[7]"
    assert len(str(error)) < 120
    assert set(_numbers(str(error))) <= {"7", "3", "-1", "1", "+1"}

    matrix = rng.normal(size=(100_000, 10))
    targets = rng.integers(0, 10, size=100_000)
    targets[42_424] = 12
    error = _refusal(shared_server.target, lambda c: c.multiclass_hinge(matrix, targets))
    assert error.field_violations[0].field == "multiclass_hinge.targets[42424]"
    assert len(str(error)) < 120


def test_errors_about_structure_stay_short(shared_server: Any) -> None:
    """Shapes are echoed as a count, not the caller's list (a million dims would not fit)."""
    requests = [
        pb.ComputeRequest(
            gan_generator=pb.GanGenerator(
                fake_scores=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 200_000)
            )
        ),
        pb.ComputeRequest(
            gan_generator=pb.GanGenerator(
                fake_scores=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[3], data=bytes(5_000_000))
            )
        ),
        pb.ComputeRequest(request_id="x" * 1_000_000, reduction=99),  # type: ignore[arg-type]
    ]
    with grpc.insecure_channel(
        shared_server.target, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        stub = pb_grpc.LossServiceStub(channel)  # type: ignore[no-untyped-call]
        for request in requests:
            with pytest.raises(grpc.RpcError) as info:
                stub.Compute(request, timeout=10)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert len(info.value.details() or "") < 120
            assert isinstance(from_rpc_error(info.value), InvalidArgumentError)


def test_internal_error_does_not_echo_a_huge_request_id(make_server: Callable[..., Any]) -> None:
    request_id = "trainer-7/" + "y" * 500_000
    hook = FaultHook(fail={request_id: lambda: RuntimeError("injected")})
    server = make_server(server_config(), fault_hook=hook)
    with LossClient(server.target, retry=NO_RETRY, timeout=10) as client:
        with pytest.raises(InternalError) as info:
            client.binary_hinge(SCORES, LABELS, request_id=request_id)
        assert len(str(info.value)) < 200
        assert "trainer-7/" in str(info.value)
        # The id comes back whole in a successful response, where it belongs.
        ok = client.binary_hinge(SCORES, LABELS, request_id="z" * 500_000)
    assert ok.loss == pytest.approx(EXPECTED)


def test_nothing_from_a_request_is_unpickled_or_evaluated() -> None:
    """A static guard over the server and SDK sources (generated stubs excluded)."""
    root = Path(__file__).resolve().parents[2]
    sources = [
        path
        for package in (root / "server" / "hingeloss_server", root / "client" / "hingeloss")
        for path in package.rglob("*.py")
        if "v1" not in path.relative_to(package).parts
    ]
    assert len(sources) > 10
    forbidden = re.compile(
        r"\bpickle\b|\bcPickle\b|\bmarshal\b|\bshelve\b|\beval\(|\bexec\(|torch\.load\(|"
        r"allow_pickle\s*=\s*True|yaml\.load\(|\bdill\b|__import__\("
    )
    offenders = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in sources
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if forbidden.search(line)
    ]
    assert offenders == []


def test_health_probe_over_tls(make_server: Callable[..., Any], pki: Pki, tmp_path: Path) -> None:
    from hingeloss._health import main as health_main

    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key)
    server = make_server(server_config(security=security))
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca_pem)
    assert health_main(["--target", server.target, "--tls-ca", str(ca), "--quiet"]) == 0
    assert health_main(["--target", server.target, "--quiet"]) == 1  # plaintext is refused
