"""Letterboxing on the inference device: each resize is two small matrix products.

The official pre-processing resizes with OpenCV (detector: INTER_AREA down, INTER_LINEAR up) or
Pillow (WeDetect-Uni: BILINEAR). Area and Pillow's bilinear are separable linear maps, so an image
resizes as ``R_h @ X @ R_w.T`` with weight matrices built from the libraries' sampling rules;
OpenCV's linear upscaling is reproduced in its 11-bit fixed point with integer gathers. Everything
runs on the device that holds the batch; decoding stays on the CPU threads. Float summation order
and the libraries' internal fixed point are not matched everywhere, so a small share of pixels
lands one grey level away (measured by ``tests/test_device_letterbox.py``): an opt-in
(``accelerate(device_letterbox=True)``), not the default.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ..structures import LetterboxMeta
from .letterbox import PAD_VALUE

# Overlaps thinner than this are dropped, as OpenCV's area table does.
_AREA_EPS = 1e-3
_FIXED_ONE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE


@lru_cache(maxsize=32)  # a few image sizes recur
def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR for uint8: half-pixel centres in float32, edge taps clamped, and the two
    weights rounded to 11-bit fixed point. Returns (left index, right index, left weight, right weight)."""
    j0, frac = np.zeros(dst, np.int64), np.zeros(dst, np.float32)
    scale = src / dst
    for i in range(dst):
        x = np.float32((i + 0.5) * scale - 0.5)
        j = math.floor(x)
        f = np.float32(x - np.float32(j))
        if j < 0:
            j, f = 0, np.float32(0)
        if j >= src - 1:
            j, f = src - 1, np.float32(0)
        j0[i], frac[i] = j, f
    one = np.float32(_FIXED_ONE)
    a0, a1 = np.rint((np.float32(1) - frac) * one), np.rint(frac * one)
    return j0, np.minimum(j0 + 1, src - 1), a0.astype(np.int32), a1.astype(np.int32)


def _resize_linear(x: torch.Tensor, h1: int, w1: int) -> torch.Tensor:
    """(3, h, w) uint8-valued -> (3, h1, w1) with OpenCV's fixed-point arithmetic: rows are
    interpolated into 11-bit-scaled integers, then columns are combined with the shifts of its
    vectorised 8-bit path. Matches cv2.resize on all but ~0.1 % of pixels (off by one level)."""
    h, w = x.shape[-2:]

    xi = x.to(torch.int32)
    c0, c1, a0, a1 = _linear_taps_on(w, w1, x.device)
    rows = xi[..., c0] * a0 + xi[..., c1] * a1  # (3, h, w1), scaled by 2048
    r0, r1, b0, b1 = _linear_taps_on(h, h1, x.device)
    top, bottom = rows[:, r0] >> 4, rows[:, r1] >> 4
    out = ((b0[:, None] * top >> 16) + (b1[:, None] * bottom >> 16) + 2) >> 2
    return out.clamp_(0, 255).to(x.dtype)


@lru_cache(maxsize=32)  # a few image sizes recur; one matrix of a 4k image is ~20 MB
def _weights(src: int, dst: int, kind: str) -> np.ndarray:
    """(dst, src) float64 resampling matrix of one axis for ``"area"`` or ``"pillow_bilinear"``."""
    m = np.zeros((dst, src))
    scale = src / dst
    for i in range(dst):
        if kind == "area":  # output pixel i averages the source interval [i*scale, (i+1)*scale)
            lo, hi = i * scale, min((i + 1) * scale, src)
            for j in range(math.floor(lo), min(math.ceil(hi), src)):
                overlap = min(hi, j + 1) - max(lo, j)
                if overlap > _AREA_EPS:
                    m[i, j] = overlap / (hi - lo)  # a dropped sliver is not renormalised (OpenCV)
        elif kind == "pillow_bilinear":  # Pillow: a triangle filter widened by the reduction factor
            support = max(scale, 1.0)
            centre = (i + 0.5) * scale
            lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), src)
            for j in range(lo, hi):
                m[i, j] = max(0.0, 1 - abs((j + 0.5 - centre) / support))
        else:
            raise ValueError(kind)
    return m if kind == "area" else m / m.sum(1, keepdims=True)


# The tables on the device, kept: uploading them per image would move ~8 MB per 1280x720 image.
@lru_cache(maxsize=8)
def _linear_taps_on(src: int, dst: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(t).to(device) for t in _linear_taps(src, dst))


@lru_cache(maxsize=8)
def _weights_on(src: int, dst: int, kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(_weights(src, dst, kind)).to(device=device, dtype=dtype)


def _resize(x: torch.Tensor, h1: int, w1: int, kind: str) -> torch.Tensor:
    """(3, h, w) float -> (3, h1, w1) float holding whole grey levels, like the library's uint8 output."""
    if kind == "linear":
        return _resize_linear(x, h1, w1)
    h, w = x.shape[-2:]
    rw = _weights_on(w, w1, kind, x.device, x.dtype)
    rh = _weights_on(h, h1, kind, x.device, x.dtype)
    if kind == "pillow_bilinear":
        # Pillow resizes horizontally into an 8-bit image, then vertically (each pass rounds).
        x = torch.floor(x @ rw.T + 0.5).clamp_(0, 255) if w1 != w else x
        return torch.floor(rh @ x + 0.5).clamp_(0, 255) if h1 != h else x
    y = rh @ x @ rw.T
    if kind == "area" and (h % h1, w % w1) == (0, 0):
        return torch.floor(y + 0.5).clamp_(0, 255)  # OpenCV's integer-factor path rounds halves up
    return torch.round(y).clamp_(0, 255)


def letterbox_on_device(
    images: list[np.ndarray], metas: list[LetterboxMeta], style: str, device: torch.device | str
) -> torch.Tensor:
    """Decoded uint8 HxWx3 images and their metas (from ``detector_geometry`` / ``uni_geometry``) ->
    float32 RGB (B, 3, S, S) in [0, 1] on ``device``: the CPU path's input up to a grey level.

    ``style`` is ``"detector"`` (BGR images as OpenCV decodes them, OpenCV's resize rules) or
    ``"uni"`` (RGB images, Pillow's bilinear)."""
    size = metas[0].input_size
    out = torch.full((len(images), 3, size, size), float(PAD_VALUE), device=device)
    for k, (img, meta) in enumerate(zip(images, metas)):
        x = torch.from_numpy(np.ascontiguousarray(img)).to(device, non_blocking=True).permute(2, 0, 1).float()
        if style == "detector":
            x = x.flip(0)  # BGR -> RGB, as the CPU path does after resizing
        h, w = meta.orig_size
        h1, w1 = round(h * meta.scale[1]), round(w * meta.scale[0])
        if (h1, w1) != (h, w):
            kind = "pillow_bilinear" if style == "uni" else ("area" if h1 < h else "linear")
            x = _resize(x, h1, w1, kind)
        top, left = int(meta.pad[0]), int(meta.pad[2])
        out[k, :, top : top + h1, left : left + w1] = x
    return out / 255
