"""Resumable extraction of WeDetect-Uni proposals into an object index.

``build_index`` runs the proposal generator once over an image collection and stores every
proposal's box, score, level and search vector. It is incremental and crash-safe:

* an image is identified by (path, content hash); already indexed images are skipped (a file
  whose size and mtime are unchanged is not even re-hashed), a path whose content changed is
  re-indexed, unreadable images are recorded as ``failed`` with the reason;
* results are committed every ``commit_every`` images, proposals before image rows (see
  :class:`~wedetect.index.store.VectorStore`), so a process killed at any moment and restarted
  loses at most the uncommitted images and duplicates nothing;
* under ``torchrun`` each rank extracts a shard into its own part (a local LanceDB store) and
  rank 0 commits all parts into the index at the end, once.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from wedetect.data.io import ImageReadError, collect_images, load_pil_rgb
from wedetect.errors import WeDetectError
from wedetect.index.store import (
    ImageRecord,
    IndexMeta,
    IndexNotFoundError,
    ObjectIndexError,
    ProposalBatch,
    VectorStore,
    image_id_for,
    open_store,
    proposal_vectors,
    vector_dim_for,
)
from wedetect.structures import Detections

_HASH_CHUNK = 1 << 20


class Proposer(Protocol):
    """What extraction needs from WeDetect-Uni (``WeDetectUni.propose``)."""

    def propose(
        self,
        images: list,
        num_proposals: int = 300,
        score_threshold: float = 0.0,
        batch_size: int = 8,
        progress: bool = False,
    ) -> list[Detections]: ...


@dataclass(frozen=True)
class ExtractionSettings:
    """Extraction parameters; the ones that change the stored proposals are part of the index identity."""

    num_proposals: int = 300
    score_threshold: float = 0.0
    batch_size: int = 8
    commit_every: int = 256  # images per commit: the most a crash can lose
    workers: int = 4  # threads reading and hashing files ahead of the model
    retry_failed: bool = False


@dataclass
class AddReport:
    """Outcome of one ``build_index`` run."""

    added: int = 0
    replaced: int = 0
    skipped: int = 0
    proposals: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    previously_failed: int = 0  # failures recorded by earlier runs, not retried
    recovered_orphans: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return (self.added + self.replaced + len(self.failed)) / self.seconds if self.seconds else 0.0

    def merge(self, other: "AddReport") -> None:
        for name in ("added", "replaced", "skipped", "proposals", "previously_failed", "recovered_orphans"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failed.extend(other.failed)

    def to_dict(self) -> dict:
        return {
            "added": self.added,
            "replaced": self.replaced,
            "skipped": self.skipped,
            "proposals": self.proposals,
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "previously_failed": self.previously_failed,
            "recovered_orphans": self.recovered_orphans,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 3),
        }


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_identity(checkpoint: str | os.PathLike, settings: ExtractionSettings, size: int | None = None) -> dict:
    """The model identity stored in the index: checkpoint name and sha256 plus extraction settings."""
    path = Path(checkpoint)
    if not path.is_file():
        raise WeDetectError(f"--uni-checkpoint {checkpoint}: no such file")
    return {
        "name": path.name,
        "sha256": file_sha256(path),
        "num_proposals": settings.num_proposals,
        "score_threshold": settings.score_threshold,
        "size": size,
    }


@dataclass
class _Loaded:
    """One input file after reading: decoded image, or the reason it failed."""

    path: str
    hash: str = ""
    file_size: int = -1
    image: Image.Image | None = None
    error: str = ""


def _load(path: str) -> _Loaded:
    """Read once, hash the bytes and decode them the way WeDetect-Uni does (Pillow RGB)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return _Loaded(path, error=f"cannot read file ({e.strerror or e})")
    out = _Loaded(path, hash=hashlib.sha256(data).hexdigest(), file_size=len(data))
    if not data:
        out.error = "empty file"
        return out
    try:
        out.image = load_pil_rgb(Image.open(io.BytesIO(data)))
    except UnidentifiedImageError:
        out.error = "not a decodable image (unknown format or corrupt data)"
    except (ImageReadError, OSError, ValueError, Image.DecompressionBombError) as e:
        out.error = f"not a decodable image ({e})"
    return out


