"""Captioning through a language model on captioned scenes (issue 16), first slice: ClipCap's grid.

Cells: ClipCap (Mokady et al. 2021) with an ``mlp`` or a ``transformer`` mapper × fewshot's GPT (pre-trained on
tinyshakespeare only, gpt-shakespeare) ``frozen`` or ``tuned``. Every cell maps the same frozen image embedding
(a clip-scenes run's conv4 tower and image projection) to 10 prefix embeddings and trains ``--steps`` steps at
batch 64 through the one trainer (configs/clipcap-scenes.yaml). Each is measured on ``--n`` fresh scenes of the
seen (shape, colour) pairs and ``--n`` of the held-out pairs (greedy decoding):

* BLEU-4, ROUGE-L and CIDEr-D against each scene's 3–5 reference captions (pycocoevalcap's scorers);
* scene F1 of the caption's tuples against the scene graph and the share the verifier calls true (± 95% CI);
* trainable parameters, training CPU-minutes, and the GPT's held-out tinyshakespeare perplexity before and after
  (what a tuned LM forgets; a frozen one must not move).

Beside the cells, the baseline a user tries first: captioning by retrieval (``nearest-caption``), each test scene
given the first caption of the ``--retrieval-pool`` training scene nearest to it by cosine similarity of the same
frozen CLIP image embedding (no language model, nothing trained).

``blip2-frozen``: BLIP-2 (Li et al. 2023), its stage 1 (configs/blip2-qformer-scenes.yaml: a Q-Former of 8 queries over
the same CLIP run's frozen conv4 tokens, ITC + ITM + ITG for ``--qformer-steps``) then stage 2 (configs/blip2-scenes.yaml:
the 8 query outputs as a soft prompt into the same frozen GPT, ``--steps``); its CPU time is the two stages'.

``coca``: CoCa (Yu et al. 2022) from scratch on the same pool (configs/coca-scenes.yaml with ``method.eos=true``, so its
decoder learns where a caption ends): its own conv4 tower, text layers and decoder, ``--steps`` at batch 64; no
language model, so no perplexity. Its captions are its own BPE ids, decoded greedily by recomputation.

``fromage``: FROMAGe (Koh et al. 2023; bench/fromage.py's cell, ``--fromage-steps``): a linear map from the same frozen
image embedding into a frozen GPT trained on scene text only (``--scene-gpt-run``, gpt-scenes: the Shakespeare GPT cannot be
steered by a prefix), a [RET] token it learns to say after a caption; text → image R@1/5 ± CI by its [RET] state against
CLIP's own text tower on the same candidates, its captions, and where it says [RET].

``capfilt``: CapFilt (Li et al. 2022; bench/capfilt.py with ``--blip-steps``): BLIP tuned on a 2,000-scene clean split
(conv4 from the same CLIP run) captions and filters bench/vl_noise.py's 50%-noise pool; the filter's precision and
recall on the planted noise, and CLIP (100 steps at batch 256) re-trained on the bootstrapped pool against the noisy,
clean and clip_score pools (bench/vl_noise.py's cells, reused from ``--noise-out``) and the clean split alone, in 64-way
zero-shot accuracy. Its runs live under OUT/capfilt.

For scale (the paper, COCO): CIDEr 113.1 with the transformer mapper and a frozen GPT-2, 108.4 with the MLP and
GPT-2 tuned; Conceptual Captions 71.8 and 87.3.

A run folder that already holds a finished checkpoint is reused (its CPU time reported as null). One JSON line at the end.

    OMP_NUM_THREADS=1 python bench/captioning.py --pool runs/bench-vl/scenes-20000 --clip-run runs/bench-vl/clip-20000-1000 \\
        --gpt-run runs/caption/gpt-shakespeare --scene-gpt-run runs/frozen/bench/gpt-scenes-1800
    OMP_NUM_THREADS=1 python bench/captioning.py --quick     # a smoke run, measures nothing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import capfilt as capfilt_bench  # noqa: E402  (CapFilt's cell)
import fromage as fromage_bench  # noqa: E402  (FROMAGe's cell)
from reused_runs import scene_lm_config, train  # noqa: E402  (shared by the benches)
from vision_language import clip_config, make_pool  # noqa: E402  (the CLIP bench's pool and recipe)

import torch  # noqa: E402

from fewshot import api  # noqa: E402
from fewshot.config import RunConfig  # noqa: E402
from fewshot.data.pairs import load_pairs  # noqa: E402
from fewshot.data.scenes import POOL_INFO  # noqa: E402
from fewshot.data.text import encode_text, load_text_splits  # noqa: E402
from fewshot.data.tokenizer import load_tokenizer  # noqa: E402
from fewshot.evaluate.captions import caption_metrics, caption_run, caption_test  # noqa: E402
from fewshot.evaluate.image_text import ImageTextRun, _split_seed  # noqa: E402
from fewshot.evaluate.text import perplexity  # noqa: E402
from fewshot.models.prefix_lm import open_prefix_lm  # noqa: E402
from fewshot.run import Run  # noqa: E402

CELLS = ("mlp-frozen", "mlp-tuned", "transformer-frozen", "transformer-tuned", "blip2-frozen", "coca", "fromage", "capfilt")
PAPER_COCO_CIDER = {"transformer-frozen": 113.1, "mlp-tuned": 108.4}  # Mokady et al. 2021, Table 1 (×100 scale)


def gpt_config(args: argparse.Namespace) -> RunConfig:
    return api.load_config(api.find_recipe("gpt-shakespeare"), [f"out={args.out}", f"name=gpt-{args.gpt_steps}",
                                                                 f"train.steps={args.gpt_steps}", f"train.checkpoint_every={args.gpt_steps}"])


def qformer_config(args: argparse.Namespace, manifest: Path, clip_run: Path) -> RunConfig:
    """BLIP-2's stage 1 on the pool: the Q-Former over the CLIP run's frozen conv4 tokens, ITC + ITM + ITG."""
    return api.load_config(api.find_recipe("blip2-qformer-scenes"), [
        f"data.path={manifest}", f"out={args.out}", f"name=blip2-qformer-{args.qformer_steps}", f"train.steps={args.qformer_steps}",
        f"train.checkpoint_every={args.qformer_steps}", f"train.warmup_steps={min(50, args.qformer_steps // 10)}",
        f"train.seed={args.seed}", f"method.image.init={clip_run}"])


def cell_config(cell: str, args: argparse.Namespace, manifest: Path, clip_run: Path, gpt_run: Path) -> RunConfig:
    common = [f"data.path={manifest}", f"out={args.out}", f"name={cell}-{args.steps}", f"train.steps={args.steps}",
              f"train.checkpoint_every={args.steps}", f"train.warmup_steps={min(50, args.steps // 10)}", f"train.seed={args.seed}",
              f"method.lm.init={gpt_run}"]
    if cell == "coca":
        return api.load_config(api.find_recipe("coca-scenes"), [*common[:-1], "train.batch_size=64", "method.eos=true"])
    if cell == "blip2-frozen":
        stage1 = qformer_config(args, manifest, clip_run).run_dir
        return api.load_config(api.find_recipe("blip2-scenes"), [*common, f"method.qformer.init={stage1}"])
    mapper, lm = cell.split("-")
    return api.load_config(api.find_recipe("clipcap-scenes"), [
        *common, f"method.mapper={mapper}", f"method.lm.tune={str(lm == 'tuned').lower()}", f"method.image.init={clip_run}", *args.override])


def heldout_perplexity(model, gpt_run: Path) -> float:
    """A GPT's perplexity on tinyshakespeare's held-out tenth, with the windows and tokenizer of the run ``gpt_run``."""
    data = Run.open(gpt_run).config.data
    tokens = encode_text(load_tokenizer(gpt_run), load_text_splits(data).heldout)
    return perplexity(model, tokens, data.seq_len)["perplexity"]


def nearest_caption(clip_run: Path, manifest: Path, args: argparse.Namespace) -> dict:
    """Captioning by retrieval on the test scenes of :func:`measure`: the first caption of the nearest of the pool's first
    ``--retrieval-pool`` images, by cosine similarity of the CLIP run's image embeddings."""
    link = ImageTextRun(clip_run)
    data = link.run.config.data
    pairs = load_pairs(manifest, link.tokenizer, data.seq_len, data.image_size)
    keep = min(args.retrieval_pool, len(pairs.images))
    first_caption: dict[int, str] = {}
    for image, caption in zip(pairs.image_index.tolist(), pairs.captions):
        first_caption.setdefault(image, caption)
    bank = torch.nn.functional.normalize(link.images(pairs.images[:keep]), dim=1)
    scores = {}
    for group in ("seen", "held-out"):
        test = caption_test(args.n, data.image_size, args.seed + 1, _split_seed(link.run), heldout=group == "held-out")
        nearest = (torch.nn.functional.normalize(link.images(test.images), dim=1) @ bank.T).argmax(dim=1)
        out = caption_metrics([first_caption[int(i)] for i in nearest], test.scenes, test.references)
        scores[group] = {k: out[k] for k in ("bleu4", "rouge_l", "rouge_l_ci95", "cider_d", "cider_d_ci95", "scene_f1", "scene_f1_ci95",
                                             "share_true", "share_true_ci95", "images")}
    return {"captions": scores, "trainable_parameters": 0, "retrieval_pool": keep}


