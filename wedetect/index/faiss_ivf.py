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

The FAISS files are derived data: they can always be rebuilt from the table. The state file records
the table version they reflect and the next row id they have not seen (Lance allocates stable row ids
in increasing order), so rows appended later are found exactly and deleted rows are dropped
(:meth:`LanceDBStore.search`), and :meth:`LanceDBStore.optimize` folds both in.

Two files, like a two-level LSM tree: the *main* file (7.8 GB at 10M rows) and a small *delta* file
with the same cells and codes for rows appended since the main file was written. An update that only
appends rewrites the delta alone, until it would exceed DELTA_MAX_FRACTION of the main file; then, or
when rows were deleted, the delta is merged into a new main file. Searches scan both.
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

# The delta file is merged into the main file once it would hold more than this share of its rows:
# appending to a 10M-row index then writes at most ~0.8 GB instead of 7.8 GB, and each search scans
# at most 10 % more codes.
DELTA_MAX_FRACTION = 0.1

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


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _ivf_sq8(centroids: np.ndarray):
    """An IVF index with 8-bit codes over ``centroids`` (cells by inner product); codes untrained."""
    faiss = _faiss()
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, centroids.shape[1], len(centroids), faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False
    )
    quantizer.this.disown()  # the IVF index owns (and frees) its quantizer
    index.own_fields = True
    return index


@dataclass
class FaissState:
    """What the FAISS file reflects; written atomically after the file it names."""

    file: str  # main FAISS file inside the folder (a new name per save: the swap is one rename)
    table_version: int  # proposals table version the index was last synchronised with
    next_row_id: int  # every row id below this was seen (indexed, or deleted since)
    rows: int  # vectors in the main file
    partitions: int
    delta_file: str = ""  # rows appended since the main file was written ("": none)
    delta_rows: int = 0
    codes: str = "SQ8"
    metric: str = "cosine"
    built_at: float = field(default_factory=time.time)


