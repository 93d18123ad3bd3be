"""Detection AP with the official WeDetect evaluator settings (mmdet ``CocoMetric`` / ``LVISMetric``).

COCO: pycocotools-style ``COCOeval`` (bbox) with ``maxDets = [100, 300, 1000]``. As in mmdet, the
headline mAP is read at 100 detections per (image, category) while mAP_50/75/s/m/l use 1000.

LVIS: the top 300 detections per image across categories are kept (``LVISResults``' default),
then LVIS-style evaluation: federated negatives (``neg_category_ids``), no false positives for
``not_exhaustive_category_ids``, r/c/f frequency groups, no crowd handling (the LVIS API never
looks at ``iscrowd``). This is the standard LVIS AP, not "Fixed AP".

Evaluation runs on faster-coco-eval; ``backend="pycocotools"`` runs the reference implementation
for COCO (used to prove the two agree).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from wedetect.eval.dataset import AnnotationError, CocoDataset

COCO_MAX_DETS = (100, 300, 1000)
LVIS_MAX_DETS = 300
COCO_STAT_NAMES = (
    "mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
    "AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000",
)  # fmt: skip
LVIS_STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
    "AR@300", "ARs@300", "ARm@300", "ARl@300",
)  # fmt: skip
# Headline values the official evaluator reports (rounded to 3 decimals); the rest are extras.
COCO_REPORTED = COCO_STAT_NAMES[:6]
LVIS_REPORTED = LVIS_STAT_NAMES[:9]
LVIS_FREQUENCIES = ("r", "c", "f")
SIZES = ("small", "medium", "large")

Backend = Literal["faster-coco-eval", "pycocotools"]


@dataclass
class DetectionMetrics:
    """Unrounded summary numbers; -1 marks a value with nothing to average (pycocotools' convention)."""

    kind: Literal["coco", "lvis"]
    stats: dict[str, float]
    num_images: int
    num_detections: int

    @property
    def reported(self) -> dict[str, float]:
        """What the official evaluator logs: the headline numbers rounded to 3 decimals."""
        names = COCO_REPORTED if self.kind == "coco" else LVIS_REPORTED
        return {name: round(self.stats[name], 3) for name in names}

    def table(self) -> str:
        width = max(len(name) for name in self.stats)
        lines = [f"{self.kind.upper()} bbox: {self.num_images} images, {self.num_detections} detections"]
        lines += [f"  {name:<{width}}  {value:.3f}" for name, value in self.stats.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "reported": self.reported,
            "stats": self.stats,
            "num_images": self.num_images,
            "num_detections": self.num_detections,
        }


def load_detections(path: str | Path) -> list[dict]:
    """Read a COCO results JSON (a list of ``image_id, category_id, bbox, score`` objects)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"detections file not found: {path}")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(rows, list):
        raise AnnotationError(f"{path}: expected a JSON list of detections")
    return rows


def validate_detections(dataset: CocoDataset, detections: Sequence[dict]) -> None:
    """Reject rows the COCO tools would drop or crash on, naming the first offender."""
    image_ids, cat_ids = set(dataset.image_ids), set(dataset.category_ids)
    unknown_images: set = set()
    unknown_cats: set = set()
    for index, det in enumerate(detections):
        if not isinstance(det, dict) or not {"image_id", "category_id", "bbox", "score"} <= det.keys():
            raise AnnotationError(f"detection #{index} must have image_id, category_id, bbox and score: {det!r}")
        bbox = det["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            raise AnnotationError(f"detection #{index} has a malformed bbox {bbox!r} (expected [x, y, w, h])")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (*bbox, det["score"])):
            raise AnnotationError(f"detection #{index} has a non-finite bbox or score: {det!r}")
        if det["image_id"] not in image_ids:
            unknown_images.add(det["image_id"])
        if det["category_id"] not in cat_ids:
            unknown_cats.add(det["category_id"])
    if unknown_images:
        raise AnnotationError(
            f"detections refer to {len(unknown_images)} image id(s) not in the annotation file, "
            f"e.g. {sorted(unknown_images, key=str)[:5]}"
        )
    if unknown_cats:
        raise AnnotationError(
            f"detections refer to category id(s) not in the annotation file: {sorted(unknown_cats, key=str)[:10]}"
        )


def limit_per_image(detections: Sequence[dict], max_dets: int) -> list[dict]:
    """Keep each image's ``max_dets`` highest-scoring detections (``LVISResults``' rule, stable on ties)."""
    per_image: dict = defaultdict(list)
    for det in detections:
        per_image[det["image_id"]].append(det)
    kept = []
    for rows in per_image.values():
        if len(rows) > max_dets:
            rows = sorted(rows, key=lambda det: det["score"], reverse=True)[:max_dets]
        kept.extend(rows)
    return kept


def _checked_inputs(
    dataset: CocoDataset | str | Path, detections: Sequence[dict] | str | Path
) -> tuple[CocoDataset, list[dict]]:
    dataset = dataset if isinstance(dataset, CocoDataset) else CocoDataset.load(dataset)
    detections = load_detections(detections) if isinstance(detections, (str, Path)) else list(detections)
    validate_detections(dataset, detections)
    # Area ranges (s/m/l) read the annotation's 'area' field, not the box: it must be present.
    for ann in dataset.annotations:
        if not isinstance(ann.get("area"), (int, float)):
            raise AnnotationError(f"annotation {ann.get('id', '?')} lacks a numeric 'area' (needed for APs/m/l)")
    return dataset, detections


def _build_coco_api(api_cls, dataset_dict: dict):
    gt = api_cls()
    gt.dataset = dataset_dict
    gt.createIndex()
    return gt


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _summary_value(
    eval_result: dict,
    params,
    *,
    precision: bool,
    max_dets: int,
    iou: float | None = None,
    area: str = "all",
    cat_index: Sequence[int] | None = None,
) -> float:
    """One COCOeval summary number from the accumulated arrays (pycocotools' ``_summarize``)."""
    values = np.asarray(eval_result["precision" if precision else "recall"])
    if iou is not None:
        values = values[np.where(np.isclose(np.asarray(params.iouThrs), iou))[0]]
    area_index = list(params.areaRngLbl).index(area)
    det_index = list(params.maxDets).index(max_dets)
    if precision:  # T x R x K x A x M
        values = values[:, :, :, area_index, det_index]
        if cat_index is not None:
            values = values[:, :, list(cat_index)]
    else:  # T x K x A x M
        values = values[:, :, area_index, det_index]
        if cat_index is not None:
            values = values[:, list(cat_index)]
    return _mean_valid(values)


def _run_eval(gt_dict: dict, detections: list[dict], backend: Backend, max_dets: Sequence[int], lvis: bool):
    """Evaluate + accumulate; both inputs are consumed (the COCO tools annotate them in place)."""
    if backend == "faster-coco-eval":
        from faster_coco_eval import COCO, COCOeval_faster

        gt = _build_coco_api(COCO, gt_dict)
        evaluator = COCOeval_faster(gt, gt.loadRes(detections), "bbox", lvis_style=lvis, print_function=lambda *_: None)
        quiet = contextlib.nullcontext()
    elif backend == "pycocotools":
        if lvis:
            raise ValueError("LVIS evaluation is only available with the faster-coco-eval backend")
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        quiet = contextlib.redirect_stdout(io.StringIO())  # pycocotools prints progress unconditionally
        with quiet:
            gt = _build_coco_api(COCO, gt_dict)
            # pycocotools' loadRes cannot take an empty list
            dt = gt.loadRes(detections) if detections else _build_coco_api(COCO, {**gt_dict, "annotations": []})
        evaluator = COCOeval(gt, dt, "bbox")
    else:
        raise ValueError(f"unknown backend {backend!r}")
    evaluator.params.maxDets = list(max_dets)
    with quiet:
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def evaluate_coco(
    dataset: CocoDataset | str | Path,
    detections: Sequence[dict] | str | Path,
    *,
    backend: Backend = "faster-coco-eval",
) -> DetectionMetrics:
    """COCO bbox AP as mmdet's ``CocoMetric`` computes it (maxDets 100/300/1000)."""
    dataset, detections = _checked_inputs(dataset, detections)
    evaluator = _run_eval(copy.deepcopy(dataset.to_dict()), copy.deepcopy(detections), backend, COCO_MAX_DETS, False)
    ap = functools.partial(_summary_value, evaluator.eval, evaluator.params, precision=True)
    ar = functools.partial(_summary_value, evaluator.eval, evaluator.params, precision=False)
    top = COCO_MAX_DETS[-1]
    values = [
        ap(max_dets=100),  # pycocotools' headline AP reads the literal 100, whatever maxDets holds
        ap(max_dets=top, iou=0.5), ap(max_dets=top, iou=0.75), *(ap(max_dets=top, area=a) for a in SIZES),
        *(ar(max_dets=m) for m in COCO_MAX_DETS), *(ar(max_dets=top, area=a) for a in SIZES),
    ]  # fmt: skip
    return DetectionMetrics("coco", dict(zip(COCO_STAT_NAMES, values)), len(dataset.images), len(detections))


def evaluate_lvis(
    dataset: CocoDataset | str | Path,
    detections: Sequence[dict] | str | Path,
    *,
    max_dets: int = LVIS_MAX_DETS,
) -> DetectionMetrics:
    """LVIS bbox AP as mmdet's ``LVISMetric`` computes it (top ``max_dets`` per image, federated)."""
    dataset, detections = _checked_inputs(dataset, detections)
    for image in dataset.images:
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if not isinstance(image.get(key), list):
                raise AnnotationError(f"LVIS evaluation: image {image['id']} lacks the '{key}' list")
    for cat in dataset.categories:
        if cat.get("frequency") not in LVIS_FREQUENCIES:
            raise AnnotationError(f"LVIS evaluation: category {cat['id']} has no 'frequency' r/c/f")
    flagged = [ann.get("id", "?") for ann in dataset.annotations if ann.get("ignore")]
    if flagged:  # the LVIS API would skip these boxes; the evaluator used here cannot reproduce that
        raise AnnotationError(f"LVIS evaluation does not support annotations with 'ignore' set (ids {flagged[:5]})")
    gt_dict = copy.deepcopy(dataset.to_dict())
    for ann in gt_dict["annotations"]:
        ann["iscrowd"] = 0  # the LVIS API has no crowd regions: every box is a regular GT
    kept = limit_per_image(detections, max_dets)
    evaluator = _run_eval(gt_dict, copy.deepcopy(kept), "faster-coco-eval", [max_dets], True)
    result, params = evaluator.eval, evaluator.params
    # Accumulated arrays index categories in ascending-id order.
    frequency = {cat["id"]: cat["frequency"] for cat in dataset.categories}
    groups = {f: [k for k, cid in enumerate(params.catIds) if frequency[cid] == f] for f in LVIS_FREQUENCIES}
    ap = functools.partial(_summary_value, result, params, precision=True, max_dets=max_dets)
    ar = functools.partial(_summary_value, result, params, precision=False, max_dets=max_dets)
    values = [
        ap(), ap(iou=0.5), ap(iou=0.75), *(ap(area=a) for a in SIZES),
        *(ap(cat_index=groups[f]) for f in LVIS_FREQUENCIES),
        ar(), *(ar(area=a) for a in SIZES),
    ]  # fmt: skip
    names = [*LVIS_STAT_NAMES[:9], f"AR@{max_dets}", f"ARs@{max_dets}", f"ARm@{max_dets}", f"ARl@{max_dets}"]
    return DetectionMetrics("lvis", dict(zip(names, values)), len(dataset.images), len(kept))


def evaluate_detections(
    dataset: CocoDataset | str | Path, detections: Sequence[dict] | str | Path, *, lvis: bool = False
) -> DetectionMetrics:
    """COCO or LVIS bbox AP with the official settings."""
    return evaluate_lvis(dataset, detections) if lvis else evaluate_coco(dataset, detections)
