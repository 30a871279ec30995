"""Needle in a haystack: retrieve a key's value planted at a chosen depth of byte text.

Measures: accuracy on the answer bytes (only they carry loss weight); a depth sweep
(`depth=0.0 ... 1.0`) shows where in the context retrieval fails.

    python -m experiments.train --config configs/needle.py:attention=softmax \
        --workdir /tmp/az/needle
    python -m experiments.train --config configs/needle.py:attention=softmax,depth=0.5 ...

Arguments: attention, seq_len, depth (-1 = uniform per example), smoke.
Expected: softmax attention with RoPE learns exact retrieval (answer accuracy -> ~1.0)
at length 512; linear attention degrades with length. 3,000 steps, ~30 min on 2 CPU
cores (not measured yet). smoke: ~10 s.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, attention="softmax", seq_len=512, depth=-1.0, smoke=False)
  c = common.base(arg.attention)
  c.data.name = "needle"
  c.data.seq_len = arg.seq_len
  c.data.seed = 0
  if arg.depth >= 0:
    c.data.depth = arg.depth
  c.data.max_bytes = 4 << 20
  c.model.dim = 128
  c.model.num_layers = 4
  c.train.steps = 3000
  c.train.batch_size = 16
  c.eval.every = 500
  c.checkpoint.every = 500
  if arg.smoke:
    common.smoke(c)
    c.data.seq_len = 128
    c.data.max_bytes = 1 << 20
  return common.lock(c)
