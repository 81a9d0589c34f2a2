"""The runtime (layer: above the passes, below export): what runs a captured graph and decodes with it.

- ``engine.py``: the ``Engine`` protocol; ``eager_engine.py`` (PyTorch), ``ort_engine.py`` (ONNX Runtime);
- decode loops: ``generate.py`` (plain), ``speculative/`` (tree speculation: methods, drafters, verify, decode),
  ``cautious.py`` (CNTP), ``distributed/`` (expert-parallel ranks); ``request.py`` holds what a call asks for;
- ``sampling.py``, ``logprobs.py``, ``gumbel.py``, ``token_uncertainty.py``: sampling and per-token statistics;
- ``prompts.py`` (chat template, left padding), ``artifacts.py`` (trained PPD embeddings, SpecDec++ heads).

Example::

    from tokopt.runtime.generate import generate
    result = generate(engine, input_ids, max_new_tokens=32)
"""
