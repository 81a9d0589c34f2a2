"""The interface every drafter has, and the trie insert drafters share.

The decode loop calls, per ``generate``: ``start`` once; then per step ``root_entropy`` (when
``wants_root_entropy``), ``draft`` (one tree per row), ``observe`` (the target's logits at every verified node;
also at every prompt position when ``wants_prefill_logits``) and ``feedback`` (the trees and verdicts, for
acceptance statistics).

Example::

    class Echo(Drafter):                      # guesses the root token again
        name = "echo"
        def draft(self, histories):
            return [DraftTree([h[-1], h[-1]], [-1, 0]) for h in histories]
"""

from __future__ import annotations

from tokopt.runtime.sampling import SamplingParams


class Drafter:
    name = "drafter"
    wants_prefill_logits = False
    wants_root_entropy = False  # the loop then calls root_entropy before every draft

    def start(self, prompts: list, sampling: SamplingParams) -> None:
        """A new ``generate`` call: ``prompts`` are the rows' unpadded prompt token lists."""
        self.sampling = sampling

    def draft(self, histories: list) -> list:
        """One ``DraftTree`` per row; ``histories[b]`` is row b's prompt plus emitted tokens (root last)."""
        raise NotImplementedError

    def root_entropy(self, entropies: list) -> None:
        """Per row, the entropy (nats) of the target distribution that chose the row's root token (the next
        draft's root): the graph's ``entropy`` tap when there is one."""

    def observe(self, tokens, logits, valid) -> None:
        """The target's logits ``[B, N, V]`` at input tokens ``[B, N]`` (``valid`` ``[B, N]``)."""

    def feedback(self, trees: list, verdicts: list) -> None:
        """What was accepted (``verdicts[b]`` is None for finished rows)."""

    def state_bytes(self) -> int:
        """Memory held across requests (for reports)."""
        return 0


def insert_path(tokens: list, parents: list, children: dict, chain, start: int = 0, limit: int | None = None) -> int:
    """Insert ``chain`` below node ``start`` of a trie given as (tokens, parents, children map), reusing
    existing nodes with the same token; stop when the trie holds ``limit`` nodes. Returns nodes added."""
    node, added = start, 0
    for tok in chain:
        nxt = children.get((node, tok))
        if nxt is None:
            if limit is not None and len(tokens) >= limit:
                break
            nxt = len(tokens)
            tokens.append(tok)
            parents.append(node)
            children[(node, tok)] = nxt
            added += 1
        node = nxt
    return added
