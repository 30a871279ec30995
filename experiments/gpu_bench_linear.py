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

Reported per point: median ms and tokens/s = B·T / time, forward and forward+backward, timed by
the shared loop (`experiments.bench.measure.time_call`); each implementation runs its lengths
as one series (`experiments.bench.runner.run_series`, in-process): an OOM or unsupported case is
a row with its status, and the longer T of that implementation are skipped. Output:
`<out>.json`, `<out>.md`. On CPU the Pallas rows run in the interpreter (labelled).
"""

from __future__ import annotations

import jax

from experiments.bench import measure, runner, table

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
IMPLS = ("linear_pallas", "linear_chunked", "block_sparse", "dpa_cudnn", "dpa_xla")


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
    return lambda q, k, v: block_sparse.block_sparse_attention(
      q, k, v, block_map, mask_fn=block_sparse.MaskPredicate(mask), block_sizes=sizes
    )
  if impl.startswith("dpa_"):
    implementation = impl.removeprefix("dpa_")
    return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation=implementation
    )
  raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")


def measure_point(point: dict) -> dict:
  """One (impl, T) point: times and tokens/s; failures are statuses (see `time_call`)."""
  B, T, N, H = point["B"], point["T"], point["N"], point["H"]
  try:
    attend = _attend_fn(point["impl"], heads=N, block_size=point["block_size"], T=T)
  except Exception as e:  # noqa: BLE001 (a peer that does not exist here is recorded)
    return dict(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
  # Small inputs: unnormalised linear attention grows with Σ q·k (see the family docstring).
  q, k, v = measure.random_qkv(B, T, N, H, point["dtype"], input_scale=0.3)
  res = measure.time_call(
    lambda q, k, v, params, consts: attend(q, k, v),
    q,
    k,
    v,
    repeats=point["repeats"],
    backward=point["backward"],
  )
  for mode in measure.MODES:
    if f"{mode}_ms" in res:
      res[f"{mode}_tokens_per_s"] = B * T / (res[f"{mode}_ms"] / 1e3)
  return res


COLUMNS = [
  table.Column("T", "T"),
  table.Column("B", "B"),
  table.Column("impl", "impl"),
  table.Column("fwd ms", "fwd_ms", ".3f", status=True),
  table.Column("fwd tokens/s", "fwd_tokens_per_s", ".4g", status=True),
  table.Column("fwd+bwd ms", "fwdbwd_ms", ".3f", status=True),
  table.Column("fwd+bwd tokens/s", "fwdbwd_tokens_per_s", ".4g", status=True),
  table.Column("note", lambda r: r.get("reason") if r["status"] != "ok" else None),
]


def to_markdown(doc) -> str:
  lines = [
    f"# Linear vs softmax attention on {doc['machine']['device']} (jax {doc['machine']['jax']}, "
    f"{doc['dtype']}, causal, N={doc['heads']}, H={doc['head_dim']}, "
    f"B·T={doc['tokens'] or 'T (B=1)'})",
    "",
    table.markdown(doc["rows"], COLUMNS),
  ]
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
  passes=("fwd", "fwdbwd"),
) -> dict:
  """Measures every (T, impl) point and writes `<out_prefix>.json` / `.md`; returns the doc.

  `tokens` > 0 fixes B·T (B = tokens // T); `tokens=0` uses B = `batch` at every T. The
  forward is always timed; forward+backward when `passes` names it ("fwdbwd" or "fwd_bwd").
  `dry_run` shrinks everything so the script runs in seconds on CPU (interpreter timings).
  """
  if dry_run:
    lengths, tokens, heads, head_dim, repeats = (128, 256), 256, 2, 32, 1
    impls = tuple(i for i in impls if i != "dpa_cudnn")
  on_cpu = jax.default_backend() == "cpu"
  doc = dict(
    machine=runner.machine(),
    dtype=dtype,
    heads=heads,
    head_dim=head_dim,
    tokens=tokens,
    block_size=block_size,
    note="CPU: Pallas rows run in the interpreter; not GPU figures." if on_cpu else "",
    rows=[],
  )
  backward = bool({"fwdbwd", "fwd_bwd"} & set(passes))
  for impl in impls:
    points = [
      dict(
        impl=impl,
        T=int(T),
        B=max(1, tokens // T) if tokens else batch,
        N=heads,
        H=head_dim,
        dtype=dtype,
        block_size=block_size,
        repeats=repeats,
        backward=backward,
      )
      for T in lengths
    ]
    for row in runner.run_series(points, isolate=False, measure_fn=measure_point):
      doc["rows"].append(row)
      print(f"[gpu_bench_linear] {impl} T={row['T']}: {runner.one_line(row)}", flush=True)
  doc["rows"].sort(key=lambda r: (r["T"], impls.index(r["impl"])))
  paths = table.write(doc, out_prefix, to_markdown(doc))
  print(f"[gpu_bench_linear] wrote {paths[0]} and {paths[1]}")
  return doc


if __name__ == "__main__":
  from absl import app, flags  # noqa: PLC0415 (flags only when run as a script)

  flags.DEFINE_string("out", "results/gpu_linear", "output prefix (.json and .md)")
  flags.DEFINE_bool("dry_run", False, "tiny run (CPU, interpret mode) to check the script")
  flags.DEFINE_list("lengths", [str(t) for t in LENGTHS], "sequence lengths T")
  flags.DEFINE_list("impls", list(IMPLS), f"implementations, from {IMPLS}")
  flags.DEFINE_list("passes", ["fwd", "fwd_bwd"], "fwd is always timed; fwd_bwd adds the backward")
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
