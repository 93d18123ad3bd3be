"""Object index: official scoring, exact search, incremental/resumable add, bad input."""

from __future__ import annotations

import errno

import numpy as np
import pytest
import torch
from index_fakes import MODEL, FakeProposer, make_images, official_scores, unit_texts
from PIL import Image

from wedetect.errors import WeDetectError
from wedetect.index import ExtractionSettings, ObjectIndex, ObjectIndexError, build_index, open_store
from wedetect.index.store import probability, proposal_vectors, query_vectors, vector_dim_for

SMALL = ExtractionSettings(commit_every=4, workers=2)


@pytest.fixture(params=["lancedb", "milvus"])
def loc(request, tmp_path):
    """Index location per backend: a LanceDB directory or a Milvus Lite file."""
    return tmp_path / ("idx" if request.param == "lancedb" else "idx.db")


def _build(tmp_path, n=10, proposer=None, loc=None):
    imgs = make_images(tmp_path / "imgs", n)
    proposer = proposer or FakeProposer()
    loc = loc or tmp_path / "idx"
    report = build_index(loc, tmp_path / "imgs", proposer, model=MODEL, settings=SMALL, progress=False)
    return imgs, proposer, report


def _reference(imgs, texts):
    """Every proposal's official score per query, from the fake proposer's own outputs."""
    rows = []
    for p in imgs:
        det = FakeProposer().propose_one(Image.open(p))
        s = official_scores(det, texts)
        for j in range(len(det)):
            rows.append((str(p.resolve()), det.boxes[j].tolist(), s[j]))
    return rows


def test_augmented_inner_product_is_the_official_logit():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(50, 768, generator=g) * 2
    s = torch.rand(50, generator=g) * 3
    b = torch.randn(50, generator=g)
    t = unit_texts(4)
    vd = vector_dim_for(768)
    assert vd % 16 == 0 and vd >= 769
    got = probability(proposal_vectors(e, s, b, vd) @ query_vectors(t, vd).T)
    want = torch.sigmoid(torch.exp(s)[:, None] * (e @ t.T) + b[:, None]).numpy()
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_search_ranks_like_official_not_like_cosine(tmp_path):
    # Two proposals: a short, well-aligned one and a long, less aligned one. The official score
    # prefers the long one; cosine similarity would prefer the short one.
    t = unit_texts(1, 8)
    short = 0.5 * t[0]
    ortho = torch.nn.functional.normalize(torch.randn(8), dim=0)
    long_ = 4.0 * torch.nn.functional.normalize(t[0] + 1.5 * (ortho - (ortho @ t[0]) * t[0]), dim=0)
    assert torch.cosine_similarity(short, t[0], 0) > torch.cosine_similarity(long_, t[0], 0)

    class Two(FakeProposer):
        def propose_one(self, image):
            det = super().propose_one(image)
            det.embeddings = torch.stack([short, long_])
            det.boxes, det.scores = det.boxes[:2], det.scores[:2]
            det.labels, det.names = det.labels[:2], ["", ""]
            det.levels = torch.tensor([1, 1])
            det.logit_scale, det.logit_bias = torch.tensor([2.0, 2.0]), torch.tensor([0.0, 0.0])
            return det

    imgs = make_images(tmp_path / "imgs", 1)
    build_index(tmp_path / "idx", imgs, Two(embed_dim=8), model=MODEL, progress=False)
    (hits,) = ObjectIndex.open(tmp_path / "idx").search_embeddings(t, top_k=2)
    want = torch.sigmoid(torch.exp(torch.tensor(2.0)) * torch.stack([long_ @ t[0], short @ t[0]]))
    assert [round(h.score, 6) for h in hits] == pytest.approx(want.tolist(), abs=1e-6)
    assert hits[0].score > hits[1].score


def test_exact_search_matches_official_scores(tmp_path, loc):
    imgs, _, report = _build(tmp_path, n=9, loc=loc)
    assert report.added == 9 and not report.failed
    texts = unit_texts(3, seed=5)
    index = ObjectIndex.open(loc)
    ref = _reference(imgs, texts)
    results = index.search_embeddings(texts, top_k=7)
    per_image = index.search_embeddings(texts, top_k=4, per_image=True)
    for q in range(3):
        order = sorted(ref, key=lambda r: -float(r[2][q]))
        got = results[q]
        assert [h.path for h in got] == [r[0] for r in order[:7]]
        np.testing.assert_allclose([h.score for h in got], [float(r[2][q]) for r in order[:7]], atol=1e-6)
        np.testing.assert_allclose(got[0].box, order[0][1], atol=1e-5)
        # Images ranked by their best proposal (the official max over proposals).
        best: dict[str, float] = {}
        for path, _, s in ref:
            best[path] = max(best.get(path, 0.0), float(s[q]))
        want = sorted(best, key=lambda p: -best[p])[:4]
        assert [h.path for h in per_image[q]] == want
        np.testing.assert_allclose([h.score for h in per_image[q]], [best[p] for p in want], atol=1e-6)
        assert all(h.image_size == (24, 32) for h in got)


