"""``wedetect eval``: detection AP, proposal recall and object retrieval with the official settings.

Each command either runs a model over an annotated dataset (batched; sharded when launched with
torchrun; resumable from ``<output-dir>/cache``) or scores results saved earlier
(``--detections`` / ``--proposals`` / ``--embeddings``). Rank 0 evaluates and writes the outputs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from wedetect.errors import WeDetectError

from .common import (
    BatchSize,
    Checkpoint,
    ClassesFile,
    Device,
    Dtype,
    JsonOut,
    OutputDir,
    Quiet,
    Size,
    Tokenizer,
    UniCheckpoint,
    emit_json,
    info,
    user_errors,
)

app = typer.Typer(
    help="Evaluate on COCO / LVIS / PACO-format datasets with the official metrics.", no_args_is_help=True
)

Dataset = Annotated[Path, typer.Option("--dataset", help="COCO/LVIS-format annotation JSON.")]
ImageRoot = Annotated[
    Optional[Path],
    typer.Option("--images", help="Image root folder (file_name, or the coco_url path of LVIS files, below it)."),
]
Resume = Annotated[bool, typer.Option(help="Reuse the results cached in <output-dir>/cache by an interrupted run.")]
TEXT_CHUNK = 80  # the official retrieval script embeds class names 80 at a time
RETRIEVAL_CLASSES = {"coco": "retrieval_coco_zh", "lvis": "retrieval_lvis_zh"}  # built-in lists, per --mode


# Model loaders: seams that tests replace with fakes returning known results.
def _load_detector(checkpoint: str, tokenizer: Optional[str], size: Optional[str], device: str, dtype: str):
    from wedetect import WeDetect

    return WeDetect.from_pretrained(checkpoint, tokenizer=tokenizer, size=size, device=device, dtype=dtype)


def _load_uni(checkpoint: str, size: Optional[str], device: str, dtype: str):
    from wedetect import WeDetectUni

    return WeDetectUni.from_pretrained(checkpoint, size=size, device=device, dtype=dtype)


def _start(device: str):
    """Join the torchrun job (if any) and pick this rank's device: (DistContext, device string)."""
    from wedetect.eval.runner import init_distributed, rank_device
    from wedetect.inference import resolve_device

    resolved = str(resolve_device(device))
    ctx = init_distributed(resolved)
    return ctx, rank_device(resolved, ctx)


def _class_names(path: Path | str) -> list[str]:
    """First string of each entry of a class file or built-in list (what the official evaluation prompts with)."""
    from wedetect.data.classnames import load_class_names

    return [entry[0] for entry in load_class_names(path)]


def _retrieval_class_names(classes_file: Optional[Path], mode: str) -> tuple[list[str], str]:
    """Retrieval text rows and where they came from: --classes-file, else the Chinese list hard-coded
    in the official retrieval script for --mode (which differs from lvis_zh at 34 LVIS classes)."""
    source = str(classes_file) if classes_file is not None else RETRIEVAL_CLASSES[mode]
    return _class_names(source), source


def _digest(values: list) -> str:
    return hashlib.sha256(json.dumps(values, ensure_ascii=False).encode()).hexdigest()[:16]


def _require(**options) -> None:
    missing = [f"--{name.replace('_', '-')}" for name, value in options.items() if value is None]
    if missing:
        raise WeDetectError(f"{' and '.join(missing)} required to run the model (or pass saved results)")


def _fingerprint(task: str, checkpoint: str, **settings) -> dict:
    """What must not change between a run and its resumption."""
    return {"task": task, "checkpoint": str(Path(checkpoint).resolve()), **settings}


def _write(out: Path, stem: str, payload: dict, table: str) -> None:
    emit_json(payload, str(out / f"{stem}.json"))
    (out / f"{stem}.txt").write_text(table + "\n", encoding="utf-8")


