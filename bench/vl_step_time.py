"""Seconds a training step of a vision–language method takes (forward and backward through the method, no optimizer),
and seconds a prompt of the in-context protocol takes: for comparing two versions of the code side by side.

A step's time is the median over ``--steps`` batches after one warm-up batch, on the run's own data in order; the
losses are printed too, so two versions can be checked to compute the same thing. ``--eval-run`` also times the
in-context protocol on that run (2-way nonce shapes with induction, 1 and 5 shots: ``--episodes`` prompts each, and as
many with blank images), the median of ``--trials`` passes.

Two versions side by side (the other checkout's ``src`` first on the path; alternate the two, one thread each):

    OMP_NUM_THREADS=1 FEWSHOT_DATA=/work/shared/data PYTHONPATH=OTHER/src python bench/vl_step_time.py --recipe flamingo-scenes \\
        --override data.path=runs/bench-vl/scenes-20000/manifest.tsv method.image.init=runs/bench-vl/clip-20000-1000 \\
        method.lm.init=runs/vlctx/smollm2-answers-160 method.episodes=2 method.cross_every=3 method.cross_heads=8 \\
        method.gate_lr_scale=30 method.text_distill=10 train.batch_size=16 --eval-run runs/fl22/flamingo-ep2-300

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

import fewshot
from fewshot import api
from fewshot.data.registry import load_run_data
from fewshot.data.vl_prompts import category_images
from fewshot.evaluate.vl_in_context import BlankImages, Setting, evaluate_open_ended, open_in_context_model
from fewshot.methods import build_method


def step_seconds(recipe: str, overrides: list[str], steps: int) -> tuple[float, list[float]]:
    """Median seconds of a forward + backward of the method on consecutive batches, and each batch's loss."""
    with tempfile.TemporaryDirectory() as out:
        config = api.load_config(api.find_recipe(recipe), [f"out={out}", "name=step-time", *overrides])
        data = load_run_data(config.data, None, api._pretrained_text_tokenizer(config)).pretrain
        torch.manual_seed(config.train.seed)
        method = build_method(config).train()
        generator, b = torch.Generator().manual_seed(config.train.seed), config.train.batch_size
        times, losses = [], []
        for i in range(steps + 1):  # the first is a warm-up
            batch = {k: v for k, v in data.batch(torch.arange(i * b, (i + 1) * b)).items() if k in method.inputs}
            start = time.perf_counter()
            loss, _ = method(batch, generator)
            loss.backward()
            times.append(time.perf_counter() - start)
            losses.append(round(float(loss), 5))
            method.zero_grad(set_to_none=True)
    return statistics.median(times[1:]), losses


def prompt_seconds(run: str, episodes: int, trials: int) -> tuple[float, dict[str, float]]:
    """Median seconds a prompt takes over ``trials`` passes of the cells, and the cells' accuracies."""
    model = open_in_context_model(run)
    data = category_images("shapes", 12, 32, 0)
    settings = [Setting(2, 1, 0, True), Setting(2, 5, 0, True)]
    passes, cells = [], {}
    for _ in range(trials):
        start = time.perf_counter()
        for row, m in (("model", model), ("test-blind", BlankImages(model))):
            for setting, cell in evaluate_open_ended(m, data, settings, episodes, 0).items():
                cells[f"{row} {setting}"] = cell["accuracy"]
        passes.append((time.perf_counter() - start) / (2 * len(settings) * episodes))
    return statistics.median(passes), cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="flamingo-scenes")
    p.add_argument("--override", nargs="*", default=[], help="key=value overrides of the recipe")
    p.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up)")
    p.add_argument("--eval-run", help="also time the in-context protocol on this run")
    p.add_argument("--episodes", type=int, default=20, help="prompts per cell when timing --eval-run")
    p.add_argument("--trials", type=int, default=3, help="passes over the cells when timing --eval-run")
    args = p.parse_args()
    result: dict = {"bench": "vl_step_time", "code": fewshot.__file__, "threads": torch.get_num_threads(), "recipe": args.recipe,
                    "override": args.override}
    if args.steps:
        result["step_seconds"], result["losses"] = step_seconds(args.recipe, args.override, args.steps)
        print(f"{args.recipe}: {result['step_seconds']:.2f} s a step (median of {args.steps}); losses {result['losses']}")
    if args.eval_run:
        result["eval_run"], result["episodes"] = args.eval_run, args.episodes
        result["prompt_seconds"], result["cells"] = prompt_seconds(args.eval_run, args.episodes, args.trials)
        print(f"{args.eval_run}: {result['prompt_seconds']:.3f} s a prompt (median of {args.trials} passes); {result['cells']}")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