def _detections_to_batch(image_id: int, det: Detections, vector_dim: int) -> ProposalBatch:
    n = len(det)
    return ProposalBatch(
        image_id=np.full(n, image_id, dtype=np.int64),
        rank=np.arange(n, dtype=np.int32),
        box=det.boxes.detach().float().cpu().numpy().reshape(n, 4),
        score=det.scores.detach().float().cpu().numpy().reshape(n),
        level=det.levels.detach().cpu().numpy().astype(np.int8).reshape(n),
        logit_scale=det.logit_scale.detach().float().cpu().numpy().reshape(n),
        logit_bias=det.logit_bias.detach().float().cpu().numpy().reshape(n),
        vector=proposal_vectors(det.embeddings, det.logit_scale, det.logit_bias, vector_dim),
    )


def _embed_dim(det: Detections) -> int:
    if det.embeddings is None or det.logit_scale is None or det.logit_bias is None or det.levels is None:
        raise WeDetectError("the proposer returned detections without embeddings/levels/logit_scale/logit_bias")
    return int(det.embeddings.shape[-1])


def _write_error(e: BaseException) -> ObjectIndexError:
    full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e)
    what = "the disk is full" if full else f"writing to the index failed ({type(e).__name__}: {e})"
    return ObjectIndexError(
        f"{what}; the index keeps every batch committed before this one and is consistent: "
        "fix the cause and rerun the same command to resume"
    )


class _Writer:
    """Adds committed chunks to a store, creating it on first use (once the embedding size is known)."""

    def __init__(self, location: str, backend: str, model: dict) -> None:
        self.location, self.backend, self.model = location, backend, model
        self.store = _open_existing(location, backend, model)
        # Orphan proposals of a commit that a crash interrupted, deleted on opening.
        self.recovered = self.store.recover() if self.store is not None else 0
        self._held: list[ImageRecord] = []  # failed images seen before the index could be created

    def vector_dim(self, embed_dim: int) -> int:
        if self.store is None:
            meta = IndexMeta(embed_dim=embed_dim, vector_dim=vector_dim_for(embed_dim), model=self.model)
            self.store = open_store(self.location, backend=self.backend, meta=meta)
        elif embed_dim != self.store.meta.embed_dim:
            raise ObjectIndexError(
                f"embedding size mismatch: the index holds {self.store.meta.embed_dim}-d embeddings, "
                f"the model produces {embed_dim}-d; use a new --index path"
            )
        return self.store.meta.vector_dim

    def write(self, records: list[ImageRecord], batches: list[ProposalBatch]) -> None:
        if self.store is None:
            self._held += records  # only failures so far, nothing to index yet
            return
        records, self._held = self._held + records, []
        batch = ProposalBatch.concat(batches, self.store.meta.vector_dim)
        _guarded(self.store.add, records, batch)

    def remove(self, image_ids: list[int]) -> None:
        if image_ids and self.store is not None:
            _guarded(self.store.remove_images, image_ids)

    def finish(self, embed_dim_hint: int | None, progress: bool = False) -> None:
        """Flush held failures (creating the index if no image could be read at all), then compact
        the index and bring its ANN index up to date."""
        if self._held:
            # Nothing was readable, so the model's embedding size is unknown: assume the real one.
            self.vector_dim(embed_dim_hint or 768)
            self.write([], [])
        if self.store is not None:
            _guarded(self.store.optimize, progress)


def _guarded(fn, *args) -> None:
    """Run a store write, turning backend I/O errors into a clear user-facing error."""
    try:
        fn(*args)
    except WeDetectError:
        raise
    except Exception as e:  # backend I/O errors: disk full, permissions, connection lost
        raise _write_error(e) from e


def _open_existing(location: str, backend: str, model: dict) -> VectorStore | None:
    """The index at ``location`` checked against ``model``, or None if there is none yet."""
    try:
        store = open_store(location, backend=backend)
    except IndexNotFoundError:
        return None
    probe = IndexMeta(embed_dim=store.meta.embed_dim, vector_dim=store.meta.vector_dim, model=model)
    store.meta.check_compatible(probe)
    return store


