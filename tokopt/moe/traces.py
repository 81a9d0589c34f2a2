"""Routing traces: which experts every token visited at every MoE layer.

A trace is ``experts[tokens, layers, top_k]`` (int64, each token's experts sorted by descending gate weight),
optional ``weights`` of the same shape (float32) and ``num_experts``. Sources: ``.npy`` / ``.npz`` arrays,
folders of FLAME-MoE-style per-layer CSVs, or a live Hugging Face MoE model (``record_trace``).

Example::

    from tokopt.moe.traces import load_trace, save_trace
    trace = load_trace("shared/data/moe_traces/flame_moe_290m/prefill")   # 2048 tokens x 8 layers x top-6
    save_trace(trace, "flame_prefill.npz")
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokopt.errors import TokoptError
from tokopt.progress import progress_bar

ACCEPTED = ("a .npy int array [tokens, layers, top_k]; a .npz with key 'experts' (optional 'weights'); "
            "a folder of per-layer CSVs (layer_id, token_id, expert_0..expert_{E-1}); or a folder of such folders")


@dataclass
class RoutingTrace:
    """Expert ids ``experts[T, L, k]`` (by descending gate weight), optional ``weights[T, L, k]``, ``num_experts``.

    ``moe_layers`` optionally names the model layer index of each trace layer (dense layers are not traced).

    Example::

        t = RoutingTrace(np.array([[[0], [1]]]), None, num_experts=2)    # 1 token, 2 layers, top-1
        t.top1      # [[0, 1]]
    """

    experts: np.ndarray
    weights: np.ndarray | None
    num_experts: int
    moe_layers: list[int] | None = field(default=None)

    def __post_init__(self):
        e = np.asarray(self.experts)
        if e.ndim == 2:  # [T, L] -> top-1
            e = e[:, :, None]
        if e.ndim != 3:
            raise TokoptError(f"routing trace experts must be [tokens, layers, top_k], got shape {e.shape}")
        if e.size and not np.issubdtype(e.dtype, np.integer):
            if not np.all(np.equal(np.mod(e, 1), 0)):
                raise TokoptError(f"routing trace experts must be integer expert ids, got dtype {e.dtype}")
        e = e.astype(np.int64)
        if e.shape[0] == 0 or e.shape[1] == 0 or e.shape[2] == 0:
            raise TokoptError(f"routing trace is empty (shape {e.shape}); need >= 1 token, layer and expert slot")
        if int(self.num_experts) <= 0:
            raise TokoptError(f"num_experts must be positive, got {self.num_experts}")
        self.num_experts = int(self.num_experts)
        lo, hi = int(e.min()), int(e.max())
        if lo < 0 or hi >= self.num_experts:
            raise TokoptError(f"expert ids must lie in 0..{self.num_experts - 1}, found range {lo}..{hi}")
        if e.shape[2] > 1:
            s = np.sort(e, axis=2)
            if np.any(s[:, :, 1:] == s[:, :, :-1]):
                raise TokoptError("a token lists the same expert twice at one layer; top-k experts must be distinct")
        self.experts = e
        if self.weights is not None:
            w = np.asarray(self.weights)
            if w.shape != e.shape:
                raise TokoptError(f"weights shape {w.shape} must equal experts shape {e.shape} "
                                  "([tokens, layers, top_k]); or pass weights=None")
            w = w.astype(np.float32)
            if not np.all(np.isfinite(w)) or np.any(w < 0):
                raise TokoptError("gate weights must be finite and >= 0")
            self.weights = w
        if self.moe_layers is not None and len(self.moe_layers) != e.shape[1]:
            raise TokoptError(f"moe_layers has {len(self.moe_layers)} entries for {e.shape[1]} traced layers")

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def top1(self) -> np.ndarray:
        """``[T, L]`` expert with the largest gate weight."""
        return self.experts[:, :, 0]

    def subset(self, tokens) -> "RoutingTrace":
        """The trace restricted to ``tokens`` (an index array, slice or boolean mask)."""
        w = None if self.weights is None else self.weights[tokens]
        return RoutingTrace(self.experts[tokens], w, self.num_experts, self.moe_layers)

    def __repr__(self) -> str:
        return (f"RoutingTrace(tokens={self.num_tokens}, layers={self.num_layers}, top_k={self.top_k}, "
                f"num_experts={self.num_experts}, weights={'yes' if self.weights is not None else 'no'})")


def from_weights(gates: np.ndarray, k: int | None = None) -> RoutingTrace:
    """Trace from dense gate weights ``[T, L, E]`` (zeros = not routed); experts sorted by weight."""
    gates = np.asarray(gates, dtype=np.float32)
    nz = (gates != 0).sum(axis=2)
    if k is None:
        k = int(nz.max())
    if k == 0 or np.any(nz != k):
        raise TokoptError(f"every row must have exactly top_k={k} non-zero gate weights; found counts "
                          f"{sorted(set(nz.ravel().tolist()))[:8]}")
    order = np.argsort(-gates, axis=2, kind="stable")[:, :, :k]
    return RoutingTrace(order, np.take_along_axis(gates, order, axis=2), gates.shape[2])


def _read_layer_csv(path: Path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise TokoptError(f"{path}: empty CSV; expected columns layer_id, token_id, expert_0..") from None
        header = [h.strip() for h in header]
        if "token_id" not in header or not any(h.startswith("expert_") for h in header):
            raise TokoptError(f"{path}: columns {header[:4]}... are not a routing CSV; expected "
                              "layer_id, token_id, expert_0..expert_{E-1}")
        try:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as exc:
            raise TokoptError(f"{path}: unreadable row ({exc}); expected numbers in every column") from None
    if table.shape[0] and table.shape[1] != len(header):
        raise TokoptError(f"{path}: rows have {table.shape[1]} columns, header has {len(header)}")
    expert_cols = [i for i, h in enumerate(header) if h.startswith("expert_")]
    expert_cols.sort(key=lambda i: int(header[i].split("_")[1]))
    data = table[:, expert_cols].astype(np.float32)
    tok = table[:, header.index("token_id")].astype(np.int64)
    layer = int(table[0, header.index("layer_id")]) if "layer_id" in header and len(table) else None
    if data.shape[0] == 0:
        raise TokoptError(f"{path}: no rows")
    return layer, tok, data


def _layer_number(path: Path, csv_layer):
    m = re.search(r"layer[_-]?(\d+)", path.name)
    if m:
        return int(m.group(1))
    if csv_layer is not None:
        return csv_layer
    raise TokoptError(f"{path}: cannot tell the layer number (no 'layerN' in the file name, no layer_id column)")


def _load_csv_folder(folder: Path) -> RoutingTrace:
    files = sorted(folder.glob("*.csv"))
    layers = []
    for p in files:
        csv_layer, tok, data = _read_layer_csv(p)
        layers.append((_layer_number(p, csv_layer), p, tok, data))
    layers.sort(key=lambda x: x[0])
    nums = [x[0] for x in layers]
    if len(set(nums)) != len(nums):
        raise TokoptError(f"{folder}: two CSVs for the same layer ({nums}); keep one file per layer")
    ref_tokens = np.sort(layers[0][2])
    if len(np.unique(ref_tokens)) != len(ref_tokens):
        raise TokoptError(f"{layers[0][1]}: token_id repeats; each token must appear once per layer")
    gates = []
    for num, p, tok, data in layers:
        if tok.shape != ref_tokens.shape or not np.array_equal(np.sort(tok), ref_tokens):
            raise TokoptError(f"{p.name} has a different set of token_ids than {layers[0][1].name} "
                              f"({len(tok)} vs {len(ref_tokens)} tokens); every layer CSV must list the same tokens")
        if data.shape[1] != layers[0][3].shape[1]:
            raise TokoptError(f"{p.name} has {data.shape[1]} expert columns, {layers[0][1].name} has "
                              f"{layers[0][3].shape[1]}")
        gates.append(data[np.argsort(tok, kind="stable")])
    try:
        trace = from_weights(np.stack(gates, axis=1))
    except TokoptError as exc:
        raise TokoptError(f"{folder}: {exc}") from None
    trace.moe_layers = nums
    return trace


def concat_traces(traces: list[RoutingTrace]) -> RoutingTrace:
    """Tokens of several traces with the same layers, top_k and experts, one after another."""
    first = traces[0]
    for t in traces[1:]:
        if (t.num_layers, t.top_k, t.num_experts) != (first.num_layers, first.top_k, first.num_experts):
            raise TokoptError(f"cannot concatenate traces of different shapes: {first!r} and {t!r}")
    w = None if any(t.weights is None for t in traces) else np.concatenate([t.weights for t in traces])
    return RoutingTrace(np.concatenate([t.experts for t in traces]), w, first.num_experts, first.moe_layers)


def load_trace(path, *, num_experts: int | None = None) -> RoutingTrace:
    """Load a routing trace from ``.npy``, ``.npz``, a folder of per-layer CSVs, or a folder of such folders.

    ``num_experts`` defaults to the ``.npz`` key ``num_experts``, the CSV column count, or max id + 1.

    Example::

        trace = load_trace("shared/data/moe_traces/flame_moe_290m/firstpos")   # 10 subfolders, 640 tokens
    """
    p = Path(path)
    if not p.exists():
        raise TokoptError(f"routing trace {p} does not exist; accepted: {ACCEPTED}")
    if p.is_dir():
        if any(p.glob("*.csv")):
            return _load_csv_folder(p)
        subs = sorted(d for d in p.iterdir() if d.is_dir() and any(d.glob("*.csv")))
        if not subs:
            raise TokoptError(f"{p} holds no CSV files and no folders of CSVs; accepted: {ACCEPTED}")
        return concat_traces([_load_csv_folder(d) for d in subs])
    suffix = p.suffix.lower()
    weights = None
    try:
        if suffix == ".npy":
            experts = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "experts" not in z.files:
                    raise TokoptError(f"{p}: no key 'experts' (keys: {z.files}); accepted: {ACCEPTED}")
                experts = z["experts"]
                weights = z["weights"] if "weights" in z.files else None
                if num_experts is None and "num_experts" in z.files:
                    num_experts = int(z["num_experts"])
        else:
            raise TokoptError(f"{p}: unknown trace format {suffix!r}; accepted: {ACCEPTED}")
    except (ValueError, OSError) as exc:
        raise TokoptError(f"{p}: not a readable numpy file ({exc})") from None
    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise TokoptError(f"{p}: experts array has shape {experts.shape}; expected 3 dims [tokens, layers, top_k]")
    if not np.issubdtype(experts.dtype, np.integer):
        raise TokoptError(f"{p}: experts array has dtype {experts.dtype}; expected integer expert ids")
    if num_experts is None:
        num_experts = int(experts.max()) + 1 if experts.size else 1
    if weights is not None:
        weights = np.asarray(weights)
        if weights.shape == experts.shape:  # sort each token's experts by descending weight
            order = np.argsort(-weights, axis=2, kind="stable")
            experts = np.take_along_axis(experts, order, axis=2)
            weights = np.take_along_axis(weights, order, axis=2)
    return RoutingTrace(experts, weights, num_experts)


def save_trace(trace: RoutingTrace, path) -> Path:
    """Write ``trace`` as ``.npz`` (keys experts, weights if any, num_experts, moe_layers if any)."""
    p = Path(path)
    if p.suffix.lower() != ".npz":
        raise TokoptError(f"save_trace writes .npz files; got {p.name}")
    p.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"experts": trace.experts, "num_experts": np.int64(trace.num_experts)}
    if trace.weights is not None:
        arrays["weights"] = trace.weights
    if trace.moe_layers is not None:
        arrays["moe_layers"] = np.asarray(trace.moe_layers, dtype=np.int64)
    np.savez(p, **arrays)
    return p


def _moe_blocks(model):
    """(layer index, gate module, num_experts) for every decoder layer whose ``mlp`` routes to experts."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TokoptError(f"{type(model).__name__} has no .model.layers; record_trace needs a HF decoder model")
    blocks = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        gate = getattr(mlp, "gate", None)
        if gate is None or getattr(mlp, "experts", None) is None:
            continue
        n = getattr(gate, "num_experts", None) or getattr(getattr(gate, "weight", None), "shape", [None])[0]
        blocks.append((i, gate, int(n)))
    if not blocks:
        raise TokoptError(f"{type(model).__name__} has no MoE layers (no layer.mlp with .gate and .experts); "
                          "record_trace needs a Mixtral, Qwen2/3-MoE or OLMoE-style model")
    return blocks


