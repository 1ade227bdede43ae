"""Recipes: pydantic models, YAML files and ``key=value`` overrides.

A recipe lists only what differs from the defaults below. Every field has its help
text beside it; unknown keys and wrong types are one-line :class:`ConfigError` s.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fewshot.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    source: Literal["digits", "omniglot", "folder", "unlabeled", "text", "sequences", "moving-shapes"] = Field(
        "digits",
        description="digits (built in), omniglot (release zip or folder), folder (class-per-folder images), "
        "unlabeled (a flat folder of images; evaluate with eval.data_path or eval.lake_runs), "
        "text (a play-format corpus for the gpt / mlm methods), "
        "sequences (path/SEQUENCE/FRAME images, unlabeled), moving-shapes (generated sequences; label = shape)",
    )
    path: str | None = Field(
        None,
        description="data path; omniglot defaults to $FEWSHOT_DATA/omniglot/images_background_small1.zip, "
        "text to $FEWSHOT_DATA/text/tinyshakespeare.txt",
    )
    unlabeled_path: str | None = Field(None, description="optional flat folder of unlabeled images added to pre-training")
    image_size: int = Field(28, ge=8, le=512, description="images are resized to image_size × image_size")
    channels: Literal[1, 3] = Field(1, description="1 = grayscale, 3 = RGB")
    invert: bool = Field(False, description="invert folder images (dark strokes on white → bright on black)")
    holdout_classes: float = Field(
        0.5, gt=0, description="classes held out of pre-training for evaluation: a count (≥ 1) or a fraction (< 1)"
    )
    split_seed: int = Field(0, description="seed of the class-disjoint split (and of the generated moving-shapes)")
    sequences: int = Field(400, ge=1, description="moving-shapes: sequences generated (balanced over 10 shapes)")
    frames: int | None = Field(
        None, ge=2, description="frames per sequence: moving-shapes generates this many (null = 16); "
        "sequences keeps the first N of each folder (null = all, which must then be equally many)"
    )
    pretrain_on_all: bool = Field(
        False, description="pre-train on every class of the source (use when evaluation data comes from elsewhere, e.g. Lake's runs)"
    )
    seq_len: int = Field(128, ge=2, description="text: tokens per training window (the model's context is seq_len + 1 with [BOS]/[CLS])")
    vocab_size: int = Field(2048, ge=262, description="text: byte-level BPE vocabulary size (256 bytes + 6 specials at least)")
    heldout_fraction: float = Field(
        0.1, gt=0, lt=1, description="text: the last fraction of the corpus (from a blank line on) held out of tokenizer and model training"
    )


class ViewsConfig(_Strict):
    name: str = Field("characters", description="augmentation recipe: characters, simclr, none, viewmaker (learned, adversarial)")
    options: dict[str, Any] = Field(default_factory=dict, description="recipe options, e.g. {rotation: 10}")


class EncoderConfig(_Strict):
    name: str = Field("conv4", description="encoder registry name: conv4, resnet18, vit-tiny")
    options: dict[str, Any] = Field(default_factory=dict, description="builder options, e.g. {width: 64}")


class MethodConfig(_Strict):
    name: str = Field("simclr", description="pre-training method: simclr, triplet, npair, supcon, moco, byol, autoencoder, mae, protonet, r2d2, gpt, mlm, time-contrastive")
    temperature: float = Field(0.5, gt=0, description="τ of NT-Xent / SupCon / protonet's cosine logits / time-contrastive (R3M: 1)")
    positive_in_denominator: bool = Field(True, description="NT-Xent: keep the positive in the denominator (SimCLR) or not (DCL)")
    gather_negatives: bool = Field(True, description="SimCLR under DDP: negatives from every process's views (global batch), else local")
    margin: float = Field(1.0, ge=0, description="triplet margin ε")
    batch_hard: bool = Field(True, description="triplet: mine the hardest positive and negative in the batch")
    l2_reg: float = Field(0.0, ge=0, description="N-pair / time-contrastive: weight of the embedding-norm regulariser")
    projection_hidden: int = Field(256, ge=1, description="hidden width of the projection MLP")
    projection_dim: int = Field(128, ge=1, description="output width of the projection MLP (0 layers: see projection_layers)")
    projection_layers: int = Field(2, ge=0, description="layers of the projection MLP; 0 = no projector")
    projection_conv_blocks: int = Field(0, ge=0, description="conv blocks (conv4 only) before the projection MLP")
    momentum: float = Field(
        0.99, ge=0, lt=1, description="MoCo: EMA factor m of the key encoder, θ_k ← m·θ_k + (1−m)·θ_q (paper: 0.999 for ImageNet-length runs)"
    )
    momentum_base: float = Field(
        0.996, ge=0, le=1, description="BYOL: target EMA factor at step 0; a cosine schedule takes it to 1 at the last step"
    )
    queue_size: int = Field(4096, ge=1, description="MoCo: keys K kept in the queue of negatives")
    predictor_hidden: int = Field(256, ge=1, description="BYOL: hidden width of the predictor MLP (projector output → hidden → same width)")
    positive_window: int = Field(2, ge=1, description="time-contrastive: the positive frame lies 1..W frames from the anchor")
    negative_gap: int = Field(
        4, ge=1, description="time-contrastive: the same-sequence negative lies ≥ this many frames from the anchor (and farther than the positive)"
    )
    # Episodic (protonet, r2d2): each image of a batch is a class; its support and query sets are views of it.
    support_views: int = Field(1, ge=1, description="protonet/r2d2: support views S per image (ProtoCLR: 1)")
    query_views: int = Field(3, ge=1, description="protonet/r2d2: query views Q per image (ProtoCLR: 3); S + Q views per image in all")
    support_is_original: bool = Field(
        False, description="protonet/r2d2: the un-augmented image is the support (ProtoCLR); needs support_views=1"
    )
    proto_metric: Literal["euclidean", "cosine"] = Field(
        "euclidean", description="protonet: −‖q − c‖² (Snell et al. 2017, ProtoCLR) or cos(q, c)/temperature"
    )
    r2d2_lambda_init: float = Field(1.0, gt=0, description="r2d2: initial ridge penalty λ (learned, log-parametrised; paper: 1)")
    r2d2_scale_init: float = Field(10.0, gt=0, description="r2d2: initial output scale α of the logits α·X_qW (learned, log-parametrised)")
    # Reconstruction: autoencoder bottlenecks (dimension, information, sparsity, capacity) and MAE.
    code_dim: int = Field(64, ge=1, description="autoencoder: size of the code r = Linear(encoder features), the dimension bottleneck")
    code_noise: float = Field(0.0, ge=0, description="autoencoder: σ of Gaussian noise added to r while training (information bottleneck)")
    input_noise: float = Field(0.0, ge=0, description="denoising autoencoder: σ of Gaussian noise added to x; the loss targets the clean x")
    input_mask_ratio: float = Field(
        0.0, ge=0, lt=1, description="denoising autoencoder: fraction of input patches set to 0 (Vincent et al. 2008's masking noise)"
    )
    input_mask_patch: int = Field(1, ge=1, description="denoising autoencoder: side of the square patches input_mask_ratio drops (1 = pixels)")
    topk: int = Field(0, ge=0, description="k-sparse autoencoder: keep the k largest entries of r, zero the rest; 0 = off")
    l1: float = Field(0.0, ge=0, description="sparse autoencoder: weight λ of the L1 penalty λ·mean_b Σ_j |r_bj|")
    decoder: Literal["conv", "linear"] = Field(
        "conv", description="autoencoder decoder: conv (mirror of the conv encoder) or linear (one layer: the capacity bottleneck)"
    )
    reconstruction: Literal["bce", "mse"] = Field("bce", description="autoencoder loss: bce (pixels in [0, 1], decoder gives logits) or mse")
    mask_ratio: float = Field(0.75, ge=0, lt=1, description="MAE: fraction of patches removed before the encoder")
    norm_pix_loss: bool = Field(False, description="MAE: target each patch's pixels standardised by its own mean and variance")
    decoder_dim: int = Field(128, ge=4, description="MAE: decoder width (divisible by 4 and by decoder_heads)")
    decoder_depth: int = Field(2, ge=1, description="MAE: decoder blocks (paper: 8 at ViT-L scale)")
    decoder_heads: int = Field(4, ge=1, description="MAE: decoder attention heads")
    # Language models (gpt, mlm) on data.source=text; sizes in encoder.options {dim, depth, heads, mlp_ratio}.
    mlm_ratio: float = Field(0.15, gt=0, lt=1, description="mlm: fraction of tokens chosen for prediction (BERT: 0.15)")
    mlm_replace: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="mlm: of the chosen, fractions → [MASK], random token, unchanged (BERT 80/10/10; [0.8,0.2,0] = 80/20)"
    )
    mlm_masking: Literal["bert", "span"] = Field(
        "bert", description="mlm: bert (independent tokens, Devlin et al. 2019) or span (SpanBERT's geometric spans → [MASK], Joshi et al. 2020)"
    )


class TrainConfig(_Strict):
    steps: int = Field(1000, ge=1, description="optimizer steps in total (the schedule's length)")
    batch_size: int = Field(256, ge=2, description="images per device per step (each gives two views)")
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(50, ge=0, description="linear warm-up, then cosine decay to lr·min_lr_ratio")
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(200, ge=1, description="write the checkpoint every N steps (and at the end)")
    max_minutes: float | None = Field(None, gt=0, description="stop early after this much training time (checkpoint kept)")
    accelerator: str = Field("auto", description="cpu, gpu, auto (Lightning Fabric)")
    devices: int | str = Field("auto", description="devices per node, e.g. 1, 4 or auto")
    num_nodes: int = Field(1, ge=1)
    strategy: str = Field("auto", description="auto, ddp, … (Lightning Fabric)")
    precision: str = Field("auto", description="auto = bf16-mixed on a GPU that has bf16, else 32-true (fp32 is 5× faster on CPU)")
    channels_last: bool = Field(True, description="NHWC memory layout: 1.45× faster convolutions on CPU")
    sync_batchnorm: bool | None = Field(
        None, description="under DDP, BatchNorm over the global batch (SyncBatchNorm); None = on GPUs when world size > 1 (torch has no CPU SyncBatchNorm)"
    )


class EvalConfig(_Strict):
    ways: list[int] = Field([5], description="N of the N-way episodes")
    shots: list[int] = Field([1, 5], description="K of the K-shot episodes")
    queries: int = Field(15, ge=1, description="query examples per class and episode")
    episodes: int = Field(600, ge=1)
    classifiers: list[str] = Field(["proto-cosine", "proto-euclidean", "logreg", "knn"])
    seed: int = Field(0, description="seed of the test episodes: same seed, same episodes on every machine")
    baselines: bool = Field(True, description="also score raw pixels and a randomly initialised encoder")
    lake_runs: str | None = Field(None, description="path of Lake et al.'s all_runs (zip or folder) to score")
    data_path: str | None = Field(
        None, description="a class-per-folder image folder to evaluate on instead of the held-out classes of data.source"
    )
    probe_fractions: list[float] = Field([0.01, 0.1, 1.0], description="label fractions of the linear probe; [] to skip")
    batch_size: int = Field(512, ge=1, description="images per forward pass when embedding")

    @field_validator("probe_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in v):
            raise ValueError("every fraction must lie in (0, 1]")
        return v


class RunConfig(_Strict):
    name: str = Field("run", description="run name; the run folder is out/name")
    out: str = Field("runs", description="folder that holds run folders")
    data: DataConfig = Field(default_factory=DataConfig)
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name


# Sections whose `name` can be set by the section alone: `method=triplet` means `method.name=triplet`.
_NAMED_SECTIONS = ("views", "encoder", "method")


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{where}'"
    got = first.get("input")
    return f"bad config value for '{where}': {first['msg']} (got {got!r})"


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in _NAMED_SECTIONS and not isinstance(value, dict):
        parts = [parts[0], "name"]
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``train.steps=100`` → ("train.steps", 100); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': cannot read the value: {exc.problem}") from None
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return key, value


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
    **fields: Any,
) -> RunConfig:
    """A validated :class:`RunConfig` from a YAML recipe or a stored config (``base``), then
    ``key=value`` overrides, then keyword fields (``load_config(name="x")``; nest with dotted strings)."""
    tree: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe '{path}' does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe '{path}' is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"recipe '{path}' must be a mapping of keys to values")
        tree = loaded or {}
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    for key, value in fields.items():
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Rebuild a config stored in a checkpoint."""
    return load_config(base=tree)


def find_recipe(name: str | Path) -> Path:
    """A recipe path as given, or a name in the project's configs/ folder (``simclr-omniglot``)."""
    path = Path(name)
    if path.is_file():
        return path
    configs = Path(__file__).resolve().parents[2] / "configs"
    candidate = configs / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in configs.glob("*.yaml"))) if configs.is_dir() else "none found"
    raise ConfigError(f"recipe '{name}' is neither a file nor a recipe in configs/ (known: {known})")
