"""runtime.request: one request and one set-up/tear-down for every decode loop. EOS ids are normalised once
(unique, sorted) and one pad rule applies (the given pad id, else the first listed EOS id as HF pads, else 0), so
plain, speculative, cautious and expert-parallel decoding stop and pad rows alike; plain and speculative
decoding record the same taps."""

from __future__ import annotations

import pytest
import torch

from tokopt.errors import PromptError, TokoptError
from tokopt.models.decoder_graph import DecoderGraph
from tokopt.models.ep_program.program import StepContext, capture_program
from tokopt.runtime.cautious import cautious_generate
from tokopt.runtime.distributed.generate import generate_on_rank
from tokopt.runtime.eager_engine import EagerEngine
from tokopt.runtime.generate import generate
from tokopt.runtime.prompts import left_pad
from tokopt.runtime.request import (Clock, GenerationRequest, Rows, eos_ids, finish, pad_id, padded_taps,
                                    padded_tokens)
from tokopt.runtime.sampling import SamplingParams
from tokopt.runtime.speculative.decode import speculative_generate
from tokopt.runtime.speculative.drafters.lookup import LookupConfig, PromptLookup

NEW = 16


class CharTokenizer:
    """Decodes token t as one letter (a..z), enough for stop strings."""

    def decode(self, tokens, skip_special_tokens=False):
        return "".join(chr(97 + int(t) % 26) for t in tokens)


# --- the request: one normalisation, one pad rule, checked once -----------------------------------------------


def test_eos_ids_are_unique_and_sorted_and_the_first_listed_pads():
    assert eos_ids([7, 2, 7]) == (2, 7) and eos_ids(3) == (3,) and eos_ids(None) == eos_ids([]) == ()
    assert eos_ids(torch.tensor([9, 4])) == (4, 9)
    assert pad_id(None, [7, 2, 7]) == 7 and pad_id(0, [7, 2]) == 0 and pad_id(None, ()) == 0
    request = GenerationRequest.create(torch.tensor([5, 6, 7]), max_new_tokens=4, eos_token_ids=[9, 4, 9])
    assert request.eos_token_ids == (4, 9) and request.pad_token_id == 9
    assert request.input_ids.shape == (1, 3) and request.prompt_valid.dtype == torch.bool
    assert GenerationRequest.create([[1, 2]], eos_token_ids=5, pad_token_id=1).pad_token_id == 1


@pytest.mark.parametrize("kwargs,error", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop_strings=["x"]), "tokenizer"),
    (dict(interventions={9: 1}), "intervention step"),
    (dict(interventions={0: [1, 2]}), "2 tokens for 1 rows"),
])
def test_create_refuses_bad_arguments(kwargs, error):
    with pytest.raises(TokoptError, match=error):
        GenerationRequest.create([[1, 2, 3]], **{"max_new_tokens": 4, **kwargs})


def test_create_checks_the_prompt_against_the_engine_spec():
    class Spec:
        max_positions, vocab_size = 8, 10

    with pytest.raises(PromptError, match="empty"):
        GenerationRequest.create(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]), spec=Spec())
    with pytest.raises(PromptError, match="context window"):
        GenerationRequest.create([[1, 2, 3, 4]], spec=Spec(), max_new_tokens=5)
    with pytest.raises(TokoptError, match=r"\[0, 10\)"):
        GenerationRequest.create([[1, 2]], spec=Spec(), max_new_tokens=2, interventions={0: 10})
    request = GenerationRequest.create(*left_pad([[1, 2, 3], [4]], 0), spec=Spec(), max_new_tokens=5)
    assert request.prompts() == [[1, 2, 3], [4]] and request.prompt_lengths().tolist() == [3, 1]


# --- the tear-down: stopping and padding ----------------------------------------------------------------------


def test_rows_stop_on_eos_the_budget_and_stop_strings():
    request = GenerationRequest.create([[1], [1], [1]], max_new_tokens=4, eos_token_ids=[2, 2],
                                       stop_strings=["cd"], tokenizer=CharTokenizer())
    rows = Rows(request)
    assert rows.emit(0, [5, 2, 6]) == 2  # EOS: the row takes it and stops
    assert rows.emit(1, [28, 3, 6]) == 2  # "c", "d": the stop string is in the text
    assert rows.emit(2, [5, 6]) == 2 and not rows.finished[2] and rows.live() == [2]
    assert rows.emit(2, [7, 8, 9]) == 2 and rows.done  # the budget
    assert rows.tokens == [[5, 2], [28, 3], [5, 6, 7, 8]]


def test_finish_pads_tokens_with_the_pad_id_and_taps_with_nan():
    request = GenerationRequest.create([[1, 1], [1, 1]], max_new_tokens=3, eos_token_ids=[4, 3])
    rows = Rows(request)
    rows.emit(0, [3], {"entropy": torch.tensor([0.5]), "topk_ids": torch.tensor([[7, 8]])})
    rows.emit(1, [5, 6, 7], {"entropy": torch.tensor([0.1, 0.2, 0.3]), "topk_ids": torch.tensor([[1, 2]] * 3)})
    result = finish(request, rows, Clock(), forwards=3)
    assert result.new_tokens.tolist() == [[3, 4, 4], [5, 6, 7]]  # 4: the first listed EOS id
    assert result.sequences.tolist() == [[1, 1, 3, 4, 4], [1, 1, 5, 6, 7]]
    assert result.generated_counts.tolist() == [1, 3]
    assert result.taps["entropy"][0, 1:].isnan().all() and result.taps["topk_ids"][0, 1:].eq(-1).all()
    assert padded_tokens([[1], [2, 3]], 0).tolist() == [[1, 0], [2, 3]]
    assert padded_taps([{"x": [torch.tensor(1)]}], 2)["x"].tolist() == [[1, -1]]


