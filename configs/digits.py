"""Sequential-image classification of sklearn's 8x8 digits (1,797 images, 17 grey levels).

Each pixel is a token (64 tokens, row-major); a bidirectional encoder mean-pools and
classifies. `neighborhood=w` restricts attention to a w x w 2-D window (Neighborhood
mask on the 8x8 grid; Hassani et al., arXiv 2504.16922), showing the spatial shape
reaching the attention.

    python -m experiments.train --config configs/digits.py:attention=softmax \
        --workdir /tmp/az/digits
    python -m experiments.train --config configs/digits.py:attention=softmax,neighborhood=3 ...

Arguments: attention, neighborhood (0 = global), smoke.
Expected: test accuracy > 90% after 1,000 steps (~3 min on 2 CPU cores; not measured
yet). smoke: ~10 s.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, attention="softmax", neighborhood=0, smoke=False)
  c = common.base(arg.attention)
  c.data.name = "digits"
  c.data.seed = 0
  c.model.dim = 64
  c.model.num_layers = 2
  c.model.position = "learned"
  if arg.neighborhood:
    common.set_mask(c, "neighborhood", window=arg.neighborhood)
  c.train.steps = 1000
  c.train.batch_size = 64
  c.eval.every = 250
  c.eval.batches = 6
  c.checkpoint.every = 250
  if arg.smoke:
    common.smoke(c)
  return common.lock(c)
