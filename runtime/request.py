"""What a decode loop is asked for, and the set-up and tear-down that every loop shares.

A ``GenerationRequest`` holds everything a loop needs besides the engine, checked and normalised once by
``GenerationRequest.create``: the prompt (``[B, T]`` left-padded ids and their validity), the token budget, the
EOS ids (unique, sorted), the pad id (the given one, else the first listed EOS id as Hugging Face's
``generate`` does, else 0), stop strings and the tokenizer that decodes for them, the sampling parameters,
whether to record the chosen tokens' statistics, and the tokens forced by interventions.

Every loop (plain ``generate.decode``, ``speculative.decode.speculative_decode``, ``cautious.cautious_decode``,
``distributed.generate.generate_on_rank``) is made of the same small phases, and keeps only what is its own:

* set-up: ``GenerationRequest.create`` (``prompt_inputs``, ``check_interventions``), ``prefill`` /
  ``prefill_rows``, ``choose_tokens`` (the next token of every row from its last logits row);
* one step: ``decode_one_token``;
* tear-down: ``Rows`` (each row's tokens and taps; ``Rows.emit`` stops a row on EOS, a stop string or the token
  budget), ``emit_step`` (one token per live row, with its taps), ``complete_tails`` (the input-token taps of
  every row's last token) and ``finish`` (finished rows padded, the ``GenerationResult``).

Example::

    request = GenerationRequest.create(ids, mask, spec=engine.spec, max_new_tokens=32, eos_token_ids=[7, 2, 7])
    request.eos_token_ids, request.pad_token_id        # (2, 7), 7: the first listed EOS id pads finished rows
    defaults = GenerationDefaults.from_model(model)    # a model's EOS ids (in its order) and pad id
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tokopt.errors import PromptError, TokoptError
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import causal_structure, prompt_positions, step_mask
from tokopt.runtime.sampling import SamplingParams, next_token
from tokopt.runtime.token_uncertainty import INPUT_TOKEN_TAPS, chosen_token_stats

ONE_ROW = torch.tensor([0])


# --- token ids: one normalisation of EOS ids, one pad rule ----------------------------------------------------


def token_ids(value) -> tuple:
    """None, one token id, or several (list, tuple, set, tensor) -> a tuple of ints, in the given order.

    Example::

        >>> token_ids(None), token_ids(5), token_ids([7, 2, 7])
        ((), (5,), (7, 2, 7))
    """
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(int(v) for v in value)
    return (int(value),)


def eos_ids(value) -> tuple:
    """The one normalisation of EOS ids every loop uses: unique and sorted.

    Example::

        >>> eos_ids([7, 2, 7]), eos_ids(3), eos_ids(None)
        ((2, 7), (3,), ())
    """
    return tuple(sorted(set(token_ids(value))))


def pad_id(pad_token_id, eos_token_ids) -> int:
    """The one pad rule: ``pad_token_id`` if given, else the first listed EOS id (as Hugging Face's ``generate``
    pads), else 0.

    Example::

        >>> pad_id(None, [7, 2]), pad_id(5, [7, 2]), pad_id(None, ())
        (7, 5, 0)
    """
    if pad_token_id is not None:
        return int(pad_token_id)
    listed = token_ids(eos_token_ids)
    return listed[0] if listed else 0


@dataclass
class GenerationDefaults:
    """A model's EOS ids (in its generation config's order: the first is the default pad) and pad id.

    Example::

        defaults = GenerationDefaults.from_model(model)     # e.g. GenerationDefaults((2,), None)
    """

    eos_token_ids: tuple = ()
    pad_token_id: int | None = None

    @classmethod
    def from_model(cls, model) -> "GenerationDefaults":
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        pad = getattr(gen, "pad_token_id", None)
        return cls(token_ids(eos), None if pad is None else int(pad))


# --- the prompt and the interventions, checked ----------------------------------------------------------------


def check_prompt(input_ids, prompt_valid, max_new_tokens, max_positions):
    """Raise ``PromptError`` for an empty row, or for a prompt + ``max_new_tokens`` beyond ``max_positions``
    (None: no window to check). Left padding does not count.

    Example::

        check_prompt(ids, ids != pad, max_new_tokens=32, max_positions=engine.spec.max_positions)
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or not bool(prompt_valid.any(-1).all()):
        raise PromptError("empty prompt: every row of input_ids needs at least one (unpadded) token")
    if max_positions is None:
        return
    longest = int(prompt_valid.sum(-1).max())
    if longest + max_new_tokens > max_positions:
        raise PromptError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context window of "
            f"{max_positions} tokens; shorten the prompt or lower max_new_tokens to {max(max_positions - longest, 0)}"
        )


