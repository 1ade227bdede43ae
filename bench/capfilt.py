"""CapFilt on captioned scenes (issue 16, items 3 and 6): BLIP's captioner and filter tuned on a small clean split
bootstrap the 50%-noise pool of bench/vl_noise.py, and CLIP trained on the bootstrapped pool is compared with CLIP
on the unfiltered pool (and on the clean pool and LAION's CLIP-score rule, the cells of bench/vl_noise.py).

1. The small clean split: ``--clean-n`` fresh scenes (scene seed ``--clean-seed``, another stream than the pools', the
   held-out pairs of split 0), no noise.
2. BLIP (configs/blip-scenes.yaml) on it for ``--blip-steps`` at batch 64, its conv4 started from ``--image-init`` (the
   clip-scenes run that is also the CLIP-score rule's scorer, so both filters start from the same image tower). The
   one run is both captioner and filter (BLIP fine-tunes two copies of its pre-trained model; here one model trained
   with the three losses on the clean split).
3. CapFilt (``fewshot data filter mode=capfilt``): one nucleus-sampled caption (top-p 0.9) per image of the noisy pool;
   web and synthetic captions with ITM p(match) < ``--threshold`` dropped. Precision and recall per noise kind on the
   web rows (the planted labels), and on the synthetic captions against the verifier.
4. CLIP (clip-scenes, ``--steps`` at batch 256, seed 0 — the cells of bench/vl_noise.py) on the bootstrapped pool and on
   its web rows alone (the filter without the captioner); zero-shot 64-way top-1 ± 95% CI, seen and held-out pairs,
   beside the noisy, clean and clip_score cells of bench/vl_noise.py (reused from ``--noise-out``, trained if absent).

One JSON line at the end; pools, runs and the bootstrapped manifest under ``--out`` are reused.

    OMP_NUM_THREADS=1 python bench/capfilt.py            # 7.0 CPU-min reusing bench/vl_noise.py's cells; 9.9 with --seed 1 (all trained)
    OMP_NUM_THREADS=1 python bench/capfilt.py --quick    # a smoke run, measures nothing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reused_runs import train  # noqa: E402
from vl_noise import difference, pool, train_cell  # noqa: E402  (the noise bench's pools, cells and contrasts)

from fewshot import api  # noqa: E402
from fewshot.data.pairs import read_manifest, write_manifest  # noqa: E402
from fewshot.data.scenes import NOISE_KINDS  # noqa: E402


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def blip_config(args: Namespace, manifest: Path) -> api.RunConfig:
    return api.load_config(api.find_recipe("blip-scenes"), [
        f"data.path={manifest}", f"out={args.out}", f"name=blip-clean-{args.clean_n}-{args.blip_steps}{f'-seed{args.seed}' if args.seed else ''}", f"train.steps={args.blip_steps}",
        f"train.checkpoint_every={args.blip_steps}", f"train.warmup_steps={min(50, args.blip_steps // 10)}", f"train.seed={args.seed}",
        *([f"method.image.init={args.image_init}"] if args.image_init else [])])


def bootstrapped(args: Namespace, noisy: Path, blip_run: Path) -> dict:
    """CapFilt's manifest and summary (cached beside it), and the web-rows-only manifest (the filter alone)."""
    # named by the BLIP run too, so another clean split or step count never reuses this one's captions and cells
    out = Path(args.out) / f"capfilt-{noisy.name}-t{args.threshold}-{blip_run.name}.tsv"
    summary_path = out.with_suffix(".json")
    if not summary_path.is_file():
        for stale in (out, out.with_name(out.stem + ".dropped.tsv")):
            stale.unlink(missing_ok=True)
        start = time.process_time()
        summary = api.filter_pairs(noisy / "manifest.tsv", out, ["mode=capfilt", f"blip_run={blip_run}", f"match_threshold={args.threshold}"])
        summary["cpu_seconds"] = time.process_time() - start
        summary_path.write_text(json.dumps(summary))
    summary = json.loads(summary_path.read_text())
    web_only = out.with_name(out.stem + "-web.tsv")
    if not web_only.is_file():
        rows = read_manifest(out)
        n = summary["kept_web"]
        write_manifest(web_only, rows.filepaths[:n], rows.captions[:n], rows.noise[:n])
    summary["web_only_manifest"] = str(web_only)
    return summary


