"""Dense and masked softmax attention: the `softmax` family and its implementations.

`softmax.py` is the family (dispatch and the readable "xla" reference), `chunked.py` the
flash-style jnp path, `ring.py` the sequence-parallel ring over a device mesh.
"""