def _plan(paths: Sequence[str], known: dict[str, ImageRecord], retry_failed: bool) -> tuple[list[str], AddReport]:
    """Paths to (re)process; a known file whose size is unchanged and that is not newer than its
    record is skipped without re-reading it."""
    todo, report = [], AddReport()
    for p in paths:
        rec = known.get(p)
        if rec is not None and not (rec.status == "failed" and retry_failed):
            try:
                st = os.stat(p)
            except OSError:
                st = None
            if st is not None and st.st_size == rec.file_size and st.st_mtime_ns <= int(rec.indexed_at * 1e9):
                report.skipped += 1
                report.previously_failed += rec.status == "failed"
                continue
        todo.append(p)
    return todo, report


def _normalise_paths(images: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    items = collect_images(images) if isinstance(images, (str, os.PathLike)) else list(images)
    if not items:
        raise WeDetectError("no images to index")
    return list(dict.fromkeys(str(Path(p).expanduser().resolve()) for p in items))


def _extract(
    writer: _Writer,
    todo: Sequence[str],
    known: dict[str, ImageRecord],
    proposer: Proposer,
    settings: ExtractionSettings,
    progress: bool,
    desc: str = "indexing",
) -> AddReport:
    report = AddReport()
    start = time.perf_counter()
    embed_dim: int | None = None
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max(1, settings.workers)) as pool:
        for i in range(0, len(todo), settings.commit_every):
            loaded = list(pool.map(_load, todo[i : i + settings.commit_every]))
            fresh = []
            for item in loaded:
                rec = known.get(item.path)
                retry = rec is not None and rec.status == "failed" and settings.retry_failed
                if rec is not None and item.hash and rec.hash == item.hash and not retry:
                    report.skipped += 1  # touched but unchanged
                    report.previously_failed += rec.status == "failed"
                else:
                    fresh.append(item)
            # A changed file replaces its old entry (old rows first: a crash leaves only orphans).
            writer.remove([known[item.path].image_id for item in fresh if item.path in known])
            ok = [item for item in fresh if item.image is not None]
            dets = (
                proposer.propose(
                    [item.image for item in ok],
                    num_proposals=settings.num_proposals,
                    score_threshold=settings.score_threshold,
                    batch_size=settings.batch_size,
                    progress=False,
                )
                if ok
                else []
            )
            if len(dets) != len(ok):
                raise WeDetectError(f"the proposer returned {len(dets)} results for {len(ok)} images")
            det_by_path = {item.path: d for item, d in zip(ok, dets)}
            records, batches = [], []
            for item in fresh:
                image_id = image_id_for(item.path, item.hash)
                det = det_by_path.get(item.path)
                if det is None:
                    records.append(
                        ImageRecord(image_id, item.path, item.hash, 0, 0, 0, "failed", item.error, item.file_size)
                    )
                    report.failed.append((item.path, item.error))
                    continue
                embed_dim = _embed_dim(det)
                batches.append(_detections_to_batch(image_id, det, writer.vector_dim(embed_dim)))
                h, w = item.image.height, item.image.width
                records.append(ImageRecord(image_id, item.path, item.hash, h, w, len(det), file_size=item.file_size))
                if item.path in known:
                    report.replaced += 1
                else:
                    report.added += 1
                report.proposals += len(det)
            writer.write(records, batches)
            bar.update(len(loaded))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{report.proposals / elapsed:.0f} proposals/s, {len(report.failed)} failed")
    bar.close()
    writer.finish(embed_dim, progress)
    report.seconds = time.perf_counter() - start
    return report


def _known_images(store: VectorStore | None) -> dict[str, ImageRecord]:
    return {} if store is None else {r.path: r for r in store.images()}


