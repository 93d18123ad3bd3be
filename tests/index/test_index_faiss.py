"""The FAISS IVF-SQ8 index beside a LanceDB table: cosine cells, candidates by the logit's codes,
kept in step with appends and deletes, refused where it cannot work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from index_fakes import MODEL, unit_texts
from test_index_ann import CENTRES, _add

from wedetect.errors import WeDetectError
from wedetect.index import IndexMeta, ObjectIndex, lancedb_store, open_store
from wedetect.index.faiss_ivf import FAISS_FOLDER, FAISS_INDEX_TYPE, STATE_FILE, FaissIVF
from wedetect.index.store import query_vectors, vector_dim_for


def _store(tmp_path, images=60, seed=11):
    store = open_store(tmp_path / "idx", meta=IndexMeta(768, vector_dim_for(768), MODEL))
    _add(store, 0, images, seed=seed, clusters=slice(0, 15))
    return store


def _texts(*centres, seed=12):
    return torch.nn.functional.normalize(CENTRES[list(centres)] + 0.05 * unit_texts(len(centres), seed=seed), dim=1)


def _keys(hits):
    return [(h.image_id, round(h.logit, 3)) for h in hits]


def _assert_same_hits(got, want):
    """Same objects in the same order, logits equal up to float32 summation order."""
    for g, w in zip(got, want, strict=True):
        assert [h.image_id for h in g] == [h.image_id for h in w]
        np.testing.assert_allclose([h.logit for h in g], [h.logit for h in w], rtol=1e-5)


def test_default_ann_index_is_faiss_and_probing_everything_is_exact(tmp_path):
    store = _store(tmp_path)
    built = store.build_ann_index(num_partitions=3)
    assert built["index_type"] == FAISS_INDEX_TYPE and built["metric"] == "cosine"
    assert store.ann_index_type() == FAISS_INDEX_TYPE and FaissIVF.exists(tmp_path / "idx" / FAISS_FOLDER)
    assert ObjectIndex.open(tmp_path / "idx").info()["ann_index"] == FAISS_INDEX_TYPE
    index = ObjectIndex.open(tmp_path / "idx")
    texts = _texts(2, 9, 14)
    exact = index.search_embeddings(texts, top_k=15, exact=True)
    ann = index.search_embeddings(texts, top_k=15, nprobes=3, refine_factor=40)  # 600 candidates = every row
    for ex, ap in zip(exact, ann):
        assert _keys(ap) == _keys(ex)
        np.testing.assert_allclose([h.score for h in ap], [h.score for h in ex], atol=1e-6)


def test_candidates_come_by_inner_product_not_cosine(tmp_path):
    """The codes estimate the official logit: with every cell probed and no over-fetch (refine 1)
    the candidates are already the exact top-k, although ranking by cosine gives another set."""
    store = _store(tmp_path, images=80, seed=13)
    store.build_ann_index(num_partitions=2)
    q = query_vectors(_texts(3, 7, seed=14), store.meta.vector_dim)
    rows = list(store.iter_proposals(100_000))
    vec = np.concatenate([b.vector for b in rows]).astype(np.float64)
    keys = [(int(i), int(r)) for b in rows for i, r in zip(b.image_id, b.rank)]
    for query, hits in zip(q, store.search(q, 10, nprobes=2, refine_factor=1)):
        logit = vec @ query
        by_logit = {keys[i] for i in np.argsort(-logit)[:10]}
        by_cosine = {keys[i] for i in np.argsort(-logit / np.linalg.norm(vec, axis=1))[:10]}
        got = set(zip(hits.proposals.image_id.tolist(), hits.proposals.rank.tolist()))
        assert by_cosine != by_logit  # the test data tells the two apart
        assert len(got & by_logit) >= 9, "candidates should follow the logit"


def test_appended_rows_are_found_before_and_after_the_sync(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.build_ann_index(num_partitions=3)
    folder = tmp_path / "idx" / FAISS_FOLDER
    before = FaissIVF.load(folder).state
    _add(store, 1000, 10, seed=15, clusters=slice(15, 16))  # new cluster, after the build
    assert store.ann_index_details()["rows_not_yet_indexed"] == 100
    texts = _texts(15, seed=16)
    index = ObjectIndex.open(tmp_path / "idx")
    hits = index.search_embeddings(texts, top_k=20)[0]
    assert all(h.image_id >= 1000 for h in hits), "rows appended after the FAISS build were missed"
    scans = []
    scan = index.store._scan_vectors
    index.store._scan_vectors = lambda *a, **k: scans.append(a) or scan(*a, **k)
    assert _keys(index.search_embeddings(texts, top_k=20)[0]) == _keys(hits)
    assert not scans, "the appended rows should be read once per table version, not every search"
    monkeypatch.setattr(lancedb_store, "_FRESH_CACHE_ROWS", 10)  # too many to keep: streamed each search
    streamed = ObjectIndex.open(tmp_path / "idx")
    assert _keys(streamed.search_embeddings(texts, top_k=20)[0]) == _keys(hits)
    assert streamed.store._fresh is None

    store.optimize()  # what `index add` runs at the end: folds the new rows into the FAISS file
    after = FaissIVF.load(folder)
    assert after.state.rows == before.rows + 100 and after.state.next_row_id > before.next_row_id
    assert after.state.table_version == store._proposals.version
    assert len(list(folder.glob("ivf-*.faiss"))) == 1  # the replaced file is gone
    synced = ObjectIndex.open(tmp_path / "idx").search_embeddings(texts, top_k=20)[0]
    assert _keys(synced) == _keys(hits)
    _add(store, 2000, 1, seed=19, clusters=slice(0, 1))
    store.remove_images([2000])  # the table moved on twice, but holds the same rows as the FAISS file
    store.optimize()
    again = FaissIVF.load(folder).state
    assert again.file == after.state.file, "a sync with no rows to add or drop rewrote the FAISS file"
    assert again.table_version == store._proposals.version


def test_small_appends_go_to_the_delta_file_until_it_is_merged(tmp_path, capsys):
    """An update that only appends a few rows writes the small delta file and leaves the main file
    alone; searches scan both; past DELTA_MAX_FRACTION of the main file's rows the two are merged."""
    store = _store(tmp_path)  # 600 rows: the delta holds up to 60
    store.build_ann_index(num_partitions=3)
    folder = tmp_path / "idx" / FAISS_FOLDER
    main = FaissIVF.load(folder).state.file
    for first, images in ((1000, 3), (1003, 3)):  # 30 rows, then 60
        _add(store, first, images, seed=first, clusters=slice(15, 16))
        store.optimize(progress=True)
        assert "ANN index: delta file" in capsys.readouterr().err  # what `index add` shows at its end
        state = FaissIVF.load(folder).state
        assert state.file == main, "a small append rewrote the main FAISS file"
        assert state.rows == 600 and state.delta_rows == 10 * (first - 1000 + images)
        assert store.ann_index_details() == {
            "cells": 3, "rows": 600 + state.delta_rows, "rows_in_delta_file": state.delta_rows, "rows_not_yet_indexed": 0
        }
        assert sorted(p.name for p in folder.glob("ivf-*.faiss")) == sorted([main, state.delta_file])
    index = ObjectIndex.open(tmp_path / "idx")
    ivf = index.store._faiss_index()
    assert index.store._unsynced(ivf) is None, "the appended rows should come from the delta, not a table scan"
    assert sorted(ivf.ids().tolist()) == sorted(np.concatenate([i for i, _ in store._scan_vectors()]).tolist())
    texts = _texts(15, 2, 9, seed=25)
    exact = index.search_embeddings(texts, top_k=15, exact=True)
    ann = index.search_embeddings(texts, top_k=15, nprobes=3, refine_factor=50)  # 750 candidates >= 660 rows
    _assert_same_hits(ann, exact)
    assert all(h.image_id >= 1000 for h in ann[0])

    _add(store, 1006, 1, seed=26, clusters=slice(15, 16))  # 70 rows would not fit: merged
    store.optimize(progress=True)
    assert "ANN index: new main file" in capsys.readouterr().err
    state = FaissIVF.load(folder).state
    assert state.file != main and (state.rows, state.delta_file, state.delta_rows) == (670, "", 0)
    assert [p.name for p in folder.glob("ivf-*.faiss")] == [state.file]
    index = ObjectIndex.open(tmp_path / "idx")
    merged = index.search_embeddings(texts, top_k=15, nprobes=3, refine_factor=50)
    _assert_same_hits(merged, index.search_embeddings(texts, top_k=15, exact=True))


