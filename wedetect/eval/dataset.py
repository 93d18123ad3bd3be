"""COCO / LVIS-format annotation files: loading, validation and image lookup for the evaluators.

One loader serves detection AP, proposal recall and object retrieval. It checks what the
official scripts silently assume (unique ids, annotations pointing at existing images and
categories, xywh boxes) so that a malformed file stops with a message naming the offending
entry instead of producing a wrong number.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

from wedetect.errors import WeDetectError


class AnnotationError(WeDetectError):
    """An annotation, detections or class file is malformed or inconsistent with the dataset."""


def first_duplicate(values: Iterable[Any]) -> Any | None:
    """The first value seen twice, or None."""
    seen: set = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


@dataclass
class CocoDataset:
    """A COCO-format annotation file (LVIS and PACO files use the same layout).

    ``images``, ``categories`` and ``annotations`` keep the file order; the official evaluators
    map label k to the k-th category of the file, so that order is significant.
    """

    images: list[dict]
    categories: list[dict]
    annotations: list[dict]
    path: Path | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, source: str | Path | dict) -> "CocoDataset":
        """Load and validate an annotation file (or an already parsed dict)."""
        path = None
        if isinstance(source, dict):
            raw = source
        else:
            path = Path(source)
            if not path.is_file():
                raise AnnotationError(f"annotation file not found: {path}")
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise AnnotationError(f"{path}: not valid JSON ({err})") from err
        where = str(path) if path else "annotations"
        if not isinstance(raw, dict):
            raise AnnotationError(f"{where}: expected a JSON object with 'images' and 'categories'")
        for key in ("images", "categories"):
            if not isinstance(raw.get(key), list):
                raise AnnotationError(f"{where}: missing or invalid '{key}' list")
        annotations = raw.get("annotations", [])
        if not isinstance(annotations, list):
            raise AnnotationError(f"{where}: 'annotations' must be a list")
        dataset = cls(raw["images"], raw["categories"], annotations, path, raw)
        dataset._validate(where)
        return dataset

    def _validate(self, where: str) -> None:
        for kind, items, required in (
            ("image", self.images, ("id",)),
            ("category", self.categories, ("id", "name")),
            ("annotation", self.annotations, ("image_id", "category_id", "bbox")),
        ):
            for index, item in enumerate(items):
                missing = [key for key in required if not isinstance(item, dict) or key not in item]
                if missing:
                    raise AnnotationError(f"{where}: {kind} #{index} lacks {', '.join(missing)}")
        for kind, items in (("image", self.images), ("category", self.categories)):
            dup = first_duplicate([item["id"] for item in items])
            if dup is not None:
                raise AnnotationError(f"{where}: duplicate {kind} id {dup!r}")
        image_ids, cat_ids = set(self.image_ids), set(self.category_ids)
        for ann in self.annotations:
            if ann["image_id"] not in image_ids:
                raise AnnotationError(
                    f"{where}: annotation {ann.get('id', '?')} refers to image id {ann['image_id']!r}, "
                    "which is not in 'images'"
                )
            if ann["category_id"] not in cat_ids:
                raise AnnotationError(
                    f"{where}: annotation {ann.get('id', '?')} refers to category id {ann['category_id']!r}, "
                    "which is not in 'categories'"
                )
            bbox = ann["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
                raise AnnotationError(f"{where}: annotation {ann.get('id', '?')} has a malformed bbox {bbox!r}")

    def to_dict(self) -> dict:
        """The file's content (extra top-level keys kept), for the COCO tools."""
        return {**self.raw, "images": self.images, "categories": self.categories, "annotations": self.annotations}

    @property
    def image_ids(self) -> list[int]:
        return [image["id"] for image in self.images]

    @property
    def category_ids(self) -> list[int]:
        """Category ids in file order: label k of a class file maps to ``category_ids[k]``."""
        return [cat["id"] for cat in self.categories]

    @property
    def category_names(self) -> list[str]:
        return [cat["name"] for cat in self.categories]

    def annotations_by_image(self) -> dict[int, list[dict]]:
        """Annotations of each image in file order (every image present, possibly empty)."""
        grouped: dict[int, list[dict]] = {image_id: [] for image_id in self.image_ids}
        for ann in self.annotations:
            grouped[ann["image_id"]].append(ann)
        return grouped

    def check_class_count(self, num_classes: int, source: str = "class file") -> None:
        """The official label -> category mapping is positional: the counts must agree."""
        if num_classes != len(self.categories):
            raise AnnotationError(
                f"{source} has {num_classes} classes but the dataset has {len(self.categories)} categories; "
                "label k maps to the k-th category of the annotation file, so both must list the same "
                "classes in the same order"
            )


def image_relative_paths(image: dict) -> list[str]:
    """Candidate paths of an image below the image root, most specific first.

    COCO files name images by ``file_name``; LVIS files by ``coco_url``, whose path without the
    host (``val2017/000000000139.jpg``) the official LVIS setup resolves under ``data/coco/``.
    """
    candidates = []
    if image.get("file_name"):
        candidates.append(str(image["file_name"]))
    if image.get("coco_url"):
        url_path = urlparse(str(image["coco_url"])).path.lstrip("/")
        if url_path and url_path not in candidates:
            candidates.append(url_path)
    return candidates


def resolve_image_paths(dataset: CocoDataset, root: str | Path) -> dict[int, Path]:
    """Map every image id to an existing file under ``root``; raise naming the images not found."""
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"image folder not found: {root}")
    resolved: dict[int, Path] = {}
    missing: list[str] = []
    for image in dataset.images:
        candidates = image_relative_paths(image)
        found = next((root / rel for rel in candidates if (root / rel).is_file()), None)
        if found is None:
            missing.append(f"{image['id']} ({candidates[0] if candidates else 'no file_name/coco_url'})")
        else:
            resolved[image["id"]] = found
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise AnnotationError(f"{len(missing)} of {len(dataset.images)} images not found under {root}: {shown}")
    return resolved
