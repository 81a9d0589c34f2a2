"""``tokopt.optimize``: capture a model's graph, run the configured passes, return a model that generates.

Example::

    model, tokenizer = tokopt.load()
    opt = tokopt.optimize(model)                                   # default passes
    opt = tokopt.optimize(model, OptimizeConfig(passes=()))        # capture only
    print(opt.report)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokopt.api.optimized_model import OptimizedModel
from tokopt.errors import TokoptError
from tokopt.models.capture import capture
from tokopt.models.loading import load, model_fingerprint
from tokopt.models.graph_meta import graph_meta
from tokopt.passes.manager import Report, check_pass_names, run_passes, step_name
from tokopt.passes.quantize_weights import QuantizeWeightsConfig, require_bits
from tokopt.progress import progress_step
from tokopt.runtime.artifacts import load_ppd_artifact
from tokopt.runtime.eager_engine import EagerEngine
from tokopt.runtime.inductor_engine import InductorEngine
from tokopt.runtime.request import GenerationDefaults
from tokopt.runtime.speculative.methods import PPD_METHODS, SpeculativeConfig, add_ppd_slots

DEFAULT_PASSES = ("remove_noop_casts", "entropy_tap")
UNCERTAINTY_PASSES = ("logit_taps", "attention_taps")  # what optimize(uncertainty=True) adds
# small_batch_linear speeds the eager engine's multi-token (verify) steps on CPU but slows ONNX Runtime, and plain
# eager greedy decode (1-token steps, prefill) got 10-20% slower with it (measured: bench/RESULTS.md, end), so it
# stays opt-in: OptimizeConfig(passes=(*DEFAULT_PASSES, "small_batch_linear")).


@dataclass(frozen=True)
class OptimizeConfig:
    """What ``optimize`` does: the ordered passes to run on the captured graph."""

    passes: tuple = DEFAULT_PASSES

    def __post_init__(self):
        if isinstance(self.passes, str):
            raise TokoptError(f"passes must be a sequence of pass names, not the string {self.passes!r}")
        object.__setattr__(self, "passes", tuple(self.passes))
        check_pass_names(self.passes)

    def to_dict(self) -> dict:
        return asdict(self)


ENGINES = ("eager", "inductor")  # optimize(engine=): who runs the optimized graph
QUANTIZE_BITS = {"int8": 8, "int4": 4}  # optimize(quantize=): the quantize_weights pass (eager CPU)


def optimize(model=None, config: OptimizeConfig | None = None, *, speculative=None, uncertainty: bool = False,
             tokenizer=None, quantize: str | None = None, engine: str = "eager") -> OptimizedModel:
    """Capture ``model`` (a loaded supported HF causal LM, a model name/path, or None for the default),
    apply ``config.passes`` in order, and return an ``OptimizedModel`` running the result eagerly.
    ``speculative``: a method name (recycling, recycling-entropy, lookup, draft, dyspec, rsd, specdec++, ppd,
    ppd+recycling) or its config (``tokopt.RecyclingConfig(budget=12)``, ..., or ``SpeculativeConfig(name, ...)``;
    ``tokopt.runtime.speculative.configs``); decoding stays lossless. ``uncertainty``: add the ``logit_taps`` and
    ``attention_taps`` passes and record per-token uncertainty (``opt.last_uncertainty``), also under
    speculative decoding. ``tokenizer``: the model's tokenizer when it is not found beside a loaded model
    (stop strings, text in the CLI, draft calibration). ``quantize``: "int8" or "int4" runs the
    ``quantize_weights`` pass last (weight-only quantized linears, LM head included, eager CPU kernels;
    ``QuantizeWeightsConfig`` in ``OptimizeConfig.passes`` for other settings); such a model does not export to
    ONNX: use ``tokopt export --quantize`` (``export_engine(opt, dir, quantize=...)``) on an unquantized one.
    ``engine``: "eager" (default: the graph run by PyTorch op by op) or "inductor" (the optimized graph compiled
    once by ``torch.compile`` with dynamic shapes, ``runtime/inductor_engine.py``; the first steps compile).

    Example::

        opt = tokopt.optimize(model)
        ids = opt.generate(input_ids, max_new_tokens=32)
        opt = tokopt.optimize(model, speculative="recycling"); opt.generate(input_ids); opt.last_stats.mat
        opt = tokopt.optimize(model, speculative=tokopt.RecyclingConfig(budget=12))
    """
    speculative = SpeculativeConfig.coerce(speculative)  # bad names fail before the 20 s capture
    if engine not in ENGINES:
        raise TokoptError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    quant = None
    if quantize not in (None, "", "none", "fp32"):
        if quantize not in QUANTIZE_BITS:
            raise TokoptError(f"quantize must be one of {', '.join(QUANTIZE_BITS)} (weight-only), got {quantize!r}")
        quant = QuantizeWeightsConfig(bits=QUANTIZE_BITS[quantize])
        require_bits(quant.bits)  # a torch without the kernels fails before the capture, naming the ONNX path
    config = config or OptimizeConfig()
    if uncertainty:  # the taps are what the records are made of
        missing = tuple(p for p in UNCERTAINTY_PASSES if p not in config.passes)
        config = OptimizeConfig(passes=(*config.passes, *missing))
    model, found = load(model)  # a name, a path, or a loaded model (checked, tokenizer found beside it)
    tokenizer = tokenizer if tokenizer is not None else found
    ppd = None
    if speculative is not None and speculative.method in PPD_METHODS:  # trained prompt tokens, in the graph
        ppd = load_ppd_artifact(model)  # no artifact: fails before the capture, naming `tokopt train-ppd`
    with progress_step("capturing the decoder graph with torch.export"):
        gm = capture(model)
    gm, reports = run_passes(gm, [p for p in config.passes if ppd is None or step_name(p) != "ppd_slots"])
    if ppd is not None:
        reports += add_ppd_slots(gm, model, ppd)
    if quant is not None:
        gm, more = run_passes(gm, [quant])
        reports += more
    meta = graph_meta(gm)
    engine = (InductorEngine(gm, meta.spec, meta.output_names) if engine == "inductor"
              else EagerEngine(gm, meta.spec, meta.output_names))
    model_key = "|".join([model_fingerprint(model), *map(step_name, config.passes),
                          *([f"quantize_weights:{quantize}"] if quant is not None else [])])
    return OptimizedModel(engine, defaults=GenerationDefaults.from_model(model), tokenizer=tokenizer,
                          report=Report(reports, meta.capture_s), config=config, graph_module=gm,
                          model=model, model_key=model_key, speculative=speculative, uncertainty=uncertainty)
