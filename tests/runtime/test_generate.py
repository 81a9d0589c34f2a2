"""tokopt.runtime.generate (through ``opt.generate`` and directly): greedy output equals Hugging Face ``generate``
token for token; EOS, stop strings and the token budget; prompt errors; seeded sampling; uncertainty taps."""

from types import SimpleNamespace

import pytest
import torch

from tokopt.errors import PromptError, TokoptError
from tokopt.api.optimized_model import GenerationDefaults, OptimizedModel
from tokopt.models.decoder_graph import DecoderGraph
from tokopt.runtime.eager_engine import EagerEngine
from tokopt.runtime.generate import check_prompt, generate
from tokopt.runtime.prompts import encode_prompts, left_pad

PROMPTS = ["Write a short poem about the sea.", "Explain what a hash table is."]


def hf_generate(model, ids, attention_mask, max_new_tokens, **kwargs):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                              **kwargs)


def assert_same_tokens(ours, ref, what=""):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != HF {tuple(ref.shape)}"
    if not torch.equal(ours, ref):
        diff = (ours != ref).nonzero()[0].tolist()
        raise AssertionError(f"{what}: first difference at {diff}: ours {ours[diff[0], diff[1]]}, "
                             f"HF {ref[diff[0], diff[1]]}")


# --- greedy equality with HF on spec-bench prompts ------------------------------------------------------------


def _check_spec_bench(opt, model, tokenizer, questions, max_new_tokens):
    for q in questions:
        ids, am = encode_prompts(tokenizer, [q["turns"][0]])
        ref = hf_generate(model, ids, am, max_new_tokens)
        ours = opt.generate(ids, am, max_new_tokens=max_new_tokens)
        assert_same_tokens(ours, ref, f"{q['category']} question {q.get('question_id')}")
        assert ours.shape[1] > ids.shape[1]


def test_greedy_equals_hf_on_spec_bench_prompts(opt, real_model, tokenizer, spec_bench_questions, pick_questions):
    questions = pick_questions(spec_bench_questions, 4)
    assert len({q["category"] for q in questions}) == 4
    _check_spec_bench(opt, real_model, tokenizer, questions, max_new_tokens=24)


@pytest.mark.slow
def test_greedy_equals_hf_on_20_spec_bench_prompts_64_tokens(opt, real_model, tokenizer, spec_bench_questions,
                                                             pick_questions):
    questions = pick_questions(spec_bench_questions, 20)
    assert len(questions) == 20
    _check_spec_bench(opt, real_model, tokenizer, questions, max_new_tokens=64)


def test_runtime_generate_on_decoder_graph_equals_hf(real_model, tokenizer):
    """The decode loop on the uncaptured DecoderGraph (the module every engine is made from)."""
    graph = DecoderGraph(real_model).eval()
    ids, am = encode_prompts(tokenizer, ["What is the capital of France?"])
    gen_config = real_model.generation_config
    result = generate(EagerEngine(graph, graph.spec), ids, am, max_new_tokens=10,
                      eos_token_ids=(gen_config.eos_token_id,), pad_token_id=gen_config.pad_token_id)
    assert_same_tokens(result.sequences, hf_generate(real_model, ids, am, 10), "DecoderGraph engine")
    assert result.num_prompt_tokens == ids.shape[1]
    assert torch.equal(result.new_tokens, result.sequences[:, ids.shape[1]:])


def test_left_padded_batch_equals_hf(opt, real_model, tokenizer):
    ids, am = encode_prompts(tokenizer, ["Hi!", "Name three primary colors and explain why they are primary."])
    assert (am == 0).any() and am[:, -1].all(), "test design: the batch must be left-padded"
    ref = hf_generate(real_model, ids, am, 12)
    ours = opt.generate(ids, am, max_new_tokens=12)
    assert_same_tokens(ours, ref, "left-padded batch")
    assert torch.equal(ours[:, :ids.shape[1]], ids)  # the prompt (and its padding) is returned unchanged


# --- stopping -------------------------------------------------------------------------------------------------

FREE_STEPS = 10


