"""DHSA's dynamic chunking: where the keys are cut into chunks (boundaries).

"Long-Context Modeling with Dynamic Hierarchical Sparse Attention for On-Device LLMs" (Xiong et
al., arXiv 2510.24606), §3.1; spec: shared/papers/efficient.md §7.1 step 1. `dhsa.py` is the
family; this module holds the boundary rules it takes: fixed-size chunks (the framework
default), the paper's attention-mass label heuristic (an oracle from the dense attention:
threshold + NMS), and the checks of caller-given boundaries (arrays or a callable predictor).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

_EPS = 1e-6  # the mass ratio's (bigger + eps) / (smaller + eps), as the paper's labels


def _check_int(name: str, value, low: int, fix: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name}={value!r} must be an int >= {low}: {fix}")
  return int(value)


def _check_number(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f"{name}={value!r} must be a number (the least ratio of a boundary: 1.1)")
  return float(value)


def fixed_chunk_boundaries(length: int, chunk: int) -> np.ndarray:
  """int32 [C+1] = 0, chunk, 2·chunk, …, length (C = ⌈length / chunk⌉; the last may be short)."""
  _check_int("chunk_size", chunk, 1, "the keys per fixed chunk")
  _check_int("length", length, 1, "the number of keys")
  return np.append(np.arange(0, length, chunk), length).astype(np.int32)


def _head_mean_probs(q, k, *, scale, allowed):
  """fp32 [B, T, S]: the softmax attention over allowed keys, averaged over query heads."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  q_btkgh = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
  logits = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k.astype(jnp.float32)) * scale
  logits = logits.reshape(B, N, T, S)
  if allowed is not None:
    logits = jnp.where(allowed, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return jnp.mean(p / jnp.where(denom > 0, denom, 1.0), axis=1)


@functools.partial(jax.jit, static_argnames=("window", "is_causal", "scale"))
def attention_mass_ratio(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  *,
  window: int = 4,
  is_causal: bool = True,
  scale: float | None = None,
  allowed: Bool[Array, "B N T S"] | None = None,
) -> Float[Array, "B S"]:
  """The paper's boundary label score at each key position p (a boundary after p).

  With A the head-averaged attention and rows R_p = the queries at or after p + window:
  past = Σ_{i∈R_p} Σ_{j=p-w+1..p} A[i, j], future = Σ_{i∈R_p} Σ_{j=p+1..p+w} A[i, j],
  ratio = (max + ε) / (min + ε), ε = 1e-6: large where later queries read one side of p and
  not the other. 0 where a window leaves the sequence. `allowed` [B|1, N|1, T, S] is the
  element mask (True = keep), AND-ed with `is_causal`. fp32, no gradient.
  """
  _check_int("window", window, 1, "the keys on each side of a candidate boundary")
  q, k = lax.stop_gradient(q), lax.stop_gradient(k)
  _, T, _, H = q.shape
  S = k.shape[1]
  scale = 1.0 / math.sqrt(H) if scale is None else scale
  if is_causal:
    allowed = _causal(T, S) if allowed is None else allowed & _causal(T, S)
  probs = _head_mean_probs(q, k, scale=scale, allowed=allowed)  # [B, T, S]
  # suffix[r, j] = Σ_{i >= r} A[i, j] (row T: 0). Column sums stay small, unlike a 2-D
  # integral image whose fp32 differences lose the window masses at long T.
  suffix = jnp.cumsum(probs[:, ::-1], axis=1)[:, ::-1]
  suffix = jnp.pad(suffix, ((0, 0), (0, 1), (0, 0)))
  p = np.arange(S)
  rows = np.minimum(p + window, T)[:, None]  # [S, 1]
  cols = p[:, None] + np.arange(-window + 1, window + 1)[None, :]  # [S, 2w]
  vals = suffix[:, rows, np.clip(cols, 0, S - 1)]  # [B, S, 2w]
  past, future = jnp.sum(vals[..., :window], -1), jnp.sum(vals[..., window:], -1)
  ratio = (jnp.maximum(past, future) + _EPS) / (jnp.minimum(past, future) + _EPS)
  inside = (p >= window - 1) & (p + window <= S - 1)
  return jnp.where(jnp.asarray(inside)[None], ratio, 0.0)


def attention_mass_boundaries(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  num_chunks: int,
  window: int = 4,
  theta: float = 1.1,
  nms: int = 8,
  *,
  is_causal: bool = True,
  scale: float | None = None,
  allowed: Bool[Array, "B N T S"] | None = None,
) -> Int[Array, "B C1"]:
  """int32 [B, num_chunks + 1]: chunk boundaries from `attention_mass_ratio` (the labels).

  Candidates with ratio > theta are taken greedily by decreasing ratio (ties: lower position),
  each suppressing the candidates within `nms` positions (non-maximum suppression), until
  num_chunks − 1 are chosen; a candidate p starts a chunk at p + 1. Rows are 0, the sorted
  starts, then S (repeated where fewer were chosen: empty chunks). No gradient.
  """
  ratio = attention_mass_ratio(
    q, k, window=window, is_causal=is_causal, scale=scale, allowed=allowed
  )
  return select_boundaries(ratio, num_chunks, theta=theta, nms=nms)


@functools.partial(jax.jit, static_argnames=("num_chunks", "theta", "nms"))
def select_boundaries(
  ratio: Float[Array, "B S"], num_chunks: int, *, theta: float = 1.1, nms: int = 8
) -> Int[Array, "B C1"]:
  """int32 [B, num_chunks + 1] from per-position boundary scores (`attention_mass_ratio`, or a
  predictor's): thresholding at theta, greedy non-maximum suppression (module docstring of
  `attention_mass_boundaries`). No gradient."""
  num_chunks = _check_int("num_chunks", num_chunks, 1, "the most chunks the keys are cut into")
  nms = _check_int("nms", nms, 0, "candidates within this distance of a chosen one are dropped")
  _check_number("theta", theta)
  ratio = lax.stop_gradient(jnp.asarray(ratio, jnp.float32))
  B, S = ratio.shape
  score = jnp.where(ratio > theta, ratio, -jnp.inf)
  pos = jnp.arange(S, dtype=jnp.int32)[None, :]

  def choose(i, carry):
    score, starts = carry
    best = jnp.argmax(score, axis=-1).astype(jnp.int32)  # the first maximum: lower position
    found = jnp.isfinite(jnp.max(score, axis=-1))
    starts = starts.at[:, i].set(jnp.where(found, best + 1, S))
    near = jnp.abs(pos - best[:, None]) <= nms
    return jnp.where(near & found[:, None], -jnp.inf, score), starts

  starts = jnp.full((B, num_chunks - 1), S, jnp.int32)
  _, starts = lax.fori_loop(0, num_chunks - 1, choose, (score, starts))
  edges = (jnp.zeros((B, 1), jnp.int32), jnp.sort(starts, axis=-1), jnp.full((B, 1), S, jnp.int32))
  # A candidate at S - 1 would start an empty chunk at S: harmless (it holds no keys).
  return jnp.concatenate(edges, axis=-1)


def check_boundaries(boundaries, B: int, S: int) -> Int[Array, "Bb C1"]:
  """`boundaries` as int32 [1 or B, C+1], checked (values too when not traced)."""
  b = jnp.asarray(boundaries)
  if b.ndim == 1:
    b = b[None]
  if b.ndim != 2 or b.shape[0] not in (1, B) or b.shape[1] < 2:
    raise ValueError(
      f"boundaries of shape {tuple(jnp.shape(boundaries))} must be int [C+1] or [B, C+1] "
      f"with B={B}, C >= 1 (chunk c = [b[c], b[c+1])); e.g. fixed_chunk_boundaries(S, 64)"
    )
  if not jnp.issubdtype(b.dtype, jnp.integer):
    raise ValueError(f"boundaries must be integer positions, got dtype {b.dtype}")
  host = _concrete(b)
  if host is not None:
    if (host[:, 0] != 0).any() or (host[:, -1] != S).any() or (np.diff(host, axis=1) < 0).any():
      raise ValueError(
        f"boundaries must start at 0, end at S={S} and not decrease (chunk c = [b[c], "
        f"b[c+1])), got {host.tolist()}; pad a row by repeating S"
      )
  return b.astype(jnp.int32)


def _concrete(x) -> np.ndarray | None:
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _causal(T: int, S: int) -> Bool[Array, "1 1 T S"]:
  """Key j visible to query i iff j <= i, from iotas (no [T, S] constant in the program)."""
  return (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])[None, None]
