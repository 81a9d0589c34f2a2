"""tokopt: a compiler-style graph optimizer and runtime for LLM inference.

Example::

    import tokopt
    model, tokenizer = tokopt.load()          # SmolLM2-135M-Instruct, offline after the first fetch
    opt = tokopt.optimize(model)
    print(opt.report)
    out = opt.generate(tokenizer("Hello", return_tensors="pt").input_ids, max_new_tokens=16)
"""

__version__ = "0.1.0"

from tokopt.errors import TokoptError  # noqa: E402
from tokopt.models import load  # noqa: E402
from tokopt.optimize import OptimizeConfig, optimize  # noqa: E402
from tokopt.speculative import SpeculativeConfig  # noqa: E402


def load_engine(path, *, speculative=None):
    """Load an exported engine directory (``tokopt export``) as an ``OptimizedModel``; see tokopt.engine_dir."""
    from tokopt.engine_dir import load_engine as _load_engine

    return _load_engine(path, speculative=speculative)


__all__ = ["load", "optimize", "OptimizeConfig", "SpeculativeConfig", "load_engine", "TokoptError", "__version__"]
