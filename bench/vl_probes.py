"""Zero-shot against few-shot linear probes and CoOp on a trained CLIP run (issue 14), measured on captioned scenes.

1. The 64-way one-object test (the 64 "<colour> <shape>" pairs of the pre-training shapes, ``--per-class`` test
   images each, seen and held-out pairs apart, the split of the run's pool): zero-shot (the 4 default templates,
   and the single template "a picture of a {}" that CoOp starts from) against, at K = 1, 2, 4, 8, 16 labelled
   images per class,
   * linear probes: the evaluator's logistic regression (L2-normalised features, C = 1) on the image tower's r,
     and on the projected image embedding that zero-shot scores; and the nearest cosine prototype on r;
   * CoOp (Zhou et al. 2022, :mod:`fewshot.adapt.coop`): 4 context vectors started at "a picture of a", unified
     and class-specific, only they train, cross-entropy on the support at CLIP's learned scale.
   Each K is measured on ``--draws`` seeded supports (draw d: fresh one-object scenes from seed 100 + d, the first
   K of each class, so a draw's supports are nested across K); accuracy is the mean over draws ± 95% CI over draws.
2. The 8 reserved shapes (never drawn or named in pre-training, so there are no class names and no zero-shot):
   5-way K-shot episodes through the evaluator's episode runner (the same seeded episodes for every row),
   nearest cosine prototype and logistic regression, on the CLIP image tower and on pixels: RGB, greyscale, and a
   colour-invariant binarised mask (a pixel is on where its brightest channel exceeds half the image's brightest
   pixel: shapes come in random colours and shades, which the mask ignores), and that mask cut to its bounding box
   and resized to 16 × 16 (position and size gone too: a hand-made invariant baseline).

CoOp's steps and learning rate (the defaults of :mod:`fewshot.adapt.coop`) were chosen with ``--validate``: a grid
on a validation draw (supports from seed 200, 20 queries per pair from seed 300), never on the test draws.

One JSON line at the end. ``--quick`` trains a tiny run of its own (bench/vision_language.py's pool and recipe) and
measures nothing.

    OMP_NUM_THREADS=1 python bench/vl_probes.py --run runs/bench-vl/clip-20000-1000   # ≈ 6 CPU-minutes
    OMP_NUM_THREADS=1 python bench/vl_probes.py --quick                               # ≈ 1 minute, a smoke run
    OMP_NUM_THREADS=1 python bench/vl_probes.py --validate                            # CoOp's grid, ≈ 1.3 CPU-minutes
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fewshot.adapt.coop import DEFAULT_LEAD, DEFAULT_LR, DEFAULT_STEPS, CoOp, CoOpClassifier, name_tokens  # noqa: E402
from fewshot.data.scenes import single_object_test, fewshot_shape_images  # noqa: E402
from fewshot.evaluate.classifiers import make_classifier  # noqa: E402
from fewshot.evaluate.image_text import DEFAULT_TEMPLATES, ImageTextRun, _split_seed  # noqa: E402
from fewshot.evaluate.runner import mean_ci95, run_episodes  # noqa: E402
from fewshot.evaluate.zeroshot import ZeroShotClassifier, text_prototypes  # noqa: E402

GROUPS = ("seen", "held-out")


def quick_run(out: Path, seed: int) -> Path:
    """A tiny CLIP run of bench/vision_language.py's recipe on a small pool (reused when present)."""
    from fewshot import api
    from fewshot.train.trainer import checkpoint_path
    from vision_language import clip_config, make_pool

    args = argparse.Namespace(out=str(out), n=1500, steps=30, seed=seed)
    config = clip_config(args, make_pool(args) / "manifest.tsv")
    if not checkpoint_path(config.run_dir).exists():
        api.pretrain(config, progress=False)
    return config.run_dir


@torch.no_grad()
def features(model: ImageTextRun, images: np.ndarray) -> dict[str, torch.Tensor]:
    """The image tower's r and the projected embedding zero-shot scores, for uint8 images (N, 3, S, S)."""
    x = torch.from_numpy(images).float() / 255
    method, batch = model.method, model.batch_size
    r = torch.cat([method.image_features(x[i : i + batch]) for i in range(0, len(x), batch)])
    return {"r": r, "embedding": model.images(x)}


def group_correct(predicted: np.ndarray, labels: np.ndarray, groups: list[str]) -> dict[str, np.ndarray]:
    """Which test images are classified right: all of them, and the seen and the held-out pairs apart."""
    correct = (predicted == labels).astype(np.float64)
    return {"all": correct, **{g: correct[np.isin(labels, [c for c, h in enumerate(groups) if h == g])] for g in GROUPS}}


def binarised(images: np.ndarray) -> np.ndarray:
    """(N, S·S) colour-invariant masks: 1 where a pixel's brightest channel exceeds half the image's brightest pixel."""
    bright = images.max(axis=1).astype(np.float32)  # (N, S, S)
    return (bright > 0.5 * bright.reshape(len(images), -1).max(axis=1)[:, None, None]).reshape(len(images), -1).astype(np.float32)


