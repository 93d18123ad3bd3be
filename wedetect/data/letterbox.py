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

PAD_VALUE = 114


def letterbox_detector(bgr: np.ndarray, size: int) -> tuple[np.ndarray, LetterboxMeta]:
    """BGR uint8 HxWx3 -> (RGB uint8 S x S x 3 network input, meta)."""
    h, w = bgr.shape[:2]
    r = min(size / max(h, w), size / min(h, w))  # a Python float, as the official code computes it
    if r == 1:
        img = bgr
    else:
        interp = cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR
        img = cv2.resize(bgr, (int(w * r), int(h * r)), interpolation=interp)
    h1, w1 = img.shape[:2]
    pad_h, pad_w = size - h1, size - w1
    top, left = pad_h // 2, pad_w // 2
    bottom, right = pad_h - top, pad_w - left
    if pad_h or pad_w:
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    meta = LetterboxMeta(
        orig_size=(h, w),
        input_size=size,
        scale=(w1 / w, h1 / h),
        pad=(float(top), float(bottom), float(left), float(right)),
    )
    return np.ascontiguousarray(img[:, :, ::-1]), meta


def letterbox_uni(image: Image.Image, size: int) -> tuple[np.ndarray, LetterboxMeta]:
    """Pillow RGB image -> (RGB uint8 S x S x 3 network input, meta)."""
    w, h = image.size
    r = min(size / w, size / h)
    new_w, new_h = int(round(w * r)), int(round(h * r))
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), (PAD_VALUE,) * 3)
    dw, dh = size - new_w, size - new_h
    canvas.paste(resized, (dw // 2, dh // 2))
    meta = LetterboxMeta(orig_size=(h, w), input_size=size, scale=(r, r), pad=(dh / 2, dh / 2, dw / 2, dw / 2))
    return np.asarray(canvas), meta


def to_tensor(batch: list[np.ndarray], device: torch.device | str | None = None) -> torch.Tensor:
    """RGB uint8 HxWx3 inputs -> float32 (B, 3, S, S) in [0, 1] (a true division by 255).

    The uint8 batch moves to ``device`` first: a quarter of the bytes, and the division runs there.
    """
    x = torch.from_numpy(np.stack(batch)).to(device).permute(0, 3, 1, 2)
    return x.float() / 255
