"""Task-aligned label assignment as in the official finetune (``BatchTaskAlignedAssigner``).

Per GT the ``topk`` priors with the largest ``score^alpha * CIoU^beta`` whose centre lies strictly
inside the box become positives; a prior claimed by several GTs goes to the GT with the largest
CIoU among all GT slots of its image. Targets are one-hot scores scaled so that each GT's
best-aligned prior gets that GT's best CIoU among its positives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from wedetect.train.box_ops import bbox_ciou


@dataclass
class AssignResult:
    """Everything the assigner decided, with the official array names (B batch, G GT slots, N priors)."""

    assigned_labels: Tensor  # (B, N) int64; background follows GT row 0 (or K when G == 0)
    assigned_bboxes: Tensor  # (B, N, 4) pixels
    assigned_scores: Tensor  # (B, N, K)
    fg_mask: Tensor  # (B, N) bool
    assigned_gt_idx: Tensor  # (B, N) int64
    overlaps: Tensor | None = None  # (B, G, N) CIoU clamped >= 0
    alignment_metrics: Tensor | None = None  # (B, G, N) before masking
    pos_mask_candidates: Tensor | None = None  # (B, G, N) bool
    pos_mask: Tensor | None = None  # (B, G, N) bool


@dataclass(frozen=True)
class TaskAlignedAssigner:
    """Official settings: top-k 10, alpha 0.5, beta 6, eps 1e-9, CIoU (eps 1e-7) overlaps."""

    topk: int = 10
    alpha: float = 0.5
    beta: float = 6.0
    eps: float = 1e-9

    @torch.no_grad()
    def __call__(self, pred_bboxes: Tensor, pred_scores: Tensor, priors: Tensor, gt_labels: Tensor,
                 gt_bboxes: Tensor, pad_flag: Tensor) -> AssignResult:
        """Assign priors to GT boxes.

        Args:
            pred_bboxes: (B, N, 4) decoded predictions in pixels.
            pred_scores: (B, N, K) sigmoid class scores.
            priors: (N, 4) prior x, y, stride, stride.
            gt_labels: (B, G, 1) labels (padding rows: 0).
            gt_bboxes: (B, G, 4) boxes in pixels (padding rows: zeros).
            pad_flag: (B, G, 1) 1 for real GT rows.
        """
        b, n, k = pred_scores.shape
        g = gt_bboxes.shape[1]
        if g == 0:
            return AssignResult(
                assigned_labels=torch.full((b, n), k, dtype=torch.long, device=pred_scores.device),
                assigned_bboxes=pred_bboxes.new_zeros(b, n, 4),
                assigned_scores=pred_scores.new_zeros(b, n, k),
                fg_mask=torch.zeros(b, n, dtype=torch.bool, device=pred_scores.device),
                assigned_gt_idx=torch.zeros(b, n, dtype=torch.long, device=pred_scores.device),
            )
        labels = gt_labels.reshape(b, g).long()

        # Box metrics: score of the GT's class times CIoU, for every (GT slot, prior) pair.
        cls_scores = torch.gather(pred_scores.transpose(1, 2), 1, labels[..., None].expand(b, g, n))
        overlaps = bbox_ciou(pred_bboxes[:, None], gt_bboxes[:, :, None]).clamp(min=0)
        metrics = cls_scores.pow(self.alpha) * overlaps.pow(self.beta)

        # Candidates: prior centre strictly inside the box, then the top-k by masked metric.
        centres = priors[:, :2]
        deltas = torch.cat([centres[None, None] - gt_bboxes[:, :, None, :2],
                            gt_bboxes[:, :, None, 2:] - centres[None, None]], dim=-1)
        inside = (deltas.min(dim=-1).values > self.eps).to(metrics.dtype)
        topk_idx = torch.topk(metrics * inside, min(self.topk, n), dim=-1, largest=True).indices
        in_topk = torch.zeros_like(metrics).scatter_(-1, topk_idx, 1.0)
        candidates = in_topk * inside * pad_flag

        # Priors claimed by several GTs go to the GT slot with the largest overlap (all slots).
        pos_mask = candidates
        claims = candidates.sum(dim=1)
        if claims.max() > 1:
            best = F.one_hot(overlaps.argmax(dim=1), g).transpose(1, 2).to(metrics.dtype)
            pos_mask = torch.where((claims > 1)[:, None], best, candidates)
        fg = pos_mask.sum(dim=1) > 0
        gt_idx = pos_mask.argmax(dim=1)

        assigned_labels = torch.gather(labels, 1, gt_idx)
        assigned_bboxes = torch.gather(gt_bboxes, 1, gt_idx[..., None].expand(b, n, 4))
        scores = F.one_hot(assigned_labels.clamp(min=0), k).to(pred_scores.dtype) * fg[..., None]

        aligned = metrics * pos_mask
        best_metric = aligned.amax(dim=-1, keepdim=True)
        best_overlap = (overlaps * pos_mask).amax(dim=-1, keepdim=True)
        norm = (aligned * best_overlap / (best_metric + self.eps)).amax(dim=1)
        return AssignResult(
            assigned_labels=assigned_labels,
            assigned_bboxes=assigned_bboxes,
            assigned_scores=scores * norm[..., None],
            fg_mask=fg,
            assigned_gt_idx=gt_idx,
            overlaps=overlaps,
            alignment_metrics=metrics,
            pos_mask_candidates=candidates.bool(),
            pos_mask=pos_mask.bool(),
        )
