"""Per-token uncertainty the decode loops record beside the graph's taps: the chosen token's log-probability
and the processed distribution's entropy, max probability and chosen log-probability.

The graph's ``logit_taps`` give the raw distribution of every row; what depends on the token actually chosen
(and on the sampling settings) is computed here, from the very logits row that chose it: in plain decoding the
decode row, under speculative decoding the target's verify row on the accepted path (never a draft's).
Greedy decoding applies no processing, so its processed values are the raw ones.

Example::

    stats = chosen_token_stats(logits_rows, tokens, SamplingParams(True, 0.7, 50, 0.9))
    stats["logprob"], stats["entropy_processed"]          # [n] each
"""

from __future__ import annotations

import torch

from tokopt.runtime.sampling import SamplingParams, process_logits
from tokopt.runtime import logprobs as ls

NAMES = ("logprob", "entropy_processed", "max_prob_processed", "logprob_processed")
# Taps that describe a row's input token rather than the token the row chooses: the value for generated token t
# comes from the row whose input is t (the next step's, or the loops' tail forward for the last token).
INPUT_TOKEN_TAPS = ("prev_attention",)


def chosen_token_stats(logits: torch.Tensor, tokens: torch.Tensor, sampling: SamplingParams) -> dict:
    """``logits`` ``[n, V]`` rows that chose ``tokens`` ``[n]`` -> dict of ``[n]`` float64 tensors (see NAMES)."""
    raw = ls.chosen_logprob(logits, tokens)
    processed = process_logits(logits, sampling) if sampling.do_sample else logits  # greedy: no processing
    return {"logprob": raw, "entropy_processed": ls.entropy(processed), "max_prob_processed": ls.max_prob(processed),
            "logprob_processed": ls.chosen_logprob(processed, tokens) if sampling.do_sample else raw}


def token_records(result) -> list[list[dict]]:
    """A GenerationResult's taps as records: per row, one dict per generated token (see
    ``OptimizedModel.last_uncertainty``)."""
    taps = result.taps
    counts = result.generated_counts.tolist() if result.generated_counts is not None else \
        [result.new_tokens.shape[1]] * result.new_tokens.shape[0]
    out = []
    for b, count in enumerate(counts):
        rows = []
        for t in range(int(count)):
            rec = {"token": int(result.new_tokens[b, t])}
            for name in ("entropy", "max_prob", "margin", "self_certainty", "logprob", *NAMES[1:]):
                if name in taps:
                    rec[name] = float(taps[name][b, t])
            if "topk_ids" in taps:
                rec["topk"] = list(zip(taps["topk_ids"][b, t].tolist(), taps["topk_logprobs"][b, t].tolist()))
            for name in INPUT_TOKEN_TAPS:
                if name in taps:
                    own = _input_token_tap(result, name, b, t, int(count))
                    if own is not None:
                        rec[name] = own.tolist()  # prev_attention: [layers][heads], this token -> the one before
            if "logprob" in rec and "entropy" in rec:
                rec["typicality"] = abs(-rec["logprob"] - rec["entropy"])
            rows.append(rec)
        out.append(rows)
    return out


def _input_token_tap(result, name: str, b: int, t: int, count: int):
    """Row b's value of ``name`` at the row whose input was generated token t (None if never computed)."""
    if t + 1 < count:
        return result.taps[name][b, t + 1]
    tail = result.tail_taps.get(name)
    return None if tail is None else tail[b]
