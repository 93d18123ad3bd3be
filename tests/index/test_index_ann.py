"""ANN search on the LanceDB backend: re-scored exactly, high recall against exact, new rows still found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from index_fakes import MODEL, unit_texts

from wedetect.errors import WeDetectError
from wedetect.index import ImageRecord, IndexMeta, ObjectIndex, open_store
from wedetect.index.store import ProposalBatch, proposal_vectors, vector_dim_for

PER_IMAGE = 10
CENTRES = torch.nn.functional.normalize(torch.randn(16, 768, generator=torch.Generator().manual_seed(0)), dim=1)


def _add(store, first_image: int, images: int, seed: int, clusters: slice) -> None:
    """Clustered synthetic proposals (embeddings around ``CENTRES[clusters]``)."""
    g = torch.Generator().manual_seed(seed)
    n = images * PER_IMAGE
    centres = CENTRES[clusters]
    e = centres[torch.randint(0, len(centres), (n,), generator=g)] * 6 + torch.randn(n, 768, generator=g) * 0.5
    level = torch.randint(0, 3, (n,), generator=g)
    s, b = torch.tensor([2.0, 2.4, 2.8])[level], torch.tensor([-8.0, -9.0, -10.0])[level]
    ids = np.repeat(np.arange(first_image, first_image + images), PER_IMAGE).astype(np.int64)
    batch = ProposalBatch(
        ids,
        np.tile(np.arange(PER_IMAGE, dtype=np.int32), images),
        np.zeros((n, 4), np.float32),
        np.ones(n, np.float32),
        level.numpy().astype(np.int8),
        s.numpy(),
        b.numpy(),
        proposal_vectors(e, s, b, store.meta.vector_dim),
    )
    recs = [
        ImageRecord(int(i), f"/img/{i}.jpg", f"{i:064x}", 10, 10, PER_IMAGE)
        for i in range(first_image, first_image + images)
    ]
    store.add(recs, batch)


@pytest.mark.slow
def test_ann_rescored_exactly_and_high_recall(tmp_path):
    store = open_store(tmp_path / "idx", meta=IndexMeta(768, vector_dim_for(768), MODEL))
    _add(store, 0, 400, seed=1, clusters=slice(0, 15))
    built = store.build_ann_index(num_partitions=4)
    assert built["rows"] == 4000 and store.has_ann_index()
    _add(store, 400, 20, seed=2, clusters=slice(15, 16))  # after the index: found by a flat scan of new rows

    index = ObjectIndex.open(tmp_path / "idx")
    texts = torch.nn.functional.normalize(CENTRES[[15, 0, 3, 7, 11]] + 0.02 * unit_texts(5, seed=3), dim=1)
    exact = index.search_embeddings(texts, top_k=50, exact=True)
    ann = index.search_embeddings(texts, top_k=50, nprobes=4, refine_factor=10)
    recalls = []
    for ex, ap in zip(exact, ann):
        # A proposal is (image, logit to 1e-3): float32 summation order differs between the paths.
        truth = {(h.image_id, round(h.logit, 3)): h.score for h in ex}
        found = [(h.image_id, round(h.logit, 3)) for h in ap]
        recalls.append(len(set(found) & set(truth)) / len(truth))
        # Every ANN hit carries the exact official score (re-scored on the stored vectors).
        for key, h in zip(found, ap):
            if key in truth:
                assert h.score == pytest.approx(truth[key], abs=1e-6)
        assert [h.score for h in ap] == sorted((h.score for h in ap), reverse=True)
    assert np.mean(recalls) >= 0.9, recalls
    assert all(h.image_id >= 400 for h in ann[0][:10]), "rows added after the index build were missed"
    per_image = index.search_embeddings(texts, top_k=10, per_image=True, nprobes=4)
    assert all(len({h.image_id for h in hits}) == len(hits) == 10 for hits in per_image)


def test_milvus_ivf_index_probing_every_list_equals_exact(tmp_path):
    loc = tmp_path / "idx.db"
    store = open_store(loc, meta=IndexMeta(768, vector_dim_for(768), MODEL))
    _add(store, 0, 30, seed=4, clusters=slice(0, 16))
    texts = torch.nn.functional.normalize(CENTRES[[1, 2]] + 0.05 * unit_texts(2, seed=5), dim=1)
    index = ObjectIndex.open(loc)
    exact = index.search_embeddings(texts, top_k=15)
    assert store.build_ann_index(num_partitions=2)["index_type"] == "IVF_FLAT" and store.has_ann_index()
    index = ObjectIndex.open(loc)
    ann = index.search_embeddings(texts, top_k=15, nprobes=2)  # all lists probed: exact
    forced = index.search_embeddings(texts, top_k=15, exact=True)  # streamed scan past the ANN index
    for ex, ap, fo in zip(exact, ann, forced):
        assert [h.image_id for h in ap] == [h.image_id for h in ex] == [h.image_id for h in fo]
        np.testing.assert_allclose([h.score for h in ap], [h.score for h in ex], atol=1e-6)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_ann_candidates_by_index_metric_ranked_by_official_logit(tmp_path, metric):
    """Whatever metric picks the candidates, hits are ordered by the official logit; with every
    partition probed and enough candidates the ANN answer is the exact one."""
    store = open_store(tmp_path / "idx", meta=IndexMeta(768, vector_dim_for(768), MODEL))
    _add(store, 0, 60, seed=6, clusters=slice(0, 16))
    built = store.build_ann_index(index_type="IVF_FLAT", metric=metric, num_partitions=2)
    assert built["metric"] == metric
    assert open_store(tmp_path / "idx")._ann_metric() == metric  # read back from the index, not assumed
    texts = torch.nn.functional.normalize(CENTRES[[2, 9]] + 0.05 * unit_texts(2, seed=7), dim=1)
    index = ObjectIndex.open(tmp_path / "idx")
    exact = index.search_embeddings(texts, top_k=12, exact=True)
    ann = index.search_embeddings(texts, top_k=12, nprobes=2, refine_factor=50)  # 600 candidates = every row
    few = index.search_embeddings(texts, top_k=12, nprobes=2, refine_factor=1)
    for ex, ap, fw in zip(exact, ann, few):
        assert [(h.image_id, round(h.logit, 3)) for h in ap] == [(h.image_id, round(h.logit, 3)) for h in ex]
        np.testing.assert_allclose([h.score for h in ap], [h.score for h in ex], atol=1e-6)
        assert [h.score for h in fw] == sorted((h.score for h in fw), reverse=True)


def test_exact_rerank_picks_candidates_by_exact_cosine(tmp_path):
    """With ``exact_rerank`` the candidates are the exact-cosine best of the code-selected pool, not the
    codes' own best: with every row in the pool, they are the exact cosine top of the whole index."""
    from wedetect.index.store import query_vectors

    store = open_store(tmp_path / "idx", meta=IndexMeta(768, vector_dim_for(768), MODEL))
    _add(store, 0, 60, seed=8, clusters=slice(0, 16))
    store.build_ann_index(index_type="IVF_RQ", num_partitions=2)  # 1-bit codes: approximate order
    texts = torch.nn.functional.normalize(CENTRES[[4, 12]] + 0.05 * unit_texts(2, seed=9), dim=1)
    q = query_vectors(texts, store.meta.vector_dim)
    rows = [b for b in store.iter_proposals(10_000)]
    vec = np.concatenate([b.vector for b in rows]).astype(np.float64)
    keys = [(int(i), int(r)) for b in rows for i, r in zip(b.image_id, b.rank)]
    for query, hits in zip(q, store.search(q, 5, nprobes=2, refine_factor=4, exact_rerank=200)):
        cosine = vec @ query / np.linalg.norm(vec, axis=1)
        cands = np.argsort(-cosine)[:20]  # limit 5 x refine_factor 4
        best = cands[np.argsort(-(vec[cands] @ query))[:5]]
        got = list(zip(hits.proposals.image_id.tolist(), hits.proposals.rank.tolist()))
        assert got == [keys[i] for i in best]
    with pytest.raises(WeDetectError, match="exact_rerank"):
        store.search(q, 5, exact_rerank=0)


def test_unknown_ann_metric_is_refused(tmp_path):
    store = open_store(tmp_path / "idx", meta=IndexMeta(768, vector_dim_for(768), MODEL))
    _add(store, 0, 30, seed=8, clusters=slice(0, 4))
    with pytest.raises(WeDetectError, match="unknown ANN metric 'ip'"):
        store.build_ann_index(metric="ip")
