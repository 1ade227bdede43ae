"""LiT's grid (Zhai et al. 2022) on captioned scenes: which tower to pre-train, and whether to lock it, at equal steps.

Cells (letters: image tower, then text tower; u = from scratch, U = pre-trained and tuned, L = pre-trained and locked):

* ``uu``: clip-scenes, both towers from scratch.
* ``Uu``: the image tower starts from fewshot's own SimCLR on the pool's images (no captions) and is tuned.
* ``Lu``: that SimCLR tower locked (the lit-scenes recipe: clip-scenes + ``method.image.lock``).
* ``uL``: image tower from scratch, text tower the pre-trained all-MiniLM-L6-v2, locked.

The SimCLR image tower: the same conv4 on 3-channel 32 px images, trained through the one trainer on the pool's
image folder (``data.source=unlabeled``), with a view recipe that keeps colour (crops and flips only; no colour
jitter, grayscale or blur: colour is half of every class here, and views that change it teach the tower to drop it).

Every CLIP cell trains ``--steps`` steps at batch 256 from the same seed, then is measured on

1. 64-way zero-shot on single-object test scenes, seen and held-out (shape, colour) pairs apart (chance 1.6%), and
   how often the predicted pair has the right shape and the right colour (chance 12.5% each);
2. the binding and the relation swap tests (two-object scenes; the true caption against the same words swapped;
   chance 50%, ties against the model): :func:`fewshot.data.scenes.swap_test`, :func:`fewshot.evaluate.zeroshot.swap_scores`;
3. words absent from training captions: 8-way zero-shot over the 8 reserved shapes by name, which no training
   image shows and no caption names (chance 12.5%).

One JSON line at the end. A run folder that already holds a checkpoint is reused, not retrained (its training
CPU time is then reported as null); the pool of ``bench/vision_language.py`` is reused when ``--pool`` names it.

    OMP_NUM_THREADS=1 python bench/vl_lit.py --pool runs/bench-vl/scenes-20000   # ≈ 25 CPU-minutes
    OMP_NUM_THREADS=1 python bench/vl_lit.py --quick                             # a smoke run, measures nothing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vision_language import clip_config, make_pool  # noqa: E402  (the CLIP bench's pool and recipe)

from fewshot import api  # noqa: E402
from fewshot.config import RunConfig  # noqa: E402
from fewshot.data.scenes import COLOURS, POOL_INFO, SWAP_KINDS, fewshot_shape_images, single_object_test, swap_test  # noqa: E402
from fewshot.evaluate.image_text import DEFAULT_TEMPLATES, ImageTextRun  # noqa: E402
from fewshot.evaluate.runner import mean_ci95  # noqa: E402
from fewshot.evaluate.zeroshot import ZeroShotClassifier, swap_scores, text_prototypes, zero_shot_scores  # noqa: E402
from fewshot.train.trainer import checkpoint_path  # noqa: E402

CELLS = ("uu", "Uu", "Lu", "uL")
# SimCLR's crop and flip (Chen et al. 2020) without its colour distortions; a crop keeps at least a fifth of the
# 32 px scene, so an object or two usually survive it.
COLOUR_KEEPING_VIEWS = {"name": "simclr", "options": {"crop_scale": [0.2, 1.0], "jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.0}}
MINILM = "all-minilm-l6-v2"
LECTURE = {"Lu": 70.1, "Uu": 57.2, "uu": 50.6}  # LiT's ImageNet zero-shot (%) for scale, as the lecture quotes it


def simclr_config(args: argparse.Namespace, clip: RunConfig, images: Path) -> RunConfig:
    """SimCLR on the pool's images alone: clip-scenes' encoder, image size and channels, colour-keeping views."""
    return api.load_config(base={
        "name": f"simclr-colour-{args.simclr_steps}", "out": args.out,
        "data": {"source": "unlabeled", "path": str(images), "image_size": clip.data.image_size, "channels": clip.data.channels},
        "encoder": clip.encoder.model_dump(mode="json"), "views": COLOUR_KEEPING_VIEWS, "method": {"name": "simclr"},
        "train": {"steps": args.simclr_steps, "batch_size": clip.train.batch_size, "seed": args.seed,
                  "warmup_steps": min(50, args.simclr_steps // 10), "checkpoint_every": max(args.simclr_steps, 1)},
    })


def cell_config(cell: str, clip: RunConfig, image_run: Path | None, seed: int) -> RunConfig:
    """clip-scenes (the CLIP bench's overrides: pool, steps, warm-up) with the cell's towers and its own name."""
    towers = {
        "uu": [],
        "Uu": [f"method.image.init={image_run}"],
        "Lu": [f"method.image.init={image_run}", "method.image.lock=true"],  # = configs/lit-scenes.yaml
        "uL": [f"method.text={{name: {MINILM}, lock: true}}"],
    }[cell]
    return api.load_config(base=clip.model_dump(mode="json"), overrides=[
        f"name={cell}-{clip.train.steps}-s{seed}", f"train.seed={seed}", f"train.checkpoint_every={clip.train.steps}", *towers])


def train(config: RunConfig) -> float | None:
    """Train unless the folder holds a checkpoint; the CPU seconds this process spent, None when reused."""
    if checkpoint_path(config.run_dir).exists():
        return None
    cpu = time.process_time()
    api.pretrain(config, progress=False)
    return time.process_time() - cpu


def measure(run_dir: Path, args: argparse.Namespace, split_seed: int) -> dict:
    """Zero-shot (seen / held-out), the two swap tests and the absent words of one image–text run."""
    zeroshot = api.zeroshot(run_dir, per_class=args.per_class, seed=args.seed + 1, split_seed=split_seed)
    rows = {r["pairs"]: {k: r[k] for k in ("accuracy", "ci95", "images")} for r in zeroshot["results"]}
    model = ImageTextRun(run_dir)
    swaps = {}
    for kind in SWAP_KINDS:
        test = swap_test(kind, args.swaps, 32, args.seed + 1, split_seed)
        swaps[kind] = swap_scores(model.images(test.images), model.texts([c[0] for c in test.captions]),
                                  model.texts([c[1] for c in test.captions]))
    # Which half of the 64-way answer is right: the pair's shape, its colour (a tower that drops one shows here).
    test = single_object_test(args.per_class, 32, args.seed + 1, split_seed)
    predicted = ZeroShotClassifier(text_prototypes(model.texts, test.classes, DEFAULT_TEMPLATES)).predict(model.images(test.images))
    parts = {}
    for part, of in (("shape", lambda y: y // len(COLOURS)), ("colour", lambda y: y % len(COLOURS))):
        accuracy, ci95 = mean_ci95(of(predicted) == of(test.labels))
        parts[part] = {"accuracy": accuracy, "ci95": ci95, "images": len(predicted)}
    shapes = fewshot_shape_images(args.absent_per_shape, 32, args.seed + 1)
    prototypes = text_prototypes(model.texts, shapes.classes, DEFAULT_TEMPLATES)
    absent = zero_shot_scores(model.images(shapes.images), shapes.labels, prototypes)
    model.report_truncated("prompts or captions")
    return {"zeroshot": rows, "zeroshot_parts": parts, "swap": swaps, "absent_words": {k: absent[k] for k in ("accuracy", "ci95", "images")},
            "truncated_texts": model.truncated}


def pct(row: dict) -> str:
    return f"{100 * row['accuracy']:5.1f} ± {100 * row['ci95']:4.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/vl-lit", help="folder for the runs (and the pool unless --pool)")
    parser.add_argument("--pool", default=None, help="an existing scenes folder (e.g. runs/bench-vl/scenes-20000); default: make one in --out")
    parser.add_argument("--n", type=int, default=20000, help="scenes in a pool made here")
    parser.add_argument("--steps", type=int, default=400, help="CLIP steps of every cell, batch 256")
    parser.add_argument("--simclr-steps", type=int, default=400, help="SimCLR steps of the image tower that Uu and Lu start from")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated subset of {','.join(CELLS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated CLIP training seeds (the SimCLR tower is trained once, seed --seed)")
    parser.add_argument("--per-class", type=int, default=50, help="zero-shot test images per (shape, colour) pair")
    parser.add_argument("--swaps", type=int, default=1000, help="two-object scenes per swap test")
    parser.add_argument("--absent-per-shape", type=int, default=100, help="test images per reserved shape")
    parser.add_argument("--seed", type=int, default=0, help="pool, SimCLR and test-set seed")
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny pool, few steps): checks the pipeline, measures nothing")
    args = parser.parse_args()
    cells = [c for c in args.cells.split(",") if c]
    if unknown := [c for c in cells if c not in CELLS]:
        parser.error(f"unknown cell(s) {', '.join(unknown)}; choose from {', '.join(CELLS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.quick:
        args.n, args.steps, args.simclr_steps, args.per_class, args.swaps, args.absent_per_shape = 1500, 20, 20, 4, 100, 10
        args.out, args.pool = os.path.join(args.out, "quick"), None
    os.environ.setdefault("FEWSHOT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    start, cpu = time.time(), time.process_time()

    pool = Path(args.pool) if args.pool else make_pool(argparse.Namespace(out=args.out, n=args.n, seed=args.seed))
    info = json.loads((pool / POOL_INFO).read_text())
    clip = clip_config(argparse.Namespace(out=args.out, n=info["images"], steps=args.steps, seed=args.seed), pool / "manifest.tsv")
    cpu_seconds: dict[str, float | None] = {}
    image_run = None
    if {"Uu", "Lu"} & set(cells):
        simclr = simclr_config(args, clip, pool / "images")
        cpu_seconds["simclr"] = train(simclr)
        image_run = simclr.run_dir
        print(f"SimCLR image tower: {args.simclr_steps} steps, colour-keeping views; CPU s {cpu_seconds['simclr']}", flush=True)

    results: dict[str, dict] = {}
    for seed in seeds:
        for cell in cells:
            config = cell_config(cell, clip, image_run, seed)
            key = f"{cell}/s{seed}"
            cpu_seconds[key] = train(config)
            results[key] = measure(config.run_dir, args, info["split_seed"])
            r = results[key]
            print(f"{key}: CPU s {cpu_seconds[key]}  seen {pct(r['zeroshot']['seen'])}  held-out {pct(r['zeroshot']['held-out'])}  "
                  f"(shape {pct(r['zeroshot_parts']['shape'])}, colour {pct(r['zeroshot_parts']['colour'])})  binding {pct(r['swap']['binding'])}  relation {pct(r['swap']['relation'])}  absent {pct(r['absent_words'])}", flush=True)

    print(f"\nLiT grid at {args.steps} steps each, batch 256, on {info['images']} scenes (% ± 95% CI)")
    print("cell/seed   zero-shot seen   held-out        binding swap    relation swap   absent words    train CPU-min")
    print(f"chance      {100 / 64:5.1f}            {100 / 64:5.1f}            50.0            50.0            12.5")
    for key, r in results.items():
        minutes = "reused" if cpu_seconds[key] is None else f"{cpu_seconds[key] / 60:.1f}"
        print(f"{key:<11} {pct(r['zeroshot']['seen'])}    {pct(r['zeroshot']['held-out'])}    {pct(r['swap']['binding'])}    "
              f"{pct(r['swap']['relation'])}    {pct(r['absent_words'])}    {minutes}")
    print(f"for scale, LiT on ImageNet zero-shot (lecture): {LECTURE}")
    out = {
        "bench": "vl_lit", "quick": args.quick, "pool": {"folder": str(pool), "scenes": info["images"], "split_seed": info["split_seed"]},
        "steps": args.steps, "batch_size": clip.train.batch_size, "simclr": {"steps": args.simclr_steps, "views": COLOUR_KEEPING_VIEWS,
        "run_dir": str(image_run) if image_run else None}, "seeds": seeds, "results": results, "train_cpu_seconds": cpu_seconds,
        "chance": {"zeroshot": 1 / 64, "swap": 0.5, "absent_words": 1 / 8}, "lecture_imagenet": LECTURE,
        "wall_seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu, "load_average": os.getloadavg(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
