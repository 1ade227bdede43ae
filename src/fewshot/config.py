"""Recipes: pydantic models, YAML files and ``key=value`` overrides.

A recipe lists only what differs from the defaults below. Every field has its help
text beside it; unknown keys and wrong types are one-line :class:`ConfigError` s.
"""

from __future__ import annotations

import copy
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from fewshot.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """The part of a recipe every data source shares: its name, its path and the image options that
    image and sequence sources read.

    A source with options of its own subclasses this (``fewshot.data.text.TextDataConfig`` …) and
    registers it with :func:`register_source_config` (``fewshot.data.registry.register_source`` does
    this); the ``data`` section of a recipe is validated against the class its ``source`` selects.
    """

    source: str = Field(
        "digits",
        description="digits (built in), omniglot (release zip or folder), folder (class-per-folder images), "
        "unlabeled (a flat folder of images; evaluate with eval.data_path or eval.lake_runs), "
        "text (a play-format corpus for the gpt / mlm methods), "
        "sequences (path/SEQUENCE/FRAME images, unlabeled), moving-shapes (generated sequences; label = shape); "
        "or any source registered with fewshot.data.registry.register_source (see `fewshot info`)",
    )

    @field_validator("source")
    @classmethod
    def _registered_source(cls, v: str) -> str:
        if v not in _SOURCE_CONFIGS:
            raise ValueError(f"unknown data source; known sources: {', '.join(sorted(_SOURCE_CONFIGS))}")
        if not issubclass(cls, _SOURCE_CONFIGS[v]):  # e.g. DataConfig(source="text") would lack data.seq_len
            raise ValueError(f"data.source={v} takes its options from {_SOURCE_CONFIGS[v].__name__}, not {cls.__name__}")
        return v

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
    split_seed: int = Field(0, description="seed of the class-disjoint split (and of generated sources such as moving-shapes)")
    pretrain_on_all: bool = Field(
        False, description="pre-train on every class of the source (use when evaluation data comes from elsewhere, e.g. Lake's runs)"
    )
    # Character normalisation (fewshot.data.normalize), applied alike to pre-training, evaluation and Lake's runs.
    normalize: bool = Field(
        False, description="moment-normalise each image: ink centre to the centre, each axis scaled to a fixed ink spread (characters)"
    )
    normalize_from: int = Field(105, ge=8, le=1024, description="normalize: images are read at this size first (Omniglot's own 105 px)")
    normalize_spread: float = Field(
        0.16, gt=0, lt=0.5, description="normalize: ink standard deviation per axis as a fraction of image_size (0.16 keeps all "
        "ink of 99% of background-small1 drawings inside the frame)"
    )
    normalize_max_stretch: float = Field(2.0, ge=1, description="normalize: the aspect ratio changes by at most this factor (1 = keep it)")
    normalize_blur: float = Field(1.0, ge=0, description="normalize: σ of a Gaussian blur in output pixels after normalising (0 = none)")



_SOURCE_CONFIGS: dict[str, type[DataConfig]] = {}
DEFAULT_SOURCE = "digits"


def register_source_config(name: str, config_class: type[DataConfig] = DataConfig) -> None:
    """Make ``data.source=<name>`` a known source, validated against ``config_class``."""
    if not (isinstance(config_class, type) and issubclass(config_class, DataConfig)):
        raise TypeError(f"data source '{name}': its config class must subclass DataConfig")
    _SOURCE_CONFIGS[name] = config_class


def source_config_class(name: str) -> type[DataConfig]:
    if name not in _SOURCE_CONFIGS:
        raise ConfigError(f"bad config value for 'data.source': unknown data source '{name}'; known sources: {', '.join(sorted(_SOURCE_CONFIGS))}")
    return _SOURCE_CONFIGS[name]


def _typed_section(tree: Any, section: str, key: str, default: str, base: type[BaseModel],
                   lookup: Callable[[str], type[BaseModel]], hint: Callable[[str, type[BaseModel], str], str]) -> Any:
    """A recipe section validated against the config class its ``key`` selects (``method.name``,
    ``data.source``), as a one-line ``ConfigError`` naming ``section.KEY``; ``hint(name, class,
    unknown key)`` adds to an unknown-key error where that key belongs."""
    if isinstance(tree, base):
        return tree
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config section '{section}' must be a mapping, got {tree!r}")
    name = tree.get(key, default)
    if not isinstance(name, str):
        raise ConfigError(f"bad config value for '{section}.{key}': expected a name (got {name!r})")
    config_class = lookup(name)
    try:
        return config_class.model_validate(tree)
    except ValidationError as err:
        message = _format_error(err, section)
        first = err.errors()[0]
        if first["type"] == "extra_forbidden":
            message += hint(name, config_class, first["loc"][0])
        raise ConfigError(message) from None


def _data_section(tree: Any) -> DataConfig:
    """The ``data`` section as its own source's config class."""

    def owners(_: str, __: type[BaseModel], unknown: str) -> str:
        names = sorted(n for n, c in _SOURCE_CONFIGS.items() if unknown in c.model_fields)
        return f" (an option of data.source {', '.join(names)})" if names else ""

    return _typed_section(tree, "data", "source", DEFAULT_SOURCE, DataConfig, source_config_class, owners)


