"""attnzoo: attention mechanisms in JAX — primitives, Pallas kernels, models, reproductions."""

__version__ = "0.1.0"