def prompt_inputs(input_ids, attention_mask, max_new_tokens, max_positions):
    """``[B, T]`` ids (a ``[T]`` row is batched) and their validity, checked against the context window.

    Example::

        ids, valid = prompt_inputs([5, 6, 7], None, max_new_tokens=4, max_positions=2048)   # [1, 3], all True
    """
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    prompt_valid = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                    else torch.as_tensor(attention_mask).bool())
    check_prompt(input_ids, prompt_valid, max_new_tokens, max_positions)
    return input_ids, prompt_valid


def check_interventions(interventions, batch: int, max_new_tokens: int, vocab_size: int | None) -> dict:
    """``{step: token}`` or ``{step: [token or None per row]}`` -> ``{step: [B] tensor, -1 = keep}``, checked
    (``vocab_size`` None: token ids are only checked to be >= 0).

    Example::

        >>> check_interventions({1: [4, None]}, batch=2, max_new_tokens=3, vocab_size=10)[1].tolist()
        [4, -1]
    """
    out = {}
    for step, value in (interventions or {}).items():
        if not isinstance(step, int) or not 0 <= step < max_new_tokens:
            raise TokoptError(f"intervention step {step!r} must be an int in [0, max_new_tokens={max_new_tokens})")
        row_values = [value] * batch if isinstance(value, int) else list(value)
        if len(row_values) != batch:
            raise TokoptError(f"intervention at step {step} gives {len(row_values)} tokens for {batch} rows; give one "
                              "token id for all rows, or one per row (None keeps that row's token)")
        for v in row_values:
            if v is not None and (not isinstance(v, int) or v < 0 or (vocab_size is not None and v >= vocab_size)):
                raise TokoptError(f"intervention token {v!r} at step {step} is not a token id in [0, {vocab_size})")
        out[step] = torch.tensor([-1 if v is None else v for v in row_values], dtype=torch.long)
    return out


