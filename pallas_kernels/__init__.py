"""Pallas kernels for attnzoo, each beside its pure-jnp reference.

This package depends on jax only; it knows nothing of attnzoo.
"""
