"""End to end with the real models: WeDetect-Uni proposals indexed, queried through `wedetect index search`
with the WeDetect text tower; scores must equal the official formula on the proposer's own outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wedetect import WeDetect, WeDetectUni
from wedetect.cli import index as cli
from wedetect.index import ExtractionSettings, ObjectIndex, build_index, checkpoint_identity

pytestmark = pytest.mark.slow


class Recording:
    """Passes through to WeDetectUni and keeps what it returned, per input image."""

    def __init__(self, uni: WeDetectUni) -> None:
        self.uni, self.outputs = uni, []

    def propose(self, images, **kw):
        dets = self.uni.propose(images, **kw)
        self.outputs += dets
        return dets


def test_real_uni_index_and_cli_search(
    official_checkpoint, tiny_tokenizer, demo_image, shapes_image, tmp_path, monkeypatch
):
    monkeypatch.setenv("WEDETECT_CACHE_DIR", str(tmp_path / "cache"))
    uni_ckpt = official_checkpoint("keys_uni_base.json")
    det_ckpt = official_checkpoint("keys_detector_tiny.json")
    settings = ExtractionSettings(num_proposals=50, batch_size=2)
    proposer = Recording(WeDetectUni.from_pretrained(uni_ckpt))
    report = build_index(
        tmp_path / "idx",
        [demo_image, shapes_image],
        proposer,
        model=checkpoint_identity(uni_ckpt, settings),
        settings=settings,
        progress=False,
    )
    assert report.added == 2 and report.proposals == sum(len(d) for d in proposer.outputs) > 0
    assert all(d.embeddings.shape[1] == 768 for d in proposer.outputs)

    queries = ["狗", "person"]
    text = WeDetect.from_pretrained(det_ckpt, tokenizer=tiny_tokenizer).encode_text(queries)
    paths = [str(demo_image.resolve()), str(shapes_image.resolve())]
    official = []  # (path, box, score per query): sigmoid(exp(s) * (e . t) + b), float32
    for path, det in zip(paths, proposer.outputs):
        logits = torch.exp(det.logit_scale)[:, None] * (det.embeddings @ text.T) + det.logit_bias[:, None]
        official += [(path, det.boxes[i].tolist(), torch.sigmoid(logits[i])) for i in range(len(det))]

    res = CliRunner().invoke(
        cli.app,
        [
            "search",
            "--index",
            str(tmp_path / "idx"),
            "--checkpoint",
            str(det_ckpt),
            "--tokenizer",
            str(tiny_tokenizer),
            "--text",
            queries[0],
            "--text",
            queries[1],
            "--top-k",
            "10",
            "--json",
            "-",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    for qi, q in enumerate(json.loads(res.stdout)):
        want = sorted(official, key=lambda r: -float(r[2][qi]))[:10]
        np.testing.assert_allclose([h["score"] for h in q["hits"]], [float(w[2][qi]) for w in want], atol=1e-6)
        assert [h["path"] for h in q["hits"]] == [w[0] for w in want]
        np.testing.assert_allclose([h["box"] for h in q["hits"]], [w[1] for w in want], atol=1e-4)

    best = ObjectIndex.open(tmp_path / "idx").search_embeddings(text, top_k=2, per_image=True)
    for qi, hits in enumerate(best):
        per_path = {p: max(float(r[2][qi]) for r in official if r[0] == p) for p in paths}
        assert [h.path for h in hits] == sorted(per_path, key=lambda p: -per_path[p])
        np.testing.assert_allclose([h.score for h in hits], sorted(per_path.values(), reverse=True), atol=1e-6)
