"""MoEfication: turn a dense Llama-family model into a Mixtral MoE with learned routing.

Each layer's SwiGLU FFN (``down(silu(gate x) * up x)``, width I) is a sum over its I neurons, so splitting the
neurons into E groups of I/E gives E experts whose outputs add up to the dense FFN exactly. A token then runs
only its top-k experts: the router (E x hidden, the only new weights) is trained per layer to pick the experts
that best reproduce the dense FFN output on real text, with gradients through the renormalized top-k softmax
weights plus a cross-entropy pull towards the experts with the largest outputs. Neurons that fire together
are put in the same expert (balanced k-means on their activation patterns), so dropping experts loses less.

Mixtral renormalizes the top-k weights to sum to 1; ``down_proj`` is scaled by ``top_k`` so that a token whose
k weights are equal gets the plain sum of its k experts (with top_k = E and equal weights: the dense model).

Example::

    import tokopt
    from tokopt.models.moefy import moefy

    dense, tok = tokopt.load()
    moe = moefy(dense, tok, num_experts=8, top_k=4)      # MixtralForCausalLM, about 2 minutes on 2 CPU cores
    moe.save_pretrained("smollm2-moe"); tok.save_pretrained("smollm2-moe")
"""

from __future__ import annotations

import copy
import sys
import time

import torch
import torch.nn.functional as F

from tokopt.data import calibration_text, sample_turns
from tokopt.errors import TokoptError
from tokopt.progress import quiet

# Dense families whose decoder layer is Mixtral's minus the MoE block (no q/k norms, no attention bias).
MOEFIABLE = ("llama", "mistral")
SMOLLM2_MOE_TOP_K = 4  # of 8 experts; top-2 measured much worse (bench/RESULTS.md, issue 4)


def default_texts() -> list[str]:
    """Calibration text shipped with tokopt: calibration.txt and the Spec-Bench sample questions."""
    return [calibration_text(), *sample_turns()]


def check_moefiable(config, num_experts: int, top_k: int) -> None:
    """Raise TokoptError unless ``config`` is a dense Llama-family model whose FFN splits into ``num_experts``."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MOEFIABLE:
        raise TokoptError(f"moefy needs a dense Llama-family model ({', '.join(MOEFIABLE)}); got model type "
                          f"{model_type!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise TokoptError("moefy needs a model without attention or MLP biases (Mixtral has none)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise TokoptError(f"moefy needs a SwiGLU FFN (hidden_act 'silu'); got {config.hidden_act!r}")
    width = config.intermediate_size
    if num_experts < 1 or width % num_experts:
        raise TokoptError(f"num_experts={num_experts} must divide the FFN width {width} "
                          f"(e.g. {', '.join(str(e) for e in (2, 4, 8, 16) if width % e == 0)})")
    if not 1 <= top_k <= num_experts:
        raise TokoptError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")


def neuron_activations(mlp, x: torch.Tensor) -> torch.Tensor:
    """The FFN's hidden activations ``silu(gate x) * up x`` for inputs ``x`` [N, d] -> [N, I]."""
    return F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight)


def cluster_neurons(mlp, num_experts: int, *, inputs: torch.Tensor | None = None, iters: int = 10,
                    seed: int = 0) -> torch.Tensor:
    """Group the FFN's neurons into ``num_experts`` equal groups; returns [E, I/E] neuron indices.

    With ``inputs`` (FFN inputs on real text) neurons are clustered by their activation magnitudes, so neurons
    that fire on the same tokens share an expert; without, by their gate/up weight rows. Balanced k-means:
    each step assigns (neuron, cluster) pairs in order of distance, a cluster taking at most I/E neurons.
    """
    width = mlp.gate_proj.weight.shape[0]
    size = width // num_experts
    with torch.no_grad():
        if inputs is not None:
            feats = neuron_activations(mlp, inputs[:1024]).abs().T.contiguous()  # [I, N]
        else:
            feats = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=1)  # [I, 2d]
        feats = F.normalize(feats.float(), dim=1)
        gen = torch.Generator().manual_seed(seed)
        centroids = feats[torch.randperm(width, generator=gen)[:num_experts]]
        assign = torch.zeros(width, dtype=torch.long)
        for _ in range(iters):
            assign = _balanced_assign(-feats @ centroids.T, size)  # cosine distance, up to a constant
            centroids = F.normalize(F.one_hot(assign, num_experts).T.float() @ feats, dim=1)
        groups = [torch.nonzero(assign == e).flatten() for e in range(num_experts)]
    return torch.stack(groups)


