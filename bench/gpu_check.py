"""GPU checks (issue 7): the Numba CUDA kernels against their references, the eager engine on CUDA, decode/verify times.

One command on a CUDA machine (expected a few minutes on an H200, not yet run on one; it starts no new part after
--budget-s, 420 s by default):

    python bench/gpu_check.py --out bench/gpu_check.json

1. Environment: torch, CUDA device, numba, whether ``numba.cuda`` sees the device.
2. Kernels: every Numba CUDA kernel on CUDA tensors against the reference on random inputs including edge sizes
   (``tokopt.bench.cuda_check``), and the median time of each CUDA kernel vs the reference (torch on the same
   CUDA tensors) at the runtime's sizes (SmolLM2: 49152-token vocabulary, 16-node trees, 30 layers of K/V).
3. Engine: the eager engine moved to CUDA (``EagerEngine.to("cuda")``: weights, step inputs and the K/V cache on
   the GPU, logits back to the host loop), greedy tokens compared with the CPU engine's (plain and Token
   Recycling, which must also equal plain), and medians of the decode step (one token), the recycling verify
   step and its non-model share, plus verify latency vs tree size (K/V on the device).

What must be on the machine: this repository (imported from here: ``tokopt`` need not be installed), torch with
CUDA, transformers, numba and, for kernels on the device, ``numba-cuda`` (without it the kernel part says why
and the runtime uses the torch reference there). The model: SmolLM2-135M-Instruct from the tokopt cache
(``$TOKOPT_CACHE/models/smollm2-135m-instruct``, 517 MB: ``~/.cache/tokopt/models`` from this workplace, which is
more than a run can carry with the repository (64 MiB), so it has to be put on the machine, e.g. under
``shared/``, with ``--cache DIR`` or ``TOKOPT_CACHE``). Without it the engine part runs on a tiny random-weight
LLaMA (``model`` in the JSON says which), which still checks CPU/CUDA agreement and the loop on the device.

Without a CUDA device it prints one line ``no CUDA device: ...`` and exits 0 after what it can run (``--sim``:
the CUDA kernels in Numba's simulator, in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_tokopt():
    """``tokopt`` from this checkout, installed or not (kernels/, runtime/, passes/ are its subpackages)."""
    sys.path.insert(0, str(REPO))
    import tokopt

    try:
        import tokopt.kernels.dispatch  # noqa: F401
    except ImportError:  # not installed: the subpackages live beside tokopt/ under the same names
        tokopt.__path__.append(str(REPO))
    return tokopt


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "cuda_version": torch.version.cuda, "cpu_count": os.cpu_count()}
    if env["cuda"]:
        env["device"] = torch.cuda.get_device_name(0)
    try:
        import numba

        env["numba"] = numba.__version__
        from tokopt.kernels.dispatch import cuda_available

        env["numba_cuda"] = cuda_available()
        if not env["numba_cuda"] and env["cuda"]:
            env["numba_cuda_why"] = _numba_cuda_error()
    except ImportError as e:
        env["numba"] = f"missing: {e}"
        env["numba_cuda"] = False
    return env


def _numba_cuda_error() -> str:
    try:
        from numba import cuda

        cuda.detect()
        return "numba.cuda.is_available() is False"
    except Exception as e:  # numba without the CUDA target (numba-cuda not installed), driver mismatch...
        return f"{type(e).__name__}: {e}"


def median_s(fn, repeats=20, warmup=3, sync=None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------- kernels

def kernel_checks() -> dict:
    from tokopt.bench.cuda_check import run_checks

    results = run_checks("device")
    return {"ok": all(r["ok"] for r in results), "results": results}


def kernel_timings(vocab=49152, nodes=16, layers=30) -> dict:
    """Median ms of each CUDA kernel vs the reference on the same CUDA tensors, at the runtime's sizes."""
    import numpy as np
    import torch

    from tokopt.kernels import accept, kv_compact, logit_stats, recycling, tree_inputs
    from tokopt.bench.cuda_check import planted_logits, random_draft_tree, random_template, random_tree_batch

    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize
    out = {}

    def both(name, ref, cuda):
        out[name] = {"reference_ms": 1e3 * median_s(ref, sync=sync), "cuda_ms": 1e3 * median_s(cuda, sync=sync)}

    parents, sizes, roots = (t.cuda() for t in random_tree_batch(rng, [nodes]))
    both("tree_inputs", lambda: tree_inputs.tree_inputs_reference(parents.cpu(), sizes.cpu(), roots.cpu()),
         lambda: tree_inputs.tree_inputs_cuda(parents, sizes, roots))
    _, structure, valid = tree_inputs.tree_inputs_cuda(parents, sizes, roots)
    past = torch.ones(1, 512, dtype=torch.bool, device="cuda")
    both("step_mask", lambda: tree_inputs.step_mask_reference(past, structure, valid),
         lambda: tree_inputs.step_mask_cuda(past, structure, valid))
    tree = random_draft_tree(rng, nodes, "random", vocab)
    logits = planted_logits(rng, tree, vocab).cuda()
    both("greedy_accept", lambda: accept.greedy_accept_reference(tree, logits),
         lambda: accept.greedy_accept_cuda(tree, logits))
    adj = torch.full((vocab, 8), -1, dtype=torch.int32, device="cuda")
    tokens = torch.from_numpy(rng.choice(vocab, size=nodes, replace=False))[None].cuda()
    nvalid = torch.ones(1, nodes, dtype=torch.bool, device="cuda")
    rows = logits[None]
    both("recycling_update", lambda: recycling.recycling_update_reference(adj, tokens, nvalid, rows),
         lambda: recycling.recycling_update_cuda(adj, tokens, nvalid, rows))
    template = random_template(rng, nodes, 8)
    adj.copy_(torch.from_numpy(rng.integers(0, vocab, size=(vocab, 8)).astype(np.int32)))
    adj_cpu = adj.cpu()
    both("recycling_fill", lambda: recycling.recycling_fill_reference(adj_cpu, [5], template),
         lambda: recycling.recycling_fill_cuda(adj, [5], template))
    kv = [torch.randn(1, 3, 600, 64, device="cuda") for _ in range(2 * layers)]
    index = torch.tensor([[0, 2, 5, 9]])
    ivalid = torch.ones(1, 4, dtype=torch.bool)
    both("compact_tail", lambda: kv_compact.compact_tail_reference(kv, 580, index, ivalid),
         lambda: kv_compact.compact_tail_cuda(kv, 580, index, ivalid))
    for n in (1, nodes, 4 * nodes):  # the taps' graph op: a decode row, a verify tree, a batch of trees
        rows = torch.randn(1, n, vocab, device="cuda")
        both(f"logit_stats[{n}]", lambda: logit_stats.logit_stats_reference(rows),
             lambda: logit_stats.logit_stats_cuda(rows))
    return out


