"""Multi-query associative recall (MQAR; Arora et al., "Zoology", arXiv 2312.04927, §3).

Measures: accuracy on the query positions (only they carry loss weight) - how many
key->value bindings the attention can store and retrieve in one pass.

    python -m experiments.train --config configs/mqar.py:attention=softmax --workdir /tmp/az/mqar
    python -m experiments.train --config configs/mqar.py:attention=softmax,kv_pairs=32,seq_len=256 \
        --workdir /tmp/az/mqar_32

Arguments: attention, seq_len (even), kv_pairs, smoke.
Expected: softmax attention solves MQAR at these sizes (Zoology Fig. 2: accuracy -> ~1.0
for attention at width 64-128), while fixed-state linear attention degrades as kv_pairs
grows. Default (seq_len 128, 16 pairs, 2 layers, d=64): 2,000 steps, ~10 min on 2 CPU
cores (not measured yet). smoke: ~10 s.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, attention="softmax", seq_len=128, kv_pairs=16, smoke=False)
  c = common.base(arg.attention)
  c.data.name = "mqar"
  c.data.seq_len = arg.seq_len
  c.data.num_kv_pairs = arg.kv_pairs
  c.data.vocab_size = 8192
  c.data.seed = 0
  c.model.dim = 64
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.dropout = 0.0
  c.train.steps = 2000
  c.train.batch_size = 64
  c.train.learning_rate = 1e-3
  c.train.weight_decay = 0.1
  c.eval.every = 500
  c.checkpoint.every = 500
  if arg.smoke:
    common.smoke(c)
    c.data.seq_len = 32
    c.data.num_kv_pairs = 4
    c.data.vocab_size = 64
  return common.lock(c)
