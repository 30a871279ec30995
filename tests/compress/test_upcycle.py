"""Upcycling dense checkpoints into a BAM mixture (arXiv 2408.08274 §4; architecture.md §12.3).

Sources are written with the trainer's own checkpoint code (`attnzoo.training.checkpoints`).
Which equalities hold (see `attnzoo.compress.upcycle`): attention-only upcycling reproduces the
dense model; with a top-1 MoE FFN of copies the FFN is scaled by p_max, which a zero router
makes exactly 1/E.
"""

import dataclasses
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnzoo.compress import upcycle
from attnzoo.models import ModelConfig, Transformer
from attnzoo.training import builders, checkpoints
from tests.tolerances import assert_close

DENSE = ModelConfig(
  task="lm",
  vocab_size=13,
  input_len=8,
  dim=16,
  num_layers=1,
  num_heads=2,
  block="parallel",
  knobs=(("softmax", (("implementation", "xla"),)),),
)


def mixture(mlp="moe", num_experts=2, share_kv=False, **kw):
  knobs = (("num_experts", num_experts), ("share_kv", share_kv), ("implementation", "xla"))
  return dataclasses.replace(
    DENSE, attention=("bam",), knobs=(("bam", knobs),), mlp=mlp, num_experts=num_experts, **kw
  )


def save(model: Transformer, workdir: str, step: int = 5) -> str:
  """A checkpoint exactly as the trainer writes it: nnx.state((model, optimizer)) + meta."""
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
  state = nnx.state((model, optimizer))
  meta = dict(model=builders.model_meta(model.cfg), shapes=checkpoints.state_shapes(state))
  ckpt = checkpoints.Checkpointer(workdir, max_to_keep=2, async_save=False)
  ckpt.save(step, state, dict(meta, step=step))
  ckpt.close()
  return workdir


def tree_hash(directory: str) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
  model = Transformer(DENSE, rngs=nnx.Rngs(params=0))
  return model, save(model, str(tmp_path_factory.mktemp("dense")))


def tokens(seed=0):
  return jax.random.randint(jax.random.key(seed), (2, DENSE.input_len), 0, DENSE.vocab_size)


def params(model):
  return {
    "/".join(map(str, p)): np.asarray(v.get_value())
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def test_attention_upcycle_from_a_checkpoint_equals_the_dense_model(dense):
  model, workdir = dense
  before = tree_hash(workdir)
  up = upcycle(workdir, mixture(mlp="gated"))  # random attention router, as the paper
  assert float(jnp.abs(up.blocks[0].attn.family_params["w_router"][...]).max()) > 0
  assert_close(up(tokens()), model(tokens()))
  assert tree_hash(workdir) == before  # the source directory is never written


def test_kv_sharing_upcycle_equals_the_dense_model(dense):
  model, _ = dense
  up = upcycle(model, mixture(mlp="gated", num_experts=3, share_kv=True))
  assert up.blocks[0].attn.key.kernel[...].shape == model.blocks[0].attn.key.kernel[...].shape
  assert_close(up(tokens(1)), model(tokens(1)))


def test_moe_upcycle_is_the_dense_model_with_ffn_scaled_by_p(dense):
  model, workdir = dense
  before = tree_hash(workdir)
  up = upcycle(workdir, mixture(), router_init="zeros")
  # Zero routers: attention gates 1/E (sum 1: exact MHA); top-1 FFN gives p = 1/E times FFN.
  scaled = Transformer(DENSE, rngs=nnx.Rngs(params=0))
  nnx.update(scaled, nnx.state(model))
  for block in scaled.blocks:
    block.mlp.down.kernel[...] = block.mlp.down.kernel[...] / 2
  assert_close(up(tokens(2)), scaled(tokens(2)))
  # With the paper's random FFN router the factor is p_max(x) instead: not the dense model.
  random_router = upcycle(workdir, mixture())
  assert np.abs(np.asarray(random_router(tokens(2)) - model(tokens(2)))).max() > 1e-3
  assert tree_hash(workdir) == before


def test_identical_sources_average_to_the_originals(dense, tmp_path):
  model, workdir = dense
  second = save(model, str(tmp_path / "copy"), step=7)
  up = upcycle([workdir, second, model], mixture(num_experts=3))
  want, got = params(model), params(up)
  for path in ("embed/embedding", "final_norm/scale", "head/kernel", "head/bias"):
    np.testing.assert_array_equal(got[path], want[path])
  for i in range(DENSE.num_layers):
    np.testing.assert_array_equal(
      got[f"blocks/{i}/attn_norm/scale"], want[f"blocks/{i}/attn_norm/scale"]
    )
    for e in range(3):
      np.testing.assert_array_equal(got[f"blocks/{i}/mlp/up"][e], want[f"blocks/{i}/mlp/up/kernel"])


def test_distinct_sources_fill_their_own_experts(dense):
  model, _ = dense
  other = Transformer(DENSE, rngs=nnx.Rngs(params=1))
  up = upcycle([model, other], mixture())
  got = params(up)
  N = DENSE.num_heads
  for e, src in enumerate((params(model), params(other))):
    q = got["blocks/0/attn/query/kernel"][:, e * N : (e + 1) * N]
    np.testing.assert_array_equal(q, src["blocks/0/attn/query/kernel"])
    np.testing.assert_array_equal(got["blocks/0/mlp/down"][e], src["blocks/0/mlp/down/kernel"])
  mean = (params(model)["embed/embedding"] + params(other)["embed/embedding"]) / 2
  assert_close(got["embed/embedding"], mean)


def test_bad_sources_raise_clear_errors(dense, tmp_path):
  model, workdir = dense
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    upcycle(str(tmp_path / "missing"), mixture())
  corrupt = str(tmp_path / "corrupt")
  save(model, corrupt)
  for root, _, files in os.walk(os.path.join(corrupt, "checkpoints", "5", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(ValueError, match="cannot be read"):
    upcycle(corrupt, mixture())
  mismatch = r"blocks/0/mlp/down/kernel has shape \(48, 16\), the mixture expects \(32, 16\)"
  with pytest.raises(ValueError, match=mismatch + r".*mlp_dim: dense=48 mixture=32"):
    upcycle(workdir, mixture(mlp_dim=32))
  sequential = Transformer(dataclasses.replace(DENSE, block="sequential"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"mlp_norm/scale.*no place in the mixture.*block: "):
    upcycle(sequential, mixture())
  with pytest.raises(ValueError, match="2 dense sources for 3"):
    upcycle([model, model], mixture(num_experts=3))
