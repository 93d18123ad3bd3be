"""``wedetect ref``: find what a referring expression describes (WeDetect-Uni proposals + WeDetect-Ref)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from tqdm.auto import tqdm

from ..data.io import read_text
from ..errors import WeDetectError
from .common import (
    Device,
    Dtype,
    Font,
    JsonOut,
    OutputDir,
    Quiet,
    check_device,
    check_outputs,
    emit_json,
    info,
    plural,
    quiet_transformers,
    skip_reason,
    user_errors,
)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _load_boxes(path: Path) -> dict[str, list]:
    """``--boxes``: a JSON object mapping an image path (as given, or its file name) to xyxy boxes."""
    try:
        data = json.loads(read_text(path, "--boxes"))
    except (OSError, json.JSONDecodeError) as e:
        raise WeDetectError(f"--boxes {path}: {e}") from None
    if not isinstance(data, dict):
        raise WeDetectError(f"--boxes {path}: expected a JSON object {{image path: [[x1, y1, x2, y2], ...]}}")
    return data


@app.command("ref")
def ref(
    ref_checkpoint: Path = typer.Option(
        ..., "--ref-checkpoint", help="WeDetect-Ref checkpoint folder (Hugging Face layout)."),
    query: list[str] = typer.Option(
        ..., "--query", help="The referring expression (Chinese or English); repeat for several."),
    image: list[str] = typer.Option(
        ..., "--image", "--images", metavar="<path>", help="An image, folder, glob or .txt list; repeatable."),
    uni_checkpoint: Optional[str] = typer.Option(
        None, "--uni-checkpoint", help="WeDetect-Uni checkpoint that proposes the boxes (top 100 per image)."),
    boxes: Optional[Path] = typer.Option(
        None, "--boxes", help="JSON object mapping each image (path or file name) to its x1,y1,x2,y2 boxes: "
                              "score these instead of running WeDetect-Uni."),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="Keep every box scoring above this, in proposal order (default, or negative: "
                                  "only the best box, as the official --score_thre -1)."),
    output_dir: OutputDir = None,
    json_out: JsonOut = None,
    font: Font = None,
    device: Device = "auto",
    dtype: str = typer.Option("float32", "--dtype", help="The Ref model's float32, float16 or bfloat16 "
                                                         "(WeDetect-Uni runs in float32, as the official demo)."),
    attn: Optional[str] = typer.Option(
        None, "--attn", help="sdpa, eager or flash_attention_2 (default: flash-attention when installed on CUDA, "
                             "else sdpa)."),
    quiet: Quiet = False,
) -> None:
    """Referring-expression detection: score each image's proposals against each query; writes annotated
    images (OUTPUT_DIR/NAME.jpg) and OUTPUT_DIR/ref_results.json."""
    import torch

    from ..data.io import collect_images, load_pil_rgb
    from ..ref import WeDetectRef, check_query
    from ..structures import Detections
    from ..visualize import draw_detections
    from . import _unique_names

    with user_errors():
        for q in query:
            check_query(q)
        check_device(device)
        paths = collect_images(image)
        if (uni_checkpoint is None) == (boxes is None):
            raise WeDetectError("give exactly one of --uni-checkpoint (propose boxes) or --boxes (score given boxes)")
        given = _load_boxes(boxes) if boxes is not None else None
        check_outputs(output_dir, json_out)
        if output_dir is None and json_out is None:
            json_out = "-"
        if quiet:
            quiet_transformers()
        model = WeDetectRef.from_pretrained(ref_checkpoint, uni=uni_checkpoint, device=device, dtype=dtype,
                                            attn_implementation=attn)
        model.check_queries(query)  # special tokens: a usage error, not a skip of every image
        stems = _unique_names(paths)
        results, skipped = [], []
        for path in tqdm(paths, desc="ref", unit="img", disable=quiet or len(paths) < 2):
            try:
                proposals = None
                if given is not None:
                    proposals = given.get(str(path), given.get(path.name))
                    if proposals is None:
                        raise WeDetectError(f"no boxes for this image in {boxes}")
                dets = model.predict([path], query, threshold=threshold,
                                     boxes=None if proposals is None else [proposals])[0]
            except WeDetectError as e:  # one bad image (unreadable, no proposals) does not stop the run
                skipped.append({"path": str(path), "reason": skip_reason(path, str(e))})
                continue
            results.append({
                "path": str(path),
                "image_size": list(dets[0].image_size),
                "queries": [{"query": q, "boxes": d.boxes.tolist(), "scores": d.scores.tolist()}
                            for q, d in zip(query, dets)],
            })
            if output_dir is not None:
                everything = Detections(
                    boxes=torch.cat([d.boxes for d in dets]),
                    scores=torch.cat([d.scores for d in dets]),
                    labels=torch.cat([d.labels for d in dets]),
                    names=[n for d in dets for n in d.names],
                )
                annotated = draw_detections(load_pil_rgb(path), everything, font=font)
                annotated.save(output_dir / f"{stems[path]}.jpg", quality=92)
        payload = {"queries": list(query), "threshold": threshold, "images": results, "skipped": skipped}
        if output_dir is not None:
            emit_json(payload, str(output_dir / "ref_results.json"))
        emit_json(payload, json_out)
        for s in skipped:
            info(f"skipped {s['path']}: {s['reason']}", json_out)
        total = sum(len(q["boxes"]) for r in results for q in r["queries"])
        info(f"{total} boxes for {len(query)} queries in {plural(len(results), 'image')} "
             f"({len(skipped)} skipped)"
             + (f"; results in {output_dir}" if output_dir else ""), json_out)


@app.command("ref-finetune")
def ref_finetune(
    ref_checkpoint: Path = typer.Option(
        ..., "--ref-checkpoint", help="WeDetect-Ref checkpoint folder to start from."),
    annotations: Path = typer.Option(
        ..., "--annotations", help="JSON list of {image, class_name, bounding_boxes, caption?} (official stage-3)."),
    proposals: Path = typer.Option(
        ..., "--proposals", help="JSON object {image: \\[\\[x1, y1, x2, y2], ...]} of WeDetect-Uni proposals."),
    output_dir: Path = typer.Option(..., "--output-dir", help="Where the fine-tuned checkpoint folder is written."),
    image_root: Optional[Path] = typer.Option(
        None, "--image-root", help="Base of relative image paths (default: the annotation file's folder)."),
    epochs: int = typer.Option(1, "--epochs", min=1),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate (official stage 3: 1e-5)."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Samples per forward pass."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Forward passes per optimizer step."),
    train_llm: bool = typer.Option(
        False, "--train-llm/--head-only", help="Also train the language model (official stage 3), not only "
                                               "the head and object embedder."),
    seed: int = typer.Option(0, "--seed"),
    device: Device = "auto",
    dtype: Dtype = "float32",
    quiet: Quiet = False,
) -> None:
    """Fine-tune the WeDetect-Ref head and object embedder on your referring-expression data
    (focal loss against soft IoU targets over the proposals, as the official stage 3)."""
    from ..ref import WeDetectRef
    from ..train.ref_finetune import RefFinetuneConfig, finetune_ref, load_ref_samples

    with user_errors():
        samples = load_ref_samples(annotations, proposals, image_root=image_root)
        if quiet:
            quiet_transformers()
        model = WeDetectRef.from_pretrained(ref_checkpoint, device=device, dtype=dtype)
        config = RefFinetuneConfig(lr=lr, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                                   train_llm=train_llm, seed=seed)
        losses = finetune_ref(model, samples, config, output_dir=output_dir, progress=not quiet)
        info(f"{len(losses)} steps on {len(samples)} samples, final loss {losses[-1]:.4f}; saved to {output_dir}")
