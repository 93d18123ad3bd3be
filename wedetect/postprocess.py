"""Post-processing of dense head outputs into detections, in the official order of operations.

Detector (per image): sigmoid -> keep (prior, class) pairs above ``score_thr`` -> best ``nms_pre``
-> map boxes to the original image -> class-aware NMS with the offset trick -> best
``max_per_img`` -> clamp to the image.
Uni (per image): sigmoid -> pairs above 0 -> best ``nms_pre`` -> torchvision ``batched_nms`` per
prompt -> best ``num_proposals`` -> map to the original image -> clamp.

The ``*_fast`` variants return the same detections with exact shortcuts (``topk`` cuts, a score
pre-filter, NMS over the shortest prefix of the candidates that holds the final keeps, and on GPUs
one NMS call shared by labels whose boxes cannot suppress one another).

Exact score ties are common, so every sort here is the same (unstable, CPU-deterministic)
``torch.sort`` the official code calls; changing a sort changes which tied pairs survive. The detector's
reference NMS visits candidates in that order too (``mmcv_nms``), where torchvision's kernel sorts stably.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
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


def mmcv_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS visiting candidates in ``torch.sort(descending=True)`` order, as mmcv's ``nms`` does.

    torchvision's kernel sorts stably, which orders exactly tied scores differently; given candidates
    already in the unstable sort's order, its stable sort keeps that order.
    """
    order = scores.sort(descending=True)[1]
    return order[nms(boxes[order], scores[order], iou_threshold)]


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
    shifted = _shift(boxes, labels, boxes.max() + 1)  # a scalar operand: no host-to-device copy, no wait
    if shifted.shape[0] < _SPLIT_THR:
        return mmcv_nms(shifted, scores, iou_threshold)
    return _per_label_nms(shifted, scores, labels, iou_threshold, kernel=mmcv_nms)


def _shift(boxes: torch.Tensor, labels: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """The offset trick: every box moved by ``label * unit`` so that labels cannot overlap."""
    return boxes + (labels.to(boxes) * unit)[:, None]


def _per_label_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    iou: float,
    group: bool | None = None,
    kernel: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = nms,
) -> torch.Tensor:
    """Greedy NMS (``kernel``) within each label (ascending labels); survivors sorted by score.

    Each label's NMS sees its candidates in list order, as ``boxes[labels == label]`` would give them:
    a stable sort by label makes them contiguous, so the loop only slices. With ``group`` (default:
    ``GROUP_LABELS``, else on GPUs), lists of up to ``_GROUP_MAX`` candidates put labels whose boxes cannot
    suppress one another into one NMS call (``_label_groups``): on a GPU every call waits for the
    device, and Uni has 256 labels.
    """
    group = GROUP_LABELS if group is None else group
    if (boxes.is_cuda if group is None else group) and boxes.shape[0] <= _GROUP_MAX:
        key = _label_groups(boxes, scores, labels, iou)
    else:
        key = labels
    order = key.argsort(stable=True)
    boxes, scores_by_key = boxes[order], scores[order]
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    start = 0
    for count in torch.unique_consecutive(key[order], return_counts=True)[1].tolist():
        end = start + count
        keep_mask[order[start + kernel(boxes[start:end], scores_by_key[start:end], iou)]] = True
        start = end
    keep = keep_mask.nonzero().view(-1)
    _, order = scores[keep].sort(descending=True)
    return keep[order]


# Lists up to this long have their pairwise IoUs computed at once (4 bytes per pair) to group labels.
_GROUP_MAX = 8192
# Pairs this close to the NMS threshold count as overlapping: far beyond the float rounding by which
# this IoU and the NMS kernels' may differ, so a pair counted as apart is apart for the kernel too.
_IOU_MARGIN = 1e-4
# Group labels into shared NMS calls: None = on GPUs only (where each call waits for the device);
# True / False force it (benchmarks compare both).
GROUP_LABELS: bool | None = None


