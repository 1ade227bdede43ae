"""SimCLR training throughput: fewshot's trainer next to a lightly loop on the same work.

Same Conv-4 (28 px, standard 4 pools), batch 64, two views of the `characters` recipe (crop 0.6–1,
rotation ±15°, shear ±10°, translate 0.1, zoom 0.9–1.1), 2-layer projection head 64→256→128,
NT-Xent τ = 0.5, AdamW — measured in one process, alternating trials, medians reported.
fewshot: `fewshot.api.pretrain` (Fabric trainer, batched per-image views). lightly: its
SimCLRProjectionHead and NTXentLoss with torchvision's per-image transforms in a Python loop,
the way lightly's examples augment. lightly is an optional bench dependency (`pip install lightly`).

    python bench/throughput.py --steps 60 --trials 3

Views/s count both views of a pair. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from fewshot import api
from fewshot.config import load_config
from fewshot.data.sources import load_digits
from fewshot.models.encoders import create_encoder

COMMON = ["data.image_size=28", "encoder.options={pools: 4, blocks: 4}", "method=simclr", "method.temperature=0.5",
          "method.projection_hidden=256", "method.projection_dim=128", "method.projection_conv_blocks=0",
          "train.batch_size=64", "train.warmup_steps=0", "data.pretrain_on_all=true", "views=characters",
          "views.options={elastic_prob: 0.0, thickness_prob: 0.0}"]


def fewshot_views_per_second(steps: int, out: str, trial: int, channels_last: bool, overrides: Sequence[str] = (), tag: str = "") -> float:
    """Median views/s of ``steps`` steps of this SimCLR work through the trainer (``overrides`` after COMMON: batch,
    precision, device), the first logged window left out."""
    cfg = load_config(overrides=[*COMMON, f"out={out}", f"name=t{tag}{trial}-{int(channels_last)}", f"train.steps={steps}",
                                 f"train.log_every={max(1, steps // 3)}", f"train.checkpoint_every={steps}",
                                 f"train.channels_last={str(channels_last).lower()}", *overrides])
    result = api.pretrain(cfg, progress=False)
    return statistics.median(h["views_per_s"] for h in result.history[1:] or result.history)  # first window includes warm-up


def lightly_views_per_second(steps: int, images: torch.Tensor) -> float:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    encoder = create_encoder("conv4", 1, 28)
    head = SimCLRProjectionHead(64, 256, 128)
    loss_fn = NTXentLoss(temperature=0.5)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    transform = v2.Compose([
        v2.RandomResizedCrop(28, scale=(0.6, 1.0), antialias=True),
        v2.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10),
    ])
    g = torch.Generator().manual_seed(0)
    warm, t0 = 5, 0.0
    for step in range(steps + warm):
        if step == warm:
            t0 = time.perf_counter()
        idx = torch.randint(len(images), (64,), generator=g)
        x0 = torch.stack([transform(images[i]) for i in idx])
        x1 = torch.stack([transform(images[i]) for i in idx])
        loss = loss_fn(head(encoder(x0)), head(encoder(x1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return 2 * 64 * steps / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    images = load_digits(28).images
    rates: dict[str, list[float]] = {"fewshot (channels_last)": [], "fewshot (NCHW)": [], "lightly loop": []}
    with tempfile.TemporaryDirectory() as out:
        for trial in range(args.trials):  # alternate, so drifts in machine load hit every row alike
            rates["fewshot (channels_last)"].append(fewshot_views_per_second(args.steps, out, trial, True))
            rates["fewshot (NCHW)"].append(fewshot_views_per_second(args.steps, out, trial, False))
            rates["lightly loop"].append(lightly_views_per_second(args.steps, images))
            print(f"trial {trial}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med["lightly loop"]
    print("| implementation | views/s (median of trials) | ratio to lightly |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.0f} | {v / base:.2f} |")
    print(json.dumps({"views_per_second": med, "trials": rates, "steps": args.steps, "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
