"""``tokopt.load_engine``: an exported engine directory as an ``OptimizedModel``.

Example::

    opt = tokopt.load_engine("engines/smollm2", speculative="recycling")
    opt = tokopt.load_engine("engines/smollm2", speculative=tokopt.RecyclingConfig(budget=12))
    out = opt.generate(ids, max_new_tokens=32)       # no PyTorch model needed
"""

from __future__ import annotations

from tokopt.api.optimized_model import OptimizedModel
from tokopt.errors import EngineError, TokoptError
from tokopt.export.engine_dir import get_target, open_engine
from tokopt.models.loading import load
from tokopt.passes.manager import Report
from tokopt.runtime.speculative.methods import DraftModelConfig, SpeculativeConfig


def load_engine(path, *, threads: int | None = None, speculative=None, uncertainty: bool = False,
                model=None) -> OptimizedModel:
    """Load an engine directory (``tokopt export``) as an OptimizedModel (no torch model needed).
    ``speculative`` as in ``tokopt.optimize``: a method name or config (default: the config the engine was
    exported with, if any, read from its manifest; older manifests hold just the method name); draft-model
    methods load the engine's model (by the name in the manifest) for their self-speculative draft, unless
    ``model`` (the loaded PyTorch model) is given.
    ``uncertainty``: record per-token uncertainty (``opt.last_uncertainty``); the engine must have been exported
    with the ``logit_taps`` pass.

    Example::

        opt = tokopt.load_engine("engines/smollm2", speculative="recycling")
        opt = tokopt.load_engine("engines/smollm2", speculative=tokopt.RecyclingConfig(budget=12))
    """
    opened = open_engine(path, threads=threads, uncertainty=uncertainty)
    manifest = opened.manifest
    if speculative is None and manifest.get("speculative"):  # the config the engine was exported for
        try:  # a config's to_dict(), or a bare method name (engines written before configs were recorded)
            speculative = SpeculativeConfig.coerce(manifest["speculative"])
        except TokoptError as exc:
            raise EngineError(f"{opened.path}'s manifest records a speculative config this tokopt cannot read "
                              f"({exc}); pass speculative=... to choose one") from None
    speculative = SpeculativeConfig.coerce(speculative)
    if model is None and isinstance(speculative, DraftModelConfig) and speculative.draft_model is None:
        if not opened.model_name:
            raise EngineError(f"{opened.path} does not name its model, so {speculative.method!r} cannot build the "
                              f"self-speculative draft; pass {type(speculative).__name__}(draft_model=...)")
        model, _ = load(opened.model_name, progress=False)
    key = "|".join([opened.model_name or str(opened.path.resolve()), *manifest.get("passes", []),
                    get_target(manifest["target"], warn=False).name,  # engines written as "ep" are pt2
                    *([f"quantize:{manifest['quantize']['mode']}"] if manifest.get("quantize") else [])])
    return OptimizedModel(opened.engine, defaults=opened.defaults, tokenizer=opened.tokenizer,
                          report=Report(opened.pass_reports, opened.capture_s), model=model, model_key=key,
                          speculative=speculative, uncertainty=uncertainty, manifest=manifest)