def cropped(masks: np.ndarray, size: int, out: int = 16) -> np.ndarray:
    """(N, out·out): each binarised mask cut to its bounding box and resized to out × out (nearest), so neither
    position nor size is left, only the outline."""
    rows = []
    for mask in masks.reshape(len(masks), size, size):
        ys, xs = np.nonzero(mask)
        box = torch.from_numpy(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] if len(ys) else mask)
        rows.append(torch.nn.functional.interpolate(box[None, None], size=(out, out), mode="nearest").reshape(-1))
    return torch.stack(rows).numpy()


def validate(model: ImageTextRun, split: int, size: int) -> list[dict]:
    """CoOp's accuracy on a validation draw for lr × steps, K = 1 and 4, unified and class-specific."""
    queries = single_object_test(20, size, 300, split)
    support = single_object_test(4, size, 200, split)
    names, query_x, support_x = list(queries.classes), features(model, queries.images)["embedding"], features(model, support.images)["embedding"]
    rows = []
    for k, class_specific, lr, steps in itertools.product((1, 4), (False, True), (2e-3, 1e-2, 5e-2), (100, 300)):
        chosen = np.flatnonzero(np.arange(len(support.labels)) % 4 < k)
        make = lambda: CoOp(model.method, model.tokenizer, names, class_specific=class_specific)  # noqa: E731
        clf = CoOpClassifier(make, steps, lr).fit(support_x[chosen].numpy(), support.labels[chosen])
        correct = group_correct(clf.predict(query_x.numpy()), queries.labels, list(queries.groups))
        rows.append({"shot": k, "class_specific": class_specific, "lr": lr, "steps": steps, **{g: float(c.mean()) for g, c in correct.items()}})
        print(f"  K={k} {'class-specific' if class_specific else 'unified':<15} lr {lr:<6g} {steps:>3} steps: "
              + "  ".join(f"{g} {100 * rows[-1][g]:5.1f}" for g in ("seen", "held-out", "all")), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/bench-vl/clip-20000-1000", help="a trained CLIP run folder (method=clip)")
    parser.add_argument("--out", default="runs/vl-probes", help="where --quick trains its own run")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--draws", type=int, default=5, help="seeded support draws per K on the 64-way test")
    parser.add_argument("--per-class", type=int, default=50, help="64-way test images per pair")
    parser.add_argument("--episodes", type=int, default=600, help="reserved-shape episodes per row")
    parser.add_argument("--coop-steps", type=int, default=DEFAULT_STEPS, help="CoOp's full-batch AdamW steps")
    parser.add_argument("--coop-lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validate", action="store_true", help="only CoOp's lr × steps grid on a validation draw")
    parser.add_argument("--quick", action="store_true", help="a tiny run of its own and few draws: checks the pipeline, measures nothing")
    args = parser.parse_args()
    if args.quick:
        args.shots, args.draws, args.per_class, args.episodes, args.coop_steps = [1, 4], 2, 5, 50, 20
    os.environ.setdefault("FEWSHOT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    start, cpu = time.time(), time.process_time()
    run_dir = quick_run(Path(args.out) / "quick", args.seed) if args.quick else Path(args.run)

    model = ImageTextRun(run_dir)
    split = _split_seed(model.run)
    if args.validate:
        print(f"CoOp on a validation draw of run {run_dir} (step {model.run.step}), 64-way top-1 %:", flush=True)
        rows = validate(model, split, model.run.config.data.image_size)
        print(json.dumps({"bench": "vl_probes", "validate": rows, "run": str(run_dir), "step": model.run.step,
                          "cpu_seconds": time.process_time() - cpu}))
        return
    test = single_object_test(args.per_class, model.run.config.data.image_size, args.seed + 1, split)
    names, groups, labels = list(test.classes), list(test.groups), test.labels
    test_features = features(model, test.images)
    print(f"run {run_dir} (step {model.run.step}); 64-way test: {len(labels)} images; split seed {split}", flush=True)

    rows: list[dict] = []
    for label, templates in (("zero-shot, 4 templates", list(DEFAULT_TEMPLATES)), (f"zero-shot, '{DEFAULT_LEAD} {{}}'", [DEFAULT_LEAD + " {}"])):
        prototypes = text_prototypes(model.texts, names, templates)
        correct = group_correct(ZeroShotClassifier(prototypes).predict(test_features["embedding"]), labels, groups)
        row = {"method": label, "shot": 0, "draws": [{g: float(c.mean()) for g, c in correct.items()}], "ci95_over": "images"}
        for group, c in correct.items():
            row[group], row[f"{group}_ci95"] = mean_ci95(c)
        rows.append(row)

    coop_seconds: list[float] = []
    methods = {
        "logreg on r": lambda: make_classifier("logreg"),
        "logreg on embedding": lambda: make_classifier("logreg"),
        "prototypes on r": lambda: make_classifier("proto-cosine"),
        "CoOp unified": lambda: CoOpClassifier(lambda: CoOp(model.method, model.tokenizer, names), args.coop_steps, args.coop_lr),
        "CoOp class-specific": lambda: CoOpClassifier(lambda: CoOp(model.method, model.tokenizer, names, class_specific=True),
                                                      args.coop_steps, args.coop_lr),
    }
    space = {"logreg on r": "r", "logreg on embedding": "embedding", "prototypes on r": "r", "CoOp unified": "embedding", "CoOp class-specific": "embedding"}
    found = {(m, k): [] for m in methods for k in args.shots}
    for d in range(args.draws):
        pool = single_object_test(max(args.shots), model.run.config.data.image_size, 100 + d, split)
        pool_features = features(model, pool.images)
        for k in args.shots:
            chosen = np.flatnonzero(np.arange(len(pool.labels)) % max(args.shots) < k)  # the first k of each class
            for name, make in methods.items():
                t = time.process_time()
                with threadpool_limits(limits=1), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "The number of unique classes")  # 1-shot: 64 classes in 64 rows
                    clf = make().fit(pool_features[space[name]][chosen].numpy(), pool.labels[chosen])
                    predicted = np.asarray(clf.predict(test_features[space[name]].numpy()))
                if name.startswith("CoOp"):
                    coop_seconds.append(time.process_time() - t)
                found[(name, k)].append({g: float(c.mean()) for g, c in group_correct(predicted, labels, groups).items()})
        print(f"  draw {d}: done", flush=True)
    probes = [{"method": m, "shot": k, "draws": found[(m, k)], "ci95_over": "draws"} for m in methods for k in args.shots]
    for row in probes:
        for group in ("all", *GROUPS):
            row[group], row[f"{group}_ci95"] = mean_ci95([draw[group] for draw in row["draws"]])
    rows += probes

    print(f"\n64-way top-1 (%; zero-shot ± 95% CI over images, probes and CoOp mean ± 95% CI over {args.draws} support draws; chance 1.6):")
    print(f"  {'method':<32} {'K':>3}   {'seen':>12}   {'held-out':>12}   {'all':>12}")
    ci = lambda v, h: f"{100 * v:5.1f} ± {100 * h:4.1f}" if np.isfinite(h) else f"{100 * v:5.1f}       "  # noqa: E731
    for row in rows:
        print(f"  {row['method']:<32} {row['shot']:>3}   " + "   ".join(ci(row[g], row[f"{g}_ci95"]) for g in (*GROUPS, "all")))

    shapes = fewshot_shape_images(60, model.run.config.data.image_size, args.seed + 1)
    pixels = shapes.images.astype(np.float32) / 255
    spaces = {
        "CLIP image tower": features(model, shapes.images)["r"].numpy(),
        "pixels (RGB)": pixels.reshape(len(pixels), -1),
        "pixels (greyscale)": pixels.mean(axis=1).reshape(len(pixels), -1),
        "pixels (binarised)": binarised(shapes.images),
        "binarised, cropped": cropped(binarised(shapes.images), shapes.images.shape[-1]),
    }
    episodes = []
    for name, x in spaces.items():
        for k in args.shots:
            for row in run_episodes(x, shapes.labels, 5, k, 15, args.episodes, ("proto-cosine", "logreg"), args.seed):
                episodes.append({"features": name, **row})
    print(f"\nReserved shapes, 5-way K-shot, 15 queries, {args.episodes} episodes (% ± 95% CI; chance 20):")
    print(f"  {'features':<20} {'classifier':<13} " + " ".join(f"{'K=' + str(k):>13}" for k in args.shots))
    for name in spaces:
        for clf in ("proto-cosine", "logreg"):
            cells = [r for r in episodes if r["features"] == name and r["classifier"] == clf]
            print(f"  {name:<20} {clf:<13} " + " ".join(f"{100 * r['accuracy']:5.1f} ± {100 * r['ci95']:4.1f}" for r in cells))

    out = {
        "bench": "vl_probes", "quick": args.quick, "run": str(run_dir), "step": model.run.step, "split_seed": split,
        "test": {"per_class": args.per_class, "seed": args.seed + 1, "draws": args.draws, "shots": args.shots},
        "coop": {"steps": args.coop_steps, "lr": args.coop_lr, "lead": DEFAULT_LEAD,
                 "n_context": len(name_tokens(model.tokenizer, names)[0]), "cpu_seconds_per_fit": float(np.mean(coop_seconds))},
        "sixty_four_way": [{k: v for k, v in r.items() if k != "draws"} | {"per_draw": r["draws"]} for r in rows],
        "reserved_shapes": episodes, "wall_seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu,
        "load_average": os.getloadavg(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
