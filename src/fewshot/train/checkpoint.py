"""Checkpoints: tensors in safetensors, everything else in JSON, both written atomically.

``NAME.safetensors`` holds the model (``model.*``), the optimizer's tensors (``optim.*``)
and the random-generator states (``rng.*``); ``NAME.json`` holds the format tag, the config,
the step, the optimizer's non-tensor state, the versions and the SHA-256 of the tensor file,
so a torn or mismatched pair is detected. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from fewshot.errors import CheckpointError
from fewshot.io import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION, atomic_write, read_file_pair, sha256_file, versions

FORMAT, FORMAT_VERSION = CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_VERSION


@dataclass
class Checkpoint:
    config: dict[str, Any]
    step: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix.`` with the prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``path`` (.safetensors) and its .json sidecar; returns the .safetensors path."""
    path = Path(path).with_suffix(".safetensors")
    tensors = {k: v.detach().contiguous().cpu() for k, v in ckpt.tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": ckpt.step,
        "config": ckpt.config,
        "versions": versions(),
        "tensors_file": path.name,
        "tensors_sha256": sha256_file(path),
        **ckpt.meta,
    }
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    return path


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], where: str, what: str) -> None:
    """Load ``state`` into ``module`` with every name matched, or raise a one-line :class:`CheckpointError`.

    Names from before the shared token trunk (ViT, text tower: ``blocks.N.…`` and ``norm.…``, now
    under ``trunk.``) get their own message: the weights are fine, the fewshot that reads them is newer.
    """
    missing, unexpected = module.load_state_dict(state, strict=False)
    if not (missing or unexpected):
        return
    moved = {name.replace("trunk.", "", 1): name for name in missing if "trunk." in name}
    old = next((name for name in unexpected if name in moved), None)
    if old is not None:
        raise CheckpointError(
            f"{where} has parameter names from an older fewshot version ('{old}' is now '{moved[old]}', since the shared "
            f"token trunk); retrain the run, or load it with the fewshot version that wrote it"
        )
    raise CheckpointError(f"{where} does not fit the {what} (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (either file of the pair may be named)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.safetensors"
    meta, tensors = read_file_pair(path, FORMAT, FORMAT_VERSION, "checkpoint")
    extra = {k: v for k, v in meta.items() if k not in {"config", "step"}}
    return Checkpoint(config=meta["config"], step=int(meta["step"]), tensors=tensors, meta=extra)


# The optimizer's state dict mixes tensors (moments) with numbers (hyper-parameters, step counts);
# tensors go to safetensors under optim.*, the rest to JSON.
def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars["state"].setdefault(str(idx), {})[name] = value
    return tensors, scalars


def optimizer_from_flat(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, per_param in scalars["state"].items():
        state.setdefault(int(idx), {}).update(per_param)
    return {"state": state, "param_groups": scalars["param_groups"]}
