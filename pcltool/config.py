"""Recipes: TOML files validated into typed objects.

Every default lives in the pydantic models below and nowhere else. A recipe file only states what differs;
``load_recipe`` applies ``--set key=value`` overrides, validates the result and returns a :class:`Recipe`
whose ``resolved()`` dictionary is what a run saves in its manifest.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pcltool.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DATASETS = ("digits", "cifar10", "cifar100", "image_folder")
AUGMENTATIONS = ("crop_flip", "crop", "random_resized_crop_flip", "none")


class _Section(BaseModel):
    # strict: a value of the wrong type is rejected, never coerced ("2" is not 2, "yes" is not true); no inf/NaN
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class DataConfig(_Section):
    """Where the images come from and how each peer's view is augmented."""

    dataset: Literal["digits", "cifar10", "cifar100", "image_folder"] = "cifar10"
    root: str | None = Field(None, description="dataset folder (relative to the working directory)")
    download: bool = Field(False, description="download CIFAR when it is missing and the network allows")
    val_size: float = Field(5000, gt=0, le=10_000_000,
                            description="validation split carved from train: a fraction (<1) or a count")
    val_seed: int = Field(0, ge=0, lt=2**63)
    test_size: float = Field(0.2, gt=0, lt=1, description="digits only: fraction held out as the test split")
    augment: Literal["crop_flip", "crop", "random_resized_crop_flip", "none"] = "crop_flip"
    pad: int = Field(4, ge=0, le=64, description="zero padding before the random crop (crop augmentations)")
    image_size: int = Field(32, ge=8, le=1024, description="network input size (image_folder: crop size)")
    resize_size: int | None = Field(None, ge=8, le=2048, description="image_folder: shorter side decoded before the centre crop (default image_size * resize_ratio)")
    resize_ratio: float = Field(1.0, ge=1.0, le=2.0, description="image_folder: resize_size / image_size when resize_size is unset (1: no zoom; ImageNet: 1.143 = 256/224)")
    scale: tuple[float, float] = Field((0.08, 1.0), strict=False, description="random-resized-crop area range")
    mean: tuple[float, ...] | None = Field(None, strict=False, description="per-channel normalisation mean (default: dataset's)")
    std: tuple[float, ...] | None = Field(None, strict=False, description="per-channel normalisation std (default: dataset's)")
    workers: int | None = Field(None, ge=0, le=64, description="image_folder: decoding processes (default: the machine's CPU count, at most 8)")
    test_split: str | None = Field(None, description="image_folder: folder under root holding the held-out test split (default: test, else val)")
    test_labels: str | None = Field(None, description="image_folder: labels of the test split from a file: 'file<TAB>class' lines (Tiny-ImageNet val_annotations.txt) or CSV 'file,class'; relative to the test split folder")
    class_names_file: str | None = Field(None, description="image_folder: human class names, 'id<TAB>name' or 'id,name' per line (Tiny-ImageNet words.txt)")
    subset: float | None = Field(None, gt=0, description="image_folder: a seeded draw per class for quick trials: a fraction (<1) or a count per class")
    subset_seed: int = Field(0, ge=0, lt=2**63, description="image_folder: seed of the per-class subset draw (data.subset)")
    skip_unreadable: bool = Field(False, description="image_folder: leave out files that cannot be decoded (listed in the manifest) instead of stopping")
    on_device: bool = Field(True, description="hold the decoded uint8 dataset on the training device")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.dataset == "image_folder" and not self.root:
            raise ValueError("data.root is required for dataset 'image_folder'")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("data.scale must satisfy 0 < low <= high <= 1")
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std must be given together")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("data.std values must be > 0")
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise ValueError(f"data.val_size {self.val_size}: a fraction must be below 1 and a count a whole number")
        return self


class ModelConfig(_Section):
    """The target backbone; the PCL network is built from it."""

    backbone: str = "resnet32"

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        from pcltool.models.registry import available_backbones

        if name not in available_backbones():
            raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(available_backbones())}")
        return name


