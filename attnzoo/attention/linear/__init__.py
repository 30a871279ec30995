"""Linear attention and its feature maps: the `linear` family (`linear.py`) and the
TransNormerLLM pieces (`tnl.py`)."""
