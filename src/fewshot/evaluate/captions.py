"""Caption metrics: BLEU-4, ROUGE-L and CIDEr-D (pycocoevalcap's pure-Python scorers), scene F1 and the verifier.

* **BLEU-4** (Papineni et al. 2002), corpus level: clipped n-gram precisions p_1..p_4 summed over the images,
  BP = exp(1 − r/c) when the candidates' length c is below r (each candidate's closest reference length, ties
  to the shorter); BLEU-4 = BP · (Π p_n)^{1/4}. pycocoevalcap's ``Bleu(4)``.
* **ROUGE-L** (Lin 2004) per image: P and R = LCS / candidate length and / reference length, each maximised over
  the references; F = (1 + β²) P R / (R + β² P), β = 1.2; the mean over images. pycocoevalcap's ``Rouge``.
* **CIDEr-D** (Vedantam et al. 2015) per image: TF-IDF vectors g_n of 1..4-grams (idf = log(N / df), df over
  the N images' reference sets), 10/m Σ_j exp(−(l_c − l_j)²/2σ²) Σ min(g_n(c), g_n(s_j)) g_n(s_j) / (‖g_n(c)‖ ‖g_n(s_j)‖),
  σ = 6, averaged over n; the mean over images. pycocoevalcap's ``Cider``.
  Text is pre-tokenised here (:func:`pretokenize`: lower case, words only), since PTBTokenizer, METEOR and
  SPICE need Java.
* **Scene F1**: the tuples a caption states (:func:`caption_tuples`, from the scene grammar's own parser,
  :func:`fewshot.data.scenes.parse_caption`) against those of the scene graph (:func:`scene_tuples`): every
  object's shape, colour and size, and its (shape, colour) and (shape, size) bindings. F1 = 2PR/(P + R), 0 for
  a caption that states none or is outside the grammar. A full ground-truth description scores 1; a caption
  of another scene with nothing in common scores 0. Relations and counts are not tuples here: whether they
  hold is what the verifier's share checks.
* **Share true**: the share of captions :func:`fewshot.data.scenes.caption_is_true` accepts.

:func:`caption_run` captions held-out scenes with a run (``fewshot caption``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewshot.data.scenes import (
    Scene, caption_is_true, captions_for, heldout_pairs, parse_caption, render, sample_scenes, seen_pairs,
)
from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.runner import mean_ci95

__all__ = ["CaptionTest", "caption_metrics", "caption_run", "caption_scores", "caption_table", "caption_test",
           "caption_tuples", "pretokenize", "scene_f1", "scene_tuples"]

_WORDS = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def pretokenize(text: str) -> str:
    """Lower-cased words (hyphenated words kept whole) joined by single spaces; punctuation dropped, as PTBTokenizer."""
    return " ".join(_WORDS.findall(text.lower()))


def _scorers() -> Any:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as error:
        raise ConfigError(f"caption metrics need pycocoevalcap ({error}); install it with `pip install pycocoevalcap`") from None
    return Bleu, Rouge, Cider


def caption_scores(references: Sequence[Sequence[str]], candidates: Sequence[str]) -> dict[str, Any]:
    """BLEU-4 (corpus), ROUGE-L and CIDEr-D (means, with per-image arrays) of one candidate per image against
    its references, all pre-tokenised by :func:`pretokenize`. CIDEr-D's idf needs at least two images."""
    if len(references) != len(candidates) or not candidates:
        raise DataError(f"caption metrics need one candidate per image: {len(candidates)} candidates for {len(references)} images")
    if any(not refs for refs in references):
        raise DataError("every image needs at least one reference caption")
    Bleu, Rouge, Cider = _scorers()
    gts = {i: [pretokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [pretokenize(c)] for i, c in enumerate(candidates)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider_d": float(cider),
            "rouge_l_each": np.asarray(rouge_each, dtype=np.float64), "cider_d_each": np.asarray(cider_each, dtype=np.float64)}


# ----------------------------------------------------------------------------------------- scene F1


def scene_tuples(scene: Scene) -> set[tuple[str, ...]]:
    """The scene graph's tuples: each object's ("shape", s), ("colour", c), ("size", z), ("shape-colour", s, c), ("shape-size", s, z)."""
    out: set[tuple[str, ...]] = set()
    for o in scene.objects:
        out |= {("shape", o.shape), ("colour", o.colour), ("size", o.size), ("shape-colour", o.shape, o.colour), ("shape-size", o.shape, o.size)}
    return out


def caption_tuples(caption: str) -> set[tuple[str, ...]] | None:
    """The tuples a caption's noun phrases state (as :func:`scene_tuples`, a binding only where the phrase names its
    shape), or None when the caption is outside the scene grammar."""
    parse = parse_caption(caption)
    if parse is None:
        return None
    out: set[tuple[str, ...]] = set()
    for size, colour, shape in parse.phrases:
        out |= {(kind, v) for kind, v in (("shape", shape), ("colour", colour), ("size", size)) if v}
        if shape and colour:
            out.add(("shape-colour", shape, colour))
        if shape and size:
            out.add(("shape-size", shape, size))
    return out


def scene_f1(caption: str, scene: Scene) -> float:
    """F1 = 2PR/(P + R) of the caption's tuples C against the scene's S: P = |C ∩ S| / |C|, R = |C ∩ S| / |S|;
    0 when C is empty, outside the grammar, or shares nothing with S."""
    stated, truth = caption_tuples(caption), scene_tuples(scene)
    hits = len(stated & truth) if stated else 0
    if hits == 0:
        return 0.0
    p, r = hits / len(stated), hits / len(truth)
    return 2 * p * r / (p + r)


def caption_metrics(candidates: Sequence[str], scenes: Sequence[Scene], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Every metric of generated captions (one per scene): BLEU-4, ROUGE-L ± CI, CIDEr-D ± CI, scene F1 ± CI and the
    share the verifier calls true ± CI (95% CIs over the images)."""
    if len(scenes) != len(candidates):
        raise DataError(f"{len(candidates)} captions for {len(scenes)} scenes")
    scores = caption_scores(references, candidates)
    f1 = [scene_f1(c, s) for c, s in zip(candidates, scenes)]
    true = [float(caption_is_true(c, s)) for c, s in zip(candidates, scenes)]
    out: dict[str, Any] = {"images": len(candidates), "bleu4": scores["bleu4"]}
    for name, values in (("rouge_l", scores["rouge_l_each"]), ("cider_d", scores["cider_d_each"]), ("scene_f1", f1), ("share_true", true)):
        out[name], out[f"{name}_ci95"] = mean_ci95(values)
    return out


# ----------------------------------------------------------------------------------------- held-out scenes


@dataclass
class CaptionTest:
    """Held-out scenes: their graphs, images (N, 3, S, S) uint8 and reference captions (3–5 each)."""

    scenes: list[Scene]
    images: np.ndarray
    references: list[list[str]]


def caption_test(n: int, size: int = 32, seed: int = 0, split_seed: int = 0, objects: tuple[int, int] = (1, 2),
                 heldout: bool = False) -> CaptionTest:
    """``n`` fresh scenes of ``objects`` objects from the seen (shape, colour) pairs of ``split_seed``'s CoGenT
    split (``heldout``: from the held-out pairs), with their captions; drawn from a stream of their own
    (``[seed, 30]``), apart from any pool's."""
    if n < 2:
        raise DataError(f"captioning is scored on at least 2 scenes (CIDEr-D's idf), got {n}")
    pairs = heldout_pairs(split_seed)
    rng = np.random.default_rng([seed, 30 + int(heldout)])
    scenes = sample_scenes(rng, n, objects, sorted(pairs) if heldout else seen_pairs(pairs))
    return CaptionTest(scenes, render(scenes, size), [captions_for(s, rng) for s in scenes])


def caption_run(path: str | Path, n: int = 200, seed: int = 0, decoding: str = "greedy", beams: int = 5, top_p: float = 0.9,
                objects: tuple[int, int] = (1, 2), heldout: bool = False, batch_size: int = 100) -> dict[str, Any]:
    """Caption ``n`` held-out scenes (:func:`caption_test`) with the run at ``path`` and score them
    (:func:`caption_metrics`); with a few examples. Refuses a run whose method has no caption decoder."""
    from fewshot.evaluate.image_text import _split_seed
    from fewshot.run import Run

    run = Run.open(path)
    method = run.method().eval()
    if not hasattr(method, "caption_images") and not hasattr(method, "caption_ids"):
        raise ConfigError(f"'{path}' is a {run.config.method.name} run, which has no caption decoder to generate with; "
                          "captioning needs a run that generates text from images (method=clipcap, coca, blip)")
    data = run.config.data
    if data.channels != 3:
        raise ConfigError(f"the scenes are RGB, but '{path}' reads {data.channels}-channel images")
    split = _split_seed(run)
    test = caption_test(n, data.image_size, seed, split, objects, heldout)
    images = torch.from_numpy(test.images).float() / 255
    generator = torch.Generator().manual_seed(seed)
    captions: list[str] = []
    for i in range(0, n, batch_size):
        if hasattr(method, "caption_images"):
            captions += method.caption_images(images[i : i + batch_size], decoding, beams=beams, top_p=top_p, generator=generator)
        else:  # a captioner of the run's own BPE ids (CoCa, BLIP): decoded with the run's tokenizer
            ids = method.caption_ids(images[i : i + batch_size], decoding, top_p=top_p, generator=generator)
            captions += [run.tokenizer().decode(row).strip() for row in ids]
    out = caption_metrics(captions, test.scenes, test.references)
    out.update({"run_dir": str(run.path), "step": run.step, "decoding": decoding, "seed": seed, "split_seed": split,
                "pairs": "held-out" if heldout else "seen",
                "examples": [{"caption": c, "references": r} for c, r in zip(captions[:5], test.references[:5])]})
    return out


def caption_table(out: dict[str, Any]) -> str:
    """The metrics as text lines (CIs as ± half-widths)."""
    lines = [f"{out['images']} held-out scenes ({out['pairs']} pairs), {out['decoding']} decoding, step {out['step']}:",
             f"  BLEU-4 {out['bleu4']:.3f}   ROUGE-L {out['rouge_l']:.3f} ± {out['rouge_l_ci95']:.3f}   "
             f"CIDEr-D {out['cider_d']:.3f} ± {out['cider_d_ci95']:.3f}",
             f"  scene F1 {out['scene_f1']:.3f} ± {out['scene_f1_ci95']:.3f}   true {100 * out['share_true']:.1f}% ± {100 * out['share_true_ci95']:.1f}"]
    lines += [f"  {e['caption']!r}  (e.g. {e['references'][0]!r})" for e in out["examples"]]
    return "\n".join(lines)
