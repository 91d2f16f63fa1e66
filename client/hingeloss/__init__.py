"""hingeloss SDK: hinge-family losses and gradients computed by a remote server.

numpy in, numpy out; torch in, torch out (same device and dtype). For autograd,
see `hingeloss.torch`.
"""

__version__ = "0.1.0"

from hingeloss.aio import AsyncLossClient, AsyncLossStream  # noqa: E402
from hingeloss.channel import NO_RETRY, RetryPolicy  # noqa: E402
from hingeloss.client import LossClient, LossStream  # noqa: E402
from hingeloss.errors import (  # noqa: E402
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
from hingeloss.factored import FactoredGrad  # noqa: E402
from hingeloss.results import LossResult, Timing  # noqa: E402

__all__ = [
    "NO_RETRY",
    "AsyncLossClient",
    "AsyncLossStream",
    "CancelledError",
    "DeadlineExceededError",
    "FactoredGrad",
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
