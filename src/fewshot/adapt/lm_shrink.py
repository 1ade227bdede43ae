"""Shrink a Hugging Face causal LM to what one task needs: fewer layers, a smaller vocabulary, then heal it.

Frozen and Flamingo run their frozen LM forward and backward on every step, so its size sets their cost. Two cuts
leave a model that still reads the scene prompts once healed with :func:`~fewshot.adapt.lm_tuning.tune_lm`:

- **Layers** (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): deep layers change the
  residual stream least, so a block of them can go; the first ``count − 1`` layers and the last one are kept (the last
  layer maps the stream to the head and is the one that cannot go) and a short LoRA fine-tune heals the gap.
- **Vocabulary**: a task that speaks a few hundred words never needs the rest of a 49,152-token head, which costs as
  much as eight of SmolLM2's 30 layers per position. The tokens kept are those the task's texts are made of and every
  token a BPE merge passes through on the way to them, the tokenizer's base alphabet and its special tokens; a merge is
  kept when its two parts and its result are. BPE applies the lowest-ranked applicable merge first, and every merge
  that fires on a task text is kept, so **the task's texts tokenize to the same tokens, renumbered**, and any other text
  still tokenizes (in smaller pieces). The logits of a kept token are its logits in the full model; only the softmax's
  normaliser changes, so the LM answers among the task's tokens.

The result is saved like any tuned LM (:func:`~fewshot.adapt.lm_tuning.save_hf_folder`: safetensors, tokenizer,
``fewshot.json`` with the weights' SHA-256) for ``method.lm.init`` and every prompting command.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fewshot.errors import ConfigError, DataError
from fewshot.models.causal_lm import HFCausalLM, open_causal_lm
from fewshot.models.hf_text import decoder_layer_slot

__all__ = ["block_distances", "keep_layers", "kept_tokens", "layers_to_keep", "shrink_lm", "trim_vocabulary", "vocabulary_texts"]

SHRUNK_FORMAT = "fewshot-shrunk-lm"


def keep_layers(lm: HFCausalLM, kept: Sequence[int]) -> HFCausalLM:
    """``lm`` (changed in place and returned) with only the decoder layers ``kept`` (indices, in order)."""
    slot = decoder_layer_slot(lm.model)
    if slot is None:
        raise ConfigError(f"cannot cut the layers of {lm.name}: no decoder layers (its base model's layers or h)")
    holder, attr = slot
    layers = getattr(holder, attr)
    kept = list(kept)
    if not kept or kept != sorted(set(kept)) or not 0 <= kept[0] <= kept[-1] < len(layers):
        raise ConfigError(f"layers to keep must be distinct increasing indices of {lm.name}'s {len(layers)}, not {kept}")
    setattr(holder, attr, nn.ModuleList([layers[i] for i in kept]))
    for new_index, layer in enumerate(getattr(holder, attr)):
        # the KV cache is indexed by each attention's layer number
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = lm.model.config
    config.num_hidden_layers = len(kept)  # gpt2's n_layer is an alias of it
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    lm.name = f"{lm.name}[{len(kept)} layers]"
    return lm


def block_distances(lm: HFCausalLM, texts: Sequence[str], dropped: int) -> list[float]:
    """Gromov et al. 2024's criterion for removing ``dropped`` consecutive layers starting at layer ℓ: the angular
    distance arccos(cos(h_ℓ, h_{ℓ+n})) / π between the residual stream entering layer ℓ and entering layer ℓ + n, at
    each text's last token, averaged over ``texts``; one value per start ℓ that leaves the last layer in place."""
    count = lm.model.config.num_hidden_layers
    if not 1 <= dropped < count:
        raise ConfigError(f"drop between 1 and {count - 1} of {lm.name}'s {count} layers, not {dropped}")
    if not texts:
        raise DataError("choosing the layers to drop needs texts to run the model on")
    streams = []
    with torch.no_grad():
        for text in texts:
            out = lm.model(input_ids=torch.tensor([list(lm.start_ids) + lm.encode(text)]), output_hidden_states=True)
            streams.append(torch.stack([h[0, -1] for h in out.hidden_states[:count]]))  # entering layers 0 … count−1
    h = torch.stack(streams)
    cosine = [nn.functional.cosine_similarity(h[:, s], h[:, s + dropped], dim=-1).clamp(-1, 1) for s in range(count - dropped)]
    return [(torch.arccos(c) / torch.pi).mean().item() for c in cosine]


