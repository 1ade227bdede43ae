"""Adapter files: what one task learned, saved apart from the frozen base it was learned on.

``NAME.safetensors`` holds only the method's trainable tensors (``adapter.<parameter name>``) and
the head (``head.weight``, ``head.bias``); ``NAME.json`` holds the format tag, the method and its
options, the head's classes and scale, the SHA-256 of the base checkpoint's tensor file (from its
meta) and of this tensor file. Both are written atomically. Loading rebuilds the method on a fresh
copy of the base, so a file is a few kilobytes for LoRA or (IA)³ and refuses any other base.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fewshot.adapt.classifier import AdaptedClassifier, CosineHead
from fewshot.adapt.inject import trainable_parameters
from fewshot.adapt.registry import adapt
from fewshot.errors import CheckpointError
from fewshot.train.checkpoint import atomic_write, read_file_pair, sha256_file, versions

__all__ = ["ADAPTER_FORMAT", "adapter_tensors", "load_adapter", "read_adapter_meta", "save_adapter"]

ADAPTER_FORMAT = "fewshot-adapter"
ADAPTER_FORMAT_VERSION = 1


def adapter_tensors(clf: AdaptedClassifier) -> dict[str, torch.Tensor]:
    """The tensors a task stores: the method's trainable parameters and the head."""
    tensors = {f"adapter.{k}": v.detach() for k, v in trainable_parameters(clf.encoder).items()}
    tensors.update({"head.weight": clf.head.weight.detach(), "head.bias": clf.head.bias.detach()})
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def save_adapter(
    path: str | Path, clf: AdaptedClassifier, method: str, options: dict[str, Any], base_sha256: str, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``path`` (.safetensors) and its .json sidecar atomically; returns the .safetensors path.

    Save before merging: a merged model's base weights are no longer the base's.
    """
    path = Path(path).with_suffix(".safetensors")
    tensors = adapter_tensors(clf)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT}))
    n_head = clf.head.weight.numel() + clf.head.bias.numel()
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "method": method,
        "options": options,
        "base_sha256": base_sha256,
        "head": {"classes": clf.classes, "scale": clf.head.scale},
        "trainable_params": sum(v.numel() for k, v in tensors.items() if k.startswith("adapter.")),
        "head_params": n_head,
        "versions": versions(),
        "tensors_file": path.name,
        "tensors_sha256": sha256_file(path),
        **(extra or {}),
    }
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    return path


def read_adapter_meta(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON meta, tensors) of an adapter file pair, checked for format and integrity."""
    return read_file_pair(Path(path), ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION, "adapter")


def load_adapter(path: str | Path, base: nn.Module, base_sha256: str) -> AdaptedClassifier:
    """The classifier stored in adapter ``path``, rebuilt on a copy of ``base`` (left untouched).

    ``base_sha256`` is the SHA-256 of the base checkpoint's tensor file (``ckpt.meta["tensors_sha256"]``);
    a file made for another base is refused.
    """
    meta, tensors = read_adapter_meta(path)
    if meta.get("base_sha256") != base_sha256:
        raise CheckpointError(
            f"adapter '{path}' was made for base checkpoint {str(meta.get('base_sha256'))[:12]}…, not this one "
            f"({base_sha256[:12]}…); load it onto the checkpoint it was trained from"
        )
    model = adapt(copy.deepcopy(base), meta["method"], meta.get("options") or {})
    params = trainable_parameters(model)
    stored = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    if set(stored) != set(params):
        missing, unexpected = sorted(set(params) - set(stored)), sorted(set(stored) - set(params))
        raise CheckpointError(f"adapter '{path}' does not fit method {meta['method']!r} on this base (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            if stored[name].shape != p.shape:
                raise CheckpointError(f"adapter '{path}': {name} has shape {tuple(stored[name].shape)}, the base needs {tuple(p.shape)}")
            p.copy_(stored[name])
    if "head.weight" not in tensors or "head.bias" not in tensors:
        raise CheckpointError(f"adapter '{path}' has no head (head.weight, head.bias)")
    way, dim = tensors["head.weight"].shape
    head = CosineHead(dim, way, meta["head"]["scale"])
    head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
    device = next(base.parameters()).device
    return AdaptedClassifier(model, head.to(device), meta["head"]["classes"])