def build_index(
    location: str | os.PathLike,
    images: str | os.PathLike | Iterable[str | os.PathLike],
    proposer: Proposer,
    *,
    model: dict,
    settings: ExtractionSettings | None = None,
    backend: str = "auto",
    progress: bool = True,
    staging_dir: str | os.PathLike | None = None,
) -> AddReport:
    """Add ``images`` (a folder, glob, list file or iterable of paths) to the index at ``location``.

    ``model`` is the identity stored in (and checked against) the index, from
    :func:`checkpoint_identity`. Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank must call
    this; each extracts a shard into ``staging_dir`` (default ``<location>.parts``) and rank 0
    merges the parts at the end. Returns this process's report (rank 0: the whole run).
    """
    settings = settings or ExtractionSettings()
    if settings.commit_every < 1 or settings.batch_size < 1:
        raise WeDetectError("batch size and commit interval must be positive")
    location = str(location).strip()
    if not location:
        raise ObjectIndexError("--index is empty: give a directory (LanceDB) or a Milvus URI")
    paths = _normalise_paths(images)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return _build_distributed(location, paths, proposer, model, settings, backend, progress, staging_dir)
    writer = _Writer(location, backend, model)
    known = _known_images(writer.store)
    todo, report = _plan(paths, known, settings.retry_failed)
    extracted = _extract(writer, todo, known, proposer, settings, progress)
    report.merge(extracted)
    report.seconds, report.recovered_orphans = extracted.seconds, writer.recovered
    return report


# --- multi-process extraction (torchrun) -------------------------------------------------------
def _merge_parts(parts_root: Path, location: str, backend: str, model: dict) -> AddReport:
    """Commit every complete part under ``parts_root`` into the index, then delete the parts.

    Re-running after a crash is safe: images already in the index are skipped, and a part is
    deleted only after its rows are committed.
    """
    report = AddReport()
    parts = sorted(p for p in parts_root.glob("rank-*") if p.is_dir()) if parts_root.is_dir() else []
    for part_dir in parts:
        try:
            part = open_store(str(part_dir), backend="lancedb")
        except IndexNotFoundError:
            shutil.rmtree(part_dir)  # a part that never committed anything
            continue
        part.recover()
        main = _open_existing(location, backend, model) or open_store(location, backend=backend, meta=part.meta)
        main.recover()
        main.meta.check_compatible(part.meta)
        in_main = {r.image_id: r for r in main.images()}
        by_path = {r.path: r for r in in_main.values()}
        new = [r for r in part.images() if r.image_id not in in_main]
        stale = [by_path[r.path].image_id for r in new if r.path in by_path]
        new_ids = np.array([r.image_id for r in new], dtype=np.int64)
        batches = (b.take(np.isin(b.image_id, new_ids)) for b in part.iter_proposals())
        _guarded(main.remove_images, stale)
        _guarded(main.add_stream, new, batches)
        report.proposals += sum(r.num_proposals for r in new if r.status == "ok")
        part.close()
        main.close()
        shutil.rmtree(part_dir)
    return report


def _build_distributed(
    location: str,
    paths: list[str],
    proposer: Proposer,
    model: dict,
    settings: ExtractionSettings,
    backend: str,
    progress: bool,
    staging_dir: str | os.PathLike | None,
) -> AddReport:
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        # Barriers only; extraction on a slow rank may take hours, hence the long timeout.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        owns_group = True
    else:
        owns_group = False
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    rank, world = dist.get_rank(), dist.get_world_size()
    if staging_dir is None and "://" in location:
        raise WeDetectError("distributed indexing into a remote index needs a local --staging-dir")
    parts_root = Path(staging_dir or f"{location.rstrip('/')}.parts")
    try:
        if rank == 0:
            _merge_parts(parts_root, location, backend, model)  # leftovers of a killed run
            main = _open_existing(location, backend, model)
            if main is not None:
                main.recover()  # one writer only: the other ranks wait at the barrier
        dist.barrier(group=group)
        known = _known_images(_open_existing(location, backend, model))
        todo, report = _plan(paths, known, settings.retry_failed)
        shard = todo[rank::world]
        report = AddReport() if rank else report
        writer = _Writer(str(parts_root / f"rank-{rank:05d}"), "lancedb", model)
        report.merge(
            _extract(writer, shard, known, proposer, settings, progress and rank == 0, f"indexing (rank {rank})")
        )
        dist.barrier(group=group)
        if rank == 0:
            _merge_parts(parts_root, location, backend, model)
        reports: list[AddReport | None] = [None] * world
        dist.all_gather_object(reports, report, group=group)
        dist.barrier(group=group)
    finally:
        if owns_group:
            dist.destroy_process_group()
    if rank:
        return report
    total = AddReport()
    for r in reports:
        total.merge(r)
    total.seconds = max(r.seconds for r in reports)
    return total
