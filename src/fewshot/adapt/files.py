"""Adapter files: what one task learned, saved apart from the frozen base it was learned on.

``NAME.safetensors`` holds only the method's trainable tensors (``adapter.<parameter name>``) and
the head (``head.weight``, ``head.bias``); ``NAME.json`` holds the format tag, the method and its
options, the head's classes and scale, the SHA-256 of the base checkpoint's tensor file (from its
meta) and of this tensor file. Both are written atomically. Loading rebuilds the method on a fresh
copy of the base, so a file is a few kilobytes for LoRA or (IA)³ and refuses any other base.

Nothing is overwritten by accident: an existing target is refused unless ``overwrite`` is set, and
even then only an earlier adapter file is replaced; nothing is ever written into a run's
``checkpoints/`` folder (:func:`adapter_target`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fewshot.adapt.heads import AdaptedClassifier, CosineHead
from fewshot.adapt.inject import trainable_parameters
from fewshot.adapt.registry import adapt
from fewshot.errors import CheckpointError, ConfigError
from fewshot.io import atomic_write, sha256_file, versions
from fewshot.io import read_file_pair

__all__ = ["ADAPTER_FORMAT", "adapter_target", "adapter_tensors", "load_adapter", "read_adapter_meta", "save_adapter"]

ADAPTER_FORMAT = "fewshot-adapter"
ADAPTER_FORMAT_VERSION = 1


def adapter_tensors(clf: AdaptedClassifier) -> dict[str, torch.Tensor]:
    """The tensors a task stores: the method's trainable parameters and the head."""
    tensors = {f"adapter.{k}": v.detach() for k, v in trainable_parameters(clf.encoder).items()}
    tensors.update({"head.weight": clf.head.weight.detach(), "head.bias": clf.head.bias.detach()})
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def _run_checkpoints_folder(path: Path) -> Path | None:
    """The run ``checkpoints/`` folder that ``path`` would be written into, if any: a folder named
    checkpoints beside a run's config.json, or holding a checkpoint (last.safetensors / last.json)."""
    for folder in path.resolve().parents:
        if folder.name == "checkpoints" and (
            (folder.parent / "config.json").is_file() or (folder / "last.safetensors").exists() or (folder / "last.json").exists()
        ):
            return folder
    return None


def _is_adapter_file(path: Path) -> bool:
    """Whether ``path`` (.json or .safetensors) carries the adapter format tag."""
    try:
        if path.suffix == ".json":
            meta = json.loads(path.read_text())
            return isinstance(meta, dict) and meta.get("format") == ADAPTER_FORMAT
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == ADAPTER_FORMAT
    except Exception:  # noqa: BLE001 - unreadable means "not an adapter file"
        return False


def adapter_target(path: str | Path, overwrite: bool = False) -> Path:
    """The .safetensors path :func:`save_adapter` writes for ``path`` (its .json beside it), checked
    before any work: never inside a run's checkpoints/ folder; an existing file only with
    ``overwrite`` (``--force``), and then only if it is an earlier adapter file."""
    path = Path(path).with_suffix(".safetensors")
    folder = _run_checkpoints_folder(path)
    if folder is not None:
        raise CheckpointError(f"adapter target '{path}' is inside the run checkpoint folder '{folder}'; adapter files never go there, choose another --out")
    for file in (path, path.with_suffix(".json")):
        if file.exists() and not overwrite:
            raise ConfigError(f"'{file}' already exists; choose another --out, or pass --force to replace an earlier adapter")
        if file.exists() and not _is_adapter_file(file):
            raise ConfigError(f"'{file}' exists and is not a fewshot adapter file; --force replaces only adapters, choose another --out")
    return path


def save_adapter(
    path: str | Path,
    clf: AdaptedClassifier,
    method: str,
    options: dict[str, Any],
    base_sha256: str,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``path`` (.safetensors) and its .json sidecar atomically; returns the .safetensors path.

    An existing target is refused unless ``overwrite`` (and then must be an adapter file); nothing
    goes into a run's checkpoints/ folder (:func:`adapter_target`). Save before merging: a merged
    model's base weights are no longer the base's.
    """
    path = adapter_target(path, overwrite)
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
