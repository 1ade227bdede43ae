"""Text pre-training benchmark: GPT and masked LM on tinyshakespeare.

Trains (or loads, if the run folder already holds a checkpoint) configs/gpt-shakespeare.yaml and
configs/mlm-shakespeare.yaml within a time budget each: a few timed steps first set train.steps
so the cosine schedule ends inside the budget (train.max_minutes is the hard stop). Then prints
held-out perplexity, the speaker-identification table (5-way 1- and 5-shot over held-out
speakers, ≥ 600 seeded episodes; MLM [CLS] and mean, GPT mean, a random-init model of each,
TF-IDF bag of words) and a generated sample, and one JSON line.

    OMP_NUM_THREADS=1 FEWSHOT_DATA=../shared/data python bench/text.py --minutes 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fewshot import api
from fewshot.config import RunConfig
from fewshot.data.text import TokenSet, encode_text, load_text_splits, parse_speeches
from fewshot.data.tokenizer import load_tokenizer, train_tokenizer
from fewshot.evaluate.evaluator import random_encoder
from fewshot.evaluate.speakers import bag_of_words, embed_texts, speaker_episodes, speaker_pool
from fewshot.evaluate.text import masked_perplexity, perplexity, perplexity_line
from fewshot.methods import build_method
from fewshot.report import results_table
from fewshot.train.trainer import checkpoint_path


def seconds_per_step(config: RunConfig, data: TokenSet, steps: int = 4) -> float:
    """Mean wall time of a training step (forward, backward, AdamW) after one warm-up step."""
    torch.manual_seed(0)
    method = build_method(config)
    opt = torch.optim.AdamW(method.parameters(), lr=config.train.lr)
    gen = torch.Generator().manual_seed(0)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss, _ = method(data.batch(torch.randint(len(data), (config.train.batch_size,), generator=gen)), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def train_or_load(recipe: str, out: str, minutes: float) -> tuple[RunConfig, torch.nn.Module, dict]:
    config = api.load_config(api.find_recipe(recipe), [f"out={out}"])
    info: dict = {"recipe": recipe}
    if not checkpoint_path(config.run_dir).exists():
        splits = load_text_splits(config.data)
        data = TokenSet(encode_text(train_tokenizer(splits.train, config.data.vocab_size), splits.train), config.data.seq_len)
        step_s = seconds_per_step(config, data)
        steps = max(50, int(0.92 * 60 * minutes / step_s))
        config = api.load_config(api.find_recipe(recipe), [f"out={out}", f"train.steps={steps}", f"train.max_minutes={minutes}",
                                                          f"train.warmup_steps={min(config.train.warmup_steps, steps // 10)}"])
        print(f"{recipe}: {step_s:.2f} s/step measured → {steps} steps in {minutes} min", flush=True)
        result = api.pretrain(config, progress=False)
        info.update(trained_steps=result.step, train_seconds=round(result.train_seconds, 1), windows_per_s=round(result.views_per_second, 1))
    config, method, ckpt = api.load_pretrained(config.run_dir)
    info.update(step=ckpt.step, final_loss=ckpt.meta["history"][-1]["loss"] if ckpt.meta.get("history") else None)
    return config, method.eval(), info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget per model")
    parser.add_argument("--out", default="runs/bench-text", help="folder of the two run folders")
    parser.add_argument("--episodes", type=int, default=600)
    args = parser.parse_args()

    gpt_cfg, gpt, gpt_info = train_or_load("gpt-shakespeare", args.out, args.minutes)
    mlm_cfg, mlm, mlm_info = train_or_load("mlm-shakespeare", args.out, args.minutes)
    tokenizer = load_tokenizer(gpt_cfg.run_dir)
    splits = load_text_splits(gpt_cfg.data)
    held = encode_text(tokenizer, splits.heldout)
    ppl_gpt = perplexity(gpt.encoder, held, gpt_cfg.data.seq_len, n_chars=len(splits.heldout))
    mlm_tok = load_tokenizer(mlm_cfg.run_dir)
    ppl_mlm = masked_perplexity(mlm, encode_text(mlm_tok, splits.heldout), mlm_cfg.data.seq_len, seed=0)
    print(f"GPT ({gpt_info['step']} steps): {perplexity_line(ppl_gpt)}")
    print(f"MLM ({mlm_info['step']} steps): {perplexity_line(ppl_mlm)}")

    ev = gpt_cfg.eval.model_copy(update={"episodes": args.episodes, "ways": [5], "shots": [1, 5]})
    pool = speaker_pool(parse_speeches(splits.heldout), max(ev.shots) + ev.queries, gpt_cfg.data.holdout_classes, gpt_cfg.data.split_seed)
    print(f"speaker episodes: {len(pool.speakers)} held-out speakers ({', '.join(pool.speakers)}), {len(pool.texts)} speeches")
    rand_mlm, rand_gpt = random_encoder(mlm_cfg).eval(), random_encoder(gpt_cfg).eval()
    features = {
        "mlm-cls": embed_texts(mlm.encoder, mlm_tok, pool.texts, "cls"),
        "mlm-mean": embed_texts(mlm.encoder, mlm_tok, pool.texts, "mean"),
        "gpt-mean": embed_texts(gpt.encoder, tokenizer, pool.texts, "mean"),
        "random-mlm-cls": embed_texts(rand_mlm, mlm_tok, pool.texts, "cls"),
        "random-gpt-mean": embed_texts(rand_gpt, tokenizer, pool.texts, "mean"),
        "bag-of-words": bag_of_words([t for _, t in parse_speeches(splits.train)], pool.texts),
    }
    rows = speaker_episodes(features, pool.labels, ev)
    print(f"\nSpeaker identification, accuracy % ± 95% CI ({args.episodes} episodes, {ev.queries} queries per speaker):")
    print(results_table(rows))

    sample = api.generate(gpt_cfg.run_dir, "ROMEO:", max_new_tokens=100, temperature=0.8, top_k=40, seed=0)
    print("\nSample (prompt 'ROMEO:', 100 tokens, temperature 0.8, top-k 40, seed 0):\n" + sample["text"])
    print(json.dumps({"gpt": {**gpt_info, "perplexity": ppl_gpt}, "mlm": {**mlm_info, "perplexity": ppl_mlm},
                      "speakers": pool.speakers, "results": rows, "sample": sample["text"]}))


if __name__ == "__main__":
    main()
