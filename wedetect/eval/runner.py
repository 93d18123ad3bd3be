"""Run a model over every image of an evaluation dataset: batched, sharded under torchrun, resumable.

The runner is model-agnostic: it takes ``infer(paths) -> list[Detections]`` (one batch), so WeDetect
``predict``, WeDetect-Uni ``propose`` or a test double plug in alike. Each rank processes every
``world_size``-th image not yet done, appends its results to chunk files in a cache folder (written
atomically, so an interrupted run loses at most the unflushed images), and the ranks' new results
are gathered once on rank 0 with ``torch.distributed``. A rerun with the same cache folder skips
the images already done; a fingerprint of the settings guards against mixing results of
different runs.
"""
from __future__ import annotations

import atexit
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from wedetect.errors import WeDetectError
from wedetect.eval.dataset import CocoDataset
from wedetect.eval.retrieval import ImageEmbeddings
from wedetect.structures import Detections

Infer = Callable[[list[Path]], list[Detections]]
Record = dict[str, Any]  # one image's results: image_id, image_size and tensors
DETECTION_FIELDS = ("boxes", "scores", "labels")
PROPOSAL_FIELDS = ("boxes", "scores", "labels", "embeddings", "logit_scale", "logit_bias")


class ResumeMismatchError(WeDetectError):
    """A cache folder holds results produced with different settings."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistContext":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def init_distributed(device: str = "cpu") -> DistContext:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1; pins each rank to its local GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(_shutdown_distributed)
    return DistContext.from_env()


def _shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str, ctx: DistContext) -> str:
    """Under torchrun, a plain ``cuda`` means this rank's local GPU."""
    if ctx.world_size > 1 and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


class ResultCache:
    """Per-rank chunk files ``r{rank}-{seq}.pt`` plus ``fingerprint.json`` in one folder."""

    def __init__(self, directory: str | Path, fingerprint: dict, rank: int = 0) -> None:
        self.directory = Path(directory)
        self.rank = rank
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalise (tuples -> lists)
        self._seq = 0

    def open(self) -> dict[int, Record]:
        """Check the fingerprint (writing it on first use) and return every cached record."""
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = self.directory / "fingerprint.json"
        if stamp.is_file():
            saved = json.loads(stamp.read_text(encoding="utf-8"))
            if saved != self.fingerprint:
                changed = sorted(k for k in {*saved, *self.fingerprint} if saved.get(k) != self.fingerprint.get(k))
                raise ResumeMismatchError(
                    f"{self.directory} holds results of a run with different settings ({', '.join(changed)}); "
                    "delete it or choose another output folder"
                )
        elif self.rank == 0:
            self._atomic_write(stamp, json.dumps(self.fingerprint, indent=1).encode())
        records: dict[int, Record] = {}
        for chunk in sorted(self.directory.glob("r*-*.pt")):
            for record in torch.load(chunk, map_location="cpu", weights_only=True):
                records[record["image_id"]] = record
        own = [int(p.stem.split("-")[1]) for p in self.directory.glob(f"r{self.rank}-*.pt")]
        self._seq = max(own, default=-1) + 1
        return records

    def append(self, records: Sequence[Record]) -> None:
        if not records:
            return
        buffer = io.BytesIO()
        torch.save(list(records), buffer)
        self._atomic_write(self.directory / f"r{self.rank}-{self._seq:06d}.pt", buffer.getvalue())
        self._seq += 1

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers see a complete chunk or none


def to_record(image_id: int, det: Detections, fields: Sequence[str]) -> Record:
    """The parts of a ``Detections`` an evaluation keeps, on the CPU."""
    if det.error:
        raise WeDetectError(f"image {image_id} ({det.path}): {det.error}")
    record: Record = {"image_id": int(image_id), "image_size": [int(v) for v in det.image_size]}
    for name in fields:
        value = getattr(det, name)
        if value is None:
            raise WeDetectError(f"the model returned no '{name}' for image {image_id}")
        record[name] = value.detach().cpu()
    return record


