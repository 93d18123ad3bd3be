"""Non-official evaluation options: optimal recall matching and federated (LVIS) retrieval precision.

The official behaviour stays the default; these tests check each option on hand-computable cases
and that leaving it off changes nothing.
"""
from __future__ import annotations

import copy
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from paths import metrics_dir
from typer.testing import CliRunner

from wedetect.cli import eval as eval_cli
from wedetect.errors import WeDetectError
from wedetect.eval.dataset import AnnotationError, CocoDataset
from wedetect.eval.recall import (
    IOU_THRESHOLDS,
    box_iou_float32,
    eval_recalls,
    greedy_best_iou,
    load_proposals,
    optimal_match_counts,
    proposal_recall,
    save_proposals,
)
from wedetect.eval.retrieval import (
    ImageEmbeddings,
    evaluate_object_retrieval,
    evaluate_retrieval,
    load_embeddings,
    retrieval_ground_truth,
    save_embeddings,
    verified_negatives,
)

THRESHOLDS = np.asarray(IOU_THRESHOLDS, dtype=np.float32).astype(np.float64)  # the default float32 compare


def invoke(*args) -> object:
    return CliRunner().invoke(eval_cli.app, [str(a) for a in args])


# ---------------------------------------------------------------- optimal recall matching

# Boxes of height 10 on the same rows, so IoU is the 1-D interval IoU. GT0 = [0, 20], GT1 = [4, 24];
# P0 = [1, 21] overlaps GT0 by 19/21 (0.905) and GT1 by 17/23 (0.739); P1 = [-6, 14] overlaps GT0 by
# 14/26 (0.538) and GT1 by 10/30 (0.333). Greedy gives P0 to GT0 (largest IoU) and leaves GT1 with
# P1 only; the optimal matching pairs GT0-P1 and GT1-P0 and recalls both at IoU 0.5.
CROSSED_GT = np.array([[0, 0, 20, 10], [4, 0, 24, 10]], np.float32)
CROSSED_PROPOSALS = np.array([[1, 0, 21, 10], [-6, 0, 14, 10]], np.float32)


def test_optimal_matching_recalls_what_greedy_gives_away() -> None:
    greedy = eval_recalls([CROSSED_GT], [CROSSED_PROPOSALS], proposal_nums=(1, 2))
    optimal = eval_recalls([CROSSED_GT], [CROSSED_PROPOSALS], proposal_nums=(1, 2), matching="optimal")
    # Budget 1 (P0 only): one GT at most, up to IoU 0.905, both ways.
    np.testing.assert_array_equal(greedy.recalls[0], [0.5] * 9 + [0.0])
    np.testing.assert_array_equal(optimal.recalls[0], [0.5] * 9 + [0.0])
    # Budget 2: greedy still recalls only GT0; optimal recalls both at 0.5, one from 0.55 to 0.9.
    np.testing.assert_array_equal(greedy.recalls[1], [0.5] * 9 + [0.0])
    np.testing.assert_array_equal(optimal.recalls[1], [1.0] + [0.5] * 8 + [0.0])
    assert greedy.ar == pytest.approx([0.45, 0.45]) and optimal.ar == pytest.approx([0.45, 0.5])
    np.testing.assert_array_equal(optimal.per_image_recalled[0], [[1] * 9 + [0], [2] + [1] * 8 + [0]])


def test_optimal_match_counts_on_a_matrix() -> None:
    # GT0 could take P0 (0.9) or P1 (0.7); GT1 only P0 (0.8). Greedy: GT0-P0, GT1 nothing.
    ious = np.array([[0.9, 0.7], [0.8, 0.0]], np.float32)
    np.testing.assert_array_equal(greedy_best_iou(ious), np.float32([0.9, 0.0]))
    thresholds = np.array([0.5, 0.75, 0.85, 0.95])
    np.testing.assert_array_equal(optimal_match_counts(ious, thresholds), [2, 1, 1, 0])
    # Thresholds need not be sorted; an empty matrix (no proposals or no GT) matches nothing.
    np.testing.assert_array_equal(optimal_match_counts(ious, thresholds[::-1]), [0, 1, 1, 2])
    np.testing.assert_array_equal(optimal_match_counts(np.zeros((2, 0), np.float32), thresholds), [0, 0, 0, 0])
    # One proposal covering three GT recalls only one of them.
    np.testing.assert_array_equal(optimal_match_counts(np.full((3, 1), 0.9, np.float32), thresholds[:1]), [1])


