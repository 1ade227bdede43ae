"""In-context learning against lightweight fine-tuning on one word-classification task: ``fewshot icl compare``.

The same K examples (K in total per task, drawn as :func:`fewshot.evaluate.prompting.evaluate_prompting`
draws them: the first K of a seeded order of the example pool, so K's examples contain the smaller K's)
and the same queries for every method, over seeded draws (mean ± 95% CI over draws):

``icl``      the K examples as ``input -> label`` lines in the prompt after the task description; rank
             classification by the labels' summed log-likelihood (:func:`continuation_logprobs`), the
             examples' KV cache computed once per draw (:func:`prefill`) and shared by the queries;
``lora``     LoRA (Hu et al. 2021; r = 8, α = 16) on the attention query and value projections of the same
             causal LM, trained on the K examples as ``input -> label`` sequences with the loss on the label
             tokens only (:func:`label_targets`, :func:`fewshot.objectives.language.token_cross_entropy`),
             a fixed number of AdamW steps; the queries are then scored like ICL's, without examples;
``ia3``      (IA)³ (Liu et al. 2022, T-Few's method): learned rescalings of the keys, the values and the
             feed-forward activations, trained and scored like LoRA;
``probe``    logistic regression on the causal LM's last hidden state at the last token of ``input ->``;
``minilm``   logistic regression on all-MiniLM-L6-v2 sentence embeddings of the input word.

Costs, per method and K:
    FLOPs to adapt     ICL: the prefill of the examples; LoRA / (IA)³: every training step, forward and
                       backward; probes: the examples' features (the logistic regression's own fit is
                       not counted);
    FLOPs per query    everything one query costs: for ICL the query rows read after the cached
                       examples, so attention over the cache makes it grow with K; for the adapted
                       models the same rows without a prompt, flat in K;
    bytes per task     ICL: the examples' prompt text (UTF-8) and, apart, their KV cache; LoRA /
                       (IA)³: the trained adapter tensors; probes: the weights and biases (float64).
FLOPs are measured, not estimated: :func:`count_flops` runs the real computation under torch's
``FlopCounterMode`` (2 FLOPs per multiply–add of every matrix product; attention through SDPA
counted with torch's own formula, which ignores the causal mask).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from fewshot.errors import ConfigError, DataError
from fewshot.evaluate.prompting import ARROW, CATEGORY_TASKS, PromptTask, build_prompt, check_fits, continuation_logprobs, load_task, prefill
from fewshot.evaluate.runner import mean_ci95
from fewshot.models.causal_lm import HFCausalLM, Past, PromptLM
from fewshot.models.hf_text import require
from fewshot.models.lm_fitting import answer_step, label_targets, with_adapter

__all__ = [
    "ADAPTER_TARGETS", "METHODS", "compare_icl", "compare_table", "count_flops", "fit_adapter", "label_targets",
    "last_hidden_features", "overtakes", "past_bytes",
]

METHODS = ("icl", "lora", "ia3", "probe", "minilm")
# 20-step fits, not T-Few's 1,000 steps at 3e-3: ten times fewshot.adapt.hf.DEFAULT_LR (LoRA 1e-3, (IA)³ 3e-3), as at
# those rates 10 steps left SmolLM2 below chance on categories-nonce at K = 16 (one pilot; not a tuned value).
ADAPTER_LR = {"lora": 1e-2, "ia3": 3e-2}
# Where each adapter goes, per architecture (PEFT matches these module-name suffixes):
# LoRA on the query and value projections; (IA)³ on keys, values and the second FFN layer's input.
ADAPTER_TARGETS: dict[str, dict[str, dict[str, list[str]]]] = {
    "llama": {"lora": {"target_modules": ["q_proj", "v_proj"]},
              "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}},
    # GPT-2 fuses q, k and v in c_attn: LoRA and (IA)³ act on the fused projection.
    "gpt2": {"lora": {"target_modules": ["c_attn"]},
             "ia3": {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"]}},
}

def _cpu_sdpa(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# CPU's fused attention kernels are missing from FlopCounterMode's table; they count as the other SDPA kernels
# (shapes in, FLOPs out: 4·B·H·Tq·Tk·D forward, without the causal mask's saving).
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """``(fn(*args, **kwargs), FLOPs)``: the call run under ``FlopCounterMode`` (2 per multiply–add)."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        out = fn(*args, **kwargs)
    return out, int(counter.get_total_flops())