# --- every loop stops and pads alike --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def engine(model):
    graph = DecoderGraph(model).eval()
    return EagerEngine(graph, graph.spec)


@pytest.fixture(scope="module")
def prompts(engine):
    """Three left-padded prompts of unequal lengths (with repeats, so that prompt lookup drafts)."""
    g = torch.Generator().manual_seed(4)
    rows = [(torch.randint(3, engine.spec.vocab_size, (5,), generator=g).tolist() * 3)[:n] for n in (9, 5, 12)]
    return left_pad(rows, pad_id=0)


@pytest.fixture(scope="module")
def unsorted_eos(engine, prompts):
    """EOS ids, unsorted with a duplicate, the first listed not the smallest: one that row 0 generates early
    and another row never does, and one that no row generates."""
    free = generate(engine, *prompts, max_new_tokens=NEW).new_tokens
    stop = next(t for t in free[0, 1:5].tolist() if any(t not in free[b].tolist() for b in (1, 2)))
    unused = next(t for t in range(engine.spec.vocab_size) if t not in free.flatten().tolist())
    return [max(stop, unused), min(stop, unused), max(stop, unused)]


def test_plain_and_speculative_pad_unequal_rows_alike_without_a_pad_id(engine, prompts, unsorted_eos):
    """No pad id: both loops pad finished rows with the first listed EOS id (as HF), not the smallest."""
    plain = generate(engine, *prompts, max_new_tokens=NEW, eos_token_ids=unsorted_eos)
    spec = speculative_generate(engine, *prompts, drafter=PromptLookup(LookupConfig(budget=5)),
                                max_new_tokens=NEW, eos_token_ids=unsorted_eos)
    counts = plain.generated_counts.tolist()
    assert min(counts) < plain.new_tokens.shape[1], "test design: a row must finish before the others"
    assert torch.equal(spec.sequences, plain.sequences)
    assert torch.equal(spec.generated_counts, plain.generated_counts)
    for b, count in enumerate(counts):
        assert set(plain.new_tokens[b, count:].tolist()) <= {unsorted_eos[0]}


def test_unsorted_duplicated_eos_ids_stop_like_the_normalised_ones(engine, prompts, unsorted_eos):
    normalised = dict(eos_token_ids=tuple(sorted(set(unsorted_eos))), pad_token_id=unsorted_eos[0])
    for run in (generate, lambda *a, **kw: speculative_generate(*a, drafter=PromptLookup(), **kw)):
        a = run(engine, *prompts, max_new_tokens=NEW, eos_token_ids=unsorted_eos)
        b = run(engine, *prompts, max_new_tokens=NEW, **normalised)
        assert torch.equal(a.sequences, b.sequences) and torch.equal(a.generated_counts, b.generated_counts)


def test_cautious_and_expert_parallel_stop_on_any_listed_eos(model, engine, prompts, unsorted_eos):
    unpadded = [ids[valid.bool()].tolist() for ids, valid in zip(*prompts)]
    one = generate(engine, unpadded[0], max_new_tokens=NEW, eos_token_ids=unsorted_eos)
    assert one.generated_counts[0] < NEW, "test design: row 0 must stop on an EOS id"
    cautious = cautious_generate(engine, unpadded[0], max_new_tokens=NEW, sampling=SamplingParams(), n_max=1,
                                 punctuation_ids=(), eos_token_ids=unsorted_eos)
    assert torch.equal(cautious.sequences, one.sequences)
    plain = generate(engine, *prompts, max_new_tokens=NEW, eos_token_ids=unsorted_eos)
    counts = plain.generated_counts.tolist()
    rows = [r.tolist() for r in plain.new_tokens]
    gm = capture_program(model)
    with torch.no_grad():
        ep = generate_on_rank(gm, unpadded, StepContext.single(gm, len(unpadded)), max_new_tokens=NEW,
                              eos_token_id=unsorted_eos)
    assert ep["tokens"] == [row[:count] for row, count in zip(rows, counts)]


def test_plain_and_speculative_record_the_same_taps(model, prompts, unsorted_eos):
    """Taps (graph outputs and the chosen tokens' statistics) agree in value and dtype, NaN past a row's end,
    and so do the input-token taps of each row's last token, also of a row that finished early."""
    import tokopt

    plain = tokopt.optimize(model, uncertainty=True)
    spec = plain.with_speculative("lookup")
    kw = dict(max_new_tokens=NEW, eos_token_id=unsorted_eos, pad_token_id=0)  # the pad rule is tested above
    assert torch.equal(spec.generate(*prompts, **kw), plain.generate(*prompts, **kw))
    a, b = plain.last_result, spec.last_result
    assert min(a.generated_counts.tolist()) < a.new_tokens.shape[1], "test design: a row must finish early"
    assert set(a.taps) == set(b.taps) and "logprob" in a.taps and set(a.tail_taps) == {"prev_attention"}
    for name in a.taps:
        assert a.taps[name].dtype == b.taps[name].dtype, name
        torch.testing.assert_close(b.taps[name], a.taps[name], atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(b.tail_taps["prev_attention"], a.tail_taps["prev_attention"], atol=1e-5, rtol=1e-5)