def _balanced_assign(dist: torch.Tensor, size: int) -> torch.Tensor:
    width, num = dist.shape
    order = torch.argsort(dist.flatten()).tolist()
    assign = [-1] * width
    room = [size] * num
    left = width
    for flat in order:
        n, e = divmod(flat, num)
        if assign[n] < 0 and room[e] > 0:
            assign[n], room[e], left = e, room[e] - 1, left - 1
            if left == 0:
                break
    return torch.tensor(assign)


def split_ffn(mlp, groups: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral expert weights from a SwiGLU FFN and neuron groups [E, I/E]: ``gate_up_proj`` [E, 2 I/E, d]
    (gate rows, then up rows) and ``down_proj`` [E, d, I/E] times ``scale``."""
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    gate_up = torch.stack([torch.cat([gate[g], up[g]]) for g in groups])
    down_e = torch.stack([down[:, g] for g in groups]) * scale
    return gate_up.detach().clone(), down_e.detach().clone()


def encode_texts(tokenizer, texts: list[str], *, seq_len: int = 256, max_tokens: int = 8192) -> torch.Tensor:
    """Concatenate ``texts`` into token rows of ``seq_len`` [rows, seq_len] (at most ``max_tokens``)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    ids = ids[:max_tokens]
    rows = max(1, len(ids) // seq_len)
    seq_len = min(seq_len, len(ids))
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


@torch.no_grad()
def collect_ffn_inputs(model, token_rows: torch.Tensor) -> list[torch.Tensor]:
    """Run the dense model on ``token_rows`` and return each layer's FFN inputs (after the norm) [N, d]."""
    layers = model.model.layers
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1])))
             for i, layer in enumerate(layers)]
    try:
        for row in token_rows:
            model.model(row[None], use_cache=False)  # the decoder stack only: no LM head needed
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(chunks).float() for chunks in seen]


@torch.no_grad()
def expert_outputs(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Every expert's output for every input, unweighted: [N, E, d]."""
    g, u = torch.einsum("nd,efd->nef", x, gate_up).chunk(2, dim=-1)
    return torch.einsum("nef,edf->ned", F.silu(g) * u, down)


def moe_output(logits: torch.Tensor, outputs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mixtral's combination of the experts' ``outputs`` [N, E, d] under router ``logits`` [N, E]."""
    return torch.einsum("ne,ned->nd", combine_weights(logits, top_k), outputs)


def train_router(x: torch.Tensor, outputs: torch.Tensor, top_k: int, *, steps: int = 150, lr: float = 3e-2,
                 aux_weight: float = 0.1, batch: int = 1024, seed: int = 0) -> torch.Tensor:
    """Router weight [E, d] minimizing || MoE(x) - FFN(x) ||^2 / || FFN(x) ||^2 on inputs ``x`` [N, d].

    ``outputs`` [N, E, d] are the experts' outputs already scaled by top_k (equal weights = plain sum of the
    chosen experts); the dense FFN output is their sum / top_k. The auxiliary cross-entropy pulls the router's
    softmax towards the experts whose outputs are largest, which gives the non-differentiable top-k choice a
    gradient.
    """
    num_experts = outputs.shape[1]
    dense = outputs.sum(1) / top_k
    # || sum_e w_e y_e - f ||^2 = w^T G w - 2 w^T c + ||f||^2: per token an E x E problem, not an E x d one
    gram = torch.einsum("ned,nfd->nef", outputs, outputs)
    cross = torch.einsum("ned,nd->ne", outputs, dense)
    sq = dense.pow(2).sum(-1)
    norm = sq.mean()
    target = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    target = target / target.sum(-1, keepdim=True)  # soft target: each expert's share of output norm
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_experts, x.shape[1], generator=gen) * 1e-3).requires_grad_()
    opt = torch.optim.Adam([weight], lr=lr)
    scale = x.pow(2).sum(-1).mean().sqrt()
    xs = x / scale  # well-conditioned steps; the scale is folded back into the weight
    for _ in range(steps):
        rows = torch.randint(0, len(x), (min(batch, len(x)),), generator=gen)
        logits = xs[rows] @ weight.T
        w = combine_weights(logits, top_k)
        quad = (w[:, None, :] @ gram[rows] @ w[:, :, None]).flatten()
        err = (quad - 2 * (w * cross[rows]).sum(-1) + sq[rows]).mean() / norm
        aux = -(target[rows] * logits.log_softmax(-1)).sum(-1).mean()
        opt.zero_grad()
        (err + aux_weight * aux).backward()
        opt.step()
    return (weight.detach() / scale).clone()


def combine_weights(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mixtral's per-expert weights [N, E]: softmax, keep the top-k, renormalize (zero elsewhere)."""
    probs = logits.float().softmax(-1)
    top, idx = probs.topk(top_k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))


