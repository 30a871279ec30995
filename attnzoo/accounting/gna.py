"""Analytic speed-up of (generalized) neighborhood attention under a tiled kernel ("NATTEN Sim").

Paper: Hassani et al., "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at
the Speed of Light", arXiv 2504.16922, Sec. 3 (mask) and App. B.1 (the simulator, "NA Sim").

A block-sparse kernel tiles the token layout into multi-dimensional query tiles of shape ``q_tile``
and key/value tiles of shape ``kv_tile``. A query tile must visit every kv tile that holds at least
one key kept for at least one of its queries. The kernel's time is set by the busiest query tile,
so the simulated attention speed-up is

    speedup = (#kv tiles of dense attention) / max over q tiles (#kv tiles visited),

and the end-to-end speed-up follows from Amdahl's law with the attention share ``p`` of the
workload: ``E2E = 1 / ((1 - p) + p / speedup)``. The FLOP-wise speed-up (what a kernel without
tile waste would reach) is ``prod(shape) / prod(window)``.

The GNA mask is separable: a key is kept when it is kept along every axis. A query tile is a
product of per-axis ranges, so the union of its queries' key sets is the product of per-axis
unions, and the visited kv tiles are the product over axes of per-axis counts. Everything below
is therefore computed from 1-D keep matrices ``[n, n]`` per axis (cheap for any real layout).

Per-axis rule (GNA Sec. 3; window w, stride s, N tokens along the axis):
  non-causal: wl = w // 2, wr = w // 2 + w % 2 - 1, leader(x) = min((x // s) * s + s // 2, N - 1),
              centre(x) = clip(leader(x), wl, N - 1 - wr), keep y in [centre - wl, centre + wr]
              (windows are shifted inward at borders, so every query keeps exactly w keys);
  causal:     leader(x) = min((x // s) * s + s - 1, N - 1),
              keep y when y <= x and leader(x) - y < w.

Differences from the paper / choices where it is silent:
  * Dilation d: GNA applies the rule inside each dilation group {x : x % d == g}. NATTEN runs the
    groups as separate sub-problems; we model that as a token permutation that makes every group
    contiguous along the axis, then tile the permuted axis as usual.
  * ``kv_tiling="dynamic"`` places kv tiles starting at each q tile's first needed key (along each
    axis), so a q tile visits ceil(span / kv_tile) tiles, span = last needed key - first + 1.
    ``"static"`` (the paper's Blackwell kernel, TMA) uses the fixed grid of kv tiles.
  * The paper's simulator is unreleased (NATTEN docs/simulator.md: "not released yet"); this
    function follows the paper's description and reproduces its "NA Sim" columns (see
    experiments/tables/gna_sim.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from attnzoo.masks import Neighborhood

KV_TILINGS = ("static", "dynamic")


@dataclasses.dataclass(frozen=True)
class SimResult:
  """What `simulated_speedup` found.

  Attributes:
    dense_kv_tiles: kv tiles a query tile visits under dense attention.
    max_kv_tiles: kv tiles visited by the busiest query tile of the sparse kernel.
    mean_kv_tiles: mean over query tiles (what a perfectly load-balanced kernel would pay).
    speedup: attention-only simulated speed-up, dense_kv_tiles / max_kv_tiles.
    flop_speedup: FLOP-wise speed-up prod(shape) / prod(window) (no tile waste).
    e2e_speedup: Amdahl end-to-end speed-up from `speedup`, or None without `attention_share`.
    e2e_flop_speedup: Amdahl end-to-end speed-up from `flop_speedup`, or None.
    perfect_block_sparsity: no visited tile needs the element predicate, i.e. the tiles
      visited hold exactly the kept keys (speedup == flop_speedup).
  """

  dense_kv_tiles: int
  max_kv_tiles: int
  mean_kv_tiles: float
  speedup: float
  flop_speedup: float
  e2e_speedup: float | None
  e2e_flop_speedup: float | None
  perfect_block_sparsity: bool


def amdahl(attention_share: float, speedup: float) -> float:
  """End-to-end speed-up when a fraction `attention_share` of the time gets `speedup`."""
  if not 0.0 <= attention_share <= 1.0:
    raise ValueError(f"attention_share={attention_share} must lie in [0, 1] (a fraction of time)")
  if speedup <= 0:
    raise ValueError(f"speedup={speedup} must be positive")
  return 1.0 / ((1.0 - attention_share) + attention_share / speedup)


def axis_keep(
  n: int, window: int, stride: int = 1, dilation: int = 1, causal: bool = False
) -> np.ndarray:
  """bool[n, n]: the GNA keep matrix along one axis (query x, key y), in original positions.

  The rule itself lives once, in `attnzoo.masks.Neighborhood` (NATTEN/GNA semantics)."""
  _check_axis(n, window, stride, dilation)
  mask = Neighborhood(
    shape=(n,), window=(window,), stride=(stride,), dilation=(dilation,), causal=(causal,)
  )
  return mask.dense(n, n)


def _axis_tile_counts(
  keep: np.ndarray, q_tile: int, kv_tile: int, dilation: int, kv_tiling: str
) -> tuple[np.ndarray, np.ndarray]:
  """Per q tile along one axis: (#kv tiles visited, #of them that are partial)."""
  n = keep.shape[0]
  # Dilation groups made contiguous (stable order inside a group), as NATTEN's sub-problems.
  order = np.argsort(np.arange(n) % dilation, kind="stable")
  keep = keep[np.ix_(order, order)]
  visited, partial = [], []
  kv_starts = range(0, n, kv_tile)
  for start in range(0, n, q_tile):
    rows = keep[start : start + q_tile]
    needed = rows.any(axis=0)
    if kv_tiling == "static":
      hit = [needed[k : k + kv_tile].any() for k in kv_starts]
      full = [rows[:, k : k + kv_tile].all() for k in kv_starts]
      visited.append(int(np.sum(hit)))
      partial.append(int(np.sum(np.array(hit) & ~np.array(full))))
    else:
      idx = np.flatnonzero(needed)
      lo, hi = int(idx[0]), int(idx[-1])
      tiles = [(k, min(k + kv_tile, hi + 1)) for k in range(lo, hi + 1, kv_tile)]
      visited.append(len(tiles))
      partial.append(sum(int(not rows[:, a:b].all()) for a, b in tiles))
  return np.asarray(visited), np.asarray(partial)


def simulated_speedup(
  spatial_shape: Sequence[int],
  window: Sequence[int] | int,
  stride: Sequence[int] | int = 1,
  dilation: Sequence[int] | int = 1,
  causal: Sequence[bool] | bool = False,
  q_tile: Sequence[int] | int = 128,
  kv_tile: Sequence[int] | int = 128,
  kv_tiling: str = "static",
  attention_share: float | None = None,
) -> SimResult:
  """Simulated speed-up of GNA over dense attention under a multi-dimensional tiling.

  Args:
    spatial_shape: token layout (N_1, ..., N_n), flattened row-major by the model.
    window, stride, dilation, causal: GNA parameters per axis (a scalar applies to every axis).
    q_tile, kv_tile: query / key-value tile shapes per axis (tokens); a scalar applies to every
      axis. A 1-D kernel over a flattened layout is `spatial_shape=(prod,)`.
    kv_tiling: "static" (fixed kv tile grid, the paper's default) or "dynamic" (see module doc).
    attention_share: fraction p of end-to-end time spent in attention (GNA Table 1), for the
      Amdahl columns; None leaves them out.

  Returns:
    A `SimResult`.
  """
  shape = tuple(int(n) for n in spatial_shape)
  if not shape or any(n <= 0 for n in shape):
    raise ValueError(f"spatial_shape={spatial_shape!r} must be a non-empty tuple of positive ints")
  rank = len(shape)
  window = _per_axis("window", window, rank)
  stride = _per_axis("stride", stride, rank)
  dilation = _per_axis("dilation", dilation, rank)
  causal = _per_axis("causal", causal, rank, kind=bool)
  q_tile = _per_axis("q_tile", q_tile, rank)
  kv_tile = _per_axis("kv_tile", kv_tile, rank)
  if kv_tiling not in KV_TILINGS:
    raise ValueError(f"kv_tiling={kv_tiling!r} must be one of {KV_TILINGS}")
  for name, tiles in (("q_tile", q_tile), ("kv_tile", kv_tile)):
    if any(t <= 0 for t in tiles):
      raise ValueError(f"{name}={tiles} must be positive tile sizes")

  dense, visited_axes, partial_axes, kept_per_query = 1, [], [], 1
  for n, w, s, d, c, tq, tk in zip(
    shape, window, stride, dilation, causal, q_tile, kv_tile, strict=True
  ):
    keep = axis_keep(n, w, s, d, c)
    visited, partial = _axis_tile_counts(keep, tq, tk, d, kv_tiling)
    visited_axes.append(visited)
    partial_axes.append(partial)
    dense *= math.ceil(n / tk)
    kept_per_query *= keep.sum() / n

  # Visited tiles of a multi-dim q tile = product over axes; the worst q tile maximises each.
  max_tiles = int(np.prod([v.max() for v in visited_axes]))
  mean_tiles = float(np.prod([v.mean() for v in visited_axes]))
  perfect = all(int(p.max()) == 0 for p in partial_axes)
  speedup = dense / max_tiles
  flop_speedup = float(np.prod(shape) / kept_per_query)
  e2e = e2e_flop = None
  if attention_share is not None:
    e2e, e2e_flop = amdahl(attention_share, speedup), amdahl(attention_share, flop_speedup)
  return SimResult(
    dense_kv_tiles=dense,
    max_kv_tiles=max_tiles,
    mean_kv_tiles=mean_tiles,
    speedup=speedup,
    flop_speedup=flop_speedup,
    e2e_speedup=e2e,
    e2e_flop_speedup=e2e_flop,
    perfect_block_sparsity=perfect,
  )


def _per_axis(name, value, rank, kind=int):
  if isinstance(value, (int, np.integer, bool, np.bool_)):
    return (kind(value),) * rank
  value = tuple(kind(v) for v in value)
  if len(value) != rank:
    raise ValueError(
      f"{name}={value} has {len(value)} entries but spatial_shape has {rank} axes; "
      f"give one per axis or a single value"
    )
  return value


def _check_axis(n: int, window: int, stride: int, dilation: int) -> None:
  if dilation < 1:
    raise ValueError(f"dilation={dilation} must be >= 1")
  if not 1 <= window * dilation <= n:
    raise ValueError(
      f"window={window} x dilation={dilation} must lie in [1, {n}] (the axis length)"
    )
  if not 1 <= stride <= window:
    raise ValueError(f"stride={stride} must lie in [1, window={window}] (GNA requires s <= w)")
