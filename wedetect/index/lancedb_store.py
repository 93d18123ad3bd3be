"""Embedded default backend: a LanceDB database (a local directory or an object-store URI).

Three tables: ``proposals`` (one row per proposal, search vector included), ``images`` (one row
per image, written after its proposals, so it doubles as the commit marker) and ``meta`` (one
JSON row with :class:`IndexMeta`, written last at creation, so its presence means "a complete
index"). Every LanceDB append is an atomic versioned commit.

Search is exact (a streamed float32 matmul, optionally on GPU) until :meth:`build_ann_index`
creates an ANN index. The default for a local index is a FAISS IVF-SQ8 index kept beside the table
(:mod:`wedetect.index.faiss_ivf`: cosine cells, candidates by the codes' estimate of the logit itself);
Lance's own IVF types (RaBitQ codes by default, cosine partitions) remain for object-store URIs and
older indexes. Either way the ``limit * refine_factor`` candidates are re-ranked by their exact logits
on the stored vectors (with Lance's ``exact_rerank=r``, Lance first re-ranks ``r`` times as many
code-selected rows by their exact vectors: at 10M rows the 1-bit codes limit recall; docs/index.md).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from wedetect.errors import WeDetectError
from wedetect.index.faiss_ivf import (
    FAISS_FOLDER,
    FAISS_INDEX_TYPE,
    FaissIVF,
    faiss_partitions,
)
from wedetect.index.faiss_ivf import STATE_FILE as FAISS_STATE_FILE
from wedetect.index.faiss_ivf import check_memory as check_faiss_memory
from wedetect.index.store import (
    DEFAULT_ANN_METRIC,
    DEFAULT_EXACT_RERANK,
    DEFAULT_NPROBES,
    DEFAULT_REFINE_FACTOR,
    EXACT_CHUNK_ROWS,
    FAISS_NPROBES,
    FAISS_REFINE_FACTOR,
    ImageRecord,
    IndexMeta,
    IndexNotFoundError,
    ObjectIndexError,
    ProposalBatch,
    RawHits,
    VectorStore,
    best_by_logit,
    check_ann_metric,
    check_ann_params,
    exact_search,
)

_DELETE_CHUNK = 1000
# Rows appended after the FAISS index's last sync that searches keep in memory (about 200 MB).
_FRESH_CACHE_ROWS = 65536
# Lance's own ANN index types (a vector index inside the table) and their config classes.
_LANCE_INDEX_CONFIGS = {
    "IVF_RQ": "IvfRq",
    "IVF_PQ": "IvfPq",
    "IVF_SQ": "IvfSq",
    "IVF_FLAT": "IvfFlat",
    "IVF_HNSW_SQ": "IvfHnswSq",
}
# Exact search keeps the proposals in memory between queries up to this size.
_CACHE_BYTES = 2 << 30


# Row ids that survive compaction and deletes (a FAISS index beside the table refers to rows by id).
_STABLE_ROW_IDS = "new_table_enable_stable_row_ids"

_VECTOR_TYPES = {"float32": pa.float32(), "float16": pa.float16()}


def _proposal_schema(vector_dim: int, vector_dtype: str = "float32") -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.int64()),
            ("rank", pa.int32()),
            ("box", pa.list_(pa.float32(), 4)),
            ("score", pa.float32()),
            ("level", pa.int8()),
            ("logit_scale", pa.float32()),
            ("logit_bias", pa.float32()),
            ("vector", pa.list_(_VECTOR_TYPES[vector_dtype], vector_dim)),
        ]
    )


# Every proposal column but the vector: what ANN search reads for its winners only.
_META_COLUMNS = [name for name in _proposal_schema(1).names if name != "vector"]

_IMAGE_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("path", pa.string()),
        ("hash", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_proposals", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("file_size", pa.int64()),
        ("indexed_at", pa.float64()),
    ]
)


def _fixed_list(a: np.ndarray, size: int, typ: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(a, dtype=typ.to_pandas_dtype()).ravel(), typ), size
    )


def batch_to_arrow(batch: ProposalBatch, vector_dim: int, vector_dtype: str = "float32") -> pa.Table:
    return pa.table(
        {
            "image_id": pa.array(batch.image_id.astype(np.int64)),
            "rank": pa.array(batch.rank.astype(np.int32)),
            "box": _fixed_list(batch.box, 4, pa.float32()),
            "score": pa.array(batch.score.astype(np.float32)),
            "level": pa.array(batch.level.astype(np.int8)),
            "logit_scale": pa.array(batch.logit_scale.astype(np.float32)),
            "logit_bias": pa.array(batch.logit_bias.astype(np.float32)),
            "vector": _fixed_list(batch.vector, vector_dim, _VECTOR_TYPES[vector_dtype]),
        },
        schema=_proposal_schema(vector_dim, vector_dtype),
    )


def _fixed(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column as a writable float32 (n, width) array (Arrow buffers are read-only)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return np.array(col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size), dtype=np.float32)


def arrow_to_batch(t: pa.Table | pa.RecordBatch) -> ProposalBatch:
    def flat(name: str) -> np.ndarray:
        return np.array(t.column(name).to_numpy(zero_copy_only=False))

    return ProposalBatch(
        image_id=flat("image_id"),
        rank=flat("rank"),
        box=_fixed(t.column("box")),
        score=flat("score"),
        level=flat("level"),
        logit_scale=flat("logit_scale"),
        logit_bias=flat("logit_bias"),
        vector=_fixed(t.column("vector")),
    )


def _id_filter(image_ids: Sequence[int]) -> str:
    return "image_id IN (" + ",".join(str(int(i)) for i in image_ids) + ")"


class LanceDBStore(VectorStore):
    """LanceDB-backed :class:`VectorStore`; ``device`` is where exact search runs."""

    def __init__(self, location: str, *, meta: IndexMeta | None = None, device: str = "cpu") -> None:
        import lancedb

        self.location = location
        self.device = device
        is_local = "://" not in location
        if is_local:
            path = Path(location)
            if meta is None and not path.exists():
                raise IndexNotFoundError(f"index {location} does not exist; build it with `wedetect index add`")
            if path.exists() and not path.is_dir():
                raise ObjectIndexError(f"index path {location} is a file, expected a directory")
        self._db = lancedb.connect(location)
        names = set(self._db.list_tables().tables)
        if "meta" in names:
            stored = IndexMeta.from_dict(json.loads(self._db.open_table("meta").to_arrow().column("json")[0].as_py()))
            if meta is not None:
                stored.check_compatible(meta)
            self.meta = stored
        elif meta is None:
            raise IndexNotFoundError(f"{location} is not a wedetect index (no index metadata found)")
        else:
            if is_local and any(
                p for p in Path(location).iterdir() if p.name.removesuffix(".lance") not in {"images", "proposals"}
            ):
                raise ObjectIndexError(f"{location} is a non-empty directory that is not a wedetect index")
            # Tables first, meta last: a crash here leaves no meta, and the next run recreates.
            if meta.vector_dtype not in _VECTOR_TYPES:
                raise WeDetectError(f"vector dtype {meta.vector_dtype!r} is not one of {sorted(_VECTOR_TYPES)}")
            proposals = _proposal_schema(meta.vector_dim, meta.vector_dtype)
            self._db.create_table(
                "proposals", schema=proposals, exist_ok=True, storage_options={_STABLE_ROW_IDS: "true"}
            )
            self._db.create_table("images", schema=_IMAGE_SCHEMA, exist_ok=True)
            meta = replace(meta, stable_row_ids=True)
            self._db.create_table("meta", data=pa.table({"json": [json.dumps(meta.to_dict())]}))
            self.meta = meta
        self._proposals = self._db.open_table("proposals")
        self._images = self._db.open_table("images")
        self._cache: tuple[int, list[ProposalBatch]] | None = None
        self._metric: str | None = None  # of the Lance ANN index, read once
        self._faiss: tuple[int, FaissIVF] | None = None  # (state file mtime, memory-mapped index)
        self._fresh: tuple[tuple[int, int], list] | None = None  # rows the FAISS index lacks, by version

    # --- writes ---------------------------------------------------------------------------
    def _append_proposals(self, batch: ProposalBatch) -> None:
        self._proposals.add(batch_to_arrow(batch, self.meta.vector_dim, self.meta.vector_dtype))

    def _append_images(self, records: list[ImageRecord]) -> None:
        cols = {name: [getattr(r, name) for r in records] for name in _IMAGE_SCHEMA.names}
        self._images.add(pa.table(cols, schema=_IMAGE_SCHEMA))

    def _delete(self, table: str, image_ids: Sequence[int]) -> None:
        tbl = self._images if table == "images" else self._proposals
        ids = list(image_ids)
        for i in range(0, len(ids), _DELETE_CHUNK):
            tbl.delete(_id_filter(ids[i : i + _DELETE_CHUNK]))

    # --- reads ----------------------------------------------------------------------------
    def count_proposals(self) -> int:
        return int(self._proposals.count_rows())

    def _scan(self, table, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
        yield from table.search().select(columns).to_batches(batch_size=batch_rows)

    def _proposal_image_ids(self) -> np.ndarray:
        parts = [b.column("image_id").to_numpy() for b in self._scan(self._proposals, ["image_id"], 1 << 20)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def images(self) -> list[ImageRecord]:
        t = self._images.to_arrow()
        return [ImageRecord(**row) for row in t.to_pylist()]

    def image_records(self, image_ids: Sequence[int]) -> dict[int, ImageRecord]:
        out: dict[int, ImageRecord] = {}
        ids = list(dict.fromkeys(int(i) for i in image_ids))
        for i in range(0, len(ids), _DELETE_CHUNK):
            rows = self._images.search().where(_id_filter(ids[i : i + _DELETE_CHUNK])).limit(None).to_arrow()
            out.update({r["image_id"]: ImageRecord(**r) for r in rows.to_pylist()})
        return out

    def iter_proposals(self, batch_rows: int = EXACT_CHUNK_ROWS) -> Iterator[ProposalBatch]:
        for b in self._scan(self._proposals, _proposal_schema(self.meta.vector_dim).names, batch_rows):
            yield arrow_to_batch(b)

    def _exact_batches(self) -> Iterator[ProposalBatch] | list[ProposalBatch]:
        version = self._proposals.version
        if self._cache is not None and self._cache[0] == version:
            return self._cache[1]
        if self.count_proposals() * self.meta.vector_dim * 4 <= _CACHE_BYTES:  # held as float32
            batches = list(self.iter_proposals())
            self._cache = (version, batches)
            return batches
        return self.iter_proposals()

    def optimize(self, progress: bool = False) -> None:
        """Merge the small fragments of many commits and fold new (and deleted) rows into the ANN index."""
        for tbl in (self._proposals, self._images):
            tbl.optimize()
        self._sync_faiss(progress)

    def ann_index_type(self) -> str | None:
        if self._faiss_index() is not None:
            return FAISS_INDEX_TYPE
        idx = self._lance_index()
        names = {config: name for name, config in _LANCE_INDEX_CONFIGS.items()}
        return None if idx is None else names.get(idx.index_type, idx.index_type)

    def ann_index_details(self) -> dict:
        ivf = self._faiss_index()
        if ivf is None:
            return {}
        where = self._unsynced(ivf)
        return {
            "cells": int(ivf.index.nlist),
            "rows": ivf.ntotal,
            "rows_in_delta_file": ivf.state.delta_rows,
            # appended after the last update (a run killed before its end): found by an exact scan
            "rows_not_yet_indexed": 0 if where is None else int(self._proposals.count_rows(where)),
        }

    def _lance_index(self):
        return next((idx for idx in self._proposals.list_indices() if "vector" in idx.columns), None)

    # --- FAISS index beside the table (local indexes only) ---------------------------------------
    def _faiss_folder(self) -> Path | None:
        return Path(self.location) / FAISS_FOLDER if "://" not in self.location else None

    def _faiss_index(self) -> FaissIVF | None:
        """The FAISS index (memory-mapped, reloaded when a writer replaced it), or None."""
        folder = self._faiss_folder()
        if folder is None or not FaissIVF.exists(folder):
            self._faiss = None
            return None
        stamp = (folder / FAISS_STATE_FILE).stat().st_mtime_ns
        if self._faiss is None or self._faiss[0] != stamp:
            self._faiss = (stamp, FaissIVF.load(folder))
        return self._faiss[1]

    def _scan_vectors(
        self, where: str | None = None, batch_rows: int = 65536, columns: Sequence[str] = ("vector",)
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """(stable row ids, float32 vectors) of every row, or of the rows matching ``where``
        (``columns=[]``: row ids only, vectors None)."""
        query = self._proposals.search()
        if where:
            query = query.where(where)
        for b in query.select(list(columns)).with_row_id(True).to_batches(batch_size=batch_rows):
            ids = b.column("_rowid").to_numpy().astype(np.int64)
            yield ids, _fixed(b.column("vector")) if columns else None

    def _unsynced(self, ivf: FaissIVF) -> str | None:
        """Filter for rows appended after the FAISS index was last synchronised (None: none can be)."""
        if ivf.state.table_version == self._proposals.version:
            return None
        return f"_rowid >= {ivf.state.next_row_id}"

    def _sync_faiss(self, progress: bool = False) -> None:
        """Fold rows appended since the last sync into the FAISS index and drop deleted ones.

        Appended rows go to the small delta file while it has room; the main file (7.8 GB at 10M
        rows) is rewritten only to merge a full delta or drop deleted rows. A version change alone
        (a compaction) only updates the state file."""
        ivf = self._faiss_index()
        where = None if ivf is None else self._unsynced(ivf)
        if where is None:
            return
        version, new, live = self._proposals.version, self._proposals.count_rows(where), self.count_proposals()
        deleted = ivf.ntotal + new != live
        if new or deleted:
            merge = deleted or not ivf.delta_has_room(new)
            check_faiss_memory((ivf.ntotal if merge else ivf.state.delta_rows) + new, self.meta.vector_dim)
            ivf = FaissIVF.load(ivf.folder, writable=merge)
            desc = "ANN index: new main file" if merge else "ANN index: delta file"
            with tqdm(total=new, desc=desc, unit="rows", disable=not progress, dynamic_ncols=True) as bar:
                for ids, vectors in self._scan_vectors(where):
                    ivf.append(ids, vectors)
                    bar.update(len(ids))
                if merge:
                    ivf.merge()
                if deleted:
                    kept = [ids for ids, _ in self._scan_vectors(columns=[])]
                    ivf.remove(np.setdiff1d(ivf.ids(), np.concatenate(kept or [np.zeros(0, np.int64)])))
                ivf.state.table_version = version
                bar.set_postfix_str(f"writing {ivf.ntotal if merge else ivf.delta.ntotal:,} rows")
                ivf.save()
        else:
            ivf.state.table_version = version
            ivf.save_state()
        self._faiss = None

    # --- search -------------------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        limit: int,
        *,
        exact: bool | None = None,
        nprobes: int | None = None,
        refine_factor: int | None = None,
        exact_rerank: int | None = None,
    ) -> list[RawHits]:
        if limit <= 0:
            raise WeDetectError("search limit must be positive")
        check_ann_params(nprobes=nprobes, refine_factor=refine_factor, exact_rerank=exact_rerank)
        ivf = None if exact else self._faiss_index()
        if exact or (ivf is None and self._lance_index() is None):
            if exact is False:
                raise WeDetectError(
                    f"{self.location} has no ANN index: build one with `wedetect index add --ann`, or search exactly"
                )
            return exact_search(self._exact_batches(), queries, limit, device=self.device)
        queries = np.asarray(queries, dtype=np.float32)
        if ivf is not None:
            cands = self._faiss_candidates(ivf, queries, limit * (refine_factor or FAISS_REFINE_FACTOR),
                                           nprobes or FAISS_NPROBES)
        else:
            cands = self._lance_candidates(queries, limit * (refine_factor or DEFAULT_REFINE_FACTOR),
                                           nprobes or DEFAULT_NPROBES, exact_rerank or DEFAULT_EXACT_RERANK)
        return [self._rank_candidates(q, ids, vectors, limit) for q, (ids, vectors) in zip(queries, cands)]

    def _faiss_candidates(
        self, ivf: FaissIVF, queries: np.ndarray, k: int, nprobes: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Row ids and vectors of the ``k`` best rows by code inner product, plus each query's ``k``
        best rows (exactly) among those appended since the index was last synchronised."""
        found = [[self._vectors(ids)] for ids in ivf.search(queries, k, nprobes)]
        for ids, vectors in self._fresh_rows(ivf):
            for parts, logits in zip(found, (vectors @ queries.T).T):
                best = np.argsort(-logits, kind="stable")[:k]
                parts.append((ids[best], vectors[best]))
        return [(np.concatenate([i for i, _ in parts]), np.concatenate([v for _, v in parts])) for parts in found]

    def _fresh_rows(self, ivf: FaissIVF) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """(row ids, vectors) chunks of the rows appended since the FAISS index's last sync.

        Up to _FRESH_CACHE_ROWS of them are read once per table version and kept (a filtered scan of
        a 10M-row table costs ~150 ms even when it finds nothing); more are streamed every search."""
        where = self._unsynced(ivf)
        if where is None:
            return ()
        key = (self._proposals.version, ivf.state.next_row_id)
        if self._fresh is not None and self._fresh[0] == key:
            return self._fresh[1]
        if self._proposals.count_rows(where) > _FRESH_CACHE_ROWS:
            return self._scan_vectors(where)
        self._fresh = (key, list(self._scan_vectors(where)))
        return self._fresh[1]

    def _take(self, row_ids: np.ndarray, columns: list[str]) -> tuple[pa.Table, np.ndarray]:
        """Rows by stable row id in the order asked (take returns its own order), and the positions in
        ``row_ids`` of those still there (a row deleted by a concurrent writer is dropped)."""
        rows = self._proposals.take_row_ids(row_ids.tolist()).select(columns).with_row_id().to_arrow()
        where = {int(r): i for i, r in enumerate(rows.column("_rowid").to_numpy())}
        kept = np.array([k for k, r in enumerate(row_ids.tolist()) if r in where], dtype=np.int64)
        return rows.take([where[int(row_ids[k])] for k in kept]), kept

    def _vectors(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row ids, float32 vectors) of the rows still there, in the order asked."""
        rows, kept = self._take(row_ids, ["vector"])
        return row_ids[kept], _fixed(rows.column("vector"))

    def _lance_candidates(
        self, queries: np.ndarray, k: int, nprobes: int, exact_rerank: int
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Row ids and vectors of the ``k`` best rows by the Lance index's metric (querying another
        metric makes Lance scan everything); ``exact_rerank`` > 1 re-ranks that many times more
        code-selected rows on their exact vectors first."""
        metric = self._ann_metric()
        out = []
        for q in queries:
            query = self._proposals.search(q, vector_column_name="vector").distance_type(metric)
            query = query.nprobes(nprobes).limit(k)
            if exact_rerank > 1:
                query = query.refine_factor(exact_rerank)
            t = query.select(["vector"]).with_row_id(True).to_arrow()
            out.append((t.column("_rowid").to_numpy().astype(np.int64), _fixed(t.column("vector"))))
        return out

    def _rank_candidates(self, q: np.ndarray, row_ids: np.ndarray, vectors: np.ndarray, limit: int) -> RawHits:
        """The ``limit`` best candidates by their exact official logit, with their other columns (read
        for the winners only: each column read per candidate row costs about as much as the vector)."""
        order, logits = best_by_logit(vectors, q, limit)
        rows, kept = self._take(row_ids[order], _META_COLUMNS)
        rows = rows.append_column("vector", _fixed_list(vectors[order[kept]], self.meta.vector_dim, pa.float32()))
        return RawHits(arrow_to_batch(rows), logits[kept])

    def _ann_metric(self) -> str:
        if self._metric is None:
            self._metric = self._proposals.index_stats(self._lance_index().name).distance_type
        return self._metric

    def build_ann_index(
        self,
        *,
        index_type: str | None = None,
        metric: str = DEFAULT_ANN_METRIC,
        num_partitions: int | None = None,
        num_sub_vectors: int | None = None,
        progress: bool = False,
        **_,
    ) -> dict:
        """Build the ANN index, replacing any other. ``index_type`` None: FAISS IVF-SQ8 where it can
        be kept beside the table (a local index with stable row ids), else Lance's IVF-RQ."""
        if index_type is None:
            index_type = FAISS_INDEX_TYPE if self._faiss_folder() and self.meta.stable_row_ids else "IVF_RQ"
        if index_type != FAISS_INDEX_TYPE and index_type not in _LANCE_INDEX_CONFIGS:
            known = ", ".join([FAISS_INDEX_TYPE, *_LANCE_INDEX_CONFIGS])
            raise WeDetectError(f"unknown ANN index type {index_type!r} (one of {known})")
        check_ann_metric(metric)
        n = self.count_proposals()
        if n < 256:
            raise WeDetectError(
                f"the index holds {n} proposals; an ANN index needs at least 256 (exact search is used)"
            )
        if index_type == FAISS_INDEX_TYPE:
            params: dict = {"num_partitions": num_partitions or faiss_partitions(n)}
            self._build_faiss(metric, params["num_partitions"], progress)
        else:
            # About 8k rows per partition: cheap k-means on few cores; a probe of 64 partitions scans
            # only a few hundred thousand compressed codes.
            params = {"num_partitions": num_partitions or max(1, min(n // 8192, 8192))}
            self._build_lance(index_type, metric, params, num_sub_vectors)
        return {"index_type": index_type, "metric": metric, "rows": n, **params}

    def _build_faiss(self, metric: str, num_partitions: int, progress: bool) -> None:
        folder = self._faiss_folder()
        if folder is None:
            raise WeDetectError(f"{FAISS_INDEX_TYPE} needs a local index directory; use IVF_RQ for {self.location}")
        if not self.meta.stable_row_ids:
            raise WeDetectError(
                f"{FAISS_INDEX_TYPE} needs stable row ids, which this index (made by an older wedetect) lacks; "
                "use --ann-type IVF_RQ, or re-index into a new --index path"
            )
        if metric != "cosine":
            raise WeDetectError(f"{FAISS_INDEX_TYPE} partitions by cosine only (got metric {metric!r})")
        version = self._proposals.version
        ivf = FaissIVF.build(
            folder,
            self._scan_vectors,
            rows=self.count_proposals(),
            dim=self.meta.vector_dim,
            num_partitions=num_partitions,
            table_version=version,
            progress=progress,
        )
        ivf.save()
        if (idx := self._lance_index()) is not None:  # one ANN index at a time
            self._proposals.drop_index(idx.name)
        self._faiss = None

    def _build_lance(self, index_type: str, metric: str, params: dict, num_sub_vectors: int | None) -> None:
        from lancedb import index as lance_index

        if index_type == "IVF_PQ":
            params["num_sub_vectors"] = num_sub_vectors or self.meta.vector_dim // 16  # 16-d sub-vectors
        if str(self.device).startswith("cuda"):
            params["accelerator"] = "cuda"  # k-means training on the GPU
        config = getattr(lance_index, _LANCE_INDEX_CONFIGS[index_type])(
            distance_type=metric, max_iterations=20, **params
        )
        self._proposals.create_index("vector", config=config, replace=True)
        self._metric = metric
        if (folder := self._faiss_folder()) is not None and folder.exists():  # one ANN index at a time
            shutil.rmtree(folder)
            self._faiss = None