def mixtral_config(config, num_experts: int, top_k: int):
    """A MixtralConfig with the dense Llama config's sizes, rope and norm settings."""
    from transformers import MixtralConfig

    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
            "rope_parameters", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id")
    kwargs = {k: getattr(config, k) for k in keep if getattr(config, k, None) is not None}
    return MixtralConfig(**kwargs, intermediate_size=config.intermediate_size // num_experts,
                         num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None,
                         tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                         router_jitter_noise=0.0, output_router_logits=False, router_aux_loss_coef=0.0)


def moefy(dense_model, tokenizer=None, *, num_experts: int = 8, top_k: int = 4, texts: list[str] | None = None,
          steps: int = 150, max_tokens: int = 6144, cluster: str = "activations", train: bool = True,
          progress: bool = True):
    """Build a MixtralForCausalLM from a dense Llama-family model (the dense model is not modified).

    ``texts`` (default: the calibration text shipped with tokopt) give the FFN inputs for clustering and
    router training; ``cluster`` is "activations" (co-activation) or "weights" (gate/up rows);
    ``train=False`` leaves an equal-logit router (with ``top_k == num_experts`` that is the dense model).

    Example::

        moe = moefy(dense, tok, num_experts=8, top_k=4, steps=150)
    """
    from tqdm.auto import tqdm
    from transformers import MixtralForCausalLM

    check_moefiable(dense_model.config, num_experts, top_k)
    if cluster not in ("activations", "weights"):
        raise TokoptError(f"cluster must be 'activations' or 'weights', not {cluster!r}")
    needs_text = train or cluster == "activations"
    if needs_text and tokenizer is None:
        raise TokoptError("moefy needs the tokenizer to encode calibration text (or train=False, cluster='weights')")
    say = (lambda msg: print(f"tokopt: {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    start = time.perf_counter()
    dense_model = dense_model.eval()
    inputs: list[torch.Tensor | None] = [None] * dense_model.config.num_hidden_layers
    if needs_text:
        rows = encode_texts(tokenizer, texts if texts is not None else default_texts(), max_tokens=max_tokens)
        say(f"collecting FFN inputs of {rows.numel()} calibration tokens ...")
        inputs = collect_ffn_inputs(dense_model, rows)

    config = mixtral_config(dense_model.config, num_experts, top_k)
    moe = MixtralForCausalLM(config)
    state = {k: v for k, v in dense_model.state_dict().items() if ".mlp." not in k}
    layers = dense_model.model.layers
    for i in tqdm(range(len(layers)), desc=f"tokopt: splitting FFNs, training routers ({num_experts} experts, "
                  f"top-{top_k})", disable=not progress, unit="layer"):
        mlp = layers[i].mlp
        x = inputs[i]
        groups = cluster_neurons(mlp, num_experts, inputs=x if cluster == "activations" else None, seed=i)
        gate_up, down = split_ffn(mlp, groups, scale=float(top_k))
        if train:
            router = train_router(x, expert_outputs(gate_up, down, x), top_k, steps=steps, seed=i)
        else:
            router = torch.zeros(num_experts, config.hidden_size)
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "gate.weight"] = router
        state[prefix + "experts.gate_up_proj"] = gate_up
        state[prefix + "experts.down_proj"] = down
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise TokoptError(f"moefy: weights do not match Mixtral's (missing {missing[:3]}, unexpected {unexpected[:3]})")
    moe.generation_config = copy.deepcopy(dense_model.generation_config)
    say(f"moefy: {num_experts} experts, top-{top_k}, built in {time.perf_counter() - start:.1f} s")
    return moe.eval()


def build_smollm2_moe(out, *, progress: bool = True) -> None:
    """Builder of the known model "smollm2-moe": the default SmolLM2-135M-Instruct moefied (8 experts, top-4),
    saved with its tokenizer to the directory ``out``. ``tokopt.load("smollm2-moe")`` calls it once."""
    import tokopt

    progress = progress and not quiet()
    dense, tokenizer = tokopt.load(progress=progress)
    moe = moefy(dense, tokenizer, num_experts=8, top_k=SMOLLM2_MOE_TOP_K, progress=progress)
    moe.save_pretrained(out)
    tokenizer.save_pretrained(out)

