"""The sparse_selection table: MoA's influence from logit gradients equals the definition, the
q/k/v capture sees what each layer's family sees, and a smoke run writes its files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.attention.sparse import moa
from experiments.tables import sparse_selection
from tests.attention.conformance import random_qkv
from tests.tolerances import assert_close


def test_influence_from_logit_gradients_equals_moa_definition():
  q, k, v = random_qkv(0, 2, 12, 12, 2, 2, 8, scale=2.0)
  loss_fn = lambda out: jnp.sum(jnp.sin(out))
  want = moa.profile(q, k, v, loss_fn)  # G = ∂L/∂A by autodiff through A

  T = 12
  causal = jnp.tril(jnp.ones((T, T), bool))[None, None]
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * 8**-0.5

  def loss_of_bias(bias):
    A = jax.nn.softmax(jnp.where(causal, logits + bias, -jnp.inf), axis=-1)
    return loss_fn(jnp.einsum("bnts,bsnv->btnv", A, v))

  g = jax.grad(loss_of_bias)(jnp.zeros((2, 2, T, T)))
  A = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
  got = jnp.where(causal, sparse_selection.influence_from_logit_grads(A, g), 0.0)
  got = got.at[:, :, 0, 0].set(0.0).sum(0)  # row 0 (a lone key, never dropped): see the docstring
  want = want.at[:, 0, 0].set(0.0)
  assert_close(got, want, grad=True)


@pytest.mark.slow
def test_smoke_run_writes_every_file(tmp_path):
  lines = []
  summary = sparse_selection.run(str(tmp_path), "smoke", log=lines.append)
  assert "selectors" in summary
  doc = json.loads((tmp_path / "sparse_selection.json").read_text())
  assert set(doc["results"]) >= {"topk", "mass", "pbs", "dhsa", "moa (planned spans)"}
  for points in doc["results"].values():
    for p in points:
      assert 0.0 < p["recall"] <= 1.0 + 1e-5 and p["error"] >= 0.0 and p["density"] > 0.0
  # More tiles keep more mass: recall grows with top-k.
  topk = sorted(doc["results"]["topk"], key=lambda p: p["knob"])
  assert np.all(np.diff([p["recall"] for p in topk]) >= -1e-6)
  md = (tmp_path / "sparse_selection.md").read_text()
  assert "PBS-Attn" in md and "MoA" in md
