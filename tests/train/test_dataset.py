"""COCO loading (skip report, clear errors), the augmented dataset and collation."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from wedetect.train.dataset import (
    DatasetError,
    PipelineConfig,
    TrainDataset,
    collate,
    load_coco,
)


def _write(tmp_path: Path, images: list[dict], annotations: list[dict], categories=None) -> Path:
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    for im in images:
        if not im.pop("_missing", False):
            cv2.imwrite(str(img_dir / im["file_name"]), np.full((im["height"], im["width"], 3), 90, np.uint8))
    ann = tmp_path / "ann.json"
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann


def _box(i: int, image_id: int, bbox, cat: int = 3, **extra) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": 100.0, "iscrowd": 0, **extra}


def test_bad_annotations_are_skipped_and_counted(tmp_path: Path) -> None:
    images = [
        {"id": 1, "file_name": "a.png", "width": 100, "height": 80},
        {"id": 2, "file_name": "gone.png", "width": 100, "height": 80, "_missing": True},
        {"id": 3, "file_name": "tiny.png", "width": 20, "height": 80},
        {"id": 4, "file_name": "empty.png", "width": 64, "height": 64},
    ]
    anns = [
        _box(1, 1, [10, 10, 20, 20]),
        _box(2, 1, [5, 5, 10, 10], cat=7, iscrowd=1),
        _box(3, 1, [150, 10, 20, 20]),  # outside the image
        _box(4, 1, [10, 10, 0, 5]),  # zero width
        _box(5, 1, [10, 10, 20, 20], cat=99),  # unknown category
        _box(6, 1, [10, float("nan"), 20, 20]),
        _box(7, 2, [10, 10, 20, 20]),
    ]
    data = load_coco(_write(tmp_path, images, anns), tmp_path / "img")
    r = data.report
    assert (r.images_total, r.images_kept) == (4, 2)
    assert r.skipped_images == {"image file missing on disk": 1, "image smaller than 32 px": 1}
    assert r.skipped_annotations["box outside the image"] == 1
    assert r.skipped_annotations["box of zero area or a side under 1 px"] == 1
    assert r.skipped_annotations["category id not in the annotation file's categories / class-name file"] == 1
    assert r.skipped_annotations["malformed or non-finite bbox"] == 1
    assert "gone.png" in r.summary()
    first = data.records[0]
    np.testing.assert_allclose(first.boxes, [[10, 10, 30, 30], [5, 5, 15, 15]])
    assert first.labels.tolist() == [0, 1] and first.ignore.tolist() == [False, True]
    assert len(data.records[1].boxes) == 0  # images without boxes are kept
    assert data.class_names == [["cat"], ["dog"]] and data.category_ids == [3, 7]


def test_class_file_must_match_the_categories(tmp_path: Path) -> None:
    ann = _write(tmp_path, [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}], [])
    with pytest.raises(DatasetError, match="class-name file has 3 classes but .* has 2 categories"):
        load_coco(ann, tmp_path / "img", [["a"], ["b"], ["c"]])


def test_empty_dataset_and_missing_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="annotation file not found"):
        load_coco(tmp_path / "nope.json", tmp_path)
    ann = _write(tmp_path, [{"id": 1, "file_name": "x.png", "width": 64, "height": 64, "_missing": True}], [])
    with pytest.raises(DatasetError, match="(?s)no usable images.*missing on disk"):
        load_coco(ann, tmp_path / "img")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_coco(tmp_path / "bad.json", tmp_path / "img")


def test_mask_refine_loading_uses_polygon_extents_and_drops_crowds(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}]
    anns = [
        _box(1, 1, [0, 0, 90, 90], segmentation=[[10, 10, 50, 12, 30, 40], [60, 60, 70, 60, 70, 75]]),
        _box(2, 1, [5, 5, 10, 10], iscrowd=1, segmentation=[[5, 5, 15, 5, 15, 15]]),
        _box(3, 1, [5, 5, 10, 10], segmentation={"counts": "abc", "size": [100, 100]}),
    ]
    data = load_coco(_write(tmp_path, images, anns), tmp_path / "img", with_masks=True)
    rec = data.records[0]
    np.testing.assert_allclose(rec.boxes, [[10, 10, 70, 75]])  # not the JSON bbox
    assert len(rec.polygons) == 1 and len(rec.polygons[0]) >= 6
    assert data.report.annotations_kept == 1 and sum(data.report.skipped_annotations.values()) == 2


@pytest.mark.parametrize("open_vocab", [True, False])
def test_samples_are_deterministic_per_epoch_and_collate(synth_data: dict, open_vocab: bool) -> None:
    data = load_coco(synth_data["train"], synth_data["root"] / "train", synth_data["names"], with_masks=open_vocab)
    cfg = PipelineConfig(image_size=96, num_neg_samples=(12, 12), max_num_samples=12)
    ds = TrainDataset(data, cfg, open_vocab=open_vocab, seed=5)
    a, b = ds[3], ds[3]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    ds.epoch = 1
    assert not np.array_equal(ds[3].image, a.image)
    ds.stage = 2
    batch = collate([ds[i] for i in range(4)])
    assert batch.images.shape == (4, 3, 96, 96) and batch.images.dtype == torch.uint8
    rows = batch.bboxes_labels
    assert rows.shape[1] == 6 and (rows[:, 2:] >= 0).all() and (rows[:, 2:] <= 96).all()
    assert (rows[:, 4] > rows[:, 2]).all() and (rows[:, 5] > rows[:, 3]).all()
    assert list(rows[:, 0]) == sorted(rows[:, 0].tolist())
    k = 12 if open_vocab else len(synth_data["names"])
    assert all(len(p) == k for p in batch.prompts)
    for row in rows:
        prompt = batch.prompts[int(row[0])][int(row[1])]
        assert prompt  # every box label points at a real (non-padding) prompt
        if not open_vocab:
            assert prompt == synth_data["names"][int(row[1])][0]
