"""The one evaluator: embed the evaluation images once per encoder, then score episodes,
Lake's runs and the label-fraction probe, next to the pixel and random-encoder baselines."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fewshot.config import RunConfig
from fewshot.data.lake import LakeRun, load_lake_runs
from fewshot.data.sources import resolve_data_path
from fewshot.data.types import ImageSet
from fewshot.errors import DataError
from fewshot.evaluate.probe import linear_probe_fractions
from fewshot.evaluate.runner import run_episodes, score_lake_runs
from fewshot.methods import build_method

Embed = Callable[[torch.Tensor], torch.Tensor]
LAKE_DEFAULT = "omniglot/all_runs.zip"


@torch.no_grad()
def embed_images(encoder: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """r = encoder(x) for every image, in eval mode and batches, on the encoder's device; returns CPU float32."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out = [encoder(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    encoder.train(was_training)
    return torch.cat(out)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """The raw-pixel baseline: each image flattened."""
    return images.flatten(1).float()


def random_encoder(config: RunConfig) -> nn.Module:
    """The encoder exactly as pre-training starts it (same seed), never trained: the baseline that
    tells how much of the accuracy the architecture gives for free."""
    torch.manual_seed(config.train.seed)
    return build_method(config).encoder


@dataclass
class EvalReport:
    results: list[dict[str, Any]] = field(default_factory=list)  # episode rows, one per encoder × classifier × way × shot
    lake_runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # encoder → {"accuracy", "per_run"}
    probe: list[dict[str, Any]] = field(default_factory=list)  # label-fraction rows per encoder
    run_dir: str | None = None
    report_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"results": self.results, "probe": self.probe, "run_dir": self.run_dir}
        if self.report_path:
            out["report_path"] = self.report_path
        if self.lake_runs:
            main = "pretrained" if "pretrained" in self.lake_runs else next(iter(self.lake_runs))
            out["lake_runs"] = {
                "accuracy": self.lake_runs[main]["accuracy"],
                "encoder": main,
                "by_encoder": {k: v["accuracy"] for k, v in self.lake_runs.items()},
            }
        return out


def lake_pool(runs: list[LakeRun]) -> ImageSet:
    """Lake's runs as a labeled set for episodes: each (run, class) is a class with two drawings,
    its training image and the test item that matches it. Every class is from an evaluation
    alphabet, so 1-shot 1-query episodes drawn from it are class-disjoint from background pre-training."""
    images, labels, classes = [], [], []
    for run in runs:
        for j in range(len(run.train_images)):
            matches = (run.answers == j).nonzero().flatten()
            images += [run.train_images[j], *run.test_images[matches]]
            labels += [len(classes)] * (1 + len(matches))
            classes.append(f"{run.name}/class{j + 1:02d}")
    return ImageSet(torch.stack(images), torch.tensor(labels), classes)


def evaluate_encoders(
    encoders: dict[str, Embed],
    config: RunConfig,
    eval_set: ImageSet | None,
    lake_runs_path: str | Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> EvalReport:
    """Score every encoder (name → embed function) on the same seeded episodes, Lake's runs and probe.

    Without an evaluation split (``data.pretrain_on_all``), the episodes are drawn from Lake's runs.
    """
    ev = config.eval
    report = EvalReport(run_dir=str(config.run_dir))
    runs = load_lake_runs(resolve_data_path(str(lake_runs_path), LAKE_DEFAULT), config.data.image_size) if lake_runs_path else None
    if eval_set is None and runs is not None:
        eval_set = lake_pool(runs)
    if eval_set is None:
        raise DataError("nothing to evaluate on: the data has no held-out classes; set eval.data_path (a class-per-folder folder) or eval.lake_runs")
    for name, embed in encoders.items():
        if eval_set is not None:
            log(f"embedding {len(eval_set)} evaluation images with '{name}'")
            features = embed(eval_set.images)
            for way in ev.ways:
                for shot in ev.shots:
                    rows = run_episodes(
                        features, eval_set.labels, way, shot, ev.queries, ev.episodes, tuple(ev.classifiers), ev.seed
                    )
                    report.results += [{"encoder": name, **row} for row in rows]
            if ev.probe_fractions:
                rows = linear_probe_fractions(features, eval_set.labels, tuple(ev.probe_fractions), seed=ev.seed)
                report.probe += [{"encoder": name, **row} for row in rows]
        if runs is not None:
            log(f"scoring Lake's {len(runs)} runs with '{name}'")
            report.lake_runs[name] = score_lake_runs(embed, runs)
    return report


def evaluate(
    config: RunConfig,
    encoder: nn.Module | None,
    eval_set: ImageSet | None,
    lake_runs_path: str | Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> EvalReport:
    """Evaluate a (pre-trained) encoder and, if ``config.eval.baselines``, pixels and the random encoder."""
    bs = config.eval.batch_size
    encoders: dict[str, Embed] = {}
    if config.eval.baselines:
        rand = random_encoder(config)
        encoders["pixels"] = pixels
        encoders["random"] = lambda x: embed_images(rand, x, bs)
    if encoder is not None:
        encoders["pretrained"] = lambda x: embed_images(encoder, x, bs)
    return evaluate_encoders(encoders, config, eval_set, lake_runs_path, log)