def _propose_over_dataset(data, images: Path, uni_checkpoint: str, what: str, fields: tuple, num_proposals: int,
                          size: Optional[str], device: str, dtype: str, output_dir: Path, resume: bool,
                          batch_size: int, quiet: bool):
    """Run WeDetect-Uni over the dataset's images (sharded under torchrun, resumable from
    ``<output-dir>/cache``); returns (records, this rank's device), records None off rank 0."""
    from wedetect.eval.dataset import resolve_image_paths
    from wedetect.eval.runner import ResultCache, run_over_images

    paths = resolve_image_paths(data, images)
    ctx, rank_device = _start(device)
    uni = _load_uni(uni_checkpoint, size, rank_device, dtype)

    def infer(batch: list[Path]):
        return uni.propose(batch, num_proposals=num_proposals, score_threshold=0.0, batch_size=len(batch))

    fingerprint = _fingerprint(what, uni_checkpoint, num_proposals=num_proposals, size=size, dtype=dtype)
    records = run_over_images(
        infer, list(paths.items()), fields, batch_size=batch_size,
        cache=ResultCache(output_dir / "cache", fingerprint, ctx.rank) if resume else None,
        ctx=ctx, progress=not quiet,
    )  # fmt: skip
    return records, rank_device


@app.command()
def detection(
    dataset: Dataset,
    checkpoint: Checkpoint = None,
    tokenizer: Tokenizer = None,
    images: ImageRoot = None,
    classes_file: ClassesFile = None,
    lvis: bool = typer.Option(False, "--lvis", help="LVIS AP (top 300 per image, federated, APr/c/f), not COCO AP."),
    detections: Optional[Path] = typer.Option(
        None, "--detections", help="Score this COCO results JSON instead of running a model."
    ),
    output_dir: OutputDir = Path("eval_detection"),
    score_thr: float = typer.Option(0.001, "--score-thr", help="Keep detections scoring above this (official: 0.001)."),
    max_per_image: int = typer.Option(300, "--max-per-image", min=1, help="Detections kept per image (official: 300)."),
    blank_prompt: bool = typer.Option(False, help="Append the demo's blank ' ' prompt (official evaluation: no)."),
    resume: Resume = True,
    size: Size = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    batch_size: BatchSize = 8,
    quiet: Quiet = False,
    json_out: JsonOut = None,
) -> None:
    """COCO AP (AP, AP50, AP75, APs/m/l) or LVIS AP (plus APr/c/f) of the detector on a dataset.

    All class names of --classes-file (first string of each entry, in the dataset's category order)
    are prompted at once; label k is the k-th category of the annotation file. A closed-set checkpoint
    (from closed-set finetuning) needs no class file: its classifier rows are the categories, in order.
    """
    from wedetect.eval.dataset import CocoDataset, resolve_image_paths
    from wedetect.eval.detection import evaluate_detections, load_detections
    from wedetect.eval.runner import (
        DETECTION_FIELDS,
        ResultCache,
        check_image_sizes,
        records_to_coco,
        run_over_images,
    )

    with user_errors():
        data = CocoDataset.load(dataset)
        output_dir.mkdir(parents=True, exist_ok=True)
        if detections is not None:
            rows = load_detections(detections)
        else:
            _require(checkpoint=checkpoint, images=images)
            paths = resolve_image_paths(data, images)
            ctx, rank_device = _start(device)
            model = _load_detector(checkpoint, tokenizer, size, rank_device, dtype)
            if getattr(model, "is_closed_set", False):  # its classifier rows are the dataset's categories
                names = model.class_names
                data.check_class_count(len(names), f"closed-set checkpoint {checkpoint}")
                if classes_file is not None:  # only names for the report; the count must still agree
                    given = _class_names(classes_file)
                    if len(given) != len(names):
                        raise WeDetectError(f"class file {classes_file} has {len(given)} classes, the closed-set "
                                            f"checkpoint {checkpoint} {len(names)}")
                    names = given
            else:
                if classes_file is None:
                    raise WeDetectError("--classes-file required: the checkpoint is open-vocabulary "
                                        "(only a closed-set checkpoint brings its own classes)")
                names = _class_names(classes_file)
                data.check_class_count(len(names), f"class file {classes_file}")
                with warnings.catch_warnings():  # repeated names are distinct categories here (LVIS has some)
                    warnings.simplefilter("ignore")
                    model.set_classes(names, blank=blank_prompt)
            # The model's own post-processing applies these before `predict` sees the detections.
            model.postprocess_cfg = dataclasses.replace(
                model.postprocess_cfg, score_thr=score_thr, max_per_img=max_per_image
            )

            def infer(batch: list[Path]):
                return model.predict(batch, threshold=score_thr, max_detections=max_per_image, batch_size=len(batch))

            settings = dict(classes=_digest(names), score_thr=score_thr, max_per_image=max_per_image,
                            blank_prompt=blank_prompt, size=size, dtype=dtype)  # fmt: skip
            cache = ResultCache(output_dir / "cache", _fingerprint("detection", checkpoint, **settings), ctx.rank)
            records = run_over_images(
                infer, list(paths.items()), DETECTION_FIELDS,
                batch_size=batch_size, cache=cache if resume else None, ctx=ctx, progress=not quiet,
            )  # fmt: skip
            if records is None:  # not rank 0: the results went to rank 0
                return
            check_image_sizes(records, data)
            rows = records_to_coco(records, data.category_ids)
            emit_json(rows, str(output_dir / "detections.bbox.json"))
        metrics = evaluate_detections(data, rows, lvis=lvis)
        _write(output_dir, "metrics", metrics.to_dict(), metrics.table())
        info(f"{metrics.table()}\nresults in {output_dir}", json_out)
        emit_json(metrics.to_dict(), json_out)


