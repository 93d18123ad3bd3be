"""A real indexing process killed mid-run (SIGKILL) and restarted loses and duplicates nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from index_fakes import MODEL, FakeProposer, make_images

from wedetect.index import ExtractionSettings, ObjectIndexError, build_index, open_store

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import sys
from index_fakes import MODEL, FakeProposer
from wedetect.index import ExtractionSettings, build_index
build_index(sys.argv[1], sys.argv[2], FakeProposer(delay=0.03), model=MODEL,
            settings=ExtractionSettings(commit_every=3, workers=2), progress=False)
print("done")
"""


def _indexed(path: Path) -> int:
    try:
        return len(open_store(path).images())
    except ObjectIndexError:
        return 0


def _start(idx: Path, imgs: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(Path(__file__).parent)]))
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(idx), str(imgs)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path):
    imgs = make_images(tmp_path / "imgs", 30)
    idx = tmp_path / "idx"
    progress = []
    for target in (4, 16):  # kill once at least `target` images are committed
        proc = _start(idx, tmp_path / "imgs")
        deadline = time.time() + 120
        while _indexed(idx) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.02 * target % 0.07)  # land at different points inside the next commit
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        progress.append(_indexed(idx))
    assert progress == sorted(progress) and 0 < progress[-1] < 30

    proc = _start(idx, tmp_path / "imgs")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "done" in out, err

    clean = tmp_path / "clean"
    build_index(clean, imgs, FakeProposer(), model=MODEL, settings=ExtractionSettings(), progress=False)

    def content(path):
        store = open_store(path)
        assert store.recover() == 0
        recs = sorted((r.path, r.hash, r.num_proposals, r.status) for r in store.images())
        rows = [
            (int(i), int(k), tuple(np.round(v[:8], 5)))
            for b in store.iter_proposals()
            for i, k, v in zip(b.image_id, b.rank, b.vector)
        ]
        return recs, rows, store.count_proposals()

    (recs, rows, n), (crecs, crows, cn) = content(idx), content(clean)
    assert len(recs) == 30 and recs == crecs
    assert len(rows) == len(set(rows)) == n, "duplicated proposals"
    assert sorted(rows) == sorted(crows) and n == cn
