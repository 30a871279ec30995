"""The benchmark package shared by `python -m experiments.benchmark` (the CPU grid) and the GPU
scripts `experiments.gpu_bench_block_sparse` / `experiments.gpu_bench_linear`.

- `cases.py`: what is measured: one case per registered family x implementation x scenario,
  generated from `attnzoo.attention.FAMILIES`, plus hand-written peers (jax.nn, torch).
- `measure.py`: in-process measuring: `time_call` (the one timing loop: compile, XLA memory
  plan vs cap, median of repeats, fwd and fwd+bwd, failures as statuses) and grid points.
- `runner.py`: series of points (isolated child with RSS/time watchdog, or in-process), the
  CPU grid and its ratios (baseline, peers, % matmul roofline).
- `table.py`: the one table writer (`Column`s -> markdown; `<prefix>.json` + `<prefix>.md`).
"""
