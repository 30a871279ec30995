"""A toy family that uses every part of the family contract: the worked example of
WORKSPACE.md's "adding a family" checklist, and the test that the seam needs no other edit.

    out_n = sigmoid(g_n) · softmax(q kᵀ / (√H · r)) v,        r = EMA of the mean key norm

- learned parameter `head_gate` [N] (`Family.params`), initialised at 0 (gate 1/2);
- carried state `key_norm` [] (`Family.state`): an EMA (momentum 0.9) of the batch's mean key
  norm, updated through `Aux.state` after the optimizer step; the logits divide by it, so a
  resume that lost it would not reproduce the run;
- aux loss `gate_l2` = mean(g²) (default weight 0.01, `Family.aux_losses`), and the metric
  `key_norm` (the value the call used).

It is not registered in `attnzoo.attention.FAMILIES`; tests register it with
`monkeypatch.setitem(FAMILIES, "toy", FAMILY)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnzoo.attention import dot_product_attention, registry

MOMENTUM = 0.9


def attention(
  q: Float[Array, "B T N H"],
  k: Float[Array, "B S K H"],
  v: Float[Array, "B S K V"],
  *,
  head_gate: Float[Array, " N"],
  key_norm: Float[Array, ""],
  mask=None,
  is_causal: bool = False,
  implementation: str | None = None,
):
  key_norm_now = jnp.mean(jnp.linalg.norm(k.astype(jnp.float32), axis=-1))
  k_scaled = (k.astype(jnp.float32) / key_norm).astype(k.dtype)
  out = dot_product_attention(
    q, k_scaled, v, mask=mask, is_causal=is_causal, implementation=implementation
  )
  gate_N = jax.nn.sigmoid(head_gate.astype(jnp.float32))
  out = (out.astype(jnp.float32) * gate_N[None, None, :, None]).astype(q.dtype)
  new_norm = MOMENTUM * key_norm + (1 - MOMENTUM) * jax.lax.stop_gradient(key_norm_now)
  aux = registry.Aux(
    losses={"gate_l2": jnp.mean(jnp.square(head_gate))},
    metrics={"key_norm": key_norm},
    state={"key_norm": new_norm},
  )
  return out, aux


FAMILY = registry.Family(
  name="toy",
  attention=attention,
  implementations=("xla", "chunked"),
  returns_aux=True,
  params={"head_gate": registry.ParamSpec(lambda d: (d.N,), doc="per-head output gate logit")},
  state={
    "key_norm": registry.ParamSpec(
      lambda d: (), lambda key, shape, dtype: jnp.ones(shape, dtype), "EMA of the key norm"
    )
  },
  aux_losses={"gate_l2": 0.01},
)
