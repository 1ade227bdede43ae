"""Noise and filtering on captioned scenes (issue 14): CLIP on a clean pool, on the same scenes with half the rows
noisy, on that noisy pool after each rule of ``fewshot data filter``, and ALIGN's question (4× the noisy data
against 1× clean). Every cell trains clip-scenes for the same ``--steps`` at batch 256 (one seed).

1. Pools (``fewshot data scenes``, 1-2 objects, 32 px, seed ``--pool-seed``, the held-out pairs of split 0 like
   bench/vision_language.py): clean, ``--n`` scenes; noisy, the same scene stream with exactly ``--rate`` of the
   rows noisy (:data:`NOISE_SHARES` of the noisy rows per kind; near-duplicates are whole images, so they replace
   some originals); noisy ×4, ``4 × --n`` scenes at the same rates.
2. Filters on the noisy pool, each alone and all together: the text rules, shared alt-text, near-duplicates, and
   the CLIP-score rule (LAION) with ``--scorer``, a CLIP run trained on other scenes (seed 0), at the default
   threshold; the precision and recall per noise kind of each, and (no training) the CLIP rule over thresholds and
   the shared alt-text rule over its image limit.
3. Zero-shot, 64-way, seen and held-out pairs apart (the test set of bench/vision_language.py, seed 1) ± 95% CI.
   ``--equal-epochs`` adds the ×4 noisy pool at as many passes over its rows as the clean cell makes.

One JSON line at the end. Pools, kept manifests, scores and trained cells under ``--out`` are reused, not remade.

    OMP_NUM_THREADS=1 python bench/vl_noise.py                 # 8 cells × 100 steps (see docs/benchmarks.md for the CPU time)
    OMP_NUM_THREADS=1 python bench/vl_noise.py --cells clean,noisy   # only these cells, e.g. one process per cell; then rerun plain
    OMP_NUM_THREADS=1 python bench/vl_noise.py --equal-epochs  # + the ×4 pool at equal epochs (4 × the steps)
    OMP_NUM_THREADS=1 python bench/vl_noise.py --quick         # a smoke run, not a measurement
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from argparse import Namespace
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vision_language import clip_config  # noqa: E402

from fewshot import api  # noqa: E402
from fewshot.data.filters import CLIP_RULE, RULES, FilterConfig, filter_manifest, filter_pairs, filter_report  # noqa: E402
from fewshot.data.pairs import Manifest, read_manifest  # noqa: E402
from fewshot.data.scenes import NOISE_KINDS, NoiseConfig, make_pool, write_scenes  # noqa: E402
from fewshot.errors import DataError  # noqa: E402
from fewshot.run import Run  # noqa: E402
from fewshot.train.trainer import checkpoint_path  # noqa: E402

# Of the noisy rows: near-duplicate images (their rows), then the four caption kinds. ALIGN's alt-texts are mostly
# loosely related or wrong, so the two kinds that are false of the image (mismatched, near misses) take most.
NOISE_SHARES = {"near_duplicate": 0.2, "mismatched": 0.3, "near_miss": 0.3, "boilerplate": 0.1, "shared_alt": 0.1}
TEXT_RULES = ("filename", "length", "unique_words", "repetition")
FILTERS = {"text rules": TEXT_RULES, "shared_alt": ("shared_alt",), "near_duplicate": ("near_duplicate",),
           "clip_score": (CLIP_RULE,), "all": (*RULES, CLIP_RULE)}
CELLS = ("clean", "noisy", "text-rules", "shared_alt", "near_duplicate", "noisy-x4", "noisy-x4-epochs", "clip_score", "all")
CLIP_THRESHOLDS = [0.1, 0.2, FilterConfig.clip_threshold, 0.35, 0.4, 0.5, 0.6]  # around LAION's 0.28; a threshold belongs to its model
SHARED_LIMITS = [10, 100, 300, 1000]  # ALIGN's 10 images, then limits that grow with a pool of few distinct captions
SPLIT_SEED = 0  # the held-out pairs of bench/vision_language.py and of the scorer's pool
TEST_SEED = 1  # the zero-shot test scenes of bench/vision_language.py


def apportion(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of ``total`` by ``shares``: count_k = ⌊total · s_k / Σs⌋, then one more to the
    largest fractional parts until Σ count_k = total (Hamilton's method; ties to the earlier key)."""
    weight = sum(shares.values())
    exact = {k: total * s / weight for k, s in shares.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: (counts[k] - exact[k], list(shares).index(k)))[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def noise_mix(n: int, seed: int, rate: float, shares: dict[str, float] = NOISE_SHARES, objects: tuple[int, int] = (1, 2)) -> NoiseConfig:
    """The :class:`NoiseConfig` under which ``make_pool(n, objects=objects, seed=seed, split_seed=0)`` has exactly
    round(rate · rows) noisy rows: near-duplicate images at rate · share, then the caption kinds fill the rest,
    count_k / rows each (the pool rounds fraction × rows back to count_k). Near-duplicates fix the row count, so
    it is read off a pool drawn without pixels."""
    duplicates = NoiseConfig(near_duplicate=rate * shares["near_duplicate"])
    probe = make_pool(n, 32, objects, seed, duplicates, SPLIT_SEED, draw=False)
    rows = len(probe.row_noise)
    caption_rows = round(rate * rows) - probe.row_noise.count("near_duplicate")
    if caption_rows < 0:
        raise DataError(f"near-duplicates alone exceed {rate} of the rows: lower their share")
    counts = apportion(caption_rows, {k: s for k, s in shares.items() if k != "near_duplicate"})
    return NoiseConfig(**{k: c / rows for k, c in counts.items()}, near_duplicate=duplicates.near_duplicate)


def pool(out: Path, name: str, n: int, seed: int, rate: float | None) -> Path:
    folder = out / name
    if not (folder / "scenes.json").is_file():
        write_scenes(folder, n, 32, (1, 2), seed, None if rate is None else noise_mix(n, seed, rate), SPLIT_SEED)
    return folder


def kept_manifest(folder: Path, name: str, rules: tuple[str, ...], scorer: str, scores: np.ndarray) -> dict:
    """Filter ``folder``'s manifest with ``rules`` into ``kept-<name>.tsv`` (the summary cached beside it)."""
    slug = name.replace(" ", "-")
    out, summary_path = folder / f"kept-{slug}.tsv", folder / f"kept-{slug}.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    for stale in (out, out.with_name(out.stem + ".dropped.tsv")):  # left by an interrupted run
        stale.unlink(missing_ok=True)
    config = FilterConfig(rules=rules, clip_run=scorer if CLIP_RULE in rules else None)
    summary = filter_manifest(folder / "manifest.tsv", out, config, scores if CLIP_RULE in rules else None)
    summary_path.write_text(json.dumps(summary))
    return summary


def removal(noise: list[str], kept_noise: list[str]) -> dict:
    """Rows dropped and their precision (dropped rows that are noise), and the recall per noise kind (its rows
    dropped / its rows); ``clean`` is the fraction of clean rows dropped."""
    before, after = Counter(noise), Counter(kept_noise)
    dropped = len(noise) - len(kept_noise)
    noisy_dropped = sum(before[k] - after[k] for k in NOISE_KINDS)
    return {"rows": len(noise), "kept": len(kept_noise), "dropped": dropped, "precision": noisy_dropped / dropped if dropped else None,
            "recall": {k: (before[k] - after[k]) / before[k] for k in (*NOISE_KINDS, "") if before[k]}}


def rule_sweep(manifest: Manifest, rule: str, option: str, values: list[float], scores: np.ndarray | None = None,
               scorer: str | None = None) -> list[dict]:
    """One rule alone at each value of one of its options (no training): rows dropped, precision and recall per noise kind."""
    index: dict[str, int] = {}
    row_image = [index.setdefault(f, len(index)) for f in manifest.filepaths]
    rows = []
    for value in values:
        config = FilterConfig(rules=(rule,), clip_run=scorer, **{option: value})
        try:
            result = filter_pairs(manifest.captions, row_image, None, config, scores)
        except DataError:  # it keeps nothing
            rows.append({option: value, "keeps_nothing": True})
            continue
        kept = set(result.kept)
        rows.append({option: value, **removal(manifest.noise, [k for r, k in enumerate(manifest.noise) if r in kept])})
    return rows


def trained_steps(run_dir: Path) -> int:
    """The step of a run's last checkpoint (0 without one): a run stopped midway is resumed, not reused."""
    return Run.open(run_dir).step if checkpoint_path(Path(run_dir)).exists() else 0


def train_cell(args: Namespace, name: str, manifest: Path, steps: int) -> dict:
    base = clip_config(Namespace(out=args.out, n=0, steps=steps, seed=args.seed), manifest).model_dump(mode="json")
    tag = f"-seed{args.seed}" if args.seed else ""  # seed 0's cells keep their first names; another seed never reuses them
    config = api.load_config(base=base, overrides=[f"name={name}{tag}-{steps}"])
    cpu, done = None, trained_steps(config.run_dir)
    if done < steps:
        if not done and config.run_dir.exists():  # stopped before its first checkpoint: nothing to resume
            shutil.rmtree(config.run_dir)
        start = time.process_time()
        api.pretrain_to_completion(config, progress=False)
        cpu = time.process_time() - start
    zeroshot = api.zeroshot(config.run_dir, per_class=args.per_class, seed=TEST_SEED)
    rows = len(read_manifest(manifest))
    return {"cell": name, "run_dir": str(config.run_dir), "manifest": str(manifest), "rows": rows, "steps": steps,
            "passes": steps * config.train.batch_size / rows, "train_cpu_seconds": cpu,
            "zeroshot": {r["pairs"]: {k: r[k] for k in ("accuracy", "ci95", "mean_recall", "images")} for r in zeroshot["results"]}}


def difference(a: dict, b: dict, group: str) -> tuple[float, float]:
    """a − b in zero-shot accuracy on ``group`` ± √(ci_a² + ci_b²): the two runs' CIs combined as if independent
    (the test images are shared, so this overstates the spread of a paired difference)."""
    x, y = a["zeroshot"][group], b["zeroshot"][group]
    return x["accuracy"] - y["accuracy"], math.hypot(x["ci95"], y["ci95"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/vl-noise", help="folder for the pools and runs (reused when present)")
    parser.add_argument("--n", type=int, default=10000, help="scenes in the clean and noisy pools (the ×4 pool has 4n)")
    parser.add_argument("--steps", type=int, default=100, help="CLIP steps at batch 256, the same in every cell")
    parser.add_argument("--rate", type=float, default=0.5, help="fraction of noisy rows (exact)")
    parser.add_argument("--scorer", default="runs/bench-vl/clip-20000-1000", help="the CLIP run that scores pairs for the clip_score rule")
    parser.add_argument("--equal-epochs", action="store_true", help="also train the ×4 noisy pool for as many passes as the clean cell")
    parser.add_argument("--per-class", type=int, default=50, help="zero-shot test images per (shape, colour) pair")
    parser.add_argument("--pool-seed", type=int, default=1, help="scene stream of the pools (the scorer's pool is seed 0)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--cells", default=None, help=f"train only these cells (comma-separated, of {', '.join(CELLS)}) and stop: to share the cells among processes; a last run without it reuses them all and prints the tables")
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny pools, 20 steps; the clean cell scores pairs): measures nothing")
    args = parser.parse_args()
    if args.quick:
        args.n, args.steps, args.per_class, args.out = 1500, 20, 5, os.path.join(args.out, "quick")
    os.environ.setdefault("FEWSHOT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    start, cpu = time.time(), time.process_time()
    out = Path(args.out)

    clean = pool(out, f"clean-{args.n}", args.n, args.pool_seed, None)
    noisy = pool(out, f"noisy-{args.n}", args.n, args.pool_seed, args.rate)
    noisy4 = pool(out, f"noisy-{4 * args.n}", 4 * args.n, args.pool_seed, args.rate)
    for folder in (noisy, noisy4):
        info = json.loads((folder / "scenes.json").read_text())
        noisy_rows = info["rows"] - info["clean_rows"]
        print(f"{folder.name}: {info['rows']} rows, {noisy_rows} noisy ({100 * noisy_rows / info['rows']:.2f}%): {info['noise_rows']}", flush=True)
        assert noisy_rows == round(args.rate * info["rows"]), "the noise total is not exact"

    only = set(args.cells.split(",")) if args.cells else set(CELLS)
    if only - set(CELLS):
        raise SystemExit(f"unknown cell(s) {', '.join(sorted(only - set(CELLS)))}; the cells: {', '.join(CELLS)}")
    manifest = read_manifest(noisy / "manifest.tsv")
    cells, filters = [], {}

    def cell(name: str, path: Path, steps: int = args.steps) -> None:
        if name in only:
            cells.append(train_cell(args, name, path, steps))
            z = cells[-1]["zeroshot"]
            print(f"{name}: {steps} steps, {cells[-1]['passes']:.2f} passes; zero-shot % seen {100 * z['seen']['accuracy']:.1f} ± {100 * z['seen']['ci95']:.1f}, "
                  f"held-out {100 * z['held-out']['accuracy']:.1f} ± {100 * z['held-out']['ci95']:.1f}", flush=True)

    def filtered_cell(name: str, scorer: str | None = None, scores: np.ndarray | None = None) -> None:
        slug = name.replace(" ", "-")
        if slug in only:
            summary = kept_manifest(noisy, name, FILTERS[name], scorer, scores)
            kept = read_manifest(summary["kept_manifest"])
            filters[name] = {"rules": list(FILTERS[name]), **removal(manifest.noise, kept.noise), "by_rule": summary.get("report")}
            cell(slug, Path(summary["kept_manifest"]))

    cell("clean", clean / "manifest.tsv")
    cell("noisy", noisy / "manifest.tsv")
    for name in ("text rules", "shared_alt", "near_duplicate"):
        filtered_cell(name)
    cell("noisy-x4", noisy4 / "manifest.tsv")
    if args.equal_epochs or "noisy-x4-epochs" in (args.cells or ""):
        clean_rows, x4_rows = len(read_manifest(clean / "manifest.tsv")), len(read_manifest(noisy4 / "manifest.tsv"))
        cell("noisy-x4-epochs", noisy4 / "manifest.tsv", round(args.steps * x4_rows / clean_rows))

    # the CLIP-score rule last: its scorer is another bench's run, which may still be training
    scorer, sweep, by_kind = (str(out / f"clean-{args.steps}") if args.quick else args.scorer), [], {}
    if only & {"clip_score", "all"}:
        if not trained_steps(scorer) or trained_steps(scorer) < Run.open(scorer).config.train.steps:
            raise SystemExit(f"no fully trained CLIP run at '{scorer}' to score pairs: train bench/vision_language.py first or pass --scorer RUN")
        scores_path = noisy / "clip-scores.npy"
        if not scores_path.is_file():
            np.save(scores_path, api.clip_scores(scorer, noisy / "manifest.tsv"))
        scores = np.load(scores_path, allow_pickle=False)
        by_kind = {k or "clean": float(np.median(scores[[r for r, x in enumerate(manifest.noise) if x == k]])) for k in ("", *NOISE_KINDS)}
        print("CLIP score (cosine) median by row kind: " + ", ".join(f"{k} {v:.3f}" for k, v in by_kind.items()), flush=True)
        sweep = rule_sweep(manifest, CLIP_RULE, "clip_threshold", CLIP_THRESHOLDS, scores, scorer)
        for name in ("clip_score", "all"):
            filtered_cell(name, scorer, scores)
    if args.cells:
        print(f"trained {', '.join(c['cell'] for c in cells)}; run without --cells for the tables")
        return
    kinds = (*NOISE_KINDS, "")
    print(f"\nfilters on the {args.rate:.0%}-noise pool ({len(manifest)} rows): dropped, precision %, recall % per noise kind (clean: clean rows dropped %)")
    print(f"{'filter':<16}{'dropped':>8}{'prec':>7}" + "".join(f"{k or 'clean':>16}" for k in kinds))
    for name, f in filters.items():
        prec = "  n/a" if f["precision"] is None else f"{100 * f['precision']:5.1f}"
        print(f"{name:<16}{f['dropped']:>8}{prec:>7}" + "".join(f"{100 * f['recall'].get(k, 0):16.1f}" for k in kinds))
    shared_sweep = rule_sweep(manifest, "shared_alt", "max_shared", SHARED_LIMITS)
    for title, option, rows in [("CLIP-score rule alone by threshold", "clip_threshold", sweep), ("shared_alt alone by max_shared", "max_shared", shared_sweep)]:
        print(f"\n{title} (dropped, precision %, recall % per kind):")
        for row in rows:
            if row.get("keeps_nothing"):
                print(f"  {row[option]:>6g}: keeps nothing")
            else:
                prec = "  n/a" if row["precision"] is None else f"{100 * row['precision']:5.1f}"
                print(f"  {row[option]:>6g}: {row['dropped']:>6} {prec}  " + "  ".join(f"{k or 'clean'} {100 * row['recall'].get(k, 0):5.1f}" for k in kinds))
    print(f"\nzero-shot, 64-way, top-1 % ± 95% CI (chance 1.6); every cell {args.steps} steps at batch 256 unless marked")
    print(f"{'cell':<24}{'rows':>8}{'passes':>8}{'seen':>16}{'held-out':>16}")
    for c in cells:
        z = c["zeroshot"]
        label = c["cell"] if c["steps"] == args.steps else f"{c['cell']} ({c['steps']} steps)"
        print(f"{label:<24}{c['rows']:>8}{c['passes']:>8.2f}" + "".join(f"{100 * z[g]['accuracy']:9.1f} ± {100 * z[g]['ci95']:4.1f}" for g in ("seen", "held-out")))
    contrasts = {}
    by_name = {c["cell"]: c for c in cells}
    for label, name in [("noisy - clean", "noisy"), ("noisy-x4 - clean (equal steps)", "noisy-x4"), ("noisy-x4 - clean (equal epochs)", "noisy-x4-epochs")]:
        if name not in by_name:
            continue
        contrasts[label] = {g: difference(by_name[name], by_name["clean"], g) for g in ("seen", "held-out")}
        print(f"  {label:<34}" + "  ".join(f"{g} {100 * d:+5.1f} ± {100 * ci:4.1f}" for g, (d, ci) in contrasts[label].items()))

    result = {"bench": "vl_noise", "quick": args.quick, "pools": {"scenes": args.n, "x4_scenes": 4 * args.n, "objects": "1-2", "size": 32,
              "seed": args.pool_seed, "split_seed": SPLIT_SEED, "rate": args.rate, "shares": NOISE_SHARES},
              "steps": args.steps, "batch_size": 256, "train_seed": args.seed, "scorer": scorer, "clip_score_median_by_kind": by_kind,
              "clip_threshold_sweep": sweep, "max_shared_sweep": shared_sweep, "filters": filters, "cells": cells, "contrasts": contrasts,
              "wall_seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu, "load_average": os.getloadavg()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
