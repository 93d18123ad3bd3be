"""Oracle parity of the WeDetect-Ref (REC) evaluation: every ``rec_*`` case under metrics_dir().

Each case holds the dataset files in the official layout, the per-proposal scores the network would have
produced (model_scores.npz), what the official post-processing handed to the metric (predictions.npz) and
the official metric outputs (case.json). Three levels are checked per case / run: the dataset reader
(sample order, queries, proposals used), post-processing + metric from the scores, and metric alone from
the official predictions.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from paths import metrics_dir

from wedetect.eval.rec import (
    QUERY_TEMPLATE,
    PostprocessConfig,
    RecDataset,
    RecPrediction,
    load_model_scores,
    load_rec_dataset,
    postprocess_dataset,
)


def _cases() -> list[tuple[Path, dict]]:
    root = metrics_dir()
    found = []
    for case_file in sorted(root.glob("*/case.json")) if root.is_dir() else []:
        case = json.loads(case_file.read_text(encoding="utf-8"))
        if str(case.get("kind", "")).startswith("rec_"):
            found.append((case_file.parent, case))
    return found


CASES = _cases()
CASE_PARAMS = [pytest.param(folder, case, id=folder.name) for folder, case in CASES]
RUN_PARAMS = [
    pytest.param(folder, case, run, id=f"{folder.name}-{run['name']}") for folder, case in CASES for run in case["runs"]
]


@lru_cache(maxsize=None)
def _dataset(folder: Path, kind: str) -> RecDataset:
    return load_rec_dataset(kind.removeprefix("rec_"), folder)


def _config(args: list[str]) -> PostprocessConfig:
    """The official eval.py flags of a run -> PostprocessConfig (unknown flags fail the test)."""
    kwargs: dict = {}
    it = iter(args)
    for flag in it:
        if flag == "--dataset":
            next(it)
        elif flag == "--num_select":
            kwargs["num_select"] = int(next(it))
        elif flag == "--score_thre":
            kwargs["score_threshold"] = float(next(it))
        elif flag == "--nms":
            kwargs["nms"] = True
        elif flag == "--single_box":
            kwargs["single_box"] = True
        else:
            raise AssertionError(f"unhandled official flag {flag!r}")
    return PostprocessConfig(**kwargs)


def _oracle_predictions(folder: Path, run: str) -> list[RecPrediction]:
    with np.load(folder / "predictions.npz") as data:
        counts, boxes, scores, labels = (data[f"{run}__{k}"] for k in ("counts", "boxes", "scores", "labels"))
    ends = np.cumsum(counts)
    return [
        RecPrediction(boxes[e - c:e], scores[e - c:e], labels[e - c:e]) for c, e in zip(counts.tolist(), ends.tolist())
    ]


def _close(got, expected, tol: float, where: str) -> None:
    if expected is None:
        assert got is None, where
    else:
        assert got is not None and abs(got - expected) <= tol, f"{where}: {got} != {expected}"


def _assert_metrics(kind: str, results: dict, run: dict) -> None:
    expected = run["expected"]
    if kind in ("rec_refcoco", "rec_grefcoco"):
        assert set(results["splits"]) == set(expected)
        for split, values in expected.items():
            for name, value in values.items():
                _close(results["splits"][split][name], value, 1e-12, f"{split} {name}")
        diagnostics = run.get("diagnostics", {})
        if "first_hit_rank" in diagnostics:
            assert results["first_hit_rank"] == diagnostics["first_hit_rank"]
        if "per_sample" in diagnostics:
            for got, want in zip(results["per_sample"], diagnostics["per_sample"], strict=True):
                assert (got["no_target"], got["n_pred"], got["tp"]) == (want["no_target"], want["n_pred"], want["tp"])
                _close(got["f1"], want["f1"], 1e-12, "per-sample f1")
    elif kind == "rec_humanref":
        assert results["rejection_score"] == expected["rejection_score"]
        assert results["rejection_total"] == expected["rejection_total"]
        groups = [("overall", results["overall"], expected["overall"])]
        for group_kind, named in expected["groups"].items():
            assert set(results["groups"][group_kind]) == set(named), group_kind
            groups += [(f"{group_kind}:{n}", results["groups"][group_kind][n], v) for n, v in named.items()]
        for where, got, want in groups:
            assert got["count"] == want["count"], where
            for name, value in want.items():
                _close(got[name], value, 1e-12, f"{where} {name}")
        got_samples = {row["id"]: row for row in results["per_sample"]}
        assert set(got_samples) == {row["id"] for row in run["per_sample"]}
        for want in run["per_sample"]:
            for name, value in want.items():
                if name != "id":
                    _close(got_samples[want["id"]][name], value, 1e-12, f"{want['id']} {name}")
        assert results["rejection_samples"] == run["rejection_samples"]
    elif kind == "rec_d3":
        assert set(results["subsets"]) == set(expected)
        for subset, want in expected.items():
            got = results["subsets"][subset]
            assert got["reported"] == want["reported"], subset
            for name, value in want["unrounded"].items():
                _close(got["unrounded"][name], value, 1e-9, f"{subset} {name}")
            np.testing.assert_allclose(got["coco_stats"], want["coco_stats"], rtol=0, atol=1e-9)
            assert len(got["per_sentence_ap"]) == len(want["per_sentence_ap"])
            for g, w in zip(got["per_sentence_ap"], want["per_sentence_ap"]):
                assert (g["category_id"], g["name"], g["words"]) == (w["category_id"], w["name"], w["words"])
                _close(g["ap"], w["ap"], 1e-9, f"{subset} sentence {w['category_id']}")
    else:
        raise AssertionError(f"no comparison for case kind {kind!r}: extend this test")


@pytest.mark.parity
@pytest.mark.parametrize(("folder", "case"), CASE_PARAMS)
def test_reader_visits_samples_in_official_order(folder: Path, case: dict) -> None:
    dataset = _dataset(folder, case["kind"])
    samples = json.loads((folder / "samples.json").read_text(encoding="utf-8"))
    assert len(dataset.samples) == len(samples)
    for got, want in zip(dataset.samples, samples):
        assert got.uid == want["id"]
        assert got.image == want["image"]
        assert got.subset == want.get("split", "")
        assert got.proposals.shape == (want["n_proposals_used"], 4)
        if "sentence_ids" in want:  # D3: one query per sentence, in the D3 API's (set) order
            assert list(got.labels) == want["sentence_ids"]
            assert got.prompts == want["queries"]
        else:
            assert got.expressions == (want["expression"],)
            assert got.prompts == [want["query"]] == [QUERY_TEMPLATE.format(want["expression"])]


@pytest.mark.parity
@pytest.mark.parametrize(("folder", "case", "run"), RUN_PARAMS)
def test_postprocessing_and_metrics_match_oracle(folder: Path, case: dict, run: dict) -> None:
    dataset = _dataset(folder, case["kind"])
    scores = load_model_scores(folder / case["inputs"]["model_scores"], dataset)
    predictions = postprocess_dataset(dataset, scores, _config(run["args"]))
    oracle = _oracle_predictions(folder, run["name"])
    assert [len(p) for p in predictions] == [len(p) for p in oracle]
    for i, (got, want) in enumerate(zip(predictions, oracle)):
        # Same rows in the same order, bit-identical: the metrics read predictions in received order.
        np.testing.assert_array_equal(got.boxes, want.boxes, err_msg=f"sample {i} boxes")
        np.testing.assert_array_equal(got.scores, want.scores, err_msg=f"sample {i} scores")
        np.testing.assert_array_equal(got.labels, want.labels, err_msg=f"sample {i} labels")
        assert got.boxes.dtype == np.float32 and got.scores.dtype == np.float32
    _assert_metrics(case["kind"], dataset.evaluate(predictions), run)


@pytest.mark.parity
@pytest.mark.parametrize(("folder", "case", "run"), RUN_PARAMS)
def test_metrics_on_official_predictions(folder: Path, case: dict, run: dict) -> None:
    dataset = _dataset(folder, case["kind"])
    _assert_metrics(case["kind"], dataset.evaluate(_oracle_predictions(folder, run["name"])), run)

