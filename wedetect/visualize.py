"""Draw detections with readable CJK labels.

Font resolution: an explicit path (``--font``), then ``$WEDETECT_FONT``, then well-known CJK font files
of Linux/macOS/Windows, then fontconfig (``fc-list :lang=zh``); failing all, Pillow's default font
with a warning (Chinese labels then render as boxes).
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import WeDetectError
from .structures import Detections

_KNOWN_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/usr/share/fonts/truetype/arphic/ukai.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "/System/Library/Fonts/STHeiti Light.ttc",
    "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/simhei.ttf",
)

_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40), (128, 0, 0)]


def find_cjk_font(font: str | os.PathLike | None = None) -> str | None:
    """Path of a font that can draw Chinese, or None."""
    if font is not None:
        if not Path(font).is_file():
            raise WeDetectError(f"font file {font} not found")
        return str(font)
    env = os.environ.get("WEDETECT_FONT")
    if env and Path(env).is_file():
        return env
    for path in _KNOWN_FONTS:
        if Path(path).is_file():
            return path
    if shutil.which("fc-list"):
        try:
            out = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        files = sorted(line.split(":")[0].strip() for line in out.splitlines() if line.strip())
        if files:
            return files[0]
    return None


@functools.lru_cache(maxsize=8)
def _load_font(path: str | None, size: int) -> ImageFont.ImageFont:
    if path is None:
        warnings.warn("no CJK font found (install fonts-wqy-microhei or pass --font); "
                      "Chinese labels will not render", stacklevel=3)
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size)


def draw_detections(
    image: Image.Image | np.ndarray, det: Detections, font: str | os.PathLike | None = None, line_width: int | None = None
) -> Image.Image:
    """A copy of ``image`` (RGB) with each box outlined and labelled ``name score``."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")
    img = img.copy()
    w, h = img.size
    size = max(12, round(min(w, h) / 40))
    lw = line_width or max(2, round(min(w, h) / 300))
    face = _load_font(find_cjk_font(font), size)
    draw = ImageDraw.Draw(img)
    for i in range(len(det)):
        x1, y1, x2, y2 = det.boxes[i].tolist()
        color = _PALETTE[int(det.labels[i]) % len(_PALETTE)]
        draw.rectangle([x1, y1, x2, y2], outline=color, width=lw)
        name = det.names[i] if i < len(det.names) else str(int(det.labels[i]))
        label = f"{name} {float(det.scores[i]):.2f}".strip()
        tx1, ty1, tx2, ty2 = draw.textbbox((0, 0), label, font=face)
        tw, th = tx2 - tx1, ty2 - ty1 + 4
        ty = y1 - th if y1 - th >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 4, ty + th], fill=color)
        draw.text((x1 + 2, ty + 2 - ty1), label, fill=(255, 255, 255), font=face)
    return img
