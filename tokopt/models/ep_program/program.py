"""An MoE model's step as an FX graph of coarse ops, the IR the expert-parallel passes rewrite.

``capture_program(model)`` builds, for a supported HF MoE (or dense) causal LM, a ``torch.fx.GraphModule``
whose nodes are the phases of one step over a set of tokens::

    tokens, ctx -> embed -> attn_0 -> moe_0 -> attn_1 -> moe_1 -> ... -> head -> (idx, next ids, logits)

Each op takes the resident ``Tokens`` and the rank's ``StepContext`` (rank, process group, KV cache, counters).
Unrewritten, the program runs on one process and equals the HF model (the MoE op is the HF block itself).
The passes in ``passes/`` turn ``moe_l`` into ``route -> dispatch -> experts -> combine`` (two
``all_to_all_single``), apply a placement, and fuse combine into the next dispatch (one Alltoall,
context-coherent attention); collectives appear as ``call_function`` nodes, so they can be counted.

Example::

    gm = capture_program(model)
    ctx = StepContext.single(gm, num_seqs=2)
    idx, next_ids, _ = gm(step_tokens(...), ctx)      # see runtime/distributed/generate.py
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from tokopt.errors import UnsupportedModelError
from tokopt.models.loading import SUPPORTED_ARCHITECTURES, check_supported
from tokopt.models.decoder_graph import DecoderGraph, _fold_mask
from tokopt.models.graph_meta import EPProgramMeta, ep_meta, set_graph_meta
from tokopt.models.ep_program.exchange import Counters, allgather_rows, pack, unpack
from tokopt.models.ep_program.tokens import Tokens

MOE_TYPES = sorted(k for k, v in SUPPORTED_ARCHITECTURES.items() if v == "moe")


def is_moe_block(mlp) -> bool:
    return hasattr(mlp, "gate") and hasattr(mlp, "experts") and hasattr(mlp.experts, "gate_up_proj")


def check_moe(model) -> list[int]:
    """Indices of the model's MoE layers; a clear error for a model without any."""
    family = check_supported(model.config)
    layers = [i for i, layer in enumerate(model.model.layers) if is_moe_block(layer.mlp)]
    if family != "moe" or not layers:
        raise UnsupportedModelError(
            f"{model.config.model_type} has no Mixture-of-Experts layers: expert parallelism needs an MoE model "
            f"(model types {', '.join(MOE_TYPES)}); a dense model runs unsharded with tokopt.optimize")
    return layers


