"""``wedetect eval``: detection AP, proposal recall and object retrieval with the official settings.

Each command either runs a model over an annotated dataset (batched; sharded when launched with
torchrun; resumable from ``<output-dir>/cache``) or scores results saved earlier
(``--detections`` / ``--proposals`` / ``--embeddings``). Rank 0 evaluates and writes the outputs.
"""
from __future__ import annotations

import hashlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from wedetect.errors import WeDetectError

app = typer.Typer(
    help="Evaluate on COCO / LVIS / PACO-format datasets with the official metrics.", no_args_is_help=True
)

DATASET_HELP = "COCO/LVIS-format annotation JSON."
IMAGES_HELP = "Image root folder (file_name, or the coco_url path for LVIS files, is resolved below it)."
TEXT_CHUNK = 80  # the official retrieval script embeds class names 80 at a time


@contextmanager
def _user_errors() -> Iterator[None]:
    """User-facing errors become a one-line message and exit code 1 (no traceback)."""
    try:
        yield
    except WeDetectError as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None


def _device(device: Optional[str]) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _emit_json(payload: dict, target: Optional[str]) -> None:
    if target is None:
        return
    text = json.dumps(payload, ensure_ascii=False, indent=2)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(target).write_text(text + "\n", encoding="utf-8")


def _say(message: str, json_out: Optional[str]) -> None:
    """Human-readable output, kept off stdout when stdout carries the JSON."""
    typer.echo(message, err=json_out == "-")


# Model loaders: seams that tests replace with fakes returning known results.
def _load_detector(checkpoint: Path, tokenizer: Optional[Path], size: Optional[str], device: str, dtype: str):
    from wedetect import WeDetect

    tokenizer = str(tokenizer) if tokenizer else None
    return WeDetect.from_pretrained(str(checkpoint), tokenizer=tokenizer, size=size, device=device, dtype=dtype)


def _load_uni(checkpoint: Path, size: Optional[str], device: str, dtype: str):
    from wedetect import WeDetectUni

    return WeDetectUni.from_pretrained(str(checkpoint), size=size, device=device, dtype=dtype)


def _class_names(path: Path) -> list[str]:
    """First string of each entry of a class file (what the official evaluation prompts with)."""
    from wedetect.data.classnames import load_class_names

    return [entry[0] for entry in load_class_names(path)]


def _digest(values: list) -> str:
    return hashlib.sha256(json.dumps(values, ensure_ascii=False).encode()).hexdigest()[:16]


def _require(**options) -> None:
    missing = [f"--{name.replace('_', '-')}" for name, value in options.items() if value is None]
    if missing:
        raise WeDetectError(f"{' and '.join(missing)} required to run the model (or pass saved results)")