# ----------------------------------------------------------------------------------------------- engine

def load_model(cache: str | None):
    import torch

    from tokopt.models.loading import DEFAULT_MODEL
    from tokopt.paths import cache_dir

    name = Path(str(DEFAULT_MODEL)).name
    if (cache_dir() / "models" / name / "model.safetensors").is_file():
        import tokopt

        model, tokenizer = tokopt.load()
        return model, tokenizer, f"{name} (tokopt cache {cache_dir()})"
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                               num_key_value_heads=2, vocab_size=2048, intermediate_size=512)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model, None, f"tiny random-weight llama (no {name} under {cache_dir() / 'models'})"


class TimedEngine:
    """Records (new tokens, seconds) of every engine call; logits come back to the host, so calls are synced."""

    def __init__(self, engine):
        self.engine, self.spec, self.name = engine, engine.spec, engine.name
        self.calls = []

    def __call__(self, *args):
        t0 = time.perf_counter()
        out = self.engine(*args)
        self.calls.append((args[0].shape[1], time.perf_counter() - t0))
        return out


def prompts_of(tokenizer, spec, n=3):
    import torch

    if tokenizer is not None:
        from tokopt.runtime.prompts import encode_prompts

        texts = ["What is the capital of France? Answer in one sentence.",
                 "Write a Python function that returns the n-th Fibonacci number.",
                 "Summarize: The quick brown fox jumps over the lazy dog. The dog sleeps on."][:n]
        return [encode_prompts(tokenizer, [t]) for t in texts]
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, spec.vocab_size, (1, 24), generator=gen), None) for _ in range(n)]


