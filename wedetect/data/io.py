"""Image decoding and input collection, robust to the files users actually have.

The detector decodes like the official pipeline (OpenCV, BGR, EXIF orientation applied, alpha
dropped, 16-bit reduced to 8-bit); WeDetect-Uni like the official proposal script (Pillow, RGB,
EXIF orientation NOT applied). Unreadable files raise ``ImageReadError`` with the reason.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Union

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


def load_bgr(image: ImageInput) -> np.ndarray:
    """Decode for the detector: uint8 HxWx3 BGR. Arrays and PIL images are taken as RGB."""
    if isinstance(image, np.ndarray):
        return _check_array(image)[:, :, ::-1].copy()
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))[:, :, ::-1].copy()
    path = Path(image)
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
        return image.convert("RGB")
    path = Path(image)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise ImageReadError(f"{path}: file not found") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{path}: not a decodable image ({e})") from e


def image_name(image: Any, index: int) -> str:
    """A display name for an input: its path, or ``<image N>`` for in-memory images."""
    return str(image) if isinstance(image, (str, os.PathLike)) else f"<image {index}>"


def collect_images(spec: str | os.PathLike) -> list[Path]:
    """Expand ``--images``: a file, a folder (image files, sorted), a glob, or a .txt list of paths.

    A list file holds one path per line (relative paths are relative to the list file; blank lines and
    ``#`` comments ignored). Missing entries are kept so the caller reports them by name.
    """
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise WeDetectError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return files
    if path.is_file() and path.suffix.lower() in {".txt", ".lst", ".list"}:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
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
