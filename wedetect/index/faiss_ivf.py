"""A FAISS IVF index kept beside a LanceDB proposals table, keyed by the table's stable row ids.

Why not Lance's own IVF at 10M rows: Lance partitions and ranks candidates by one metric, and its
1-bit RaBitQ codes estimate the *cosine*, while the official retrieval score is an inner product of
the augmented vectors. Among ~8k near-identical directions per cell the codes then shuffle the true
top-k (docs/index.md). Here the two jobs are split:

* **cells by direction**: spherical k-means; a vector joins the unit centroid of largest inner
  product, i.e. of smallest angle (what a unit text query separates);
* **candidates by the official logit**: 8-bit scalar codes (one byte per dimension) of the augmented
  vectors ``[exp(s) e, b, 0...]``, scanned by inner product with ``[t, 1, 0...]``, estimate the logit
  itself; the best ``limit * refine_factor`` are then ranked exactly on the stored vectors.

The FAISS file is derived data: it can always be rebuilt from the table. Its state file records
the table version it reflects and the next row id it has not seen (Lance allocates stable row ids
in increasing order), so rows appended later are found exactly and deleted rows are dropped
(:meth:`LanceDBStore.search`), and :meth:`LanceDBStore.optimize` folds both in.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from wedetect.errors import WeDetectError

FAISS_INDEX_TYPE = "FAISS_IVF_SQ8"
FAISS_FOLDER = "ann_faiss"  # inside the LanceDB index directory
STATE_FILE = "state.json"
# k-means trains on at most this many rows per cell (FAISS needs 39; more buys little).
TRAIN_ROWS_PER_CELL = 128
KMEANS_ITERATIONS = 20

# Default cells: at least MIN_CELLS (k-means with fewer cells than object kinds merges kinds into
# mixed cells and leaves some kinds without a cell of their own, scattered over many: measured on the
# benchmark's 2,048 kinds, recall@100 at 1M rows and 8 probes was 0.44 with 244 cells, 0.92 with
# 1,000), and about ROWS_PER_CELL rows per cell on large collections (0.99 at 10M with 2,442 cells),
# but never fewer than MIN_ROWS_PER_CELL rows, which k-means needs to place a centroid.
MIN_CELLS = 2048
ROWS_PER_CELL = 4096
MIN_ROWS_PER_CELL = 64

# A scan yields (stable row ids, float32 augmented vectors) chunks.
Scan = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


def faiss_partitions(rows: int) -> int:
    """Default number of IVF cells for ``rows`` vectors (see MIN_CELLS)."""
    return max(1, min(max(rows // ROWS_PER_CELL, MIN_CELLS), rows // MIN_ROWS_PER_CELL))


def check_memory(rows: int, dim: int, *, total: int | None = None) -> None:
    """Refuse a build or update whose codes (one byte per dimension per row, held in RAM while the
    index is built or updated) would not fit in 80 % of this machine's memory."""
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not reported (non-POSIX): do not guess
            return
    need = rows * dim
    if need > 0.8 * total:
        raise WeDetectError(
            f"the FAISS index of {rows:,} proposals needs about {need / 2**30:.1f} GiB of RAM to build or update, "
            f"more than this machine's {total / 2**30:.1f} GiB allow; use --ann-type IVF_RQ (disk-based, inside LanceDB)"
        )


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is part of the [index] extra
        raise WeDetectError('the FAISS ANN index needs faiss-cpu: pip install "wedetect[index]"') from e
    return faiss


@dataclass
class FaissState:
    """What the FAISS file reflects; written atomically after the file it names."""

    file: str  # FAISS file name inside the folder (a new name per save: the swap is one rename)
    table_version: int  # proposals table version the index was last synchronised with
    next_row_id: int  # every row id below this was seen (indexed, or deleted since)
    rows: int  # vectors in the FAISS index
    partitions: int
    codes: str = "SQ8"
    metric: str = "cosine"
    built_at: float = field(default_factory=time.time)


