"""Referring-expression (REC) evaluation of WeDetect-Ref, as the official ``eval_grounding`` protocol.

WeDetect-Ref scores up to 100 class-agnostic proposals per (image, expression). This module turns those
per-proposal scores into predictions exactly as the official evaluation loop does, and computes the four
metric families the paper reports:

* RefCOCO / RefCOCO+ / RefCOCOg: precision@k (k = 1, 5, 10) at IoU 0.5;
* gRefCOCO: F1_score / T_acc / N_acc;
* HumanRef: recall / precision / DensityF1 at IoU 0.5 and 0.5:0.95, rejection score;
* D3 (DOD): COCO bbox mAP with one category per sentence, plus mAP by sentence length.

By default every number reproduces the official code, quirks included (float32 IoU, first-annotation-only
gRefCOCO GT, HumanRef's ``numpy.arange`` thresholds, D3's ``split(' ')`` word count ...). The known flaws
of the official scoring are fixed only with ``corrected=True``; each metric function lists what that
changes.

Typical use::

    dataset = load_rec_dataset("refcoco", folder)
    scores = load_model_scores("model_scores.npz", dataset)      # or score_dataset(dataset, scorer)
    predictions = postprocess_dataset(dataset, scores, PostprocessConfig(num_select=20))
    results = dataset.evaluate(predictions)
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    import torch

from wedetect.errors import WeDetectError

__all__ = [
    "QUERY_TEMPLATE",
    "MAX_PROPOSALS",
    "REC_KINDS",
    "RecError",
    "PostprocessConfig",
    "RecPrediction",
    "RecSample",
    "RecDataset",
    "RefCocoDataset",
    "GRefCocoDataset",
    "HumanRefDataset",
    "D3Dataset",
    "GRefTarget",
    "HumanRefTarget",
    "Scorer",
    "ProposalSource",
    "bbox_overlaps",
    "postprocess_scores",
    "postprocess_dataset",
    "refcoco_first_hit_ranks",
    "refcoco_precision_at_k",
    "grefcoco_metrics",
    "humanref_metrics",
    "d3_metrics",
    "load_proposals",
    "load_rec_dataset",
    "load_model_scores",
    "save_model_scores",
    "score_dataset",
]

QUERY_TEMPLATE = 'Please detect the "{}" in the image'
"""The prompt the official evaluation sends for every dataset (the expression is inserted verbatim)."""

MAX_PROPOSALS = 100
"""Only the first 100 proposals of an image are scored."""

REC_KINDS = ("refcoco", "grefcoco", "humanref", "d3")

# numpy.arange(0.5, 1.0, 0.05) as the official HumanRef evaluator builds it: from the third value on the
# thresholds lie slightly above the nominal 0.60 ... 0.95, so an IoU exactly at those values fails.
HUMANREF_IOU_THRESHOLDS = tuple(float(t) for t in np.arange(0.5, 1.0, 0.05))
HUMANREF_NOMINAL_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
HUMANREF_BUCKETS = (("1", 1, 1), ("2-5", 2, 5), ("6-10", 6, 10), (">10", 11, math.inf))
D3_LENGTH_BUCKETS = (("short", 1, 3), ("mid", 4, 6), ("long", 7, 9), ("very_long", 10, math.inf))
D3_SUBSETS = {"FULL": "d3_full_annotations.json", "PRES": "d3_pres_annotations.json", "ABS": "d3_abs_annotations.json"}
REFCOCO_SPLITS = (
    "refcoco_validation", "refcoco_test", "refcoco_testB",
    "refcocoplus_validation", "refcocoplus_test", "refcocoplus_testB",
    "refcocog_validation", "refcocog_test",
)
GREFCOCO_SPLITS = ("val", "testA", "testB")


class RecError(WeDetectError):
    """Bad REC evaluation input: missing dataset files, mismatched scores, metric undefined on the data."""


# --------------------------------------------------------------------------------------------------------
# Post-processing (the official main loop)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostprocessConfig:
    """How per-proposal scores become predictions (the official ``eval.py`` flags).

    Attributes:
        num_select: ``--num_select``: keep the best k rows by score (top-k mode). The official default is
            300; the README uses 20 for RefCOCO.
        score_threshold: ``--score_thre``: when set, keep the rows with score strictly greater than it, in
            their current order, instead of the top-k (needed for any rejection metric).
        nms: ``--nms``: class-aware NMS (class = query) before the threshold / top-k.
        nms_iou: IoU of that NMS.
        single_box: ``--single_box``: one row per proposal with its best query; optional NMS, no top-k,
            no threshold.
        max_rows: with more rows than this (all queries concatenated) only the best ones are kept first.
    """

    num_select: int = 300
    score_threshold: float | None = None
    nms: bool = False
    nms_iou: float = 0.7
    single_box: bool = False
    max_rows: int = 1000

    def __post_init__(self) -> None:
        if self.num_select < 1:
            raise RecError(f"num_select must be >= 1, got {self.num_select}")
        if self.score_threshold is not None and not 0.0 < self.score_threshold < 1.0:
            # The official script treats a threshold <= 0 as "use top-k"; refuse it rather than guess.
            raise RecError(f"score_threshold must lie in (0, 1) (omit it for top-k), got {self.score_threshold}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise RecError(f"nms_iou must lie in (0, 1], got {self.nms_iou}")
        if self.max_rows < 1:
            raise RecError(f"max_rows must be >= 1, got {self.max_rows}")


@dataclass(frozen=True)
class RecPrediction:
    """Predictions of one evaluation unit, in the order the metric reads them.

    ``boxes`` (n, 4) float32 xyxy in original-image pixels, ``scores`` (n,) float32, ``labels`` (n,) int64:
    the sample's label of the query that produced the row (query index, D3: sentence id).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> RecPrediction:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))


