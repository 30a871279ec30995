r"""GPU benchmark of the block-sparse Pallas kernel (Triton lowering) against cuDNN and XLA.

    python -m experiments.gpu_bench_block_sparse --out=results/gpu_block_sparse   # H200: ~3-5 min
    python -m experiments.gpu_bench_block_sparse --dry_run --out=/tmp/bs_dry      # CPU, interpret
    python -m experiments.benchmark --platform=gpu                                # calls run()

Two tables, bf16, written as `<out>.json` and `<out>.md`:
1. Dense (full mask): forward and forward+backward TFLOP/s of `block_sparse_attention` with an
   all-FULL BlockMap next to `jax.nn.dot_product_attention(implementation="cudnn" | "xla")`,
   T = S = 1k..32k, head dim H = 64 and 128, B*T = 32k tokens, N*H = 1024. Each implementation
   runs its lengths as one series (`experiments.bench.runner.run_series`, in-process): an OOM
   or unsupported implementation is a row with its status, and its longer T are skipped.
2. Density sweep (T = 16k, H = 128): speed-up of the kernel on 1-D / 2-D neighborhood masks and
   random block masks over the same kernel on the full mask, next to the ideal 1 / density
   (density = fraction of tiles visited).

FLOPs are model FLOPs of the visited work: forward 4*B*N*T*S*H*density (two matmuls), and
forward+backward 3.5x that (FlashAttention-2 convention: the backward's five matmuls, counting
the recomputed QK^T, are 2.5x the forward). Times: the shared loop
(`experiments.bench.measure.time_call`): median of `repeats` calls after a compile + warm-up
call, forward and the gradient of <out, g> for a fixed random g.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from attnzoo import masks
from experiments.bench import measure, runner, table
from pallas_kernels import block_sparse

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
HEAD_DIMS = (64, 128)
TOKENS = 32768  # B * T per point
WIDTH = 1024  # N * H per point
SWEEP_T = 16384
FWD_BWD_FLOPS = 3.5  # forward+backward FLOPs per forward FLOP (FlashAttention-2 convention)
KERNEL = "pallas_block_sparse"


def _full_map(T, block_sizes):
  qb, kb = -(-T // block_sizes.block_q), -(-T // block_sizes.block_k)
  return block_sparse.BlockMap.from_block_mask(
    np.full((qb, kb), block_sparse.FULL, np.int32),
    block_q=block_sizes.block_q,
    block_k=block_sizes.block_k,
    seq_q=T,
    seq_k=T,
  )


def _kernel(block_map, mask, block_sizes):
  """The kernel on `block_map`; `mask` (or None for all-FULL maps) decides PARTIAL tiles."""
  kwargs = {}
  if mask is not None:
    kwargs = dict(mask_fn=block_sparse.MaskPredicate(mask), mask_tables=tuple(mask.tables()))
  return lambda q, k, v: block_sparse.block_sparse_attention(
    q, k, v, block_map, block_sizes=block_sizes, **kwargs
  )


def _attend(point: dict, block_sizes, mask):
  impl, T = point["impl"], point["T"]
  if impl != KERNEL:
    return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation=impl.removeprefix("dpa_")
    )
  if mask is None:
    return _kernel(_full_map(T, block_sizes), None, block_sizes)
  return _kernel(mask.block_map(T, T, block_sizes.block_q, block_sizes.block_k), mask, block_sizes)


def _measurer(block_sizes: block_sparse.BlockSizes, sweep_masks: dict):
  """`point -> result` for `run_series`; `sweep_masks`: mask name -> mask (None = all FULL)."""

  def measure_point(point: dict) -> dict:
    B, T, N, H = point["B"], point["T"], point["N"], point["H"]
    q, k, v = measure.random_qkv(B, T, N, H, point["dtype"])
    attend = _attend(point, block_sizes, sweep_masks.get(point.get("mask")))
    res = measure.time_call(
      lambda q, k, v, params, consts: attend(q, k, v),
      q,
      k,
      v,
      repeats=point["repeats"],
    )
    flops = dict(fwd=point["flops_fwd"], fwdbwd=FWD_BWD_FLOPS * point["flops_fwd"])
    for mode in measure.MODES:
      if f"{mode}_ms" in res:
        res[f"{mode}_tflops"] = flops[mode] / (res[f"{mode}_ms"] / 1e3) / 1e12
    return res

  return measure_point


def _series(points, block_sizes, log_name, sweep_masks=None):
  rows = runner.run_series(
    points, isolate=False, measure_fn=_measurer(block_sizes, sweep_masks or {})
  )
  for row in rows:
    print(f"[gpu_bench_block_sparse] {log_name(row)}: {runner.one_line(row)}", flush=True)
  return rows


def dense_table(lengths, head_dims, block_sizes, *, repeats, dtype, peers, tokens, width):
  impls = (KERNEL, *(f"dpa_{p}" for p in peers))
  rows = []
  for H in head_dims:
    N = max(1, width // H)
    for impl in impls:
      points = [
        dict(impl=impl, T=T, H=H, B=max(1, tokens // T), N=N, dtype=dtype, repeats=repeats)
        for T in lengths
      ]
      for p in points:
        p["flops_fwd"] = 4.0 * p["B"] * N * p["T"] * p["T"] * H
      rows += _series(points, block_sizes, lambda r: f"dense {r['impl']} H={r['H']} T={r['T']}")
  rows.sort(key=lambda r: (r["H"], r["T"], impls.index(r["impl"])))
  return rows


def _sweep_masks(T, block_sizes):
  side = int(round(T**0.5))
  cases = [("full", None)]
  for window in (T // 2, T // 4, T // 8, T // 16, T // 32):
    cases.append((f"neighborhood_1d(w={window})", masks.Neighborhood((T,), window=window)))
  if side * side == T:
    for window in (side // 2, side // 4, side // 8):
      cases.append(
        (
          f"neighborhood_2d({side}x{side}, w={window})",
          masks.Neighborhood((side, side), window=window),
        )
      )
  for density in (0.5, 0.25, 0.125, 0.0625):
    cases.append(
      (
        f"random_blocks(p={density})",
        masks.RandomBlocks(
          density,
          block_sizes.block_q,
          block_sizes.block_k,
          seed=0,
          seq_q=T,
          seq_k=T,
          keep_diagonal=True,
        ),
      )
    )
  return cases


def density_table(T, H, block_sizes, *, repeats, dtype, tokens, width):
  N, B = max(1, width // H), max(1, tokens // T)
  sweep = dict(_sweep_masks(T, block_sizes))
  rows = []
  for name, mask in sweep.items():
    if mask is None:
      block_map = _full_map(T, block_sizes)
    else:
      block_map = mask.block_map(T, T, block_sizes.block_q, block_sizes.block_k)
    density = block_map.density()
    point = dict(impl=KERNEL, mask=name, T=T, H=H, B=B, N=N, dtype=dtype, repeats=repeats)
    point |= dict(density=density, ideal_speedup=1.0 / density)
    point["flops_fwd"] = 4.0 * B * N * T * T * H * density
    rows += _series([point], block_sizes, lambda r: f"density {r['mask']}", sweep)
  full = rows[0]
  for row in rows:
    for mode in measure.MODES:
      if f"{mode}_ms" in row and f"{mode}_ms" in full:
        row[f"{mode}_speedup"] = full[f"{mode}_ms"] / row[f"{mode}_ms"]
  return rows


def _note(r):
  return r.get("reason") if r["status"] != "ok" else None


DENSE_COLUMNS = [
  table.Column("T", "T"),
  table.Column("H", "H"),
  table.Column("B x N", lambda r: f"{r['B']} x {r['N']}"),
  table.Column("impl", "impl"),
  table.Column("fwd ms", "fwd_ms", ".3f", status=True),
  table.Column("fwd TFLOP/s", "fwd_tflops", ".3g", status=True),
  table.Column("fwd+bwd ms", "fwdbwd_ms", ".3f", status=True),
  table.Column("fwd+bwd TFLOP/s", "fwdbwd_tflops", ".3g", status=True),
  table.Column("note", _note),
]
DENSITY_COLUMNS = [
  table.Column("mask", "mask"),
  table.Column("density", "density", ".4f"),
  table.Column("ideal 1/density", "ideal_speedup", ".2f"),
  table.Column("fwd speed-up", "fwd_speedup", ".2f", status=True),
  table.Column("fwd+bwd speed-up", "fwdbwd_speedup", ".2f", status=True),
  table.Column("fwd TFLOP/s (visited)", "fwd_tflops", ".3g", status=True),
  table.Column("note", _note),
]


def to_markdown(doc) -> str:
  lines = [
    f"# Block-sparse kernel on {doc['machine']['device']} (jax {doc['machine']['jax']}, "
    f"{doc['dtype']})",
    "",
    "## Dense (full mask): TFLOP/s",
    "",
    table.markdown(doc["dense"], DENSE_COLUMNS),
    "",
    f"## Speed-up vs density (kernel on the full mask = 1), T={doc['sweep_T']}",
    "",
    table.markdown(doc["density"], DENSITY_COLUMNS),
  ]
  if doc.get("note"):
    lines += ["", doc["note"]]
  return "\n".join(lines) + "\n"


def run(
  out_prefix: str = "results/gpu_block_sparse",
  *,
  dry_run: bool = False,
  lengths=LENGTHS,
  head_dims=HEAD_DIMS,
  sweep_T: int = SWEEP_T,
  repeats: int = 5,
  block_sizes: block_sparse.BlockSizes | None = None,
) -> dict:
  """Runs both tables and writes `<out_prefix>.json` and `<out_prefix>.md`; returns the doc.

  `dry_run=True` runs a tiny version in the Pallas interpreter on any machine (CPU: the
  numbers measure the interpreter, not a GPU), with only the XLA peer.
  """
  tokens, width = TOKENS, WIDTH
  if dry_run:
    lengths, head_dims, sweep_T, repeats = (256,), (64,), 256, 1
    block_sizes = block_sizes or block_sparse.BlockSizes(64, 64)
    tokens, width = 256, 128
  elif jax.default_backend() != "gpu":
    raise RuntimeError(
      f"no GPU (jax.default_backend()={jax.default_backend()!r}); "
      "pass dry_run=True (--dry_run) to check the script in interpret mode"
    )
  block_sizes = block_sizes or block_sparse.BlockSizes(128, 64, num_warps=4, num_stages=2)
  interpret = jax.default_backend() != "gpu"
  peers = ("xla",) if interpret else ("cudnn", "xla")
  dtype = "bfloat16"
  doc = dict(
    machine=runner.machine(),
    dtype=dtype,
    block_sizes=dataclasses.asdict(block_sizes),
    tokens_per_point=tokens,
    width=width,
    sweep_T=sweep_T,
    interpret=interpret,
    note="CPU dry run: interpreter timings, not GPU figures." if interpret else "",
  )
  common = dict(repeats=repeats, dtype=dtype, tokens=tokens, width=width)
  doc["dense"] = dense_table(lengths, head_dims, block_sizes, peers=peers, **common)
  doc["density"] = density_table(sweep_T, max(head_dims), block_sizes, **common)
  paths = table.write(doc, out_prefix, to_markdown(doc))
  print(f"[gpu_bench_block_sparse] wrote {paths[0]} and {paths[1]}")
  return doc


if __name__ == "__main__":
  from absl import app, flags  # noqa: PLC0415 (flags only when run as a script)

  flags.DEFINE_string("out", "results/gpu_block_sparse", "output prefix (.json and .md)")
  flags.DEFINE_bool("dry_run", False, "tiny interpret-mode run (CPU) to check the script")
  flags.DEFINE_integer("repeats", 5, "timed calls per point (median)")

  def main(argv):
    del argv
    run(flags.FLAGS.out, dry_run=flags.FLAGS.dry_run, repeats=flags.FLAGS.repeats)

  app.run(main)
