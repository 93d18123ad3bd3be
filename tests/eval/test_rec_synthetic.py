"""Hand-computable cases for the REC evaluation: post-processing, the four metric families, the
``corrected`` fixes of the official flaws, dataset readers, score files and the ``eval rec`` command."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from wedetect.cli import rec_eval
from wedetect.eval.rec import (
    HUMANREF_IOU_THRESHOLDS,
    GRefTarget,
    HumanRefTarget,
    PostprocessConfig,
    RecError,
    RecPrediction,
    bbox_overlaps,
    d3_metrics,
    grefcoco_metrics,
    humanref_metrics,
    load_model_scores,
    load_proposals,
    load_rec_dataset,
    postprocess_dataset,
    postprocess_scores,
    refcoco_first_hit_ranks,
    refcoco_precision_at_k,
    save_model_scores,
    score_dataset,
)

BOXES = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
SCORES = np.array([[0.2, 0.9, 0.6], [0.7, 0.1, 0.8]], np.float32)  # 2 queries x 3 proposals


def _rows(pred: RecPrediction) -> list[tuple[float, int, float]]:
    """(x1, label, score) of each row, rounded for readable asserts."""
    return [(float(b[0]), int(l), round(float(s), 4)) for b, l, s in zip(pred.boxes, pred.labels, pred.scores)]


# ------------------------------------------------------------------------------------------- post-processing


def test_threshold_keeps_rows_above_it_in_concatenation_order() -> None:
    pred = postprocess_scores(BOXES, SCORES, PostprocessConfig(score_threshold=0.5))
    # Query 0's rows in proposal order, then query 1's: not sorted by score.
    assert _rows(pred) == [(20.0, 0, 0.9), (40.0, 0, 0.6), (0.0, 1, 0.7), (40.0, 1, 0.8)]
    assert pred.boxes.dtype == np.float32 and pred.scores.dtype == np.float32 and pred.labels.dtype == np.int64


def test_threshold_is_strict() -> None:
    scores = np.array([[0.5, 0.50001, 0.1]], np.float32)
    pred = postprocess_scores(BOXES, scores, PostprocessConfig(score_threshold=0.5))
    assert _rows(pred) == [(20.0, 0, 0.5)]


def test_top_k_sorts_by_score_and_caps_at_available_rows() -> None:
    assert _rows(postprocess_scores(BOXES, SCORES, PostprocessConfig(num_select=2))) == [(20.0, 0, 0.9), (40.0, 1, 0.8)]
    assert [r[2] for r in _rows(postprocess_scores(BOXES, SCORES, PostprocessConfig()))] == [0.9, 0.8, 0.7, 0.6, 0.2, 0.1]


def test_labels_map_query_index_to_sample_labels() -> None:
    pred = postprocess_scores(BOXES, SCORES, PostprocessConfig(num_select=3), labels=[24, 17])
    assert pred.labels.tolist() == [24, 17, 17]


def test_nms_is_class_aware() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [50, 50, 60, 60]], np.float32)
    scores = np.array([[0.9, 0.8, 0.3], [0.1, 0.85, 0.2]], np.float32)
    pred = postprocess_scores(boxes, scores, PostprocessConfig(nms=True))
    # Within each query the near-duplicate (IoU 0.95 > 0.7) goes; across queries the same box survives.
    assert _rows(pred) == [(0.0, 0, 0.9), (0.0, 1, 0.85), (50.0, 0, 0.3), (50.0, 1, 0.2)]
    assert pred.boxes[:2].tolist() == [[0, 0, 10, 10], [0, 0, 10, 10.5]]


def test_more_than_max_rows_keeps_the_best_rows_first() -> None:
    # 4 rows, cut at 3 before the threshold: the 4th-best row (0.6 > 0.5) is gone and the order is by score.
    scores = np.array([[0.6, 0.9], [0.7, 0.8]], np.float32)
    pred = postprocess_scores(BOXES[:2], scores, PostprocessConfig(score_threshold=0.5, max_rows=3))
    assert _rows(pred) == [(20.0, 0, 0.9), (20.0, 1, 0.8), (0.0, 1, 0.7)]


def test_single_box_takes_the_best_query_per_proposal() -> None:
    pred = postprocess_scores(BOXES, SCORES, PostprocessConfig(single_box=True, score_threshold=0.95), labels=[5, 6])
    # No threshold and no top-k in single-box mode: every proposal stays, in proposal order.
    assert _rows(pred) == [(0.0, 6, 0.7), (20.0, 5, 0.9), (40.0, 6, 0.8)]


def test_postprocess_handles_no_proposals_and_rejects_bad_shapes() -> None:
    assert len(postprocess_scores(np.zeros((0, 4), np.float32), np.zeros((2, 0), np.float32), PostprocessConfig())) == 0
    with pytest.raises(RecError, match="shape"):
        postprocess_scores(BOXES, SCORES.T, PostprocessConfig())
    with pytest.raises(RecError, match="labels"):
        postprocess_scores(BOXES, SCORES, PostprocessConfig(), labels=[1])


@pytest.mark.parametrize(
    "kwargs", [{"score_threshold": 0.0}, {"score_threshold": 1.5}, {"num_select": 0}, {"nms_iou": 0.0}, {"max_rows": 0}]
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(RecError):
        PostprocessConfig(**kwargs)


# ------------------------------------------------------------------------------------------------- geometry


def test_bbox_overlaps_values() -> None:
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 0, 15, 10], [10, 0, 20, 10], [0, 0, 10, 10], [3, 3, 3, 3]], np.float32)
    ious = bbox_overlaps(a, b)
    assert ious.dtype == np.float32 and ious.shape == (1, 4)
    np.testing.assert_allclose(ious[0], [1 / 3, 0.0, 1.0, 0.0], rtol=1e-6)
    assert bbox_overlaps(b[3:], b[3:])[0, 0] == 0.0  # zero-area boxes: union floored at eps, no NaN


# -------------------------------------------------------------------------------------------------- RefCOCO


def test_refcoco_precision_at_k_reads_predictions_in_received_order() -> None:
    gt = [np.array([[0, 0, 10, 10]], np.float32)] * 3
    miss, hit = [50, 50, 60, 60], [0, 0, 10, 9]
    preds = [np.array([hit]), np.array([miss, miss, hit]), np.array([miss] * 12)]
    ranks = refcoco_first_hit_ranks(preds, gt)
    assert ranks == [1, 3, None]
    assert refcoco_precision_at_k(ranks) == {"P@1": 1 / 3, "P@5": 2 / 3, "P@10": 2 / 3}


def test_refcoco_iou_exactly_half_is_a_hit() -> None:
    gt = [np.array([[0, 0, 10, 10]], np.float32)]
    assert refcoco_first_hit_ranks([np.array([[0, 0, 10, 5]])], gt) == [1]  # IoU 50/100
    assert refcoco_first_hit_ranks([np.array([[0, 0, 10, 4.9]])], gt) == [None]


def test_refcoco_official_errors_and_corrected_mode() -> None:
    two_gt = [np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)]
    with pytest.raises(RecError, match="exactly one"):
        refcoco_first_hit_ranks([np.array([[50, 50, 60, 60]])], two_gt)
    assert refcoco_first_hit_ranks([np.array([[50, 50, 60, 60]])], two_gt, corrected=True) == [1]
    one_gt = [np.array([[0, 0, 10, 10]], np.float32)]
    with pytest.raises(RecError, match="no prediction"):
        refcoco_first_hit_ranks([np.zeros((0, 4))], one_gt)
    assert refcoco_first_hit_ranks([np.zeros((0, 4))], one_gt, corrected=True) == [None]
    with pytest.raises(RecError):
        refcoco_precision_at_k([])


# ------------------------------------------------------------------------------------------------- gRefCOCO


def _target(boxes: list[list[float]], cats: list[int]) -> GRefTarget:
    return GRefTarget(np.asarray(boxes, np.float64).reshape(-1, 4), tuple(cats))


def test_grefcoco_official_scores() -> None:
    targets = [
        _target([[0, 0, 10, 10]], [1]),  # hit alone: F1 1
        _target([[0, 0, 10, 10]], [1]),  # hit + far FP: F1 2/3
        _target([[0, 0, 0, 0]], [-1]),  # no-target, no prediction: correct
        _target([[0, 0, 0, 0]], [-1]),  # no-target with a prediction: wrong
        _target([[0, 0, 10, 10]], [1]),  # target without prediction: T-acc miss
        _target([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1]),  # hits the 2nd annotation only: F1 0 (official)
    ]
    preds = [
        np.array([[0, 0, 10, 9]]), np.array([[0, 0, 10, 9], [80, 80, 90, 90]]), np.zeros((0, 4)),
        np.array([[1, 1, 2, 2]]), np.zeros((0, 4)), np.array([[20, 20, 30, 30]]),
    ]
    metrics, per_sample = grefcoco_metrics(preds, targets)
    assert [s["f1"] for s in per_sample] == [1.0, 2 / 3, 1.0, 0.0, 0.0, 0.0]
    assert metrics == {"F1_score": 2 / 6, "T_acc": 3 / 4, "N_acc": 1 / 2}
    # Corrected: all target annotations are GT, so the last expression has TP 1, FN 1 -> F1 2/3 (still < 1).
    corrected, per_sample = grefcoco_metrics(preds, targets, corrected=True)
    assert per_sample[-1]["tp"] == 1 and per_sample[-1]["f1"] == pytest.approx(2 / 3)
    assert corrected == metrics


def test_grefcoco_corrected_matches_every_target_box() -> None:
    targets = [_target([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1]), _target([[0, 0, 0, 0]], [-1])]
    preds = [np.array([[20, 20, 30, 30], [0, 0, 10, 10]]), np.zeros((0, 4))]
    official, per_official = grefcoco_metrics(preds, targets)
    corrected, per_corrected = grefcoco_metrics(preds, targets, corrected=True)
    assert per_official[0]["tp"] == 1 and per_official[0]["f1"] == pytest.approx(2 / 3)
    assert per_corrected[0]["tp"] == 2 and per_corrected[0]["f1"] == 1.0
    assert official["F1_score"] == 0.5 and corrected["F1_score"] == 1.0


def test_grefcoco_undefined_ratio_is_an_error_unless_corrected() -> None:
    targets = [_target([[0, 0, 10, 10]], [1])]
    preds = [np.array([[0, 0, 10, 10]])]
    with pytest.raises(RecError, match="N_acc"):
        grefcoco_metrics(preds, targets)
    metrics, _ = grefcoco_metrics(preds, targets, corrected=True)
    assert metrics == {"F1_score": 1.0, "T_acc": 1.0, "N_acc": None}
    with pytest.raises(RecError, match="no annotation"):
        grefcoco_metrics([np.zeros((0, 4))], [_target([], [])])


# ------------------------------------------------------------------------------------------------- HumanRef


def _human(id_: str, boxes: list[list[float]], total: int = 4, domain: str = "attribute") -> HumanRefTarget:
    return HumanRefTarget(id_, domain, f"{domain}_sub", tuple(tuple(b) for b in boxes), total)


def test_humanref_arange_thresholds_and_corrected_nominal_ones() -> None:
    assert HUMANREF_IOU_THRESHOLDS[2] > 0.6 and HUMANREF_IOU_THRESHOLDS[1] == 0.55
    targets = [_human("a", [[0, 0, 10, 10]])]
    preds = [np.array([[0, 0, 6, 10]])]  # IoU exactly 0.6
    official = humanref_metrics(preds, targets)["per_sample"][0]
    assert official["recall_50"] == 1.0 and official["recall_mean"] == pytest.approx(0.2)  # 0.50, 0.55 only
    corrected = humanref_metrics(preds, targets, corrected=True)["per_sample"][0]
    assert corrected["recall_mean"] == pytest.approx(0.3)  # 0.60 passes too


def test_humanref_density_f1_penalises_extra_predictions() -> None:
    targets = [_human("a", [[0, 0, 10, 10]], total=4)]
    preds = [np.array([[0, 0, 10, 10], [50, 50, 60, 60]])]
    row = humanref_metrics(preds, targets)["per_sample"][0]
    # P 1/2, R 1 -> F1 2/3; density min(1, (1/4)/(2/4)) = 1/2.
    assert (row["precision_50"], row["recall_50"]) == (0.5, 1.0)
    assert row["density_f1_50"] == pytest.approx(1 / 3)
    assert row["density_f1_mean"] == pytest.approx(1 / 3)


def test_humanref_greedy_ties_go_to_the_first_prediction() -> None:
    # Both predictions have IoU 0.8 with GT 1; only p_b also fits GT 2 (IoU 0.5; p_a: 2/7).
    gt1, gt2 = [0, 0, 10, 10], [0, 4, 10, 14]
    p_a, p_b = [0, 0, 10, 8], [0, 2, 10, 10]
    targets = [_human("a", [gt1, gt2])]
    first_a = humanref_metrics([np.array([p_a, p_b])], targets)["per_sample"][0]
    first_b = humanref_metrics([np.array([p_b, p_a])], targets)["per_sample"][0]
    assert first_a["recall_50"] == 1.0  # GT1 takes p_a, GT2 takes p_b
    assert first_b["recall_50"] == 0.5  # GT1 takes p_b, GT2 is left with p_a


def test_humanref_groups_buckets_and_rejection() -> None:
    targets = [
        _human("a", [[0, 0, 10, 10]], domain="attribute"),
        _human("b", [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], domain="position"),
        _human("r1", [], domain="rejection"),
        _human("r2", [], domain="rejection"),
    ]
    preds = [np.array([[0, 0, 10, 10]]), np.zeros((0, 4)), np.zeros((0, 4)), np.array([[1, 1, 5, 5]])]
    out = humanref_metrics(preds, targets)
    assert out["rejection_score"] == 1 and out["rejection_total"] == 2 and out["rejection_rate"] == 0.5
    assert out["overall"]["count"] == 2 and out["overall"]["recall_50"] == 0.5
    assert set(out["groups"]["box_count"]) == {"1", "2-5"}
    assert out["groups"]["domain"]["position"]["density_f1_50"] == 0.0  # no prediction
    assert out["rejection_samples"] == [{"id": "r1", "n_pred": 0}, {"id": "r2", "n_pred": 1}]
    with pytest.raises(RecError, match="no answer box"):
        humanref_metrics([np.zeros((0, 4))], [_human("x", [])])


# ------------------------------------------------------------------------------------------------------- D3


def _d3_annotations(names: list[str]) -> dict:
    boxes = [[10 + 60 * i, 10, 40, 40] for i in range(len(names))]
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 640, "height": 100}],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": i + 1, "bbox": b, "area": 1600.0, "iscrowd": 0}
            for i, b in enumerate(boxes)
        ],
    }


def _d3_prediction(hit: list[bool], extra_label: int | None = None) -> RecPrediction:
    boxes, labels = [], []
    for i, h in enumerate(hit):
        x = 10 + 60 * i
        boxes.append([x, 10, x + 40, 50] if h else [x, 60, x + 40, 100])
        labels.append(i + 1)
    if extra_label is not None:
        boxes.append([10, 10, 50, 50])
        labels.append(extra_label)
    n = len(boxes)
    return RecPrediction(np.asarray(boxes, np.float32), np.linspace(0.9, 0.5, n).astype(np.float32),
                         np.asarray(labels, np.int64))


def test_d3_map_and_length_buckets() -> None:
    names = ["dog", "a dog on grass", "the dog that sits on the grass", "a big dog that sits on the green grass here"]
    ann = _d3_annotations(names)
    # Sentences 1 and 3 are found, 2 and 4 missed; label 99 is not a category of this file and is ignored.
    out = d3_metrics(ann, [(1, _d3_prediction([True, False, True, False], extra_label=99))])
    assert [s["words"] for s in out["per_sentence_ap"]] == [1, 4, 7, 10]
    assert [s["ap"] for s in out["per_sentence_ap"]] == pytest.approx([1.0, 0.0, 1.0, 0.0], abs=1e-12)
    assert out["reported"] == {"mAP": 0.5, "mAP_50": 0.5, "mAP_75": 0.5, "mAP_s": -1.0, "mAP_m": 0.5, "mAP_l": -1.0,
                               "mAP_short": 1.0, "mAP_mid": 0.0, "mAP_long": 1.0, "mAP_very_long": 0.0}
    assert len(out["coco_stats"]) == 12


def test_d3_double_space_and_empty_bucket() -> None:
    names = ["dog", "a  dog", "the dog that sits on the grass", "a big dog that sits on the green grass here"]
    ann = _d3_annotations(names)
    pred = [(1, _d3_prediction([True] * 4))]
    # Official: "a  dog" is 3 words, so no sentence is 4-6 words long: division by zero -> clear error.
    with pytest.raises(RecError, match="'mid' length bucket"):
        d3_metrics(ann, pred)
    out = d3_metrics(ann, pred, corrected=True)
    assert out["per_sentence_ap"][1]["words"] == 2
    assert out["unrounded"]["mAP_mid"] is None and out["reported"]["mAP_short"] == 1.0


def test_d3_without_predictions_is_an_error() -> None:
    with pytest.raises(RecError, match="no D3 prediction"):
        d3_metrics(_d3_annotations(["dog"]), [(1, RecPrediction.empty())])


# ------------------------------------------------------------------------------------- readers and score files


def _write_refcoco(folder: Path, proposals: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    entries = [
        {"id": 7, "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "red cup"}],
         "bounding_boxes": [[0, 0, 10, 10]]},
        {"id": 8, "image": "b.jpg", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "left man"}],
         "bounding_boxes": [[15, 15, 40, 40]]},
    ]
    (folder / "refcoco_validation.json").write_text(json.dumps(entries))
    (folder / "images.json").write_text(json.dumps({"a.jpg": {"width": 32, "height": 24}, "b.jpg": {"width": 40, "height": 40}}))
    (folder / "proposals.json").write_text(json.dumps(proposals))


def test_proposal_file_formats(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({
        "two": [[0, 0, 1, 1], [2, 2, 3, 3]],  # two boxes (the official len()==2 test would misread this)
        "pair": [[[0, 0, 1, 1]], [0.9]],  # [boxes, scores]
        "none": [],
    }))
    got = load_proposals(path)
    assert got["two"].shape == (2, 4) and got["pair"].tolist() == [[0, 0, 1, 1]] and got["none"].shape == (0, 4)
    for bad in ([[0, 0, 1]], [[0, 0, 1, 1], [0, 0]], [["a", 0, 1, 1]]):
        path.write_text(json.dumps({"bad": bad}))
        with pytest.raises(RecError, match="'bad' are not a list"):
            load_proposals(path)


def test_refcoco_reader_clamps_and_caps_proposals(tmp_path: Path) -> None:
    many = [[-5, 2, 50, 30]] + [[1, 1, 5, 5]] * 120
    _write_refcoco(tmp_path, {"a.jpg": many, "b.jpg": [[0, 0, 20, 20]]})
    ds = load_rec_dataset("refcoco", tmp_path)
    first = ds.samples[0]
    assert first.uid == 7 and first.subset == "refcoco_validation" and first.image_size == (24, 32)
    assert first.expressions == ("red cup",) and first.prompts == ['Please detect the "red cup" in the image']
    assert first.proposals.shape == (100, 4) and first.proposals.dtype == np.float32
    assert first.proposals[0].tolist() == [0, 2, 32, 24]  # x to [0, W], y to [0, H]


def test_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(RecError, match="does not exist"):
        load_rec_dataset("refcoco", tmp_path / "missing")
    with pytest.raises(RecError, match="unknown REC dataset"):
        load_rec_dataset("coco", tmp_path)
    with pytest.raises(RecError, match="no RefCOCO split"):
        load_rec_dataset("refcoco", tmp_path)
    _write_refcoco(tmp_path, {"a.jpg": [[0, 0, 5, 5]]})
    with pytest.raises(RecError, match="'b.jpg' has no entry"):
        load_rec_dataset("refcoco", tmp_path)


def test_model_scores_round_trip_and_validation(tmp_path: Path) -> None:
    _write_refcoco(tmp_path, {"a.jpg": [[0, 0, 5, 5], [1, 1, 9, 9], [0, 0, 10, 10]], "b.jpg": [[15, 15, 40, 40]]})
    ds = load_rec_dataset("refcoco", tmp_path)
    matrices = [np.array([[0.1, 0.2, 0.9]], np.float32), np.array([[0.7]], np.float32)]
    save_model_scores(tmp_path / "s.npz", matrices)
    loaded = load_model_scores(tmp_path / "s.npz", ds)
    assert [m.tolist() for m in loaded] == [m.tolist() for m in matrices]
    results = ds.evaluate(postprocess_dataset(ds, loaded, PostprocessConfig(num_select=20)))
    assert results["first_hit_rank"] == [1, 1]
    save_model_scores(tmp_path / "bad.npz", [np.array([[0.1, 0.2]], np.float32), np.array([[0.7]], np.float32)])
    with pytest.raises(RecError, match="record 0"):
        load_model_scores(tmp_path / "bad.npz", ds)
    save_model_scores(tmp_path / "short.npz", matrices[:1])
    with pytest.raises(RecError, match="needs 2"):
        load_model_scores(tmp_path / "short.npz", ds)


def test_score_dataset_calls_the_scorer_per_sample(tmp_path: Path) -> None:
    _write_refcoco(tmp_path, {"a.jpg": [[0, 0, 5, 5], [0, 0, 10, 10]], "b.jpg": [[15, 15, 40, 40]]})
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"")
    ds = load_rec_dataset("refcoco", tmp_path)
    calls = []

    def scorer(path: str, expressions: list[str], boxes: np.ndarray) -> np.ndarray:
        calls.append((Path(path).name, expressions, boxes.shape))
        return np.linspace(0.1, 0.9, len(boxes), dtype=np.float32)[None]

    out = score_dataset(ds, scorer, progress=False)
    assert calls == [("a.jpg", ["red cup"], (2, 4)), ("b.jpg", ["left man"], (1, 4))]
    assert out[0].tolist() == [[pytest.approx(0.1), pytest.approx(0.9)]]
    with pytest.raises(RecError, match="scorer returned shape"):
        score_dataset(ds, lambda p, e, b: np.zeros((3,)), progress=False)


def test_d3_pickle_reader_matches_json_reader(tmp_path: Path) -> None:
    scen = {
        "images": [{"id": 5, "file_name": "x.jpg", "width": 64, "height": 48, "group_id": 1}],
        "groups": [{"id": 1, "sentence_ids": [3, 10, 17, 24], "image_ids": [5]}],
        "sentences": [{"id": s, "raw_sent": f"s{s}", "group_id": 1} for s in (3, 10, 17, 24)],
    }
    ann = _d3_annotations(["a"])
    for folder in (tmp_path / "json", tmp_path / "pkl"):
        folder.mkdir()
        (folder / "proposals.json").write_text(json.dumps({"x.jpg": [[0, 0, 70, 10]]}))
        for file in ("d3_full_annotations.json", "d3_pres_annotations.json", "d3_abs_annotations.json"):
            (folder / file).write_text(json.dumps(ann))
    (tmp_path / "json" / "d3_scenarios.json").write_text(json.dumps(scen))
    pkl = tmp_path / "pkl" / "d3_pkl"
    pkl.mkdir()
    for name, value in {
        "images": {5: {"id": 5, "file_name": "x.jpg", "width": 64, "height": 48, "group_id": 1}},
        "groups": {1: {"inner_sent_id": [3, 10, 17, 24], "img_id": [5]}},
        "sentences": {s: {"raw_sent": f"s{s}"} for s in (3, 10, 17, 24)},
    }.items():
        (pkl / f"{name}.pkl").write_bytes(pickle.dumps(value))
    a, b = (load_rec_dataset("d3", tmp_path / n).samples[0] for n in ("json", "pkl"))
    assert a.labels == b.labels == (24, 17, 10, 3)  # the D3 API's set order
    assert a.expressions == b.expressions == ("s24", "s17", "s10", "s3")
    assert a.proposals.tolist() == b.proposals.tolist() == [[0, 0, 64, 10]]


# ------------------------------------------------------------------------------------------------------ CLI


def _cli() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(rec_eval.app, name="eval")
    return root


def test_cli_scores_file_to_json(tmp_path: Path) -> None:
    _write_refcoco(tmp_path, {"a.jpg": [[0, 0, 5, 5], [0, 0, 10, 10]], "b.jpg": [[15, 15, 40, 40]]})
    save_model_scores(tmp_path / "s.npz", [np.array([[0.9, 0.3]], np.float32), np.array([[0.2]], np.float32)])
    out = tmp_path / "out.json"
    result = CliRunner().invoke(_cli(), ["eval", "rec", str(tmp_path), "--scores", str(tmp_path / "s.npz"),
                                         "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "refcoco_validation" in result.output
    payload = json.loads(out.read_text())
    assert payload["dataset"] == "refcoco" and payload["metrics"] == "official"
    # Sample a: top-1 is [0,0,5,5] (IoU 0.25, miss), rank 2 hits; sample b hits at rank 1.
    assert payload["results"]["splits"]["refcoco_validation"] == {"P@1": 0.5, "P@5": 1.0, "P@10": 1.0, "count": 2}


def test_cli_threshold_without_prediction_fails_cleanly_unless_corrected(tmp_path: Path) -> None:
    _write_refcoco(tmp_path, {"a.jpg": [[0, 0, 10, 10]], "b.jpg": [[15, 15, 40, 40]]})
    save_model_scores(tmp_path / "s.npz", [np.array([[0.9]], np.float32), np.array([[0.2]], np.float32)])
    args = ["eval", "rec", str(tmp_path), "--scores", str(tmp_path / "s.npz"), "--score-thre", "0.5"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 2 and "no prediction" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(_cli(), [*args, "--corrected", "--json", "-"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["results"]["splits"]["refcoco_validation"]["P@1"] == 0.5


def test_cli_runs_the_model_path_through_the_scorer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_refcoco(tmp_path, {"a.jpg": [[0, 0, 5, 5], [0, 0, 10, 10]], "b.jpg": [[15, 15, 40, 40]]})
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"")

    def fake_scorer(checkpoint: Path, device: str, dtype: str):
        assert checkpoint == tmp_path / "ref" and device == "cpu"
        return lambda path, expressions, boxes: np.arange(len(boxes), dtype=np.float32)[None] / 10 + 0.5

    monkeypatch.setattr(rec_eval, "_ref_scorer", fake_scorer)
    saved = tmp_path / "saved.npz"
    result = CliRunner().invoke(_cli(), ["eval", "rec", str(tmp_path), "--ref-checkpoint", str(tmp_path / "ref"),
                                         "--device", "cpu", "--save-scores", str(saved), "--json", "-", "-q"])
    assert result.exit_code == 0, result.output
    assert "scoring" not in result.output  # -q: no progress bar
    assert json.loads(result.stdout)["results"]["first_hit_rank"] == [1, 1]
    assert [m.tolist() for m in load_model_scores(saved, load_rec_dataset("refcoco", tmp_path))] == [
        [[0.5, pytest.approx(0.6)]], [[0.5]]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "exactly one of"),
        (["--scores", "s.npz", "--ref-checkpoint", "r"], "exactly one of"),
        (["--scores", "s.npz", "--uni-checkpoint", "u.pth"], "only applies"),
        (["--scores", "s.npz", "--score-thre", "0"], "score_threshold"),
    ],
)
def test_cli_usage_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    _write_refcoco(tmp_path, {"a.jpg": [[0, 0, 10, 10]], "b.jpg": [[15, 15, 40, 40]]})
    result = CliRunner().invoke(_cli(), ["eval", "rec", str(tmp_path), *extra])
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())


def test_cli_scores_with_the_tiny_ref_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real WeDetect-Ref adapter: the CLI's scores equal WeDetectRef.score_queries on the same boxes,
    also when a second expression reuses the cached image of the first."""
    import importlib.util

    import torch
    from PIL import Image

    import wedetect
    from wedetect.ref import WeDetectRef

    # Build the tiny checkpoint with the Ref tests' own builder (one source of truth for the fixture).
    spec = importlib.util.spec_from_file_location("ref_checkpoints", Path(__file__).parents[1] / "ref" / "conftest.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    ref = WeDetectRef.from_pretrained(builder.build_checkpoint(builder.TINY_REF, tmp_path / "ref"))
    monkeypatch.setattr(wedetect, "WeDetectRef", WeDetectRef, raising=False)
    monkeypatch.setattr(WeDetectRef, "from_pretrained", classmethod(lambda cls, *args, **kwargs: ref))

    data = tmp_path / "data"
    data.mkdir()
    entries = [
        {"id": i, "image": "a.jpg", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": e}],
         "bounding_boxes": [[0, 0, 30, 20]]}
        for i, e in enumerate(["red cup", "the left one"])
    ]
    (data / "refcoco_validation.json").write_text(json.dumps(entries))
    (data / "proposals.json").write_text(json.dumps({"a.jpg": [[0, 0, 30, 30], [10, 10, 60, 40], [0, 0, 64, 48]]}))
    Image.new("RGB", (32, 24), (200, 10, 10)).save(data / "a.jpg")  # sizes come from the image itself
    saved = tmp_path / "scores.npz"
    result = CliRunner().invoke(_cli(), ["eval", "rec", str(data), "--ref-checkpoint", "unused", "--device", "cpu",
                                         "--num-select", "2", "--save-scores", str(saved), "--json", "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"]["splits"]["refcoco_validation"]["count"] == 2
    dataset = load_rec_dataset("refcoco", data)
    proposals = dataset.samples[0].proposals
    assert proposals.tolist() == [[0, 0, 30, 24], [10, 10, 32, 24], [0, 0, 32, 24]]
    want = ref.score_queries(str(data / "a.jpg"), ["red cup", "the left one"], torch.from_numpy(proposals))
    got = np.concatenate(load_model_scores(saved, dataset))
    np.testing.assert_allclose(got, want.float().numpy(), rtol=0, atol=1e-6)
