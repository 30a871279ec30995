r"""Throughput of tiled linear attention vs softmax attention as T grows (LA-2 Table 1 / Fig. 3).

    python -m experiments.gpu_bench_linear --out=results/gpu_linear          # H200: ~5 min
    python -m experiments.gpu_bench_linear --dry_run --out=/tmp/linear_dry   # CPU, interpret mode
    python -m experiments.gpu_bench_linear --impls=linear_chunked --tokens=0 --batch=1 \
        --heads=8 --head_dim=64 --dtype=float32 --lengths=1024,4096,16384,65536 --out=/tmp/cpu

What "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths" (arXiv
2401.04658) shows in Table 1 / Figure 3: at a fixed number of tokens per batch, causal linear
attention with the tiled kernel keeps a constant tokens/s as the sequence length grows, while
FlashAttention-2 slows down ∝ T. Here, causal, bf16 by default, B·T = `tokens` per point (B = 1
with --tokens=0), N heads of dim H, GQA off:

  linear_pallas    attnzoo.attention.linear, implementation="pallas" (TNL decays)
  linear_chunked   the same with implementation="chunked" (lax.scan over blocks)
  block_sparse     pallas_kernels.block_sparse flash kernel on the causal BlockMap (softmax)
  dpa_cudnn        jax.nn.dot_product_attention(is_causal=True, implementation="cudnn")
  dpa_xla          jax.nn.dot_product_attention(is_causal=True, implementation="xla")

Reported per point: median ms of `repeats` calls after a compile + warm-up call, and tokens/s =
B·T / time, for the forward and for forward+backward (`jax.vjp` + pullback of a fixed
cotangent). An OOM or unsupported case is recorded in the row, not fatal. Output: `<out>.json`,
`<out>.md`. On CPU without --dry_run the Pallas rows run in the interpreter (labelled).
"""

from __future__ import annotations

import json
import os
import traceback

import jax
import jax.numpy as jnp

from experiments.timing import cell, median_seconds

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
IMPLS = ("linear_pallas", "linear_chunked", "block_sparse", "dpa_cudnn", "dpa_xla")


def _time(fn, *args, repeats: int) -> float:
  return median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)


