"""``tokopt bench --peers ortgenai``: tokopt's CPU tokens/s against ONNX Runtime GenAI on the same prompts.

The peer's models are built once from the same local HF directory tokopt loads (ORT GenAI's model builder, fp32
and int4, CPU), cached under ``cache_dir()/peers/ortgenai/<model>-<precision>``. Every runner lives in its own
worker process (loaded once); the parent sends it one question at a time. Round ``r`` runs every runner once
per question, in an order rotated by ``r``; every runner gets the same chat-templated token ids, greedy, the
same number of new tokens. Per runner: the median over (round, question) of tokens/s; ratios to ORT GenAI fp32
greedy are medians of per-question ratios. Each runner's tokens are compared with HF ``generate``'s greedy
tokens. Writes ``peers.json``, ``peers.md`` and ``peers.png`` under ``out``.

Example::

    run_peers_bench(PeersConfig(prompts=4, max_new_tokens=48, rounds=2))
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tokopt.errors import TokoptError
from tokopt.progress import progress_step

PEERS = ("ortgenai",)
INSTALL_HINT = "ONNX Runtime GenAI is not installed: pip install 'tokopt[peers]' (or pip install onnxruntime-genai)"
BASELINE = "ortgenai-fp32"
# name -> (kind, precision or engine, speculative)
RUNNERS = {
    "ortgenai-fp32": ("ortgenai", "fp32", None),
    "ortgenai-int4": ("ortgenai", "int4", None),
    "ortgenai-fp32-ngram": ("ortgenai", "fp32", "ngram"),
    "tokopt-onnx": ("tokopt", "onnx", None),
    "tokopt-eager": ("tokopt", "eager", None),
    "tokopt-onnx-recycling": ("tokopt", "onnx", "recycling"),
    "tokopt-eager-recycling": ("tokopt", "eager", "recycling"),
}
FP32 = tuple(n for n in RUNNERS if n != "ortgenai-int4")


class PeerMissing(TokoptError):
    """The peer's package is not installed."""


@dataclass
class PeersConfig:
    model: str | None = None
    prompts: int = 4
    questions: str | None = None
    max_new_tokens: int = 48
    rounds: int = 2
    runners: tuple = tuple(RUNNERS)
    engine_dir: str | None = None
    out: str = "bench/out/peers"


def check_peer(peer: str = "ortgenai") -> None:
    """Raise PeerMissing (one line naming the install command) unless the peer's package imports."""
    if peer not in PEERS:
        raise TokoptError(f"unknown peer {peer!r}; known: {', '.join(PEERS)}")
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        raise PeerMissing(INSTALL_HINT) from exc


# ---------------------------------------------------------------- building the peer's models

def peer_model_dir(model_name: str, precision: str) -> Path:
    from tokopt.paths import cache_dir

    return cache_dir() / "peers" / "ortgenai" / f"{model_name}-{precision}"


