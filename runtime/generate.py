"""tokopt's decode loop: prefill, then one token per step with a KV cache, on any engine.

Read top to bottom: ``decode`` runs a ``GenerationRequest`` (``runtime.request``): ``prefill`` the prompt, then
per step ``choose_tokens`` (greedy or sampled with ``runtime.sampling``), ``emit_step`` (which stops rows on
EOS, stop strings or the token budget) and ``decode_one_token``; ``finish`` pads finished rows. ``generate``
builds the request from keyword arguments. The return value is shaped like Hugging Face ``generate``'s (prompt
followed by new tokens, finished rows padded), so greedy output can be compared token for token.

The set-up and tear-down phases live in ``runtime.request`` (shared with the speculative, cautious and
expert-parallel loops); ``prefill``, ``prefill_rows``, ``decode_one_token``, ``prompt_inputs``,
``check_prompt``, ``check_interventions`` and ``GenerationResult`` are importable from here as before.

Example::

    result = generate(engine, ids, max_new_tokens=32)
    print(tokenizer.decode(result.sequences[0]))
"""

from __future__ import annotations

from tokopt.runtime.request import (Clock, GenerationRequest, GenerationResult, Rows, check_interventions,
                                    check_prompt, choose_tokens, complete_tails, decode_one_token, emit_step, finish,
                                    prefill, prefill_rows, prompt_inputs)
from tokopt.runtime.sampling import SamplingParams

__all__ = ["GenerationResult", "check_interventions", "check_prompt", "decode", "decode_one_token", "generate",
           "prefill", "prefill_rows", "prompt_inputs"]


def decode(engine, request: GenerationRequest) -> GenerationResult:
    """Plain decoding of ``request``: one forward per generated token (see module docstring).

    Example::

        request = GenerationRequest.create(ids, mask, spec=engine.spec, max_new_tokens=16, eos_token_ids=[2])
        result = decode(engine, request)
    """
    clock = Clock()
    out, cache = prefill(engine, request.input_ids, request.prompt_valid)
    clock.prefilled()
    rows = Rows(request, out.extras)
    generator = request.sampling.generator()
    positions = request.prompt_lengths()
    forwards = 1
    for step in range(request.max_new_tokens):
        token = choose_tokens(request, rows, out.logits[:, -1], generator, positions, step)
        emitted = emit_step(request, rows, out, token)
        if rows.done:
            break
        out, cache = decode_one_token(engine, cache, token, positions)
        for b in emitted:  # this forward's input in those rows is their last token
            rows.set_tail(b, out.extras, -1)
        positions = positions + 1
        forwards += 1
    forwards += complete_tails(engine, cache, rows, positions)
    return finish(request, rows, clock, forwards)


def generate(engine, input_ids, attention_mask=None, *, max_new_tokens=64, sampling=SamplingParams(),
             eos_token_ids=(), pad_token_id=None, stop_strings=(), tokenizer=None,
             token_stats: bool = False, interventions=None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per row (see module docstring and ``GenerationRequest.create``).
    ``token_stats``: also record the chosen token's log-probability and the processed distribution's uncertainty
    (runtime.token_uncertainty). ``interventions``: ``{step: token}`` (or a token per row, None = keep) forced at
    that generated step; with ``sampling.gumbel_seed`` the steps before are unchanged and the rest is the
    counterfactual continuation under the same noise.

    Example::

        result = generate(engine, ids, mask, max_new_tokens=32, eos_token_ids=[2], stop_strings=["\\n\\n"],
                          tokenizer=tokenizer)
        result.sequences, result.generated_counts
    """
    return decode(engine, GenerationRequest.create(
        input_ids, attention_mask, spec=engine.spec, max_new_tokens=max_new_tokens, sampling=sampling,
        eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, stop_strings=stop_strings, tokenizer=tokenizer,
        token_stats=token_stats, interventions=interventions))
