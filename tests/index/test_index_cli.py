"""`wedetect index add|search|info` with a fake proposer and a fake text tower behind the real CLI."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from index_fakes import FakeProposer, make_images
from PIL import Image
from typer.testing import CliRunner

from wedetect.cli import index as cli
from wedetect.index import ObjectIndex
from wedetect.index.search import CachedTextEncoder


class FakeTextTower:
    """Deterministic unit vectors per text; counts model loads through ``loads``."""

    loads = 0

    def __init__(self) -> None:
        FakeTextTower.loads += 1

    def encode_text(self, texts):
        vecs = [torch.randn(768, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
        return torch.nn.functional.normalize(torch.stack(vecs), dim=1)


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("WEDETECT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "_load_uni", lambda *a, **k: FakeProposer())
    monkeypatch.setattr(
        cli, "_text_encoder", lambda ckpt, tok, dev, dt: CachedTextEncoder(ckpt, tok, loader=FakeTextTower)
    )
    FakeTextTower.loads = 0
    make_images(tmp_path / "imgs", 7, size=(40, 60))
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"garbage")
    (tmp_path / "uni.pth").write_bytes(b"uni weights")
    (tmp_path / "det.pth").write_bytes(b"detector weights")
    return tmp_path


def _run(*args):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def _add(env, *extra):
    return _run(
        "add",
        "--uni-checkpoint",
        env / "uni.pth",
        "--index",
        env / "idx",
        "--images",
        env / "imgs",
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    )


def test_add_reports_failures_and_resumes(env):
    r = _add(env, "--json", "-")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["added"] == 7 and report["skipped"] == 0 and report["proposals"] > 7
    assert [f["path"].rsplit("/", 1)[-1] for f in report["failed"]] == ["bad.jpg"]
    r2 = _add(env)
    assert (
        r2.exit_code == 0
        and "skipped 8 already indexed" in r2.output
        and "1 images failed in earlier runs" in r2.output
    )
    # A different checkpoint file is refused with one line, no traceback.
    (env / "uni.pth").write_bytes(b"other weights")
    r3 = _add(env)
    assert r3.exit_code == 2 and "built with checkpoint uni.pth" in r3.output and "Traceback" not in r3.output
    info = json.loads(_run("info", "--index", env / "idx", "--json", "-").stdout)
    assert info["images"] == 7 and info["proposals"] == report["proposals"] and len(info["failed"]) == 1


def test_search_json_matches_api_and_writes_crops(env):
    assert _add(env).exit_code == 0
    args = [
        "search",
        "--index",
        env / "idx",
        "--checkpoint",
        env / "det.pth",
        "--text",
        "狗",
        "--text",
        "red car",
        "--top-k",
        "5",
        "--json",
        "-",
        "--device",
        "cpu",
    ]
    r = _run(*args, "--output-dir", env / "crops", "--nprobes", "4", "--refine-factor", "3", "--exact-rerank", "2")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [q["query"] for q in res] == ["狗", "red car"] and all(len(q["hits"]) == 5 for q in res)
    api = ObjectIndex.open(env / "idx").search_embeddings(FakeTextTower().encode_text(["狗", "red car"]), top_k=5)
    for q, hits in zip(res, api):
        assert [(h["path"], h["box"]) for h in q["hits"]] == [(h.path, h.box) for h in hits]
        np.testing.assert_allclose([h["score"] for h in q["hits"]], [h.score for h in hits], atol=1e-7)
        assert q["hits"] == sorted(q["hits"], key=lambda h: -h["score"])
    crops = sorted((env / "crops" / "00_狗").iterdir())
    assert len(crops) == 5
    x1, y1, x2, y2 = res[0]["hits"][0]["box"]
    w, h = Image.open(crops[0]).size
    assert abs(w - (min(x2, 60) - max(x1, 0))) <= 2 and abs(h - (min(y2, 40) - max(y1, 0))) <= 2
    # The second search is served from the text-embedding cache: no model load.
    FakeTextTower.loads = 0
    assert _run(*args).exit_code == 0 and FakeTextTower.loads == 0
    # Per-image ranking with a threshold and annotated full images.
    r = _run(
        "search",
        "--index",
        env / "idx",
        "--checkpoint",
        env / "det.pth",
        "--text",
        "狗",
        "--per-image",
        "--min-score",
        "0.2",
        "--json",
        "-",
        "--output-dir",
        env / "ann",
    )
    hits = json.loads(r.stdout)[0]["hits"]
    assert len({h["path"] for h in hits}) == len(hits) and all(h["score"] > 0.2 for h in hits)
    assert all(Image.open(p).size == (60, 40) for p in (env / "ann" / "00_狗").iterdir())


def test_search_errors_are_one_line(env):
    r = _run("search", "--index", env / "nothing", "--checkpoint", env / "det.pth", "--text", "dog")
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    assert _add(env).exit_code == 0
    r = _run("search", "--index", env / "idx", "--checkpoint", env / "det.pth")
    assert r.exit_code == 2 and "non-empty --text" in r.output
    r = _run("search", "--index", env / "idx", "--checkpoint", env / "det.pth", "--text", "   ")
    assert r.exit_code == 2 and "non-empty --text" in r.output
    r = _run("search", "--index", env / "idx", "--text", "dog")
    assert r.exit_code == 2 and "--checkpoint" in r.output
    r = _run("search", "--index", "", "--checkpoint", env / "det.pth", "--text", "dog")
    assert r.exit_code == 2 and "--index is empty" in r.output
    r = _run("search", "--index", env / "idx", "--checkpoint", env / "det.pth", "--text", "dog", "--exact-rerank", "0")
    assert r.exit_code == 2 and "--exact-rerank" in r.output and "Traceback" not in r.output


def test_add_ann_options_reach_the_index_build(env):
    r = _add(env, "--ann", "--ann-metric", "ip")
    assert r.exit_code != 0 and "unknown ANN metric 'ip'" in r.output and "Traceback" not in r.output
    r = _add(env, "--ann")  # a handful of proposals: refused in one line, the images stay indexed
    assert r.exit_code != 0 and "an ANN index needs at least 256" in r.output
    assert ObjectIndex.open(env / "idx").info()["images"] == 7


def test_add_ann_type_and_info(env):
    make_images(env / "many", 90, size=(40, 60))  # about 400 proposals: enough for an ANN index
    args = ("add", "--uni-checkpoint", env / "uni.pth", "--index", env / "idx", "--images", env / "many")
    args += ("--no-progress", "--device", "cpu", "--ann-partitions", "2")
    r = _run(*args, "--ann", "--ann-type", "HNSW")
    assert r.exit_code != 0 and "unknown ANN index type 'HNSW'" in r.output and "Traceback" not in r.output
    r = _run(*args, "--ann", "--ann-type", "IVF_FLAT", "--json", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ann_index"]["index_type"] == "IVF_FLAT"
    r = _run("info", "--index", env / "idx")
    assert "ANN index: IVF_FLAT" in r.output
    r = _run(*args, "--ann", "--json", "-")  # the default type for a local index
    assert json.loads(r.stdout)["ann_index"]["index_type"] == "FAISS_IVF_SQ8"
    r = _run("info", "--index", env / "idx", "--json", "-")
    summary = json.loads(r.stdout)
    assert summary["ann_index"] == "FAISS_IVF_SQ8"
    details = summary["ann_index_details"]
    assert details == {"cells": 2, "rows": summary["proposals"], "rows_in_delta_file": 0, "rows_not_yet_indexed": 0}
    assert "ANN index: cells 2, rows " in _run("info", "--index", env / "idx").output
    r = _run("search", "--index", env / "idx", "--checkpoint", env / "det.pth", "--text", "dog", "--json", "-")
    assert r.exit_code == 0 and len(json.loads(r.stdout)[0]["hits"]) == 20


def test_add_passes_the_speed_options_to_the_model(env, monkeypatch):
    seen = {}

    def load(checkpoint, size, device, dtype, **speed):
        seen.update(speed)
        return FakeProposer()

    monkeypatch.setattr(cli, "_load_uni", load)
    r = _add(env, "--overlap", "--device-letterbox", "--channels-last")
    assert r.exit_code == 0, r.output
    assert seen == {"channels_last": True, "compile": None, "device_letterbox": True, "overlap": True}

