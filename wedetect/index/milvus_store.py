"""Milvus backend: the same index on a Milvus server or cluster, or in a Milvus Lite file.

``location`` is a Milvus URI: a local ``*.db`` file (Milvus Lite, embedded, for tests and
small collections) or ``http(s)://host:19530`` (standalone or distributed Milvus); a token
for a secured server comes from ``MILVUS_TOKEN``. Collections are named
``<prefix>proposals``, ``<prefix>images`` and ``<prefix>meta`` (prefix from
``WEDETECT_MILVUS_PREFIX``, default ``wedetect_``), so several indexes can share a server.

Milvus needs a vector field in every collection; the image and meta collections carry a
2-d dummy vector. Searches use the inner-product metric (``IP``) on a ``FLAT`` index (exact)
until :meth:`build_ann_index` switches to an IVF/HNSW index (cosine partitions by default);
its ``limit * refine_factor`` candidates are re-scored on their stored vectors, like the LanceDB backend
(``exact_rerank`` has nothing to do here: IVF_FLAT distances are already exact).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from wedetect.errors import WeDetectError
from wedetect.index.store import (
    DEFAULT_ANN_METRIC,
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
    check_ann_metric,
    check_ann_params,
    exact_search,
)

_ID_CHUNK = 1000
_MAX_LIMIT = 16384  # Milvus' largest top-k
_INSERT_ROWS = 2000
_DUMMY = [0.0, 0.0]
_IMAGE_FIELDS = [
    "image_id",
    "path",
    "hash",
    "height",
    "width",
    "num_proposals",
    "status",
    "error",
    "file_size",
    "indexed_at",
]
_PROPOSAL_FIELDS = ["image_id", "rank", "box", "score", "level", "logit_scale", "logit_bias", "vector"]


def _in(image_ids: Sequence[int]) -> str:
    return "image_id in [" + ",".join(str(int(i)) for i in image_ids) + "]"


class MilvusStore(VectorStore):
    """Milvus-backed :class:`VectorStore` (tested against Milvus Lite)."""

    def __init__(self, location: str, *, meta: IndexMeta | None = None, device: str = "cpu") -> None:
        try:
            from pymilvus import MilvusClient
        except ImportError as e:  # optional dependency
            raise WeDetectError("the Milvus backend needs `pip install pymilvus milvus-lite`") from e

        self.location = location
        self.device = device
        is_lite = "://" not in location
        if is_lite:
            path = Path(location)
            if meta is None and not path.exists():
                raise IndexNotFoundError(f"index {location} does not exist; build it with `wedetect index add`")
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._client = MilvusClient(location, token=os.environ.get("MILVUS_TOKEN", ""))
        except Exception as e:  # connection refused, bad URI, locked Lite file
            raise ObjectIndexError(f"cannot open Milvus index {location}: {e}") from e
        prefix = os.environ.get("WEDETECT_MILVUS_PREFIX", "wedetect_")
        self._p, self._i, self._m = f"{prefix}proposals", f"{prefix}images", f"{prefix}meta"
        if self._client.has_collection(self._m):
            rows = self._client.query(self._m, filter='key == "meta"', output_fields=["json"])
            stored = IndexMeta.from_dict(json.loads(rows[0]["json"]))
            if meta is not None:
                stored.check_compatible(meta)
            self.meta = stored
        elif meta is None:
            raise IndexNotFoundError(f"{location} is not a wedetect index (no index metadata found)")
        else:
            self._create(meta)
            self.meta = meta

    # --- schema ---------------------------------------------------------------------------
    def _create(self, meta: IndexMeta) -> None:
        from pymilvus import DataType, MilvusClient

        if meta.vector_dtype != "float32":
            raise WeDetectError("the Milvus backend stores float32 vectors only")

        def collection(name: str, fields: list[tuple], vector: str, dim: int, primary: str, auto_id: bool) -> None:
            if self._client.has_collection(name):
                return
            schema = MilvusClient.create_schema(auto_id=auto_id)
            for fname, dtype, kw in fields:
                schema.add_field(fname, dtype, is_primary=fname == primary, **kw)
            schema.add_field(vector, DataType.FLOAT_VECTOR, dim=dim)
            params = self._client.prepare_index_params()
            params.add_index(vector, index_type="FLAT", metric_type="IP")
            self._client.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")

        collection(
            self._p,
            [
                ("pk", DataType.INT64, {}),
                ("image_id", DataType.INT64, {}),
                ("rank", DataType.INT32, {}),
                ("box", DataType.ARRAY, {"element_type": DataType.FLOAT, "max_capacity": 4}),
                ("score", DataType.FLOAT, {}),
                ("level", DataType.INT8, {}),
                ("logit_scale", DataType.FLOAT, {}),
                ("logit_bias", DataType.FLOAT, {}),
            ],
            "vector",
            meta.vector_dim,
            "pk",
            True,
        )
        collection(
            self._i,
            [
                ("image_id", DataType.INT64, {}),
                ("path", DataType.VARCHAR, {"max_length": 4096}),
                ("hash", DataType.VARCHAR, {"max_length": 64}),
                ("height", DataType.INT32, {}),
                ("width", DataType.INT32, {}),
                ("num_proposals", DataType.INT32, {}),
                ("status", DataType.VARCHAR, {"max_length": 16}),
                ("error", DataType.VARCHAR, {"max_length": 2048}),
                ("file_size", DataType.INT64, {}),
                ("indexed_at", DataType.DOUBLE, {}),
            ],
            "_v",
            2,
            "image_id",
            False,
        )
        # Meta last: its presence marks a complete index.
        collection(
            self._m,
            [("key", DataType.VARCHAR, {"max_length": 16}), ("json", DataType.VARCHAR, {"max_length": 65535})],
            "_v",
            2,
            "key",
            False,
        )
        self._client.insert(self._m, [{"key": "meta", "json": json.dumps(meta.to_dict()), "_v": _DUMMY}])

    # --- writes ---------------------------------------------------------------------------
    def _append_proposals(self, batch: ProposalBatch) -> None:
        for s in range(0, len(batch), _INSERT_ROWS):
            part = batch.take(np.arange(s, min(s + _INSERT_ROWS, len(batch))))
            rows = [
                {
                    "image_id": int(part.image_id[j]),
                    "rank": int(part.rank[j]),
                    "box": part.box[j].tolist(),
                    "score": float(part.score[j]),
                    "level": int(part.level[j]),
                    "logit_scale": float(part.logit_scale[j]),
                    "logit_bias": float(part.logit_bias[j]),
                    "vector": part.vector[j],
                }
                for j in range(len(part))
            ]
            self._client.insert(self._p, rows)

    def _append_images(self, records: list[ImageRecord]) -> None:
        if records:
            rows = [{f: getattr(r, f) for f in _IMAGE_FIELDS} | {"_v": _DUMMY} for r in records]
            for row in rows:
                row["error"] = row["error"][:2000]
            self._client.insert(self._i, rows)

    def _delete(self, table: str, image_ids: Sequence[int]) -> None:
        name = self._i if table == "images" else self._p
        ids = list(image_ids)
        for s in range(0, len(ids), _ID_CHUNK):
            self._client.delete(name, filter=_in(ids[s : s + _ID_CHUNK]))

    # --- reads ----------------------------------------------------------------------------
    def _iterate(self, name: str, fields: list[str], batch_rows: int) -> Iterator[list[dict]]:
        it = self._client.query_iterator(name, batch_size=min(batch_rows, _MAX_LIMIT), filter="", output_fields=fields)
        try:
            while rows := it.next():
                yield rows
        finally:
            it.close()

    def count_proposals(self) -> int:
        return int(self._client.query(self._p, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def _proposal_image_ids(self) -> np.ndarray:
        parts = [
            np.array([r["image_id"] for r in rows], np.int64)
            for rows in self._iterate(self._p, ["image_id"], _MAX_LIMIT)
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def images(self) -> list[ImageRecord]:
        return [
            ImageRecord(**{f: r[f] for f in _IMAGE_FIELDS})
            for rows in self._iterate(self._i, _IMAGE_FIELDS, _MAX_LIMIT)
            for r in rows
        ]

    def image_records(self, image_ids: Sequence[int]) -> dict[int, ImageRecord]:
        ids = list(dict.fromkeys(int(i) for i in image_ids))
        out: dict[int, ImageRecord] = {}
        for s in range(0, len(ids), _ID_CHUNK):
            for r in self._client.query(self._i, filter=_in(ids[s : s + _ID_CHUNK]), output_fields=_IMAGE_FIELDS):
                out[r["image_id"]] = ImageRecord(**{f: r[f] for f in _IMAGE_FIELDS})
        return out

    def _to_batch(self, rows: list[dict]) -> ProposalBatch:
        def col(name: str, dtype) -> np.ndarray:
            return np.array([r[name] for r in rows], dtype=dtype)

        return ProposalBatch(
            image_id=col("image_id", np.int64),
            rank=col("rank", np.int32),
            box=np.array([list(r["box"]) for r in rows], np.float32).reshape(-1, 4),
            score=col("score", np.float32),
            level=col("level", np.int8),
            logit_scale=col("logit_scale", np.float32),
            logit_bias=col("logit_bias", np.float32),
            vector=np.array([r["vector"] for r in rows], np.float32).reshape(-1, self.meta.vector_dim),
        )

    def iter_proposals(self, batch_rows: int = EXACT_CHUNK_ROWS) -> Iterator[ProposalBatch]:
        # Storage order by primary key, i.e. insertion order (auto ids increase).
        for rows in self._iterate(self._p, _PROPOSAL_FIELDS, batch_rows):
            yield self._to_batch(rows)

    def _ann_info(self) -> dict | None:
        """The description of the vector index when it is approximate (not ``FLAT``), else None."""
        info = self._client.describe_index(self._p, index_name="vector") or {}
        return info if info.get("index_type", "FLAT") != "FLAT" else None

    def ann_index_type(self) -> str | None:
        info = self._ann_info()
        return None if info is None else str(info["index_type"])

    def search(self, queries: np.ndarray, limit: int, *, exact: bool | None = None, **ann) -> list[RawHits]:
        if limit <= 0:
            raise WeDetectError("search limit must be positive")
        check_ann_params(**ann)
        info = self._ann_info()  # one server round trip per search
        if limit > _MAX_LIMIT or (exact and info):
            # Beyond Milvus' top-k cap, or exact asked of an ANN index: stream and scan.
            return exact_search(self.iter_proposals(), queries, limit, device=self.device)
        candidates = min(_MAX_LIMIT, limit * int(ann.get("refine_factor") or DEFAULT_REFINE_FACTOR)) if info else limit
        metric = info["metric_type"] if info else "IP"
        params = {"metric_type": metric, "params": {"nprobe": int(ann.get("nprobes") or DEFAULT_NPROBES)}}
        res = self._client.search(
            self._p,
            data=[np.asarray(q, np.float32) for q in queries],
            limit=candidates,
            anns_field="vector",
            search_params=params,
            output_fields=_PROPOSAL_FIELDS,
        )
        queries = np.asarray(queries, np.float32)
        return [RawHits.rerank(self._to_batch([h["entity"] for h in hits]), q, limit) for q, hits in zip(queries, res)]

    def build_ann_index(
        self,
        *,
        index_type: str | None = None,
        metric: str = DEFAULT_ANN_METRIC,
        num_partitions: int | None = None,
        **_,
    ) -> dict:
        """IVF_FLAT by default (Milvus Lite has FLAT and IVF_FLAT only; a cluster takes its other types)."""
        index_type = index_type or "IVF_FLAT"
        check_ann_metric(metric)
        n = self.count_proposals()
        nlist = num_partitions or max(1, min(int(np.sqrt(n)), 65536))
        self._client.release_collection(self._p)
        self._client.drop_index(self._p, index_name="vector")
        params = self._client.prepare_index_params()
        metric_type = {"cosine": "COSINE", "dot": "IP", "l2": "L2"}[metric]
        params.add_index("vector", index_type=index_type, metric_type=metric_type, params={"nlist": nlist})
        self._client.create_index(self._p, params)
        self._client.load_collection(self._p)
        return {"index_type": index_type, "metric": metric, "num_partitions": nlist, "rows": n}

    def close(self) -> None:
        self._client.close()