class FaissIVF:
    """IVF (cosine cells) with 8-bit codes searched by inner product; ids are Lance row ids."""

    def __init__(self, folder: str | os.PathLike, index, state: FaissState) -> None:
        self.folder = Path(folder)
        self.index = index
        self.state = state

    # --- persistence ------------------------------------------------------------------------
    @staticmethod
    def exists(folder: str | os.PathLike) -> bool:
        return (Path(folder) / STATE_FILE).is_file()

    @classmethod
    def load(cls, folder: str | os.PathLike, *, writable: bool = False) -> "FaissIVF":
        """Open the index; read-only opens memory-map the codes (a search touches only its cells)."""
        faiss = _faiss()
        folder = Path(folder)
        try:
            state = FaissState(**json.loads((folder / STATE_FILE).read_text()))
            flags = 0 if writable else faiss.IO_FLAG_MMAP
            index = faiss.read_index(str(folder / state.file), flags)
        except (OSError, ValueError, TypeError, RuntimeError) as e:
            raise WeDetectError(
                f"the FAISS ANN index in {folder} cannot be read ({e}); rebuild it with `wedetect index add --ann`"
            ) from e
        return cls(folder, index, state)

    def save(self) -> None:
        """Write a new FAISS file, then swap the state file to it (atomic), then drop the old file."""
        faiss = _faiss()
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"ivf-{uuid.uuid4().hex[:12]}.faiss"
        try:
            faiss.write_index(self.index, str(self.folder / name))
        except (RuntimeError, OSError) as e:  # disk full, permissions: the previous file stays in use
            (self.folder / name).unlink(missing_ok=True)
            raise WeDetectError(
                f"writing the FAISS index in {self.folder} failed ({e}); searches keep using the previous one "
                "(rows it lacks are still found, exactly): fix the cause and rerun `wedetect index add`"
            ) from e
        self.state.file, self.state.rows = name, int(self.index.ntotal)
        self.save_state()
        for stale in self.folder.glob("ivf-*.faiss"):  # the old file, and any a crash left behind
            if stale.name != self.state.file:
                stale.unlink(missing_ok=True)  # a reader that mapped it keeps its pages (POSIX)

    def save_state(self) -> None:
        """Replace the state file (atomic); alone when only the table version moved on."""
        tmp = self.folder / f"{STATE_FILE}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(asdict(self.state)))
        os.replace(tmp, self.folder / STATE_FILE)

    # --- build and update ---------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        folder: str | os.PathLike,
        scan: Scan,
        *,
        rows: int,
        dim: int,
        num_partitions: int,
        table_version: int,
        seed: int = 0,
        progress: bool = False,
    ) -> "FaissIVF":
        """Train the cells and codes on a sample of ``scan()``, then add every row (two passes)."""
        faiss = _faiss()
        from tqdm.auto import tqdm

        check_memory(rows, dim)
        want = min(rows, TRAIN_ROWS_PER_CELL * num_partitions)
        rng = np.random.default_rng(seed)
        parts = []
        for _, vectors in scan():  # sample each chunk in proportion, without holding the table
            take = rng.random(len(vectors)) < want / max(rows, 1)
            parts.append(vectors[take])
        sample = np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros((0, dim), np.float32))
        if len(sample) < num_partitions:
            raise WeDetectError(f"{len(sample)} training rows for {num_partitions} partitions; use fewer partitions")
        units = sample / np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-12)
        kmeans = faiss.Kmeans(dim, num_partitions, niter=KMEANS_ITERATIONS, spherical=True, seed=seed + 1)
        kmeans.train(np.ascontiguousarray(units, dtype=np.float32))
        quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(kmeans.centroids)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, num_partitions, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False
        )
        index.train(sample)  # the quantizer is trained already: this fits the per-dimension code ranges
        quantizer.this.disown()  # the IVF index owns (and frees) its quantizer
        index.own_fields = True
        ivf = cls(folder, index, FaissState("", table_version, 0, 0, num_partitions))
        with tqdm(total=rows, desc="FAISS IVF", unit="rows", disable=not progress) as bar:
            for ids, vectors in scan():
                ivf.add(ids, vectors)
                bar.update(len(ids))
        return ivf

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
            self.state.next_row_id = max(self.state.next_row_id, int(ids.max()) + 1)

    def remove(self, ids: Iterable[int]) -> int:
        ids = np.fromiter(ids, dtype=np.int64)
        return int(self.index.remove_ids(_faiss().IDSelectorBatch(ids))) if ids.size else 0

    def ids(self) -> np.ndarray:
        """Every row id in the index (to find rows deleted from the table since)."""
        faiss = _faiss()
        lists = self.index.invlists
        out = [
            faiss.rev_swig_ptr(lists.get_ids(c), lists.list_size(c)).copy()
            for c in range(self.index.nlist)
            if lists.list_size(c)
        ]
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    # --- search -------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, nprobes: int) -> list[np.ndarray]:
        """Row ids of the ``k`` best rows by code inner product per query, best first."""
        self.index.nprobe = min(int(nprobes), self.index.nlist)
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), int(k))
        return [row[row >= 0] for row in ids]
