"""The benchmark scripts run end to end at toy sizes and report what their docs promise."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_index_search_benchmark_probing_everything_is_exact(tmp_path):
    """3,000 proposals, 4 cells all probed with 50x candidates (every row): recall@100 must be 1."""
    proc = _run("benchmarks/index_search.py", "--rows", "3000", "--dir", str(tmp_path), "--queries", "4",
                "--clusters", "8", "--partitions", "4", "--nprobes", "1,4", "--refine-factor", "50",
                "--pipeline-images", "3", "--cache", "rows-cold", "--append-rows", "200")  # fmt: skip
    result = json.loads(proc.stdout)
    assert result["rows"] == 3000 and result["index"]["metric"] == "cosine"
    assert result["index"]["index_type"] == "FAISS_IVF_SQ8" and result["search"][0]["cache"] == "rows-cold"
    sweep = {row["nprobes"]: row for row in result["search"]}
    assert sweep[4]["recall@100"] == 1.0 and sweep[4]["min_recall@100"] == 1.0
    assert 0 <= sweep[1]["recall@100"] <= 1 and sweep[1]["p50_ms"] > 0
    assert sweep[4]["speedup_vs_exact_single_query"] > 0  # the ratio to brute force, same run
    assert result["indexing"]["images"] == 3 and result["indexing"]["proposals_per_s"] > 0
    update = result["update"]
    assert update["rows_appended"] == 200 and update["p50_ms_with_delta"] > 0
    assert update["append_ann_update_s"] >= 0 and update["remove_ann_update_s"] >= 0
    from wedetect.index.faiss_ivf import FAISS_FOLDER, FaissIVF

    state = FaissIVF.load(tmp_path / "rows3000_float32" / "index" / FAISS_FOLDER).state
    assert (state.rows, state.delta_rows) == (3000, 0), "the update benchmark must leave the index as it found it"

    # ivf_partition_sim.py regenerates the rows from their ids: the saved exact top-100 must be the
    # top-100 of the regenerated rows.
    sys.path.insert(0, str(REPO / "benchmarks"))
    import numpy as np
    import torch
    from index_search import EMBED_DIM, PER_IMAGE, Synthetic
    from ivf_partition_sim import vectors

    from wedetect.index.store import query_vectors

    syn = Synthetic(8)
    rows = vectors(syn, 0, 3000)
    q = torch.from_numpy(query_vectors(torch.from_numpy(syn.queries(4)), EMBED_DIM + 1))
    truth = json.loads((tmp_path / "rows3000_float32" / "exact_q4_k100.json").read_text())["truth"]
    for qi, t in enumerate(truth):
        top = set(torch.topk(rows @ q[qi], 100).indices.tolist())
        assert top == {img * PER_IMAGE + rank for img, rank in t}, qi
    assert np.isfinite(rows.numpy()).all()


@pytest.mark.slow
def test_detector_benchmark_prints_ratios_for_each_path(tmp_path):
    out = tmp_path / "rows.json"
    _run("benchmarks/bench_detector.py", "--sizes", "tiny", "--batches", "1", "--warmup", "0", "--iters", "1",
         "--stream", "2", "--accel", "none", "device_letterbox+overlap", "--device", "cpu", "--json", str(out))  # fmt: skip
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["device"]  # the table says what it was measured on
    stages = {(r["accel"], r["stage"], r["mode"]) for r in rows}
    assert stages == {("none", "net", "-"), ("none", "e2e", "reference"), ("none", "e2e", "fast"),
                      ("device_letterbox+overlap", "net", "-"), ("device_letterbox+overlap", "e2e", "fast")}  # fmt: skip
    fast = [r for r in rows if r["mode"] == "fast"]
    assert all(r["speedup_vs_reference"] > 0 and r["img_per_s"] > 0 for r in fast)


@pytest.mark.slow
def test_goals_benchmark_reads_each_goal_against_target_and_reference(tmp_path):
    """A smoke run of the Speed goals on Tiny: each row has the target, the reference mode timed in the
    same run, and is never 'met' (the goal is for Base); a Uni goal on Tiny is a one-line usage error."""
    out = tmp_path / "goals.json"
    proc = _run("benchmarks/goals.py", "--device", "cpu", "--size", "tiny", "--dtype", "float32", "--accel", "overlap",
                "--only", "detector-base-b1", "--iters", "1", "--warmup", "0", "--stream", "2", "--json", str(out))  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["goal"] for r in rows] == ["detector-base-b1"]
    row = rows[0]
    assert row["metric"] == "latency ms" and row["target"] == 5.0 and row["value"] == row["latency_ms"] > 0
    assert row["met"] is False and row["reference_img_per_s"] > 0 and row["vs_reference"] > 0
    assert "official_img_per_s" not in row  # the official numbers are for Base, not Tiny
    assert "| detector-base-b1 (on tiny) | <= 5 latency ms |" in proc.stdout
    bad = subprocess.run([sys.executable, "benchmarks/goals.py", "--size", "tiny", "--only", "uni-base-b1"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "base and large only" in bad.stderr and "Traceback" not in bad.stderr


def test_postprocess_benchmark_times_both_modes_and_checks_they_agree():
    proc = _run("benchmarks/bench_postprocess.py", "--images", "1", "--iters", "1", "--objects", "8")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["kind"], r["threshold"]) for r in rows] == [("detector", 0.001), ("detector", 0.3), ("uni", 0.0), ("uni", 0.1)]
    assert all(r["same_scores"] for r in rows), rows
    assert all(r["reference_ms"] > 0 and r["fast_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert "| fast / reference |" in proc.stdout
