"""Byte-level language modelling on an offline corpus.

Measures: bits per byte (bpb) on held-out documents, against the corpus's unigram
(order-0) entropy, which `train_and_evaluate` logs at start-up.

    python -m experiments.train --config configs/lm_bytes.py:attention=softmax \
        --workdir /tmp/attnzoo/lm_bytes
    python -m experiments.train --config configs/lm_bytes.py:attention=softmax,corpus=shakespeare \
        --workdir /tmp/attnzoo/lm_shakespeare
    python -m experiments.train --config configs/lm_bytes.py:smoke --workdir /tmp/smoke

Arguments: attention=NAME (a registry family, or a per-layer pattern "a+b"),
corpus=stdlib|shakespeare, tnl, smoke.

`tnl` configures a TransNormerLLM-style model (arXiv 2307.14995 §3; Lightning Attention-2,
arXiv 2401.04658): linear attention with SiLU feature maps, the official per-head, per-layer
decay schedule (`decay="tnl"`, resolved from each layer's depth), NormAttention output
(SRMSNorm over the heads, gated by x W_u: the hooks "srms_norm+output_gate"), SRMSNorm block
norms, no positional encoding beyond the decay:

    python -m experiments.train --config configs/lm_bytes.py:tnl --workdir /tmp/attnzoo/lm_tnl

Differences from TNL: no LRPE in the first layer, and the gate is a full-rank projection
without the paper's activation on V. Not measured yet at full size.

Expected (stdlib, softmax, measured 2026-11-29): unigram baseline 4.77 bits/byte on the
test split; eval bpb 2.66 at step 200, 2.30 at 400, 2.17 at 600 (857k parameters). It took
23 min wall on a shared 2-core CPU machine (load ~8, the run had about half a core;
~11 CPU-minutes; run with --config.model.knobs.softmax.implementation=xla, the fastest path
at T=128 on CPU); expect ~6-10 min on an idle 2-core machine. smoke: ~10 s.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, attention="softmax", corpus="stdlib", tnl=False, smoke=False)
  c = common.base("linear" if arg.tnl else arg.attention)
  if arg.tnl:
    c.model.knobs.linear.decay = "tnl"
    c.model.knobs.linear.feature_map = "silu"
    c.model.knobs.linear.hooks = "srms_norm+output_gate"  # NormAttention: Norm(QKᵀV) ⊙ x W_u
    c.model.norm = "srms"  # TNL's block norms are SRMSNorm too
    c.model.position = "none"
  c.data.name = arg.corpus
  c.data.seq_len = 128
  c.data.seed = 0
  c.data.max_bytes = 4 << 20  # a 4 MiB subset of whole documents: far more than a CPU run sees
  c.model.dim = 128
  c.model.num_layers = 4
  c.train.steps = 600
  c.train.batch_size = 32
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 50
  c.eval.every = 200
  c.eval.batches = 8
  c.checkpoint.every = 200
  if arg.smoke:
    common.smoke(c)
    c.data.seq_len = 32
    c.data.max_bytes = 1 << 20
  return common.lock(c)