def test_deleting_rows_merges_the_delta_and_drops_them(tmp_path):
    store = _store(tmp_path)
    store.build_ann_index(num_partitions=3)
    _add(store, 1000, 2, seed=27, clusters=slice(15, 16))
    store.optimize()
    folder = tmp_path / "idx" / FAISS_FOLDER
    assert FaissIVF.load(folder).state.delta_rows == 20
    store.remove_images([0, 1000])
    store.optimize()
    ivf = FaissIVF.load(folder)
    assert (ivf.state.rows, ivf.state.delta_rows) == (600 + 20 - 20, 0)
    live = np.concatenate([ids for ids, _ in store._scan_vectors()])
    assert sorted(ivf.ids().tolist()) == sorted(live.tolist())


def test_deleted_rows_are_dropped_then_removed(tmp_path):
    store = _store(tmp_path)
    store.build_ann_index(num_partitions=3)
    texts = _texts(5, seed=17)
    index = ObjectIndex.open(tmp_path / "idx")
    first = index.search_embeddings(texts, top_k=10, nprobes=3, refine_factor=60)[0]
    gone = sorted({h.image_id for h in first[:3]})
    store.remove_images(gone)
    hits = ObjectIndex.open(tmp_path / "idx").search_embeddings(texts, top_k=10, nprobes=3, refine_factor=60)[0]
    assert not {h.image_id for h in hits} & set(gone) and len(hits) == 10
    store.optimize()
    ivf = FaissIVF.load(tmp_path / "idx" / FAISS_FOLDER)
    assert ivf.state.rows == store.count_proposals() == 600 - 10 * len(gone)
    live = np.concatenate([ids for ids, _ in store._scan_vectors()])
    assert sorted(ivf.ids().tolist()) == sorted(live.tolist())


