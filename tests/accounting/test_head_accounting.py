"""Separate value-head counts (Sigma DiffQKV) and prefill attention FLOPs (SQA), by hand."""

import pytest

from attnzoo.accounting import AttentionSpec, decode_cost
from attnzoo.accounting.decode import attention_flops


def test_separate_value_heads_count_k_and_v_caches_apart():
  # 2 layers, 8 q heads, 2 K heads of width 4, 4 V heads of width 6: 2*4 + 4*6 = 32 per layer.
  spec = AttentionSpec("diff", 2, 8, 2, 4, 6, num_v_heads=4)
  assert spec.value_heads == 4
  assert spec.cached_elements_per_token == 2 * 4 + 4 * 6
  cost = decode_cost(spec, 10)
  assert cost.kv_cache_bytes == 2 * 10 * 32
  assert cost.attention_flops == 2 * 2 * 8 * 10 * (4 + 6)  # FLOPs do not depend on Hk, Hv


def test_value_heads_default_to_kv_heads():
  a = AttentionSpec("gqa", 3, 8, 2, 4, 6)
  b = AttentionSpec("gqa", 3, 8, 2, 4, 6, num_v_heads=2)
  assert a.value_heads == 2
  assert a.cached_elements_per_token == b.cached_elements_per_token == 2 * (4 + 6)


def test_sigma_eq2_reduction():
  # SIGMA-1.5B (32 q, 4 K, 16 V heads, dim 64) vs GQA-16/16: (32 - 20) / 32 = 37.5 %.
  sigma = AttentionSpec("sigma", 26, 32, 4, 64, 64, bytes_per_element=2, num_v_heads=16)
  gqa = AttentionSpec("gqa16", 26, 32, 16, 64, 64, bytes_per_element=2)
  s, g = decode_cost(sigma, 1).kv_cache_bytes, decode_cost(gqa, 1).kv_cache_bytes
  assert (s, g) == (66_560, 106_496)
  assert 1 - s / g == 0.375


def test_attention_flops_by_hand():
  spec = AttentionSpec("mha", 2, 4, 4, 8, 6)
  assert attention_flops(spec, 10) == 2 * 2 * 4 * 10 * 10 * (8 + 6)
  assert attention_flops(spec, 10, kv_len=3) == 2 * 2 * 4 * 10 * 3 * (8 + 6)
  assert attention_flops(spec, 10, causal=True) == 2 * 2 * 4 * 55 * (8 + 6)
  # One decoded token against S cached ones is the prefill count with T = 1.
  assert attention_flops(spec, 1, kv_len=7) == decode_cost(spec, 7).attention_flops


def test_attention_flops_scale_with_query_heads_only():
  mha = AttentionSpec("mha", 8, 16, 16, 16, 16)
  for hq, hkv in ((8, 4), (8, 8), (4, 4), (4, 1)):
    sqa = AttentionSpec("sqa", 8, hq, hkv, 16, 16)
    assert attention_flops(mha, 1024) == attention_flops(sqa, 1024) * (16 // hq)
  assert attention_flops(AttentionSpec("mqa", 8, 16, 1, 16, 16), 1024) == attention_flops(mha, 1024)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(num_v_heads=3), "num_v_heads=3"),
    (dict(num_v_heads=0), "num_v_heads=0"),
    (dict(num_v_heads=4, shared_kv_dim=8), "shared_kv_dim=8"),
  ],
)
def test_bad_value_heads_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    AttentionSpec("x", 1, 8, 2, 8, 8, **kwargs)


@pytest.mark.parametrize(
  "args, kwargs, match",
  [
    ((0,), {}, "seq_len=0"),
    ((4,), {"kv_len": 0}, "kv_len=0"),
    ((4,), {"kv_len": 5, "causal": True}, "kv_len == seq_len"),
  ],
)
def test_bad_lengths_raise(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    attention_flops(AttentionSpec("x", 1, 4, 4, 8, 8), *args, **kwargs)
