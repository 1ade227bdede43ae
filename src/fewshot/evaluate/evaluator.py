"""The one evaluator: embed the evaluation images once per encoder, then score episodes,
Lake's runs and the label-fraction probe, next to the pixel and random-encoder baselines."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from fewshot.config import RunConfig
from fewshot.data.registry import preprocess, read_size
from fewshot.data.lake import LakeRun, load_lake_runs
from fewshot.data.sources import resolve_data_path
from fewshot.data.types import ImageSet
from fewshot.errors import DataError
from fewshot.evaluate.probe import linear_probe_fractions
from fewshot.evaluate.hausdorff import mhd_matrix, point_sets
from fewshot.evaluate.classifiers import NearestByDistance
from fewshot.evaluate.runner import episode_table, score_lake_runs, score_lake_runs_by_distance
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


@dataclass
class Scorer:
    """How one row sees the evaluation images when it is more than an embedding of the run's images.

    Either ``embed`` (features → the configured classifiers) or ``prepare`` + ``distance`` (items
    such as ink point sets, and a matrix of distances between two lists of them → nearest
    neighbour, named ``classifier``); ``pool`` and ``runs`` replace the run's own evaluation
    images (a baseline with its own preprocessing), ``None`` keeps them.
    """

    embed: Embed | None = None
    prepare: Callable[[torch.Tensor], list] | None = None
    distance: Callable[..., torch.Tensor] | None = None
    classifier: str = "nn-distance"
    pool: ImageSet | None = None
    runs: list[LakeRun] | None = None


def evaluate_encoders(
    encoders: dict[str, Embed | Scorer],
    config: RunConfig,
    eval_set: ImageSet | None,
    lake_runs_path: str | Path | None = None,
    log: Callable[[str], None] = lambda _: None,
    runs: list[LakeRun] | None = None,
) -> EvalReport:
    """Score every encoder (name → embed function or :class:`Scorer`) on the same seeded episodes,
    Lake's runs and probe.

    Without an evaluation split (``data.pretrain_on_all``), the episodes are drawn from Lake's runs.
    """
    ev = config.eval
    report = EvalReport(run_dir=str(config.run_dir))
    if runs is None and lake_runs_path:
        runs = load_lake_runs(resolve_data_path(str(lake_runs_path), LAKE_DEFAULT), read_size(config.data))
        runs = [LakeRun(r.name, preprocess(r.train_images, config.data), preprocess(r.test_images, config.data), r.answers) for r in runs]
    if eval_set is None and runs is not None:
        eval_set = lake_pool(runs)
    if eval_set is None:
        raise DataError("nothing to evaluate on: the data has no held-out classes; set eval.data_path (a class-per-folder folder) or eval.lake_runs")
    for name, scorer in encoders.items():
        if not isinstance(scorer, Scorer):
            scorer = Scorer(embed=scorer)
        pool = scorer.pool if scorer.pool is not None else eval_set
        these_runs = scorer.runs if scorer.runs is not None else runs
        log(f"scoring {len(pool)} evaluation images with '{name}'")
        if scorer.embed is not None:
            features = scorer.embed(pool.images)
            report.results += episode_table(features, pool.labels, ev, name)
            if ev.probe_fractions:
                rows = linear_probe_fractions(features, pool.labels, tuple(ev.probe_fractions), seed=ev.seed)
                report.probe += [{"encoder": name, **row} for row in rows]
        else:
            items = scorer.prepare(pool.images)

            def pair_distance(pairs, items=items, scorer=scorer):
                d = scorer.distance(items, items, torch.as_tensor(pairs))
                return d[pairs[:, 0], pairs[:, 1]].numpy()

            cache: dict = {}  # every pair's distance once, over all ways × shots
            nearest = {scorer.classifier: lambda: NearestByDistance(pair_distance, cache)}
            report.results += episode_table(np.arange(len(pool)), pool.labels, ev, name, nearest, ev.mhd_episodes)
        if these_runs is not None:
            log(f"scoring Lake's {len(these_runs)} runs with '{name}'")
            if scorer.embed is not None:
                report.lake_runs[name] = score_lake_runs(scorer.embed, these_runs)
            else:
                report.lake_runs[name] = score_lake_runs_by_distance(
                    lambda test, train, s=scorer: s.distance(s.prepare(test), s.prepare(train)), these_runs, scorer.classifier
                )
    return report


def character_baselines(config: RunConfig, lake_runs_path: str | Path, pooled: bool) -> dict[str, Scorer]:
    """The training-free rows a user would try on characters, each with its own preprocessing of
    Lake's runs (and of Lake's pool for episodes when ``pooled``): raw pixels at image_size,
    moment-normalised pixels (the run's normalisation settings), Lake's MHD on the centred ink of
    the images at ``data.normalize_from`` px, and MHD on the normalised ink coordinates."""
    path = resolve_data_path(str(lake_runs_path), LAKE_DEFAULT)
    data = config.data
    norm_cfg = data.model_copy(update={"normalize": True})
    raw = load_lake_runs(path, data.image_size)
    native = load_lake_runs(path, data.normalize_from)
    norm = [LakeRun(r.name, preprocess(r.train_images, norm_cfg), preprocess(r.test_images, norm_cfg), r.answers) for r in native]
    spread_px = data.normalize_spread * data.normalize_from

    def pool(r):
        return lake_pool(r) if pooled else None

    return {
        "pixels": Scorer(embed=pixels, pool=pool(raw), runs=raw),
        "pixels-normalized": Scorer(embed=pixels, pool=pool(norm), runs=norm),
        "mhd": Scorer(prepare=point_sets, distance=mhd_matrix, classifier="nn-mhd", pool=pool(native), runs=native),
        "mhd-normalized": Scorer(
            prepare=lambda x: point_sets(x, True, spread_px, data.normalize_max_stretch),
            distance=mhd_matrix, classifier="nn-mhd", pool=pool(native), runs=native,
        ),
    }


def evaluate(
    config: RunConfig,
    encoder: nn.Module | None,
    eval_set: ImageSet | None,
    lake_runs_path: str | Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> EvalReport:
    """Evaluate a (pre-trained) encoder and, if ``config.eval.baselines``, pixels and the random encoder
    (with ``eval.character_baselines`` and Lake's runs also normalised pixels, MHD and normalised MHD)."""
    bs = config.eval.batch_size
    encoders: dict[str, Embed | Scorer] = {}
    if config.eval.baselines:
        rand = random_encoder(config)
        encoders["pixels"] = pixels
        if config.eval.character_baselines and lake_runs_path:
            encoders.update(character_baselines(config, lake_runs_path, pooled=eval_set is None))
        encoders["random"] = lambda x: embed_images(rand, x, bs)
    if encoder is not None:
        encoders["pretrained"] = lambda x: embed_images(encoder, x, bs)
    report = evaluate_encoders(encoders, config, eval_set, lake_runs_path, log)
    if encoder is not None and config.eval.test_time:
        add_test_time_rows(report, config, encoder, eval_set, lake_runs_path, log)
    return report


def add_test_time_rows(
    report: EvalReport, config: RunConfig, encoder: nn.Module, eval_set: ImageSet | None, lake_runs_path, log: Callable[[str], None]
) -> None:
    """Rows for ``eval.test_time`` apart from the inductive ones, each option alone: encoder
    ``pretrained+tta`` (inductive, mean embedding over views) and ``pretrained+hub`` /
    ``pretrained+hungarian`` (transductive, on the plain embedding), each on Lake's runs and on the
    episodes with cosine prototypes; every row carries ``transductive``."""
    from fewshot.data.views import make_views
    from fewshot.evaluate.test_time import TRANSDUCTIVE, TestTimePrototypes, score_lake_runs_test_time, tta_embed

    ev, data = config.eval, config.data
    base = lambda x: embed_images(encoder, x, ev.batch_size)  # noqa: E731
    rules = []  # (rule, embed, row name)
    if "tta" in ev.test_time:
        views = make_views(config.views.name, data.image_size, data.channels, **config.views.options)
        rules.append(("cosine", tta_embed(base, views, ev.tta_views, ev.seed), "pretrained+tta"))
    rules += [(r, base, f"pretrained+{r}") for r in ("hub", "hungarian") if r in ev.test_time]
    runs = None
    if lake_runs_path:
        runs = load_lake_runs(resolve_data_path(str(lake_runs_path), LAKE_DEFAULT), read_size(data))
        runs = [LakeRun(r.name, preprocess(r.train_images, data), preprocess(r.test_images, data), r.answers) for r in runs]
    pool = eval_set if eval_set is not None else (lake_pool(runs) if runs is not None else None)
    for rule, embed, name in rules:
        log(f"test-time rows '{name}'")
        if runs is not None:
            report.lake_runs[name] = score_lake_runs_test_time(embed, runs, rule)
        if pool is not None:
            classifier = {f"proto-cosine+{rule}": lambda rule=rule: TestTimePrototypes(rule)}
            report.results += episode_table(embed(pool.images), pool.labels, ev, name, classifier, transductive=rule in TRANSDUCTIVE)
