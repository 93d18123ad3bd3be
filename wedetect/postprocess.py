"""Post-processing of dense head outputs into detections, in the official order of operations.

Detector (per image): sigmoid -> keep (prior, class) pairs above ``score_thr`` -> best ``nms_pre``
-> map boxes to the original image -> class-aware NMS with the offset trick -> best
``max_per_img`` -> clamp to the image.
Uni (per image): sigmoid -> pairs above 0 -> best ``nms_pre`` -> torchvision ``batched_nms`` per
prompt -> best ``num_proposals`` -> map to the original image -> clamp.

Exact score ties are common, so every sort here is the same (unstable, CPU-deterministic)
``torch.sort`` the official code calls; changing a sort changes which tied pairs survive.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms as tv_batched_nms
from torchvision.ops import box_iou, nms

from .structures import LetterboxMeta

# mmcv's batched_nms runs one NMS over offset boxes below this many candidates, else one per label.
_SPLIT_THR = 10000


@dataclass(frozen=True)
class PostprocessConfig:
    """Official test settings (``test_cfg``)."""

    score_thr: float = 0.001
    nms_pre: int = 30000
    iou_threshold: float = 0.7
    max_per_img: int = 300


def filter_scores_and_topk(scores: torch.Tensor, score_thr: float, topk: int) -> tuple[torch.Tensor, ...]:
    """Pairs with score > ``score_thr`` (row-major over (prior, class)), best ``topk`` by score.

    Returns (scores, prior indices, class indices).
    """
    mask = scores > score_thr
    kept = scores[mask]
    pairs = torch.nonzero(mask)
    kept, order = kept.sort(descending=True)
    n = min(topk, pairs.shape[0])
    pairs = pairs[order[:n]]
    return kept[:n], pairs[:, 0], pairs[:, 1]


def offset_batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Class-aware NMS as mmcv's ``batched_nms``; returns kept indices sorted by score.

    Labels are separated by shifting every box by ``label * (max_coordinate + 1)`` in float32.
    Below 10000 candidates one greedy NMS runs over all shifted boxes; from 10000 on, one per label
    (ascending), whose survivors are read out in candidate order and re-sorted by score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    offsets = labels.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    shifted = boxes + offsets[:, None]
    if shifted.shape[0] < _SPLIT_THR:
        return nms(shifted, scores, iou_threshold)
    return _per_label_nms(shifted, scores, labels, iou_threshold)


def _per_label_nms(shifted: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """Greedy NMS within each label (ascending labels); survivors sorted by score."""
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for label in torch.unique(labels):
        idx = (labels == label).nonzero().view(-1)
        keep_mask[idx[nms(shifted[idx], scores[idx], iou)]] = True
    keep = keep_mask.nonzero().view(-1)
    _, order = scores[keep].sort(descending=True)
    return keep[order]


def to_original(boxes: torch.Tensor, meta: LetterboxMeta) -> torch.Tensor:
    """Input-pixel boxes -> original-image pixels: subtract the pad, divide by the per-axis scale."""
    top, _, left, _ = meta.pad
    sf_w, sf_h = meta.scale
    pad = torch.tensor([left, top, left, top], dtype=torch.float32, device=boxes.device)
    scale = torch.tensor([sf_w, sf_h, sf_w, sf_h], dtype=torch.float32, device=boxes.device)
    return (boxes - pad.to(boxes.dtype)) / scale.to(boxes.dtype)


def clamp_to_image(boxes: torch.Tensor, meta: LetterboxMeta) -> torch.Tensor:
    h, w = meta.orig_size
    x = boxes[:, 0::2].clamp(0, w)
    y = boxes[:, 1::2].clamp(0, h)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


def detector_postprocess(
    logits: torch.Tensor, boxes: torch.Tensor, meta: LetterboxMeta, cfg: PostprocessConfig = PostprocessConfig()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image: logits (N, K) and decoded input-pixel boxes (N, 4) -> (boxes, scores, labels)."""
    scores, prior_idx, labels = filter_scores_and_topk(logits.sigmoid(), cfg.score_thr, cfg.nms_pre)
    if scores.numel() == 0:
        return boxes.new_zeros((0, 4)), scores, labels
    cand = to_original(boxes[prior_idx], meta)
    keep = offset_batched_nms(cand, scores, labels, cfg.iou_threshold)[: cfg.max_per_img]
    return clamp_to_image(cand[keep], meta), scores[keep], labels[keep]


