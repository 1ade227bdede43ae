"""The Python API: everything the CLI does, callable from code.

    from fewshot import api
    cfg = api.load_config("configs/simclr-digits.yaml", ["train.steps=200"])
    result = api.pretrain(cfg)
    report = api.evaluate_run(result.run_dir)
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from fewshot.config import DataConfig, RunConfig, find_recipe, load_config
from fewshot.data.registry import load_run_data, source_tokenizer_text
from fewshot.data.tokenizer import TOKENIZER_FILE, decode, encode, save_tokenizer, train_tokenizer
from fewshot.errors import CheckpointError, ConfigError
from fewshot.evaluate.evaluator import EvalReport, evaluate
from fewshot.evaluate.text import evaluate_text_run, perplexity_line
from fewshot.generate import generate as _generate
from fewshot.methods.language import LANGUAGE_METHODS
from fewshot.report import write_report
from fewshot.run import Run
from fewshot.train.checkpoint import Checkpoint
from fewshot.train.trainer import TrainResult, checkpoint_path, pretrain as _pretrain

Log = Callable[[str], None]


# What a new run writes at the top of its folder (besides checkpoints/, logs/ and tensorboard/).
RUN_FILES = ("config.json", "tokenizer.json")


def refuse_existing_run(run_dir: Path) -> None:
    """A new run never writes into a folder that already holds a run's files: a checkpoint (``--resume``
    continues it), or the config.json / tokenizer.json of a run that wrote no checkpoint yet."""
    if checkpoint_path(run_dir).exists():
        raise CheckpointError(f"run folder '{run_dir}' already holds a checkpoint; pass --resume to continue it or choose another name")
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found:
        raise CheckpointError(
            f"run folder '{run_dir}' already holds {' and '.join(found)} (a run without a checkpoint); "
            f"choose another name=/out= or remove that folder"
        )


def pretrain(config: RunConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Load the run's data (pre-training classes only) and pre-train; see :func:`fewshot.train.trainer.pretrain`.

    A new run refuses a folder that holds another run's files (:func:`refuse_existing_run`) before
    it writes anything."""
    if not resume:
        refuse_existing_run(config.run_dir)
    run = Run.open(config.run_dir) if resume and checkpoint_path(config.run_dir).exists() else None
    data_config = run.config.data if run else config.data  # a resumed run trains on the data it started with
    tokenizer = run.tokenizer() if run else _new_tokenizer(config, data_config)
    try:
        data = load_run_data(data_config, config.eval.data_path, _pretrained_text_tokenizer(config) or tokenizer).pretrain
        return _pretrain(config, data, resume=resume, progress=progress, checkpoint=run.checkpoint if run else None)
    except BaseException:
        if run is None and tokenizer is not None and not (config.run_dir / "config.json").exists():
            # the run failed before it began (e.g. its method refused its options): the tokenizer this
            # call wrote is all it left, and keeping it would make the same name refuse a corrected rerun
            (config.run_dir / TOKENIZER_FILE).unlink(missing_ok=True)
        raise


def _pretrained_text_tokenizer(config: RunConfig) -> Any:
    """The word pieces of a pre-trained text tower (``method.text.name=all-minilm-l6-v2``): the captions it trains
    on are its own tokens, as zero-shot, retrieval and CLIP scores read them; None for a tower of the run's BPE."""
    from fewshot.methods import METHODS
    from fewshot.models.hf_text import PRETRAINED, word_pieces

    name = getattr(getattr(config.method, "text", None), "name", None)
    if name in PRETRAINED:
        return word_pieces(name)
    own = getattr(METHODS.get(config.method.name), "caption_tokenizer", None)  # ClipCap: its language model's tokenizer
    return own(config) if own is not None else None


# What does not shape a run's weights: the folder's name, how long a session may run, logging and checkpoint cadence
# and evaluation settings. A run stored under other values of these is still the run a config asks for.
_NOT_SHAPING = ("name", "out", "train.max_minutes", "train.log_every", "train.checkpoint_every", "eval")