def _attend_fn(impl: str, *, heads: int, block_size: int, T: int):
  """`(q, k, v) -> out` for one implementation (imports stay lazy: only what is measured)."""
  if impl.startswith("linear_"):
    from attnzoo.attention.linear import linear, tnl  # noqa: PLC0415

    decay = tnl.tnl_slopes(heads, 0, 2)
    implementation = impl.removeprefix("linear_")
    return lambda q, k, v: linear.attention(
      q, k, v, decay=decay, block_size=block_size, implementation=implementation
    )
  if impl == "block_sparse":
    from attnzoo import masks  # noqa: PLC0415
    from pallas_kernels import block_sparse  # noqa: PLC0415

    sizes = block_sparse.BlockSizes(128, 64) if T >= 128 else block_sparse.BlockSizes(T, T)
    mask = masks.Causal()
    block_map = mask.block_map(T, T, sizes.block_q, sizes.block_k)
    interpret = jax.default_backend() == "cpu"
    return lambda q, k, v: block_sparse.block_sparse_attention(
      q, k, v, block_map, mask_fn=mask.predicate, block_sizes=sizes, interpret=interpret
    )
  if impl.startswith("dpa_"):
    implementation = impl.removeprefix("dpa_")
    return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=implementation
    )
  raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def measure(impl, B, T, N, H, dtype, *, block_size, repeats, passes=("fwd", "fwd_bwd")):
  keys = jax.random.split(jax.random.key(0), 4)
  # Small inputs: unnormalised linear attention grows with Σ q·k (see the family docstring).
  q, k, v, d_out = (0.3 * jax.random.normal(key, (B, T, N, H), jnp.float32) for key in keys)
  q, k, v, d_out = (x.astype(dtype) for x in (q, k, v, d_out))
  row = dict(impl=impl, B=B, T=T, N=N, H=H, dtype=jnp.dtype(dtype).name)
  try:
    attend = _attend_fn(impl, heads=N, block_size=block_size, T=T)
  except Exception as e:  # noqa: BLE001 (a peer that does not exist here is recorded)
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return row

  @jax.jit
  def fwd_bwd(q, k, v, d_out):
    out, pullback = jax.vjp(attend, q, k, v)
    return out, pullback(d_out)

  cases = dict(fwd=(jax.jit(attend), (q, k, v)), fwd_bwd=(fwd_bwd, (q, k, v, d_out)))
  for mode in passes:
    fn, args = cases[mode]
    try:
      seconds = _time(fn, *args, repeats=repeats)
      row[f"{mode}_ms"] = seconds * 1e3
      row[f"{mode}_tokens_per_s"] = B * T / seconds
      row[f"{mode}_us_per_token"] = seconds / (B * T) * 1e6
    except Exception as e:  # noqa: BLE001 (OOM / unsupported shape: recorded, not fatal)
      row[f"{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
  return row


def _fmt(row, key, spec):
  mode = "fwd_bwd" if key.startswith("fwd_bwd") else "fwd"
  return cell(row.get(key), row.get(f"{mode}_error", "") or row.get("error", ""), spec)


def to_markdown(doc) -> str:
  lines = [
    f"# Linear vs softmax attention on {doc['device']} (jax {doc['jax']}, {doc['dtype']}, "
    f"causal, N={doc['heads']}, H={doc['head_dim']}, B·T={doc['tokens'] or 'T (B=1)'})",
    "",
    "| T | B | impl | fwd ms | fwd tokens/s | fwd+bwd ms | fwd+bwd tokens/s |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in doc["rows"]:
    lines.append(
      f"| {r['T']} | {r['B']} | {r['impl']} | {_fmt(r, 'fwd_ms', '.3f')} | "
      f"{_fmt(r, 'fwd_tokens_per_s', '.4g')} | {_fmt(r, 'fwd_bwd_ms', '.3f')} | "
      f"{_fmt(r, 'fwd_bwd_tokens_per_s', '.4g')} |"
    )
  if doc.get("note"):
    lines += ["", doc["note"]]
  return "\n".join(lines) + "\n"


def run(
  out_prefix="results/gpu_linear",
  *,
  dry_run=False,
  lengths=LENGTHS,
  impls=IMPLS,
  tokens=65536,
  batch=1,
  heads=16,
  head_dim=128,
  dtype="bfloat16",
  block_size=64,
  repeats=5,
  passes=("fwd", "fwd_bwd"),
) -> dict:
  """Measures every (T, impl) point and writes `<out_prefix>.json` / `.md`; returns the doc.

  `tokens` > 0 fixes B·T (B = tokens // T); `tokens=0` uses B = `batch` at every T.
  `dry_run` shrinks everything so the script runs in seconds on CPU (interpreter timings).
  """
  if dry_run:
    lengths, tokens, heads, head_dim, repeats = (128, 256), 256, 2, 32, 1
    impls = tuple(i for i in impls if i != "dpa_cudnn")
  on_cpu = jax.default_backend() == "cpu"
  doc = dict(
    device=str(jax.devices()[0].device_kind),
    jax=jax.__version__,
    dtype=dtype,
    heads=heads,
    head_dim=head_dim,
    tokens=tokens,
    block_size=block_size,
    note="CPU: Pallas rows run in the interpreter; not GPU figures." if on_cpu else "",
    rows=[],
  )
  try:
    for T in lengths:
      B = max(1, tokens // T) if tokens else batch
      for impl in impls:
        row = measure(
          impl,
          B,
          T,
          heads,
          head_dim,
          jnp.dtype(dtype),
          block_size=block_size,
          repeats=repeats,
          passes=passes,
        )
        doc["rows"].append(row)
        print(json.dumps(row), flush=True)
  except Exception:
    doc["error"] = traceback.format_exc()
    raise
  finally:
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with open(out_prefix + ".json", "w") as f:
      json.dump(doc, f, indent=1)
    with open(out_prefix + ".md", "w") as f:
      f.write(to_markdown(doc))
  print(f"[gpu_bench_linear] wrote {out_prefix}.json and {out_prefix}.md")
  return doc


if __name__ == "__main__":
  from absl import app, flags  # noqa: PLC0415 (flags only when run as a script)

  flags.DEFINE_string("out", "results/gpu_linear", "output prefix (.json and .md)")
  flags.DEFINE_bool("dry_run", False, "tiny run (CPU, interpret mode) to check the script")
  flags.DEFINE_list("lengths", [str(t) for t in LENGTHS], "sequence lengths T")
  flags.DEFINE_list("impls", list(IMPLS), f"implementations, from {IMPLS}")
  flags.DEFINE_list("passes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd")
  flags.DEFINE_integer("tokens", 65536, "B·T per point; 0 = use --batch at every T")
  flags.DEFINE_integer("batch", 1, "batch size when --tokens=0")
  flags.DEFINE_integer("heads", 16, "heads N (= kv heads)")
  flags.DEFINE_integer("head_dim", 128, "head dim H (= Hv)")
  flags.DEFINE_string("dtype", "bfloat16", "input dtype")
  flags.DEFINE_integer("block_size", 64, "linear-attention block")
  flags.DEFINE_integer("repeats", 5, "timed calls per point (median)")

  def main(argv):
    del argv
    f = flags.FLAGS
    run(
      f.out,
      dry_run=f.dry_run,
      lengths=tuple(int(t) for t in f.lengths),
      impls=tuple(f.impls),
      tokens=f.tokens,
      batch=f.batch,
      heads=f.heads,
      head_dim=f.head_dim,
      dtype=f.dtype,
      block_size=f.block_size,
      repeats=f.repeats,
      passes=tuple(f.passes),
    )

  app.run(main)
