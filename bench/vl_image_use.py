"""Does a Flamingo run read its images? Its text loss on fresh captions with each caption's own image, with the images
shuffled among the captions, and with blank images (issue 17's diagnostic for the Flamingo pilots).

Fresh one- and two-object scenes (a pool at ``--seed``, not the training pool's seed 0), one caption per image, each
as a one-image sequence ``[BOS] <image>caption<|endofchunk|> [EOS]``; the loss is the run's own training loss
(:func:`~fewshot.objectives.captioning.caption_loss` on the text tokens). Equal losses in the three columns: the images
change nothing the LM says.

    OMP_NUM_THREADS=1 python bench/vl_image_use.py runs/vl17/flamingo-ep-240
"""

from __future__ import annotations

import argparse
import json

import torch

from fewshot.data.pairs import pair_set
from fewshot.data.scenes import make_pool
from fewshot.methods.flamingo import interleave_captions, interleaved_labels
from fewshot.objectives.captioning import caption_loss
from fewshot.run import Run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a flamingo run folder")
    p.add_argument("--n", type=int, default=96, help="captions (one per fresh image)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the fresh scene pool")
    args = p.parse_args()
    method = Run.open(args.run).method().eval()
    pool = make_pool(2 * args.n + 8, size=32, objects=(1, 2), seed=args.seed)
    pairs = pair_set(pool.images, pool.row_image, pool.row_caption, method.text_tokenizer, context=30)
    first: dict[int, int] = {}
    for row, image in enumerate(pairs.image_index.tolist()):
        first.setdefault(image, row)
    batch = pairs.batch(torch.tensor(sorted(first.values()))[: args.n])
    f, n = method.flamingo, len(batch["tokens"])
    ids, members = interleave_captions(batch["tokens"], [1] * n, f.image_id, f.chunk_id, method.start_ids, method.eos_id)
    shown = {"own": batch["images"], "shuffled": batch["images"][torch.randperm(n, generator=torch.Generator().manual_seed(0))],
             "blank": torch.zeros_like(batch["images"])}
    with torch.no_grad():
        losses = {k: round(float(caption_loss(f(ids, method.image_features(v)[members]), interleaved_labels(ids, f.image_id))), 3)
                  for k, v in shown.items()}
    gates = [round(float(torch.tanh(b.attn_gate.detach())), 3) for b in f.gated]
    print(json.dumps({"bench": "vl_image_use", "run": args.run, "captions": n, "loss": losses, "tanh_attn_gates": gates}))


if __name__ == "__main__":
    main()
