"""dcomp: Deep Compression for PyTorch models."""

__version__ = "0.1.0"