def _brute_force_matching(hit: np.ndarray) -> int:
    """Largest number of rows matched to distinct columns through True entries (exhaustive search)."""
    n, m = hit.shape
    for k in range(min(n, m), 0, -1):
        for rows in itertools.combinations(range(n), k):
            if any(all(hit[r, c] for r, c in zip(rows, cols)) for cols in itertools.permutations(range(m), k)):
                return k
    return 0


def _random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    xy = rng.uniform(0, 40, (count, 2))
    wh = rng.uniform(8, 20, (count, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def test_optimal_matching_is_maximum_and_never_below_greedy() -> None:
    rng = np.random.default_rng(0)
    gt_boxes, proposals = [], []
    for _ in range(60):
        # Crowded scenes: 1-4 GT jittered around one box, proposals jittered around the GT, plus
        # random boxes, so that proposals often fit several GT and greedy choices can be wrong.
        gt = _random_boxes(rng, 1) + rng.normal(0, 2.5, (int(rng.integers(1, 5)), 4)).astype(np.float32)
        near = gt[rng.integers(0, len(gt), 4)] + rng.normal(0, 2, (4, 4)).astype(np.float32)
        props = rng.permutation(np.concatenate([near, _random_boxes(rng, int(rng.integers(0, 3)))]))
        gt_boxes.append(gt)
        proposals.append(props)
        ious = box_iou_float32(gt, props)
        want = [_brute_force_matching(ious.astype(np.float64) >= t) for t in THRESHOLDS]
        np.testing.assert_array_equal(optimal_match_counts(ious, THRESHOLDS), want)
    nums = (3, 6)
    greedy = eval_recalls(gt_boxes, proposals, proposal_nums=nums)
    optimal = eval_recalls(gt_boxes, proposals, proposal_nums=nums, matching="optimal")
    for g, o in zip(greedy.per_image_recalled, optimal.per_image_recalled):
        assert np.all(o >= g)
    assert np.all(optimal.recalls >= greedy.recalls)
    assert np.any(optimal.recalls > greedy.recalls)  # these crowded cases do catch greedy out
    assert np.all(optimal.recalls[0] <= optimal.recalls[1])  # more proposals never hurt


def test_optimal_ar_by_size_matches_each_size_on_its_own() -> None:
    # A small GT (area 1000) and a medium one (1100), one proposal [0, 0, 25, 42] covering both with
    # IoU 1000/1050 and 1050/1100 (> 0.95). Greedy gives it to the medium GT (larger IoU).
    gt = [np.array([[0, 0, 25, 40], [0, 0, 25, 44]], np.float32)]
    props = [np.array([[0, 0, 25, 42]], np.float32)]
    areas = [np.array([1000.0, 1100.0])]
    greedy = eval_recalls(gt, props, gt_areas=areas)
    optimal = eval_recalls(gt, props, gt_areas=areas, matching="optimal")
    assert greedy.ar == optimal.ar == [0.5, 0.5]
    assert greedy.ar_by_size == {"small": [0.0, 0.0], "medium": [1.0, 1.0], "large": [None, None]}
    assert optimal.ar_by_size == {"small": [1.0, 1.0], "medium": [1.0, 1.0], "large": [None, None]}


@pytest.mark.parametrize("mode", ["coco", "lvis"])
def test_optimal_matching_on_the_recall_fixture(mode: str) -> None:
    folder = metrics_dir() / "recall_synth20"
    if not (folder / "case.json").is_file():
        pytest.skip("recall fixture not available")
    case = json.loads((folder / "case.json").read_text(encoding="utf-8"))
    dataset = CocoDataset.load(folder / case["inputs"]["annotations"])
    proposals = load_proposals(folder / case["inputs"]["proposals"])
    greedy = proposal_recall(dataset, proposals, mode)
    optimal = proposal_recall(dataset, proposals, mode, matching="optimal")
    assert optimal.total_gt == greedy.total_gt
    for g, o in zip(greedy.per_image_recalled, optimal.per_image_recalled, strict=True):
        assert (g is None) == (o is None)
        if g is not None:
            assert np.all(o >= g)
    # The default still equals the official numbers recorded with the fixture.
    expected = case["expected"]["float32_compare"]["modes"][mode]
    np.testing.assert_allclose(greedy.recalls, expected["recalls"], rtol=0, atol=1e-12)


def test_matching_option_errors(monkeypatch) -> None:
    with pytest.raises(ValueError, match="matching must be"):
        eval_recalls([CROSSED_GT], [CROSSED_PROPOSALS], matching="hungarian")
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # makes the import fail
    with pytest.raises(WeDetectError, match="needs SciPy"):
        eval_recalls([CROSSED_GT], [CROSSED_PROPOSALS], matching="optimal")
    # The official greedy path needs no SciPy.
    assert eval_recalls([CROSSED_GT], [CROSSED_PROPOSALS]).ar == pytest.approx([0.45, 0.45])


def test_recall_cli_matching_option(tmp_path: Path) -> None:
    images = [{"id": 1, "width": 64, "height": 64, "file_name": "1.jpg"}]
    anns = [
        {"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [float(x1), 0.0, float(x2 - x1), 10.0], "iscrowd": 0}
        for k, (x1, _, x2, _) in enumerate(CROSSED_GT.tolist())
    ]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "categories": [{"id": 1, "name": "a"}], "annotations": anns}))
    save_proposals(tmp_path / "p.npz", {1: CROSSED_PROPOSALS})
    common = ("recall", "--dataset", ann, "--proposals", tmp_path / "p.npz", "--json", "-", "--output-dir")
    default = invoke(*common, tmp_path / "greedy")
    optimal = invoke(*common, tmp_path / "optimal", "--matching", "optimal")
    assert default.exit_code == 0 and optimal.exit_code == 0, default.output + optimal.output
    default, optimal = json.loads(default.stdout), json.loads(optimal.stdout)
    assert "matching" not in default and optimal["matching"] == "optimal"
    assert default["recalls"][1][0] == 0.5 and optimal["recalls"][1][0] == 1.0
    bad = invoke(*common, tmp_path / "bad", "--matching", "hungarian")
    assert bad.exit_code != 0 and "--matching must be greedy or optimal" in bad.output


