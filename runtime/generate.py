"""tokopt's decode loop: prefill, then one token per step with a KV cache, on any engine.

Read top to bottom: ``prefill`` runs the prompt, ``decode_one_token`` runs one step, ``generate`` loops,
choosing tokens with ``runtime.sampling`` and stopping on EOS, stop strings or the token budget. The
return value is shaped like Hugging Face ``generate``'s (prompt followed by new tokens, finished rows
padded), so greedy output can be compared token for token.

Example::

    result = generate(engine, ids, max_new_tokens=32)
    print(tokenizer.decode(result.sequences[0]))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tokopt.errors import PromptError
from tokopt.runtime.kv_cache import KVCache
from tokopt.runtime.masks import causal_structure, prompt_positions, step_mask
from tokopt.runtime.sampling import SamplingParams, next_token
from tokopt.runtime.token_uncertainty import INPUT_TOKEN_TAPS, chosen_token_stats


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [B, T + new], HF-shaped
    num_prompt_tokens: int
    new_tokens: torch.Tensor  # [B, steps]
    taps: dict = field(default_factory=dict)  # name -> [B, steps], graph outputs added by passes
    prefill_s: float = 0.0
    decode_s: float = 0.0
    forwards: int = 0
    generated_counts: torch.Tensor | None = None  # [B] tokens per row, up to and including its EOS/stop token
    stats: object = None  # speculative decoding: runtime.speculative.decode.SpeculativeStats
    # taps of the row whose INPUT is each row's last generated token (name -> [B, ...]): what describes a token
    # as input (attention_taps' prev_attention) is otherwise only known one forward later
    tail_taps: dict = field(default_factory=dict)


ONE_ROW = torch.tensor([0])


def prefill(engine, input_ids, prompt_valid):
    """Run the whole prompt; return (StepOutput with the last position's logits, cache)."""
    # prompts are left-padded: the last row is every sequence's last token
    return prefill_rows(engine, input_ids, prompt_valid, torch.tensor([input_ids.shape[1] - 1]))


def prefill_rows(engine, input_ids, prompt_valid, logits_rows):
    """Run the whole prompt with logits at ``logits_rows``; return (StepOutput, cache)."""
    batch, n = input_ids.shape
    cache = KVCache.empty(engine.spec, batch)
    mask = step_mask(cache.valid, causal_structure(n, batch), new_valid=prompt_valid, dtype=engine.spec.torch_dtype)
    out = engine(input_ids, prompt_positions(prompt_valid), mask, logits_rows, cache.tensors)
    return out, cache.extend(out.present, prompt_valid)


def decode_one_token(engine, cache, tokens, positions):
    """Feed one token per row at ``positions``; return (StepOutput, cache)."""
    batch = tokens.shape[0]
    ones = torch.ones(batch, 1, dtype=torch.bool)
    mask = step_mask(cache.valid, causal_structure(1, batch), dtype=engine.spec.torch_dtype)
    out = engine(tokens[:, None], positions[:, None], mask, ONE_ROW, cache.tensors)
    return out, cache.extend(out.present, ones)


class StopStrings:
    """Stops a row once its decoded new text contains any of the given strings (as HF's stop_strings)."""

    def __init__(self, strings, tokenizer):
        if strings and tokenizer is None:
            raise PromptError("stop_strings need a tokenizer to decode the generated text; pass tokenizer=...")
        self.strings = [s for s in (strings or []) if s]
        self.tokenizer = tokenizer

    def hit(self, new_tokens: list) -> bool:
        if not self.strings:
            return False
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=False)
        return any(s in text for s in self.strings)


def check_prompt(input_ids, prompt_valid, max_new_tokens, max_positions):
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or not bool(prompt_valid.any(-1).all()):
        raise PromptError("empty prompt: every row of input_ids needs at least one (unpadded) token")
    longest = int(prompt_valid.sum(-1).max())
    if longest + max_new_tokens > max_positions:
        raise PromptError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context window of "
            f"{max_positions} tokens; shorten the prompt or lower max_new_tokens to {max(max_positions - longest, 0)}"
        )


def prompt_inputs(input_ids, attention_mask, max_new_tokens, max_positions):
    """``[B, T]`` ids (a ``[T]`` row is batched) and their validity, checked against the context window."""
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    prompt_valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                    else torch.as_tensor(attention_mask).bool())
    check_prompt(input_ids, prompt_valid, max_new_tokens, max_positions)
    return input_ids, prompt_valid


