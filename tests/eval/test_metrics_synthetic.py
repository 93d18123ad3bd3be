"""Evaluation metrics on tiny synthetic data whose answers can be computed by hand, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wedetect.errors import WeDetectError
from wedetect.eval.dataset import AnnotationError, CocoDataset, resolve_image_paths
from wedetect.eval.detection import evaluate_coco, evaluate_lvis
from wedetect.eval.recall import eval_recalls, greedy_best_iou, load_proposals, proposal_recall, save_proposals
from wedetect.eval.retrieval import (
    ImageEmbeddings,
    evaluate_object_retrieval,
    evaluate_retrieval,
    load_embeddings,
    retrieve,
    retrieval_ground_truth,
    save_embeddings,
)

# COCO's 101-point interpolated AP of a class whose precision is 1 up to recall 1/2 and 0 after.
AP_HALF_RECALL = 51 / 101


def make_dataset(annotations, num_images=3, num_categories=2, image_extra: dict | None = None) -> CocoDataset:
    """Images 10, 20, ... of 640x480; categories 1..K (LVIS fields included); anns (image, cat, xywh[, extra])."""
    images = [
        {"id": 10 * (i + 1), "width": 640, "height": 480, "file_name": f"img{i}.jpg",
         "neg_category_ids": [], "not_exhaustive_category_ids": [], **(image_extra or {}).get(10 * (i + 1), {})}
        for i in range(num_images)
    ]  # fmt: skip
    categories = [{"id": k + 1, "name": f"class{k}", "frequency": "rcf"[k % 3]} for k in range(num_categories)]
    anns = []
    for index, (image_id, cat, box, *extra) in enumerate(annotations):
        ann = {"id": index + 1, "image_id": image_id, "category_id": cat, "bbox": list(box),
               "area": box[2] * box[3], "iscrowd": 0}  # fmt: skip
        ann.update(extra[0] if extra else {})
        anns.append(ann)
    return CocoDataset.load({"images": images, "categories": categories, "annotations": anns})


def det(image_id, cat, box, score):
    return {"image_id": image_id, "category_id": cat, "bbox": list(box), "score": score}


BOX_A, BOX_B, BOX_C = (100, 100, 50, 50), (300, 200, 120, 80), (10, 10, 40, 60)
FAR_BOX = (500, 400, 30, 30)  # overlaps none of the above

# ---------------------------------------------------------------- detection AP


def test_perfect_detections_give_ap_one() -> None:
    gt = [(10, 1, BOX_A), (10, 2, BOX_B), (20, 1, BOX_C), (30, 2, BOX_A)]
    dataset = make_dataset(gt)
    dets = [det(i, c, b, 0.9) for i, c, b in gt]
    coco = evaluate_coco(dataset, dets)
    for name in ("mAP", "mAP_50", "mAP_75", "AR@100"):
        assert coco.stats[name] == pytest.approx(1.0, abs=1e-12)
    assert coco.stats["mAP_s"] == -1  # no small objects: nothing to average, as pycocotools reports
    lvis = evaluate_lvis(dataset, dets)
    assert lvis.stats["AP"] == pytest.approx(1.0, abs=1e-12)


def test_half_the_objects_missed() -> None:
    # Four objects of one class, two found with the top scores: precision 1 up to recall 0.5.
    dataset = make_dataset([(10, 1, BOX_A), (10, 1, BOX_B), (20, 1, BOX_A), (20, 1, BOX_C)])
    metrics = evaluate_coco(dataset, [det(10, 1, BOX_A, 0.9), det(20, 1, BOX_C, 0.8)])
    assert metrics.stats["mAP"] == pytest.approx(AP_HALF_RECALL, abs=1e-12)
    assert metrics.stats["AR@100"] == pytest.approx(0.5, abs=1e-12)


def test_false_positive_on_image_without_annotations_counts() -> None:
    # Image 30 has no annotations; its detection ranks first and is a false positive: P = 1/2 at R = 1.
    dataset = make_dataset([(10, 1, BOX_A)])
    metrics = evaluate_coco(dataset, [det(30, 1, BOX_A, 0.9), det(10, 1, BOX_A, 0.5)])
    assert metrics.stats["mAP"] == pytest.approx(0.5, abs=1e-12)
    assert metrics.num_images == 3


def test_headline_ap_uses_100_detections_per_image_and_class() -> None:
    # 119 false positives outscore the only true positive (rank 120): mAP (maxDets 100) is 0,
    # mAP_50 (maxDets 1000) is the precision 1/120 at full recall.
    dataset = make_dataset([(10, 1, (0, 0, 20, 20))], num_images=1, num_categories=1)
    fps = [det(10, 1, (25 + 5 * (k % 100), 25 + 100 * (k // 100), 4, 4), 0.9 - k * 1e-4) for k in range(119)]
    metrics = evaluate_coco(dataset, [*fps, det(10, 1, (0, 0, 20, 20), 0.1)])
    assert metrics.stats["mAP"] == 0.0
    assert metrics.stats["mAP_50"] == pytest.approx(1 / 120, abs=1e-12)


def test_empty_detections_give_zero_ap() -> None:
    metrics = evaluate_coco(make_dataset([(10, 1, BOX_A)]), [])
    assert metrics.stats["mAP"] == 0.0


@pytest.mark.parametrize(
    ("image_extra", "expected"),
    [
        ({}, 1.0),  # class 2 neither present nor negative on image 20: its detection is ignored
        ({20: {"neg_category_ids": [2]}}, 0.5),  # verified absent: the detection is a false positive
    ],
)
def test_lvis_federated_negatives(image_extra: dict, expected: float) -> None:
    dataset = make_dataset([(10, 2, BOX_A), (20, 1, BOX_B)], num_images=2, image_extra=image_extra)
    dets = [det(20, 2, FAR_BOX, 0.9), det(10, 2, BOX_A, 0.5), det(20, 1, BOX_B, 0.9)]
    metrics = evaluate_lvis(dataset, dets)
    assert metrics.stats["AP"] == pytest.approx((1.0 + expected) / 2, abs=1e-12)


@pytest.mark.parametrize(("not_exhaustive", "expected"), [([2], AP_HALF_RECALL), ([], AP_HALF_RECALL / 2)])
def test_lvis_not_exhaustive_categories_forgive_false_positives(not_exhaustive: list, expected: float) -> None:
    # Class 2: one object found on image 10 (score 0.5), one missed on image 20, where a higher-scoring
    # false positive is forgiven only when class 2 is marked not exhaustively annotated there.
    dataset = make_dataset(
        [(10, 2, BOX_A), (20, 2, BOX_B)], num_images=2, num_categories=2,
        image_extra={20: {"not_exhaustive_category_ids": not_exhaustive}},
    )  # fmt: skip
    metrics = evaluate_lvis(dataset, [det(20, 2, FAR_BOX, 0.9), det(10, 2, BOX_A, 0.5)])
    assert metrics.stats["AP"] == pytest.approx(expected, abs=1e-12)


def test_lvis_crowd_flag_is_not_an_ignore_region() -> None:
    # COCO ignores a detection on a crowd box; the LVIS API has no crowd handling, so the box is a GT.
    dataset = make_dataset([(10, 1, BOX_A, {"iscrowd": 1}), (10, 1, BOX_B)], num_images=1, num_categories=1)
    dets = [det(10, 1, BOX_B, 0.9)]
    assert evaluate_coco(dataset, dets).stats["mAP"] == pytest.approx(1.0, abs=1e-12)
    assert evaluate_lvis(dataset, dets).stats["AP"] == pytest.approx(AP_HALF_RECALL, abs=1e-12)


def test_lvis_keeps_top_300_detections_per_image() -> None:
    # The only true positive has the lowest score of 301 detections: LVIS drops it, COCO keeps it.
    dataset = make_dataset([(10, 1, (0, 0, 20, 20))], num_images=1, num_categories=1)
    fps = [det(10, 1, (30 + 2 * (k % 250), 30 + 50 * (k // 250), 1, 1), 0.9) for k in range(300)]
    dets = [*fps, det(10, 1, (0, 0, 20, 20), 0.1)]
    assert evaluate_lvis(dataset, dets).stats["AP"] == 0.0
    assert evaluate_coco(dataset, dets).stats["mAP_50"] > 0.0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (det(10, 7, BOX_A, 0.9), "category id"),
        (det(99, 1, BOX_A, 0.9), "image id"),
        ({"image_id": 10, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}, "bbox"),
        ({"image_id": 10, "category_id": 1, "bbox": [1, 2, 3, 4]}, "score"),
        (det(10, 1, BOX_A, float("nan")), "non-finite"),
    ],
)
def test_bad_detections_are_rejected(bad: dict, message: str) -> None:
    dataset = make_dataset([(10, 1, BOX_A)])
    for evaluate in (evaluate_coco, evaluate_lvis):
        with pytest.raises(WeDetectError, match=message):
            evaluate(dataset, [det(10, 1, BOX_A, 0.5), bad])


def _add_annotation(image_id: int, category_id: int):
    ann = {"id": 9, "image_id": image_id, "category_id": category_id, "bbox": [0, 0, 1, 1]}
    return lambda d: d["annotations"].append(ann)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_add_annotation(999, 1), "image id 999"),
        (_add_annotation(10, 42), "category id 42"),
        (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id"),
        (lambda d: d.pop("categories"), "categories"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2]), "malformed bbox"),
    ],
)  # fmt: skip
def test_bad_annotation_files_are_rejected(mutate, message: str) -> None:
    raw = make_dataset([(10, 1, BOX_A)]).to_dict()
    mutate(raw)
    with pytest.raises(AnnotationError, match=message):
        CocoDataset.load(raw)


def test_lvis_needs_federated_fields() -> None:
    raw = make_dataset([(10, 1, BOX_A)]).to_dict()
    del raw["images"][1]["neg_category_ids"]
    with pytest.raises(AnnotationError, match="neg_category_ids"):
        evaluate_lvis(CocoDataset.load(raw), [det(10, 1, BOX_A, 0.5)])


def test_class_count_must_match_categories() -> None:
    dataset = make_dataset([(10, 1, BOX_A)], num_categories=3)
    dataset.check_class_count(3)
    with pytest.raises(AnnotationError, match="2 classes but the dataset has 3 categories"):
        dataset.check_class_count(2)


def test_missing_image_files_are_named(tmp_path) -> None:
    dataset = make_dataset([(10, 1, BOX_A)])
    (tmp_path / "img0.jpg").write_bytes(b"x")
    (tmp_path / "img1.jpg").write_bytes(b"x")
    with pytest.raises(AnnotationError, match=r"1 of 3 images not found .*30 \(img2.jpg\)"):
        resolve_image_paths(dataset, tmp_path)
    (tmp_path / "val2017").mkdir()
    (tmp_path / "val2017" / "x.jpg").write_bytes(b"x")
    raw = dataset.to_dict()
    raw["images"][2] = {**raw["images"][2], "file_name": "", "coco_url": "http://images.cocodataset.org/val2017/x.jpg"}
    paths = resolve_image_paths(CocoDataset.load(raw), tmp_path)  # LVIS-style coco_url lookup
    assert paths[30] == tmp_path / "val2017" / "x.jpg"


# ---------------------------------------------------------------- proposal recall


def test_perfect_proposals_recall_everything() -> None:
    gt = [np.array([[0, 0, 10, 10], [20, 20, 50, 40]], np.float32), np.zeros((0, 4), np.float32)]
    result = eval_recalls(gt, [gt[0][::-1].copy(), np.zeros((0, 4))])
    np.testing.assert_array_equal(result.recalls, np.ones((2, 10)))
    assert result.ar == [1.0, 1.0]
    assert result.total_gt == 2


def test_greedy_matching_is_not_optimal() -> None:
    # GT 0 takes proposal 0 (0.9) first, leaving GT 1 only proposal 1 (0.0); an optimal
    # assignment would give 0.7 and 0.8.
    ious = np.array([[0.9, 0.7], [0.8, 0.0]], np.float32)
    np.testing.assert_array_equal(greedy_best_iou(ious), np.float32([0.9, 0.0]))
    # Fewer proposals than GT: the unmatched GT gets -1; no proposals at all: 0.
    np.testing.assert_array_equal(greedy_best_iou(np.array([[0.5], [0.6]], np.float32)), np.float32([-1.0, 0.6]))
    np.testing.assert_array_equal(greedy_best_iou(np.zeros((2, 0), np.float32)), [0.0, 0.0])


def test_top_100_budget_ignores_later_proposals() -> None:
    gt = [np.array([[0, 0, 100, 100]], np.float32)]
    far = np.tile(np.array([[200, 200, 210, 210]], np.float32), (299, 1))
    proposals = np.concatenate([far[:149], gt[0], far[149:]])  # the exact box at rank 150 (of 300)
    result = eval_recalls(gt, [proposals])
    np.testing.assert_array_equal(result.recalls, [[0.0] * 10, [1.0] * 10])
    # Rank 301 is never seen, whatever the budget.
    result = eval_recalls(gt, [np.concatenate([far, far[:1], gt[0]])], proposal_nums=(100, 300))
    np.testing.assert_array_equal(result.recalls, np.zeros((2, 10)))


def test_threshold_comparison_float32_versus_float64() -> None:
    # IoU 6500/10000 is float32(0.65), which lies below the float64 threshold 0.65.
    gt = [np.array([[0, 0, 100, 100]], np.float32)]
    proposals = [np.array([[0, 0, 100, 65]], np.float32)]
    f32 = eval_recalls(gt, proposals, compare="float32").recalls[0]
    f64 = eval_recalls(gt, proposals, compare="float64").recalls[0]
    np.testing.assert_array_equal(f32, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(f64, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0])


def test_recall_ground_truth_filtering_per_dataset_kind(tmp_path) -> None:
    dataset = make_dataset(
        [(10, 1, BOX_A), (10, 1, BOX_B, {"iscrowd": 1}), (20, 2, BOX_C, {"ignore": 1}), (20, 2, (5, 5, 0, 10))]
    )
    proposals = {10: np.array([[100, 100, 150, 150]], np.float32), 20: np.zeros((0, 4)), 30: np.zeros((0, 4))}
    coco = proposal_recall(dataset, proposals, "coco")
    lvis = proposal_recall(dataset, proposals, "lvis")
    assert coco.gt_boxes_per_image == [1, 1, 0]  # crowd and ignore dropped; zero-width kept
    assert lvis.gt_boxes_per_image == [2, 1, 0]  # only ignore dropped
    assert coco.recalls[0, 0] == pytest.approx(1 / 2) and lvis.recalls[0, 0] == pytest.approx(1 / 3)
    assert proposal_recall(dataset, proposals, "coco", drop_degenerate=True).total_gt == 1
    save_proposals(tmp_path / "p.npz", proposals)
    loaded = load_proposals(tmp_path / "p.npz")
    assert loaded.keys() == proposals.keys() and np.array_equal(loaded[10], proposals[10])


def test_ar_by_object_size() -> None:
    # A small object found exactly, a large one missed: AR 1 for small, 0 for large, none medium.
    gt = [np.array([[0, 0, 10, 10], [100, 100, 300, 300]], np.float32)]
    result = eval_recalls(gt, [np.array([[0, 0, 10, 10]], np.float32)], gt_areas=[np.array([100.0, 40000.0])])
    assert result.ar_by_size == {"small": [1.0, 1.0], "medium": [None, None], "large": [0.0, 0.0]}
    assert result.ar == [0.5, 0.5]


def test_recall_bad_input() -> None:
    dataset = make_dataset([(10, 1, BOX_A)])
    with pytest.raises(AnnotationError, match="no proposals for 2 of 3"):
        proposal_recall(dataset, {10: np.zeros((0, 4))})
    with pytest.raises(AnnotationError, match="not in the dataset"):
        proposal_recall(dataset, {i: np.zeros((0, 4)) for i in (10, 20, 30, 40)})
    with pytest.raises(AnnotationError, match="no ground-truth boxes"):
        proposal_recall(make_dataset([]), {i: np.zeros((0, 4)) for i in (10, 20, 30)})


# ---------------------------------------------------------------- object retrieval


def embeddings(image_id: int, vectors, scale=0.0, bias=0.0) -> ImageEmbeddings:
    e = torch.tensor(vectors, dtype=torch.float32)
    return ImageEmbeddings(image_id, e, torch.full((len(e),), scale), torch.full((len(e),), bias))


TEXT = torch.eye(2)  # class 0 reads dimension 0, class 1 dimension 1


def test_retrieval_scores_and_strict_threshold() -> None:
    # scale ln 2 doubles the dot product: class 0 logit 2*1 - 1 = 1 (sigmoid 0.731), class 1 logit -1.
    images = [embeddings(10, [[1.0, 0.0], [0.0, 0.0]], scale=float(np.log(2.0)), bias=-1.0)]
    assert retrieve(images, TEXT, ["a", "b"], threshold=0.73) == {"a": {10}, "b": set()}
    assert retrieve(images, TEXT, ["a", "b"], threshold=0.74) == {"a": set(), "b": set()}
    # Raw scoring ignores scale and bias: class 1 scores sigmoid(0) = 0.5, not above 0.5.
    assert retrieve(images, TEXT, ["a", "b"], threshold=0.5, scoring="raw") == {"a": {10}, "b": set()}


def test_retrieval_precision_recall_f1_by_hand() -> None:
    gt = {"a": {1, 2}, "b": {3}, "c": {1, 2, 3}}
    pred = {"a": {1, 4}, "b": set(), "c": {1}, "unannotated": {5}}
    result = evaluate_retrieval(pred, gt)
    a, b, c = (result.per_class[k] for k in "abc")
    assert (a.precision, a.recall, a.f1, a.support, a.n_pred) == (0.5, 0.5, 0.5, 2, 2)
    assert (b.precision, b.recall, b.f1, b.n_pred) == (0.0, 0.0, 0.0, 0)
    assert (c.precision, c.recall, c.f1) == (1.0, 0.3333, 0.5)  # F1 from the unrounded recall 1/3
    assert "unannotated" not in result.per_class
    assert result.macro_recall == pytest.approx((0.5 + 0.0 + 0.3333) / 3, abs=1e-15)  # mean of rounded values
    assert result.unrounded_macro["recall"] == pytest.approx((0.5 + 0.0 + 1 / 3) / 3, abs=1e-15)


def test_retrieval_ground_truth_coco_counts_crowd_lvis_drops_zero_area() -> None:
    dataset = make_dataset([(10, 1, BOX_A, {"iscrowd": 1}), (20, 1, BOX_B), (30, 2, BOX_C, {"area": 0.0})])
    assert retrieval_ground_truth(dataset, "coco") == {"class0": {10, 20}, "class1": {30}}
    assert retrieval_ground_truth(dataset, "lvis") == {"class0": {10, 20}}


def test_object_retrieval_end_to_end_and_roundtrip(tmp_path) -> None:
    dataset = make_dataset([(10, 1, BOX_A), (20, 2, BOX_B), (30, 1, BOX_C)])
    images = [embeddings(10, [[3.0, -3.0]]), embeddings(20, [[-3.0, 3.0], [3.0, -3.0]]), embeddings(30, [[-3.0, -3.0]])]
    result, predicted = evaluate_object_retrieval(dataset, images, TEXT, threshold=0.5)
    assert predicted == {"class0": {10, 20}, "class1": {20}}
    c0 = result.per_class["class0"]
    assert (c0.precision, c0.recall, c0.f1) == (0.5, 0.5, 0.5)
    assert result.macro_f1 == pytest.approx(0.75)
    save_embeddings(tmp_path / "e.npz", images, TEXT)
    loaded, text = load_embeddings(tmp_path / "e.npz")
    assert torch.equal(text, TEXT) and [i.image_id for i in loaded] == [10, 20, 30]
    assert torch.equal(loaded[1].embedding, images[1].embedding)
    # The official .pth layout loads too.
    official = {"image_embedding": [vars(i) for i in images], "text_embedding": TEXT}
    torch.save(official, tmp_path / "coco_wedetect.pth")
    loaded, _ = load_embeddings(tmp_path / "coco_wedetect.pth")
    assert evaluate_object_retrieval(dataset, loaded, TEXT, threshold=0.5)[1] == predicted


def test_retrieval_bad_input() -> None:
    dataset = make_dataset([(10, 1, BOX_A)])
    ok = [embeddings(i, [[1.0, 0.0]]) for i in (10, 20)]
    with pytest.raises(AnnotationError, match="no embeddings for 1 dataset image"):
        evaluate_object_retrieval(dataset, ok, TEXT)
    with pytest.raises(AnnotationError, match="3 text embeddings but 2 class names"):
        evaluate_object_retrieval(dataset, [*ok, embeddings(30, [[1.0, 0.0]])], torch.eye(3, 2))
    empty = ImageEmbeddings(30, torch.zeros((0, 2)), torch.zeros(0), torch.zeros(0))
    with pytest.raises(AnnotationError, match="image 30 has no proposals"):
        evaluate_object_retrieval(dataset, [*ok, empty], TEXT)
    _, predicted = evaluate_object_retrieval(dataset, [*ok, empty], TEXT, threshold=0.5, skip_empty=True)
    assert predicted["class0"] == {10, 20}
    with pytest.raises(AnnotationError, match="appears twice"):
        retrieve([ok[0], ok[0]], TEXT, ["a", "b"])
    no_scale = ImageEmbeddings(10, torch.ones((1, 2)), torch.zeros(0), torch.zeros(0))
    with pytest.raises(AnnotationError, match="no per-proposal scale/bias"):
        retrieve([no_scale], TEXT, ["a", "b"])
    assert retrieve([no_scale], TEXT, ["a", "b"], scoring="raw", threshold=0.5) == {"a": {10}, "b": {10}}


def test_results_are_json_serialisable() -> None:
    dataset = make_dataset([(10, 1, BOX_A)])
    json.dumps(evaluate_coco(dataset, [det(10, 1, BOX_A, 0.9)]).to_dict())
    json.dumps(eval_recalls([np.array([[0, 0, 5, 5]], np.float32)], [np.array([[0, 0, 5, 5]])]).to_dict())