class ViewsConfig(_Strict):
    name: str = Field("characters", description="augmentation recipe: characters, simclr, none, viewmaker (learned, adversarial)")
    options: dict[str, Any] = Field(default_factory=dict, description="recipe options, e.g. {rotation: 10}")


class EncoderConfig(_Strict):
    name: str = Field("conv4", description="encoder registry name: conv4, resnet18, vit-tiny")
    options: dict[str, Any] = Field(default_factory=dict, description="builder options, e.g. {width: 64}")


class MethodConfig(_Strict):
    """The part of a recipe every method shares: its name.

    Each method file subclasses this with its own hyper-parameters, the paper's values as
    defaults (``fewshot.methods.contrastive.SimCLRConfig`` …), and registers it with
    :func:`register_method_config` (``fewshot.methods.register_method`` does this). The
    ``method`` section of a recipe is validated against the class its ``name`` selects, so a key
    another method owns is an error, not a silently ignored value.
    """

    name: str = Field("simclr", description="pre-training method (see `fewshot info` for the registered names)")


_METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}
DEFAULT_METHOD = "simclr"


def register_method_config(name: str, config_class: type[MethodConfig]) -> None:
    """Make ``method.name=<name>`` validate against ``config_class``."""
    if not (isinstance(config_class, type) and issubclass(config_class, MethodConfig)):
        raise TypeError(f"method '{name}': its config class must subclass MethodConfig")
    _METHOD_CONFIGS[name] = config_class


def method_config_class(name: str) -> type[MethodConfig]:
    if name not in _METHOD_CONFIGS:
        raise ConfigError(f"unknown method '{name}'; known methods: {', '.join(sorted(_METHOD_CONFIGS))}")
    return _METHOD_CONFIGS[name]


def _method_section(tree: Any) -> MethodConfig:
    """The ``method`` section as its own method's config class."""

    def options(name: str, config_class: type[BaseModel], _: str) -> str:
        return f"; method '{name}' takes: {', '.join(k for k in config_class.model_fields if k != 'name') or 'no options'}"

    return _typed_section(tree, "method", "name", DEFAULT_METHOD, MethodConfig, method_config_class, options)


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
    character_baselines: bool = Field(
        False, description="with eval.lake_runs: also score normalised pixels, Lake's modified Hausdorff distance (MHD) and MHD "
        "on normalised ink, each with its own preprocessing; 'pixels' is then always the raw pixels"
    )
    mhd_episodes: int = Field(
        100, ge=1, description="episodes of the MHD rows: the first N of the same seeded episodes (exact MHD costs ~1 ms per pair)"
    )
    test_time: list[Literal["tta", "hub", "hungarian"]] = Field(
        [], description="test-time options scored apart from the inductive rows on Lake's runs and episodes: tta (mean "
        "embedding over views), hub (CSLS over the run's test items; transductive), hungarian (one-to-one; transductive)"
    )
    tta_views: int = Field(8, ge=1, description="tta: augmented views averaged with the image itself")

    @field_validator("probe_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in v):
            raise ValueError("every fraction must lie in (0, 1]")
        return v


class RunConfig(_Strict):
    name: str = Field("run", description="run name; the run folder is out/name")
    out: str = Field("runs", description="folder that holds run folders")
    # SerializeAsAny (here and for method): dump the section's own fields, not only those of its base class.
    data: SerializeAsAny[DataConfig] = Field(default_factory=lambda: _data_section({}))
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    method: SerializeAsAny[MethodConfig] = Field(default_factory=lambda: _method_section({}))
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("data", mode="before")
    @classmethod
    def _data_by_source(cls, v: Any) -> DataConfig:
        return _data_section(v)

    @field_validator("method", mode="before")
    @classmethod
    def _method_by_name(cls, v: Any) -> MethodConfig:
        return _method_section(v)

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name


# Sections whose `name` can be set by the section alone: `method=triplet` means `method.name=triplet`.
_NAMED_SECTIONS = ("views", "encoder", "method")


def _format_error(err: ValidationError, section: str | None = None) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in (section, *first["loc"]) if p is not None) or "config"
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
    if "data" in tree:  # validated apart so an error names data.KEY
        tree["data"] = _data_section(tree["data"])
    if "method" in tree:  # validated apart so an error names method.KEY
        tree["method"] = _method_section(tree["method"])
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Rebuild a config stored in a checkpoint.

    Runs written before each method (and each data source) owned its config stored every method's
    (every source's) fields; the ones the stored method or source does not own never reached it, so
    they are dropped here rather than refused.
    """
    tree = copy.deepcopy(tree)
    data = tree.get("data")
    if isinstance(data, dict):
        owned = source_config_class(data.get("source", DEFAULT_SOURCE)).model_fields
        tree["data"] = {k: v for k, v in data.items() if k in owned}
    method = tree.get("method")
    if isinstance(method, dict):
        owned = method_config_class(method.get("name", DEFAULT_METHOD)).model_fields
        tree["method"] = {k: v for k, v in method.items() if k in owned}
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
