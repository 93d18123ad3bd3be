"""Embedded default backend: a LanceDB database (a local directory or an object-store URI).

Three tables: ``proposals`` (one row per proposal, search vector included), ``images`` (one row
per image, written after its proposals, so it doubles as the commit marker) and ``meta`` (one
JSON row with :class:`IndexMeta`, written last at creation, so its presence means "a complete
index"). Every LanceDB append is an atomic versioned commit.

Search is exact (a streamed float32 matmul, optionally on GPU) until :meth:`build_ann_index`
creates an IVF index (RaBitQ codes, cosine partitions by default) on the vector column; the
``limit * refine_factor`` ANN candidates are re-ranked by their exact logits on the stored vectors
(with ``exact_rerank=r``, Lance first re-ranks ``r`` times as many code-selected rows by their exact
vectors: at 10M rows the 1-bit codes, not the probed partitions, limit recall; docs/index.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from wedetect.errors import WeDetectError
from wedetect.index.store import (
    DEFAULT_ANN_METRIC,
    DEFAULT_EXACT_RERANK,
    DEFAULT_NPROBES,
    DEFAULT_REFINE_FACTOR,
    EXACT_CHUNK_ROWS,
    ImageRecord,
    IndexMeta,
    IndexNotFoundError,
    ObjectIndexError,
    ProposalBatch,
    RawHits,
    VectorStore,
    best_by_logit,
    check_ann_metric,
    exact_search,
)

_DELETE_CHUNK = 1000
# Exact search keeps the proposals in memory between queries up to this size.
_CACHE_BYTES = 2 << 30


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
            for name, schema in (("proposals", proposals), ("images", _IMAGE_SCHEMA)):
                self._db.create_table(name, schema=schema, exist_ok=True)
            self._db.create_table("meta", data=pa.table({"json": [json.dumps(meta.to_dict())]}))
            self.meta = meta
        self._proposals = self._db.open_table("proposals")
        self._images = self._db.open_table("images")
        self._cache: tuple[int, list[ProposalBatch]] | None = None
        self._metric: str | None = None  # of the ANN index, read once

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

    def optimize(self) -> None:
        """Merge the small fragments of many commits and fold new rows into the ANN index."""
        for tbl in (self._proposals, self._images):
            tbl.optimize()

    def has_ann_index(self) -> bool:
        return any("vector" in idx.columns for idx in self._proposals.list_indices())

    def search(
        self,
        queries: np.ndarray,
        limit: int,
        *,
        exact: bool | None = None,
        nprobes: int = DEFAULT_NPROBES,
        refine_factor: int = DEFAULT_REFINE_FACTOR,
        exact_rerank: int = DEFAULT_EXACT_RERANK,
    ) -> list[RawHits]:
        if limit <= 0:
            raise WeDetectError("search limit must be positive")
        if exact_rerank < 1:
            raise WeDetectError(f"exact_rerank must be at least 1 (1: off), got {exact_rerank}")
        if exact or (exact is None and not self.has_ann_index()):
            return exact_search(self._exact_batches(), queries, limit, device=self.device)
        metric = self._ann_metric()
        out = []
        for q in np.asarray(queries, dtype=np.float32):
            # Candidates by the index's own metric (querying another one makes Lance scan everything),
            # vectors only; the official logit ranks them, and only the winners' other columns are read
            # (each column read per candidate row costs about as much as the vector).
            query = (
                self._proposals.search(q, vector_column_name="vector")
                .distance_type(metric)
                .nprobes(nprobes)
                .limit(limit * refine_factor)
            )
            if exact_rerank > 1:
                query = query.refine_factor(exact_rerank)
            cands = query.select(["vector"]).with_row_id(True).to_arrow()
            order, logits = best_by_logit(_fixed(cands.column("vector")), q, limit)
            row_ids = cands.column("_rowid").to_numpy()[order]
            rows = self._proposals.take_row_ids(row_ids.tolist()).select(_META_COLUMNS).with_row_id().to_arrow()
            where = {int(r): i for i, r in enumerate(rows.column("_rowid").to_numpy())}  # take reorders
            # A row deleted by a concurrent writer between the two reads is dropped, not an error.
            kept = [k for k, r in enumerate(row_ids) if int(r) in where]
            rows = rows.take([where[int(row_ids[k])] for k in kept])
            rows = rows.append_column("vector", cands.column("vector").take(order[kept]))
            out.append(RawHits(arrow_to_batch(rows), logits[kept]))
        return out

    def _ann_metric(self) -> str:
        if self._metric is None:
            (idx,) = [i for i in self._proposals.list_indices() if "vector" in i.columns]
            self._metric = self._proposals.index_stats(idx.name).distance_type
        return self._metric

    def build_ann_index(
        self,
        *,
        index_type: str = "IVF_RQ",
        metric: str = DEFAULT_ANN_METRIC,
        num_partitions: int | None = None,
        num_sub_vectors: int | None = None,
        **_,
    ) -> dict:
        from lancedb import index as lance_index

        configs = {
            "IVF_RQ": "IvfRq",
            "IVF_PQ": "IvfPq",
            "IVF_SQ": "IvfSq",
            "IVF_FLAT": "IvfFlat",
            "IVF_HNSW_SQ": "IvfHnswSq",
        }
        if index_type not in configs:
            raise WeDetectError(f"unknown ANN index type {index_type!r} (one of {', '.join(configs)})")
        check_ann_metric(metric)
        n = self.count_proposals()
        if n < 256:
            raise WeDetectError(
                f"the index holds {n} proposals; an ANN index needs at least 256 (exact search is used)"
            )
        # About 8k rows per partition: cheap k-means assignment on few cores, and a probe of 32
        # partitions scans only a few hundred thousand compressed codes.
        params: dict = {"num_partitions": num_partitions or max(1, min(n // 8192, 8192))}
        if index_type == "IVF_PQ":
            params["num_sub_vectors"] = num_sub_vectors or self.meta.vector_dim // 16  # 16-d sub-vectors
        if str(self.device).startswith("cuda"):
            params["accelerator"] = "cuda"  # k-means training on the GPU
        config = getattr(lance_index, configs[index_type])(distance_type=metric, max_iterations=20, **params)
        self._proposals.create_index("vector", config=config, replace=True)
        self._metric = metric
        return {"index_type": index_type, "metric": metric, "rows": n, **params}