def test_min_score_is_strict_and_limits_results(tmp_path):
    _build(tmp_path, n=6)
    index = ObjectIndex.open(tmp_path / "idx")
    t = unit_texts(1, seed=1)
    all_hits = index.search_embeddings(t, top_k=1000)[0]
    cut = all_hits[5].score
    kept = index.search_embeddings(t, top_k=1000, min_score=cut)[0]
    assert [h.score for h in kept] == [h.score for h in all_hits if h.score > cut]
    assert len(kept) == 5


def test_rerun_skips_and_adds_only_new_images(tmp_path, loc):
    imgs, proposer, _ = _build(tmp_path, n=6, loc=loc)
    count = open_store(loc).count_proposals()
    again = FakeProposer()
    r2 = build_index(loc, tmp_path / "imgs", again, model=MODEL, settings=SMALL, progress=False)
    assert (r2.added, r2.skipped, again.calls) == (0, 6, 0)
    make_images(tmp_path / "imgs", 3, start=100)
    r3 = build_index(loc, tmp_path / "imgs", again, model=MODEL, settings=SMALL, progress=False)
    assert (r3.added, r3.skipped, again.calls) == (3, 6, 3)
    store = open_store(loc)
    assert len(store.images()) == 9
    assert store.count_proposals() == count + r3.proposals
    # Touched but unchanged content: re-hashed, not re-extracted.
    import os
    import time

    os.utime(imgs[0], (time.time() + 5, time.time() + 5))
    r4 = build_index(loc, tmp_path / "imgs", again, model=MODEL, settings=SMALL, progress=False)
    assert (r4.added, r4.replaced, r4.skipped, again.calls) == (0, 0, 9, 3)


def test_changed_image_is_replaced(tmp_path, loc):
    imgs, _, _ = _build(tmp_path, n=4, loc=loc)
    store = open_store(loc)
    old = {r.path: r for r in store.images()}[str(imgs[1].resolve())]
    Image.fromarray(np.full((30, 20, 3), 7, np.uint8)).save(imgs[1])
    r = build_index(loc, imgs, FakeProposer(), model=MODEL, settings=SMALL, progress=False)
    assert (r.replaced, r.added, r.skipped) == (1, 0, 3)
    store = open_store(loc)
    recs = {x.path: x for x in store.images()}
    assert len(recs) == 4
    new = recs[str(imgs[1].resolve())]
    assert new.hash != old.hash and (new.height, new.width) == (30, 20)
    ids = np.concatenate([b.image_id for b in store.iter_proposals()])
    assert old.image_id not in ids
    assert (ids == new.image_id).sum() == new.num_proposals
    assert store.count_proposals() == sum(x.num_proposals for x in recs.values())


def test_corrupt_and_missing_images_are_recorded_as_failed(tmp_path):
    make_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join([*(str(p) for p in sorted((tmp_path / "imgs").iterdir())), "nowhere.png"]))
    proposer = FakeProposer()
    r = build_index(tmp_path / "idx", lst, proposer, model=MODEL, settings=SMALL, progress=False)
    failed = dict(r.failed)
    assert r.added == 3 and proposer.calls == 3
    assert set(map(lambda p: p.rsplit("/", 1)[-1], failed)) == {"broken.jpg", "empty.png", "nowhere.png"}
    assert "not a decodable image" in failed[str((tmp_path / "imgs" / "broken.jpg").resolve())]
    assert "empty file" in failed[str((tmp_path / "imgs" / "empty.png").resolve())]
    assert "cannot read" in failed[str((tmp_path / "nowhere.png").resolve())]
    info = ObjectIndex.open(tmp_path / "idx").info()
    assert info["images"] == 3 and len(info["failed"]) == 3
    # Recorded undecodable files are not retried by default (a missing one is reported again);
    # --retry-failed retries them.
    r2 = build_index(tmp_path / "idx", lst, proposer, model=MODEL, settings=SMALL, progress=False)
    assert r2.previously_failed == 2 and [p for p, _ in r2.failed] == [str((tmp_path / "nowhere.png").resolve())]
    assert proposer.calls == 3 and len(ObjectIndex.open(tmp_path / "idx").info()["failed"]) == 3
    r3 = build_index(
        tmp_path / "idx", lst, proposer, model=MODEL, settings=ExtractionSettings(retry_failed=True), progress=False
    )
    assert len(r3.failed) == 3 and proposer.calls == 3
    assert len(ObjectIndex.open(tmp_path / "idx").info()["failed"]) == 3


