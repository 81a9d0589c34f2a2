"""Training the prompt-token embeddings of Parallel Prompt Decoding (``tokopt train-ppd``), and their artifact.

Self-distillation on real text, teacher-forced: a chunk of text runs through the model as one forward, with k
prompt tokens appended after each of a few sampled anchor positions t (prompt token j sees the text up to t and
the anchor's earlier prompt tokens, at position t + 1 + j: exactly what a prompt chain after a tree node sees at
decode time, ``passes.ppd_slots`` / ``drafters.ppd``). Its target is the model's own distribution at text
position t + 1 + j from the same forward (the text rows never see prompt tokens), so prompt token j learns to
guess the token t + 2 + j; the loss is KL(teacher || prompt row). Only the k embeddings train (Adam); they start
as the mean token embedding, which is also the untrained control whose accuracy is reported beside them.

Held-out chunks (10%) give per-position rank accuracies: ``rank_accuracy[j][r]`` = how often the teacher's argmax
at t + 1 + j is the prompt row's r-th best token (r < ``RANKS``); top-1 is r = 0, top-k the sum over r < k.
They are the prior of the PPD drafter's tree shapes.

The artifact (``cache_dir()/ppd/<fingerprint>.pt``, with a loss-curve PNG beside it) holds the embeddings ``[k,
hidden]``, the model fingerprint, k and the metrics; ``load_ppd_artifact`` refuses another model's.

Example::

    from tokopt.training.ppd import train_ppd
    result = train_ppd(steps=200)                       # default model, offline corpus, about 3 min on 2 cores
    print(result.metrics["rank_accuracy"][0][0], result.path)
    opt = tokopt.optimize(speculative="ppd")             # finds the artifact for this model
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tokopt.errors import TokoptError
from tokopt.models.loading import load, model_fingerprint
from tokopt.passes.ppd_slots import DEFAULT_K, prompt_embedding
from tokopt.progress import progress_bar
from tokopt.runtime.artifacts import save_ppd_artifact
from tokopt.models.decoder_graph import DecoderGraph
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import causal_structure, step_mask
from tokopt.data import spec_bench
from tokopt.models.moefy import default_texts as shipped
from tokopt.runtime.prompts import encode_prompts
from tokopt.training.specdec import _corpus_files, _id_chunks, _read_texts, _text_chunks

RANKS = 10  # ranks of each prompt row's guesses whose accuracy is recorded (the drafter's widest level)
VAL_SHARE = 0.1


@dataclass
class TrainResult:
    path: Path  # the saved artifact
    plot: Path  # its loss curve (PNG)
    metrics: dict


def default_texts() -> list:
    """The offline corpus (``shared/data/corpus``) when present, plus the text shipped with tokopt."""

    files = _corpus_files()
    return [f.read_text(encoding="utf-8", errors="replace") for f in files] + shipped()


class _PromptEmbed(torch.nn.Module):
    """The graph's embedding with prompt slots (``ppd_slots.prompt_embedding``); only ``table`` trains."""

    def __init__(self, embed, table):
        super().__init__()
        self.weight = embed.weight
        self.table = table

    def forward(self, ids):
        return prompt_embedding(ids, self.weight, self.table)


