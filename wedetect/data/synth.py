"""A synthetic open-vocabulary detection dataset in COCO format, for smoke tests and learning checks.

Each image is a textured background with coloured shapes; a class is a (colour, shape) pair named
in Chinese ("红色圆形" = red circle) with a short synonym ("红圆"), so class names are compositional
as in real open-vocabulary data. Annotations carry the shape polygon (usable by mask refine).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

# name -> (Chinese colour, short form, BGR)
COLORS: dict[str, tuple[str, str, tuple[int, int, int]]] = {
    "red": ("红色", "红", (40, 40, 220)),
    "green": ("绿色", "绿", (60, 190, 50)),
    "blue": ("蓝色", "蓝", (220, 90, 30)),
    "yellow": ("黄色", "黄", (30, 220, 240)),
    "purple": ("紫色", "紫", (200, 50, 160)),
    "white": ("白色", "白", (250, 250, 250)),
}
# name -> (Chinese shape, short form)
SHAPES: dict[str, tuple[str, str]] = {
    "circle": ("圆形", "圆"),
    "square": ("正方形", "方块"),
    "triangle": ("三角形", "三角"),
    "star": ("星形", "星"),
    "hexagon": ("六边形", "六边"),
}


@dataclass(frozen=True)
class SynthConfig:
    """What to render: sizes in pixels, object counts per image, the colour and shape vocabularies."""

    num_train: int = 200
    num_val: int = 50
    image_size: int = 160
    min_objects: int = 1
    max_objects: int = 4
    min_object_size: int = 16
    max_object_size: int = 64
    colors: tuple[str, ...] = ("red", "green", "blue")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    seed: int = 0
    # (colour, shape) pairs drawn in the train split (None: all); val always draws every class, so
    # held-out compositions measure open-vocabulary generalisation. Categories always list all classes.
    train_pairs: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self) -> None:
        unknown = [c for c in self.colors if c not in COLORS] + [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colour/shape {unknown}; colours: {list(COLORS)}, shapes: {list(SHAPES)}")
        if not (0 < self.min_object_size <= self.max_object_size < self.image_size):
            raise ValueError("need 0 < min_object_size <= max_object_size < image_size")
        if not (0 <= self.min_objects <= self.max_objects):
            raise ValueError("need 0 <= min_objects <= max_objects")
        if self.train_pairs is not None:
            bad = [tuple(p) for p in self.train_pairs if tuple(p) not in class_list(self)]
            if bad or not self.train_pairs:
                raise ValueError(f"train_pairs must be a non-empty subset of the (colour, shape) classes; bad: {bad}")


def class_list(cfg: SynthConfig) -> list[tuple[str, str]]:
    """(colour, shape) of every class, colour-major."""
    return [(c, s) for c in cfg.colors for s in cfg.shapes]


def class_names(cfg: SynthConfig) -> list[list[str]]:
    """Official class-name layout: one list of synonyms per class, the full Chinese name first."""
    return [[COLORS[c][0] + SHAPES[s][0], COLORS[c][1] + SHAPES[s][1]] for c, s in class_list(cfg)]


def _shape_polygon(shape: str, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    r = size / 2
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * r * 0.8
    elif shape == "triangle":
        t = np.array([-90, 30, 150]) * math.pi / 180 + angle
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif shape == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2 + angle
        radius = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        pts = np.stack([np.cos(t) * radius, np.sin(t) * radius], 1)
    else:  # hexagon
        t = np.arange(6) * math.pi / 3 + angle
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    return pts + np.array([cx, cy])


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Muted low-frequency noise plus stripes or a checkerboard, so objects are not trivially separable."""
    base = rng.integers(60, 180, size=3)
    low = cv2.resize(rng.normal(0, 25, (6, 6, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    img = base[None, None, :] + low
    yy, xx = np.mgrid[0:size, 0:size]
    kind = rng.integers(3)
    if kind == 0:
        period = rng.uniform(6, 20)
        img += (np.sin((xx * math.cos(period) + yy * math.sin(period)) / period * 2 * math.pi) * 15)[..., None]
    elif kind == 1:
        cell = int(rng.integers(8, 24))
        img += ((((xx // cell) + (yy // cell)) % 2) * 20 - 10)[..., None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_image(cfg: SynthConfig, rng: np.random.Generator,
                 allowed: list[int] | None = None) -> tuple[np.ndarray, list[dict]]:
    """One BGR image and its objects (``label``, ``polygon`` (P, 2), ``bbox`` xyxy); labels are drawn
    from ``allowed`` (class indices) when given, else from every class."""
    classes = class_list(cfg)
    image = _background(cfg.image_size, rng)
    objects: list[dict] = []
    target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(target * 10):
        if len(objects) == target:
            break
        size = rng.uniform(cfg.min_object_size, cfg.max_object_size)
        cx, cy = rng.uniform(size / 2 + 1, cfg.image_size - size / 2 - 1, size=2)
        label = int(rng.integers(len(classes))) if allowed is None else allowed[int(rng.integers(len(allowed)))]
        poly = _shape_polygon(classes[label][1], cx, cy, size, rng.uniform(0, 2 * math.pi))
        box = np.concatenate([poly.min(0), poly.max(0)])
        if any(_iou(box, o["bbox"]) > 0.1 for o in objects):
            continue
        objects.append({"label": label, "polygon": poly, "bbox": box})
    for obj in objects:
        colour = np.array(COLORS[classes[obj["label"]][0]][2]) + rng.integers(-20, 21, 3)
        cv2.fillPoly(image, [np.round(obj["polygon"] * 16).astype(np.int32)], tuple(int(v) for v in colour.clip(0, 255)),
                     lineType=cv2.LINE_AA, shift=4)
    return image, objects


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def write_split(cfg: SynthConfig, out_dir: Path, split: str, count: int, rng: np.random.Generator,
                progress: bool = True) -> Path:
    """Render ``count`` images into ``out_dir/split/`` and write ``out_dir/annotations/split.json``."""
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    names = class_names(cfg)
    categories = [{"id": k + 1, "name": names[k][0], "supercategory": "shape"} for k in range(len(names))]
    allowed = None
    if split == "train" and cfg.train_pairs is not None:
        allowed = [k for k, pair in enumerate(class_list(cfg)) if pair in {tuple(p) for p in cfg.train_pairs}]
    images, annotations = [], []
    for i in tqdm(range(count), desc=f"synth {split}", disable=not progress):
        image, objects = render_image(cfg, rng, allowed)
        file_name = f"{i:06d}.png"
        cv2.imwrite(str(image_dir / file_name), image)
        images.append({"id": i + 1, "file_name": file_name, "width": cfg.image_size, "height": cfg.image_size})
        for obj in objects:
            x1, y1, x2, y2 = (float(v) for v in obj["bbox"])
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": obj["label"] + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(cv2.contourArea(obj["polygon"].astype(np.float32))),
                "segmentation": [obj["polygon"].reshape(-1).round(2).tolist()], "iscrowd": 0,
            })
    ann_dir = out_dir / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    path = ann_dir / f"{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories},
                               ensure_ascii=False), encoding="utf-8")
    return path


def make_dataset(cfg: SynthConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Path]:
    """Write train and val splits plus ``class_names.json``; returns the written paths."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(cfg.seed)
    paths = {
        "train": write_split(cfg, out_dir, "train", cfg.num_train, rng, progress),
        "val": write_split(cfg, out_dir, "val", cfg.num_val, rng, progress),
        "classes": out_dir / "class_names.json",
    }
    paths["classes"].write_text(json.dumps(class_names(cfg), ensure_ascii=False, indent=1), encoding="utf-8")
    return paths
