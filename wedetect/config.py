"""Typed model configuration: the one table of WeDetect sizes."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TextConfig:
    """XLM-RoBERTa text tower (transformers ``XLMRobertaConfig`` fields) plus the projection width."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 250002
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    layer_norm_eps: float = 1e-5
    embed_dim: int = 768  # output of the linear head, shared with the image embeddings


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one WeDetect size (detector and WeDetect-Uni share the vision path)."""

    name: str
    depths: tuple[int, ...]  # ConvNeXt blocks per stage
    dims: tuple[int, ...]  # ConvNeXt stage widths c1..c4
    neck_scale: float  # CSPRepBiFPAN width multiplier
    neck_repeats: tuple[int, ...]  # num_repeats; entries 5..8 are the BepC3 block counts
    input_size: int  # square letterbox side S
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 768  # image/text embedding width
    cls_hidden: int = 256  # head cls branch width (fixed by the official config for every size)
    reg_hidden: int = 64  # head reg branch width
    reg_max: int = 16  # DFL bins
    strides: tuple[int, ...] = (8, 16, 32)
    num_prompts: int = 256  # WeDetect-Uni objectness prompts

    @property
    def neck_out_channels(self) -> tuple[int, int, int]:
        s = self.neck_scale
        return int(128 * s), int(256 * s), int(512 * s)


_XLMR_LARGE = TextConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)

MODEL_SIZES: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny",
        depths=(3, 3, 9, 3),
        dims=(96, 192, 384, 768),
        neck_scale=0.75,
        neck_repeats=(1, 6, 12, 18, 6, 6, 6, 6, 6),
        input_size=640,
    ),
    "base": ModelConfig(
        name="base",
        depths=(3, 3, 27, 3),
        dims=(128, 256, 512, 1024),
        neck_scale=1.0,
        neck_repeats=(1, 6, 12, 18, 6, 12, 12, 12, 12),
        input_size=640,
    ),
    "large": ModelConfig(
        name="large",
        depths=(3, 3, 27, 3),
        dims=(192, 384, 768, 1536),
        neck_scale=1.5,
        neck_repeats=(1, 6, 12, 18, 6, 12, 12, 12, 12),
        input_size=1280,
        text=_XLMR_LARGE,
    ),
}


def get_config(size: str) -> ModelConfig:
    """Look up a size by name (``tiny``, ``base``, ``large``)."""
    try:
        return MODEL_SIZES[size]
    except KeyError:
        from .errors import WeDetectError

        raise WeDetectError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}") from None
