"""SpecDec++ (arXiv 2405.19715): draft a chain and stop when a rejection becomes likely.

An acceptance-prediction head on the draft model's final hidden state (residual MLP blocks, then one logit)
estimates P(the token drafted from this state is accepted). Drafting keeps ``cum = prod p_accept`` and stops
once ``1 - cum > threshold`` (a threshold policy is optimal, by the paper), within ``min_length`` and
``max_length``. The head is trained by ``tokopt train-specdec`` (``tokopt.training.specdec``) and saved with the
fingerprints of the target and draft it was trained for; loading it for another pair is refused.

Example::

    head = load_head(path, target_fingerprint=fp_target, draft_fingerprint=fp_draft)
    drafter = DraftModelDrafter(runner, SpecDecPolicy(head, threshold=0.3))
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tokopt.errors import TokoptError

HEAD_FORMAT = "tokopt-specdec-head"


class AcceptanceHead(nn.Module):
    """``hidden [..., H] -> logit [...]`` of P(accept): ``blocks`` residual SiLU MLPs, then Linear(H, 1)."""

    def __init__(self, hidden_size: int, blocks: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(hidden_size, hidden_size) for _ in range(blocks)])
        self.out = nn.Linear(hidden_size, 1)
        for block in self.blocks:  # start as the identity: the residual branch begins at zero
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    def forward(self, hidden):
        x = hidden.float()
        for block in self.blocks:
            x = x + nn.functional.silu(block(x))
        return self.out(x).squeeze(-1)


def save_head(head: AcceptanceHead, path, *, target_fingerprint: str, draft_fingerprint: str, meta: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": HEAD_FORMAT, "target": target_fingerprint, "draft": draft_fingerprint,
                "hidden_size": head.out.in_features, "blocks": len(head.blocks),
                "state_dict": head.state_dict(), "meta": meta}, path)
    return path


def load_head(path, *, target_fingerprint: str, draft_fingerprint: str) -> AcceptanceHead:
    """Load a trained head, refusing one trained for another target or draft model."""
    path = Path(path)
    if not path.is_file():
        raise TokoptError(f"no SpecDec++ acceptance head at {path}; train one with `tokopt train-specdec` "
                          "(a few minutes on CPU)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise TokoptError(f"{path} is not a readable SpecDec++ head ({exc}); retrain with `tokopt train-specdec`")
    if not isinstance(blob, dict) or blob.get("format") != HEAD_FORMAT:
        raise TokoptError(f"{path} is not a tokopt SpecDec++ head; retrain with `tokopt train-specdec`")
    if blob["target"] != target_fingerprint or blob["draft"] != draft_fingerprint:
        raise TokoptError(
            f"the SpecDec++ head {path} was trained for another model pair (target {blob['target']}, draft "
            f"{blob['draft']}); this is target {target_fingerprint}, draft {draft_fingerprint}: train one for "
            "this pair with `tokopt train-specdec`")
    head = AcceptanceHead(blob["hidden_size"], blob["blocks"])
    head.load_state_dict(blob["state_dict"])
    return head.eval()


class SpecDecPolicy:
    """A chain whose length adapts per step and per row (see module docstring)."""

    name = "specdec++"
    replacement = True  # one child per node

    def __init__(self, head: AcceptanceHead, threshold: float = 0.3, min_length: int = 1, max_length: int = 8):
        if not 0 < threshold < 1:
            raise TokoptError(f"specdec++ stop threshold must be in (0, 1), got {threshold}")
        if not 1 <= min_length <= max_length:
            raise TokoptError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
        self.head, self.threshold = head, threshold
        self.min_length, self.max_length = min_length, max_length
        self.lengths = []  # drafted chain length per row and step

    def build(self, session) -> None:
        batch = len(session.nodes)
        tips = [0] * batch
        cum = [1.0] * batch
        going = list(range(batch))
        for depth in range(self.max_length):
            if depth:
                session.compute([[tips[b]] if b in going else [] for b in range(batch)])
            hidden = torch.stack([session.nodes[b][tips[b]].hidden for b in going])
            with torch.no_grad():
                p_accept = torch.sigmoid(self.head(hidden)).tolist()
            still = []
            for b, p in zip(going, p_accept):
                tips[b] = session.add(b, tips[b], session.pick(session.nodes[b][tips[b]].probs))
                cum[b] *= p
                if depth + 1 < self.min_length or 1 - cum[b] <= self.threshold:
                    still.append(b)
            going = still
            if not going:
                break
        self.lengths.extend(session.nodes[b][tips[b]].depth for b in range(batch))
