"""Selective copying (Gu & Dao, "Mamba", arXiv 2312.00752, §3.1, Fig. 2).

Data tokens are scattered among noise tokens; after the context, the model must
emit the data tokens in order. Measures: accuracy on the copied tokens.

    python -m experiments.train --config configs/selective_copy.py:attention=softmax \
        --workdir /tmp/az/selective_copy

Arguments: attention, seq_len, num_tokens, smoke.
Expected: softmax attention with RoPE solves it (accuracy -> ~1.0; Mamba Table 1
reports 97-99% for attention-free selective models, and attention is a content-aware
baseline). Default (seq_len 256, 16 tokens, 2 layers, d=64): 2,000 steps, ~10 min on
2 CPU cores (not measured yet). smoke: ~10 s.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, attention="softmax", seq_len=256, num_tokens=16, smoke=False)
  c = common.base(arg.attention)
  c.data.name = "selective_copy"
  c.data.seq_len = arg.seq_len
  c.data.num_tokens = arg.num_tokens
  c.data.vocab_size = 16
  c.data.seed = 0
  c.model.dim = 64
  c.model.num_layers = 2
  c.train.steps = 2000
  c.train.batch_size = 32
  c.eval.every = 500
  c.checkpoint.every = 500
  if arg.smoke:
    common.smoke(c)
    c.data.seq_len = 32
    c.data.num_tokens = 4
  return common.lock(c)
