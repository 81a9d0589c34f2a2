"""Random inputs for the kernel families, and the Numba CUDA versions checked against the references.

``random_*`` build inputs with the edge cases the runtime meets (one-node trees, chains, wide trees, batches
padded to one width, adjacency rows never seen: -1). ``run_checks(mode)`` runs every CUDA kernel on them and
compares with the reference: ``mode="device"`` through the torch-facing functions on CUDA tensors (a GPU
machine), ``mode="sim"`` through the kernel launches on numpy arrays under ``NUMBA_ENABLE_CUDASIM=1`` (set
before Numba is imported, so in a fresh process: ``python -m tokopt.bench.cuda_check --sim``).

Example::

    NUMBA_ENABLE_CUDASIM=1 python -m tokopt.bench.cuda_check --sim     # prints one line per check, exit 1 on a mismatch
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

TREE_SHAPES = ("one_node", "chain", "wide", "random")


# ----------------------------------------------------------------------------------------------- inputs

def random_parents(n: int, shape: str, rng: np.random.Generator) -> list:
    """Parents-first parent list of an n-node tree: one_node, chain, wide (all under the root), random."""
    if n == 1:
        return [-1]
    if shape == "one_node":
        raise ValueError(f"a one_node tree has 1 node, not {n}")
    if shape == "chain":
        return [-1] + list(range(n - 1))
    if shape == "wide":
        return [-1] + [0] * (n - 1)
    return [-1] + [int(rng.integers(0, i)) for i in range(1, n)]


def random_tree_batch(rng, sizes, shapes=None):
    """``(parents [B, W] long, sizes [B], roots [B])`` padded with garbage past each size (must be ignored)."""
    width = max(sizes)
    parents = torch.from_numpy(rng.integers(-3, width + 3, size=(len(sizes), width)))
    for b, n in enumerate(sizes):
        shape = shapes[b] if shapes else TREE_SHAPES[1 + b % 3]  # chain, wide, random (1 node: one_node)
        parents[b, :n] = torch.tensor(random_parents(n, shape, rng))
    roots = torch.from_numpy(rng.integers(0, 500, size=len(sizes)))
    return parents, torch.tensor(sizes, dtype=torch.long), roots


def random_draft_tree(rng, n: int, shape: str, vocab: int):
    """A ``DraftTree`` with distinct sibling tokens."""
    from tokopt.runtime.speculative.tree import DraftTree

    parents = random_parents(n, shape, rng)
    tokens = [int(t) for t in rng.choice(vocab, size=n, replace=False)] if n <= vocab else \
        [int(t) for t in rng.integers(0, vocab, size=n)]
    return DraftTree.from_parents(tokens, parents)


def planted_logits(rng, tree, vocab: int, accept_p: float = 0.7, dtype=torch.float32) -> torch.Tensor:
    """Logits ``[N, V]`` whose argmax at each node picks one of its children with probability ``accept_p``."""
    logits = torch.from_numpy(rng.standard_normal((tree.size, vocab))).to(dtype)
    for i in range(tree.size):
        kids = tree.children[i]
        if kids and rng.random() < accept_p:
            logits[i, tree.tokens[kids[int(rng.integers(0, len(kids)))]]] = 10.0
    return logits


def random_paths(rng, batch: int, k: int, tail: int):
    """Accepted paths as compaction indices: ``(index [B, K], index_valid [B, K])``, increasing per row,
    root first, padded; rows 1, 4, 7... in place (``index[b, j] == j``), the others moved."""
    index = torch.zeros(batch, k, dtype=torch.long)
    valid = torch.zeros(batch, k, dtype=torch.bool)
    for b in range(batch):
        length = int(rng.integers(1, k + 1))
        if b % 3 == 1:
            path = list(range(length))
        else:
            path = [0] + sorted(int(x) for x in rng.choice(np.arange(1, tail), size=length - 1, replace=False))
        index[b, :length] = torch.tensor(path)
        valid[b, :length] = True
    return index, valid


def random_adjacency(rng, vocab: int, k: int, unseen: float = 0.3) -> torch.Tensor:
    """``[V, k]`` int32 successor table with a share of never-seen rows (-1)."""
    adj = torch.from_numpy(rng.integers(0, vocab, size=(vocab, k)).astype(np.int32))
    adj[torch.from_numpy(rng.random(vocab) < unseen)] = -1
    return adj


def random_template(rng, m: int, k: int) -> list:
    return [(int(rng.integers(0, i + 1)), int(rng.integers(0, k))) for i in range(m)]


# ----------------------------------------------------------------------------------------------- checks

def _to(mode, t):
    return t.cuda() if mode == "device" else t


def check_tree_inputs(mode, rng):
    from tokopt.kernels import tree_inputs as K

    out = []
    for sizes in ([1], [5], [1, 4, 9, 2], [16, 3, 16]):
        parents, n, roots = random_tree_batch(rng, sizes)
        want = K.tree_inputs_reference(parents, n, roots)
        if mode == "device":
            got = [t.cpu() for t in K.tree_inputs_cuda(*(t.cuda() for t in (parents, n, roots)))]
        else:
            got = [torch.from_numpy(a) for a in _sim_tree_inputs(K, parents, n, roots)]
        out.append(_result("tree_inputs", f"sizes={sizes}", all(torch.equal(a, b) for a, b in zip(want, got))))
        past = torch.from_numpy(rng.random((len(sizes), 7)) < 0.6)
        structure, valid = want[1], want[2]
        want_mask = K.step_mask_reference(past, structure, valid)
        if mode == "device":
            got_mask = K.step_mask_cuda(past.cuda(), structure.cuda(), valid.cuda()).cpu()
        else:
            got_mask = torch.zeros_like(want_mask)
            K.step_mask_launch(past.numpy(), structure.numpy(), valid.numpy(), True,
                               float(torch.finfo(torch.float32).min), got_mask.numpy())
        out.append(_result("step_mask", f"sizes={sizes}", torch.equal(want_mask, got_mask)))
    return out


def _sim_tree_inputs(K, parents, sizes, roots):
    batch, width = parents.shape
    positions = np.zeros((batch, width), dtype=np.int64)
    structure = np.zeros((batch, width, width), dtype=np.bool_)
    valid = np.zeros((batch, width), dtype=np.bool_)
    K.tree_inputs_launch(parents.numpy(), sizes.numpy(), roots.numpy(), positions, structure, valid)
    return positions, structure, valid


def check_greedy_accept(mode, rng, vocab=64):
    from tokopt.kernels import accept as K

    out = []
    for n, shape in ((1, "one_node"), (6, "chain"), (9, "wide"), (12, "random"), (12, "random")):
        tree = random_draft_tree(rng, n, shape, vocab)
        logits = planted_logits(rng, tree, vocab)
        want = K.greedy_accept_reference(tree, logits)
        if mode == "device":
            got = K.greedy_accept_cuda(tree, logits.cuda())
        else:
            path = np.zeros((1, n), dtype=np.int64)
            lengths, nxt = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
            K.greedy_accept_launch(logits[None].numpy(), np.array([tree.tokens]), np.array([tree.parents]),
                                   np.array([n]), path, lengths, nxt)
            got = (path[0, : lengths[0]].tolist(), int(nxt[0]))
        out.append(_result("greedy_accept", f"{shape} n={n}", tuple(want) == tuple(got), f"{want} vs {got}"))
    return out


def check_recycling(mode, rng, vocab=300):
    from tokopt.kernels import recycling as K

    out = []
    for k, batch, n in ((1, 1, 1), (8, 1, 12), (8, 3, 5)):
        tokens = torch.from_numpy(rng.choice(vocab, size=batch * n, replace=False)).view(batch, n)
        valid = torch.from_numpy(rng.random((batch, n)) < 0.8)
        valid[:, 0] = True
        logits = torch.from_numpy(rng.standard_normal((batch, n, vocab)).astype(np.float32))
        adj = random_adjacency(rng, vocab, k)
        want, got = adj.clone(), adj.clone()
        K.recycling_update_reference(want, tokens, valid, logits)
        if mode == "device":
            dev = got.cuda()
            K.recycling_update_cuda(dev, tokens.cuda(), valid.cuda(), logits.cuda())
            got = dev.cpu()
        else:
            K.recycling_update_launch(got.numpy(), tokens.numpy(), valid.numpy(), logits.numpy())
        out.append(_result("recycling_update", f"k={k} B={batch} N={n}", torch.equal(want, got)))
    for m in (0, 1, 10, 40):
        adj = random_adjacency(rng, vocab, 8)
        template = random_template(rng, m, 8)
        roots = [int(r) for r in rng.integers(0, vocab, size=4)]
        want = K.recycling_fill_reference(adj, roots, template)
        if mode == "device":
            got = K.recycling_fill_cuda(adj.cuda(), roots, template)
        else:
            tparent, trank = K.template_arrays(template)
            tokens = np.zeros((4, m + 1), dtype=np.int64)
            parents, sizes = np.zeros_like(tokens), np.zeros(4, dtype=np.int64)
            K.recycling_fill_launch(adj.numpy(), np.array(roots), tparent, trank, tokens, parents, sizes)
            got = K._fill_outputs(tokens, parents, sizes)
        out.append(_result("recycling_fill", f"template={m} nodes", want == got))
    return out


def check_kv_compact(mode, rng):
    from tokopt.kernels import kv_compact as K

    out = []
    for batch, k, tail in ((1, 1, 1), (1, 4, 9), (3, 5, 12)):
        start = 6
        tensors = [torch.from_numpy(rng.standard_normal((batch, 2, start + tail, 8)).astype(np.float32))
                   for _ in range(3)]
        index, valid = random_paths(rng, batch, k, tail)
        want = [t.clone() for t in tensors]
        K.compact_tail_reference(want, start, index, valid)
        if mode == "device":
            dev = [t.cuda() for t in tensors]
            K.compact_tail_cuda(dev, start, index, valid)
            got = [t.cpu() for t in dev]
        else:
            got = [t.clone() for t in tensors]
            for t in got:
                K.move_launch(t.numpy(), start, index.numpy(), valid.numpy())
        ok = all(same_compaction(a, b, start, valid) for a, b in zip(want, got))
        out.append(_result("compact_tail", f"B={batch} K={k} tail={tail}", ok))
    return out


def check_logit_stats(mode, rng):
    from tokopt.kernels import logit_stats as K

    out = []
    for rows, vocab, masked in ((1, 1, 0), (3, 300, 0), (2, 1000, 7)):
        logits = torch.from_numpy((3 * rng.standard_normal((rows, vocab))).astype(np.float32))
        if masked:
            logits[:, :masked] = -float("inf")  # masked entries: nan entropy, as in torch's log-softmax
        want = K.logit_stats_reference(logits)
        if mode == "device":
            got = [t.cpu() for t in K.logit_stats_cuda(logits.cuda())]
        else:
            got = [np.zeros(rows, dtype=np.float32) for _ in K.OUTPUTS]
            K.rows_launch(logits.numpy(), *got)
            got = [torch.from_numpy(a) for a in got]
        ok = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True) for a, b in zip(want, got))
        detail = f"max diff {max(float((a - b).abs().nan_to_num().max()) for a, b in zip(want, got)):.2e}"
        out.append(_result("logit_stats", f"rows={rows} V={vocab} masked={masked}", ok, detail))
    return out


def same_compaction(want, got, start, index_valid) -> bool:
    """Equal on the slots before ``start`` and on every valid moved-to slot (invalid ones are unspecified)."""
    if not torch.equal(want[:, :, :start], got[:, :, :start]):
        return False
    for b in range(index_valid.shape[0]):
        for j in index_valid[b].nonzero().flatten().tolist():
            if not torch.equal(want[b, :, start + j], got[b, :, start + j]):
                return False
    return True


def _result(kernel, case, ok, detail=""):
    return {"kernel": kernel, "case": case, "ok": bool(ok), **({"detail": detail} if not ok and detail else {})}


def run_checks(mode: str, seed: int = 0) -> list:
    """Every CUDA kernel against its reference on random inputs; ``mode``: ``device`` or ``sim``."""
    if mode not in ("device", "sim"):
        raise ValueError(f"mode must be 'device' or 'sim', got {mode!r}")
    rng = np.random.default_rng(seed)
    results = []
    for check in (check_tree_inputs, check_greedy_accept, check_recycling, check_kv_compact, check_logit_stats):
        results += check(mode, rng)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Numba CUDA kernels vs their references on random inputs")
    ap.add_argument("--sim", action="store_true", help="under NUMBA_ENABLE_CUDASIM=1 (set before starting Python)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON list")
    args = ap.parse_args(argv)
    import os

    if args.sim and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        print("--sim needs NUMBA_ENABLE_CUDASIM=1 in the environment before Python starts", file=sys.stderr)
        return 2
    results = run_checks("sim" if args.sim else "device")
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['kernel']:18s} {r['case']} {r.get('detail', '')}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
