"""Decodes ComputeResponses into LossResults of the caller's own array type.

numpy in -> read-only numpy views of the response bytes (no copy beyond the one
read out of the message); torch in -> tensors on the caller's device and dtype,
the caller's own writable memory (one copy beyond that read, so that autograd
may later accumulate into them). Row-sparse gradients are densified, and also
kept as (indices, values) for callers that want them; factored gradients are
expanded (on the caller's device) bit for bit into the dense gradient, and also
kept as mask and row values.

A newer server may send enum values or dtypes this SDK does not know: `resolved`
reports such a value as "unknown(N)", and only a tensor actually decoded in an
unknown dtype fails (with a message that says to upgrade).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor

from hingeloss import _factored as factored
from hingeloss import _tensors as tensors
from hingeloss._answers import (
    MisfitError,
    asked_tie_break,
    check_answer,
    check_rows,
    malformed,
    mask_bits,
)
from hingeloss._requests import LOSS_OPTIONS, InputKind, enum_name, enum_prefix, option_keyword
from hingeloss.v1 import loss_service_pb2 as pb


@dataclass(frozen=True)
class Timing:
    """Where the time went on the server, for one request."""

    queue_s: float
    compute_s: float
    batch_rows: int
    batch_requests: int
    device: str


@dataclass(frozen=True)
class LossResult:
    """One computed loss.

    Attributes:
        loss: the reduced loss.
        grads: d(loss)/d(input) for each score input, in declaration order, as
            the input's type (numpy or torch on its device and dtype); empty when
            the gradient format is "none".
        per_sample: per-sample losses when asked for (or with reduction "none").
        samples / active_samples: how many samples counted, how many had a
            non-zero loss.
        timing: the server's queue and compute split.
        resolved: the options the server applied, defaults resolved, by the call's
            keyword names (`kink`, `combine`, ...).
        sparse_grads: (row indices, rows) of each gradient, with "row_sparse".
        factored_grads: packed mask and row values of each gradient, with "factored".
    """

    request_id: str
    loss: float
    grads: tuple[Any, ...]
    per_sample: tuple[Any, ...]
    samples: int
    active_samples: int
    timing: Timing
    resolved: dict[str, Any]
    sparse_grads: tuple[tuple[Any, Any], ...] = field(default=())
    factored_grads: tuple[factored.FactoredGrad, ...] = field(default=())

    @property
    def grad(self) -> Any:
        """The gradient of a single-input loss."""
        if len(self.grads) == 1:
            return self.grads[0]
        if not self.grads:
            raise AttributeError("no gradient: this call asked for gradient_format='none'")
        raise AttributeError(
            f"this loss has a gradient for each of its {len(self.grads)} inputs: use .grads"
        )

    @property
    def grad_factored(self) -> factored.FactoredGrad:
        """The factored gradient (mask and row values) of a "factored" request."""
        if len(self.factored_grads) != 1:
            raise AttributeError("no factored gradient: ask for gradient_format='factored'")
        return self.factored_grads[0]

    @property
    def active_fraction(self) -> float:
        """Share of samples with a non-zero loss (1 - sparsity)."""
        return self.active_samples / self.samples if self.samples else 0.0


# ResolvedOptions' enum fields -> (the call's keyword, the key in LossResult.resolved;
# the enum's value prefix), read from the contract as the requests' options are.
# compute_dtype is a DType, named as the SDK names dtypes.
_RESOLVED_OPTIONS: Descriptor = pb.ResolvedOptions.DESCRIPTOR  # type: ignore[assignment]
_ENUM_FIELDS = {
    field.name: (option_keyword(field.name), enum_prefix(field.enum_type))
    for field in _RESOLVED_OPTIONS.fields
    if field.enum_type is not None and field.name != "compute_dtype"
}


def _unknown(number: int) -> str:
    return f"unknown({number})"


def _resolved(options: pb.ResolvedOptions) -> dict[str, Any]:
    resolved: dict[str, Any] = {"loss": options.loss}
    for field_name, (keyword, prefix) in _ENUM_FIELDS.items():
        number = getattr(options, field_name)
        if number:
            try:
                resolved[keyword] = enum_name(prefix, number)
            except ValueError:  # added to the contract after this SDK version
                resolved[keyword] = _unknown(number)
    # Only the loss's own options: the GAN hinge's margin is fixed, the ranking loss has
    # no power. A loss this SDK does not know yet keeps whatever the server sent.
    takes = LOSS_OPTIONS.get(options.loss)
    if takes is None or "margin" in takes:
        resolved["margin"] = options.margin
    if options.power and (takes is None or "power" in takes):
        resolved["power"] = options.power
    if options.compute_dtype:
        info = tensors.BY_WIRE.get(options.compute_dtype)
        resolved["compute_dtype"] = info.name if info else _unknown(options.compute_dtype)
    return resolved


def _to_caller(tensor: pb.Tensor, kind: InputKind) -> Any:
    if not kind.is_torch:
        return tensors.to_numpy(tensor)
    import torch

    view = tensors.to_torch(tensor)  # views the one read of the message's bytes
    dtype = kind.dtype if view.is_floating_point() else view.dtype
    if str(kind.device) != "cpu" or dtype != view.dtype:
        # The move or the conversion makes the one copy, into new memory.
        return view.to(device=kind.device, dtype=dtype)
    owned = torch.empty(view.shape, dtype=dtype)
    owned.copy_(view)
    return owned


def _dense_from_rows(sparse: pb.RowSparseTensor, kind: InputKind) -> tuple[Any, Any, Any]:
    indices = tensors.to_numpy(sparse.indices)
    shape = tuple(sparse.dense_shape)
    check_rows(indices, shape[0])
    if kind.is_torch:
        import torch

        values = _to_caller(sparse.values, kind)
        index = torch.from_numpy(indices.copy()).to(values.device)
        dense = torch.zeros(shape, dtype=values.dtype, device=values.device)
        dense.index_copy_(0, index, values)
        return dense, index, values
    rows = tensors.to_numpy(sparse.values)
    dense_array = np.zeros(shape, dtype=rows.dtype)
    dense_array[indices] = rows
    return dense_array, indices, rows


def _factored_rule(resolved: pb.ResolvedOptions, kind: InputKind) -> factored.FactoredRule:
    """How the row values spread: by what the request asked, where it is known (the
    answer was checked to agree), else by what the answer says."""
    loss = kind.loss or resolved.loss
    if loss == "multiclass_hinge":
        return factored.FactoredRule.WESTON_WATKINS
    if loss == "crammer_singer":
        tie_break = asked_tie_break(kind) if kind.loss else resolved.tie_break
        if tie_break == pb.TIE_BREAK_SPLIT_EVENLY:
            return factored.FactoredRule.SPLIT_EVENLY
        return factored.FactoredRule.FIRST_INDEX
    raise MisfitError(f"a factored gradient of {loss!r}, which has none")


def _numpy(array: Any) -> np.ndarray[Any, Any]:
    """An array as numpy, from a torch tensor on any device too."""
    if hasattr(array, "detach"):
        return np.asarray(array.detach().cpu().numpy())
    return np.asarray(array)


def _dense_from_factored(
    message: pb.FactoredGradient, resolved: pb.ResolvedOptions, kind: InputKind
) -> tuple[Any, factored.FactoredGrad]:
    if kind.true_classes is None:  # no factored form without class targets
        raise MisfitError("a factored gradient for a request without targets")
    rows, columns = (int(d) for d in message.dense_shape)
    bits = mask_bits(message.mask, rows, columns)
    rule = _factored_rule(resolved, kind)
    wire = tensors.dtype_info(message.dtype)
    if not kind.is_torch:
        grad = factored.FactoredGrad(
            mask_bits=bits,
            values=tensors.to_numpy(message.row_values),
            dense_shape=(rows, columns),
            rule=rule,
            true_classes=_numpy(kind.true_classes),
        )
        if wire.numpy is not None:
            return factored.expand_numpy(grad, np.dtype(wire.numpy)), grad
        # bfloat16 decodes to float32 here (numpy lacks it): its values, widened.
        return tensors.round_to_bfloat16(factored.expand_numpy(grad, np.dtype("float32"))), grad
    import torch

    device = kind.device
    grad = factored.FactoredGrad(
        mask_bits=torch.from_numpy(bits.copy()).to(device),
        # Copied: the caller owns what it gets, as with the dense gradient.
        values=tensors.to_torch(message.row_values).to(device, copy=True),
        dense_shape=(rows, columns),
        rule=rule,
        true_classes=torch.as_tensor(kind.true_classes, device=device),
    )
    dense = factored.expand_torch(grad, tensors.torch_dtype(message.dtype))
    if kind.dtype is not None and dense.dtype != kind.dtype:
        dense = dense.to(kind.dtype)
    return dense, grad


def decode_response(response: pb.ComputeResponse, kind: InputKind) -> LossResult:
    """Builds the LossResult of a response, in the caller's array type.

    Raises:
        InternalError: the response cannot be the answer to the request (_answers.py).
    """
    grads = []
    sparse = []
    factored_grads = []
    with malformed():  # data of another size than its shape's
        check_answer(response, kind)
        for gradient in response.gradients:
            value = gradient.WhichOneof("value")
            if value == "row_sparse":
                dense, indices, values = _dense_from_rows(gradient.row_sparse, kind)
                grads.append(dense)
                sparse.append((indices, values))
            elif value == "factored":
                dense, parts = _dense_from_factored(gradient.factored, response.resolved, kind)
                grads.append(dense)
                factored_grads.append(parts)
            else:
                grads.append(_to_caller(gradient.dense, kind))
        per_sample = tuple(_to_caller(t, kind) for t in response.per_sample_losses)
    timing = response.timing
    return LossResult(
        request_id=response.request_id,
        loss=response.loss,
        grads=tuple(grads),
        per_sample=per_sample,
        samples=response.sparsity.samples,
        active_samples=response.sparsity.active_samples,
        timing=Timing(
            queue_s=timing.queue_us / 1e6,
            compute_s=timing.compute_us / 1e6,
            batch_rows=timing.batch_rows,
            batch_requests=timing.batch_requests,
            device=timing.device,
        ),
        resolved=_resolved(response.resolved),
        sparse_grads=tuple(sparse),
        factored_grads=tuple(factored_grads),
    )
