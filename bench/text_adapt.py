"""Few-shot speaker identification on tinyshakespeare with a real pre-trained encoder (MiniLM).

Each episode draws `way` speakers (among those with at least `--min-speeches` speeches) and
`shot` + `query` speeches of each; the task is to tell who speaks a query speech. Rows, all on
the same seeded episodes:

- frozen MiniLM + prototypes (cosine nearest class mean; no training),
- MiniLM + linear probe (frozen encoder, linear head trained on the support set),
- PEFT LoRA, PEFT (IA)^3, PEFT prefix tuning (adapter + the same head, trained together).

The head is fewshot.adapt's cosine head (s = 10) started at the class prototypes; head and
adapter train `--steps` full-batch AdamW steps on the support set, the base in eval mode. Prints a markdown table: accuracy ± 95% CI, trainable parameters, bytes stored per task
(adapter + head as safetensors, + PEFT's adapter_config.json), seconds per episode (fit + predict).

    OMP_NUM_THREADS=1 FEWSHOT_DATA=../shared/data .venv/bin/python bench/text_adapt.py --episodes 100 --steps 20
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from fewshot.adapt.fitting import AdaptSettings, run_adaptation
from fewshot.data.text import speaker_lines
from fewshot.models.hf_text import load_minilm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=os.environ.get("FEWSHOT_DATA", "../shared/data"))
    parser.add_argument("--way", type=int, default=5)
    parser.add_argument("--shot", type=int, default=5)
    parser.add_argument("--query", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--adapter-episodes", type=int, default=None,
                        help="episodes for the PEFT rows (default --episodes); episode i is the same "
                             "in every row, so the baselines are also shown on these first ones")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-speeches", type=int, default=50,
                        help="only speakers with at least this many speeches take part")
    parser.add_argument("--max-tokens", type=int, default=128,
                        help="speeches are cut at this many word pieces (MiniLM allows 256)")
    parser.add_argument("--rows", default="prototypes,probe,lora,ia3,prefix",
                        help="comma-separated subset of prototypes,probe,lora,ia3,prefix,prompt")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 deprecation notes
    path = Path(args.data) / "text" / "tinyshakespeare.txt"
    if not path.is_file():
        sys.exit(f"{path} not found; pass --data or set FEWSHOT_DATA")
    pairs = speaker_lines(path)
    counts = collections.Counter(speaker for speaker, _ in pairs)
    keep = {s for s, n in counts.items() if n >= args.min_speeches}
    texts = [speech for speaker, speech in pairs if speaker in keep]
    labels = [speaker for speaker, _ in pairs if speaker in keep]
    print(f"{len(pairs)} speeches, {len(counts)} speakers; {len(keep)} speakers with "
          f">= {args.min_speeches} speeches ({len(texts)} speeches) take part")

    encoder = load_minilm()
    encoder.max_length = args.max_tokens
    ids = {s: k for k, s in enumerate(sorted(keep))}
    labels = [ids[s] for s in labels]
    # (title, registry method, steps): the one adaptation stack; zero steps is the prototype classifier.
    makers = {
        "prototypes": ("frozen MiniLM + prototypes", "linear-probe", 0),
        "probe": ("MiniLM + linear probe", "linear-probe", args.steps),
        "lora": ("PEFT LoRA (r=8, α=16, query+value)", "peft-lora", args.steps),
        "ia3": ("PEFT (IA)³ (keys, values, FFN)", "peft-ia3", args.steps),
        "prefix": ("PEFT prefix tuning (10 tokens)", "peft-prefix", args.steps),
        "prompt": ("PEFT prompt tuning (10 tokens)", "peft-prompt", args.steps),
    }

    baselines = ("prototypes", "probe")
    wanted = args.rows.split(",")
    adapter_episodes = args.adapter_episodes or args.episodes
    plan = [(key, args.episodes if key in baselines else adapter_episodes) for key in wanted]
    if adapter_episodes != args.episodes and any(k not in baselines for k in wanted):
        plan += [(key, adapter_episodes) for key in wanted if key in baselines]
    rows = []
    print(f"\n{args.way}-way {args.shot}-shot, {args.query} queries per class (seed {args.seed}), "
          f"{args.steps} steps, speeches cut at {args.max_tokens} word pieces, torch "
          f"{torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s)\n")
    print("| row | episodes | accuracy % | trainable params | bytes/task | s/episode |")
    print("|---|---|---|---|---|---|")
    for key, episodes in plan:
        title, method, steps = makers[key]
        start = time.perf_counter()
        # head_lr 1e-2 as the PEFT rows in docs/benchmarks.md were measured with
        row = run_adaptation(encoder, texts, labels, method, {}, args.way, args.shot, args.query, episodes,
                             AdaptSettings(steps=steps, head_lr=1e-2), args.seed)
        row.update(row=title, wall_s=time.perf_counter() - start)
        rows.append(row)
        print(f"| {title} | {episodes} | {100 * row['accuracy']:.1f} ± {100 * row['ci95']:.1f} | "
              f"{row['trainable_params']:,} | {row['bytes_per_task']:,} | "
              f"{row['seconds_per_episode']:.2f} |", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