def settings_differ(stored: RunConfig, wanted: RunConfig) -> list[tuple[str, Any, Any]]:
    """(dotted key, stored value, wanted value) of every setting that shapes the weights and differs."""
    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix: tree}
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}.{key}" if prefix else key).items()}

    a, b = flat(stored.model_dump(mode="json")), flat(wanted.model_dump(mode="json"))
    keys = [k for k in dict.fromkeys([*a, *b]) if not any(k == n or k.startswith(n + ".") for n in _NOT_SHAPING)]
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def pretrain_to_completion(config: RunConfig, progress: bool = True) -> TrainResult | None:
    """Bring ``config``'s run to ``train.steps``: None when its last checkpoint is already there (reused), a
    resumed run when it stopped partway (a checkpoint short of the steps), else a new run. What a benchmark
    that may be stopped and rerun calls, so a half-trained run is never scored as a finished one. A folder holding
    a run of other settings (:func:`settings_differ`) is refused, never reused in place of the one asked for."""
    if checkpoint_path(config.run_dir).exists():
        run = Run.open(config.run_dir)
        differ = settings_differ(run.config, config)
        if differ:
            key, there, here = differ[0]
            more = f" and {len(differ) - 1} more" if len(differ) > 1 else ""
            raise CheckpointError(f"run folder '{config.run_dir}' holds a run of other settings ({key}: {there!r} there, {here!r} "
                                  f"asked{more}); choose another name=/out= or remove that folder")
        if run.step >= config.train.steps:
            return None
        return pretrain(config, resume=True, progress=progress)
    return pretrain(config, progress=progress)


def _new_tokenizer(config: RunConfig, data: DataConfig) -> Tokenizer | None:
    """A new run's tokenizer when its source has text (text: the training split; pairs: the captions and a
    corpus), saved as run_dir/tokenizer.json before training (a resumed run reuses that file: :meth:`Run.tokenizer`)."""
    if data.source == "text" and config.method.name not in LANGUAGE_METHODS:
        raise ConfigError(f"data.source=text needs a language method ({', '.join(LANGUAGE_METHODS)}), got '{config.method.name}'")
    text = source_tokenizer_text(data)
    if text is None:
        return None
    tokenizer = train_tokenizer(text, data.vocab_size)
    save_tokenizer(tokenizer, config.run_dir)  # pretrain() refused a folder that holds a run's files
    return tokenizer


def open_run(path: str | Path) -> Run:
    """The run folder (or checkpoint file) ``path``, opened once: config, checkpoint, encoder, tokenizer,
    base SHA-256 and evaluation set (see :class:`fewshot.run.Run`)."""
    return Run.open(path)


def load_pretrained(path: str | Path) -> tuple[RunConfig, nn.Module, Checkpoint]:
    """(config, method, checkpoint) from a checkpoint file or a run folder, with the whole pre-training
    method (heads, targets, queues); ``method.encoder`` is the product. For the encoder alone use
    ``open_run(path).encoder()``."""
    run = Run.open(path)
    return run.config, run.method(), run.checkpoint


def evaluate_run(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), lake_runs: str | None = None, log: Log = lambda _: None
) -> EvalReport:
    """Evaluate a checkpoint on its run's held-out classes (and Lake's runs if given), with baselines.

    ``overrides`` change the stored config for this evaluation only (e.g. ``eval.episodes=1000``).
    """
    run = Run.open(path)
    # The report goes beside the checkpoint, wherever the run folder has moved since training.
    run_dir = run.path
    config = load_config(base=run.config.model_dump(mode="json"), overrides=[f"out={run_dir.parent}", f"name={run_dir.name}", *overrides])
    header = f"Evaluation of {run_dir} (step {run.step})."
    if config.data.source == "text":
        report = evaluate_text_run(config, run.method(), run_dir, log)
        header += " " + perplexity_line(report.perplexity)
    else:
        lake = lake_runs or config.eval.lake_runs
        data = load_run_data(config.data, config.eval.data_path)
        report = evaluate(config, run.encoder(), data.evaluation, lake, log)
    # Each evaluation gets its own folder: re-evaluating never overwrites an earlier report.
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    report.report_path = str(write_report(run_dir / "evaluations" / stamp, report, run.history, header))
    return report


