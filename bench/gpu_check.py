"""GPU truth (issue "GPU truth"): one command, nothing but this checkout (no weights, no network, no shared/).

    python bench/gpu_check.py --out DIR            # on a CUDA machine (planned under 8 min on an H200; not yet run on one)
    python bench/gpu_check.py --out DIR --dry-run  # the same parts on the CPU in well under a minute (the test suite)

Writes ``DIR/gpu_check.json`` (every part: status ok / error / skipped / timeout, seconds, results) and
``DIR/verify_cost.png`` (t(n)/t(1) per cache length, the tree size ``best_size`` picks marked). Parts, each
time-boxed and isolated (a failure is recorded and the next part runs):

1. ``environment``: torch, transformers, CUDA device, numba, whether ``numba.cuda`` sees the device.
2. ``kernels``: every Numba CUDA kernel against its reference (``tokopt.bench.cuda_check``; dry run: Numba's CUDA
   simulator in a subprocess) and, on a device, median times vs the torch reference at the runtime's sizes.
3. ``engine``: the default model's architecture (SmolLM2-135M-Instruct, ``tokopt/data/smollm2_135m_config.json``)
   with seeded random weights, the eager engine on the device in fp32 and bf16 vs the CPU fp32 logits (per-dtype
   tolerance) and greedy tokens.
4. ``families``: tiny llama / qwen2 / mixtral (random weights): device fp32 logits and greedy tokens vs the CPU.
5. ``verify_latency``: t(n)/t(1) for n = 1..128 new tokens at cache lengths 128, 1024, 4096 (K/V on the device).
6. ``tree_size``: ``best_size`` on each measured profile with the shipped acceptance profile
   (``tokopt/data/acceptance_smollm2.json``, measured on the CPU with the real weights by
   bench/acceptance_profile.py) and the predicted speedup: expected tokens of that tree x t(1)/t(n + 1).
7. ``speculative``: Token Recycling and prompt lookup end to end on the device (tokens/s; output must equal
   plain greedy decoding's).
8. ``compile``: ``torch.compile`` (inductor) of the decode step, and CUDA graphs (``mode="reduce-overhead"``)
   on a device; times and failures recorded.
9. ``logit_stats``: the ``tokopt::logit_stats`` CUDA kernel vs torch (dry run: the Numba CPU kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_tokopt():
    """``tokopt`` from this checkout, installed or not (kernels/, runtime/, passes/, bench/ are its subpackages)."""
    sys.path.insert(0, str(REPO))
    import tokopt

    try:
        import tokopt.kernels.dispatch  # noqa: F401
    except ImportError:
        tokopt.__path__.append(str(REPO))
    return tokopt


class PartTimeout(Exception):
    pass


def run_part(report, name, fn, limit_s):
    """Run one part under a wall-clock limit (SIGALRM); record status, seconds and its result or error."""
    start = time.perf_counter()

    def alarm(signum, frame):
        raise PartTimeout(f"part {name} ran past {limit_s:.0f} s")

    old = signal.signal(signal.SIGALRM, alarm) if hasattr(signal, "SIGALRM") else None
    if old is not None:
        signal.alarm(max(1, int(limit_s)))
    try:
        result = fn()
        entry = {"status": "ok", **(result or {})}
        if entry.pop("failed", False):
            entry["status"] = "error"
    except PartTimeout as e:
        entry = {"status": "timeout", "error": str(e)}
    except Exception as e:
        entry = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:1000]}",
                 "traceback": traceback.format_exc()[-3000:]}
    finally:
        if old is not None:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    entry["seconds"] = round(time.perf_counter() - start, 2)
    report["parts"][name] = entry
    print(f"[{entry['status']:7s}] {name} ({entry['seconds']:.1f} s)" + (f": {entry['error']}" if "error" in entry else ""),
          flush=True)
    return entry


def sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_s(fn, repeats=10, warmup=2, device="cpu") -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ parts

def environment(cfg) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
           "cuda_version": torch.version.cuda, "cpu_count": os.cpu_count(), "device": cfg.device,
           "dry_run": cfg.dry_run}
    if env["cuda"]:
        env["device_name"] = torch.cuda.get_device_name(0)
    try:
        import numba

        env["numba"] = numba.__version__
        from tokopt.kernels.dispatch import cuda_available

        env["numba_cuda"] = bool(cuda_available())
    except Exception as e:
        env["numba"] = f"unavailable: {type(e).__name__}: {e}"
        env["numba_cuda"] = False
    return env


def kernels(cfg) -> dict:
    if cfg.dry_run or not cfg.numba_cuda:
        res = sim_checks()
        res["mode"] = "sim (NUMBA_ENABLE_CUDASIM)"
        if not cfg.dry_run:
            res["why_sim"] = "numba.cuda cannot use the device"
        return res
    from tokopt.bench.cuda_check import run_checks

    results = run_checks("device")
    out = {"mode": "device", "results": results, "failed": not all(r["ok"] for r in results)}
    out["timings_ms"] = kernel_timings()
    return out


def sim_checks() -> dict:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys; sys.path.insert(0, %r); import tokopt\n"
            "try:\n    import tokopt.kernels.dispatch\nexcept ImportError:\n    tokopt.__path__.append(%r)\n"
            "from tokopt.bench.cuda_check import main; sys.exit(main(['--sim', '--json']))" % (str(REPO), str(REPO)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    try:
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"failed": True, "error": f"cuda_check --sim exited {proc.returncode}: {proc.stderr[-2000:]}"}
    return {"results": results, "failed": not all(r["ok"] for r in results)}


def kernel_timings(vocab=49152, nodes=16) -> dict:
    """Median ms of each CUDA kernel vs the torch reference on the same CUDA tensors, at the runtime's sizes."""
    import numpy as np
    import torch

    from tokopt.bench.cuda_check import planted_logits, random_draft_tree, random_tree_batch
    from tokopt.kernels import accept, logit_stats, tree_inputs

    rng = np.random.default_rng(0)
    out = {}

    def both(name, ref, cuda):
        out[name] = {"reference_ms": 1e3 * median_s(ref, device="cuda"), "cuda_ms": 1e3 * median_s(cuda, device="cuda")}

    parents, sizes, roots = (t.cuda() for t in random_tree_batch(rng, [nodes]))
    both("tree_inputs", lambda: tree_inputs.tree_inputs_reference(parents.cpu(), sizes.cpu(), roots.cpu()),
         lambda: tree_inputs.tree_inputs_cuda(parents, sizes, roots))
    tree = random_draft_tree(rng, nodes, "random", vocab)
    logits = planted_logits(rng, tree, vocab).cuda()
    both("greedy_accept", lambda: accept.greedy_accept_reference(tree, logits),
         lambda: accept.greedy_accept_cuda(tree, logits))
    for n in (1, nodes, 4 * nodes):
        rows = torch.randn(1, n, vocab, device="cuda")
        both(f"logit_stats[{n}]", lambda: logit_stats.logit_stats_reference(rows),
             lambda: logit_stats.logit_stats_cuda(rows))
    return out


