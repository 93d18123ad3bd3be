"""The ``wedetect`` command: a thin layer over the package's Python API."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import typer
from tqdm.auto import tqdm

from ..errors import WeDetectError
from .common import (
    DEMO_IMAGE,
    BatchSize,
    ChannelsLast,
    Checkpoint,
    Classes,
    ClassesFile,
    Compile,
    Device,
    DeviceLetterbox,
    Dtype,
    Font,
    ImagesOrDemo,
    JsonOut,
    OutputDir,
    Overlap,
    Quiet,
    Size,
    Tokenizer,
    UniCheckpoint,
    check_compile_mode,
    check_device,
    check_outputs,
    emit_json,
    info,
    plural,
    skip_reason,
    user_errors,
)

app = typer.Typer(
    name="wedetect",
    help="WeDetect: open-vocabulary object detection as retrieval (detector, Uni proposals, Ref, index, eval, train).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_CHUNK = 64  # images per API call: bounds memory while the progress bar covers the whole run


def _chunks(items: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _run_images(paths: list[Path], call: Callable, desc: str, quiet: bool) -> Iterator:
    """Run ``call`` over chunks of images with one progress bar; yields (path, result) pairs."""
    with tqdm(total=len(paths), desc=desc, unit="img", disable=quiet or len(paths) < 2) as bar:
        for chunk in _chunks(paths, _CHUNK):
            for path, res in zip(chunk, call(list(chunk))):
                yield path, res
            bar.update(len(chunk))


def _unique_names(paths: list[Path]) -> dict[Path, str]:
    """Output file stems, disambiguated when two inputs share a name."""
    seen: dict[str, int] = {}
    out = {}
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        out[p] = p.stem if n == 0 else f"{p.stem}_{n}"
    return out


def _annotate(image, det, out_dir: Path, stem: str, font: Optional[Path]) -> None:
    from ..visualize import draw_detections

    draw_detections(image, det, font=font).save(out_dir / f"{stem}.jpg", quality=92)


def _run_and_annotate(paths: list[Path], call: Callable, desc: str, quiet: bool, output_dir: Optional[Path],
                      font: Optional[Path], skipped: list[dict], decode: Callable) -> Iterator:
    """Run ``call`` over the images, record unreadable ones in ``skipped`` and draw the rest into
    ``output_dir`` on ``decode(path)`` (a PIL RGB image in the frame of the boxes); yields (image index,
    path, detections, output stem) per readable image."""
    stems = _unique_names(paths)
    for i, (path, det) in enumerate(_run_images(paths, call, desc, quiet)):
        if det.error:
            skipped.append({"path": str(path), "reason": skip_reason(path, det.error)})
            continue
        if output_dir is not None:
            _annotate(decode(path), det, output_dir, stems[path], font)
        yield i, path, det, stems[path]


def _decode_like_detector(path: Path):
    """The detector's frame: OpenCV decoding, which applies the EXIF orientation."""
    from PIL import Image

    from ..data.io import load_bgr

    return Image.fromarray(load_bgr(path)[:, :, ::-1])



def _summary(what: str, per_image: list[dict], skipped: list[dict], json_out: Optional[str],
             output_dir: Optional[Path]) -> None:
    for s in skipped:
        info(f"skipped {s['path']}: {s['reason']}", json_out)
    total = sum(len(r["boxes"]) for r in per_image)
    info(f"{total} {what} in {plural(len(per_image), 'image')} ({len(skipped)} skipped)"
         + (f"; results in {output_dir}" if output_dir else ""), json_out)


@app.command()
def detect(
    checkpoint: Checkpoint,
    images: ImagesOrDemo = None,
    tokenizer: Tokenizer = None,
    classes: Classes = None,
    classes_file: ClassesFile = None,
    threshold: float = typer.Option(0.3, "--threshold", help="Keep detections scoring above this (official demo default: 0.05)."),
    max_detections: int = typer.Option(100, "--max-detections", min=1, help="At most this many per image (official --topk)."),
    output_dir: OutputDir = None,
    json_out: JsonOut = None,
    font: Font = None,
    size: Size = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    batch_size: BatchSize = 8,
    compile: Compile = None,
    channels_last: ChannelsLast = False,
    device_letterbox: DeviceLetterbox = False,
    overlap: Overlap = False,
    quiet: Quiet = False,
) -> None:
    """Detect the given classes in images; writes annotated images and COCO-format results."""
    from .. import WeDetect
    from ..data.classnames import class_prompts
    from ..data.io import collect_images

    with user_errors():
        check_compile_mode(compile)
        check_device(device)
        names = class_prompts(classes, classes_file)
        paths = collect_images(images or [DEMO_IMAGE])
        check_outputs(output_dir, json_out)
        if output_dir is None and json_out is None:
            json_out = "-"
        model = WeDetect.from_pretrained(checkpoint, tokenizer=tokenizer, size=size, device=device, dtype=dtype)
        model.accelerate(channels_last=channels_last, compile=compile, device_letterbox=device_letterbox,
                         overlap=overlap)
        with warnings.catch_warnings(record=True) as caught:  # repeated names in a class file: a note, not a trace
            warnings.simplefilter("always")
            model.set_classes(names)
        for w in caught:
            info(f"note: {w.message}", json_out)
        per_image, coco_rows, skipped = [], [], []

        def call(chunk):
            return model.predict(chunk, threshold=threshold, max_detections=max_detections,
                                 batch_size=batch_size, on_error="skip")

        for image_id, path, det, _ in _run_and_annotate(paths, call, "detect", quiet, output_dir, font, skipped,
                                                        _decode_like_detector):
            rows = det.to_coco(image_id)
            for row, name in zip(rows, det.names):
                row.update(file_name=str(path), category_name=name)
            coco_rows.extend(rows)
            per_image.append(det.to_dict())
        if output_dir is not None:
            emit_json(coco_rows, str(output_dir / "detections.json"))
        emit_json({"classes": names, "images": per_image, "skipped": skipped}, json_out)
        _summary("detections", per_image, skipped, json_out, output_dir)