@app.command()
def recall(
    dataset: Dataset,
    uni_checkpoint: UniCheckpoint = None,
    images: ImageRoot = None,
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
    matching: str = typer.Option(
        "greedy",
        help="GT-proposal matching: greedy max-IoU (official) or optimal (maximum one-to-one matching per "
        "IoU threshold, needs SciPy; never below greedy).",
    ),
    num_proposals: int = typer.Option(300, "--num-proposals", min=1, help="Proposals per image (official: 300)."),
    output_dir: OutputDir = Path("eval_recall"),
    resume: Resume = True,
    size: Size = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    batch_size: BatchSize = 8,
    quiet: Quiet = False,
    json_out: JsonOut = None,
) -> None:
    """Proposal recall of WeDetect-Uni (recall at IoU 0.50:0.95 and AR for the top 100 / 300), as official."""
    from wedetect.eval.dataset import CocoDataset
    from wedetect.eval.recall import load_proposals, proposal_recall, save_proposals
    from wedetect.eval.runner import records_to_proposals

    with user_errors():
        if mode not in ("coco", "lvis", "paco"):
            raise typer.BadParameter("--mode must be coco, lvis or paco")
        if compare not in ("float32", "float64"):
            raise typer.BadParameter("--compare must be float32 or float64")
        if matching not in ("greedy", "optimal"):
            raise typer.BadParameter("--matching must be greedy or optimal")
        data = CocoDataset.load(dataset)
        output_dir.mkdir(parents=True, exist_ok=True)
        if proposals is not None:
            boxes = load_proposals(proposals)
        else:
            _require(uni_checkpoint=uni_checkpoint, images=images)
            records, _ = _propose_over_dataset(
                data, images, uni_checkpoint, "proposals", ("boxes", "scores"), num_proposals, size, device, dtype,
                output_dir, resume, batch_size, quiet,
            )  # fmt: skip
            if records is None:
                return
            boxes = records_to_proposals(records)
            save_proposals(output_dir / "proposals.npz", boxes, {i: r["scores"].numpy() for i, r in records.items()})
        result = proposal_recall(
            data, boxes, mode, compare=compare, drop_crowd=drop_crowd, drop_degenerate=drop_degenerate,
            matching=matching,
        )  # fmt: skip
        # The matching is recorded only when it departs from the official one (default output unchanged).
        payload = {"mode": mode, "compare": compare, **({"matching": matching} if matching != "greedy" else {}),
                   **result.to_dict()}  # fmt: skip
        _write(output_dir, "recall", payload, result.table())
        info(f"Evaluating {mode} ...\n{result.table()}\nresults in {output_dir}", json_out)
        emit_json(payload, json_out)