def measure(run_dir: Path, args: argparse.Namespace, gpt_run: Path) -> dict:
    scores = {}
    for pairs in ("seen", "held-out"):
        out = caption_run(run_dir, args.n, args.seed + 1, heldout=pairs == "held-out")
        scores[pairs] = {k: out[k] for k in ("bleu4", "rouge_l", "rouge_l_ci95", "cider_d", "cider_d_ci95", "scene_f1", "scene_f1_ci95",
                                             "share_true", "share_true_ci95", "images", "examples")}
    method = Run.open(run_dir).method()
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    if not hasattr(method, "language_model"):  # CoCa: a captioner of its own, no LM to forget anything
        return {"captions": scores, "trainable_parameters": trainable}
    return {"captions": scores, "trainable_parameters": trainable,
            "perplexity_after": heldout_perplexity(method.language_model.model, gpt_run)}


def fromage_cell(args: argparse.Namespace, pool: Path, clip_run: Path, cpu_seconds: dict) -> dict:
    """FROMAGe on the pool through the scene GPT (trained here unless ``--scene-gpt-run``): its scores on the test scenes."""
    if args.scene_gpt_run:
        scene_gpt = Path(args.scene_gpt_run)
    else:
        lm = scene_lm_config(Path(args.out), args.scene_gpt_steps, 300 if args.quick else 20000, 100 if args.quick else 8000, args.seed)
        cpu_seconds["scene-gpt"], scene_gpt = train(lm), lm.run_dir
        args.scene_gpt_run = str(scene_gpt)
    config = fromage_bench.fromage_config(Path(args.out), pool / "manifest.tsv", clip_run, scene_gpt, args.fromage_steps, args.seed)
    cpu_seconds["fromage"] = train(config)
    run = Run.open(config.run_dir)
    trainable = sum(p.numel() for p in run.method().parameters() if p.requires_grad)
    return {"run": str(config.run_dir), "trainable_parameters": trainable, "final_losses": run.history[-1] if run.history else None,
            **fromage_bench.fromage_scores(config.run_dir, clip_run, args.n, args.seed + 1)}


