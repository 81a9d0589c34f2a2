"""The public API (layer: above every library layer, below the leaves: CLI, bench, training).

``optimize.py`` (``tokopt.optimize``, ``OptimizeConfig``), ``optimized_model.py`` (``OptimizedModel``: an engine
plus HF-shaped ``generate``), ``engines.py`` (``tokopt.load_engine``), ``expert_parallel.py`` (``tokopt.place``,
``tokopt.ep_generate``). ``tokopt/__init__.py`` re-exports these names lazily.

Example::

    import tokopt
    opt = tokopt.optimize(model, speculative="recycling")
"""
