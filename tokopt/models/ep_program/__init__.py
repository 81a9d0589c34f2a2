"""The expert-parallel step program (layer: models): ``program.py`` captures a MoE model's step as an FX graph of
coarse ops (embed, attention, MoE, head) over the tokens resident on a rank; ``ops.py`` holds the ops the
expert-parallel passes put in it (route, local experts, dispatch/combine/migrate/merge); ``exchange.py`` moves
and counts every byte between ranks; ``tokens.py`` is the resident-token batch they pass along.

Example::

    gm = capture_program(model)            # then passes.expert_parallel / fuse_alltoall shard it
"""
