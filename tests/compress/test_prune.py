"""`prune_heads` (SHRP usage-driven head pruning, arXiv 2512.20635; spec: architecture.md §2.3).

Keeping every head is the identity (exactly); heads no token selects can be removed without
changing the model (several layers: every token selects the same head, outputs equal to
rounding); attention parameters scale by keep/N; the keep-set is the most-used heads with ties
to the lower index; bad requests raise naming the fix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import nn
from attnzoo.compress import prune_heads
from attnzoo.compress.prune import kept_heads
from attnzoo.models import ModelConfig, Transformer
from tests.tolerances import assert_close

N, L, BATCH, LEN = 4, 3, 2, 12
CFG = ModelConfig(
  task="lm",
  vocab_size=17,
  input_len=LEN,
  dim=32,
  num_layers=L,
  num_heads=N,
  attention=("shrp",),
  knobs=(("shrp", (("implementation", "xla"),)),),
)


def tokens(seed=0):
  return jax.random.randint(jax.random.key(seed), (BATCH, LEN), 0, CFG.vocab_size)


@nnx.jit
def forward(model, inputs):
  return model(inputs)


@nnx.jit
def count_usage(model, inputs):
  """One forward pass whose usage counts are written back, as a training step does."""
  _, totals = nn.run_with_aux(model, inputs)
  nn.apply_state_updates(model, totals.state)


@nnx.jit
def routed(model, inputs):
  return nn.run_with_aux(model, inputs)


def flat(model):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def model_with_dead_heads(dead, cfg=CFG, seed=0):
  """Every layer's router columns `dead` equal column 0: ties go to head 0, so no token ever
  selects them. Usage is then counted over a few batches."""
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  for block in model.blocks:
    w = block.attn.family_params["w_router"][...]
    w = w * 50.0  # a decisive router: tokens spread over the live heads
    block.attn.family_params["w_router"][...] = w.at[:, list(dead)].set(w[:, :1])
  for seed in range(3):
    count_usage(model, tokens(seed))
  return model


def test_keeping_every_head_is_the_identity():
  model = model_with_dead_heads(dead=())
  pruned = prune_heads(model, N)
  assert pruned.cfg == model.cfg
  before, after = flat(model), flat(pruned)
  assert before.keys() == after.keys()
  for name in before:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  x = tokens(7)
  np.testing.assert_array_equal(np.asarray(forward(pruned, x)), np.asarray(forward(model, x)))


@pytest.mark.parametrize("dead", [(2, 3), (1, 3)])
def test_pruning_heads_no_token_selects_keeps_every_routing_decision_and_output(dead):
  model = model_with_dead_heads(dead)
  live = [h for h in range(N) if h not in dead]
  for block in model.blocks:
    usage = np.asarray(block.attn.family_state["usage"][...])
    np.testing.assert_array_equal(usage[list(dead)], 0.0)
    assert usage.sum() == 3 * BATCH * LEN
    np.testing.assert_array_equal(kept_heads(usage, N - len(dead)), live)
  pruned = prune_heads(model, N - len(dead))
  assert pruned.cfg.num_heads == pruned.cfg.num_kv_heads == N - len(dead)
  assert pruned.cfg.head_dim == model.cfg.head_dim
  for old, new in zip(model.blocks, pruned.blocks, strict=True):
    np.testing.assert_array_equal(
      np.asarray(new.attn.query.kernel[...]), np.asarray(old.attn.query.kernel[...])[:, live]
    )
    np.testing.assert_array_equal(
      np.asarray(new.attn.family_state["usage"][...]),
      np.asarray(old.attn.family_state["usage"][...])[live],
    )
  for seed in (10, 11):
    x = tokens(seed)
    # Every token selects the same head in every layer: the per-head counts of this batch are
    # equal exactly (integers), and no token selects a dead head.
    (out, totals), (out_pruned, totals_pruned) = routed(model, x), routed(pruned, x)
    for path, state in totals.state.items():
      counts = np.asarray(state["usage"]) - flat(model)[f"{path}/family_state/usage"]
      pruned_counts = (
        np.asarray(totals_pruned.state[path]["usage"]) - flat(pruned)[f"{path}/family_state/usage"]
      )
      np.testing.assert_array_equal(counts[list(dead)], 0.0)
      np.testing.assert_array_equal(pruned_counts, counts[live])
    # Outputs agree to rounding, not bit for bit: the pruned q/k/v projections have fewer
    # output columns, and XLA's CPU dot picks its kernel (and so the order of the sum over D)
    # by shape: measured |Δ| <= 4e-6 for the [32, 16] vs [32, 8] kernels here, bit-exact for
    # others. Attention per head and the out projection (zeros for dead heads) are exact.
    assert_close(out_pruned, out)
  # The test can fail: removing a head that tokens do select changes the outputs.
  wrong = prune_heads(model, N - len(dead), usage=[np.arange(N, dtype=np.float32)] * L)
  assert np.abs(np.asarray(forward(wrong, x) - forward(model, x))).max() > 1e-3


def test_attention_parameters_scale_by_keep_over_n():
  model = Transformer(CFG, rngs=nnx.Rngs(1))
  before = flat(model)
  for keep in (1, 3):
    after = flat(prune_heads(model, keep))
    attn = lambda params: sum(
      v.size for k, v in params.items() if "/attn/" in k and "family_state" not in k
    )
    rest = lambda params: {k: v.shape for k, v in params.items() if "/attn/" not in k}
    assert attn(after) * N == attn(before) * keep
    assert rest(after) == rest(before)


def test_ties_in_usage_keep_the_lower_head_and_explicit_usage_wins():
  np.testing.assert_array_equal(kept_heads([5.0, 7.0, 7.0, 5.0], 2), [1, 2])
  np.testing.assert_array_equal(kept_heads([5.0, 7.0, 5.0, 5.0], 2), [0, 1])
  np.testing.assert_array_equal(kept_heads([0.0, 0.0, 0.0, 0.0], 3), [0, 1, 2])
  model = Transformer(CFG, rngs=nnx.Rngs(2))
  usage = np.zeros((L, N), np.float32)
  usage[:, 2:] = 1.0
  usage[1] = [3.0, 0.0, 0.0, 1.0]
  pruned = prune_heads(model, 2, usage=usage)
  for i, want in enumerate(([2, 3], [0, 3], [2, 3])):
    np.testing.assert_array_equal(
      np.asarray(pruned.blocks[i].attn.out.kernel[...]),
      np.asarray(model.blocks[i].attn.out.kernel[...])[want],
    )


@pytest.mark.parametrize(
  "changes,keep,kw,match",
  [
    ({}, N + 1, {}, "pruning more heads than exist"),
    ({}, 0, {}, "keep=0"),
    (dict(attention=("softmax", "shrp", "shrp")), 2, {}, "layer 0 uses attention family 'softmax'"),
    (dict(num_kv_heads=2), 2, {}, "num_kv_heads=2 != num_heads=4"),
    ({}, 2, dict(usage=[np.zeros(N)] * (L - 1)), "usage has 2 entries for 3 layers"),
    ({}, 2, dict(usage=[np.zeros(N + 1)] * L), r"usage\[0\] has shape \(5,\)"),
  ],
)
def test_bad_requests_raise_naming_the_fix(changes, keep, kw, match):
  cfg = dataclasses.replace(CFG, **changes)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # checks precede copies
  with pytest.raises(ValueError, match=match):
    prune_heads(model, keep, **kw)


def test_pruned_model_still_trains_its_usage():
  model = model_with_dead_heads((3,))
  pruned = prune_heads(model, N - 1)
  count_usage(pruned, tokens(0))
  for old, new in zip(model.blocks, pruned.blocks, strict=True):
    grown = np.asarray(new.attn.family_state["usage"][...])
    assert grown.sum() == np.asarray(old.attn.family_state["usage"][...]).sum() + BATCH * LEN
    assert isinstance(new.attn.family_state["usage"], nn.FamilyState)
    assert jnp.asarray(new.attn.family_state["usage"][...]).dtype == jnp.float32
