"""torch autograd integration: `loss = remote(...); loss.backward()` just works.

The forward pass asks the server for the loss and its gradient in one call; the
backward pass only scales that gradient by grad_output, so no second round trip
is needed. Every loss here is row-separable (sample i depends only on row i of
each input), which makes reduction "none" exact too: the per-sample
grad_output scales each row of the gradient of the sum.

Requires torch (``pip install "hingeloss[server]"`` or any torch install).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import torch
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "hingeloss.torch needs PyTorch; install it (e.g. pip install torch) or use the "
        "numpy interface of hingeloss.LossClient"
    ) from error

from hingeloss._requests import OTHER_FIELDS, SCORE_FIELDS
from hingeloss._results import LossResult

__all__ = ["RemoteHingeLoss", "remote_loss"]


class _RemoteLoss(torch.autograd.Function):
    """Autograd node whose gradient was computed by the server in the forward call."""

    @staticmethod
    def forward(ctx: Any, call: Callable[..., LossResult], *scores: torch.Tensor) -> Any:
        result = call(*scores)
        if not result.grads:
            raise ValueError("the remote loss returned no gradient (gradient_format='none')")
        ctx.save_for_backward(*result.grads)
        # As the server resolved it: the option may be spelled any way the SDK takes.
        ctx.none = result.resolved.get("reduction") == "none"
        if ctx.none:
            per_sample = result.per_sample
            # One tensor per sample set (GAN discriminator: real, then fake).
            ctx.set_rows = [int(p.shape[0]) for p in per_sample]
            return per_sample[0] if len(per_sample) == 1 else torch.cat(list(per_sample))
        return torch.tensor(result.loss, dtype=scores[0].dtype, device=scores[0].device)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        grads = ctx.saved_tensors
        if not ctx.none:
            scaled = tuple(g * grad_output for g in grads)
        else:
            scaled = _scale_rows(grads, grad_output, ctx.set_rows)
        return (None, *scaled)


def _scale_rows(
    grads: tuple[torch.Tensor, ...], grad_output: torch.Tensor, set_rows: list[int]
) -> tuple[torch.Tensor, ...]:
    """Per-sample grad_output times each row of the gradient of the sum.

    The per-sample losses came back one tensor per sample set, with `set_rows` rows
    each. A loss with one set (margin ranking's two inputs included) scales every
    gradient by all of grad_output; one with a set per input (the GAN
    discriminator) scales each by its own part.
    """
    outputs = torch.split(grad_output, set_rows)
    if len(outputs) == 1:
        outputs = outputs * len(grads)
    return tuple(
        g * o.reshape(-1, *([1] * (g.dim() - 1))) for g, o in zip(grads, outputs, strict=True)
    )


def remote_loss(client: Any, loss: str, *inputs: Any, **options: Any) -> torch.Tensor:
    """Computes `loss` remotely as a differentiable torch scalar (or vector for "none").

    Args:
        client: a LossClient.
        loss: the loss name, e.g. "multiclass_hinge".
        inputs: the loss's inputs in contract order (scores first, then labels or
            targets); score inputs may require grad.
        options: the loss's keyword options (margin, reduction, ...).
    """
    output, _result = _remote_loss_and_result(client, loss, inputs, options)
    return output


def _remote_loss_and_result(
    client: Any, loss: str, inputs: tuple[Any, ...], options: dict[str, Any]
) -> tuple[torch.Tensor, LossResult]:
    """The differentiable loss and the server's whole answer (sparsity, timing)."""
    n_scores = len(SCORE_FIELDS[loss])
    expected = n_scores + len(OTHER_FIELDS[loss])
    if len(inputs) != expected:
        raise TypeError(f"{loss} takes {expected} inputs, got {len(inputs)}")
    scores, others = inputs[:n_scores], inputs[n_scores:]
    method = getattr(client, loss)
    answers: list[LossResult] = []

    def call(*detached: torch.Tensor) -> LossResult:
        result: LossResult = method(*detached, *others, **options)
        answers.append(result)
        return result

    output: torch.Tensor = _RemoteLoss.apply(call, *scores)  # type: ignore[no-untyped-call]
    return output, answers[0]


class RemoteHingeLoss(torch.nn.Module):
    """A loss module computed by a hingeloss server.

    Example:
        >>> criterion = RemoteHingeLoss(client, "multiclass_hinge",
        ...                             class_normalization="divide_by_num_classes")
        >>> loss = criterion(logits, targets)
        >>> loss.backward()
        >>> criterion.last_result.active_fraction  # the server's whole answer

    Attributes:
        last_result: the LossResult of the latest forward call (sparsity,
            timing, resolved options), None before the first; one module
            called from several threads at once should not rely on it.
    """

    def __init__(self, client: Any, loss: str, **options: Any) -> None:
        super().__init__()
        if loss not in SCORE_FIELDS:
            raise ValueError(f"unknown loss {loss!r}; choose from {sorted(SCORE_FIELDS)}")
        self.client = client
        self.loss = loss
        self.options = options
        self.last_result: LossResult | None = None

    def forward(self, *inputs: Any) -> torch.Tensor:
        output, self.last_result = _remote_loss_and_result(
            self.client, self.loss, inputs, self.options
        )
        return output

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.loss!r}" + (f", {options}" if options else "")
