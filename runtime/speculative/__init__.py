"""Lossless speculative tree decoding: draft a tree of guessed tokens, verify it in one forward, keep the
longest correct path.

Modules, in the order a step uses them: ``drafters`` (recycling, lookup, draft-model policies) build a
``tree.DraftTree`` per row; ``tree.pack_trees`` batches them into one verify forward; ``verify`` accepts a
path (greedy or lossless sampling); ``decode`` runs the loop and compacts the KV cache; ``tree_size`` picks
the tree size from measured latency and acceptance statistics.
"""
