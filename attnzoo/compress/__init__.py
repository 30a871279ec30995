"""Parameter surgery on built models: head pruning (SHRP) and upcycling dense checkpoints into
mixtures (BAM). Sits above `attnzoo.models` (it builds models) and below `training`."""
