"""`decode_cost` on tiny specs whose cost is counted by hand."""

import numpy as np
import pytest

from attnzoo.accounting import PRESETS, AttentionSpec, decode_cost


def test_mha_by_hand():
  # 2 layers x 10 tokens x 4 heads x (8 + 8) elements x 2 bytes; FLOPs 2 * 2 * 4 * 10 * 16.
  spec = AttentionSpec(
    "mha",
    num_layers=2,
    num_q_heads=4,
    num_kv_heads=4,
    qk_head_dim=8,
    v_head_dim=8,
    bytes_per_element=2,
  )
  cost = decode_cost(spec, 10)
  assert (cost.kv_cache_bytes, cost.attention_flops) == (2560.0, 2560.0)
  np.testing.assert_allclose(cost.arithmetic_intensity, 1.0)


def test_gqa_divides_cache_by_group_size_and_keeps_flops():
  mha = AttentionSpec("mha", 3, 8, 8, 4, 6)
  gqa = AttentionSpec("gqa", 3, 8, 2, 4, 6)
  a, b = decode_cost(mha, 5), decode_cost(gqa, 5)
  assert b.kv_cache_bytes == 3 * 5 * 2 * (4 + 6) == a.kv_cache_bytes / 4
  assert a.attention_flops == b.attention_flops == 2 * 3 * 8 * 5 * (4 + 6)
  np.testing.assert_allclose(b.arithmetic_intensity, 4 * a.arithmetic_intensity)


def test_shared_latent_cache_counts_the_latent_once():
  # MLA-style: one cached latent of 6 elements serves K (width 6) and V (width 4).
  mla = AttentionSpec(
    "mla", num_layers=1, num_q_heads=4, num_kv_heads=1, qk_head_dim=6, v_head_dim=4, shared_kv_dim=6
  )
  cost = decode_cost(mla, 7)
  assert cost.kv_cache_bytes == 7 * 6
  assert cost.attention_flops == 2 * 4 * 7 * (6 + 4)


def test_cost_is_linear_in_context():
  spec = PRESETS["step3"]
  short, long = decode_cost(spec, 1000), decode_cost(spec, 4000)
  np.testing.assert_allclose(long.kv_cache_bytes, 4 * short.kv_cache_bytes)
  np.testing.assert_allclose(long.attention_flops, 4 * short.attention_flops)
  np.testing.assert_allclose(long.arithmetic_intensity, short.arithmetic_intensity)


def test_effective_rank():
  assert AttentionSpec("x", 1, 64, 1, 256, 256).effective_rank == 64 * 256


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(num_q_heads=6, num_kv_heads=4), "num_q_heads=6"),
    (dict(num_layers=0), "num_layers=0"),
    (dict(bytes_per_element=0), "bytes_per_element=0"),
  ],
)
def test_bad_spec_raises(kwargs, match):
  base = dict(name="x", num_layers=1, num_q_heads=4, num_kv_heads=2, qk_head_dim=8, v_head_dim=8)
  with pytest.raises(ValueError, match=match):
    AttentionSpec(**{**base, **kwargs})


def test_bad_context_raises():
  with pytest.raises(ValueError, match="context_len=0"):
    decode_cost(PRESETS["qwen3_32b"], 0)
