"""Across processes: 2 gloo processes give the loss and gradients of one process on the concatenated
batch (global NT-Xent), and the local loss when gathering is off; on fixed views the whole DDP update
equals one process's on the joined batch where no BatchNorm couples the samples (per-process BatchNorm
is the negative control); MoCo's ranks enqueue the same global keys in the same order."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
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


# ------------------------------------------------------------------ the whole update, and MoCo's queue
# One spawn (2 gloo processes) computes everything below; the tests read its results.

IMAGES = 4  # per process
NETWORKS = {
    # No BatchNorm anywhere: ViT (LayerNorm, per sample) and a linear projector.
    "vit-layernorm": ["encoder=vit-tiny", "encoder.options={depth: 1}", "method.projection_layers=1"],
    # BatchNorm in the encoder and the projector; torch has no CPU SyncBatchNorm, so each process
    # normalises its own slice: the negative control the equality check must reject.
    "conv4-batchnorm": ["encoder.options={width: 8}"],
}
MOCO = ["method=moco", *TINY, "method.queue_size=24", "method.momentum=0.9"]  # 16 keys a step: the 2nd step wraps


def _views(seed: int, n: int = WORLD * IMAGES) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed views (no augmentation randomness): view 1 and view 2 of n images, (n, 1, 16, 16) each."""
    v = torch.rand(2, n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    return v[0], v[1]


def _seeded(overrides: list[str]):
    torch.manual_seed(0)
    return build_method(load_config(overrides=overrides))


def _fixed(method, v1: torch.Tensor, v2: torch.Tensor):
    method.both_views = lambda images, generator: torch.cat([v1, v2])  # what both_views returns: all view 1, then all view 2
    return method


def _update_worker(rank: int, store: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    import fewshot.methods.momentum as momentum

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        rows, grads = slice(rank * IMAGES, (rank + 1) * IMAGES), {}
        v1, v2 = _views(0)
        for name, overrides in NETWORKS.items():
            method = _fixed(_seeded([*TINY, *overrides]), v1[rows], v2[rows])
            ddp = DistributedDataParallel(method)  # kept alive: its backward hooks need it
            loss, _ = ddp({"images": v1[rows], "labels": torch.zeros(IMAGES)}, None)
            loss.backward()  # DDP all-reduces: every rank holds the mean of the ranks' gradients
            grads.update({f"{name}/{n}": p.grad for n, p in method.named_parameters() if p.grad is not None})
        save_file(grads, os.path.join(out, f"grads{rank}.safetensors"))

        try:  # the reason the CPU run cannot sync BatchNorm (a newer torch that can makes this test fail: turn it on)
            torch.nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(2))).train()(torch.randn(4, 2))
            message = "ran"
        except ValueError as exc:
            message = str(exc)
        with open(os.path.join(out, f"syncbn{rank}.txt"), "w") as f:
            f.write(message)

        for gather in (True, False):  # False: each rank enqueues only its own keys, the negative control
            moco, queues, local_keys = _seeded(MOCO), {}, []
            enqueue = moco._enqueue
            moco._enqueue = lambda keys: (local_keys.append(keys.clone()), enqueue(keys))
            real_gather = momentum.gather_all
            if not gather:
                momentum.gather_all = lambda x: x
            try:
                for step in range(2):
                    s1, s2 = _views(10 + step)
                    _fixed(moco, s1[rows], s2[rows])({"images": s1[rows]}, None)
            finally:
                momentum.gather_all = real_gather
            queues = {"queue": moco.queue, "ptr": moco.queue_ptr, **{f"keys{i}": k for i, k in enumerate(local_keys)}}
            save_file(queues, os.path.join(out, f"moco{'-gathered' if gather else '-local'}{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_update_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("network, equal", [("vit-layernorm", True), ("conv4-batchnorm", False)],
                         ids=["no-batchnorm-equal", "per-process-batchnorm-is-caught"])
def test_ddp_parameter_gradients_equal_one_process_on_the_joined_batch(two_processes, network, equal):
    """SimCLR under DDP with gathered negatives, on fixed views: the all-reduced parameter gradients equal
    one process's on the joined batch, unless BatchNorm normalises each process's slice on its own."""
    ranks = [load_file(str(two_processes / f"grads{r}.safetensors")) for r in range(WORLD)]
    v1, v2 = _views(0)
    method = _fixed(_seeded([*TINY, *NETWORKS[network]]), v1, v2)
    loss, _ = method({"images": v1, "labels": torch.zeros(WORLD * IMAGES)}, None)
    loss.backward()
    one = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    got = {k.split("/", 1)[1]: v for k, v in ranks[0].items() if k.startswith(network + "/")}
    assert got.keys() == one.keys() and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    # Relative to each gradient's size: float32 sums in another order give 6e-6 here, per-process BatchNorm 2.7.
    error = max(((got[k] - one[k]).abs().max() / one[k].abs().max().clamp_min(1e-12)).item() for k in one)
    assert (error < 1e-4) == equal, error


def test_syncbatchnorm_does_not_run_on_cpu(two_processes):
    """Why train.sync_batchnorm is off on CPU: torch's SyncBatchNorm refuses CPU tensors under gloo."""
    for r in range(WORLD):
        assert (two_processes / f"syncbn{r}.txt").read_text().startswith("SyncBatchNorm expected input tensor to be on GPU")


@pytest.mark.parametrize("gather", [True, False], ids=["gathered", "local-keys-are-caught"])
def test_moco_ranks_enqueue_the_same_global_keys_in_the_same_order(two_processes, gather):
    ranks = [load_file(str(two_processes / f"moco-{'gathered' if gather else 'local'}{r}.safetensors")) for r in range(WORLD)]
    # By hand: the fresh queue, then each step's keys from rank 0 and rank 1, in that order, wrapping at K.
    queue = _seeded(MOCO).queue.clone()
    ptr = 0
    for step in range(2):
        for keys in (r[f"keys{step}"] for r in ranks):
            for key in keys:
                queue[ptr] = key
                ptr = (ptr + 1) % len(queue)
    same = all(torch.equal(r["queue"], queue) and int(r["ptr"]) == ptr for r in ranks)
    assert same == gather
    if not gather:
        assert not torch.equal(ranks[0]["queue"], ranks[1]["queue"])  # the queues drift apart