def layers_to_keep(lm: HFCausalLM, texts: Sequence[str], count: int) -> list[int]:
    """The ``count`` layers left when the block of the others with the least :func:`block_distances` goes."""
    dropped = lm.model.config.num_hidden_layers - count
    distances = block_distances(lm, texts, dropped)
    start = min(range(len(distances)), key=distances.__getitem__)
    return [i for i in range(lm.model.config.num_hidden_layers) if not start <= i < start + dropped]


def _pair(merge: Any) -> tuple[str, str]:
    """A merge of a tokenizer.json: ``["a", "b"]`` or, in older files, ``"a b"``."""
    a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
    return a, b


def kept_tokens(tokenizer_json: dict[str, Any], used: Iterable[str]) -> set[str]:
    """The tokens a trimmed BPE vocabulary keeps: ``used`` tokens, every part of a merge that makes a kept token (so
    every intermediate token of their BPE), the base alphabet (tokens no merge makes) and the added tokens."""
    parts: dict[str, list[str]] = {}
    for merge in tokenizer_json["model"]["merges"]:
        a, b = _pair(merge)
        parts.setdefault(a + b, []).extend((a, b))
    keep = {t for t in tokenizer_json["model"]["vocab"] if t not in parts} | {t["content"] for t in tokenizer_json["added_tokens"]}
    todo, seen = list(used), set()
    while todo:
        token = todo.pop()
        if token not in seen:
            seen.add(token)
            todo += parts.get(token, [])
    return keep | seen


def trim_vocabulary(lm: HFCausalLM, texts: Iterable[str]) -> HFCausalLM:
    """``lm`` with the vocabulary :func:`kept_tokens` of ``texts`` (ids renumbered in their old order; its model changed in
    place): the embedding and the tied head keep those rows, and ``texts`` tokenize to the same tokens (checked)."""
    import transformers
    from tokenizers import Tokenizer

    texts = list(dict.fromkeys(texts))
    if not texts:
        raise DataError("trimming a vocabulary needs the task's texts; none were given")
    model = lm.model
    if not getattr(model.config, "tie_word_embeddings", False):
        raise ConfigError(f"{lm.name} has an untied output head; trimming handles tied embeddings only")
    spec = json.loads(lm.tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ConfigError(f"{lm.name}'s tokenizer is {spec['model']['type']}, not BPE")
    old_vocab: dict[str, int] = spec["model"]["vocab"]
    id_to_token = {i: t for t, i in old_vocab.items()} | {t["id"]: t["content"] for t in spec["added_tokens"]}
    encoded = [lm.encode(text) for text in texts]
    used = {id_to_token[i] for ids in encoded for i in ids}
    keep = kept_tokens(spec, used)
    old_ids = sorted(i for i, t in id_to_token.items() if t in keep)
    new_id = {old: new for new, old in enumerate(old_ids)}
    spec["model"]["vocab"] = {t: new_id[i] for t, i in old_vocab.items() if t in keep}
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if {*_pair(m), "".join(_pair(m))} <= keep]
    for added in spec["added_tokens"]:
        added["id"] = new_id[added["id"]]
    specials = {k: getattr(lm.tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(lm.tokenizer, k, None)}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **specials)
    if getattr(lm.tokenizer, "chat_template", None):
        tokenizer.chat_template = lm.tokenizer.chat_template
    rows = torch.tensor(old_ids)
    with torch.no_grad():
        embedding = nn.Embedding(len(old_ids), model.get_input_embeddings().weight.shape[1])
        embedding.weight.copy_(model.get_input_embeddings().weight[rows])
    model.set_input_embeddings(embedding)
    model.config.vocab_size = len(old_ids)
    model.get_output_embeddings().weight = embedding.weight  # tied, as before
    model.get_output_embeddings().out_features = len(old_ids)
    for config in (model.config, getattr(model, "generation_config", None)):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            value = getattr(config, key, None) if config is not None else None
            # an id the old vocabulary never had (a default left in a config) has no new one either
            if isinstance(value, int):
                setattr(config, key, new_id.get(value))
            elif isinstance(value, list):
                setattr(config, key, [new_id[v] for v in value if v in new_id] or None)
    trimmed = HFCausalLM(model, tokenizer, f"{lm.name}[{len(old_ids)} tokens]")
    for text, ids in zip(texts, encoded):
        if trimmed.encode(text) != [new_id[i] for i in ids]:
            raise DataError(f"the trimmed tokenizer splits {text[:60]!r} differently from the full one")
    return trimmed


