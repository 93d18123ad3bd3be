"""``wedetect index``: build a persistent WeDetect-Uni object index and search it by text."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import WeDetectError
from ..index.store import (
    ANN_METRICS,
    DEFAULT_ANN_METRIC,
    DEFAULT_NPROBES,
    DEFAULT_REFINE_FACTOR,
    FAISS_NPROBES,
    FAISS_REFINE_FACTOR,
)
from .common import (
    BatchSize,
    ChannelsLast,
    Checkpoint,
    Compile,
    Device,
    DeviceLetterbox,
    Dtype,
    Images,
    JsonOut,
    OutputDir,
    Overlap,
    Size,
    Tokenizer,
    UniCheckpoint,
    check_compile_mode,
    emit_json,
    user_errors,
)
from .common import info as say

app = typer.Typer(
    help="Object index: extract WeDetect-Uni proposals once, then find objects by text without the images.",
    no_args_is_help=True,
)

# Collections with at least this many proposals get an IVF index after `add` (below it,
# exact search is fast enough and exactly reproduces the official ranking).
ANN_MIN_PROPOSALS = 1_000_000

Index = typer.Option(..., "--index", help="Index directory (LanceDB) or Milvus URI (*.db file, http://host:19530).")
Backend = typer.Option("auto", "--backend", help="lancedb, milvus or auto (by the --index form).")


def _device(device: str) -> str:
    from ..inference import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per torchrun rank
    return str(dev)


def _load_uni(checkpoint: str, size: Optional[str], device: str, dtype: str, **speed):
    """The proposal generator with the speed options ``speed`` (``WeDetectUni.accelerate``'s keywords);
    a seam for tests: they substitute a fake proposer."""
    from .. import WeDetectUni

    return WeDetectUni.from_pretrained(checkpoint, size=size, device=device, dtype=dtype).accelerate(**speed)


def _text_encoder(checkpoint: str, tokenizer: Optional[str], device: str, dtype: str):
    from ..index.search import wedetect_text_encoder

    return wedetect_text_encoder(checkpoint, tokenizer, device=device, dtype=dtype)


@app.command()
def add(
    uni_checkpoint: UniCheckpoint,
    images: Images,
    index: str = Index,
    backend: str = Backend,
    size: Size = None,
    num_proposals: int = typer.Option(300, "--num-proposals", min=1, help="Proposals kept per image (official: 300)."),
    score_threshold: float = typer.Option(0.0, "--score-threshold", help="Drop proposals scoring at or below this."),
    batch_size: BatchSize = 8,
    commit_every: int = typer.Option(
        256, "--commit-every", min=1, help="Images per commit: the most a crash can lose."
    ),
    workers: int = typer.Option(4, "--workers", min=1, help="Threads reading and hashing images ahead of the model."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry images recorded as unreadable earlier."),
    staging_dir: Optional[Path] = typer.Option(
        None, "--staging-dir", help="Per-rank parts under torchrun (default <index>.parts)."
    ),
    ann: Optional[bool] = typer.Option(
        None,
        "--ann/--no-ann",
        help=f"(Re)build the ANN (IVF) index (default: build one when >= {ANN_MIN_PROPOSALS:,} proposals and none exists).",
    ),
    ann_type: Optional[str] = typer.Option(
        None,
        "--ann-type",
        help="FAISS_IVF_SQ8 (default for local indexes: cosine cells, 8-bit codes ranked by the logit) or a "
        "LanceDB type: IVF_RQ (default elsewhere), IVF_PQ, IVF_SQ, IVF_FLAT, IVF_HNSW_SQ.",
    ),
    ann_metric: str = typer.Option(
        DEFAULT_ANN_METRIC,
        "--ann-metric",
        help=f"IVF partitions by {', '.join(ANN_METRICS)} (cosine: direction); hits are always ranked exactly.",
    ),
    ann_partitions: Optional[int] = typer.Option(
        None, "--ann-partitions", min=1, help="IVF partitions (default: one per ~8k proposals)."
    ),
    device: Device = "auto",
    dtype: Dtype = "float32",
    compile: Compile = None,
    channels_last: ChannelsLast = False,
    device_letterbox: DeviceLetterbox = False,
    overlap: Overlap = False,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    json_out: JsonOut = None,
) -> None:
    """Add images to the index (incremental and resumable: indexed images are skipped)."""
    from ..index.build import ExtractionSettings, build_index, checkpoint_identity
    from ..index.store import open_store

    with user_errors():
        check_compile_mode(compile)
        settings = ExtractionSettings(
            num_proposals=num_proposals,
            score_threshold=score_threshold,
            batch_size=batch_size,
            commit_every=commit_every,
            workers=workers,
            retry_failed=retry_failed,
        )
        model = checkpoint_identity(uni_checkpoint, settings, size)
        dev = _device(device)
        proposer = _load_uni(uni_checkpoint, size, dev, dtype, channels_last=channels_last, compile=compile,
                             device_letterbox=device_letterbox, overlap=overlap)
        report = build_index(
            index,
            images,
            proposer,
            model=model,
            settings=settings,
            backend=backend,
            progress=progress,
            staging_dir=staging_dir,
        )
        if int(os.environ.get("RANK", "0")) != 0:
            return
        store = open_store(index, backend=backend, device=dev)
        built = None
        auto_ann = ann is None and store.count_proposals() >= ANN_MIN_PROPOSALS and not store.has_ann_index()
        if ann or auto_ann:
            built = store.build_ann_index(
                index_type=ann_type, metric=ann_metric, num_partitions=ann_partitions, progress=progress
            )
        payload = report.to_dict() | {"ann_index": built}
        emit_json(payload, json_out)
        say(
            f"indexed {report.added} new and {report.replaced} changed images ({report.proposals} proposals) "
            f"in {report.seconds:.1f} s ({report.images_per_second:.2f} img/s); skipped {report.skipped} "
            f"already indexed; {len(report.failed)} failed",
            json_out,
        )
        for path, reason in report.failed:
            say(f"  failed: {path}: {reason}", json_out)
        if report.previously_failed:
            say(f"  {report.previously_failed} images failed in earlier runs (use --retry-failed)", json_out)
        if built:
            say(f"built ANN index: {built}", json_out)


@app.command()
def search(
    checkpoint: Checkpoint,
    index: str = Index,
    text: List[str] = typer.Option([], "--text", help="Query text; repeat for several queries."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="More queries, one per line."),
    tokenizer: Tokenizer = None,
    top_k: int = typer.Option(20, "--top-k", min=1, help="Objects (or images) per query."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Keep scores > this (the official decision)."),
    per_image: bool = typer.Option(False, "--per-image", help="Rank images by their best object."),
    output_dir: OutputDir = None,
    exact: Optional[bool] = typer.Option(
        None, "--exact/--ann", help="Force exact or ANN search (default: ANN if built)."
    ),
    nprobes: Optional[int] = typer.Option(
        None, "--nprobes", min=1,
        help=f"ANN: IVF partitions probed (default {FAISS_NPROBES} with FAISS_IVF_SQ8, {DEFAULT_NPROBES} with LanceDB/Milvus).",
    ),
    refine_factor: Optional[int] = typer.Option(
        None, "--refine-factor", min=1,
        help=f"ANN: top-k multiple re-ranked exactly (default {FAISS_REFINE_FACTOR} with FAISS_IVF_SQ8, "
        f"{DEFAULT_REFINE_FACTOR} otherwise).",
    ),
    exact_rerank: Optional[int] = typer.Option(
        None, "--exact-rerank", min=1,
        help="ANN (LanceDB IVF types): pre-select this many times more rows by their codes and re-rank them on exact "
        "vectors before the --refine-factor cut (default 1: off).",
    ),
    backend: str = Backend,
    device: Device = "auto",
    dtype: Dtype = "float32",
    json_out: JsonOut = None,
) -> None:
    """Find objects by text: ranked (image, box, score) with the official retrieval probability.

    With --output-dir, crops of the objects (or, with --per-image, the images with the box drawn)."""
    from ..index.search import ObjectIndex, save_visuals

    with user_errors():
        queries = list(text)
        if text_file is not None:
            if not text_file.is_file():
                raise WeDetectError(f"--text-file {text_file}: no such file")
            queries += [ln.strip() for ln in text_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not queries or any(not q.strip() for q in queries):
            raise WeDetectError("give at least one non-empty --text (or --text-file)")
        dev = _device(device)
        idx = ObjectIndex.open(index, backend=backend, device=dev)
        encoder = _text_encoder(checkpoint, tokenizer, dev, dtype)
        ann = {"nprobes": nprobes, "refine_factor": refine_factor, "exact_rerank": exact_rerank}
        results = idx.search(
            queries, encoder, top_k=top_k, min_score=min_score, per_image=per_image, exact=exact, **ann
        )
        if output_dir is not None:
            save_visuals(results, output_dir, annotate=per_image)
        emit_json([r.to_dict() for r in results], json_out)
        for res in results:
            say(f"{res.query}: {len(res.hits)} {'images' if per_image else 'objects'}", json_out)
            for rank, h in enumerate(res.hits, 1):
                box = ", ".join(f"{v:.1f}" for v in h.box)
                say(f"  {rank:3d}. {h.score:.4f}  [{box}]  {h.path}", json_out)


@app.command()
def info(index: str = Index, backend: str = Backend, json_out: JsonOut = None) -> None:
    """Summarise an index: images, proposals, failures, model identity, ANN index."""
    from ..index.search import ObjectIndex

    with user_errors():
        summary = ObjectIndex.open(index, backend=backend).info()
        emit_json(summary, json_out)
        model = summary["model"]
        say(
            f"{summary['location']}: {summary['images']} images, {summary['proposals']} proposals, "
            f"{len(summary['failed'])} failed; model {model.get('name')} (sha256 {str(model.get('sha256'))[:12]}), "
            f"{summary['embed_dim']}-d embeddings; ANN index: {summary['ann_index'] or 'none (exact search)'}",
            json_out,
        )
        if details := summary["ann_index_details"]:
            say("  ANN index: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in details.items()), json_out)
        for f in summary["failed"]:
            say(f"  failed: {f['path']}: {f['reason']}", json_out)
