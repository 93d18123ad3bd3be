"""The official WeDetect training objective: priors, DFL decoding, CIoU, and the detection loss.

``DetectionLoss`` reproduces ``YOLOWorldHead.loss_by_feat`` of the official finetuning code: a
task-aligned assignment (see :mod:`wedetect.train.assigner`), soft-target BCE over every prior and
prompt column, CIoU box loss and distribution focal loss over the foreground, all normalised by
the (local) sum of target scores and finally multiplied by ``num_images * world_size``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from wedetect.train.assigner import AssignResult, TaskAlignedAssigner
from wedetect.train.box_ops import (
    bbox_ciou,
    bbox_to_distance,
    dfl_expectation,
    distance_to_bbox,
    make_priors,
)

__all__ = ["DetectionLoss", "LossOutput", "bbox_ciou", "pad_gt"]

# The DFL average factor gets float32 machine epsilon added (mmdet ``weight_reduce_loss``).
_AVG_FACTOR_EPS = torch.finfo(torch.float32).eps


def pad_gt(bboxes_labels: Tensor, batch_size: int) -> Tensor:
    """Group ``[img, label, x1, y1, x2, y2]`` rows per image and zero-pad to (B, G, 5) = [label, box]."""
    rows = bboxes_labels.reshape(-1, 6)
    img_idx = rows[:, 0].long()
    counts = torch.bincount(img_idx, minlength=batch_size) if rows.numel() else img_idx.new_zeros(batch_size)
    g = int(counts.max()) if rows.numel() else 0
    out = rows.new_zeros(batch_size, g, 5)
    if g:
        # Rank of each row inside its image (rows are grouped by image, in order).
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(rows.shape[0], device=rows.device) - starts[img_idx]
        out[img_idx, slot] = rows[:, 1:]
    return out


@dataclass
class LossOutput:
    """Loss terms (already multiplied by ``num_images * world_size``) and what produced them."""

    loss_cls: Tensor
    loss_bbox: Tensor
    loss_dfl: Tensor
    priors: Tensor  # (N, 4)
    pred_bboxes: Tensor  # (B, N, 4) pixels, detached copy given to the assigner
    gt_info: Tensor  # (B, G, 5)
    assign: AssignResult
    assigned_scores_sum: Tensor  # clamped to >= 1

    @property
    def total(self) -> Tensor:
        return self.loss_cls + self.loss_bbox + self.loss_dfl

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in ("loss_cls", "loss_bbox", "loss_dfl")}


@dataclass
class DetectionLoss:
    """Official weights: BCE 0.5, CIoU 7.5, DFL 1.5 / 4; reg_max 16; strides 8, 16, 32."""

    cls_weight: float = 0.5
    bbox_weight: float = 7.5
    dfl_weight: float = 1.5 / 4
    reg_max: int = 16
    strides: tuple[int, ...] = (8, 16, 32)
    assigner: TaskAlignedAssigner = field(default_factory=TaskAlignedAssigner)

    def __call__(self, cls_logits: Sequence[Tensor], reg_raw: Sequence[Tensor], bboxes_labels: Tensor,
                 world_size: int | None = None) -> LossOutput:
        """Loss of one local batch.

        Args:
            cls_logits: per level (B, K, H, W) class logits before the sigmoid.
            reg_raw: per level (B, 4 * reg_max, H, W) box logits, channel = side * reg_max + bin.
            bboxes_labels: (M, 6) ground truth ``[image index, label, x1, y1, x2, y2]`` in input
                pixels, rows grouped by image in ascending order.
            world_size: DDP world size used for the official ``x num_images x world_size`` scale;
                default: the initialised process group's size, else 1.
        """
        if len(cls_logits) != len(self.strides) or len(reg_raw) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} levels, got {len(cls_logits)} / {len(reg_raw)}")
        if world_size is None:
            dist = torch.distributed
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        b, k = cls_logits[0].shape[:2]
        device, dtype = cls_logits[0].device, cls_logits[0].dtype
        priors = make_priors([t.shape[-2:] for t in cls_logits], self.strides, device, dtype)
        stride = priors[:, 2:3]

        flat_cls = torch.cat([t.permute(0, 2, 3, 1).reshape(b, -1, k) for t in cls_logits], dim=1)
        flat_dist = torch.cat([t.permute(0, 2, 3, 1).reshape(b, -1, 4 * self.reg_max) for t in reg_raw], dim=1)
        pred_bboxes = distance_to_bbox(priors[:, :2], dfl_expectation(flat_dist, self.reg_max) * stride)

        gt_info = pad_gt(bboxes_labels.to(device=device, dtype=dtype), b)
        gt_labels, gt_bboxes = gt_info[..., :1], gt_info[..., 1:]
        pad_flag = (gt_bboxes.sum(-1, keepdim=True) > 0).to(dtype)
        assign = self.assigner(pred_bboxes.detach(), flat_cls.detach().sigmoid(), priors, gt_labels,
                               gt_bboxes, pad_flag)
        scores = assign.assigned_scores
        scores_sum = scores.sum().clamp(min=1)

        loss_cls = self.cls_weight * F.binary_cross_entropy_with_logits(flat_cls, scores, reduction="none").sum()
        loss_cls = loss_cls / scores_sum

        fg = assign.fg_mask
        if fg.any():
            weight = scores.sum(-1)[fg]
            pred_pos = (pred_bboxes / stride)[fg]
            target_pos = (assign.assigned_bboxes / stride)[fg]
            loss_bbox = self.bbox_weight * ((1.0 - bbox_ciou(pred_pos, target_pos)) * weight).sum() / scores_sum

            target_ltrb = bbox_to_distance((priors[:, :2] / stride).expand(b, -1, -1)[fg], target_pos,
                                           self.reg_max - 1)
            logits = flat_dist[fg].reshape(-1, self.reg_max)
            target = target_ltrb.reshape(-1)
            left = target.long()
            right = left + 1
            dfl = (F.cross_entropy(logits, left, reduction="none") * (right.to(dtype) - target)
                   + F.cross_entropy(logits, right, reduction="none") * (target - left.to(dtype)))
            dfl = dfl * weight.repeat_interleave(4)
            loss_dfl = self.dfl_weight * dfl.sum() / (scores_sum + _AVG_FACTOR_EPS)
        else:
            # Zero losses that keep the graph connected (DDP needs every output used).
            loss_bbox = pred_bboxes.sum() * 0
            loss_dfl = pred_bboxes.sum() * 0

        scale = b * world_size
        return LossOutput(loss_cls * scale, loss_bbox * scale, loss_dfl * scale, priors,
                          pred_bboxes.detach(), gt_info, assign, scores_sum)
