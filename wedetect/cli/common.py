"""What every ``wedetect`` subcommand shares: flag definitions, error handling, JSON output."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from typing_extensions import Annotated

from ..errors import WeDetectError

# Shared flags: the same name, type and meaning in every subcommand.
Checkpoint = Annotated[str, typer.Option("--checkpoint", help="WeDetect detector checkpoint (.pth/.safetensors, or ORG/REPO/FILE on the HF hub).")]
UniCheckpoint = Annotated[str, typer.Option("--uni-checkpoint", help="WeDetect-Uni checkpoint (.pth/.safetensors).")]
Tokenizer = Annotated[Optional[str], typer.Option("--tokenizer", help="XLM-R tokenizer: tokenizer.json, its folder, a sentencepiece .model, or a hub name (default: $WEDETECT_TOKENIZER).")]
Classes = Annotated[Optional[str], typer.Option("--classes", help="Class names separated by ASCII commas, e.g. '鞋,床'.")]
ClassesFile = Annotated[Optional[Path], typer.Option("--classes-file", help="Class file: official JSON list of name lists, one name per line, or a built-in list: coco, coco_zh, lvis, lvis_zh, retrieval_coco_zh, retrieval_lvis_zh.")]
Images = Annotated[str, typer.Option("--images", help="An image file, a folder, a glob, or a .txt list of paths.")]
DEMO_IMAGE = str(Path(__file__).resolve().parent.parent / "assets" / "demo.jpeg")
ImagesOrDemo = Annotated[str, typer.Option("--images", help="An image file, a folder, a glob, or a .txt list of paths (default: the bundled demo image).")]
OutputDir = Annotated[Optional[Path], typer.Option("--output-dir", help="Folder for the files written (annotated images, results).")]
JsonOut = Annotated[Optional[str], typer.Option("--json", help="Write machine-readable results to FILE ('-' for stdout).")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1 or auto (cuda when available).")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32, float16 or bfloat16.")]
Size = Annotated[Optional[str], typer.Option("--size", help="tiny, base or large (default: detected from the checkpoint).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
def check_compile_mode(value: Optional[str]) -> None:
    """--compile is checked before a checkpoint is loaded (a one-line usage error)."""
    from ..inference import COMPILE_MODES

    if value is not None and value not in COMPILE_MODES:
        raise WeDetectError(f"--compile must be one of {', '.join(COMPILE_MODES)}, not {value!r}")


Compile = Annotated[Optional[str], typer.Option("--compile", help="torch.compile the network: default, reduce-overhead (CUDA graphs) or max-autotune; the first batch compiles.")]
ChannelsLast = Annotated[bool, typer.Option("--channels-last", help="NHWC activations (faster on tensor-core GPUs).")]
DeviceLetterbox = Annotated[
    bool,
    typer.Option(
        "--device-letterbox", help="Resize and pad on --device (CPU threads only decode); <= 1 grey level off."
    ),
]
Overlap = Annotated[
    bool,
    typer.Option("--overlap", help="Post-process each batch while the network runs on the next (same results)."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
Font = Annotated[Optional[Path], typer.Option("--font", help="Font file for labels (default: a system CJK font, or $WEDETECT_FONT).")]


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn user-facing errors (bad input, missing files, wrong checkpoint) into one line, exit 2."""
    try:
        yield
    except WeDetectError as e:
        fail(str(e))
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        fail(f"{e.filename}: {e.strerror}")
    except KeyboardInterrupt:
        fail("interrupted", 130)


def emit_json(payload: Any, target: Optional[str]) -> None:
    """Write ``payload`` as UTF-8 JSON to ``target`` ('-' = stdout); no-op when ``target`` is None."""
    if target is None:
        return
    text = json.dumps(payload, ensure_ascii=False, indent=2)
    if target == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


def info(message: str, json_target: Optional[str] = None) -> None:
    """Human-readable progress: to stderr when stdout carries JSON."""
    typer.echo(message, err=json_target == "-")
