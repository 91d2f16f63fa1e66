"""hingeloss SDK: hinge-family losses and gradients computed by a remote server."""

__version__ = "0.1.0"
