"""mnist-precision: a Lightning + Hydra template for MNIST in every training precision."""

__version__ = "0.1.0"
