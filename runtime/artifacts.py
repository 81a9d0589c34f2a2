"""Trained artifacts the speculative methods load, and where they live in the cache.

- PPD prompt-token embeddings (``tokopt train-ppd``): ``cache_dir()/ppd/<fingerprint>.pt``, a dict of the
  embeddings ``[k, hidden]``, the model fingerprint, k and the held-out metrics; loaded with ``weights_only``;
- SpecDec++ acceptance heads (``tokopt train-specdec``): ``cache_dir()/specdec/<target>-<draft>.pt``.

Example::

    artifact = load_ppd_artifact(model)        # refuses another model's embeddings, names `tokopt train-ppd`
    artifact["embeddings"].shape               # torch.Size([3, 576])
"""

from __future__ import annotations

from pathlib import Path

import torch

from tokopt.errors import TokoptError
from tokopt.models.loading import model_fingerprint
from tokopt.paths import cache_dir


def ppd_artifact_path(fingerprint: str) -> Path:
    """Where ``tokopt train-ppd`` saves (and ``speculative="ppd"`` looks for) a model's prompt embeddings."""
    return cache_dir() / "ppd" / f"{fingerprint}.pt"


def load_ppd_artifact(model, path=None) -> dict:
    """The artifact trained for ``model`` (its fingerprint's default path, or ``path``); a clear TokoptError when
    there is none or it was trained for another model."""
    fingerprint = model_fingerprint(model)
    path = Path(path) if path is not None else ppd_artifact_path(fingerprint)
    if not path.is_file():
        raise TokoptError(f"no PPD prompt embeddings for this model (fingerprint {fingerprint}) at {path}; "
                          "train them first with `tokopt train-ppd [MODEL]` (a few minutes on CPU)")
    try:
        artifact = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only: no code
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise TokoptError(f"{path} is not a readable PPD artifact ({type(exc).__name__}); retrain it with "
                          "`tokopt train-ppd [MODEL]`") from None
    if not isinstance(artifact, dict):
        raise TokoptError(f"{path} is not a PPD artifact (a dict of embeddings and metrics); retrain it with "
                          "`tokopt train-ppd [MODEL]`")
    if artifact.get("fingerprint") != fingerprint:
        raise TokoptError(f"{path} holds PPD prompt embeddings trained for model {artifact.get('fingerprint')}, "
                          f"not for this model ({fingerprint}); train its own with `tokopt train-ppd [MODEL]`")
    return artifact


def save_ppd_artifact(embeddings: torch.Tensor, fingerprint: str, metrics: dict, path=None, curve=None,
                      model_name: str = "") -> Path:
    """Save prompt embeddings ``[k, hidden]`` for the model ``fingerprint`` (``metrics['rank_accuracy']``
    ``[k][ranks]`` shapes the drafter's first trees); default path ``ppd_artifact_path``."""
    path = Path(path) if path is not None else ppd_artifact_path(fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"embeddings": embeddings.detach().cpu(), "fingerprint": fingerprint, "k": embeddings.shape[0],
                "model": model_name, "metrics": metrics, "curve": curve or {}}, path)
    return path


def specdec_head_path(target_fp: str, draft_fp: str):
    """Where ``tokopt train-specdec`` saves (and ``specdec++`` looks for) the head of a target/draft pair."""
    return cache_dir() / "specdec" / f"{target_fp}-{draft_fp}.pt"