def test_one_ann_index_at_a_time(tmp_path):
    store = _store(tmp_path)
    store.build_ann_index(index_type="IVF_FLAT", num_partitions=2)
    store.build_ann_index(num_partitions=2)
    assert store._lance_index() is None and store._faiss_index() is not None
    store.build_ann_index(index_type="IVF_FLAT", num_partitions=2)
    assert store._faiss_index() is None and not (tmp_path / "idx" / FAISS_FOLDER).exists()
    assert store.ann_index_type() == "IVF_FLAT"


def test_faiss_refusals(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(WeDetectError, match="cosine only"):
        store.build_ann_index(index_type=FAISS_INDEX_TYPE, metric="dot")
    with pytest.raises(WeDetectError, match="unknown ANN index type 'HNSW'"):
        store.build_ann_index(index_type="HNSW")
    # An index made before stable row ids: FAISS is refused, Lance's IVF is the default there.
    meta = tmp_path / "idx" / "meta.lance"
    assert meta.exists()
    old = store.meta.__class__(**{**store.meta.to_dict(), "stable_row_ids": False})
    store.meta = old
    with pytest.raises(WeDetectError, match="stable row ids"):
        store.build_ann_index(index_type=FAISS_INDEX_TYPE)
    assert store.build_ann_index(num_partitions=2)["index_type"] == "IVF_RQ"


def test_unreadable_faiss_state_is_a_clear_error(tmp_path):
    store = _store(tmp_path)
    store.build_ann_index(num_partitions=2)
    state = tmp_path / "idx" / FAISS_FOLDER / STATE_FILE
    state.write_text(json.dumps({**json.loads(state.read_text()), "file": "missing.faiss"}))
    with pytest.raises(WeDetectError, match="rebuild it with `wedetect index add --ann`"):
        ObjectIndex.open(tmp_path / "idx").search_embeddings(_texts(1), top_k=5)


def test_a_reader_racing_a_writer_opens_the_new_files(tmp_path, monkeypatch):
    """A writer swaps the state file, then removes the files the old state named: a reader that read
    the old state just before finds its files gone, and must open the new ones, not fail."""
    import faiss

    store = _store(tmp_path)
    store.build_ann_index(num_partitions=3)
    state_path = tmp_path / "idx" / FAISS_FOLDER / STATE_FILE
    current = state_path.read_text()
    state_path.write_text(json.dumps({**json.loads(current), "file": "removed-by-the-writer.faiss"}))
    read_index = faiss.read_index

    def racing(path, *args):
        state_path.write_text(current)  # the writer's swap lands after the reader read the old state
        return read_index(path, *args)

    monkeypatch.setattr(faiss, "read_index", racing)
    assert FaissIVF.load(state_path.parent).state.file == json.loads(current)["file"]


@pytest.mark.parametrize("backend", ["idx", "idx.db"])
@pytest.mark.parametrize("param", ["nprobes", "refine_factor", "exact_rerank"])
def test_ann_parameters_below_one_are_refused_by_every_backend(tmp_path, backend, param):
    store = open_store(tmp_path / backend, meta=IndexMeta(768, vector_dim_for(768), MODEL))
    _add(store, 0, 30, seed=18, clusters=slice(0, 4))
    store.build_ann_index(num_partitions=2)
    index = ObjectIndex.open(tmp_path / backend)
    with pytest.raises(WeDetectError, match=f"{param} must be a positive integer, got 0"):
        index.search_embeddings(_texts(1), top_k=5, **{param: 0})


def test_a_sync_killed_before_its_state_swap_leaves_the_old_index(tmp_path, monkeypatch):
    """The new FAISS file is written under a new name and the state file swapped last: a crash in
    between keeps the old, consistent index (the appended rows still found exactly), and the next
    sync removes the orphan file."""
    store = _store(tmp_path)
    store.build_ann_index(num_partitions=3)
    folder = tmp_path / "idx" / FAISS_FOLDER
    old = FaissIVF.load(folder).state
    _add(store, 1000, 10, seed=20, clusters=slice(15, 16))

    def crash(self):
        raise OSError("killed")

    monkeypatch.setattr(FaissIVF, "save_state", crash)
    with pytest.raises(OSError):
        store.optimize()
    monkeypatch.undo()
    assert len(list(folder.glob("ivf-*.faiss"))) == 2  # the orphan beside the old file
    assert FaissIVF.load(folder).state.file == old.file
    hits = ObjectIndex.open(tmp_path / "idx").search_embeddings(_texts(15, seed=21), top_k=20)[0]
    assert all(h.image_id >= 1000 for h in hits)
    store.optimize()
    assert [p.name for p in folder.glob("ivf-*.faiss")] == [FaissIVF.load(folder).state.file]
    assert FaissIVF.load(folder).state.rows == store.count_proposals()


def test_a_faiss_index_larger_than_memory_is_refused_before_any_work():
    from wedetect.index.faiss_ivf import check_memory

    check_memory(10_000_000, 784, total=24 << 30)  # 7.3 GiB of codes on 24 GiB: fine
    with pytest.raises(WeDetectError, match=r"needs about 73\.0 GiB of RAM.*--ann-type IVF_RQ"):
        check_memory(100_000_000, 784, total=24 << 30)


def test_a_failed_faiss_write_leaves_the_previous_index_in_use(tmp_path, monkeypatch):
    import faiss

    store = _store(tmp_path)
    store.build_ann_index(num_partitions=3)
    folder = tmp_path / "idx" / FAISS_FOLDER
    before = sorted(p.name for p in folder.iterdir())
    _add(store, 1000, 10, seed=22, clusters=slice(15, 16))

    def full(index, path):
        open(path, "wb").write(b"partial")
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(faiss, "write_index", full)
    with pytest.raises(WeDetectError, match="No space left on device.*searches keep using the previous one"):
        store.optimize()
    assert sorted(p.name for p in folder.iterdir()) == before  # no partial file, the old state
    hits = ObjectIndex.open(tmp_path / "idx").search_embeddings(_texts(15, seed=23), top_k=20)[0]
    assert all(h.image_id >= 1000 for h in hits)


def test_ann_search_asked_of_an_index_without_one_is_a_clear_error(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(WeDetectError, match="has no ANN index: build one with `wedetect index add --ann`"):
        ObjectIndex.open(tmp_path / "idx").search_embeddings(_texts(1), top_k=5, exact=False)
    assert len(store.search(query_vectors(_texts(1), store.meta.vector_dim), 5)[0].logits) == 5  # default: exact