@pytest.fixture(scope="module")
def free_run(opt, tokenizer):
    """A batch of two prompts generated for FREE_STEPS tokens with EOS disabled."""
    ids, am = encode_prompts(tokenizer, PROMPTS)
    out = opt.generate(ids, am, max_new_tokens=FREE_STEPS, eos_token_id=[])
    result = opt.last_result
    return SimpleNamespace(ids=ids, am=am, out=out, new=out[:, ids.shape[1]:], result=result)


def test_max_new_tokens_is_respected(free_run):
    r = free_run
    assert r.out.shape == (2, r.ids.shape[1] + FREE_STEPS)
    assert r.result.new_tokens.shape == (2, FREE_STEPS)
    assert r.result.forwards == FREE_STEPS  # one prefill + one decode step per further token
    assert r.result.generated_counts.tolist() == [FREE_STEPS, FREE_STEPS]


def test_max_new_tokens_one_is_the_argmax_of_the_prompt(opt, real_model, free_run):
    out = opt.generate(free_run.ids, free_run.am, max_new_tokens=1, eos_token_id=[])
    assert out.shape == (2, free_run.ids.shape[1] + 1)
    pos = (free_run.am.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = real_model(free_run.ids, attention_mask=free_run.am, position_ids=pos).logits[:, -1]
    assert torch.equal(out[:, -1], logits.argmax(-1))
    assert torch.equal(out[:, -1], free_run.new[:, 0])


def _expected_after_stop(free_new, stops, pad):
    """Rows of ``free_new`` cut after their stop index (None: never stops), padded; width = longest row."""
    width = max(free_new.shape[1] if s is None else s + 1 for s in stops)
    rows = []
    for row, s in zip(free_new.tolist(), stops):
        kept = row[:width] if s is None else row[:s + 1]
        rows.append(kept + [pad] * (width - len(kept)))
    return torch.tensor(rows)


def test_stop_on_eos_pads_finished_rows(opt, free_run):
    new = free_run.new
    # an "EOS" that row 0 produces early and row 1 never produces
    candidates = [int(t) for t in new[0, 1:6] if int(t) not in new[1].tolist()]
    assert candidates, "test design: need a token of row 0 absent from row 1"
    eos = candidates[0]
    stops = [new[0].tolist().index(eos), None]
    assert stops[0] < FREE_STEPS - 1
    pad = 7
    assert pad not in (eos, 2)
    out = opt.generate(free_run.ids, free_run.am, max_new_tokens=FREE_STEPS, eos_token_id=eos, pad_token_id=pad)
    expected = _expected_after_stop(new, stops, pad)
    assert torch.equal(out[:, :free_run.ids.shape[1]], free_run.ids)
    assert_same_tokens(out[:, free_run.ids.shape[1]:], expected, "EOS stop")
    assert opt.last_result.generated_counts.tolist() == [stops[0] + 1, FREE_STEPS]


def test_stop_on_eos_ends_generation_when_all_rows_finish(opt, free_run):
    new = free_run.new
    eos = [int(new[0, 2]), int(new[1, 3])]  # a list of EOS ids: each row stops at its first one
    stops = [min(new[b].tolist().index(e) for e in eos if e in new[b].tolist()) for b in range(2)]
    out = opt.generate(free_run.ids, free_run.am, max_new_tokens=FREE_STEPS, eos_token_id=eos, pad_token_id=0)
    expected = _expected_after_stop(new, stops, 0)
    assert expected.shape[1] < FREE_STEPS
    assert_same_tokens(out[:, free_run.ids.shape[1]:], expected, "EOS stop of every row")
    assert opt.last_result.forwards == max(stops) + 1  # no step after the last row finished


def test_natural_eos_equals_hf(opt, real_model, tokenizer):
    """The model's own EOS (from its generation config) ends a row; HF pads the rest the same way."""
    ids, am = encode_prompts(tokenizer, ["What is 2+2? Answer with a number only.", "Say hi."])
    eos = real_model.generation_config.eos_token_id
    ours = opt.generate(ids, am, max_new_tokens=16, pad_token_id=5)
    ref = hf_generate(real_model, ids, am, 16, pad_token_id=5)
    assert_same_tokens(ours, ref, "natural EOS")
    new = ours[:, ids.shape[1]:].tolist()
    ended = [row.index(eos) for row in new if eos in row]
    assert ended, "test design: a row should reach EOS within 16 tokens"
    for row in new:
        if eos in row:
            k = row.index(eos)
            assert set(row[k + 1:]) <= {5}


def _first_containing(tokenizer, row, s):
    for j in range(len(row)):
        if s in tokenizer.decode(row[:j + 1], skip_special_tokens=False):
            return j
    return None


def test_stop_strings_stop_the_row_once_its_text_contains_the_string(opt, tokenizer, free_run):
    new = free_run.new.tolist()
    stop = None
    for k in range(2, FREE_STEPS - 2):
        piece = tokenizer.decode([new[0][k]]).strip()
        if len(piece) >= 2 and _first_containing(tokenizer, new[0], piece) == k:
            stop = piece
            break
    assert stop is not None, "test design: no usable stop string in row 0's text"
    stops = [_first_containing(tokenizer, row, stop) for row in new]
    out = opt.generate(free_run.ids, free_run.am, max_new_tokens=FREE_STEPS, eos_token_id=[], pad_token_id=0,
                       stop_strings=[stop])
    expected = _expected_after_stop(free_run.new, stops, 0)
    assert_same_tokens(out[:, free_run.ids.shape[1]:], expected, f"stop string {stop!r}")
    text = tokenizer.decode(out[0, free_run.ids.shape[1]:free_run.ids.shape[1] + stops[0] + 1])
    assert stop in text


def test_stop_strings_ignore_the_prompt(opt, tokenizer, free_run):
    marker = "<|im_start|>"  # in every chat-templated prompt
    assert marker in tokenizer.decode(free_run.ids[0])
    assert all(_first_containing(tokenizer, row, marker) is None for row in free_run.new.tolist())
    out = opt.generate(free_run.ids, free_run.am, max_new_tokens=FREE_STEPS, eos_token_id=[], stop_strings=[marker])
    assert torch.equal(out, free_run.out)


def test_stop_strings_need_a_tokenizer(opt):
    with pytest.raises(PromptError, match="tokenizer"):
        generate(opt.engine, torch.tensor([[1, 2, 3]]), max_new_tokens=2, stop_strings=["x"], tokenizer=None)


# --- prompt errors (checked before the engine runs) -----------------------------------------------------------


class NeverCalled:
    """An engine with the real spec that fails the test if the decode loop ever calls it."""

    def __init__(self, spec):
        self.spec = spec
        self.name = "never-called"

    def __call__(self, *args, **kwargs):
        raise AssertionError("the engine must not run for a rejected prompt")


@pytest.fixture(scope="module")
def guarded(opt):
    return OptimizedModel(NeverCalled(opt.spec), defaults=GenerationDefaults((2,), 2))


@pytest.mark.parametrize("ids,mask", [
    (torch.zeros(1, 0, dtype=torch.long), None),
    (torch.zeros(0, dtype=torch.long), None),
    (torch.tensor([[5, 6, 7], [0, 0, 0]]), torch.tensor([[1, 1, 1], [0, 0, 0]])),
])
def test_empty_prompt_raises(guarded, ids, mask):
    with pytest.raises(PromptError, match="empty"):
        guarded.generate(ids, mask, max_new_tokens=4)


def test_text_prompts_and_blank_texts_are_rejected(guarded, tokenizer):
    with pytest.raises(PromptError):
        guarded.generate("Hello there", max_new_tokens=4)
    with pytest.raises(PromptError, match="empty"):
        encode_prompts(tokenizer, ["   "])
    with pytest.raises(PromptError, match="empty"):
        encode_prompts(tokenizer, [])


def test_prompt_beyond_context_window_raises(guarded):
    window = guarded.spec.max_positions
    assert window == 8192
    ids = torch.ones(1, window - 2, dtype=torch.long)
    with pytest.raises(PromptError, match="context window"):
        guarded.generate(ids, max_new_tokens=3)
    with pytest.raises(PromptError, match="context window"):
        guarded.generate(torch.ones(1, window + 1, dtype=torch.long), max_new_tokens=1)


def test_check_prompt_boundary_counts_real_tokens_only():
    valid = torch.ones(1, 30, dtype=torch.bool)
    check_prompt(torch.ones(1, 30, dtype=torch.long), valid, 2, 32)  # exactly fills the window
    with pytest.raises(PromptError):
        check_prompt(torch.ones(1, 30, dtype=torch.long), valid, 3, 32)
    padded_valid = torch.cat([torch.zeros(2, 10, dtype=torch.bool), torch.ones(2, 30, dtype=torch.bool)], dim=1)
    check_prompt(torch.ones(2, 40, dtype=torch.long), padded_valid, 2, 32)  # left padding does not count


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(max_new_tokens=-1)])
def test_non_positive_max_new_tokens_raises(guarded, kwargs):
    with pytest.raises(PromptError, match="max_new_tokens"):
        guarded.generate(torch.tensor([[1, 2, 3]]), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-2)])
