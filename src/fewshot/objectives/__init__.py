"""Objectives: pure loss functions whose docstrings state their formulas."""

from fewshot.objectives.contrastive import (
    BYOLLoss,
    InfoNCELoss,
    NPairLoss,
    NTXentLoss,
    SupConLoss,
    TripletLoss,
    batch_hard_triplet_loss,
    byol_loss,
    info_nce_loss,
    n_pair_loss,
    nt_xent_loss,
    supcon_loss,
    time_contrastive_loss,
    triplet_loss,
)
from fewshot.objectives.episodic import (
    R2D2Head,
    prototypical_logits,
    prototypical_loss,
    r2d2_logits,
    r2d2_loss,
    ridge_regression_head,
)

__all__ = [
    "BYOLLoss",
    "InfoNCELoss",
    "NPairLoss",
    "NTXentLoss",
    "SupConLoss",
    "TripletLoss",
    "batch_hard_triplet_loss",
    "byol_loss",
    "info_nce_loss",
    "n_pair_loss",
    "nt_xent_loss",
    "supcon_loss",
    "time_contrastive_loss",
    "triplet_loss",
    "R2D2Head",
    "prototypical_logits",
    "prototypical_loss",
    "r2d2_logits",
    "r2d2_loss",
    "ridge_regression_head",
]
