"""Expert placement as an integer program (pulp + CBC), time-boxed, warm-started from the heuristic.

Binary x[l,e,g] (expert e of layer l on GPU g), continuous z[l,i,j] >= 0 for pairs with C > 0:

    sum_g x[l,e,g] = 1;   sum_e x[l,e,g] = capacity[g];   z[l,i,j] >= x[l,i,g] - x[l+1,j,g]  for every g
    minimize  sum C[l,i,j] z[l,i,j]                   (z = 1 exactly when i and j sit on different GPUs)

Layer 0 breaks the GPU-label symmetry (expert e may only use GPUs 0..e). The LP relaxation is 0 (x = 1/G), so
CBC rarely proves optimality at real sizes: it improves on the heuristic start until ``time_limit`` and the
better of the two is kept. Large count matrices are pruned to the heaviest pairs per layer for the ILP (the
result is always scored on the full counts).

Example::

    from tokopt.moe.place_ilp import solve_ilp
    x, info = solve_ilp(C, gpus=4, time_limit=10)     # info: solver, status, heuristic vs ilp objective
"""

from __future__ import annotations

import warnings

import numpy as np

from tokopt.errors import TokoptError
from tokopt.moe.place_heuristic import kept, rebalance_load, solve_heuristic


def _solver(time_limit: float, seed: int):
    try:
        import pulp
    except ImportError:
        raise TokoptError("method 'ilp' needs pulp (pip install pulp); use method='heuristic' instead") from None
    available = pulp.listSolvers(onlyAvailable=True)
    if "PULP_CBC_CMD" in available:
        # cuts off: root cut rounds ignore timeLimit and, with an LP bound of 0, never pay off here
        with warnings.catch_warnings():  # pulp 3.3: "PULP_CBC_CMD is deprecated" (fine until pulp 4)
            warnings.simplefilter("ignore", DeprecationWarning)
            cbc = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, int(round(time_limit))), warmStart=True,
                                    cuts=False, options=[f"randomSeed {seed + 1}"])
        return pulp, cbc, "PULP_CBC_CMD"
    if "HiGHS" in available or "HiGHS_CMD" in available:
        name = "HiGHS" if "HiGHS" in available else "HiGHS_CMD"
        return pulp, pulp.getSolver(name, msg=False, timeLimit=time_limit), name
    raise TokoptError(f"no MILP solver available to pulp (found {available or 'none'}); install pulp[cbc] or "
                      "pulp[highs], or use method='heuristic'")


def _relabel(x0: np.ndarray) -> np.ndarray:
    """Rename GPUs in order of first appearance at layer 0 (so the start satisfies the symmetry breaking)."""
    order = list(dict.fromkeys(x0[0].tolist()))
    order += [g for g in range(int(x0.max()) + 1) if g not in order]
    return np.argsort(order)[x0]


def _prune(C: np.ndarray, max_pairs: int) -> np.ndarray:
    P = np.zeros_like(C)
    for l in range(len(C)):
        flat = C[l].ravel()
        nz = np.flatnonzero(flat > 0)
        keep = nz if len(nz) <= max_pairs else nz[np.argsort(-flat[nz])[:max_pairs]]
        P[l].ravel()[keep] = flat[keep]
    return P


