"""Negatives across processes: 2 gloo processes give the loss and gradients of one process on the
concatenated batch (global NT-Xent), and the local loss when gathering is off."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from fewshot.config import load_config
from fewshot.methods import build_method
from fewshot.objectives import nt_xent_loss

WORLD, N, D, TAU = 2, 6, 5, 0.3
TINY = ["data.image_size=16", "method.projection_hidden=16", "method.projection_dim=8", "encoder.options={width: 8}",
        f"method.temperature={TAU}"]


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * N, D, generator=g, dtype=torch.float64), torch.randn(WORLD * N, D, generator=g, dtype=torch.float64)


def _worker(rank: int, store: str, out: str, gather: bool, positive_in_denominator: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        z1, z2 = _batch()
        z1 = z1[rank * N : (rank + 1) * N].clone().requires_grad_()
        z2 = z2[rank * N : (rank + 1) * N].clone().requires_grad_()
        method = build_method(load_config(overrides=[*TINY, f"method.gather_negatives={gather}",
                                                     f"method.positive_in_denominator={positive_in_denominator}"]))
        loss = method.loss(z1, z2, torch.zeros(N))  # the SimCLR method's own wiring, on given embeddings
        loss.backward()
        save_file({"loss": loss.detach().reshape(1), "g1": z1.grad, "g2": z2.grad}, os.path.join(out, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, gather, positive_in_denominator):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path), gather, positive_in_denominator), nprocs=WORLD, join=True)
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]


@pytest.mark.parametrize("positive_in_denominator", [True, False])
def test_gathered_negatives_equal_one_process_on_the_whole_batch(tmp_path, positive_in_denominator):
    ranks = _spawn(tmp_path, True, positive_in_denominator)
    z1, z2 = _batch()
    z1.requires_grad_()
    z2.requires_grad_()
    full = nt_xent_loss(z1, z2, TAU, positive_in_denominator)
    full.backward()
    # DDP averages over processes: the mean of the per-process losses is the global loss...
    torch.testing.assert_close(sum(r["loss"] for r in ranks)[0] / WORLD, full.detach(), atol=1e-10, rtol=1e-10)
    # ...and each process's gradient on its own rows, averaged the same way, is the global gradient.
    for rank, r in enumerate(ranks):
        rows = slice(rank * N, (rank + 1) * N)
        torch.testing.assert_close(r["g1"] / WORLD, z1.grad[rows], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(r["g2"] / WORLD, z2.grad[rows], atol=1e-10, rtol=1e-10)


def test_local_loss_sees_only_its_own_batch(tmp_path):
    ranks = _spawn(tmp_path, False, True)
    z1, z2 = _batch()
    for rank, r in enumerate(ranks):
        rows = slice(rank * N, (rank + 1) * N)
        torch.testing.assert_close(r["loss"][0], nt_xent_loss(z1[rows], z2[rows], TAU), atol=1e-10, rtol=1e-10)
