"""Training augmentations of the official recipe, on BGR uint8 images with xyxy pixel boxes.

Stage 1: mosaic -> random affine (scale only, mask refine when polygons are present) -> mix-up ->
photometric noise -> HSV -> horizontal flip. Stage 2 (the last ``close_mosaic_epochs``):
keep-ratio resize -> letterbox -> random affine -> photometric noise -> HSV -> flip.
Every transform takes an explicit ``numpy.random.Generator`` so a sample is a pure function of
its seed (which is what makes resume exact, independent of worker count).
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

PAD_VALUE = 114


@dataclass
class Sample:
    """One image and its instances; ``labels`` index ``texts`` (one synonym tuple per class)."""

    image: np.ndarray  # (H, W, 3) uint8 BGR
    boxes: np.ndarray  # (N, 4) float32 xyxy pixels
    labels: np.ndarray  # (N,) int64
    ignore: np.ndarray  # (N,) bool, crowd boxes: augmented but never given to the loss
    texts: list[tuple[str, ...]] = field(default_factory=list)
    polygons: list[np.ndarray] | None = None  # one merged (P, 2) polygon per instance (mask refine)
    prompts: list[str] | None = None  # per-image prompt list, set by prompt sampling

    def select(self, keep: np.ndarray) -> Sample:
        """The sample restricted to the instances where ``keep`` is true."""
        polys = None if self.polygons is None else [p for p, k in zip(self.polygons, keep) if k]
        return replace(self, boxes=self.boxes[keep], labels=self.labels[keep], ignore=self.ignore[keep],
                       polygons=polys)


# ----------------------------------------------------------------------------------------------
# polygons


def merge_polygons(polygons: Sequence[np.ndarray]) -> np.ndarray:
    """Join the parts of one object into a single closed vertex sequence.

    Consecutive parts are linked at their closest vertex pair; the walk goes around each part
    and detours into the next one at the link vertex, returning the same way, so the parts are
    joined by thin two-way bridges.
    """
    parts = [np.asarray(p, dtype=np.float32).reshape(-1, 2) for p in polygons]
    if len(parts) == 1:
        return parts[0]
    links = []  # (exit vertex in part k, entry vertex in part k + 1)
    for a, b in itertools.pairwise(parts):
        d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        links.append(np.unravel_index(int(d.argmin()), d.shape))

    def walk(k: int, start: int) -> list[np.ndarray]:
        part = parts[k]
        order = np.roll(np.arange(len(part)), -start).tolist() + [start]
        out: list[np.ndarray] = []
        for i in order:
            out.append(part[i])
            if k < len(parts) - 1 and i == links[k][0]:
                out.extend(walk(k + 1, int(links[k][1])))
                out.append(part[i])
                links[k] = (-1, links[k][1])  # detour only once
        return out

    return np.stack(walk(0, int(links[0][0])))


def polygon_box(polygon: np.ndarray) -> np.ndarray:
    """Extent (x1, y1, x2, y2) of a polygon's vertices."""
    return np.concatenate([polygon.min(0), polygon.max(0)]).astype(np.float32)


def resample_polygon(polygon: np.ndarray, num: int = 1000) -> np.ndarray:
    """Close the polygon and interpolate ``num`` points uniformly in vertex index (not arc length)."""
    closed = np.concatenate([polygon, polygon[:1]], axis=0)
    pos = np.linspace(0, len(closed) - 1, num)
    idx = np.arange(len(closed))
    return np.stack([np.interp(pos, idx, closed[:, 0]), np.interp(pos, idx, closed[:, 1])], axis=1)