def run_decode(engine, prompts, max_new, drafter=None, eos=()):
    from tokopt.runtime.generate import generate
    from tokopt.runtime.speculative.decode import speculative_generate

    timed = TimedEngine(engine)
    tokens, step_times, stats = [], [], []
    start = time.perf_counter()
    for ids, mask in prompts:
        before = len(timed.calls)
        if drafter is None:
            res = generate(timed, ids, mask, max_new_tokens=max_new, eos_token_ids=eos)
        else:
            res = speculative_generate(timed, ids, mask, drafter=drafter, max_new_tokens=max_new, eos_token_ids=eos)
            stats.append(res.stats)
        step_times += [s for _, s in timed.calls[before + 1:]]  # the first call is the prefill
        tokens.append(res.new_tokens[0, : int(res.generated_counts[0])].tolist())
    wall = time.perf_counter() - start
    out = {"tokens": tokens, "new_tokens": sum(len(t) for t in tokens), "wall_s": wall,
           "tokens_per_s": sum(len(t) for t in tokens) / wall,
           "median_forward_ms": 1e3 * statistics.median(step_times) if step_times else None}
    if stats:
        steps = sum(s.steps for s in stats)
        model_s = sum(step_times)
        loop_s = sum(s.draft_s + s.verify_s + s.host_s for s in stats)
        out.update(mat=statistics.fmean(s.mat for s in stats), steps=steps,
                   non_model_share=(loop_s - model_s) / loop_s if loop_s else None,
                   tree_sizes=[w for s in stats for w in s.tree_sizes][:64])
    return out


def verify_latency(engine, sizes=(1, 2, 4, 8, 16, 32, 64, 128), past=512) -> dict:
    """Median ms of one engine call with n tree nodes after ``past`` cached slots (K/V on the device)."""
    import torch

    from tokopt.models.masks import causal_structure, step_mask

    spec = engine.spec
    gen = torch.Generator().manual_seed(0)
    cache = [torch.randn(1, spec.num_kv_heads, past, spec.head_dim, generator=gen).to(spec.torch_dtype).to(engine.device)
             for _ in range(2 * spec.num_layers)]
    valid = torch.ones(1, past, dtype=torch.bool)
    out = {}
    for n in sizes:
        ids = torch.randint(0, spec.vocab_size, (1, n), generator=gen)
        pos = torch.arange(past, past + n)[None]
        mask = step_mask(valid, causal_structure(n, 1), dtype=spec.torch_dtype)
        rows = torch.arange(n)
        out[n] = 1e3 * median_s(lambda: engine(ids, pos, mask, rows, cache), repeats=10, warmup=2)
    return out


