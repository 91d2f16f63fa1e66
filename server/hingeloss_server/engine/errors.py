"""Domain exceptions raised in the engine; `transport/status.py` maps them to gRPC statuses."""

from __future__ import annotations


class HingelossError(Exception):
    """Base class of every error the engine reports to a caller."""


class InvalidInputError(HingelossError):
    """A request is malformed or its values are out of the contract.

    Attributes:
        field: the request field, with the first bad index where one applies,
            e.g. ``multiclass_hinge.targets[3]``.
        description: what is wrong, with the offending value at most.
    """

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class OverloadedError(HingelossError):
    """The queue cannot take the request now; retrying later may succeed."""

    def __init__(self, reason: str, retry_after_s: float, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.retry_after_s = retry_after_s


class DeadlineExpiredError(HingelossError):
    """The request's deadline passed while it waited in the queue."""


class ArrivalTimeoutError(HingelossError):
    """A request's message did not arrive in full within the server's limit."""


class DrainingError(HingelossError):
    """The server is shutting down and takes no new work."""


class ComputeFailedError(HingelossError):
    """The computation itself failed (a bug or a device fault), for this request alone."""

    def __init__(self, detail: str, *, out_of_memory: bool = False) -> None:
        super().__init__(detail)
        self.out_of_memory = out_of_memory


class DeviceFailedError(HingelossError):
    """The worker's device is in an error state it cannot leave (a sticky CUDA error).

    Retryable elsewhere: health reports NOT_SERVING so load balancers move away.
    """
