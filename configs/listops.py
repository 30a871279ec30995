"""ListOps (Nangia & Bowman, arXiv 1804.06028), as in the Long Range Arena (Tay et al.,
arXiv 2011.04006, §3.1): evaluate nested MAX/MIN/MED/SUM_MOD expressions, 10 classes.

Measures: test accuracy of a mean-pooled bidirectional encoder (padding excluded).

    python -m experiments.train --config configs/listops.py:attention=softmax \
        --workdir /tmp/az/listops

Arguments: attention, seq_len (LRA: 2000), pool, smoke. `pool=lama` replaces the mean pool with
LAMA attention pooling (Mehta et al., arXiv 1912.00835; M = 4 heads, rank D // 2: set
`--config.model.pool_knobs.num_heads` / `.rank`), e.g. `configs/listops.py:attention=softmax,
pool=lama` (the same as `--config.model.pool=lama`); the default stays "mean".
Expected: LRA Table 1 reports 36-38% for the vanilla Transformer at length 2,000
(chance ~10%, majority class ~17%). Default here is length 512 for CPU: 3,000 steps,
hours on 2 CPU cores; use a GPU. smoke: ~10 s.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, attention="softmax", seq_len=512, pool="mean", smoke=False)
  c = common.base(arg.attention)
  c.data.name = "listops"
  c.data.seq_len = arg.seq_len
  c.data.max_length = arg.seq_len + 1
  c.data.min_length = min(500, arg.seq_len // 2)
  c.data.seed = 0
  c.model.dim = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.mlp = "plain"
  c.model.activation = "gelu"
  c.model.position = "learned"
  c.model.pool = arg.pool
  c.train.steps = 3000
  c.train.batch_size = 32
  c.train.learning_rate = 5e-4
  c.train.warmup_steps = 300
  c.eval.every = 500
  c.checkpoint.every = 500
  if arg.smoke:
    common.smoke(c)
    c.data.seq_len = 64
    c.data.max_length = 65
    c.data.min_length = 8
    c.data.max_depth = 3
  return common.lock(c)