def capfilt_cell(args: argparse.Namespace, pool: Path, clip_run: Path, cpu_seconds: dict) -> dict:
    """bench/capfilt.py with ``--blip-steps``, BLIP's conv4 from this bench's CLIP run, its runs under OUT/capfilt."""
    settings = argparse.Namespace(**{**capfilt_bench.DEFAULTS, "out": os.path.join(args.out, "capfilt"), "noise_out": args.noise_out,
                                     "blip_steps": args.blip_steps, "image_init": str(clip_run), "seed": args.seed, "quick": args.quick})
    if args.quick:
        capfilt_bench.quick_settings(settings)
    result = capfilt_bench.capfilt_bench(settings)
    cpu_seconds["capfilt-blip"] = result["blip_cpu_seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-caption", help="folder for the runs (and the pool unless --pool)")
    parser.add_argument("--pool", default=None, help="an existing scenes folder (e.g. runs/bench-vl/scenes-20000); default: make one in --out")
    parser.add_argument("--clip-run", default=None, help="an existing clip-scenes run on that pool; default: train one (--clip-steps)")
    parser.add_argument("--gpt-run", default=None, help="an existing gpt-shakespeare run; default: train one (--gpt-steps)")
    parser.add_argument("--n", type=int, default=20000, help="scenes in a pool made here")
    parser.add_argument("--clip-steps", type=int, default=1000, help="CLIP steps when the image tower is trained here")
    parser.add_argument("--gpt-steps", type=int, default=400, help="GPT steps when the language model is trained here")
    parser.add_argument("--scene-gpt-run", default=None, help="an existing gpt-scenes run for FROMAGe; default: write a scene corpus and train one (--scene-gpt-steps)")
    parser.add_argument("--scene-gpt-steps", type=int, default=1800, help="gpt-scenes steps when FROMAGe's LM is trained here")
    parser.add_argument("--steps", type=int, default=400, help="ClipCap steps of every cell (BLIP-2: of stage 2; CoCa), batch 64")
    parser.add_argument("--qformer-steps", type=int, default=200, help="BLIP-2's stage-1 steps (ITC + ITM + ITG), batch 64")
    parser.add_argument("--fromage-steps", type=int, default=600, help="FROMAGe steps at batch 64")
    parser.add_argument("--blip-steps", type=int, default=300, help="CapFilt: BLIP steps on the clean split, batch 64")
    parser.add_argument("--noise-out", default=capfilt_bench.DEFAULTS["noise_out"], help="CapFilt: bench/vl_noise.py's folder (its pools and seed-0 cells are reused)")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated subset of {','.join(CELLS)}")
    parser.add_argument("--test", type=int, default=300, dest="n_test", help="test scenes per pair group (seen, held-out)")
    parser.add_argument("--seed", type=int, default=0, help="pool, training and test-set seed")
    parser.add_argument("--retrieval-pool", type=int, default=5000, help="pool images the nearest-caption baseline retrieves from")
    parser.add_argument("--override", nargs="*", default=[], help="key=value overrides for every ClipCap cell")
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny pool, few steps): checks the pipeline, measures nothing")
    args = parser.parse_args()
    cells = [c for c in args.cells.split(",") if c]
    if unknown := [c for c in cells if c not in CELLS]:
        parser.error(f"unknown cell(s) {', '.join(unknown)}; choose from {', '.join(CELLS)}")
    if args.quick:
        args.n, args.clip_steps, args.gpt_steps, args.steps, args.n_test, args.qformer_steps = 600, 10, 10, 10, 20, 10
        args.scene_gpt_steps, args.fromage_steps = 10, 10
        args.out, args.pool, args.clip_run, args.gpt_run, args.scene_gpt_run = os.path.join(args.out, "quick"), None, None, None, None
    args.n_scenes, args.n = args.n, args.n_test
    os.environ.setdefault("FEWSHOT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    start, cpu = time.time(), time.process_time()

    pool = Path(args.pool) if args.pool else make_pool(argparse.Namespace(out=args.out, n=args.n_scenes, seed=args.seed))
    info = json.loads((pool / POOL_INFO).read_text())
    cpu_seconds: dict[str, float | None] = {}
    if args.clip_run:
        clip_run = Path(args.clip_run)
    else:
        clip = clip_config(argparse.Namespace(out=args.out, n=info["images"], steps=args.clip_steps, seed=args.seed), pool / "manifest.tsv")
        cpu_seconds["clip"], clip_run = train(clip), clip.run_dir
    if args.gpt_run:
        gpt_run = Path(args.gpt_run)
    else:
        gpt = gpt_config(args)
        cpu_seconds["gpt"], gpt_run = train(gpt), gpt.run_dir
    before = heldout_perplexity(open_prefix_lm(gpt_run).model, gpt_run)

    results: dict[str, dict] = {}
    t = time.process_time()
    results["nearest-caption"] = nearest_caption(clip_run, pool / "manifest.tsv", args)
    cpu_seconds["nearest-caption"] = time.process_time() - t
    for cell in cells:
        if cell in ("fromage", "capfilt"):
            t = time.process_time()
            results[cell] = (fromage_cell if cell == "fromage" else capfilt_cell)(args, pool, clip_run, cpu_seconds)
            cpu_seconds[f"{cell} (with evaluation)"] = time.process_time() - t
            continue
        if cell == "blip2-frozen":
            cpu_seconds["blip2-qformer"] = train(qformer_config(args, pool / "manifest.tsv", clip_run))
        config = cell_config(cell, args, pool / "manifest.tsv", clip_run, gpt_run)
        cpu_seconds[cell] = train(config)
        results[cell] = measure(config.run_dir, args, gpt_run)
        r = results[cell]
        print(f"{cell}: CPU s {cpu_seconds[cell]}  CIDEr-D seen {r['captions']['seen']['cider_d']:.3f}  held-out "
              f"{r['captions']['held-out']['cider_d']:.3f}  scene F1 {r['captions']['seen']['scene_f1']:.3f}  "
              f"true {100 * r['captions']['seen']['share_true']:.1f}%  perplexity {before:.2f} → {r.get('perplexity_after', float('nan')):.2f}",
              flush=True)

    print(f"\nClipCap on {info['images']} scenes, {args.steps} steps at batch 64; greedy captions of {args.n} test scenes per group")
    print("cell                 pairs     BLEU-4  ROUGE-L        CIDEr-D          scene F1       true %        trainable  CPU-min  ppl before → after")
    for cell, r in results.items():
        if cell in ("fromage", "capfilt"):
            continue
        spent = [cpu_seconds.get(c) for c in ((cell, "blip2-qformer") if cell == "blip2-frozen" else (cell,))]
        minutes = "reused" if None in spent else f"{sum(spent) / 60:.1f}"
        after = f"{before:.2f} → {r['perplexity_after']:.2f}" if "perplexity_after" in r else "no LM"
        for pairs, s in r["captions"].items():
            print(f"{cell:<20} {pairs:<9} {s['bleu4']:.3f}   {s['rouge_l']:.3f} ± {s['rouge_l_ci95']:.3f}  {s['cider_d']:.3f} ± {s['cider_d_ci95']:.3f}  "
                  f"{s['scene_f1']:.3f} ± {s['scene_f1_ci95']:.3f}  {100 * s['share_true']:5.1f} ± {100 * s['share_true_ci95']:4.1f}  "
                  f"{r['trainable_parameters']:>9,}  {minutes:>7}  {after}")
    print(f"for scale, ClipCap's COCO CIDEr (×100): {PAPER_COCO_CIDER}")
    if "fromage" in results:
        f = results["fromage"]
        print(f"\nFROMAGe ({args.fromage_steps} steps, {f['trainable_parameters']:,} trainable): text → image on the same test scenes")
        fromage_bench.print_retrieval(f["retrieval"])
        for pairs, s in f["captions"].items():
            e = f["ret_emission"][pairs]
            print(f"{pairs:<9} captions CIDEr-D {s['cider_d']:.3f} ± {s['cider_d_ci95']:.3f}, true {100 * s['share_true']:.1f}%; [RET] said "
                  f"after {100 * e['after_caption']:.1f} ± {100 * e['after_caption_ci95']:.1f}% of captions, inside at "
                  f"{100 * e['inside_caption']:.1f}% of positions")
            rule = f["ret_emission_last_token_rule"][pairs]
            print(f"{'':<9} the last-token rule (no LM): after {100 * rule['after_caption']:.1f} ± {100 * rule['after_caption_ci95']:.1f}%, "
                  f"inside at {100 * rule['inside_caption']:.1f}%")
    if "capfilt" in results:
        c = results["capfilt"]
        web = c["capfilt"]["report"]["all"]
        print(f"\nCapFilt (BLIP {c['blip_steps']} steps on the clean split): web-row filter precision {capfilt_bench.pct(web['precision'])}, "
              f"recall {capfilt_bench.pct(web['recall'])}; zero-shot contrasts (points ± CI):")
        for label, groups in c["contrasts"].items():
            print(f"  {label:<30}" + "  ".join(f"{g} {100 * d:+5.1f} ± {100 * ci:4.1f}" for g, (d, ci) in groups.items()))
    print(f"\nCPU-minutes this bench spent (this process; reused runs aside): {(time.process_time() - cpu) / 60:.1f}")
    out = {
        "bench": "captioning", "quick": args.quick, "pool": {"folder": str(pool), "scenes": info["images"], "split_seed": info["split_seed"]},
        "clip_run": str(clip_run), "gpt_run": str(gpt_run), "steps": args.steps, "test_scenes": args.n, "perplexity_before": before,
        "results": results, "train_cpu_seconds": cpu_seconds, "paper_coco_cider": PAPER_COCO_CIDER,
        "scene_gpt_run": args.scene_gpt_run, "fromage_steps": args.fromage_steps, "qformer_steps": args.qformer_steps, "blip_steps": args.blip_steps,
        "wall_seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu, "load_average": os.getloadavg(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
