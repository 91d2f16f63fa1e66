"""hingeloss-bench: a sweep writes its outputs, wrong answers are caught, the open loop keeps time.

Functional checks only: no figure measured here is asserted against a speed.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from helpers.servers import RefusesUnread, ServerThread, server_config

from hingeloss._requests import build_request
from hingeloss.v1 import loss_service_pb2 as pb
from hingeloss_bench import WorkloadSpec, reference
from hingeloss_bench.cli import main
from hingeloss_bench.workload import generate_inputs
from hingeloss_server.config import SecurityConfig

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench"
sys.path.insert(0, str(BENCH))
from echo_server import SERVICE, BackgroundServer, Echo, PerturbingProxy, Replay  # noqa: E402

MakeServer = Callable[..., ServerThread]


def _cells(path: Path) -> list[dict[str, Any]]:
    document = json.loads(path.read_text())
    assert document["tool"] == "hingeloss-bench"
    cells: list[dict[str, Any]] = document["cells"]
    return cells


@pytest.fixture
def server(make_server: MakeServer) -> ServerThread:
    return make_server()


def test_sweep_writes_json_csv_and_plot(server: ServerThread, tmp_path: Path) -> None:
    out, table, plot = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "sweep.png"
    code = main(
        [
            "--target", server.target, "--shape", "16x5", "--concurrency", "1,4",
            "--duration", "0.6", "--warmup", "0.1", "--output", str(out), "--csv", str(table),
            "--plot", str(plot), "--plot-size", "640x480", "--quiet",
        ]
    )  # fmt: skip

    assert code == 0
    cells = _cells(out)
    assert [c["concurrency"] for c in cells] == [1, 4]
    for cell in cells:
        assert cell["ok"] > 0
        assert cell["ok"] == cell["sent"]
        assert cell["error_count"] == 0
        assert cell["verified"] >= 1
        assert cell["rps"] > 0
        assert cell["rows_per_s"] == pytest.approx(16 * cell["rps"])
        assert cell["latency_p50_ms"] <= cell["latency_p99_ms"] <= cell["latency_max_ms"]
        assert cell["compute_ms"] > 0
        assert cell["batch_requests"] >= 1
        assert cell["request_bytes"] > 16 * 5 * 4
        assert cell["response_bytes"] > 16 * 5 * 4
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["concurrency"]) for r in rows] == [1, 4]
    assert {"rps", "latency_p99_ms", "mb_down_per_s", "queue_ms", "errors"} <= set(rows[0])

    image = pytest.importorskip("matplotlib.image").imread(plot)
    assert image.shape[:2] == (480, 640)
    assert float(np.asarray(image)[..., :3].std()) > 0.01  # not a blank canvas


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--mode", "stream", "--concurrency", "4", "--connections", "2"], id="stream"),
        pytest.param(["--rate", "80", "--arrivals", "poisson"], id="open-loop"),
        pytest.param(["--mode", "upload", "--gradient-format", "factored", "--concurrency", "3"],
                     id="upload"),
        pytest.param(["--mode", "upload", "--loss", "margin_ranking", "--shape", "64",
                      "--rate", "80"], id="upload-open-loop"),
        pytest.param(
            ["--loss", "crammer_singer", "--dtype", "float64", "--sparsity", "0.5",
             "--gradient-format", "row_sparse", "--option", "tie_break=split_evenly",
             "--concurrency", "3"],
            id="row-sparse",
        ),
        pytest.param(["--loss", "gan_discriminator", "--shape", "64", "--dtype", "bfloat16",
                      "--concurrency", "3"], id="two-gradients"),
        pytest.param(["--gradient-format", "factored", "--concurrency", "4", "--option",
                      "class_normalization=divide_by_num_classes"], id="factored"),
        pytest.param(
            ["--loss", "crammer_singer", "--dtype", "bfloat16", "--gradient-format", "factored",
             "--option", "tie_break=split_evenly", "--mode", "stream", "--concurrency", "3"],
            id="factored-stream",
        ),
    ],
)  # fmt: skip
def test_modes_verify_every_answer(server: ServerThread, tmp_path: Path, extra: list[str]) -> None:
    out = tmp_path / "r.json"
    args = ["--target", server.target, "--shape", "32x7", "--requests", "16", "--warmup", "0"]
    args += ["--verify-fraction", "1", "--output", str(out), "--quiet", *extra]

    assert main(args) == 0
    (cell,) = _cells(out)
    assert cell["sent"] == cell["ok"] == cell["verified"] == 16
    assert cell["error_count"] == 0


@pytest.mark.parametrize("gradient_format", ["dense", "row_sparse", "factored"])
def test_verification_catches_one_wrong_element(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str], gradient_format: str
) -> None:
    out = tmp_path / "r.json"
    with BackgroundServer(PerturbingProxy(server.target)) as proxy:
        code = main(
            [
                "--target", proxy.target, "--shape", "32x7", "--concurrency", "1",
                "--requests", "4", "--warmup", "0", "--gradient-format", gradient_format,
                "--output", str(out), "--quiet",
            ]
        )  # fmt: skip

    assert code == 1
    (cell,) = _cells(out)
    assert cell["ok"] == 4  # every call succeeded: only the answers are wrong
    assert cell["errors"]["MISMATCH"] >= 1  # the first answer is always checked
    assert "element(s) differ" in cell["mismatches"][0]
    assert "MISMATCH" in capsys.readouterr().err


def test_open_loop_keeps_its_schedule_when_the_server_stalls(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    stall_s = 0.8
    with BackgroundServer(Echo(stall_after_s=0.5, stall_s=stall_s)) as echo:
        code = main(
            [
                "--target", echo.target, "--shape", "8x4", "--rate", "100", "--arrivals",
                "constant", "--duration", "2", "--warmup", "0", "--verify-fraction", "0",
                "--output", str(out), "--quiet",
            ]
        )  # fmt: skip

    assert code == 0
    (cell,) = _cells(out)
    # Every scheduled request went out, on time, stall or not ...
    assert cell["sent"] == cell["ok"] == 200
    assert cell["send_lag_p99_ms"] < 0.5 * stall_s * 1e3
    # ... and the stall shows as latency, counted from the scheduled send times.
    assert cell["latency_max_ms"] > 0.75 * stall_s * 1e3
    assert cell["latency_p90_ms"] > 0.4 * stall_s * 1e3
    assert cell["latency_p50_ms"] < 0.5 * stall_s * 1e3


def test_tls_mtls_and_token(make_server: MakeServer, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("bench-client")
    paths = {
        name: tmp_path / name
        for name in ("ca.pem", "cert.pem", "key.pem", "client.pem", "client.key", "token")
    }
    ca.cert_pem.write_to_path(str(paths["ca.pem"]))
    server_cert.cert_chain_pems[0].write_to_path(str(paths["cert.pem"]))
    server_cert.private_key_pem.write_to_path(str(paths["key.pem"]))
    client_cert.cert_chain_pems[0].write_to_path(str(paths["client.pem"]))
    client_cert.private_key_pem.write_to_path(str(paths["client.key"]))
    paths["token"].write_text("s3cret\n")
    security = SecurityConfig(
        tls_cert=paths["cert.pem"],
        tls_key=paths["key.pem"],
        tls_client_ca=paths["ca.pem"],
        auth_token_file=paths["token"],
    )
    server = make_server(server_config(security=security))
    base = ["--target", server.target, "--tls-ca", str(paths["ca.pem"]), "--shape", "8x3"]
    base += ["--tls-cert", str(paths["client.pem"]), "--tls-key", str(paths["client.key"])]
    base += ["--concurrency", "2", "--requests", "6", "--warmup", "0", "--quiet"]
    out = tmp_path / "r.json"

    assert main([*base, "--token", "s3cret", "--output", str(out)]) == 0
    assert _cells(out)[0]["ok"] == 6
    assert main([*base, "--token", "wrong", "--output", str(out)]) == 1
    assert _cells(out)[0]["errors"] == {"UNAUTHENTICATED": 6}


def test_several_load_processes(server: ServerThread, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ["--target", server.target, "--shape", "16x5", "--concurrency", "4", "--processes", "2"]
    args += ["--requests", "20", "--warmup", "0", "--output", str(out), "--quiet"]
    completed = subprocess.run(
        [sys.executable, "-m", "hingeloss_bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    (cell,) = _cells(out)
    assert cell["processes"] == 2
    assert cell["sent"] == cell["ok"] == 20
    assert "req/s" in completed.stdout


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--option", "reduction=sum", "--requests", "1"]) == 2
    assert "cannot verify" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--concurrency", "1", "--rate", "5"])
    assert exit_info.value.code == 2


@pytest.fixture(scope="module")
def references() -> Any:
    return pytest.importorskip("helpers.references")


OPTION_SETS = [
    {},
    {"power": 2, "margin": 0.5},
    {"kink": "one", "class_normalization": "divide_by_num_classes"},
    {"kink": "one", "tie_break": "split_evenly", "combine": "pooled_mean"},
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=["default", "squared", "kink-one", "ties"])
@pytest.mark.parametrize("loss", sorted(reference.APPLICABLE))
def test_bench_reference_matches_the_test_references(
    references: Any, loss: str, options: dict[str, Any]
) -> None:
    applicable = {k: v for k, v in options.items() if k in reference.APPLICABLE[loss]}
    spec = WorkloadSpec(loss=loss, batch=24, classes=6, sparsity=None, options=applicable)
    inputs = generate_inputs(spec, 0)
    ours = reference.answer(loss, inputs, applicable)
    theirs = references.reference(loss, inputs, applicable)

    assert ours.loss == pytest.approx(theirs.loss, rel=1e-12, abs=1e-15)
    for mine, expected in zip(ours.grads, theirs.grads, strict=True):
        np.testing.assert_allclose(mine, expected, rtol=1e-12, atol=1e-15)


def test_the_plain_floor_server_gives_verified_answers(tmp_path: Path) -> None:
    """make bench's plain floor (torch in a grpc.aio handler) answers the benchmark correctly."""
    port_file = tmp_path / "plain.port"
    process = subprocess.Popen(
        [sys.executable, str(BENCH / "plain_server.py"),
         "--port-file", str(port_file)]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert process.poll() is None, "the plain server exited"
            assert time.monotonic() < deadline, "the plain server did not start"
            time.sleep(0.05)
        out = tmp_path / "r.json"
        args = ["--target", f"127.0.0.1:{int(port_file.read_text())}", "--shape", "16x5"]
        args += ["--concurrency", "2", "--requests", "12", "--warmup", "0"]
        args += ["--verify-fraction", "1", "--output", str(out), "--quiet"]
        assert main(args) == 0
        (cell,) = _cells(out)
        assert cell["ok"] == 12
        assert cell["verified"] == 12
        assert cell["error_count"] == 0
    finally:
        process.terminate()
        process.wait(30)


def _multiclass_request(rng: np.random.Generator, gradient_format: str, rows: int = 6) -> bytes:
    inputs = {
        "scores": rng.normal(size=(rows, 5)).astype(np.float32),
        "targets": rng.integers(0, 5, rows).astype(np.int64),
    }
    request, _ = build_request("multiclass_hinge", inputs, {"gradient_format": gradient_format})
    return request.SerializeToString()


def _call(target: str, request: bytes) -> bytes:
    """One raw Compute call: the answer's bytes as they came."""
    with grpc.insecure_channel(target) as channel:
        answer: bytes = channel.unary_unary(f"/{SERVICE}/Compute")(request, timeout=30)
        return answer


def _refusal_of_a_call_without_a_message(target: str) -> grpc.StatusCode:
    """A call registered as the service's is a request stream: one that ends without a
    message is refused (INVALID_ARGUMENT), where a unary handler never runs."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_unary(f"/{SERVICE}/Compute")
        with pytest.raises(grpc.RpcError) as refused:
            call(iter(()), timeout=10)
    code: grpc.StatusCode = refused.value.code()
    return code


def _gradient(answer: bytes) -> pb.Gradient:
    (gradient,) = pb.ComputeResponse.FromString(answer).gradients
    return gradient


def test_replay_serves_the_servers_answer_once_asked_per_shape_and_format(
    server: ServerThread,
) -> None:
    rng = np.random.default_rng(7)
    first, second = (_multiclass_request(rng, "factored") for _ in range(2))
    replay = Replay(lambda: server.target)
    with BackgroundServer(replay) as proxy:
        replayed = _call(proxy.target, first)
        again = _call(proxy.target, second)
        dense = _call(proxy.target, _multiclass_request(rng, "dense"))
        taller = _call(proxy.target, _multiclass_request(rng, "factored", rows=7))
        # A floor for the service: Compute registered as the service's is.
        refused = _refusal_of_a_call_without_a_message(proxy.target)

    # The first answer is the server's (the same gradient as asking it directly) ...
    assert _gradient(replayed) == _gradient(_call(server.target, first))
    assert _gradient(replayed).WhichOneof("value") == "factored"
    # ... a request of the same shape and format gets those very bytes, unasked ...
    assert again == replayed
    # ... and another format, or another shape, is asked for once.
    assert _gradient(dense).WhichOneof("value") == "dense"
    assert list(_gradient(taller).factored.dense_shape) == [7, 5]
    assert (replay.forwarded, replay.requests) == (3, 4)
    assert refused is grpc.StatusCode.INVALID_ARGUMENT


def test_echo_as_the_service_registers_compute_answers_as_the_echo_does() -> None:
    request = _multiclass_request(np.random.default_rng(3), "dense")
    with BackgroundServer(Echo()) as echo, BackgroundServer(Echo(as_service=True)) as registered:
        assert _call(registered.target, request) == _call(echo.target, request)
        refused = _refusal_of_a_call_without_a_message(registered.target)
    assert refused is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("mode", ["upload", "stream"])
def test_a_server_ending_calls_early_is_counted_by_its_status(tmp_path: Path, mode: str) -> None:
    """grpc.aio's own writes report some of such calls as INTERNAL (grpc/grpc#36066),
    in every run of this cell here; the load generator writes as the SDK does."""
    out = tmp_path / "r.json"
    server = RefusesUnread(grpc.StatusCode.INVALID_ARGUMENT)
    try:
        code = main(
            [
                "--target", f"127.0.0.1:{server.port}", "--mode", mode, "--shape", "1024x4000",
                "--concurrency", "4", "--requests", "12", "--warmup", "0",
                "--verify-fraction", "0", "--output", str(out), "--quiet",
            ]
        )  # fmt: skip
    finally:
        server.close()
    assert code == 1  # every request failed
    (cell,) = _cells(out)
    assert cell["errors"] == {"INVALID_ARGUMENT": cell["sent"]}
