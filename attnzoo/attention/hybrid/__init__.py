"""Hybrid attention: per-layer (or per-row) routing between attention mechanisms (Flux)."""
