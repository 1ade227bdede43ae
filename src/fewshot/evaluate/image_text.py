"""Zero-shot classification and image–text retrieval of an image–text run (``method=clip``).

The metrics are :mod:`fewshot.evaluate.zeroshot` and :mod:`fewshot.evaluate.retrieval`; this module only
opens the run, embeds with its own towers, tokenizer and caption length, and picks the test data:

* zero-shot, by default on the captioned scenes' single-object test set
  (:func:`fewshot.data.scenes.single_object_test`): the 64 "<colour> <shape>" pairs of the pre-training
  shapes, classified 64-way, the accuracy reported over all images and over the seen and the held-out
  pairs apart (the run's CoGenT split, read from ``scenes.json`` beside its manifest); or on a
  class-per-folder image folder.
* retrieval on a manifest (open_clip's layout): R@1/5/10 both ways and the median rank, with each
  caption's own image relevant (instance), and, when the manifest's folder holds the scene graphs that
  ``fewshot data scenes`` wrote, every image the caption is true of (semantic, by the scene verifier).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot.data.pairs import load_pairs, read_manifest, tokenize_captions
from fewshot.data.scenes import POOL_INFO, SCENE_GRAPHS, Scene, caption_is_true, read_scenes, single_object_test
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.retrieval import retrieval_rows
from fewshot.evaluate.zeroshot import prompts, text_prototypes, zero_shot_scores
from fewshot.run import Run

__all__ = ["DEFAULT_TEMPLATES", "ImageTextRun", "retrieve_run", "retrieval_table", "scene_relevance", "zeroshot_run", "zeroshot_table"]

# The caption grammar's own leads (data/scenes.py), so prompts read like the captions the run learned from.
DEFAULT_TEMPLATES = ("a {}", "a picture of a {}", "a photo of a {}", "there is a {}")


class ImageTextRun:
    """A run's method in eval mode with its tokenizer: ``images(x) -> (N, D)``, ``texts(list) -> (T, D)``."""

    def __init__(self, path: str | Path, batch_size: int = 512) -> None:
        run = Run.open(path)
        method = run.method().eval()
        if not (hasattr(method, "embed_images") and hasattr(method, "embed_texts")):
            raise ConfigError(f"'{path}' is a {run.config.method.name} run, which has no text tower; zero-shot and "
                              "retrieval need an image–text run (method=clip)")
        # a pre-trained text tower (MiniLM) reads its own word pieces; the text-transformer the run's BPE ids
        tokenizer = getattr(method, "text_tokenizer", None) or run.tokenizer()
        self.run, self.method, self.tokenizer, self.batch_size = run, method, tokenizer, batch_size
        self.truncated = 0  # texts cut at data.seq_len tokens, counted and reported

    @torch.no_grad()
    def images(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(N, embed_dim) embeddings of (N, C, H, W) images, uint8 or float in [0, 1]."""
        x = torch.as_tensor(images)
        out = []
        for i in range(0, len(x), self.batch_size):
            chunk = x[i : i + self.batch_size]
            out.append(self.method.embed_images(chunk.float() / 255 if chunk.dtype == torch.uint8 else chunk.float()))
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(T, embed_dim) embeddings of texts tokenized as the run's captions (cut texts counted in ``truncated``)."""
        tokens, cut = tokenize_captions(self.tokenizer, list(texts), self.run.config.data.seq_len)
        self.truncated += cut
        return torch.cat([self.method.embed_texts(tokens[i : i + self.batch_size]) for i in range(0, len(tokens), self.batch_size)])

    def report_truncated(self, what: str) -> None:
        if self.truncated:
            logging.getLogger("fewshot").warning(f"fewshot: {self.truncated} {what} are longer than the run's "
                                                 f"data.seq_len={self.run.config.data.seq_len} tokens and were cut")


def _split_seed(run: Run) -> int:
    """The CoGenT split seed of the scenes pool the run trained on (``scenes.json`` beside its manifest), else 0."""
    info = Path(str(run.config.data.path or "")).parent / POOL_INFO
    try:
        return int(json.loads(info.read_text())["split_seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def zeroshot_run(
    path: str | Path, classes: Sequence[str] | None = None, templates: Sequence[str] | None = None, images: str | Path | None = None,
    per_class: int = 50, seed: int = 0, split_seed: int | None = None, batch_size: int = 512,
) -> dict[str, Any]:
    """Zero-shot top-1 and mean per-class recall (± 95% CI) of an image–text run.

    ``images`` None: the scenes' single-object test set, ``per_class`` images of each pair drawn with ``seed``;
    ``classes`` picks some of its 64 "<colour> <shape>" names (all by default) and rows come for all images and
    for the "seen" and "held-out" pairs apart (``split_seed``: the run's pool's, else 0). ``images`` a folder:
    class-per-folder images, ``classes`` their names in the folder's class order (default: the folder names).
    Returns ``{"run_dir", "step", "classes", "templates", "chance", "truncated_prompts", "results": [rows]}``;
    a row is ``{"encoder": "pretrained", "classifier": "zero-shot", "pairs", "way", "shot": 0, "accuracy",
    "ci95", "mean_recall", "mean_recall_ci95", "images", "classes"}`` (fractions).
    """
    if per_class < 1:
        raise ConfigError(f"zero-shot needs at least 1 test image per class, got per_class={per_class}")
    model = ImageTextRun(path, batch_size)
    templates = list(templates or DEFAULT_TEMPLATES)
    data = model.run.config.data
    if images is None:
        if data.channels != 3:
            raise ConfigError(f"the scenes test set is RGB, but '{path}' reads {data.channels}-channel images: pass a folder of images")
        split = _split_seed(model.run) if split_seed is None else split_seed
        test = single_object_test(per_class, data.image_size, seed, split)
        names = list(test.classes)
        if classes is not None:
            prompts(classes, templates)  # one-line errors for repeated names and templates first
            unknown = [c for c in classes if c not in names]
            if unknown:
                raise ConfigError(f"unknown scene class(es) {', '.join(map(repr, unknown))}; the classes are '<colour> <shape>' "
                                  f"pairs of the pre-training shapes, e.g. {', '.join(names[:3])}")
            keep = [names.index(c) for c in classes]
            mask = np.isin(test.labels, keep)
            relabel = {old: new for new, old in enumerate(keep)}
            pixels = test.images[mask]
            labels = np.array([relabel[int(y)] for y in test.labels[mask]])
            groups = [test.groups[k] for k in keep]
            names = list(classes)
        else:
            pixels, labels, groups = test.images, test.labels, list(test.groups)
    else:
        from fewshot.data.sources import load_image_folder

        folder = load_image_folder(images, data.image_size, data.channels)
        names = list(folder.classes) if classes is None else list(classes)
        if len(names) != len(folder.classes):
            raise ConfigError(f"{len(names)} class names for the {len(folder.classes)} class folders of '{images}' ({', '.join(folder.classes)})")
        pixels, labels, groups = folder.images, folder.labels.numpy(), []
    prototypes = text_prototypes(model.texts, names, templates)
    model.report_truncated("prompts")
    embedded = model.images(pixels)
    rows = []
    for group in ["all", *sorted(set(groups), key=lambda g: g != "seen")]:
        chosen = np.ones(len(labels), bool) if group == "all" else np.isin(labels, [c for c, g in enumerate(groups) if g == group])
        scores = zero_shot_scores(embedded[torch.from_numpy(chosen)], labels[chosen], prototypes)
        rows.append({"encoder": "pretrained", "classifier": "zero-shot", "pairs": group, "way": len(names), "shot": 0, **scores})
    return {"run_dir": str(model.run.path), "step": model.run.step, "classes": names, "templates": templates,
            "chance": 1 / len(names), "truncated_prompts": model.truncated, "results": rows}


def scene_relevance(captions: Sequence[str], scenes: Sequence[Scene]) -> torch.Tensor:
    """(T, I) bool: caption t is true of scene i (:func:`fewshot.data.scenes.caption_is_true`), each distinct caption once."""
    unique = list(dict.fromkeys(captions))
    table = torch.tensor([[caption_is_true(c, s) for s in scenes] for c in unique], dtype=torch.bool).reshape(len(unique), len(scenes))
    index = {c: i for i, c in enumerate(unique)}
    return table[torch.tensor([index[c] for c in captions], dtype=torch.long)]


def retrieval_results(
    embed: ImageTextRun, images: torch.Tensor | np.ndarray, caption_image: Sequence[int] | torch.Tensor, captions: Sequence[str],
    scenes: Sequence[Scene] | None = None,
) -> list[dict[str, Any]]:
    """Instance rows, and semantic rows when each image's scene graph is given: relevant to a caption are the images
    it is true of and its own image (so a noisy caption, true of none, still has one to find)."""
    image_embeddings, text_embeddings = embed.images(images), embed.texts(captions)
    rows = retrieval_rows(image_embeddings, text_embeddings, caption_image=torch.as_tensor(caption_image))
    if scenes is not None:
        relevance = scene_relevance(captions, scenes)
        # the instance image is relevant too (a noisy caption is false of it, yet it is the caption's image)
        relevance[torch.arange(len(captions)), torch.as_tensor(caption_image)] = True
        rows += retrieval_rows(image_embeddings, text_embeddings, relevance=relevance)
    return rows


def retrieve_run(path: str | Path, manifest: str | Path, batch_size: int = 512) -> dict[str, Any]:
    """R@1/5/10 both ways and the median rank of an image–text run on a manifest (open_clip's layout), with the
    run's tokenizer, caption length and image size; semantic rows too when the manifest's folder holds the scene
    graphs of ``fewshot data scenes``. Returns ``{"run_dir", "step", "manifest", "images", "captions",
    "truncated_captions", "results": [rows of retrieval_rows]}``."""
    embed = ImageTextRun(path, batch_size)
    data = embed.run.config.data
    pairs = load_pairs(manifest, embed.tokenizer, data.seq_len, data.image_size, data.channels)
    scenes = None
    if (Path(manifest).parent / SCENE_GRAPHS).is_file():
        graphs = read_scenes(Path(manifest).parent)
        files = list(dict.fromkeys(read_manifest(manifest).filepaths))  # load_pairs's image order
        missing = [f for f in files if f not in graphs]
        if missing:
            raise DataError(f"{Path(manifest).parent / SCENE_GRAPHS} has no scene graph for image '{missing[0]}' of {manifest}")
        scenes = [graphs[f] for f in files]
    rows = retrieval_results(embed, pairs.images, pairs.image_index, pairs.captions, scenes)
    embed.report_truncated("captions")
    return {"run_dir": str(embed.run.path), "step": embed.run.step, "manifest": str(manifest), "images": len(pairs.images),
            "captions": len(pairs), "truncated_captions": embed.truncated, "results": rows}


def zeroshot_table(out: dict[str, Any]) -> str:
    lines = [f"Zero-shot {out['results'][0]['way']}-way accuracy (% ± 95% CI; chance {100 * out['chance']:.1f}%), "
             f"{len(out['templates'])} prompt templates:", "pairs      images  top-1          mean recall"]
    for r in out["results"]:
        lines.append(f"{r['pairs']:<10} {r['images']:>6}  {100 * r['accuracy']:5.1f} ± {100 * r['ci95']:4.1f}   "
                     f"{100 * r['mean_recall']:5.1f} ± {100 * r['mean_recall_ci95']:4.1f}")
    return "\n".join(lines)


def retrieval_table(out: dict[str, Any]) -> str:
    lines = [f"Retrieval on {out['images']} images and {out['captions']} captions (R@K %, ties against the model):",
             "relevance  direction      R@1    R@5    R@10   median rank"]
    for r in out["results"]:
        lines.append(f"{r['relevance']:<10} {r['direction']:<14} {100 * r['R@1']:5.1f}  {100 * r['R@5']:5.1f}  "
                     f"{100 * r['R@10']:5.1f}  {r['median_rank']:g}")
    return "\n".join(lines)

