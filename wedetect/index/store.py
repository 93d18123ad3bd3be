"""Storage interface of the WeDetect-Uni object index, and the exact (brute-force) search.

The official retrieval score of a proposal with embedding ``e`` (batch-normalised, *not* unit
length) on pyramid level ``l`` for an L2-normalised text vector ``t`` is

    sigmoid(exp(s_l) * (e . t) + b_l)

Every proposal is therefore stored as the augmented vector ``v = [exp(s_l) * e, b_l, 0...]`` and a
query as ``q = [t, 1, 0...]``: ``v . q`` is exactly the official logit, so a maximum-inner-product
search ranks as the official code does (cosine similarity would not: ``|e|`` varies per
proposal). Vectors are zero-padded to a multiple of 16 dims (769 is prime) so product
quantisation can split them; the padding does not change any inner product.

A backend implements :class:`VectorStore`; :func:`open_store` picks one from the location.
"""

from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from wedetect.errors import WeDetectError

FORMAT_VERSION = 1
VECTOR_ALIGN = 16
# Rows scanned per matmul in exact search: bounds memory at about rows * dim * 4 bytes.
EXACT_CHUNK_ROWS = 65536
# ANN search defaults of Lance's IVF-RQ: 64 of the ~n/8192 IVF cells (0.95 recall@100 at 1M in the
# benchmark, at about the latency of 32), and 10x top-k candidates re-ranked by the exact logit.
DEFAULT_NPROBES = 64
DEFAULT_REFINE_FACTOR = 10
# The FAISS IVF-SQ8 index ranks candidates by (nearly) the logit itself: fewer cells and candidates
# (10M rows, 2,441 cells, 8 probes: recall@100 1.000 at 25 ms p50, 37 ms with the rows read from disk;
# 4 probes were as good, 16 cost 10-15 ms more).
FAISS_NPROBES = 8
FAISS_REFINE_FACTOR = 2
# LanceDB: how many times more rows the compressed codes pre-select, to be re-ranked by their exact
# vectors (by the index metric) before the candidate cut; 1 = off (candidates straight from the codes).
DEFAULT_EXACT_RERANK = 1
# IVF partition metrics (hits are ranked by the exact logit whatever the metric; docs/index.md).
ANN_METRICS = ("cosine", "dot", "l2")
DEFAULT_ANN_METRIC = "cosine"


class ObjectIndexError(WeDetectError):
    """The index is missing, corrupt, or was built for another model."""


class IndexNotFoundError(ObjectIndexError):
    """No index at the location (``wedetect index add`` creates one)."""


def vector_dim_for(embed_dim: int) -> int:
    """Stored vector size: ``embed_dim`` + 1 (bias) rounded up to a multiple of 16."""
    return int(math.ceil((embed_dim + 1) / VECTOR_ALIGN) * VECTOR_ALIGN)


def proposal_vectors(
    embeddings: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, vector_dim: int
) -> np.ndarray:
    """``[exp(s) * e, b, 0...]`` per proposal, float32 (N, vector_dim)."""
    e = embeddings.detach().float().cpu()
    n, d = e.shape
    if d + 1 > vector_dim:
        raise ObjectIndexError(f"embedding size {d} does not fit the index vector size {vector_dim}")
    out = torch.zeros(n, vector_dim, dtype=torch.float32)
    out[:, :d] = e * torch.exp(logit_scale.detach().float().cpu()).view(-1, 1)
    out[:, d] = logit_bias.detach().float().cpu()
    return out.numpy()


def query_vectors(text_embeddings: torch.Tensor | np.ndarray, vector_dim: int) -> np.ndarray:
    """``[t, 1, 0...]`` per query, float32 (Q, vector_dim); ``t`` must already be L2-normalised."""
    t = torch.as_tensor(text_embeddings).detach().float().cpu()
    if t.ndim == 1:
        t = t[None]
    q, d = t.shape
    if d + 1 > vector_dim:
        raise ObjectIndexError(f"text embedding size {d} does not fit the index vector size {vector_dim}")
    out = torch.zeros(q, vector_dim, dtype=torch.float32)
    out[:, :d] = t
    out[:, d] = 1.0
    return out.numpy()