def _label_groups(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """A group id per candidate such that one greedy NMS per group equals one per label.

    Within one NMS call a box is suppressed only by a kept, higher-scoring box with IoU above the
    threshold. If no pair of boxes of different labels in a call can reach it, the call suppresses
    exactly as the per-label calls do: same pairs, same IoUs, same order by score, except among exactly
    tied scores, whose order the call's own sort decides; that matters only for an overlapping tied pair
    of one label, so such a label keeps a call of its own. Labels with a pair near the threshold go to
    different groups: greedy colouring of the label conflict graph, most conflicted label first, on the
    host (one wait for the device).
    """
    uniq, lab = labels.unique(return_inverse=True)
    n = uniq.numel()
    near = box_iou(boxes, boxes) > iou - _IOU_MARGIN  # NaN (zero-area pairs) is not near, as in the kernels
    same = lab[:, None] == lab[None, :]
    tied = near & same & (scores[:, None] == scores[None, :])
    tied.fill_diagonal_(False)
    onehot = torch.nn.functional.one_hot(lab, n).to(boxes.dtype)
    clash = (onehot.T @ (near & ~same).to(boxes.dtype) @ onehot) > 0  # label pairs with a pair near the threshold
    alone = (onehot.T @ tied.any(1).to(boxes.dtype)) > 0  # labels with an overlapping tied pair
    clash = (clash | alone[:, None] | alone[None, :]).cpu().numpy()
    group = np.full(n + 1, n)  # the extra slot stands for "not coloured yet"
    for label in np.argsort(-clash.sum(1), kind="stable"):
        used = np.zeros(n + 1, dtype=bool)
        used[group[:n][clash[label]]] = True
        group[label] = int(np.argmin(used))  # the first free group
    return torch.from_numpy(group[:n]).to(labels.device)[lab]


def nms_best_prefix(
    scores: torch.Tensor, n: int, max_keep: int, run: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The best ``max_keep`` survivors of a greedy NMS over the best ``n`` of ``scores`` (1-D, any
    order), computed on as few of them as possible; returns indices into ``scores``, best first.

    ``run(idx)`` gets the indices of the best m candidates in descending score order and returns the
    NMS survivors among them as positions into ``idx``, sorted by score. Greedy NMS lets a box be
    suppressed only by a higher-scoring one, so the survivors among a prefix are the full run's
    survivors restricted to it; once a prefix holds ``max_keep`` of them they are the final ones. The
    prefix starts at 4 x ``max_keep``, grows 4x until then and never ends inside a group of tied
    scores. Only the prefix is ever ordered (a ``topk``), never all ``n`` candidates.
    """
    m = min(n, 4 * max_keep)
    while True:
        top, idx = _topk(scores, m)
        if m < n:
            closed = min(n, int((scores >= top[-1]).sum()))
            if closed > m:
                m = closed
                idx = _topk(scores, m)[1]
        keep = idx[run(idx)]
        if keep.numel() >= max_keep or m >= n:
            return keep[:max_keep]
        m = min(n, 4 * m)


def _topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(k)`` (1-D), cheaper when k is far below ``scores.numel()``: a strided sample guesses
    a value q that about 2k scores reach; if at least k do, the best k all lie among them."""
    n = scores.numel()
    stride = n // (16 * k) if k else 0
    if stride < 2:
        return scores.topk(k)
    sample = scores[::stride]
    q = sample.topk(min(sample.numel(), 2 * -(-k // stride)))[0][-1]
    pool = (scores >= q).nonzero().view(-1)
    if pool.numel() < k:
        return scores.topk(k)
    top, i = scores[pool].topk(k)
    return top, pool[i]


def to_original(boxes: torch.Tensor, meta: LetterboxMeta) -> torch.Tensor:
    """Input-pixel boxes -> original-image pixels: subtract the pad, divide by the per-axis scale."""
    top, _, left, _ = meta.pad
    sf_w, sf_h = meta.scale
    # Queued, not waited for: a blocking copy to a GPU would wait for all the work queued before it.
    pad_scale = torch.tensor([[left, top, left, top], [sf_w, sf_h, sf_w, sf_h]], dtype=torch.float32)
    pad, scale = pad_scale.to(boxes.device, non_blocking=True).to(boxes.dtype)
    return (boxes - pad) / scale


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
    - NMS runs on the shortest prefix of the sorted candidates that holds the ``max_per_img`` keeps
      (``nms_best_prefix``);
    - on a GPU, above 10000 candidates the per-label loop becomes one NMS over the offset boxes whenever
      no pair of boxes of different labels can reach IoU > threshold after the offset (checked exactly).
    Only exactly tied scores may differ from the reference path: their order, and which of two tied
    boxes of one label overlapping above the NMS threshold survives (torchvision's NMS visits ties in
    stable order, the reference in ``torch.sort``'s as mmcv).
    """
    scores = logits.sigmoid().flatten()
    num_classes = logits.shape[1]
    passed = scores > cfg.score_thr
    # Both counts in one read from the device. The candidates are the best of the passed pairs, so the
    # pairs above ``threshold`` among them are all of them or all pairs above it, whichever is fewer.
    num_passed, num_above = torch.stack([passed.sum(), (scores > max(threshold, cfg.score_thr)).sum()]).tolist()
    if num_passed > cfg.nms_pre:
        cand_scores, idx = _topk(scores, cfg.nms_pre)
    else:
        idx = passed.nonzero().view(-1)
        cand_scores = scores[idx]
    if idx.numel() == 0:
        return boxes.new_zeros((0, 4)), cand_scores, idx
    prior, labels = idx // num_classes, idx % num_classes
    cand = to_original(boxes[prior], meta)
    offset_unit = cand.max() + 1
    split = idx.numel() >= _SPLIT_THR
    shifted = _shift(cand, labels, offset_unit)
    iou = cfg.iou_threshold

    def run(pos: torch.Tensor) -> torch.Tensor:
        b, s, lab = shifted[pos], cand_scores[pos], labels[pos]
        # One NMS call is one kernel on a GPU; on a CPU the per-label loop is cheaper for many boxes.
        if not split or (b.is_cuda and _labels_cannot_meet(cand[pos], b, lab, offset_unit, iou)):
            return nms(b, s, iou)
        return _per_label_nms(b, s, lab, iou)

    keep = nms_best_prefix(cand_scores, min(num_above, idx.numel()), cfg.max_per_img, run)
    return clamp_to_image(cand[keep], meta), cand_scores[keep], labels[keep]


@dataclass(frozen=True)
class UniPostprocessConfig:
    """Official proposal settings: every pair above 0, best 30000, NMS 0.7 per prompt."""

    nms_pre: int = 30000
    iou_threshold: float = 0.7


def uni_postprocess(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    meta: LetterboxMeta,
    num_proposals: int = 300,
    cfg: UniPostprocessConfig = UniPostprocessConfig(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image: objectness logits (N, P) and boxes (N, 4) -> (boxes, scores, prompt ids, prior ids)."""
    scores, prior_idx, labels = filter_scores_and_topk(logits.sigmoid(), 0.0, cfg.nms_pre)
    cand = boxes[prior_idx].float()
    keep = tv_batched_nms(cand, scores.float(), labels, cfg.iou_threshold)[:num_proposals]
    out = clamp_to_image(to_original(cand[keep], meta), meta)
    return out, scores[keep], labels[keep], prior_idx[keep]


def uni_postprocess_fast(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    meta: LetterboxMeta,
    num_proposals: int = 300,
    cfg: UniPostprocessConfig = UniPostprocessConfig(),
    threshold: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``uni_postprocess`` followed by ``score > threshold``, with the detector's exact shortcuts:
    ``topk`` for the ``nms_pre`` cut (no full sort of all prior x prompt pairs), pairs at or below
    ``threshold`` dropped before NMS, NMS on the shortest prefix that holds the keeps. Each prefix is
    suppressed as torchvision's ``batched_nms`` would the whole candidate list: per prompt above its
    size switch, else one NMS over boxes offset by the maximum coordinate of all candidates.
    """
    scores = logits.sigmoid().flatten()
    num_prompts = logits.shape[1]
    # The candidates the reference suppresses, and those above ``threshold``: one read from the device.
    num_positive, num_above = torch.stack([(scores > 0).sum(), (scores > max(threshold, 0.0)).sum()]).tolist()
    n = min(cfg.nms_pre, num_positive)
    # torchvision's batched_nms switch: per-class loop above 4000 coordinates on CPU, 20000 elsewhere;
    # below it one NMS over boxes offset by the largest coordinate of all n candidates.
    per_label = 4 * n > (4000 if boxes.device.type == "cpu" else 20000)
    unit = None if per_label or n == 0 else boxes[_topk(scores, n)[1] // num_prompts].float().max() + 1
    iou = cfg.iou_threshold

    def run(idx: torch.Tensor) -> torch.Tensor:
        b, s, lab = boxes[idx // num_prompts].float(), scores[idx], idx % num_prompts
        return _per_label_nms(b, s, lab, iou) if unit is None else nms(_shift(b, lab, unit), s, iou)

    keep = nms_best_prefix(scores, min(n, num_above), num_proposals, run)
    prior, labels = keep // num_prompts, keep % num_prompts
    out = clamp_to_image(to_original(boxes[prior].float(), meta), meta)
    return out, scores[keep], labels, prior
