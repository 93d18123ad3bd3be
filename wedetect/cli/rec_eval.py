"""``wedetect eval rec``: WeDetect-Ref referring-expression evaluation with the official metrics.

Scores come either from a saved per-proposal scores file (``--scores``, the ``model_scores.npz`` format)
or from running WeDetect-Ref (``--ref-checkpoint``); post-processing flags mirror the official
``eval.py`` (``--num-select``, ``--score-thre``, ``--nms``, ``--single-box``). The numbers are the official
ones unless ``--corrected`` is given.
"""
from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from wedetect.cli.common import Quiet, emit_json, quiet_transformers, user_errors
from wedetect.eval.rec import (
    D3_SUBSETS,
    GREFCOCO_SPLITS,
    MAX_PROPOSALS,
    REFCOCO_SPLITS,
    PostprocessConfig,
    ProposalSource,
    RecError,
    Scorer,
    load_model_scores,
    load_rec_dataset,
    postprocess_dataset,
    save_model_scores,
    score_dataset,
)

app = typer.Typer(help="Referring-expression evaluation of WeDetect-Ref (RefCOCO/+/g, gRefCOCO, HumanRef, D3).")


class RecKind(str, Enum):
    refcoco = "refcoco"
    grefcoco = "grefcoco"
    humanref = "humanref"
    d3 = "d3"


# The file that marks each dataset layout (used to detect --dataset when it is omitted).
_MARKERS = {
    RecKind.refcoco: [f"{s}.json" for s in REFCOCO_SPLITS],
    RecKind.grefcoco: [f"finetune_grefcoco_{s}.json" for s in GREFCOCO_SPLITS],
    RecKind.humanref: ["annotations.jsonl"],
    RecKind.d3: list(D3_SUBSETS.values()),
}


def _detect_kind(folder: Path) -> RecKind:
    found = [kind for kind, files in _MARKERS.items() if any((folder / f).is_file() for f in files)]
    if len(found) != 1:
        what = "no known dataset file" if not found else f"files of {', '.join(k.value for k in found)}"
        raise typer.BadParameter(f"{folder} holds {what}; pass --dataset", param_hint="--dataset")
    return found[0]


def _ref_scorer(ref_checkpoint: Path, device: str, dtype: str) -> Scorer:
    """A :data:`Scorer` running WeDetect-Ref (a seam for tests: they substitute a fake scorer)."""
    import torch

    from wedetect import WeDetectRef

    model = WeDetectRef.from_pretrained(ref_checkpoint, device=device, dtype=dtype)
    cache: dict[str, Any] = {}

    def score(image_path: str, expressions: list[str], boxes: np.ndarray) -> np.ndarray:
        # Expressions of one image usually come in a row: keep its decoded image and vision features.
        if image_path not in cache:
            cache.clear()
            cache[image_path] = model.prepare(image_path)
        scores = model.score_queries(cache[image_path], expressions, boxes=torch.from_numpy(boxes))
        return scores.float().cpu().numpy()

    return score