def engine_checks(args, deadline) -> dict:
    import torch

    import tokopt
    from tokopt.runtime.eager_engine import EagerEngine
    from tokopt.runtime.speculative.drafters.recycling import RecyclingConfig, TokenRecycling

    model, tokenizer, model_name = load_model(args.cache)
    report = {"model": model_name, "device": args.engine_device}
    t0 = time.perf_counter()
    opt = tokopt.optimize(model)
    report["capture_s"] = time.perf_counter() - t0
    prompts = prompts_of(tokenizer, opt.engine.spec)
    eos = opt.defaults.eos_token_ids
    cpu_plain = run_decode(opt.engine, prompts[:2], args.compare_tokens, eos=eos)
    try:
        gpu = opt.engine.to(args.engine_device)
        gpu(*_probe_inputs(gpu.spec))
        report["cuda_engine"] = f"captured graph (EagerEngine.to({args.engine_device!r}))"
    except Exception as e:  # a constant baked on the CPU by torch.export: run the uncaptured decoder graph
        from tokopt.models.decoder_graph import DecoderGraph

        report["captured_graph_on_cuda_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        graph = DecoderGraph(model)
        gpu = EagerEngine(graph, graph.spec).to(args.engine_device)
        report["cuda_engine"] = f"DecoderGraph (uncaptured) on {args.engine_device}"
    gpu_plain = run_decode(gpu, prompts[:2], args.compare_tokens, eos=eos)
    report["cpu_vs_cuda_greedy"] = _agreement(cpu_plain["tokens"], gpu_plain["tokens"])
    drafter = TokenRecycling(gpu.spec.vocab_size, RecyclingConfig(budget=args.budget))
    gpu_rec = run_decode(gpu, prompts[:2], args.compare_tokens, drafter=drafter, eos=eos)
    report["cuda_recycling_vs_cuda_plain"] = _agreement(gpu_plain["tokens"], gpu_rec["tokens"])
    if time.perf_counter() < deadline:
        report["plain_decode"] = _drop_tokens(run_decode(gpu, prompts, args.max_new_tokens, eos=eos))
    if time.perf_counter() < deadline:
        drafter = TokenRecycling(gpu.spec.vocab_size, RecyclingConfig(budget=args.budget))
        report["recycling_decode"] = _drop_tokens(run_decode(gpu, prompts, args.max_new_tokens, drafter=drafter,
                                                             eos=eos))
    if time.perf_counter() < deadline:
        report["verify_latency_ms"] = verify_latency(gpu)
    if torch.cuda.is_available():
        report["cuda_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return report


def _probe_inputs(spec):
    import torch

    from tokopt.models.kv_cache import KVCache
    from tokopt.models.masks import causal_structure, step_mask

    cache = KVCache.empty(spec, 1)
    mask = step_mask(cache.valid, causal_structure(2, 1), dtype=spec.torch_dtype)
    return torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), mask, torch.tensor([1]), cache.tensors


def _agreement(a, b) -> dict:
    same = sum(x == y for x, y in zip(a, b))
    first_diff = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None) for x, y in zip(a, b)]
    return {"rows_equal": f"{same}/{len(a)}", "equal": same == len(a), "first_difference_per_row": first_diff}


def _drop_tokens(d):
    return {k: v for k, v in d.items() if k != "tokens"}


# ----------------------------------------------------------------------------------------------- main

