"""``wedetect index``: build a persistent WeDetect-Uni object index and search it by text."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from wedetect.errors import WeDetectError

app = typer.Typer(
    help="Object index: extract WeDetect-Uni proposals once, then find objects by text without the images.",
    no_args_is_help=True,
)

# Collections with at least this many proposals get an IVF-PQ index after `add` (below it,
# exact search is fast enough and exactly reproduces the official ranking).
ANN_MIN_PROPOSALS = 1_000_000


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn user-facing errors into a one-line message and exit code 1 (no traceback)."""
    try:
        yield
    except WeDetectError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None


def _device(device: Optional[str]) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _emit_json(payload, target: Optional[str]) -> None:
    if target is None:
        return
    text = json.dumps(payload, ensure_ascii=False, indent=2)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(target).write_text(text + "\n", encoding="utf-8")


def _load_uni(checkpoint: Path, size: Optional[int], device: str, dtype: str):
    """The proposal generator (a seam for tests: they substitute a fake proposer)."""
    from wedetect import WeDetectUni

    return WeDetectUni.from_pretrained(str(checkpoint), size=size, device=device, dtype=dtype)


def _text_encoder(checkpoint: Path, tokenizer: Optional[Path], device: str, dtype: str):
    from wedetect.index.search import wedetect_text_encoder

    return wedetect_text_encoder(checkpoint, tokenizer, device=device, dtype=dtype)


@app.command()
def add(
    uni_checkpoint: Path = typer.Option(..., "--uni-checkpoint", help="WeDetect-Uni checkpoint (.pth)."),
    index: str = typer.Option(..., "--index", help="Index directory (LanceDB) or Milvus URI (*.db file, http://host:19530)."),
    images: str = typer.Option(..., "--images", help="Image file, folder, glob or .txt list of paths."),
    backend: str = typer.Option("auto", help="lancedb, milvus or auto (by the --index form)."),
    size: Optional[int] = typer.Option(None, help="Network input size (default: the checkpoint's)."),
    num_proposals: int = typer.Option(300, help="Proposals kept per image (official: 300)."),
    score_threshold: float = typer.Option(0.0, help="Drop proposals scoring at or below this (official: 0)."),
    batch_size: int = typer.Option(8, help="Images per forward pass."),
    commit_every: int = typer.Option(256, help="Images per commit: the most a crash can lose."),
    workers: int = typer.Option(4, help="Threads reading and hashing images ahead of the model."),
    retry_failed: bool = typer.Option(False, help="Retry images recorded as unreadable by earlier runs."),
    staging_dir: Optional[Path] = typer.Option(None, help="Per-rank parts under torchrun (default <index>.parts)."),
    ann: Optional[bool] = typer.Option(
        None, "--ann/--no-ann", help=f"Build an IVF-PQ index (default: when >= {ANN_MIN_PROPOSALS:,} proposals)."
    ),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda when available)."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the run report as JSON ('-' = stdout)."),
) -> None:
    """Add images to the index (incremental and resumable: indexed images are skipped)."""
    from wedetect.index.build import ExtractionSettings, build_index, checkpoint_identity
    from wedetect.index.store import open_store

    with _user_errors():
        settings = ExtractionSettings(
            num_proposals=num_proposals,
            score_threshold=score_threshold,
            batch_size=batch_size,
            commit_every=commit_every,
            workers=workers,
            retry_failed=retry_failed,
        )
        model = checkpoint_identity(uni_checkpoint, settings, size)
        proposer = _load_uni(uni_checkpoint, size, _device(device), dtype)
        report = build_index(
            index, images, proposer, model=model, settings=settings, backend=backend, progress=progress, staging_dir=staging_dir
        )
        if int(os.environ.get("RANK", "0")) != 0:
            return
        store = open_store(index, backend=backend)
        built = None
        wants_ann = ann if ann is not None else store.count_proposals() >= ANN_MIN_PROPOSALS
        if wants_ann and not getattr(store, "has_ann_index", lambda: False)():
            built = store.build_ann_index()
        payload = report.to_dict() | {"ann_index": built}
        if json_out != "-":
            typer.echo(
                f"indexed {report.added} new and {report.replaced} changed images ({report.proposals} proposals) "
                f"in {report.seconds:.1f} s ({report.images_per_second:.2f} img/s); skipped {report.skipped} "
                f"already indexed; {len(report.failed)} failed"
            )
            for path, reason in report.failed:
                typer.echo(f"  failed: {path}: {reason}")
            if report.previously_failed:
                typer.echo(f"  {report.previously_failed} images failed in earlier runs (use --retry-failed)")
            if built:
                typer.echo(f"built ANN index: {built}")
        _emit_json(payload, json_out)