@app.command()
def retrieval(
    dataset: Dataset,
    uni_checkpoint: UniCheckpoint = None,
    checkpoint: Checkpoint = None,
    tokenizer: Tokenizer = None,
    images: ImageRoot = None,
    classes_file: Optional[Path] = typer.Option(
        None,
        "--classes-file",
        help="Class file or built-in list (see docs/class_names.md). Default: the official script's "
        "Chinese names, retrieval_coco_zh for --mode coco, retrieval_lvis_zh for --mode lvis.",
    ),
    mode: str = typer.Option("coco", help="Relevance rules: coco (every annotation) or lvis (area > 0)."),
    threshold: float = typer.Option(
        0.3, help="Retrieve an image when its best score is above this (official default 0.3; the official README uses 0.2)."
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
    federated: bool = typer.Option(
        False,
        help="--mode lvis only: precision counts a retrieved image only where the class is verified (annotated, "
        "or in neg_category_ids and not in not_exhaustive_category_ids); others are ignored, as the LVIS API "
        "does (official: closed world).",
    ),
    num_proposals: int = typer.Option(300, "--num-proposals", min=1, help="Proposals per image (official: 300)."),
    output_dir: OutputDir = Path("eval_retrieval"),
    resume: Resume = True,
    size: Size = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    batch_size: BatchSize = 8,
    quiet: Quiet = False,
    json_out: JsonOut = None,
) -> None:
    """Object retrieval: per-class and macro precision / recall / F1 of the retrieved image sets.

    Text row k (class k of --classes-file, by default the official script's Chinese list for
    --mode, embedded by the --checkpoint detector's text tower) is matched to the k-th category of
    the annotation file.
    """
    import torch

    from wedetect.eval.dataset import CocoDataset
    from wedetect.eval.retrieval import (
        evaluate_object_retrieval,
        load_embeddings,
        save_embeddings,
        verified_negatives,
    )
    from wedetect.eval.runner import PROPOSAL_FIELDS, records_to_embeddings

    with user_errors():
        if mode not in ("coco", "lvis"):
            raise typer.BadParameter("--mode must be coco or lvis")
        if scoring not in ("wedetect", "raw"):
            raise typer.BadParameter("--scoring must be wedetect or raw")
        if federated and mode != "lvis":
            raise typer.BadParameter("--federated needs --mode lvis (COCO has no federated annotations)")
        data = CocoDataset.load(dataset)
        if federated:
            verified_negatives(data)  # fail on a file without the LVIS image lists before running any model
        output_dir.mkdir(parents=True, exist_ok=True)
        text = None
        if embeddings is not None:
            image_embeddings, text = load_embeddings(embeddings)
            rank_device = device  # only the text tower runs here
        else:
            _require(uni_checkpoint=uni_checkpoint, images=images)
            records, rank_device = _propose_over_dataset(
                data, images, uni_checkpoint, "embeddings", PROPOSAL_FIELDS, num_proposals, size, device, dtype,
                output_dir, resume, batch_size, quiet,
            )  # fmt: skip
            if records is None:
                return
            image_embeddings = records_to_embeddings(records)
        if checkpoint is not None or text is None:
            _require(checkpoint=checkpoint)
            names, source = _retrieval_class_names(classes_file, mode)
            data.check_class_count(len(names), f"class file {source}")
            encoder = _load_detector(checkpoint, tokenizer, None, rank_device, "float32")
            chunks = [encoder.encode_text(names[i : i + TEXT_CHUNK]) for i in range(0, len(names), TEXT_CHUNK)]
            text = torch.nn.functional.normalize(torch.cat(chunks).float().cpu(), dim=-1)
        if embeddings is None:
            save_embeddings(output_dir / "embeddings.npz", image_embeddings, text)
        result, predicted = evaluate_object_retrieval(
            data, image_embeddings, text, mode=mode, threshold=threshold, scoring=scoring, skip_empty=skip_empty,
            federated=federated,
        )  # fmt: skip
        payload = {
            "mode": mode, "threshold": threshold, "scoring": scoring, **result.to_dict(),
            "predicted_images": {name: sorted(ids) for name, ids in predicted.items()},
        }  # fmt: skip
        _write(output_dir, "retrieval", payload, result.table())
        info(f"threshold {threshold} ({scoring} scoring, {mode} relevance)\n{result.table()}", json_out)
        emit_json(payload, json_out)