def postprocess_scores(
    boxes: np.ndarray,
    scores: np.ndarray,
    config: PostprocessConfig,
    labels: Sequence[int] | None = None,
) -> RecPrediction:
    """Per-proposal scores of one sample -> its predictions, as the official evaluation loop.

    Args:
        boxes: (N, 4) proposals (already clamped; float32).
        scores: (Q, N) score of every proposal for each of the sample's Q queries.
        config: the post-processing flags.
        labels: label of each query (default: the query index).

    Rows are (box, score, query) concatenated query after query, each in proposal order. Then: more than
    ``max_rows`` rows -> the best ``max_rows`` by score; ``nms`` -> class-aware NMS (survivors by
    descending score); a threshold keeps ``score > t`` in the current order, otherwise the best
    ``num_select`` rows come out by descending score. ``single_box`` instead keeps one row per proposal
    (its best query), optionally NMS-ed.
    """
    import torch  # deferred: keeps `wedetect --help` fast
    from torchvision.ops import batched_nms

    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
    scores_t = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    if scores_t.ndim != 2 or scores_t.shape[1] != boxes_t.shape[0]:
        raise RecError(f"scores must have shape (queries, {boxes_t.shape[0]}), got {tuple(scores_t.shape)}")
    num_queries, num_boxes = scores_t.shape
    label_map = torch.arange(num_queries) if labels is None else torch.as_tensor(list(labels), dtype=torch.int64)
    if label_map.numel() != num_queries:
        raise RecError(f"{num_queries} score rows but {label_map.numel()} labels")
    if num_queries == 0 or num_boxes == 0:
        return RecPrediction.empty()

    if config.single_box:
        row_scores, row_query = scores_t.max(dim=0)
        row_boxes = boxes_t
        if config.nms:
            keep = batched_nms(row_boxes, row_scores, row_query, config.nms_iou)
            row_boxes, row_scores, row_query = row_boxes[keep], row_scores[keep], row_query[keep]
        return _prediction(row_boxes, row_scores, label_map[row_query])

    row_boxes = boxes_t.repeat(num_queries, 1)
    row_scores = scores_t.reshape(-1)
    row_query = torch.arange(num_queries).repeat_interleave(num_boxes)
    if row_scores.numel() > config.max_rows:
        row_scores, order = row_scores.topk(config.max_rows)
        row_boxes, row_query = row_boxes[order], row_query[order]
    if config.nms:
        keep = batched_nms(row_boxes, row_scores, row_query, config.nms_iou)
        row_boxes, row_scores, row_query = row_boxes[keep], row_scores[keep], row_query[keep]
    if config.score_threshold is not None:
        keep = row_scores > config.score_threshold
    else:
        _, keep = row_scores.topk(min(config.num_select, row_scores.numel()))
    return _prediction(row_boxes[keep], row_scores[keep], label_map[row_query[keep]])