@app.command()
def search(
    index: str = typer.Option(..., "--index", help="Index directory or Milvus URI."),
    text: List[str] = typer.Option([], "--text", help="Query text; repeat for several queries."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="More queries, one per line."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="WeDetect detector .pth (its text tower)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="XLM-RoBERTa tokenizer folder."),
    top_k: int = typer.Option(20, "--top-k", help="Objects (or images) per query."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Keep scores > this (official decision)."),
    per_image: bool = typer.Option(False, "--per-image", help="Rank images by their best object."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Save crops (or annotated images with --per-image)."),
    exact: Optional[bool] = typer.Option(None, "--exact/--ann", help="Force exact or ANN search (default: ANN if built)."),
    nprobes: int = typer.Option(32, help="ANN: IVF partitions probed."),
    refine_factor: int = typer.Option(10, help="ANN: candidates re-ranked exactly, as a multiple of top-k."),
    backend: str = typer.Option("auto", help="lancedb, milvus or auto."),
    device: Optional[str] = typer.Option(None, help="Device of the text tower and exact search."),
    dtype: str = typer.Option("float32", help="Text tower dtype."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write results as JSON ('-' = stdout)."),
) -> None:
    """Find objects by text: ranked (image, box, score) with the official retrieval probability."""
    from wedetect.index.search import ObjectIndex, save_visuals

    with _user_errors():
        queries = list(text)
        if text_file is not None:
            if not text_file.is_file():
                raise WeDetectError(f"--text-file {text_file}: no such file")
            queries += [ln.strip() for ln in text_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not queries or any(not q.strip() for q in queries):
            raise WeDetectError("give at least one non-empty --text (or --text-file)")
        if checkpoint is None:
            raise WeDetectError("--checkpoint (the WeDetect detector whose text tower embeds the queries) is required")
        dev = _device(device)
        idx = ObjectIndex.open(index, backend=backend, device=dev)
        encoder = _text_encoder(checkpoint, tokenizer, dev, dtype)
        ann = {"nprobes": nprobes, "refine_factor": refine_factor}
        results = idx.search(queries, encoder, top_k=top_k, min_score=min_score, per_image=per_image, exact=exact, **ann)
        if output_dir is not None:
            save_visuals(results, output_dir, annotate=per_image)
        if json_out != "-":
            for res in results:
                typer.echo(f"{res.query}: {len(res.hits)} {'images' if per_image else 'objects'}")
                for rank, h in enumerate(res.hits, 1):
                    box = ", ".join(f"{v:.1f}" for v in h.box)
                    typer.echo(f"  {rank:3d}. {h.score:.4f}  [{box}]  {h.path}")
        _emit_json([r.to_dict() for r in results], json_out)


@app.command()
def info(
    index: str = typer.Option(..., "--index", help="Index directory or Milvus URI."),
    backend: str = typer.Option("auto", help="lancedb, milvus or auto."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the summary as JSON ('-' = stdout)."),
) -> None:
    """Summarise an index: images, proposals, failures, model identity, ANN index."""
    from wedetect.index.search import ObjectIndex

    with _user_errors():
        summary = ObjectIndex.open(index, backend=backend).info()
        if json_out != "-":
            model = summary["model"]
            typer.echo(
                f"{summary['location']}: {summary['images']} images, {summary['proposals']} proposals, "
                f"{len(summary['failed'])} failed; model {model.get('name')} (sha256 {str(model.get('sha256'))[:12]}), "
                f"{summary['embed_dim']}-d embeddings; ANN index: {'yes' if summary['ann_index'] else 'no'}"
            )
            for f in summary["failed"]:
                typer.echo(f"  failed: {f['path']}: {f['reason']}")
        _emit_json(summary, json_out)
