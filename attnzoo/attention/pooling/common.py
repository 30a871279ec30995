"""Masked statistics over tokens shared by the poolings (fp32, padding-safe)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def check_tokens(x_BTD: Array, valid_BT: Array) -> None:
  """ValueError unless x is [B, T, D] and valid is bool [B, T]."""
  if x_BTD.ndim != 3:
    raise ValueError(f"x has shape {x_BTD.shape}; pass token states [B, T, D]")
  if valid_BT.shape != x_BTD.shape[:2] or valid_BT.dtype != jnp.bool_:
    raise ValueError(
      f"valid has shape {valid_BT.shape} and dtype {valid_BT.dtype}; pass bool [B, T] = "
      f"{x_BTD.shape[:2]} (True at real tokens)"
    )


def masked_mean(x_BTD: Float[Array, "B T D"], valid_BT: Bool[Array, "B T"]) -> Float[Array, "B D"]:
  """fp32 mean over the valid tokens; zeros for an example with none."""
  keep_BT1 = valid_BT[..., None].astype(jnp.float32)
  return jnp.sum(x_BTD.astype(jnp.float32) * keep_BT1, axis=1) / jnp.maximum(
    jnp.sum(keep_BT1, axis=1), 1.0
  )


def masked_softmax(
  logits_BMT: Float[Array, "B M T"], valid_BT: Bool[Array, "B T"]
) -> Float[Array, "B M T"]:
  """fp32 softmax over T restricted to the valid tokens: exactly 0 at padding, all zeros (with
  finite gradients) for an example with no valid token."""
  logits_BMT = logits_BMT.astype(jnp.float32)
  valid_B1T = valid_BT[:, None, :]
  row_max_BM1 = jnp.max(jnp.where(valid_B1T, logits_BMT, -jnp.inf), axis=-1, keepdims=True)
  # The shift cancels in the ratio; keeping it out of autodiff and finite (rows with no valid
  # token have max -inf) keeps every gradient finite.
  shift_BM1 = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max_BM1), row_max_BM1, 0.0))
  # Padding logits are replaced by the shift before exp: exp(0) = 1 is then dropped by the
  # outer where, and no overflowing exp ever reaches the backward pass.
  safe_BMT = jnp.where(valid_B1T, logits_BMT, shift_BM1) - shift_BM1
  exp_BMT = jnp.where(valid_B1T, jnp.exp(safe_BMT), 0.0)
  total_BM1 = jnp.sum(exp_BMT, axis=-1, keepdims=True)
  return exp_BMT / jnp.where(total_BM1 > 0, total_BM1, 1.0)
