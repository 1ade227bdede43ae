"""Does the frozen LM key its copy on the image prefix at all? (issue 17's diagnostic.) The protocol's 2-way nonce
episodes with task induction, scored twice: as the protocol draws them (the query a fresh image of its class) and with
the query replaced by the very support image of its class (identical prefixes). A model whose LM matches prefixes names
the identical query above blank images even when it cannot match two different images of one class.

    OMP_NUM_THREADS=2 python bench/vl_same_image.py runs/vl18/frozen-ep6-std-250 --episodes 60   # ≈ 2.5 CPU-minutes
"""

from __future__ import annotations

import argparse
import json

import torch

from fewshot.data.vl_prompts import category_images, open_ended_episode
from fewshot.evaluate.runner import mean_ci95
from fewshot.evaluate.vl_in_context import BlankImages, answer_matches, open_in_context_model


def same_image_query(images: tuple[int, ...], labels) -> list[int]:
    """The episode's image indices with the query (last) replaced by the first support image of its class."""
    shown = list(images)
    shown[-1] = next(j for j in shown[:-1] if labels[j] == labels[shown[-1]])
    return shown


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a frozen / flamingo run folder")
    p.add_argument("--categories", nargs="+", default=["shapes", "colours"])
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--episodes", type=int, default=60)
    args = p.parse_args()
    model = open_in_context_model(args.run)
    out = {"run": args.run, "shots": args.shots, "episodes": args.episodes}
    for category in args.categories:
        data = category_images(category, 12, model.image_size, 0)
        for query in ("fresh", "same"):
            for row, m in (("model", model), ("test-blind", BlankImages(model))):
                hits = []
                for i in range(args.episodes):
                    e = open_ended_episode(data.labels, data.class_names, 2, args.shots, 0, True, True, 0, i)
                    shown = same_image_query(e.images, data.labels) if query == "same" else list(e.images)
                    hits.append(float(answer_matches(m.next_text([data.images[j] for j in shown], e.pieces, 6), e.answer)))
                mean, ci = mean_ci95(hits)
                out[f"{category} {query} {row}"] = {"accuracy": 100 * mean, "ci95": 100 * ci}
                print(f"{category:8s} query {query:5s} {row:10s} {100 * mean:5.1f} ± {100 * ci:4.1f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
