"""hingeloss server: batched hinge-family losses and gradients over gRPC."""

from hingeloss import __version__

__all__ = ["__version__"]