def shipped_config() -> dict:
    from tokopt.data import read_text

    return json.loads(read_text("smollm2_135m_config.json"))


def build_model(kind, dtype="float32", seed=0):
    """A random-weight model: ``smollm2`` (the shipped SmolLM2-135M config) or a tiny llama / qwen2 / mixtral."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "smollm2":
        d = shipped_config()
        model_type = d.pop("model_type")
        for k in ("architectures", "dtype", "torch_dtype", "use_cache"):
            d.pop(k, None)
        cfg = AutoConfig.for_model(model_type, **d)
    else:
        tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=512, intermediate_size=128, max_position_embeddings=4096)
        if kind == "mixtral":
            tiny.update(num_local_experts=4, num_experts_per_tok=2)
        if kind == "tiny_smollm2":
            kind, tiny = "llama", {**tiny, "num_attention_heads": 4, "tie_word_embeddings": True}
        cfg = AutoConfig.for_model(kind, **tiny)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model.to(getattr(torch, dtype))


def make_engine(model, device):
    from tokopt.models.decoder_graph import DecoderGraph
    from tokopt.runtime.eager_engine import EagerEngine

    graph = DecoderGraph(model)
    engine = EagerEngine(graph, graph.spec)
    return engine.to(device) if device != "cpu" else engine


def step_logits(engine, ids):
    """Logits of a whole prompt in one (prefill) call from an empty cache."""
    import torch

    from tokopt.models.kv_cache import KVCache
    from tokopt.models.masks import causal_structure, step_mask

    spec = engine.spec
    cache = KVCache.empty(spec, 1)
    n = ids.shape[1]
    mask = step_mask(cache.valid, causal_structure(n, 1), dtype=spec.torch_dtype)
    pos = torch.arange(1, n + 1)[None]  # slot 0 is the null slot
    return engine(ids, pos, mask, torch.arange(n), cache.tensors).logits.float().cpu()


def greedy_tokens(engine, ids, n):
    from tokopt.runtime.generate import generate

    res = generate(engine, ids, None, max_new_tokens=n)
    return res.new_tokens[0, : int(res.generated_counts[0])].tolist()


def _prompt(vocab, length, seed=1):
    import torch

    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def engine_part(cfg) -> dict:
    kind = "tiny_smollm2" if cfg.dry_run else "smollm2"
    model = build_model(kind)
    cpu = make_engine(model, "cpu")
    ids = _prompt(cpu.spec.vocab_size, 32)
    ref = step_logits(cpu, ids)
    ref_tokens = greedy_tokens(cpu, ids, cfg.tokens)
    out = {"model": kind + " (random weights)", "device": cfg.device, "dtypes": {}}
    tol = {"float32": 1e-3, "bfloat16": 0.15}  # max |logit diff| relative to the logits' std
    failed = False
    for dtype in ("float32", "bfloat16"):
        m = build_model(kind, dtype)
        eng = make_engine(m, cfg.device)
        got = step_logits(eng, ids)
        scale = float(ref.std())
        rel = float((got - ref).abs().max()) / scale
        argmax = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        toks = greedy_tokens(eng, ids, cfg.tokens)
        ok = rel <= tol[dtype]
        failed |= not ok
        out["dtypes"][dtype] = {"max_abs_diff_over_std": rel, "tolerance": tol[dtype], "ok": ok,
                                "argmax_agreement": argmax, "greedy_equal_to_cpu_fp32": toks == ref_tokens,
                                "first_difference": next((i for i, (a, b) in enumerate(zip(toks, ref_tokens))
                                                          if a != b), None)}
        del m, eng
    out["failed"] = failed
    return out


def families_part(cfg) -> dict:
    out, failed = {}, False
    for kind in ("llama", "qwen2", "mixtral"):
        model = build_model(kind)
        cpu = make_engine(model, "cpu")
        ids = _prompt(cpu.spec.vocab_size, 16)
        ref, ref_tokens = step_logits(cpu, ids), greedy_tokens(cpu, ids, cfg.tokens)
        dev = make_engine(build_model(kind), cfg.device)
        got, toks = step_logits(dev, ids), greedy_tokens(dev, ids, cfg.tokens)
        diff = float((got - ref).abs().max())
        ok = diff <= 1e-3 * max(1.0, float(ref.abs().max())) and toks == ref_tokens
        failed |= not ok
        out[kind] = {"max_abs_diff": diff, "greedy_equal": toks == ref_tokens, "ok": ok}
    return {"models": out, "failed": failed}


def latency_engine(cfg):
    import torch

    dtype = "float32" if cfg.device == "cpu" else "bfloat16"
    model = build_model("tiny_smollm2" if cfg.dry_run else "smollm2", dtype)
    return make_engine(model, cfg.device)


def verify_latency_part(cfg, state) -> dict:
    import torch

    engine = latency_engine(cfg)
    spec = engine.spec
    dev = cfg.device if cfg.device != "cpu" else "cpu"
    gen = torch.Generator().manual_seed(0)
    curves = {}
    for past in cfg.cache_lengths:
        cache = [torch.randn(1, spec.num_kv_heads, past, spec.head_dim, generator=gen).to(spec.torch_dtype).to(dev)
                 for _ in range(2 * spec.num_layers)]
        from tokopt.models.masks import causal_structure, step_mask

        valid = torch.ones(1, past, dtype=torch.bool)
        valid[:, 0] = False
        seconds = {}
        for n in cfg.sizes:
            ids = torch.randint(0, spec.vocab_size, (1, n), generator=gen)
            pos = torch.arange(past, past + n)[None]
            mask = step_mask(valid, causal_structure(n, 1), dtype=spec.torch_dtype)
            rows = torch.arange(n)
            seconds[n] = median_s(lambda: engine(ids, pos, mask, rows, cache), repeats=cfg.repeats, warmup=3,
                                  device=dev)
        curves[past] = {"seconds": seconds, "ratio": {n: s / seconds[1] for n, s in seconds.items()}}
        del cache
    state["latency"] = curves
    return {"dtype": str(spec.torch_dtype), "curves": {str(p): {"ms": {str(n): 1e3 * s for n, s in c["seconds"].items()},
                                                               "t_n_over_t_1": {str(n): r for n, r in c["ratio"].items()}}
                                                      for p, c in curves.items()}}


def acceptance_rates():
    import torch

    from tokopt.data import read_text
    from tokopt.runtime.speculative.acceptance import RankAcceptance

    try:
        d = json.loads(read_text("acceptance_smollm2.json"))
    except FileNotFoundError:  # not measured yet: the cautious default prior, said in the report
        stats = RankAcceptance()
        return stats.rates(), {"model": "default prior (tokopt/data/acceptance_smollm2.json missing)"}
    stats = RankAcceptance(d["max_depth"], d["ranks"], prior_weight=d.get("prior_weight", 20.0))
    stats.load_dict(d)
    return stats.rates(), d


def tree_size_part(cfg, state) -> dict:
    from tokopt.runtime.speculative.acceptance import expected_tokens
    from tokopt.runtime.speculative.tree_size import LatencyProfile, best_size

    if "latency" not in state:
        raise RuntimeError("verify_latency did not run")
    rates, meta = acceptance_rates()
    max_nodes = max(cfg.sizes)
    curve = expected_tokens(rates, max_nodes - 1)  # a tree of n drafts is a verify of n + 1 tokens
    out = {"acceptance": {"model": meta.get("model"), "measured_mat": meta.get("mat")}, "by_cache_length": {}}
    state["chosen"] = {}
    for past, c in state["latency"].items():
        profile = LatencyProfile(dict(c["seconds"]), past, "gpu_check", "eager")
        n = best_size(curve, profile)
        speedup = curve[n] * profile(1) / profile(n + 1)
        state["chosen"][past] = (n + 1, profile(n + 1) / profile(1))
        out["by_cache_length"][str(past)] = {"best_size": n, "verify_tokens": n + 1, "expected_tokens": curve[n],
                                            "t1_over_tn": profile(1) / profile(n + 1), "predicted_speedup": speedup}
    return out


def speculative_part(cfg) -> dict:
    from tokopt.runtime.generate import generate
    from tokopt.runtime.speculative.decode import speculative_generate
    from tokopt.runtime.speculative.drafters.lookup import PromptLookup
    from tokopt.runtime.speculative.drafters.recycling import RecyclingConfig, TokenRecycling

    dtype = "float32" if cfg.device == "cpu" else "bfloat16"
    engine = make_engine(build_model("tiny_smollm2" if cfg.dry_run else "smollm2", dtype), cfg.device)
    import torch

    base = _prompt(engine.spec.vocab_size, 16)
    ids = torch.cat([base, base, base], dim=1)  # repetition: something for lookup to find
    out, failed = {}, False

    def timed(fn):
        sync(cfg.device)
        t0 = time.perf_counter()
        res = fn()
        sync(cfg.device)
        wall = time.perf_counter() - t0
        toks = res.new_tokens[0, : int(res.generated_counts[0])].tolist()
        return toks, wall, res

    plain, wall, _ = timed(lambda: generate(engine, ids, None, max_new_tokens=cfg.spec_tokens))
    out["plain"] = {"tokens_per_s": len(plain) / wall, "new_tokens": len(plain)}
    for name, drafter in (("token_recycling", TokenRecycling(engine.spec.vocab_size, RecyclingConfig(budget=16))),
                          ("lookup", PromptLookup())):
        toks, wall, res = timed(lambda: speculative_generate(engine, ids, None, drafter=drafter,
                                                             max_new_tokens=cfg.spec_tokens))
        equal = toks == plain
        failed |= not equal
        out[name] = {"tokens_per_s": len(toks) / wall, "new_tokens": len(toks), "equal_to_greedy": equal,
                     "mat": getattr(res.stats, "mat", None)}
    out["failed"] = failed
    return out


def compile_part(cfg) -> dict:
    import torch

    from tokopt.models.kv_cache import KVCache
    from tokopt.models.masks import causal_structure, step_mask

    dtype = "float32" if cfg.device == "cpu" else "bfloat16"
    engine = make_engine(build_model("tiny_smollm2" if cfg.dry_run else "smollm2", dtype), cfg.device)
    spec, dev = engine.spec, cfg.device
    past = 256
    cache = [torch.randn(1, spec.num_kv_heads, past, spec.head_dim).to(spec.torch_dtype).to(dev)
             for _ in range(2 * spec.num_layers)]
    valid = torch.ones(1, past, dtype=torch.bool)
    args = (torch.tensor([[5]], device=dev), torch.tensor([[past]], device=dev),
            step_mask(valid, causal_structure(1, 1), dtype=spec.torch_dtype).to(dev),
            torch.arange(1, device=dev), *cache)
    module = engine.module

    def call(m):
        with torch.inference_mode():
            return m(*args)

    out = {"eager_ms": 1e3 * median_s(lambda: call(module), repeats=cfg.repeats, device=dev)}
    modes = [("inductor", dict(backend="eager" if cfg.dry_run else "inductor"))]
    if dev != "cpu":
        modes.append(("cuda_graphs", dict(backend="inductor", mode="reduce-overhead")))
    for name, kw in modes:
        try:
            torch._dynamo.reset()
            compiled = torch.compile(module, dynamic=False, **kw)
            t0 = time.perf_counter()
            ref, got = call(module)[0], call(compiled)[0]
            entry = {"compile_s": time.perf_counter() - t0, "backend": kw,
                     "max_abs_diff": float((got.float() - ref.float()).abs().max())}
            entry["ms"] = 1e3 * median_s(lambda: call(compiled), repeats=cfg.repeats, device=dev)
            out[name] = entry
        except Exception as e:  # recorded, not fatal: the eager engine is the baseline
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
    return out


def logit_stats_part(cfg) -> dict:
    import torch

    from tokopt.kernels import logit_stats as ls

    vocab = 512 if cfg.dry_run else 49152
    out, failed = {}, False
    for n in (1, 16, 64):
        rows = torch.randn(1, n, vocab, generator=torch.Generator().manual_seed(n)) * 4
        ref = ls.logit_stats_reference(rows)
        if cfg.device == "cpu":
            kernel, name = ls.logit_stats_cpu, "numba_cpu"
            got = kernel(rows)
        else:
            rows_d = rows.cuda()
            kernel, name = ls.logit_stats_cuda, "numba_cuda"
            got = kernel(rows_d)
        diff = max(float((g.float().cpu() - r.float()).abs().max()) for g, r in zip(got, ref))
        ok = diff <= 1e-3
        failed |= not ok
        entry = {"kernel": name, "max_abs_diff": diff, "ok": ok}
        if cfg.device != "cpu":
            entry["torch_ms"] = 1e3 * median_s(lambda: ls.logit_stats_reference(rows_d), device="cuda")
            entry["kernel_ms"] = 1e3 * median_s(lambda: kernel(rows_d), device="cuda")
        out[str(n)] = entry
    return {"rows": out, "failed": failed}


def plot(path, state) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for past, c in state.get("latency", {}).items():
        ns = sorted(c["ratio"])
        line, = ax.plot(ns, [c["ratio"][n] for n in ns], marker=".", label=f"cache {past}")
        chosen = state.get("chosen", {}).get(past)
        if chosen is not None:
            ax.axvline(chosen[0], color=line.get_color(), linestyle="--", alpha=0.6)
            ax.plot([chosen[0]], [chosen[1]], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens verified in one forward (n)")
    ax.set_ylabel("t(n) / t(1)")
    ax.set_title("verify cost (dashed: tree size best_size picks)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "gpu_check_out"), help="folder for the JSON and PNG")
    ap.add_argument("--dry-run", action="store_true", help="CPU, simulator kernels, tiny sizes (the test suite)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKOPT_QUIET", "1")
    start = time.perf_counter()
    import_tokopt()
    import torch

    cfg = argparse.Namespace(dry_run=args.dry_run, device=args.device or ("cpu" if args.dry_run else "cuda"))
    if cfg.dry_run:
        cfg.sizes, cfg.cache_lengths, cfg.repeats, cfg.tokens, cfg.spec_tokens = [1, 2, 4], [128], 2, 8, 16
        limits = dict(kernels=120, engine=30, families=30, verify_latency=30, tree_size=10, speculative=30,
                      compile=60, logit_stats=30)
    else:
        cfg.sizes = list(range(1, 17)) + list(range(20, 65, 4)) + [80, 96, 112, 128]
        cfg.cache_lengths, cfg.repeats, cfg.tokens, cfg.spec_tokens = [128, 1024, 4096], 7, 48, 128
        limits = dict(kernels=90, engine=60, families=45, verify_latency=120, tree_size=15, speculative=60,
                      compile=90, logit_stats=20)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"parts": {}}
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        report["no_cuda"] = "torch.cuda.is_available() is False"
        print("no CUDA device: torch.cuda.is_available() is False (--dry-run runs the parts on the CPU)")
    cfg.numba_cuda = False
    env = run_part(report, "environment", lambda: environment(cfg), 60)
    cfg.numba_cuda = bool(env.get("numba_cuda"))
    state = {}
    run_part(report, "kernels", lambda: kernels(cfg), limits["kernels"])
    if report["parts"]["kernels"]["status"] != "ok":
        os.environ["TOKOPT_KERNELS"] = "reference"  # broken kernels must not stop the engine parts
    report["kernels_backend"] = os.environ.get("TOKOPT_KERNELS", "auto")
    for name, fn in (("engine", lambda: engine_part(cfg)), ("families", lambda: families_part(cfg)),
                     ("verify_latency", lambda: verify_latency_part(cfg, state)),
                     ("tree_size", lambda: tree_size_part(cfg, state)),
                     ("speculative", lambda: speculative_part(cfg)), ("compile", lambda: compile_part(cfg)),
                     ("logit_stats", lambda: logit_stats_part(cfg))):
        run_part(report, name, fn, limits[name])
        _write(out_dir, report, start)
    try:
        plot(out_dir / "verify_cost.png", state)
        report["png"] = "verify_cost.png"
    except Exception as e:
        report["png_error"] = f"{type(e).__name__}: {e}"
    if torch.cuda.is_available():
        report["cuda_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    _write(out_dir, report, start)
    print(f"wrote {out_dir / 'gpu_check.json'} ({time.perf_counter() - start:.0f} s)")
    return 0


def _write(out_dir, report, start):
    report["wall_s"] = time.perf_counter() - start
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
