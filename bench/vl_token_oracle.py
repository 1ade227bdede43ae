"""What a prefix made of words could reach (issue 17's ceiling for ``method.vocab_prefix``): the protocol's 2-way nonce
episodes with task induction, each image's prefix replaced by two token embeddings of the frozen LM chosen from the
image's own description, no encoder at all. Rows:

- ``words``: the description's colour and shape words ("red circle"): the image read as the words that describe it;
- ``consistent codes``: two arbitrary tokens, one fixed per colour and one per shape (a code with no meaning that is
  the same for every image of a colour, and of a shape): what a discrete prefix needs, consistency, without words;
- ``random codes`` (the control): two arbitrary tokens drawn afresh for every image, consistent with nothing;
- ``blank``: the test-blind prefix of a zero image is not defined here, so the row is the LM on all-zero prefixes;
- ``tower clusters`` (with ``--image-run``): no description at all — k-means (k = the category's classes) on an image
  tower's features of the category's images, labels unused; each cluster an arbitrary token after one fixed token:
  how far a code the tower alone would give, before any training through the LM, could carry the naming.

    OMP_NUM_THREADS=2 python bench/vl_token_oracle.py runs/vlctx/smollm2-answers-160 --episodes 100   # ≈ 11 CPU-minutes
    … --image-run runs/bench-vl/clip-20000-1000 --kinds                                      # the tower-clusters row only
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from fewshot import api
from fewshot.data.vl_prompts import category_images
from fewshot.evaluate.vl_in_context import PrefixInContext, Setting, evaluate_open_ended
from fewshot.models.prefix_lm import open_prefix_lm


def colour_and_shape(description: str) -> tuple[str, str]:
    """("red", "circle") of "a small red circle."."""
    words = description.rstrip(".").split()
    return words[-2], words[-1]


def cluster_codes(features: torch.Tensor, clusters: int, seed: int = 0) -> list[int]:
    """k-means (scikit-learn, 10 starts) cluster of each row of ``features`` on unit length: the tower's own grouping."""
    from sklearn.cluster import KMeans

    unit = torch.nn.functional.normalize(features.float(), dim=-1).numpy()
    return KMeans(clusters, n_init=10, random_state=seed).fit_predict(unit).tolist()


def purity_of(clusters: list[int], labels: list[int]) -> float:
    """Share of items whose class is their cluster's commonest class (labels used only to report this)."""
    from collections import Counter

    return sum(Counter(l for c2, l in zip(clusters, labels) if c2 == c).most_common(1)[0][1] for c in set(clusters)) / len(labels)


def cluster_prefixes(link, clusters: list[int], seed: int = 0) -> torch.Tensor:
    """(N, 2, D): a fixed token, then one arbitrary token per cluster."""
    pool = np.random.default_rng(seed).choice(np.arange(1000, link.vocab_size - 1000), size=max(clusters) + 2, replace=False)
    with torch.no_grad():
        return link.embed(torch.tensor([[int(pool[-1]), int(pool[c])] for c in clusters]))


def token_prefixes(link, descriptions: list[str], kind: str, seed: int = 0) -> torch.Tensor:
    """(N, 2, D): per image, the two token embeddings ``kind`` chooses (``words``, ``consistent``, ``random``, ``zeros``)."""
    rng = np.random.default_rng(seed)
    pairs = [colour_and_shape(d) for d in descriptions]
    if kind == "zeros":
        return torch.zeros(len(pairs), 2, link.dim)
    if kind == "words":
        ids = [[link.tokenizer.encode(" " + w, add_special_tokens=False).ids for w in pair] for pair in pairs]
        if any(len(t) != 1 for pair in ids for t in pair):
            raise SystemExit("a colour or shape word is more than one token of this LM; the words row needs one token each")
        ids = [[t[0] for t in pair] for pair in ids]
    else:
        pool = rng.choice(np.arange(1000, link.vocab_size - 1000), size=64, replace=False)  # ordinary ids, no special tokens
        values = sorted({v for pair in pairs for v in pair})
        code = {v: int(pool[i]) for i, v in enumerate(values)}
        ids = [[code[c], code[s]] if kind == "consistent" else [int(t) for t in rng.choice(pool, 2)] for c, s in pairs]
    with torch.no_grad():
        return link.embed(torch.tensor(ids))


def lookup(images: torch.Tensor, table: torch.Tensor):
    """A prefix function giving each image of ``images`` (found by its pixels) its row of ``table``."""
    flat = images.flatten(1)

    def prefix(shown: torch.Tensor) -> torch.Tensor:
        return torch.stack([table[int((flat == x.flatten()).all(1).nonzero()[0])] for x in shown])
    return prefix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lm", help="the frozen LM: smollm2, a Hugging Face causal LM folder or a fewshot gpt run")
    p.add_argument("--categories", nargs="+", default=["shapes", "colours"])
    p.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--image-run", help="a run whose image tower's k-means clusters give the tower-clusters row")
    p.add_argument("--kinds", nargs="*", default=["words", "consistent", "random", "zeros"])
    args = p.parse_args()
    link = open_prefix_lm(args.lm)
    encoder = api.open_run(args.image_run).encoder().eval() if args.image_run else None
    out = {"lm": args.lm, "episodes": args.episodes}
    for category in args.categories:
        data = category_images(category, 12, 32, 0)
        kinds = [*args.kinds, *(["tower clusters"] if encoder is not None else [])]
        for kind in kinds:
            if kind == "tower clusters":
                with torch.no_grad():
                    clusters = cluster_codes(encoder(data.images), len(data.class_names))
                table = cluster_prefixes(link, clusters)
                purity = purity_of(clusters, data.labels.tolist())
                out[f"{category} cluster purity"] = purity
                print(f"{category:8s} tower clusters: purity {100 * purity:.1f}% (share of images in their cluster's commonest class)")
            else:
                table = token_prefixes(link, data.descriptions, kind)
            model = PrefixInContext(link, lookup(data.images, table), kind)
            cells = evaluate_open_ended(model, data, [Setting(2, shots, 0, True) for shots in args.shots], args.episodes)
            for shots, cell in zip(args.shots, cells.values()):
                out[f"{category} {kind} {shots}"] = {"accuracy": cell["accuracy"], "ci95": cell["ci95"]}
                print(f"{category:8s} {kind:11s} {shots} shot(s) {cell['accuracy']:5.1f} ± {cell['ci95']:4.1f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
