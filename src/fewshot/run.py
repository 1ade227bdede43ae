"""A run folder, opened once: what pretrain --resume, evaluate, adapt and generate need from it.

    run = Run.open("runs/simclr-omniglot")      # a run folder or its checkpoint file
    run.config, run.step, run.base_sha256        # the stored recipe, the step, the weights' hash
    encoder = run.encoder()                      # only the encoder, its weights loaded (r = encoder(x))
    method = run.method()                        # the whole pre-training method (heads, targets, queues)
    run.tokenizer(), run.evaluation_set()        # a text run's tokenizer; the held-out classes

The checkpoint is read (and its hash checked) once, in :meth:`Run.open`. Nothing is global, so
two runs (an image tower and a text tower) can be open at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from fewshot.config import RunConfig, config_from_dict
from fewshot.methods import METHODS, Method, build_method
from fewshot.train.checkpoint import Checkpoint, load_checkpoint, load_weights

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from fewshot.data.types import ImageSet

@dataclass
class Run:
    path: Path  # the run folder, wherever it has moved since training
    config: RunConfig
    checkpoint: Checkpoint

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """Open a run folder or a checkpoint file inside one (``RUN/checkpoints/last.safetensors``)."""
        path = Path(path)
        checkpoint = load_checkpoint(path)
        run_dir = path if path.is_dir() else path.parent.parent
        return cls(run_dir, config_from_dict(checkpoint.config), checkpoint)

    @property
    def step(self) -> int:
        return self.checkpoint.step

    @property
    def base_sha256(self) -> str:
        """SHA-256 of the checkpoint's tensor file: what adapter files bind themselves to."""
        return str(self.checkpoint.meta.get("tensors_sha256", ""))

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.checkpoint.meta.get("history", []))

    def encoder(self) -> nn.Module:
        """The pre-trained encoder alone (no heads, no MoCo queue or BYOL target), in eval mode."""
        method_class = METHODS[self.config.method.name]
        encoder = method_class.build_encoder(self.config)
        self._load(encoder, self.checkpoint.prefixed("model.encoder"), "encoder")
        return encoder.eval()

    def method(self) -> Method:
        """The whole pre-training method with its weights (what resuming or a text evaluation needs)."""
        method = build_method(self.config)
        self._load(method, self.checkpoint.prefixed("model"), "method")
        return method

    def tokenizer(self) -> Tokenizer | None:
        """The run's tokenizer (``tokenizer.json`` beside the checkpoint) when its source has text (text, pairs); else None."""
        from fewshot.data.registry import trains_tokenizer

        if not trains_tokenizer(self.config.data.source):
            return None
        from fewshot.data.tokenizer import load_tokenizer

        return load_tokenizer(self.path)

    def evaluation_set(self) -> ImageSet | None:
        """The run's held-out classes (or its ``eval.data_path`` folder), preprocessed like its pre-training data."""
        from fewshot.data.registry import load_run_data

        return load_run_data(self.config.data, self.config.eval.data_path).evaluation

    def _load(self, module: nn.Module, state: dict, what: str) -> None:
        load_weights(module, state, f"checkpoint of '{self.path}'", f"{what} of method '{self.config.method.name}'")


__all__ = ["Run"]
