"""tokopt: a compiler-style graph optimizer and runtime for LLM inference.

Importing ``tokopt`` is cheap: the public names below load their modules on first use, so importing a runtime
module (``tokopt.runtime.generate``) does not import the API, the estimators or the CLI.

Example::

    import tokopt
    model, tokenizer = tokopt.load()          # SmolLM2-135M-Instruct, offline after the first fetch
    opt = tokopt.optimize(model)
    print(opt.report)
    out = opt.generate(tokenizer("Hello", return_tensors="pt").input_ids, max_new_tokens=16)
"""

from __future__ import annotations

import importlib

from tokopt.errors import TokoptError
from tokopt.version import __version__

# public name -> the module that defines it (imported on first access)
_PUBLIC = {
    "load": "tokopt.models.loading",
    "optimize": "tokopt.api.optimize",
    "OptimizeConfig": "tokopt.api.optimize",
    "OptimizedModel": "tokopt.api.optimized_model",
    "load_engine": "tokopt.api.engines",
    "place": "tokopt.api.expert_parallel",
    "ep_generate": "tokopt.api.expert_parallel",
    # speculative decoding: one config per method (tokopt.runtime.speculative.configs), all served by the module
    # holding the method registry so that a config got here always has its drafter builder registered
    "SpeculativeConfig": "tokopt.runtime.speculative.methods",
    "RecyclingConfig": "tokopt.runtime.speculative.methods",
    "RecyclingEntropyConfig": "tokopt.runtime.speculative.methods",
    "LookupConfig": "tokopt.runtime.speculative.methods",
    "DraftConfig": "tokopt.runtime.speculative.methods",
    "DySpecConfig": "tokopt.runtime.speculative.methods",
    "RSDConfig": "tokopt.runtime.speculative.methods",
    "SpecDecConfig": "tokopt.runtime.speculative.methods",
    "PPDConfig": "tokopt.runtime.speculative.methods",
    "PPDRecyclingConfig": "tokopt.runtime.speculative.methods",
    "register_method": "tokopt.runtime.speculative.methods",
}

__all__ = ["TokoptError", "__version__", *_PUBLIC]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'tokopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
