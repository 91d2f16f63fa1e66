"""Fuzz target: bytes -> ComputeRequest.ParseFromString -> decode_request -> prepare -> compute.

Run it with atheris (coverage-guided, `make fuzz` installs it and runs a bounded
time): ``python tests/tools/fuzz/fuzz_decode.py -max_total_time=60``. Seeds, one valid
request per loss and option, are written to build/fuzz/corpus and new inputs are
kept there; a crash is saved as build/fuzz/crash-*.

The contract under test: any bytes either fail to parse, or are refused with
InvalidInputError, or compute and encode a response. Any other exception (or a
hang, or an allocation the request only claims) is a bug. Without atheris,
`one_input` is a plain function: tests/integration/test_fuzz.py calls it on mutated seeds.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

if __name__ == "__main__":
    import atheris

    # Coverage feedback from our code only: instrumenting torch would be slow and useless.
    _instrumented: contextlib.AbstractContextManager[object] = atheris.instrument_imports(
        include=["hingeloss", "hingeloss_server"]
    )
else:
    _instrumented = contextlib.nullcontext()

with _instrumented:
    import numpy as np
    import torch
    from google.protobuf.message import DecodeError

    from hingeloss._requests import build_request
    from hingeloss.v1 import loss_service_pb2 as pb
    from hingeloss_server.config import LimitsConfig
    from hingeloss_server.engine.compute import compute_batch
    from hingeloss_server.engine.errors import InvalidInputError
    from hingeloss_server.engine.validation import prepare
    from hingeloss_server.transport.request_codec import decode_request
    from hingeloss_server.transport.response_codec import encode_response
    from hingeloss_server.warmup import warm_up_requests

# Small limits keep each run fast; the logic under test is the same at any size.
LIMITS = LimitsConfig(
    max_request_rows=4096, max_request_elements=1 << 16, max_request_bytes=1 << 20
)
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[3]
WORK = ROOT / "build" / "fuzz"


def one_input(data: bytes) -> None:
    """Runs one input through the whole server-side path; raises only on a bug."""
    request = pb.ComputeRequest()
    try:
        request.ParseFromString(data)
    except DecodeError:
        return
    try:
        job = decode_request(request, LIMITS)
        prepared = prepare(job)
    except InvalidInputError:
        return
    output = compute_batch([prepared], CPU)
    result = output.results[0]
    if isinstance(result, InvalidInputError):
        return
    encode_response(job, result)


def seeds() -> list[bytes]:
    """Valid requests covering every loss, dtype family and option."""
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=6), np.array([1, -1, 1, 1, -1, 1])
    matrix, targets = rng.normal(size=(6, 4)).astype(np.float32), np.array([0, 1, 2, 3, 1, 0])
    built = [
        build_request(
            "binary_hinge",
            {"scores": scores, "labels": (labels + 1) // 2},
            {"label_encoding": "zero_one", "power": 2, "reduction": "sum"},
        ),
        build_request(
            "multiclass_hinge",
            {"scores": matrix, "targets": targets},
            {
                "class_weights": np.ones(4),
                "ignore_index": 3,
                "kink": "one",
                "class_normalization": "divide_by_num_classes",
            },
        ),
        build_request(
            "crammer_singer",
            {"scores": matrix, "targets": targets},
            {"tie_break": "split_evenly", "gradient_format": "row_sparse"},
        ),
        build_request(
            "gan_discriminator",
            {"real_scores": scores, "fake_scores": scores[:3]},
            {"combine": "pooled_mean", "reduction": "weighted_mean", "sample_weights": np.ones(9)},
        ),
        build_request(
            "margin_ranking",
            {"scores_a": scores, "scores_b": scores[::-1], "labels": labels},
            {"margin": 0.5, "return_per_sample": True},
        ),
    ]
    requests = [request for request, _ in built] + warm_up_requests()
    return [request.SerializeToString() for request in requests]


def main() -> None:
    corpus = WORK / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for index, seed in enumerate(seeds()):
        (corpus / f"seed-{index:02d}").write_bytes(seed)
    args = list(sys.argv)
    if not any(arg.startswith("-artifact_prefix=") for arg in args):
        args.append(f"-artifact_prefix={WORK}/")
    if not any(not arg.startswith("-") for arg in args[1:]):
        args.append(str(corpus))
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
