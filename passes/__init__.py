"""Graph passes over the captured decoder (``GraphModule -> (GraphModule, PassReport)``), one per file.

Importing this package registers every pass; ``tokopt passes`` lists them.
"""

from tokopt.passes import entropy_tap, remove_noop_casts, small_batch_linear  # noqa: F401
