"""Training the SpecDec++ acceptance head (``tokopt train-specdec``) for a target/draft pair.

The target and the draft (resolved exactly as ``specdec++`` resolves it at run time: ``config.draft_model``
or the self-speculative draft) run teacher-forced over chunks of text. Each position t gives one example:
the feature is the draft's final normed hidden state at t (the node a token is drafted FROM, as
``SpecDecPolicy`` sees it) and the label is whether the token drafted from t is accepted:

- greedy (tokopt's default decoding, the default label): ``1[argmax q_t == argmax p_t]``;
- sampling: the acceptance probability of a token drawn from q, ``sum_y min(p_t(y), q_t(y))``, a soft label
  (temperature 1, no top-k/top-p).

Both positive rates are recorded. ``AcceptanceHead`` is trained with Adam on a weighted BCE that weights the
rejection class by ``reject_weight`` (default 6, the paper's mismatch weight). The weight shifts the head's
logit by about ``-ln 6``: it predicts rejection more readily, so with ``SpecDecPolicy``'s default stop
threshold 0.3 drafting goes on after a token only when its calibrated acceptance probability is above ~0.93. That
suits the self-speculative draft, whose forward costs ~80% of the target's; for a much cheaper draft model,
a weight near 1 (or a higher threshold) drafts longer chains. A random 10% of the chunks is held out for
validation. The head is saved with the pair's fingerprints at ``specdec_head_path`` (where ``specdec++``
looks), with a loss-curve PNG beside it.

Example::

    from tokopt.training.specdec import train_specdec
    result = train_specdec(max_tokens=8000, epochs=2)      # default model, self-speculative draft
    print(result.metrics["val_auc"], result.path)
    opt = tokopt.optimize(speculative="specdec++")          # the same pair: finds the head
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tokopt.errors import TokoptError
from tokopt.models.loading import load, model_fingerprint
from tokopt.progress import quiet
from tokopt.models.decoder_graph import DecoderGraph
from tokopt.models.kv_cache import KVCache
from tokopt.models.masks import causal_structure, step_mask
from tokopt.runtime.speculative.drafters.specdec import AcceptanceHead, save_head
from tokopt.runtime.artifacts import specdec_head_path
from tokopt.runtime.speculative.methods import SpeculativeConfig, resolve_draft

LABELS = ("greedy", "sampling")
VAL_SHARE = 0.1
# Mini-batches of 64 at Adam lr 1e-4 (the default): an Adam step moves the logit by up to lr * sum|x|, and the
# features (final-normed hidden states) are large, RMS ~1.8 over 576 dims for SmolLM2; at lr 1e-3 and batch
# 256 the first steps overshot (training loss rose from the constant predictor's 1.32 to 1.9).
BATCH = 64
CHARS_PER_TOKEN = 8  # generous: a window of seq_len * 8 characters holds seq_len tokens of prose or code


@dataclass
class TrainResult:
    path: Path  # the saved head
    plot: Path  # its loss curve (PNG)
    metrics: dict


def train_specdec(model=None, *, config=None, texts=None, token_ids=None, tokenizer=None, max_tokens: int = 24_000,
                  seq_len: int = 256, epochs: int = 3, reject_weight: float = 6.0, label: str = "greedy",
                  blocks: int = 1, lr: float = 1e-4, out=None, progress: bool = True, seed: int = 0) -> TrainResult:
    """Train and save the SpecDec++ acceptance head for ``model`` (name, path, loaded model or None for the
    default) and the draft ``config`` (a ``SpeculativeConfig("specdec++", ...)``; default: self-speculative).

    Data: ``texts`` (strings, or files / folders of ``*.txt`` given as ``Path``s or as strings naming existing
    paths; default the offline corpus ``shared/data/corpus``) tokenized with ``tokenizer`` (default: the
    model's), or ``token_ids`` (sequences of ids, for models without a tokenizer). At most ``max_tokens``
    examples in chunks of ``seq_len`` tokens; 24,000 take about 2.7 minutes of forwards for SmolLM2-135M on
    2 idle CPU cores (~1.7 s per chunk for target and draft; several times longer on busy cores). The head
    goes to ``out`` or, by default, where ``specdec++`` looks for this pair's head.
    """
    start = time.perf_counter()
    config = config or SpeculativeConfig("specdec++")
    _check_args(config, max_tokens, seq_len, epochs, reject_weight, label, blocks, texts, token_ids)
    sources = None if token_ids is not None else _read_texts(texts)  # a missing corpus fails before loading
    target, model_tokenizer = load(model, progress=progress)
    tokenizer = tokenizer or model_tokenizer
    if seq_len > target.config.max_position_embeddings:
        raise TokoptError(f"seq_len {seq_len} exceeds the model's context ({target.config.max_position_embeddings})")
    if sources is not None:
        if tokenizer is None:
            raise TokoptError("this model has no tokenizer to read text with; pass tokenizer=... or token_ids=...")
        chunks = _text_chunks(sources, tokenizer, seq_len, max_tokens)
    else:
        chunks = _id_chunks(token_ids, seq_len, max_tokens)
    if len(chunks) < 2:
        raise TokoptError(f"only {sum(len(c) for c in chunks)} tokens of text: training needs at least two chunks "
                          f"of up to {seq_len} tokens (one is held out); pass more text")
    draft, keep = resolve_draft(config, target, tokenizer, target.config.vocab_size)

    forward_start = time.perf_counter()
    data = _examples(target, draft, keep, chunks, progress)
    forward_s = time.perf_counter() - forward_start
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(VAL_SHARE * len(chunks)))
    val, train = _gather(data, order[:n_val]), _gather(data, order[n_val:])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AcceptanceHead(draft.config.hidden_size, blocks)
        with torch.no_grad():  # start as the best constant predictor
            head.out.bias.fill_(_constant_logit(float(train[label].mean()), reject_weight))
        curve = _fit(head, train, val, label, reject_weight, epochs, lr, progress)

    metrics = _metrics(head, train, val, label, reject_weight, curve)
    metrics.update(label=label, reject_weight=reject_weight, epochs=epochs, seq_len=seq_len,
                   positive_rate_greedy=float(torch.cat([d["greedy"] for d in data]).mean()),
                   positive_rate_sampling=float(torch.cat([d["sampling"] for d in data]).mean()),
                   examples=len(train["hidden"]) + len(val["hidden"]), train_examples=len(train["hidden"]),
                   val_examples=len(val["hidden"]), chunks=len(chunks),
                   draft_layers=None if keep is None else list(keep), forward_seconds=forward_s)
    target_fp, draft_fp = model_fingerprint(target), model_fingerprint(draft, keep)
    path = Path(out) if out is not None else specdec_head_path(target_fp, draft_fp)
    metrics["seconds"] = time.perf_counter() - start
    save_head(head, path, target_fingerprint=target_fp, draft_fingerprint=draft_fp, meta=metrics)
    plot = path.with_suffix(".png")
    _plot(curve, metrics, plot)
    return TrainResult(path, plot, metrics)


def _check_args(config, max_tokens, seq_len, epochs, reject_weight, label, blocks, texts, token_ids) -> None:
    if config.method != "specdec++":
        raise TokoptError(f"train_specdec trains the specdec++ head; got a config for {config.method!r}")
    for name, value, least in (("max_tokens", max_tokens, 2), ("seq_len", seq_len, 2), ("epochs", epochs, 1),
                               ("blocks", blocks, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise TokoptError(f"{name} must be an integer >= {least}, got {value!r}")
    if not reject_weight > 0:
        raise TokoptError(f"reject_weight must be > 0, got {reject_weight!r}")
    if label not in LABELS:
        raise TokoptError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    if texts is not None and token_ids is not None:
        raise TokoptError("pass texts or token_ids, not both")


def _corpus_files() -> list:
    """The offline corpus' ``*.txt`` files: ``$TOKOPT_SHARED/data/corpus`` or ``../shared`` beside the repo."""
    env = os.environ.get("TOKOPT_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared")
    shared = next((p for p in candidates if p.is_dir()), None)
    return sorted((shared / "data" / "corpus").glob("*.txt")) if shared else []


def _read_texts(texts) -> list:
    """The training texts: strings as given, files read, folders' ``*.txt`` files read."""
    if texts is None:
        files = _corpus_files()
        if not files:
            raise TokoptError("no training text: the offline corpus (shared/data/corpus, or $TOKOPT_SHARED) is not "
                              "here; pass --text FILE (a text file or a folder of .txt files)")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if isinstance(texts, (str, Path)):
        texts = [texts]
    out = []
    for item in texts:
        path = Path(item)
        if isinstance(item, Path) or _is_path(item):
            if path.is_dir():
                files = sorted(path.glob("*.txt"))
                if not files:
                    raise TokoptError(f"{path} is a folder without .txt files; pass text files or such a folder")
                out += [f.read_text(encoding="utf-8", errors="replace") for f in files]
            elif path.is_file():
                out.append(path.read_text(encoding="utf-8", errors="replace"))
            else:
                raise TokoptError(f"no such file or folder: {path}")
        else:
            out.append(item)
    if not any(t.strip() for t in out):
        raise TokoptError("the training text is empty")
    return out


def _is_path(text: str) -> bool:
    try:
        return "\n" not in text and Path(text).exists()
    except OSError:  # a long string is no path
        return False


def _text_chunks(texts: list, tokenizer, seq_len: int, max_tokens: int) -> list:
    """Up to ``max_tokens`` tokens in chunks of ``seq_len``, spread evenly over the texts and, within a long
    text, over evenly spaced windows (so a big corpus is sampled throughout, not just its beginning)."""
    wanted = max(1, max_tokens // seq_len)
    share = [wanted // len(texts) + (i < wanted % len(texts)) for i in range(len(texts))]
    span = seq_len * CHARS_PER_TOKEN
    chunks = []
    for text, k in zip(texts, share):
        if k == 0:
            continue
        if len(text) <= k * span:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            chunks += [torch.tensor(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)][:k]
            continue
        for j in range(k):
            offset = j * (len(text) - span) // max(k - 1, 1)
            line = text.rfind("\n", 0, offset) + 1 if offset else 0  # start at a line
            ids = tokenizer(text[line:line + span], add_special_tokens=False).input_ids
            chunks.append(torch.tensor(ids[:seq_len]))
    return _cap([c for c in chunks if len(c)], max_tokens)


def _id_chunks(token_ids, seq_len: int, max_tokens: int) -> list:
    chunks = []
    for row in token_ids:
        row = torch.as_tensor(row, dtype=torch.long).reshape(-1)
        chunks += list(row.split(seq_len))
    return _cap(chunks, max_tokens)


def _cap(chunks: list, max_tokens: int) -> list:
    out, total = [], 0
    for chunk in chunks:
        if total >= max_tokens:
            break
        out.append(chunk[:max_tokens - total])
        total += len(out[-1])
    return out


def _forward(graph, ids):
    """Teacher-forced forward of one chunk: the graph's outputs with logits (and hidden) at every position."""
    n = len(ids)
    cache = KVCache.empty(graph.spec, 1)
    mask = step_mask(cache.valid, causal_structure(n, 1), dtype=graph.spec.torch_dtype)
    return graph(ids[None], torch.arange(n)[None], mask, torch.arange(n), *cache.tensors)


def _examples(target, draft, keep, chunks: list, progress: bool) -> list:
    """Per chunk, at every position: the draft's hidden state, both acceptance labels, and the draft's top
    probability (a baseline predictor of acceptance)."""
    from tqdm.auto import tqdm

    target_graph = DecoderGraph(target).eval()
    draft_graph = DecoderGraph(draft, keep_layers=keep, return_hidden=True).eval()
    data = []
    bar = tqdm(chunks, desc="tokopt: target and draft forwards", unit="chunk", disable=not progress or quiet())
    with torch.no_grad():
        for ids in bar:
            p_logits = _forward(target_graph, ids)[0][0].float()
            outputs = _forward(draft_graph, ids)
            q_logits, hidden = outputs[0][0].float(), outputs[-1][0].float()
            q = q_logits.softmax(-1)
            sampling = torch.minimum(p_logits.softmax(-1), q).sum(-1).clamp(0, 1)
            greedy = (p_logits.argmax(-1) == q_logits.argmax(-1)).float()
            data.append({"hidden": hidden, "greedy": greedy, "sampling": sampling, "confidence": q.max(-1).values})
    return data


def _gather(data: list, index: list) -> dict:
    return {key: torch.cat([data[i][key] for i in index]) for key in data[0]}


def _weighted_bce(logits, labels, reject_weight: float):
    """BCE with the rejection class weighted: ``y * softplus(-z) + w * (1 - y) * softplus(z)``, mean."""
    nn = torch.nn.functional
    return (labels * nn.softplus(-logits) + reject_weight * (1 - labels) * nn.softplus(logits)).mean()


def _fit(head, train: dict, val: dict, label: str, reject_weight: float, epochs: int, lr: float,
         progress: bool) -> dict:
    """Adam over shuffled mini-batches; the curve: per-step training loss and per-epoch validation loss."""
    from tqdm.auto import tqdm

    x, y = train["hidden"], train[label]
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(x) / BATCH)
    curve = {"train": [], "val": [], "val_step": []}
    bar = tqdm(total=epochs * steps_per_epoch, desc="tokopt: training the acceptance head", unit="step",
               disable=not progress or quiet())
    for _ in range(epochs):
        head.train()
        for batch in torch.randperm(len(x)).split(BATCH):
            loss = _weighted_bce(head(x[batch]), y[batch], reject_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            curve["train"].append(loss.item())
            bar.update()
        head.eval()
        with torch.no_grad():
            curve["val"].append(float(_weighted_bce(head(val["hidden"]), val[label], reject_weight)))
        curve["val_step"].append(len(curve["train"]))
        bar.set_postfix(val_bce=f"{curve['val'][-1]:.4f}")
    bar.close()
    return curve


def _metrics(head, train: dict, val: dict, label: str, reject_weight: float, curve: dict) -> dict:
    """Validation quality of the head. Classification metrics use the trained label binarized at 0.5 (exact
    for the greedy label) and the head's own decision ``P(accept) > 0.5`` (which the rejection weight makes
    conservative). Baselines: the best constant predictor's BCE, and the AUC of the draft's top probability."""
    with torch.no_grad():
        train_bce = float(_weighted_bce(head(train["hidden"]), train[label], reject_weight))
        logits = head(val["hidden"])
    labels = val[label]
    constant = torch.full_like(labels, _constant_logit(float(train[label].mean()), reject_weight))
    truth, said = labels > 0.5, logits > 0
    recall_pos = float((said & truth).sum() / truth.sum()) if truth.any() else float("nan")
    recall_neg = float((~said & ~truth).sum() / (~truth).sum()) if (~truth).any() else float("nan")
    return {"train_bce": train_bce, "val_bce": curve["val"][-1],
            "val_bce_constant": float(_weighted_bce(constant, labels, reject_weight)),
            "val_accuracy": float((said == truth).float().mean()),
            "val_balanced_accuracy": (recall_pos + recall_neg) / 2, "val_auc": _auc(logits, truth),
            "val_auc_draft_confidence": _auc(val["confidence"], truth),
            "val_mean_p_accept": float(torch.sigmoid(logits).mean())}


def _constant_logit(rate: float, reject_weight: float) -> float:
    """The logit minimizing the weighted BCE when the positive rate is ``rate``: P = rate / (rate + w (1 - rate))."""
    return math.log(max(rate, 1e-6) / (reject_weight * max(1 - rate, 1e-6)))


def _auc(scores, truth) -> float:
    """ROC AUC (Mann-Whitney U, ties at half); NaN when the labels are all one class."""
    n_pos = int(truth.sum())
    n_neg = len(truth) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    average_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based, ties share their mean rank
    rank_sum = float(average_rank[inverse][truth].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _plot(curve: dict, metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(curve["train"]) + 1), curve["train"], color="#4a7fb5", alpha=0.6, lw=0.8,
            label="train (per batch)")
    ax.plot(curve["val_step"], curve["val"], "o-", color="#c0392b", label="validation (per epoch)")
    ax.axhline(metrics["val_bce_constant"], color="gray", ls="--", lw=0.8, label="constant predictor")
    ax.set_xlabel("step")
    ax.set_ylabel(f"weighted BCE (reject weight {metrics['reject_weight']:g})")
    ax.set_title(f"SpecDec++ head, {metrics['label']} label: val AUC {metrics['val_auc']:.3f}, "
                 f"acc {metrics['val_accuracy']:.3f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
