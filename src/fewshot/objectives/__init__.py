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
    triplet_loss,
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
    "triplet_loss",
]
