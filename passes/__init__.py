"""Graph passes over the captured decoder (``GraphModule -> (GraphModule, PassReport)``), one per file.

Importing this package registers every pass; ``tokopt passes`` lists them.
"""

from tokopt.passes import (  # noqa: F401
    attention_taps, entropy_tap, expert_parallel, expert_placement, fuse_alltoall, logit_taps, lower_grouped_mm, ppd_slots,
    remove_noop_casts, small_batch_linear,
)