def gather_to_main(records: list[Record], ctx: DistContext) -> list[Record] | None:
    """All ranks' records on rank 0 (None elsewhere); a gloo group keeps the transfer off the GPUs."""
    if ctx.world_size == 1:
        return records
    group = dist.new_group(backend="gloo")
    gathered: list | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(records, gathered, dst=0, group=group)
    if not ctx.is_main:
        return None
    return [record for part in gathered for record in part]  # type: ignore[union-attr]


def run_over_images(
    infer: Infer,
    images: Sequence[tuple[int, Path]],
    fields: Sequence[str],
    *,
    batch_size: int = 8,
    cache: ResultCache | None = None,
    ctx: DistContext = DistContext(),
    flush_every: int = 64,
    progress: bool = True,
) -> dict[int, Record] | None:
    """Results for every (image id, path), in the given order, on rank 0 (None on other ranks)."""
    if batch_size < 1:
        raise WeDetectError("batch size must be at least 1")
    done = cache.open() if cache is not None else {}
    if ctx.world_size > 1:
        dist.barrier()  # every rank shards the same snapshot of the cache, before any rank adds to it
    todo = [item for item in images if item[0] not in done][ctx.rank :: ctx.world_size]
    new: list[Record] = []
    unflushed: list[Record] = []
    bar = tqdm(total=len(todo), desc=f"rank {ctx.rank}" if ctx.world_size > 1 else "images", unit="img",
               disable=not progress or not ctx.is_main)  # fmt: skip
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        outputs = infer([path for _, path in batch])
        if len(outputs) != len(batch):
            raise WeDetectError(f"the model returned {len(outputs)} results for {len(batch)} images")
        records = [to_record(image_id, det, fields) for (image_id, _), det in zip(batch, outputs)]
        new.extend(records)
        unflushed.extend(records)
        if cache is not None and len(unflushed) >= flush_every:
            cache.append(unflushed)
            unflushed = []
        bar.update(len(batch))
    bar.close()
    if cache is not None:
        cache.append(unflushed)
    gathered = gather_to_main(new, ctx)
    if gathered is None:
        return None
    by_id = {**done, **{record["image_id"]: record for record in gathered}}
    missing = [image_id for image_id, _ in images if image_id not in by_id]
    if missing:
        raise WeDetectError(f"no results for {len(missing)} image(s), e.g. {missing[:5]}")
    return {image_id: by_id[image_id] for image_id, _ in images}


def check_image_sizes(records: dict[int, Record], dataset: CocoDataset) -> list[int]:
    """Image ids whose decoded size differs from the annotation's (boxes would not line up); warns."""
    expected = {image["id"]: [image.get("height"), image.get("width")] for image in dataset.images}
    mismatched = [
        image_id for image_id, record in records.items()
        if None not in expected[image_id] and record["image_size"] != expected[image_id]
    ]  # fmt: skip
    if mismatched:
        warnings.warn(
            f"{len(mismatched)} image(s) decode to a size other than the annotation's height/width "
            f"(e.g. {mismatched[:5]}); their boxes may not line up with the ground truth",
            stacklevel=2,
        )
    return mismatched


def records_to_coco(records: dict[int, Record], category_ids: Sequence[int]) -> list[dict]:
    """COCO results rows (``bbox`` xywh, ``category_id = category_ids[label]``)."""
    rows = []
    for image_id, record in records.items():
        det = Detections(record["boxes"], record["scores"], record["labels"])
        if len(det) and int(det.labels.max()) >= len(category_ids):
            raise WeDetectError(
                f"image {image_id}: label {int(det.labels.max())} has no category ({len(category_ids)} categories)"
            )
        rows.extend(det.to_coco(image_id, list(category_ids)))
    return rows


def records_to_proposals(records: dict[int, Record]) -> dict[int, np.ndarray]:
    """Ranked proposal boxes per image (the order the model returned them)."""
    return {image_id: record["boxes"].float().numpy() for image_id, record in records.items()}


def records_to_embeddings(records: dict[int, Record]) -> list[ImageEmbeddings]:
    return [
        ImageEmbeddings(
            image_id=image_id,
            embedding=record["embeddings"].float(),
            scale=record["logit_scale"].float(),
            bias=record["logit_bias"].float(),
            boxes=record["boxes"].float(),
            scores=record["scores"].float(),
        )
        for image_id, record in records.items()
    ]
