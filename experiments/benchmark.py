r"""Speed and memory of attention implementations over sequence length, with peers side by side.

    python -m experiments.benchmark --lengths=1024,2048,4096 --out=results/bench
    python -m experiments.benchmark --cases=softmax/xla:full,linear/chunked:causal --dtypes=bfloat16
    python -m experiments.benchmark --platform=gpu      # the GPU kernel benchmarks

The cases are every registered attention family x implementation x scenario (full, causal,
neighborhood), generated from `attnzoo.attention.FAMILIES` (`experiments/bench/cases.py`), plus
peers: `jax.nn.dot_product_attention`, and torch SDPA / flex_attention when torch is installed.
The points of one case and dtype run in their own subprocess (`--isolate`, default), in ascending
T: the child's peak RSS is the point's; a watchdog kills a child over `--rss_cap_gib` ("oom") or
past `--timeout_s` per point ("timeout"), and a point whose XLA-planned temporaries alone pass
the cap is marked "oom" without running; longer points of that case are then skipped. Times are
the median of `--repeats` runs after a compile-and-warm-up call, forward and forward+backward.

Figures that travel across machines are ratios: each time against the baseline
(`softmax/xla:full`) measured in the same run, each attnzoo time against the peers of the same
scenario, and dense-softmax throughput as a fraction of this machine's matmul FLOP/s measured
in the same process right after the point. Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

from absl import app, flags

from experiments.bench import cases, measure, runner, table

FLAGS = flags.FLAGS
GPU_SCRIPTS = ("experiments.gpu_bench_block_sparse", "experiments.gpu_bench_linear")


def _run_gpu(out_prefix: str, dry_run: bool = False) -> None:
  """Runs the GPU kernel benchmarks (imported lazily: they need a GPU, or --gpu_dry_run)."""
  import importlib  # noqa: PLC0415

  for module in GPU_SCRIPTS:
    try:
      mod = importlib.import_module(module)
    except ImportError as e:
      print(f"[benchmark] skip {module}: not importable ({e})")
      continue
    prefix = f"{out_prefix}_{module.rsplit('.', 1)[1]}"
    mod.run(prefix, dry_run=dry_run)


def _define_flags() -> None:
  """Flags of the command line only: importing this module (reproduce, tests) defines none."""
  flags.DEFINE_list("cases", list(cases.default_cases()), "attnzoo cases (see bench/cases.py).")
  flags.DEFINE_list("peers", list(cases.default_peers()), "peer cases; [] for none.")
  flags.DEFINE_list("lengths", ["1024", "2048", "4096"], "sequence lengths T (= S).")
  flags.DEFINE_list("dtypes", ["float32"], "input dtypes.")
  flags.DEFINE_integer("batch", 1, "B.")
  flags.DEFINE_integer("heads", 8, "N (= K: no grouping).")
  flags.DEFINE_integer("head_dim", 64, "H (= Hv).")
  flags.DEFINE_integer("repeats", 3, "timed runs per point (median).")
  flags.DEFINE_bool("backward", True, "also time forward+backward.")
  flags.DEFINE_bool("isolate", True, "one subprocess per case and dtype (own peak RSS).")
  flags.DEFINE_float("rss_cap_gib", 8.0, "kill a point above this resident memory (marked oom).")
  flags.DEFINE_float("timeout_s", 300.0, "kill a point after this many seconds (marked timeout).")
  flags.DEFINE_integer("check_len", 1024, "check outputs against the reference up to this T.")
  flags.DEFINE_string("out", "results/benchmark", "output prefix: writes <out>.json and <out>.md.")
  flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu"], "gpu: run the GPU kernel benchmarks.")
  flags.DEFINE_bool("gpu_dry_run", False, "with --platform=gpu: tiny interpret-mode runs (CPU).")
  flags.DEFINE_string(
    "point", None, "internal: JSON list of points (one case, ascending T) to measure."
  )


def main(argv):
  del argv
  if FLAGS.point is not None:
    measure.child_main(FLAGS.point)
    return
  if FLAGS.platform == "gpu":
    _run_gpu(FLAGS.out, FLAGS.gpu_dry_run)
    return
  doc = runner.run_grid(
    FLAGS.cases,
    FLAGS.peers,
    FLAGS.lengths,
    FLAGS.dtypes,
    batch=FLAGS.batch,
    heads=FLAGS.heads,
    head_dim=FLAGS.head_dim,
    repeats=FLAGS.repeats,
    backward=FLAGS.backward,
    isolate=FLAGS.isolate,
    rss_cap_gib=FLAGS.rss_cap_gib,
    timeout_s=FLAGS.timeout_s,
    check_len=FLAGS.check_len,
  )
  paths = table.write(doc, FLAGS.out, table.grid_markdown(doc))
  print(f"[benchmark] wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
