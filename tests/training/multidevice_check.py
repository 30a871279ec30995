"""Run under 8 virtual CPU devices (see test_sharding.py): one train step on several meshes
gives the same loss, gradients and updated parameters as on one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.training.multidevice_check
"""

import functools
import sys

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from attnzoo.training import builders, sharding, steps  # noqa: E402
from attnzoo.training.train import build_state  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

MESHES = {
  "data": dict(data=8),
  "fsdp": dict(data=2, fsdp=4),
  "tensor": dict(fsdp=2, tensor=4),
  "sequence": dict(data=2, sequence=4),
}
# mesh axes that must appear in some param / optimizer-state PartitionSpec
EXPECTED_PARAM_AXES = {
  "data": set(),
  "fsdp": {"fsdp"},
  "tensor": {"fsdp", "tensor"},
  "sequence": set(),
}


def config():
  from configs import lm_bytes  # noqa: PLC0415

  c = lm_bytes.get_config("smoke")
  c.model.knobs.softmax.implementation = "xla"
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.dim = 32
  c.data.seq_len = 16
  c.train.batch_size = 8
  return c


def run(c, mesh):
  ds = builders.dataset(c)
  cfg = builders.model_config(c, ds)
  graphdef, _, shardings, init = build_state(c, cfg, mesh)
  state = init()
  raw = ds.batch(0, c.train.batch_size)
  bsh = sharding.batch_shardings(raw, mesh)
  batch = {k: jax.device_put(raw[k], bsh[k]) for k in ("inputs", "targets", "weights")}

  def loss_and_grads(state, batch):
    model, _ = nnx.merge(graphdef, state)

    def loss_fn(model):
      s = steps.metric_sums(model(batch["inputs"]), batch)
      return s["loss_sum"] / s["weight_sum"]

    return nnx.value_and_grad(loss_fn)(model)

  loss, grads = jax.jit(loss_and_grads)(state, batch)
  step = jax.jit(
    functools.partial(steps.train_step, graphdef, seed=0), out_shardings=(shardings, None)
  )
  new_state, metrics = step(state, batch, jnp.int32(0))
  params = nnx.state(nnx.merge(graphdef, new_state)[0], nnx.Param)
  specs = {str(s.spec) for s in jax.tree.leaves(shardings)}
  return (
    float(loss),
    jax.device_get(nnx.to_pure_dict(grads)),
    jax.device_get(nnx.to_pure_dict(params)),
    float(metrics["loss"]),
    specs,
  )


def main():
  assert jax.device_count() == 8, f"needs 8 devices, got {jax.device_count()}"
  c = config()
  one = sharding.make_mesh(dict(data=1), devices=jax.devices()[:1])
  with jax.set_mesh(one):
    ref_loss, ref_grads, ref_params, ref_step_loss, _ = run(c, one)
  failed = False
  for name in sys.argv[1:] or list(MESHES):
    try:
      check(name, ref_loss, ref_grads, ref_params, ref_step_loss)
    except Exception as e:  # noqa: BLE001 (report every mesh, then fail)
      failed = True
      print(f"FAIL {name}: {type(e).__name__}: {e}")
  sys.exit(1 if failed else 0)


def check(name, ref_loss, ref_grads, ref_params, ref_step_loss):
  c = config()
  for axis, size in MESHES[name].items():
    c.mesh[axis] = size
  if name == "sequence":
    # Automatic choice under a sequence-sharded mesh is the softmax family's "ring"
    # implementation (read from the mesh context); check that it is the one that runs.
    c.model.knobs.softmax.implementation = None
  mesh = sharding.make_mesh(c.mesh.to_dict())
  with jax.set_mesh(mesh):
    loss, grads, params, step_loss, specs = run(c, mesh)
  assert_close(loss, ref_loss, err_msg=name)
  assert_close(step_loss, ref_step_loss, err_msg=name)
  jax.tree.map(
    lambda a, b: assert_close(a, b, grad=True, err_msg=f"{name} grads"), grads, ref_grads
  )
  jax.tree.map(
    lambda a, b: assert_close(a, b, grad=True, err_msg=f"{name} params"), params, ref_params
  )
  sharded = sorted(s for s in specs if any(a in s for a in sharding.MESH_AXES))
  for axis in EXPECTED_PARAM_AXES[name]:
    assert any(axis in s for s in sharded), f"{name}: no param sharded over {axis}: {specs}"
  print(
    f"OK {name}: mesh {dict(mesh.shape)} loss {loss:.6f} (1 device {ref_loss:.6f}); "
    f"param/opt specs {sharded}"
  )


if __name__ == "__main__":
  main()
