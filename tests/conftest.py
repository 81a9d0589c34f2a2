"""Shared fixtures: the real model (loaded once), one ``tokopt.api.optimize`` of it, tiny HF models, and the
spec-bench prompts from the shared data folder.

The real model is SmolLM2-135M-Instruct from the local cache; loading it takes about a second, capturing
it about 20 s, so both are session-scoped and shared by every test that needs them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

TINY_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=128, intermediate_size=128)


@pytest.fixture(scope="session", autouse=True)
def _quiet_progress():
    """Keep tokopt's progress lines out of the test output."""
    old = os.environ.get("TOKOPT_QUIET")
    os.environ["TOKOPT_QUIET"] = "1"
    yield
    if old is None:
        os.environ.pop("TOKOPT_QUIET", None)
    else:
        os.environ["TOKOPT_QUIET"] = old


@pytest.fixture(scope="session")
def real():
    """(model, tokenizer) of the default model, SmolLM2-135M-Instruct."""
    import tokopt

    model, tokenizer = tokopt.load(progress=False)
    return model, tokenizer


@pytest.fixture(scope="session")
def real_model(real):
    return real[0]


@pytest.fixture(scope="session")
def tokenizer(real):
    return real[1]


@pytest.fixture(scope="session")
def opt(real_model, tokenizer):
    """The one ``tokopt.optimize(model)`` of the real model (default passes) shared by the session."""
    import tokopt

    return tokopt.optimize(real_model, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def onnx_engine_dir(real_model, tokenizer, opt, tmp_path_factory):
    """The session's ``opt`` exported once as an ONNX engine directory (about 2 minutes)."""
    from tokopt.export.engine_dir import export_engine

    path = tmp_path_factory.mktemp("engines") / "smollm2"
    return export_engine(opt, path, model_config=real_model.config.to_dict(), model_name="smollm2-135m-instruct")


def _shared_dir() -> Path | None:
    env = os.environ.get("TOKOPT_SHARED")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [here.parents[1] / ".." / "shared", here.parents[2] / "shared"]
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    return None


@pytest.fixture(scope="session")
def spec_bench_questions():
    """The spec-bench questions (dicts with 'category' and 'turns'): the shared development split where it
    exists, else the real Spec-Bench sample shipped inside tokopt (26 questions, every category)."""
    from importlib import resources

    shared = _shared_dir()
    path = shared / "data" / "spec_bench" / "questions.jsonl" if shared else None
    if path is not None and path.is_file():
        text = path.read_text()
    else:
        text = resources.files("tokopt").joinpath("data/spec_bench_sample.jsonl").read_text()
    questions = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert questions and all("category" in q and q.get("turns") for q in questions), "malformed questions.jsonl"
    return questions


def spread_over_categories(questions, n):
    """``n`` questions over as many categories as possible: evenly spaced categories (in order of first
    appearance) when ``n`` is smaller than their number, else round-robin, taking each category's next question."""
    by_cat: dict[str, list] = {}
    for q in questions:
        by_cat.setdefault(q["category"], []).append(q)
    cats = list(by_cat)
    if n <= len(cats):
        return [by_cat[cats[i * len(cats) // n]][0] for i in range(n)]
    picked, depth = [], 0
    while len(picked) < n and depth < max(len(v) for v in by_cat.values()):
        for cat in cats:
            if depth < len(by_cat[cat]) and len(picked) < n:
                picked.append(by_cat[cat][depth])
        depth += 1
    return picked


@pytest.fixture(scope="session")
def pick_questions():
    return spread_over_categories


def _tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, **{**TINY_COMMON, **overrides})
    for key in ("num_local_experts", "num_experts"):
        if hasattr(cfg, key) and key not in overrides:
            setattr(cfg, key, 4)
    if hasattr(cfg, "num_experts_per_tok") and "num_experts_per_tok" not in overrides:
        cfg.num_experts_per_tok = 2
    if getattr(cfg, "sliding_window", None) and "sliding_window" not in overrides:
        cfg.sliding_window = None  # full attention; windows are refused (see test_decoder_graph)
    for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if hasattr(cfg, key) and key not in overrides:
            setattr(cfg, key, 32)
    return cfg


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: a small config of a given model_type (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 128)."""
    return _tiny_config


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: a randomly initialised tiny model of ``model_type`` in eval mode (seeded, so repeatable)."""
    from transformers import AutoModelForCausalLM

    def make(model_type: str, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_tiny_config(model_type, **overrides)).eval()
        return model

    return make

@pytest.fixture(autouse=True)
def _recycling_state_in_tmp(tmp_path_factory, monkeypatch):
    """Tests never write Token Recycling's persisted state into the user's real cache: state files (``persist.state_path``) go to a temporary folder unless the test sets
    ``TOKOPT_CACHE`` itself; latency profiles stay in the real cache (re-measuring SmolLM2's per test would take
    minutes)."""
    import os

    from tokopt import paths
    from tokopt.runtime.speculative import persist

    outer = os.environ.get("TOKOPT_CACHE")
    root = tmp_path_factory.getbasetemp() / "recycling-state"

    def cache_path(*parts):
        if os.environ.get("TOKOPT_CACHE") != outer:  # the test chose a cache of its own
            return paths.cache_path(*parts)
        return root.joinpath(*parts)

    monkeypatch.setattr(persist, "cache_path", cache_path)
