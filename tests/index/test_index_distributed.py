"""Multi-process extraction under torchrun: each rank writes its own part, rank 0 commits them once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from index_fakes import MODEL, FakeProposer, make_images

from wedetect.index import ExtractionSettings, build_index, open_store

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import json, os, sys
from index_fakes import MODEL, FakeProposer
from wedetect.index import ExtractionSettings, build_index
proposer = FakeProposer()
report = build_index(sys.argv[1], sys.argv[2], proposer, model=MODEL,
                     settings=ExtractionSettings(commit_every=2, workers=1), progress=False)
rank = int(os.environ["RANK"])
with open(os.path.join(sys.argv[3], f"rank{rank}.json"), "w") as f:  # one file per rank: stdout lines interleave
    json.dump({"rank": rank, "calls": proposer.calls, "added": report.added}, f)
"""


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(tmp_path):
    imgs = make_images(tmp_path / "imgs", 9)
    build_index(tmp_path / "idx", imgs[:3], FakeProposer(), model=MODEL, progress=False)  # some already indexed
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(Path(__file__).parent)]), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
        str(script),
        str(tmp_path / "idx"),
        str(tmp_path / "imgs"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    by_rank = {d["rank"]: d for d in lines}
    assert sorted(d["calls"] for d in lines) == [3, 3]  # the 6 new images split over the ranks
    assert by_rank[0]["added"] == 6  # rank 0 reports the whole run
    assert not (tmp_path / "idx.parts").exists() or not any((tmp_path / "idx.parts").iterdir())

    build_index(tmp_path / "clean", imgs, FakeProposer(), model=MODEL, settings=ExtractionSettings(), progress=False)

    def content(path):
        store = open_store(path)
        recs = sorted((r.path, r.hash, r.num_proposals) for r in store.images())
        rows = sorted(
            (int(i), int(k), tuple(np.round(v[:8], 5)))
            for b in store.iter_proposals()
            for i, k, v in zip(b.image_id, b.rank, b.vector)
        )
        return recs, rows

    assert content(tmp_path / "idx") == content(tmp_path / "clean")
