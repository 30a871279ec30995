"""BAM's model pieces (arXiv 2408.08274 §3; architecture.md §12): the parallel block, the MoE
FFN inside the stack (its losses through the aux channel), config checks, a smoke-train of the
whole BAM model and the Table 7/9 counts of the built models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnzoo import nn, training
from attnzoo.models import ModelConfig, Transformer
from tests.tolerances import assert_close

BAM = ModelConfig(
  task="lm",
  vocab_size=11,
  input_len=6,
  dim=16,
  num_layers=2,
  num_heads=2,
  mlp_dim=24,
  attention=("bam",),
  knobs=(("bam", (("implementation", "xla"),)),),
  mlp="moe",
  num_experts=3,
  block="parallel",
)


def tokens(seed=0):
  return jax.random.randint(jax.random.key(seed), (2, BAM.input_len), 0, BAM.vocab_size)


def test_parallel_block_adds_both_branches_of_one_shared_norm():
  model = Transformer(BAM, rngs=nnx.Rngs(0))
  block = model.blocks[0]
  assert block.mlp_norm is None and isinstance(block.mlp, nn.MoEFFN)
  x = jax.random.normal(jax.random.key(1), (2, BAM.input_len, BAM.dim))
  positions = jnp.broadcast_to(jnp.arange(BAM.input_len), (2, BAM.input_len))
  valid = jnp.ones((2, BAM.input_len), bool)
  n = block.attn_norm(x)
  want = x + block.attn(n, positions, valid) + block.mlp(n, valid)
  assert_close(block(x, positions, valid, deterministic=True, rngs=None), want)
  sequential = Transformer(dataclasses.replace(BAM, block="sequential"), rngs=nnx.Rngs(0))
  assert sequential.blocks[0].mlp_norm is not None


def test_moe_and_attention_losses_flow_through_run_with_aux():
  weights = (("attn_router_z", 0.25), ("moe_balance", 0.5), ("router_z", 0.125))
  model = Transformer(dataclasses.replace(BAM, aux_weights=weights), rngs=nnx.Rngs(0))
  logits, aux = nn.run_with_aux(model, tokens())
  assert logits.shape == (2, BAM.input_len, BAM.vocab_size)
  m = aux.metrics
  assert {"aux/moe_balance", "aux/router_z", "aux/attn_router_z", "moe_max_load"} <= set(m)
  # Metrics are means over the L layers; the loss sums the weighted values over them.
  want = BAM.num_layers * (
    0.25 * m["aux/attn_router_z"] + 0.5 * m["aux/moe_balance"] + 0.125 * m["aux/router_z"]
  )
  np.testing.assert_allclose(aux.loss, want, rtol=1e-5)


@pytest.mark.parametrize(
  "changes, match",
  [
    (dict(mlp="moe", num_experts=0), "num_experts=0; set model.num_experts"),
    (dict(mlp="moe", num_experts=2, moe_top_k=3), "moe_top_k=3, num_experts=2"),
    (dict(block="residual"), "block='residual' is not one of"),
    (dict(mlp="switch"), "mlp='switch' is not one of"),
  ],
)
def test_bad_moe_and_block_settings_name_the_value(changes, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(BAM, **changes)


def test_bam_model_with_parallel_moe_blocks_smoke_trains(tmp_path):
  from tests.training.test_train import smoke_config  # noqa: PLC0415

  config = smoke_config(arg="smoke,attention=bam")
  config.model.mlp = "moe"
  config.model.num_experts = 2
  config.model.block = "parallel"
  config.model.aux_weights.moe_balance = 0.1
  metrics = training.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(metrics["loss"])
  rows = training.read_metrics(str(tmp_path), "train")
  assert len(rows) == 6
  for r in rows:
    want = 2 * (0.1 * r["aux/moe_balance"] + 0.001 * r["aux/router_z"])
    want += 2 * 0.001 * r["aux/attn_router_z"]
    np.testing.assert_allclose(r["aux_loss"], want, rtol=1e-5)


def test_bam_small_scale_tables_match_the_paper(tmp_path):
  from experiments.tables import bam_params  # noqa: PLC0415

  summary = bam_params.run(str(tmp_path), "quick")
  assert summary.startswith("bam_params: 11/11"), summary
  assert (tmp_path / "bam_params.md").read_text().count("✓") == 11