class FaissIVF:
    """IVF (cosine cells) with 8-bit codes searched by inner product; ids are Lance row ids.

    ``index`` is the main file's index (memory-mapped when opened read-only), ``delta`` the appended
    rows' index with the same cells and codes (in memory; None when there are none)."""

    def __init__(self, folder: str | os.PathLike, index, state: FaissState, delta=None) -> None:
        self.folder = Path(folder)
        self.index = index
        self.delta = delta
        self.state = state
        self._changed: set[str] = set()  # which of "main", "delta" the next save writes

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) + (int(self.delta.ntotal) if self.delta is not None else 0)

    # --- persistence ------------------------------------------------------------------------
    @staticmethod
    def exists(folder: str | os.PathLike) -> bool:
        return (Path(folder) / STATE_FILE).is_file()

    @classmethod
    def load(cls, folder: str | os.PathLike, *, writable: bool = False) -> "FaissIVF":
        """Open the index; read-only opens memory-map the main file (a search touches only its cells)."""
        faiss = _faiss()
        folder = Path(folder)
        text, tries = None, 3
        while True:
            try:
                text = text if text is not None else (folder / STATE_FILE).read_text()
                state = FaissState(**json.loads(text))
                index = faiss.read_index(str(folder / state.file), 0 if writable else faiss.IO_FLAG_MMAP)
                delta = faiss.read_index(str(folder / state.delta_file)) if state.delta_file else None
                return cls(folder, index, state, delta)
            except (OSError, ValueError, TypeError, RuntimeError) as e:
                # A writer may have swapped the state and removed the files it named after we read it.
                newer, tries = _read_or_none(folder / STATE_FILE), tries - 1
                if tries and newer is not None and newer != text:
                    text = newer
                    continue
                raise WeDetectError(
                    f"the FAISS ANN index in {folder} cannot be read ({e}); rebuild it with `wedetect index add --ann`"
                ) from e

    def save(self) -> None:
        """Write the changed files under new names, then swap the state file to them (atomic), then
        drop the files it no longer names."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if "main" in self._changed:
            self.state.file, self.state.rows = self._write(self.index), int(self.index.ntotal)
        if "delta" in self._changed:
            rows = 0 if self.delta is None else int(self.delta.ntotal)
            self.state.delta_file, self.state.delta_rows = (self._write(self.delta) if rows else ""), rows
        self.save_state()
        self._changed.clear()
        for stale in self.folder.glob("ivf-*.faiss"):  # replaced files, and any a crash left behind
            if stale.name not in (self.state.file, self.state.delta_file):
                stale.unlink(missing_ok=True)  # a reader that mapped it keeps its pages (POSIX)

    def _write(self, index) -> str:
        name = f"ivf-{uuid.uuid4().hex[:12]}.faiss"
        try:
            _faiss().write_index(index, str(self.folder / name))
        except (RuntimeError, OSError) as e:  # disk full, permissions: the previous files stay in use
            (self.folder / name).unlink(missing_ok=True)
            raise WeDetectError(
                f"writing the FAISS index in {self.folder} failed ({e}); searches keep using the previous one "
                "(rows it lacks are still found, exactly): fix the cause and rerun `wedetect index add`"
            ) from e
        return name

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
        index = _ivf_sq8(kmeans.centroids)
        index.train(sample)  # the quantizer is trained already: this fits the per-dimension code ranges
        ivf = cls(folder, index, FaissState("", table_version, 0, 0, num_partitions))
        ivf._changed = {"main", "delta"}
        with tqdm(total=rows, desc="FAISS IVF", unit="rows", disable=not progress) as bar:
            for ids, vectors in scan():
                ivf._add(ivf.index, ids, vectors)
                bar.update(len(ids))
        return ivf

    def delta_has_room(self, rows: int) -> bool:
        """Whether ``rows`` more appended rows stay within the delta file's share of the main file."""
        return self.state.delta_rows + rows <= DELTA_MAX_FRACTION * self.state.rows

    def append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add rows appended to the table since the last sync: to the delta, leaving the main file."""
        if self.delta is None:
            self.delta = self._empty_like(self.index)
        self._add(self.delta, ids, vectors)
        self._changed.add("delta")

    def merge(self) -> None:
        """Move the delta's rows into the main index (which must be opened writable)."""
        if self.delta is not None:
            self.index.merge_from(self.delta, 0)  # empties the delta
            self.delta = None
            self._changed |= {"main", "delta"}

    def remove(self, ids: Iterable[int]) -> int:
        ids = np.fromiter(ids, dtype=np.int64)
        if not ids.size:
            return 0
        self.merge()
        self._changed.add("main")
        return int(self.index.remove_ids(_faiss().IDSelectorBatch(ids)))

    def ids(self) -> np.ndarray:
        """Every row id in the index (to find rows deleted from the table since)."""
        faiss = _faiss()
        out = [np.zeros(0, np.int64)]
        for index in (i for i in (self.index, self.delta) if i is not None):
            lists = index.invlists
            sizes = [(c, lists.list_size(c)) for c in range(index.nlist)]
            out += [faiss.rev_swig_ptr(lists.get_ids(c), n).copy() for c, n in sizes if n]
        return np.concatenate(out)

    def _add(self, index, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
            self.state.next_row_id = max(self.state.next_row_id, int(ids.max()) + 1)

    @staticmethod
    def _empty_like(index):
        """An empty index with ``index``'s trained cells and code ranges (its rows are not copied)."""
        empty = _ivf_sq8(index.quantizer.reconstruct_n(0, index.nlist))
        empty.sq = index.sq  # copies the trained per-dimension ranges
        empty.is_trained = True
        return empty

    # --- search -------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, nprobes: int) -> list[np.ndarray]:
        """Row ids of the ``k`` best rows by code inner product per query (main and delta), best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores, ids = [], []
        for index in (self.index, self.delta):
            if index is not None and index.ntotal:
                index.nprobe = min(int(nprobes), index.nlist)
                found = index.search(queries, int(k))
                scores.append(found[0])
                ids.append(found[1])
        if not ids:
            return [np.zeros(0, np.int64) for _ in queries]
        scores, ids = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, : int(k)]
        return [row[row >= 0] for row in np.take_along_axis(ids, order, axis=1)]
