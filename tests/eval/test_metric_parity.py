"""Oracle parity of the evaluation metrics: every detection_ap / proposal_recall / object_retrieval
case under metrics_dir() (numbers produced by the official WeDetect metric code)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from paths import metrics_dir

from wedetect.eval.dataset import CocoDataset
from wedetect.eval.detection import evaluate_coco, evaluate_lvis
from wedetect.eval.recall import load_proposals, proposal_recall
from wedetect.eval.retrieval import (
    evaluate_object_retrieval,
    image_class_scores,
    load_embeddings,
    retrieval_ground_truth,
)


def _cases(kind: str) -> list[tuple[Path, dict]]:
    root = metrics_dir()
    found = []
    for case_file in sorted(root.glob("*/case.json")) if root.is_dir() else []:
        case = json.loads(case_file.read_text(encoding="utf-8"))
        if case.get("kind") == kind:
            found.append((case_file.parent, case))
    return found


DETECTION = _cases("detection_ap")
RECALL = [
    pytest.param(folder, case, variant, mode, id=f"{folder.name}-{variant}-{mode}")
    for folder, case in _cases("proposal_recall")
    for variant in case["expected"]
    for mode in case["expected"][variant]["modes"]
]
RETRIEVAL = [
    pytest.param(folder, case, run, id=f"{folder.name}-{run['dataset']}-{run['model']}-{run['thre']}")
    for folder, case in _cases("object_retrieval")
    for run in case["runs"]
]
DETECTION_IDS = [folder.name for folder, _ in DETECTION]

# ---------------------------------------------------------------- detection AP


@pytest.mark.parity
@pytest.mark.parametrize(("folder", "case"), DETECTION, ids=DETECTION_IDS)
def test_coco_ap_matches_oracle(folder: Path, case: dict) -> None:
    expected = case["expected"]["coco"]
    metrics = evaluate_coco(folder / case["inputs"]["annotations"], folder / case["inputs"]["detections"])
    got = [metrics.stats[name] for name in expected["names"]]
    np.testing.assert_allclose(got, expected["stats"], rtol=0, atol=1e-6)
    assert metrics.reported == {name: round(v, 3) for name, v in zip(expected["names"][:6], expected["stats"][:6])}


@pytest.mark.parity
@pytest.mark.parametrize(("folder", "case"), DETECTION, ids=DETECTION_IDS)
def test_faster_coco_eval_equals_pycocotools(folder: Path, case: dict) -> None:
    dataset = CocoDataset.load(folder / case["inputs"]["annotations"])
    detections = folder / case["inputs"]["detections"]
    fast = evaluate_coco(dataset, detections, backend="faster-coco-eval")
    reference = evaluate_coco(dataset, detections, backend="pycocotools")
    assert fast.stats.keys() == reference.stats.keys()
    np.testing.assert_allclose(list(fast.stats.values()), list(reference.stats.values()), rtol=0, atol=1e-12)
    # pycocotools is the library that produced the oracle: it must agree to the last bits.
    expected = case["expected"]["coco"]
    np.testing.assert_allclose([reference.stats[n] for n in expected["names"]], expected["stats"], rtol=0, atol=1e-9)


@pytest.mark.parity
@pytest.mark.parametrize(("folder", "case"), DETECTION, ids=DETECTION_IDS)
def test_lvis_ap_matches_oracle(folder: Path, case: dict) -> None:
    expected = case["expected"]["lvis"]["results"]
    metrics = evaluate_lvis(folder / case["inputs"]["annotations"], folder / case["inputs"]["detections"])
    assert set(expected) <= set(metrics.stats)
    np.testing.assert_allclose([metrics.stats[k] for k in expected], list(expected.values()), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- proposal recall


@pytest.mark.parity
@pytest.mark.parametrize(("folder", "case", "variant", "mode"), RECALL)
def test_proposal_recall_matches_oracle(folder: Path, case: dict, variant: str, mode: str) -> None:
    expected = case["expected"][variant]["modes"][mode]
    compare = {"float32_compare": "float32", "float64_compare": "float64"}[variant]
    result = proposal_recall(
        folder / case["inputs"]["annotations"],
        load_proposals(folder / case["inputs"]["proposals"]),
        mode,
        compare=compare,
    )
    assert list(result.proposal_nums) == case["settings"]["proposal_nums"]
    assert list(result.iou_thrs) == case["settings"]["iou_thrs"]
    assert result.total_gt == expected["total_gt"]
    assert result.gt_boxes_per_image == expected["gt_boxes_per_image"]
    numerators = np.rint(np.asarray(expected["recalls"]) * expected["total_gt"]).astype(np.int64)
    np.testing.assert_array_equal(np.rint(result.recalls * result.total_gt).astype(np.int64), numerators)
    np.testing.assert_allclose(result.recalls, expected["recalls"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.ar, expected["ar"], rtol=0, atol=1e-12)
    for got, want in zip(result.per_image_recalled, expected["per_image_recalled"], strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            np.testing.assert_array_equal(got, want)
    # The printed recall table has the official layout.
    table_lines = [line for line in expected["stdout"].splitlines() if line[:1] in "+|"]
    assert result.table().splitlines()[: len(table_lines)] == table_lines


# ---------------------------------------------------------------- object retrieval


@pytest.mark.parity
@pytest.mark.parametrize(("folder", "case", "run"), RETRIEVAL)
def test_object_retrieval_matches_oracle(folder: Path, case: dict, run: dict) -> None:
    mode = run["dataset"]
    class_names = case["inputs"]["class_names"][mode]
    dataset = CocoDataset.load(folder / case["inputs"]["annotations"][mode])
    images, text = load_embeddings(folder / case["inputs"]["embeddings"])
    scoring = "raw" if run["model"] == "hqclip" else "wedetect"
    result, predicted = evaluate_object_retrieval(
        dataset, images, text, mode=mode, threshold=run["thre"], scoring=scoring, class_names=class_names
    )
    assert {name: sorted(ids) for name, ids in predicted.items() if ids} == run["predicted_images"]
    assert {name: sorted(ids) for name, ids in retrieval_ground_truth(dataset, mode).items()} == run["gt_images"]
    assert result.per_class.keys() == run["per_class"].keys()
    for name, want in run["per_class"].items():
        got = result.per_class[name]
        assert (got.support, got.n_pred) == (want["support"], want["n_pred"])
        np.testing.assert_allclose(
            [got.precision, got.recall, got.f1], [want["precision"], want["recall"], want["f1"]], rtol=0, atol=1e-9
        )
    np.testing.assert_allclose(
        [result.macro_precision, result.macro_recall, result.macro_f1],
        [run["macro_precision"], run["macro_recall"], run["macro_f1"]],
        rtol=0,
        atol=1e-9,
    )


@pytest.mark.parity
@pytest.mark.parametrize(
    ("folder", "case"), _cases("object_retrieval"), ids=[f.name for f, _ in _cases("object_retrieval")]
)
@pytest.mark.parametrize("model", ["wedetect", "hqclip"])
def test_retrieval_scores_match_oracle_diagnostics(folder: Path, case: dict, model: str) -> None:
    images, text = load_embeddings(folder / case["inputs"]["embeddings"])
    scores = image_class_scores(images, text, "raw" if model == "hqclip" else "wedetect")
    np.testing.assert_allclose(scores.numpy(), case["diagnostics"]["max_score"][model], rtol=0, atol=1e-6)
