r"""GPU benchmark of the block-sparse Pallas kernel (Triton lowering) against cuDNN and XLA.

    python -m experiments.gpu_bench_block_sparse --out=results/gpu_block_sparse   # H200: ~3-5 min
    python -m experiments.gpu_bench_block_sparse --dry_run --out=/tmp/bs_dry      # CPU, interpret
    python -m experiments.benchmark --platform=gpu                                # calls run()

Two tables, bf16, written as `<out>.json` and `<out>.md`:
1. Dense (full mask): forward and forward+backward TFLOP/s of `block_sparse_attention` with an
   all-FULL BlockMap next to `jax.nn.dot_product_attention(implementation="cudnn" | "xla")`,
   T = S = 1k..32k, head dim H = 64 and 128, B*T = 32k tokens, N*H = 1024. An OOM or an
   unsupported implementation is recorded as such, not fatal.
2. Density sweep (T = 16k, H = 128): speed-up of the kernel on 1-D / 2-D neighborhood masks and
   random block masks over the same kernel on the full mask, next to the ideal 1 / density
   (density = fraction of tiles visited).

FLOPs are model FLOPs of the visited work: forward 4*B*N*T*S*H*density (two matmuls), and
forward+backward 3.5x that (FlashAttention-2 convention: the backward's five matmuls, counting
the recomputed QK^T, are 2.5x the forward). Times: median of `repeats` calls after a
compile + warm-up call (`block_until_ready`); fwd+bwd is `jax.vjp` plus the pullback of a
fixed random cotangent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo import masks
from experiments.timing import cell, median_seconds
from pallas_kernels.block_sparse import BlockMap, BlockSizes, block_sparse_attention

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
HEAD_DIMS = (64, 128)
TOKENS = 32768  # B * T per point
WIDTH = 1024  # N * H per point
SWEEP_T = 16384


def _time(fn, *args, repeats: int) -> float:
  return median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)


def _inputs(B, T, N, H, dtype):
  keys = jax.random.split(jax.random.key(0), 4)
  return tuple(jax.random.normal(key, (B, T, N, H), jnp.float32).astype(dtype) for key in keys)


def _fwd_and_fwd_bwd(attend):
  fwd = jax.jit(attend)

  @jax.jit
  def fwd_bwd(q, k, v, d_out):
    out, pullback = jax.vjp(attend, q, k, v)
    return out, pullback(d_out)

  return fwd, fwd_bwd


def _measure(name, attend, q, k, v, d_out, flops_fwd, repeats):
  row = dict(impl=name)
  fwd, fwd_bwd = _fwd_and_fwd_bwd(attend)
  for mode, fn, args, flops in (
    ("fwd", fwd, (q, k, v), flops_fwd),
    ("fwd_bwd", fwd_bwd, (q, k, v, d_out), 3.5 * flops_fwd),
  ):
    try:
      seconds = _time(fn, *args, repeats=repeats)
      row[f"{mode}_ms"] = seconds * 1e3
      row[f"{mode}_tflops"] = flops / seconds / 1e12
    except Exception as e:  # noqa: BLE001 (OOM / unsupported shape: recorded, not fatal)
      row[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
  return row


def _kernel(block_map, mask_fn, block_sizes, interpret):
  backend = "gpu"

  def attend(q, k, v):
    return block_sparse_attention(
      q,
      k,
      v,
      block_map,
      mask_fn=mask_fn,
      block_sizes=block_sizes,
      interpret=interpret,
      backend=backend,
    )

  return attend


def _full_map(T, block_sizes):
  qb, kb = -(-T // block_sizes.block_q), -(-T // block_sizes.block_k)
  return BlockMap.from_block_mask(
    np.full((qb, kb), 2, np.int32),
    block_q=block_sizes.block_q,
    block_k=block_sizes.block_k,
    seq_q=T,
    seq_k=T,
  )


def dense_table(
  lengths, head_dims, block_sizes, *, repeats, dtype, interpret, peers, tokens, width
):
  rows = []
  for H in head_dims:
    N = max(1, width // H)
    for T in lengths:
      B = max(1, tokens // T)
      q, k, v, d_out = _inputs(B, T, N, H, dtype)
      flops = 4.0 * B * N * T * T * H
      point = dict(T=T, H=H, B=B, N=N)
      attend = _kernel(_full_map(T, block_sizes), None, block_sizes, interpret)
      rows.append(point | _measure("pallas_block_sparse", attend, q, k, v, d_out, flops, repeats))
      for impl in peers:
        attend = lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
          q, k, v, implementation=impl
        )
        rows.append(point | _measure(f"dpa_{impl}", attend, q, k, v, d_out, flops, repeats))
      print(json.dumps(rows[-1]), flush=True)
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


def density_table(T, H, block_sizes, *, repeats, dtype, interpret, tokens, width):
  N, B = max(1, width // H), max(1, tokens // T)
  q, k, v, d_out = _inputs(B, T, N, H, dtype)
  rows, full = [], None
  for name, mask in _sweep_masks(T, block_sizes):
    if mask is None:
      block_map = _full_map(T, block_sizes)
    else:
      block_map = mask.block_map(T, T, block_sizes.block_q, block_sizes.block_k)
    density = block_map.density()
    attend = _kernel(block_map, None if mask is None else mask.predicate, block_sizes, interpret)
    flops = 4.0 * B * N * T * T * H * density
    row = dict(mask=name, T=T, H=H, density=density, ideal_speedup=1.0 / density)
    row |= _measure("pallas_block_sparse", attend, q, k, v, d_out, flops, repeats)
    full = row if mask is None else full
    for mode in ("fwd", "fwd_bwd"):
      if f"{mode}_ms" in row and full and f"{mode}_ms" in full:
        row[f"{mode}_speedup"] = full[f"{mode}_ms"] / row[f"{mode}_ms"]
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def _fmt(row, mode, field, spec):
  return cell(row.get(f"{mode}_{field}"), row.get(f"{mode}_error", ""), spec)


def to_markdown(doc) -> str:
  lines = [
    f"# Block-sparse kernel on {doc['device']} (jax {doc['jax']}, {doc['dtype']})",
    "",
    "## Dense (full mask): TFLOP/s",
    "",
    "| T | H | B x N | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in doc["dense"]:
    lines.append(
      f"| {r['T']} | {r['H']} | {r['B']} x {r['N']} | {r['impl']} | "
      f"{_fmt(r, 'fwd', 'ms', '.3f')} | {_fmt(r, 'fwd', 'tflops', '.3g')} | "
      f"{_fmt(r, 'fwd_bwd', 'ms', '.3f')} | {_fmt(r, 'fwd_bwd', 'tflops', '.3g')} |"
    )
  lines += [
    "",
    f"## Speed-up vs density (kernel on the full mask = 1), T={doc['sweep_T']}",
    "",
    "| mask | density | ideal 1/density | fwd speed-up | fwd+bwd speed-up | "
    "fwd TFLOP/s (visited) |",
    "|---|---|---|---|---|---|",
  ]
  for r in doc["density"]:
    lines.append(
      f"| {r['mask']} | {r['density']:.4f} | {r['ideal_speedup']:.2f} | "
      f"{_fmt(r, 'fwd', 'speedup', '.2f')} | {_fmt(r, 'fwd_bwd', 'speedup', '.2f')} | "
      f"{_fmt(r, 'fwd', 'tflops', '.3g')} |"
    )
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
  block_sizes: BlockSizes | None = None,
) -> dict:
  """Runs both tables and writes `<out_prefix>.json` and `<out_prefix>.md`; returns the doc.

  `dry_run=True` runs a tiny version in the Pallas interpreter on any machine (CPU: the
  numbers measure the interpreter, not a GPU), with only the XLA peer.
  """
  tokens, width = TOKENS, WIDTH
  if dry_run:
    lengths, head_dims, sweep_T, repeats = (256,), (64,), 256, 1
    block_sizes = block_sizes or BlockSizes(64, 64)
    tokens, width = 256, 128
  elif jax.default_backend() != "gpu":
    raise RuntimeError(
      f"no GPU (jax.default_backend()={jax.default_backend()!r}); "
      "pass dry_run=True (--dry_run) to check the script in interpret mode"
    )
  block_sizes = block_sizes or BlockSizes(128, 64, num_warps=4, num_stages=2)
  interpret = jax.default_backend() != "gpu"
  peers = ("xla",) if interpret else ("cudnn", "xla")
  dtype = jnp.bfloat16
  doc = dict(
    device=str(jax.devices()[0].device_kind),
    jax=jax.__version__,
    dtype="bfloat16",
    block_sizes=dataclasses.asdict(block_sizes),
    tokens_per_point=tokens,
    width=width,
    sweep_T=sweep_T,
    interpret=interpret,
    note="CPU dry run: interpreter timings, not GPU figures." if interpret else "",
  )
  try:
    doc["dense"] = dense_table(
      lengths,
      head_dims,
      block_sizes,
      repeats=repeats,
      dtype=dtype,
      interpret=interpret,
      peers=peers,
      tokens=tokens,
      width=width,
    )
    doc["density"] = density_table(
      sweep_T,
      max(head_dims),
      block_sizes,
      repeats=repeats,
      dtype=dtype,
      interpret=interpret,
      tokens=tokens,
      width=width,
    )
  except Exception:
    doc["error"] = traceback.format_exc()
    raise
  finally:
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with open(out_prefix + ".json", "w") as f:
      json.dump(doc, f, indent=1)
    if "density" in doc:
      with open(out_prefix + ".md", "w") as f:
        f.write(to_markdown(doc))
  print(f"[gpu_bench_block_sparse] wrote {out_prefix}.json and {out_prefix}.md")
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