def _inside_box(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Box of the points inside [0, W] x [0, H]; zeros when none (or, as officially, all x == 0)."""
    x, y = points[:, 0], points[:, 1]
    inside = (x >= 0) & (y >= 0) & (x <= width) & (y <= height)
    x, y = x[inside], y[inside]
    if not x.any():  # official quirk: a truthiness test on the x coordinates
        return np.zeros(4, dtype=np.float32)
    return np.array([x.min(), y.min(), x.max(), y.max()], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# geometry


def _resize(image: np.ndarray, width: int, height: int, shrinking: bool) -> np.ndarray:
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _scale_instances(sample: Sample, sx: float, sy: float, dx: float = 0.0, dy: float = 0.0) -> Sample:
    boxes = sample.boxes * np.array([sx, sy, sx, sy], dtype=np.float32) + np.array([dx, dy, dx, dy], np.float32)
    polys = None
    if sample.polygons is not None:
        polys = [p * np.array([sx, sy], np.float32) + np.array([dx, dy], np.float32) for p in sample.polygons]
    return replace(sample, boxes=boxes.astype(np.float32), polygons=polys)


def _clip(sample: Sample, width: float, height: float) -> Sample:
    boxes = sample.boxes.copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    polys = None
    if sample.polygons is not None:
        polys = [np.stack([p[:, 0].clip(0, width), p[:, 1].clip(0, height)], 1) for p in sample.polygons]
    return replace(sample, boxes=boxes, polygons=polys)


def keep_ratio_resize(sample: Sample, size: int) -> Sample:
    """Scale the long side to ``size`` (up or down); boxes follow the integer-size ratios, clipped."""
    h, w = sample.image.shape[:2]
    r = size / max(h, w)
    if r == 1:
        return sample
    nw, nh = int(w * r), int(h * r)
    out = replace(sample, image=_resize(sample.image, nw, nh, r < 1))
    return _clip(_scale_instances(out, nw / w, nh / h), nw, nh)


def letterbox(sample: Sample, size: int, allow_scale_up: bool = True) -> tuple[Sample, tuple[int, int, int, int]]:
    """Fit into ``size`` x ``size`` keeping the ratio and pad with 114; returns the (top, bottom, left, right) pad."""
    h, w = sample.image.shape[:2]
    r = min(size / h, size / w)
    if not allow_scale_up:
        r = min(r, 1.0)
    nh, nw = round(h * r), round(w * r)
    image = sample.image
    if (nh, nw) != (h, w):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top = (size - nh) // 2
    left = (size - nw) // 2
    pad = (top, size - nh - top, left, size - nw - left)
    image = cv2.copyMakeBorder(image, pad[0], pad[1], pad[2], pad[3], cv2.BORDER_CONSTANT,
                               value=(PAD_VALUE,) * 3)
    out = _scale_instances(replace(sample, image=image), nw / w, nh / h, left, top)
    return _clip(out, size, size), pad


def merge_texts(samples: Sequence[Sample]) -> list[Sample]:
    """Give every sample the union of their vocabularies (de-duplicated by content), labels re-mapped.

    Official quirk kept: two classes with identical names become one entry after mosaic/mix-up.
    """
    vocab: dict[tuple[str, ...], int] = {}
    for s in samples:
        for t in s.texts:
            vocab.setdefault(tuple(t), len(vocab))
    merged = list(vocab)
    out = []
    for s in samples:
        remap = np.array([vocab[tuple(t)] for t in s.texts], dtype=np.int64)
        labels = remap[s.labels] if len(s.labels) else s.labels
        out.append(replace(s, texts=merged, labels=labels))
    return out


def mosaic(samples: Sequence[Sample], size: int, rng: np.random.Generator, merge_vocab: bool = True) -> Sample:
    """Four images around a random centre of a (2 size)^2 canvas; boxes clipped to the canvas."""
    assert len(samples) == 4
    if merge_vocab:
        samples = merge_texts(samples)
    canvas = np.full((2 * size, 2 * size, 3), PAD_VALUE, dtype=np.uint8)
    cx = int(rng.uniform(0.5, 1.5) * size)
    cy = int(rng.uniform(0.5, 1.5) * size)
    parts = []
    for k, s in enumerate(samples):
        h0, w0 = s.image.shape[:2]
        r = min(size / h0, size / w0)
        w, h = int(w0 * r), int(h0 * r)
        img = cv2.resize(s.image, (w, h), interpolation=cv2.INTER_LINEAR)
        if k == 0:  # top left: bottom-right corner at the centre
            x1, y1, x2, y2 = max(cx - w, 0), max(cy - h, 0), cx, cy
            cx1, cy1 = w - (x2 - x1), h - (y2 - y1)
        elif k == 1:  # top right
            x1, y1, x2, y2 = cx, max(cy - h, 0), min(cx + w, 2 * size), cy
            cx1, cy1 = 0, h - (y2 - y1)
        elif k == 2:  # bottom left
            x1, y1, x2, y2 = max(cx - w, 0), cy, cx, min(2 * size, cy + h)
            cx1, cy1 = w - (x2 - x1), 0
        else:  # bottom right
            x1, y1, x2, y2 = cx, cy, min(cx + w, 2 * size), min(2 * size, cy + h)
            cx1, cy1 = 0, 0
        canvas[y1:y2, x1:x2] = img[cy1:cy1 + (y2 - y1), cx1:cx1 + (x2 - x1)]
        dx, dy = x1 - cx1, y1 - cy1
        boxes = s.boxes * np.float32(r) + np.array([dx, dy, dx, dy], np.float32)
        polys = None
        if s.polygons is not None:  # official: polygons follow the integer-size ratio
            polys = [p * np.array([w / w0, h / h0], np.float32) + np.array([dx, dy], np.float32) for p in s.polygons]
        parts.append(replace(s, boxes=boxes.astype(np.float32), polygons=polys))
    with_polys = all(p.polygons is not None for p in parts)
    out = Sample(
        image=canvas,
        boxes=np.concatenate([p.boxes for p in parts]).reshape(-1, 4),
        labels=np.concatenate([p.labels for p in parts]).astype(np.int64),
        ignore=np.concatenate([p.ignore for p in parts]).astype(bool),
        texts=samples[0].texts,
        polygons=[q for p in parts for q in p.polygons] if with_polys else None,
    )
    return _clip(out, 2 * size, 2 * size)


@dataclass(frozen=True)
class RandomAffine:
    """Official ``WeDetectRandomAffine`` with rotation and shear disabled (scale + translation).

    ``border`` grows (positive) or shrinks (negative) the output relative to the input: stage 1
    uses ``-size / 2`` to cut a ``size`` square out of the 2 size mosaic.
    """

    scaling_ratio_range: tuple[float, float] = (0.5, 1.5)
    max_translate_ratio: float = 0.1
    border: tuple[int, int] = (0, 0)
    min_bbox_size: float = 2.0
    min_area_ratio: float = 0.1
    max_aspect_ratio: float = 100.0
    resample_num: int = 1000

    def _keep(self, reference: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        w0, h0 = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ar = np.maximum(w / (h + 1e-16), h / (w + 1e-16))
        return ((w > self.min_bbox_size) & (h > self.min_bbox_size)
                & (w * h / (w0 * h0 + 1e-16) > self.min_area_ratio) & (ar < self.max_aspect_ratio))

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        h_in, w_in = sample.image.shape[:2]
        width, height = w_in + 2 * self.border[0], h_in + 2 * self.border[1]
        scale = rng.uniform(*self.scaling_ratio_range)
        tx = rng.uniform(0.5 - self.max_translate_ratio, 0.5 + self.max_translate_ratio) * width
        ty = rng.uniform(0.5 - self.max_translate_ratio, 0.5 + self.max_translate_ratio) * height
        matrix = np.array([[scale, 0, tx - scale * w_in / 2], [0, scale, ty - scale * h_in / 2], [0, 0, 1]],
                          dtype=np.float64)
        image = cv2.warpPerspective(sample.image, matrix, dsize=(width, height), borderValue=(PAD_VALUE,) * 3)
        reference = sample.boxes * np.float32(scale)
        if len(sample.boxes) == 0:
            return replace(sample, image=image)

        if sample.polygons is not None:  # mask refine: boxes from the warped polygons
            warped_polys, boxes = [], []
            for poly in sample.polygons:
                pts = _apply(matrix, resample_polygon(poly, self.resample_num))
                warped_polys.append(pts.astype(np.float32))
                boxes.append(_inside_box(pts, width, height))
            boxes = np.stack(boxes)
            keep = self._keep(reference, boxes)
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, width - 1e-3)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, height - 1e-3)
            polys = [np.stack([p[:, 0].clip(0, width), p[:, 1].clip(0, height)], 1) for p in warped_polys]
            out = replace(sample, image=image, boxes=boxes.astype(np.float32), polygons=polys)
            return out.select(keep)

        corners = sample.boxes[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 2)
        pts = _apply(matrix, corners).reshape(-1, 4, 2)
        boxes = np.concatenate([pts.min(1), pts.max(1)], axis=1).astype(np.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        return replace(sample, image=image, boxes=boxes).select(self._keep(reference, boxes))


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    homog = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ matrix.T
    return homog[:, :2] / homog[:, 2:3]


def mixup(main: Sample, other: Sample, rng: np.random.Generator, merge_vocab: bool = True,
          alpha: float = 32.0, beta: float = 32.0) -> Sample:
    """Blend two same-size images with a Beta(32, 32) ratio; instances are concatenated."""
    if merge_vocab:
        main, other = merge_texts([main, other])
    lam = rng.beta(alpha, beta)
    image = (main.image.astype(np.float32) * lam + other.image.astype(np.float32) * (1 - lam)).astype(np.uint8)
    polys = main.polygons + other.polygons if main.polygons is not None and other.polygons is not None else None
    return replace(main, image=image, boxes=np.concatenate([main.boxes, other.boxes]),
                   labels=np.concatenate([main.labels, other.labels]),
                   ignore=np.concatenate([main.ignore, other.ignore]), polygons=polys)


# ----------------------------------------------------------------------------------------------
# pixel-only


def photometric_noise(image: np.ndarray, rng: np.random.Generator, p: float = 0.01) -> np.ndarray:
    """The recipe's albumentations stage: blur, median blur, to-gray, CLAHE, each with probability p.

    Like the official run, the BGR image is treated as if it were RGB (gray weights, CLAHE colour space).
    """
    if rng.random() < p:
        k = int(rng.choice([3, 5, 7]))
        image = cv2.blur(image, (k, k))
    if rng.random() < p:
        image = cv2.medianBlur(image, int(rng.choice([3, 5, 7])))
    if rng.random() < p:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        image = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if rng.random() < p:
        clahe = cv2.createCLAHE(clipLimit=float(rng.uniform(1, 4)), tileGridSize=(8, 8))
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
        lab[:, :, 0] = clahe.apply(lab[:, :, 0])
        image = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return image


def hsv_jitter(image: np.ndarray, rng: np.random.Generator,
               gains: tuple[float, float, float] = (0.015, 0.7, 0.4)) -> np.ndarray:
    """Random hue / saturation / value gains ``1 + U(-1, 1) * gain`` applied with lookup tables (BGR in/out)."""
    g = rng.uniform(-1, 1, 3) * np.asarray(gains) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_BGR2HSV))
    x = np.arange(0, 256, dtype=np.float64)
    lut_h = ((x * g[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * g[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * g[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def hflip(sample: Sample, rng: np.random.Generator, p: float = 0.5) -> Sample:
    """Mirror left-right with probability p."""
    if rng.random() >= p:
        return sample
    w = sample.image.shape[1]
    boxes = sample.boxes.copy()
    boxes[:, 0], boxes[:, 2] = w - sample.boxes[:, 2], w - sample.boxes[:, 0]
    polys = None
    if sample.polygons is not None:
        polys = [np.stack([w - p[:, 0], p[:, 1]], 1) for p in sample.polygons]
    return replace(sample, image=np.ascontiguousarray(sample.image[:, ::-1]), boxes=boxes, polygons=polys)


# ----------------------------------------------------------------------------------------------
# prompts


def sample_prompts(sample: Sample, rng: np.random.Generator, num_neg: tuple[int, int] = (80, 80),
                   max_num: int = 80, padding: bool = True, padding_value: str = "") -> Sample:
    """Per-image prompt list (official ``RandomLoadText``): positives plus sampled negatives, shuffled, padded.

    Boxes whose class was not sampled are dropped; labels become positions in the prompt list and
    one synonym per class is drawn.
    """
    vocab = len(sample.texts)
    positives = sorted(set(sample.labels.tolist()))
    if len(positives) > max_num:
        positives = sorted(rng.choice(positives, size=max_num, replace=False).tolist())
    n_neg = min(min(vocab, max_num) - len(positives), int(rng.integers(num_neg[0], num_neg[1] + 1)))
    pos_set = set(positives)
    pool = [c for c in range(vocab) if c not in pos_set]
    negatives = rng.choice(pool, size=n_neg, replace=False).tolist() if n_neg > 0 else []
    chosen = positives + negatives
    rng.shuffle(chosen)
    position = {c: i for i, c in enumerate(chosen)}
    keep = np.array([int(lbl) in position for lbl in sample.labels], dtype=bool)
    out = sample.select(keep) if len(keep) else sample
    labels = np.array([position[int(lbl)] for lbl in out.labels], dtype=np.int64)
    prompts = [sample.texts[c][int(rng.integers(len(sample.texts[c])))] for c in chosen]
    if padding:
        prompts += [padding_value] * (max_num - len(prompts))
    return replace(out, labels=labels, prompts=prompts)


def fixed_prompts(sample: Sample) -> Sample:
    """Closed set (official ``LoadText``): the first name of every class, labels unchanged."""
    return replace(sample, prompts=[t[0] for t in sample.texts])


