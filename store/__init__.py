"""``influencekit.store``: the HDF5 gradient store (compressed per-layer training gradients).

Not built yet: it is the next issue. Until then, ``influencekit.score`` computes training
gradients on the fly from a ``TextDataset``.
"""