def anchored_inputs(length: int, anchors: list, k: int, vocab: int, dtype=torch.float32):
    """Graph inputs of the prompt chains after ``anchors`` of a text of ``length`` tokens already in the cache
    (slot 0 the null slot, slot 1 + i text token i): (ids, positions, mask) for ``len(anchors) * k`` new
    tokens, chain a's prompt token j at row a * k + j, position t + 1 + j, seeing text 0..t and the chain's
    earlier prompt tokens (what a chain after a tree node sees at decode time)."""
    n = len(anchors) * k
    t = torch.tensor(anchors).repeat_interleave(k)
    j = torch.arange(k).repeat(len(anchors))
    ids = (vocab + j)[None]
    positions = (t + 1 + j)[None]
    past = torch.arange(length)[None, :] <= t[:, None]  # [n, length]
    chain = torch.block_diag(*[torch.ones(k, k, dtype=torch.bool).tril()] * len(anchors))
    allowed = torch.cat([torch.zeros(n, 1, dtype=torch.bool), past, chain], dim=1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return ids, positions, mask[None, None]


def _forward(graph, cache, chunk, anchors, k, vocab):
    """(prompt rows' logits, teacher logits at t + 1 + j), ``[A, k, V]`` each: the text runs once without
    gradients (its rows never see prompt tokens), then the chains run against its cache."""
    chunk = torch.as_tensor(chunk)[None]
    length = chunk.shape[1]
    dtype = graph.spec.torch_dtype
    with torch.no_grad():
        mask = step_mask(cache.valid, causal_structure(length, 1), dtype=dtype)
        teacher, *present = graph(chunk, torch.arange(length)[None], mask, torch.arange(length), *cache.tensors)
    ids, positions, mask = anchored_inputs(length, anchors, k, vocab, dtype)
    student = graph(ids, positions, mask, torch.arange(ids.shape[1]), *present)[0][0]
    targets = torch.tensor([[t + 1 + j for j in range(k)] for t in anchors])
    return student.view(len(anchors), k, -1), teacher[0][targets]


def _kl(student, teacher):
    """Per (anchor, position) KL(teacher || student), ``[A, k]``."""
    t = teacher.float().log_softmax(-1)
    return (t.exp() * (t - student.float().log_softmax(-1))).sum(-1)


def _anchors(length: int, k: int, count: int, rng: random.Random) -> list:
    last = length - 1 - k  # t + 1 + j <= length - 1 for every j < k
    if last < 0:
        return []
    return sorted(rng.sample(range(last + 1), min(count, last + 1)))


@torch.no_grad()
def evaluate(graph, cache, chunks, k, vocab, anchors_per_chunk: int = 48, seed: int = 1) -> dict:
    """Held-out KL per position and ``rank_accuracy[j][r]`` (see module docstring)."""
    rng = random.Random(seed)
    hits = torch.zeros(k, RANKS, dtype=torch.float64)
    kl = torch.zeros(k, dtype=torch.float64)
    count = 0
    for chunk in chunks:
        anchors = _anchors(len(chunk), k, anchors_per_chunk, rng)
        if not anchors:
            continue
        student, teacher = _forward(graph, cache, chunk, anchors, k, vocab)
        kl += _kl(student, teacher).double().sum(0)
        want = teacher.argmax(-1)  # [A, k]
        top = student.topk(RANKS, dim=-1).indices  # [A, k, R]
        hits += (top == want[..., None]).double().sum(0)
        count += len(anchors)
    count = max(count, 1)
    acc = hits / count
    return {"kl": (kl / count).tolist(), "rank_accuracy": acc.tolist(),
            "top1": acc[:, 0].tolist(), "top5": acc[:, :5].sum(1).tolist(), "top10": acc.sum(1).tolist(),
            "anchors": count}


def read_prompts(path, skip_per_category: int = 0, limit: int | None = None) -> list:
    """Training prompts from a file: Spec-Bench-style JSON lines (first turn of each; ``skip_per_category`` skips
    the first questions of every category, the ones ``tokopt bench --per-category N`` measures) or plain text,
    one prompt per line; ``limit`` of them spread evenly over the file."""

    path = Path(path)
    if not path.is_file():
        raise TokoptError(f"prompts file {path} does not exist; give JSON lines with 'turns' or one prompt per line")
    if path.suffix == ".jsonl":
        prompts = [q["question"] for q in spec_bench(path, per_category=10**9, skip=skip_per_category)]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise TokoptError(f"{path} holds no prompts (one per line, or JSON lines with 'turns')")
    if limit is not None:
        if limit < 1:
            raise TokoptError(f"the prompt limit must be >= 1, got {limit}")
        prompts = [prompts[i * len(prompts) // limit] for i in range(min(limit, len(prompts)))]
    return prompts


def generated_sequences(model, tokenizer, prompts: list, max_new_tokens: int = 128, batch: int = 8,
                        progress: bool = True) -> list:
    """The model's own greedy answers to chat ``prompts``, as token-id sequences (prompt + answer): the text a
    deployed model's drafter sees, for self-distillation."""
    import tokopt

    opt = tokopt.optimize(model)
    encoded = [encode_prompts(tokenizer, [p])[0][0] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths batch with little padding
    rows = [None] * len(prompts)
    for start in progress_bar(range(0, len(order), batch), desc="generating PPD training text", unit="batch",
                              disable=not progress):
        picked = order[start:start + batch]
        ids, mask = encode_prompts(tokenizer, [prompts[i] for i in picked])
        opt.generate(ids, mask, max_new_tokens=max_new_tokens)
        result = opt.last_result
        for b, i in enumerate(picked):
            answer = result.new_tokens[b, :int(result.generated_counts[b])]
            rows[i] = torch.cat([ids[b][mask[b].bool()], answer]).tolist()
    return rows


def train_ppd(model=None, *, texts=None, token_ids=None, prompts=None, tokenizer=None, k: int = DEFAULT_K,
              steps: int = 200, seq_len: int = 128, anchors: int = 48, max_tokens: int = 40_000, lr: float = 3e-3,
              gen_tokens: int = 128, out=None, progress: bool = True, seed: int = 0) -> TrainResult:
    """Train and save ``model``'s k prompt embeddings (``model``: name, path, loaded model or None for the
    default). ``texts``: strings, files or folders of ``*.txt`` (default: ``default_texts()`` unless
    ``prompts`` is given), or ``token_ids`` (sequences of ids, for models without a tokenizer). ``prompts``:
    chat prompts the model answers first (``gen_tokens`` greedy tokens each); the answers are training text
    too (self-distillation on the model's own generations). Each of ``steps``
    Adam steps runs one chunk of ``seq_len`` tokens with ``anchors`` prompt chains (about 0.7 s for SmolLM2-135M
    on 2 idle cores); ``max_tokens`` caps the text read. Saved to ``out`` or ``ppd_artifact_path``."""

    if not 1 <= k <= 16:
        raise TokoptError(f"k (prompt tokens) must be in 1..16, got {k}")
    if steps < 1 or anchors < 1 or seq_len < k + 2:
        raise TokoptError(f"need steps >= 1, anchors >= 1 and seq_len >= k + 2; got {steps}, {anchors}, {seq_len}")
    start = time.perf_counter()
    if texts is not None and token_ids is not None:
        raise TokoptError("pass texts or token_ids, not both")
    if texts is not None or token_ids is not None or prompts is None:
        sources = None if token_ids is not None else default_texts() if texts is None else _read_texts(texts)
    else:
        sources = []
    target, model_tokenizer = load(model, progress=progress)
    tokenizer = tokenizer or model_tokenizer
    if (sources or prompts) and tokenizer is None:
        raise TokoptError("this model has no tokenizer to read text with; pass tokenizer=... or token_ids=...")
    chunks = []
    if prompts:
        answers = generated_sequences(target, tokenizer, list(prompts), gen_tokens, progress=progress)
        chunks += _id_chunks([row[-seq_len:] for row in answers], seq_len, max_tokens)
    if sources is None:
        chunks += _id_chunks(token_ids, seq_len, max_tokens)
    elif sources:
        chunks += _text_chunks(sources, tokenizer, seq_len, max(max_tokens - sum(map(len, chunks)), seq_len))
    chunks = [c for c in chunks if len(c) >= k + 2]
    if len(chunks) < 2:
        raise TokoptError(f"only {sum(len(c) for c in chunks)} tokens of text: training needs at least two chunks "
                          f"of up to {seq_len} tokens (one is held out); pass more text")
    rng = random.Random(seed)
    order = list(range(len(chunks)))
    rng.shuffle(order)
    n_val = max(1, round(VAL_SHARE * len(chunks)))
    val, train = [chunks[i] for i in order[:n_val]], [chunks[i] for i in order[n_val:]]

    vocab = target.config.vocab_size
    frozen = [p for p in target.parameters() if p.requires_grad]
    for p in frozen:  # only the prompt table trains; restored below
        p.requires_grad_(False)
    embed = target.model.embed_tokens
    init = embed.weight[:vocab].float().mean(0, keepdim=True).repeat(k, 1).to(embed.weight.dtype)
    table = torch.nn.Parameter(init.clone())
    graph = DecoderGraph(target).eval()
    graph.embed_tokens = _PromptEmbed(embed, table)
    cache = KVCache.empty(graph.spec, 1)

    control = evaluate(graph, cache, val, k, vocab)
    optimizer = torch.optim.Adam([table], lr=lr)
    curve = {"train": [], "train_per_position": []}
    bar = progress_bar(range(steps), desc="training PPD prompt embeddings", unit="step", disable=not progress)
    train_start = time.perf_counter()
    for step in bar:
        chunk = train[step % len(train)]
        picks = _anchors(len(chunk), k, anchors, rng)
        if not picks:
            continue
        student, teacher = _forward(graph, cache, chunk, picks, k, vocab)
        per = _kl(student, teacher).mean(0)
        loss = per.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve["train"].append(float(loss.detach()))
        curve["train_per_position"].append(per.detach().tolist())
        bar.set_postfix(kl=f"{curve['train'][-1]:.3f}")
    train_s = time.perf_counter() - train_start
    trained = evaluate(graph, cache, val, k, vocab)
    for p in frozen:
        p.requires_grad_(True)
    table = table.detach().clone()
    fingerprint = model_fingerprint(target)
    metrics = {"k": k, "steps": steps, "prompts": len(prompts or []), "seq_len": seq_len, "anchors_per_step": anchors, "lr": lr,
               "train_chunks": len(train), "val_chunks": len(val), "train_seconds": train_s,
               "seconds": time.perf_counter() - start, "val": trained, "val_control": control,
               "rank_accuracy": trained["rank_accuracy"], "train_kl_first": curve["train"][0],
               "train_kl_last": curve["train"][-1], "bytes": table.numel() * table.element_size()}
    path = save_ppd_artifact(table, fingerprint, metrics, out, curve=curve,
                             model_name=getattr(target, "name_or_path", ""))
    plot = path.with_suffix(".png")
    _plot(curve, metrics, plot)
    return TrainResult(path, plot, metrics)


def _plot(curve: dict, metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    per = torch.tensor(curve["train_per_position"])
    for j in range(per.shape[1]):
        ax.plot(range(1, per.shape[0] + 1), per[:, j], lw=0.8, alpha=0.7, label=f"prompt token {j} (t+{j + 2})")
    for j, value in enumerate(metrics["val"]["kl"]):
        ax.axhline(value, color=f"C{j}", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("KL(model || prompt row)")
    top1 = ", ".join(f"{a:.2f}" for a in metrics["val"]["top1"])
    ctrl = ", ".join(f"{a:.2f}" for a in metrics["val_control"]["top1"])
    ax.set_title(f"PPD prompt tokens: held-out top-1 {top1} (untrained {ctrl}); dashed: held-out KL", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