def past_bytes(past: Past | None) -> int:
    """Bytes of a KV cache: Σ over layers of (keys + values) elements × element size."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in past or [])


def _check_hf(lm: PromptLM, what: str) -> HFCausalLM:
    if not isinstance(lm, HFCausalLM):
        raise ConfigError(f"{what} needs a Hugging Face causal LM (smollm2 or a folder), not {lm.name}")
    return lm


def _adapter_config(model: Any, name: str) -> Any:
    peft = require("peft")
    kind = getattr(model.config, "model_type", "")
    if kind not in ADAPTER_TARGETS:
        raise ConfigError(f"no adapter targets for a {kind!r} model; known: {', '.join(ADAPTER_TARGETS)}")
    if name == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, **ADAPTER_TARGETS[kind]["lora"])
    return peft.IA3Config(**ADAPTER_TARGETS[kind]["ia3"])


def fit_adapter(
    lm: PromptLM, adapter: str, examples: Sequence[tuple[str, str]], steps: int, lr: float | None = None,
    batch_size: int = 16, seed: int = 0,
) -> tuple[HFCausalLM, int, int]:
    """A copy of ``lm`` with a fresh ``adapter`` ("lora" or "ia3") trained for ``steps`` AdamW steps on the
    examples as ``input -> label`` rows, loss on the label tokens only (each step a seeded batch of at most
    ``batch_size`` examples). -> (the adapted model, training FLOPs, the adapter's bytes)."""
    hf = _check_hf(lm, adapter)
    model = with_adapter(hf.model, _adapter_config(hf.model, adapter), seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr or ADAPTER_LR[adapter], weight_decay=0.0)
    pairs = [(list(hf.start_ids) + hf.encode(f"{x}{ARROW}"), hf.encode(f" {y}")) for x, y in examples]
    rng = np.random.default_rng([seed, 7])
    flops = 0
    for _ in range(steps):
        rows = np.arange(len(examples)) if len(examples) <= batch_size else rng.choice(len(examples), batch_size, replace=False)
        flops += count_flops(answer_step, model, optimizer, [pairs[i] for i in rows])[1]
    stored = sum(p.numel() * p.element_size() for p in params)
    for p in params:
        p.requires_grad_(False)
    return HFCausalLM(model, hf.tokenizer, f"{hf.name}+{adapter}"), flops, stored


@torch.no_grad()
def last_hidden_features(lm: PromptLM, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """The causal LM's last hidden state (after its final norm) at the last real token of each text. -> (n, dim)."""
    hf = _check_hf(lm, "the probe")
    rows = [list(hf.start_ids) + hf.encode(t) for t in texts]
    out = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
        hidden = hf.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        out.append(hidden[torch.arange(len(chunk)), torch.tensor([len(r) - 1 for r in chunk])].float())
    return torch.cat(out).numpy()


class _Logreg:
    """Multinomial logistic regression on standardised features; one seen class predicts that class."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> "_Logreg":
        from sklearn.linear_model import LogisticRegression

        self.mean, self.scale = x.mean(0), x.std(0) + 1e-6
        self.classes = np.unique(y)
        self.model = LogisticRegression(max_iter=1000).fit((x - self.mean) / self.scale, y) if len(self.classes) > 1 else None
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.model is None:
            return np.full(len(x), self.classes[0])
        return self.model.predict((x - self.mean) / self.scale)

    @property
    def nbytes(self) -> int:
        return 0 if self.model is None else int(self.model.coef_.nbytes + self.model.intercept_.nbytes)

    @property
    def flops_per_query(self) -> int:
        # standardise (2·d) + the linear map (2·d·C)
        return 0 if self.model is None else int(2 * self.model.coef_.size + 2 * self.model.coef_.shape[1])


def _rank(lm: PromptLM, past: Past | None, prefix: list[int], task: PromptTask, queries: Sequence[tuple[str, str]]) -> tuple[float, int]:
    """Accuracy of rank classification of ``queries`` after ``past`` and the FLOPs of scoring them all."""
    label_ids = [lm.encode(f" {c}") for c in task.labels]
    contexts = [prefix + lm.encode(f"{x}{ARROW}") for x, _ in queries for _ in label_ids]
    scores, flops = count_flops(continuation_logprobs, lm, past, contexts, label_ids * len(queries))
    answers = [task.labels[int(i)] for i in scores.view(len(queries), len(label_ids)).argmax(dim=1)]
    return float(np.mean([a == y for a, (_, y) in zip(answers, queries)])), flops


def _icl(lm: PromptLM, task: PromptTask, examples: Sequence[tuple[str, str]], queries: Sequence[tuple[str, str]]) -> dict[str, Any]:
    prompt = build_prompt(lm, examples, task.description)
    check_fits(lm, task, prompt, [lm.encode(f"{x}{ARROW}") for x, _ in queries], [lm.encode(f" {c}") for c in task.labels])
    past, adapt_flops = count_flops(prefill, lm, prompt)
    accuracy, flops = _rank(lm, past, [], task, queries)
    text = "".join(f"{x}{ARROW} {y}\n" for x, y in examples)
    return {"accuracy": accuracy, "flops_adapt": adapt_flops, "flops_per_query": flops / len(queries),
            "bytes_per_task": len(text.encode()), "kv_cache_bytes": past_bytes(past), "prompt_tokens": len(prompt)}


def _adapted(lm: PromptLM, adapter: str, task: PromptTask, examples: Sequence[tuple[str, str]], queries: Sequence[tuple[str, str]],
             steps: int, lr: float | None, batch_size: int, seed: int) -> dict[str, Any]:
    model, adapt_flops, stored = fit_adapter(lm, adapter, examples, steps, lr, batch_size, seed)
    accuracy, flops = _rank(model, None, list(model.start_ids), task, queries)
    return {"accuracy": accuracy, "flops_adapt": adapt_flops, "flops_per_query": flops / len(queries), "bytes_per_task": stored}


def _probe(embed: Callable[[Sequence[str]], np.ndarray], task: PromptTask, examples: Sequence[tuple[str, str]],
           queries: Sequence[tuple[str, str]], suffix: str) -> dict[str, Any]:
    support, adapt_flops = count_flops(embed, [f"{x}{suffix}" for x, _ in examples])
    query, flops = count_flops(embed, [f"{x}{suffix}" for x, _ in queries])
    clf = _Logreg().fit(support, np.array([y for _, y in examples]))
    accuracy = float(np.mean(clf.predict(query) == np.array([y for _, y in queries])))
    return {"accuracy": accuracy, "flops_adapt": adapt_flops, "flops_per_query": flops / len(queries) + clf.flops_per_query,
            "bytes_per_task": clf.nbytes}


def compare_icl(
    lm: PromptLM, task: str = "categories", shots: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), methods: Sequence[str] = METHODS,
    draws: int = 3, queries: int = 24, steps: int = 20, seed: int = 0, minilm: Any = None,
    lr: dict[str, float] | None = None, batch_size: int = 8, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Accuracy ± 95% CI (over ``draws`` seeded draws) and costs of every method in ``methods`` for each K
    in ``shots`` (examples per task, in total), on the word-category task ``task``. ``minilm`` is a
    :class:`~fewshot.models.hf_text.TextEncoder` (loaded when ``minilm`` is among the methods and none is
    given); LoRA and (IA)³ take ``steps`` AdamW steps at ``lr[method]`` (default :data:`ADAPTER_LR`) on batches of
    at most ``batch_size`` examples. A K whose prompt does not fit ``lm``'s context is an ``n/a`` cell for ICL, with the reason."""
    if task not in CATEGORY_TASKS:
        raise ConfigError(f"icl compare classifies words: task must be one of {', '.join(CATEGORY_TASKS)}, got {task!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if draws < 1 or queries < 1 or steps < 0:
        raise ConfigError(f"draws and queries must be ≥ 1 and steps ≥ 0, got {draws}, {queries} and {steps}")
    if not shots or min(shots) < 1:
        raise ConfigError(f"shots must be ≥ 1, got {list(shots)}")
    if set(methods) - {"icl", "minilm"}:
        _check_hf(lm, "lora, ia3 and the probe")
    spec = load_task(task, seed, lm)
    if max(shots) > len(spec.examples):
        raise DataError(f"K={max(shots)} examples asked but task {task} has {len(spec.examples)} in its example pool")
    if queries > len(spec.queries):
        raise DataError(f"{queries} queries asked but task {task} has {len(spec.queries)} in its query pool")
    if "minilm" in methods and minilm is None:
        from fewshot.models.hf_text import load_minilm

        minilm = load_minilm()
    lr = lr or {}
    cells: dict[str, dict[int, list[dict[str, Any]]]] = {m: {k: [] for k in shots} for m in methods}
    notes: dict[str, dict[int, str]] = {m: {} for m in methods}
    for d in range(draws):
        q_idx = np.random.default_rng([seed, d, 0]).choice(len(spec.queries), queries, replace=False)
        order = np.random.default_rng([seed, d, 1]).permutation(len(spec.examples))
        drawn = [spec.queries[int(i)] for i in q_idx]
        for k in shots:
            examples = [spec.examples[int(i)] for i in order[:k]]
            for m in methods:
                if k in notes[m]:
                    continue
                if m == "icl":
                    try:
                        got = _icl(lm, spec, examples, drawn)
                    except DataError as error:
                        notes[m][k] = str(error)
                        continue
                elif m in ("lora", "ia3"):
                    got = _adapted(lm, m, spec, examples, drawn, steps, lr.get(m), batch_size, seed=int(np.random.SeedSequence([seed, d, k]).generate_state(1)[0]))
                elif m == "probe":
                    got = _probe(lambda t: last_hidden_features(lm, t), spec, examples, drawn, ARROW)
                else:
                    got = _probe(lambda t: minilm.embed(list(t)).float().numpy(), spec, examples, drawn, "")
                cells[m][k].append(got)
            if log:
                log(f"draw {d} K={k}: " + "  ".join(f"{m} {100 * cells[m][k][-1]['accuracy']:.0f}" for m in methods if cells[m][k]))
    results: dict[str, Any] = {}
    for m in methods:
        by_k: dict[str, Any] = {}
        for k in shots:
            if k in notes[m]:
                by_k[str(k)] = {"n/a": notes[m][k]}
                continue
            runs = cells[m][k]
            mean, ci = mean_ci95([r["accuracy"] for r in runs])
            cell = {"accuracy": mean, "ci95": ci, "draws": [r["accuracy"] for r in runs]}
            for key in runs[0]:
                if key != "accuracy":
                    cell[key] = float(np.mean([r[key] for r in runs]))
            by_k[str(k)] = cell
        results[m] = by_k
    out = {"model": lm.name, "context": lm.context, "task": task, "labels": spec.labels, "chance": 1 / len(spec.labels),
           "shots": list(shots), "k_is": "examples per task in total", "draws": draws, "queries": queries, "steps": steps,
           "seed": seed, "lr": {m: lr.get(m, ADAPTER_LR[m]) for m in methods if m in ADAPTER_LR}, "batch_size": batch_size,
           "methods": results}
    out["overtakes"] = {m: overtakes(out, m) for m in methods if m != "icl" and "icl" in methods}
    return out


def overtakes(out: dict[str, Any], method: str, against: str = "icl") -> dict[str, int | None]:
    """The smallest K at which ``method``'s mean accuracy is above ``against``'s (``mean``), and the
    smallest at which the lower end of its 95% CI is above the upper end of ``against``'s (``beyond_ci``);
    None where it never is (K where either is n/a are skipped)."""
    first: dict[str, int | None] = {"mean": None, "beyond_ci": None}
    for k in out["shots"]:
        a, b = out["methods"][method][str(k)], out["methods"][against][str(k)]
        if "n/a" in a or "n/a" in b:
            continue
        ci_a = 0.0 if np.isnan(a["ci95"]) else a["ci95"]
        ci_b = 0.0 if np.isnan(b["ci95"]) else b["ci95"]
        if first["mean"] is None and a["accuracy"] > b["accuracy"]:
            first["mean"] = k
        if first["beyond_ci"] is None and a["accuracy"] - ci_a > b["accuracy"] + ci_b:
            first["beyond_ci"] = k
    return first


def compare_table(out: dict[str, Any]) -> str:
    """Accuracy (%) ± 95% CI per method and K, then FLOPs to adapt, per query and bytes per task."""
    shots = out["shots"]
    head = f"{'method':<8}" + "".join(f"{'K=' + str(k):>14}" for k in shots)
    lines = [f"accuracy % ± 95% CI ({out['task']}, chance {100 * out['chance']:.1f}):", head]
    for m, by_k in out["methods"].items():
        lines.append(f"{m:<8}" + "".join(f"{'n/a':>14}" if "n/a" in c else f"{100 * c['accuracy']:>7.1f} ± {100 * c['ci95']:<4.1f}"
                                         for c in (by_k[str(k)] for k in shots)))
    for key, title in (("flops_adapt", "FLOPs to adapt"), ("flops_per_query", "FLOPs per query"), ("bytes_per_task", "bytes per task")):
        lines += [f"{title}:", head]
        for m, by_k in out["methods"].items():
            lines.append(f"{m:<8}" + "".join(f"{'n/a':>14}" if "n/a" in c else f"{c[key]:>14.3g}" for c in (by_k[str(k)] for k in shots)))
    return "\n".join(lines)