def quickstart(overrides: list[str] | tuple[str, ...] = (), progress: bool = True, log: Log = lambda _: None) -> dict[str, Any]:
    """The demo: SimCLR without labels on digits {0, 1, 5, 8, 9} (the seeded class split of
    configs/quickstart.yaml) for ~2 CPU minutes, then 5-way 1- and 5-shot episodes on the unseen
    digits {2, 3, 4, 6, 7} for pixels, the random encoder and the pre-trained encoder."""
    config = load_config(find_recipe("quickstart"), overrides)
    log(f"pre-training {config.method.name} on {config.data.source} ({config.train.steps} steps) into {config.run_dir}")
    result = pretrain(config, progress=progress)
    data = load_run_data(config.data, config.eval.data_path)
    report = evaluate(config, Run.open(result.checkpoint).encoder(), data.evaluation, config.eval.lake_runs, log)
    header = f"Pre-trained {config.method.name} / {config.encoder.name} for {result.step} steps at {result.views_per_second:.0f} views/s."
    path = write_report(config.run_dir, report, result.history, header)
    out = report.to_json()
    out.update(report_path=str(path), steps=result.step, views_per_second=result.views_per_second)
    return out


def generate(
    path: str | Path,
    prompt: str = "",
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Continue ``prompt`` with a gpt run's model and tokenizer (see :func:`fewshot.generate.generate`);
    the same seed gives the same text."""
    run = Run.open(path)
    if run.config.method.name != "gpt":
        raise ConfigError(f"'{path}' is a {run.config.method.name} run; generation needs a gpt run")
    tokenizer = run.tokenizer()
    ids = encode(tokenizer, prompt)
    out = _generate(run.method().language_model(), ids, max_new_tokens, temperature, top_k, torch.Generator().manual_seed(seed), use_cache)
    return {
        "run_dir": str(run.path), "step": run.step, "prompt": prompt, "text": decode(tokenizer, out),
        "completion": decode(tokenizer, out[len(ids):]), "new_tokens": len(out) - len(ids),
        "temperature": temperature, "top_k": top_k, "seed": seed,
    }


def adapt(path: str | Path, method: str = "lora", options: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Adapt a base with a few labels: a run (image or text) or a Hugging Face model name
    (``all-minilm-l6-v2``), scored over episodes (``episodes=N``) or once on a labeled folder
    (``support=..., out=FILE`` saves the adapter); the options are the fields of
    :class:`fewshot.adapt.bases.AdaptConfig`; see :func:`fewshot.adapt.bases.adapt_base`."""
    from fewshot.adapt.bases import adapt_base

    return adapt_base(path, method, options, **kwargs)


def load_adapted(adapter: str | Path, path: str | Path) -> nn.Module:
    """The :class:`~fewshot.adapt.AdaptedClassifier` stored in ``adapter``, on base ``path`` (run, checkpoint or model name)."""
    from fewshot.adapt.bases import load_adapted as _load_adapted

    return _load_adapted(adapter, path)


def clip_scores(run_path: str | Path, manifest: str | Path, batch_size: int = 512) -> np.ndarray:
    """(R,) cosine of each manifest row's image and caption embeddings under an image–text run (LAION's CLIP
    score), with the run's own tokenizer, caption length and image size; each image is embedded once."""
    from fewshot.data.pairs import load_pairs

    run = Run.open(run_path)
    method = run.method().eval()
    if not (hasattr(method, "embed_images") and hasattr(method, "embed_texts")):
        raise ConfigError(f"'{run_path}' is a {run.config.method.name} run; CLIP scores need an image–text run (method=clip)")
    data = run.config.data
    tokenizer = getattr(method, "text_tokenizer", None) or run.tokenizer()  # MiniLM reads its own word pieces
    pairs = load_pairs(manifest, tokenizer, data.seq_len, data.image_size, data.channels)
    with torch.no_grad():
        images = torch.cat([method.embed_images(pairs.images[i : i + batch_size].float() / 255) for i in range(0, len(pairs.images), batch_size)])
        texts = torch.cat([method.embed_texts(pairs.tokens[i : i + batch_size]) for i in range(0, len(pairs), batch_size)])
    cosine = torch.nn.functional.cosine_similarity(images[pairs.image_index], texts, dim=1)
    return cosine.numpy()


def filter_pairs(manifest: str | Path, out: str | Path, options: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """``fewshot data filter``: the rules of :mod:`fewshot.data.filters` (``key=value`` options), and the clip_score
    rule when ``clip_run=RUN`` names an image–text run; writes the kept manifest and the dropped rows with reasons."""
    from fewshot.data.filters import filter_config, filter_manifest

    config = filter_config(list(options))
    if config.mode == "mmc4":
        return assign_documents(manifest, out, config.clip_run, config.floor)
    if config.mode == "capfilt":
        return capfilt(manifest, out, config.blip_run, config.match_threshold, config.top_p)
    scores = clip_scores(config.clip_run, manifest) if config.clip_run else None
    return filter_manifest(manifest, out, config, scores)


def capfilt(manifest: str | Path, out: str | Path, run_path: str | Path, threshold: float = 0.5, top_p: float = 0.9, seed: int = 0,
            batch_size: int = 500) -> dict[str, Any]:
    """``fewshot data filter MANIFEST mode=capfilt blip_run=RUN``: CapFilt (:mod:`fewshot.data.capfilt`) with a blip run as
    captioner and filter. One nucleus-sampled synthetic caption per image (``top_p``, seeded by ``seed``); web and
    synthetic captions with ITM p(match) < ``threshold`` dropped; writes the bootstrapped manifest (kept web rows, then
    kept synthetic ones; paths absolute when ``out`` is in another folder) and ``<stem>.dropped.tsv``; returns counts,
    the filter's precision / recall on the web rows' noise labels and, for a ``fewshot data scenes`` folder, on the
    synthetic captions against the scene graphs."""
    import csv

    from fewshot.data.capfilt import CAPFILT_RULE, SYNTHETIC_FALSE, SYNTHETIC_RULE, capfilt_result, synthetic_report
    from fewshot.data.filters import filter_report
    from fewshot.data.pairs import load_pairs, read_manifest, tokenize_captions, write_manifest
    from fewshot.data.scenes import SCENE_GRAPHS, caption_is_true, read_scenes
    from fewshot.errors import DataError
    from fewshot.io import atomic_write

    out = Path(out)
    dropped_path = out.with_name(out.stem + ".dropped.tsv")
    for target in (out, dropped_path):
        if target.exists():
            raise DataError(f"'{target}' already exists; the filter writes new files only")
    run = Run.open(run_path)
    method = run.method().eval()
    if not (hasattr(method, "caption_ids") and hasattr(method, "match_probability")):
        raise ConfigError(f"'{run_path}' is a {run.config.method.name} run; CapFilt needs a captioner and an ITM filter (method=blip)")
    data, tokenizer = run.config.data, run.tokenizer()
    rows = read_manifest(manifest)
    pairs = load_pairs(manifest, tokenizer, data.seq_len, data.image_size, data.channels)
    images = [f for f in dict.fromkeys(rows.filepaths)]  # load_pairs' image order: first appearance
    generator = torch.Generator().manual_seed(seed)
    web, synthetic, written = [], [], []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            index = pairs.image_index[i : i + batch_size]
            web.append(method.match_probability(pairs.images[index].float() / 255, pairs.tokens[i : i + batch_size]))
        for i in range(0, len(images), batch_size):
            batch = pairs.images[i : i + batch_size].float() / 255
            ids = method.caption_ids(batch, "nucleus", top_p=top_p, generator=generator)
            texts = [" ".join(tokenizer.decode(row).split()) or "." for row in ids]  # a caption is one line
            tokens, _ = tokenize_captions(tokenizer, texts, data.seq_len)
            synthetic.append(method.match_probability(batch, tokens))
            written += texts
    web_match, synthetic_match = torch.cat(web).numpy(), torch.cat(synthetic).numpy()
    result = capfilt_result(web_match, threshold)
    synthetic_kept = synthetic_match >= threshold
    folder = Path(manifest).parent
    scenes = read_scenes(folder) if (folder / SCENE_GRAPHS).is_file() else None
    truth = [caption_is_true(text, scenes[name]) for text, name in zip(written, images)] if scenes is not None else None
    labelled = any(rows.noise) or truth is not None
    same_folder = out.resolve().parent == folder.resolve()
    where = (lambda name: name) if same_folder else (lambda name: name if Path(name).is_absolute() else str((folder / name).resolve()))
    syn_noise = ["" if t else SYNTHETIC_FALSE for t in truth] if truth is not None else [""] * len(written)
    keep = result.kept
    kept_syn = [j for j in range(len(written)) if synthetic_kept[j]]
    if not keep and not kept_syn:
        raise DataError(f"the filter keeps none of the {len(rows)} web rows and {len(written)} synthetic captions at p(match) ≥ {threshold}; "
                        "lower match_threshold or train the blip run longer")
    write_manifest(out, [where(rows.filepaths[r]) for r in keep] + [where(images[j]) for j in kept_syn],
                   [rows.captions[r] for r in keep] + [written[j] for j in kept_syn],
                   ([rows.noise[r] for r in keep] + [syn_noise[j] for j in kept_syn]) if labelled else None)

    def write_dropped(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(["line", "filepath", "title", "reason", "p_match", "noise"])
            writer.writerows([rows.lines[r], rows.filepaths[r], rows.captions[r], CAPFILT_RULE, f"{web_match[r]:.4f}", rows.noise[r]]
                             for r in sorted(result.reasons))
            writer.writerows(["", images[j], written[j], SYNTHETIC_RULE, f"{synthetic_match[j]:.4f}", syn_noise[j]]
                             for j in range(len(written)) if not synthetic_kept[j])

    atomic_write(dropped_path, write_dropped)
    summary = {"manifest": str(manifest), "kept_manifest": str(out), "dropped_rows": str(dropped_path), "mode": "capfilt",
               "blip_run": str(run_path), "match_threshold": threshold, "top_p": top_p, "seed": seed, "rows": len(rows),
               "kept_web": len(keep), "kept": len(keep) + len(kept_syn),
               "synthetic": {"written": len(written), "kept": len(kept_syn), "examples": written[:5]}}
    if any(rows.noise):
        summary["report"] = filter_report(rows.noise, result)
    if truth is not None:
        summary["synthetic"].update(synthetic_report(truth, synthetic_kept))
    return summary


def document_similarities(documents: str | Path, docs: list[Any], run_path: str | Path) -> list[np.ndarray]:
    """Per document of ``docs`` (read from the file ``documents``), the cosine similarity (images × sentences) of its
    images and sentences under an image–text run: ⟨ẑ_i, t̂_j⟩ of the ℓ2-normalised image and text embeddings."""
    from fewshot.data.documents import read_document_images
    from fewshot.data.pairs import tokenize_captions

    run = Run.open(run_path)
    method = run.method().eval()
    if not (hasattr(method, "embed_images") and hasattr(method, "embed_texts")):
        raise ConfigError(f"'{run_path}' is a {run.config.method.name} run; the assignment needs an image–text run (method=clip)")
    data = run.config.data
    tokenizer = getattr(method, "text_tokenizer", None) or run.tokenizer()
    similarities = []
    with torch.no_grad():
        for doc in docs:
            images = torch.from_numpy(read_document_images(documents, doc, data.image_size, data.channels)).float() / 255
            tokens, _ = tokenize_captions(tokenizer, doc.sentences, data.seq_len)
            similarity = torch.nn.functional.normalize(method.embed_images(images), dim=1) @ \
                torch.nn.functional.normalize(method.embed_texts(tokens), dim=1).T
            similarities.append(similarity.float().numpy())
    return similarities


def assign_documents(documents: str | Path, out: str | Path, run_path: str | Path, floor: float = 0.15) -> dict[str, Any]:
    """``fewshot data filter DOCS.jsonl mode=mmc4 clip_run=RUN``: MMC4's assignment of each document's images to its
    sentences (:func:`fewshot.data.documents.assign_images`) by an image–text run's cosine similarity, with a floor;
    writes the assigned pairs as a manifest at ``out`` (noise ``mismatched`` where the document's truth says the
    image shows another sentence or none) and returns counts, and precision / recall when the documents carry truth."""
    from fewshot.data.documents import assign_images, assignment_report, read_documents
    from fewshot.data.pairs import write_manifest
    from fewshot.errors import DataError

    out = Path(out)
    if out.exists():
        raise DataError(f"'{out}' already exists; the filter writes new files only")
    docs = read_documents(documents)
    assignments, filepaths, captions, noise = [], [], [], []
    root = Path(documents).resolve().parent
    for doc, similarity in zip(docs, document_similarities(documents, docs, run_path)):
        pairs = assign_images(similarity, floor)
        assignments.append(pairs)
        for i, j in pairs:
            filepaths.append(str(root / doc.images[i]))
            captions.append(doc.sentences[j])
            noise.append("" if doc.truth[i] == j else "mismatched")
    labelled = any(t is not None for doc in docs for t in doc.truth)
    if not filepaths:
        raise DataError(f"the assignment keeps no pair of the {len(docs)} documents at floor {floor}; lower it")
    write_manifest(out, filepaths, captions, noise if labelled else None)
    summary = {"documents_file": str(documents), "kept_manifest": str(out), "mode": "mmc4", "floor": floor, "clip_run": str(run_path),
               "documents": len(docs), "pairs": len(filepaths)}
    if labelled:
        summary["report"] = assignment_report(docs, assignments)
    return summary


def zeroshot(path: str | Path, classes: list[str] | None = None, templates: list[str] | None = None, images: str | Path | None = None,
             per_class: int = 50, seed: int = 0, split_seed: int | None = None) -> dict[str, Any]:
    """``fewshot zeroshot``: an image–text run's zero-shot top-1 and mean per-class recall ± 95% CI, by default 64-way on
    the scenes' single-object test set, seen and held-out pairs apart; see :func:`fewshot.evaluate.image_text.zeroshot_run`."""
    from fewshot.evaluate.image_text import zeroshot_run

    return zeroshot_run(path, classes, templates, images, per_class, seed, split_seed)


def retrieve(path: str | Path, manifest: str | Path) -> dict[str, Any]:
    """``fewshot retrieve``: R@1/5/10 both ways and the median rank of an image–text run on a manifest, instance and (for
    a ``fewshot data scenes`` folder) semantic relevance; see :func:`fewshot.evaluate.image_text.retrieve_run`."""
    from fewshot.evaluate.image_text import retrieve_run

    return retrieve_run(path, manifest)


def caption(path: str | Path, n: int = 200, seed: int = 0, decoding: str = "greedy", beams: int = 5, top_p: float = 0.9,
            heldout: bool = False) -> dict[str, Any]:
    """``fewshot caption``: a captioning run's captions of ``n`` held-out scenes scored by BLEU-4, ROUGE-L, CIDEr-D, scene
    F1 and the verifier; see :func:`fewshot.evaluate.captions.caption_run`."""
    from fewshot.evaluate.captions import caption_run

    return caption_run(path, n, seed, decoding, beams, top_p, heldout=heldout)


def describe(path: str | Path, descriptors: Any = "smollm2", classes: list[str] | None = None, way: int = 5, episodes: int = 600,
             query: int = 15, per_class: int = 30, seed: int = 0, with_name: bool = True) -> dict[str, Any]:
    """``fewshot describe``: classification by description on nonce class names (name alone, the descriptors of
    ``descriptors``: smollm2, a gpt run or HF folder, a JSON table, a mapping or a callable; None for the rows without
    them; true descriptors, derangements, the real name) ± 95% CI; see :func:`fewshot.evaluate.descriptors.describe_run`."""
    from fewshot.evaluate.descriptors import describe_run

    return describe_run(path, descriptors, classes, way=way, episodes=episodes, query=query, per_class=per_class, seed=seed,
                        with_name=with_name)


__all__ = [
    "load_config", "pretrain", "evaluate_run", "open_run", "load_pretrained", "quickstart", "generate", "adapt", "load_adapted",
    "clip_scores", "filter_pairs", "zeroshot", "retrieve", "caption", "describe",
]
