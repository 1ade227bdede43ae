"""FROMAGe on captioned scenes (issue 16 item 5): retrieval through a frozen LM's [RET] token against CLIP's own text tower.

One run of configs/fromage-scenes.yaml (Koh et al. 2023): the frozen image embedding of a clip-scenes run (conv4 + its
image projection) mapped linearly to 1 visual embedding of a frozen GPT trained on scene text only (gpt-scenes), a
learned [RET] row after each caption, W_t / W_i into a 256-d space, captioning + InfoNCE both ways, half of each batch
captioned in concatenated pairs; ``--steps`` at batch 64. Then, on ``--test`` fresh scenes of the seen (shape, colour)
pairs and as many of the held-out CoGenT pairs (the captioning bench's test streams):

* text → image retrieval, each scene's first reference caption against the test images: R@1 and R@5 ± 95% CI, by the
  caption's [RET] state (FROMAGe) and by CLIP's text tower (the same CLIP run whose image tower FROMAGe reads), on the
  same candidates; relevance instance (the caption's own image) and semantic (every image the caption is true of);
* where the LM says [RET] (``Fromage.emits_ret``) beside the last-token rule (no LM: [RET] after a token that ended more
  training captions than it went on);
* FROMAGe's greedy captions through the frozen LM: BLEU-4, ROUGE-L, CIDEr-D, scene F1, share true (± CI);
* how much the captions depend on the image: the captioning loss of those scenes' first captions with each image's own
  visual embeddings, another image's (the batch rolled by one) and zeros, with and without the EOS labels;
* trainable parameters and training CPU-minutes.

A run folder that already holds a finished checkpoint is reused (its CPU time reported as null). One JSON line at the end.

    OMP_NUM_THREADS=1 python bench/fromage.py --pool runs/bench-vl/scenes-20000 --clip-run runs/bench-vl/clip-20000-1000 \\
        --gpt-run runs/frozen/bench/gpt-scenes-1800 --out runs/fromage/bench     # 7.0 CPU-minutes (2,000 steps)
    OMP_NUM_THREADS=1 python bench/fromage.py --quick     # a smoke run, measures nothing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reused_runs import scene_lm_config, train  # noqa: E402  (shared by the benches)
from vision_language import clip_config, make_pool  # noqa: E402  (the CLIP bench's pool and recipe)

from fewshot import api  # noqa: E402
from fewshot.data.scenes import POOL_INFO  # noqa: E402
import torch  # noqa: E402

from fewshot.data.pairs import tokenize_captions  # noqa: E402
from fewshot.data.token_ids import IGNORE_INDEX, PAD_ID  # noqa: E402
from fewshot.evaluate.captions import caption_run, caption_test  # noqa: E402
from fewshot.evaluate.image_text import _split_seed  # noqa: E402
from fewshot.objectives.captioning import append_eos, caption_labels, caption_loss  # noqa: E402
from fewshot.evaluate.scene_retrieval import scene_retrieval  # noqa: E402
from fewshot.run import Run  # noqa: E402

CAPTION_KEYS = ("bleu4", "rouge_l", "rouge_l_ci95", "cider_d", "cider_d_ci95", "scene_f1", "scene_f1_ci95", "share_true",
                "share_true_ci95", "images", "examples")


@torch.no_grad()
def image_dependence(run: Run, n: int, seed: int) -> dict[str, dict[str, float]]:
    """Captioning loss of ``n`` fresh seen scenes' first captions given each image's own visual embeddings, another image's
    (rolled by one) and zeros; with all labels and without the EOS labels (an LM that never saw EOS pays for it)."""
    method = run.method().eval()
    link = method.language_model
    test = caption_test(n, run.config.data.image_size, seed, _split_seed(run))
    tokens, _ = tokenize_captions(method.text_tokenizer, [r[0] for r in test.references], run.config.data.seq_len)
    ids = append_eos(tokens, link.eos_id, PAD_ID)
    labels = caption_labels(len(link.start_ids) + method.prefix_length, ids, PAD_ID)
    without_eos = labels.masked_fill(labels == link.eos_id, IGNORE_INDEX)
    prefix = method.prefix(torch.from_numpy(test.images).float() / 255)
    out = {}
    for name, p in (("own", prefix), ("another image's", prefix.roll(1, dims=0)), ("zeros", torch.zeros_like(prefix))):
        logits = method.caption_logits(p, ids)
        out[name] = {"loss": float(caption_loss(logits, labels)), "loss_without_eos": float(caption_loss(logits, without_eos))}
    return out


def fromage_config(out: Path, manifest: Path, clip_run: Path, gpt_run: Path, steps: int, seed: int, override: list[str] | tuple = ()) -> api.RunConfig:
    """configs/fromage-scenes.yaml on ``manifest`` for ``steps`` at batch 64, named fromage-STEPS under ``out``."""
    return api.load_config(api.find_recipe("fromage-scenes"), [
        f"data.path={manifest}", f"out={out}", f"name=fromage-{steps}", f"train.steps={steps}",
        f"train.checkpoint_every={steps}", f"train.warmup_steps={min(50, max(1, steps // 10))}", f"train.seed={seed}",
        f"method.image.init={clip_run}", f"method.lm.init={gpt_run}", *override])


@torch.no_grad()
def ret_emission(run: Run, n: int, seed: int, heldout: bool) -> dict[str, float]:
    """Where the trained LM says [RET] (argmax over its vocabulary plus [RET]) reading ``n`` fresh scenes' first reference
    captions: the share right after the caption ± 95% CI, and the mean share of the positions inside a caption."""
    from fewshot.evaluate.runner import mean_ci95

    method = run.method().eval()
    test = caption_test(n, run.config.data.image_size, seed, _split_seed(run), heldout=heldout)
    tokens, _ = tokenize_captions(method.text_tokenizer, [r[0] for r in test.references], run.config.data.seq_len)
    after, early = method.emits_ret(tokens)
    share, ci = mean_ci95(after.float().numpy())
    return {"after_caption": share, "after_caption_ci95": ci, "inside_caption": float(early.mean()), "captions": n}


@torch.no_grad()
def last_token_rule(run: Run, n: int, seed: int, heldout: bool) -> dict[str, float]:
    """The baseline for :func:`ret_emission` with no LM: say [RET] after token w iff w ended more of the training captions
    (the run's manifest) than it went on; scored as ``Fromage.emits_ret`` is, on the same captions (after the start ids,
    never)."""
    from collections import Counter

    from fewshot.data.pairs import read_manifest
    from fewshot.evaluate.runner import mean_ci95

    method, seq_len = run.method(), run.config.data.seq_len
    ends, goes_on = Counter(), Counter()
    train, _ = tokenize_captions(method.text_tokenizer, read_manifest(run.config.data.path).captions, seq_len)
    for row in train.tolist():
        row = [t for t in row if t != PAD_ID]
        goes_on.update(row[:-1])
        ends[row[-1]] += 1
    test = caption_test(n, run.config.data.image_size, seed, _split_seed(run), heldout=heldout)
    tokens, _ = tokenize_captions(method.text_tokenizer, [r[0] for r in test.references], seq_len)
    after, inside = [], []
    for row in tokens.tolist():
        row = [t for t in row if t != PAD_ID]
        says = [ends[t] > goes_on[t] for t in row]
        after.append(float(says[-1]))
        inside.append(sum(says[:-1]) / len(row))  # emits_ret's positions: the last start id and every token but the last
    share, ci = mean_ci95(torch.tensor(after).numpy())
    return {"after_caption": share, "after_caption_ci95": ci, "inside_caption": sum(inside) / len(inside), "captions": n}


def fromage_scores(run_dir: Path, clip_run: Path, n: int, seed: int) -> dict:
    """FROMAGe's [RET] retrieval beside CLIP's text tower, its greedy captions and where it says [RET], on ``n`` fresh
    scenes of the seen and of the held-out pairs (stream ``seed``)."""
    retrieval, captions, emission, baseline = {}, {}, {}, {}
    run = Run.open(run_dir)
    for pairs in ("seen", "held-out"):
        held = pairs == "held-out"
        retrieval[pairs] = {name: scene_retrieval(path, n, seed, heldout=held) for name, path in (("fromage [RET]", run_dir), ("clip text tower", clip_run))}
        result = caption_run(run_dir, n, seed, heldout=held)
        captions[pairs] = {k: result[k] for k in CAPTION_KEYS}
        emission[pairs] = ret_emission(run, n, seed, held)
        baseline[pairs] = last_token_rule(run, n, seed, held)
    return {"retrieval": retrieval, "captions": captions, "ret_emission": emission, "ret_emission_last_token_rule": baseline}


def print_retrieval(retrieval: dict) -> None:
    print("pairs     relevance  model             R@1             R@5             median rank")
    for pairs, rows in retrieval.items():
        for relevance in ("instance", "semantic"):
            for name, r in rows.items():
                s = r[relevance]
                print(f"{pairs:<9} {relevance:<10} {name:<17} {100 * s['R@1']:5.1f} ± {100 * s['R@1_ci95']:4.1f}    "
                      f"{100 * s['R@5']:5.1f} ± {100 * s['R@5_ci95']:4.1f}    {s['median_rank']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-fromage", help="folder for the runs (and the pool unless --pool)")
    parser.add_argument("--pool", default=None, help="an existing scenes folder (e.g. runs/bench-vl/scenes-20000); default: make one in --out")
    parser.add_argument("--clip-run", default=None, help="an existing clip-scenes run on that pool; default: train one (--clip-steps)")
    parser.add_argument("--gpt-run", default=None, help="an existing gpt-scenes run; default: write a scene corpus and train one (--gpt-steps)")
    parser.add_argument("--n", type=int, default=20000, help="scenes in a pool made here")
    parser.add_argument("--clip-steps", type=int, default=1000, help="CLIP steps when the image tower is trained here")
    parser.add_argument("--gpt-steps", type=int, default=1800, help="gpt-scenes steps when the LM is trained here")
    parser.add_argument("--steps", type=int, default=2000, help="FROMAGe steps at batch 64")
    parser.add_argument("--test", type=int, default=300, help="test scenes per pair group (seen, held-out)")
    parser.add_argument("--seed", type=int, default=0, help="pool, training and test-set seed")
    parser.add_argument("--override", nargs="*", default=[], help="key=value overrides for the FROMAGe run")
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny pool, few steps): checks the pipeline, measures nothing")
    args = parser.parse_args()
    if args.quick:
        args.n, args.clip_steps, args.gpt_steps, args.steps, args.test = 600, 10, 10, 10, 20
        args.out, args.pool, args.clip_run, args.gpt_run = os.path.join(args.out, "quick"), None, None, None
    os.environ.setdefault("FEWSHOT_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    start, cpu = time.time(), time.process_time()
    out = Path(args.out)

    pool = Path(args.pool) if args.pool else make_pool(argparse.Namespace(out=args.out, n=args.n, seed=args.seed))
    info = json.loads((pool / POOL_INFO).read_text())
    manifest = pool / "manifest.tsv"
    cpu_seconds: dict[str, float | None] = {}
    if args.clip_run:
        clip_run = Path(args.clip_run)
    else:
        clip = clip_config(argparse.Namespace(out=args.out, n=info["images"], steps=args.clip_steps, seed=args.seed), manifest)
        cpu_seconds["clip"], clip_run = train(clip), clip.run_dir
    if args.gpt_run:
        gpt_run = Path(args.gpt_run)
    else:
        gpt = scene_lm_config(out, args.gpt_steps, 300 if args.quick else 20000, 100 if args.quick else 8000, args.seed)
        cpu_seconds["gpt"], gpt_run = train(gpt), gpt.run_dir

    config = fromage_config(out, manifest, clip_run, gpt_run, args.steps, args.seed, args.override)
    cpu_seconds["fromage"] = train(config)
    run = Run.open(config.run_dir)
    method = run.method()
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    history = run.history

    t = time.process_time()
    scores = fromage_scores(config.run_dir, clip_run, args.test, args.seed + 1)
    retrieval, captions = scores["retrieval"], scores["captions"]
    dependence = image_dependence(run, args.test, args.seed + 1)
    cpu_seconds["evaluation"] = time.process_time() - t

    minutes = "reused" if cpu_seconds["fromage"] is None else f"{cpu_seconds['fromage'] / 60:.1f}"
    print(f"\nFROMAGe on {info['images']} scenes, {args.steps} steps at batch 64 ({trainable:,} trainable parameters, "
          f"{minutes} CPU-min); text → image on {args.test} fresh scenes per group, first reference caption as the query")
    print_retrieval(retrieval)
    print("\nFROMAGe's greedy captions through the frozen LM")
    print("pairs     BLEU-4  ROUGE-L        CIDEr-D          scene F1       true %")
    for pairs, s in captions.items():
        print(f"{pairs:<9} {s['bleu4']:.3f}   {s['rouge_l']:.3f} ± {s['rouge_l_ci95']:.3f}  {s['cider_d']:.3f} ± {s['cider_d_ci95']:.3f}  "
              f"{s['scene_f1']:.3f} ± {s['scene_f1_ci95']:.3f}  {100 * s['share_true']:5.1f} ± {100 * s['share_true_ci95']:4.1f}")
        print(f"          e.g. {s['examples'][0]['caption']!r}")
    for pairs, e in scores["ret_emission"].items():
        print(f"[RET] said right after {pairs} captions: {100 * e['after_caption']:.1f} ± {100 * e['after_caption_ci95']:.1f}%, "
              f"inside them {100 * e['inside_caption']:.1f}% of positions")
    for pairs, e in scores["ret_emission_last_token_rule"].items():
        print(f"  the last-token rule (no LM), {pairs}: after {100 * e['after_caption']:.1f} ± {100 * e['after_caption_ci95']:.1f}%, "
              f"inside {100 * e['inside_caption']:.1f}%")
    print(f"\ncaptioning loss of {args.test} seen scenes' first captions by the visual embeddings given (nats):")
    for name, d in dependence.items():
        print(f"  {name:<16} {d['loss']:.3f}   without the EOS labels {d['loss_without_eos']:.3f}")
    result = {
        "bench": "fromage", "quick": args.quick, "pool": {"folder": str(pool), "scenes": info["images"], "split_seed": info["split_seed"]},
        "clip_run": str(clip_run), "gpt_run": str(gpt_run), "run": str(config.run_dir), "steps": args.steps, "test_scenes": args.test,
        "trainable_parameters": trainable, "retrieval": retrieval, "captions": captions, "ret_emission": scores["ret_emission"],
        "ret_emission_last_token_rule": scores["ret_emission_last_token_rule"], "image_dependence": dependence, "train_cpu_seconds": cpu_seconds,
        "final_losses": history[-1] if history else None,
        "wall_seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu, "load_average": os.getloadavg(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