def probability(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Official float32 sigmoid of the logits."""
    return torch.sigmoid(torch.as_tensor(logits, dtype=torch.float32)).numpy()


def image_id_for(path: str, content_hash: str) -> int:
    """Deterministic 63-bit id of (path, content): a re-run after a crash writes the same ids."""
    digest = hashlib.sha256(f"{path}\0{content_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class IndexMeta:
    """What an index was built with; an index refuses additions from a different model."""

    embed_dim: int
    vector_dim: int
    model: dict  # identity of the Uni checkpoint and the extraction settings
    # float32 reproduces the official scores; float16 halves storage for huge collections at
    # about 1e-3 relative error on the logits (LanceDB backend only).
    vector_dtype: str = "float32"
    # LanceDB: the proposals table keeps row ids through compaction and deletes, so an ANN index
    # kept beside it (FAISS) can refer to rows by id. Indexes created before this was set lack it.
    stable_row_ids: bool = False
    format_version: int = FORMAT_VERSION
    created_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IndexMeta":
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ObjectIndexError(
                f"index format version {version} is not supported by this wedetect (expects {FORMAT_VERSION})"
            )
        return cls(
            **{k: d[k] for k in ("embed_dim", "vector_dim", "model", "vector_dtype", "format_version", "created_at")},
            stable_row_ids=bool(d.get("stable_row_ids", False)),
        )

    def check_compatible(self, other: "IndexMeta") -> None:
        """Raise unless ``other`` (the model about to write) matches this index."""
        if other.embed_dim != self.embed_dim:
            raise ObjectIndexError(
                f"embedding size mismatch: the index holds {self.embed_dim}-d embeddings, "
                f"the model produces {other.embed_dim}-d; use a new --index path"
            )
        mine, theirs = self.model.get("sha256"), other.model.get("sha256")
        if mine != theirs:
            raise ObjectIndexError(
                f"this index was built with checkpoint {self.model.get('name')} (sha256 {str(mine)[:12]}), "
                f"not {other.model.get('name')} (sha256 {str(theirs)[:12]}); use the same --uni-checkpoint "
                "or a new --index path"
            )
        for key in ("num_proposals", "score_threshold", "size"):
            if self.model.get(key) != other.model.get(key):
                raise ObjectIndexError(
                    f"extraction setting {key}={other.model.get(key)} differs from the index's "
                    f"{key}={self.model.get(key)}; use the same settings or a new --index path"
                )


@dataclass
class ImageRecord:
    """One image of the collection; ``status`` is ``ok`` or ``failed`` (then ``error`` says why)."""

    image_id: int
    path: str
    hash: str
    height: int
    width: int
    num_proposals: int
    status: str = "ok"
    error: str = ""
    file_size: int = -1  # bytes; with ``indexed_at`` it lets a re-run skip unchanged files unhashed
    indexed_at: float = field(default_factory=time.time)


@dataclass
class ProposalBatch:
    """Column arrays of proposals, row-aligned; ``vectors`` are the augmented search vectors."""

    image_id: np.ndarray  # (N,) int64
    rank: np.ndarray  # (N,) int32, position of the proposal in its image's list
    box: np.ndarray  # (N, 4) float32 xyxy, original pixels
    score: np.ndarray  # (N,) float32 proposal (objectness) score
    level: np.ndarray  # (N,) int8
    logit_scale: np.ndarray  # (N,) float32, before exp
    logit_bias: np.ndarray  # (N,) float32
    vector: np.ndarray  # (N, vector_dim) float32

    def __len__(self) -> int:
        return int(self.image_id.shape[0])

    @classmethod
    def empty(cls, vector_dim: int) -> "ProposalBatch":
        return cls(
            np.zeros(0, np.int64),
            np.zeros(0, np.int32),
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.int8),
            np.zeros(0, np.float32),
            np.zeros(0, np.float32),
            np.zeros((0, vector_dim), np.float32),
        )

    @classmethod
    def concat(cls, batches: Sequence["ProposalBatch"], vector_dim: int) -> "ProposalBatch":
        if not batches:
            return cls.empty(vector_dim)
        return cls(*(np.concatenate([getattr(b, f) for b in batches]) for f in cls.__dataclass_fields__))

    def take(self, idx: np.ndarray) -> "ProposalBatch":
        return ProposalBatch(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


@dataclass
class ObjectHit:
    """One retrieved object: the official probability ``score`` and its ``logit``."""

    image_id: int
    path: str
    box: list[float]
    score: float
    logit: float
    proposal_score: float
    level: int
    image_size: tuple[int, int]  # (h, w)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


@dataclass
class RawHits:
    """Search output of a backend for one query: proposals sorted by logit, descending."""

    proposals: ProposalBatch
    logits: np.ndarray  # (n,) float32

    @classmethod
    def rerank(cls, candidates: ProposalBatch, query: np.ndarray, limit: int) -> "RawHits":
        """The ``limit`` best ANN candidates by their exact logit."""
        order, logits = best_by_logit(candidates.vector, query, limit)
        return cls(candidates.take(order), logits)


def check_ann_metric(metric: str) -> str:
    if metric not in ANN_METRICS:
        raise WeDetectError(f"unknown ANN metric {metric!r} ({', '.join(ANN_METRICS)})")
    return metric


def check_ann_params(**params: int | None) -> None:
    """ANN search parameters (``nprobes``, ``refine_factor``, ``exact_rerank``) are None or >= 1."""
    for name, value in params.items():
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise WeDetectError(f"{name} must be a positive integer, got {value!r}")


def best_by_logit(vectors: np.ndarray, query: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and float32 logits of the ``limit`` best rows of ``vectors`` (n, d) for one query,
    computed with the exact path's float32 matmul so both paths score a proposal identically."""
    logits = (torch.from_numpy(vectors) @ torch.from_numpy(query)).numpy()
    order = np.argsort(-logits, kind="stable")[:limit]
    return order, logits[order].astype(np.float32)


class VectorStore(ABC):
    """The small storage interface every backend implements.

    Writes are made crash-safe by ordering, not transactions: a batch's proposals are committed
    before its image rows, so an image row exists only once all its proposals are stored.
    A crash in between leaves orphan proposals (detected cheaply, since the proposal count then
    exceeds the sum of ``num_proposals``) that :meth:`recover` deletes before the next write.
    """

    meta: IndexMeta

    # --- backend primitives -------------------------------------------------------------
    @abstractmethod
    def _append_proposals(self, batch: ProposalBatch) -> None: ...

    @abstractmethod
    def _append_images(self, records: list[ImageRecord]) -> None: ...

    @abstractmethod
    def _delete(self, table: str, image_ids: Sequence[int]) -> None:
        """Delete the rows of ``table`` (``images`` or ``proposals``) with these image ids."""

    @abstractmethod
    def _proposal_image_ids(self) -> np.ndarray:
        """image_id column of every stored proposal (for orphan recovery)."""

    @abstractmethod
    def count_proposals(self) -> int: ...

    @abstractmethod
    def images(self) -> list[ImageRecord]:
        """Every image row (indexed and failed)."""

    @abstractmethod
    def image_records(self, image_ids: Sequence[int]) -> dict[int, ImageRecord]:
        """Image rows by id (ids without a row are left out)."""

    @abstractmethod
    def iter_proposals(self, batch_rows: int = EXACT_CHUNK_ROWS) -> Iterator[ProposalBatch]:
        """All proposals, in storage order."""

    @abstractmethod
    def search(self, queries: np.ndarray, limit: int, *, exact: bool | None = None, **ann) -> list[RawHits]:
        """Top-``limit`` proposals by inner product per query row of ``queries`` (Q, vector_dim)."""

    def ann_index_type(self) -> str | None:
        """Type of the approximate index searches go through, or None (searches are exact)."""
        return None

    def has_ann_index(self) -> bool:
        return self.ann_index_type() is not None

    def ann_index_details(self) -> dict:
        """What the backend can say about its ANN index beyond its type (rows covered, cells...)."""
        return {}

    def build_ann_index(self, **params) -> dict:
        """Build an approximate index for large collections; returns what was built.

        Backends partition by ``metric`` (default ``"cosine"``: by direction) and search returns
        ``limit * refine_factor`` candidates, ranked by their exact logit (:func:`best_by_logit`).
        LanceDB's default FAISS index picks the candidates by the inner product of 8-bit codes (an
        estimate of the logit); Lance's own IVF types and Milvus pick them by the partition metric,
        and with Lance's ``exact_rerank=r`` the best ``limit * refine_factor * r`` by compressed codes
        are re-ranked on their exact vectors before that cut.
        Directions are what a unit text query separates: in the noise-dominated embeddings of
        ``benchmarks/index_search.py``, inner-product or L2 k-means scatters one object kind over
        many cells, cosine k-means keeps it in one or two (docs/index.md).
        """
        raise WeDetectError(f"{type(self).__name__} has no ANN index support")

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release client resources."""

    # --- shared logic --------------------------------------------------------------------
    def add(self, records: list[ImageRecord], batch: ProposalBatch) -> None:
        """Store images and their proposals; a crash at any point loses or duplicates nothing."""
        if len(batch) and batch.vector.shape[1] != self.meta.vector_dim:
            raise ObjectIndexError(f"vector size {batch.vector.shape[1]} != index vector size {self.meta.vector_dim}")
        expected = sum(r.num_proposals for r in records if r.status == "ok")
        if expected != len(batch):
            raise ObjectIndexError(f"image records announce {expected} proposals but {len(batch)} were given")
        if len(batch):
            self._append_proposals(batch)
        self._append_images(records)

    def add_stream(self, records: list[ImageRecord], batches: Iterable[ProposalBatch]) -> None:
        """Like :meth:`add` for many proposal batches (merging parts); image rows go last."""
        total = 0
        for batch in batches:
            if len(batch):
                self._append_proposals(batch)
                total += len(batch)
        expected = sum(r.num_proposals for r in records if r.status == "ok")
        if expected != total:
            raise ObjectIndexError(f"image records announce {expected} proposals but {total} were given")
        self._append_images(records)

    def optimize(self, progress: bool = False) -> None:  # noqa: B027 (optional hook)
        """Compact storage after a run of many small commits (``progress``: show the long steps)."""

    def remove_images(self, image_ids: Sequence[int]) -> None:
        """Delete images and their proposals (image rows first: a crash leaves only orphans)."""
        if image_ids:
            self._delete("images", image_ids)
            self._delete("proposals", image_ids)

    def recover(self) -> int:
        """Delete proposals of images that never got their image row; returns how many."""
        records = self.images()
        expected = sum(r.num_proposals for r in records if r.status == "ok")
        if self.count_proposals() == expected:
            return 0
        known = np.array([r.image_id for r in records if r.status == "ok"], dtype=np.int64)
        ids = self._proposal_image_ids()
        orphans = np.unique(ids[~np.isin(ids, known)])
        if orphans.size:
            self._delete("proposals", orphans.tolist())
        remaining = self.count_proposals()
        if remaining != expected:
            raise ObjectIndexError(
                f"index is inconsistent: {remaining} proposals stored but image rows announce {expected}; "
                "rebuild it with a new --index path"
            )
        return int(orphans.size)

    def max_proposals_per_image(self) -> int:
        return max((r.num_proposals for r in self.images()), default=0)


def exact_search(
    batches: Iterator[ProposalBatch] | Sequence[ProposalBatch],
    queries: np.ndarray,
    limit: int,
    device: str | torch.device = "cpu",
) -> list[RawHits]:
    """Brute-force top-``limit`` proposals by inner product, streaming over ``batches``.

    This is the reference the ANN paths are measured against; logits are float32 matmul
    results, exactly the official ``exp(s) * (e . t) + b`` up to float32 summation order.
    """
    q = torch.as_tensor(np.ascontiguousarray(queries), dtype=torch.float32, device=device)
    nq = q.shape[0]
    best_logits: list[torch.Tensor] = [torch.empty(0, device=device) for _ in range(nq)]
    best_rows: list[ProposalBatch | None] = [None] * nq
    for batch in batches:
        if not len(batch):
            continue
        v = torch.as_tensor(batch.vector, device=device).float()
        logits = q @ v.T  # (Q, n)
        k = min(limit, logits.shape[1])
        top, idx = logits.topk(k, dim=1)
        idx_np = idx.cpu().numpy()
        for i in range(nq):
            cand = batch.take(idx_np[i])
            merged_logits = torch.cat([best_logits[i], top[i]])
            merged_rows = cand if best_rows[i] is None else ProposalBatch.concat([best_rows[i], cand], 0)
            keep_k = min(limit, merged_logits.numel())
            keep_logits, keep = merged_logits.topk(keep_k)
            best_logits[i] = keep_logits
            best_rows[i] = merged_rows.take(keep.cpu().numpy())
    out = []
    for i in range(nq):
        rows = best_rows[i]
        if rows is None:
            out.append(RawHits(ProposalBatch.empty(queries.shape[1]), np.zeros(0, np.float32)))
        else:
            out.append(RawHits(rows, best_logits[i].cpu().numpy().astype(np.float32)))
    return out


def open_store(
    location: str | Path, *, backend: str = "auto", meta: IndexMeta | None = None, device: str = "cpu"
) -> VectorStore:
    """Open (or, with ``meta``, create) the index at ``location``.

    ``backend``: ``lancedb`` (a local directory or an object-store URI), ``milvus`` (a
    ``*.db`` Milvus Lite file or an ``http(s)://`` / ``tcp://`` server URI), or ``auto`` (by the
    location's form). Without ``meta`` the index must exist. ``device`` runs exact search.
    """
    loc = str(location).strip()
    if not loc:
        raise ObjectIndexError("--index is empty: give a directory (LanceDB) or a Milvus URI")
    if backend == "auto":
        backend = (
            "milvus"
            if loc.endswith(".db") or loc.startswith(("http://", "https://", "tcp://", "milvus://"))
            else "lancedb"
        )
    if backend == "lancedb":
        from wedetect.index.lancedb_store import LanceDBStore

        return LanceDBStore(loc, meta=meta, device=device)
    if backend == "milvus":
        from wedetect.index.milvus_store import MilvusStore

        return MilvusStore(loc, meta=meta, device=device)
    raise WeDetectError(f"unknown index backend {backend!r} (expected lancedb, milvus or auto)")
