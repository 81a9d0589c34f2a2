"""Training the speculative methods' artifacts (layer: a leaf; only the CLI and bench import it).

``ppd.py``: PPD prompt-token embeddings (``tokopt train-ppd``); ``specdec.py``: the SpecDec++ acceptance head
(``tokopt train-specdec``). What they save is loaded by ``tokopt.runtime.artifacts``, which does not import
training.

Example::

    from tokopt.training.ppd import train_ppd
    result = train_ppd(steps=200)
"""
