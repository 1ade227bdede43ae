"""Positives from the data: NNCLR's support-set neighbours (never the view itself, never its own
image), its loss against a loop, k-means, and the purity measures against hand counts."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot.config import load_config
from fewshot.evaluate.purity import cluster_purity, neighbour_purity
from fewshot.methods import build_method
from fewshot.methods.neighbors import image_keys
from fewshot.objectives.neighbors import nearest_support, nnclr_loss, spherical_kmeans

TINY = ["method=nnclr", "data.image_size=16", "method.projection_hidden=16", "method.projection_dim=8",
        "method.predictor_hidden=16", "encoder.options={width: 8}", "train.channels_last=false"]


def test_nearest_support_by_hand_and_exclusion():
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    z = torch.tensor([[2.0, 0.1], [0.1, 3.0]])
    assert nearest_support(z, support).tolist() == [0, 1]
    excluded = torch.tensor([[True, False, False], [True, True, True]])
    assert nearest_support(z, support, excluded).tolist() == [2, -1]  # next best; nothing left


def test_nn_positives_come_from_the_queue_never_the_view_nor_its_image():
    torch.manual_seed(0)
    method = build_method(load_config(overrides=[*TINY, "method.queue_size=32"]))
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(40, 1, 16, 16, generator=g)
    for k in range(4):  # fill the queue with 32 of the 40 images' embeddings
        method({"images": pool[8 * k : 8 * k + 8]}, g)
    assert int(method.queue_filled) == 32
    batch = pool[[0, 1, 2, 35, 36]]  # three images already in the queue, two never seen
    keys = image_keys(batch)
    z = torch.randn(5, 8, generator=g)
    pos = method.neighbours(z, keys)
    queue = method.queue[:32]
    for i in range(5):
        match = (queue - pos[i]).abs().amax(1) < 1e-7
        assert match.any()  # a row of the support set ...
        assert not torch.allclose(F.normalize(pos[i], dim=0), F.normalize(z[i], dim=0))  # ... not the view itself
        assert (method.queue_keys[:32][match] != keys[i].to(method.queue_keys)).all()  # ... nor its own image
    # the negative control: with exclude_self off, image 0's nearest entry may be itself
    method.exclude_self = False
    own = method.queue_keys[:32] == keys[0]
    z0 = method.queue[:32][own]  # the view's image as queued
    assert (method.neighbours(z0, keys[:1]) - z0).abs().max() < 1e-6


def test_nnclr_loss_equals_a_loop():
    g = torch.Generator().manual_seed(1)
    nn_, p = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    a, b = F.normalize(nn_, dim=1), F.normalize(p, dim=1)
    tau = 0.1
    total = 0.0
    for i in range(5):
        total += -math.log(math.exp(float(a[i] @ b[i]) / tau) / sum(math.exp(float(a[i] @ b[j]) / tau) for j in range(5)))
    torch.testing.assert_close(nnclr_loss(nn_, p, tau), torch.tensor(total / 5), rtol=1e-5, atol=1e-5)


def test_nnclr_with_clusters_trains():
    method = build_method(load_config(overrides=[*TINY, "method.queue_size=16", "method.clusters=3", "method.cluster_every=1"]))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 16, 16, generator=g)
    method({"images": x}, g)
    loss, logs = method({"images": x.flip(0)}, g)
    assert torch.isfinite(loss) and "cluster_loss" in logs
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.encoder.parameters())


def test_spherical_kmeans_finds_separated_directions():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 5
    x = torch.cat([c + 0.3 * torch.randn(20, 3, generator=g) for c in centres])
    _, assign = spherical_kmeans(x, 3, generator=torch.Generator().manual_seed(3))
    truth = torch.arange(3).repeat_interleave(20)
    assert cluster_purity(assign, truth) == 1.0


def test_cluster_purity_hand_count():
    # clusters: A = {y0, y0, y1}, B = {y1, y1, y2, y0}, C = {y2}; majorities 2 + 2 + 1 = 5 of 8
    assign = ["A", "A", "A", "B", "B", "B", "B", "C"]
    labels = [0, 0, 1, 1, 1, 2, 0, 2]
    assert cluster_purity(assign, labels) == 5 / 8
    assert cluster_purity(np.arange(8), labels) == 1.0  # singletons are trivially pure


def test_neighbour_purity_hand_count():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.8, 0.3]])
    y = torch.tensor([0, 0, 1, 0, 1])
    # nearest other item: 0→1 (same), 1→0 (same), 2→3 (differ), 3→2 (differ), 4→1 (differ) → 2/5
    assert neighbour_purity(x, y) == pytest.approx(2 / 5)


def test_pixel_neighbours_are_other_queued_images():
    method = build_method(load_config(overrides=[*TINY, "method.queue_size=32", "method.neighbor_space=pixels", "method.neighbor_prob=1.0", "views=none"]))
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(16, 1, 16, 16, generator=g)
    method({"images": pool[:8]}, g)  # queue: images 0..7
    batch = torch.cat([pool[:2], pool[:2] + 0.01])  # two queued images and near-copies of them
    views = method.pixel_neighbour_views(batch, image_keys(batch), g)
    v2 = views[4:]
    assert not torch.equal(v2[0], batch[0]) and not torch.equal(v2[1], batch[1])  # never the image itself
    torch.testing.assert_close(v2[2], pool[0])  # the near-copy's neighbour: the queued original
    torch.testing.assert_close(v2[3], pool[1])
    loss, _ = method({"images": pool[8:]}, g)
    assert torch.isfinite(loss)
    assert not hasattr(method, "predictor")  # SimCLR's loss: nothing would train a predictor


def test_pixel_neighbours_off_is_two_views_of_the_image():
    # neighbor_prob=0 is the ablation's "no neighbour positives" cell: view 2 is always the image's own
    method = build_method(load_config(overrides=[*TINY, "method.queue_size=32", "method.neighbor_space=pixels", "method.neighbor_prob=0.0", "views=none"]))
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(16, 1, 16, 16, generator=g)
    method({"images": pool[:8]}, g)
    views = method.pixel_neighbour_views(pool[:4], image_keys(pool[:4]), g)
    torch.testing.assert_close(views[4:], pool[:4])


def test_clusters_with_pixel_neighbours_run_on_the_projections():
    method = build_method(load_config(overrides=[*TINY, "method.queue_size=16", "method.neighbor_space=pixels", "method.clusters=3", "method.cluster_every=1"]))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 16, 16, generator=g)
    method({"images": x}, g)
    assert method.cluster_queue.shape == (16, 8) and method.cluster_queue[:8].abs().sum() > 0
    loss, logs = method({"images": x.flip(0)}, g)
    assert torch.isfinite(loss) and "cluster_loss" in logs
    # the centroids come from the projection queue, not the pixel queue (which has 256 columns)
    assert method.centroids.shape == (3, 8)
