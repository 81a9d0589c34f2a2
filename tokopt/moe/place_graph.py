"""Expert placement by graph partitioning (networkx): an alternative to the per-layer heuristic.

Nodes are (layer, expert); an edge joins (l, i) and (l+1, j) with weight C[l, i, j]. Recursive Kernighan-Lin
bisection splits the layered graph into G parts of equal size (G a power of two); each layer is then repaired
to exact capacities by the optimal assignment that keeps experts in their part where possible, and the result
is polished with the heuristic's coordinate descent.

Example::

    from tokopt.moe.place_graph import solve_graph
    x = solve_graph(C, gpus=4)
"""

from __future__ import annotations

import numpy as np

from tokopt.errors import TokoptError
from tokopt.moe.place_heuristic import assign_layer, coordinate_descent


def _bisect(graph, nodes, parts: int, seed: int):
    import networkx as nx
    from networkx.algorithms.community import kernighan_lin_bisection

    if parts == 1:
        return [set(nodes)]
    sub = graph.subgraph(nodes)
    a, b = kernighan_lin_bisection(sub, weight="weight", seed=seed, max_iter=20)
    return _bisect(graph, a, parts // 2, seed) + _bisect(graph, b, parts // 2, seed)


def solve_graph(C, gpus: int, capacity=None, *, seed: int = 0, polish: bool = True) -> np.ndarray:
    """Placement ``x[L, E]`` from a balanced partition of the layered affinity graph."""
    import networkx as nx

    if gpus & (gpus - 1):
        raise TokoptError(f"method 'graph' bisects recursively and needs a power-of-two number of GPUs, got {gpus};"
                          " use method='heuristic'")
    C = np.asarray(C, dtype=np.float64)
    L, E = C.shape[0] + 1, C.shape[1]
    capacity = np.full(gpus, E // gpus, dtype=np.int64) if capacity is None else np.asarray(capacity, np.int64)
    g = nx.Graph()
    g.add_nodes_from((l, e) for l in range(L) for e in range(E))
    for l in range(L - 1):
        for i, j in zip(*np.nonzero(C[l])):
            g.add_edge((l, int(i)), (l + 1, int(j)), weight=float(C[l, i, j]))
    parts = _bisect(g, list(g.nodes), gpus, seed)
    part = np.zeros((L, E), dtype=np.int64)
    for p, members in enumerate(parts):
        for l, e in members:
            part[l, e] = p
    x = np.zeros((L, E), dtype=np.int64)
    for l in range(L):  # exact capacities: keep each expert in its part where possible
        x[l] = assign_layer(np.eye(gpus)[part[l]], capacity)
    return coordinate_descent(C, x, gpus, capacity) if polish else x
