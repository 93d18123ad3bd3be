"""Box geometry shared by the assigner and the losses: priors, DFL decoding, the official CIoU."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def make_priors(featmap_sizes: Sequence[tuple[int, int]], strides: Sequence[int],
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Prior points of all levels, (N, 4) = (x, y, stride, stride).

    The centre of cell (r, c) at stride s is ((c + 0.5) s, (r + 0.5) s); levels are flattened
    row-major and concatenated in stride order, matching ``(B, C, H, W) -> (B, H*W, C)``.
    """
    out = []
    for (h, w), s in zip(featmap_sizes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        stride = torch.full_like(xx, float(s))
        out.append(torch.stack([xx, yy, stride, stride], dim=-1).reshape(-1, 4))
    return torch.cat(out, dim=0)


def dfl_expectation(reg_raw: Tensor, reg_max: int = 16) -> Tensor:
    """Distances (..., 4) in stride units from raw logits (..., 4 * reg_max), sides l, t, r, b."""
    probs = reg_raw.reshape(*reg_raw.shape[:-1], 4, reg_max).softmax(dim=-1)
    proj = torch.arange(reg_max, device=reg_raw.device, dtype=reg_raw.dtype)
    return probs @ proj


def distance_to_bbox(points: Tensor, distances: Tensor) -> Tensor:
    """(x - l, y - t, x + r, y + b): boxes from prior centres and side distances (same units)."""
    x, y = points[..., 0], points[..., 1]
    return torch.stack(
        [x - distances[..., 0], y - distances[..., 1], x + distances[..., 2], y + distances[..., 3]], dim=-1
    )


def bbox_to_distance(points: Tensor, boxes: Tensor, max_dist: float, eps: float = 0.01) -> Tensor:
    """Side distances from prior centres to box edges, clamped to [0, max_dist - eps] (DFL targets)."""
    x, y = points[..., 0], points[..., 1]
    dist = torch.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], dim=-1)
    return dist.clamp(min=0, max=max_dist - eps)


def bbox_ciou(box1: Tensor, box2: Tensor, eps: float = 1e-7) -> Tensor:
    """Element-wise complete IoU of xyxy boxes (broadcasting), in the official (YOLOv5-style) form.

    The union gets ``eps``; the heights in the aspect term are ``h + eps``; the squared enclosing
    diagonal gets ``eps``; the aspect weight alpha is computed without gradient; the result is
    clamped to [-1, 1].
    """
    b1x1, b1y1, b1x2, b1y2 = box1.unbind(-1)
    b2x1, b2y1, b2x2, b2y2 = box2.unbind(-1)
    w1, h1 = b1x2 - b1x1, b1y2 - b1y1
    w2, h2 = b2x2 - b2x1, b2y2 - b2y1
    overlap = (torch.min(b1x2, b2x2) - torch.max(b1x1, b2x1)).clamp(min=0) * (
        torch.min(b1y2, b2y2) - torch.max(b1y1, b2y1)
    ).clamp(min=0)
    union = w1 * h1 + w2 * h2 - overlap + eps
    iou = overlap / union

    enclose_w = (torch.max(b1x2, b2x2) - torch.min(b1x1, b2x1)).clamp(min=0)
    enclose_h = (torch.max(b1y2, b2y2) - torch.min(b1y1, b2y1)).clamp(min=0)
    diag2 = enclose_w**2 + enclose_h**2 + eps
    rho2 = ((b2x1 + b2x2) - (b1x1 + b1x2)) ** 2 / 4 + ((b2y1 + b2y2) - (b1y1 + b1y2)) ** 2 / 4
    v = (4 / math.pi**2) * torch.pow(torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps)), 2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return (iou - (rho2 / diag2 + alpha * v)).clamp(min=-1.0, max=1.0)