def build_ortgenai(hf_dir: Path, precision: str, out: Path) -> Path:
    """ORT GenAI's model builder, offline from ``hf_dir``, into ``out`` (temp dir, then rename); cached."""
    if (out / "genai_config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(tmp),
           "-p", precision, "-e", "cpu", "-c", str(tmp) + "-hfcache"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with progress_step(f"building the ORT GenAI {precision} model once into {out}"):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        shutil.rmtree(str(tmp) + "-hfcache", ignore_errors=True)
        if proc.returncode != 0 or not (tmp / "genai_config.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise TokoptError(f"ORT GenAI's model builder failed for {hf_dir} ({precision}): " + " | ".join(tail))
        os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- pure parts (tested on synthetic numbers)

def interleaved_order(runners, rounds: int) -> list[list[str]]:
    """Round r runs every runner once, the list rotated left by r."""
    runners = list(runners)
    n = len(runners)
    return [runners[r % n:] + runners[:r % n] for r in range(rounds)] if n else [[] for _ in range(rounds)]


def summarize(samples: dict, baseline: str = BASELINE) -> dict:
    """``samples[runner]`` = list of ``{"question": i, "round": r, "tokens": n, "seconds": s}``.
    Per runner: median tokens/s over samples, and the median over questions of (runner tok/s / baseline tok/s),
    each question's tok/s being its median over rounds."""
    def per_question(rows):
        by_q = {}
        for row in rows:
            by_q.setdefault(row["question"], []).append(row["tokens"] / row["seconds"])
        return {q: statistics.median(v) for q, v in by_q.items()}

    base = per_question(samples.get(baseline, []))
    out = {}
    for name, rows in samples.items():
        if not rows:
            continue
        pq = per_question(rows)
        ratios = [pq[q] / base[q] for q in pq if q in base and base[q] > 0]
        out[name] = {"tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in rows),
                     "ratio": statistics.median(ratios) if ratios else None, "samples": len(rows)}
    return out


def targets(summary: dict) -> list[dict]:
    """The stated targets, met or missed and by how much."""
    def ratio(name):
        return (summary.get(name) or {}).get("ratio")

    lossless = {n: ratio(n) for n in ("tokopt-onnx", "tokopt-eager", "tokopt-onnx-recycling", "tokopt-eager-recycling")
                if ratio(n) is not None}
    best = max(lossless, key=lossless.get) if lossless else None
    rows = [("tokopt ORT fp32 greedy vs ORT GenAI fp32", "tokopt-onnx", ratio("tokopt-onnx"), 1.1),
            (f"best lossless fp32 ({best}) vs ORT GenAI fp32", best, lossless.get(best), 1.4)]
    out = [{"target": t, "runner": r, "ratio": v, "goal": g, "met": v is not None and v >= g,
            "gap": None if v is None else v - g} for t, r, v, g in rows]
    i4 = ratio("ortgenai-int4")
    out.append({"target": "ORT GenAI int4 (peer, for reference) vs its fp32", "runner": "ortgenai-int4", "ratio": i4,
                "goal": None, "met": None, "gap": None})
    return out


def to_markdown(result: dict) -> str:
    s, m = result["summary"], result.get("matches_hf", {})
    lines = ["| runner | tokens/s (median) | ratio vs ORT GenAI fp32 | greedy tokens = HF |", "|---|---:|---:|---|"]
    for name in result.get("runners", list(s)):
        if name not in s:
            continue
        r = s[name]
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        match = {True: "yes", False: "no", None: "— (int4)"}[m.get(name)]
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {ratio} | {match} |")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | |")
    lines += ["", "| target | ratio | goal | met |", "|---|---:|---:|---|"]
    for t in result.get("targets", []):
        ratio = "—" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        goal = "—" if t["goal"] is None else f">= {t['goal']}x"
        met = "—" if t["met"] is None else ("yes" if t["met"] else f"no (short by {-t['gap']:.2f}x)")
        lines.append(f"| {t['target']} | {ratio} | {goal} | {met} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result.get("runners", result["summary"]) if n in result["summary"]]
    vals = [result["summary"][n]["tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    colors = ["tab:gray" if n.startswith("ortgenai") else "tab:blue" for n in names]
    ax.barh(names, vals, color=colors)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (median, greedy, CPU)")
    ax.set_title("tokopt vs ONNX Runtime GenAI")
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- workers

def _worker(spec: dict) -> None:
    """One runner, loaded once; reads ``{"ids": [...]}`` lines, answers ``{"tokens": [...], "seconds": s}``."""
    kind, variant, spec_method = RUNNERS[spec["runner"]]
    n = spec["max_new_tokens"]
    if kind == "ortgenai":
        import onnxruntime_genai as og

        model = og.Model(spec["peer_dir"])

        def run(ids):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + n, do_sample=False)
            if spec_method == "ngram":
                params.set_speculative_options(**spec["ngram_options"])
            gen = og.Generator(model, params)
            gen.append_tokens(ids)
            while not gen.is_done():
                gen.generate_next_token()
            return [int(t) for t in gen.get_sequence(0)[len(ids):]][:n]
    else:
        import torch

        import tokopt

        if variant == "onnx":
            opt = tokopt.load_engine(spec["engine_dir"], speculative=spec_method)
        else:
            model, tokenizer = tokopt.load(spec["model"], progress=False)
            opt = tokopt.optimize(model, speculative=spec_method, tokenizer=tokenizer)

        def run(ids):
            x = torch.tensor([ids], dtype=torch.long)
            out = opt.generate(x, torch.ones_like(x), max_new_tokens=n)
            return [int(t) for t in out[0, len(ids):].tolist()]
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        ids = json.loads(line)["ids"]
        t0 = time.perf_counter()
        tokens = run(ids)
        seconds = time.perf_counter() - t0
        print(json.dumps({"tokens": tokens, "seconds": seconds}), flush=True)


class _Worker:
    def __init__(self, spec: dict):
        self.name = spec["runner"]
        self.proc = subprocess.Popen([sys.executable, "-m", "tokopt.bench.peers", "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, HF_HUB_OFFLINE="1"))
        self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read().strip().splitlines()[-3:]
                raise TokoptError(f"runner {self.name} died: " + " | ".join(err))
            if line.startswith("{"):
                return json.loads(line)

    def run(self, ids) -> dict:
        self.proc.stdin.write(json.dumps({"ids": ids}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def ngram_options() -> tuple[dict | None, str | None]:
    """ORT GenAI's n-gram speculation options for this version, or (None, why not)."""
    import onnxruntime_genai as og

    if not hasattr(og.GeneratorParams, "set_speculative_options"):
        return None, f"onnxruntime-genai {og.__version__} has no GeneratorParams.set_speculative_options"
    return {"ngram_size": 3, "max_draft_tokens": 8}, None


# ---------------------------------------------------------------- the run

def _engine_dir(model, tokenizer, name: str) -> Path:
    """tokopt's ONNX engine of the model with the default passes, exported once (the same cache path as
    ``bench.harness.cached_engine_dir``)."""
    import tokopt
    from tokopt.api.optimize import DEFAULT_PASSES
    from tokopt.errors import EngineError
    from tokopt.export.engine_dir import export_engine, read_manifest
    from tokopt.paths import cache_dir

    path = cache_dir() / "engines" / f"{name}-{'-'.join(DEFAULT_PASSES) or 'nopasses'}"
    try:
        read_manifest(path)
        return path
    except EngineError:
        opt = tokopt.optimize(model, tokenizer=tokenizer)
        with progress_step(f"exporting the ONNX engine once into {path}"):
            return export_engine(opt, path, model_config=model.config.to_dict(), model_name=name)


def run_peers_bench(config: PeersConfig, peer: str = "ortgenai") -> dict:
    check_peer(peer)
    import torch

    import tokopt
    from tokopt.data import first_turns
    from tokopt.machine import describe
    from tokopt.models.loading import DEFAULT_MODEL, ensure_converted
    from tokopt.runtime.prompts import encode_prompts

    model_ref = config.model or DEFAULT_MODEL
    hf_dir = Path(model_ref) if Path(model_ref).is_dir() else ensure_converted(model_ref)
    name = hf_dir.name
    model, tokenizer = tokopt.load(str(hf_dir))
    questions = first_turns(config.questions, count=config.prompts)
    prompts = []
    for q in questions:
        ids, mask = encode_prompts(tokenizer, [q])
        prompts.append(ids[0][mask[0].bool()].tolist())
    with torch.inference_mode():
        hf = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=config.max_new_tokens, do_sample=False)[0, len(p):].tolist()
              for p in prompts]

    runners = [r for r in config.runners if r in RUNNERS]
    skipped = {}
    specs = {}
    ng, why = ngram_options()
    engine_dir = None
    for r in runners:
        kind, variant, sm = RUNNERS[r]
        spec = {"runner": r, "max_new_tokens": config.max_new_tokens, "model": str(hf_dir)}
        if kind == "ortgenai":
            if sm == "ngram" and ng is None:
                skipped[r] = why
                continue
            spec["ngram_options"] = ng
            spec["peer_dir"] = str(build_ortgenai(hf_dir, variant, peer_model_dir(name, variant)))
        elif variant == "onnx":
            if engine_dir is None:
                engine_dir = str(config.engine_dir or _engine_dir(model, tokenizer, name))
            spec["engine_dir"] = engine_dir
        specs[r] = spec
    workers = {}
    try:
        for r, spec in specs.items():
            with progress_step(f"starting runner {r}"):
                try:
                    workers[r] = _Worker(spec)
                except TokoptError as exc:
                    skipped[r] = str(exc)
        order = interleaved_order(list(workers), config.rounds)
        samples = {r: [] for r in workers}
        tokens = {r: [None] * len(prompts) for r in workers}
        for rnd, names in enumerate(order):
            with progress_step(f"round {rnd + 1}/{config.rounds}"):
                for qi, ids in enumerate(prompts):
                    for r in names:
                        try:
                            ans = workers[r].run(ids)
                        except TokoptError as exc:
                            skipped[r] = str(exc)
                            continue
                        if ans["tokens"]:
                            samples[r].append({"question": qi, "round": rnd, "tokens": len(ans["tokens"]),
                                               "seconds": ans["seconds"]})
                        tokens[r][qi] = ans["tokens"]
    finally:
        for w in workers.values():
            w.close()
    summary = summarize(samples)
    matches = {r: (None if r == "ortgenai-int4" else all(t == h for t, h in zip(tokens[r], hf)))
               for r in tokens}
    result = {"config": asdict(config), "peer": peer, "model_dir": str(hf_dir), "machine": describe(),
              "runners": [r for r in runners if r in summary], "summary": summary, "matches_hf": matches,
              "skipped": skipped, "tokens": tokens, "hf_tokens": hf, "order": order}
    result["targets"] = targets(summary)
    try:
        import onnxruntime_genai as og

        result["peer_version"] = og.__version__
    except Exception:  # noqa: BLE001
        pass
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "peers.md").write_text(to_markdown(result))
    plot(result, out / "peers.png")
    print(to_markdown(result))
    print(f"wrote {out / 'peers.json'}, peers.md, peers.png")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]))
