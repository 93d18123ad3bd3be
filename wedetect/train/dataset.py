"""COCO-format training data: tolerant loading with a skip report, the augmentation pipeline, collation.

Loading follows the official rules (mmdet ``CocoDataset``): annotations that are ignored, have
no overlap with the image, zero area or a side under 1 px are skipped; images smaller than 32 px
are dropped; images without boxes are kept. Unlike the official code, classes come from the
JSON ``categories`` in file order and must match the class-name file one to one, and
annotations with an unknown category or a broken box are skipped and counted, not fatal.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from wedetect.data.io import load_bgr
from wedetect.errors import WeDetectError
from wedetect.train import transforms as T
from wedetect.train.config import AugmentSpec


class DatasetError(WeDetectError):
    """The training or validation data cannot be used."""


@dataclass
class Record:
    """One image of the dataset with its kept instances (boxes xyxy in original pixels)."""

    image_id: int | str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    polygons: list[np.ndarray] | None = None


@dataclass
class LoadReport:
    """What loading skipped, by reason; printed before training starts."""

    source: str
    images_total: int = 0
    images_kept: int = 0
    annotations_total: int = 0
    annotations_kept: int = 0
    skipped_images: Counter = field(default_factory=Counter)
    skipped_annotations: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip_image(self, reason: str, name: str) -> None:
        self.skipped_images[reason] += 1
        self.examples.setdefault(reason, []).append(name)

    def skip_annotation(self, reason: str, name: str) -> None:
        self.skipped_annotations[reason] += 1
        self.examples.setdefault(reason, []).append(name)

    def summary(self) -> str:
        lines = [(f"{self.source}: {self.images_kept}/{self.images_total} images, "
                  f"{self.annotations_kept}/{self.annotations_total} annotations kept")]
        for kind, counter in (("image", self.skipped_images), ("annotation", self.skipped_annotations)):
            for reason, n in counter.most_common():
                shown = ", ".join(self.examples[reason][:3])
                lines.append(f"  skipped {n} {kind}(s): {reason} (e.g. {shown})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"source": self.source, "images_total": self.images_total, "images_kept": self.images_kept,
                "annotations_total": self.annotations_total, "annotations_kept": self.annotations_kept,
                "skipped_images": dict(self.skipped_images), "skipped_annotations": dict(self.skipped_annotations)}


@dataclass
class CocoData:
    """A loaded split: records, class names (synonym lists, label order) and category ids."""

    records: list[Record]
    class_names: list[list[str]]
    category_ids: list[int]
    report: LoadReport
    raw: dict  # the annotation JSON restricted to the kept images (for evaluation)


def _valid_polygons(segmentation) -> list[np.ndarray] | None:
    """Polygons with an even number >= 6 of coordinates; None for RLE / missing segmentation."""
    if not isinstance(segmentation, list):
        return None
    polys = [np.asarray(p, dtype=np.float32).reshape(-1, 2) for p in segmentation
             if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
    return polys or None


def load_coco(ann_file: str | Path, image_dir: str | Path, class_names: list[list[str]] | None = None,
              with_masks: bool = False, min_size: int = 32) -> CocoData:
    """Read a COCO detection file and keep what training can use, counting everything skipped.

    ``with_masks`` (mask refine): crowd instances and instances without a polygon are skipped, boxes
    come from the polygon extents and one merged polygon per instance is kept.
    """
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    if not ann_file.is_file():
        raise DatasetError(f"annotation file not found: {ann_file}")
    if not image_dir.is_dir():
        raise DatasetError(f"image folder not found: {image_dir}")
    try:
        raw = json.loads(ann_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{ann_file}: not valid JSON ({err})") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list) \
            or not isinstance(raw.get("categories"), list):
        raise DatasetError(f"{ann_file}: expected a COCO object with 'images' and 'categories' lists")
    categories = raw["categories"]
    if not categories:
        raise DatasetError(f"{ann_file}: 'categories' is empty")
    cat_ids = [c["id"] for c in categories]
    if class_names is None:
        class_names = [[str(c.get("name", c["id"]))] for c in categories]
    elif len(class_names) != len(categories):
        raise DatasetError(
            f"the class-name file has {len(class_names)} classes but {ann_file} has {len(categories)} categories; "
            "class k of the file names the k-th category of the annotation file, so both must list the same "
            "classes in the same order")
    label_of = {cid: k for k, cid in enumerate(cat_ids)}

    report = LoadReport(source=str(ann_file), images_total=len(raw["images"]))
    anns_by_image: dict = {}
    for ann in raw.get("annotations", []):
        anns_by_image.setdefault(ann.get("image_id"), []).append(ann)
    report.annotations_total = sum(len(v) for v in anns_by_image.values())

    records: list[Record] = []
    for img in raw["images"]:
        name = str(img.get("file_name", img.get("id")))
        anns = anns_by_image.get(img.get("id"), [])
        path = image_dir / name
        w, h = img.get("width"), img.get("height")
        if not path.is_file():
            report.skip_image("image file missing on disk", name)
            continue
        if not isinstance(w, (int, float)) or not isinstance(h, (int, float)):
            probe = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if probe is None:
                report.skip_image("image file not decodable", name)
                continue
            h, w = probe.shape[:2]
        w, h = int(w), int(h)
        if min(w, h) < min_size:
            report.skip_image(f"image smaller than {min_size} px", name)
            continue
        boxes, labels, ignore, polys = [], [], [], []
        for ann in anns:
            aname = f"{name}#{ann.get('id', '?')}"
            reason = _annotation_problem(ann, w, h, label_of)
            if reason is None and with_masks:
                if ann.get("iscrowd", 0):
                    reason = "crowd (mask refine drops crowd instances)"
                elif (parts := _valid_polygons(ann.get("segmentation"))) is None:
                    reason = "no polygon segmentation (mask refine needs polygons)"
            if reason is not None:
                report.skip_annotation(reason, aname)
                continue
            if with_masks:
                poly = T.merge_polygons(parts)
                boxes.append(T.polygon_box(np.concatenate(parts)))
                polys.append(poly)
            else:
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                boxes.append([x, y, x + bw, y + bh])
            labels.append(label_of[ann["category_id"]])
            ignore.append(bool(ann.get("iscrowd", 0)))
        report.annotations_kept += len(boxes)
        records.append(Record(
            image_id=img["id"], path=path, width=w, height=h,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=np.asarray(labels, dtype=np.int64), ignore=np.asarray(ignore, dtype=bool),
            polygons=polys if with_masks else None))
    report.images_kept = len(records)
    if not records:
        raise DatasetError(f"{ann_file}: no usable images.\n{report.summary()}")
    kept_ids = {r.image_id for r in records}
    kept_raw = {**raw, "images": [i for i in raw["images"] if i.get("id") in kept_ids],
                "annotations": [a for a in raw.get("annotations", []) if a.get("image_id") in kept_ids]}
    return CocoData(records, class_names, cat_ids, report, kept_raw)


def _annotation_problem(ann: dict, width: int, height: int, label_of: dict) -> str | None:
    """Why an annotation cannot be trained on (official parse rules plus input validation), or None."""
    if ann.get("category_id") not in label_of:
        return "category id not in the annotation file's categories / class-name file"
    bbox = ann.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        return "malformed or non-finite bbox"
    if ann.get("ignore", False):
        return "marked ignore"
    x, y, w, h = bbox
    if ann.get("area", w * h) <= 0 or w < 1 or h < 1:
        return "box of zero area or a side under 1 px"
    inter_w = max(0.0, min(x + w, width) - max(x, 0.0))
    inter_h = max(0.0, min(y + h, height) - max(y, 0.0))
    if inter_w * inter_h == 0:
        return "box outside the image"
    return None


class PipelineConfig(AugmentSpec):
    """The augmentation settings (defaults: the official recipe) plus the input size and the prompt
    used to pad each image's sampled vocabulary."""

    image_size: int = 640
    padding_value: str = ""