DEFAULTS = {"out": "runs/capfilt", "noise_out": "runs/vl-noise", "n": 10000, "clean_n": 2000, "clean_seed": 2, "blip_steps": 400,
            "image_init": "runs/bench-vl/clip-20000-1000", "threshold": 0.5, "steps": 100, "per_class": 50, "seed": 0, "quick": False}


def quick_settings(args: Namespace) -> Namespace:
    """A smoke run's settings (tiny pools, few steps, everything under OUT/quick): checks the pipeline, measures nothing."""
    args.n, args.clean_n, args.blip_steps, args.steps, args.per_class, args.threshold = 300, 200, 10, 10, 3, 0.3
    args.out = os.path.join(args.out, "quick")
    args.noise_out = args.out
    return args


def capfilt_bench(args: Namespace) -> dict:
    """Steps 1–4 of the module docstring with ``args`` (the keys of :data:`DEFAULTS`); prints its tables, returns the
    JSON record (without the timing fields)."""
    out = Path(args.out)
    noisy = pool(Path(args.noise_out), f"noisy-{args.n}", args.n, 1, 0.5)
    clean_pool = pool(Path(args.noise_out), f"clean-{args.n}", args.n, 1, None)
    split = pool(out, f"clean-split-{args.clean_n}", args.clean_n, args.clean_seed, None)
    config = blip_config(args, split / "manifest.tsv")
    blip_cpu = train(config)
    summary = bootstrapped(args, noisy, config.run_dir)
    blip_tag = f"c{args.clean_n}-b{args.blip_steps}"
    web = summary["report"]["all"]
    syn = summary["synthetic"]
    print(f"BLIP on {args.clean_n} clean scenes, {args.blip_steps} steps (CPU s {blip_cpu}); CapFilt at p(match) < {args.threshold} "
          f"(CPU s {summary.get('cpu_seconds', 0):.0f})")
    print(f"web rows: kept {summary['kept_web']} of {summary['rows']}; dropped {web['dropped']}, precision {pct(web['precision'])}, "
          f"recall {pct(web['recall'])} of the noise")
    print("  recall by kind: " + ", ".join(f"{k} {pct(v)}" for k, v in web["recall_by_kind"].items()))
    print(f"synthetic: {syn['written']} written, {pct(syn['true'])} true; kept {syn['kept']}, {pct(syn['true_of_kept'])} "
          f"true; on the false ones precision {pct(syn['precision'])}, recall {pct(syn['recall'])}")
    print("  e.g. " + " | ".join(syn["examples"]))
    kept = read_manifest(summary["kept_manifest"])
    noisy_rows = read_manifest(noisy / "manifest.tsv")
    clean_dropped = sum(1 for k in noisy_rows.noise if not k) - sum(1 for k in kept.noise[: summary["kept_web"]] if not k)
    print(f"  clean web rows dropped: {clean_dropped} of {sum(1 for k in noisy_rows.noise if not k)}")

    # bench/vl_noise.py's cells are seed 0; another seed trains its own here (train_cell names them with the seed)
    noise_args = Namespace(out=args.out if args.seed else args.noise_out, seed=args.seed, per_class=args.per_class)
    mine = Namespace(out=args.out, seed=args.seed, per_class=args.per_class)
    cells = {
        "clean": train_cell(noise_args, "clean", clean_pool / "manifest.tsv", args.steps),
        "noisy": train_cell(noise_args, "noisy", noisy / "manifest.tsv", args.steps),
        "capfilt": train_cell(mine, f"capfilt-{blip_tag}", Path(summary["kept_manifest"]), args.steps),
        "capfilt-filter-only": train_cell(mine, f"capfilt-filter-only-{blip_tag}", Path(summary["web_only_manifest"]), args.steps),
        # what a user tries before CapFilt: CLIP on the small clean split alone, the supervision CapFilt is given
        "clean-split": train_cell(mine, f"clean-split-{args.clean_n}", split / "manifest.tsv", args.steps),
    }
    clip_score = noisy / "kept-clip_score.tsv"
    if not args.quick and clip_score.is_file():
        cells["clip_score"] = train_cell(noise_args, "clip_score", clip_score, args.steps)
    print(f"\nzero-shot, 64-way, top-1 % ± 95% CI (chance 1.6); every cell {args.steps} steps at batch 256")
    print(f"{'cell':<22}{'rows':>8}{'passes':>8}{'seen':>16}{'held-out':>16}{'CPU s':>8}")
    for name, c in cells.items():
        z = c["zeroshot"]
        spent = "reused" if c["train_cpu_seconds"] is None else f"{c['train_cpu_seconds']:.0f}"
        print(f"{name:<22}{c['rows']:>8}{c['passes']:>8.2f}" + "".join(f"{100 * z[g]['accuracy']:9.1f} ± {100 * z[g]['ci95']:4.1f}"
                                                                      for g in ("seen", "held-out")) + f"{spent:>8}")
    contrasts = {}
    for label, a, b in [("capfilt - noisy", "capfilt", "noisy"), ("capfilt filter only - noisy", "capfilt-filter-only", "noisy"),
                        ("capfilt - clean", "capfilt", "clean"), ("capfilt - clip_score", "capfilt", "clip_score"),
                        ("capfilt - clean split alone", "capfilt", "clean-split")]:
        if a in cells and b in cells:
            contrasts[label] = {g: difference(cells[a], cells[b], g) for g in ("seen", "held-out")}
            print(f"  {label:<30}" + "  ".join(f"{g} {100 * d:+5.1f} ± {100 * ci:4.1f}" for g, (d, ci) in contrasts[label].items()))
    result = {"bench": "capfilt", "quick": args.quick, "noisy_pool": str(noisy), "clean_split": {"scenes": args.clean_n, "seed": args.clean_seed},
              "blip_run": str(config.run_dir), "blip_steps": args.blip_steps, "blip_cpu_seconds": blip_cpu, "image_init": args.image_init,
              "threshold": args.threshold, "capfilt": summary, "clean_web_rows_dropped": clean_dropped, "noise_kinds": list(NOISE_KINDS),
              "steps": args.steps, "cells": cells, "contrasts": contrasts}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULTS["out"], help="folder for the clean split, the BLIP run, the bootstrapped pool and its cells")
    parser.add_argument("--noise-out", default=DEFAULTS["noise_out"], help="bench/vl_noise.py's folder: the noisy pool and its cells")
    parser.add_argument("--n", type=int, default=DEFAULTS["n"], help="scenes of bench/vl_noise.py's pools")
    parser.add_argument("--clean-n", type=int, default=DEFAULTS["clean_n"], help="scenes of the small clean split")
    parser.add_argument("--clean-seed", type=int, default=DEFAULTS["clean_seed"], help="scene stream of the clean split (the pools are seed 1, the scorer's 0)")
    parser.add_argument("--blip-steps", type=int, default=DEFAULTS["blip_steps"], help="BLIP steps on the clean split, batch 64")
    parser.add_argument("--image-init", default=DEFAULTS["image_init"], help="a clip-scenes run whose conv4 starts BLIP's ('' = from scratch)")
    parser.add_argument("--threshold", type=float, default=DEFAULTS["threshold"], help="ITM p(match) below which a caption is dropped")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="CLIP steps at batch 256 of every cell (bench/vl_noise.py: 100)")
    parser.add_argument("--per-class", type=int, default=DEFAULTS["per_class"], help="zero-shot test images per (shape, colour) pair")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="training seed")
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny pools, few steps): measures nothing")
    args = parser.parse_args()
    if args.quick:
        quick_settings(args)
    os.environ.setdefault("FEWSHOT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    start, cpu = time.time(), time.process_time()
    result = capfilt_bench(args)
    result.update(wall_seconds=time.time() - start, cpu_seconds=time.process_time() - cpu, load_average=os.getloadavg())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
