"""hingeloss SDK: hinge-family losses and gradients computed by a remote server.

numpy in, numpy out; torch in, torch out (same device and dtype). For autograd,
see `hingeloss.torch`. Every public name is importable from here and listed in
`__all__`; modules whose names start with `_` are internal and may change.

Names are imported on first use: importing one internal module (the server's engine
imports `hingeloss._factored`, the bit order of factored gradients) pulls in neither
gRPC nor the generated messages.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hingeloss._aio import AsyncLossClient, AsyncLossStream
    from hingeloss._client import LossClient, LossStream
    from hingeloss._errors import (
        CancelledError,
        DeadlineExceededError,
        FieldViolation,
        HingelossError,
        InternalError,
        InvalidArgumentError,
        OverloadedError,
        StreamAbortedError,
        UnauthenticatedError,
        UnavailableError,
    )
    from hingeloss._factored import FactoredGrad, FactoredRule
    from hingeloss._results import LossResult, Timing
    from hingeloss._retry import NO_RETRY, RetryPolicy

__version__ = "0.1.0"

# The module of each public name (tests/unit/test_sdk.py checks this against the
# imports above and against __all__).
_HOMES = {
    "AsyncLossClient": "_aio",
    "AsyncLossStream": "_aio",
    "LossClient": "_client",
    "LossStream": "_client",
    "CancelledError": "_errors",
    "DeadlineExceededError": "_errors",
    "FieldViolation": "_errors",
    "HingelossError": "_errors",
    "InternalError": "_errors",
    "InvalidArgumentError": "_errors",
    "OverloadedError": "_errors",
    "StreamAbortedError": "_errors",
    "UnauthenticatedError": "_errors",
    "UnavailableError": "_errors",
    "FactoredGrad": "_factored",
    "FactoredRule": "_factored",
    "LossResult": "_results",
    "Timing": "_results",
    "NO_RETRY": "_retry",
    "RetryPolicy": "_retry",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'hingeloss' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hingeloss.{home}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "NO_RETRY",
    "AsyncLossClient",
    "AsyncLossStream",
    "CancelledError",
    "DeadlineExceededError",
    "FactoredGrad",
    "FactoredRule",
    "FieldViolation",
    "HingelossError",
    "InternalError",
    "InvalidArgumentError",
    "LossClient",
    "LossResult",
    "LossStream",
    "OverloadedError",
    "RetryPolicy",
    "StreamAbortedError",
    "Timing",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
]