def test_refuses_other_checkpoint_settings_and_embedding_size(tmp_path, loc):
    _build(tmp_path, n=2, loc=loc)
    make_images(tmp_path / "imgs", 1, start=50)
    other = MODEL | {"sha256": "cd" * 32, "name": "other.pth"}
    with pytest.raises(ObjectIndexError, match="built with checkpoint uni_fake.pth"):
        build_index(loc, tmp_path / "imgs", FakeProposer(), model=other, progress=False)
    with pytest.raises(ObjectIndexError, match="num_proposals"):
        build_index(loc, tmp_path / "imgs", FakeProposer(), model=MODEL | {"num_proposals": 100}, progress=False)
    with pytest.raises(ObjectIndexError, match="embedding size mismatch"):
        build_index(loc, tmp_path / "imgs", FakeProposer(embed_dim=512), model=MODEL, progress=False)
    with pytest.raises(ObjectIndexError, match="512-d but the index holds 768-d"):
        ObjectIndex.open(loc).search_embeddings(unit_texts(1, 512))
    # Nothing was written by the refused runs.
    assert len(open_store(loc).images()) == 2


def test_bad_locations_and_queries(tmp_path):
    with pytest.raises(ObjectIndexError, match="--index is empty"):
        ObjectIndex.open("  ")
    with pytest.raises(ObjectIndexError, match="does not exist"):
        ObjectIndex.open(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ObjectIndexError, match="not a wedetect index"):
        ObjectIndex.open(tmp_path / "junk")
    make_images(tmp_path / "imgs", 1)
    with pytest.raises(ObjectIndexError, match="non-empty directory"):
        build_index(tmp_path / "junk", tmp_path / "imgs", FakeProposer(), model=MODEL, progress=False)
    _build(tmp_path, n=1)
    index = ObjectIndex.open(tmp_path / "idx")
    with pytest.raises(WeDetectError, match="no query text"):
        index.search([], encoder=None)
    with pytest.raises(WeDetectError, match="empty"):
        index.search(["dog", "  "], encoder=None)
    with pytest.raises(WeDetectError, match="top-k"):
        index.search_embeddings(unit_texts(1), top_k=0)


def test_write_failure_leaves_index_consistent_and_resumable(tmp_path, loc, monkeypatch):
    imgs = make_images(tmp_path / "imgs", 10)
    if loc.suffix == ".db":
        from wedetect.index.milvus_store import MilvusStore as store_cls
    else:
        from wedetect.index.lancedb_store import LanceDBStore as store_cls
    real = store_cls._append_images
    calls = {"n": 0}

    def full_disk(self, records):
        calls["n"] += 1
        if calls["n"] == 2:  # proposals of the 2nd commit are written, its image rows are not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, records)

    monkeypatch.setattr(store_cls, "_append_images", full_disk)
    with pytest.raises(ObjectIndexError, match="disk is full.*consistent"):
        build_index(loc, imgs, FakeProposer(), model=MODEL, settings=SMALL, progress=False)
    monkeypatch.setattr(store_cls, "_append_images", real)
    store = open_store(loc)
    assert len(store.images()) == 4
    assert store.count_proposals() > sum(r.num_proposals for r in store.images())  # orphans of the failed commit
    r = build_index(loc, imgs, FakeProposer(), model=MODEL, settings=SMALL, progress=False)
    assert (r.added, r.skipped) == (6, 4) and r.recovered_orphans == 4  # images of the failed commit
    _assert_same_as_clean_build(loc, imgs, tmp_path / "clean")


def _assert_same_as_clean_build(index_path, imgs, clean_path):
    build_index(clean_path, imgs, FakeProposer(), model=MODEL, progress=False)

    def content(path):
        store = open_store(path)
        recs = sorted((r.path, r.hash, r.num_proposals, r.status) for r in store.images())
        rows = sorted(
            (int(i), int(k), tuple(np.round(v[:4], 5)))
            for b in store.iter_proposals()
            for i, k, v in zip(b.image_id, b.rank, b.vector)
        )
        return recs, rows

    a, b = content(index_path), content(clean_path)
    assert a[0] == b[0]
    assert len(a[1]) == len(set(a[1])), "duplicate proposals"
    assert a[1] == b[1]
