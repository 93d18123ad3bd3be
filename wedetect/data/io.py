"""Image decoding and input collection, robust to the files users actually have.

The detector decodes like the official pipeline (OpenCV, BGR, EXIF orientation applied, alpha
dropped, 16-bit reduced to 8-bit); WeDetect-Uni like the official proposal script (Pillow, RGB,
EXIF orientation NOT applied). Unreadable files raise ``ImageReadError`` with the reason.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Sequence, Union

import cv2
import numpy as np
from PIL import Image

from ..errors import WeDetectError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


class ImageReadError(WeDetectError):
    """An input image could not be read or decoded."""


def _check_array(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageReadError(f"array of shape {arr.shape} is not an HxW or HxWx3 image")
    if arr.dtype != np.uint8:
        raise ImageReadError(f"array of dtype {arr.dtype} is not uint8 (expected RGB values 0..255)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError("empty image array")
    return np.ascontiguousarray(arr[:, :, :3])


def _path(image: Any) -> Path:
    if not isinstance(image, (str, os.PathLike)):
        raise ImageReadError(
            f"unsupported image type {type(image).__name__}: pass a path, a PIL image or an HxWx3 uint8 RGB array"
        )
    return Path(image)


def _pil_rgb(im: Image.Image) -> Image.Image:
    """``im`` as RGB. 16-bit greyscale keeps its high byte, as OpenCV's decoder does: Pillow's own
    conversion clips every value above 255, turning the image white."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
        high = (np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(high).convert("RGB")
    return im.convert("RGB")


def load_bgr(image: ImageInput) -> np.ndarray:
    """Decode for the detector: uint8 HxWx3 BGR. Arrays and PIL images are taken as RGB."""
    if isinstance(image, np.ndarray):
        return _check_array(image)[:, :, ::-1].copy()
    if isinstance(image, Image.Image):
        return np.asarray(_pil_rgb(image))[:, :, ::-1].copy()
    path = _path(image)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read file ({e.strerror or e})") from e
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageReadError(f"{path}: not a decodable image")
    return bgr


def load_pil_rgb(image: ImageInput) -> Image.Image:
    """Decode for WeDetect-Uni: a Pillow RGB image, EXIF orientation not applied (official)."""
    if isinstance(image, np.ndarray):
        return Image.fromarray(_check_array(image))
    if isinstance(image, Image.Image):
        return _pil_rgb(image)
    path = _path(image)
    try:
        with Image.open(path) as im:
            return _pil_rgb(im)
    except FileNotFoundError as e:
        raise ImageReadError(f"{path}: file not found") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: not a decodable image ({e})") from e


def read_text(path: Path, what: str) -> str:
    """A user's text file (UTF-8, optional BOM); anything else is a ``WeDetectError`` naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise WeDetectError(
            f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at position {e.start}); save it as UTF-8"
        ) from None


def image_name(image: Any, index: int) -> str:
    """A display name for an input: its path, or ``<image N>`` for in-memory images."""
    return str(image) if isinstance(image, (str, os.PathLike)) else f"<image {index}>"


def collect_images(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand ``--images``: a file, a folder (image files, sorted), a glob, or a .txt list of paths;
    or a list of those, expanded in order.

    A list file holds one path per line (relative paths are relative to the list file; blank lines and
    ``#`` comments ignored). Missing entries are kept so the caller reports them by name.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return [p for one in spec for p in collect_images(one)]
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise WeDetectError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return files
    if path.is_file() and path.suffix.lower() in {".txt", ".lst", ".list"}:
        lines = [ln.strip() for ln in read_text(path, "image list").splitlines()]
        entries = [ln for ln in lines if ln and not ln.startswith("#")]
        if not entries:
            raise WeDetectError(f"image list {path} is empty")
        return [p if p.is_absolute() else path.parent / p for p in map(Path, entries)]
    if path.is_file():
        return [path]
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
        if not files:
            raise WeDetectError(f"no files match {text}")
        return files
    raise WeDetectError(f"--images {text}: no such file or folder")
