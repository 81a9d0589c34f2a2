"""What ``tokopt.optimize`` and ``tokopt.load_engine`` return: an engine plus HF-shaped ``generate``.

Example::

    opt = tokopt.optimize(model)
    out = opt.generate(input_ids, max_new_tokens=32)         # [B, T + new], like HF generate
    print(opt.report)
    opt.last_result.taps["entropy"]                           # per generated token, from the graph
"""

from __future__ import annotations

import torch

from tokopt.errors import PromptError, TokoptError
from tokopt.passes.manager import Report
from tokopt.runtime.cautious import cautious_decode
from tokopt.runtime.generate import decode
from tokopt.runtime.request import GenerationDefaults, GenerationRequest
from tokopt.runtime.sampling import SamplingParams
from tokopt.runtime.speculative.decode import speculative_decode
from tokopt.runtime.speculative.methods import build_drafter, SpeculativeConfig
from tokopt.runtime.token_uncertainty import token_records
from tokopt.uncertainty.estimators import DEFAULT_ESTIMATORS, score_sequence, ScoringContext


class OptimizedModel:
    """An engine (eager GraphModule, ONNX Runtime, ...) with tokopt's decode loop behind ``generate``."""

    def __init__(self, engine, *, defaults: GenerationDefaults, tokenizer=None, report: Report | None = None,
                 config=None, graph_module=None, model=None, model_key: str = "", speculative=None,
                 uncertainty: bool = False, manifest: dict | None = None):
        self.engine = engine
        self.uncertainty = uncertainty  # record per-token uncertainty (needs the logit_taps pass in the graph)
        self.defaults = defaults
        self.tokenizer = tokenizer
        self.report = report or Report()
        self.config = config
        self.graph_module = graph_module
        self.model = model  # the PyTorch model, where there is one (draft-model methods use it)
        self.model_key = model_key  # identifies model + graph for cached measurements
        self.manifest = manifest  # the engine directory's manifest, for a model loaded from one
        self.last_result = None
        self.speculative = None
        self.drafter = None
        if speculative is not None:
            self._set_speculative(speculative)

    def _set_speculative(self, speculative) -> None:
        self.speculative = SpeculativeConfig.coerce(speculative)
        self.drafter = build_drafter(self.speculative, engine=self.engine, target_model=self.model,
                                     tokenizer=self.tokenizer, model_key=self.model_key)

    def with_speculative(self, speculative) -> "OptimizedModel":
        """The same engine (no re-capture) decoding with another speculative method (None: plain).

        Example::

            lookup = opt.with_speculative("lookup")
        """
        clone = OptimizedModel(self.engine, defaults=self.defaults, tokenizer=self.tokenizer, report=self.report,
                               config=self.config, graph_module=self.graph_module, model=self.model,
                               model_key=self.model_key, speculative=speculative, uncertainty=self.uncertainty,
                               manifest=self.manifest)
        return clone

    @property
    def last_stats(self):
        """The last speculative ``generate``'s ``SpeculativeStats`` (per-step accepted lengths, ``mat``)."""
        return None if self.last_result is None else self.last_result.stats

    @property
    def last_uncertainty(self) -> list[list[dict]] | None:
        """Per sequence of the last ``generate``, one record per generated token (``uncertainty=True``):
        ``token``, raw ``entropy``, ``logprob``, ``max_prob``, ``margin``, ``self_certainty``, ``typicality``
        (|-logprob - entropy|), ``topk`` [(id, logprob)] x 20, and ``entropy_processed``,
        ``logprob_processed``, ``max_prob_processed`` (after temperature/top-k/top-p; = raw when greedy).

        Example::

            opt = tokopt.optimize(model, uncertainty=True); opt.generate(ids, max_new_tokens=8)
            [round(r["entropy"], 2) for r in opt.last_uncertainty[0]]
        """
        if self.last_result is None or not self.uncertainty:
            return None

        return token_records(self.last_result)

    def generate_cautious(self, input_ids, *, max_new_tokens: int = 64, n_max: int = 40, max_trial_tokens: int = 16,
                          temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, seed: int | None = None,
                          eos_token_id=None) -> torch.Tensor:
        """Cautious Next Token Prediction (``runtime.cautious``): where the model is unsure, sample up to
        ``n_max`` continuations to the next punctuation as branches over one shared prefix KV cache and keep the
        most confident; returns ``[1, T + new]`` ids (batch 1). Per-step trials: ``self.last_result.stats``.

        Example::

            out = opt.generate_cautious(ids, max_new_tokens=48, seed=0)
            opt.last_result.stats.trials          # e.g. [1, 1, 12, 1, 40, ...]
        """
        if self.tokenizer is None:
            raise TokoptError("generate_cautious needs the tokenizer (trials end at punctuation tokens)")
        request = GenerationRequest.create(
            input_ids, spec=self.spec, max_new_tokens=max_new_tokens, tokenizer=self.tokenizer,
            sampling=SamplingParams(True, temperature, top_k, top_p, seed),
            eos_token_ids=self.defaults.eos_token_ids if eos_token_id is None else eos_token_id)
        result = cautious_decode(self.engine, request, n_max=n_max, max_trial_tokens=max_trial_tokens, seed=seed)
        self.last_result = result
        return result.sequences

    def sequence_uncertainty(self, estimators=None, *, answer_spans=None, **context) -> list[dict]:
        """Per row of the last ``generate`` (``uncertainty=True``), sequence scores by estimator name (higher =
        more uncertain; see ``tokopt.uncertainty.estimators``). The prompt, tokenizer and PyTorch model are filled
        in; ``context`` overrides ``ScoringContext`` fields (e.g. ``rauq_alpha``, ``nli``); ``answer_spans``: per
        row, the answer's (start, end) in the generated tokens (UQAC).

        Example::

            opt = tokopt.optimize(model, uncertainty=True); opt.generate(ids, max_new_tokens=16)
            opt.sequence_uncertainty(("msp", "rauq", "ccp"))   # [{'msp': -0.31, 'rauq': 1.2, 'ccp': -0.5}]
        """

        records = self.last_uncertainty
        if records is None:
            raise TokoptError("no uncertainty records: create the model with uncertainty=True and call generate "
                              "first")
        ids, mask = self._last_prompt
        ids = ids[None] if ids.dim() == 1 else ids
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        scores = []
        for b, rows in enumerate(records):
            prompt = ids[b][valid[b]]
            ctx = ScoringContext(**{"tokenizer": self.tokenizer, "model": self.model, "prompt_ids": prompt,
                                    "prompt_text": self.tokenizer.decode(prompt.tolist()) if self.tokenizer else "",
                                    "answer_span": answer_spans[b] if answer_spans else None, **context})
            scores.append(score_sequence(rows, estimators or DEFAULT_ESTIMATORS, ctx))
        return scores

    @property
    def spec(self):
        return self.engine.spec

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, seed: int | None = None,
                 stop_strings=None, tokenizer=None, eos_token_id=None, pad_token_id=None, typical_p: float = 1.0,
                 gumbel_seed: int | None = None, interventions: dict | None = None) -> torch.Tensor:
        """Generate like HF ``generate``: returns ``[B, T + new]`` ids (prompt, then new tokens, padded).

        ``input_ids`` is ``[B, T]`` (left-padded, with ``attention_mask``) or ``[T]``. Greedy unless
        ``do_sample``; ``seed`` makes sampling repeatable. ``typical_p`` < 1: Locally Typical Sampling.
        ``gumbel_seed``: counterfactual sampling (Gumbel-max with noise keyed on row and position: a replay with
        the same seed gives the same tokens, also under speculative decoding). ``interventions``: ``{step: token}``
        (or one token per row, None = keep) forced at those generated steps — with ``gumbel_seed``, a
        counterfactual: the tokens before are unchanged, the rest follows the same noise (plain decoding runs
        these calls; speculative decoding would give the same tokens). Details: ``self.last_result``.

        Example::

            base = opt.generate(ids, do_sample=True, gumbel_seed=7, max_new_tokens=20)
            what_if = opt.generate(ids, do_sample=True, gumbel_seed=7, max_new_tokens=20, interventions={5: tok_id})
        """
        if isinstance(input_ids, str):
            raise PromptError("generate() takes token ids; use tokopt.runtime.prompts.encode_prompts(tokenizer, "
                              "[text]) or the CLI `tokopt generate \"PROMPT\"` for text")
        request = GenerationRequest.create(
            input_ids, attention_mask, spec=self.spec, max_new_tokens=max_new_tokens,
            sampling=SamplingParams(do_sample, temperature, top_k, top_p, seed, typical_p, gumbel_seed),
            eos_token_ids=self.defaults.eos_token_ids if eos_token_id is None else eos_token_id,
            pad_token_id=self.defaults.pad_token_id if pad_token_id is None else pad_token_id,
            stop_strings=stop_strings or (), tokenizer=tokenizer or self.tokenizer, token_stats=self.uncertainty,
            interventions=interventions)
        if request.interventions or self.drafter is None:
            result = decode(self.engine, request)
        else:
            result = speculative_decode(self.engine, request, self.drafter)
        self.last_result = result
        self._last_prompt = (torch.as_tensor(input_ids), attention_mask)
        return result.sequences

    def __repr__(self) -> str:
        spec = f", speculative={self.speculative.method}" if self.speculative else ""
        return f"OptimizedModel(engine={self.engine.name}, model_type={self.spec.model_type}{spec})"
