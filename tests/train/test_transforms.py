"""Augmentations: geometry of boxes (checked against the rendered pixels), mask refine, prompts."""
from __future__ import annotations

import numpy as np
import pytest

from wedetect.train import transforms as T


def _sample(h: int, w: int, boxes, labels=None, texts=None, value: int = 255) -> T.Sample:
    """A grey image with a bright filled rectangle per box."""
    img = np.full((h, w, 3), 60, np.uint8)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    for x1, y1, x2, y2 in boxes.astype(int):
        img[y1:y2, x1:x2] = value
    n = len(boxes)
    return T.Sample(image=img, boxes=boxes, labels=np.asarray(labels if labels is not None else [0] * n, np.int64),
                    ignore=np.zeros(n, bool), texts=texts or [("a",), ("b",), ("c",)])


def _bright_extent(img: np.ndarray, thr: int = 200) -> np.ndarray:
    ys, xs = np.nonzero(img.max(axis=2) > thr)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_keep_ratio_resize_and_letterbox_map_boxes_onto_pixels() -> None:
    s = _sample(200, 300, [[30, 40, 120, 100]])
    s = T.keep_ratio_resize(s, 160)
    assert s.image.shape[:2] == (106, 160)
    out, pad = T.letterbox(s, 160)
    assert out.image.shape[:2] == (160, 160)
    assert pad == (27, 27, 0, 0)
    np.testing.assert_allclose(out.boxes[0], _bright_extent(out.image), atol=1.0)
    assert (out.image[:27] == T.PAD_VALUE).all()


def test_letterbox_without_scale_up_keeps_small_images() -> None:
    s = _sample(50, 80, [[10, 10, 30, 30]])
    out, pad = T.letterbox(s, 160, allow_scale_up=False)
    assert pad == (55, 55, 40, 40)
    np.testing.assert_allclose(out.boxes[0], [50, 65, 70, 85])


def test_mosaic_places_each_image_around_the_centre() -> None:
    rng = np.random.default_rng(0)
    parts = [_sample(100, 100, [[20, 20, 80, 80]], labels=[k % 3], value=200 + 10 * k) for k in range(4)]
    out = T.mosaic(parts, 100, rng)
    assert out.image.shape == (200, 200, 3)
    assert len(out.boxes) == 4
    assert (out.boxes >= 0).all() and (out.boxes <= 200).all()
    for k, box in enumerate(out.boxes):
        x1, y1, x2, y2 = box.astype(int)
        if x2 - x1 > 2 and y2 - y1 > 2:  # the pixels inside each box are that image's rectangle
            assert np.all(out.image[y1 + 1:y2 - 1, x1 + 1:x2 - 1] == 200 + 10 * k)


def test_mosaic_merges_duplicate_class_names_like_the_official_code() -> None:
    texts = [("滑雪板",), ("人",), ("滑雪板",)]
    parts = [_sample(64, 64, [[5, 5, 30, 30]], labels=[k % 3], texts=texts) for k in range(4)]
    out = T.mosaic(parts, 64, np.random.default_rng(1))
    assert out.texts == [("滑雪板",), ("人",)]
    assert out.labels.tolist() == [0, 1, 0, 0]


def test_random_affine_projects_boxes_and_filters_small_ones() -> None:
    s = _sample(200, 200, [[50, 60, 150, 140], [10, 10, 12, 12]])
    out = T.RandomAffine(border=(-50, -50))(s, np.random.default_rng(3))
    assert out.image.shape[:2] == (100, 100)
    assert len(out.boxes) == 1  # the 2x2 box falls under min_bbox_size
    clipped = out.boxes[0]
    ext = _bright_extent(out.image)
    np.testing.assert_allclose(clipped, ext, atol=1.5)


