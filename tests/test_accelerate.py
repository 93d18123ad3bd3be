"""Opt-in speed paths (``accelerate``: channels_last, torch.compile) give the default path's outputs.

Run on the tiny parity fixture's weights (the official architecture with deterministic weights), its
prompts and image, at a 320 input to keep the CPU time small.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from paths import parity_dir
from test_parity_detector import match_detections
from typer.testing import CliRunner

from wedetect import WeDetect, WeDetectUni
from wedetect.cli import app
from wedetect.data.io import load_bgr, load_pil_rgb
from wedetect.data.letterbox import letterbox_detector, letterbox_uni, to_tensor
from wedetect.errors import WeDetectError

CASE = "detector_tiny_demo"
INPUT = 320


@pytest.fixture(scope="module")
def case():
    info = json.loads((parity_dir() / f"{CASE}.json").read_text(encoding="utf-8"))
    return info, np.load(parity_dir() / f"{CASE}.npz")


def _detector(official_checkpoint, case, device: str = "cpu") -> WeDetect:
    info, ref = case
    model = WeDetect.from_pretrained(official_checkpoint(info["keys"]), device=device)
    text = model.encode_token_ids(torch.from_numpy(ref["input_ids"]), torch.from_numpy(ref["attention_mask"]))
    model.set_class_embeddings(text[:-1], info["prompts"][:-1], blank_embedding=text[-1])
    return model


def _batch(case) -> torch.Tensor:
    info, _ = case
    rgb, _ = letterbox_detector(load_bgr(parity_dir() / info["image"]), INPUT)
    return to_tensor([rgb, rgb[:, ::-1].copy()])


def _assert_same(ours, ref, atol: float) -> None:
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


def test_channels_last_matches_default(official_checkpoint, case):
    model = _detector(official_checkpoint, case)
    x = _batch(case)
    ref = model.forward_raw(x)
    model.accelerate(channels_last=True)
    assert model.model.image_tower.downsample_layers[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    _assert_same(model.forward_raw(x), ref, atol=1e-4)
    # Switching back restores the default layout.
    model.accelerate(channels_last=False)
    assert model.model.image_tower.downsample_layers[0][0].weight.is_contiguous()


def test_accelerate_calls_combine(official_checkpoint, case):
    """An option left out keeps its value; compile=False turns compilation off."""
    model = _detector(official_checkpoint, case)
    model.accelerate(channels_last=True, compile="default")
    model.accelerate(overlap=True)
    assert model.channels_last and model._compiled is not None and model.overlap
    model.accelerate(compile=False)
    assert model._compiled is None and model.channels_last and model.overlap
    model.accelerate(channels_last=False, overlap=False)
    assert not model.channels_last and not model.overlap


def test_uni_channels_last_matches_default(official_checkpoint):
    uni = WeDetectUni.from_pretrained(official_checkpoint("keys_uni_base.json"))
    rgb, _ = letterbox_uni(load_pil_rgb(parity_dir() / "demo.jpeg"), 160)
    x = to_tensor([rgb])
    embeds, logits, boxes, levels = uni.forward_raw(x)
    uni.accelerate(channels_last=True)
    embeds2, logits2, boxes2, levels2 = uni.forward_raw(x)
    _assert_same((embeds2, logits2, boxes2), (embeds, logits, boxes), atol=1e-4)
    assert torch.equal(levels, levels2)


def test_unknown_compile_mode_is_a_clear_error(official_checkpoint, case):
    model = _detector(official_checkpoint, case)
    with pytest.raises(WeDetectError, match="compile mode must be one of"):
        model.accelerate(compile="fastest")


def test_cli_rejects_unknown_compile_mode(tmp_path):
    """Checked before anything is loaded: a missing checkpoint is not what gets reported."""
    for args in (["detect", "--checkpoint", str(tmp_path / "none.pth"), "--classes", "a"],
                 ["propose", "--uni-checkpoint", str(tmp_path / "none.pth")],
                 ["index", "add", "--uni-checkpoint", str(tmp_path / "none.pth"), "--index", str(tmp_path / "i"),
                  "--images", str(tmp_path)]):
        result = CliRunner().invoke(app, [*args, "--compile", "fastest", "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert result.output.strip() == ("error: --compile must be one of default, reduce-overhead, max-autotune, "
                                          "not 'fastest'")


@pytest.mark.slow
def test_compiled_network_matches_default(official_checkpoint, case):
    """torch.compile (inductor) of network + box decoding, one graph for the 640 batch of one image:
    raw outputs within float rounding, and the same detections through the public predict path."""
    info, _ = case
    image = parity_dir() / info["image"]
    model = _detector(official_checkpoint, case)
    rgb, _ = letterbox_detector(load_bgr(image), model.config.input_size)
    x = to_tensor([rgb])
    ref = model.forward_raw(x)
    plain = model.predict(image, threshold=0.0, max_detections=50)[0]
    model.accelerate(compile="default")
    _assert_same(model.forward_raw(x), ref, atol=1e-3)
    compiled = model.predict(image, threshold=0.0, max_detections=50)[0]
    # Exactly tied scores may come out in either order: match one to one instead of by position.
    match_detections(compiled.boxes.numpy(), compiled.scores.numpy(), compiled.labels.numpy(),
                     plain.boxes.numpy(), plain.scores.numpy(), plain.labels.numpy())


@pytest.mark.slow
def test_threaded_preprocessing_keeps_order_and_errors(official_checkpoint, case, tmp_path):
    """Images are decoded and letterboxed on worker threads; results come back in input order, an
    unreadable image in the middle yields its error in place, and the arrays equal the serial ones."""
    info, _ = case
    image = load_bgr(parity_dir() / info["image"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    items = [image[: 200 + 17 * i, : 300 + 11 * i].copy() for i in range(9)]
    items.insert(4, bad)
    model = _detector(official_checkpoint, case)
    model.preprocess_workers = 1
    serial = list(model._prepared(items))
    model.preprocess_workers = 3
    threaded = list(model._prepared(items))
    assert len(threaded) == len(items)
    for a, b in zip(serial, threaded):
        if isinstance(a, Exception):
            assert type(a) is type(b) and str(a) == str(b) and "broken.jpg" in str(b)
        else:
            np.testing.assert_array_equal(a[0], b[0])
            assert a[1] == b[1]
    # Through the public path: the same detections, and the unreadable image reported in place.
    dets = model.predict(items[3:6], threshold=0.3, batch_size=2, on_error="skip")
    assert dets[1].error and not dets[0].error and not dets[2].error
    model.preprocess_workers = 1
    again = model.predict(items[3:6], threshold=0.3, batch_size=2, on_error="skip")
    for a, b in zip(dets, again):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)


def _same_detections(a, b) -> None:
    assert a.path == b.path and a.error == b.error
    if a.error is None:
        for field in ("boxes", "scores", "labels", "embeddings"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None and y is None) or torch.equal(x, y), field


def _crops(case) -> list[np.ndarray]:
    info, _ = case
    image = load_bgr(parity_dir() / info["image"])
    return [image[: 180 + 23 * i, : 260 + 13 * i].copy() for i in range(7)]


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 3])
def test_overlap_matches_inline_postprocessing(official_checkpoint, case, tmp_path, threads, monkeypatch):
    """``accelerate(overlap=True)``: batches post-processed on worker threads while the next batch runs
    come back identical and in input order, a partial last batch and an unreadable image included."""
    import wedetect.inference as inference

    monkeypatch.setattr(inference, "POST_THREADS_CPU", threads)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    items = _crops(case)
    items.insert(3, bad)
    model = _detector(official_checkpoint, case)
    inline = model.predict(items, threshold=0.05, batch_size=3, on_error="skip")
    model.accelerate(overlap=True)
    assert model.overlap
    overlapped = model.predict(items, threshold=0.05, batch_size=3, on_error="skip")
    assert len(overlapped) == len(items) and overlapped[3].error and "broken.jpg" in overlapped[3].error
    assert sum(len(d.scores) for d in inline if not d.error) > 0
    for a, b in zip(inline, overlapped):
        _same_detections(a, b)
    # Network options reset by a later call leave the pre/post-processing choice alone.
    model.accelerate(channels_last=False)
    assert model.overlap
    model.accelerate(overlap=False)
    assert not model.overlap


@pytest.mark.slow
def test_uni_overlap_matches_inline_postprocessing(official_checkpoint, case):
    uni = WeDetectUni.from_pretrained(official_checkpoint("keys_uni_base.json"))
    items = _crops(case)[:3]
    inline = uni.propose(items, num_proposals=20, batch_size=2)
    uni.accelerate(overlap=True)
    overlapped = uni.propose(items, num_proposals=20, batch_size=2)
    assert all(len(d.scores) > 0 for d in inline)
    for a, b in zip(inline, overlapped):
        _same_detections(a, b)


def test_overlap_reports_errors_of_the_postprocessing_thread(official_checkpoint, case, monkeypatch):
    """A failure while post-processing on the worker thread reaches the caller (not a hang, not a
    silently missing result), and the next call works."""
    import wedetect.inference as inference

    model = _detector(official_checkpoint, case).accelerate(overlap=True)
    items = [im[:96, :96].copy() for im in _crops(case)[:3]]
    real = inference.detector_postprocess_fast

    def broken(*args, **kwargs):
        raise RuntimeError("post-processing failed")

    monkeypatch.setattr(inference, "detector_postprocess_fast", broken)
    with pytest.raises(RuntimeError, match="post-processing failed"):
        model.predict(items, batch_size=1)
    monkeypatch.setattr(inference, "detector_postprocess_fast", real)
    assert len(model.predict(items, batch_size=2)) == 3
    assert model.predict([], batch_size=2) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_cuda_overlap_matches_inline(official_checkpoint, case, compile_mode):
    """On a GPU the post-processing thread has its own stream; with CUDA graphs each replay reuses its
    output buffers, so the batch still in post-processing must hold its own copy."""
    items = _crops(case)
    model = _detector(official_checkpoint, case, device="cuda").accelerate(compile=compile_mode)
    inline = model.predict(items, threshold=0.05, batch_size=2)
    model.accelerate(compile=compile_mode, overlap=True)
    for _ in range(2):  # the second run replays the captured graphs
        overlapped = model.predict(items, threshold=0.05, batch_size=2)
        for a, b in zip(inline, overlapped):
            _same_detections(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_upload_and_network_never_wait_for_the_device(official_checkpoint, case):
    """Uploading a batch and running the network (detector and Uni) only queue work: a hidden wait (a
    copy from pageable memory, an ``.item()``) would stall the host behind the GPU and undo overlap."""
    info, _ = case
    rgb, _ = letterbox_detector(load_bgr(parity_dir() / info["image"]), INPUT)
    model = _detector(official_checkpoint, case, device="cuda")
    uni = WeDetectUni.from_pretrained(official_checkpoint("keys_uni_base.json"), device="cuda")
    model.forward_raw(to_tensor([rgb, rgb], "cuda"))  # warm-up: cuDNN picks its kernels, the allocator grows
    uni.forward_raw(to_tensor([rgb, rgb], "cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.forward_raw(to_tensor([rgb, rgb], "cuda"))
        uni.forward_raw(to_tensor([rgb, rgb], "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
