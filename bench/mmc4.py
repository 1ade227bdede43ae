"""MMC4's assignment on generated documents (issue 16, item 6): precision and recall of images placed at sentences.

``--docs`` documents (`fewshot data documents`: 3-6 sentences, each the longest caption of one scene; the images of a
random non-empty subset of those scenes plus one unrelated scene's image, shuffled) are assigned as by
``fewshot data filter mode=mmc4`` (:func:`fewshot.api.document_similarities`, then the assignment) under a trained
CLIP run (``--clip-run``) at each floor of ``--floors``: precision (assigned pairs that are the image's own sentence),
recall (images with a sentence placed at it) and the share of unrelated images left out, each ± 95% CI over documents
(:func:`fewshot.evaluate.runner.mean_ci95` of per-document shares). Beside it, the greedy baseline (each image to its
most similar sentence, not one-to-one) at the same floors.

    OMP_NUM_THREADS=1 python bench/mmc4.py --clip-run runs/bench-vl/clip-20000-1000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from fewshot import api
from fewshot.data.documents import assign_images, make_documents, read_documents
from fewshot.evaluate.runner import mean_ci95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip-run", default="runs/bench-vl/clip-20000-1000", help="a trained clip-scenes run (its similarities)")
    parser.add_argument("--out", default="runs/capfilt/mmc4", help="folder for the documents (reused)")
    parser.add_argument("--docs", type=int, default=300, help="documents")
    parser.add_argument("--seed", type=int, default=3, help="document seed (another scene stream than the CLIP run's pool)")
    parser.add_argument("--floors", default="0,0.15,0.28,0.4,0.5", help="comma-separated similarity floors")
    args = parser.parse_args()
    start, cpu = time.time(), time.process_time()
    folder = Path(args.out) / f"docs-{args.docs}-seed{args.seed}"
    file = folder / "documents.jsonl"
    if not file.is_file():
        make_documents(folder, args.docs, 32, args.seed)
    docs = read_documents(file)
    similarities = api.document_similarities(file, docs, args.clip_run)
    own = [s[i, t] for s, d in zip(similarities, docs) for i, t in enumerate(d.truth) if t is not None]
    other = [s[i, j] for s, d in zip(similarities, docs) for i, t in enumerate(d.truth) for j in range(s.shape[1]) if t is not None and j != t]
    unrelated = [s[i].max() for s, d in zip(similarities, docs) for i, t in enumerate(d.truth) if t is None]
    print(f"{len(docs)} documents, {sum(len(d.images) for d in docs)} images; median cosine: image to its sentence {np.median(own):.3f}, "
          f"to another sentence {np.median(other):.3f}; an unrelated image's best {np.median(unrelated):.3f}")

    def greedy(s: np.ndarray, floor: float) -> list[tuple[int, int]]:
        return [(i, int(row.argmax())) for i, row in enumerate(s) if row.max() >= floor]

    rows = []
    print(f"{'floor':>6} {'method':<11}{'precision %':>16}{'recall %':>16}{'unrelated left out %':>24}")
    for floor in [float(f) for f in args.floors.split(",")]:
        for name, assign in (("assignment", assign_images), ("greedy", greedy)):
            precision, recall, left = [], [], []
            for s, d in zip(similarities, docs):
                pairs = assign(s, floor)
                correct = sum(d.truth[i] == j for i, j in pairs)
                if pairs:
                    precision.append(correct / len(pairs))
                recall.append(correct / sum(t is not None for t in d.truth))
                placed = {i for i, _ in pairs}
                left.append(float(all(i not in placed for i, t in enumerate(d.truth) if t is None)))
            row = {"floor": floor, "method": name, "precision": mean_ci95(precision), "recall": mean_ci95(recall), "unrelated_left_out": mean_ci95(left),
                   "documents_with_pairs": len(precision)}
            rows.append(row)
            print(f"{floor:>6g} {name:<11}" + "".join(f"{100 * row[k][0]:10.1f} ± {100 * row[k][1]:4.1f}" for k in ("precision", "recall"))
                  + f"{100 * row['unrelated_left_out'][0]:18.1f} ± {100 * row['unrelated_left_out'][1]:4.1f}")
    print(json.dumps({"bench": "mmc4", "clip_run": args.clip_run, "documents": len(docs), "seed": args.seed,
                      "median_cosine": {"own": float(np.median(own)), "other": float(np.median(other)), "unrelated_best": float(np.median(unrelated))},
                      "rows": rows, "wall_seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu, "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