class TrainDataset(Dataset):
    """Augmented training samples; sample i of epoch e is a pure function of (seed, e, i).

    ``open_vocab``: per-image prompts are sampled (``RandomLoadText``) and vocabularies merged in
    mosaic / mix-up; otherwise labels stay class indices (closed set). ``stage`` 2 is the
    no-mosaic pipeline of the last epochs.
    """

    def __init__(self, data: CocoData, cfg: PipelineConfig, open_vocab: bool = True, seed: int = 0) -> None:
        self.data = data
        self.cfg = cfg
        self.open_vocab = open_vocab
        self.seed = seed
        self.epoch = 0
        self.stage = 1
        self.texts = [tuple(names) for names in data.class_names]
        self._affine_kw = {"scaling_ratio_range": cfg.scaling_ratio_range,
                           "max_translate_ratio": cfg.max_translate_ratio, "min_area_ratio": cfg.min_area_ratio}

    def __len__(self) -> int:
        return len(self.data.records)

    def load(self, index: int, with_polygons: bool = True) -> T.Sample:
        r = self.data.records[index]
        polys = [p.copy() for p in r.polygons] if (r.polygons is not None and with_polygons) else None
        return T.Sample(image=load_bgr(r.path), boxes=r.boxes.copy(), labels=r.labels.copy(),
                        ignore=r.ignore.copy(), texts=list(self.texts), polygons=polys)

    def _mosaic_affine(self, index: int, rng: np.random.Generator) -> T.Sample:
        size = self.cfg.image_size
        others = rng.integers(0, len(self), size=3).tolist()
        sample = T.mosaic([self.load(i) for i in [index, *others]], size, rng, merge_vocab=self.open_vocab)
        return T.RandomAffine(border=(-size // 2, -size // 2), **self._affine_kw)(sample, rng)

    def augment(self, index: int, rng: np.random.Generator) -> T.Sample:
        cfg = self.cfg
        if self.stage == 1 and cfg.mosaic:
            sample = self._mosaic_affine(index, rng)
            if rng.random() < cfg.mixup_prob:
                other = self._mosaic_affine(int(rng.integers(0, len(self))), rng)
                sample = T.mixup(sample, other, rng, merge_vocab=self.open_vocab)
        else:
            sample = T.keep_ratio_resize(self.load(index, with_polygons=False), cfg.image_size)
            sample, _ = T.letterbox(sample, cfg.image_size, allow_scale_up=True)
            sample = T.RandomAffine(**self._affine_kw)(sample, rng)
        sample.polygons = None  # masks only refine the affine's boxes
        image = T.photometric_noise(sample.image, rng, cfg.noise_prob)
        sample.image = T.hsv_jitter(image, rng, cfg.hsv_gains)
        sample = T.hflip(sample, rng, cfg.flip_prob)
        if self.open_vocab:
            return T.sample_prompts(sample, rng, cfg.num_neg_samples, cfg.max_num_samples,
                                    padding=True, padding_value=cfg.padding_value)
        return T.fixed_prompts(sample)

    def __getitem__(self, index: int) -> T.Sample:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.augment(index, rng)


@dataclass
class Batch:
    """A collated batch: RGB uint8 images, GT rows ``[image, label, x1, y1, x2, y2]``, prompts per image."""

    images: torch.Tensor  # (B, 3, S, S) uint8 RGB
    bboxes_labels: torch.Tensor  # (M, 6) float32
    prompts: list[list[str]]

    def __len__(self) -> int:
        return self.images.shape[0]


def collate(samples: list[T.Sample]) -> Batch:
    """Stack images (BGR -> RGB) and gather the non-crowd boxes of the batch."""
    images = torch.from_numpy(np.stack([s.image[:, :, ::-1] for s in samples])).permute(0, 3, 1, 2).contiguous()
    rows = []
    for i, s in enumerate(samples):
        keep = ~s.ignore
        n = int(keep.sum())
        rows.append(np.concatenate([np.full((n, 1), i, np.float32), s.labels[keep, None].astype(np.float32),
                                    s.boxes[keep].astype(np.float32)], axis=1))
    bboxes_labels = torch.from_numpy(np.concatenate(rows).reshape(-1, 6))
    return Batch(images=images, bboxes_labels=bboxes_labels, prompts=[list(s.prompts or []) for s in samples])
