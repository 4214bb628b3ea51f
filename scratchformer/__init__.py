"""scratchformer: a transformer engine written from scratch on our own Triton kernels."""

__version__ = "0.1.0"
