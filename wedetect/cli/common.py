"""What every ``wedetect`` subcommand shares: flag definitions, error handling, JSON output."""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from ..errors import WeDetectError

# Shared flags: the same name, type and meaning in every subcommand.
Checkpoint = Annotated[str, typer.Option("--checkpoint", help="WeDetect detector checkpoint (.pth/.safetensors, or ORG/REPO/FILE on the HF hub).")]
UniCheckpoint = Annotated[str, typer.Option("--uni-checkpoint", help="WeDetect-Uni checkpoint (.pth/.safetensors).")]
Tokenizer = Annotated[Optional[str], typer.Option("--tokenizer", help="XLM-R tokenizer: tokenizer.json, its folder, a sentencepiece .model, or a hub name (default: $WEDETECT_TOKENIZER).")]
Classes = Annotated[Optional[str], typer.Option("--classes", help="Class names separated by ASCII commas, e.g. '鞋,床'.")]
ClassesFile = Annotated[Optional[Path], typer.Option("--classes-file", help="Class file: official JSON list of name lists, one name per line, or a built-in list: coco, coco_zh, lvis, lvis_zh, retrieval_coco_zh, retrieval_lvis_zh.")]
Images = Annotated[str, typer.Option("--images", help="An image file, a folder, a glob, or a .txt list of paths.")]
DEMO_IMAGE = str(Path(__file__).resolve().parent.parent / "assets" / "demo.jpeg")
ImagesOrDemo = Annotated[Optional[list[str]], typer.Option("--images", help="An image file, a folder, a glob, or a .txt list of paths; repeatable (default: the bundled demo image).", metavar="<path>", show_default=False)]
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


def check_device(device: str) -> None:
    """--device (unknown, or CUDA without a GPU) is checked before a checkpoint is loaded."""
    from ..inference import resolve_device

    resolve_device(device)


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


def check_outputs(output_dir: Optional[Path], json_out: Optional[str]) -> None:
    """Create ``--output-dir`` and the folder of ``--json`` before any work, so that a path that cannot
    be written is a one-line usage error up front rather than a failure after the whole run."""
    if output_dir is not None:
        if output_dir.exists() and not output_dir.is_dir():
            raise WeDetectError(f"--output-dir {output_dir} is a file, not a folder")
        _make_folder(output_dir, "--output-dir")
    if json_out is not None and json_out != "-":
        target = Path(json_out)
        if target.is_dir():
            raise WeDetectError(f"--json {json_out} is a folder; give a file name")
        _make_folder(target.parent, f"--json {json_out}:")
        if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise WeDetectError(f"--json {json_out}: not writable")


def _make_folder(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WeDetectError(f"{flag} {folder} cannot be created: a part of the path is a file") from None
    except OSError as e:
        raise WeDetectError(f"{flag} {folder} cannot be created: {e.strerror or e}") from None


def quiet_transformers() -> None:
    """No transformers progress bars ("Loading weights") in this process: for ``--quiet``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def skip_reason(path: Any, error: str) -> str:
    """An input's error without the path that the skipped-input line already names."""
    return error.removeprefix(f"{path}: ")


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