# ---------------------------------------------------------------- federated LVIS retrieval


def lvis_dataset(image_lists: dict[int, tuple[list, list]], annotations: list[tuple]) -> CocoDataset:
    """Images with (neg_category_ids, not_exhaustive_category_ids); categories 1, 2 named a, b;
    annotations (image id, category id, area)."""
    images = [
        {"id": i, "width": 100, "height": 100, "neg_category_ids": neg, "not_exhaustive_category_ids": nel}
        for i, (neg, nel) in image_lists.items()
    ]
    anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": [0.0, 0.0, 10.0, 10.0], "area": area}
        for k, (i, c, area) in enumerate(annotations)
    ]
    categories = [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"}]
    return CocoDataset.load({"images": images, "categories": categories, "annotations": anns})


# Class a: present on 10, 20 (and on 60, where it is also flagged not exhaustive); verified absent
# on 30; flagged negative but not exhaustive on 40 (LVIS ignores such false positives); unverified
# on 50. Image 70 has an area-0 annotation of a (dropped by the LVIS filter) and lists a as negative.
# Class b: present on 30; verified absent on 10; an unknown category id 99 on 50 is ignored.
FEDERATED = {
    10: ([2], []),
    20: ([], []),
    30: ([1], []),
    40: ([1], [1]),
    50: ([99], []),
    60: ([], [1]),
    70: ([1], []),
}
FEDERATED_ANNOTATIONS = [(10, 1, 100.0), (20, 1, 100.0), (60, 1, 100.0), (30, 2, 100.0), (70, 1, 0.0)]


def test_verified_negatives_follow_the_lvis_rules() -> None:
    dataset = lvis_dataset(FEDERATED, FEDERATED_ANNOTATIONS)
    assert verified_negatives(dataset) == {"a": {30, 70}, "b": {10}}


def test_federated_precision_by_hand() -> None:
    dataset = lvis_dataset(FEDERATED, FEDERATED_ANNOTATIONS)
    gt = retrieval_ground_truth(dataset, "lvis")
    assert gt == {"a": {10, 20, 60}, "b": {30}}
    predicted = {"a": {10, 60, 30, 40, 50, 70}, "b": {20, 40, 50}}
    closed = evaluate_retrieval(predicted, gt)
    federated = evaluate_retrieval(predicted, gt, verified_negatives(dataset))
    # a: TP 10, 60. Closed world: 4 FP -> P 2/6. Federated: FP 30, 70 (verified); 40, 50 ignored -> P 2/4.
    a_closed, a_fed = closed.per_class["a"], federated.per_class["a"]
    assert (a_closed.precision, a_closed.recall) == (0.3333, 0.6667)
    assert (a_fed.precision, a_fed.recall, a_fed.f1) == (0.5, 0.6667, 0.5714)  # F1 = 2*(1/2)(2/3)/(7/6) = 4/7
    assert (a_fed.support, a_fed.n_pred) == (3, 6)  # support and n_pred unchanged
    # b: no TP; none of 20, 40, 50 is a verified negative of b -> no counted retrieval at all: P 0 (official rule).
    b_fed = federated.per_class["b"]
    assert (b_fed.precision, b_fed.recall, b_fed.f1) == (0.0, 0.0, 0.0)
    assert federated.ignored == {"a": 2, "b": 3} and closed.ignored is None
    assert federated.macro_precision == pytest.approx((0.5 + 0.0) / 2)
    assert federated.unrounded_macro["f1"] == pytest.approx((4 / 7 + 0.0) / 2)
    # Extra outputs only in federated mode: the default dictionary and table are unchanged.
    assert "federated" not in closed.to_dict() and "ignored" not in closed.to_dict()
    assert federated.to_dict()["federated"] is True and federated.to_dict()["ignored"] == {"a": 2, "b": 3}
    assert "Federated" not in closed.table() and "5 retrieved (image, class) pairs" in federated.table()


def _embeddings(image_id: int, vector: list[float]) -> ImageEmbeddings:
    return ImageEmbeddings(image_id, torch.tensor([vector]), torch.zeros(1), torch.zeros(1))


def test_federated_object_retrieval_end_to_end(tmp_path: Path) -> None:
    # Text row 0 reads dimension 0 (class a), row 1 dimension 1. Logit 3 retrieves at 0.5, -3 does not.
    dataset = lvis_dataset({1: ([], []), 2: ([1], []), 3: ([], [])}, [(1, 1, 50.0), (2, 2, 50.0), (3, 2, 50.0)])
    images = [_embeddings(1, [3.0, -3.0]), _embeddings(2, [3.0, 3.0]), _embeddings(3, [3.0, 3.0])]
    text = torch.eye(2)
    closed, predicted = evaluate_object_retrieval(dataset, images, text, mode="lvis", threshold=0.5)
    federated, same = evaluate_object_retrieval(dataset, images, text, mode="lvis", threshold=0.5, federated=True)
    assert predicted == same == {"a": {1, 2, 3}, "b": {2, 3}}
    # a: image 2 is a verified negative (FP), image 3 unverified (ignored).
    assert closed.per_class["a"].precision == 0.3333 and federated.per_class["a"].precision == 0.5
    assert federated.per_class["b"] == closed.per_class["b"]  # b: every retrieval is a true positive
    with pytest.raises(WeDetectError, match="mode 'lvis'"):
        evaluate_object_retrieval(dataset, images, text, mode="coco", threshold=0.5, federated=True)
    raw = copy.deepcopy(dataset.to_dict())
    del raw["images"][1]["not_exhaustive_category_ids"]
    with pytest.raises(AnnotationError, match="image 2 lacks the 'not_exhaustive_category_ids' list"):
        evaluate_object_retrieval(CocoDataset.load(raw), images, text, mode="lvis", federated=True)

    # The CLI: --federated adds the extra outputs; without it the payload keeps the official keys only.
    (tmp_path / "ann.json").write_text(json.dumps(dataset.to_dict()))
    save_embeddings(tmp_path / "e.npz", images, text)
    assert load_embeddings(tmp_path / "e.npz")[1] is not None
    common = ("retrieval", "--dataset", tmp_path / "ann.json", "--embeddings", tmp_path / "e.npz", "--mode", "lvis",
              "--threshold", "0.5", "--json", "-", "--output-dir")  # fmt: skip
    plain = invoke(*common, tmp_path / "closed")
    fed = invoke(*common, tmp_path / "fed", "--federated")
    assert plain.exit_code == 0 and fed.exit_code == 0, plain.output + fed.output
    plain, fed = json.loads(plain.stdout), json.loads(fed.stdout)
    assert "federated" not in plain and plain["per_class"]["a"]["precision"] == 0.3333
    assert fed["federated"] is True and fed["ignored"] == {"a": 1, "b": 0}
    assert fed["per_class"]["a"]["precision"] == 0.5 and fed["macro_recall"] == plain["macro_recall"]
    wrong = invoke("retrieval", "--dataset", tmp_path / "ann.json", "--embeddings", tmp_path / "e.npz",
                   "--federated", "--output-dir", tmp_path / "x")  # fmt: skip
    assert wrong.exit_code != 0 and "--federated needs --mode lvis" in wrong.output


def test_federated_precision_is_never_below_closed_world_on_the_fixture() -> None:
    folder = metrics_dir() / "retrieval_synth20"
    if not (folder / "case.json").is_file():
        pytest.skip("retrieval fixture not available")
    case = json.loads((folder / "case.json").read_text(encoding="utf-8"))
    raw = json.loads((folder / case["inputs"]["annotations"]["lvis"]).read_text(encoding="utf-8"))
    # Give every image a verified negative and a not-exhaustive flag for categories it lacks.
    cat_ids = [c["id"] for c in raw["categories"]]
    present: dict[int, set] = {}
    for ann in raw["annotations"]:
        present.setdefault(ann["image_id"], set()).add(ann["category_id"])
    for index, image in enumerate(raw["images"]):
        absent = [c for c in cat_ids if c not in present.get(image["id"], set())]
        image["neg_category_ids"] = absent[index % 3 :: 3]
        image["not_exhaustive_category_ids"] = absent[(index + 1) % 3 :: 6]
    dataset = CocoDataset.load(raw)
    images, text = load_embeddings(folder / case["inputs"]["embeddings"])
    names = case["inputs"]["class_names"]["lvis"]
    kwargs = dict(mode="lvis", threshold=0.2, class_names=names)
    closed, _ = evaluate_object_retrieval(dataset, images, text, **kwargs)
    federated, _ = evaluate_object_retrieval(dataset, images, text, federated=True, **kwargs)
    assert federated.per_class.keys() == closed.per_class.keys()
    for name, c in closed.per_class.items():
        f = federated.per_class[name]
        assert (f.recall, f.support, f.n_pred) == (c.recall, c.support, c.n_pred)
        assert f.precision >= c.precision
    assert sum(federated.ignored.values()) > 0