def solve_ilp(C, gpus: int, capacity=None, *, load=None, balance=None, time_limit: float = 30.0, seed: int = 0,
              max_pairs: int = 1000, start=None, hard_limit: float | None = None):
    """``(x[L, E], info)``: the better of the heuristic start and CBC's best within ``time_limit`` seconds.

    CBC checks its time limit only while branching; on big instances its root LP alone can run for minutes.
    So the solve runs in a child process killed (with its CBC) after ``hard_limit`` seconds (default
    2 x time_limit + 10); the heuristic start is returned then, with ``ilp_status`` "killed at hard limit".
    """
    import multiprocessing as mp
    import os
    import signal

    C = np.asarray(C, dtype=np.float64)
    E = C.shape[1]
    capacity = np.full(gpus, E // gpus, dtype=np.int64) if capacity is None else np.asarray(capacity, np.int64)
    _solver(time_limit, seed)  # fail here, in the caller, when no solver is installed
    if start is None:
        start = solve_heuristic(C, gpus, capacity, seed=seed)
        if balance is not None and load is not None:
            start = rebalance_load(C, start, load, gpus, balance)
    hard_limit = 2 * time_limit + 10 if hard_limit is None else hard_limit
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    recv, send = ctx.Pipe(duplex=False)
    args = (C, gpus, capacity, load, balance, time_limit, seed, max_pairs, np.asarray(start))
    child = ctx.Process(target=_child, args=(send, args), daemon=True)
    child.start()
    send.close()
    result = recv.recv() if recv.poll(hard_limit) else None
    if result is None:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the child and the CBC it started share its own group
        except (ProcessLookupError, PermissionError):
            pass
    child.join(5)
    recv.close()
    if isinstance(result, BaseException):
        raise result
    if result is None:
        total = max(C.sum(), 1e-300)
        h_obj = 1 - kept(C, start) / total
        return start, {"solver": "PULP_CBC_CMD", "ilp_status": f"killed at hard limit {hard_limit:g} s",
                       "ilp_solution": "none", "heuristic_objective": h_obj, "ilp_objective": float("nan"),
                       "ilp_improved": False, "time_limit_s": time_limit}
    return result


def _child(conn, args):
    import os

    os.setsid()
    try:
        with warnings.catch_warnings():  # pulp 3.3 announces its 4.0 API on every variable
            warnings.simplefilter("ignore", DeprecationWarning)
            out = _solve_ilp(*args[:3], load=args[3], balance=args[4], time_limit=args[5], seed=args[6],
                             max_pairs=args[7], start=args[8])
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
        out = exc
    conn.send(out)
    conn.close()


def _solve_ilp(C, gpus, capacity, *, load, balance, time_limit, seed, max_pairs, start):
    import time

    C = np.asarray(C, dtype=np.float64)
    L, E = C.shape[0] + 1, C.shape[1]
    capacity = np.full(gpus, E // gpus, dtype=np.int64) if capacity is None else np.asarray(capacity, np.int64)
    if start is None:
        start = solve_heuristic(C, gpus, capacity, seed=seed)
        if balance is not None and load is not None:
            start = rebalance_load(C, start, load, gpus, balance)
    pulp, solver, solver_name = _solver(time_limit, seed)
    capacity_order = capacity
    start = _relabel(np.asarray(start))
    # relabelling may permute GPUs of unequal capacity: keep capacities consistent with the start
    capacity = np.bincount(start[0], minlength=gpus)
    if not np.array_equal(np.sort(capacity), np.sort(capacity_order)):
        raise TokoptError("internal: warm start does not respect the GPU capacities")
    P = _prune(C, max_pairs)
    t0 = time.perf_counter()
    prob = pulp.LpProblem("expert_placement", pulp.LpMinimize)
    x = {(l, e, g): pulp.LpVariable(f"x_{l}_{e}_{g}", cat="Binary")
         for l in range(L) for e in range(E) for g in range(gpus) if l > 0 or g <= e}
    z = {}
    for l in range(L - 1):
        for i, j in zip(*np.nonzero(P[l])):
            z[l, i, j] = pulp.LpVariable(f"z_{l}_{i}_{j}", lowBound=0, upBound=1)
    prob += pulp.lpSum(float(P[l, i, j]) * v for (l, i, j), v in z.items())
    for l in range(L):
        for e in range(E):
            prob += pulp.lpSum(x[l, e, g] for g in range(gpus) if (l, e, g) in x) == 1
        for g in range(gpus):
            prob += pulp.lpSum(x[l, e, g] for e in range(E) if (l, e, g) in x) == int(capacity[g])
            if balance is not None and load is not None:
                limit = (1 + balance) * load[l].sum() / gpus
                prob += pulp.lpSum(float(load[l, e]) * x[l, e, g] for e in range(E) if (l, e, g) in x) <= limit
    for (l, i, j), v in z.items():
        for g in range(gpus):
            a = x.get((l, i, g))
            b = x[l + 1, j, g]
            prob += v >= (a if a is not None else 0) - b
    for (l, e, g), v in x.items():
        v.setInitialValue(1 if start[l, e] == g else 0)
    for (l, i, j), v in z.items():
        v.setInitialValue(0 if start[l, i] == start[l + 1, j] else 1)
    build_s = time.perf_counter() - t0
    status = prob.solve(solver)
    solve_s = time.perf_counter() - t0 - build_s
    sol = np.full((L, E), -1, dtype=np.int64)
    for (l, e, g), v in x.items():
        if v.varValue is not None and v.varValue > 0.5:
            sol[l, e] = g
    valid = bool((sol >= 0).all()) and all(np.array_equal(np.bincount(sol[l], minlength=gpus), capacity)
                                           for l in range(L))
    if valid and balance is not None and load is not None:
        limit = (1 + balance) * load.sum(axis=1) / gpus
        valid = all(np.bincount(sol[l], weights=load[l], minlength=gpus).max() <= limit[l] + 1e-6 for l in range(L))
    total = max(C.sum(), 1e-300)
    h_obj = 1 - kept(C, start) / total
    i_obj = 1 - kept(C, sol) / total if valid else float("nan")
    use_ilp = valid and i_obj < h_obj - 1e-12
    info = {"solver": solver_name, "ilp_status": pulp.LpStatus.get(status, str(status)),
            "ilp_solution": pulp.LpSolution.get(prob.sol_status, str(prob.sol_status)),
            "ilp_build_s": round(build_s, 3), "ilp_solve_s": round(solve_s, 3), "ilp_pairs": len(z),
            "ilp_pruned": bool((P != C).any()), "heuristic_objective": h_obj,
            "ilp_objective": i_obj, "ilp_improved": bool(use_ilp), "time_limit_s": time_limit}
    return (sol if use_ilp else start), info
