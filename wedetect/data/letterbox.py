"""The official pre-processing: keep-ratio resize + letterbox to an S x S input, pad value 114.

Two variants exist in the official code and both are reproduced exactly:
- ``letterbox_detector``: the detector's cv2 pipeline (int() sizes, INTER_AREA down / INTER_LINEAR up,
  integer pads with the odd pixel at bottom/right, per-axis scale factors from the integer sizes);
- ``letterbox_uni``: WeDetect-Uni's proposal-script pipeline (Pillow bilinear, round() sizes, one
  ratio for both axes, pasted at the integer offset but mapped back with the float half-pad).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from ..structures import LetterboxMeta
from .io import ImageReadError

PAD_VALUE = 114


def _check_resized(h: int, w: int, h1: int, w1: int, size: int) -> None:
    # The official code crashes here (a 0-pixel resize); an ImageReadError lets the caller skip the image.
    if h1 < 1 or w1 < 1:
        raise ImageReadError(f"a {w}x{h} image is too thin for a {size} input: one side would shrink to 0 pixels")


def detector_geometry(h: int, w: int, size: int) -> tuple[int, int, LetterboxMeta]:
    """The detector's resized (h1, w1) and meta for an h x w image: int() sizes, the odd pad pixel
    at bottom/right, per-axis scale factors from the integer sizes."""
    r = min(size / max(h, w), size / min(h, w))  # a Python float, as the official code computes it
    h1, w1 = (h, w) if r == 1 else (int(h * r), int(w * r))
    _check_resized(h, w, h1, w1, size)
    top, left = (size - h1) // 2, (size - w1) // 2
    pad = (float(top), float(size - h1 - top), float(left), float(size - w1 - left))
    return h1, w1, LetterboxMeta(orig_size=(h, w), input_size=size, scale=(w1 / w, h1 / h), pad=pad)


def letterbox_detector(bgr: np.ndarray, size: int) -> tuple[np.ndarray, LetterboxMeta]:
    """BGR uint8 HxWx3 -> (RGB uint8 S x S x 3 network input, meta)."""
    h, w = bgr.shape[:2]
    h1, w1, meta = detector_geometry(h, w, size)
    img = bgr
    if (h1, w1) != (h, w):
        interp = cv2.INTER_AREA if h1 < h else cv2.INTER_LINEAR
        img = cv2.resize(bgr, (w1, h1), interpolation=interp)
    top, bottom, left, right = map(int, meta.pad)
    if top or bottom or left or right:
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return np.ascontiguousarray(img[:, :, ::-1]), meta


def uni_geometry(h: int, w: int, size: int) -> tuple[int, int, LetterboxMeta]:
    """WeDetect-Uni's resized (h1, w1) and meta: round() sizes, one ratio, float half-pads."""
    r = min(size / w, size / h)
    h1, w1 = int(round(h * r)), int(round(w * r))
    _check_resized(h, w, h1, w1, size)
    dw, dh = size - w1, size - h1
    return h1, w1, LetterboxMeta(orig_size=(h, w), input_size=size, scale=(r, r), pad=(dh / 2, dh / 2, dw / 2, dw / 2))


def letterbox_uni(image: Image.Image, size: int) -> tuple[np.ndarray, LetterboxMeta]:
    """Pillow RGB image -> (RGB uint8 S x S x 3 network input, meta)."""
    w, h = image.size
    h1, w1, meta = uni_geometry(h, w, size)
    resized = image.resize((w1, h1), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), (PAD_VALUE,) * 3)
    canvas.paste(resized, ((size - w1) // 2, (size - h1) // 2))
    return np.asarray(canvas), meta


def to_tensor(batch: list[np.ndarray], device: torch.device | str | None = None) -> torch.Tensor:
    """RGB uint8 HxWx3 inputs -> float32 (B, 3, S, S) in [0, 1] (a true division by 255).

    The uint8 batch moves to ``device`` first: a quarter of the bytes, and the division runs there. For a
    GPU the images are stacked straight into page-locked memory, so the copy is queued behind the
    device's work instead of waiting for it.
    """
    if device is not None and torch.device(device).type == "cuda":
        pinned = torch.empty((len(batch), *batch[0].shape), dtype=torch.uint8, pin_memory=True)
        np.stack(batch, out=pinned.numpy())
        x = pinned.to(device, non_blocking=True)
    else:
        x = torch.from_numpy(np.stack(batch)).to(device)
    x = x.permute(0, 3, 1, 2)
    return x.float() / 255
