"""N-dimensional neighborhood attention (NA / GNA) as a mask over row-major tokens."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from attnzoo.masks.base import Mask, classify, require_int, tile_bounds

# Elements of the [rows, Kb + 1] count table built per numpy call.
_CLASSIFY_ELEMENTS = 1 << 22


def _per_axis(name: str, value, rank: int, kind: type) -> tuple:
  """Broadcasts a scalar to every axis, or checks a per-axis tuple's length."""
  if isinstance(value, (list, tuple)):
    if len(value) != rank:
      raise ValueError(
        f"Neighborhood.{name}={value!r} has {len(value)} entries but shape has {rank} "
        f"axes; pass one value per axis or a single {kind.__name__} for all axes"
      )
    return tuple(value)
  return (value,) * rank


@dataclasses.dataclass(frozen=True)
class Neighborhood(Mask):
  """Generalized neighborhood attention over an N-D token grid (1-D, 2-D, 3-D, ...).

  Sources: Hassani et al., "Generalized Neighborhood Attention: Multi-dimensional
  Sparse Attention at the Speed of Light", arXiv 2504.16922, §3 (stride); Hassani
  et al., "Faster Neighborhood Attention", arXiv 2403.04690 (NA, dilation, per-axis
  causal). The semantics are those of NATTEN's flex-attention mask
  (`natten/backends/flex.py::get_na_flex_mask`, single-dimensional tiling).

  Tokens are the cells of a grid `shape = (N_1, ..., N_n)` flattened row-major, so
  T = S = prod(shape). The mask is the AND over axes of a 1-D rule applied to the
  query coordinate x and key coordinate y on that axis, with window w, stride s and
  dilation d:

    dilation:   x and y must share a dilation group (x % d == y % d); the rule then
                runs on x' = x // d, y' = y // d in a group of size
                n_g = ceil((N - x % d) / d)   (groups differ by one when d does not divide N)
    non-causal: wl = w // 2, wr = w // 2 + (w % 2 - 1)   (even w: the extra key is on the left)
                leader = min((x' // s) * s + s // 2, n_g - 1)   (centre of the stride group,
                                                                  right-biased for even s)
                centre = clip(leader, wl, n_g - 1 - wr)   (window shifted inward at borders)
                keep   = centre - wl <= y' <= centre + wr
    causal:     leader = min((x' // s) * s + s - 1, n_g - 1)   (last query of the group)
                keep   = y' <= x'  and  leader - y' < w

  So a non-causal query sees exactly prod(window) keys; stride s = w is blocked
  (Swin-style window) attention, s = 1 is standard NA. Scalars broadcast to all axes.

  Requires 1 <= stride <= window and window * dilation <= N per axis (as NATTEN).
  `block_mask` is exact and analytic-by-counting (O(T * Kb) host work instead of
  O(T * S)): 0.5 s for a 16 x 32 x 32 grid with 128-token tiles.

  Differences from the paper / NATTEN: none in the mask. NATTEN rejects window 1 and
  axes of size 1; here they are allowed (the rule is well defined: the query's own
  coordinate). The extra "text tokens attended by all" of GNA's video models are
  `| GlobalTokens(...)` on a longer sequence, which this grid mask does not cover
  (T must equal prod(shape)). Multi-dimensional tiling (token permutation) is not
  part of the mask: tiles here are contiguous ranges of row-major tokens.
  """

  shape: tuple[int, ...]
  window: int | tuple[int, ...]
  stride: int | tuple[int, ...] = 1
  dilation: int | tuple[int, ...] = 1
  causal: bool | tuple[bool, ...] = False

  def __post_init__(self):
    if isinstance(self.shape, (int, np.integer)) and not isinstance(self.shape, bool):
      object.__setattr__(self, "shape", (self.shape,))
    if not isinstance(self.shape, (list, tuple)) or not self.shape:
      raise ValueError(
        f"Neighborhood.shape={self.shape!r} must be a non-empty tuple of axis sizes, "
        f"e.g. (H, W) for an H x W image"
      )
    rank = len(self.shape)
    shape = tuple(
      require_int(f"Neighborhood.shape[{i}]", n, 1, "axis sizes are >= 1")
      for i, n in enumerate(self.shape)
    )
    window = _per_axis("window", self.window, rank, int)
    stride = _per_axis("stride", self.stride, rank, int)
    dilation = _per_axis("dilation", self.dilation, rank, int)
    causal = _per_axis("causal", self.causal, rank, bool)
    for i, n in enumerate(shape):
      w = require_int(f"Neighborhood.window[{i}]", window[i], 1, "the window is >= 1 key")
      d = require_int(f"Neighborhood.dilation[{i}]", dilation[i], 1, "use 1 for no dilation")
      s = require_int(f"Neighborhood.stride[{i}]", stride[i], 1, "use 1 for no stride")
      if w * d > n:
        raise ValueError(
          f"Neighborhood.window[{i}]={w} with dilation[{i}]={d} spans {w * d} > "
          f"shape[{i}]={n} tokens; use window <= {n // d} (or a smaller dilation)"
        )
      if s > w:
        raise ValueError(
          f"Neighborhood.stride[{i}]={s} exceeds window[{i}]={w}; use 1 <= stride <= window"
        )
      if not isinstance(causal[i], (bool, np.bool_)):
        raise TypeError(f"Neighborhood.causal[{i}]={causal[i]!r} must be a bool")
    object.__setattr__(self, "shape", shape)
    object.__setattr__(self, "window", tuple(int(w) for w in window))
    object.__setattr__(self, "stride", tuple(int(s) for s in stride))
    object.__setattr__(self, "dilation", tuple(int(d) for d in dilation))
    object.__setattr__(self, "causal", tuple(bool(c) for c in causal))

  @property
  def size(self) -> int:
    """Number of tokens, prod(shape) = T = S."""
    return math.prod(self.shape)

  def check_lengths(self, seq_q, seq_k):
    super().check_lengths(seq_q, seq_k)
    if seq_q != self.size or seq_k != self.size:
      raise ValueError(
        f"Neighborhood over shape={self.shape} has {self.size} tokens but the attention "
        f"matrix is T={seq_q} x S={seq_k}; flatten the grid row-major so T = S = {self.size}"
      )

  def unravel(self, pos) -> tuple:
    """Row-major flat index -> per-axis coordinates (pure integer arithmetic).

    The outermost coordinate is not wrapped, so `pos = size` maps past the grid.
    """
    coords = []
    for n in reversed(self.shape[1:]):
      coords.append(pos % n)
      pos = pos // n
    return (pos, *reversed(coords))

  def key_intervals(self, q_pos, xp=jnp) -> list[tuple]:
    """Per axis, the keys query `q_pos` keeps: (group, lo, hi) meaning the coordinates
    y with y % d == group and lo <= y // d <= hi (an arithmetic progression)."""
    out = []
    for axis, x in enumerate(self.unravel(q_pos)):
      n, w = self.shape[axis], self.window[axis]
      s, d = self.stride[axis], self.dilation[axis]
      group, xd = x % d, x // d
      n_group = (n - group + d - 1) // d  # tokens of this dilation group on the axis
      if self.causal[axis]:
        leader = xp.minimum((xd // s) * s + s - 1, n_group - 1)
        lo, hi = xp.maximum(leader - w + 1, 0), xd
      else:
        wl, wr = w // 2, w // 2 + (w % 2 - 1)
        leader = xp.minimum((xd // s) * s + s // 2, n_group - 1)
        centre = xp.maximum(xp.minimum(leader, n_group - 1 - wr), wl)
        lo, hi = centre - wl, centre + wr
      out.append((group, lo, hi))
    return out

  def predicate(self, q_pos, k_pos, xp=jnp):
    keep = None
    intervals = self.key_intervals(q_pos, xp)
    for axis, y in enumerate(self.unravel(k_pos)):
      group, lo, hi = intervals[axis]
      d = self.dilation[axis]
      axis_keep = (y % d == group) & (y // d >= lo) & (y // d <= hi)
      keep = axis_keep if keep is None else keep & axis_keep
    return keep

  def block_mask(self, seq_q, seq_k, block_q, block_k):
    """Exact classification by counting kept keys per tile, O(T * Kb * rank) host work.

    A query keeps a product set (one progression per axis), so the number of its keys
    with flat index < t is a sum over axes in row-major order; differences at tile
    boundaries give per-tile counts, and a tile is FULL when the count fills it.
    """
    self.check_lengths(seq_q, seq_k)
    _, _, k_lo, k_hi = tile_bounds(seq_q, seq_k, block_q, block_k)
    qb, kb = k_lo.shape
    bounds = np.append(k_lo[0], seq_k)[None, :]  # [1, Kb + 1]
    k_len = k_hi[0] - k_lo[0] + 1
    rows = max(1, _CLASSIFY_ELEMENTS // ((kb + 1) * block_q)) * block_q
    counts = np.zeros((qb, kb), np.int64)
    for start in range(0, seq_q, rows):
      q = np.arange(start, min(seq_q, start + rows), dtype=np.int64)[:, None]
      per_query = np.diff(self._keys_before(q, bounds), axis=1)  # [rows, Kb]
      per_query = np.pad(per_query, ((0, -len(q) % block_q), (0, 0)))
      tiles = slice(start // block_q, start // block_q + len(per_query) // block_q)
      counts[tiles] = per_query.reshape(-1, block_q, kb).sum(1)
    q_len = np.minimum(np.arange(1, qb + 1) * block_q, seq_q) - np.arange(qb) * block_q
    return classify(counts > 0, counts == q_len[:, None] * k_len[None, :])

  def _keys_before(self, q_pos, t):
    """Number of keys query q keeps with flat index < t (t in [0, size])."""
    intervals = self.key_intervals(q_pos, np)
    sizes = [hi - lo + 1 for _, lo, hi in intervals]
    total, inside = np.zeros(np.broadcast_shapes(q_pos.shape, t.shape), np.int64), 1
    for axis, y in enumerate(self.unravel(t)):
      group, lo, hi = intervals[axis]
      d = self.dilation[axis]
      # Progression members below y: j in [lo, hi] with group + d * j < y.
      below = np.clip(-((group - y) // d) - lo, 0, sizes[axis])
      later = math.prod(sizes[axis + 1 :])
      total = total + inside * below * later
      inside = inside * ((y % d == group) & (y // d >= lo) & (y // d <= hi))
    return total
