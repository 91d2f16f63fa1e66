"""The compute floor: the loss and gradient in-process, no gRPC, and where a request's time goes.

- closed form: the project's kernel (`hingeloss_server.engine.losses.multiclass_hinge`);
- autograd: the same Weston-Watkins loss written in plain torch ops, forward and
  backward; and `torch.nn.functional.multi_margin_loss` forward and backward
  (which divides by C: compared with the kernel's divide_by_num_classes);
- memory bandwidth: one read of the scores and one write of a gradient (a copy);
- server stages: parse, decode, validate (prepare), compute_batch and encode of one
  request, timed one by one in this process (the hot path without transport).

The harness times these with one intra-op thread: on a small machine that also runs
other processes, a parallel region waits for a descheduled sibling thread (a whole
scheduler tick), which makes two-thread timings bimodal.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

from hingeloss._requests import build_request
from hingeloss_server.engine import losses


class torch_threads:  # noqa: N801 - used as a context manager, like torch's own
    """Runs a block with a given number of intra-op threads."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._saved = torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self._count)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._saved)


def per_call_s(fn: Callable[[], Any], min_time_s: float = 0.4, min_calls: int = 5) -> float:
    """Median seconds per call, after one warm-up call."""
    fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < min_calls or spent < min_time_s:
        started = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - started
        times.append(elapsed)
        spent += elapsed
        if len(times) >= 200:
            break
    return statistics.median(times)


def _inputs(batch: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, classes, generator=generator)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    return scores, targets


def closed_form(
    scores: torch.Tensor, targets: torch.Tensor, divide_by_num_classes: bool = False
) -> torch.Tensor:
    row_scale = torch.full((scores.shape[0],), 1.0 / scores.shape[0], dtype=scores.dtype)
    out = losses.multiclass_hinge(
        scores,
        targets,
        margin=1.0,
        power=1,
        kink_one=False,
        class_weights=None,
        divide_by_num_classes=divide_by_num_classes,
        row_scale=row_scale,
    )
    return out.grads[0]


def autograd(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Weston-Watkins (sum over classes, mean over samples) by autograd."""
    leaf = scores.detach().requires_grad_()
    index = targets.unsqueeze(1)
    terms = (leaf - leaf.gather(1, index) + 1.0).clamp_min(0.0).scatter(1, index, 0.0)
    terms.sum(1).mean().backward()  # type: ignore[no-untyped-call]
    assert leaf.grad is not None
    return leaf.grad


def multi_margin(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    leaf = scores.detach().requires_grad_()
    F.multi_margin_loss(leaf, targets).backward()  # type: ignore[no-untyped-call]
    assert leaf.grad is not None
    return leaf.grad


def compute_floor(batch: int, classes: int) -> dict[str, Any]:
    """Seconds per call of each way to get the loss and gradient, float32 on the CPU."""
    scores, targets = _inputs(batch, classes)
    # The three must agree before their speed means anything.
    torch.testing.assert_close(closed_form(scores, targets), autograd(scores, targets))
    torch.testing.assert_close(
        closed_form(scores, targets, divide_by_num_classes=True), multi_margin(scores, targets)
    )
    out = torch.empty_like(scores)
    figures: dict[str, Any] = {
        "shape": f"{batch}x{classes}",
        "torch_threads": torch.get_num_threads(),
        "closed_form_s": per_call_s(lambda: closed_form(scores, targets)),
        "closed_form_divide_by_c_s": per_call_s(
            lambda: closed_form(scores, targets, divide_by_num_classes=True)
        ),
        "autograd_s": per_call_s(lambda: autograd(scores, targets)),
        "multi_margin_loss_s": per_call_s(lambda: multi_margin(scores, targets)),
        "bandwidth_floor_s": per_call_s(lambda: out.copy_(scores)),
    }
    figures["closed_form_rows_per_s"] = batch / figures["closed_form_s"]
    figures["closed_form_over_autograd"] = figures["autograd_s"] / figures["closed_form_s"]
    figures["closed_form_over_multi_margin_loss"] = (
        figures["multi_margin_loss_s"] / figures["closed_form_divide_by_c_s"]
    )
    figures["closed_form_over_bandwidth_floor"] = (
        figures["closed_form_s"] / figures["bandwidth_floor_s"]
    )
    return figures


def server_stages(batch: int, classes: int) -> dict[str, Any]:
    """Seconds per stage of one request through the server's code, without gRPC."""
    from hingeloss_server.config import LimitsConfig
    from hingeloss_server.engine.allocator import keep_freed_memory
    from hingeloss_server.engine.compute import compute_batch
    from hingeloss_server.engine.validation import prepare
    from hingeloss_server.transport.request_codec import decode_request
    from hingeloss_server.transport.request_wire import parse_request
    from hingeloss_server.transport.response_codec import encode_response

    keep_freed_memory()  # as hingeloss-server does: stages pay no page faults it does not
    rng = np.random.default_rng(0)
    request, _ = build_request(
        "multiclass_hinge",
        {
            "scores": rng.standard_normal((batch, classes), dtype=np.float32),
            "targets": rng.integers(0, classes, batch),
        },
        {},
    )
    payload = request.SerializeToString()
    limits = LimitsConfig()
    device = torch.device("cpu")
    # The server's parse: the tensors of a large message view its bytes, where a protobuf
    # message would copy them out on each read of `data`.
    parsed = parse_request(payload)
    job = decode_request(parsed, limits)
    prepared = prepare(job)
    with torch.inference_mode():
        output = compute_batch([prepared], device)
    result = output.results[0]
    assert not isinstance(result, Exception), result

    def compute() -> None:
        with torch.inference_mode():
            compute_batch([prepared], device)

    stages = {
        "parse_s": per_call_s(lambda: parse_request(payload)),
        "decode_s": per_call_s(lambda: decode_request(parsed, limits)),
        "prepare_s": per_call_s(lambda: prepare(job)),
        "compute_batch_s": per_call_s(compute),
        # Encoding yields the serialized answer: there is no separate serialize step.
        "encode_s": per_call_s(lambda: encode_response(job, result)),
    }
    scores, targets = _inputs(batch, classes)
    stages["kernel_only_s"] = per_call_s(lambda: closed_form(scores, targets))
    stages["total_s"] = sum(v for k, v in stages.items() if k != "kernel_only_s")
    return {"shape": f"{batch}x{classes}", **stages}