class KVStore:
    """Per layer, K and V of every position of every sequence this rank holds: ``[S, kvH, capacity, D]``."""

    def __init__(self, num_layers, num_seqs, kv_heads, head_dim, dtype, capacity=64):
        self.k = [torch.zeros(num_seqs, kv_heads, capacity, head_dim, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.filled = torch.zeros(num_layers, num_seqs, dtype=torch.int64)  # highest position written + 1

    def write(self, layer, seq, pos, k, v):
        """Store ``k``/``v`` ``[n, kvH, D]`` of tokens (``seq``, ``pos``) at ``layer``."""
        need = int(pos.max()) + 1 if len(pos) else 0
        if need > self.k[layer].shape[2]:
            self._grow(max(need, 2 * self.k[layer].shape[2]))
        self.k[layer][seq, :, pos] = k.to(self.k[layer].dtype)
        self.v[layer][seq, :, pos] = v.to(self.v[layer].dtype)
        for s in seq.unique().tolist():
            self.filled[layer, s] = max(int(self.filled[layer, s]), int(pos[seq == s].max()) + 1)

    def read(self, layer, seq, upto):
        """K, V of sequence ``seq`` at positions ``0..upto-1``: ``[1, kvH, upto, D]`` each."""
        return self.k[layer][seq: seq + 1, :, :upto], self.v[layer][seq: seq + 1, :, :upto]

    def _grow(self, capacity):
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                grown = torch.zeros(*t.shape[:2], capacity, t.shape[3], dtype=t.dtype)
                grown[:, :, : t.shape[2]] = t
                store[i] = grown

    def bytes_held(self) -> int:
        """Bytes of K/V actually written on this rank (all layers, all sequences it holds)."""
        per_pos = 2 * self.k[0].shape[1] * self.k[0].shape[3] * self.k[0].element_size()
        return int(self.filled.sum()) * per_pos


@dataclass
class StepContext:
    """One rank's state across the steps of a generation."""

    rank: int
    world: int
    group: object
    kv: KVStore
    home: torch.Tensor  # [S] rank of each sequence's home (where its tokens start each step)
    counters: Counters = field(default_factory=Counters)
    decode: bool = False  # every sequence has exactly one new token in this step
    coherent: bool = False  # every rank keeps every sequence's K/V (context-coherent program)
    keep_logits: bool = False  # every rank gets whole logits rows (tests), not only the chosen token ids
    pending_kv: list = field(default_factory=list)  # (layer, seq, pos, k, v) to sync at the end of a decode step
    routes: list = field(default_factory=list)  # (step, layer, idx, experts (model numbering), rank) per MoE layer

    @staticmethod
    def single(gm, num_seqs: int, rank: int = 0, world: int = 1, group=None) -> "StepContext":
        meta = ep_meta(gm)
        spec = meta.spec
        kv = KVStore(spec.num_layers, num_seqs, spec.num_kv_heads, spec.head_dim, spec.torch_dtype)
        home = torch.arange(num_seqs) % world
        coherent = meta.strategy == "context_coherent"
        return StepContext(rank, world, group, kv, home, coherent=coherent)


class Embed(nn.Module):
    def __init__(self, embed_tokens):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, tokens: Tokens, ctx: StepContext) -> Tokens:
        return tokens.routed(hidden=self.embed_tokens(tokens.ids))


class Attention(nn.Module):
    """Residual + attention for the resident tokens. ``coherent``: every rank keeps every sequence's K/V, so
    new K/V are shared with all ranks (per layer in prefill, once at the end of a decode step)."""

    def __init__(self, graph: DecoderGraph, layer, index: int):
        super().__init__()
        self.graph = graph
        self.layer = layer
        self.index = index
        self.coherent = False

    def forward(self, tokens: Tokens, ctx: StepContext) -> Tokens:
        g, layer = self.graph, self.layer
        if len(tokens):
            x = layer.input_layernorm(tokens.hidden)[None]
            cos_sin = g.rotary_emb(x, tokens.pos[None])
            q, k, v = g.project_qkv(layer.self_attn, x, cos_sin)  # [1, H, n, D], [1, kvH, n, D]
            k, v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [n, kvH, D]
        else:  # no token here at this layer; the rank still takes part in the K/V exchange
            k = v = torch.zeros(0, g.spec.num_kv_heads, g.spec.head_dim, dtype=tokens.hidden.dtype)
        ctx.kv.write(self.index, tokens.seq, tokens.pos, k, v)
        if self.coherent and ctx.world > 1:
            if ctx.decode:
                ctx.pending_kv.append((self.index, tokens.seq, tokens.pos, k, v))
            else:
                self._share(tokens, k, v, ctx)
        out = torch.zeros_like(tokens.hidden)
        for s in tokens.seq.unique().tolist():
            rows = (tokens.seq == s).nonzero().squeeze(1)
            pos = tokens.pos[rows]
            upto = int(pos.max()) + 1
            keys, values = ctx.kv.read(self.index, s, upto)
            allowed = torch.arange(upto)[None, :] <= pos[:, None]
            mask = torch.zeros(allowed.shape, dtype=keys.dtype).masked_fill(~allowed, torch.finfo(keys.dtype).min)
            attended = g.attend(layer.self_attn, q[:, :, rows], keys, values, _fold_mask(mask[None, None], g.groups))
            out[rows] = attended[0]
        return tokens.routed(hidden=tokens.hidden + out)

    def _share(self, tokens, k, v, ctx):
        width_kv = k.shape[1] * k.shape[2]
        rows = pack(tokens.seq, tokens.pos, k.reshape(len(tokens), width_kv), v.reshape(len(tokens), width_kv))
        parts = allgather_rows(rows, ctx, kind="kv_sync", layer=self.index, width=2 + 2 * width_kv)
        for r, part in enumerate(parts):
            if r == ctx.rank or not len(part):
                continue
            seq, pos, kk, vv = unpack(part, (1, 1, width_kv, width_kv), "iiff")
            ctx.kv.write(self.index, seq[:, 0], pos[:, 0], kk.view(len(part), *k.shape[1:]),
                         vv.view(len(part), *v.shape[1:]))


def sync_pending_kv(tokens_out, ctx: StepContext):
    """End of a coherent decode step: one all-gather makes every rank's new K/V (all layers) visible everywhere.

    A token may have run attention on a different rank at each layer, so each row carries its layer."""
    pending, ctx.pending_kv = ctx.pending_kv, []
    if ctx.world == 1 or not ctx.decode or not ctx.coherent:
        return tokens_out
    kv_shape = ctx.kv.k[0].shape[1], ctx.kv.k[0].shape[3]
    width_kv = kv_shape[0] * kv_shape[1]
    rows = [pack(torch.full_like(seq, layer), seq, pos, k.reshape(len(k), -1), v.reshape(len(v), -1))
            for layer, seq, pos, k, v in pending if len(seq)]
    rows = torch.cat(rows) if rows else torch.empty(0, 3 + 2 * width_kv)
    parts = allgather_rows(rows, ctx, kind="kv_sync", layer=-1, width=3 + 2 * width_kv)
    for r, part in enumerate(parts):
        if r == ctx.rank or not len(part):
            continue
        layer, seq, pos, kk, vv = unpack(part, (1, 1, 1, width_kv, width_kv), "iiiff")
        for i in layer[:, 0].unique().tolist():
            sel = layer[:, 0] == i
            ctx.kv.write(i, seq[sel, 0], pos[sel, 0], kk[sel].view(-1, *kv_shape), vv[sel].view(-1, *kv_shape))
    return tokens_out


class DenseMLP(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, tokens: Tokens, ctx: StepContext) -> Tokens:
        layer = self.layer
        return tokens.routed(hidden=tokens.hidden + layer.mlp(layer.post_attention_layernorm(tokens.hidden[None]))[0])


class MoE(nn.Module):
    """The HF MoE block of one layer, unsharded: residual + block(norm(hidden)). ``perm[j]`` is the model's
    original id of this program's expert j (the identity until a placement is applied)."""

    def __init__(self, layer, index: int):
        super().__init__()
        self.norm = layer.post_attention_layernorm
        self.block = layer.mlp
        self.index = index
        self.register_buffer("perm", torch.arange(layer.mlp.experts.num_experts), persistent=False)

    @property
    def num_experts(self) -> int:
        return self.block.experts.num_experts

    @property
    def top_k(self) -> int:
        return self.block.gate.top_k

    def forward(self, tokens: Tokens, ctx: StepContext) -> Tokens:
        normed = self.norm(tokens.hidden)
        _, _, experts = self.block.gate(normed)
        ctx.routes.append((ctx.counters.step, self.index, tokens.idx, self.perm[experts], ctx.rank))
        return tokens.routed(hidden=tokens.hidden + self.block(normed[None])[0])


class Head(nn.Module):
    """Final norm and LM head for the tokens that want logits, and the greedy choice. Every rank gets every
    choice, by ``idx``: only (idx, token id) travel, or the whole logits rows when ``ctx.keep_logits``."""

    def __init__(self, graph: DecoderGraph):
        super().__init__()
        self.norm = graph.norm
        self.lm_head = graph.lm_head

    def forward(self, tokens: Tokens, ctx: StepContext):
        want = tokens.wants_logits.nonzero().squeeze(1)
        logits = self.lm_head(self.norm(tokens.hidden[want]))
        idx, choice = tokens.idx[want], logits.argmax(-1)
        if ctx.world > 1:
            vocab = logits.shape[-1] if ctx.keep_logits else 0
            cols = (idx, choice, logits) if ctx.keep_logits else (idx, choice)
            parts = allgather_rows(pack(*cols), ctx, kind="logits", layer=-1, width=2 + vocab)
            got = [unpack(p, (1, 1, vocab), "iif") for p in parts]
            idx = torch.cat([g[0][:, 0] for g in got])
            choice = torch.cat([g[1][:, 0] for g in got])
            logits = torch.cat([g[2] for g in got])
        order = idx.argsort()
        return idx[order], choice[order], (logits[order] if ctx.keep_logits else None)


def capture_program(model) -> fx.GraphModule:
    """The step program of ``model`` (see module docstring), unsharded: runs on one process."""
    check_supported(model.config)
    graph = DecoderGraph(model).eval()
    root = nn.Module()
    root.embed = Embed(graph.embed_tokens)
    g = fx.Graph()
    tokens, ctx = g.placeholder("tokens"), g.placeholder("ctx")
    h = g.call_module("embed", (tokens, ctx))
    moe_layers = []
    for i, layer in enumerate(graph.layers):
        root.add_module(f"attn_{i}", Attention(graph, layer, i))
        h = g.call_module(f"attn_{i}", (h, ctx))
        h.meta["ep"] = {"layer": i, "op": "attention"}
        if is_moe_block(layer.mlp):
            root.add_module(f"moe_{i}", MoE(layer, i))
            h = g.call_module(f"moe_{i}", (h, ctx))
            h.meta["ep"] = {"layer": i, "op": "moe"}
            moe_layers.append(i)
        else:
            root.add_module(f"mlp_{i}", DenseMLP(layer))
            h = g.call_module(f"mlp_{i}", (h, ctx))
            h.meta["ep"] = {"layer": i, "op": "mlp"}
    root.head = Head(graph)
    out = g.call_module("head", (h, ctx))
    g.output(out)
    gm = fx.GraphModule(root, g)
    set_graph_meta(gm, EPProgramMeta(graph.spec, moe_layers, model.config.model_type))
    return gm


def alltoalls_per_layer(gm: fx.GraphModule) -> dict[int, int]:
    """Payload Alltoalls per MoE layer in the graph (count-exchange collectives are not counted)."""
    counts = {i: 0 for i in ep_meta(gm).moe_layers}
    for node in gm.graph.nodes:
        info = node.meta.get("ep", {})
        if info.get("alltoall"):
            counts[info["layer"]] = counts.get(info["layer"], 0) + 1
    return counts