def check_interventions(interventions, batch: int, max_new_tokens: int, vocab_size: int) -> dict:
    """``{step: token}`` or ``{step: [token or None per row]}`` -> ``{step: [B] tensor, -1 = keep}``, checked."""
    from tokopt.errors import TokoptError

    out = {}
    for step, value in (interventions or {}).items():
        if not isinstance(step, int) or not 0 <= step < max_new_tokens:
            raise TokoptError(f"intervention step {step!r} must be an int in [0, max_new_tokens={max_new_tokens})")
        row_values = [value] * batch if isinstance(value, int) else list(value)
        if len(row_values) != batch:
            raise TokoptError(f"intervention at step {step} gives {len(row_values)} tokens for {batch} rows; give one "
                              "token id for all rows, or one per row (None keeps that row's token)")
        for v in row_values:
            if v is not None and (not isinstance(v, int) or not 0 <= v < vocab_size):
                raise TokoptError(f"intervention token {v!r} at step {step} is not a token id in [0, {vocab_size})")
        out[step] = torch.tensor([-1 if v is None else v for v in row_values], dtype=torch.long)
    return out


def generate(engine, input_ids, attention_mask=None, *, max_new_tokens=64, sampling=SamplingParams(),
             eos_token_ids=(), pad_token_id=None, stop_strings=(), tokenizer=None,
             token_stats: bool = False, interventions=None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per row (see module docstring). ``token_stats``: also record the
    chosen token's log-probability and the processed distribution's uncertainty (runtime.token_uncertainty).
    ``interventions``: ``{step: token}`` (or a token per row, None = keep) forced at that generated step; with
    ``sampling.gumbel_seed`` the steps before are unchanged and the rest is the counterfactual continuation under
    the same noise."""
    input_ids, prompt_valid = prompt_inputs(input_ids, attention_mask, max_new_tokens, engine.spec.max_positions)
    forced = check_interventions(interventions, input_ids.shape[0], max_new_tokens, engine.spec.vocab_size)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (int(eos_token_ids[0]) if len(eos_token_ids) else 0)
    stopper = StopStrings(stop_strings, tokenizer)
    generator = sampling.generator()
    batch = input_ids.shape[0]

    start = time.perf_counter()
    out, cache = prefill(engine, input_ids, prompt_valid)
    prefill_s = time.perf_counter() - start
    positions = prompt_valid.sum(-1)
    finished = torch.zeros(batch, dtype=torch.bool)
    lengths = torch.zeros(batch, dtype=torch.long)
    steps, taps, forwards = [], {}, 1
    for step in range(max_new_tokens):
        token = next_token(out.logits[:, -1], sampling, generator, positions=positions)
        if step in forced:
            token = torch.where(forced[step] >= 0, forced[step], token)
        token = torch.where(finished, torch.full_like(token, pad), token)
        steps.append(token)
        for name, value in out.extras.items():
            taps.setdefault(name, []).append(value[:, -1])
        if token_stats:
            for name, value in chosen_token_stats(out.logits[:, -1], token, sampling).items():
                taps.setdefault(name, []).append(value)
        lengths += (~finished).long()
        finished |= torch.isin(token, eos)
        if stopper.strings:
            for row in (~finished).nonzero().flatten().tolist():
                finished[row] = stopper.hit([int(t[row]) for t in steps])
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        out, cache = decode_one_token(engine, cache, token, positions)
        positions = positions + 1
        forwards += 1
    tail_taps = {}
    if any(name in out.extras for name in INPUT_TOKEN_TAPS):  # one more forward: the last tokens as input
        tail, _ = decode_one_token(engine, cache, token, positions)
        tail_taps = {name: tail.extras[name][:, -1] for name in INPUT_TOKEN_TAPS if name in tail.extras}
        forwards += 1
    decode_s = time.perf_counter() - start - prefill_s

    new = torch.stack(steps, dim=1) if steps else input_ids.new_zeros(batch, 0)
    result = GenerationResult(
        sequences=torch.cat([input_ids, new], dim=1),
        num_prompt_tokens=input_ids.shape[1],
        new_tokens=new,
        taps={name: torch.stack(values, dim=1) for name, values in taps.items()},
        prefill_s=prefill_s,
        decode_s=decode_s,
        forwards=forwards,
        generated_counts=lengths,
        tail_taps=tail_taps,
    )
    return result
