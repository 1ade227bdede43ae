"""What a frozen LM itself gives a caption after a few plain tokens: per-token negative log-likelihood (nats) of
``caption`` ⊕ end-of-text after the LM's start ids and ``--prefix`` (none: the caption alone), each token printed. It
explains a Frozen run's caption loss when its prefix is two of the LM's own tokens (docs/benchmarks.md, "The prefix as
the caption's words").

    OMP_NUM_THREADS=1 python bench/lm_caption_nll.py runs/vlctx/smollm2-answers-160 --prefix " red circle"
"""

from __future__ import annotations

import argparse
import json

import torch

from fewshot.models.prefix_lm import open_prefix_lm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("lm", help="a frozen LM: smollm2, a Hugging Face folder or a fewshot gpt run")
    p.add_argument("--caption", default="a photo of a small red circle")
    p.add_argument("--prefix", default="", help="plain text before the caption (empty: none)")
    args = p.parse_args()
    link = open_prefix_lm(args.lm)
    encode = lambda text: link.tokenizer.encode(text, add_special_tokens=False).ids if text else []  # noqa: E731
    head, ids = [*link.start_ids, *encode(args.prefix)], [*encode(args.caption), link.eos_id]
    sequence = head + ids
    with torch.no_grad():
        logits, _ = link.step(link.input_rows()[torch.tensor(sequence)][None])
    logp = logits[0].double().log_softmax(-1)
    nll = [-float(logp[len(head) + t - 1, i]) for t, i in enumerate(ids)] if head else None
    if nll is None:  # no start ids and no prefix: the first token has no context to be scored from
        nll = [-float(logp[t - 1, i]) for t, i in enumerate(ids) if t > 0]
        ids = ids[1:]
    for i, v in zip(ids, nll):
        print(f"{link.decode([i])!r:14} {v:6.2f}")
    print(json.dumps({"bench": "lm_caption_nll", "lm": args.lm, "prefix": args.prefix, "caption": args.caption,
                      "nats_per_token": round(sum(nll) / len(nll), 2)}))


if __name__ == "__main__":
    main()
