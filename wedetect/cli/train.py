"""Training commands: ``train``, ``finetune``, ``class-embeddings`` and ``data synth``.

Multi-GPU (or multi-process CPU) runs use torchrun, e.g.
``torchrun --nproc_per_node 8 --no-python wedetect train wedetect_base_coco_full_tuning ...``.
"""
from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .common import ClassesFile, Device, Quiet, Tokenizer, fail, info, user_errors

app = typer.Typer(help="Finetune WeDetect.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Dataset utilities.", no_args_is_help=True)
app.add_typer(data_app, name="data")

Overrides = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a config value: dotted.key=value (YAML value), repeatable, e.g. --set optim.lr=1e-4.")]
Resume = Annotated[bool, typer.Option("--resume", help="Resume from the output folder's last checkpoint.")]
ResumeFrom = Annotated[Path | None, typer.Option("--resume-from", help="Resume from this training checkpoint.")]


class Flavour(str, Enum):
    open_vocab = "open-vocab"
    mask_refine = "mask-refine"
    closed_set = "closed-set"


_FLAVOUR_CONFIGS = {
    Flavour.open_vocab: "wedetect_base_coco_full_tuning",
    Flavour.mask_refine: "wedetect_base_coco_full_tuning_mask_refine",
    Flavour.closed_set: "wedetect_base_coco_vision_encoder",
}


def _setup_logging(output: Path | None) -> None:
    """Log to stderr on rank 0 (and to OUTPUT/train.log); other ranks log warnings only."""
    import os

    rank = int(os.environ.get("RANK", "0"))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if output is not None and rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(output / "train.log", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True)


def _run(cfg, resume: bool, resume_from: Path | None, quiet: bool) -> None:
    from ..train.loop import Trainer

    _setup_logging(Path(cfg.output))
    trainer = Trainer(cfg, resume=str(resume_from) if resume_from else (True if resume else None),
                      progress=not quiet)
    state = trainer.fit()
    if trainer.dist.is_main:
        best = f"; best mAP {state.best_ap:.4f} at epoch {state.best_epoch}" if state.best_ap >= 0 else ""
        info(f"trained {state.epoch} epochs; checkpoints in {cfg.output}{best}")


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="Training config YAML, or the name of a shipped config.")],
    overrides: Overrides = None,
    output: Annotated[Path | None, typer.Option("--output", help="Run folder (overrides the config).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda or auto (overrides the config).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed (default: random, logged).")] = None,
    resume: Resume = False,
    resume_from: ResumeFrom = None,
    quiet: Quiet = False,
) -> None:
    """Train from a YAML config (see wedetect/train/configs), with --set overrides."""
    from ..train.config import load_config

    with user_errors():
        cfg = load_config(config, overrides, output=str(output) if output else None, device=device, seed=seed)
        _run(cfg, resume, resume_from, quiet)


