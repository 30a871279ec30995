"""Content-dependent block sparsity: block maps chosen from the data at run time.

`block_select.py` builds traced `BlockMap`s (top-k / softmax-mass tile selection) that the
softmax implementations and the block-sparse kernel consume.
"""
