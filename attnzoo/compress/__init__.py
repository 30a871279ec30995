"""Parameter surgery on built models: head pruning (SHRP) and upcycling dense checkpoints into
mixtures (BAM). Sits above `attnzoo.models` (it builds models) and below `training`."""

from attnzoo.compress.prune import prune_heads
from attnzoo.compress.upcycle import upcycle

__all__ = ["prune_heads", "upcycle"]