@app.command()
def finetune(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Pretrained detector to start from (wedetect_base.pth).")],
    train_ann: Annotated[Path, typer.Option("--train", help="Training annotations (COCO JSON).")],
    train_images: Annotated[Path, typer.Option("--train-images", help="Folder of the training images.")],
    output: Annotated[Path, typer.Option("--output", help="Run folder for checkpoints and logs.")],
    val_ann: Annotated[Path | None, typer.Option("--val", help="Validation annotations (COCO JSON).")] = None,
    val_images: Annotated[Path | None, typer.Option("--val-images", help="Folder of the validation images.")] = None,
    classes_file: ClassesFile = None,
    tokenizer: Tokenizer = None,
    flavour: Annotated[Flavour, typer.Option("--flavour", help="open-vocab, mask-refine or closed-set.")] = Flavour.open_vocab,
    class_embeddings: Annotated[Path | None, typer.Option(
        "--class-embeddings", help="Closed set: .npy from `wedetect class-embeddings`.")] = None,
    config: Annotated[str | None, typer.Option("--config", help="Base config (default: the flavour's COCO config).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Images per process.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Base learning rate.")] = None,
    accumulate: Annotated[int | None, typer.Option("--accumulate", min=1, help="Batches per optimizer step.")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="Mixed precision.")] = None,
    ema: Annotated[bool | None, typer.Option("--ema/--no-ema", help="Keep an EMA of the weights.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=0, help="Data loader processes.")] = None,
    overrides: Overrides = None,
    device: Device = "auto",
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    resume: Resume = False,
    resume_from: ResumeFrom = None,
    quiet: Quiet = False,
) -> None:
    """Finetune a pretrained detector on a COCO-format dataset (the official recipe by default)."""
    from ..train.config import load_config

    with user_errors():
        if (val_ann is None) != (val_images is None):
            fail("--val and --val-images go together")
        if flavour is Flavour.closed_set and class_embeddings is None:
            fail("--flavour closed-set needs --class-embeddings (write them with `wedetect class-embeddings`)")
        values = {
            "flavour": flavour.value.replace("-", "_"), "checkpoint": str(checkpoint),
            "data.train_ann": str(train_ann), "data.train_images": str(train_images),
            "data.val_ann": str(val_ann) if val_ann else None, "data.val_images": str(val_images) if val_images else None,
            "data.classes_file": str(classes_file) if classes_file else None, "tokenizer": tokenizer,
            "class_embeddings": str(class_embeddings) if class_embeddings else None,
            "epochs": epochs, "batch_size": batch_size, "optim.lr": lr, "accumulate": accumulate, "amp": amp,
            "ema": ema, "data.num_workers": workers, "output": str(output), "device": device, "seed": seed,
        }
        # Data the flags leave out is absent, not inherited from the base config's COCO paths.
        cleared = [f"{k}=null" for k in ("data.val_ann", "data.val_images", "data.classes_file") if values[k] is None]
        cfg = load_config(config or _FLAVOUR_CONFIGS[flavour], [*(overrides or []), *cleared], **values)
        _run(cfg, resume, resume_from, quiet)


@app.command("class-embeddings")
def class_embeddings_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Open-vocabulary detector checkpoint.")],
    classes_file: Annotated[Path, typer.Option("--classes-file", help="Class file (first name of each class is used).")],
    output: Annotated[Path, typer.Option("--output", help="Where to write the (K, 768) float32 .npy.")] = Path("class_embeddings.npy"),
    tokenizer: Tokenizer = None,
    device: Device = "auto",
    dropout: bool = typer.Option(False, "--dropout/--no-dropout",
                                 help="Encode with dropout on, as the official script does (noisy)."),
) -> None:
    """Write class embeddings for closed-set finetuning (official generate_class_embedding.py)."""
    import numpy as np
    import torch

    from ..data.classnames import load_class_names
    from ..models.text import load_tokenizer
    from ..train.embeddings import class_embeddings, load_text_detector

    with user_errors():
        names = load_class_names(classes_file)
        tok = load_tokenizer(tokenizer)
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        model = load_text_detector(checkpoint, dev)
        emb = class_embeddings(model, tok, names, dropout=dropout)
        output.parent.mkdir(parents=True, exist_ok=True)
        np.save(output, emb)
        info(f"wrote {output}: {emb.shape[0]} classes x {emb.shape[1]}")


@data_app.command("synth")
def synth_cmd(
    output: Annotated[Path, typer.Option("--output", help="Dataset folder to create.")],
    num_train: Annotated[int, typer.Option("--train", min=1, help="Training images.")] = 200,
    num_val: Annotated[int, typer.Option("--val", min=1, help="Validation images.")] = 50,
    image_size: Annotated[int, typer.Option("--size", min=32, help="Image side in pixels.")] = 160,
    colors: Annotated[str, typer.Option("--colors", help="Comma-separated colours.")] = "red,green,blue",
    shapes: Annotated[str, typer.Option("--shapes", help="Comma-separated shapes.")] = "circle,square,triangle",
    min_objects: Annotated[int, typer.Option("--min-objects", min=0)] = 1,
    max_objects: Annotated[int, typer.Option("--max-objects", min=0)] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    quiet: Quiet = False,
) -> None:
    """Render a synthetic open-vocabulary detection dataset (COCO format, Chinese class names)."""
    from ..data.synth import SynthConfig, make_dataset

    with user_errors():
        size = image_size
        try:
            cfg = SynthConfig(num_train=num_train, num_val=num_val, image_size=size, min_objects=min_objects,
                              max_objects=max_objects, min_object_size=max(8, size // 10),
                              max_object_size=max(8, size * 2 // 5), colors=tuple(colors.split(",")),
                              shapes=tuple(shapes.split(",")), seed=seed)
        except ValueError as e:
            fail(str(e))
        paths = make_dataset(cfg, output, progress=not quiet)
        info(f"wrote {output}: train {paths['train']}, val {paths['val']}, classes {paths['classes']}")