def _prediction(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> RecPrediction:
    return RecPrediction(
        boxes.numpy().astype(np.float32, copy=False).reshape(-1, 4),
        scores.numpy().astype(np.float32, copy=False),
        labels.numpy().astype(np.int64, copy=False),
    )


def postprocess_dataset(
    dataset: RecDataset, scores: Sequence[np.ndarray], config: PostprocessConfig
) -> list[RecPrediction]:
    """Apply :func:`postprocess_scores` to every sample (``scores[i]`` is sample i's (Q, N) matrix)."""
    if len(scores) != len(dataset.samples):
        raise RecError(f"{len(scores)} score matrices for {len(dataset.samples)} samples")
    return [postprocess_scores(s.proposals, sc, config, s.labels) for s, sc in zip(dataset.samples, scores)]


# --------------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------------


def bbox_overlaps(boxes1: np.ndarray, boxes2: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """IoU matrix (n, m) as the official ``bbox_overlaps``: float32, areas without +1, union floored at eps.

    Kept in float32 on purpose: the official numbers depend on it (an IoU just under 0.5 in float64 can be
    exactly 0.5 in float32).
    """
    b1 = np.asarray(boxes1, dtype=np.float32).reshape(-1, 4)
    b2 = np.asarray(boxes2, dtype=np.float32).reshape(-1, 4)
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    x1 = np.maximum(b1[:, None, 0], b2[None, :, 0])
    y1 = np.maximum(b1[:, None, 1], b2[None, :, 1])
    x2 = np.minimum(b1[:, None, 2], b2[None, :, 2])
    y2 = np.minimum(b1[:, None, 3], b2[None, :, 3])
    overlap = np.maximum(x2 - x1, np.float32(0)) * np.maximum(y2 - y1, np.float32(0))
    union = np.maximum(area1[:, None] + area2[None, :] - overlap, np.float32(eps))
    return (overlap / union).astype(np.float32, copy=False)


def _humanref_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """HumanRef's own IoU: float64, no eps, 0 for boxes that do not overlap (or only touch)."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    if ix2 <= ix1 or iy2 <= iy1:
        return 0.0
    inter = (ix2 - ix1) * (iy2 - iy1)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter)


def _clamp_proposals(raw: np.ndarray, height: int, width: int) -> np.ndarray:
    """First MAX_PROPOSALS proposals, clamped to the image (x to [0, W], y to [0, H]), float32."""
    boxes = np.asarray(raw, dtype=np.float32).reshape(-1, 4)[:MAX_PROPOSALS].copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


# --------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------


def refcoco_first_hit_ranks(
    pred_boxes: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
    corrected: bool = False,
) -> list[int | None]:
    """Per sample, the 1-based rank of the first prediction (in received order) with IoU >= threshold.

    The official metric supports exactly one GT box and at least one prediction per sample and crashes
    otherwise; here that is a :class:`RecError`. ``corrected=True`` scores a sample without predictions as
    a miss and a multi-box GT as hit by any of its boxes.
    """
    if len(pred_boxes) != len(gt_boxes):
        raise RecError(f"{len(pred_boxes)} predictions for {len(gt_boxes)} samples")
    ranks: list[int | None] = []
    for i, (pred, gt) in enumerate(zip(pred_boxes, gt_boxes)):
        pred = np.asarray(pred, dtype=np.float32).reshape(-1, 4)
        gt = np.asarray(gt, dtype=np.float32).reshape(-1, 4)
        if not corrected and gt.shape[0] != 1:
            raise RecError(
                f"sample {i} has {gt.shape[0]} ground-truth boxes; the official RefCOCO metric supports exactly "
                "one (use corrected=True / --corrected to accept any of several)"
            )
        if not corrected and pred.shape[0] == 0:
            raise RecError(
                f"sample {i} has no prediction; the official RefCOCO metric needs at least one "
                "(use top-k selection, or corrected=True / --corrected to count it as a miss)"
            )
        if pred.shape[0] == 0 or gt.shape[0] == 0:
            ranks.append(None)
            continue
        hits = np.flatnonzero((bbox_overlaps(pred, gt) >= iou_threshold).any(axis=1))
        ranks.append(int(hits[0]) + 1 if hits.size else None)
    return ranks


def refcoco_precision_at_k(ranks: Sequence[int | None], ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """Precision@k from first-hit ranks: fraction of samples hit within their first k predictions."""
    if not ranks:
        raise RecError("precision@k of an empty split is undefined")
    return {f"P@{k}": sum(r is not None and r <= k for r in ranks) / len(ranks) for k in ks}


@dataclass(frozen=True)
class GRefTarget:
    """Annotations of one gRefCOCO expression in file order: xyxy boxes (float64) and category ids."""

    boxes: np.ndarray
    category_ids: tuple[int, ...]


def grefcoco_metrics(
    pred_boxes: Sequence[np.ndarray],
    targets: Sequence[GRefTarget],
    iou_threshold: float = 0.5,
    corrected: bool = False,
) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """gRefCOCO F1_score / T_acc / N_acc of one split, and per-expression details.

    Official: the GT is the expression's first annotation in file order only (crowd or not); it is a
    no-target expression when that annotation has category -1. A no-target expression scores F1 = 1 iff it
    has no prediction; a target expression is greedily matched at IoU >= 0.5 (float32), F1 = 2TP/(2TP+FP+FN).
    ``F1_score`` = fraction with F1 >= 1, ``T_acc`` = fraction of target expressions with a prediction,
    ``N_acc`` = fraction of no-target expressions without one.

    ``corrected=True``: all target annotations (category != -1) are the GT, an expression is no-target iff
    it has none, and a ratio without any expression of its kind is ``None`` instead of an error.
    """
    if len(pred_boxes) != len(targets):
        raise RecError(f"{len(pred_boxes)} predictions for {len(targets)} expressions")
    per_sample = []
    for i, (pred, target) in enumerate(zip(pred_boxes, targets)):
        pred = np.asarray(pred, dtype=np.float32).reshape(-1, 4)
        if corrected:
            is_target = np.asarray([c != -1 for c in target.category_ids], dtype=bool)
            gt = np.asarray(target.boxes).reshape(-1, 4)[is_target]
            no_target = gt.shape[0] == 0
        else:
            if not target.category_ids:
                raise RecError(
                    f"expression {i} has no annotation; the official metric needs one "
                    "(corrected=True / --corrected treats it as a no-target expression)"
                )
            gt = np.asarray(target.boxes).reshape(-1, 4)[:1]
            no_target = target.category_ids[0] == -1
        n_pred = int(pred.shape[0])
        if no_target:
            tp, f1 = 0, 1.0 if n_pred == 0 else 0.0
        else:
            tp = _greedy_matches(bbox_overlaps(pred, gt), iou_threshold)
            fp, fn = n_pred - tp, gt.shape[0] - tp
            f1 = 2 * tp / (2 * tp + fp + fn)
        per_sample.append({"no_target": no_target, "n_pred": n_pred, "tp": tp, "f1": f1})

    n_target = sum(not s["no_target"] for s in per_sample)
    n_empty = len(per_sample) - n_target
    for count, name in ((n_target, "T_acc (no target expression)"), (n_empty, "N_acc (no no-target expression)")):
        if count == 0 and not corrected:
            raise RecError(
                f"{name} is undefined on this split: the official metric divides by zero "
                "(corrected=True / --corrected reports null)"
            )
    metrics = {
        "F1_score": sum(s["f1"] >= 1.0 for s in per_sample) / len(per_sample) if per_sample else None,
        "T_acc": sum(not s["no_target"] and s["n_pred"] > 0 for s in per_sample) / n_target if n_target else None,
        "N_acc": sum(s["no_target"] and s["n_pred"] == 0 for s in per_sample) / n_empty if n_empty else None,
    }
    return metrics, per_sample


def _greedy_matches(ious: np.ndarray, threshold: float) -> int:
    """Count greedy one-to-one matches: repeatedly take the global best pair while its IoU >= threshold."""
    ious = ious.copy()
    matches = 0
    for _ in range(min(ious.shape)):
        row, col = np.unravel_index(int(np.argmax(ious)), ious.shape)
        if ious[row, col] < threshold:
            break
        matches += 1
        ious[row, :] = 0
        ious[:, col] = 0
    return matches


@dataclass(frozen=True)
class HumanRefTarget:
    """Ground truth of one HumanRef sample."""

    id: str
    domain: str
    sub_domain: str
    answer_boxes: tuple[tuple[float, float, float, float], ...]
    total_persons: int

    @property
    def is_rejection(self) -> bool:
        return self.domain == "rejection"


def humanref_metrics(
    pred_boxes: Sequence[np.ndarray], targets: Sequence[HumanRefTarget], corrected: bool = False
) -> dict[str, Any]:
    """HumanRef recall / precision / DensityF1 (RexSeek's evaluator), per group and overall.

    Rejection samples are only counted: ``rejection_score`` is the official absolute count of those with no
    prediction (``rejection_rate`` is that count over ``rejection_total``). Every other sample is scored at
    the 10 IoU thresholds 0.5:0.95: each GT (file order) takes the unused prediction of highest IoU >= t
    (first one on ties, in prediction order); recall = matches/#GT, precision = matches/#pred,
    DensityF1 = F1 * min(1, (#GT/N)/(#pred/N)) with N = number of candidate persons. Group values are means
    over samples of the per-sample values (``*_50`` at 0.5, ``*_mean`` over the 10 thresholds).

    ``corrected=True`` uses the nominal thresholds 0.50, 0.55, ..., 0.95 instead of ``numpy.arange``'s
    (whose values from 0.60 on lie slightly above nominal, so an IoU exactly at them fails).
    """
    if len(pred_boxes) != len(targets):
        raise RecError(f"{len(pred_boxes)} predictions for {len(targets)} samples")
    thresholds = HUMANREF_NOMINAL_THRESHOLDS if corrected else HUMANREF_IOU_THRESHOLDS
    per_sample: list[dict[str, Any]] = []
    rejection = []
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {"domain": {}, "subdomain": {}, "box_count": {}}
    for pred, target in zip(pred_boxes, targets):
        preds = np.asarray(pred, dtype=np.float32).reshape(-1, 4).tolist()
        if target.is_rejection:
            rejection.append({"id": target.id, "n_pred": len(preds)})
            continue
        if not target.answer_boxes:
            raise RecError(f"HumanRef sample {target.id!r} has no answer box but its domain is not 'rejection'")
        row = {"id": target.id, **_humanref_sample(preds, target, thresholds)}
        per_sample.append(row)
        bucket = next(name for name, lo, hi in HUMANREF_BUCKETS if lo <= row["n_gt"] <= hi)
        for kind, key in (("domain", target.domain), ("subdomain", target.sub_domain), ("box_count", bucket)):
            groups[kind].setdefault(key, []).append(row)
    n_correct = sum(r["n_pred"] == 0 for r in rejection)
    return {
        "overall": _humanref_means(per_sample),
        "groups": {kind: {k: _humanref_means(v) for k, v in g.items()} for kind, g in groups.items()},
        "rejection_score": n_correct,
        "rejection_total": len(rejection),
        "rejection_rate": n_correct / len(rejection) if rejection else None,
        "per_sample": per_sample,
        "rejection_samples": rejection,
    }


_HUMANREF_FIELDS = ("recall_50", "recall_mean", "precision_50", "precision_mean", "density_f1_50", "density_f1_mean")


def _humanref_sample(preds: list[list[float]], target: HumanRefTarget, thresholds: Sequence[float]) -> dict[str, Any]:
    gts = target.answer_boxes
    n_gt, n_pred, total = len(gts), len(preds), target.total_persons
    ious = [[_humanref_iou(g, p) for p in preds] for g in gts]
    recalls, precisions, density_f1s = [], [], []
    for t in thresholds:
        used: set[int] = set()
        for row in ious:
            best, best_iou = None, -1.0
            for j, iou in enumerate(row):
                if j not in used and iou >= t and iou > best_iou:
                    best, best_iou = j, iou
            if best is not None:
                used.add(best)
        recall = len(used) / n_gt
        precision = len(used) / n_pred if n_pred else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        # The official ratio is written (#GT/N)/(#pred/N), which is not bitwise #GT/#pred.
        density = min(1.0, (n_gt / total) / (n_pred / total)) if n_pred and total else 0.0
        recalls.append(recall)
        precisions.append(precision)
        density_f1s.append(f1 * density)
    return {
        "recall_50": recalls[0],
        "precision_50": precisions[0],
        "recall_mean": float(np.mean(recalls)),
        "precision_mean": float(np.mean(precisions)),
        "total_persons": total,
        "n_pred": n_pred,
        "n_gt": n_gt,
        "density_f1_50": density_f1s[0],
        "density_f1_mean": float(np.mean(density_f1s)),
    }


def _humanref_means(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    means: dict[str, Any] = {f: float(np.mean([r[f] for r in rows])) if rows else None for f in _HUMANREF_FIELDS}
    means["count"] = len(rows)
    return means


D3_REPORTED = (
    "mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "mAP_short", "mAP_mid", "mAP_long", "mAP_very_long",
)


def d3_metrics(
    annotations: dict[str, Any],
    predictions: Sequence[tuple[int, RecPrediction]],
    corrected: bool = False,
) -> dict[str, Any]:
    """D3 (DOD) mAP of one annotation file: pycocotools COCOeval with each sentence as a category.

    Args:
        annotations: the COCO-style annotation file (``categories`` = sentences, ``id`` = sentence id).
        predictions: (image id, prediction with labels = sentence ids) pairs.

    Returns ``reported`` (the official dict, rounded to 3 decimals), ``unrounded``, ``coco_stats`` (the 12
    COCOeval stats; default maxDets 1/10/100) and ``per_sentence_ap`` (AP over IoU and recall at area all,
    100 detections; ``None`` for a sentence without GT). Length buckets (words by ``split(' ')``: 1-3, 4-6,
    7-9, >= 10) average the defined APs; an empty bucket is an error, as the official code divides by zero.

    ``corrected=True`` counts words with ``split()`` (a double space is not an extra word) and reports an
    empty bucket as ``None``.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RecError("D3 evaluation needs pycocotools: pip install 'wedetect[eval]'") from exc

    results = []
    for image_id, pred in predictions:
        for (x1, y1, x2, y2), score, label in zip(pred.boxes.tolist(), pred.scores.tolist(), pred.labels.tolist()):
            results.append({"image_id": int(image_id), "category_id": int(label),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    if not results:
        raise RecError("no D3 prediction at all: COCO mAP is undefined (lower --score-thre?)")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = annotations
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = [float(v) for v in coco_eval.stats]

    names = {c["id"]: c["name"] for c in annotations["categories"]}
    precision = coco_eval.eval["precision"]  # (iou, recall, category, area, maxDets)
    per_sentence = []
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        name = names[cat_id]
        words = len(name.split()) if corrected else len(name.split(" "))
        per_sentence.append({"category_id": int(cat_id), "name": name, "words": words,
                             "ap": float(np.mean(p)) if p.size else None})
    unrounded = dict(zip(D3_REPORTED[:6], stats[:6]))
    for bucket, lo, hi in D3_LENGTH_BUCKETS:
        aps = [s["ap"] for s in per_sentence if s["ap"] is not None and lo <= s["words"] <= hi]
        if not aps and not corrected:
            raise RecError(
                f"no sentence with ground truth in the {bucket!r} length bucket: the official D3 metric divides "
                "by zero here (use corrected=True / --corrected to report null)"
            )
        unrounded[f"mAP_{bucket}"] = float(np.mean(aps)) if aps else None
    reported = {k: (round(v, 3) if v is not None else None) for k, v in unrounded.items()}
    return {"reported": reported, "unrounded": unrounded, "coco_stats": stats, "per_sentence_ap": per_sentence}


# --------------------------------------------------------------------------------------------------------
# Datasets in the official layouts
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecSample:
    """One evaluation unit: an image, its queries and its (clamped) proposals.

    Attributes:
        uid: expression id (RefCOCO, gRefCOCO, HumanRef) or image id (D3).
        subset: split name (RefCOCO, gRefCOCO); empty for HumanRef and D3.
        image: image file name, relative to the image root.
        image_size: (height, width) in pixels.
        expressions: the referring expressions, one network pass each (D3: the group's sentences).
        labels: label of each expression's predictions (its index; D3: the sentence id).
        proposals: (N, 4) float32 xyxy, the first 100 proposals clamped to the image.
    """

    uid: int | str
    subset: str
    image: str
    image_size: tuple[int, int]
    expressions: tuple[str, ...]
    labels: tuple[int, ...]
    proposals: np.ndarray = field(repr=False)

    @property
    def prompts(self) -> list[str]:
        """The prompts the official evaluation sends for this sample's expressions."""
        return [QUERY_TEMPLATE.format(e) for e in self.expressions]


class RecDataset(ABC):
    """A REC benchmark read from a folder in the official layout, with its metric."""

    kind: ClassVar[str]

    def __init__(self, samples: list[RecSample], folder: Path) -> None:
        self.samples = samples
        self.folder = folder

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    @abstractmethod
    def from_folder(
        cls, folder: str | Path, image_root: str | Path | None = None, proposals: ProposalSource | None = None
    ) -> RecDataset:
        """Read the dataset files from ``folder``.

        Image sizes come from ``images.json``, the dataset files, or the images under ``image_root``
        (default: ``folder``). Proposals come from ``folder/proposals.json`` unless ``proposals`` is given
        (HumanRef always uses its candidate boxes).
        """

    @abstractmethod
    def evaluate(self, predictions: Sequence[RecPrediction], corrected: bool = False) -> dict[str, Any]:
        """Metrics of per-sample predictions (``samples`` order); ``corrected`` fixes the official flaws."""

    @abstractmethod
    def summary(self, results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
        """Header and rows of the headline table of :meth:`evaluate`'s results."""

    def _check_predictions(self, predictions: Sequence[RecPrediction]) -> None:
        if len(predictions) != len(self.samples):
            raise RecError(f"{len(predictions)} predictions for {len(self.samples)} {self.kind} samples")


class _ImageSizes:
    """Resolves image sizes: ``images.json`` ({file: {width, height}}), else the image file itself."""

    def __init__(self, folder: Path, image_root: Path | None) -> None:
        path = folder / "images.json"
        self._known = _read_json(path) if path.is_file() else {}
        self._root = image_root if image_root is not None else folder

    def __call__(self, name: str, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        if name in self._known:
            entry = self._known[name]
            return int(entry["height"]), int(entry["width"])
        if height is not None and width is not None:
            return int(height), int(width)
        path = self._root / name
        if not path.is_file():
            raise RecError(f"size of image {name!r} unknown: not in images.json and {path} does not exist")
        from PIL import Image

        with Image.open(path) as image:
            w, h = image.size
        return h, w


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise RecError(f"missing dataset file: {path}") from None
    except json.JSONDecodeError as exc:
        raise RecError(f"{path} is not valid JSON: {exc}") from None


def load_proposals(path: str | Path) -> dict[str, np.ndarray]:
    """Read an official proposal file: image file name -> boxes (xyxy pixels, rank order).

    A value is either a list of boxes or a pair ``[boxes, scores]``. The official script tells them apart
    by ``len(value) == 2`` (so it misreads an image with exactly two proposals); here the structure decides.
    """
    raw = _read_json(Path(path))
    if not isinstance(raw, dict):
        raise RecError(f"{path}: expected an object mapping image names to proposal lists")
    out = {}
    for name, value in raw.items():
        if _is_box_scores_pair(value):
            value = value[0]
        if isinstance(value, list) and not value:
            out[name] = np.zeros((0, 4), np.float32)
            continue
        try:
            boxes = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):  # ragged or non-numeric
            boxes = None
        if boxes is None or boxes.ndim != 2 or boxes.shape[1] != 4:
            raise RecError(f"{path}: proposals of {name!r} are not a list of [x1, y1, x2, y2] boxes")
        out[name] = boxes
    return out


def _is_box_scores_pair(value: Any) -> bool:
    return (
        isinstance(value, list) and len(value) == 2
        and isinstance(value[0], list) and isinstance(value[1], list)
        and all(isinstance(b, list) for b in value[0])
        and all(isinstance(s, (int, float)) for s in value[1])
        and len(value[0]) == len(value[1])
    )


ProposalSource = Callable[[str], np.ndarray]
"""Image file name -> its proposals (xyxy pixels, rank order); clamping and the 100 cap are applied after."""


def _file_proposals(folder: Path) -> ProposalSource:
    """The official source: ``proposals.json`` in the dataset folder."""
    path = folder / "proposals.json"
    proposals = load_proposals(path)

    def lookup(name: str) -> np.ndarray:
        if name not in proposals:
            raise RecError(f"image {name!r} has no entry in {path}")
        return proposals[name]

    return lookup


class RefCocoDataset(RecDataset):
    """RefCOCO / RefCOCO+ / RefCOCOg: the 8 official split files (``refcoco_validation.json`` ...).

    Each file is a list of ``{id, image, conversations: [human, gpt], bounding_boxes}``; the expression is
    the gpt turn. Splits missing from the folder are skipped (at least one must exist).
    """

    kind = "refcoco"

    def __init__(self, samples: list[RecSample], folder: Path, gt_boxes: list[np.ndarray], splits: list[str]):
        super().__init__(samples, folder)
        self.gt_boxes = gt_boxes
        self.splits = splits

    @classmethod
    def from_folder(
        cls, folder: str | Path, image_root: str | Path | None = None, proposals: ProposalSource | None = None
    ) -> RefCocoDataset:
        folder = Path(folder)
        splits = [s for s in REFCOCO_SPLITS if (folder / f"{s}.json").is_file()]
        if not splits:
            raise RecError(f"no RefCOCO split file ({REFCOCO_SPLITS[0]}.json, ...) in {folder}")
        sizes = _ImageSizes(folder, _opt_path(image_root))
        proposals = proposals or _file_proposals(folder)
        samples, gts = [], []
        for split in splits:
            for entry in _read_json(folder / f"{split}.json"):
                size = sizes(entry["image"])
                samples.append(RecSample(
                    uid=entry["id"], subset=split, image=entry["image"], image_size=size,
                    expressions=(entry["conversations"][1]["value"],), labels=(0,),
                    proposals=_clamp_proposals(proposals(entry["image"]), *size),
                ))
                # The metric reads the raw GT (not clamped), cast to float32.
                gts.append(np.asarray(entry["bounding_boxes"], dtype=np.float32).reshape(-1, 4))
        return cls(samples, folder, gts, splits)

    def evaluate(self, predictions: Sequence[RecPrediction], corrected: bool = False) -> dict[str, Any]:
        self._check_predictions(predictions)
        ranks = refcoco_first_hit_ranks([p.boxes for p in predictions], self.gt_boxes, corrected=corrected)
        splits = {}
        for split in self.splits:
            split_ranks = [r for r, s in zip(ranks, self.samples) if s.subset == split]
            splits[split] = {**refcoco_precision_at_k(split_ranks), "count": len(split_ranks)}
        return {"splits": splits, "first_hit_rank": ranks}

    def summary(self, results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
        header = ["split", "P@1", "P@5", "P@10", "count"]
        return header, [[name, *(v[h] for h in header[1:])] for name, v in results["splits"].items()]


class GRefCocoDataset(RecDataset):
    """gRefCOCO: ``finetune_grefcoco_{val,testA,testB}.json`` (COCO style, one image entry per expression)."""

    kind = "grefcoco"

    def __init__(self, samples: list[RecSample], folder: Path, targets: list[GRefTarget], splits: list[str]):
        super().__init__(samples, folder)
        self.targets = targets
        self.splits = splits

    @classmethod
    def from_folder(
        cls, folder: str | Path, image_root: str | Path | None = None, proposals: ProposalSource | None = None
    ) -> GRefCocoDataset:
        folder = Path(folder)
        splits = [s for s in GREFCOCO_SPLITS if (folder / f"finetune_grefcoco_{s}.json").is_file()]
        if not splits:
            raise RecError(f"no gRefCOCO split file (finetune_grefcoco_val.json, ...) in {folder}")
        sizes = _ImageSizes(folder, _opt_path(image_root))
        proposals = proposals or _file_proposals(folder)
        samples, targets = [], []
        for split in splits:
            data = _read_json(folder / f"finetune_grefcoco_{split}.json")
            anns: dict[int, list[dict[str, Any]]] = {}
            for ann in data.get("annotations", []):  # file order = pycocotools getAnnIds order
                anns.setdefault(ann["image_id"], []).append(ann)
            for image in data["images"]:
                name = image["file_name"]
                size = sizes(name, image.get("height"), image.get("width"))
                samples.append(RecSample(
                    uid=image["id"], subset=split, image=name, image_size=size,
                    expressions=(image["caption"],), labels=(0,),
                    proposals=_clamp_proposals(proposals(name), *size),
                ))
                own = anns.get(image["id"], [])
                # xywh -> xyxy in float64 (the metric adds in Python floats, then compares in float32).
                boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in own)], dtype=np.float64)
                targets.append(GRefTarget(boxes.reshape(-1, 4), tuple(int(a["category_id"]) for a in own)))
        return cls(samples, folder, targets, splits)

    def evaluate(self, predictions: Sequence[RecPrediction], corrected: bool = False) -> dict[str, Any]:
        self._check_predictions(predictions)
        splits, per_sample = {}, []
        for split in self.splits:
            idx = [i for i, s in enumerate(self.samples) if s.subset == split]
            metrics, details = grefcoco_metrics(
                [predictions[i].boxes for i in idx], [self.targets[i] for i in idx], corrected=corrected
            )
            splits[split] = {**metrics, "count": len(idx)}
            per_sample.extend(details)
        return {"splits": splits, "per_sample": per_sample}

    def summary(self, results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
        header = ["split", "F1_score", "T_acc", "N_acc", "count"]
        return header, [[name, *(v[h] for h in header[1:])] for name, v in results["splits"].items()]


class HumanRefDataset(RecDataset):
    """HumanRef: ``annotations.jsonl``; the proposals are each sample's own ``candidate_boxes``."""

    kind = "humanref"

    def __init__(self, samples: list[RecSample], folder: Path, targets: list[HumanRefTarget]):
        super().__init__(samples, folder)
        self.targets = targets

    @classmethod
    def from_folder(
        cls, folder: str | Path, image_root: str | Path | None = None, proposals: ProposalSource | None = None
    ) -> HumanRefDataset:
        folder = Path(folder)
        path = folder / "annotations.jsonl"
        if not path.is_file():
            raise RecError(f"missing dataset file: {path}")
        sizes = _ImageSizes(folder, _opt_path(image_root))
        samples, targets = [], []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RecError(f"{path}:{line_no}: not valid JSON: {exc}") from None
                size = sizes(entry["image_name"], entry.get("height"), entry.get("width"))
                candidates = entry.get("candidate_boxes") or []
                samples.append(RecSample(
                    uid=entry["id"], subset="", image=entry["image_name"], image_size=size,
                    expressions=(entry["referring"],), labels=(0,),
                    proposals=_clamp_proposals(np.asarray(candidates, dtype=np.float32).reshape(-1, 4), *size),
                ))
                targets.append(HumanRefTarget(
                    id=entry["id"], domain=entry["domain"], sub_domain=entry["sub_domain"],
                    answer_boxes=tuple(tuple(float(v) for v in b) for b in entry.get("answer_boxes") or []),
                    total_persons=len(candidates),
                ))
        return cls(samples, folder, targets)

    def evaluate(self, predictions: Sequence[RecPrediction], corrected: bool = False) -> dict[str, Any]:
        self._check_predictions(predictions)
        return humanref_metrics([p.boxes for p in predictions], self.targets, corrected=corrected)

    def summary(self, results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
        header = ["group", *_HUMANREF_FIELDS, "count"]
        rows = []
        for kind in ("domain", "subdomain", "box_count"):
            for name, values in sorted(results["groups"][kind].items()):
                rows.append([f"{kind}:{name}", *(values[h] for h in header[1:])])
        rows.append(["overall", *(results["overall"][h] for h in header[1:])])
        rows.append(["rejection", *([None] * len(_HUMANREF_FIELDS)),
                     f"{results['rejection_score']}/{results['rejection_total']}"])
        return header, rows


class D3Dataset(RecDataset):
    """D3 / DOD, intra-scenario: each image is queried with every sentence of its group.

    Reads the scenario structure from ``d3_scenarios.json`` (``images`` with ``group_id``, ``groups`` with
    ``sentence_ids``, ``sentences`` with ``raw_sent``) or, failing that, from the D3 toolkit's pickles in
    ``d3_pkl/`` (``images.pkl``, ``groups.pkl``, ``sentences.pkl``; trusted data only: pickle runs code), and
    the three COCO-style files ``d3_{full,pres,abs}_annotations.json``. The sentence order per image is the
    D3 API's (a list made from a set), which the official post-processing and its ties depend on.
    """

    kind = "d3"

    def __init__(self, samples: list[RecSample], folder: Path, annotations: dict[str, dict[str, Any]]):
        super().__init__(samples, folder)
        self.annotations = annotations

    @classmethod
    def from_folder(
        cls, folder: str | Path, image_root: str | Path | None = None, proposals: ProposalSource | None = None
    ) -> D3Dataset:
        folder = Path(folder)
        images, groups, sentences = _read_d3_scenarios(folder)
        annotations = {name: _read_json(folder / file) for name, file in D3_SUBSETS.items()}
        sizes = _ImageSizes(folder, _opt_path(image_root))
        proposals = proposals or _file_proposals(folder)
        samples = []
        for image in images:
            group_ids = image["group_id"] if isinstance(image["group_id"], list) else [image["group_id"]]
            # Same construction as the D3 API's get_sent_ids: a set union turned into a list.
            sent_ids: set[int] = set()
            for gid in group_ids:
                sent_ids |= set(groups[gid])
            order = list(sent_ids)
            size = sizes(image["file_name"], image.get("height"), image.get("width"))
            samples.append(RecSample(
                uid=image["id"], subset="", image=image["file_name"], image_size=size,
                expressions=tuple(sentences[s] for s in order), labels=tuple(order),
                proposals=_clamp_proposals(proposals(image["file_name"]), *size),
            ))
        return cls(samples, folder, annotations)

    def evaluate(self, predictions: Sequence[RecPrediction], corrected: bool = False) -> dict[str, Any]:
        self._check_predictions(predictions)
        pairs = [(int(s.uid), p) for s, p in zip(self.samples, predictions)]
        subsets = {name: d3_metrics(ann, pairs, corrected=corrected) for name, ann in self.annotations.items()}
        return {"subsets": subsets}

    def summary(self, results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
        header = ["subset", *D3_REPORTED]
        return header, [[name, *(v["unrounded"][h] for h in D3_REPORTED)] for name, v in results["subsets"].items()]


def _read_d3_scenarios(folder: Path) -> tuple[list[dict[str, Any]], dict[int, list[int]], dict[int, str]]:
    """(images in API order, group id -> sentence ids, sentence id -> text) from JSON or the toolkit pickles."""
    path = folder / "d3_scenarios.json"
    if path.is_file():
        data = _read_json(path)
        groups = {g["id"]: list(g["sentence_ids"]) for g in data["groups"]}
        sentences = {s["id"]: s["raw_sent"] for s in data["sentences"]}
        return list(data["images"]), groups, sentences
    pkl = folder / "d3_pkl"
    if not (pkl / "images.pkl").is_file():
        raise RecError(f"no D3 scenario description in {folder}: need d3_scenarios.json or d3_pkl/images.pkl")
    loaded = {}
    for name in ("images", "groups", "sentences"):
        with open(pkl / f"{name}.pkl", "rb") as f:
            loaded[name] = pickle.load(f)
    groups = {gid: list(g["inner_sent_id"]) for gid, g in loaded["groups"].items()}
    sentences = {sid: s["raw_sent"] for sid, s in loaded["sentences"].items()}
    return list(loaded["images"].values()), groups, sentences


_DATASETS: dict[str, type[RecDataset]] = {
    cls.kind: cls for cls in (RefCocoDataset, GRefCocoDataset, HumanRefDataset, D3Dataset)
}


def load_rec_dataset(
    kind: str, folder: str | Path, image_root: str | Path | None = None, proposals: ProposalSource | None = None
) -> RecDataset:
    """Read a REC benchmark folder in the official layout; ``kind`` is one of :data:`REC_KINDS`.

    See :meth:`RecDataset.from_folder` for ``image_root`` and ``proposals``.
    """
    if kind not in _DATASETS:
        raise RecError(f"unknown REC dataset {kind!r}; expected one of {', '.join(REC_KINDS)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise RecError(f"dataset folder {folder} does not exist")
    try:
        return _DATASETS[kind].from_folder(folder, image_root, proposals)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise RecError(f"{folder} is not a valid {kind} dataset folder: {type(exc).__name__}: {exc}") from None


def _opt_path(value: str | Path | None) -> Path | None:
    return Path(value) if value is not None else None


# --------------------------------------------------------------------------------------------------------
# Per-proposal scores: from a file or from a scorer
# --------------------------------------------------------------------------------------------------------

Scorer = Callable[[str, Sequence[str], np.ndarray], np.ndarray]
"""``score(image_path, expressions, boxes) -> (len(expressions), len(boxes))`` sigmoid scores.

``boxes`` are the sample's clamped proposals (float32 xyxy pixels, official order); the scorer builds the
official prompt (:data:`QUERY_TEMPLATE`) around each expression."""


def load_model_scores(path: str | Path, dataset: RecDataset) -> list[np.ndarray]:
    """Read a ``model_scores.npz`` file (``scores`` float32, ``offsets`` int64) into per-sample (Q, N) matrices.

    Record r = ``scores[offsets[r]:offsets[r + 1]]``, one per (sample, query) in dataset order (D3: each
    image's sentences in its query order), holding one score per proposal used.
    """
    try:
        with np.load(path) as data:
            flat, offsets = data["scores"].astype(np.float32, copy=False), data["offsets"].astype(np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise RecError(f"cannot read scores file {path} (need arrays 'scores' and 'offsets'): {exc}") from None
    expected = sum(len(s.expressions) for s in dataset.samples)
    if offsets.ndim != 1 or offsets.size != expected + 1 or offsets[0] != 0 or offsets[-1] != flat.size:
        raise RecError(f"{path} holds {max(offsets.size - 1, 0)} score records; the {dataset.kind} dataset needs "
                       f"{expected} (one per sample and query, offsets from 0 to len(scores))")
    out, r = [], 0
    for sample in dataset.samples:
        rows = []
        for _ in sample.expressions:
            record = flat[offsets[r]:offsets[r + 1]]
            if record.size != sample.proposals.shape[0]:
                raise RecError(f"{path}: record {r} (sample {sample.uid!r}) has {record.size} scores for "
                               f"{sample.proposals.shape[0]} proposals")
            rows.append(record)
            r += 1
        out.append(np.stack(rows) if rows else np.zeros((0, sample.proposals.shape[0]), np.float32))
    return out


def save_model_scores(path: str | Path, scores: Sequence[np.ndarray]) -> None:
    """Write per-sample (Q, N) score matrices in the ``model_scores.npz`` format."""
    records = [np.asarray(row, dtype=np.float32) for matrix in scores for row in np.asarray(matrix)]
    offsets = np.concatenate([[0], np.cumsum([r.size for r in records])]).astype(np.int64)
    flat = np.concatenate(records) if records else np.zeros((0,), np.float32)
    np.savez(path, scores=flat, offsets=offsets)


def score_dataset(
    dataset: RecDataset, scorer: Scorer, image_root: str | Path | None = None, progress: bool = True
) -> list[np.ndarray]:
    """Run ``scorer`` on every sample (image path = image root / file name); returns (Q, N) float32 matrices."""
    root = Path(image_root) if image_root is not None else dataset.folder
    out = []
    for sample in tqdm(dataset.samples, desc=f"scoring {dataset.kind}", disable=not progress):
        n = sample.proposals.shape[0]
        if n == 0:
            out.append(np.zeros((len(sample.expressions), 0), np.float32))
            continue
        path = root / sample.image
        if not path.is_file():
            raise RecError(f"image {path} not found (set the image root)")
        scores = np.asarray(scorer(str(path), list(sample.expressions), sample.proposals), dtype=np.float32)
        if scores.shape != (len(sample.expressions), n):
            raise RecError(f"scorer returned shape {scores.shape} for sample {sample.uid!r}; "
                           f"expected {(len(sample.expressions), n)}")
        out.append(scores)
    return out
