"""WeDetect and WeDetect-Uni networks: towers + neck + head, tensors in and tensors out.

``forward_features`` runs the image path (ConvNeXt -> neck), ``forward_head`` the dense head.
Pre-/post-processing lives in ``wedetect.data`` and ``wedetect.postprocess``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .convnext import ConvNeXt
from .head import WeDetectHead, decode_boxes, flatten_levels, make_priors
from .neck import CSPRepBiFPANNeck
from .text import TextTower


class WeDetectModel(nn.Module):
    """The dual-tower detector. ``text_tower`` is None for vision-only variants (Uni, closed-set)."""

    def __init__(self, config: ModelConfig, with_text: bool = True) -> None:
        super().__init__()
        self.config = config
        self.image_tower = ConvNeXt(config.depths, config.dims)
        self.text_tower = TextTower(config.text) if with_text else None
        self.neck = CSPRepBiFPANNeck(config.neck_scale, config.neck_repeats)
        self.head = WeDetectHead(
            self.neck.out_channels, config.embed_dim, config.cls_hidden, config.reg_hidden, config.reg_max
        )

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (K, L) -> unit-length prompt embeddings (K, 768)."""
        if self.text_tower is None:
            raise RuntimeError("this model has no text tower")
        return self.text_tower(input_ids, attention_mask)

    def forward_backbone(self, images: torch.Tensor) -> list[torch.Tensor]:
        """ConvNeXt stage outputs c1..c4 (strides 4, 8, 16, 32)."""
        return self.image_tower(images)

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Neck outputs P3, P4, P5 (strides 8, 16, 32) for images (B, 3, S, S) in [0, 1]."""
        return self.neck(self.forward_backbone(images))

    def forward_head(
        self, feats: list[torch.Tensor], text: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-level class logits (B, K, H, W) and raw DFL logits (B, 64, H, W); text is (B, K, 768)."""
        return self.head(feats, text)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.forward_head(self.forward_features(images), text)

    def decode(
        self, cls_logits: list[torch.Tensor], reg_raw: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened logits (B, N, K) and decoded boxes (B, N, 4) in input pixels, priors in level order."""
        dist = flatten_levels([self.head.distances(r) for r in reg_raw])
        points, strides = make_priors([m.shape[-2:] for m in cls_logits], self.config.strides, dist.dtype, dist.device)
        return flatten_levels(cls_logits), decode_boxes(points, strides, dist)


class WeDetectUniModel(WeDetectModel):
    """WeDetect-Uni: the detector's vision path scored against 256 learned objectness prompts.

    The prompts are used as stored (not L2-normalised), unlike text embeddings.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, with_text=False)
        self.prompts = nn.Parameter(torch.zeros(config.num_prompts, config.embed_dim))

    def forward(
        self, images: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per level: normalised embeddings (B, 768, H, W), objectness logits (B, P, H, W), raw DFL logits."""
        feats = self.forward_features(images)
        embeds = self.head.embeddings(feats)
        prompts = self.prompts.to(embeds[0].dtype).expand(images.shape[0], -1, -1)
        logits = [c.score(e, prompts) for e, c in zip(embeds, self.head.cls_contrasts)]
        reg_raw = [reg(x) for x, reg in zip(feats, self.head.reg_preds)]
        return embeds, logits, reg_raw


class WeDetectClosedSetModel(WeDetectModel):
    """Closed-set WeDetect: no text tower; a learned (K, 768) classifier (official key ``embeddings``),
    initialised from class embeddings and L2-normalised row-wise by the head on every forward."""

    def __init__(self, config: ModelConfig, num_classes: int = 80, class_embeddings: torch.Tensor | None = None) -> None:
        super().__init__(config, with_text=False)
        init = torch.zeros(num_classes, config.embed_dim) if class_embeddings is None else class_embeddings
        self.prompts = nn.Parameter(init.detach().clone().float())

    def classifier(self, batch_size: int) -> torch.Tensor:
        """The classifier rows as the (B, K, 768) "text" input of the head."""
        return self.prompts.expand(batch_size, -1, -1)
