"""How much of a Frozen run's prefix tells images apart (issue 17's diagnostic): on the evaluation's one-object images
(``category_images``, 12 per class), the prefixes' median norm beside the LM's token embeddings', and the mean cosine
between prefixes of the same class and of different classes, raw and with the mean prefix removed. A prefix whose
classes separate only after centring carries the tower's information as a ripple on one shared direction. For a run
with ``method.vocab_prefix`` (or ``method.prefix_codes``) it also names, per class and prefix position, the token of highest weight and its share of
the class's images, and how many distinct tokens the images use (1: collapsed onto one token for every image).

    OMP_NUM_THREADS=2 python bench/vl_prefix_spread.py runs/vl18/frozen-ep6-250     # seconds; one JSON line
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from fewshot.data.vl_prompts import category_images
from fewshot.models.prefix_lm import vocabulary_weights
from fewshot.run import Run


def mean_cosines(vectors: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cosine over pairs of distinct rows of one class, and over pairs of different classes."""
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    cos = unit @ unit.T
    same = labels[:, None] == labels[None]
    distinct = ~torch.eye(len(labels), dtype=torch.bool)
    return float(cos[same & distinct].mean()), float(cos[~same].mean())


def prefix_tokens(method, images: torch.Tensor, labels, class_names: list[str]) -> dict:
    """For a ``method.vocab_prefix`` or ``method.prefix_codes`` run: per class, each prefix position's most common token
    or code (the one of highest weight, which a hard prefix is) and its share of the class's images; the distinct tokens
    used per position; the mean highest weight (1: every prefix is one token; soft prefixes are mixtures)."""
    with torch.no_grad():
        if getattr(method, "prefix_codes", 0):
            weights = method.code_logits(images).softmax(-1)
            ids, name = weights.argmax(-1), lambda t: f"code {t}"
        else:
            allowed, rows = method.vocab_rows()
            weights = vocabulary_weights(method.prefix_queries(images), rows, method.vocab_temperature)
            ids, name = allowed[weights.argmax(-1)], lambda t: method.language_model.decode([t])
    out = {"distinct": [len(set(ids[:, j].tolist())) for j in range(ids.shape[1])], "top_weight": float(weights.max(-1).values.mean()),
           "classes": {}}
    for c, class_name in enumerate(class_names):
        chosen = ids[torch.as_tensor(labels == c)]
        common = [collections.Counter(chosen[:, j].tolist()).most_common(1)[0] for j in range(ids.shape[1])]
        out["classes"][class_name] = [[name(t), n / len(chosen)] for t, n in common]
    print(f"  tokens per position {out['distinct']}, mean top weight {out['top_weight']:.2f}; per class (token share):",
          ", ".join(f"{cls} " + " ".join(f"{t!r} {share:.2f}" for t, share in tokens) for cls, tokens in out["classes"].items()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a frozen run folder")
    p.add_argument("--categories", nargs="+", default=["shapes", "colours"])
    p.add_argument("--per-class", type=int, default=12)
    args = p.parse_args()
    method = Run.open(args.run).method().eval()
    link = method.language_model
    with torch.no_grad():
        tokens = link.embed(torch.arange(min(2000, link.vocab_size))[None])[0]
    out = {"run": args.run, "token_norm_median": float(tokens.norm(dim=-1).median())}
    for category in args.categories:
        data = category_images(category, args.per_class)
        with torch.no_grad():
            per_token = method.prefix(data.images)
        prefixes = per_token.flatten(1)
        labels = torch.as_tensor(data.labels)
        same, different = mean_cosines(prefixes, labels)
        centred_same, centred_different = mean_cosines(prefixes - prefixes.mean(0), labels)
        out[category] = {"prefix_norm_median": float(per_token.norm(dim=-1).median()), "cos_same": same, "cos_different": different,
                         "centred_cos_same": centred_same, "centred_cos_different": centred_different}
        if getattr(method, "vocab_prefix", "off") != "off" or getattr(method, "prefix_codes", 0):
            out[category]["tokens"] = prefix_tokens(method, data.images, data.labels, data.class_names)
        print(f"{category}: prefix norm {out[category]['prefix_norm_median']:.1f} (tokens {out['token_norm_median']:.1f}); cosine same {same:.2f}, "
              f"different {different:.2f}; centred same {centred_same:.2f}, different {centred_different:.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
