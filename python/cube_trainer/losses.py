"""Every loss term of the trainer, in one place.

For a batch of questions ``q_i`` with answers ``a_i`` (unit teacher embeddings), the model gives
the back-face surface ``s_i``, the prediction ``p_i = adapter_out(s_i)`` in teacher space and the
lattice states ``x_T``, ``x_{T-1}`` after its last two steps. With ``S(a) = surface(a)``, the
answer pushed through the input adapter, and ``sg`` the stop-gradient:

    surface     = 1 - mean_i cos(s_i, sg[S(a_i)])
    dialogue    = 1 - mean_i cos(p_i, a_i)
    contrastive = mean_i -log( exp(cos(p_i, a_i)/tau) / sum_j exp(cos(p_i, a_j)/tau) )
    internal    = mean over interior cells (0 < d < D-1) and channels of (x_T - x_{T-1})^2
    total       = w_surface*surface + w_dialogue*dialogue + w_contrastive*contrastive + w_internal*internal

* surface: the lattice should put the answer's own surface on the back face. The target is
  computed under no_grad, so the adapter cannot shrink the loss by collapsing every surface onto
  one vector.
* dialogue: the answer in teacher space, through the inverse adapter (the old trainer's term).
* contrastive: in-batch InfoNCE with temperature tau; the j run over the answers of the batch
  (the whole global micro-batch under DDP). Cosine alone is won by predicting the mean answer;
  this term is only won by predicting *this* question's answer rather than the others. Answers
  identical to a_i (the same text for another question) and the other answers of the same
  question are not counted as negatives: they are right too.
* internal: a stability term on the interior states: the lattice should settle instead of
  drifting or blowing up while the surface flows through it (0 for lattices with depth <= 2).

``cosine_similarity`` (= 1 - dialogue) is reported as a metric, not optimised separately.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LossConfig

TERMS = ("surface", "dialogue", "contrastive", "internal")


@torch.no_grad()
def surface_target(model, answer_emb: torch.Tensor) -> torch.Tensor:
    """``sg[S(a)]``: the answer's surface, without gradient."""
    return model.surface(answer_emb).float()


def dialogue_loss(pred: torch.Tensor, answer_emb: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(pred.float(), answer_emb.float(), dim=-1).mean()


def same_question(ids: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """``[b, M]``: does row i (question id ``ids[i]``) share its question with key j?"""
    return ids.unsqueeze(1) == key_ids.unsqueeze(0)


def contrastive_loss(pred: torch.Tensor, answer_emb: torch.Tensor, temperature: float,
                     negatives: torch.Tensor | None = None, offset: int = 0,
                     same: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE of ``pred`` [b, T] against ``negatives`` [M, T] (default: ``answer_emb``); row i's
    positive is ``negatives[offset + i]``, which must equal ``answer_emb[i]``. Copies of the
    positive and the keys where ``same`` ([b, M] bool: the same question) are left out."""
    keys = (answer_emb if negatives is None else negatives).float()
    b = pred.shape[0]
    pos = torch.arange(b, device=pred.device) + offset
    logits = F.normalize(pred.float(), dim=-1) @ F.normalize(keys, dim=-1).T / temperature
    ignored = (answer_emb.float().unsqueeze(1) == keys.unsqueeze(0)).all(-1)
    if same is not None:
        ignored |= same.to(ignored.device)
    ignored[torch.arange(b, device=pred.device), pos] = False
    return F.cross_entropy(logits.masked_fill(ignored, float("-inf")), pos)


def internal_loss(final_state: torch.Tensor | None, previous_state: torch.Tensor | None) -> torch.Tensor:
    """0 without a lattice (None) and for lattices with depth <= 2."""
    if final_state is None or final_state.shape[1] <= 2:
        return torch.zeros((), dtype=torch.float32, device=None if final_state is None else final_state.device)
    return (final_state[:, 1:-1].float() - previous_state[:, 1:-1].float()).pow(2).mean()


def answer_losses(pred: torch.Tensor, answer_emb: torch.Tensor, cfg: LossConfig,
                  negatives: torch.Tensor | None = None, offset: int = 0,
                  same: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The terms that live in teacher space (what a model without a lattice can be trained on)."""
    return {"dialogue": dialogue_loss(pred, answer_emb),
            "contrastive": contrastive_loss(pred, answer_emb, cfg.temperature, negatives, offset, same)}


def compute_losses(out: dict[str, torch.Tensor], answer_emb: torch.Tensor, target_surface: torch.Tensor,
                   cfg: LossConfig, negatives: torch.Tensor | None = None,
                   offset: int = 0, same: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All terms for the model output ``out`` (``CubeModel.forward``); returns ``total_loss``,
    ``<term>_loss`` for each term and ``cosine_similarity``. ``same``: see ``contrastive_loss``."""
    terms = answer_losses(out["final_output"], answer_emb, cfg, negatives, offset, same)
    terms["surface"] = 1.0 - F.cosine_similarity(out["output_surface"].float(), target_surface.detach().float(),
                                                 dim=-1).mean()
    terms["internal"] = internal_loss(out["final_cube_state"], out["previous_cube_state"])
    total = sum(getattr(cfg, name) * terms[name] for name in TERMS)
    result = {"total_loss": total}
    result.update({f"{name}_loss": terms[name] for name in TERMS})
    result["cosine_similarity"] = 1.0 - terms["dialogue"].detach()
    return result