def test_bad_sampling_arguments_raise(guarded, kwargs):
    with pytest.raises(TokoptError):
        guarded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=True, **kwargs)


def test_left_pad_helper():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# --- sampling and taps ----------------------------------------------------------------------------------------


def test_seeded_sampling_repeats_and_depends_on_the_seed(opt, free_run):
    ids, am = free_run.ids, free_run.am

    def sample(seed):
        return opt.generate(ids, am, max_new_tokens=6, do_sample=True, temperature=1.0, top_k=0, seed=seed,
                            eos_token_id=[])

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[:, :ids.shape[1]], ids)


def test_entropy_taps_equal_values_from_hf_logits(opt, real_model, tokenizer):
    ids, am = encode_prompts(tokenizer, ["Give me one word that rhymes with cat."])
    steps = 6
    with torch.inference_mode():
        ref = real_model.generate(ids, attention_mask=am, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                                  output_logits=True, return_dict_in_generate=True)
    ours = opt.generate(ids, am, max_new_tokens=steps, eos_token_id=[])
    assert_same_tokens(ours, ref.sequences, "greedy with taps")
    taps = opt.last_result.taps
    assert set(taps) == {"entropy", "max_logprob"}
    hf_logits = torch.stack(ref.logits, dim=1)  # [1, steps, V]
    logprobs = hf_logits.log_softmax(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    assert taps["entropy"].shape == taps["max_logprob"].shape == (1, steps)
    torch.testing.assert_close(taps["entropy"], entropy, atol=1e-4, rtol=1e-4)
    # under greedy decoding the max log-probability is the chosen token's
    chosen = logprobs.gather(-1, ours[:, ids.shape[1]:, None])[..., 0]
    torch.testing.assert_close(taps["max_logprob"], chosen, atol=1e-4, rtol=1e-4)


# --- tiny models: defaults that must follow HF, other dtypes --------------------------------------------------


def _tiny_engine(model):
    graph = DecoderGraph(model).eval()
    return EagerEngine(graph, graph.spec)


def test_default_pad_is_the_first_listed_eos_like_hf(tiny_model):
    model = tiny_model("qwen2")
    engine = _tiny_engine(model)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    free = generate(engine, ids, max_new_tokens=8).new_tokens
    seen = set(free.flatten().tolist())
    row0_only = [t for t in free[0, :4].tolist() if t not in free[1].tolist()]
    assert row0_only, "test design: need a token that only row 0 generates"
    stop = row0_only[0]
    other = next(t for t in list(range(127, -1, -1)) if t not in seen)
    eos = [max(stop, other), min(stop, other)]  # the first listed EOS is not the smallest
    am = torch.ones_like(ids)
    with torch.inference_mode():
        ref = model.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False, eos_token_id=eos)
    ours = generate(engine, ids, am, max_new_tokens=8, eos_token_ids=eos).sequences
    assert (ref[0, 5:] == eos[0]).sum() > 1, "HF pads the finished row with the first EOS id"
    assert torch.equal(ours, ref)


def test_generate_on_a_bfloat16_model(tiny_model):
    model = tiny_model("qwen2").to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    result = generate(_tiny_engine(model), ids, max_new_tokens=3)
    assert result.new_tokens.shape == (1, 3)
    assert ((result.new_tokens >= 0) & (result.new_tokens < 128)).all()


def test_optimize_a_bfloat16_model_works_or_refuses_clearly(tiny_model):
    import tokopt

    model = tiny_model("qwen2").to(torch.bfloat16)
    try:
        opt = tokopt.optimize(model)
    except TokoptError:
        return
    out = opt.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    assert out.shape == (1, 5)