def vocabulary_texts(sources: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The lines of each text file in ``sources``; ``scenes`` stands for :func:`~fewshot.data.vl_prompts.scene_texts`."""
    lines: list[str] = []
    for source in sources:
        if str(source) == "scenes":
            from fewshot.data.vl_prompts import scene_texts

            lines += scene_texts()
        elif not Path(source).is_file():
            raise DataError(f"vocabulary corpus {source} is not a file (nor 'scenes')")
        else:
            lines += Path(source).read_text(encoding="utf-8").splitlines()
    return lines


def shrink_lm(model: str, out: str | os.PathLike[str], layers: int | None = None,
              vocabulary: Sequence[str | os.PathLike[str]] = (), probe: Sequence[str | os.PathLike[str]] = (),
              probe_lines: int = 64) -> dict[str, Any]:
    """``fewshot icl shrink-lm``: ``model`` (smollm2 or a Hugging Face folder) cut to ``layers`` layers by
    :func:`layers_to_keep` on ``probe_lines`` evenly spaced lines of ``probe`` (default: the vocabulary's texts), and its
    vocabulary trimmed to the lines of ``vocabulary`` (both read by :func:`vocabulary_texts`), saved to the new folder
    ``out``; what was done."""
    from fewshot.adapt.lm_tuning import plain_weights, save_hf_folder

    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists; shrinking writes a new folder")
    if layers is None and not vocabulary:
        raise ConfigError("shrinking needs --layers, --vocabulary or both")
    texts = vocabulary_texts(vocabulary)  # a missing file is refused before the model is read
    probe_texts = vocabulary_texts(probe) if probe else texts
    if layers is not None and not probe_texts:
        raise ConfigError("cutting layers needs texts to choose them on: give --probe or --vocabulary")
    lm = open_causal_lm(model)
    if not isinstance(lm, HFCausalLM):
        raise ConfigError(f"shrinking needs a Hugging Face causal LM (smollm2 or a folder), not {lm.name}")
    plain_weights(lm.model)
    before = {"layers": lm.model.config.num_hidden_layers, "vocabulary": lm.model.config.vocab_size,
              "parameters": sum(p.numel() for p in lm.model.parameters())}
    kept = None
    if layers is not None:
        if not 1 <= layers <= before["layers"]:
            raise ConfigError(f"keep between 1 and {before['layers']} layers of {lm.name}, not {layers}")
        lines = [t for t in probe_texts if t.strip()]
        kept = layers_to_keep(lm, [lines[int(i)] for i in np.linspace(0, len(lines) - 1, min(probe_lines, len(lines)))], layers)
        lm = keep_layers(lm, kept)
    if texts:
        lm = trim_vocabulary(lm, texts)
    after = {"layers": lm.model.config.num_hidden_layers, "vocabulary": lm.model.config.vocab_size,
             "parameters": sum(p.numel() for p in lm.model.parameters())}
    meta = {"format": SHRUNK_FORMAT, "base": str(model), "kept_layers": kept, "vocabulary_corpus": [str(v) for v in vocabulary],
            "probe": [str(v) for v in probe], "before": before, "after": after}
    save_hf_folder(lm, out, meta)
    return {"out": str(out), **meta}