def record_trace(model, input_ids_batches) -> RoutingTrace:
    """Run ``model`` on each batch and record every MoE layer's top-k routing via forward hooks on ``.gate``.

    ``input_ids_batches``: an iterable of ``[B, S]`` LongTensors, or of dicts with ``input_ids`` and optionally
    ``attention_mask`` (masked positions are dropped). Dense layers are skipped; ``trace.moe_layers`` names the
    model layer index of each traced layer.

    Example::

        trace = record_trace(model, [tokenizer(texts, return_tensors="pt", padding=True)])
    """
    import torch

    blocks = _moe_blocks(model)
    num_experts = blocks[0][2]
    current: dict[int, tuple] = {}

    def hook_for(pos):
        def hook(module, args, output):
            if not (isinstance(output, tuple) and len(output) >= 3):
                raise TokoptError(f"{type(module).__name__} returned {type(output).__name__}; record_trace expects "
                                  "a TopKRouter returning (router_logits, top_k_weights, top_k_index)")
            current[pos] = (output[1].detach().float().reshape(-1, output[1].shape[-1]),
                            output[2].detach().reshape(-1, output[2].shape[-1]))
        return hook

    handles = [gate.register_forward_hook(hook_for(pos)) for pos, (_, gate, _) in enumerate(blocks)]
    experts, weights = [], []
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for batch in input_ids_batches:
                mask = None
                if isinstance(batch, dict) or hasattr(batch, "keys"):
                    ids = batch["input_ids"]
                    mask = batch.get("attention_mask") if hasattr(batch, "get") else None
                else:
                    ids = batch
                ids = torch.as_tensor(ids)
                if ids.ndim == 1:
                    ids = ids[None]
                current.clear()
                model(input_ids=ids, attention_mask=mask)
                if len(current) != len(blocks):
                    raise TokoptError(f"only {len(current)} of {len(blocks)} MoE gates ran during the forward")
                w = torch.stack([current[p][0] for p in range(len(blocks))], dim=1)   # [B*S, L, k]
                e = torch.stack([current[p][1] for p in range(len(blocks))], dim=1)
                order = torch.argsort(-w, dim=2, stable=True)
                w, e = torch.gather(w, 2, order), torch.gather(e, 2, order)
                if mask is not None:
                    keep = torch.as_tensor(mask).reshape(-1).bool()
                    w, e = w[keep], e[keep]
                experts.append(e.cpu().numpy())
                weights.append(w.cpu().numpy())
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    if not experts:
        raise TokoptError("record_trace got no batches; pass at least one [batch, seq] tensor of input ids")
    return RoutingTrace(np.concatenate(experts), np.concatenate(weights), num_experts, [b[0] for b in blocks])


def trace_text(model, tokenizer, text: str, *, tokens: int, chunk: int, progress: bool = True):
    """The routing trace of ``model`` over the first ``tokens`` tokens of ``text``, run ``chunk`` at a time."""
    import torch

    if tokens < 1 or chunk < 1:
        raise TokoptError(f"--tokens and --chunk must be >= 1 (got {tokens}, {chunk})")
    ids = tokenizer(text, return_tensors="pt").input_ids[0, :tokens]
    if len(ids) == 0:
        raise TokoptError("the text has no tokens")
    parts = []
    for start in progress_bar(range(0, len(ids), chunk), desc="tracing routing", unit="chunk", disable=not progress):
        with torch.no_grad():
            parts.append(record_trace(model, [ids[start: start + chunk][None]]))
    return concat_traces(parts)
