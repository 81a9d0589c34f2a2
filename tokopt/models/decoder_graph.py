"""The decoder as one graph with the KV cache passed explicitly: what every engine runs.

``DecoderGraph`` wraps a Hugging Face causal LM of a supported family and exposes a single forward::

    logits, present_key.0, present_value.0, ... = graph(input_ids, position_ids, attention_mask, logits_rows,
                                                        past_key.0, past_value.0, ...)

- ``input_ids`` / ``position_ids``: ``[B, N]`` int64, N new tokens (a prompt chunk, one decode token, or a
  whole draft tree) with their own positions (``prefix + depth`` for a tree).
- ``attention_mask``: ``[B, 1, N, P + N]`` float32, additive (0 = attend, ``finfo.min`` = not), so any tree
  or padding pattern is expressible.
- ``logits_rows``: ``[R]`` int64, which of the N rows need logits (all of a tree; only the last of a prompt,
  which spares the LM head most of the prefill's work).
- ``past_*``: ``[B, kv_heads, P, head_dim]`` per layer, P >= 1 (slot 0 is a masked null slot: a size-0
  dimension cannot stay dynamic through ``torch.export``).
- ``logits``: ``[B, R, vocab]``.
- ``present_*``: ``[B, kv_heads, P + N, head_dim]``; the runtime keeps it as the next past, or compacts it
  to the accepted tree nodes.

It reuses the HF modules' embeddings, norms, projections, rotary embedding and MLP/MoE blocks and does only
the attention core itself, so the weights and numerics are the model's own. Flat tensor inputs and outputs
make the graph exportable as is (torch.export, ONNX) and identical in every engine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from tokopt.models.loading import check_supported
from tokopt.errors import UnsupportedModelError

INPUT_NAMES_FIXED = ("input_ids", "position_ids", "attention_mask", "logits_rows")


@dataclass(frozen=True)
class GraphSpec:
    """Shape facts every engine and the runtime need about a decoder graph."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    model_type: str
    dtype: str = "float32"  # of weights, activations and the KV cache

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def input_names(self) -> list[str]:
        return list(INPUT_NAMES_FIXED) + cache_names("past", self.num_layers)

    @property
    def output_names(self) -> list[str]:
        return ["logits"] + cache_names("present", self.num_layers)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def cache_names(prefix: str, num_layers: int) -> list[str]:
    """``[prefix_key.0, prefix_value.0, prefix_key.1, ...]``: the order of cache tensors everywhere."""
    return [f"{prefix}_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def graph_spec(model) -> GraphSpec:
    config = model.config
    check_supported(config)
    heads = config.num_attention_heads
    return GraphSpec(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        model_type=config.model_type,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )


class DecoderGraph(nn.Module):
    """A supported HF causal LM as a flat-tensor forward with an explicit KV cache (see module docstring).

    Example::

        graph = DecoderGraph(model)
        ids = torch.tensor([[1, 2, 3]])
        out = graph(ids, torch.arange(3)[None] + 1, causal_mask, torch.tensor([2]), *null_cache)
    """

    def __init__(self, model, keep_layers=None, return_hidden: bool = False):
        """``keep_layers``: run only these layer indices (a self-speculative draft shares the target's weights);
        ``return_hidden``: also return the final normed hidden states of ``logits_rows`` (output ``hidden``)."""
        super().__init__()
        self.spec = graph_spec(model)
        config = model.config
        window = getattr(config, "sliding_window", None)
        uses_window = getattr(config, "use_sliding_window", config.model_type in ("mistral", "mixtral"))
        if uses_window and window and window < config.max_position_embeddings:
            raise UnsupportedModelError(
                f"{config.model_type} with sliding-window attention (window {window} < context "
                f"{config.max_position_embeddings}) is not supported yet; set config.sliding_window=None "
                "(full attention) if that is what you want"
            )
        self.hf = model  # keeps the HF module tree (and so its parameter names) intact
        core = model.model
        self.embed_tokens = core.embed_tokens
        self.layers = core.layers
        if keep_layers is not None:
            keep_layers = sorted(set(int(i) for i in keep_layers))
            if not keep_layers or keep_layers[0] < 0 or keep_layers[-1] >= len(core.layers):
                raise ValueError(f"keep_layers must be a non-empty subset of 0..{len(core.layers) - 1}")
            self.layers = nn.ModuleList([core.layers[i] for i in keep_layers])
            self.spec = replace(self.spec, num_layers=len(keep_layers))
        self.return_hidden = return_hidden
        self.norm = core.norm
        self.rotary_emb = core.rotary_emb
        self.lm_head = model.lm_head
        self.num_heads = config.num_attention_heads
        self.groups = self.num_heads // self.spec.num_kv_heads
        self.clip_qkv = getattr(config, "clip_qkv", None)

    def forward(self, input_ids, position_ids, attention_mask, logits_rows, *past):
        hidden = self.embed_tokens(input_ids)
        cos_sin = self.rotary_emb(hidden, position_ids)
        mask = _fold_mask(attention_mask, self.groups)  # once for all layers
        present = []
        for i, layer in enumerate(self.layers):
            residual = hidden
            attn, k, v = self._attention(layer.self_attn, layer.input_layernorm(hidden), cos_sin,
                                         mask, past[2 * i], past[2 * i + 1])
            hidden = residual + attn
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            present += [k, v]
        normed = self.norm(hidden.index_select(1, logits_rows))
        logits = self.lm_head(normed)
        if self.return_hidden:
            return (logits, *present, normed)
        return (logits, *present)

    def _attention(self, attn, x, cos_sin, mask, past_k, past_v):
        batch, n, _ = x.shape
        q, k, v = self.project_qkv(attn, x, cos_sin)
        keys = torch.cat([past_k, k], dim=2)
        values = torch.cat([past_v, v], dim=2)
        return self.attend(attn, q, keys, values, mask), keys, values

    def attend(self, attn, q, keys, values, folded_mask):
        """Attention output (after ``o_proj``) of queries ``q`` ``[B, H, N, D]`` over ``keys``/``values``."""
        batch, _, n, _ = q.shape
        out = _grouped_sdpa(q, keys, values, folded_mask, self.groups, attn.scaling)
        out = _contiguous(out.transpose(1, 2)).view(batch, n, -1)
        return attn.o_proj(out)

    def project_qkv(self, attn, x, cos_sin):
        """Rotated ``q`` ``[B, H, N, D]``, ``k`` and ``v`` ``[B, kvH, N, D]`` of the normed input ``x``."""
        batch, n, _ = x.shape
        head_dim = self.spec.head_dim
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        per_head_norm = q_norm is not None and q_norm.weight.shape[-1] == head_dim
        if q_norm is not None and not per_head_norm:  # OLMoE normalizes the whole projection ...
            q, k = q_norm(q), k_norm(k)
        if self.clip_qkv is not None:  # ... then clips (after the norm, as HF does)
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(batch, n, -1, head_dim)
        k = k.view(batch, n, -1, head_dim)
        if per_head_norm:  # Qwen3 normalizes each head
            q, k = q_norm(q), k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, n, -1, head_dim).transpose(1, 2)
        q, k = _apply_rotary(q, k, *cos_sin)
        return q, k, v


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _contiguous(x):
    """Always copy: ``reshape``/``contiguous`` copy or not depending on N == 1, a guard torch.export cannot keep."""
    return x.clone(memory_format=torch.contiguous_format)


def _fold_mask(mask, groups):
    """Tile a ``[B, 1, N, S]`` mask to ``[B, 1, groups*N, S]`` to match ``_grouped_sdpa``'s folded queries."""
    if groups == 1:
        return mask
    return mask.repeat(1, 1, groups, 1)  # row j*N + i is query row i of group member j


def _grouped_sdpa(q, keys, values, folded_mask, groups, scale):
    """SDPA for grouped-query attention without copying K/V per query head.

    The ``groups`` query heads that share a KV head are folded into the query length
    (``[B, H, N, D] -> [B, kvH, groups*N, D]``, mask tiled by ``_fold_mask``); every query row is still
    computed on its own, so the result equals ``repeat_kv`` + SDPA while K/V stay at their cached size.
    """
    batch, heads, n, dim = q.shape
    folded = _contiguous(q).view(batch, heads // groups, groups * n, dim)
    out = torch.nn.functional.scaled_dot_product_attention(folded, keys, values, attn_mask=folded_mask, scale=scale)
    return out.reshape(batch, heads, n, dim)