class PCLConfig(_Section):
    """The method. ``enabled = false`` trains the plain backbone (one branch, cross-entropy only): the baseline."""

    enabled: bool = True
    peers: int = Field(3, ge=2, le=16, description="number of peers m (ignored when enabled = false)")
    temperature: float = Field(3.0, gt=0, le=1000)
    rampup_epochs: float = Field(80, ge=0, le=100_000, description="L in lambda(e) = exp(-5 (1 - min(e,L)/L)^2)")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ce_weight: float = Field(1.0, ge=0, le=1e6, description="weight of the peers' cross-entropy")
    ensemble_ce_weight: float = Field(1.0, ge=0, le=1e6, description="weight of the ensemble head's cross-entropy")
    kd_ensemble: bool = Field(True, description="peer ensemble teacher -> peer distillation")
    kd_mean: bool = Field(True, description="peer mean teachers -> peer distillation")
    kd_ensemble_weight: float = Field(1.0, ge=0, le=1e6)
    kd_mean_weight: float = Field(1.0, ge=0, le=1e6)
    mean_kd_reduction: Literal["mean", "sum"] = Field("mean", description="average (1/(m-1)) or sum over the other mean teachers")
    rampup_ensemble: bool = Field(True, description="whether lambda also scales the ensemble->peer term")
    ensemble_head_lr: Literal["1/m", "same"] = Field(
        "1/m", description="learning rate of the ensemble head: lr/m, so its logits step like one peer's classifier "
                           "(its input is m features long), or the same lr as the network (the paper's code)")
    mean_bn_stats: Literal["own", "ema"] = Field(
        "own", description="BatchNorm statistics of the mean network: its own, from its train-mode forwards as the "
                           "reproduction keeps them, or the temporal mean of the live network's")

    @model_validator(mode="after")
    def _check(self) -> PCLConfig:
        supervised = self.ce_weight > 0 or (self.enabled and self.ensemble_ce_weight > 0)
        if not supervised:
            raise ValueError("pcl.ce_weight (and, with pcl.enabled, pcl.ensemble_ce_weight) are all 0: nothing would "
                             "learn from the labels; give one of them a weight > 0")
        return self


class TrainConfig(_Section):
    """Optimisation, schedule, precision and the training fast path."""

    epochs: int = Field(300, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1, le=1 << 20, description="global batch (images, not views)")
    lr: float = Field(0.1, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = Field(default_factory=lambda: [150, 225])
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0, ge=0, le=100_000)
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="autocast dtype on GPU; CPU always runs fp32")
    channels_last: bool = Field(True, description="channels_last (NHWC) memory format, on GPU and CPU")
    fused_optimizer: bool = Field(True, description="fused/foreach SGD where available")
    batched_views: bool = Field(False, description="all m views through the trunk as one batch (one call; BatchNorm over all views together) instead of one call per view as the reproduction does")
    compile: bool = Field(False, description="torch.compile the training step")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode; reduce-overhead and max-autotune add CUDA graphs on GPU")
    sync_batchnorm: bool = Field(False, description="SyncBatchNorm under torchrun")
    foreach_ema: bool = Field(True, description="temporal-mean update with foreach kernels (false: a Python loop per tensor)")
    cpu_fast_path: bool = Field(False, description="on CPU too: bf16 autocast (when precision != fp32); fast on "
                                                   "CPUs with AMX/AVX512-BF16, off so CPU runs stay fp32")
    log_every: int = Field(50, ge=1, le=1_000_000, description="steps between progress updates (the only host syncs)")
    checkpoint_best: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if sorted(self.milestones) != self.milestones or any(m < 1 for m in self.milestones):
            raise ValueError("train.milestones must be increasing positive epochs")
        if self.warmup_epochs > self.epochs:
            raise ValueError("train.warmup_epochs must not exceed train.epochs")
        return self


class OutputConfig(_Section):
    runs_dir: str = Field("runs", description="parent folder of run directories (relative to the working directory)")