def sim_checks() -> dict:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    code = ("import sys; sys.argv = ['cuda_check', '--sim', '--json']; sys.path.insert(0, %r); import tokopt\n"
            "try:\n    import tokopt.kernels.dispatch\nexcept ImportError:\n    tokopt.__path__.append(%r)\n"
            "from tokopt.bench.cuda_check import main; sys.exit(main())" % (str(REPO), str(REPO)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    try:
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "error": proc.stderr[-2000:]}
    return {"ok": all(r["ok"] for r in results), "results": results}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "gpu_check.json"))
    ap.add_argument("--cache", default=None, help="tokopt cache dir holding models/ (sets TOKOPT_CACHE)")
    ap.add_argument("--sim", action="store_true", help="also run the CUDA kernels in Numba's simulator")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--compare-tokens", type=int, default=48, help="greedy tokens compared CPU vs CUDA")
    ap.add_argument("--budget", type=int, default=16, help="Token Recycling draft nodes per step on the GPU")
    ap.add_argument("--budget-s", type=float, default=420, help="start no new part after this many seconds")
    ap.add_argument("--engine-device", default="cuda", help="cpu: run the engine part on the CPU (checks this script)")
    args = ap.parse_args()
    if args.cache:
        os.environ["TOKOPT_CACHE"] = args.cache
    os.environ.setdefault("TOKOPT_QUIET", "1")
    start = time.perf_counter()
    deadline = start + args.budget_s
    import_tokopt()
    report = {"environment": environment(), "parts": {}}
    env = report["environment"]
    print(f"torch {env['torch']}, CUDA: {env.get('device', 'none')}, numba {env.get('numba')}, "
          f"numba.cuda on device: {env['numba_cuda']}" + (f" ({env['numba_cuda_why']})" if 'numba_cuda_why' in env else ""))
    if args.sim:
        report["parts"]["kernels_sim"] = sim_checks()
        print(f"CUDA kernels in the simulator: {'all equal the references' if report['parts']['kernels_sim']['ok'] else 'MISMATCH'}")
    if args.engine_device == "cpu":
        report["parts"]["engine"] = _guarded(lambda: engine_checks(args, deadline))
        _write(args.out, report, start)
        _print_engine(report["parts"]["engine"])
    if not env["cuda"]:
        report["no_cuda"] = "torch.cuda.is_available() is False"
        _write(args.out, report, start)
        print(f"no CUDA device: torch {env['torch']} sees none (torch.cuda.is_available() is False); "
              f"{'ran the CUDA kernels in the simulator only' if args.sim else 'nothing GPU-side ran (--sim runs the CUDA kernels in the simulator)'}")
        return 0
    parts = report["parts"]
    if env["numba_cuda"]:
        for name, fn in (("kernels", kernel_checks), ("kernel_timings", kernel_timings)):
            parts[name] = _guarded(fn)
        k = parts["kernels"]
        print(f"Numba CUDA kernels vs references: {'all equal' if k.get('ok') else 'MISMATCH or error: ' + json.dumps(k)[:500]}")
        for name, t in (parts["kernel_timings"] if "error" not in parts["kernel_timings"] else {}).items():
            print(f"  {name:18s} reference {t['reference_ms']:8.3f} ms   numba-cuda {t['cuda_ms']:8.3f} ms")
    else:
        parts["kernels"] = {"skipped": f"numba.cuda cannot use the device: {env.get('numba_cuda_why')}"}
        print(f"Numba CUDA kernels: skipped ({parts['kernels']['skipped']})")
    if not parts["kernels"].get("ok"):  # kernels that fail to compile or disagree must not stop the engine part
        os.environ["TOKOPT_KERNELS"] = "reference"
    parts["engine"] = _guarded(lambda: engine_checks(args, deadline))
    parts["engine"]["kernels_backend"] = os.environ.get("TOKOPT_KERNELS", "auto")
    _write(args.out, report, start)
    _print_engine(parts["engine"])
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


def _guarded(fn) -> dict:
    import traceback

    try:
        return fn()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}


def _print_engine(e):
    if "error" in e:
        print(f"engine: ERROR {e['error']}")
        return
    print(f"engine on {e['device']} ({e['model']}; {e['cuda_engine']}): greedy rows equal to the CPU engine's "
          f"{e['cpu_vs_cuda_greedy']['rows_equal']}, recycling equal to plain {e['cuda_recycling_vs_cuda_plain']['rows_equal']}")
    for key in ("plain_decode", "recycling_decode"):
        if key in e:
            d = e[key]
            extra = f", MAT {d['mat']:.2f}, non-model share {100 * d['non_model_share']:.1f}%" if "mat" in d else ""
            print(f"  {key:17s} median forward {d['median_forward_ms']:.2f} ms, {d['tokens_per_s']:.1f} tokens/s{extra}")
    if "verify_latency_ms" in e:
        print("  verify latency (ms) by tree size: " + ", ".join(f"{n}: {t:.2f}" for n, t in e["verify_latency_ms"].items()))


def _write(path, report, start):
    report["wall_s"] = time.perf_counter() - start
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
