"""Letterboxing on the inference device (``accelerate(device_letterbox=True)``) against the official
CPU pre-processing: the same geometry, pixels at most one grey level off on a small share, and the
same detections and proposals through the public API."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from paths import parity_dir
from wedetect import WeDetect, WeDetectUni
from wedetect.cli import app
from wedetect.data.device_letterbox import letterbox_on_device
from wedetect.data.letterbox import detector_geometry, letterbox_detector, letterbox_uni, uni_geometry

# (h, w) at a 640 input: integer and fractional downscaling, upscaling, square, off-by-one sizes.
SIZES = [(720, 1280), (1000, 750), (641, 639), (480, 640), (333, 517), (300, 200), (57, 91)]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """Noise over a smooth field: both flat regions and single-pixel detail."""
    g = np.random.default_rng(seed)
    base = cv2.resize(g.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8), (w, h),
                      interpolation=cv2.INTER_CUBIC)  # fmt: skip
    return np.clip(base.astype(int) + g.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)


def _levels(batch: torch.Tensor) -> np.ndarray:
    return np.rint(batch.permute(0, 2, 3, 1).numpy() * 255).astype(int)


@pytest.mark.parametrize("h,w", SIZES)
def test_detector_style_matches_opencv(h, w):
    bgr = _image(h, w, seed=h * w)
    ref, meta = letterbox_detector(bgr, 640)
    assert detector_geometry(h, w, 640)[2] == meta
    ours = _levels(letterbox_on_device([bgr], [meta], "detector", "cpu"))[0]
    diff = np.abs(ours - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 2e-3, ((diff > 0).mean(), diff.max())
    if h % (h * 640 // max(h, w)) == 0 and h > 640:  # an integer reduction factor: exact
        assert diff.max() == 0


@pytest.mark.parametrize("h,w", SIZES)
def test_uni_style_matches_pillow(h, w):
    rgb = Image.fromarray(_image(h, w, seed=h + w))
    ref, meta = letterbox_uni(rgb, 640)
    assert uni_geometry(h, w, 640)[2] == meta
    ours = _levels(letterbox_on_device([np.array(rgb)], [meta], "uni", "cpu"))[0]
    diff = np.abs(ours - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 3e-3, ((diff > 0).mean(), diff.max())


def test_batch_of_mixed_sizes_keeps_each_image_in_place():
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES[:4])]
    metas = [detector_geometry(*im.shape[:2], 640)[2] for im in images]
    batch = letterbox_on_device(images, metas, "detector", "cpu")
    assert batch.shape == (4, 3, 640, 640) and batch.dtype == torch.float32
    for k, im in enumerate(images):
        ref, _ = letterbox_detector(im, 640)
        assert np.abs(_levels(batch[k : k + 1])[0] - ref.astype(int)).max() <= 1


def _same_top(ours, ref, top: int = 20) -> None:
    """The strongest detections agree: scores within 1e-3, and each of the top boxes has a
    counterpart of the same label within 0.5 px (small input changes may reorder near-ties)."""
    assert len(ours) == len(ref)
    np.testing.assert_allclose(ours.scores.numpy(), ref.scores.numpy(), atol=1e-3)
    for box, label in zip(ref.boxes[:top], ref.labels[:top]):
        near = (ours.boxes - box).abs().max(1).values <= 0.5
        assert (near & (ours.labels == label)).any(), (box, label)


def test_detector_predictions_match_the_cpu_path(official_checkpoint):
    info = json.loads((parity_dir() / "detector_tiny_demo.json").read_text(encoding="utf-8"))
    ref = np.load(parity_dir() / "detector_tiny_demo.npz")
    model = WeDetect.from_pretrained(official_checkpoint(info["keys"]))
    text = model.encode_token_ids(torch.from_numpy(ref["input_ids"]), torch.from_numpy(ref["attention_mask"]))
    model.set_class_embeddings(text[:-1], info["prompts"][:-1], blank_embedding=text[-1])
    image = parity_dir() / info["image"]
    small = cv2.imread(str(image))[:300, :451].copy()  # upscaled to the input: the fixed-point path
    plain = model.predict([image, small], threshold=0.0, max_detections=100)
    model.accelerate(device_letterbox=True)
    assert model.device_letterbox
    model.accelerate(channels_last=False)  # a pre-processing option left out keeps its value
    assert model.device_letterbox
    ours = model.predict([image, small], threshold=0.0, max_detections=100)
    for a, b in zip(ours, plain):
        _same_top(a, b)


def test_uni_proposals_match_the_cpu_path(official_checkpoint):
    uni = WeDetectUni.from_pretrained(official_checkpoint("keys_uni_base.json"))
    image = parity_dir() / "demo.jpeg"
    plain = uni.propose(image, num_proposals=50)[0]
    uni.accelerate(device_letterbox=True)
    _same_top(uni.propose(image, num_proposals=50)[0], plain)


def test_cli_flag(official_checkpoint, tiny_tokenizer, tmp_path):
    info = json.loads((parity_dir() / "detector_tiny_demo.json").read_text(encoding="utf-8"))
    args = ["detect", "--checkpoint", str(official_checkpoint(info["keys"])), "--tokenizer", str(tiny_tokenizer),
            "--classes", "a,b", "--images", str(parity_dir() / info["image"]), "--device", "cpu",
            "--threshold", "0.0", "--json", "-"]
    plain = CliRunner().invoke(app, args)
    ours = CliRunner().invoke(app, [*args, "--device-letterbox"])
    assert plain.exit_code == 0 and ours.exit_code == 0, ours.output
    (a,), (b,) = json.loads(ours.stdout)["images"], json.loads(plain.stdout)["images"]
    assert a["scores"] and len(a["scores"]) == len(b["scores"])
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-3)