def _labels_cannot_meet(
    boxes: torch.Tensor, shifted: torch.Tensor, labels: torch.Tensor, offset_unit: torch.Tensor, iou: float
) -> bool:
    """True when one NMS over the offset boxes cannot suppress across labels.

    With offset unit M + 1 (M = max coordinate), a box of a higher label reaches a lower label's
    band only if both its x1 and y1 are below -1; only such boxes are checked (IoU as NMS computes it).
    """
    if boxes.numel() == 0:
        return True
    if offset_unit <= 0:
        return False
    risky = ((boxes[:, 0] < 0) & (boxes[:, 1] < 0)).nonzero().view(-1)
    if risky.numel() == 0:
        return True
    overlap = box_iou(shifted[risky], shifted)
    overlap[labels[risky][:, None] == labels[None, :]] = 0
    return not bool((overlap > iou).any())


def detector_postprocess_fast(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    meta: LetterboxMeta,
    cfg: PostprocessConfig = PostprocessConfig(),
    threshold: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``detector_postprocess`` followed by ``score > threshold``, computed with exact shortcuts.

    - ``topk`` instead of a full sort for the ``nms_pre`` cut;
    - pairs at or below ``threshold`` are dropped before NMS: greedy NMS only lets a box be suppressed
      by a higher-scoring one, so the survivors above the threshold do not depend on them. The label
      offset (from the max coordinate over ALL candidates) and the one-NMS/per-label choice (from the
      candidate count) are kept, so every IoU is computed from the same float32 coordinates;
    - on a GPU, above 10000 candidates the per-label loop becomes one NMS over the offset boxes whenever
      no pair of boxes of different labels can reach IoU > threshold after the offset (checked exactly).
    Only the order among exactly tied scores may differ from the reference path.
    """
    scores = logits.sigmoid().flatten()
    num_classes = logits.shape[1]
    passed = scores > cfg.score_thr
    if int(passed.sum()) > cfg.nms_pre:
        cand_scores, idx = scores.topk(cfg.nms_pre)
    else:
        idx = passed.nonzero().view(-1)
        cand_scores = scores[idx]
    if idx.numel() == 0:
        return boxes.new_zeros((0, 4)), cand_scores, idx
    prior, labels = idx // num_classes, idx % num_classes
    cand = to_original(boxes[prior], meta)
    offset_unit = cand.max() + 1
    sel = (cand_scores > threshold).nonzero().view(-1)
    split = idx.numel() >= _SPLIT_THR
    cand, cand_scores, labels = cand[sel], cand_scores[sel], labels[sel]
    shifted = cand + (labels.to(cand) * offset_unit)[:, None]
    # One NMS call is one kernel on a GPU; on a CPU it costs O(n^2) over all labels, the loop far less.
    if not split or (shifted.is_cuda and _labels_cannot_meet(cand, shifted, labels, offset_unit, cfg.iou_threshold)):
        keep = nms(shifted, cand_scores, cfg.iou_threshold)
    else:
        keep = _per_label_nms(shifted, cand_scores, labels, cfg.iou_threshold)
    keep = keep[: cfg.max_per_img]
    return clamp_to_image(cand[keep], meta), cand_scores[keep], labels[keep]


def uni_postprocess(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    meta: LetterboxMeta,
    num_proposals: int = 300,
    nms_pre: int = 30000,
    iou_threshold: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image: objectness logits (N, P) and boxes (N, 4) -> (boxes, scores, prompt ids, prior ids)."""
    scores, prior_idx, labels = filter_scores_and_topk(logits.sigmoid(), 0.0, nms_pre)
    cand = boxes[prior_idx].float()
    keep = tv_batched_nms(cand, scores.float(), labels, iou_threshold)[:num_proposals]
    out = clamp_to_image(to_original(cand[keep], meta), meta)
    return out, scores[keep], labels[keep], prior_idx[keep]
