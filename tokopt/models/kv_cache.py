"""The KV cache as plain per-layer tensors, with a validity row per sequence.

Slots ``[0, length)`` hold keys/values of earlier tokens; ``valid[b, s]`` says whether sequence ``b`` may
attend to slot ``s`` (False for the null slot 0, left padding, and rejected draft nodes). A verify step
appends N tree nodes at once (any mask over them); ``compact`` then keeps only the accepted slots, in order,
so the cache stays contiguous.

Example::

    cache = KVCache.empty(spec, batch=1)
    present = engine(ids, pos, mask, *cache.tensors)[1:]
    cache = cache.extend(present, new_valid)
    cache = cache.compact(torch.tensor([[0, 1, 2, 5, 7]]))   # keep slots 0-2 and tree nodes 5, 7
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokopt.kernels.kv_compact import compact_tail


@dataclass
class KVCache:
    tensors: list  # [past_key.0, past_value.0, ...], each [B, kv_heads, length, head_dim]
    valid: torch.Tensor  # [B, length] bool

    @classmethod
    def empty(cls, spec, batch: int, dtype=None, device="cpu") -> "KVCache":
        """A cache holding only the masked null slot (see DecoderGraph: P must be >= 1)."""
        shape = (batch, spec.num_kv_heads, 1, spec.head_dim)
        tensors = [torch.zeros(shape, dtype=dtype or spec.torch_dtype, device=device) for _ in range(2 * spec.num_layers)]
        return cls(tensors, torch.zeros(batch, 1, dtype=torch.bool, device=device))

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def extend(self, present: list, new_valid: torch.Tensor) -> "KVCache":
        """Adopt the graph's present tensors (past + N new slots) and mark the new slots' validity."""
        return KVCache(list(present), torch.cat([self.valid, new_valid], dim=1))

    def compact(self, keep: torch.Tensor) -> "KVCache":
        """Keep slots ``keep`` ([length'] shared by the batch, or [B, length'] per row), in that order."""
        if keep.dim() == 1:
            tensors = [t.index_select(2, keep.to(t.device)) for t in self.tensors]
            return KVCache(tensors, self.valid.index_select(1, keep))
        index = keep[:, None, :, None].to(self.tensors[0].device if self.tensors else keep.device)
        tensors = [t.gather(2, index.expand(t.shape[0], t.shape[1], keep.shape[1], t.shape[3])) for t in self.tensors]
        return KVCache(tensors, self.valid.gather(1, keep))

    def compact_tail(self, start: int, index: torch.Tensor, index_valid: torch.Tensor) -> "KVCache":
        """After a verify step appended slots ``[start, length)``: move row b's slots ``start + index[b]`` to
        ``start, start + 1, ...`` (in place, only the moved slots are copied) and mark every other tail slot
        invalid. ``index`` is ``[B, K]``; ``index_valid`` ``[B, K]`` is False on padding entries.

        Dead slots stay until ``drop_dead`` removes them in one copy; until then the mask hides them. The move
        is the ``tokopt.kernels`` dispatch (``kernels/kv_compact.py``: Numba or the torch reference).
        """
        k = index.shape[1]
        compact_tail(self.tensors, start, index, index_valid)
        valid = self.valid.clone()
        valid[:, start:] = False
        valid[:, start:start + k] = index_valid
        return KVCache(self.tensors, valid)

    def dead_slots(self) -> int:
        """Slots no row attends to, besides the null slot 0."""
        return int((~self.valid[:, 1:].any(0)).sum())

    def drop_dead(self) -> "KVCache":
        """Remove the slots no row attends to (keeping the null slot 0): one contiguous copy."""
        keep = self.valid.any(0)
        keep[0] = True
        return self.compact(keep.nonzero().flatten())