def _uni_proposals(uni_checkpoint: Path, image_root: Path, device: str) -> ProposalSource:
    """Proposals from WeDetect-Uni (top 100, score > 0) for datasets shipped without ``proposals.json``;
    float32 whatever the Ref dtype, as the official demo (a bf16 Uni proposes other boxes)."""
    from wedetect import WeDetectUni

    uni = WeDetectUni.from_pretrained(str(uni_checkpoint), device=device, dtype="float32")
    cache: dict[str, np.ndarray] = {}

    def lookup(name: str) -> np.ndarray:
        if name not in cache:
            path = image_root / name
            if not path.is_file():
                raise RecError(f"image {path} not found (set --image-root)")
            [det] = uni.propose([str(path)], num_proposals=MAX_PROPOSALS, score_threshold=0.0)
            cache[name] = det.boxes.float().cpu().numpy() if hasattr(det.boxes, "cpu") else np.asarray(det.boxes)
        return cache[name]

    return lookup


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _print_table(title: str, header: list[str], rows: list[list[Any]], to_stderr: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    Console(stderr=to_stderr, width=200).print(table)


@app.command("rec")
def rec(
    dataset_dir: Path = typer.Argument(
        ..., help="Dataset folder in the official layout (split files, proposals.json, images.json)."
    ),
    dataset: Optional[RecKind] = typer.Option(
        None, "--dataset", help="Benchmark; detected from the files when omitted."
    ),
    scores: Optional[Path] = typer.Option(
        None, "--scores", help="Saved per-proposal scores (.npz: 'scores' float32, 'offsets' int64 records)."
    ),
    ref_checkpoint: Optional[Path] = typer.Option(
        None, "--ref-checkpoint", help="WeDetect-Ref folder: compute the scores with the model."
    ),
    uni_checkpoint: Optional[Path] = typer.Option(
        None, "--uni-checkpoint", help="WeDetect-Uni checkpoint: proposals when the folder has no proposals.json."
    ),
    image_root: Optional[Path] = typer.Option(
        None, "--image-root", help="Folder the image file names are relative to (default: the dataset folder)."
    ),
    num_select: int = typer.Option(
        300, "--num-select", help="Rows kept per sample by score without --score-thre (official 300; RefCOCO: 20)."
    ),
    score_thre: Optional[float] = typer.Option(
        None, "--score-thre", help="Keep the rows scoring strictly above this, in order, instead of the top-k."
    ),
    nms: bool = typer.Option(False, "--nms", help="Class-aware NMS (class = query) before the selection."),
    nms_iou: float = typer.Option(0.7, "--nms-iou", help="IoU threshold of --nms."),
    single_box: bool = typer.Option(
        False, "--single-box", help="One row per proposal with its best query (no top-k, no threshold)."
    ),
    corrected: bool = typer.Option(
        False, "--corrected", help="Fix the official metrics' known flaws (numbers then differ from the protocol's)."
    ),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the results as JSON to FILE ('-' = stdout)."),
    save_scores: Optional[Path] = typer.Option(
        None, "--save-scores", help="Save the model's per-proposal scores (.npz) for later re-evaluation."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="Model device (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(
        None, "--dtype",
        help="WeDetect-Ref dtype (default: bfloat16 on cuda, float32 on cpu); WeDetect-Uni runs in float32."
    ),
    quiet: Quiet = False,
) -> None:
    """Evaluate referring-expression detection with the official post-processing and metrics."""
    if (scores is None) == (ref_checkpoint is None):
        raise typer.BadParameter("give exactly one of --scores FILE or --ref-checkpoint DIR", param_hint="--scores")
    if uni_checkpoint is not None and ref_checkpoint is None:
        raise typer.BadParameter("--uni-checkpoint only applies with --ref-checkpoint", param_hint="--uni-checkpoint")
    if save_scores is not None and ref_checkpoint is None:
        raise typer.BadParameter("--save-scores only applies with --ref-checkpoint", param_hint="--save-scores")
    if not dataset_dir.is_dir():
        raise typer.BadParameter(f"{dataset_dir} is not a folder", param_hint="DATASET_DIR")
    kind = dataset or _detect_kind(dataset_dir)
    root = image_root if image_root is not None else dataset_dir
    with user_errors():
        try:
            config = PostprocessConfig(
                num_select=num_select, score_threshold=score_thre, nms=nms, nms_iou=nms_iou, single_box=single_box
            )
        except RecError as err:
            raise typer.BadParameter(str(err)) from None
        if ref_checkpoint is not None:
            import torch

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        proposals = None
        needs_uni = kind is not RecKind.humanref and not (dataset_dir / "proposals.json").is_file()
        if ref_checkpoint is not None and needs_uni:
            if uni_checkpoint is None:
                raise RecError(f"{dataset_dir} has no proposals.json: pass --uni-checkpoint to compute proposals")
            proposals = _uni_proposals(uni_checkpoint, root, device)
        data = load_rec_dataset(kind.value, dataset_dir, image_root, proposals)
        if scores is not None:
            matrices = load_model_scores(scores, data)
            source = {"scores": str(scores)}
        else:
            if quiet:
                quiet_transformers()
            scorer = _ref_scorer(ref_checkpoint, device, dtype)
            matrices = score_dataset(data, scorer, root, progress=not quiet)
            source = {"ref_checkpoint": str(ref_checkpoint), "device": device, "dtype": dtype}
            if proposals is not None:
                source["uni_checkpoint"] = str(uni_checkpoint)
            if save_scores is not None:
                save_model_scores(save_scores, matrices)
        predictions = postprocess_dataset(data, matrices, config)
        results = data.evaluate(predictions, corrected=corrected)

    header, rows = data.summary(results)
    mode = "corrected" if corrected else "official"
    _print_table(f"{kind.value} ({mode} metrics, {len(data)} samples)", header, rows, to_stderr=json_out == "-")
    if json_out is not None:
        payload = {
            "dataset": kind.value,
            "folder": str(dataset_dir),
            "samples": len(data),
            "metrics": mode,
            "postprocess": dataclasses.asdict(config),
            "source": source,
            "results": results,
        }
        emit_json(payload, json_out)