def _output_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@app.command()
def detection(
    dataset: Path = typer.Option(..., "--dataset", help=DATASET_HELP),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="WeDetect detector checkpoint (.pth)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="XLM-RoBERTa tokenizer (file or folder)."),
    images: Optional[Path] = typer.Option(None, "--images", help=IMAGES_HELP),
    classes_file: Optional[Path] = typer.Option(
        None,
        "--classes-file",
        help="Class texts in the dataset's category order (official JSON list of lists, or one per line).",
    ),
    lvis: bool = typer.Option(False, "--lvis", help="LVIS AP (top 300 per image, federated, APr/c/f), not COCO AP."),
    detections: Optional[Path] = typer.Option(
        None, "--detections", help="Score this COCO results JSON instead of running a model."
    ),
    output_dir: Path = typer.Option(
        Path("eval_detection"), "--output-dir", help="Detections JSON, metrics and resume cache."
    ),
    score_thr: float = typer.Option(0.001, help="Keep detections scoring above this (official: 0.001)."),
    max_per_image: int = typer.Option(300, help="Detections kept per image (official: 300)."),
    blank_prompt: bool = typer.Option(False, help="Append the demo's blank ' ' prompt (official evaluation: no)."),
    batch_size: int = typer.Option(8, help="Images per forward pass."),
    resume: bool = typer.Option(True, help="Reuse results cached in <output-dir>/cache by an interrupted run."),
    size: Optional[str] = typer.Option(None, help="Model size tiny/base/large (default: from the checkpoint)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda when available)."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the metrics as JSON ('-' = stdout)."),
) -> None:
    """COCO AP (AP, AP50, AP75, APs/m/l) or LVIS AP (plus APr/c/f) of a detector on a dataset."""
    from wedetect.eval.dataset import CocoDataset, resolve_image_paths
    from wedetect.eval.detection import evaluate_detections, load_detections
    from wedetect.eval.runner import (
        DETECTION_FIELDS,
        ResultCache,
        check_image_sizes,
        init_distributed,
        rank_device,
        records_to_coco,
        run_over_images,
    )

    with _user_errors():
        data = CocoDataset.load(dataset)
        out = _output_dir(output_dir)
        if detections is not None:
            rows = load_detections(detections)
        else:
            _require(checkpoint=checkpoint, images=images, classes_file=classes_file)
            names = _class_names(classes_file)
            data.check_class_count(len(names), f"class file {classes_file}")
            paths = resolve_image_paths(data, images)
            ctx = init_distributed(_device(device))
            model = _load_detector(checkpoint, tokenizer, size, rank_device(_device(device), ctx), dtype)
            model.set_classes(names, blank=blank_prompt)

            def infer(batch: list[Path]):
                return model.predict(batch, threshold=score_thr, max_detections=max_per_image, batch_size=len(batch))

            fingerprint = {
                "task": "detection", "checkpoint": str(checkpoint.resolve()), "classes": _digest(names),
                "score_thr": score_thr, "max_per_image": max_per_image, "blank_prompt": blank_prompt,
                "size": size, "dtype": dtype,
            }  # fmt: skip
            cache = ResultCache(out / "cache", fingerprint, ctx.rank) if resume else None
            records = run_over_images(
                infer, list(paths.items()), DETECTION_FIELDS,
                batch_size=batch_size, cache=cache, ctx=ctx, progress=progress,
            )  # fmt: skip
            if records is None:  # not rank 0: the results went to rank 0
                return
            check_image_sizes(records, data)
            rows = records_to_coco(records, data.category_ids)
            (out / "detections.bbox.json").write_text(json.dumps(rows), encoding="utf-8")
        metrics = evaluate_detections(data, rows, lvis=lvis)
        (out / "metrics.json").write_text(json.dumps(metrics.to_dict(), indent=2) + "\n", encoding="utf-8")
        (out / "metrics.txt").write_text(metrics.table() + "\n", encoding="utf-8")
        _say(metrics.table(), json_out)
        _say(f"wrote {out}", json_out)
        _emit_json(metrics.to_dict(), json_out)


@app.command()
def recall(
    dataset: Path = typer.Option(..., "--dataset", help=DATASET_HELP),
    uni_checkpoint: Optional[Path] = typer.Option(None, "--uni-checkpoint", help="WeDetect-Uni checkpoint (.pth)."),
    images: Optional[Path] = typer.Option(None, "--images", help=IMAGES_HELP),
    mode: str = typer.Option("coco", help="GT rules: coco (drops crowd and ignore boxes), lvis or paco (drop ignore)."),
    proposals: Optional[Path] = typer.Option(
        None, "--proposals", help="Score these saved proposals (.npz) instead of running the model."
    ),
    compare: str = typer.Option(
        "float32", help="IoU >= threshold in float32 (NumPy 1.x behaviour, default) or float64 (NumPy 2)."
    ),
    drop_crowd: Optional[bool] = typer.Option(
        None, "--drop-crowd/--keep-crowd", help="Override the mode's crowd rule."
    ),
    drop_degenerate: bool = typer.Option(False, help="Also drop zero-width/height GT boxes (official: kept)."),
    output_dir: Path = typer.Option(Path("eval_recall"), "--output-dir", help="Proposals, metrics and resume cache."),
    num_proposals: int = typer.Option(300, help="Proposals kept per image (official: 300)."),
    batch_size: int = typer.Option(8, help="Images per forward pass."),
    resume: bool = typer.Option(True, help="Reuse results cached in <output-dir>/cache by an interrupted run."),
    size: Optional[str] = typer.Option(None, help="Model size (default: from the checkpoint)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda when available)."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the metrics as JSON ('-' = stdout)."),
) -> None:
    """Proposal recall (AR@100, AR@300 over IoU 0.50:0.95) of WeDetect-Uni, as the official script."""
    from wedetect.eval.dataset import CocoDataset, resolve_image_paths
    from wedetect.eval.recall import load_proposals, proposal_recall, save_proposals
    from wedetect.eval.runner import ResultCache, init_distributed, rank_device, records_to_proposals, run_over_images

    with _user_errors():
        if mode not in ("coco", "lvis", "paco"):
            raise typer.BadParameter("--mode must be coco, lvis or paco")
        if compare not in ("float32", "float64"):
            raise typer.BadParameter("--compare must be float32 or float64")
        data = CocoDataset.load(dataset)
        out = _output_dir(output_dir)
        if proposals is not None:
            boxes = load_proposals(proposals)
        else:
            _require(uni_checkpoint=uni_checkpoint, images=images)
            paths = resolve_image_paths(data, images)
            ctx = init_distributed(_device(device))
            uni = _load_uni(uni_checkpoint, size, rank_device(_device(device), ctx), dtype)

            def infer(batch: list[Path]):
                return uni.propose(batch, num_proposals=num_proposals, score_threshold=0.0, batch_size=len(batch))

            fingerprint = {"task": "recall", "checkpoint": str(uni_checkpoint.resolve()),
                           "num_proposals": num_proposals, "size": size, "dtype": dtype}  # fmt: skip
            cache = ResultCache(out / "cache", fingerprint, ctx.rank) if resume else None
            records = run_over_images(
                infer, list(paths.items()), ("boxes", "scores"),
                batch_size=batch_size, cache=cache, ctx=ctx, progress=progress,
            )  # fmt: skip
            if records is None:
                return
            boxes = records_to_proposals(records)
            save_proposals(out / "proposals.npz", boxes, {i: r["scores"].numpy() for i, r in records.items()})
        result = proposal_recall(
            data, boxes, mode, compare=compare, drop_crowd=drop_crowd, drop_degenerate=drop_degenerate
        )
        payload = {"mode": mode, "compare": compare, **result.to_dict()}
        (out / "recall.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        (out / "recall.txt").write_text(result.table() + "\n", encoding="utf-8")
        _say(f"Evaluating {mode} ...\n{result.table()}", json_out)
        _emit_json(payload, json_out)


@app.command()
def retrieval(
    dataset: Path = typer.Option(..., "--dataset", help=DATASET_HELP),
    uni_checkpoint: Optional[Path] = typer.Option(None, "--uni-checkpoint", help="WeDetect-Uni checkpoint (.pth)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="WeDetect detector checkpoint (its text tower)."
    ),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="XLM-RoBERTa tokenizer (file or folder)."),
    images: Optional[Path] = typer.Option(None, "--images", help=IMAGES_HELP),
    classes_file: Optional[Path] = typer.Option(
        None,
        "--classes-file",
        help="Class texts to embed, in the dataset's category order (first string of each entry).",
    ),
    mode: str = typer.Option("coco", help="Relevance rules: coco (every annotation) or lvis (area > 0)."),
    threshold: float = typer.Option(
        0.3, help="Retrieve an image when its best score is above this (official default 0.3; README 0.2)."
    ),
    scoring: str = typer.Option(
        "wedetect", help="wedetect: sigmoid(exp(scale)*<e,t>+bias); raw: sigmoid(<e,t>) (official 'hqclip')."
    ),
    embeddings: Optional[Path] = typer.Option(
        None,
        "--embeddings",
        help="Saved embeddings (.npz, or the official {dataset}_{model}.pth) instead of running WeDetect-Uni.",
    ),
    skip_empty: bool = typer.Option(False, help="Let images without proposals retrieve nothing (default: error)."),
    output_dir: Path = typer.Option(
        Path("eval_retrieval"), "--output-dir", help="Embeddings, metrics and resume cache."
    ),
    num_proposals: int = typer.Option(300, help="Proposals kept per image (official: 300)."),
    batch_size: int = typer.Option(8, help="Images per forward pass."),
    resume: bool = typer.Option(True, help="Reuse results cached in <output-dir>/cache by an interrupted run."),
    size: Optional[str] = typer.Option(None, help="WeDetect-Uni size (default: from the checkpoint)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda when available)."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the metrics as JSON ('-' = stdout)."),
) -> None:
    """Object retrieval: per-class and macro precision / recall / F1 of retrieved image sets."""
    import torch

    from wedetect.eval.dataset import CocoDataset, resolve_image_paths
    from wedetect.eval.retrieval import evaluate_object_retrieval, load_embeddings, save_embeddings
    from wedetect.eval.runner import (
        PROPOSAL_FIELDS,
        ResultCache,
        init_distributed,
        rank_device,
        records_to_embeddings,
        run_over_images,
    )

    with _user_errors():
        if mode not in ("coco", "lvis"):
            raise typer.BadParameter("--mode must be coco or lvis")
        if scoring not in ("wedetect", "raw"):
            raise typer.BadParameter("--scoring must be wedetect or raw")
        data = CocoDataset.load(dataset)
        out = _output_dir(output_dir)
        text = None
        if embeddings is not None:
            image_embeddings, text = load_embeddings(embeddings)
        else:
            _require(uni_checkpoint=uni_checkpoint, images=images)
            paths = resolve_image_paths(data, images)
            ctx = init_distributed(_device(device))
            uni = _load_uni(uni_checkpoint, size, rank_device(_device(device), ctx), dtype)

            def infer(batch: list[Path]):
                return uni.propose(batch, num_proposals=num_proposals, score_threshold=0.0, batch_size=len(batch))

            fingerprint = {"task": "retrieval", "checkpoint": str(uni_checkpoint.resolve()),
                           "num_proposals": num_proposals, "size": size, "dtype": dtype}  # fmt: skip
            cache = ResultCache(out / "cache", fingerprint, ctx.rank) if resume else None
            records = run_over_images(
                infer, list(paths.items()), PROPOSAL_FIELDS,
                batch_size=batch_size, cache=cache, ctx=ctx, progress=progress,
            )  # fmt: skip
            if records is None:
                return
            image_embeddings = records_to_embeddings(records)
        if checkpoint is not None or text is None:
            _require(checkpoint=checkpoint, classes_file=classes_file)
            names = _class_names(classes_file)
            data.check_class_count(len(names), f"class file {classes_file}")
            encoder = _load_detector(checkpoint, tokenizer, None, _device(device), "float32")
            text = torch.cat([encoder.encode_text(names[i : i + TEXT_CHUNK]) for i in range(0, len(names), TEXT_CHUNK)])
            text = torch.nn.functional.normalize(text.float().cpu(), dim=-1)
        if embeddings is None:
            save_embeddings(out / "embeddings.npz", image_embeddings, text)
        result, predicted = evaluate_object_retrieval(
            data, image_embeddings, text, mode=mode, threshold=threshold, scoring=scoring, skip_empty=skip_empty
        )
        payload = {
            "mode": mode, "threshold": threshold, "scoring": scoring, **result.to_dict(),
            "predicted_images": {name: sorted(ids) for name, ids in predicted.items()},
        }  # fmt: skip
        (out / "retrieval.json").write_text(json.dumps(payload, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        (out / "retrieval.txt").write_text(result.table() + "\n", encoding="utf-8")
        _say(f"threshold {threshold} ({scoring} scoring, {mode} relevance)\n{result.table()}", json_out)
        _emit_json(payload, json_out)