def test_mask_refine_gives_tighter_boxes_than_box_projection() -> None:
    # A diamond: its box corners are background, so a crop through a corner leaves a loose box.
    poly = np.array([[100, 20], [180, 100], [100, 180], [20, 100]], np.float32)
    img = np.full((200, 200, 3), 60, np.uint8)
    import cv2

    cv2.fillPoly(img, [poly.astype(np.int32)], (255, 255, 255))
    base = T.Sample(image=img, boxes=T.polygon_box(poly)[None], labels=np.zeros(1, np.int64), ignore=np.zeros(1, bool),
                    texts=[("a",)], polygons=[poly])
    affine = T.RandomAffine(border=(-50, -50), scaling_ratio_range=(1.0, 1.0), max_translate_ratio=0.0)
    refined = affine(base, np.random.default_rng(0))
    projected = affine(T.Sample(**{**base.__dict__, "polygons": None}), np.random.default_rng(0))
    r, p = refined.boxes[0], projected.boxes[0]
    assert (r[:2] >= p[:2] - 1e-3).all() and (r[2:] <= p[2:] + 1e-3).all()
    assert (r[2] - r[0]) * (r[3] - r[1]) < 0.99 * (p[2] - p[0]) * (p[3] - p[1]) or np.allclose(r, p, atol=1)
    np.testing.assert_allclose(r, _bright_extent(refined.image), atol=1.5)


def test_merge_polygons_visits_every_part_and_keeps_the_extent() -> None:
    a = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], np.float32)
    b = a + 30
    c = a + [60, 0]
    merged = T.merge_polygons([a, b, c])
    for part in (a, b, c):
        for v in part:
            assert (np.abs(merged - v).sum(1) < 1e-6).any()
    np.testing.assert_array_equal(T.polygon_box(merged), [0, 0, 70, 40])


def test_hflip_mirrors_boxes_and_pixels() -> None:
    s = _sample(50, 100, [[10, 5, 30, 25]])
    out = T.hflip(s, np.random.default_rng(0), p=1.0)
    np.testing.assert_allclose(out.boxes[0], [70, 5, 90, 25])
    np.testing.assert_allclose(out.boxes[0], _bright_extent(out.image))


def test_hsv_jitter_changes_colour_but_not_geometry() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
    same = T.hsv_jitter(img, np.random.default_rng(1), gains=(0.0, 0.0, 0.0))
    assert np.abs(same.astype(int) - img).max() <= 8  # HSV round trip only
    changed = T.hsv_jitter(img, np.random.default_rng(1))
    assert changed.shape == img.shape and not np.array_equal(changed, img)


def test_prompt_sampling_keeps_positives_shuffles_and_pads() -> None:
    texts = [(f"c{k}", f"syn{k}") for k in range(10)]
    s = _sample(64, 64, [[1, 1, 20, 20], [30, 30, 60, 60]], labels=[7, 2], texts=texts)
    out = T.sample_prompts(s, np.random.default_rng(0), num_neg=(3, 3), max_num=12)
    assert len(out.prompts) == 12 and out.prompts[5:] == [""] * 7
    real = [p for p in out.prompts if p]
    assert len(real) == 5 and len(set(real)) == 5
    for label, original in zip(out.labels, [7, 2]):
        assert out.prompts[label] in texts[original]


def test_prompt_sampling_drops_boxes_of_classes_not_sampled() -> None:
    texts = [(f"c{k}",) for k in range(5)]
    s = _sample(64, 64, [[1, 1, 9, 9], [10, 10, 19, 19], [20, 20, 29, 29]], labels=[0, 1, 2], texts=texts)
    out = T.sample_prompts(s, np.random.default_rng(0), num_neg=(0, 0), max_num=2, padding=True)
    assert len(out.boxes) == 2 and len(out.prompts) == 2
    assert sorted(out.prompts[k] for k in out.labels) == sorted(out.prompts)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_photometric_noise_keeps_shape(p: float) -> None:
    img = np.random.default_rng(0).integers(0, 255, (40, 40, 3)).astype(np.uint8)
    out = T.photometric_noise(img, np.random.default_rng(0), p=p)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(out, img) == (p == 0.0)