@app.command()
def propose(
    uni_checkpoint: UniCheckpoint,
    images: ImagesOrDemo = None,
    threshold: float = typer.Option(0.1, "--threshold", help="Keep proposals scoring above this (official script: 0.1)."),
    num_proposals: int = typer.Option(300, "--num-proposals", min=1, help="Proposals per image before the threshold."),
    output_dir: OutputDir = None,
    json_out: JsonOut = None,
    save_embeddings: bool = typer.Option(True, "--save-embeddings/--no-save-embeddings",
                                         help="With --output-dir: write each image's proposals and embeddings to NAME.npz."),
    font: Font = None,
    size: Size = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    batch_size: BatchSize = 8,
    compile: Compile = None,
    channels_last: ChannelsLast = False,
    device_letterbox: DeviceLetterbox = False,
    overlap: Overlap = False,
    quiet: Quiet = False,
) -> None:
    """Class-agnostic WeDetect-Uni proposals with their embeddings."""
    import numpy as np

    from .. import WeDetectUni
    from ..data.io import collect_images, load_pil_rgb

    with user_errors():
        check_compile_mode(compile)
        check_device(device)
        paths = collect_images(images or [DEMO_IMAGE])
        check_outputs(output_dir, json_out)
        if output_dir is None and json_out is None:
            json_out = "-"
        uni = WeDetectUni.from_pretrained(uni_checkpoint, size=size, device=device, dtype=dtype)
        uni.accelerate(channels_last=channels_last, compile=compile, device_letterbox=device_letterbox, overlap=overlap)
        per_image, skipped = [], []

        def call(chunk):
            return uni.propose(chunk, num_proposals=num_proposals, score_threshold=threshold,
                               batch_size=batch_size, on_error="skip")

        # Uni decodes with Pillow and no EXIF rotation: its boxes are drawn in that frame.
        for _, _, det, stem in _run_and_annotate(paths, call, "propose", quiet, output_dir, font, skipped,
                                                 load_pil_rgb):
            per_image.append({**det.to_dict(), "levels": det.levels.tolist()})
            if output_dir is not None and save_embeddings:
                np.savez(output_dir / f"{stem}.npz", boxes=det.boxes.numpy(), scores=det.scores.numpy(),
                         embeddings=det.embeddings.numpy(), levels=det.levels.numpy(),
                         logit_scale=det.logit_scale.numpy(), logit_bias=det.logit_bias.numpy())
        emit_json({"images": per_image, "skipped": skipped}, json_out)
        _summary("proposals", per_image, skipped, json_out, output_dir)


def _mount_subcommands() -> None:
    """Attach the other parts' commands: ``eval`` (+ ``eval rec``) and ``index`` as groups; ``ref``,
    ``ref-finetune``, ``train``, ``finetune``, ``class-embeddings`` and ``data`` at the top level."""
    from . import eval as eval_cli
    from . import index as index_cli
    from . import rec_eval
    from . import ref as ref_cli
    from . import train as train_cli

    eval_cli.app.registered_commands.extend(rec_eval.app.registered_commands)
    app.add_typer(eval_cli.app, name="eval")
    app.add_typer(index_cli.app, name="index")
    for sub in (ref_cli.app, train_cli.app):
        app.registered_commands.extend(sub.registered_commands)
        app.registered_groups.extend(sub.registered_groups)


_mount_subcommands()


def main() -> None:
    try:  # typer >= 0.22 ships its own copy of click
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click

    try:
        code = app(standalone_mode=False)
    except click.NoArgsIsHelpError as e:
        e.show()  # the help text, as for --help
        raise SystemExit(2) from None
    except click.UsageError as e:  # one line, like every other usage error
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        typer.echo(f"error: {e.format_message()}{where}", err=True)
        raise SystemExit(2) from None
    except click.ClickException as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        raise SystemExit(e.exit_code) from None
    except typer.Abort:
        typer.echo("error: interrupted", err=True)
        raise SystemExit(130) from None
    except WeDetectError as e:  # errors raised outside a command's own handler
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    raise SystemExit(code if isinstance(code, int) else 0)
