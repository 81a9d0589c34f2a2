"""The fast expert placement heuristic: exact per layer, coordinate descent across layers.

Layer 0 starts contiguous; each next layer is the optimal linear assignment of its experts to GPU slots given the
previous layer (gain of expert j on GPU g = tokens arriving at j from experts on g). Then bidirectional coordinate
descent: re-solve every layer exactly against both neighbours until the total stops improving. Each step is an
exact linear assignment, so the objective never gets worse. Linear assignment is a small numpy Hungarian
(shortest augmenting paths), no scipy.

Example::

    from tokopt.moe.place_heuristic import solve_heuristic
    x = solve_heuristic(C, gpus=4)        # C [L-1, E, E] transition weights -> x [L, E] GPU per expert
"""

from __future__ import annotations

import numpy as np


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Column for each row minimizing the total ``cost[n, m]`` (n <= m), by the Hungarian method.

    Example::

        linear_assignment(np.array([[4., 1.], [2., 0.]]))    # [1, 0]
    """
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    inf = np.inf
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)     # p[j]: row (1-based) matched to column j (1-based); 0 = free
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            upd = free & (cur < minv[1:])
            minv[1:][upd] = cur[upd]
            way[1:][upd] = j0
            cand = np.where(free, minv[1:], inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    out = np.empty(n, dtype=np.int64)
    for j in range(1, m + 1):
        if p[j]:
            out[p[j] - 1] = j - 1
    return out


def assign_layer(gain: np.ndarray, capacity: np.ndarray, init: np.ndarray | None = None) -> np.ndarray:
    """GPU per expert maximizing ``sum gain[e, gpu(e)]`` with exactly ``capacity[g]`` experts on GPU g.

    A transportation problem with few sinks: start from ``init`` (or a greedy fill) and cancel negative cycles in
    the G-node graph whose edge g -> h costs the cheapest move of one expert from g to h. No negative cycle
    left = optimal. Small G makes this far faster than an E x E Hungarian; ``linear_assignment`` checks it in tests.
    """
    gain = np.asarray(gain, dtype=np.float64)
    E, G = gain.shape
    capacity = np.asarray(capacity, dtype=np.int64)
    x = _greedy_fill(gain, capacity) if init is None else np.asarray(init, dtype=np.int64).copy()
    scale = max(1.0, float(np.abs(gain).max()))
    tol = 1e-12 * scale
    rows = np.arange(E)
    for _ in range(10 * E * G):
        delta = gain[rows, x][:, None] - gain          # loss of moving expert e to GPU h
        order = np.argsort(x, kind="stable")
        starts = np.concatenate([[0], np.cumsum(capacity)[:-1]])
        nonempty = capacity > 0
        D = np.full((G, G), np.inf)
        D[nonempty] = np.minimum.reduceat(delta[order], starts[nonempty], axis=0)
        np.fill_diagonal(D, np.inf)
        cycle = _negative_cycle(D, tol)
        if cycle is None:
            return x
        moves = []
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            members = np.flatnonzero(x == a)
            moves.append((members[np.argmin(delta[members, b])], b))
        for e, b in moves:
            x[e] = b
    return x


def _greedy_fill(gain, capacity):
    """Highest gains first, each expert to its best GPU with room left."""
    E, G = gain.shape
    x = np.full(E, -1, dtype=np.int64)
    room = capacity.copy()
    for flat in np.argsort(-gain, axis=None, kind="stable"):
        e, g = divmod(int(flat), G)
        if x[e] < 0 and room[g] > 0:
            x[e] = g
            room[g] -= 1
    return x


def _negative_cycle(D, tol):
    """A negative-cost simple cycle (list of nodes) in the complete graph with edge costs D, or None."""
    G = len(D)
    dist = np.zeros(G)
    pred = np.full(G, -1)
    last = -1
    for _ in range(G):
        cand = dist[:, None] + D                      # via u -> v
        u = np.argmin(cand, axis=0)
        best = cand[u, np.arange(G)]
        better = best < dist - tol
        if not better.any():
            return None
        dist = np.where(better, best, dist)
        pred = np.where(better, u, pred)
        last = int(np.flatnonzero(better)[0])
    v = last
    for _ in range(G):
        v = int(pred[v])
    cycle, u = [v], int(pred[v])
    while u != v:
        cycle.append(u)
        u = int(pred[u])
    cycle.reverse()
    cost = sum(D[a, b] for a, b in zip(cycle, cycle[1:] + cycle[:1]))
    return cycle if cost < -tol else None


def _onehot(x: np.ndarray, gpus: int) -> np.ndarray:
    h = np.zeros((len(x), gpus))
    h[np.arange(len(x)), x] = 1.0
    return h


def layer_gain(C: np.ndarray, x: np.ndarray, l: int, gpus: int) -> np.ndarray:
    """``[E, G]`` weight kept local if layer l's expert e sits on GPU g, given the neighbouring layers of x."""
    E = C.shape[1]
    g = np.zeros((E, gpus))
    if l > 0:
        g += C[l - 1].T @ _onehot(x[l - 1], gpus)
    if l < len(x) - 1:
        g += C[l] @ _onehot(x[l + 1], gpus)
    return g


