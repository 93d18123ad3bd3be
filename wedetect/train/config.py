"""Typed training configuration, loaded from YAML with ``--set dotted.key=value`` overrides.

Defaults are the official COCO finetune of WeDetect-Base (8 GPUs x 4 images, 12 epochs, AdamW
lr 2e-5, wd 0.05, warm-up 1000 iterations then linear decay to 0.001x, grad clip 10, no EMA,
no AMP, last 4 epochs without mosaic). The shipped YAML files under ``wedetect/train/configs``
fill in the data paths for each flavour.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wedetect.config import ModelConfig, TextConfig, get_config
from wedetect.errors import WeDetectError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
Flavour = Literal["open_vocab", "mask_refine", "closed_set"]


class ConfigError(WeDetectError):
    """A training config file or override is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextSpec(_Strict):
    """Text tower shape (XLM-R fields); only needed for custom (non-official) sizes."""

    hidden_size: int = TextConfig.hidden_size
    num_hidden_layers: int = TextConfig.num_hidden_layers
    num_attention_heads: int = TextConfig.num_attention_heads
    intermediate_size: int = TextConfig.intermediate_size
    vocab_size: int = TextConfig.vocab_size
    max_position_embeddings: int = TextConfig.max_position_embeddings


class ModelSpec(_Strict):
    """The network: an official size, or a custom one when ``size`` is ``custom``."""

    size: str = "base"
    depths: tuple[int, ...] | None = None
    dims: tuple[int, ...] | None = None
    neck_scale: float | None = None
    neck_repeats: tuple[int, ...] | None = None
    embed_dim: int = 768
    cls_hidden: int = 256
    reg_hidden: int = 64
    text: TextSpec = TextSpec()

    def build_config(self, image_size: int) -> ModelConfig:
        if self.size != "custom":
            # Validation letterboxes to the network's input size: the training image size.
            return dataclasses.replace(get_config(self.size), input_size=image_size)
        missing = [k for k in ("depths", "dims", "neck_scale", "neck_repeats") if getattr(self, k) is None]
        if missing:
            raise ConfigError(f"model.size: custom needs model.{', model.'.join(missing)}")
        text = TextConfig(**self.text.model_dump(), embed_dim=self.embed_dim)
        return ModelConfig(name="custom", depths=self.depths, dims=self.dims, neck_scale=self.neck_scale,
                           neck_repeats=self.neck_repeats, input_size=image_size, text=text,
                           embed_dim=self.embed_dim, cls_hidden=self.cls_hidden, reg_hidden=self.reg_hidden)


class DataSpec(_Strict):
    """Dataset paths (COCO JSON + image folders) and the class-name file (label order = categories)."""

    train_ann: str | None = None
    train_images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    classes_file: str | None = None
    image_size: int = 640
    min_image_size: int = 32
    num_workers: int = 2
    val_batch_size: int = 8


class AugmentSpec(_Strict):
    """Augmentation settings; the defaults are the official recipe's."""

    mosaic: bool = True
    mixup_prob: float = 0.15
    scaling_ratio_range: tuple[float, float] = (0.5, 1.5)
    max_translate_ratio: float = 0.1
    min_area_ratio: float = 0.1
    hsv_gains: tuple[float, float, float] = (0.015, 0.7, 0.4)
    flip_prob: float = 0.5
    noise_prob: float = 0.01
    close_mosaic_epochs: int = 4
    num_neg_samples: tuple[int, int] = (80, 80)
    max_num_samples: int = 80


class CustomKey(_Strict):
    """Settings for the parameters whose official name contains a key (mmengine ``custom_keys``)."""

    lr_mult: float = 1.0
    weight_decay: float | None = None  # None: the base weight decay, NOT batch-scaled (official quirk)


def _official_custom_keys() -> dict[str, CustomKey]:
    return {"backbone.text_model": CustomKey(lr_mult=0.01), "logit_scale": CustomKey(weight_decay=0.0)}


class OptimSpec(_Strict):
    """AdamW with the official parameter groups, warm-up and linear decay."""

    lr: float = 2e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Matched as substrings of official parameter names, longest key first; the first match applies.
    custom_keys: dict[str, CustomKey] = Field(default_factory=_official_custom_keys)
    base_total_batch: int = 64  # weight decay is scaled by total batch / this (official constructor)
    grad_clip: float | None = 10.0
    warmup_iters: int = 1000
    warmup_start_factor: float = 0.001
    final_factor: float = 0.001


class TrainConfig(_Strict):
    """One training run."""

    flavour: Flavour = "open_vocab"
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    augment: AugmentSpec = AugmentSpec()
    optim: OptimSpec = OptimSpec()
    checkpoint: str | None = None  # pretrained detector to start from (official ``load_from``)
    tokenizer: str | None = None
    class_embeddings: str | None = None  # closed set: .npy from ``wedetect class-embeddings``
    epochs: int = 12
    batch_size: int = 4  # per process
    accumulate: int = 1  # micro-batches per optimizer step (official: none)
    amp: bool = False
    ema: bool = False  # official: no EMA
    ema_momentum: float = 1e-4
    ema_gamma: float = 2000.0
    sync_bn: bool = True  # under DDP on CUDA
    seed: int | None = None  # None: random, logged and saved
    device: str = "auto"
    output: str = "runs/wedetect"
    val_interval: int = 1
    log_interval: int = 50
    save_best: bool = True
    keep_checkpoints: int = -1  # -1 keeps every epoch's checkpoint
    save_interval_iters: int | None = None  # also write latest.pth every N iterations (mid-epoch resume)
    max_iters_per_epoch: int | None = None  # cap (smoke tests)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.epochs < 1 or self.batch_size < 1 or self.accumulate < 1:
            raise ValueError("epochs, batch_size and accumulate must be >= 1")
        if self.augment.close_mosaic_epochs < 0:
            raise ValueError("augment.close_mosaic_epochs must be >= 0")
        return self

    @property
    def open_vocab(self) -> bool:
        return self.flavour != "closed_set"

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), allow_unicode=True, sort_keys=False)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], YAML-parsed value); a quoted part may hold dots:
    ``optim.custom_keys."backbone.text_model".lr_mult=0.1``."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({err})") from err
    parts = [quoted or plain for quoted, plain in re.findall(r'"([^"]+)"|([^.]+)', key.strip())]
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.setdefault(k, {}), dict):
                raise ConfigError(f"--set {item!r}: {k} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return data


def resolve_config_path(path: str | Path) -> Path:
    """A YAML path, or the name of a shipped config (``wedetect_base_coco_full_tuning``)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    shipped = CONFIG_DIR / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {path} not found (shipped configs: {names})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **values: Any) -> TrainConfig:
    """Load a YAML config (or defaults), apply ``--set`` overrides then explicit keyword values."""
    data: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({err})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    apply_overrides(data, list(overrides or []))
    for key, value in values.items():
        if value is not None:
            _set(data, key.split("."), value)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid training config: {problems}") from None


def _set(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
