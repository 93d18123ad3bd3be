"""Proposal recall of WeDetect-Uni, as the official ``eval_recall`` script defines it.

Per image, the first 300 proposals (rank order) are matched to the ground truth greedily: the
largest remaining IoU is recorded for one GT, whose row and the proposal's column are then
removed, until every GT has a value (-1 once proposals run out). Recall at (budget n, IoU t) is
the fraction of all GT boxes whose recorded value, using only the first n proposals, is >= t;
AR@n is the plain mean over the 10 thresholds 0.50:0.05:0.95. IoUs are float32.

Ground truth per dataset kind (official behaviour): ``coco`` drops crowd boxes and boxes with a
truthy ``ignore``; ``lvis`` / ``paco`` drop only ``ignore`` boxes. Zero-area boxes are kept.

The official comparison ``IoU >= t`` runs in float32 under NumPy 1.x and in float64 under NumPy 2
(NEP 50); they differ only for an IoU exactly equal to float32(t) < t. ``compare="float32"``
(default, the spec's recommendation) rounds the thresholds to float32 first.

``matching="optimal"`` (not official) replaces the greedy matching: per image, budget and
threshold t, the number of recalled GT is the size of a maximum one-to-one matching between GT
boxes and the considered proposals with IoU >= t (a maximum bipartite matching, solved with
SciPy's ``linear_sum_assignment``). It is never below the greedy count. The AR-by-size breakdown
then matches each size range's GT on their own (as COCO's area ranges do), so the three sizes
need not add up to the overall figure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np

from wedetect.errors import WeDetectError
from wedetect.eval.dataset import AnnotationError, CocoDataset

RecallMode = Literal["coco", "lvis", "paco"]
Compare = Literal["float32", "float64"]
Matching = Literal["greedy", "optimal"]
PROPOSAL_NUMS = (100, 300)
IOU_THRESHOLDS = tuple(np.linspace(0.5, 0.95, 10).tolist())  # 0.8999999999999999 included, as official
# COCO object-size ranges on the annotation's area, for the (non-official) AR-by-size breakdown.
SIZE_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, float("inf"))}


@dataclass
class RecallGroundTruth:
    """Ground-truth boxes (n, 4) float32 xyxy and their areas (n,) per image id, in dataset order."""

    boxes: dict[int, np.ndarray]
    areas: dict[int, np.ndarray]


@dataclass
class RecallResult:
    """Recall matrix (budgets x thresholds) and AR per budget, plus per-image diagnostics."""

    proposal_nums: tuple[int, ...]
    iou_thrs: tuple[float, ...]
    recalls: np.ndarray  # (len(proposal_nums), len(iou_thrs)) float64
    ar: list[float]
    total_gt: int
    gt_boxes_per_image: list[int]
    per_image_recalled: list[np.ndarray | None]  # (P, T) int counts; None for images without GT
    ar_by_size: dict[str, list[float | None]] = field(default_factory=dict)  # extra, not official

    def table(self) -> str:
        header = [""] + [repr(t) for t in self.iou_thrs]
        rows = [[str(n)] + [f"{v:.3f}" for v in row] for n, row in zip(self.proposal_nums, self.recalls)]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
        fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        out = [line, fmt(header), line, *(fmt(r) for r in rows), line]
        out += [f"AR@{n}: {ar}" for n, ar in zip(self.proposal_nums, self.ar)]
        for size, values in self.ar_by_size.items():
            shown = ", ".join(
                f"AR@{n}={'n/a' if v is None else f'{v:.4f}'}" for n, v in zip(self.proposal_nums, values)
            )
            out.append(f"  {size}: {shown}")
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {
            "proposal_nums": list(self.proposal_nums),
            "iou_thrs": list(self.iou_thrs),
            "recalls": self.recalls.tolist(),
            "ar": list(self.ar),
            "total_gt": self.total_gt,
            "gt_boxes_per_image": list(self.gt_boxes_per_image),
            "ar_by_size": self.ar_by_size,
        }


def recall_ground_truth(
    dataset: CocoDataset, mode: RecallMode, *, drop_crowd: bool | None = None, drop_degenerate: bool = False
) -> RecallGroundTruth:
    """GT boxes per image with the official per-dataset filtering.

    ``drop_crowd`` overrides the dataset kind's rule (coco: drop crowd; lvis/paco: keep);
    ``drop_degenerate`` also drops boxes of zero width or height (the official code keeps them).
    """
    if mode not in ("coco", "lvis", "paco"):
        raise ValueError(f"unknown recall mode {mode!r}; expected coco, lvis or paco")
    if drop_crowd is None:
        drop_crowd = mode == "coco"
    boxes: dict[int, list] = {image_id: [] for image_id in dataset.image_ids}
    areas: dict[int, list] = {image_id: [] for image_id in dataset.image_ids}
    for ann in dataset.annotations:
        if ann.get("ignore") or (drop_crowd and ann.get("iscrowd")):
            continue
        x, y, w, h = ann["bbox"]
        if drop_degenerate and (w <= 0 or h <= 0):
            continue
        boxes[ann["image_id"]].append([x, y, x + w, y + h])  # float64 sums, then float32, as official
        areas[ann["image_id"]].append(ann.get("area", w * h))
    return RecallGroundTruth(
        boxes={k: np.asarray(v, dtype=np.float32).reshape(-1, 4) for k, v in boxes.items()},
        areas={k: np.asarray(v, dtype=np.float64) for k, v in areas.items()},
    )


def box_iou_float32(gt: np.ndarray, proposals: np.ndarray) -> np.ndarray:
    """(n, m) IoU with every step in float32, no +1, union floored at 1e-6 (mmdet ``bbox_overlaps``)."""
    gt = np.asarray(gt, dtype=np.float32)
    proposals = np.asarray(proposals, dtype=np.float32)
    area_g = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    area_p = (proposals[:, 2] - proposals[:, 0]) * (proposals[:, 3] - proposals[:, 1])
    lt = np.maximum(gt[:, None, :2], proposals[None, :, :2])
    rb = np.minimum(gt[:, None, 2:], proposals[None, :, 2:])
    wh = np.maximum(rb - lt, np.float32(0))
    inter = wh[..., 0] * wh[..., 1]
    union = np.maximum((area_g[:, None] + area_p[None, :]) - inter, np.float32(1e-6))
    return (inter / union).astype(np.float32, copy=False)


def greedy_best_iou(ious: np.ndarray) -> np.ndarray:
    """Per GT row, the IoU it receives in the official greedy one-to-one matching (float32).

    Each step takes the largest remaining entry (first maximal column within a row, then the
    first row holding the overall maximum) and removes its row and column; GT left without a
    proposal get -1. An empty matrix gives 0 for every GT.
    """
    n = ious.shape[0]
    if ious.size == 0:
        return np.zeros(n, dtype=np.float32)
    ious = ious.copy()
    best = np.full(n, -1.0, dtype=np.float32)
    rows = np.arange(n)
    for _ in range(n):
        cols = ious.argmax(axis=1)
        row_max = ious[rows, cols]
        row = int(row_max.argmax())
        if row_max[row] < 0:  # IoUs are >= 0: only removed entries remain, the rest keep -1
            break
        best[row] = row_max[row]
        ious[row, :] = -1
        ious[:, cols[row]] = -1
    return best


def optimal_match_counts(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(T,) int64: per threshold t, the most GT rows that distinct proposal columns with IoU >= t can cover.

    ``thresholds`` are float64 (see :func:`_thresholds`); the IoUs are compared in float64, as the
    greedy path does.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:  # an optional dependency: only this non-official variant needs it
        raise WeDetectError("optimal recall matching needs SciPy: pip install 'wedetect[eval]'") from err
    counts = np.zeros(len(thresholds), dtype=np.int64)
    ious = np.asarray(ious).astype(np.float64)
    for j, t in enumerate(thresholds):
        hit = ious >= t
        hit = hit[hit.any(axis=1)][:, hit.any(axis=0)]  # rows/columns without a candidate cannot match
        if hit.size:
            rows, cols = linear_sum_assignment(hit, maximize=True)
            counts[j] = int(hit[rows, cols].sum())
    return counts


def _thresholds(iou_thrs: Sequence[float], compare: Compare) -> np.ndarray:
    if compare == "float32":
        return np.asarray(iou_thrs, dtype=np.float32).astype(np.float64)
    if compare == "float64":
        return np.asarray(iou_thrs, dtype=np.float64)
    raise ValueError(f"compare must be 'float32' or 'float64', not {compare!r}")


def eval_recalls(
    gt_boxes: Sequence[np.ndarray],
    proposals: Sequence[np.ndarray],
    proposal_nums: Sequence[int] = PROPOSAL_NUMS,
    iou_thrs: Sequence[float] = IOU_THRESHOLDS,
    *,
    compare: Compare = "float32",
    gt_areas: Sequence[np.ndarray] | None = None,
    matching: Matching = "greedy",
) -> RecallResult:
    """Recall over images given as parallel lists of GT boxes (n_i, 4) and ranked proposals (k_i, 4).

    ``matching``: ``"greedy"`` (official) or ``"optimal"`` (maximum one-to-one matching per threshold).
    """
    if len(gt_boxes) != len(proposals):
        raise ValueError(f"{len(gt_boxes)} GT entries but {len(proposals)} proposal entries")
    if matching not in ("greedy", "optimal"):
        raise ValueError(f"matching must be 'greedy' or 'optimal', not {matching!r}")
    if gt_areas is not None and len(gt_areas) != len(gt_boxes):
        raise ValueError(f"{len(gt_boxes)} GT entries but {len(gt_areas)} area entries")
    proposal_nums = tuple(int(n) for n in proposal_nums)
    thresholds = _thresholds(iou_thrs, compare)
    budget_cap = proposal_nums[-1]  # official: only the first proposal_nums[-1] proposals are ever matched
    shape = (len(proposal_nums), len(thresholds))
    # Per size range: recalled-GT counts (budgets x thresholds) and the number of GT, summed over images.
    size_hits = {size: np.zeros(shape, dtype=np.int64) for size in SIZE_RANGES}
    size_gt = dict.fromkeys(SIZE_RANGES, 0)
    per_image: list[np.ndarray | None] = []
    for index, (gt, props) in enumerate(zip(gt_boxes, proposals)):
        gt = np.asarray(gt, dtype=np.float32).reshape(-1, 4)
        props = np.asarray(props, dtype=np.float32).reshape(-1, 4)[:budget_cap]
        if len(gt) == 0:
            per_image.append(None)
            continue
        masks = {}
        if gt_areas is not None:
            areas = np.asarray(gt_areas[index], dtype=np.float64)
            masks = {size: (areas >= lo) & (areas < hi) for size, (lo, hi) in SIZE_RANGES.items()}
            masks = {size: mask for size, mask in masks.items() if mask.any()}
        ious = box_iou_float32(gt, props)
        counts = np.zeros(shape, dtype=np.int64)
        for b, n in enumerate(proposal_nums):
            if matching == "greedy":
                hits = greedy_best_iou(ious[:, :n]).astype(np.float64)[:, None] >= thresholds[None, :]
                counts[b] = hits.sum(axis=0)
                for size, mask in masks.items():
                    size_hits[size][b] += hits[mask].sum(axis=0)
            else:
                counts[b] = optimal_match_counts(ious[:, :n], thresholds)
                for size, mask in masks.items():
                    size_hits[size][b] += counts[b] if mask.all() else optimal_match_counts(ious[mask, :n], thresholds)
        for size, mask in masks.items():
            size_gt[size] += int(mask.sum())
        per_image.append(counts)
    total_gt = sum(len(np.asarray(g).reshape(-1, 4)) for g in gt_boxes)
    if total_gt == 0:
        raise AnnotationError("recall is undefined: the dataset has no ground-truth boxes after filtering")
    recalls = np.stack([c for c in per_image if c is not None]).sum(axis=0) / float(total_gt)
    ar = [sum(row) / len(thresholds) for row in recalls.tolist()]  # left-to-right sum, as official
    ar_by_size: dict[str, list[float | None]] = {}
    if gt_areas is not None:
        ar_by_size = {
            size: [float(row.sum() / (size_gt[size] * len(thresholds))) if size_gt[size] else None for row in rows]
            for size, rows in size_hits.items()
        }
    return RecallResult(
        proposal_nums=proposal_nums,
        iou_thrs=tuple(float(t) for t in iou_thrs),
        recalls=recalls,
        ar=ar,
        total_gt=int(total_gt),
        gt_boxes_per_image=[len(np.asarray(g).reshape(-1, 4)) for g in gt_boxes],
        per_image_recalled=per_image,
        ar_by_size=ar_by_size,
    )


def proposal_recall(
    dataset: CocoDataset | str | Path,
    proposals: Mapping[int, np.ndarray],
    mode: RecallMode = "coco",
    *,
    compare: Compare = "float32",
    drop_crowd: bool | None = None,
    drop_degenerate: bool = False,
    matching: Matching = "greedy",
) -> RecallResult:
    """Official proposal recall of ranked proposals (image id -> (k, 4) xyxy) over every dataset image.

    ``matching="optimal"`` swaps the official greedy matching for a maximum one-to-one matching.
    """
    dataset = dataset if isinstance(dataset, CocoDataset) else CocoDataset.load(dataset)
    image_ids = dataset.image_ids
    unknown = set(proposals) - set(image_ids)
    if unknown:
        raise AnnotationError(
            f"proposals for {len(unknown)} image id(s) not in the dataset, e.g. {sorted(unknown)[:5]}"
        )
    missing = [i for i in image_ids if i not in proposals]
    if missing:
        raise AnnotationError(
            f"no proposals for {len(missing)} of {len(image_ids)} dataset images, e.g. {missing[:5]}; "
            "give every image an entry (an empty array for none)"
        )
    gt = recall_ground_truth(dataset, mode, drop_crowd=drop_crowd, drop_degenerate=drop_degenerate)
    return eval_recalls(
        [gt.boxes[i] for i in image_ids],
        [proposals[i] for i in image_ids],
        compare=compare,
        gt_areas=[gt.areas[i] for i in image_ids],
        matching=matching,
    )


def save_proposals(
    path: str | Path, proposals: Mapping[int, np.ndarray], scores: Mapping[int, np.ndarray] | None = None
) -> None:
    """Write ranked proposals as ``image_ids``, ``counts``, ``boxes`` (and ``scores``) arrays (npz)."""
    image_ids = list(proposals)
    arrays = {
        "image_ids": np.asarray(image_ids, dtype=np.int64),
        "counts": np.asarray([len(proposals[i]) for i in image_ids], dtype=np.int64),
        "boxes": np.concatenate([np.asarray(proposals[i], np.float32).reshape(-1, 4) for i in image_ids])
        if image_ids
        else np.zeros((0, 4), np.float32),
    }
    if scores is not None:
        arrays["scores"] = np.concatenate([np.asarray(scores[i], np.float32).reshape(-1) for i in image_ids])
    np.savez_compressed(path, **arrays)


def load_proposals(path: str | Path) -> dict[int, np.ndarray]:
    """Read proposals saved by :func:`save_proposals` (rows of each image in rank order)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"proposals file not found: {path}")
    with np.load(path) as data:
        missing = {"image_ids", "counts", "boxes"} - set(data.files)
        if missing:
            raise AnnotationError(f"{path}: missing array(s) {sorted(missing)}")
        image_ids, counts, boxes = data["image_ids"], data["counts"], data["boxes"]
    if counts.sum() != len(boxes) or len(counts) != len(image_ids):
        raise AnnotationError(f"{path}: counts do not add up to the number of boxes")
    splits = np.split(boxes.astype(np.float32), np.cumsum(counts)[:-1]) if len(counts) else []
    return {int(i): b for i, b in zip(image_ids.tolist(), splits)}
