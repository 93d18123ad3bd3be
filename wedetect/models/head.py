"""YOLO-World-style dense head: per-anchor embeddings scored against prompts, DFL box regression.

Per level the head has a classification branch ending in a 768-d embedding, a regression branch
ending in 4 x ``reg_max`` distance logits, and a BatchNorm contrastive scorer with a learned
logit scale (stored in log space) and bias. Attribute names are the official ``head_module``'s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvModule(nn.Module):
    """Conv 3x3 (no bias) -> BatchNorm (eps 1e-3, momentum 0.03) -> SiLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class BNContrastiveHead(nn.Module):
    """Scores image embeddings against prompt embeddings: ``exp(logit_scale) * <BN(x), t> + bias``."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(embed_dim, eps=1e-3, momentum=0.03)
        self.bias = nn.Parameter(torch.tensor(-10.0))
        self.logit_scale = nn.Parameter(torch.tensor(-1.0))

    def score(self, embed: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) of normalised embeddings (B, C, H, W) against prompts (B, K, C)."""
        logits = torch.einsum("bchw,bkc->bkhw", embed, prompts)
        return logits * self.logit_scale.exp() + self.bias

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # Text embeddings are L2-normalised again here (idempotent up to the last bits; official).
        return self.score(self.norm(x), F.normalize(text, dim=-1, p=2))


def _branch(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(ConvModule(cin, hidden), ConvModule(hidden, hidden), nn.Conv2d(hidden, cout, 1))


class WeDetectHead(nn.Module):
    """Head module for three levels. ``forward`` returns per-level class logits and raw DFL logits."""

    def __init__(
        self,
        in_channels: tuple[int, ...],
        embed_dim: int = 768,
        cls_hidden: int = 256,
        reg_hidden: int = 64,
        reg_max: int = 16,
    ) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.cls_preds = nn.ModuleList(_branch(c, cls_hidden, embed_dim) for c in in_channels)
        self.reg_preds = nn.ModuleList(_branch(c, reg_hidden, 4 * reg_max) for c in in_channels)
        self.cls_contrasts = nn.ModuleList(BNContrastiveHead(embed_dim) for _ in in_channels)
        self.register_buffer("proj", torch.arange(reg_max, dtype=torch.float32), persistent=False)

    def embeddings(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Batch-normalised per-anchor embeddings (B, 768, H, W) per level (what Uni stores)."""
        return [contrast.norm(cls(x)) for x, cls, contrast in zip(feats, self.cls_preds, self.cls_contrasts)]

    def forward(
        self, feats: list[torch.Tensor], text: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Class logits (B, K, H, W) and raw regression logits (B, 4 * reg_max, H, W) per level."""
        cls_logits = [
            contrast(cls(x), text) for x, cls, contrast in zip(feats, self.cls_preds, self.cls_contrasts)
        ]
        reg_raw = [reg(x) for x, reg in zip(feats, self.reg_preds)]
        return cls_logits, reg_raw

    def distances(self, reg_raw: torch.Tensor) -> torch.Tensor:
        """DFL expectation: (B, 4 * reg_max, H, W) logits -> (B, 4, H, W) distances in stride units."""
        b, _, h, w = reg_raw.shape
        # (B, HW, 4, bins) @ (bins, 1): the official shapes, so BLAS accumulates in the same order.
        prob = reg_raw.reshape(b, 4, self.reg_max, h * w).permute(0, 3, 1, 2).softmax(3)
        dist = prob.matmul(self.proj.to(prob.dtype).view(-1, 1)).squeeze(-1)
        return dist.transpose(1, 2).reshape(b, 4, h, w)


def make_priors(
    sizes: list[tuple[int, int]], strides: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points (N, 2) as (x, y) cell centres and their strides (N,), levels concatenated row-major."""
    points, strides_out = [], []
    for (h, w), s in zip(sizes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1))
        strides_out.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(strides_out)


def decode_boxes(points: torch.Tensor, strides: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Distances (..., N, 4) in stride units (left, top, right, bottom) -> xyxy boxes in input pixels."""
    d = dist * strides[:, None]
    x1y1 = points - d[..., :2]
    x2y2 = points + d[..., 2:]
    return torch.cat([x1y1, x2y2], dim=-1)


def flatten_levels(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-level (B, C, H, W) maps -> (B, sum H*W, C), rows in prior order."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