class Recipe(_Section):
    """A whole experiment. ``name`` defaults to the recipe file's stem."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = Field(0, ge=0, lt=2**63)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pcl: PCLConfig = Field(default_factory=PCLConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @property
    def num_branches(self) -> int:
        return self.pcl.peers if self.pcl.enabled else 1

    def resolved(self) -> dict[str, Any]:
        """Every value, defaults included, as plain JSON-able data."""
        return self.model_dump(mode="json")

    def differences_from(self, stored: dict[str, Any], source: str = "the run's manifest") -> list[str]:
        """Dotted keys in which this recipe trains something other than ``stored`` (a run's saved recipe).

        Keys added since the run was made take their defaults. Keys that change how a run is carried out but
        not what it learns are ignored: ``data.workers`` (decoding processes) and ``output.runs_dir``; and
        ``data.root`` is compared as the folder it names, so a relative and an absolute path to the same data
        agree (the data's own fingerprint is checked when the run's data is loaded)."""
        old = _experiment(recipe_from_dict(stored, source=source).resolved())
        new = _experiment(self.resolved())
        return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


NOT_THE_EXPERIMENT = ("data.workers", "output.runs_dir")


def _experiment(resolved: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe flattened to dotted keys, less what does not change what is trained."""
    flat = flatten(resolved)
    for key in NOT_THE_EXPERIMENT:
        flat.pop(key, None)
    if flat.get("data.root"):
        flat["data.root"] = str(Path(flat["data.root"]).expanduser().resolve())
    return flat


def flatten(tree: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.epochs=10'`` -> (['train', 'epochs'], 10). Values are TOML (strings need no quotes)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected key=value, e.g. --set train.epochs=10")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text!r}: the key must be dotted names, e.g. train.epochs")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {part!r} is a value, not a table")
            node = child
        node[path[-1]] = value
    return data


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid recipe {source}:"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            section = _section_for(item["loc"][:-1])
            allowed = ", ".join(section.model_fields) if section else ""
            msg = f"unknown key; allowed here: {allowed}"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _section_for(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(source, err)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a TOML recipe, apply ``--set`` overrides, validate. Relative paths are relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist (see recipes/ for examples)")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"recipe {path} is not valid TOML: {err}") from None
    data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, source=str(path))


# One-line meanings of the keys whose Field above states none; `pcltool recipe keys` prints every key's meaning.
_MEANINGS = {
    Recipe: {"name": "run name: runs/<name>[-N] (default: the recipe file's stem)",
             "seed": "random seed of initialisation, augmentation and sample order",
             "device": "where to train: auto (CUDA when available), cpu or cuda"},
    DataConfig: {"dataset": "which dataset to load",
                 "val_seed": "seed of the draw that carves the validation split from train",
                 "augment": "augmentation of each peer's view of a training image"},
    ModelConfig: {"backbone": "the target network; PCL builds its multi-branch network from it"},
    PCLConfig: {"enabled": "train with PCL (false: the plain backbone with cross-entropy only, the baseline)",
                "temperature": "distillation temperature T",
                "ema_decay": "decay of the temporal mean (mean teachers) of the peers' weights",
                "kd_ensemble_weight": "weight of the ensemble -> peer distillation term",
                "kd_mean_weight": "weight of the mean teachers -> peer distillation term"},
    TrainConfig: {"epochs": "training epochs",
                  "lr": "initial learning rate (for the global batch)",
                  "momentum": "SGD momentum",
                  "nesterov": "Nesterov momentum",
                  "weight_decay": "L2 weight decay",
                  "schedule": "learning-rate schedule after warm-up",
                  "milestones": "multistep: epochs at which the learning rate is multiplied by gamma",
                  "gamma": "multistep: learning-rate factor at each milestone",
                  "warmup_epochs": "linear learning-rate warm-up from 0 (fractions allowed)",
                  "checkpoint_best": "also keep checkpoints/best.pt (best validation top-1)"},
}
for _section, _meanings in _MEANINGS.items():
    for _key, _text in _meanings.items():
        if not _section.model_fields[_key].description:
            _section.model_fields[_key].description = _text
