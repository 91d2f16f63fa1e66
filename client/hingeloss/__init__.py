"""hingeloss SDK: hinge-family losses and gradients computed by a remote server.

numpy in, numpy out; torch in, torch out (same device and dtype). For autograd,
see `hingeloss.torch`. Every public name is importable from here and listed in
`__all__`; modules whose names start with `_` are internal and may change.
"""

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
