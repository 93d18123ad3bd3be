"""Labels are drawn with a real CJK font: different Chinese names give different glyphs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wedetect import Detections, WeDetectError
from wedetect.visualize import draw_detections, find_cjk_font


def _label_pixels(name: str) -> np.ndarray:
    det = Detections(torch.tensor([[20.0, 60.0, 180.0, 150.0]]), torch.tensor([0.9]), torch.tensor([0]), [name])
    img = draw_detections(Image.new("RGB", (200, 160), (0, 0, 0)), det)
    return np.asarray(img)[30:60, 20:120]


def test_cjk_font_found_and_glyphs_rendered():
    assert find_cjk_font() is not None, "no CJK font: install fonts-wqy-microhei (CI does) or set WEDETECT_FONT"
    a, b = _label_pixels("鞋"), _label_pixels("床")
    assert (a != b).any(), "two different Chinese names rendered identically (missing glyphs)"
    assert (_label_pixels("鞋") == a).all()


def test_explicit_missing_font_is_an_error(tmp_path):
    det = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(WeDetectError, match="font file"):
        draw_detections(Image.new("RGB", (10, 10)), det, font=tmp_path / "none.ttf")