def kept(C: np.ndarray, x: np.ndarray) -> float:
    """Total transition weight whose two experts share a GPU."""
    return float(sum((C[l] * (x[l][:, None] == x[l + 1][None, :])).sum() for l in range(len(C))))


def contiguous_layer(E: int, capacity: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(capacity)), capacity)[:E]


def solve_heuristic(C: np.ndarray, gpus: int, capacity=None, *, first=None, restarts: int = 3,
                    budget_s: float = 0.5, seed: int = 0, max_sweeps: int = 100) -> np.ndarray:
    """Placement ``x[L, E]`` maximizing the transition weight kept on one GPU (``L = len(C) + 1``).

    ``capacity[g]``: experts per GPU (default E/G each). The first run starts from layer 0 contiguous (or
    ``first``); up to ``restarts`` more start from random layer-0 groupings while ``budget_s`` lasts; the best
    is kept (coordinate descent stops in local optima, so a few starts help on sparse, noisy counts).
    """
    import time

    C = np.asarray(C, dtype=np.float64)
    L, E = C.shape[0] + 1, C.shape[1]
    capacity = np.full(gpus, E // gpus, dtype=np.int64) if capacity is None else np.asarray(capacity, np.int64)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    best, best_kept = None, -np.inf
    for r in range(1 + max(0, restarts)):
        if r and time.perf_counter() - t0 > budget_s:
            break
        start = contiguous_layer(E, capacity) if r == 0 and first is None else (
            np.asarray(first) if r == 0 else rng.permutation(contiguous_layer(E, capacity)))
        x = np.zeros((L, E), dtype=np.int64)
        x[0] = start
        for l in range(1, L):
            x[l] = assign_layer(C[l - 1].T @ _onehot(x[l - 1], gpus), capacity)
        x = coordinate_descent(C, x, gpus, capacity, max_sweeps=max_sweeps)
        k = kept(C, x)
        if best is None or k > best_kept + 1e-12 * max(1.0, abs(best_kept)):
            best, best_kept = x, k
    return best


def coordinate_descent(C, x, gpus, capacity, *, max_sweeps: int = 100) -> np.ndarray:
    """Re-solve each layer exactly given both neighbours, forward then backward, until nothing improves."""
    x = x.copy()
    L = len(x)
    if L < 2:
        return x
    order = list(range(L)) + list(range(L - 2, -1, -1))
    for _ in range(max_sweeps):
        improved = False
        for l in order:
            gain = layer_gain(C, x, l, gpus)
            before = gain[np.arange(len(x[l])), x[l]].sum()
            new = assign_layer(gain, capacity, init=x[l])
            after = gain[np.arange(len(new)), new].sum()
            if after > before + 1e-9 * max(1.0, abs(before)):
                x[l] = new
                improved = True
        if not improved:
            break
    return x


def rebalance_load(C, x, load, gpus, eps: float, *, max_moves: int = 1000) -> np.ndarray:
    """Swap experts between GPUs of a layer until each GPU's load <= (1 + eps) x mean, losing the least affinity.

    Swaps keep the expert counts per GPU. Stops early where no swap lowers the heaviest GPU's load.
    """
    x = x.copy()
    L, E = x.shape
    for l in range(L):
        limit = (1 + eps) * load[l].sum() / gpus
        for _ in range(max_moves):
            per_gpu = np.bincount(x[l], weights=load[l], minlength=gpus)
            h = int(np.argmax(per_gpu))
            if per_gpu[h] <= limit + 1e-9:
                break
            gain = layer_gain(C, x, l, gpus)
            best, best_loss = None, np.inf
            for a in np.flatnonzero(x[l] == h):
                for b in np.flatnonzero(x[l] != h):
                    d = load[l, a] - load[l, b]
                    g2 = x[l, b]
                    if d <= 0 or per_gpu[g2] + d >= per_gpu[h]:
                        continue
                    loss = gain[a, h] + gain[b, g2] - gain[a, g2] - gain[b, h]
                    if loss < best_loss:
                        best, best_loss = (a, b), loss
            if best is None:
                break
            a, b = best
            x[l, a], x[l, b] = x[l, b], h
    return x