# --- the request ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """Everything a decode loop needs besides the engine, checked and normalised once (build it with
    ``create``, which validates; the fields hold the normalised values).

    Example::

        request = GenerationRequest.create(ids, mask, spec=engine.spec, max_new_tokens=16,
                                           sampling=SamplingParams(do_sample=True, seed=0))
        result = decode(engine, request)          # runtime.generate; or speculative_decode(engine, request, drafter)
    """

    input_ids: torch.Tensor  # [B, T], left-padded
    prompt_valid: torch.Tensor  # [B, T] bool: the real (unpadded) tokens
    max_new_tokens: int = 64
    eos_token_ids: tuple = ()  # unique, sorted
    pad_token_id: int = 0  # fills finished rows
    stop_strings: tuple = ()  # a row stops once its decoded new text contains one (as HF's stop_strings)
    tokenizer: object = None  # decodes the new tokens for stop_strings
    sampling: SamplingParams = SamplingParams()
    token_stats: bool = False  # record the chosen token's log-probability and processed uncertainty per token
    interventions: dict = field(default_factory=dict)  # step -> [B] token forced at that step, -1 = keep

    @classmethod
    def create(cls, input_ids, attention_mask=None, *, spec=None, max_new_tokens: int = 64,
               sampling: SamplingParams = SamplingParams(), eos_token_ids=(), pad_token_id=None, stop_strings=(),
               tokenizer=None, token_stats: bool = False, interventions=None) -> "GenerationRequest":
        """Check and normalise a generate call's arguments. ``input_ids``: ``[B, T]`` (left-padded, with
        ``attention_mask``) or ``[T]``; ``spec`` (the engine's) bounds the prompt by its context window and
        interventions by its vocabulary (None: unchecked); ``eos_token_ids``: one id or several, in any order;
        ``pad_token_id`` None: the first listed EOS id, else 0; ``interventions``: ``{step: token}`` or one
        token per row (None keeps that row's token).

        Example::

            >>> r = GenerationRequest.create([[1, 2, 3]], max_new_tokens=4, eos_token_ids=[9, 4, 9])
            >>> r.eos_token_ids, r.pad_token_id, r.batch
            ((4, 9), 9, 1)
        """
        if max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop_strings and tokenizer is None:
            raise PromptError("stop_strings need a tokenizer to decode the generated text; pass tokenizer=...")
        max_positions, vocab_size = (None, None) if spec is None else (spec.max_positions, spec.vocab_size)
        input_ids, prompt_valid = prompt_inputs(input_ids, attention_mask, max_new_tokens, max_positions)
        forced = check_interventions(interventions, input_ids.shape[0], max_new_tokens, vocab_size)
        return cls(input_ids, prompt_valid, max_new_tokens, eos_ids(eos_token_ids), pad_id(pad_token_id, eos_token_ids),
                   tuple(s for s in (stop_strings or ()) if s), tokenizer, sampling, token_stats, forced)

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    def prompt_lengths(self) -> torch.Tensor:
        """``[B]`` real tokens per row: the position of each row's first new token (a new tensor per call)."""
        return self.prompt_valid.sum(-1)

    def prompts(self) -> list:
        """Each row's prompt without its padding, as a list of ids."""
        return [self.input_ids[b][self.prompt_valid[b]].tolist() for b in range(self.batch)]

    def hits_stop_string(self, new_tokens: list) -> bool:
        """Whether the decoded ``new_tokens`` (one row's, the prompt excluded) contain a stop string."""
        if not self.stop_strings:
            return False
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=False)
        return any(s in text for s in self.stop_strings)


# --- set-up: the prompt's forward and the next tokens ---------------------------------------------------------


def prefill(engine, input_ids, prompt_valid):
    """Run the whole prompt; return (StepOutput with the last position's logits, cache).

    Example::

        out, cache = prefill(engine, request.input_ids, request.prompt_valid)     # out.logits: [B, 1, V]
    """
    # prompts are left-padded: the last row is every sequence's last token
    return prefill_rows(engine, input_ids, prompt_valid, torch.tensor([input_ids.shape[1] - 1]))


def prefill_rows(engine, input_ids, prompt_valid, logits_rows):
    """Run the whole prompt with logits at ``logits_rows``; return (StepOutput, cache).

    Example::

        out, cache = prefill_rows(engine, ids, valid, torch.arange(ids.shape[1]))   # logits of every position
    """
    batch, n = input_ids.shape
    cache = KVCache.empty(engine.spec, batch)
    mask = step_mask(cache.valid, causal_structure(n, batch), new_valid=prompt_valid, dtype=engine.spec.torch_dtype)
    out = engine(input_ids, prompt_positions(prompt_valid), mask, logits_rows, cache.tensors)
    return out, cache.extend(out.present, prompt_valid)


def decode_one_token(engine, cache, tokens, positions):
    """Feed one token per row at ``positions``; return (StepOutput, cache).

    Example::

        out, cache = decode_one_token(engine, cache, torch.tensor([17, 4]), torch.tensor([9, 9]))
    """
    batch = tokens.shape[0]
    ones = torch.ones(batch, 1, dtype=torch.bool)
    mask = step_mask(cache.valid, causal_structure(1, batch), dtype=engine.spec.torch_dtype)
    out = engine(tokens[:, None], positions[:, None], mask, ONE_ROW, cache.tensors)
    return out, cache.extend(out.present, ones)


class Clock:
    """Wall-clock of one generate call: the prefill, then the decode (everything after it).

    Example::

        clock = Clock(); out, cache = prefill(...); clock.prefilled(); ...; clock.decode_s()
    """

    def __init__(self):
        self.start = time.perf_counter()
        self.prefill_s = 0.0

    def prefilled(self) -> None:
        self.prefill_s = time.perf_counter() - self.start

    def decode_s(self) -> float:
        return time.perf_counter() - self.start - self.prefill_s


# --- each row's tokens and stop state -------------------------------------------------------------------------


class Rows:
    """Each row's emitted tokens and taps, whether it has stopped (EOS, a stop string or the token budget), and
    the input-token taps (``INPUT_TOKEN_TAPS`` among ``extras``) of the forward that fed its last token.

    Example::

        rows = Rows(request, out.extras)
        rows.emit(0, [17, 2], {"entropy": torch.tensor([0.3, 0.1])})   # 2, or 1 if 17 is an EOS id
        rows.done, rows.live()
    """

    def __init__(self, request: GenerationRequest, extras=None):
        self.request = request
        self.tokens = [[] for _ in range(request.batch)]
        self.taps = [{} for _ in range(request.batch)]  # per row: name -> one tensor per token
        self.finished = [False] * request.batch
        self.input_taps = tuple(name for name in INPUT_TOKEN_TAPS if name in (extras or {}))
        self.tails = [None] * request.batch  # per row: input_taps of its last token, once a forward fed it

    @property
    def done(self) -> bool:
        return all(self.finished)

    def live(self) -> list:
        return [b for b, finished in enumerate(self.finished) if not finished]

    def stops(self, b: int) -> bool:
        """Whether row b's last token ends it: an EOS id, the token budget, or a stop string."""
        row, request = self.tokens[b], self.request
        return row[-1] in request.eos_token_ids or len(row) >= request.max_new_tokens or (
            bool(request.stop_strings) and request.hits_stop_string(row))

    def emit(self, b: int, tokens, taps=None) -> int:
        """Append ``tokens`` (with ``taps``: name -> one value per token) to row b until it stops; return how
        many were taken."""
        taken = 0
        for j, token in enumerate(tokens):
            self.tokens[b].append(token)
            for name, values in (taps or {}).items():
                self.taps[b].setdefault(name, []).append(values[j])
            taken += 1
            self.tails[b] = None  # its new last token has not been fed yet
            if self.stops(b):
                self.finished[b] = True
                break
        return taken

    def set_tail(self, b: int, extras: dict, row: int) -> None:
        """Row b's input-token taps from logits row ``row`` of a forward whose input there was b's last token."""
        if self.input_taps:
            self.tails[b] = {name: extras[name][b, row] for name in self.input_taps}


def choose_tokens(request: GenerationRequest, rows: Rows, logits, generator, positions, step: int = 0):
    """``[B]`` next tokens from ``logits`` ``[B, V]``: greedy or drawn (``request.sampling``; ``positions`` key
    Gumbel noise), replaced where an intervention forces generated step ``step``, the pad id in finished rows.

    Example::

        token = choose_tokens(request, rows, out.logits[:, -1], generator, positions, step)
    """
    token = next_token(logits, request.sampling, generator, positions=positions)
    forced = request.interventions.get(step)
    if forced is not None:
        token = torch.where(forced >= 0, forced, token)
    return torch.where(torch.tensor(rows.finished), torch.full_like(token, request.pad_token_id), token)


def emit_step(request: GenerationRequest, rows: Rows, out, token) -> list:
    """Emit ``token[b]`` in every live row, with the taps of ``out``'s last logits row (and, with
    ``request.token_stats``, the chosen token's statistics); return the rows that emitted.

    Example::

        emitted = emit_step(request, rows, out, choose_tokens(request, rows, out.logits[:, -1], gen, positions))
    """
    taps = {name: value[:, -1:] for name, value in out.extras.items()}
    if request.token_stats:
        chosen = chosen_token_stats(out.logits[:, -1], token, request.sampling)
        taps.update({name: value[:, None] for name, value in chosen.items()})
    tokens, live = token.tolist(), rows.live()
    for b in live:
        rows.emit(b, [tokens[b]], {name: value[b] for name, value in taps.items()})
    return live


# --- tear-down ------------------------------------------------------------------------------------------------


def complete_tails(engine, cache, rows: Rows, positions) -> int:
    """Where the graph has input-token taps and a row's last token was never fed, one more forward feeds every
    row's last token at ``positions``; return the forwards run (0 or 1).

    Example::

        forwards += complete_tails(engine, cache, rows, positions)
    """
    if not rows.input_taps or all(tail is not None for tail in rows.tails):
        return 0
    out, _ = decode_one_token(engine, cache, torch.tensor([row[-1] for row in rows.tokens]), positions)
    for b, tail in enumerate(rows.tails):
        if tail is None:
            rows.set_tail(b, out.extras, -1)
    return 1


def padded_tokens(tokens: list, pad: int) -> torch.Tensor:
    """Rows of token ids -> ``[B, longest]``, shorter rows filled with ``pad``.

    Example::

        >>> padded_tokens([[5, 2], [6]], pad=0).tolist()
        [[5, 2], [6, 0]]
    """
    new = torch.full((len(tokens), max(map(len, tokens))), pad, dtype=torch.long)
    for b, row in enumerate(tokens):
        new[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return new


def padded_taps(taps: list, width: int) -> dict:
    """Per row ``{name: [one tensor per token]}`` -> ``{name: [B, width, ...]}``, past a row's tokens NaN (or -1
    for integer taps such as top-k ids).

    Example::

        >>> padded_taps([{"entropy": [torch.tensor(0.5)]}, {"entropy": []}], width=1)["entropy"].tolist()
        [[0.5], [nan]]
    """
    out = {}
    for b, row in enumerate(taps):
        for name, values in row.items():
            if not values:
                continue
            values = torch.stack(values)
            if name not in out:
                fill = float("nan") if values.dtype.is_floating_point else -1
                out[name] = torch.full((len(taps), width, *values.shape[1:]), fill, dtype=values.dtype,
                                       device=values.device)
            out[name][b, : len(values)] = values
    return out


@dataclass
class GenerationResult:
    """What a decode loop returns: HF-shaped ``sequences`` (prompt, then new tokens; finished rows padded) and
    what the loop recorded.

    Example::

        result = generate(engine, ids, max_new_tokens=8)
        result.new_tokens, result.generated_counts, result.taps["entropy"]
    """

    sequences: torch.Tensor  # [B, T + new], HF-shaped
    num_prompt_tokens: int
    new_tokens: torch.Tensor  # [B, steps]
    taps: dict = field(default_factory=dict)  # name -> [B, steps, ...]: graph outputs, token stats; NaN/-1 past a row
    prefill_s: float = 0.0
    decode_s: float = 0.0
    forwards: int = 0
    generated_counts: torch.Tensor | None = None  # [B] tokens per row, up to and including its EOS/stop token
    stats: object = None  # speculative decoding: SpeculativeStats; cautious decoding: CautiousStats
    # taps of the row whose INPUT is each row's last generated token (name -> [B, ...]): what describes a token
    # as input (attention_taps' prev_attention) is otherwise only known one forward later
    tail_taps: dict = field(default_factory=dict)


def finish(request: GenerationRequest, rows: Rows, clock: Clock, forwards: int, stats=None) -> GenerationResult:
    """The ``GenerationResult`` of a finished loop: new tokens padded with ``request.pad_token_id``, taps padded
    (``padded_taps``), each row's count, the tail taps (after ``complete_tails``) and the times.

    Example::

        return finish(request, rows, clock, forwards, stats=stats)
    """
    decode_s = clock.decode_s()
    new = padded_tokens(rows.tokens, request.pad_token_id)
    return GenerationResult(
        sequences=torch.cat([request.input_ids, new], dim=1),
        num_prompt_tokens=request.input_ids.shape[1],
        new_tokens=new,
        taps=padded_taps(rows.taps, new.shape[1]),
        prefill_s=clock.prefill_s,
        decode_s=decode_s,
        forwards=forwards,
        generated_counts=torch.tensor([len(row) for row in rows.tokens]),
        stats=stats,
        tail_taps={name: torch.stack([tail[name] for tail in rows.tails]) for name in rows.input_taps},
    )
